//! The endpoint bodies (create, patch, rotate, recover) and the event-type patterns they carry:
//! any bytes. Never panics; an accepted body holds only what its checks allow: a URL the policy
//! parses, 1..50 distinct valid patterns, a description of at most 255 characters, a rate from 1
//! to 10,000, headers of its own that read back as sent and can't start another header (no CR or
//! LF, no reserved name, each name once), a signing secret that is `whsec_` and the base64 of 24
//! to 64 bytes, a `since` that writes back as RFC 3339 and reads again as the same instant.
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use triggers::endpoint_headers::{headers_error, parse_line};
use triggers::event_types::{pattern_error, pattern_matches};
use triggers::ids::{parse_rfc3339, Micros};
use triggers::ingress::endpoints::{
    validate_endpoint_patch, validate_endpoint_spec, validate_recover, validate_rotate,
};
use triggers::json::Parser;
use triggers::signing_secret::{key_bytes, normalize};
use triggers::url_policy::parse_url;

thread_local! {
    static PARSER: RefCell<Parser> = RefCell::new(Parser::default());
}

fn check_patterns(patterns: &[String]) {
    assert!((1..=50).contains(&patterns.len()));
    for (i, p) in patterns.iter().enumerate() {
        assert_eq!(pattern_error(p), None, "an accepted pattern is valid");
        assert!(!patterns[..i].contains(p), "accepted patterns are distinct");
        // A pattern without a wildcard matches exactly itself.
        if !p.ends_with('*') {
            assert!(pattern_matches(p, p));
        }
    }
}

fn check_description(d: &str) {
    assert!(d.chars().count() <= 255 && !d.contains('\0'));
}

fn check_rate(r: u32) {
    assert!((1..=10_000).contains(&r));
}

fn check_headers(lines: &[String]) {
    assert!(lines.len() <= 20);
    assert!(lines.iter().map(String::len).sum::<usize>() <= 8192);
    let pairs: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| parse_line(l).expect("an accepted header reads back"))
        .collect();
    assert_eq!(headers_error(pairs.iter().copied()), None);
    for l in lines {
        assert!(!l.contains(['\r', '\n', '\0']), "{l:?}");
    }
}

fn check_secret(secret: &str) {
    let key = key_bytes(secret).expect("an accepted secret has a key");
    assert!((24..=64).contains(&key.len()), "{secret:?}");
    assert!(secret.starts_with("whsec_") && secret.is_ascii());
    assert_eq!(normalize(secret).as_deref(), Ok(secret), "kept in its padded form");
}

fn check_since(since: Micros) {
    let mut text = Vec::new();
    since.write_rfc3339(&mut text);
    let text = std::str::from_utf8(&text).expect("RFC 3339 is ASCII");
    assert_eq!(parse_rfc3339(text), Some(since), "{text} reads back");
}

fuzz_target!(|data: &[u8]| {
    PARSER.with(|parser| {
        if let Ok(spec) = validate_endpoint_spec(parser, data) {
            assert!(parse_url(&spec.url).is_ok());
            if let Some(patterns) = &spec.event_types {
                check_patterns(patterns);
            }
            if let Some(d) = &spec.description {
                check_description(d);
            }
            if let Some(r) = spec.rate_limit_per_second {
                check_rate(r);
            }
            check_headers(&spec.headers);
            if let Some(secret) = &spec.signing_secret {
                check_secret(secret);
            }
        }
        if let Ok(Some(secret)) = validate_rotate(parser, data) {
            check_secret(&secret);
        }
        if let Ok(patch) = validate_endpoint_patch(parser, data) {
            assert!(
                patch.url.is_some()
                    || patch.event_types.is_some()
                    || patch.description.is_some()
                    || patch.rate_limit_per_second.is_some()
                    || patch.headers.is_some(),
                "a patch changes something"
            );
            if let Some(url) = &patch.url {
                assert!(parse_url(url).is_ok());
            }
            if let Some(Some(patterns)) = &patch.event_types {
                check_patterns(patterns);
            }
            if let Some(Some(d)) = &patch.description {
                check_description(d);
            }
            if let Some(Some(r)) = patch.rate_limit_per_second {
                check_rate(r);
            }
            if let Some(lines) = &patch.headers {
                check_headers(lines);
            }
        }
        if let Ok(since) = validate_recover(parser, data) {
            check_since(since);
        }
    });
    // Any text as a pattern and as a type: never panics; `*` takes every non-operational type.
    if let Ok(text) = std::str::from_utf8(data) {
        let (pattern, event_type) = text.split_once('\n').unwrap_or((text, text));
        let _ = pattern_error(pattern);
        let matched = pattern_matches(pattern, event_type);
        if pattern == event_type && pattern_error(pattern).is_none() && !pattern.ends_with('*') {
            assert!(matched);
        }
    }
});
