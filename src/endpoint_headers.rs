//! Headers of an endpoint's own (`headers` of `/api/endpoints`): sent with every delivery to it,
//! after the request line and `Host`, before the server's own headers. What a receiver asks of
//! every caller (an `Authorization` of its gateway, a tenant or routing header) is set once.
//!
//! A name is an HTTP token (RFC 9110: letters, digits and ``!#$%&'*+-.^_`|~``), at most 64
//! bytes, and none of those the server sets itself or that frame the request (see
//! [`RESERVED`]); names are compared without regard to case, and each may appear once. A value is
//! printable ASCII (spaces and tabs inside, not at either end; no CR, LF or other control
//! character, so no value can start another header or a second request), at most 1,024 bytes.
//! At most [`ENDPOINT_HEADERS_MAX`] headers, [`ENDPOINT_HEADER_BYTES_MAX`] bytes in all. They
//! are stored as the lines sent (`name: value`, in `endpoints.headers`, migration 0013), and
//! delivery checks each again when it loads the endpoint: a line that is not valid (written by
//! hand in the database) is left out rather than sent.

use crate::config::{ENDPOINT_HEADERS_MAX, ENDPOINT_HEADER_BYTES_MAX};

/// The longest name.
pub const NAME_BYTES_MAX: usize = 64;
/// The longest value.
pub const VALUE_BYTES_MAX: usize = 1024;

/// Names an endpoint may not set: those the server sends on every delivery (the Standard
/// Webhooks trio, its own `x-*`, trace context, content and agent), and those that frame the
/// request or the connection (hop-by-hop and length headers), whose second copy would make the
/// request mean something else to a proxy than to the receiver.
pub const RESERVED: &[&str] = &[
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "te",
    "trailer",
    "expect",
    "user-agent",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "x-event-id",
    "x-event-type",
    "x-delivery-attempt",
    "traceparent",
    "tracestate",
];

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// What reads show in place of a credential's value (see [`is_credential`]). Sent back as the
/// value in a PATCH, it stands for the value the endpoint has for that name.
pub const REDACTED: &str = "<redacted>";

/// Parts of a header name that say its value is a credential: its value is never shown again
/// once set (`Authorization`, `Proxy-Authorization`, `Cookie`, `X-API-Key`, `X-Auth-Token`,
/// `X-Client-Secret`, `X-Session`, …). Naming too much hides a value that was harmless; naming
/// too little shows a secret to whoever reads the endpoint.
const CREDENTIAL_PARTS: [&str; 7] = [
    "auth", "token", "secret", "key", "pass", "session", "cookie",
];

/// Whether a header named `name` holds a credential, whose value reads as [`REDACTED`].
pub fn is_credential(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    CREDENTIAL_PARTS.iter().any(|part| lower.contains(part))
}

/// The value a read shows for `name: value`.
pub fn shown<'a>(name: &str, value: &'a str) -> &'a str {
    if is_credential(name) {
        REDACTED
    } else {
        value
    }
}

/// The lines of a change, each credential whose value is [`REDACTED`] given the endpoint's own
/// value for that name (names compared in any case) from `stored`; an error naming the header
/// when the endpoint has no value for it.
pub fn fill_redacted(lines: &[String], stored: &[String]) -> Result<Vec<String>, String> {
    lines
        .iter()
        .map(|l| match split(l) {
            Some((name, value)) if is_redacted(name, value) => stored
                .iter()
                .filter_map(|s| split(s))
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, kept)| line(name, kept))
                .ok_or_else(|| unknown_redacted(name)),
            _ => Ok(l.clone()),
        })
        .collect()
}

/// Whether `name: value` is a credential's value as reads show it.
fn is_redacted(name: &str, value: &str) -> bool {
    value == REDACTED && is_credential(name)
}

/// Whether any line is a credential's value as reads show it.
pub fn has_redacted(lines: &[String]) -> bool {
    lines
        .iter()
        .any(|l| split(l).is_some_and(|(n, v)| is_redacted(n, v)))
}

/// The error for a [`REDACTED`] value where the endpoint keeps none for `name`.
fn unknown_redacted(name: &str) -> String {
    format!(
        "`{name}` has the value {REDACTED}, which stands for the value the endpoint keeps for it, \
         and it keeps none: send the value itself"
    )
}

/// Why `name: value` may not be one of an endpoint's headers, or `None` when it may.
pub fn header_error(name: &str, value: &str) -> Option<String> {
    if name.is_empty() || name.len() > NAME_BYTES_MAX || !name.bytes().all(is_token_byte) {
        return Some(format!(
            "a header name must be 1 to {NAME_BYTES_MAX} letters, digits or !#$%&'*+-.^_`|~"
        ));
    }
    if RESERVED.iter().any(|r| r.eq_ignore_ascii_case(name)) {
        return Some(format!(
            "`{name}` is set by the server (or frames the request) and can't be an endpoint's header"
        ));
    }
    let printable = |b: u8| b == b'\t' || (0x20..0x7f).contains(&b);
    if value.len() > VALUE_BYTES_MAX
        || !value.bytes().all(printable)
        || value.starts_with([' ', '\t'])
        || value.ends_with([' ', '\t'])
    {
        return Some(format!(
            "the value of `{name}` must be at most {VALUE_BYTES_MAX} bytes of printable ASCII \
             (no control characters, no spaces at either end)"
        ));
    }
    None
}

/// Why a set of headers (name, value pairs) may not be an endpoint's, or `None` when it may:
/// each valid, no name twice (in any case), not too many, not too long together.
pub fn headers_error<'a>(
    headers: impl ExactSizeIterator<Item = (&'a str, &'a str)>,
) -> Option<String> {
    if headers.len() > ENDPOINT_HEADERS_MAX {
        return Some(format!(
            "headers may hold at most {ENDPOINT_HEADERS_MAX} headers"
        ));
    }
    let mut seen: Vec<&str> = Vec::with_capacity(headers.len());
    let mut bytes = 0;
    for (name, value) in headers {
        if let Some(why) = header_error(name, value) {
            return Some(why);
        }
        if seen.iter().any(|s| s.eq_ignore_ascii_case(name)) {
            return Some(format!(
                "`{name}` is named twice (names are compared in any case)"
            ));
        }
        seen.push(name);
        bytes += line(name, value).len();
    }
    (bytes > ENDPOINT_HEADER_BYTES_MAX).then(|| {
        format!("headers may take at most {ENDPOINT_HEADER_BYTES_MAX} bytes in all (`name: value` each)")
    })
}

/// A header as stored and sent (without its line end): `name: value`.
pub fn line(name: &str, value: &str) -> String {
    format!("{name}: {value}")
}

/// A stored line's name and value as stored (a name is a token, so the first `: ` ends it).
pub fn split(line: &str) -> Option<(&str, &str)> {
    line.split_once(": ")
}

/// A stored line's name and value, if it is one an endpoint may send.
pub fn parse_line(line: &str) -> Option<(&str, &str)> {
    let (name, value) = split(line)?;
    header_error(name, value).is_none().then_some((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_read_redacted_and_a_redacted_value_keeps_the_stored_one() {
        for name in [
            "Authorization",
            "proxy-authorization",
            "Cookie",
            "X-API-Key",
            "X-Auth-Token",
            "X-Client-Secret",
            "X-Password",
            "X-Session-Id",
        ] {
            assert!(is_credential(name), "{name}");
            assert_eq!(shown(name, "s3cr3t"), REDACTED);
        }
        for name in ["X-Tenant", "X-Region", "Accept"] {
            assert!(!is_credential(name), "{name}");
            assert_eq!(shown(name, "eu-1"), "eu-1");
        }
        let stored = vec![line("Authorization", "Bearer t0k"), line("X-Tenant", "a")];
        let change = vec![line("authorization", REDACTED), line("X-Tenant", "b")];
        assert!(has_redacted(&change));
        assert_eq!(
            fill_redacted(&change, &stored).unwrap(),
            [line("authorization", "Bearer t0k"), line("X-Tenant", "b")]
        );
        let unknown = vec![line("X-API-Key", REDACTED)];
        assert_eq!(
            fill_redacted(&unknown, &stored).unwrap_err(),
            unknown_redacted("X-API-Key")
        );
        assert!(!has_redacted(&stored));
        // Only a credential's value stands for another: any other header's is its value.
        let plain = vec![line("X-Tenant", REDACTED)];
        assert!(!has_redacted(&plain));
        assert_eq!(fill_redacted(&plain, &stored).unwrap(), plain);
    }

    #[test]
    fn names_are_tokens_not_reserved_and_values_printable() {
        assert_eq!(header_error("Authorization", "Bearer abc"), None);
        assert_eq!(header_error("X-Tenant_1.a", "a\tb c"), None);
        for name in [
            "",
            "X Tenant",
            "X:y",
            "Tenant\r\nX-Evil",
            "é",
            &"a".repeat(65),
        ] {
            assert!(header_error(name, "v").is_some(), "{name:?}");
        }
        for name in [
            "Host",
            "CONTENT-LENGTH",
            "webhook-signature",
            "Transfer-Encoding",
        ] {
            assert!(header_error(name, "v")
                .unwrap()
                .contains("set by the server"));
        }
        for value in [
            "a\r\nX-Evil: 1",
            "a\nb",
            "\0",
            "é",
            " a",
            "a ",
            &"a".repeat(1025),
        ] {
            assert!(header_error("X-A", value).is_some(), "{value:?}");
        }
        assert_eq!(header_error("X-A", ""), None, "an empty value is a value");
    }

    #[test]
    fn a_set_has_each_name_once_and_stays_small() {
        let ok = [("X-A", "1"), ("X-B", "2")];
        assert_eq!(headers_error(ok.into_iter()), None);
        let twice = [("X-A", "1"), ("x-a", "2")];
        assert!(headers_error(twice.into_iter()).unwrap().contains("twice"));
        let names: Vec<String> = (0..=ENDPOINT_HEADERS_MAX)
            .map(|i| format!("X-{i}"))
            .collect();
        let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
        assert!(headers_error(many.into_iter()).unwrap().contains("at most"));
        let big = "v".repeat(VALUE_BYTES_MAX);
        let large: Vec<(&str, &str)> = names[..ENDPOINT_HEADERS_MAX]
            .iter()
            .map(|n| (n.as_str(), big.as_str()))
            .collect();
        assert!(headers_error(large.into_iter())
            .unwrap()
            .contains("bytes in all"));
    }

    #[test]
    fn stored_lines_are_read_back_and_bad_ones_left_out() {
        assert_eq!(parse_line(&line("X-A", "b: c")), Some(("X-A", "b: c")));
        assert_eq!(parse_line("X-A: "), Some(("X-A", "")));
        assert_eq!(parse_line("X-A:b"), None);
        assert_eq!(parse_line("Host: evil"), None);
        assert_eq!(parse_line("X-A: a\r\nb"), None);
    }
}
