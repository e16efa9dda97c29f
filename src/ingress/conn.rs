//! One keep-alive connection.
//!
//! The read buffer and the write buffer belong to the connection and travel round the loop. Limits
//! come before work, and each costs a slow or hostile client only what it sends:
//! - the head is searched for its end only in the bytes that just arrived (a head sent a byte at a
//!   time costs O(its length)); over `head_bytes_max`: 431; stalled: 408; both close;
//! - the route and the API key are checked from the head, before the body is read and before
//!   `100 Continue`: a request that will be refused never gets to upload its body;
//! - a declared body over `body_bytes_max` gets 413 before a byte of it is read; bodies in flight
//!   share a node-wide byte budget (`inflight_body_bytes_max`; beyond it 503); stalled: 408;
//! - a client that does not read its answers is closed after `idle_timeout_ms`;
//! - buffers grown by a large request or answer are given back once it is done.
//!
//! Pipelined requests are answered in order, their responses written together once no complete
//! request is left in the buffer. At shutdown an idle connection closes at once and a busy one
//! after its current response (sent with `Connection: close`).

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use super::access::Entry;
use super::core::CoreCtx;
use super::handle::{self, Prepared};
use super::node::BodyLease;
use super::parse::{
    find_head_end, leading_blank_lines, parse_head, Framing, Head, HeadError, Parsed,
};
use super::request::{client_addr, Request};
use super::response::{write_reply, CONTINUE};
use super::router::Route;
use crate::chunked::{ChunkError, ChunkedDecoder};
use crate::config::{READ_CHUNK_MAX, READ_CHUNK_MIN, WRITE_BUFFER_KEEP_BYTES, WRITE_FLUSH_BYTES};
use crate::error::ApiError;
use crate::reply::Reply;
use crate::shutdown::{race, Either};

/// Counts the connection in and out of its core's tally, and raises `drained` when the last
/// connection of a shutting-down core closes.
struct Tally(Rc<CoreCtx>);

impl Tally {
    fn new(ctx: &Rc<CoreCtx>) -> Self {
        ctx.connections.set(ctx.connections.get() + 1);
        ctx.metrics.connection(1);
        Tally(Rc::clone(ctx))
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        let ctx = &self.0;
        ctx.connections.set(ctx.connections.get() - 1);
        ctx.metrics.connection(-1);
        if ctx.connections.get() == 0 && ctx.shutdown.is_set() {
            ctx.drained.set();
        }
    }
}

/// Why a connection stops: with an error to answer first, or quietly (the client went away, the
/// connection was idle at a timeout or at shutdown).
enum Stop {
    Answer(ApiError),
    Quiet,
}

/// One connection: its socket, its read and write buffers, its limits.
struct Connection {
    ctx: Rc<CoreCtx>,
    stream: TcpStream,
    buf: BytesMut,
    /// Bytes at the start of `buf` already searched for the end of a head.
    head_scanned: usize,
    out: Vec<u8>,
    head_timeout: Duration,
    body_timeout: Duration,
    idle_timeout: Duration,
    /// With `--access-log`: the current request's `X-Request-Id` and client address.
    access: Option<(Option<Bytes>, IpAddr)>,
}

impl Connection {
    fn new(ctx: Rc<CoreCtx>, stream: TcpStream) -> Self {
        let c = &ctx.config;
        Connection {
            head_timeout: Duration::from_millis(c.head_timeout_ms),
            body_timeout: Duration::from_millis(c.body_timeout_ms),
            idle_timeout: Duration::from_millis(c.idle_timeout_ms),
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK_MIN),
            head_scanned: 0,
            out: Vec::new(),
            access: None,
            ctx,
        }
    }

    /// Read more bytes, giving up at `deadline` or, while `idle`, at shutdown.
    async fn read_more(&mut self, deadline: Instant, idle: bool) -> ReadOutcome {
        let mut buf = std::mem::take(&mut self.buf);
        if buf.capacity() - buf.len() < READ_CHUNK_MIN / 2 {
            // Room for at least as much again as is buffered: large bodies arrive in few reads.
            buf.reserve(buf.len().clamp(READ_CHUNK_MIN, READ_CHUNK_MAX));
        }
        // monoio reads into the start of an IoBufMut: hand it only the spare capacity, or it
        // would overwrite what is already buffered.
        let (filled, capacity) = (buf.len(), buf.capacity());
        let read = self
            .ctx
            .deadlines
            .until(deadline, self.stream.read(buf.slice_mut(filled..capacity)));
        let result = if idle {
            match race(read, self.ctx.shutdown.wait()).await {
                Either::Left(r) => r,
                Either::Right(()) => return ReadOutcome::Shutdown,
            }
        } else {
            read.await
        };
        match result {
            Some((Ok(0), _)) | Some((Err(_), _)) => ReadOutcome::Closed,
            Some((Ok(_), slice)) => {
                self.buf = slice.into_inner();
                ReadOutcome::Data
            }
            None => ReadOutcome::TimedOut,
        }
    }

    /// Read more of a body before `deadline`.
    async fn more_body(&mut self, deadline: Instant) -> Result<(), Stop> {
        match self.read_more(deadline, false).await {
            ReadOutcome::Data => Ok(()),
            ReadOutcome::TimedOut => Err(Stop::Answer(ApiError::RequestTimeout(
                "the request body was not received in time",
            ))),
            ReadOutcome::Closed | ReadOutcome::Shutdown => Err(Stop::Quiet),
        }
    }

    /// Write what is waiting in the write buffer. A client that does not take it within the idle
    /// timeout (it pipelines and never reads) is closed.
    async fn flush(&mut self) -> Result<(), Stop> {
        if self.out.is_empty() {
            return Ok(());
        }
        let write = self.stream.write_all(std::mem::take(&mut self.out));
        let Some((result, mut out)) = self.ctx.deadlines.within(self.idle_timeout, write).await
        else {
            return Err(Stop::Quiet);
        };
        out.clear();
        if out.capacity() > WRITE_BUFFER_KEEP_BYTES {
            // A large answer (an inbox page) grew it: don't keep that for the connection's life.
            out = Vec::new();
        }
        self.out = out;
        result.map(|_| ()).map_err(|_| Stop::Quiet)
    }

    /// Parse what is buffered, reading more until a whole head is there.
    async fn read_head(&mut self) -> Result<Head, Stop> {
        let max = self.ctx.config.head_bytes_max;
        let mut started: Option<Instant> = None;
        loop {
            let blank = leading_blank_lines(&self.buf);
            if blank > 0 {
                self.buf.advance(blank);
                self.head_scanned = 0;
            }
            if find_head_end(&self.buf, self.head_scanned).is_some() {
                self.head_scanned = 0;
                match parse_head(&mut self.buf) {
                    Ok(Parsed::Complete(head)) if head.len <= max => return Ok(head),
                    Ok(Parsed::Complete(_)) | Err(HeadError::TooManyHeaders) => {
                        return Err(Stop::Answer(ApiError::HeadersTooLarge(max)))
                    }
                    Err(HeadError::Bad(why)) => {
                        return Err(Stop::Answer(ApiError::BadRequest(why.into())))
                    }
                    Ok(Parsed::Partial) => self.head_scanned = self.buf.len(),
                }
            } else {
                self.head_scanned = self.buf.len();
            }
            if self.buf.len() > max {
                return Err(Stop::Answer(ApiError::HeadersTooLarge(max)));
            }
            // Nothing complete is left: send the answers to earlier pipelined requests first.
            self.flush().await?;
            let idle = self.buf.is_empty();
            if idle && self.ctx.shutdown.is_set() {
                return Err(Stop::Quiet);
            }
            if idle && self.buf.capacity() > READ_CHUNK_MAX {
                // A large body grew it: an idle connection holds no more than a small buffer.
                self.buf = BytesMut::with_capacity(READ_CHUNK_MIN);
            }
            let deadline = if idle {
                Instant::now() + self.idle_timeout
            } else {
                *started.get_or_insert_with(Instant::now) + self.head_timeout
            };
            match self.read_more(deadline, idle).await {
                ReadOutcome::Data => {
                    started.get_or_insert_with(Instant::now);
                }
                ReadOutcome::TimedOut if !idle => {
                    return Err(Stop::Answer(ApiError::RequestTimeout(
                        "the request head was not received in time",
                    )))
                }
                ReadOutcome::TimedOut | ReadOutcome::Closed | ReadOutcome::Shutdown => {
                    return Err(Stop::Quiet)
                }
            }
        }
    }

    /// Read the body its head announces: refused unread when too large (by `Content-Length`, or
    /// as soon as the chunk sizes pass the limit) or when the node's body budget is spent.
    async fn read_body(
        &mut self,
        head: &Head,
        max: usize,
        started: Instant,
        lease: &mut BodyLease,
    ) -> Result<Bytes, Stop> {
        let deadline = started + self.body_timeout;
        match head.framing {
            Framing::None => Ok(Bytes::new()),
            Framing::Length(n) if n > max => Err(Stop::Answer(ApiError::PayloadTooLarge(format!(
                "request body of {n} bytes exceeds the limit of {max} bytes"
            )))),
            Framing::Length(n) => {
                if !lease.grow(n) {
                    return Err(Stop::Answer(ApiError::Overloaded(
                        "request bodies in flight",
                    )));
                }
                if self.buf.len() < n && head.expect_continue {
                    self.out.extend_from_slice(CONTINUE);
                    self.flush().await?;
                }
                while self.buf.len() < n {
                    if self.buf.capacity() < n {
                        let need = n - self.buf.len();
                        self.buf.reserve(need);
                    }
                    self.more_body(deadline).await?;
                }
                Ok(self.buf.split_to(n).freeze())
            }
            Framing::Chunked => {
                if self.buf.is_empty() && head.expect_continue {
                    self.out.extend_from_slice(CONTINUE);
                    self.flush().await?;
                }
                let mut decoder = ChunkedDecoder::new(max);
                let mut leased = 0;
                loop {
                    let decoded = decoder.decode(&mut self.buf);
                    // Every announced chunk is held in the budget before its bytes are taken.
                    let announced = decoder.announced();
                    if announced > leased {
                        if !lease.grow(announced - leased) {
                            return Err(Stop::Answer(ApiError::Overloaded(
                                "request bodies in flight",
                            )));
                        }
                        leased = announced;
                    }
                    match decoded {
                        Ok(Some(body)) => return Ok(body),
                        Ok(None) => self.more_body(deadline).await?,
                        Err(ChunkError::TooLarge) => {
                            return Err(Stop::Answer(ApiError::PayloadTooLarge(format!(
                                "request body exceeds the limit of {max} bytes"
                            ))))
                        }
                        Err(ChunkError::Malformed) => {
                            return Err(Stop::Answer(ApiError::BadRequest(
                                "malformed chunked body".into(),
                            )))
                        }
                    }
                }
            }
        }
    }

    /// Skip the body of a request answered from its head when it is already buffered, so the
    /// connection stays usable; `false` when it is not (then the connection must close).
    fn skip_body(&mut self, head: &Head) -> bool {
        match head.framing {
            Framing::None => true,
            Framing::Length(n) if self.buf.len() >= n => {
                self.buf.advance(n);
                true
            }
            Framing::Length(_) | Framing::Chunked => false,
        }
    }

    /// Write `reply` and count it.
    fn write(&mut self, route: Route, reply: &Reply, keep_alive: bool, started: Instant) {
        {
            let mut date = self.ctx.date.borrow_mut();
            write_reply(&mut self.out, reply, keep_alive, date.get());
        }
        let metrics = &self.ctx.metrics;
        metrics.request(
            route as usize,
            reply.status,
            started.elapsed().as_micros() as u64,
        );
        if route == Route::EventsCreate && matches!(reply.status, 201 | 202) {
            metrics.events_ingested(1);
        }
        if let Some(log) = &self.ctx.access {
            let (request_id, client) = match self.access.take() {
                Some((id, client)) => (id, Some(client)),
                None => (None, None),
            };
            log.line(Entry {
                route: route.labels(),
                status: reply.status,
                duration_us: started.elapsed().as_micros() as u64,
                org: reply.org,
                request_id: request_id.as_deref(),
                client,
            });
        }
    }

    /// Answer the error a stop carries, if any, and close.
    async fn stop(mut self, stop: Stop, route: Route, started: Instant) {
        if let Stop::Answer(e) = stop {
            self.write(route, &e.reply(), false, started);
            let _ = self.flush().await;
        }
    }
}

enum ReadOutcome {
    Data,
    Closed,
    TimedOut,
    Shutdown,
}

/// Answer a connection over the per-core limit with 503 and close it.
pub async fn refuse(ctx: Rc<CoreCtx>, stream: TcpStream) {
    let conn = Connection::new(ctx, stream);
    conn.stop(
        Stop::Answer(ApiError::Overloaded("too many connections")),
        Route::BadRequest,
        Instant::now(),
    )
    .await;
}

/// Serve one connection until it closes.
pub async fn serve(ctx: Rc<CoreCtx>, stream: TcpStream, peer: SocketAddr, metrics_only: bool) {
    let _tally = Tally::new(&ctx);
    let _ = stream.set_nodelay(true);
    let mut conn = Connection::new(Rc::clone(&ctx), stream);
    loop {
        let head = match conn.read_head().await {
            Ok(head) => head,
            Err(stop) => return conn.stop(stop, Route::BadRequest, Instant::now()).await,
        };
        let started = Instant::now();
        let client: IpAddr = client_addr(peer.ip(), &head, ctx.config.trust_forwarded_for);
        if ctx.access.is_some() {
            conn.access = Some((head.request_id.clone(), client));
        }
        let keep_alive_asked = head.keep_alive;
        let (route, reply, reusable) =
            match handle::prepare(&ctx, &head, client, metrics_only).await {
                Prepared::Answer(route, reply) => {
                    let reusable = conn.skip_body(&head);
                    (route, reply, reusable)
                }
                Prepared::Ready(ready) => {
                    let route = ready.route;
                    let mut lease = ctx.bodies.lease();
                    let max = match route {
                        Route::EventsBatch => ctx.config.batch_body_max(),
                        _ => ctx.config.body_bytes_max,
                    };
                    let body = match conn.read_body(&head, max, started, &mut lease).await {
                        Ok(body) => body,
                        Err(stop) => return conn.stop(stop, route, started).await,
                    };
                    let request = Request {
                        head,
                        body,
                        peer: client,
                    };
                    let label = route.labels().1;
                    let reply =
                        crate::logging::in_route(label, handle::run(&ctx, ready, &request)).await;
                    drop(lease);
                    (route, reply, true)
                }
            };
        let keep_alive =
            keep_alive_asked && reusable && !reply.extra.close && !ctx.shutdown.is_set();
        conn.write(route, &reply, keep_alive, started);
        if !keep_alive {
            let _ = conn.flush().await;
            return;
        }
        if (conn.buf.is_empty() || conn.out.len() >= WRITE_FLUSH_BYTES)
            && conn.flush().await.is_err()
        {
            return;
        }
    }
}
