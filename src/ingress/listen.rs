//! The listeners and the core threads: one SO_REUSEPORT listener per core (bound before any core
//! starts, so port 0 works), one thread pinned per core running its own monoio runtime (io_uring,
//! or epoll), and each core's accept loop.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::conn;
use super::core::{run_mailbox, CoreCtx};
use super::node::Node;
use super::response::DateCache;
use crate::auth::flight::Flights;
use crate::auth::KeyCache;
use crate::config::{
    Config, IoDriver, ACCEPT_BACKOFF, ACCEPT_ERROR_LOG_EVERY, LISTEN_BACKLOG,
    METRICS_CONNECTIONS_EXTRA, PORT_RELEASE_WAIT, RATE_REPORT_EVERY, URING_ENTRIES,
};
use crate::deadline::Deadlines;
use crate::flow::sink::StoreQueues;
use crate::ids::CoreId;
use crate::json;
use crate::metrics::Metrics;
use crate::shard::mesh::{Mailbox, Mesh, Waiters};
use crate::shard::owner::Owner;
use crate::shutdown::{race, Either, Signal};

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
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Fail when another process already listens on `addr`: SO_REUSEPORT would otherwise let this
/// server bind beside it, and the kernel would split connections between the two (a forgotten
/// old server answering half the requests). A plain bind (SO_REUSEADDR, which ignores TIME_WAIT,
/// but not SO_REUSEPORT) tells; it is closed at once. A server killed a moment ago may hold its
/// port a little longer than its process lives (io_uring releases the files of a dead ring from a
/// kernel worker), so a refusal is confirmed over `PORT_RELEASE_WAIT` first.
fn ensure_unused(addr: SocketAddr) -> io::Result<()> {
    use socket2::{Domain, Socket, Type};
    if addr.port() == 0 {
        return Ok(());
    }
    let deadline = std::time::Instant::now() + PORT_RELEASE_WAIT;
    loop {
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        probe.set_reuse_address(true)?;
        match probe.bind(&addr.into()) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                if std::time::Instant::now() >= deadline {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("{addr} is in use by another process (another triggers server?)"),
                    ));
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Bind one SO_REUSEPORT listener per core on `config.listen` (the first decides the port when
/// it is 0), and the metrics listener.
pub fn bind(config: &Config) -> io::Result<Listeners> {
    ensure_unused(config.listen)?;
    if let Some(addr) = config.metrics_listen {
        ensure_unused(addr)?;
    }
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
}

/// Start one pinned thread per core. Each returns when the core has shut down and drained.
pub fn start(
    config: Arc<Config>,
    mesh: Mesh,
    store: StoreQueues,
    metrics: Arc<Metrics>,
    node: Node,
    parts: Vec<CoreParts>,
) -> io::Result<Vec<std::thread::JoinHandle<()>>> {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut threads = Vec::new();
    for part in parts {
        let (config, mesh, store) = (Arc::clone(&config), mesh.clone(), store.clone());
        let metrics = Arc::clone(&metrics);
        let node = node.clone();
        // Alive from before its thread starts, so /health/live never sees a core that has not
        // been scheduled yet as dead; dropped in the thread, it marks the core dead if the
        // thread ends other than by shutdown (a panic).
        use std::os::fd::AsRawFd;
        let fds = std::iter::once(part.listener.as_raw_fd())
            .chain(part.metrics_listener.as_ref().map(|l| l.as_raw_fd()))
            .collect();
        let alive = node.liveness.guard(part.core.0, fds);
        let handle = std::thread::Builder::new()
            .name(format!("ingress-{}", part.core.0))
            .spawn(move || {
                let _alive = alive;
                if config.ingress_cores <= cpus {
                    pin_to_cpu(part.core.0);
                }
                if config.ingress_slice_us > 0 {
                    if let Err(e) = set_slice(config.ingress_slice_us) {
                        tracing::debug!(error = %e, "could not shorten the ingress thread's slice");
                    }
                }
                if let Err(e) = run_core(config, mesh, store, metrics, node, part) {
                    tracing::error!(error = %e, "ingress core failed");
                    std::process::exit(1);
                }
            })?;
        threads.push(handle);
    }
    Ok(threads)
}

/// The CPUs the calling thread may run on (its affinity mask, which `taskset` or a container's
/// cpuset narrows), in order; `None` when the mask can't be read.
fn allowed_cpus() -> Option<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; CPU_ISSET reads within it for cpu < CPU_SETSIZE, and
    // sched_getaffinity(0, ...) reads the calling thread's mask.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        Some(
            (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| libc::CPU_ISSET(c, &set))
                .collect(),
        )
    }
}

/// Pin the calling thread to the `nth` CPU it may run on, so core 0 is the first allowed CPU,
/// not CPU 0; left as it is when there is no such CPU.
fn pin_to_cpu(nth: usize) {
    let Some(cpu) = allowed_cpus().and_then(|cpus| cpus.get(nth).copied()) else {
        return;
    };
    // SAFETY: cpu_set_t is plain data; CPU_SET writes within it for cpu < CPU_SETSIZE (an
    // allowed CPU is), and sched_setaffinity(0, ...) only affects the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::debug!(cpu, "could not pin ingress thread");
        }
    }
}

/// `struct sched_attr` as `sched_setattr(2)` takes it (its first version, 48 bytes).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// `SCHED_FLAG_RESET_ON_FORK`, the one flag kept from what the thread had.
const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;

/// The calling thread's scheduling attributes.
fn sched_attr() -> io::Result<SchedAttr> {
    let mut attr = SchedAttr::default();
    let size = std::mem::size_of::<SchedAttr>() as libc::c_uint;
    // SAFETY: the kernel writes at most `size` bytes into `attr`, a plain struct of that size.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut SchedAttr,
            size,
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(attr)
}

/// Give the calling thread a scheduler time slice of `us` microseconds, its policy and nice value
/// kept. On EEVDF (Linux 6.12+) a fair-class thread's slice sets how soon it runs when it wakes:
/// an ingress core, woken by each request's bytes and each commit's answers and busy for a few
/// microseconds each time, then runs ahead of PostgreSQL's and a load generator's longer turns
/// instead of waiting up to a whole default slice (BENCHMARKS.md 2026-12-05: at 2,500 events/s
/// p50 −8 %; at peak the extra preemptions cost 5 % more server CPU, so it is not the default).
/// Older kernels ignore it; only the fair policies are changed.
fn set_slice(us: u64) -> io::Result<()> {
    let mut attr = sched_attr()?;
    if attr.policy != libc::SCHED_OTHER as u32 && attr.policy != libc::SCHED_BATCH as u32 {
        return Ok(());
    }
    attr.size = std::mem::size_of::<SchedAttr>() as u32;
    attr.flags &= SCHED_FLAG_RESET_ON_FORK;
    attr.runtime = us * 1000;
    // SAFETY: `attr` is a valid sched_attr of the size it names; pid 0 is the calling thread.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn run_core(
    config: Arc<Config>,
    mesh: Mesh,
    store: StoreQueues,
    metrics: Arc<Metrics>,
    node: Node,
    part: CoreParts,
) -> io::Result<()> {
    let core = part.core;
    // Completions are finished by the kernel's task work; with COOP_TASKRUN it runs when this
    // thread next enters the kernel (it does, at every loop turn) instead of interrupting it with
    // an IPI per completion (`--uring-coop-taskrun`). Kernels before 5.19 refuse the flag: the
    // ring is then made without it.
    let uring = || {
        let build = |coop: bool| {
            let mut flags = io_uring::IoUring::builder();
            if coop {
                flags.setup_coop_taskrun();
            }
            monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .with_entries(URING_ENTRIES)
                .uring_builder(flags)
                .enable_timer()
                .build()
        };
        if config.uring_coop_taskrun {
            if let Ok(rt) = build(true) {
                return Ok((rt, "io_uring (cooperative task running)"));
            }
        }
        build(false).map(|rt| (rt, "io_uring"))
    };
    let epoll = || {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
    };
    match config.io_driver {
        IoDriver::Uring => {
            let (mut rt, name) =
                uring().map_err(|e| io::Error::new(e.kind(), format!("io_uring: {e}")))?;
            log_driver(core, name);
            rt.block_on(serve(config, mesh, store, metrics, node, part))
        }
        IoDriver::Epoll => {
            log_driver(core, "epoll");
            epoll()?.block_on(serve(config, mesh, store, metrics, node, part))
        }
        IoDriver::Auto => match uring() {
            Ok((mut rt, name)) => {
                log_driver(core, name);
                rt.block_on(serve(config, mesh, store, metrics, node, part))
            }
            Err(e) => {
                if core.0 == 0 {
                    tracing::warn!(error = %e, "io_uring unavailable; using epoll");
                }
                log_driver(core, "epoll");
                epoll()?.block_on(serve(config, mesh, store, metrics, node, part))
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
    store: StoreQueues,
    all_metrics: Arc<Metrics>,
    node: Node,
    part: CoreParts,
) -> io::Result<()> {
    let listener = monoio::net::TcpListener::from_std(part.listener)?;
    let metrics_listener = part
        .metrics_listener
        .map(monoio::net::TcpListener::from_std)
        .transpose()?;
    let metrics = all_metrics.core(part.core.0);
    let ctx = Rc::new(CoreCtx {
        core: part.core,
        owner: Owner::new(
            part.core,
            config.dedup_window_entries,
            store.clone(),
            mesh.clone(),
            Arc::clone(&metrics),
        ),
        keys: RefCell::new(KeyCache::new(config.auth_cache_entries)),
        flights: Flights::default(),
        waiters: Rc::new(Waiters::default()),
        deadlines: Rc::new(Deadlines::default()),
        parser: RefCell::new(json::Parser::default()),
        metrics,
        all_metrics,
        shutdown: Signal::default(),
        connections: Cell::new(0),
        drained: Signal::default(),
        date: RefCell::new(DateCache::default()),
        bodies: node.bodies,
        liveness: node.liveness,
        access: config
            .access_log
            .then(|| super::access::AccessLog::new(config.log_format)),
        config,
        mesh,
        store,
    });
    let closing = Signal::default();
    let mailbox = monoio::spawn(run_mailbox(Rc::clone(&ctx), part.mailbox, closing.clone()));
    let sweeper = monoio::spawn(Rc::clone(&ctx.deadlines).sweep(closing.clone()));
    let hops = monoio::spawn({
        let (ctx, stop) = (Rc::clone(&ctx), closing.clone());
        async move { ctx.owner.send_hops(stop).await }
    });
    if let Some(l) = metrics_listener {
        monoio::spawn(accept_loop(Rc::clone(&ctx), l, true));
    }
    let ticker = monoio::spawn(tick(Rc::clone(&ctx)));
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
    if let Some(log) = &ctx.access {
        log.flush();
    }
    // The last spend goes to the cluster's buckets while the store still takes jobs.
    ctx.owner.report_rates(true);
    // The mailbox and ticker tasks must end before the runtime goes: a task left parked is not
    // dropped with it, and would keep this core's store handle (and so the store) alive.
    ticker.await;
    closing.set();
    hops.await;
    mailbox.await;
    sweeper.await;
    Ok(())
}

/// The core's periodic work until shutdown, every `RATE_REPORT_EVERY` (ten wake-ups a second, so
/// an idle core stays idle): rate-limit spend not yet reported goes to the cluster (what is due at
/// once went from the admission), and access lines of a quiet core are written out.
async fn tick(ctx: Rc<CoreCtx>) {
    while let Either::Left(()) =
        race(monoio::time::sleep(RATE_REPORT_EVERY), ctx.shutdown.wait()).await
    {
        ctx.owner.report_rates(false);
        if let Some(log) = &ctx.access {
            log.flush_stale();
        }
    }
}

/// The accept errors of one listener: logged when they start and then at most every
/// `ACCEPT_ERROR_LOG_EVERY` while they go on, with how many there were (a core out of file
/// descriptors fails an accept every `ACCEPT_BACKOFF`: 20 lines a second otherwise). No line
/// for 10 s: they ended.
#[derive(Default)]
struct AcceptErrors {
    /// Failed accepts since the last line.
    unlogged: u64,
    /// When the last line was written, while they go on.
    logged: Option<Instant>,
}

impl AcceptErrors {
    /// An accept failed at `now`: how many failed since the last line, if a line is due.
    fn failed(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        if self
            .logged
            .is_some_and(|t| now.duration_since(t) < ACCEPT_ERROR_LOG_EVERY)
        {
            return None;
        }
        self.logged = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }

    /// An accept worked: the errors ended, and the next one starts a new line at once.
    fn accepted(&mut self) {
        self.logged = None;
        self.unlogged = 0;
    }
}

async fn accept_loop(ctx: Rc<CoreCtx>, listener: monoio::net::TcpListener, metrics_only: bool) {
    let mut errors = AcceptErrors::default();
    loop {
        let accepted = match race(listener.accept(), ctx.shutdown.wait()).await {
            Either::Left(r) => r,
            Either::Right(()) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                errors.accepted();
                // Scrapes have room of their own: a node whose API connections are all taken
                // is still seen.
                let limit = ctx.config.connections_per_core_max
                    + if metrics_only {
                        METRICS_CONNECTIONS_EXTRA
                    } else {
                        0
                    };
                if ctx.connections.get() >= limit {
                    monoio::spawn(conn::refuse(Rc::clone(&ctx), stream));
                    continue;
                }
                monoio::spawn(conn::serve(Rc::clone(&ctx), stream, peer, metrics_only));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                if let Some(failed) = errors.failed(Instant::now()) {
                    tracing::warn!(
                        error = %e,
                        failed,
                        "accept failed; backing off"
                    );
                }
                monoio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{allowed_cpus, pin_to_cpu, sched_attr, set_slice, AcceptErrors};
    use crate::config::{ACCEPT_BACKOFF, ACCEPT_ERROR_LOG_EVERY};
    use std::time::{Duration, Instant};

    #[test]
    fn accept_errors_are_logged_when_they_start_then_seldom_with_the_count() {
        let mut errors = AcceptErrors::default();
        let start = Instant::now();
        // A core out of descriptors fails an accept every backoff: 20 a second.
        let at = |i: u32| start + ACCEPT_BACKOFF * i;
        let per_line = (ACCEPT_ERROR_LOG_EVERY.as_millis() / ACCEPT_BACKOFF.as_millis()) as u32;
        let lines: Vec<(u32, u64)> = (0..3 * per_line + 5)
            .filter_map(|i| errors.failed(at(i)).map(|n| (i, n)))
            .collect();
        assert_eq!(
            lines,
            [
                (0, 1),
                (per_line, u64::from(per_line)),
                (2 * per_line, u64::from(per_line)),
                (3 * per_line, u64::from(per_line)),
            ],
            "the first error, then one line a period with the count"
        );
        // Once an accept works, the next error is a line at once, counted afresh.
        errors.accepted();
        let later = at(3 * per_line + 6);
        assert_eq!(errors.failed(later), Some(1));
        assert_eq!(errors.failed(later + Duration::from_millis(1)), None);
    }

    fn allowed() -> Vec<usize> {
        allowed_cpus().expect("the affinity mask is readable")
    }

    #[test]
    fn a_core_is_pinned_to_the_nth_cpu_it_may_use() {
        let before = allowed();
        let last = before.len() - 1;
        let pinned = std::thread::spawn(move || {
            pin_to_cpu(last);
            allowed()
        })
        .join()
        .unwrap();
        assert_eq!(pinned, vec![before[last]]);
        // Past the allowed CPUs: left as it was.
        let unpinned = std::thread::spawn(move || {
            pin_to_cpu(last + 1);
            allowed()
        })
        .join()
        .unwrap();
        assert_eq!(unpinned, before);
    }

    #[test]
    fn a_short_slice_is_the_calling_threads_alone_and_keeps_its_nice_value() {
        let mine = sched_attr().expect("sched_getattr");
        let (before, after) = std::thread::spawn(|| {
            // SAFETY: setpriority on the calling thread's id; raising nice needs no privilege.
            let r =
                unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 3) };
            assert_eq!(r, 0);
            let before = sched_attr().expect("sched_getattr");
            set_slice(250).expect("sched_setattr");
            (before, sched_attr().expect("sched_getattr"))
        })
        .join()
        .unwrap();
        assert_eq!((before.nice, after.nice), (3, 3));
        assert_eq!(after.policy, before.policy);
        // Kernels that report a fair thread's slice (6.12+) show the one set.
        if before.runtime != 0 {
            assert_eq!(after.runtime, 250_000);
        }
        let still = sched_attr().expect("sched_getattr");
        assert_eq!((still.runtime, still.nice), (mine.runtime, mine.nice));
    }
}
