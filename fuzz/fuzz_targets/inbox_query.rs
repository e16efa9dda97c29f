//! The query strings of the pages (the inbox; an endpoint's failed deliveries) and their cursors:
//! any bytes. Never panics; limits stay in range; a cursor that decodes encodes back to a cursor
//! for the same position; a `since` that is accepted writes back as RFC 3339 and reads again as
//! the same instant.
#![no_main]

use libfuzzer_sys::fuzz_target;
use triggers::flow::job::Query;
use triggers::ids::{decode_cursor, decode_cursor_at, encode_cursor, encode_cursor_at, parse_rfc3339};
use triggers::ingress::endpoints::parse_failed_query;
use triggers::ingress::inbox::parse_query;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(id) = decode_cursor(text) {
            assert_eq!(decode_cursor(&encode_cursor(id)), Some(id));
        }
        if let Some((at, id)) = decode_cursor_at(text) {
            assert_eq!(decode_cursor_at(&encode_cursor_at(at, id)), Some((at, id)));
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
    if let Ok(q) = parse_failed_query(data) {
        assert!((1..=1000).contains(&q.limit));
        if let Some((at, id)) = q.before {
            assert_eq!(decode_cursor_at(&encode_cursor_at(at, id)), Some((at, id)));
        }
        if let Some(since) = q.since {
            let mut text = Vec::new();
            since.write_rfc3339(&mut text);
            let text = std::str::from_utf8(&text).expect("RFC 3339 is ASCII");
            assert_eq!(parse_rfc3339(text), Some(since), "{text} reads back");
        }
    }
});
