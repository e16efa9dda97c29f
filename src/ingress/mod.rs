//! HTTP on monoio, one instance per ingress core.
//!
//! Each core is a thread pinned to its CPU, running its own monoio runtime (io_uring, or epoll
//! where io_uring is unavailable or not wanted) with its own SO_REUSEPORT listener, so the kernel
//! spreads connections and nothing is shared on the request path. A core also owns a shard of the
//! organizations (their token buckets and dedup window) and serves hops for them from its mailbox.
//!
//! - `conn`: one keep-alive connection: buffers, limits, timeouts, pipelining.
//! - `parse`: request head and body framing. `router`: (method, path) to a route.
//! - `response`: status line, headers and body into the write buffer.
//! - `events`, `inbox`, `admin`, `ops`: the handlers, one file per API area.

pub mod conn;
pub mod parse;
pub mod response;
pub mod router;

mod admin;
mod events;
mod inbox;
mod ops;

use std::cell::{Cell, RefCell};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::auth::{self, ApiKey, Cached, KeyCache, OrgInfo};
use crate::config::{AckMode, Config, IoDriver};
use crate::error::ApiError;
use crate::ids::CoreId;
use crate::json;
use crate::metrics::CoreMetrics;
use crate::reply::{RateSnapshot, Reply};
use crate::shard::mesh::{
    owner_core, CoreMsg, Hop, Mailbox, Mesh, NewEvent, Outcome, ReplyTo, Waiters, WriteResult,
};
use crate::shard::{Admit, Shard};
use crate::shutdown::{race, Either, Signal};
use crate::store::{Query, StoreHandle, StoreJob, WriteJob};
use parse::Head;
use router::Route;

/// Everything one core owns. Lives in an `Rc` on that core's thread.
pub struct CoreCtx {
    /// This core.
    pub core: CoreId,
    /// The configuration.
    pub config: Arc<Config>,
    /// Mailboxes of every core.
    pub mesh: Mesh,
    /// The store's queues.
    pub store: StoreHandle,
    /// The organizations this core owns.
    pub shard: RefCell<Shard>,
    /// Verified keys.
    pub keys: RefCell<KeyCache>,
    /// Requests waiting for other threads.
    pub waiters: Rc<Waiters>,
    /// Reused JSON parse buffers.
    pub parser: RefCell<json::Parser>,
    /// This core's counters.
    pub metrics: Arc<CoreMetrics>,
    /// Raised when the process shuts down.
    pub shutdown: Signal,
    /// Open connections.
    pub connections: Cell<usize>,
    /// Raised when the last connection closes after shutdown.
    pub drained: Signal,
    /// The cached `Date` header.
    pub date: RefCell<response::DateCache>,
    /// Keys being verified right now, by hash.
    pub verifying: RefCell<std::collections::HashMap<auth::KeyHash, Rc<Flight>>>,
}

/// One request, head and body complete.
pub struct Request {
    /// The head.
    pub head: Head,
    /// The body (empty when there is none).
    pub body: Bytes,
    /// The client's address.
    pub peer: IpAddr,
}

/// The listeners, bound before any core starts so that port 0 works and every core shares it.
pub struct Listeners {
    /// One API listener per core, all on one address.
    pub api: Vec<std::net::TcpListener>,
    /// The address they are bound to.
    pub api_addr: SocketAddr,
    /// The metrics listener, served by core 0.
    pub metrics: Option<std::net::TcpListener>,
    /// Its address.
    pub metrics_addr: Option<SocketAddr>,
}

fn reuseport_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Bind one SO_REUSEPORT listener per core on `config.listen` (the first decides the port when
/// it is 0), and the metrics listener.
pub fn bind(config: &Config) -> io::Result<Listeners> {
    let first = reuseport_listener(config.listen)?;
    let api_addr = first.local_addr()?;
    let mut api = vec![first];
    for _ in 1..config.ingress_cores {
        api.push(reuseport_listener(api_addr)?);
    }
    let (metrics, metrics_addr) = match config.metrics_listen {
        Some(addr) => {
            let l = reuseport_listener(addr)?;
            let a = l.local_addr()?;
            (Some(l), Some(a))
        }
        None => (None, None),
    };
    Ok(Listeners {
        api,
        api_addr,
        metrics,
        metrics_addr,
    })
}

/// What a core thread needs to start.
pub struct CoreParts {
    /// The core.
    pub core: CoreId,
    /// Its API listener.
    pub listener: std::net::TcpListener,
    /// The metrics listener (core 0 only).
    pub metrics_listener: Option<std::net::TcpListener>,
    /// Its mailbox.
    pub mailbox: Mailbox,
    /// Its counters.
    pub metrics: Arc<CoreMetrics>,
}

/// Start one pinned thread per core. Each returns when the core has shut down and drained.
pub fn start(
    config: Arc<Config>,
    mesh: Mesh,
    store: StoreHandle,
    parts: Vec<CoreParts>,
) -> io::Result<Vec<std::thread::JoinHandle<()>>> {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut threads = Vec::new();
    for part in parts {
        let (config, mesh, store) = (Arc::clone(&config), mesh.clone(), store.clone());
        let handle = std::thread::Builder::new()
            .name(format!("ingress-{}", part.core.0))
            .spawn(move || {
                if config.ingress_cores <= cpus {
                    pin_to_cpu(part.core.0);
                }
                if let Err(e) = run_core(config, mesh, store, part) {
                    tracing::error!(error = %e, "ingress core failed");
                    std::process::exit(1);
                }
            })?;
        threads.push(handle);
    }
    Ok(threads)
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes within it for cpu < CPU_SETSIZE, and
    // sched_setaffinity(0, ...) only affects the calling thread.
    unsafe {
        if cpu >= libc::CPU_SETSIZE as usize {
            return;
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::debug!(cpu, "could not pin ingress thread");
        }
    }
}

/// io_uring submission queue entries per core.
const URING_ENTRIES: u32 = 4096;

fn run_core(
    config: Arc<Config>,
    mesh: Mesh,
    store: StoreHandle,
    part: CoreParts,
) -> io::Result<()> {
    let core = part.core;
    let uring = || {
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(URING_ENTRIES)
            .enable_timer()
            .build()
    };
    let epoll = || {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
    };
    match config.io_driver {
        IoDriver::Uring => {
            let mut rt = uring().map_err(|e| io::Error::new(e.kind(), format!("io_uring: {e}")))?;
            log_driver(core, "io_uring");
            rt.block_on(serve(config, mesh, store, part))
        }
        IoDriver::Epoll => {
            log_driver(core, "epoll");
            epoll()?.block_on(serve(config, mesh, store, part))
        }
        IoDriver::Auto => match uring() {
            Ok(mut rt) => {
                log_driver(core, "io_uring");
                rt.block_on(serve(config, mesh, store, part))
            }
            Err(e) => {
                if core.0 == 0 {
                    tracing::warn!(error = %e, "io_uring unavailable; using epoll");
                }
                log_driver(core, "epoll");
                epoll()?.block_on(serve(config, mesh, store, part))
            }
        },
    }
}

fn log_driver(core: CoreId, driver: &str) {
    tracing::debug!(core = core.0, driver, "ingress core started");
}

async fn serve(
    config: Arc<Config>,
    mesh: Mesh,
    store: StoreHandle,
    part: CoreParts,
) -> io::Result<()> {
    let listener = monoio::net::TcpListener::from_std(part.listener)?;
    let metrics_listener = part
        .metrics_listener
        .map(monoio::net::TcpListener::from_std)
        .transpose()?;
    let ctx = Rc::new(CoreCtx {
        core: part.core,
        shard: RefCell::new(Shard::new(part.core, config.dedup_window_entries)),
        keys: RefCell::new(KeyCache::new(config.auth_cache_entries)),
        waiters: Rc::new(Waiters::default()),
        parser: RefCell::new(json::Parser::default()),
        metrics: part.metrics,
        shutdown: Signal::default(),
        connections: Cell::new(0),
        drained: Signal::default(),
        date: RefCell::new(response::DateCache::default()),
        verifying: RefCell::new(std::collections::HashMap::new()),
        config,
        mesh,
        store,
    });
    let closing = Signal::default();
    let mailbox = monoio::spawn(run_mailbox(Rc::clone(&ctx), part.mailbox, closing.clone()));
    if let Some(l) = metrics_listener {
        monoio::spawn(accept_loop(Rc::clone(&ctx), l, true));
    }
    accept_loop(Rc::clone(&ctx), listener, false).await;

    // Shutdown: no more accepts; wait for open connections to finish their requests.
    if ctx.connections.get() > 0 {
        let limit = Duration::from_secs(ctx.config.shutdown_timeout_s);
        if monoio::time::timeout(limit, ctx.drained.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                core = ctx.core.0,
                open = ctx.connections.get(),
                "connections still open at the shutdown deadline"
            );
        }
    }
    // The mailbox task must end before the runtime goes: parked, it would be owned by its waker
    // in the channel and keep this core's store handle (and so the store) alive.
    closing.set();
    mailbox.await;
    Ok(())
}

async fn accept_loop(ctx: Rc<CoreCtx>, listener: monoio::net::TcpListener, metrics_only: bool) {
    loop {
        let accepted = match race(listener.accept(), ctx.shutdown.wait()).await {
            Either::Left(r) => r,
            Either::Right(()) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                if ctx.connections.get() >= ctx.config.connections_per_core_max {
                    monoio::spawn(conn::refuse(Rc::clone(&ctx), stream));
                    continue;
                }
                monoio::spawn(conn::serve(Rc::clone(&ctx), stream, peer, metrics_only));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The core's mailbox: hops for the organizations it owns, answers for its waiting requests,
/// cache invalidations, shutdown. A burst is handled in one go after one wake-up.
///
/// It ends once `closing` is raised (this core's connections are gone): the mailbox is closed, so
/// other cores' hops to it are refused at once, and what is still in it is answered 503, so no
/// request on another core waits for a core that has stopped.
async fn run_mailbox(ctx: Rc<CoreCtx>, mut mailbox: Mailbox, closing: Signal) {
    while let Either::Left(Some(msg)) = race(mailbox.recv(), closing.wait()).await {
        handle_message(&ctx, msg);
        while let Some(msg) = mailbox.try_recv() {
            handle_message(&ctx, msg);
        }
    }
    mailbox.close();
    while let Some(msg) = mailbox.try_recv() {
        refuse_message(&ctx, msg);
    }
}

/// A message that reaches a core that has stopped: hops are answered 503, the rest needs nothing.
fn refuse_message(ctx: &CoreCtx, msg: CoreMsg) {
    match msg {
        CoreMsg::Hop(Hop::Ingest { reply, .. }) => ctx.mesh.complete_one(
            reply,
            Outcome::Write {
                result: WriteResult::Refused(ApiError::Unavailable),
                rate: None,
            },
        ),
        CoreMsg::Hop(Hop::Query { reply, .. }) | CoreMsg::Hop(Hop::Peek { reply, .. }) => ctx
            .mesh
            .complete_one(reply, Outcome::Reply(ApiError::Unavailable.reply())),
        CoreMsg::OrgChanged {
            done: Some(done), ..
        } => {
            let _ = done.send(());
        }
        _ => {}
    }
}

fn handle_message(ctx: &Rc<CoreCtx>, msg: CoreMsg) {
    match msg {
        CoreMsg::Hop(Hop::Ingest { org, event, reply }) => {
            if let Some((result, rate)) = admit(ctx, org, event, reply) {
                ctx.mesh
                    .complete_one(reply, Outcome::Write { result, rate });
            }
        }
        CoreMsg::Hop(Hop::Query { org, query, reply }) => {
            if let Some(r) = forward_query(ctx, org, query, reply) {
                ctx.mesh.complete_one(reply, Outcome::Reply(r));
            }
        }
        CoreMsg::Hop(Hop::Peek { org, reply }) => {
            let rate = ctx.shard.borrow_mut().snapshot(&org);
            ctx.mesh.complete_one(reply, Outcome::Rate(rate));
        }
        CoreMsg::Complete(done) => {
            for c in done {
                ctx.waiters.complete(c.slot, c.outcome);
            }
        }
        CoreMsg::Settled(keys) => {
            let mut shard = ctx.shard.borrow_mut();
            for (key, outcome) in keys {
                shard.settle(key, outcome);
            }
        }
        CoreMsg::OrgChanged { org, done } => {
            ctx.keys.borrow_mut().org_changed(org);
            if let Some(done) = done {
                let _ = done.send(());
            }
        }
        CoreMsg::Shutdown => ctx.shutdown.set(),
    }
}

/// Owner side of an ingest: spend a token, check the dedup window, queue the event. `Some` is an
/// answer now; `None` means the store will answer `reply` after COMMIT.
fn admit(
    ctx: &CoreCtx,
    org: OrgInfo,
    event: NewEvent,
    reply: ReplyTo,
) -> Option<(WriteResult, Option<RateSnapshot>)> {
    debug_assert_eq!(
        owner_core(&org.id, ctx.mesh.cores()),
        ctx.core,
        "only the owner admits"
    );
    let decision = ctx
        .shard
        .borrow_mut()
        .admit(&org, event.dedup_id.as_deref());
    match decision {
        Admit::Limited {
            rate,
            retry_after_s,
        } => Some((
            WriteResult::Refused(ApiError::RateLimited {
                limit: org.limit,
                retry_after_s,
            }),
            Some(rate),
        )),
        Admit::Duplicate { rate, event_id } => Some((WriteResult::Duplicate(event_id), Some(rate))),
        Admit::Go { rate, dedup_key } => {
            let fast = ctx.store.ack_mode() == AckMode::Fast;
            let job = WriteJob {
                event,
                reply: (!fast).then_some(reply),
                rate: Some(rate),
                dedup: dedup_key.map(|k| (k, ctx.core)),
            };
            match ctx.store.write(job) {
                Ok(()) => fast.then_some((WriteResult::Queued, Some(rate))),
                Err(e) => {
                    let mut shard = ctx.shard.borrow_mut();
                    shard.undo(&org, dedup_key);
                    Some((WriteResult::Refused(e), Some(shard.snapshot(&org))))
                }
            }
        }
    }
}

/// Owner side of a query: read the bucket for the headers, hand the query to the store.
fn forward_query(ctx: &CoreCtx, org: OrgInfo, query: Query, reply: ReplyTo) -> Option<Reply> {
    let rate = ctx.shard.borrow_mut().snapshot(&org);
    match ctx.store.submit(StoreJob::Query {
        org,
        query,
        rate,
        reply,
    }) {
        Ok(()) => None,
        Err(e) => Some(e.reply().with_rate(Some(rate))),
    }
}

impl CoreCtx {
    fn owner(&self, org: &OrgInfo) -> CoreId {
        owner_core(&org.id, self.mesh.cores())
    }

    fn hop(&self, owner: CoreId, hop: Hop) -> Result<(), ApiError> {
        self.metrics.hop();
        self.mesh
            .hop(owner, hop)
            .map_err(|_| ApiError::Overloaded("owner core queue full"))
    }

    /// Ingest `event` through its organization's owner core.
    pub async fn ingest(
        self: &Rc<Self>,
        org: OrgInfo,
        event: NewEvent,
    ) -> (WriteResult, Option<RateSnapshot>) {
        let wait = self.waiters.register();
        let reply = wait.reply_to(self.core);
        let owner = self.owner(&org);
        if owner == self.core {
            if let Some(now) = admit(self, org, event, reply) {
                return now;
            }
        } else if let Err(e) = self.hop(owner, Hop::Ingest { org, event, reply }) {
            return (WriteResult::Refused(e), None);
        }
        match wait.await {
            Outcome::Write { result, rate } => (result, rate),
            other => (WriteResult::Refused(unexpected(other)), None),
        }
    }

    /// Run `query` in the store through its organization's owner core.
    pub async fn query(self: &Rc<Self>, org: OrgInfo, query: Query) -> Reply {
        let wait = self.waiters.register();
        let reply = wait.reply_to(self.core);
        let owner = self.owner(&org);
        if owner == self.core {
            if let Some(now) = forward_query(self, org, query, reply) {
                return now;
            }
        } else if let Err(e) = self.hop(owner, Hop::Query { org, query, reply }) {
            return e.reply();
        }
        match wait.await {
            Outcome::Reply(r) => r,
            other => unexpected(other).reply(),
        }
    }

    /// The organization's bucket, for the headers of an answer that never reached the owner.
    pub async fn rate(self: &Rc<Self>, org: OrgInfo) -> Option<RateSnapshot> {
        let owner = self.owner(&org);
        if owner == self.core {
            return Some(self.shard.borrow_mut().snapshot(&org));
        }
        let wait = self.waiters.register();
        let reply = wait.reply_to(self.core);
        self.hop(owner, Hop::Peek { org, reply }).ok()?;
        match wait.await {
            Outcome::Rate(r) => Some(r),
            _ => None,
        }
    }

    /// Hand an unauthenticated job to the store and wait for its reply.
    pub async fn ask_store(self: &Rc<Self>, job: impl FnOnce(ReplyTo) -> StoreJob) -> Reply {
        let wait = self.waiters.register();
        if let Err(e) = self.store.submit(job(wait.reply_to(self.core))) {
            return e.reply();
        }
        match wait.await {
            Outcome::Reply(r) => r,
            other => unexpected(other).reply(),
        }
    }

    /// The organization of the request's key: from this core's cache, else verified by the store.
    pub async fn authenticate(self: &Rc<Self>, req: &Request) -> Result<OrgInfo, ApiError> {
        let raw = auth::key_from_headers(
            req.head.api_key.as_deref(),
            req.head.authorization.as_deref(),
        )
        .ok_or(ApiError::Unauthorized(
            "missing API key; send X-API-Key: <key> or Authorization: Bearer <key>",
        ))?;
        let hash = self.keys.borrow().hash(raw);
        match self.keys.borrow_mut().get(hash) {
            Cached::Hit(org) => return Ok(org),
            Cached::Refused => return Err(ApiError::Unauthorized("invalid API key")),
            Cached::Miss => {}
        }
        self.metrics.auth_miss();
        let Some(key) = ApiKey::parse(raw) else {
            self.keys.borrow_mut().insert_refused(hash);
            return Err(ApiError::Unauthorized("invalid API key"));
        };
        // Single flight: while one request on this core verifies a key, the others with the same
        // key wait for its answer instead of each asking the store (and each running Argon2).
        let pending = self.verifying.borrow().get(&hash).cloned();
        if let Some(flight) = pending {
            flight.done.wait().await;
            match flight.result.borrow().clone() {
                Some(Ok(org)) => return Ok(org),
                Some(Err(e @ ApiError::Unauthorized(_))) => return Err(e),
                // The leader failed for its own reasons (a throttled address, an outage): try.
                _ => {}
            }
        }
        let flight = Rc::new(Flight::default());
        self.verifying.borrow_mut().insert(hash, Rc::clone(&flight));
        let result = self.verify(key, hash, req.peer).await;
        self.verifying.borrow_mut().remove(&hash);
        *flight.result.borrow_mut() = Some(result.clone());
        flight.done.set();
        result
    }

    /// Ask the store to verify a key this core doesn't know, and cache the answer.
    async fn verify(
        self: &Rc<Self>,
        key: ApiKey,
        hash: auth::KeyHash,
        peer: IpAddr,
    ) -> Result<OrgInfo, ApiError> {
        // A rotation that lands while the store verifies makes the answer stale: ask again.
        for _ in 0..3 {
            let epoch = self.keys.borrow().epoch();
            let wait = self.waiters.register();
            self.store.submit(StoreJob::Auth {
                key: key.clone(),
                peer,
                reply: wait.reply_to(self.core),
            })?;
            match wait.await {
                Outcome::Auth(Ok(org)) => {
                    if self.keys.borrow_mut().insert(hash, org, epoch) {
                        return Ok(org);
                    }
                }
                Outcome::Auth(Err(e)) => {
                    if matches!(e, ApiError::Unauthorized(_)) {
                        self.keys.borrow_mut().insert_refused(hash);
                    }
                    return Err(e);
                }
                other => return Err(unexpected(other)),
            }
        }
        tracing::warn!("key verification kept racing with changes to its organization");
        Err(ApiError::Unavailable)
    }
}

/// One verification in progress on a core, shared by the requests that wait for it.
#[derive(Default)]
pub struct Flight {
    done: Signal,
    result: RefCell<Option<Result<OrgInfo, ApiError>>>,
}

/// An answer of the wrong kind reached a waiting request: a bug, logged and answered 500.
fn unexpected(outcome: Outcome) -> ApiError {
    tracing::error!(?outcome, "unexpected answer kind");
    ApiError::Internal
}

/// Route a complete request to its handler. Returns the route (for metrics) and the reply.
pub async fn handle(ctx: &Rc<CoreCtx>, req: Request, metrics_only: bool) -> (Route, Reply) {
    let Ok(path) = std::str::from_utf8(&req.head.path) else {
        return (
            Route::NotFound,
            ApiError::NotFound("no such endpoint").reply(),
        );
    };
    let matched = match router::route(req.head.method, path) {
        Ok(m) if metrics_only && m.route != Route::Metrics => {
            return (
                Route::NotFound,
                ApiError::NotFound("only /metrics is served here").reply(),
            )
        }
        Ok(m) => m,
        Err(e) => {
            let route = if e.status() == 405 {
                Route::MethodNotAllowed
            } else {
                Route::NotFound
            };
            return (route, e.reply());
        }
    };
    let route = matched.route;
    let reply = match route {
        Route::Health => ops::health(),
        Route::Live => ops::live(),
        Route::Ready => ops::ready(ctx).await,
        Route::Metrics => ops::metrics(),
        Route::OpenApi => ops::openapi(),
        Route::KeysGenerate => admin::generate(ctx, &req).await,
        _ => match ctx.authenticate(&req).await {
            Err(e) => e.reply(),
            Ok(org) => {
                let reply = match route {
                    Route::EventsCreate => events::create(ctx, &req, org).await,
                    Route::EventGet => events::get(ctx, org, matched.param).await,
                    Route::EventRedeliver => events::redeliver(ctx, org, matched.param).await,
                    Route::Inbox => inbox::list(ctx, &req, org).await,
                    Route::Ack => inbox::ack(ctx, org, matched.param).await,
                    Route::AckBatch => inbox::ack_batch(ctx, &req, org).await,
                    Route::KeysInfo => ctx.query(org, Query::KeyInfo).await,
                    Route::KeysRotate => ctx.query(org, Query::Rotate).await,
                    Route::WebhookSet => admin::set_webhook(ctx, &req, org).await,
                    Route::WebhookDelete => ctx.query(org, Query::DeleteWebhook).await,
                    _ => unreachable!("unauthenticated routes are matched above"),
                };
                match reply {
                    // Answers refused before reaching the owner still carry the rate headers.
                    r if r.rate.is_none() => {
                        let rate = ctx.rate(org).await;
                        r.with_rate(rate)
                    }
                    r => r,
                }
            }
        },
    };
    (route, reply)
}

/// 415 unless the request says its body is JSON (`application/json` or `application/*+json`,
/// parameters such as `charset` allowed).
pub fn require_json(req: &Request) -> Result<(), ApiError> {
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

/// A path id: any UUID, else 422 naming `field`.
pub fn path_uuid(param: Option<&str>, field: &'static str) -> Result<uuid::Uuid, ApiError> {
    param
        .and_then(crate::ids::parse_uuid)
        .ok_or_else(|| ApiError::validation(field, format!("{field} must be a UUID")))
}

/// Validate a JSON body as an object and hand it to `f`; 400 for anything that is not.
pub fn with_body<R>(
    ctx: &CoreCtx,
    body: &[u8],
    f: impl FnOnce(&json::Body<'_>) -> Result<R, ApiError>,
) -> Result<R, ApiError> {
    match ctx.parser.borrow_mut().with_object(body, f) {
        Ok(r) => r,
        Err(json::JsonError::Invalid(msg)) => Err(ApiError::InvalidJson(msg)),
        Err(json::JsonError::NotAnObject) => Err(ApiError::InvalidJson(
            "request body must be a JSON object".into(),
        )),
    }
}

/// A required-or-optional string field of 1..=255 characters without NUL.
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
            if chars == 0 || chars > 255 {
                Err(ApiError::validation(
                    field,
                    format!("{field} must be 1 to 255 characters, got {chars}"),
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
