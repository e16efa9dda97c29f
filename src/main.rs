//! `triggers`: parse the configuration, bind the listeners, run the server until SIGTERM or SIGINT.

use std::io::Write;
use std::process::ExitCode;

use triggers::config::{Command, Config};
use triggers::ingress::listen;
use triggers::server;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    no_transparent_huge_pages();
    let (command, config) =
        match Config::from_args_and_env(std::env::args().skip(1), std::env::vars()) {
            Ok(parsed) => parsed,
            Err(e) => {
                triggers::logging::to_stderr(&e);
                return ExitCode::from(2);
            }
        };
    let result = match command {
        Command::Help => {
            let _ = std::io::stdout().write_all(Config::help().as_bytes());
            Ok(())
        }
        Command::Version => {
            let _ = writeln!(std::io::stdout(), "triggers {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Migrate => {
            triggers::logging::init(config.log_format, &config.log).and_then(|()| migrate(&config))
        }
        Command::Probe => probe(&config),
        Command::Serve => {
            triggers::logging::init(config.log_format, &config.log).and_then(|()| serve(config))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "triggers stopped");
            triggers::logging::to_stderr(&e);
            ExitCode::FAILURE
        }
    }
}

/// Transparent huge pages off for this process unless `MIMALLOC_ALLOW_THP` is set (the
/// allocator's own switch, read before `main`: `0` turns them off from the first allocation,
/// `1` keeps them). The allocator asks for them on its arenas, and the first touch of each 2 MiB
/// page zeroes all of it: with them, RSS was 26 MB idle and 50 – 60 MB under load, without, 11
/// (7 with `MIMALLOC_ALLOW_THP=0`) and 16 – 24 MB, at the same speed within the runs' spread
/// (BENCHMARKS.md, twenty-third session).
fn no_transparent_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: PR_SET_THP_DISABLE takes no pointer; it sets a flag of this process.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
}

/// `GET /health/live` from the server (an unspecified address is asked on loopback); Ok on 200.
/// Asked first on `--metrics-listen`, which has room of its own when the API's connections are
/// all taken (a flood must not get a live node restarted), then on `--listen` (a probe not told
/// where the metrics listener is, or one with nothing there).
fn probe(config: &Config) -> Result<(), String> {
    let mut failed = Vec::new();
    for addr in config.metrics_listen.into_iter().chain([config.listen]) {
        match probe_at(addr) {
            Ok(()) => return Ok(()),
            Err(e) => failed.push(e),
        }
    }
    Err(failed.join("; "))
}

fn probe_at(mut addr: std::net::SocketAddr) -> Result<(), String> {
    use std::io::Read;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
    use std::time::Duration;
    if addr.ip().is_unspecified() {
        let ip: IpAddr = match addr {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        };
        addr.set_ip(ip);
    }
    let patience = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&addr, patience)
        .map_err(|e| format!("probe: cannot connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(patience))
        .and_then(|()| stream.set_write_timeout(Some(patience)))
        .and_then(|()| {
            stream
                .write_all(b"GET /health/live HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
        })
        .map_err(|e| format!("probe: {addr}: {e}"))?;
    let mut head = [0u8; 12];
    stream
        .read_exact(&mut head)
        .map_err(|e| format!("probe: {addr}: no answer: {e}"))?;
    match &head[..] {
        b"HTTP/1.1 200" => Ok(()),
        other => Err(format!(
            "probe: {addr}/health/live answered {}",
            String::from_utf8_lossy(other)
        )),
    }
}

fn migrate(config: &Config) -> Result<(), String> {
    let applied = server::runtime(config)?.block_on(server::migrate(config))?;
    tracing::info!(applied = applied.len(), "migrations up to date");
    Ok(())
}

fn serve(mut config: Config) -> Result<(), String> {
    triggers::logging::install_panic_hook();
    match server::raise_open_files_limit() {
        Ok((before, after)) => {
            tracing::info!(before, after, "open files limit");
            fit_connections(&mut config, after);
        }
        Err(e) => tracing::warn!(error = %e, "could not raise the open files limit"),
    }
    let listeners =
        listen::bind(&config).map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let running = server::run(config, listeners, signals())?;
    running.finish();
    Ok(())
}

/// Lower the connections per core to what the open files limit holds beside the descriptors
/// the node keeps for its database and deliveries (`Config::connections_within`), and say so.
fn fit_connections(config: &mut Config, open_files: u64) {
    let per_core = config.connections_within(open_files);
    if per_core < config.connections_per_core_max {
        tracing::warn!(
            open_files,
            reserved = config.descriptors_reserved(),
            connections_per_core = per_core,
            "connections per core lowered to fit the open files limit (raise its hard limit)"
        );
        config.connections_per_core_max = per_core;
    }
}

/// Resolves at the first SIGTERM or SIGINT. Its handlers are installed when the server first
/// polls it, before it reaches the database, so an early signal still drains. SIGHUP is logged
/// and otherwise ignored, as a reload with nothing to reload (the configuration is read at start
/// only): its default action ended the process at once, without the drain, so logrotate's
/// `postrotate`, an `ExecReload=kill -HUP` or the closing of the terminal that started the
/// server cut its connections and, in fast-ack mode, lost the events it had queued.
async fn signals() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut terminate), Ok(mut interrupt), Ok(mut hangup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("could not install signal handlers; stop the server with SIGKILL");
        return std::future::pending().await;
    };
    let name = loop {
        tokio::select! {
            _ = terminate.recv() => break "SIGTERM",
            _ = interrupt.recv() => break "SIGINT",
            Some(()) = hangup.recv() => tracing::info!(
                signal = "SIGHUP",
                "signal received and ignored: the configuration is read at start only (restart \
                 to change it); SIGTERM or SIGINT stops the server"
            ),
        }
    };
    tracing::info!(signal = name, "signal received");
}
