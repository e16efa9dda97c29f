//! The chunked decoder: any bytes, any limit, in three reads. Never panics, never holds or
//! announces more than its limit, and gives the same result however the bytes were split.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use triggers::chunked::ChunkedDecoder;

fn decode(limit: usize, parts: &[&[u8]]) -> Result<Option<Vec<u8>>, String> {
    let mut d = ChunkedDecoder::new(limit);
    let mut buf = BytesMut::new();
    for part in parts {
        buf.extend_from_slice(part);
        match d.decode(&mut buf) {
            Ok(Some(body)) => {
                assert!(body.len() <= limit, "body over the limit");
                return Ok(Some(body.to_vec()));
            }
            Ok(None) => assert!(d.announced() <= limit, "announced over the limit"),
            Err(e) => return Err(format!("{e:?}")),
        }
    }
    Ok(None)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let limit = u16::from_le_bytes([data[0], data[1]]) as usize;
    let wire = &data[4..];
    let a = (data[2] as usize * wire.len()) / 256;
    let b = a + ((data[3] as usize * (wire.len() - a)) / 256);
    let whole = decode(limit, &[wire]);
    let split = decode(limit, &[&wire[..a], &wire[a..b], &wire[b..]]);
    assert_eq!(whole, split, "the split changed the result");
});
