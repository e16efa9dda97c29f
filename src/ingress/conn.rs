//! One keep-alive connection.
//!
//! The read buffer and the write buffer belong to the connection and travel round the loop. Limits
//! come before work: a head over `head_bytes_max` gets 431, a declared body over `body_bytes_max`
//! gets 413 before a byte of it is read, a client that stalls mid-head or mid-body gets 408; each of
//! those closes the connection. Pipelined requests are answered in order, their responses written
//! together once no complete request is left in the buffer. At shutdown an idle connection closes
//! at once and a busy one after its current response (sent with `Connection: close`).

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use super::parse::{parse_head, ChunkError, ChunkedDecoder, Framing, HeadError, Parsed};
use super::response::{write_reply, CONTINUE};
use super::router::Route;
use super::{handle, CoreCtx, Request};
use crate::error::ApiError;
use crate::shutdown::{race, Either};

/// Spare room made in the read buffer before each read.
const READ_CHUNK: usize = 8 * 1024;
/// Responses to pipelined requests are flushed once this many bytes are waiting.
const WRITE_FLUSH: usize = 64 * 1024;

enum ReadOutcome {
    Data(BytesMut),
    Closed,
    TimedOut,
    Shutdown,
}

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

/// Read more bytes into `buf`, giving up at `deadline` or, while `idle`, at shutdown.
async fn read_more(
    ctx: &CoreCtx,
    stream: &mut TcpStream,
    mut buf: BytesMut,
    deadline: Instant,
    idle: bool,
) -> ReadOutcome {
    if buf.capacity() - buf.len() < READ_CHUNK / 2 {
        buf.reserve(READ_CHUNK);
    }
    let left = deadline.saturating_duration_since(Instant::now());
    // monoio reads into the start of an IoBufMut: hand it only the spare capacity, or it would
    // overwrite what is already buffered.
    let (filled, capacity) = (buf.len(), buf.capacity());
    let read = monoio::time::timeout(left, stream.read(buf.slice_mut(filled..capacity)));
    let result = if idle {
        match race(read, ctx.shutdown.wait()).await {
            Either::Left(r) => r,
            Either::Right(()) => return ReadOutcome::Shutdown,
        }
    } else {
        read.await
    };
    match result {
        Ok((Ok(0), _)) | Ok((Err(_), _)) => ReadOutcome::Closed,
        Ok((Ok(_), slice)) => ReadOutcome::Data(slice.into_inner()),
        Err(_) => ReadOutcome::TimedOut,
    }
}

async fn flush(stream: &mut TcpStream, out: &mut Vec<u8>) -> bool {
    if out.is_empty() {
        return true;
    }
    let (result, mut buf) = stream.write_all(std::mem::take(out)).await;
    buf.clear();
    *out = buf;
    result.is_ok()
}

/// Write one error, close.
async fn fail(
    ctx: &CoreCtx,
    stream: &mut TcpStream,
    mut out: Vec<u8>,
    route: Route,
    e: ApiError,
    started: Instant,
) {
    let reply = e.reply();
    let date = *ctx.date.borrow_mut().get();
    write_reply(&mut out, &reply, false, &date);
    ctx.metrics
        .request(route, reply.status, started.elapsed().as_micros() as u64);
    let _ = flush(stream, &mut out).await;
}

/// Answer a connection over the per-core limit with 503 and close it.
pub async fn refuse(ctx: Rc<CoreCtx>, mut stream: TcpStream) {
    let started = Instant::now();
    fail(
        &ctx,
        &mut stream,
        Vec::new(),
        Route::BadRequest,
        ApiError::Overloaded("too many connections"),
        started,
    )
    .await;
}

/// Serve one connection until it closes.
pub async fn serve(ctx: Rc<CoreCtx>, mut stream: TcpStream, peer: SocketAddr, metrics_only: bool) {
    let _tally = Tally::new(&ctx);
    let _ = stream.set_nodelay(true);
    let config = Arc::clone(&ctx.config);
    let head_timeout = Duration::from_millis(config.head_timeout_ms);
    let body_timeout = Duration::from_millis(config.body_timeout_ms);
    let idle_timeout = Duration::from_millis(config.idle_timeout_ms);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    loop {
        // The head: parse what is buffered, read more until it is complete.
        let mut head_started: Option<Instant> = None;
        let head = loop {
            match parse_head(&mut buf) {
                Ok(Parsed::Complete(head)) if head.len > config.head_bytes_max => {
                    let e = ApiError::HeadersTooLarge(config.head_bytes_max);
                    return fail(&ctx, &mut stream, out, Route::BadRequest, e, Instant::now())
                        .await;
                }
                Ok(Parsed::Complete(head)) => break head,
                Ok(Parsed::Partial) => {}
                Err(HeadError::TooManyHeaders) => {
                    let e = ApiError::HeadersTooLarge(config.head_bytes_max);
                    return fail(&ctx, &mut stream, out, Route::BadRequest, e, Instant::now())
                        .await;
                }
                Err(HeadError::Bad(why)) => {
                    let e = ApiError::BadRequest(why.to_string());
                    return fail(&ctx, &mut stream, out, Route::BadRequest, e, Instant::now())
                        .await;
                }
            }
            if buf.len() > config.head_bytes_max {
                let e = ApiError::HeadersTooLarge(config.head_bytes_max);
                return fail(&ctx, &mut stream, out, Route::BadRequest, e, Instant::now()).await;
            }
            // Nothing complete is left: send the answers to earlier pipelined requests first.
            if !flush(&mut stream, &mut out).await {
                return;
            }
            let idle = buf.is_empty();
            if idle && ctx.shutdown.is_set() {
                return;
            }
            let deadline = match (idle, head_started) {
                (true, _) => Instant::now() + idle_timeout,
                (false, Some(t)) => t + head_timeout,
                (false, None) => *head_started.insert(Instant::now()) + head_timeout,
            };
            match read_more(&ctx, &mut stream, buf, deadline, idle).await {
                ReadOutcome::Data(b) => {
                    buf = b;
                    head_started.get_or_insert_with(Instant::now);
                }
                ReadOutcome::TimedOut if !idle => {
                    let e = ApiError::RequestTimeout("the request head was not received in time");
                    return fail(&ctx, &mut stream, out, Route::BadRequest, e, Instant::now())
                        .await;
                }
                ReadOutcome::TimedOut | ReadOutcome::Closed | ReadOutcome::Shutdown => return,
            }
        };
        let started = Instant::now();

        // The body, by its framing.
        let body_deadline = started + body_timeout;
        let body = match head.framing {
            Framing::None => bytes::Bytes::new(),
            Framing::Length(n) if n > config.body_bytes_max => {
                let e = ApiError::PayloadTooLarge(format!(
                    "request body of {n} bytes exceeds the limit of {} bytes",
                    config.body_bytes_max
                ));
                return fail(&ctx, &mut stream, out, Route::BadRequest, e, started).await;
            }
            Framing::Length(n) => {
                if buf.len() < n && head.expect_continue {
                    out.extend_from_slice(CONTINUE);
                    if !flush(&mut stream, &mut out).await {
                        return;
                    }
                }
                while buf.len() < n {
                    if buf.capacity() < n {
                        buf.reserve(n - buf.len());
                    }
                    match read_more(&ctx, &mut stream, buf, body_deadline, false).await {
                        ReadOutcome::Data(b) => buf = b,
                        ReadOutcome::TimedOut => {
                            let e = ApiError::RequestTimeout(
                                "the request body was not received in time",
                            );
                            return fail(&ctx, &mut stream, out, Route::BadRequest, e, started)
                                .await;
                        }
                        _ => return,
                    }
                }
                buf.split_to(n).freeze()
            }
            Framing::Chunked => {
                if buf.is_empty() && head.expect_continue {
                    out.extend_from_slice(CONTINUE);
                    if !flush(&mut stream, &mut out).await {
                        return;
                    }
                }
                let mut decoder = ChunkedDecoder::new(config.body_bytes_max);
                loop {
                    match decoder.decode(&mut buf) {
                        Ok(Some(body)) => break body,
                        Ok(None) => {}
                        Err(ChunkError::TooLarge) => {
                            let e = ApiError::PayloadTooLarge(format!(
                                "request body exceeds the limit of {} bytes",
                                config.body_bytes_max
                            ));
                            return fail(&ctx, &mut stream, out, Route::BadRequest, e, started)
                                .await;
                        }
                        Err(ChunkError::Malformed) => {
                            let e = ApiError::BadRequest("malformed chunked body".into());
                            return fail(&ctx, &mut stream, out, Route::BadRequest, e, started)
                                .await;
                        }
                    }
                    match read_more(&ctx, &mut stream, buf, body_deadline, false).await {
                        ReadOutcome::Data(b) => buf = b,
                        ReadOutcome::TimedOut => {
                            let e = ApiError::RequestTimeout(
                                "the request body was not received in time",
                            );
                            return fail(&ctx, &mut stream, out, Route::BadRequest, e, started)
                                .await;
                        }
                        _ => return,
                    }
                }
            }
        };

        // The answer.
        let keep_alive_asked = head.keep_alive;
        let request = Request {
            head,
            body,
            peer: peer.ip(),
        };
        let (route, reply) = handle(&ctx, request, metrics_only).await;
        let keep_alive = keep_alive_asked && !reply.extra.close && !ctx.shutdown.is_set();
        {
            let mut date = ctx.date.borrow_mut();
            write_reply(&mut out, &reply, keep_alive, date.get());
        }
        ctx.metrics
            .request(route, reply.status, started.elapsed().as_micros() as u64);
        if !keep_alive {
            let _ = flush(&mut stream, &mut out).await;
            return;
        }
        if (buf.is_empty() || out.len() >= WRITE_FLUSH) && !flush(&mut stream, &mut out).await {
            return;
        }
    }
}
