//! A complete request, and the checks every handler shares: JSON content type, a JSON object
//! body, text fields, path ids.

use std::cell::RefCell;
use std::net::IpAddr;

use bytes::Bytes;

use super::parse::Head;
use crate::config::{IDEMPOTENCY_KEY_BYTES_MAX, INBOX_PAGE_MAX, TEXT_FIELD_CHARS_MAX};
use crate::error::ApiError;
use crate::json;

/// One request, head and body complete.
pub struct Request {
    /// The head.
    pub head: Head,
    /// The body (empty when there is none).
    pub body: Bytes,
    /// The client's address.
    pub peer: IpAddr,
}

/// The client's address: the TCP peer, or with `trust` (`--trust-forwarded-for`, for a server
/// behind a proxy you run) the last `X-Forwarded-For` entry, which that proxy appended. An entry
/// that is not an address leaves the peer.
pub fn client_addr(peer: IpAddr, head: &Head, trust: bool) -> IpAddr {
    if !trust {
        return peer;
    }
    head.forwarded_for
        .as_deref()
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|last| last.trim().parse().ok())
        .unwrap_or(peer)
}

/// 415 unless the request says its body is JSON (`application/json` or `application/*+json`,
/// parameters such as `charset` allowed), and as it is: a `Content-Encoding` other than
/// `identity` (a client library that gzips its bodies) is a 415 too, not the JSON error its bytes
/// would get (and a body labelled gzip that is plain JSON is not stored as one thing and read by a
/// gateway in front as another).
pub fn require_json(req: &Request) -> Result<(), ApiError> {
    if req.head.encoded {
        return Err(ApiError::UnsupportedEncoding);
    }
    let ok = req.head.content_type.as_deref().is_some_and(|ct| {
        let media = ct.split(|&b| b == b';').next().unwrap_or(b"");
        let media = std::str::from_utf8(media)
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        media == "application/json"
            || (media.starts_with("application/") && media.ends_with("+json"))
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

/// The `Idempotency-Key` header: 1 to [`IDEMPOTENCY_KEY_BYTES_MAX`] visible ASCII characters
/// (no `"` or `\\` inside), bare or as a quoted string (the form of the IETF draft; the quotes
/// are not part of the key). Absent: `None`; malformed: 422 naming the header.
pub fn idempotency_key(value: Option<&[u8]>) -> Result<Option<String>, ApiError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let value = value.trim_ascii();
    let key = match value {
        [b'"', inner @ .., b'"'] => inner,
        _ => value,
    };
    let visible = |b: &u8| (0x21..=0x7e).contains(b) && *b != b'"' && *b != b'\\';
    if key.is_empty() || key.len() > IDEMPOTENCY_KEY_BYTES_MAX || !key.iter().all(visible) {
        return Err(ApiError::validation(
            "Idempotency-Key",
            format!(
                "Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_BYTES_MAX} visible ASCII \
                 characters (a UUID, say), bare or in double quotes"
            ),
        ));
    }
    Ok(Some(String::from_utf8_lossy(key).into_owned()))
}

/// A path id: any UUID, else 422 naming `field`.
pub fn path_uuid(param: Option<&str>, field: &'static str) -> Result<uuid::Uuid, ApiError> {
    param
        .and_then(crate::ids::parse_uuid)
        .ok_or_else(|| ApiError::validation(field, format!("{field} must be a UUID")))
}

/// Validate a JSON body as an object and hand it to `f`; 400 for anything that is not.
pub fn with_body<R>(
    parser: &RefCell<json::Parser>,
    body: &[u8],
    f: impl FnOnce(&json::Body<'_>) -> Result<R, ApiError>,
) -> Result<R, ApiError> {
    match parser.borrow_mut().with_object(body, f) {
        Ok(r) => r,
        Err(json::JsonError::Invalid(msg)) => Err(ApiError::InvalidJson(msg)),
        // Valid JSON of the wrong shape is a validation error, not a syntax error.
        Err(json::JsonError::NotAnObject) => Err(ApiError::validation(
            "body",
            "request body must be a JSON object",
        )),
    }
}

/// A required-or-optional string field of 1..=`TEXT_FIELD_CHARS_MAX` characters without NUL.
pub fn text_field<'a>(
    body: &json::Body<'a>,
    names: &[&str],
    field: &'static str,
    required: bool,
) -> Result<Option<&'a str>, ApiError> {
    let value = names.iter().find_map(|n| body.get(n));
    match value {
        None | Some(json::Field::Null) if !required => Ok(None),
        None | Some(json::Field::Null) => {
            Err(ApiError::validation(field, format!("{field} is required")))
        }
        Some(json::Field::Str(s)) => {
            let chars = s.chars().count();
            if chars == 0 || chars > TEXT_FIELD_CHARS_MAX {
                Err(ApiError::validation(
                    field,
                    format!("{field} must be 1 to {TEXT_FIELD_CHARS_MAX} characters, got {chars}"),
                ))
            } else if s.contains('\0') {
                Err(ApiError::validation(
                    field,
                    format!("{field} must not contain NUL characters"),
                ))
            } else {
                Ok(Some(s))
            }
        }
        Some(other) => Err(ApiError::validation(
            field,
            format!("{field} must be a string, not {}", other.type_name()),
        )),
    }
}

/// A page's `limit` parameter: an integer from 1 to `INBOX_PAGE_MAX` (422 naming `limit`).
pub fn page_limit(value: &str) -> Result<u32, ApiError> {
    value
        .parse::<u32>()
        .ok()
        .filter(|n| (1..=INBOX_PAGE_MAX).contains(n))
        .ok_or_else(|| {
            ApiError::validation(
                "limit",
                format!("limit must be an integer from 1 to {INBOX_PAGE_MAX}"),
            )
        })
}

/// A page's `cursor` parameter: empty means the first page; otherwise what `decode` reads from
/// it (422 naming `cursor` when it reads nothing).
pub fn page_cursor<T>(
    value: &str,
    decode: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>, ApiError> {
    if value.is_empty() {
        return Ok(None);
    }
    decode(value)
        .map(Some)
        .ok_or_else(|| ApiError::validation("cursor", "cursor is not one this server returned"))
}

/// The `key=value` pairs of a query string in order, each value percent-decoded (`+` is a space);
/// empty pairs are skipped, a pair without `=` has an empty value.
pub fn query_pairs(query: &[u8]) -> impl Iterator<Item = (&[u8], String)> {
    query
        .split(|&b| b == b'&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], percent_decode(&pair[i + 1..])),
            None => (pair, String::new()),
        })
}

/// Decode `%XX` escapes and `+`; invalid escapes are kept as they are.
fn percent_decode(v: &[u8]) -> String {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        match v[i] {
            b'%' if i + 2 < v.len() => {
                let hex = std::str::from_utf8(&v[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idempotency_key_is_visible_ascii_bare_or_quoted() {
        assert_eq!(idempotency_key(None).unwrap(), None);
        let bare = idempotency_key(Some(b" 7c9e-ab_1 ")).unwrap();
        assert_eq!(bare.as_deref(), Some("7c9e-ab_1"));
        let quoted = idempotency_key(Some(b"\"7c9e-ab_1\"")).unwrap();
        assert_eq!(quoted, bare, "the quotes are not part of the key");
        let longest = vec![b'k'; IDEMPOTENCY_KEY_BYTES_MAX];
        assert!(idempotency_key(Some(&longest)).is_ok());
        let too_long = vec![b'k'; IDEMPOTENCY_KEY_BYTES_MAX + 1];
        for bad in [
            &b""[..],
            b"\"\"",
            b"a b",
            b"a\tb",
            b"caf\xc3\xa9",
            b"\"a\"b\"",
            b"a\\b",
            b"\"a",
            &too_long,
        ] {
            let e = idempotency_key(Some(bad)).unwrap_err();
            assert!(
                matches!(&e, ApiError::Validation { field, .. } if *field == "Idempotency-Key"),
                "{bad:?}: {e:?}"
            );
        }
    }

    #[test]
    fn query_pairs_are_split_and_decoded() {
        assert_eq!(percent_decode(b"a%20b+c"), "a b c");
        assert_eq!(percent_decode(b"100%"), "100%");
        assert_eq!(percent_decode(b"%zz"), "%zz");
        let pairs: Vec<(&[u8], String)> = query_pairs(b"a=1&&b&c=x%2By+z&a=2").collect();
        assert_eq!(
            pairs,
            [
                (&b"a"[..], "1".to_string()),
                (&b"b"[..], String::new()),
                (&b"c"[..], "x+y z".to_string()),
                (&b"a"[..], "2".to_string()),
            ]
        );
    }
}
