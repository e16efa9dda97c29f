//! How the byte-stream targets read their input: two bytes of limit, two bytes that place two
//! cuts, then the wire, whole and in the three reads the cuts make.

/// `(limit, wire, [first, second, third read])`, or `None` when the input is too short.
pub fn limit_and_reads(data: &[u8]) -> Option<(usize, &[u8], [&[u8]; 3])> {
    if data.len() < 4 {
        return None;
    }
    let limit = u16::from_le_bytes([data[0], data[1]]) as usize;
    let wire = &data[4..];
    let a = (data[2] as usize * wire.len()) / 256;
    let b = a + ((data[3] as usize * (wire.len() - a)) / 256);
    Some((limit, wire, [&wire[..a], &wire[a..b], &wire[b..]]))
}
