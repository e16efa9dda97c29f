//! The small parsers of hostile text, any bytes: an API key as a client sends it, an
//! `Idempotency-Key`, a UUID path segment, an RFC 3339 time, and a webhook receiver's
//! `Retry-After` (delta-seconds or an IMF-fixdate). None panics, and what one accepts writes back
//! as what was read.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use triggers::auth::key::ApiKey;
use triggers::delivery::schedule::parse_retry_after;
use triggers::ids::{http_date, parse_rfc3339, parse_uuid};
use triggers::ingress::request::idempotency_key;

fuzz_target!(|data: &[u8]| {
    if let Some(key) = ApiKey::parse(data) {
        assert_eq!(
            key.as_str().as_bytes(),
            data,
            "a key is the bytes it was read from"
        );
    }
    if let Ok(Some(key)) = idempotency_key(Some(data)) {
        let key = key.as_bytes();
        assert!((1..=255).contains(&key.len()), "{key:?}");
        assert!(key.iter().all(|b| (0x21..=0x7e).contains(b) && *b != b'"' && *b != b'\\'));
        // The key is what was sent, less blanks around it and the quotes of a quoted string.
        let sent = data.trim_ascii();
        assert!(sent == key || (sent.len() == key.len() + 2 && &sent[1..sent.len() - 1] == key));
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(id) = parse_uuid(text) {
        let written = if text.len() == 36 {
            id.hyphenated().to_string()
        } else {
            id.simple().to_string()
        };
        assert_eq!(
            written,
            text.to_ascii_lowercase(),
            "a UUID reads back as itself"
        );
    }
    if let Some(at) = parse_rfc3339(text) {
        let mut out = Vec::new();
        at.write_rfc3339(&mut out);
        let out = std::str::from_utf8(&out).expect("RFC 3339 is ASCII");
        assert_eq!(parse_rfc3339(out), Some(at), "{text} as {out} reads back");
    }
    // Against the epoch a date's delay is its own Unix time; against a later clock it is less,
    // never negative.
    let Some(delay) = parse_retry_after(text, UNIX_EPOCH) else {
        return;
    };
    let later = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let again = parse_retry_after(text, later).expect("the same value parses at any time");
    let trimmed = text.trim();
    if let Ok(secs) = trimmed.parse::<u64>() {
        assert_eq!(again, delay, "delta-seconds do not depend on the clock");
        assert_eq!(delay.as_secs(), secs);
        return;
    }
    assert_eq!(trimmed.len(), 29, "anything else is an IMF-fixdate");
    assert!(again <= delay);
    // A real calendar date (every month has a 28th; a leap second rolls over) in plain digits
    // writes back as the date it came from (the weekday and separators are not checked).
    let b = trimmed.as_bytes();
    let fields = [5..7, 8..11, 12..16, 17..19, 20..22, 23..25];
    let digits = fields
        .iter()
        .filter(|r| r.start != 8)
        .all(|r| b[r.clone()].iter().all(u8::is_ascii_digit));
    if digits && b[5..7] <= b"28"[..] && b[23..25] != b"60"[..] {
        let written = http_date(delay.as_secs());
        for r in fields {
            assert_eq!(&written[r.clone()], &b[r], "{trimmed}");
        }
    }
});
