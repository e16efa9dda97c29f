//! The delivery client: HTTP/1.1 connections kept per origin (scheme, host and port), each one
//! used by one delivery at a time, which writes its request and reads the answer itself.
//!
//! A webhook exchange is the simplest HTTP/1.1 there is: one `POST` with a `Content-Length` body
//! written whole, one answer read. So the client is small and ours: the request is made as
//! bytes by the attempt (`worker`), written in one write, and the answer is read by
//! [`AnswerReader`], a state machine over the bytes as they come (status line and headers by
//! httparse; a body by its `Content-Length`, by chunks with [`crate::chunked`], or to the close),
//! which `fuzz/fuzz_targets/answer.rs` fuzzes. No task per connection and no hand-off: the task
//! of the attempt does the I/O.
//!
//! A connection is put back for the next request only when its answer was read whole, within
//! the limit, with nothing after it, and neither side asked to close it. An idle connection is
//! polled by nobody; it is looked at when it is taken again, and one the receiver closed (or that
//! has bytes nobody asked for) is dropped, not used. A request that a kept connection could not
//! take (its write failed: the receiver cannot have had all of it) goes again on another
//! connection; one that was written is never sent twice by the client.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::Uri;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::connector::{ConnectError, SafeConnector};
use crate::chunked::ChunkedDecoder;
use crate::endpoint_headers;
use crate::metrics::Metrics;

/// The longest answer head read (status line and headers).
pub const ANSWER_HEAD_MAX: usize = 64 * 1024;
/// The most header fields an answer may have.
const ANSWER_HEADERS_MAX: usize = 100;
/// The most interim answers (`100 Continue`, `103 Early Hints`) before the real one: a receiver
/// that sends them without end fails the attempt at once, not at its timeout.
const ANSWER_INTERIM_MAX: u8 = 8;
/// What a connection's read buffer grows by.
const READ_CHUNK: usize = 4096;
/// The most read buffer an idle connection keeps.
const READ_BUFFER_KEPT_MAX: usize = 4 * READ_CHUNK;

/// Where an endpoint's requests go, worked out once per endpoint: the origin its connections
/// are kept for, the name TLS checks, and the request's first lines.
#[derive(Debug)]
pub struct Target {
    /// The URL (what the connector resolves).
    uri: Uri,
    /// `scheme://host:port`: requests to one origin share connections.
    origin: Arc<str>,
    /// The server name TLS checks the certificate against (`None`: plain HTTP).
    tls_name: Option<ServerName<'static>>,
    /// `POST <path and query> HTTP/1.1\r\nhost: <host[:port]>\r\n`.
    head: Box<[u8]>,
}

impl Target {
    /// The target of `uri` (`None`: it has no http or https scheme, or no host).
    pub fn new(uri: &Uri) -> Option<Target> {
        let host = uri.host()?;
        let (https, default) = match uri.scheme_str()? {
            s if s.eq_ignore_ascii_case("https") => (true, 443),
            s if s.eq_ignore_ascii_case("http") => (false, 80),
            _ => return None,
        };
        let port = uri.port_u16().unwrap_or(default);
        let origin = format!("{}://{host}:{port}", if https { "https" } else { "http" });
        let tls_name = if https {
            // An IPv6 literal is named without its brackets.
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            Some(ServerName::try_from(bare.to_string()).ok()?)
        } else {
            None
        };
        // The origin form: the path (`/` when there is none) and the query.
        let target = match uri.query() {
            Some(query) => format!("{}?{query}", uri.path()),
            None => uri.path().to_string(),
        };
        let target = if target.starts_with('/') {
            target
        } else {
            format!("/{target}")
        };
        let host_header = match uri.port_u16() {
            Some(port) if port != default => format!("{host}:{port}"),
            _ => host.to_string(),
        };
        let head = format!("POST {target} HTTP/1.1\r\nhost: {host_header}\r\n");
        Some(Target {
            uri: uri.clone(),
            origin: origin.into(),
            tls_name,
            head: head.into_bytes().into_boxed_slice(),
        })
    }

    /// The endpoint's own headers (stored lines, `name: value`) sent after `Host`; a line that is
    /// not one an endpoint may send ([`endpoint_headers::parse_line`]) is left out.
    pub fn with_headers(mut self, lines: &[String]) -> Target {
        if lines.is_empty() {
            return self;
        }
        let mut head = self.head.into_vec();
        for (name, value) in lines.iter().filter_map(|l| endpoint_headers::parse_line(l)) {
            head.extend_from_slice(name.as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        self.head = head.into_boxed_slice();
        self
    }

    /// The request line, the `Host` header and the endpoint's own headers, which every request
    /// to it starts with.
    pub fn head(&self) -> &[u8] {
        &self.head
    }
}

/// What came back from the receiver.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    /// The status code (never 1xx: interim answers are skipped).
    pub status: u16,
    /// Its `Retry-After`, when it sent one as text.
    pub retry_after: Option<String>,
    /// What it sent, when that was read whole within the limit (`None`: more than the limit,
    /// or the body was cut short or malformed).
    pub body: Option<Bytes>,
}

/// How an answer's body is framed.
#[derive(Debug)]
enum Body {
    /// `Content-Length` bytes.
    Length(usize),
    /// Chunked.
    Chunked(ChunkedDecoder),
    /// Until the receiver closes the connection.
    ToClose,
}

/// Where an [`AnswerReader`] is.
#[derive(Debug)]
enum Stage {
    Head,
    Body(Body),
}

/// Reads one answer from the bytes of a connection as they come.
#[derive(Debug)]
pub struct AnswerReader {
    stage: Stage,
    limit: usize,
    status: u16,
    retry_after: Option<String>,
    /// Whether the connection may carry another request once this answer is read.
    keep: bool,
    /// Interim answers read so far.
    interim: u8,
}

/// What [`AnswerReader::feed`] made of the bytes so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// The answer is not whole yet: read more.
    More,
    /// The answer, and whether its connection may be used again.
    Done(Answer, bool),
}

/// The fields of a head the client acts on.
#[derive(Default)]
struct Fields {
    length: Option<u64>,
    bad_length: bool,
    transfer_encoding: bool,
    chunked: bool,
    close: bool,
    keep_alive: bool,
    retry_after: Option<String>,
}

impl Fields {
    fn of(headers: &[httparse::Header<'_>]) -> Fields {
        let mut f = Fields::default();
        for h in headers {
            let name = h.name;
            if name.eq_ignore_ascii_case("content-length") {
                // One value, or a list of the same value; anything else is refused.
                for part in h.value.split(|&b| b == b',') {
                    let part = part.trim_ascii();
                    let n = (!part.is_empty() && part.iter().all(u8::is_ascii_digit))
                        .then(|| std::str::from_utf8(part).ok()?.parse::<u64>().ok())
                        .flatten();
                    match (n, f.length) {
                        (Some(n), None) => f.length = Some(n),
                        (Some(n), Some(m)) if n == m => {}
                        _ => f.bad_length = true,
                    }
                }
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                // The last coding of the last field decides: chunked, or read to the close.
                f.transfer_encoding = true;
                f.chunked = h
                    .value
                    .split(|&b| b == b',')
                    .map(<[u8]>::trim_ascii)
                    .rfind(|c| !c.is_empty())
                    .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"));
            } else if name.eq_ignore_ascii_case("connection") {
                for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    f.close |= token.eq_ignore_ascii_case(b"close");
                    f.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                }
            } else if name.eq_ignore_ascii_case("retry-after") {
                f.retry_after = std::str::from_utf8(h.value).ok().map(str::to_string);
            }
        }
        f
    }
}

impl AnswerReader {
    /// A reader keeping bodies of at most `limit` bytes.
    pub fn new(limit: usize) -> AnswerReader {
        AnswerReader {
            stage: Stage::Head,
            limit,
            status: 0,
            retry_after: None,
            keep: false,
            interim: 0,
        }
    }

    /// Take what `buf` holds of the answer (what is used is removed from it); `eof`: the
    /// connection has ended after these bytes. Never [`Read::More`] when `eof`. An `Err` says
    /// why no answer could be read (nothing usable came: no status).
    pub fn feed(&mut self, buf: &mut BytesMut, eof: bool) -> Result<Read, String> {
        loop {
            let body = match &mut self.stage {
                Stage::Head => match self.head(buf, eof)? {
                    Head::More => return Ok(Read::More),
                    Head::Interim | Head::Body => continue,
                    Head::Done(done) => return Ok(done),
                },
                Stage::Body(body) => body,
            };
            let limit = self.limit;
            let got = match body {
                Body::Length(n) if buf.len() >= *n => Some(Some(buf.split_to(*n).freeze())),
                Body::Length(_) => None,
                Body::Chunked(decoder) => match decoder.decode(buf) {
                    Ok(Some(b)) => Some(Some(b)),
                    Ok(None) => None,
                    Err(_) => Some(None),
                },
                Body::ToClose if buf.len() > limit => Some(None),
                Body::ToClose if eof => {
                    self.keep = false;
                    Some(Some(buf.split().freeze()))
                }
                Body::ToClose => None,
            };
            return Ok(match (got, eof) {
                (Some(body), _) => {
                    // Anything after the answer was not asked for: the connection is not used
                    // again.
                    let keep = self.keep && body.is_some() && buf.is_empty();
                    Read::Done(self.answer(body), keep)
                }
                // Cut short: the status stands, the body is not kept.
                (None, true) => Read::Done(self.answer(None), false),
                (None, false) => Read::More,
            });
        }
    }

    fn answer(&mut self, body: Option<Bytes>) -> Answer {
        Answer {
            status: self.status,
            retry_after: self.retry_after.take(),
            body,
        }
    }

    /// Parse a head from `buf`.
    fn head(&mut self, buf: &mut BytesMut, eof: bool) -> Result<Head, String> {
        let mut headers = [httparse::EMPTY_HEADER; ANSWER_HEADERS_MAX];
        let mut r = httparse::Response::new(&mut headers);
        let len = match r.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > ANSWER_HEAD_MAX => {
                return Err(format!(
                    "the receiver's answer head is over {} KiB",
                    ANSWER_HEAD_MAX / 1024
                ))
            }
            Ok(httparse::Status::Partial) if eof => {
                return Err(if buf.is_empty() {
                    "the connection closed before an answer came".into()
                } else {
                    "the connection closed in the middle of the answer's head".into()
                })
            }
            Ok(httparse::Status::Partial) => return Ok(Head::More),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(format!(
                    "the receiver's answer has more than {ANSWER_HEADERS_MAX} header fields"
                ))
            }
            Err(e) => return Err(format!("the receiver's answer is not HTTP/1.1: {e}")),
        };
        let (Some(code), Some(version)) = (r.code, r.version) else {
            return Err("the receiver's answer is not HTTP/1.1".into());
        };
        let f = Fields::of(r.headers);
        buf.advance(len);
        match code {
            101 => return Err("the receiver switched protocols".into()),
            // An interim answer (100 Continue, 103 Early Hints): the real one follows.
            100..=199 if self.interim < ANSWER_INTERIM_MAX => {
                self.interim += 1;
                return Ok(Head::Interim);
            }
            100..=199 => {
                return Err(format!(
                    "the receiver sent more than {ANSWER_INTERIM_MAX} interim answers"
                ))
            }
            _ => {}
        }
        self.status = code;
        self.retry_after = f.retry_after;
        self.keep = match version {
            1 => !f.close,
            _ => f.keep_alive && !f.close,
        };
        let body = if code == 204 || code == 304 {
            return Ok(Head::Done(Read::Done(
                self.answer(Some(Bytes::new())),
                self.keep && buf.is_empty(),
            )));
        } else if f.transfer_encoding {
            // With a Content-Length as well, the chunks decide and the connection ends after.
            if f.length.is_some() || f.bad_length {
                self.keep = false;
            }
            if f.chunked {
                Body::Chunked(ChunkedDecoder::new(self.limit))
            } else {
                self.keep = false;
                Body::ToClose
            }
        } else if f.bad_length {
            return Err("the receiver's answer has an invalid Content-Length".into());
        } else if let Some(n) = f.length {
            if n > self.limit as u64 {
                // Not read: over the limit, and the connection is not used again.
                return Ok(Head::Done(Read::Done(self.answer(None), false)));
            }
            buf.reserve(n as usize);
            Body::Length(n as usize)
        } else {
            self.keep = false;
            Body::ToClose
        };
        self.stage = Stage::Body(body);
        Ok(Head::Body)
    }
}

/// What [`AnswerReader::head`] found.
enum Head {
    /// Not a whole head yet.
    More,
    /// An interim answer, skipped: the real one follows.
    Interim,
    /// The head of the answer; its body follows.
    Body,
    /// The answer, which has no body to read.
    Done(Read),
}

/// A connection's byte stream: plain TCP or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// One connection and what was read from it.
struct Conn {
    io: Stream,
    buf: BytesMut,
    /// When it was put back (idle connections older than the idle timeout are closed).
    idle_since: Instant,
}

impl Conn {
    /// Whether an idle connection can take a request: nothing came on it since its last
    /// answer, not even its end. Polled once without waiting (a readiness check: no system call
    /// unless the socket has something).
    fn still_open(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut byte = [0u8; 1];
        let mut probe = ReadBuf::new(&mut byte);
        matches!(
            Pin::new(&mut self.io).poll_read(&mut cx, &mut probe),
            Poll::Pending
        )
    }

    /// Write the whole request.
    async fn send(&mut self, request: &[u8]) -> io::Result<()> {
        self.io.write_all(request).await?;
        self.io.flush().await
    }

    /// Read the answer; the `bool`: whether the connection may be used again.
    async fn answer(&mut self, limit: usize) -> Result<(Answer, bool), String> {
        let mut reader = AnswerReader::new(limit);
        let mut eof = false;
        loop {
            if let Read::Done(answer, keep) = reader.feed(&mut self.buf, eof)? {
                // A kept connection does not keep what a large answer grew its buffer to.
                if keep && self.buf.capacity() > READ_BUFFER_KEPT_MAX {
                    self.buf = BytesMut::with_capacity(READ_CHUNK);
                }
                return Ok((answer, keep));
            }
            if eof {
                return Err("the connection closed before the answer was whole".into());
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) => eof = true,
                Ok(_) => {}
                // A reset after the head still leaves the status standing.
                Err(e) => {
                    return match reader.feed(&mut self.buf, true) {
                        Ok(Read::Done(answer, _)) => Ok((answer, false)),
                        _ => Err(describe(&e)),
                    }
                }
            }
        }
    }
}

/// The delivery client.
pub struct Client {
    connector: SafeConnector,
    tls: TlsConnector,
    idle: Mutex<Idle>,
    /// Idle connections kept at most, all origins together (each is a file descriptor; a node
    /// delivering to many hosts would otherwise keep one to each for the idle timeout).
    max_idle: usize,
    /// How long an idle connection is kept.
    idle_timeout: Duration,
    /// Where the connections it opens are counted.
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Idle {
    // Boxed on purpose: a connection is a few hundred bytes (more with TLS) and moves between
    // the list and the attempts that use it; a box moves as a pointer.
    #[allow(clippy::vec_box)]
    by_origin: HashMap<Arc<str>, Vec<Box<Conn>>, ahash::RandomState>,
    /// Connections in `by_origin`, all together.
    kept: usize,
    /// When idle connections past their time were last closed, for every origin.
    swept: Option<Instant>,
}

impl Idle {
    /// Take out the connection idle longest, of any origin (each origin's oldest is its first).
    /// It looks at every origin with a list, those used since the last sweep (a quarter of the
    /// idle timeout ago; the sweep drops empty lists), and only once `max_idle` are kept.
    #[cold]
    fn oldest(&mut self) -> Option<Box<Conn>> {
        let conns = self
            .by_origin
            .values_mut()
            .filter(|conns| !conns.is_empty())
            .min_by_key(|conns| conns[0].idle_since)?;
        self.kept -= 1;
        Some(conns.remove(0))
    }
}

impl Client {
    /// A client over `connector` (TLS by rustls with the webpki roots for https) keeping at
    /// most `max_idle` idle connections in all, each for at most `idle_timeout`.
    pub fn new(
        connector: SafeConnector,
        max_idle: usize,
        idle_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Client {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        Client::with_tls(
            connector,
            crate::tls::client(roots),
            max_idle,
            idle_timeout,
            metrics,
        )
    }

    /// The same with TLS as `tls` says (its roots: the tests' own authority).
    fn with_tls(
        connector: SafeConnector,
        mut tls: rustls::ClientConfig,
        max_idle: usize,
        idle_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Client {
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Client {
            connector,
            tls: TlsConnector::from(Arc::new(tls)),
            idle: Mutex::new(Idle::default()),
            max_idle,
            idle_timeout,
            metrics,
        }
    }

    /// How many idle connections it keeps, in all.
    #[cfg(test)]
    fn idle(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let kept = idle.by_origin.values().map(Vec::len).sum();
        assert_eq!(idle.kept, kept, "the count of kept connections is right");
        kept
    }

    /// Send `request` (the whole of it, starting with [`Target::head`]) to `target` and read the
    /// answer, its body up to `body_limit` bytes. An `Err` says why no answer came back.
    pub async fn exchange(
        &self,
        target: &Target,
        request: &[u8],
        body_limit: usize,
    ) -> Result<Answer, NoAnswer> {
        loop {
            let (mut conn, reused) = match self.take(&target.origin) {
                Some(conn) => (conn, true),
                // Boxed: a connect's state is large and rare; the exchange's stays small.
                None => (Box::pin(self.connect(target)).await?, false),
            };
            if reused && !conn.still_open() {
                continue;
            }
            if let Err(e) = conn.send(request).await {
                // Not all of it was taken: a kept connection that had closed. Send it on another.
                if reused {
                    continue;
                }
                return Err(NoAnswer::Failed(describe(&e)));
            }
            let (answer, keep) = conn.answer(body_limit).await.map_err(NoAnswer::Failed)?;
            if keep {
                conn.idle_since = Instant::now();
                self.put_back(&target.origin, conn);
            }
            return Ok(answer);
        }
    }

    /// The most recently used idle connection to `origin` that is not past its time.
    fn take(&self, origin: &Arc<str>) -> Option<Box<Conn>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let conns = idle.by_origin.get_mut(origin)?;
        let mut taken = 0;
        let mut found = None;
        while let Some(conn) = conns.pop() {
            taken += 1;
            if conn.idle_since.elapsed() < self.idle_timeout {
                found = Some(conn);
                break;
            }
        }
        idle.kept -= taken;
        found
    }

    /// Keep a connection for the next request to `origin`; when `max_idle` are kept, the one
    /// idle longest (of any origin) is closed for it.
    fn put_back(&self, origin: &Arc<str>, conn: Box<Conn>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let oldest = if idle.kept >= self.max_idle {
            idle.oldest()
        } else {
            None
        };
        idle.kept += 1;
        match idle.by_origin.get_mut(origin) {
            Some(conns) => conns.push(conn),
            None => idle
                .by_origin
                .entry(Arc::clone(origin))
                .or_default()
                .push(conn),
        }
        drop(idle);
        // Closed outside the lock.
        drop(oldest);
    }

    /// Close idle connections past their time, for every origin, at most once every quarter of
    /// the idle timeout (the claimer calls this on each round; `take` skips any it has not yet
    /// closed).
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle
            .swept
            .is_some_and(|t| now.saturating_duration_since(t) < self.idle_timeout / 4)
        {
            return;
        }
        idle.swept = Some(now);
        let timeout = self.idle_timeout;
        idle.by_origin.retain(|_, conns| {
            // Oldest first: the ones past their time are at the front.
            let old = conns
                .iter()
                .take_while(|c| now.saturating_duration_since(c.idle_since) >= timeout)
                .count();
            expired.extend(conns.drain(..old));
            !conns.is_empty()
        });
        idle.kept -= expired.len();
        drop(idle);
        // Closed outside the lock.
        drop(expired);
    }

    /// A new connection to `target` (the connector applies the address policy and the connect
    /// timeout; TLS for https checks the certificate against the host name).
    async fn connect(&self, target: &Target) -> Result<Box<Conn>, NoAnswer> {
        // Boxed: a new connection is rare beside the exchanges, and the connector's future
        // inlined into every caller's cost 6 KB of the binary.
        let connecting: Pin<Box<dyn std::future::Future<Output = _> + Send + '_>> =
            Box::pin(self.connector.connect(&target.uri));
        let tcp = connecting.await.map_err(|e| match e {
            ConnectError::Unsent(m) => NoAnswer::Unsent(m),
            ConnectError::Io(e) => NoAnswer::Failed(describe(&e)),
        })?;
        let io = match &target.tls_name {
            None => Stream::Plain(tcp),
            Some(name) => Stream::Tls(Box::new(
                self.tls
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| NoAnswer::Failed(describe(&e)))?,
            )),
        };
        self.metrics
            .delivery_connections
            .fetch_add(1, Ordering::Relaxed);
        Ok(Box::new(Conn {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
            idle_since: Instant::now(),
        }))
    }
}

/// Why no answer came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoAnswer {
    /// The server could not send: the host could not be looked up now (the resolver failed or
    /// did not answer), or the server had no socket, port, memory or route to connect with.
    /// Nothing was sent; whether the receiver is up is not known.
    Unsent(String),
    /// Anything else (the host has no address, the connection or the exchange failed), in the
    /// words of the deepest cause.
    Failed(String),
}

/// The most specific message in an error's chain ("connection refused", not "client error").
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut messages = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        messages.push(s.to_string());
        source = s.source();
    }
    messages.dedup();
    messages.join(": ")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    fn target(url: &str) -> Target {
        Target::new(&url.parse().unwrap()).unwrap()
    }

    #[test]
    fn an_endpoints_own_headers_follow_host_and_bad_stored_lines_are_left_out() {
        let lines = [
            "Authorization: Bearer t0k3n",
            "X-Evil: a\r\nX-Injected: 1",
            "Content-Length: 0",
            "no separator",
            "X-Tenant: 42",
        ]
        .map(String::from);
        let t = target("http://example.com/hook").with_headers(&lines);
        assert_eq!(
            String::from_utf8(t.head().to_vec()).unwrap(),
            "POST /hook HTTP/1.1\r\nhost: example.com\r\n\
             Authorization: Bearer t0k3n\r\nX-Tenant: 42\r\n"
        );
    }

    #[test]
    fn a_target_names_the_path_and_the_port_only_when_it_is_not_the_default() {
        let head = |u: &str| String::from_utf8(target(u).head().to_vec()).unwrap();
        assert_eq!(
            head("http://example.com:8080/hook?a=1"),
            "POST /hook?a=1 HTTP/1.1\r\nhost: example.com:8080\r\n"
        );
        assert_eq!(
            head("https://example.com"),
            "POST / HTTP/1.1\r\nhost: example.com\r\n"
        );
        assert_eq!(
            head("http://example.com?x=1"),
            "POST /?x=1 HTTP/1.1\r\nhost: example.com\r\n"
        );
        assert_eq!(
            head("http://example.com:80/"),
            "POST / HTTP/1.1\r\nhost: example.com\r\n"
        );
        assert_eq!(
            head("https://example.com:443/a"),
            "POST /a HTTP/1.1\r\nhost: example.com\r\n"
        );
        assert_eq!(
            head("https://example.com:80/a"),
            "POST /a HTTP/1.1\r\nhost: example.com:80\r\n"
        );
        assert_eq!(
            head("http://[::1]:9000/a"),
            "POST /a HTTP/1.1\r\nhost: [::1]:9000\r\n"
        );
        // Origins: the scheme and the port, default or not, tell connections apart.
        assert_eq!(&*target("http://a.example/x").origin, "http://a.example:80");
        assert_eq!(
            &*target("http://a.example:80/y").origin,
            "http://a.example:80"
        );
        assert_eq!(
            &*target("https://a.example/x").origin,
            "https://a.example:443"
        );
        assert!(target("http://a.example/").tls_name.is_none());
        assert_eq!(
            target("https://[::1]:8443/").tls_name,
            Some(ServerName::try_from("::1").unwrap())
        );
        for bad in ["ftp://a.example/", "/relative", "mailto:x@a.example"] {
            assert!(Target::new(&bad.parse().unwrap()).is_none(), "{bad}");
        }
    }

    /// The length of the first request in `buf` (its head and `Content-Length` body) once all of
    /// it is there.
    fn whole_request(buf: &[u8]) -> Option<usize> {
        let mut hs = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut hs);
        let httparse::Status::Complete(head) = req.parse(buf).ok()? else {
            return None;
        };
        let body: usize = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
            .unwrap_or(0);
        (buf.len() >= head + body).then_some(head + body)
    }

    /// A receiver on loopback that answers every request with `answer` after `delay`, keeping
    /// the connection; it counts the connections it accepted.
    async fn receiver(answer: &'static [u8], delay: Duration) -> (Uri, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("http://{}/hook", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        if let Some(n) = whole_request(&buf) {
                            buf.drain(..n);
                            tokio::time::sleep(delay).await;
                            if stream.write_all(answer).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        (uri, accepted)
    }

    fn connector() -> SafeConnector {
        SafeConnector::for_tests()
    }

    fn client(max_idle: usize, idle_timeout: Duration) -> Client {
        Client::new(
            connector(),
            max_idle,
            idle_timeout,
            Metrics::new(&[("GET", "/")], 1),
        )
    }

    /// A request of `{}` to `uri`, and its target.
    fn post(uri: &Uri) -> (Target, Vec<u8>) {
        let target = Target::new(uri).unwrap();
        let mut request = target.head().to_vec();
        request.extend_from_slice(b"content-length: 2\r\n\r\n{}");
        (target, request)
    }

    /// Send `{}` to `uri` on `c`.
    async fn send(c: &Client, uri: &Uri, limit: usize) -> Result<Answer, String> {
        let (target, request) = post(uri);
        c.exchange(&target, &request, limit)
            .await
            .map_err(|e| match e {
                NoAnswer::Failed(m) => m,
                other => panic!("{other:?}"),
            })
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

    #[tokio::test]
    async fn a_connection_is_reused_until_it_has_been_idle_too_long() {
        let (uri, accepted) = receiver(OK, Duration::ZERO).await;
        let c = client(8, Duration::from_millis(300));
        for _ in 0..3 {
            let a = send(&c, &uri, 1024).await.unwrap();
            assert_eq!(a.status, 200);
            assert_eq!(a.body.as_deref(), Some(&b"ok"[..]));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(c.idle(), 1);
        tokio::time::sleep(Duration::from_millis(400)).await;
        send(&c, &uri, 1024).await.unwrap();
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "the idle one had expired"
        );
        assert_eq!(c.idle(), 1);
    }

    #[tokio::test]
    async fn a_sweep_closes_idle_connections_past_their_time() {
        let (uri, _) = receiver(OK, Duration::ZERO).await;
        let c = client(8, Duration::from_millis(200));
        send(&c, &uri, 1024).await.unwrap();
        c.sweep();
        assert_eq!(c.idle(), 1, "still within its time");
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.sweep();
        assert_eq!(c.idle(), 0);
    }

    #[tokio::test]
    async fn at_most_max_idle_connections_are_kept_in_all_and_the_oldest_goes_first() {
        // Three receivers, three origins, room for two idle connections in all.
        let (a, b, d) = (
            receiver(OK, Duration::ZERO).await,
            receiver(OK, Duration::ZERO).await,
            receiver(OK, Duration::ZERO).await,
        );
        let c = client(2, Duration::from_secs(60));
        for (uri, _) in [&a, &b] {
            send(&c, uri, 1024).await.unwrap();
        }
        assert_eq!(c.idle(), 2);
        // A third origin's connection closes the one idle longest: a's.
        send(&c, &d.0, 1024).await.unwrap();
        assert_eq!(c.idle(), 2);
        send(&c, &b.0, 1024).await.unwrap();
        assert_eq!(b.1.load(Ordering::SeqCst), 1, "b's was kept and reused");
        send(&c, &a.0, 1024).await.unwrap();
        assert_eq!(a.1.load(Ordering::SeqCst), 2, "a's had been closed");
        // a's new one closed d's, now the oldest; b's stays.
        assert_eq!(c.idle(), 2);
        send(&c, &b.0, 1024).await.unwrap();
        send(&c, &d.0, 1024).await.unwrap();
        assert_eq!(b.1.load(Ordering::SeqCst), 1);
        assert_eq!(d.1.load(Ordering::SeqCst), 2);
        assert_eq!(c.idle(), 2);
    }

    #[tokio::test]
    async fn at_most_max_idle_connections_are_kept_per_origin() {
        let (uri, accepted) = receiver(OK, Duration::from_millis(100)).await;
        let c = client(1, Duration::from_secs(60));
        // Three at once need three connections; one of them is kept afterwards.
        let ex = || send(&c, &uri, 1024);
        let (a, b, d) = tokio::join!(ex(), ex(), ex());
        for answer in [a, b, d] {
            assert_eq!(answer.unwrap().status, 200);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        assert_eq!(c.idle(), 1);
        let (a, b) = tokio::join!(ex(), ex());
        for answer in [a, b] {
            assert_eq!(answer.unwrap().status, 200);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 4, "one reused, one new");
    }

    #[tokio::test]
    async fn an_answer_over_the_limit_is_not_kept_and_its_connection_is_not_reused() {
        const BIG: &[u8] = b"HTTP/1.1 500 X\r\nContent-Length: 10\r\n\r\n0123456789";
        let (uri, accepted) = receiver(BIG, Duration::ZERO).await;
        let c = client(8, Duration::from_secs(60));
        let a = send(&c, &uri, 4).await.unwrap();
        assert_eq!(a.status, 500);
        assert_eq!(a.body, None);
        assert_eq!(c.idle(), 0);
        let a = send(&c, &uri, 64).await.unwrap();
        assert_eq!(a.body.as_deref(), Some(&b"0123456789"[..]));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(c.idle(), 1);
    }

    /// A TLS receiver (a certificate for `localhost` from the test authority in `testdata/`) on
    /// a thread of its own: it answers every request with 200 and keeps the connection, and
    /// counts the connections it accepted.
    fn tls_receiver() -> (Uri, Arc<AtomicUsize>) {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use std::io::{Read, Write};
        let cert = CertificateDer::from_pem_slice(include_bytes!("testdata/leaf.pem")).unwrap();
        let key = PrivateKeyDer::from_pem_slice(include_bytes!("testdata/leaf.key")).unwrap();
        let config = Arc::new(
            rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(vec![cert], key)
                .unwrap(),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let uri = format!(
            "https://localhost:{}/hook",
            listener.local_addr().unwrap().port()
        )
        .parse()
        .unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { return };
                count.fetch_add(1, Ordering::SeqCst);
                let config = Arc::clone(&config);
                std::thread::spawn(move || {
                    let conn = rustls::ServerConnection::new(config).unwrap();
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    let mut buf = Vec::new();
                    loop {
                        if let Some(n) = whole_request(&buf) {
                            buf.drain(..n);
                            if tls.write_all(OK).and_then(|_| tls.flush()).is_err() {
                                return;
                            }
                            continue;
                        }
                        let mut chunk = [0u8; 4096];
                        match tls.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        (uri, accepted)
    }

    #[tokio::test]
    async fn https_answers_come_back_over_one_kept_connection() {
        use rustls::pki_types::pem::PemObject;
        let (uri, accepted) = tls_receiver();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(
                rustls::pki_types::CertificateDer::from_pem_slice(include_bytes!(
                    "testdata/ca.pem"
                ))
                .unwrap(),
            )
            .unwrap();
        let tls = crate::tls::client(roots);
        let metrics = Metrics::new(&[("GET", "/")], 1);
        let c = Client::with_tls(connector(), tls, 8, Duration::from_secs(60), metrics);
        for _ in 0..3 {
            let a = send(&c, &uri, 1024).await.unwrap();
            assert_eq!(a.status, 200);
            assert_eq!(a.body.as_deref(), Some(&b"ok"[..]));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // The same receiver is refused by the public roots: the certificate is checked.
        let public = client(8, Duration::from_secs(60));
        let e = match send(&public, &uri, 1024).await {
            Err(e) => e,
            Ok(_) => panic!("a certificate from an unknown authority was taken"),
        };
        assert!(e.contains("certificate"), "{e}");
    }

    #[tokio::test]
    async fn a_refused_connection_is_an_error_that_says_so() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("http://{}/", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        drop(listener);
        let e = match send(&client(8, Duration::from_secs(60)), &uri, 1024).await {
            Err(e) => e,
            Ok(_) => panic!("nothing listens there"),
        };
        assert!(e.to_lowercase().contains("refused"), "{e}");
    }

    /// `wire` fed to a reader in the pieces `cuts` makes, then its end.
    fn read_in_parts(wire: &[u8], cuts: &[usize], limit: usize) -> Result<Read, String> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
        cuts.sort_unstable();
        cuts.push(wire.len());
        let mut reader = AnswerReader::new(limit);
        let mut buf = BytesMut::new();
        let mut from = 0;
        for cut in cuts {
            buf.extend_from_slice(&wire[from..cut]);
            from = cut;
            match reader.feed(&mut buf, false)? {
                Read::More => {}
                done => return Ok(done),
            }
        }
        reader.feed(&mut buf, true)
    }

    fn read(wire: &str) -> Result<Read, String> {
        read_in_parts(wire.as_bytes(), &[], 64)
    }

    fn done(status: u16, body: Option<&str>, keep: bool) -> Result<Read, String> {
        Ok(Read::Done(
            Answer {
                status,
                retry_after: None,
                body: body.map(|b| Bytes::copy_from_slice(b.as_bytes())),
            },
            keep,
        ))
    }

    #[test]
    fn answers_are_framed_as_http_1_1_says() {
        // By length, kept.
        assert_eq!(
            read("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
            done(200, Some("ok"), true)
        );
        // Interim answers are skipped.
        assert_eq!(
            read("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early\r\nLink: x\r\n\r\nHTTP/1.1 202 A\r\nContent-Length: 0\r\n\r\n"),
            done(202, Some(""), true)
        );
        // But not without end.
        let interim = "HTTP/1.1 100 Continue\r\n\r\n";
        let last = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let within = interim.repeat(ANSWER_INTERIM_MAX as usize) + last;
        assert_eq!(read(&within), done(200, Some(""), true));
        let over = interim.repeat(ANSWER_INTERIM_MAX as usize + 1) + last;
        assert!(read(&over).unwrap_err().contains("interim answers"));
        // Chunked, trailers and extensions ignored.
        assert_eq!(
            read("HTTP/1.1 500 E\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2;x=1\r\nno\r\n1\r\n!\r\n0\r\nT: 1\r\n\r\n"),
            done(500, Some("no!"), true)
        );
        // Neither length nor chunks: to the close, and the connection ends.
        assert_eq!(
            read("HTTP/1.1 200 OK\r\n\r\nall of it"),
            done(200, Some("all of it"), false)
        );
        assert_eq!(
            read("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzz"),
            done(200, Some("zz"), false)
        );
        // Chunks and a length: the chunks decide, and the connection ends after.
        assert_eq!(
            read("HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n"),
            done(200, Some("a"), false)
        );
        // No body for 204 and 304, whatever the length says.
        assert_eq!(
            read("HTTP/1.1 204 No\r\nContent-Length: 5\r\n\r\n"),
            done(204, Some(""), true)
        );
        // Who asked to close, and HTTP/1.0.
        assert_eq!(
            read("HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 1\r\n\r\nx"),
            done(200, Some("x"), false)
        );
        assert_eq!(
            read("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx"),
            done(200, Some("x"), false)
        );
        assert_eq!(
            read("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx"),
            done(200, Some("x"), true)
        );
        // Identical lengths in a list are one length.
        assert_eq!(
            read("HTTP/1.1 200 OK\r\nContent-Length: 1, 1\r\n\r\nx"),
            done(200, Some("x"), true)
        );
        // Retry-After is kept as sent.
        assert_eq!(
            read("HTTP/1.1 503 Busy\r\nRetry-After: 120\r\nContent-Length: 0\r\n\r\n"),
            Ok(Read::Done(
                Answer {
                    status: 503,
                    retry_after: Some("120".into()),
                    body: Some(Bytes::new())
                },
                true
            ))
        );
    }

    #[test]
    fn what_is_over_the_limit_cut_short_or_unasked_for_is_not_kept() {
        // Over the limit: the status stands; the body is not kept, nor the connection.
        let big = format!(
            "HTTP/1.1 500 E\r\nContent-Length: 65\r\n\r\n{}",
            "x".repeat(65)
        );
        assert_eq!(read(&big), done(500, None, false));
        let chunks = format!(
            "HTTP/1.1 500 E\r\nTransfer-Encoding: chunked\r\n\r\n41\r\n{}\r\n0\r\n\r\n",
            "x".repeat(65)
        );
        assert_eq!(read(&chunks), done(500, None, false));
        assert_eq!(
            read(&format!("HTTP/1.1 200 OK\r\n\r\n{}", "x".repeat(65))),
            done(200, None, false)
        );
        // Cut short.
        assert_eq!(
            read("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"),
            done(200, None, false)
        );
        assert_eq!(
            read("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"),
            done(200, None, false)
        );
        // Malformed chunks.
        assert_eq!(
            read("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
            done(200, None, false)
        );
        // Bytes after the answer that nobody asked for.
        assert_eq!(
            read("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxHTTP/1.1 200"),
            done(200, Some("x"), false)
        );
    }

    #[test]
    fn what_is_not_an_answer_is_an_error_that_says_why() {
        let err = |wire: &str| read(wire).unwrap_err();
        assert!(err("").contains("closed before an answer"));
        assert!(err("HTTP/1.1 200 OK\r\nContent-").contains("middle of the answer's head"));
        assert!(err("SSH-2.0-OpenSSH\r\n\r\n").contains("not HTTP/1.1"));
        assert!(err("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n").contains("Content-Length"));
        assert!(
            err("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx")
                .contains("Content-Length")
        );
        assert!(
            err("HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n")
                .contains("Content-Length")
        );
        assert!(
            err("HTTP/1.1 101 Switching\r\nUpgrade: h2c\r\n\r\n").contains("switched protocols")
        );
        let many: String = (0..=ANSWER_HEADERS_MAX)
            .map(|i| format!("X-{i}: 1\r\n"))
            .collect();
        assert!(err(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")).contains("header fields"));
        let long = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(ANSWER_HEAD_MAX));
        assert!(err(&long).contains("KiB"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A well-formed answer: a status, a few fields, and a body by length, by chunks or to
        /// the close.
        fn answer() -> impl Strategy<Value = Vec<u8>> {
            (
                prop::sample::select(vec![200u16, 201, 204, 301, 404, 410, 429, 500, 503]),
                prop::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,10}", "[ -~]{0,30}"), 0..5),
                prop::collection::vec(any::<u8>(), 0..200),
                0..3u8,
                any::<bool>(),
            )
                .prop_map(|(status, fields, body, framing, interim)| {
                    let mut wire = Vec::new();
                    if interim {
                        wire.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                    }
                    wire.extend_from_slice(format!("HTTP/1.1 {status} X\r\n").as_bytes());
                    for (n, v) in fields {
                        let lower = n.to_ascii_lowercase();
                        if !["content-length", "transfer-encoding", "connection"]
                            .contains(&lower.as_str())
                        {
                            wire.extend_from_slice(format!("{n}: {}\r\n", v.trim()).as_bytes());
                        }
                    }
                    match framing {
                        // A 204 has no body at all.
                        _ if status == 204 => wire.extend_from_slice(b"\r\n"),
                        0 => {
                            wire.extend_from_slice(
                                format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes(),
                            );
                            wire.extend_from_slice(&body);
                        }
                        1 => {
                            wire.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                            for c in body.chunks(7) {
                                wire.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                                wire.extend_from_slice(c);
                                wire.extend_from_slice(b"\r\n");
                            }
                            wire.extend_from_slice(b"0\r\n\r\n");
                        }
                        _ => {
                            wire.extend_from_slice(b"\r\n");
                            wire.extend_from_slice(&body);
                        }
                    }
                    wire
                })
        }

        proptest! {
            #[test]
            fn any_split_of_an_answer_reads_as_the_whole(
                wire in answer(),
                cuts in prop::collection::vec(any::<usize>(), 0..8),
                limit in 0usize..300,
            ) {
                let whole = read_in_parts(&wire, &[], limit);
                let split = read_in_parts(&wire, &cuts, limit);
                prop_assert!(whole.is_ok(), "{:?}", whole);
                if let Ok(Read::Done(a, _)) = &whole {
                    prop_assert!(a.body.as_ref().is_none_or(|b| b.len() <= limit));
                }
                prop_assert_eq!(whole, split);
            }

            #[test]
            fn any_bytes_give_an_answer_or_an_error_never_more_than_the_limit(
                wire in prop::collection::vec(any::<u8>(), 0..400),
                cuts in prop::collection::vec(any::<usize>(), 0..4),
                limit in 0usize..100,
            ) {
                if let Ok(Read::Done(a, _)) = read_in_parts(&wire, &cuts, limit) {
                    prop_assert!(a.body.is_none_or(|b| b.len() <= limit));
                    prop_assert!(!(100..200).contains(&a.status), "an interim answer is never the answer");
                }
            }
        }
    }

    /// A receiver on loopback that answers each connection's first request with `OK` and then
    /// closes it, without saying so; it counts the requests it read.
    async fn closing_receiver() -> (Uri, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("http://{}/hook", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&requests);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let count = Arc::clone(&count);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while whole_request(&buf).is_none() {
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = stream.write_all(OK).await;
                });
            }
        });
        (uri, requests)
    }

    #[tokio::test]
    async fn a_kept_connection_the_receiver_closed_is_not_used() {
        let (uri, requests) = closing_receiver().await;
        let c = client(8, Duration::from_secs(60));
        for n in 1..=3 {
            let a = send(&c, &uri, 1024).await.unwrap();
            assert_eq!(a.status, 200);
            assert_eq!(c.idle(), 1, "kept: the answer did not say it would close");
            // Its end has come by the time the next request is sent.
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(requests.load(Ordering::SeqCst), n, "each request sent once");
        }
        let opened = c.metrics.delivery_connections.load(Ordering::Relaxed);
        assert_eq!(opened, 3, "a new connection for each request");
    }
}
