//! Test harness: the real `triggers` binary on a free port, a real PostgreSQL over a real socket,
//! and a small HTTP/1.1 client over a real TCP connection (raw, so tests can also send what no
//! well-behaved client would).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The test database URL: `TEST_DATABASE_URL`, else the project's private cluster
/// (started by `scripts/postgres.sh` if needed) with a `triggers_test` database.
pub fn database_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("TEST_DATABASE_URL") {
            return url;
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/postgres.sh");
        let out = Command::new("bash").arg(script).output().expect("run scripts/postgres.sh");
        assert!(out.status.success(), "scripts/postgres.sh failed: {}", String::from_utf8_lossy(&out.stderr));
        let base = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let url = base.rsplit_once('/').unwrap().0.to_string() + "/triggers_test";
        // Create the test database if missing (never dropped here: other test binaries share it).
        let status = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "psql '{base}' -qAtc \"SELECT 1 FROM pg_database WHERE datname='triggers_test'\" | grep -q 1 || psql '{base}' -qc 'CREATE DATABASE triggers_test'"
            ))
            .status()
            .unwrap();
        assert!(status.success());
        url
    })
    .clone()
}

/// The first 48 bits of a UUIDv7 of this millisecond, as text (`xxxxxxxx-xxxx`): ids made with
/// it fall in today's partition and are this run's own (the test database outlives runs).
pub fn v7_prefix_now() -> String {
    let ms = std::time::UNIX_EPOCH.elapsed().unwrap().as_millis();
    let hex = format!("{ms:012x}");
    format!("{}-{}", &hex[..8], &hex[8..])
}

/// A fresh, empty database of its own (dropped first if a previous run left it), for a test
/// whose server must not share its due deliveries with the other tests' servers (they act as
/// one cluster on the shared database). The server's start migrates it.
pub async fn own_database(name: &str) -> String {
    let admin = db().await;
    for statement in [
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name}"),
    ] {
        admin.batch_execute(&statement).await.unwrap();
    }
    let base = database_url();
    format!("{}/{name}", &base[..base.rfind('/').unwrap()])
}

/// A direct connection to the test database, for checking what the server wrote.
pub async fn db() -> tokio_postgres::Client {
    db_at(&database_url()).await
}

/// A direct connection to another database (one of [`own_database`]).
pub async fn db_at(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to test database");
    tokio::spawn(conn);
    client
}

/// The one number a query answers (a count, a sum), read on `client`.
pub async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// In the database at `url`, the first row inserted into `table` is refused as a deadlock's
/// victim would be (40P01); the sequence counts outside the transaction, so a rerun goes
/// through.
pub async fn deadlock_victim_once(url: &str, table: &str) {
    first_insert_fails(
        url,
        table,
        "RAISE EXCEPTION 'deadlock detected' USING ERRCODE = '40P01'",
    )
    .await;
}

/// `LD_PRELOAD=` Debian's libfaketime, for a server whose clock is set apart with `FAKETIME=`
/// (preloaded into the server itself: the `faketime` command forks, and killing it would leave
/// the server running); `None`, and the test says it is skipped, where it is not installed.
pub fn libfaketime() -> Option<String> {
    let lib = format!(
        "/usr/lib/{}-linux-gnu/faketime/libfaketime.so.1",
        std::env::consts::ARCH
    );
    if std::path::Path::new(&lib).exists() {
        Some(format!("LD_PRELOAD={lib}"))
    } else {
        eprintln!("SKIPPED: libfaketime (Debian's faketime package) is not installed");
        None
    }
}

/// In the database at `url`, the backend inserting the first row into `table` is terminated
/// (as `pg_terminate_backend` by an administrator or a pooler ends a session: 57P01, then the
/// socket closes) before its transaction can commit.
pub async fn backend_ends_once(url: &str, table: &str) {
    first_insert_fails(
        url,
        table,
        "PERFORM pg_terminate_backend(pg_backend_pid()); PERFORM pg_sleep(5)",
    )
    .await;
}

/// The first row inserted into `table` runs `action` (PL/pgSQL) instead of going in; later ones
/// go in. Created under the partition maintainer's lock (its ATTACH copies a partitioned
/// table's triggers).
async fn first_insert_fails(url: &str, table: &str, action: &str) {
    let lock = triggers::store::retention::LOCK_ID;
    db_at(url)
        .await
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({lock}); \
             CREATE SEQUENCE first_inserts; \
             CREATE FUNCTION first_insert_fails() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
               IF nextval('first_inserts') = 1 THEN {action}; END IF; RETURN NEW; END $$; \
             CREATE TRIGGER first_insert_fails BEFORE INSERT ON {table} \
               FOR EACH ROW EXECUTE FUNCTION first_insert_fails(); \
             COMMIT;"
        ))
        .await
        .unwrap();
}

/// A PostgreSQL cluster of the test's own whose whole data directory, WAL included, is on a small
/// disk that can be filled for real (`scripts/small-disk.sh`: a tmpfs in a mount namespace). It
/// stops, and the disk goes, when this is dropped.
pub struct SmallDisk {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: BufReader<std::process::ChildStdout>,
    /// The cluster's `postgres` database.
    pub url: String,
    dir: std::path::PathBuf,
}

impl SmallDisk {
    /// A disk of `size_mb` MB; `None`, and the test says it is skipped, where mount namespaces
    /// are not allowed.
    pub fn start(size_mb: u32) -> Option<SmallDisk> {
        Self::start_with(size_mb, false)
    }

    /// The same, and PostgreSQL serves TLS with the tests' certificate for `localhost` and
    /// `127.0.0.1` (src/delivery/testdata), taking the role `triggers_tls` over TLS only.
    pub fn start_tls(size_mb: u32) -> Option<SmallDisk> {
        Self::start_with(size_mb, true)
    }

    fn start_with(size_mb: u32, tls: bool) -> Option<SmallDisk> {
        // Installs PostgreSQL where it is missing.
        database_url();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("triggers-small-disk-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut command = Command::new("bash");
        if tls {
            command.env(
                "SMALL_DISK_TLS",
                concat!(env!("CARGO_MANIFEST_DIR"), "/src/delivery/testdata"),
            );
        }
        let mut child = command
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/small-disk.sh"
            ))
            .arg(&dir)
            .arg(port.to_string())
            .arg(size_mb.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run scripts/small-disk.sh");
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let Some(url) = line.trim().strip_prefix("ready ") else {
            let status = child.wait().unwrap();
            assert_eq!(
                status.code(),
                Some(3),
                "scripts/small-disk.sh failed: {status}"
            );
            eprintln!(
                "SKIPPED: mount namespaces (for a disk of the test's own) are not allowed here"
            );
            return None;
        };
        Some(SmallDisk {
            url: url.to_string(),
            child,
            stdin,
            stdout,
            dir,
        })
    }

    /// Create database `name` on the cluster; its URL.
    pub async fn database(&self, name: &str) -> String {
        db_at(&self.url)
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        format!("{}/{name}", &self.url[..self.url.rfind('/').unwrap()])
    }

    /// `ALTER SYSTEM SET` each `(name, value)` (one statement a message: ALTER SYSTEM is refused
    /// in a batch's implicit transaction), then reload the configuration. The reload is a
    /// signal: settings PostgreSQL reads at reload reach sessions a moment later.
    pub async fn set_system(&self, settings: &[(&str, &str)]) {
        let admin = db_at(&self.url).await;
        for (name, value) in settings {
            admin
                .batch_execute(&format!("ALTER SYSTEM SET {name} = '{value}'"))
                .await
                .unwrap();
        }
        admin
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .unwrap();
    }

    fn command(&mut self, command: &str) -> String {
        use std::io::Write;
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_string()
    }

    /// Fill the disk to its last byte.
    pub fn fill(&mut self) {
        let answer = self.command("fill");
        assert_eq!(answer, "full 0", "the disk did not fill");
    }

    /// Free the disk, and start PostgreSQL again if the full disk stopped it (what an operator
    /// does); whether it had to be started (`freed restarted`) or not (`freed running`).
    pub fn free(&mut self) -> String {
        self.command("free")
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // End of input: PostgreSQL stops, the namespace and its disk go.
        drop(self.stdin.take());
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A node on a database of its own (see [`own_database`]) that allows private targets, with an
/// organization whose webhook is a receiver answering 200 at `/hook`.
pub struct WebhookNode {
    /// The database's URL.
    pub url: String,
    pub server: Server,
    pub receiver: Receiver,
    /// The organization's API key.
    pub key: String,
}

impl WebhookNode {
    pub async fn start(database: &str) -> WebhookNode {
        let url = own_database(database).await;
        // A process: its log is its own (tests read it to see that a fault was met).
        let server = Server::process_with_db(&["--allow-private-webhooks"], &url);
        let receiver = Receiver::start(|_, _| Answer::status(200)).await;
        let (key, _) = new_org(server.addr, "pro").await;
        set_webhook(server.addr, &key, &receiver.url("/hook")).await;
        WebhookNode {
            url,
            server,
            receiver,
            key,
        }
    }
}

/// How a test server runs.
enum Kind {
    /// `triggers::server::run` in this process, on its own threads; stopped through `stop`.
    InProcess {
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
        hooks: triggers::server::TestHooks,
    },
    /// The real binary, for what needs a process: SIGKILL, SIGTERM, a restart on the same port.
    Process(Option<Child>),
}

/// A running server.
pub struct Server {
    kind: Kind,
    /// The API address.
    pub addr: SocketAddr,
    /// The metrics address.
    pub metrics_addr: Option<SocketAddr>,
    /// Every log line so far (in-process servers share the test binary's log).
    pub log: Arc<Mutex<Vec<String>>>,
    args: Vec<String>,
    database_url: String,
    /// A process's stdout pipe (its read end) and the switch that stops the test reading it.
    stdout: Option<(i32, Arc<std::sync::atomic::AtomicBool>)>,
}

/// The flags every test server gets before its own.
fn base_args(listen: SocketAddr) -> Vec<String> {
    [
        "--listen",
        &listen.to_string(),
        "--metrics-listen",
        "127.0.0.1:0",
        "--ingress-cores",
        "2",
        "--store-threads",
        "2",
        "--log",
        "info",
        // Tests make many organizations from one address; tests of the limit set their own.
        "--key-ops-per-minute",
        "1000000",
        "--key-ops-per-minute-node",
        "1000000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl Server {
    /// Start in this process with the defaults tests want plus `args`, on a free port.
    pub fn start(args: &[&str]) -> Server {
        Self::start_with_db(args, &database_url())
    }

    /// Start in this process against another database URL (a proxy, say).
    pub fn start_with_db(args: &[&str], database_url: &str) -> Server {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let mut all = base_args("127.0.0.1:0".parse().unwrap());
        all.extend(args.iter().cloned());
        let env = vec![("DATABASE_URL".to_string(), database_url.to_string())];
        let (_, config) = triggers::config::Config::from_args_and_env(all, env)
            .unwrap_or_else(|e| panic!("test server configuration: {e}"));
        let log = capture_log();
        let listeners = triggers::ingress::listen::bind(&config).expect("bind test server");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("test-server".into())
            .spawn(move || {
                let shutdown = async move {
                    let _ = stop_rx.await;
                };
                match triggers::server::run(config, listeners, shutdown) {
                    Ok(running) => {
                        let ready = (
                            running.api_addr(),
                            running.metrics_addr(),
                            running.test_hooks(),
                        );
                        let _ = ready_tx.send(Ok(ready));
                        running.finish();
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .expect("spawn test server");
        let (addr, metrics_addr, hooks) = match ready_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(addrs)) => addrs,
            Ok(Err(e)) => panic!("server did not start: {e}"),
            Err(_) => panic!("server did not start within 60 s"),
        };
        Server {
            kind: Kind::InProcess {
                stop: Some(stop_tx),
                thread: Some(thread),
                hooks,
            },
            addr,
            metrics_addr,
            log,
            args,
            database_url: database_url.to_string(),
            stdout: None,
        }
    }

    /// Start the real binary (for SIGKILL, SIGTERM and restarts) with the defaults plus `args`.
    pub fn process(args: &[&str]) -> Server {
        Self::process_with_db(args, &database_url())
    }

    /// The real binary on a database of the test's own (see [`own_database`]).
    pub fn process_with_db(args: &[&str], database_url: &str) -> Server {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        Self::spawn(
            &[],
            args,
            database_url.to_string(),
            "127.0.0.1:0".parse().unwrap(),
        )
    }

    /// The real binary run by `wrapper` (a command that ends by running the rest of its
    /// arguments: `unshare … sh -c '…; exec "$@"'`), with the defaults plus `args`, on
    /// `database_url`.
    pub fn process_wrapped(wrapper: &[&str], args: &[&str], database_url: &str) -> Server {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        Self::spawn(
            wrapper,
            args,
            database_url.to_string(),
            "127.0.0.1:0".parse().unwrap(),
        )
    }

    fn spawn(
        wrapper: &[&str],
        args: Vec<String>,
        database_url: String,
        listen: SocketAddr,
    ) -> Server {
        let bin = env!("CARGO_BIN_EXE_triggers");
        let mut cmd = match wrapper {
            [] => Command::new(bin),
            [first, rest @ ..] => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
        };
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &database_url)
            .args(base_args(listen))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start triggers");
        reap_at_exit(child.id());
        let log = Arc::new(Mutex::new(Vec::new()));
        register_log(&log, false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let stdout_fd = std::os::fd::AsRawFd::as_raw_fd(&stdout);
        let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stderr = child.stderr.take().unwrap();
        {
            let log = Arc::clone(&log);
            let stalled = Arc::clone(&stalled);
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    while stalled.load(std::sync::atomic::Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    if line.contains("\"triggers ready\"") {
                        let _ = ready_tx.send(line.clone());
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line);
                }
            });
        }
        let ready = match ready_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "server did not start; log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        let v: Value = serde_json::from_str(&ready).unwrap();
        let addr = v["listen"].as_str().unwrap().parse().unwrap();
        let metrics_addr = v["metrics"].as_str().and_then(|m| m.parse().ok());
        Server {
            kind: Kind::Process(Some(child)),
            addr,
            metrics_addr,
            log,
            args,
            database_url,
            stdout: Some((stdout_fd, stalled)),
        }
    }

    /// Stop gracefully (SIGTERM for a process) and wait until it has; returns the exit code
    /// (0 for an in-process server that finished).
    pub fn stop(&mut self) -> Option<i32> {
        match &mut self.kind {
            Kind::Process(child) => {
                let mut child = child.take()?;
                unsafe_signal(child.id(), libc::SIGTERM);
                let status = wait_timeout(&mut child, Duration::from_secs(40));
                status.and_then(|s| s.code())
            }
            Kind::InProcess { stop, thread, .. } => {
                let _ = stop.take()?.send(());
                let finished = thread.take()?.join();
                finished.is_ok().then_some(0)
            }
        }
    }

    /// SIGKILL: no chance to drain anything. Only a process can be killed.
    pub fn kill(&mut self) {
        match &mut self.kind {
            Kind::Process(child) => {
                if let Some(mut child) = child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
            Kind::InProcess { .. } => panic!("start the server with Server::process to kill it"),
        }
    }

    /// The process's id (a server started with [`Server::process`]).
    pub fn pid(&self) -> u32 {
        match &self.kind {
            Kind::Process(Some(child)) => child.id(),
            _ => panic!("start the server with Server::process to know its pid"),
        }
    }

    /// SIGSTOP: the process stops where it is (a paused VM, a long stall), holding everything
    /// it held; [`Server::thaw`] lets it go on. Only a process can be frozen.
    /// Returns once every thread of it is stopped: SIGSTOP takes effect on each thread a moment
    /// after kill(2) returns, and a thread still running could take one more step of what the
    /// test means to catch half-way.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
        let tasks = format!("/proc/{}/task", self.pid());
        let stopped = || {
            std::fs::read_dir(&tasks).unwrap().all(|t| {
                let stat =
                    std::fs::read_to_string(t.unwrap().path().join("stat")).unwrap_or_default();
                // The state follows the command name's closing parenthesis.
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with(['T', 't']))
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !stopped() {
            assert!(Instant::now() < deadline, "the server never stopped");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGHUP, as logrotate or a closing terminal sends it.
    pub fn hang_up(&self) {
        self.signal(libc::SIGHUP);
    }

    /// SIGCONT after [`Server::freeze`].
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: i32) {
        match &self.kind {
            Kind::Process(Some(child)) => unsafe_signal(child.id(), sig),
            _ => panic!("start the server with Server::process to signal it"),
        }
    }

    /// Start a new process with the same arguments on the same port.
    pub fn restart(&mut self) {
        assert!(
            matches!(self.kind, Kind::Process(_)),
            "start the server with Server::process to restart it"
        );
        self.kill();
        let args = self.args.clone();
        let next = Self::spawn(&[], args, self.database_url.clone(), self.addr);
        *self = next;
    }

    /// Stop reading the process's stdout, as a log collector that hangs does, with its pipe
    /// shrunk to one page so that a few lines fill it; [`Server::read_log_again`] reads on.
    pub fn stall_log_reader(&self) {
        let (fd, stalled) = self.stdout.as_ref().expect("a process's stdout");
        stalled.store(true, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the pipe's read end, open while the reading thread holds it.
        let size = unsafe { libc::fcntl(*fd, libc::F_SETPIPE_SZ, 4096) };
        assert!(size >= 4096, "{}", std::io::Error::last_os_error());
    }

    /// Read the process's stdout again (after [`Server::stall_log_reader`]).
    pub fn read_log_again(&self) {
        let (_, stalled) = self.stdout.as_ref().expect("a process's stdout");
        stalled.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// Make ingress core `core` panic, as a bug would (in-process servers only).
    pub fn crash_core(&self, core: usize) {
        match &self.kind {
            Kind::InProcess { hooks, .. } => hooks.crash_core(core),
            Kind::Process(_) => panic!("only an in-process server can be crashed from a test"),
        }
    }

    /// Log lines containing `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// Whether a line containing `needle` is in the log, or comes within 5 s: a process's log is
    /// read from its pipe by a thread, so a line the node wrote just before it answered may come
    /// in a moment after the answer.
    pub async fn logged(&self, needle: &str) -> bool {
        !self.log_lines_at_least(needle, 1).await.is_empty()
    }

    /// The log lines containing `needle` once there are `n` of them, or after 5 s (see
    /// [`Server::logged`]).
    pub async fn log_lines_at_least(&self, needle: &str, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let lines = self.log_lines(needle);
            if lines.len() >= n || Instant::now() > deadline {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        match &mut self.kind {
            // Stopped as an operator stops it, so it hands back what it claimed: the test
            // database is shared, and a node killed at each test's end would leave other tests'
            // deliveries it had claimed leased for a minute (their receivers wait 10 s). One that
            // can't finish soon (its database cut off by the test) is killed.
            Kind::Process(child) => {
                if let Some(mut child) = child.take() {
                    unsafe_signal(child.id(), libc::SIGTERM);
                    wait_timeout(&mut child, Duration::from_secs(3));
                }
            }
            Kind::InProcess { stop, thread, .. } => {
                // Stop without waiting: the next test need not wait for this one's shutdown.
                if let Some(stop) = stop.take() {
                    let _ = stop.send(());
                }
                drop(thread.take());
            }
        }
    }
}

/// The log of this test binary's in-process servers: one JSON object per line, as the binary
/// writes them, captured once for the whole binary (the tracing subscriber is process-wide).
fn capture_log() -> Arc<Mutex<Vec<String>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<String>>>> = OnceLock::new();
    Arc::clone(LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Vec::new()));
        register_log(&log, true);
        let sink = LogSink(Arc::clone(&log));
        let subscriber = tracing_subscriber::fmt()
            .event_format(triggers::logging::JsonLines)
            .with_writer(move || sink.clone())
            .with_max_level(tracing::Level::INFO)
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        log
    }))
}

/// Collects formatted log lines.
#[derive(Clone)]
struct LogSink(Arc<Mutex<Vec<String>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let mut log = self.0.lock().unwrap();
        for line in text.lines().filter(|l| !l.is_empty()) {
            log.push(line.to_string());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every server's log with the test that started it (the name of the test's thread; `None`:
/// the log of the servers run in this process, which every test shares), so a failing test
/// shows what its servers said.
type ServerLog = (Option<String>, Arc<Mutex<Vec<String>>>);
static LOGS: Mutex<Vec<ServerLog>> = Mutex::new(Vec::new());

/// Register `log`, of a server started by the current test (`shared`: of this process's own
/// servers, every test's).
fn register_log(log: &Arc<Mutex<Vec<String>>>, shared: bool) {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default(info);
            let failing = std::thread::current().name().map(str::to_string);
            if let Ok(logs) = LOGS.try_lock() {
                // The failing test's servers and the shared log; every server's when the panic
                // is on a thread no test started a server from.
                let own = logs.iter().any(|(test, _)| *test == failing);
                for (i, (test, log)) in logs.iter().enumerate() {
                    if own && test.is_some() && *test != failing {
                        continue;
                    }
                    if let Ok(log) = log.try_lock() {
                        let tail = log.len().saturating_sub(40);
                        let by = test.as_deref().unwrap_or("this process, every test");
                        eprintln!(
                            "--- server {i} log, started by {by} (last {} lines) ---\n{}",
                            log.len() - tail,
                            log[tail..].join("\n")
                        );
                    }
                }
            }
        }));
    });
    let test = (!shared).then(|| std::thread::current().name().unwrap_or("?").to_string());
    LOGS.lock().unwrap().push((test, Arc::clone(log)));
}

/// Servers shared by a test file live in statics that are never dropped: kill every server this
/// process started when it exits, so no test run leaves servers behind.
fn reap_at_exit(pid: u32) {
    static PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());
    static HOOK: std::sync::Once = std::sync::Once::new();
    extern "C" fn kill_all() {
        if let Ok(pids) = PIDS.lock() {
            for &pid in pids.iter() {
                unsafe_signal(pid, libc::SIGKILL);
            }
        }
    }
    HOOK.call_once(|| {
        // SAFETY: registering a plain extern "C" function with atexit(3).
        unsafe {
            libc::atexit(kill_all);
        }
    });
    PIDS.lock().unwrap().push(pid);
}

fn unsafe_signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid of our own child process and a valid signal number.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return child.wait().ok();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// A header value by name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A keep-alive connection that sends raw bytes and reads responses.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> Conn {
        Self::try_open(addr).await.expect("connect")
    }

    /// Connect, or `None` when the server refuses or resets the connection.
    pub async fn try_open(addr: SocketAddr) -> Option<Conn> {
        let stream = TcpStream::connect(addr).await.ok()?;
        stream.set_nodelay(true).ok()?;
        Some(Conn {
            stream,
            buf: Vec::new(),
        })
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Send, reporting whether the connection took the bytes.
    pub async fn try_send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    /// Read one response; `None` if the server closed the connection first.
    pub async fn read(&mut self) -> Option<Response> {
        loop {
            if let Some((resp, used)) = parse_response(&self.buf) {
                self.buf.drain(..used);
                return Some(resp);
            }
            let mut chunk = [0u8; 16384];
            let n = tokio::time::timeout(Duration::from_secs(30), self.stream.read(&mut chunk))
                .await
                .expect("response within 30 s")
                .ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Whether the server has closed the connection (reads EOF within `limit`).
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        let mut chunk = [0u8; 1024];
        matches!(
            tokio::time::timeout(limit, self.stream.read(&mut chunk)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    /// Read and drop whatever arrives until the server closes; the bytes read, or `None` when it
    /// is still open after `limit`.
    pub async fn drain_until_closed(&mut self, limit: Duration) -> Option<usize> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut total = std::mem::take(&mut self.buf).len();
        let mut chunk = vec![0u8; 65536];
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Some(total),
                Ok(Ok(n)) => total += n,
                Err(_) => return None,
            }
        }
    }

    /// Send a request and read its response.
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Response {
        let req = build_request(method, path, headers, body);
        self.send(&req).await;
        self.read().await.expect("a response")
    }
}

/// Serialize a request with Host and Content-Length.
pub fn build_request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    if let Some(b) = body {
        bytes.extend_from_slice(b);
    }
    bytes
}

fn parse_response(buf: &[u8]) -> Option<(Response, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf).ok()? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return None,
    };
    let status = resp.code?;
    let headers: Vec<(String, String)> = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    if status == 100 {
        return Some((
            Response {
                status,
                headers,
                body: Vec::new(),
            },
            head_len,
        ));
    }
    let len: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse().unwrap())
        .expect("the server always sends Content-Length");
    if buf.len() < head_len + len {
        return None;
    }
    Some((
        Response {
            status,
            headers,
            body: buf[head_len..head_len + len].to_vec(),
        },
        head_len + len,
    ))
}

/// One request on a fresh connection.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response {
    Conn::open(addr)
        .await
        .call(method, path, headers, body)
        .await
}

/// GET with an API key.
pub async fn get(addr: SocketAddr, key: &str, path: &str) -> Response {
    call(addr, "GET", path, &[("X-API-Key", key)], None).await
}

/// POST JSON with an API key.
pub async fn post(addr: SocketAddr, key: &str, path: &str, body: &Value) -> Response {
    post_text(addr, key, path, &serde_json::to_vec(body).unwrap()).await
}

/// POST a JSON body given as its text (which `serde_json` could not write: `1e400`, say), with an
/// API key.
pub async fn post_text(addr: SocketAddr, key: &str, path: &str, body: &[u8]) -> Response {
    call(
        addr,
        "POST",
        path,
        &[("X-API-Key", key), ("Content-Type", "application/json")],
        Some(body),
    )
    .await
}

/// POST without a body, with an API key.
pub async fn post_empty(addr: SocketAddr, key: &str, path: &str) -> Response {
    call(addr, "POST", path, &[("X-API-Key", key)], None).await
}

/// DELETE with an API key.
pub async fn delete(addr: SocketAddr, key: &str, path: &str) -> Response {
    call(addr, "DELETE", path, &[("X-API-Key", key)], None).await
}

/// A new organization; returns (api_key, organization_id).
pub async fn new_org(addr: SocketAddr, tier: &str) -> (String, String) {
    let body = serde_json::json!({"organization_name": format!("test-{tier}"), "tier": tier});
    let r = call(
        addr,
        "POST",
        "/api/keys/generate",
        &[("Content-Type", "application/json")],
        Some(body.to_string().as_bytes()),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    (
        v["api_key"].as_str().unwrap().to_string(),
        v["organization_id"].as_str().unwrap().to_string(),
    )
}

/// POST /api/events with `{"type", "payload"}` and an optional dedup id.
pub async fn post_event(
    addr: SocketAddr,
    key: &str,
    event_type: &str,
    payload: Value,
    dedup: Option<&str>,
) -> Response {
    let mut body = serde_json::json!({"type": event_type, "payload": payload});
    if let Some(d) = dedup {
        body["dedup_id"] = Value::String(d.to_string());
    }
    post(addr, key, "/api/events", &body).await
}

/// POST an event without a dedup id, asserting 201; returns its id.
pub async fn new_event_id(addr: SocketAddr, key: &str, payload: Value) -> String {
    let r = post_event(addr, key, "t", payload, None).await;
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

/// The error body's `code`, asserting the whole error shape.
pub fn error_code(r: &Response) -> String {
    let v = r.json();
    assert!(
        v["error"].as_str().is_some_and(|e| !e.is_empty()),
        "error sentence in {v}"
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    v["code"].as_str().expect("code").to_string()
}

/// A webhook receiver on loopback, scripted per test: it records every request and answers what
/// the script says for it (status, delay, headers).
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<Mutex<ReceiverState>>,
    arrived: Arc<tokio::sync::Notify>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
}

/// What the receiver answers.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub delay: Duration,
    pub headers: Vec<(String, String)>,
    /// Close the connection this long after the answer (without saying so in a header).
    pub close_after: Option<Duration>,
    /// The whole answer as sent, in place of a head made of `status` and `headers` with an
    /// empty body (interim answers, a chunked or a close-delimited body).
    pub raw: Option<Vec<u8>>,
}

impl Answer {
    pub fn status(status: u16) -> Answer {
        Answer {
            status,
            delay: Duration::ZERO,
            headers: Vec::new(),
            close_after: None,
            raw: None,
        }
    }
}

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Received {
    pub at: Instant,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub answered: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("delivery body is JSON")
    }
    pub fn event_id(&self) -> String {
        self.header("x-event-id").unwrap_or_default().to_string()
    }
}

/// The requests as a timeline for a failed assertion: each one's time after the first, the end
/// of its event id, its attempt number and the answer it got.
/// Wait up to 10 s until `recv` got each of `ids` at least once.
pub async fn each_received(recv: &Receiver, ids: &[String]) {
    recv.wait_until(Duration::from_secs(10), |r| {
        ids.iter().all(|id| r.iter().any(|x| x.event_id() == *id))
    })
    .await;
}

/// `recv` got each of `ids` exactly `times` times (the receiver's timeline if not).
pub fn each_received_times(recv: &Receiver, ids: &[String], times: usize) {
    for id in ids {
        assert_eq!(
            recv.for_event(id).len(),
            times,
            "{id}: {}",
            timeline(&recv.received())
        );
    }
}

pub fn timeline(got: &[Received]) -> String {
    let Some(first) = got.first() else {
        return "no requests".to_string();
    };
    got.iter()
        .map(|r| {
            let id = r.event_id();
            format!(
                "+{}ms {} attempt {} -> {}",
                (r.at - first.at).as_millis(),
                &id[id.len().saturating_sub(6)..],
                r.header("x-delivery-attempt").unwrap_or("?"),
                r.answered
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The script: the request and how many earlier requests carried the same event id.
pub type Script = Arc<dyn Fn(&Received, usize) -> Answer + Send + Sync>;

struct ReceiverState {
    received: Vec<Received>,
    script: Script,
}

impl Receiver {
    pub async fn start(
        script: impl Fn(&Received, usize) -> Answer + Send + Sync + 'static,
    ) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ReceiverState {
            received: Vec::new(),
            script: Arc::new(script),
        }));
        let arrived = Arc::new(tokio::sync::Notify::new());
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (st, ar, ac) = (
            Arc::clone(&state),
            Arc::clone(&arrived),
            Arc::clone(&accepted),
        );
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                ac.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(serve_receiver(stream, Arc::clone(&st), Arc::clone(&ar)));
            }
        });
        Receiver {
            addr,
            state,
            arrived,
            accepted,
        }
    }

    /// How many connections it has accepted.
    pub fn connections(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn set_script(&self, script: impl Fn(&Received, usize) -> Answer + Send + Sync + 'static) {
        self.state.lock().unwrap().script = Arc::new(script);
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    pub fn for_event(&self, id: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.event_id() == id)
            .collect()
    }

    /// Wait until `done` holds for what arrived, or panic after `limit`.
    pub async fn wait_until(
        &self,
        limit: Duration,
        done: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        self.wait_until_or(limit, done, || async { String::new() })
            .await
    }

    /// [`Receiver::wait_until`], and when `limit` passes the panic says what `why` finds too
    /// (the database's state of the deliveries waited for, say: [`deliveries_left`]).
    pub async fn wait_until_or<W: std::future::Future<Output = String>>(
        &self,
        limit: Duration,
        done: impl Fn(&[Received]) -> bool,
        why: impl FnOnce() -> W,
    ) -> Vec<Received> {
        let deadline = Instant::now() + limit;
        loop {
            let notified = self.arrived.notified();
            let now = self.received();
            if done(&now) {
                return now;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "receiver condition not met within {limit:?}; got {} requests{}",
                    now.len(),
                    why().await
                );
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), notified).await;
        }
    }
}

/// What the database at `url` holds of the deliveries not yet made (their rows and the batch
/// leases over them, with the database's clock), for a failure's message.
pub async fn deliveries_left(url: &str) -> String {
    let client = db_at(url).await;
    let rows = |sql: &'static str| {
        let client = &client;
        async move {
            let rows = client.query(sql, &[]).await.unwrap();
            rows.iter()
                .map(|r| format!("\n  {}", r.get::<_, String>(0)))
                .collect::<String>()
        }
    };
    format!(
        "\nnow: {}\ndeliveries not delivered (event | status | attempts | next | lease):{}\n\
         batch leases (id | until | events | members until):{}",
        rows("SELECT now()::text").await.trim_start(),
        rows(
            "SELECT format('%s | %s | %s | %s | %s', event_id, status, attempts, \
             next_attempt_at, lease_until) FROM deliveries WHERE delivered_at IS NULL \
             ORDER BY event_id"
        )
        .await,
        rows(
            "SELECT format('%s | %s | %s..%s | %s', id, lease_until, first_event, last_event, \
             members_until) FROM delivery_batches ORDER BY lease_until"
        )
        .await,
    )
}

async fn serve_receiver(
    mut stream: TcpStream,
    state: Arc<Mutex<ReceiverState>>,
    arrived: Arc<tokio::sync::Notify>,
) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // One request: head, then a Content-Length body.
        let (head_len, path, headers, body_len) = loop {
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut hs);
            if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                let headers: Vec<(String, String)> = req
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                let len = headers
                    .iter()
                    .find(|(n, _)| n == "content-length")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0usize);
                break (n, req.path.unwrap_or("").to_string(), headers, len);
            }
            let mut chunk = [0u8; 16384];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        while buf.len() < head_len + body_len {
            let mut chunk = [0u8; 16384];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = buf[head_len..head_len + body_len].to_vec();
        buf.drain(..head_len + body_len);
        let mut received = Received {
            at: Instant::now(),
            path,
            headers,
            body,
            answered: 0,
        };
        let answer = {
            let st = state.lock().unwrap();
            let id = received.event_id();
            let before = st.received.iter().filter(|r| r.event_id() == id).count();
            (st.script)(&received, before)
        };
        received.answered = answer.status;
        state.lock().unwrap().received.push(received);
        arrived.notify_waiters();
        if !answer.delay.is_zero() {
            tokio::time::sleep(answer.delay).await;
        }
        let out = answer.raw.clone().unwrap_or_else(|| {
            let mut out = format!("HTTP/1.1 {} X\r\nContent-Length: 0\r\n", answer.status);
            for (n, v) in &answer.headers {
                out.push_str(&format!("{n}: {v}\r\n"));
            }
            out.push_str("\r\n");
            out.into_bytes()
        });
        if stream.write_all(&out).await.is_err() {
            return;
        }
        if let Some(after) = answer.close_after {
            tokio::time::sleep(after).await;
            return;
        }
    }
}

/// Point `key`'s organization at `url` (the server must allow private targets for loopback).
pub async fn set_webhook(addr: SocketAddr, key: &str, url: &str) -> String {
    let r = post(
        addr,
        key,
        "/api/webhook/config",
        &serde_json::json!({"webhook_url": url}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["signing_secret"].as_str().unwrap().to_string()
}

/// Events the organization has in the database.
pub async fn count_events(org: &str) -> i64 {
    db().await
        .query_one(
            "SELECT count(*) FROM events WHERE org_id = $1::text::uuid",
            &[&org],
        )
        .await
        .unwrap()
        .get(0)
}

/// Post `n` events of `event_type` (payload: their index) and return their ids, asserting 201.
pub async fn create_events(addr: SocketAddr, key: &str, n: usize, event_type: &str) -> Vec<String> {
    let mut conn = Conn::open(addr).await;
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let body = serde_json::json!({"type": event_type, "payload": {"i": i}}).to_string();
        let r = conn
            .call(
                "POST",
                "/api/events",
                &[("X-API-Key", key), ("Content-Type", "application/json")],
                Some(body.as_bytes()),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text());
        ids.push(r.json()["id"].as_str().unwrap().to_string());
    }
    ids
}

/// Whether every event in `ids` got an answer of `status` from the receiver.
pub fn all_answered(received: &[Received], ids: &[String], status: u16) -> bool {
    let ok: std::collections::HashSet<String> = received
        .iter()
        .filter(|r| r.answered == status)
        .map(|r| r.event_id())
        .collect();
    ids.iter().all(|id| ok.contains(id))
}

/// HMAC-SHA256 built from the hash alone (RFC 2104), independent of the server's signing code.
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&sha2::Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let inner: Vec<u8> = k
        .iter()
        .map(|b| b ^ 0x36)
        .chain(msg.iter().copied())
        .collect();
    let inner_hash = sha2::Sha256::digest(&inner);
    let outer: Vec<u8> = k
        .iter()
        .map(|b| b ^ 0x5c)
        .chain(inner_hash.iter().copied())
        .collect();
    sha2::Sha256::digest(&outer).to_vec()
}

/// The Standard Webhooks signature `secret` gives the delivery `r` (`v1,<base64>`).
pub fn standard_signature(secret: &str, r: &Received) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    // Padded or not, as the server takes a given secret.
    let key = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(secret.strip_prefix("whsec_").unwrap().trim_end_matches('='))
        .unwrap();
    let id = r.header("webhook-id").expect("webhook-id");
    let ts = r.header("webhook-timestamp").expect("webhook-timestamp");
    let mut msg = format!("{id}.{ts}.").into_bytes();
    msg.extend_from_slice(&r.body);
    format!("v1,{}", b64.encode(hmac_sha256(&key, &msg)))
}

/// Check a delivery the way a Standard Webhooks receiver does: `secret`'s signature is one of
/// the space-separated ones in `webhook-signature`, and the timestamp is current.
pub fn verify_standard_webhook(secret: &str, r: &Received) {
    let expected = standard_signature(secret, r);
    let header = r.header("webhook-signature").expect("webhook-signature");
    assert!(
        header.split(' ').any(|s| s == expected),
        "{expected} not in {header}"
    );
    let ts = r.header("webhook-timestamp").unwrap();
    let age = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        - ts.parse::<i64>().unwrap();
    assert!((0..30).contains(&age), "timestamp is current: {age}");
}

/// PATCH JSON with an API key.
pub async fn patch(addr: SocketAddr, key: &str, path: &str, body: &Value) -> Response {
    let body = serde_json::to_vec(body).unwrap();
    call(
        addr,
        "PATCH",
        path,
        &[("X-API-Key", key), ("Content-Type", "application/json")],
        Some(&body),
    )
    .await
}

/// The event's detail (`GET /api/events/{id}`, which must answer 200).
pub async fn event_json(addr: SocketAddr, key: &str, id: &str) -> Value {
    let r = get(addr, key, &format!("/api/events/{id}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// Wait until the event's status is `status` (the outcome is recorded just after the receiver
/// answered); its detail then.
pub async fn wait_status(
    addr: SocketAddr,
    key: &str,
    id: &str,
    status: &str,
    limit: Duration,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let e = event_json(addr, key, id).await;
        if e["status"] == status {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "event never became {status}: {e}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Create an endpoint (201 expected); returns its JSON (with the secret).
pub async fn create_endpoint(addr: SocketAddr, key: &str, body: Value) -> Value {
    let r = post(addr, key, "/api/endpoints", &body).await;
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()
}

/// The value of the metric `name` (no labels) on the server's metrics listener.
pub async fn metric(s: &Server, name: &str) -> f64 {
    let text = call(s.metrics_addr.unwrap(), "GET", "/metrics", &[], None)
        .await
        .text();
    text.lines()
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' '))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} is served"))
}
