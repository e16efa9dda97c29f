//! A webhook receiver's answer, read by the delivery client: any bytes, any limit, in three
//! reads, then the end of the connection. Never panics, never keeps a body over its limit, never
//! takes an interim (1xx) answer for the answer, and reads the same answer however the bytes were
//! split.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use triggers::delivery::client::{AnswerReader, Read};

#[path = "split.rs"]
mod split;

fn read(limit: usize, parts: &[&[u8]]) -> Result<Read, String> {
    let mut reader = AnswerReader::new(limit);
    let mut buf = BytesMut::new();
    for part in parts {
        buf.extend_from_slice(part);
        match reader.feed(&mut buf, false)? {
            Read::More => {}
            done => return Ok(done),
        }
    }
    let end = reader.feed(&mut buf, true);
    assert!(
        !matches!(end, Ok(Read::More)),
        "more asked for after the end"
    );
    end
}

fuzz_target!(|data: &[u8]| {
    let Some((limit, wire, reads)) = split::limit_and_reads(data) else {
        return;
    };
    let whole = read(limit, &[wire]);
    if let Ok(Read::Done(answer, _)) = &whole {
        assert!(
            answer.body.as_ref().is_none_or(|b| b.len() <= limit),
            "a body over the limit"
        );
        assert!(!(100..200).contains(&answer.status), "an interim answer");
    }
    let split = read(limit, &reads);
    match (whole, split) {
        (Ok(Read::Done(w, keep_whole)), Ok(Read::Done(s, keep_split))) => {
            assert_eq!(w, s, "the split changed the answer");
            // Bytes after the answer make its connection unusable when they are seen; a read
            // that stopped before they came could not see them (the client looks again before
            // it uses the connection), so only that direction may differ.
            assert!(!keep_whole || keep_split, "kept only when read whole");
        }
        (w, s) => assert_eq!(w, s, "the split changed the result"),
    }
});
