//! Connections to PostgreSQL, shared by the store and delivery pools (each builds its own pool and
//! owns its SQL): connection settings from the configuration, pool construction, and which
//! database errors mean "the database is in trouble" rather than "this data is bad".
//!
//! - `copy`: the binary COPY encoding both pools append rows with.
//! - `tls`: the database URL, and TLS to PostgreSQL as libpq's `sslmode` and `sslrootcert` ask.
//! - `watched`: values made from files an operator renews (the authorities, the password).

pub mod copy;
pub mod tls;
pub mod watched;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

use watched::Watched;

use crate::config::{
    Config, DB_CONNECT_RETRY, DB_KEEPALIVE_IDLE, DB_KEEPALIVE_INTERVAL, DB_KEEPALIVE_PROBES,
    IDLE_IN_TRANSACTION_MIN_MS,
};

/// Which part of the server a connection serves. Its `application_name` says so (`triggers`, or
/// the name the URL gives, then `-ingest`, `-delivery`, …), so `pg_stat_activity`, the logs and
/// the load-test harness tell the pools apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The API's reads and writes, and migrations: the plain name.
    Api,
    /// The group commit's writers (events, dedup keys, delivery batches).
    Ingest,
    /// Delivery bookkeeping: claims, outcomes, leases.
    Delivery,
    /// The cross-node LISTEN connection.
    Listen,
    /// The health probe's own connection.
    Probe,
    /// Retention and partition upkeep.
    Retention,
}

impl Part {
    /// Every part ([`application_names`]).
    const ALL: [Part; 6] = [
        Part::Api,
        Part::Ingest,
        Part::Delivery,
        Part::Listen,
        Part::Probe,
        Part::Retention,
    ];

    fn suffix(self) -> &'static str {
        match self {
            Part::Api => "",
            Part::Ingest => "-ingest",
            Part::Delivery => "-delivery",
            Part::Listen => "-listen",
            Part::Probe => "-probe",
            Part::Retention => "-retention",
        }
    }
}

/// The PostgreSQL connection settings from the config, for one part of the server, with the
/// password file's password as it is now.
pub fn pg_config(config: &Config, part: Part) -> Result<tokio_postgres::Config, String> {
    let mut pg = pg_settings(config, part)?;
    if let Some(path) = &config.database_password_file {
        pg.password(read_password(path)?);
    }
    Ok(pg)
}

/// [`pg_config`] but the password file's password: a pool sets that at each connection.
fn pg_settings(config: &Config, part: Part) -> Result<tokio_postgres::Config, String> {
    let mut pg = config
        .database_url
        .pg_config()
        .map_err(|e| format!("--database-url: {e}"))?;
    pg.connect_timeout(Config::ms(config.db_connect_timeout_ms));
    // A 201 means the event's COMMIT is on disk, whatever the database's or the role's own
    // `synchronous_commit` (`off` is common tuning advice, and a power cut then loses commits
    // answered up to 600 ms before). First, so that options in the URL (`-c
    // synchronous_commit=remote_apply`) win; the delivery pool sets `off` for its bookkeeping.
    let options = pg.get_options().map(str::to_string);
    pg.options("-c synchronous_commit=on");
    if let Some(options) = options {
        add_option(&mut pg, &options);
    }
    // A peer gone without a word (a network cut, a host or VM that stopped) is found by TCP
    // keepalive in about a minute, on both ends; the systems' defaults take over two hours on
    // the database's end, and some twelve minutes on ours. On the database's end, a session of
    // a node cut off mid-COPY waits for its data in an active state that no statement or idle
    // timeout ends: its locks, its connection slot and the vacuum horizon are held until
    // keepalive gives up. `tcp_user_timeout` does the same for data sent and never acknowledged.
    // (Unix-socket connections have no TCP; PostgreSQL ignores these there.)
    pg.keepalives(true);
    pg.keepalives_idle(DB_KEEPALIVE_IDLE);
    pg.keepalives_interval(DB_KEEPALIVE_INTERVAL);
    pg.keepalives_retries(DB_KEEPALIVE_PROBES);
    pg.tcp_user_timeout(DB_KEEPALIVE_IDLE + DB_KEEPALIVE_INTERVAL * DB_KEEPALIVE_PROBES);
    add_option(&mut pg, KEEPALIVE_OPTIONS);
    let name = application_name(&pg, part);
    pg.application_name(&name);
    // Every query here is short and prepared: JIT compilation (tens of milliseconds, started by
    // the planner's cost estimate) only ever costs more than it saves.
    add_option(&mut pg, "-c jit=off");
    // A transaction left open by a node that stopped between two of its statements (a paused VM,
    // a stall of minutes, a network cut that leaves the socket open) would keep its row locks
    // until the node goes on, or until TCP keepalive gives up on it (hours): other nodes' take-
    // overs of its deliveries, and any change to the endpoints it touched, would wait that long.
    // PostgreSQL ends such a session instead. No transaction here waits on the node for longer
    // than a request may wait on the database, so none is cut that would have finished.
    let idle = idle_ms(config);
    add_option(
        &mut pg,
        &format!("-c idle_in_transaction_session_timeout={idle}"),
    );
    Ok(pg)
}

/// The TLS connector every connection to PostgreSQL goes through ([`mod@tls`]). Made for each
/// pool and for each connection made outside one, never on a hot path: kept out of line.
#[cold]
#[inline(never)]
pub fn tls(config: &Config) -> Result<tls::Connector, String> {
    config
        .database_url
        .tls
        .connector()
        .map_err(|e| format!("--database-url: {e}"))
}

/// The `application_name` of `part`'s sessions: the URL's own (or `triggers`) and the part's
/// suffix.
fn application_name(url: &tokio_postgres::Config, part: Part) -> String {
    let base = url.get_application_name().unwrap_or("triggers");
    format!("{base}{}", part.suffix())
}

/// The `application_name` of every part's sessions (what tells the server's sessions apart in
/// `pg_stat_activity`).
pub fn application_names(config: &Config) -> Result<Vec<String>, String> {
    let url = config
        .database_url
        .pg_config()
        .map_err(|e| format!("--database-url: {e}"))?;
    Ok(Part::ALL
        .iter()
        .map(|&part| application_name(&url, part))
        .collect())
}

/// How long a session of the server's may sit idle in a transaction (and a retention round's,
/// idle at all) before PostgreSQL ends it: as long as a request may wait on the database, and at
/// least `IDLE_IN_TRANSACTION_MIN_MS`.
pub fn idle_ms(config: &Config) -> u64 {
    config.db_timeout_ms.max(IDLE_IN_TRANSACTION_MIN_MS)
}

/// PostgreSQL's end of the keepalive `pg_config` sets on ours: [`DB_KEEPALIVE_IDLE`],
/// [`DB_KEEPALIVE_INTERVAL`], [`DB_KEEPALIVE_PROBES`], and their sum as `tcp_user_timeout` (one
/// string, checked against them by a test).
const KEEPALIVE_OPTIONS: &str = "-c tcp_keepalives_idle=30 -c tcp_keepalives_interval=10 \
     -c tcp_keepalives_count=3 -c tcp_user_timeout=60000";

/// Append a server option (`-c name=value`) to those the URL may already carry.
fn add_option(pg: &mut tokio_postgres::Config, option: &str) {
    let options = match pg.get_options() {
        Some(o) => format!("{o} {option}"),
        None => option.to_string(),
    };
    pg.options(options);
}

/// A connection pool of `size` with the configured timeouts.
pub fn build_pool(config: &Config, size: usize, part: Part) -> Result<Pool, String> {
    build_pool_with(config, size, pg_settings(config, part)?)
}

/// The delivery pool's connections: its writes (attempt outcomes, leases) commit without waiting
/// for the disk. A crash that loses the last milliseconds of them only means those events are
/// delivered again (at-least-once); events themselves are always written synchronously.
pub fn build_bookkeeping_pool(config: &Config, size: usize) -> Result<Pool, String> {
    build_pool_with(config, size, bookkeeping_settings(config)?)
}

/// The delivery pool's session settings: [`pg_settings`], and commits that do not wait.
fn bookkeeping_settings(config: &Config) -> Result<tokio_postgres::Config, String> {
    let mut pg = pg_settings(config, Part::Delivery)?;
    add_option(&mut pg, "-c synchronous_commit=off");
    Ok(pg)
}

fn build_pool_with(
    config: &Config,
    size: usize,
    pg: tokio_postgres::Config,
) -> Result<Pool, String> {
    let password = match &config.database_password_file {
        Some(path) => Some(Watched::new(
            Some(path.clone()),
            "database password",
            read_password,
        )?),
        None => None,
    };
    let connect = PoolConnect {
        tls: tls(config)?,
        password,
    };
    let manager = Manager::from_connect(
        pg,
        connect,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let connect = Config::ms(config.db_connect_timeout_ms);
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(connect))
        .create_timeout(Some(connect))
        .recycle_timeout(Some(connect))
        .build()
        .map_err(|e| format!("database pool: {e}"))
}

/// The password in `--database-password-file`: the file's text without its end of line.
fn read_password(path: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--database-password-file {path}: {e}"))?;
    let password = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if password.is_empty() {
        return Err(format!("--database-password-file {path}: empty"));
    }
    Ok(password.to_string())
}

/// How a pool connects: with the password file's password as it is now (renewed, it is read
/// again: [`Watched`]), over the TLS connector (its authorities' file likewise).
struct PoolConnect {
    tls: tls::Connector,
    password: Option<Watched<String>>,
}

impl deadpool_postgres::Connect for PoolConnect {
    fn connect(
        &self,
        pg: &tokio_postgres::Config,
    ) -> Pin<
        Box<
            dyn Future<
                    Output = Result<
                        (tokio_postgres::Client, tokio::task::JoinHandle<()>),
                        tokio_postgres::Error,
                    >,
                > + Send
                + '_,
        >,
    > {
        let mut pg = pg.clone();
        if let Some(password) = &self.password {
            pg.password(password.current());
        }
        let tls = self.tls.clone();
        Box::pin(async move {
            let (client, connection) = pg.connect(tls).await?;
            let driver = tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "pool connection closed");
                }
            });
            Ok((client, driver))
        })
    }
}

/// Connect once, retrying for up to `patience` while the database starts.
pub async fn connect(
    config: &Config,
    part: Part,
    patience: Duration,
) -> Result<tokio_postgres::Client, String> {
    let pg = pg_config(config, part)?;
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match pg.connect(tls(config)?).await {
            Ok((client, conn)) => {
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection closed");
                    }
                });
                return Ok(client);
            }
            // PostgreSQL's own words (a database or role that does not exist, a password
            // refused, a pooler refusing a startup parameter), not tokio-postgres's "db error".
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %describe(&e), "database not reachable yet; retrying");
                tokio::time::sleep(DB_CONNECT_RETRY).await;
            }
            Err(e) => return Err(format!("cannot connect to the database: {}", describe(&e))),
        }
    }
}

/// Whose fault a database error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The statement's own data was refused: class 22 (data exception) or 23 (integrity
    /// constraint). Only a row that is itself bad may be answered as the client's fault.
    Data,
    /// Anything else is the server's trouble: the connection is gone (class 08, a closed socket),
    /// the database is read-only (25006, after a failover), its disk or memory is full (53xxx),
    /// a statement timed out (57014), it is shutting down (57P), a transaction must be retried
    /// (40001, 40P01), or an error came without a code. Never the client's fault: 503.
    Server,
}

/// Classify a database error.
pub fn fault(e: &tokio_postgres::Error) -> Fault {
    fault_of_code(e.code().map(|c| c.code()))
}

/// Whether a write found no partition for its row (SQLSTATE 23514: the partitions for its day
/// were not made, or are gone): the retention round makes them.
pub fn no_partition(e: &tokio_postgres::Error) -> bool {
    e.code().map(|c| c.code()) == Some("23514")
}

/// Whether a write met the primary key of `events` or one of its partitions: an event id taken.
/// Ids are the server's own, so only an earlier write of the same event holds one.
pub fn event_id_taken(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|d| {
        *d.code() == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
            && d.constraint()
                .is_some_and(|c| c.starts_with("events") && c.ends_with("_pkey"))
    })
}

/// Classify an SQLSTATE (`None`: an error without one, such as a closed connection).
pub fn fault_of_code(code: Option<&str>) -> Fault {
    match code {
        // A row no partition takes (the partitions ahead were not created) is a check
        // violation; no other CHECK can fail on input the server validated: ours, not theirs.
        Some("23514") => Fault::Server,
        Some(c) if c.starts_with("22") || c.starts_with("23") => Fault::Data,
        _ => Fault::Server,
    }
}

/// Why a failed transaction may be run again at once (on the pool's next connection, within the
/// same deadline) rather than answered as the server's trouble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rerun {
    /// PostgreSQL asks for it: it failed to serialize (40001) or was picked as a deadlock's
    /// victim (40P01). It was rolled back whole and the database is fine.
    Asked,
    /// Its connection ended before COMMIT was sent (closed or reset, its backend terminated:
    /// 57P01 by an administrator or a pooler, 57P02 in a crash, class 08): it committed
    /// nothing. If the database itself is gone, the next connection fails too.
    ConnectionLost,
}

impl std::fmt::Display for Rerun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Rerun::Asked => "it must be run again",
            Rerun::ConnectionLost => "connection lost before COMMIT",
        })
    }
}

/// Whether the transaction that failed with `e` may be run again, and why. `commit_sent`: the
/// error came in answer to COMMIT (or after it was sent), when a lost connection leaves the
/// outcome unknown: never run again then.
pub fn rerun(e: &tokio_postgres::Error, commit_sent: bool) -> Option<Rerun> {
    if matches!(e.code().map(|c| c.code()), Some("40001" | "40P01")) {
        return Some(Rerun::Asked);
    }
    (!commit_sent && connection_lost(e)).then_some(Rerun::ConnectionLost)
}

/// Whether `e` says the connection ended (closed or reset, its backend terminated: 57P01,
/// 57P02, class 08) rather than that PostgreSQL refused a statement.
pub fn connection_lost(e: &tokio_postgres::Error) -> bool {
    use std::error::Error as _;
    let code = e.code().map(|c| c.code());
    let io = e
        .source()
        .is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some());
    e.is_closed()
        || io
        || matches!(code, Some("57P01" | "57P02"))
        || code.is_some_and(|c| c.starts_with("08"))
}

/// Whether a database error means the database (or the connection to it) is gone or cannot do
/// its job: everything that is not the statement's own data ([`Fault::Server`]).
pub fn is_connection_error(e: &tokio_postgres::Error) -> bool {
    fault(e) == Fault::Server
}

/// Whether a pool error is only a wait for a free connection that ran out (the pool is busy,
/// the database may be fine) rather than a failure to reach the database.
pub fn is_pool_busy(e: &deadpool_postgres::PoolError) -> bool {
    matches!(
        e,
        deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Wait)
    )
}

/// A database error with PostgreSQL's own message and code, not just "db error".
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{} ({}){}",
            db.message(),
            db.code().code(),
            hint(db.code().code(), db.message())
        ),
        // The cause too ("error connecting to server: Connection refused (os error 111)").
        None => match std::error::Error::source(e) {
            Some(cause) => {
                let cause = cause.to_string();
                // A certificate signed by an authority the URL did not name (a managed
                // database's own, as Amazon RDS's).
                let hint = if cause.contains("UnknownIssuer") {
                    "; name the authority that signed the database's certificate with \
                     sslrootcert=<PEM file> in the database URL (README, \"TLS to PostgreSQL\")"
                } else {
                    ""
                };
                format!("{e}: {cause}{hint}")
            }
            None => e.to_string(),
        },
    }
}

/// A pool's error with PostgreSQL's own words when it refused a new connection ("too many
/// connections for role", a password refused), not deadpool's "db error".
pub fn describe_pool(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => format!("no new connection: {}", describe(e)),
        other => other.to_string(),
    }
}

/// What an error says that its words do not, when it says something: a prepared statement of
/// this connection gone (26000) is what a pooler in transaction mode leaves; an internal error
/// (XX000) about a file PostgreSQL could not write, with no reason given, is most often its
/// disk: a session started on a full disk fails so ("could not write init file"), and a
/// server started then would stop with only that.
pub fn hint(code: &str, message: &str) -> &'static str {
    match code {
        "26000" => {
            ": this connection's prepared statements are gone, as behind a pooler in transaction \
             mode (PgBouncer pool_mode = transaction); the server needs a session per connection: \
             session mode, or no pooler (README, \"Behind a connection pooler\")"
        }
        "XX000" if message.starts_with("could not write") => {
            ": PostgreSQL could not write a file of its own; is the disk of its data directory \
             full? (its log says more)"
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_data_errors_are_the_clients() {
        for c in ["22P02", "22021", "23505", "23502"] {
            assert_eq!(fault_of_code(Some(c)), Fault::Data, "{c}");
        }
        // Read-only after a failover, disk full, out of memory, too many connections, statement
        // timeout, serialization failure, deadlock, lost connection, admin shutdown, no code.
        for c in [
            "25006", "53100", "53200", "53300", "57014", "40001", "40P01", "08006", "57P01",
            "23514", "25P03",
        ] {
            assert_eq!(fault_of_code(Some(c)), Fault::Server, "{c}");
        }
        assert_eq!(fault_of_code(None), Fault::Server);
    }

    #[test]
    fn a_prepared_statement_gone_names_the_pooler() {
        assert!(hint("26000", "prepared statement \"s1\" does not exist")
            .contains("pool_mode = transaction"));
        for c in ["57P01", "08006", "25P03", "23505"] {
            assert_eq!(hint(c, "could not write init file"), "", "{c}");
        }
    }

    #[test]
    fn the_databases_keepalive_is_ours() {
        let user_timeout = DB_KEEPALIVE_IDLE + DB_KEEPALIVE_INTERVAL * DB_KEEPALIVE_PROBES;
        let expected = format!(
            "-c tcp_keepalives_idle={} -c tcp_keepalives_interval={} -c tcp_keepalives_count={} \
             -c tcp_user_timeout={}",
            DB_KEEPALIVE_IDLE.as_secs(),
            DB_KEEPALIVE_INTERVAL.as_secs(),
            DB_KEEPALIVE_PROBES,
            user_timeout.as_millis()
        );
        assert_eq!(KEEPALIVE_OPTIONS, expected);
        assert!(options_with(&[], "postgres://u@localhost/db").contains(KEEPALIVE_OPTIONS));
    }

    #[test]
    fn commits_wait_for_the_disk_unless_the_url_says_otherwise() {
        let sessions = |url: &str| {
            let (_, config) = Config::from_args_and_env(
                std::iter::empty(),
                [("DATABASE_URL".to_string(), url.to_string())],
            )
            .unwrap();
            let pg = pg_config(&config, Part::Ingest).unwrap();
            pg.get_options().unwrap().to_string()
        };
        let plain = sessions("postgres://u@localhost/db");
        assert!(plain.starts_with("-c synchronous_commit=on "), "{plain}");
        // PostgreSQL takes the last value of a setting given twice: the URL's comes after ours.
        let own =
            sessions("postgres://u@localhost/db?options=-c%20synchronous_commit%3Dremote_apply");
        assert!(
            own.starts_with("-c synchronous_commit=on -c synchronous_commit=remote_apply "),
            "{own}"
        );
        // The delivery pool's bookkeeping commits without waiting (at least once, by design).
        let (_, config) = Config::from_args_and_env(
            std::iter::empty(),
            [(
                "DATABASE_URL".to_string(),
                "postgres://u@localhost/db".to_string(),
            )],
        )
        .unwrap();
        let bookkeeping = bookkeeping_settings(&config).unwrap();
        let options = bookkeeping.get_options().unwrap();
        assert!(options.ends_with("-c synchronous_commit=off"), "{options}");
    }

    #[test]
    fn a_file_postgresql_could_not_write_names_its_disk() {
        assert!(hint("XX000", "could not write init file").contains("is the disk"));
        assert_eq!(hint("XX000", "cache lookup failed for relation 1"), "");
    }

    fn options_with(args: &[&str], url: &str) -> String {
        let (_, config) = Config::from_args_and_env(
            args.iter().map(|s| s.to_string()),
            [("DATABASE_URL".to_string(), url.to_string())],
        )
        .unwrap();
        let pg = pg_config(&config, Part::Delivery).unwrap();
        pg.get_options().unwrap().to_string()
    }

    #[test]
    fn a_transaction_left_open_by_a_stalled_node_is_ended_by_the_database() {
        let url = "postgres://u@localhost/db";
        assert!(options_with(&[], url).contains("-c idle_in_transaction_session_timeout=5000"));
        let short = options_with(&["--db-timeout-ms", "200"], url);
        assert!(
            short.contains("-c idle_in_transaction_session_timeout=1000"),
            "{short}"
        );
        // Options the URL carries are kept.
        let own = options_with(&[], "postgres://u@localhost/db?options=-c%20work_mem%3D8MB");
        assert!(
            own.starts_with("-c synchronous_commit=on -c work_mem=8MB "),
            "{own}"
        );
        assert!(
            own.contains("idle_in_transaction_session_timeout=5000"),
            "{own}"
        );
    }
}
