//! Log output: one JSON object per line (default) or human-readable text, filtered by `--log`.
//! The JSON writer is the crate's own response writer, so logging pulls in no serializer.
//!
//! The server never waits for its log's reader. A line is written only when stdout can take it:
//! a reader that stops reading (journald hung, a container runtime's log pipe stalled, a terminal
//! paused) gets 20 ms to take the next line, and once one was dropped the next are
//! dropped at once until it reads again; they are counted (`triggers_log_lines_dropped_total`)
//! and a warning says how many once lines go through again. Before, the thread that logged
//! blocked in its write until the reader read: a few database blips with the reader stalled
//! stopped the group commit and the ingress cores, and every request, health checks too, went
//! unanswered (RELIABILITY.md).

use std::fmt;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;
use crate::ids::Micros;
use crate::json::Obj;

/// How long a line waits for stdout to take it while none is being dropped, in ms; once one was
/// dropped, the next are dropped at once until stdout takes a line again.
const STALL_WAIT_MS: i32 = 20;

/// The most written at once while stdout says it has room: a pipe that does takes `PIPE_BUF`
/// (4,096 bytes) without blocking; a longer line goes in pieces.
const PIECE: usize = 4096;

/// Lines dropped because stdout did not take them, and how many of them a warning has named.
static DROPPED: AtomicU64 = AtomicU64::new(0);
static REPORTED: AtomicU64 = AtomicU64::new(0);

/// The last piece written ended inside a line (the reader stalled before the rest): the next
/// write ends it first, so each line after starts whole.
static MID_LINE: AtomicBool = AtomicBool::new(false);

/// Install the global subscriber. `filter` is a level or `target=level,...`.
pub fn init(format: LogFormat, filter: &str) -> Result<(), String> {
    let targets: Targets = filter
        .parse()
        .map_err(|e| format!("--log {filter:?}: {e}"))?;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let result = match format {
        LogFormat::Json => tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(JsonLines)
                    .with_writer(|| Stdout(LogFormat::Json)),
            )
            .with(targets)
            .try_init(),
        LogFormat::Text => tracing_subscriber::registry()
            .with(tracing_subscriber::fmt::layer().with_writer(|| Stdout(LogFormat::Text)))
            .with(targets)
            .try_init(),
    };
    result.map_err(|e| e.to_string())
}

/// Log lines dropped so far because stdout did not take them.
pub fn lines_dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Whether stderr takes a message now or within 100 ms: the panic hook and a failed start-up
/// write there only then, so a stalled reader cannot keep the process from exiting (and its
/// supervisor from starting it again).
pub fn stderr_takes() -> bool {
    writable(2, 100)
}

/// `triggers: {message}` on stderr, if it takes it ([`stderr_takes`]): a failed start or run.
pub fn to_stderr(message: &dyn fmt::Display) {
    if stderr_takes() {
        let _ = writeln!(std::io::stderr(), "triggers: {message}");
    }
}

/// Whether file descriptor `fd` takes [`PIECE`] bytes now or within `wait_ms` (never when it is
/// closed).
fn writable(fd: i32, wait_ms: i32) -> bool {
    let mut fd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd, for the call's length.
        match unsafe { libc::poll(&mut fd, 1, wait_ms) } {
            1 => return fd.revents & libc::POLLOUT != 0,
            -1 if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return false,
        }
    }
}

/// What each event's formatted line is written to: stdout through [`write_lines`].
struct Stdout(LogFormat);

impl std::io::Write for Stdout {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        write_lines(line, self.0, STALL_WAIT_MS);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Write whole `lines` to stdout, each piece only when stdout takes it within `patience_ms` (see
/// the module's note; 0: only at once, for the ingress cores' access lines); what it does not
/// take is dropped and counted. `format` is the log's, for the warning of lines dropped before,
/// written ahead of them. The server's log and the access log both write here.
pub fn write_lines(lines: &[u8], format: LogFormat, patience_ms: i32) {
    // Stdout's lock orders the lines of every thread (a thread waits for it at most as long as
    // one piece waits for the reader); the bytes go straight to the descriptor, not through
    // stdout's line buffer, which would hold a cut line's end and write it with the next piece.
    let _lock = std::io::stdout().lock();
    // SAFETY: descriptor 1 stays open for the process's life (and is never closed here: the
    // `File` is not dropped); `writable` said it is open before each write.
    let mut out = std::mem::ManuallyDrop::new(unsafe {
        <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(1)
    });
    let (dropped, reported) = (lines_dropped(), REPORTED.load(Ordering::Relaxed));
    let (mut wait, mut notice) = if dropped > reported {
        (0, true)
    } else {
        (patience_ms, false)
    };
    let mut at = 0;
    while at < lines.len() {
        if !writable(1, wait) {
            // What is left: the line cut short (ended by the next write that goes through)
            // and those after it.
            MID_LINE.store(at > 0 && lines[at - 1] != b'\n', Ordering::Relaxed);
            return count_dropped(&lines[at..]);
        }
        wait = patience_ms;
        if MID_LINE.swap(false, Ordering::Relaxed) {
            let _ = out.write_all(b"\n");
            continue;
        }
        if notice {
            // A piece of its own: stdout said it takes one.
            write_dropped(&mut *out, format, dropped - reported);
            REPORTED.store(dropped, Ordering::Relaxed);
            notice = false;
            continue;
        }
        let end = lines.len().min(at + PIECE);
        if out.write_all(&lines[at..end]).is_err() {
            // A full disk under a file, a closed pipe: what is left is lost.
            return count_dropped(&lines[at..]);
        }
        at = end;
    }
}

/// Count the lines of `rest` as dropped (a line cut short counts as one).
fn count_dropped(rest: &[u8]) {
    let lost = rest.iter().filter(|&&b| b == b'\n').count();
    DROPPED.fetch_add(lost.max(1) as u64, Ordering::Relaxed);
}

/// Write the warning that `lines` were dropped, in the log's format, ahead of the first line
/// stdout takes again (in pieces: the JSON writer or `format!` cost the binary more here).
#[cold]
#[inline(never)]
fn write_dropped(out: &mut dyn std::io::Write, format: LogFormat, lines: u64) {
    const MESSAGE: &str =
        "log lines dropped: the log's reader did not keep up (triggers_log_lines_dropped_total)";
    let (ts, lines) = (Micros::now().rfc3339(), lines.to_string());
    let pieces: [&str; 7] = match format {
        LogFormat::Json => [
            "{\"ts\":\"",
            &ts,
            "\",\"level\":\"WARN\",\"target\":\"triggers::logging\",\"message\":\"",
            MESSAGE,
            "\",\"lines\":",
            &lines,
            "}\n",
        ],
        LogFormat::Text => [
            "",
            &ts,
            "  WARN triggers::logging: ",
            MESSAGE,
            " lines=",
            &lines,
            "\n",
        ],
    };
    let _ = out.write_all(pieces.concat().as_bytes());
}

/// `{"ts":"…","level":"INFO","target":"…","message":"…",<fields>}`.
pub struct JsonLines;

struct Fields<'a, 'b>(&'a mut Obj<'b>);

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.str(field.name(), value);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.int(field.name(), value);
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        match i64::try_from(value) {
            Ok(v) => self.0.int(field.name(), v),
            Err(_) => self.0.str(field.name(), &value.to_string()),
        };
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.bool(field.name(), value);
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.str(field.name(), &format!("{value:?}"));
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut out = Vec::with_capacity(256);
        let mut o = Obj::new(&mut out);
        o.time("ts", Micros::now())
            .str("level", meta.level().as_str())
            .str("target", meta.target());
        event.record(&mut Fields(&mut o));
        o.finish();
        writeln!(writer, "{}", String::from_utf8_lossy(&out))
    }
}

thread_local! {
    /// The route of the request this thread is working on, for the panic log.
    static ROUTE: std::cell::Cell<&'static str> = const { std::cell::Cell::new("") };
}

/// A future that marks its thread as working on `route` whenever it runs, so a panic inside it
/// is logged with the route (on an ingress core many requests interleave: the mark is set on every
/// poll and taken off after it).
pub struct InRoute<F> {
    route: &'static str,
    inner: std::pin::Pin<Box<F>>,
}

/// Run `fut` marked with `route` (see [`InRoute`]).
pub fn in_route<F: std::future::Future>(route: &'static str, fut: F) -> InRoute<F> {
    InRoute {
        route,
        inner: Box::pin(fut),
    }
}

impl<F: std::future::Future> std::future::Future for InRoute<F> {
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let before = ROUTE.with(|r| r.replace(self.route));
        let polled = self.inner.as_mut().poll(cx);
        ROUTE.with(|r| r.set(before));
        polled
    }
}

/// Log every panic through `tracing` (thread, ingress core, route, message, location) before the
/// default hook runs. Release builds abort on panic (`panic = "abort"`): the process exits and its
/// supervisor (systemd, Docker, Fly) starts it again, so no half-alive server keeps running.
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let core = name
            .strip_prefix("ingress-")
            .and_then(|n| n.parse::<i64>().ok())
            .unwrap_or(-1);
        let route = ROUTE.with(|r| r.get());
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(
            thread = name,
            core,
            route,
            location,
            message,
            "panic: the process stops; its supervisor restarts it"
        );
        if stderr_takes() {
            default(info);
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_pipe_is_not_writable_until_its_reader_reads() {
        let mut fds = [0; 2];
        // SAFETY: a two-element array for pipe(2); both ends closed below.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let [read, write] = fds;
        assert!(writable(write, 0));
        // SAFETY: the pipe's write end; O_NONBLOCK so that filling it ends.
        unsafe { libc::fcntl(write, libc::F_SETFL, libc::O_NONBLOCK) };
        let page = [b'x'; PIECE];
        // SAFETY: writes from and reads into a buffer of the length given.
        while unsafe { libc::write(write, page.as_ptr().cast(), PIECE) } > 0 {}
        assert!(!writable(write, 0));
        assert!(!writable(write, 20));
        let mut sink = [0u8; PIECE];
        while unsafe { libc::read(read, sink.as_mut_ptr().cast(), PIECE) } == PIECE as isize {
            if writable(write, 0) {
                break;
            }
        }
        assert!(writable(write, 0));
        // SAFETY: both ends, once.
        unsafe {
            libc::close(read);
            libc::close(write);
        }
    }

    #[test]
    fn the_warning_of_dropped_lines_is_one_line_in_the_logs_format() {
        let mut json = Vec::new();
        write_dropped(&mut json, LogFormat::Json, 7);
        let line = String::from_utf8(json).unwrap();
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            (v["level"].as_str(), v["lines"].as_i64()),
            (Some("WARN"), Some(7))
        );
        assert_eq!(v["target"], "triggers::logging");
        assert!(v["ts"].as_str().unwrap().ends_with('Z'), "{line}");
        let mut text = Vec::new();
        write_dropped(&mut text, LogFormat::Text, 7);
        let line = String::from_utf8(text).unwrap();
        assert!(
            line.contains("Z  WARN triggers::logging: log lines dropped"),
            "{line}"
        );
        assert!(line.ends_with(" lines=7\n"), "{line}");
    }
}
