//! The chunked decoder: any bytes, any limit, in three reads. Never panics, never holds or
//! announces more than its limit, and gives the same result however the bytes were split.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use triggers::chunked::ChunkedDecoder;

#[path = "split.rs"]
mod split;

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
    let Some((limit, wire, reads)) = split::limit_and_reads(data) else {
        return;
    };
    let whole = decode(limit, &[wire]);
    let split = decode(limit, &reads);
    assert_eq!(whole, split, "the split changed the result");
});
