//! The inbox query string and its cursor: any bytes. Never panics; limits stay in range; a cursor
//! that decodes encodes back to a cursor for the same id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use triggers::flow::job::Query;
use triggers::ids::{decode_cursor, encode_cursor};
use triggers::ingress::inbox::parse_query;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(id) = decode_cursor(text) {
            assert_eq!(decode_cursor(&encode_cursor(id)), Some(id));
        }
    }
    match parse_query(data) {
        Ok(Query::Inbox { limit, before, .. }) => {
            assert!((1..=1000).contains(&limit));
            if let Some(id) = before {
                assert_eq!(decode_cursor(&encode_cursor(id)), Some(id));
            }
        }
        Ok(other) => panic!("parse_query made {other:?}"),
        Err(_) => {}
    }
});
