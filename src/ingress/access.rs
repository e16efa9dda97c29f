//! The access log (`--access-log`): one JSON line per answered request on stdout, beside the
//! server's own log lines: `{"ts","type":"access","method","route","status","duration_us",
//! "org_id","request_id","client"}`. The route is the template (`/api/events/{id}`), never the
//! path sent; the request id is the client's `X-Request-Id` when it is a plain token of at most 64
//! characters, else one made here. Each core buffers its lines and writes them in one call when
//! 32 KiB have gathered or a second has passed, so the log costs no system call per request.

use std::cell::{Cell, RefCell};
use std::io::Write as _;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::config::LogFormat;
use crate::ids::{fast_random, Micros, OrgId};

/// Bytes a core gathers before it writes them.
const FLUSH_BYTES: usize = 32 * 1024;
/// Longest a line waits in a core's buffer.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// One core's buffer of access lines.
pub struct AccessLog {
    buf: RefCell<Vec<u8>>,
    flushed: Cell<Instant>,
    /// The server's log format (for the warning of lines dropped).
    format: LogFormat,
}

/// What one line says about its request.
pub struct Entry<'a> {
    /// The method and the route template.
    pub route: (&'static str, &'static str),
    /// The status answered.
    pub status: u16,
    /// From the complete head to the answer written, in µs.
    pub duration_us: u64,
    /// The organization, when the request was authenticated.
    pub org: Option<OrgId>,
    /// The client's `X-Request-Id`, as sent.
    pub request_id: Option<&'a [u8]>,
    /// The client's address.
    pub client: Option<IpAddr>,
}

impl AccessLog {
    /// A core's access log, beside a server log in `format`.
    pub fn new(format: LogFormat) -> Self {
        AccessLog {
            buf: RefCell::new(Vec::with_capacity(FLUSH_BYTES + 1024)),
            flushed: Cell::new(Instant::now()),
            format,
        }
    }
}

/// The client's request id if it is a plain token (letters, digits, `-`, `_`, `.`, `:`, 1..64
/// characters: nothing that needs escaping), else a new 16-hex-digit one.
fn request_id(sent: Option<&[u8]>, out: &mut Vec<u8>) {
    match sent.map(<[u8]>::trim_ascii) {
        Some(id)
            if (1..=64).contains(&id.len())
                && id
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b)) =>
        {
            out.extend_from_slice(id)
        }
        _ => {
            let _ = write!(out, "{:016x}", fast_random());
        }
    }
}

impl AccessLog {
    /// Add a line; write the buffer out when it is full or a second old.
    pub fn line(&self, e: Entry<'_>) {
        {
            let mut out = self.buf.borrow_mut();
            out.extend_from_slice(b"{\"ts\":\"");
            Micros::now().write_rfc3339(&mut out);
            let _ = write!(
                out,
                "\",\"type\":\"access\",\"method\":\"{}\",\"route\":\"{}\",\"status\":{},\"duration_us\":{},\"org_id\":",
                e.route.0, e.route.1, e.status, e.duration_us
            );
            match e.org {
                Some(org) => {
                    let _ = write!(out, "\"{}\"", org.0);
                }
                None => out.extend_from_slice(b"null"),
            }
            out.extend_from_slice(b",\"request_id\":\"");
            request_id(e.request_id, &mut out);
            out.extend_from_slice(b"\",\"client\":");
            match e.client {
                Some(ip) => {
                    let _ = write!(out, "\"{ip}\"");
                }
                None => out.extend_from_slice(b"null"),
            }
            out.extend_from_slice(b"}\n");
        }
        if self.buf.borrow().len() >= FLUSH_BYTES || self.flushed.get().elapsed() >= FLUSH_EVERY {
            self.flush();
        }
    }

    /// Write out what is buffered when its oldest line has waited `FLUSH_EVERY` (a quiet core).
    pub fn flush_stale(&self) {
        if self.flushed.get().elapsed() >= FLUSH_EVERY {
            self.flush();
        }
    }

    /// Write out what is buffered.
    pub fn flush(&self) {
        self.flushed.set(Instant::now());
        let mut buf = self.buf.borrow_mut();
        if buf.is_empty() {
            return;
        }
        // A stalled or slow reader, a full or closed stdout loses access lines (counted), never
        // a request: the core does not wait for the log's reader at all.
        crate::logging::write_lines(&buf, self.format, 0);
        buf.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_the_clients_plain_tokens_or_new_ones() {
        let mut out = Vec::new();
        request_id(Some(b" req-42.a:b_c "), &mut out);
        assert_eq!(out, b"req-42.a:b_c");
        for bad in [&b""[..], b"a\"b", b"a b", &[b'x'; 65], &[0xff, 0xfe]] {
            let mut out = Vec::new();
            request_id(Some(bad), &mut out);
            assert_eq!(out.len(), 16, "{bad:?}");
            assert!(out.iter().all(u8::is_ascii_hexdigit));
        }
    }

    #[test]
    fn a_line_is_one_json_object() {
        let log = AccessLog::new(LogFormat::Json);
        log.line(Entry {
            route: ("POST", "/api/events"),
            status: 201,
            duration_us: 812,
            org: Some(OrgId(uuid::Uuid::nil())),
            request_id: Some(b"abc"),
            client: Some("127.0.0.1".parse().unwrap()),
        });
        let text = String::from_utf8(log.buf.borrow().clone()).unwrap();
        assert!(text.ends_with("}\n"));
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["route"], "/api/events");
        assert_eq!(v["status"], 201);
        assert_eq!(v["duration_us"], 812);
        assert_eq!(v["org_id"], "00000000-0000-0000-0000-000000000000");
        assert_eq!(v["request_id"], "abc");
        assert_eq!(v["client"], "127.0.0.1");
        assert!(v["ts"].as_str().unwrap().ends_with('Z'));
    }
}
