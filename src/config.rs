//! Configuration: every flag, its `TRIGGERS_*` environment variable and its default, in one table.
//!
//! A value is taken from the command line first, then from the environment, then from the default.
//! Unknown flags, unknown `TRIGGERS_*` variables and malformed values stop start-up with a message
//! that names the option; relations between limits are checked in [`Config::validate`].

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use crate::db::tls::DatabaseUrl;

// ---------------------------------------------------------------------------------------------
// Fixed limits. Every number that bounds something is named here once, unit last, with what it
// costs; the ones an operator may want to change are `Config` fields below instead.
// ---------------------------------------------------------------------------------------------

/// Headers one request may carry; more is answered 431. Costs a fixed array per parse.
pub const HEADERS_MAX: usize = 64;
/// Longest chunk-size line or trailer section of a chunked body.
pub const CHUNK_META_BYTES_MAX: usize = 8 * 1024;
/// The read buffer of a new connection: a typical request fits. It grows (doubling, up to
/// `READ_CHUNK_MAX`) when reads fill it; an idle connection holds no more than this.
pub const READ_CHUNK_MIN: usize = 2 * 1024;
/// The most spare room made in the read buffer before one read.
pub const READ_CHUNK_MAX: usize = 64 * 1024;
/// Responses to pipelined requests are flushed once this many bytes are waiting.
pub const WRITE_FLUSH_BYTES: usize = 64 * 1024;
/// A connection's write buffer grown past this by a large answer is given back once written.
pub const WRITE_BUFFER_KEEP_BYTES: usize = 64 * 1024;
/// Payloads up to this size are copied out of the connection's read buffer when validated, so a
/// small event queued for writing or delivery never pins a large read buffer.
pub const PAYLOAD_COPY_BYTES_MAX: usize = 16 * 1024;

/// Events in one `POST /api/events/batch`, at most.
pub const BATCH_ITEMS_MAX: usize = 1000;
/// Connections the kernel queues per listener before the accept loop takes them.
pub const LISTEN_BACKLOG: i32 = 4096;
/// io_uring submission queue entries per core.
pub const URING_ENTRIES: u32 = 4096;
/// Pause after a failed accept (EMFILE and friends) instead of spinning.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// While accepts keep failing, a core logs it at most this often (with how many failed).
pub const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);
/// File descriptors kept for the process itself whatever its settings: standard streams, log
/// files, the runtimes' own (epoll, eventfds, timers, signal pipe), DNS lookups, migrations,
/// `/proc` reads. An idle node with one ingress core holds 13 such (measured).
pub const DESCRIPTORS_FIXED: usize = 64;
/// File descriptors of each ingress core besides its connections: its listeners, its ring or
/// epoll instance and its wake-up eventfd.
pub const DESCRIPTORS_PER_CORE: usize = 4;
/// Connections the metrics listener (core 0) takes beyond the API's limit, so Prometheus still
/// scrapes a node whose API connections are all taken.
pub const METRICS_CONNECTIONS_EXTRA: usize = 8;
/// Database connections beside the pools': the NOTIFY listener, the health probe, the
/// retention rounds, and one spare.
pub const DATABASE_CONNECTIONS_BESIDE_POOLS: usize = 4;
/// Connections per ingress core however low the open files limit: below it the node would
/// serve nearly nothing.
pub const CONNECTIONS_PER_CORE_MIN: usize = 16;
/// Longest text field (type, dedup id, organization name), in Unicode characters.
pub const TEXT_FIELD_CHARS_MAX: usize = 255;
/// Patterns one endpoint may have.
pub const ENDPOINT_PATTERNS_MAX: usize = 50;
/// Characters of an endpoint's description.
pub const ENDPOINT_DESCRIPTION_CHARS_MAX: usize = 255;
/// Highest `rate_limit_per_second` of an endpoint.
pub const ENDPOINT_RATE_LIMIT_MAX: u32 = 10_000;
/// Headers of its own one endpoint may send (`headers`).
pub const ENDPOINT_HEADERS_MAX: usize = 20;
/// Bytes of an endpoint's own headers together, as sent (`name: value` each).
pub const ENDPOINT_HEADER_BYTES_MAX: usize = 8192;
/// Inbox page size when none is asked for.
pub const INBOX_PAGE_DEFAULT: u32 = 100;
/// Largest inbox page.
pub const INBOX_PAGE_MAX: u32 = 1000;
/// Most events one inbox page looks at to find those of the status asked for (their status is
/// derived from their deliveries); a page that stops there says where to go on.
pub const INBOX_SCAN_ROWS: i64 = 2000;
/// Most ids in one batch ack.
pub const ACK_BATCH_IDS_MAX: usize = 1000;
/// Seconds a client is told to wait after a 503.
pub const RETRY_AFTER_UNAVAILABLE_S: u32 = 1;

/// How long a refused key is refused by a core without asking the store again.
pub const AUTH_REFUSED_TTL: Duration = Duration::from_secs(10);
/// Organizations whose last change is remembered for cache races; past this a change counts as a
/// change to every organization (a flush). About 24 bytes each.
pub const ORG_CHANGES_REMEMBERED_MAX: usize = 16_384;
/// Times a core asks again when a key's organization changed while the store verified it.
pub const VERIFY_RACE_TRIES: usize = 3;
/// Longest a key verification or key hash waits for an Argon2 slot before it gets 503.
pub const ARGON2_SLOT_WAIT: Duration = Duration::from_secs(2);
/// Keys tried when a generated key id collides with an existing one (one in 62^16).
pub const KEY_ID_COLLISION_TRIES: usize = 3;
/// Random bytes of a webhook signing secret the server makes.
pub const SIGNING_SECRET_BYTES: usize = 32;
/// Longest `Idempotency-Key` (as Stripe's), in bytes.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 255;
/// Shortest `Idempotency-Key` of a key rotation, in bytes: with the retired key it is what lets
/// a rotation be asked again, so it must not be guessable (a UUID has 36).
pub const ROTATION_IDEMPOTENCY_KEY_BYTES_MIN: usize = 16;
/// Fewest bytes of a signing secret given on create or rotate (Svix's minimum: 24).
pub const SIGNING_SECRET_GIVEN_BYTES_MIN: usize = 24;
/// Most bytes of a signing secret given on create or rotate (Svix's maximum: 64).
pub const SIGNING_SECRET_GIVEN_BYTES_MAX: usize = 64;
/// How often a core forgets buckets that are full again (they equal a new bucket), in µs.
pub const BUCKET_SWEEP_EVERY_US: u64 = 60_000_000;
/// A rate-limit slice is the limit over this many (a tenth of a second's refill): a node reports
/// its spend to the cluster as soon as it has spent one.
pub const RATE_SLICES_PER_MINUTE: u32 = 600;
/// The longest spend waits before it is reported to the cluster: the core's periodic tick. (A
/// slice spent, or an organization new here, is reported at once, from the admission.)
pub const RATE_REPORT_EVERY: Duration = Duration::from_millis(100);
/// The longest a delivery waits for its node's first report on a rate-limited endpoint before it
/// takes again: the report's answer (or its failure) wakes it sooner, so a slow database costs
/// one wait per delivery, not one per `RATE_REPORT_EVERY`.
pub const UNHEARD_WAIT_MAX: Duration = Duration::from_secs(1);

/// How long start-up waits for the database to accept connections.
pub const DATABASE_PATIENCE: Duration = Duration::from_secs(30);
/// Pause between connection attempts while the database starts.
pub const DB_CONNECT_RETRY: Duration = Duration::from_millis(500);
/// TCP keepalive on database connections, both ends (`db::pg_config`): the first probe after
/// this long idle, then one every `DB_KEEPALIVE_INTERVAL`, and the connection is given up after
/// `DB_KEEPALIVE_PROBES` unanswered: a peer gone without a word is found within a minute.
pub const DB_KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// See [`DB_KEEPALIVE_IDLE`].
pub const DB_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// See [`DB_KEEPALIVE_IDLE`].
pub const DB_KEEPALIVE_PROBES: u32 = 3;
/// How often a node looks for the server's sessions stalled mid-protocol (`store::stalled`).
pub const STALLED_CHECK_EVERY: Duration = Duration::from_secs(2);
/// A session waiting for its client, mid-COPY, this many times `--db-timeout-ms` is a stopped
/// node's: a live one drops its connection at its deadline (`store::stalled`).
pub const STALLED_AFTER_TIMEOUTS: u32 = 3;
/// The least `idle_in_transaction_session_timeout` (ms) the server's connections set: the larger
/// of this and `--db-timeout-ms` (`db::pg_config`).
pub const IDLE_IN_TRANSACTION_MIN_MS: u64 = 1_000;
/// How often the health probe checks a database that is up.
pub const HEALTH_PROBE_EVERY_UP: Duration = Duration::from_secs(1);
/// How often it checks one that is down (how soon writes resume after an outage).
pub const HEALTH_PROBE_EVERY_DOWN: Duration = Duration::from_millis(200);
/// The most checks one probe makes in a row while the connection of each ended under it (or was
/// refused): resets in a row (a failover, a pooler's restart) say little of the database, and a
/// database that refuses connections is found as soon (each refusal comes at once).
pub const HEALTH_PROBE_CHECKS: u32 = 3;
/// After a failed write the health flag stays down at least this long, whatever the probe finds.
pub const HEALTH_DOWN_HOLD: Duration = Duration::from_millis(300);
/// How often the LISTEN connection notifies itself a heartbeat (and, while it is down, how often
/// every cache is flushed).
pub const LISTEN_HEARTBEAT_EVERY: Duration = Duration::from_millis(250);
/// A LISTEN connection that has heard nothing for this long is given up as silent: with the
/// flush that follows, a change on another node is honoured here within about a second.
pub const LISTEN_HEARTBEAT_MISSED: Duration = Duration::from_millis(750);
/// How long start-up waits for the LISTEN connection before serving anyway.
pub const LISTEN_START_PATIENCE: Duration = Duration::from_secs(5);
/// Pause before the LISTEN connection reconnects.
pub const LISTEN_RECONNECT_DELAY: Duration = Duration::from_millis(500);
/// A COPY stream is sent in pieces of about this size, so a writer holds one piece of a batch of
/// large payloads, not the whole batch twice.
pub const COPY_PIECE_BYTES: usize = 1024 * 1024;
/// First pause before a fast-ack batch the database did not take is written again; it doubles.
pub const WRITE_RETRY_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest pause between those attempts.
pub const WRITE_RETRY_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// A group commit slower than this is logged: it holds every request in its batch.
pub const SLOW_BATCH: Duration = Duration::from_millis(250);
/// How many times a writer runs a batch's transaction when PostgreSQL asks for it to be run
/// again (a deadlock's victim, a serialization failure), all within the one `db_timeout`.
pub const WRITE_RUNS_MAX: u32 = 3;
/// Runs of an API read or ack at most when its connections turn out to be gone (`store::jobs`):
/// once more for the connection that ended under it, once more for one handed out meanwhile.
pub const READ_RUNS_MAX: u32 = 3;
/// How long a writer whose batch's COMMIT went unanswered keeps trying to reach the database to
/// learn whether it committed (writing it again): a restart or a cut connection is over within
/// it; a crash's recovery is not, and its requests are answered 503 within the second an outage
/// is promised in.
pub const COMMIT_DOUBT_WAIT: Duration = Duration::from_millis(750);
/// Query jobs running at once per read-pool connection (the rest wait in the bounded job queue).
pub const QUERY_JOBS_PER_CONNECTION: usize = 8;

/// Longest webhook URL accepted, in characters.
pub const URL_CHARS_MAX: usize = 2048;
/// How long a webhook host's DNS lookup may take.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Webhook hosts whose addresses a node keeps (`crate::hosts`): past three quarters of it, hosts
/// only URL checks asked for go first, then those asked for longest ago. About 250 bytes each
/// (16 MB at most).
pub const HOSTS_KEPT_MAX: usize = 65_536;
/// Webhook host lookups running at once (each holds a blocking thread for as long as the host's
/// DNS servers take to answer, or not); one more is not run (see `crate::hosts`).
pub const LOOKUPS_AT_ONCE: usize = 64;
/// Of [`LOOKUPS_AT_ONCE`], those that may run at once for hosts whose last lookup got no answer:
/// the rest are kept for hosts that answer.
pub const LOOKUPS_UNANSWERED_MAX: usize = LOOKUPS_AT_ONCE / 2;
/// Of [`LOOKUPS_AT_ONCE`], those that may run at once for one organization's URL checks (a
/// lookup holds its slot until the resolver gives up, after its check has: the system's resolver
/// tries 5 s a server by default against the check's [`RESOLVE_TIMEOUT`]); one more check waits
/// for one of them to end, within its [`RESOLVE_TIMEOUT`].
pub const LOOKUPS_PER_ORG_MAX: usize = 4;
/// Of [`LOOKUPS_AT_ONCE`], those that may run at once for URL checks, all organizations'
/// together: the rest are kept for the deliveries' connections. One more check is not run
/// (a 503, as when the resolver fails).
pub const LOOKUPS_CONFIGURE_MAX: usize = LOOKUPS_AT_ONCE / 2;
/// Bytes of a receiver's response body read (and dropped) so its connection can be reused.
pub const RESPONSE_BODY_READ_BYTES_MAX: usize = 64 * 1024;
/// How long start-up waits for its port to be released before it calls it taken (a server
/// killed a moment ago may hold it a little longer than its process lives).
pub const PORT_RELEASE_WAIT: Duration = Duration::from_secs(3);
/// Bytes of a receiver's answer kept in the attempt log.
pub const RESPONSE_BODY_KEPT_BYTES: usize = 1024;
/// An attempt whose timeout fires this much later than its time was not timed out by its
/// receiver: the node did not run (SIGSTOP, a paused VM or container). It is the server's
/// trouble (`Verdict::Unsent`): not counted against the endpoint's circuit, tried again.
pub const ATTEMPT_TIMER_LATE: Duration = Duration::from_secs(1);
/// An attempt starts only while its lease has this much left beyond the attempt timeout.
pub const LEASE_MARGIN: Duration = Duration::from_secs(2);
/// A healthy endpoint's last success is written at most this often.
pub const HEALTH_SUCCESS_WRITE_EVERY: Duration = Duration::from_secs(5);
/// Organizations whose endpoints the delivery pool caches; beyond this the cache starts over.
pub const ENDPOINT_CACHE_ORGS_MAX: usize = 100_000;
/// How long an idle connection to a receiver is kept for reuse.
pub const DELIVERY_POOL_IDLE: Duration = Duration::from_secs(60);
/// Recorder transactions in flight at once: one writes while the other gathers the next batch.
pub const RECORDERS: usize = 2;
/// Delivery pool connections beyond the recorders': the claimer, webhook lookups, the hand-back.
pub const DELIVERY_POOL_EXTRA_CONNECTIONS: usize = 3;
/// Outcomes waiting for a recorder per delivery slot.
pub const RECORDER_QUEUE_PER_SLOT: usize = 4;
/// Deliveries an endpoint may hold in memory per delivery slot of its own.
pub const DELIVERY_ENDPOINT_IN_MEMORY_PER_SLOT: usize = 4;
/// Most outcomes one recorder transaction writes.
pub const RECORD_BATCH_MAX: usize = 1000;
/// How long a recorder waits for a batch to fill (to `RECORD_BATCH_MAX`) before writing it.
/// A recorder transaction costs PostgreSQL about as much as a few hundred attempt rows, so
/// fuller ones halve the delivery bookkeeping's CPU per event (BENCHMARKS.md, 2026-12-03).
/// Delivery concurrency never waits for it (slots are given back when the HTTP exchange
/// ends); an outcome becomes visible to readers, and a retry is scheduled, up to this much later.
pub const RECORD_LINGER: Duration = Duration::from_millis(10);
/// Outcomes the database could not take (nothing of them written: no connection, or an error
/// before COMMIT, such as a full disk) are written again after this pause, doubling up to
/// `RECORD_RETRY_MAX`, for as long as a lease lasts: a delivery made is not made again because
/// the database was away for a moment.
pub const RECORD_RETRY_MIN: Duration = Duration::from_millis(100);
/// See [`RECORD_RETRY_MIN`].
pub const RECORD_RETRY_MAX: Duration = Duration::from_secs(1);
/// How long the looks of deliveries that waited (whether each is still owed) are gathered
/// before one read answers them all: a few milliseconds more for a delivery that already
/// waited for its turn, its retry's time or a circuit.
pub const LOOK_LINGER: Duration = Duration::from_millis(5);
/// Most looks one read answers.
pub const LOOK_BATCH_MAX: usize = 1000;
/// Most rows one claim takes.
pub const CLAIM_BATCH_MAX: usize = 1000;
/// How often the due backlog is counted for the metric.
pub const DELIVERY_BACKLOG_COUNT_EVERY: Duration = Duration::from_secs(5);
/// How often one node creates the partitions ahead and drops the expired ones.
pub const RETENTION_EVERY: Duration = Duration::from_secs(3600);
/// The least time between two retention rounds that drop a day (by the earlier of the node's
/// and the database's clocks): a clock that jumps ahead drops at most a day this often.
pub const RETENTION_DROP_PACE: Duration = Duration::from_secs(3600);
/// How often a node compares its wall clock with its monotonic clock between health probes (a
/// step of its clock past `--clock-offset-max-ms` stops changes within this time).
pub const CLOCK_STEP_CHECK_EVERY: Duration = Duration::from_millis(100);
/// A node clock this far from the database's is logged (the metric shows any offset).
pub const CLOCK_OFFSET_WARN: Duration = Duration::from_secs(1);
/// The least time between two retention rounds when writes find no partition (each one tells).
pub const RETENTION_KICK_SPACING: Duration = Duration::from_secs(2);
/// Daily partitions kept ready beyond today: a week of the maintainer not running (every node
/// down, or the database refusing DDL) before an insert finds no partition.
pub const PARTITIONS_AHEAD_DAYS: i64 = 7;
/// How long partition DDL waits for a lock before it gives up until the next round.
pub const PARTITION_LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// The backlog count stops here (so counting stays cheap on a huge backlog).
pub const DELIVERY_BACKLOG_COUNT_MAX: i64 = 1_000_000;
/// Longest the shutdown hand-back of deliveries may take.
pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(3);

/// The store gets at least this long to write what is queued at shutdown, however late it is.
pub const SHUTDOWN_GRACE_MIN: Duration = Duration::from_secs(2);
/// Attempts in flight get at most this long to finish at shutdown.
pub const DELIVERY_GRACE_MAX: Duration = Duration::from_secs(5);
/// How often shutdown checks whether attempts in flight have finished.
pub const SHUTDOWN_POLL: Duration = Duration::from_millis(10);
/// How long the runtime waits for its last tasks at exit.
pub const RUNTIME_STOP_WAIT: Duration = Duration::from_millis(500);
/// Worker threads of the pools' runtime at least, even on one CPU.
pub const STORE_THREADS_MIN: usize = 2;
/// Longest retry schedule.
pub const RETRY_SCHEDULE_ENTRIES_MAX: usize = 30;

/// What the process was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Run the server (the default).
    Serve,
    /// Apply pending migrations and exit.
    Migrate,
    /// Print the help text and exit.
    Help,
    /// Print the version and exit.
    Version,
    /// Ask the server on `--listen` for `/health/live`; exit 0 on 200 (a container HEALTHCHECK
    /// in an image with no shell or curl).
    Probe,
}

/// When a `POST /api/events` is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// 201 once the event's transaction has committed.
    Durable,
    /// 202 once the event is queued for the store; a crash loses what is queued.
    Fast,
}

/// Which monoio driver the ingress cores run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoDriver {
    /// io_uring when the kernel allows it, else epoll.
    Auto,
    /// io_uring or fail to start.
    Uring,
    /// epoll (monoio's legacy driver).
    Epoll,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Text,
}

/// A configuration error, naming the option at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Parses one option value from its text form.
pub trait OptionValue: Sized {
    /// Parse `text`; the error is a short phrase saying what was expected.
    fn parse_value(text: &str) -> Result<Self, String>;
    /// Whether a bare `--flag` (no value) means "true".
    const IS_FLAG: bool = false;
}

impl OptionValue for String {
    fn parse_value(text: &str) -> Result<Self, String> {
        Ok(text.to_string())
    }
}

impl OptionValue for DatabaseUrl {
    fn parse_value(text: &str) -> Result<Self, String> {
        DatabaseUrl::parse(text)
    }
}

impl OptionValue for Option<String> {
    fn parse_value(text: &str) -> Result<Self, String> {
        Ok(if text.is_empty() {
            None
        } else {
            Some(text.to_string())
        })
    }
}

impl OptionValue for bool {
    fn parse_value(text: &str) -> Result<Self, String> {
        match text.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err("expected true or false".into()),
        }
    }
    const IS_FLAG: bool = true;
}

impl OptionValue for usize {
    fn parse_value(text: &str) -> Result<Self, String> {
        text.replace('_', "")
            .parse()
            .map_err(|_| "expected a whole number".into())
    }
}

impl OptionValue for u64 {
    fn parse_value(text: &str) -> Result<Self, String> {
        text.replace('_', "")
            .parse()
            .map_err(|_| "expected a whole number".into())
    }
}

impl OptionValue for SocketAddr {
    fn parse_value(text: &str) -> Result<Self, String> {
        text.parse()
            .map_err(|_| "expected an address such as 0.0.0.0:8080".into())
    }
}

impl OptionValue for Option<SocketAddr> {
    fn parse_value(text: &str) -> Result<Self, String> {
        if text.is_empty() || text == "off" {
            return Ok(None);
        }
        SocketAddr::parse_value(text).map(Some)
    }
}

/// A number, or `auto` (None until start-up resolves it from the machine).
impl OptionValue for Option<u64> {
    fn parse_value(text: &str) -> Result<Self, String> {
        if text == "auto" {
            return Ok(None);
        }
        u64::parse_value(text).map(Some)
    }
}

impl OptionValue for AckMode {
    fn parse_value(text: &str) -> Result<Self, String> {
        match text {
            "durable" => Ok(AckMode::Durable),
            "fast" => Ok(AckMode::Fast),
            _ => Err("expected durable or fast".into()),
        }
    }
}

impl OptionValue for IoDriver {
    fn parse_value(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(IoDriver::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(IoDriver::Uring),
            "epoll" | "legacy" => Ok(IoDriver::Epoll),
            _ => Err("expected auto, uring or epoll".into()),
        }
    }
}

impl OptionValue for LogFormat {
    fn parse_value(text: &str) -> Result<Self, String> {
        match text {
            "json" => Ok(LogFormat::Json),
            "text" => Ok(LogFormat::Text),
            _ => Err("expected json or text".into()),
        }
    }
}

/// A list of durations such as `1s,2s,4s` or `500ms,1s`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule(pub Vec<Duration>);

impl OptionValue for RetrySchedule {
    fn parse_value(text: &str) -> Result<Self, String> {
        let mut delays = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            delays.push(parse_duration(part)?);
        }
        if delays.len() > RETRY_SCHEDULE_ENTRIES_MAX {
            return Err(format!("at most {RETRY_SCHEDULE_ENTRIES_MAX} retries"));
        }
        Ok(RetrySchedule(delays))
    }
}

/// The longest time an option may name: ten years. Times are added to clocks as microseconds
/// in an `i64`; far beyond this they would wrap around (a lease already over, a circuit open in
/// the past) instead of meaning "very long".
pub const TIME_OPTION_MAX: Duration = Duration::from_secs(10 * 365 * 86_400);

/// An option counted in seconds, milliseconds or microseconds (its flag ends in `-s`, `-ms` or
/// `-us`) names at most [`TIME_OPTION_MAX`].
fn time_bound(flag: &str, text: &str) -> Result<(), String> {
    let per_second: u64 = if flag.ends_with("-us") {
        1_000_000
    } else if flag.ends_with("-ms") {
        1_000
    } else if flag.ends_with("-s") {
        1
    } else {
        return Ok(());
    };
    let max = TIME_OPTION_MAX.as_secs() * per_second;
    match text.trim().parse::<u64>() {
        Ok(v) if v > max => Err(format!("at most {max} (ten years), got {v}")),
        _ => Ok(()),
    }
}

/// Parses `250ms`, `2s`, `1m` or a bare number of seconds (at most [`TIME_OPTION_MAX`]).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let err = || format!("`{text}` is not a duration such as 500ms, 2s or 1m");
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = digits.parse().map_err(|_| err())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(err)?),
        _ => return Err(err()),
    };
    if d > TIME_OPTION_MAX {
        return Err(format!("`{text}` is longer than ten years"));
    }
    Ok(d)
}

macro_rules! options {
    ($( $(#[doc = $doc:literal])+ $field:ident : $ty:ty = $default:expr, $flag:literal, $env:literal; )+) => {
        /// The server's configuration. Each field documents its flag, environment variable and default.
        #[derive(Debug, Clone)]
        pub struct Config {
            $( $(#[doc = $doc])+ pub $field: $ty, )+
        }

        /// (flag, environment variable, default, doc (its lines joined), whether it is a bare flag)
        const OPTIONS: &[(&str, &str, &str, &str, bool)] = &[
            $( ($flag, $env, $default, concat!($($doc),+), <$ty as OptionValue>::IS_FLAG), )+
        ];

        impl Config {
            fn set(&mut self, flag: &str, text: &str) -> Result<(), String> {
                time_bound(flag, text)?;
                match flag {
                    $( $flag => { self.$field = <$ty as OptionValue>::parse_value(text)?; Ok(()) } )+
                    _ => unreachable!("flag table and setter come from one macro"),
                }
            }

            fn defaults() -> Self {
                Config {
                    $( $field: <$ty as OptionValue>::parse_value($default)
                        .expect(concat!("default of --", $flag, " parses")), )+
                }
            }
        }
    };
}

options! {
    /// Address the API listens on; every ingress core binds it with SO_REUSEPORT.
    listen: SocketAddr = "0.0.0.0:8080", "listen", "TRIGGERS_LISTEN";
    /// PostgreSQL connection URL (postgres://user:pass@host:port/db), or libpq's key=value string, with libpq's sslmode (disable, allow, prefer, require, verify-ca, verify-full), sslrootcert (a PEM file, read again when it changes, or system) and channel_binding (prefer, require, disable); no sslmode: TLS when the server offers it unless the database is on this machine (README, TLS to PostgreSQL). Required. DATABASE_URL works too.
    database_url: DatabaseUrl = "", "database-url", "TRIGGERS_DATABASE_URL";
    /// A file holding the database password (a Docker or Kubernetes secret; one line, its end of line dropped), for a --database-url without one; read at start and again by a new connection once it changes (README, TLS to PostgreSQL). Empty: the URL's password, if any.
    database_password_file: Option<String> = "", "database-password-file", "TRIGGERS_DATABASE_PASSWORD_FILE";
    /// Address of the Prometheus /metrics listener; `off` disables it (/metrics stays on the API port).
    metrics_listen: Option<SocketAddr> = "0.0.0.0:9090", "metrics-listen", "TRIGGERS_METRICS_LISTEN";
    /// Ingress threads, one pinned per core, each with its own listener and org shard. 0: the CPUs, less one left to PostgreSQL when the database is on this host (at least 1).
    ingress_cores: usize = "0", "ingress-cores", "TRIGGERS_INGRESS_CORES";
    /// `durable`: 201 after COMMIT. `fast`: 202 once queued (a crash loses queued events).
    ack: AckMode = "durable", "ack", "TRIGGERS_ACK";
    /// Bearer token required by POST /api/keys/generate; empty: key generation is open.
    admin_token: Option<String> = "", "admin-token", "TRIGGERS_ADMIN_TOKEN";
    /// Allow webhooks to loopback, private, link-local and CGNAT addresses.
    allow_private_webhooks: bool = "false", "allow-private-webhooks", "TRIGGERS_ALLOW_PRIVATE_WEBHOOKS";
    /// One JSON line per request on stdout (method, route, status, duration, organization,
    /// request id, client), buffered per core.
    access_log: bool = "false", "access-log", "TRIGGERS_ACCESS_LOG";
    /// Delays before each retry of a failed delivery; one attempt plus one per entry.
    retry_schedule: RetrySchedule = "1s,2s,4s,8s,16s", "retry-schedule", "TRIGGERS_RETRY_SCHEDULE";
    /// `auto` (io_uring, else epoll), `uring` or `epoll`.
    io_driver: IoDriver = "auto", "io-driver", "TRIGGERS_IO_DRIVER";
    /// io_uring: completions finish when a core next enters the kernel, not by interrupting it (COOP_TASKRUN, Linux 5.19+; BENCHMARKS.md 2026-12-03).
    uring_coop_taskrun: bool = "true", "uring-coop-taskrun", "TRIGGERS_URING_COOP_TASKRUN";
    /// The scheduler's time slice of each ingress thread, in microseconds, 100..=100000 (Linux 6.12+ EEVDF; older kernels ignore it): a thread with a short slice runs sooner when its I/O wakes it, ahead of PostgreSQL and other work sharing the CPUs. 0 (the default): the kernel's own. 100 at 2,500 events/s: p50 −8 %, CPU per event −7 %; at peak: −2 % events/s, +5 % server CPU (BENCHMARKS.md 2026-12-05).
    ingress_slice_us: u64 = "0", "ingress-slice-us", "TRIGGERS_INGRESS_SLICE_US";
    /// `json` or `text`.
    log_format: LogFormat = "json", "log-format", "TRIGGERS_LOG_FORMAT";
    /// Log filter: a level (error, warn, info, debug, trace) or `target=level,...`.
    log: String = "info", "log", "TRIGGERS_LOG";
    /// Worker threads of the store and delivery runtime (tokio); the group commit has one more of
    /// its own. 0: half the CPUs, at least 2.
    store_threads: usize = "0", "store-threads", "TRIGGERS_STORE_THREADS";
    /// Group-commit writers: transactions in flight at once, each on its own connection. 0: 2 on
    /// up to 4 CPUs, 8 on more (BENCHMARKS.md 2026-12-04: on 16 CPUs, 8 writers with no overlap
    /// wait commit 30 % more single events a second than 2).
    store_writers: usize = "0", "store-writers", "TRIGGERS_STORE_WRITERS";
    /// Connections for reads and small writes (inbox, ack, keys), beside the writers' own.
    store_pool_size: usize = "8", "store-pool-size", "TRIGGERS_STORE_POOL_SIZE";
    /// Most events in one group-commit transaction. Memory: about 1 KiB per queued event.
    batch_events_max: usize = "4096", "batch-events-max", "TRIGGERS_BATCH_EVENTS_MAX";
    /// How long a writer waits for more events before writing a partial batch, in microseconds.
    /// 0 writes whatever is queued at once; batches still grow under load while the other writers commit.
    batch_linger_us: u64 = "0", "batch-linger-us", "TRIGGERS_BATCH_LINGER_US";
    /// While one writer's transaction is in flight, another starts only when this many
    /// microseconds pass (or its batch is full): one commit at a time while commits are quick, so
    /// batches grow with load; two as soon as one is slow. 0: writers never wait for each other.
    /// `auto`: 2000 on up to 4 CPUs (a small box's PostgreSQL shares them), 0 on more.
    batch_overlap_us: Option<u64> = "auto", "batch-overlap-us", "TRIGGERS_BATCH_OVERLAP_US";
    /// Events waiting for a writer; beyond this POST /api/events answers 503 at once.
    write_queue_events_max: usize = "16384", "write-queue-events-max", "TRIGGERS_WRITE_QUEUE_EVENTS_MAX";
    /// Payload bytes waiting for a writer; beyond this POST /api/events answers 503 at once.
    write_queue_bytes_max: usize = "67108864", "write-queue-bytes-max", "TRIGGERS_WRITE_QUEUE_BYTES_MAX";
    /// Reads and small writes waiting for their turn; beyond this the organization with the most
    /// waiting gives up its newest (503 at once).
    query_queue_max: usize = "4096", "query-queue-max", "TRIGGERS_QUERY_QUEUE_MAX";
    /// Messages waiting at one core from the others (org hops); beyond this: 503.
    hop_queue_max: usize = "16384", "hop-queue-max", "TRIGGERS_HOP_QUEUE_MAX";
    /// Largest request body, in bytes; larger ones get 413 before the body is read.
    body_bytes_max: usize = "524288", "body-bytes-max", "TRIGGERS_BODY_BYTES_MAX";
    /// Largest body of `POST /api/events/batch`, in bytes (at most `--inflight-body-bytes-max`);
    /// larger ones get 413 before it is read.
    batch_body_bytes_max: usize = "4194304", "batch-body-bytes-max", "TRIGGERS_BATCH_BODY_BYTES_MAX";
    /// Largest event payload as received JSON text, in bytes; larger: 413.
    payload_bytes_max: usize = "262144", "payload-bytes-max", "TRIGGERS_PAYLOAD_BYTES_MAX";
    /// Bytes of request bodies being read or handled at once on this node; beyond it a request
    /// with a body gets 503 before its body is read. Bounds what slow uploads can pin.
    inflight_body_bytes_max: usize = "67108864", "inflight-body-bytes-max", "TRIGGERS_INFLIGHT_BODY_BYTES_MAX";
    /// Largest request head (request line and headers), in bytes; larger: 431.
    head_bytes_max: usize = "16384", "head-bytes-max", "TRIGGERS_HEAD_BYTES_MAX";
    /// Time a client has to send a whole request head once it started, in ms; then 408 and close.
    head_timeout_ms: u64 = "10000", "head-timeout-ms", "TRIGGERS_HEAD_TIMEOUT_MS";
    /// Time a client has to send a whole body once the head arrived, in ms; then 408 and close.
    body_timeout_ms: u64 = "30000", "body-timeout-ms", "TRIGGERS_BODY_TIMEOUT_MS";
    /// An idle keep-alive connection is closed after this many ms.
    idle_timeout_ms: u64 = "75000", "idle-timeout-ms", "TRIGGERS_IDLE_TIMEOUT_MS";
    /// Open connections per ingress core; beyond this new ones get 503 and are closed. Lowered at start to what the open-files limit holds beside the node's own descriptors (logged).
    connections_per_core_max: usize = "20000", "connections-per-core-max", "TRIGGERS_CONNECTIONS_PER_CORE_MAX";
    /// Recent dedup ids remembered per core (about 40 bytes each) to answer repeats without a query.
    dedup_window_entries: usize = "65536", "dedup-window-entries", "TRIGGERS_DEDUP_WINDOW_ENTRIES";
    /// Verified keys cached per core (about 100 bytes each).
    auth_cache_entries: usize = "65536", "auth-cache-entries", "TRIGGERS_AUTH_CACHE_ENTRIES";
    /// Failed key checks allowed per client address per minute before it is refused without checking.
    auth_failures_per_minute: usize = "60", "auth-failures-per-minute", "TRIGGERS_AUTH_FAILURES_PER_MINUTE";
    /// Failed-key buckets remembered (by IPv4 address or IPv6 /64); the oldest is forgotten first.
    auth_throttle_entries: usize = "65536", "auth-throttle-entries", "TRIGGERS_AUTH_THROTTLE_ENTRIES";
    /// Take the client address from the last X-Forwarded-For entry (only behind a proxy you run
    /// that sets it); off: the TCP peer address.
    trust_forwarded_for: bool = "false", "trust-forwarded-for", "TRIGGERS_TRUST_FORWARDED_FOR";
    /// Key generations and rotations per client address per minute; more get 429.
    key_ops_per_minute: usize = "10", "key-ops-per-minute", "TRIGGERS_KEY_OPS_PER_MINUTE";
    /// Key generations and rotations per minute on this node, all addresses together.
    key_ops_per_minute_node: usize = "120", "key-ops-per-minute-node", "TRIGGERS_KEY_OPS_PER_MINUTE_NODE";
    /// Argon2id hashes of new keys (generation, rotation) running at once; apart from the
    /// verification slots, so key creation can't starve verification.
    argon2_hash_concurrency: usize = "1", "argon2-hash-concurrency", "TRIGGERS_ARGON2_HASH_CONCURRENCY";
    /// Argon2id verifications running at once (each ~20 ms of CPU and 19 MiB); more wait their turn.
    argon2_concurrency: usize = "2", "argon2-concurrency", "TRIGGERS_ARGON2_CONCURRENCY";
    /// Longest a request waits for another core or a pool before it gets 503, in ms (a bound on
    /// every cross-thread wait, so no request waits forever for a core or a pool that has gone).
    reply_timeout_ms: u64 = "15000", "reply-timeout-ms", "TRIGGERS_REPLY_TIMEOUT_MS";
    /// Largest inbox page in payload bytes; a page stops early (with a cursor) beyond it.
    inbox_page_bytes_max: usize = "8388608", "inbox-page-bytes-max", "TRIGGERS_INBOX_PAGE_BYTES_MAX";
    /// Longest a database round trip may take before the request gets 503, in ms. Also how long
    /// PostgreSQL keeps a transaction of this server's open while it waits on the server (at least
    /// 1 s; `idle_in_transaction_session_timeout`): a node that stalls mid-transaction holds no
    /// lock longer.
    db_timeout_ms: u64 = "5000", "db-timeout-ms", "TRIGGERS_DB_TIMEOUT_MS";
    /// Longest a new database connection may take, in ms; also how fast an outage is noticed.
    db_connect_timeout_ms: u64 = "1000", "db-connect-timeout-ms", "TRIGGERS_DB_CONNECT_TIMEOUT_MS";
    /// Longest a graceful shutdown waits for in-flight requests and batches, in seconds.
    shutdown_timeout_s: u64 = "25", "shutdown-timeout-s", "TRIGGERS_SHUTDOWN_TIMEOUT_S";
    /// Time a webhook receiver has to answer one delivery, in ms.
    delivery_timeout_ms: u64 = "10000", "delivery-timeout-ms", "TRIGGERS_DELIVERY_TIMEOUT_MS";
    /// Deliveries in flight at once across all organizations.
    delivery_concurrency: usize = "512", "delivery-concurrency", "TRIGGERS_DELIVERY_CONCURRENCY";
    /// Deliveries in flight at once to one endpoint, so a slow receiver holds only its share.
    delivery_endpoint_concurrency: usize = "32", "delivery-endpoint-concurrency", "TRIGGERS_DELIVERY_ENDPOINT_CONCURRENCY";
    /// Endpoints an organization may have (active, paused or disabled); more: 422.
    endpoints_per_org_max: usize = "20", "endpoints-per-org-max", "TRIGGERS_ENDPOINTS_PER_ORG_MAX";
    /// After a key rotation or generation sent with an `Idempotency-Key`, how long the same
    /// request may be sent again for a new key (its answer lost), in s; 0: never.
    key_rotation_retry_s: u64 = "600", "key-rotation-retry-s", "TRIGGERS_KEY_ROTATION_RETRY_S";
    /// After a secret rotation, how long deliveries carry the previous secret's signature too, in s.
    secret_rotation_grace_s: u64 = "86400", "secret-rotation-grace-s", "TRIGGERS_SECRET_ROTATION_GRACE_S";
    /// Consecutive failed attempts to an endpoint that open its circuit.
    circuit_failures: usize = "10", "circuit-failures", "TRIGGERS_CIRCUIT_FAILURES";
    /// How long an open circuit stays open before one probe goes through (half-open), in s.
    circuit_open_s: u64 = "30", "circuit-open-s", "TRIGGERS_CIRCUIT_OPEN_S";
    /// How long deliveries the server can't send (the DNS resolver fails to look up the host; no
    /// socket, port, memory or route to connect with: the server's trouble) wait and try again
    /// without it counting as an attempt, in s; after that each such failure is a failed
    /// attempt. 0: at once.
    unsent_patience_s: u64 = "900", "unsent-patience-s", "TRIGGERS_UNSENT_PATIENCE_S";
    /// How long a webhook host's addresses, once looked up, serve new connections to it before
    /// it is looked up again, in s; 0: a lookup for every new connection.
    delivery_dns_fresh_s: u64 = "30", "delivery-dns-fresh-s", "TRIGGERS_DELIVERY_DNS_FRESH_S";
    /// How long after that a host's last addresses are still used while the DNS resolver fails or
    /// does not answer, in s (never once the host is found to have no address); 0: never, such a
    /// delivery waits as unsent.
    delivery_dns_stale_s: u64 = "3600", "delivery-dns-stale-s", "TRIGGERS_DELIVERY_DNS_STALE_S";
    /// An endpoint whose every attempt has failed for this long is disabled, in s; 0: never.
    endpoint_disable_after_s: u64 = "259200", "endpoint-disable-after-s", "TRIGGERS_ENDPOINT_DISABLE_AFTER_S";
    /// Payload bytes of deliveries held in memory; beyond this due work waits in the database.
    delivery_memory_bytes_max: usize = "67108864", "delivery-memory-bytes-max", "TRIGGERS_DELIVERY_MEMORY_BYTES_MAX";
    /// Deliveries held in memory; beyond this due work waits in the database and is claimed later.
    delivery_queue_max: usize = "50000", "delivery-queue-max", "TRIGGERS_DELIVERY_QUEUE_MAX";
    /// Longest a receiver's Retry-After is honoured, in seconds.
    retry_after_max_s: u64 = "60", "retry-after-max-s", "TRIGGERS_RETRY_AFTER_MAX_S";
    /// A node whose clock is further off the database's than this takes no events (503, not
    /// ready) and claims no deliveries until it is back, in ms; 0: never.
    clock_offset_max_ms: u64 = "30000", "clock-offset-max-ms", "TRIGGERS_CLOCK_OFFSET_MAX_MS";
    /// How long a node owns a claimed delivery before another node may take it over, in seconds.
    delivery_lease_s: u64 = "60", "delivery-lease-s", "TRIGGERS_DELIVERY_LEASE_S";
    /// How often due deliveries are claimed from the database, in ms.
    delivery_poll_ms: u64 = "1000", "delivery-poll-ms", "TRIGGERS_DELIVERY_POLL_MS";
    /// Days events and their delivery records are kept (whole daily partitions go within a day
    /// of expiring); 0 keeps everything.
    retention_days: u64 = "30", "retention-days", "TRIGGERS_RETENTION_DAYS";
}

impl Config {
    /// Whether a clock offset of `offset_us` (this node's clock less the database's) is more
    /// than `--clock-offset-max-ms` allows.
    pub fn clock_off(&self, offset_us: i64) -> bool {
        self.clock_offset_max_ms != 0 && offset_us.unsigned_abs() > self.clock_offset_max_ms * 1000
    }

    /// The largest batch body taken: its own limit, within the node's body budget.
    pub fn batch_body_max(&self) -> usize {
        self.batch_body_bytes_max.min(self.inflight_body_bytes_max)
    }

    /// Parse `args` (without the program name) and the environment.
    pub fn from_args_and_env<I, E>(args: I, env: E) -> Result<(Command, Config), ConfigError>
    where
        I: IntoIterator<Item = String>,
        E: IntoIterator<Item = (String, String)>,
    {
        let mut config = Config::defaults();
        let mut command = None;
        let mut from_flags: Vec<(String, String)> = Vec::new();
        let mut args = args.into_iter().peekable();
        while let Some(arg) = args.next() {
            if arg == "--help" || arg == "-h" || arg == "help" {
                return Ok((Command::Help, config));
            }
            if arg == "--version" || arg == "-V" {
                return Ok((Command::Version, config));
            }
            if let Some(rest) = arg.strip_prefix("--") {
                let (name, inline) = match rest.split_once('=') {
                    Some((n, v)) => (n.to_string(), Some(v.to_string())),
                    None => (rest.to_string(), None),
                };
                let Some(&(_, _, _, _, is_flag)) = OPTIONS.iter().find(|o| o.0 == name) else {
                    return Err(ConfigError(format!(
                        "unknown flag --{name}; `triggers --help` lists them"
                    )));
                };
                let value = match inline {
                    Some(v) => v,
                    None if is_flag => match args.peek().map(|v| bool::parse_value(v)) {
                        Some(Ok(_)) => args.next().unwrap_or_default(),
                        _ => "true".to_string(),
                    },
                    None => args
                        .next()
                        .ok_or_else(|| ConfigError(format!("flag --{name} needs a value")))?,
                };
                from_flags.push((name, value));
                continue;
            }
            match (command, arg.as_str()) {
                (None, "serve") => command = Some(Command::Serve),
                (None, "migrate") => command = Some(Command::Migrate),
                (None, "probe") => command = Some(Command::Probe),
                _ => {
                    return Err(ConfigError(format!(
                        "unexpected argument `{arg}`; commands are serve (default), migrate \
                         and probe"
                    )))
                }
            }
        }

        let mut database_url_env = None;
        let mut from_env: Vec<(String, String)> = Vec::new();
        for (key, value) in env {
            if key == "DATABASE_URL" {
                database_url_env = Some(value);
                continue;
            }
            if !key.starts_with("TRIGGERS_") {
                continue;
            }
            match OPTIONS.iter().find(|o| o.1 == key) {
                Some(o) => from_env.push((o.0.to_string(), value)),
                None => {
                    return Err(ConfigError(format!(
                        "unknown environment variable {key}; `triggers --help` lists them"
                    )))
                }
            }
        }
        if let Some(url) = database_url_env {
            // TRIGGERS_DATABASE_URL, when also set, wins over the generic DATABASE_URL.
            if !from_env.iter().any(|(f, _)| f == "database-url") {
                from_env.insert(0, ("database-url".to_string(), url));
            }
        }
        for (flag, value) in from_env {
            let env = OPTIONS
                .iter()
                .find(|o| o.0 == flag)
                .map(|o| o.1)
                .unwrap_or("");
            config
                .set(&flag, &value)
                .map_err(|why| ConfigError(format!("{env}={value:?}: {why}")))?;
        }
        for (flag, value) in from_flags {
            config
                .set(&flag, &value)
                .map_err(|why| ConfigError(format!("--{flag} {value:?}: {why}")))?;
        }
        let command = command.unwrap_or(Command::Serve);
        if matches!(command, Command::Serve | Command::Migrate) {
            config.resolve_and_validate()?;
        }
        Ok((command, config))
    }

    /// Fill the "0 means derive it" defaults and check the relations between limits.
    fn resolve_and_validate(&mut self) -> Result<(), ConfigError> {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        if self.ingress_cores == 0 {
            self.ingress_cores = default_ingress_cores(cpus, self.database_url.is_local());
        }
        if self.store_threads == 0 {
            // Two even on a 2-core box: measured there, delivery keeps up with 22k events/s on
            // two threads against 18k on one, and ingest alone is no slower.
            self.store_threads = (cpus / 2).max(STORE_THREADS_MIN);
        }
        let (writers, overlap_us) = default_group_commit(cpus);
        if self.store_writers == 0 {
            self.store_writers = writers;
        }
        self.batch_overlap_us.get_or_insert(overlap_us);
        self.validate()
    }

    /// Check every limit and the relations between them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError(msg));
        if self.database_url.pg.is_empty() {
            return fail(
                "--database-url (or DATABASE_URL / TRIGGERS_DATABASE_URL) is required".into(),
            );
        }
        match self.database_url.pg_config() {
            Err(why) => {
                return fail(format!(
                    "--database-url is not a PostgreSQL URL or key=value string: {why}"
                ))
            }
            Ok(pg) if pg.get_password().is_some() && self.database_password_file.is_some() => {
                return fail(
                    "--database-url has a password and --database-password-file gives one: \
                     give it once"
                        .into(),
                )
            }
            Ok(_) => {}
        }
        if !(1..=1024).contains(&self.ingress_cores) {
            return fail("--ingress-cores must be 1..=1024".into());
        }
        if !(1..=1024).contains(&self.store_threads) {
            return fail("--store-threads must be 0 (chosen from the CPUs) or 1..=1024".into());
        }
        if self.ingress_slice_us != 0 && !(100..=100_000).contains(&self.ingress_slice_us) {
            return fail("--ingress-slice-us must be 0 or 100..=100000".into());
        }
        for (name, value, min, max) in [
            ("store-writers", self.store_writers, 1, 64),
            ("store-pool-size", self.store_pool_size, 1, 1024),
            ("batch-events-max", self.batch_events_max, 1, 100_000),
            (
                "write-queue-events-max",
                self.write_queue_events_max,
                1,
                10_000_000,
            ),
            ("query-queue-max", self.query_queue_max, 1, 1_000_000),
            ("hop-queue-max", self.hop_queue_max, 1, 10_000_000),
            (
                "connections-per-core-max",
                self.connections_per_core_max,
                1,
                1_000_000,
            ),
            (
                "dedup-window-entries",
                self.dedup_window_entries,
                0,
                100_000_000,
            ),
            (
                "auth-cache-entries",
                self.auth_cache_entries,
                1,
                100_000_000,
            ),
            ("argon2-concurrency", self.argon2_concurrency, 1, 1024),
            (
                "argon2-hash-concurrency",
                self.argon2_hash_concurrency,
                1,
                1024,
            ),
            (
                "auth-throttle-entries",
                self.auth_throttle_entries,
                1,
                100_000_000,
            ),
            ("key-ops-per-minute", self.key_ops_per_minute, 1, 1_000_000),
            (
                "key-ops-per-minute-node",
                self.key_ops_per_minute_node,
                1,
                1_000_000,
            ),
            (
                "delivery-concurrency",
                self.delivery_concurrency,
                1,
                100_000,
            ),
            (
                "delivery-endpoint-concurrency",
                self.delivery_endpoint_concurrency,
                1,
                100_000,
            ),
            ("delivery-queue-max", self.delivery_queue_max, 1, 10_000_000),
            (
                "endpoints-per-org-max",
                self.endpoints_per_org_max,
                1,
                10_000,
            ),
            ("circuit-failures", self.circuit_failures, 1, 1_000_000),
        ] {
            if !(min..=max).contains(&value) {
                return fail(format!("--{name} must be {min}..={max}, got {value}"));
            }
        }
        if self.reply_timeout_ms <= self.db_timeout_ms {
            return fail(format!(
                "--reply-timeout-ms ({}) must exceed --db-timeout-ms ({}): a request waits for \
                 the database's answer before its own deadline",
                self.reply_timeout_ms, self.db_timeout_ms
            ));
        }
        if self.inflight_body_bytes_max < self.body_bytes_max {
            return fail(format!(
                "--inflight-body-bytes-max ({}) must hold at least one body (--body-bytes-max {})",
                self.inflight_body_bytes_max, self.body_bytes_max
            ));
        }
        if self.retention_days > 36_500 {
            return fail(format!(
                "--retention-days must be 0 (keep everything) to 36500, got {}",
                self.retention_days
            ));
        }
        if self.batch_body_bytes_max > 64 << 20 || self.batch_body_bytes_max < 1024 {
            return fail("--batch-body-bytes-max must be from 1 KiB to 64 MiB".into());
        }
        if self.write_queue_bytes_max < self.payload_bytes_max
            || self.delivery_memory_bytes_max < self.payload_bytes_max
        {
            return fail(format!(
                "--write-queue-bytes-max and --delivery-memory-bytes-max must hold at least one \
                 payload (--payload-bytes-max {})",
                self.payload_bytes_max
            ));
        }
        if self.inbox_page_bytes_max < self.payload_bytes_max {
            return fail(format!(
                "--inbox-page-bytes-max ({}) must hold at least one payload (--payload-bytes-max {})",
                self.inbox_page_bytes_max, self.payload_bytes_max
            ));
        }
        if self.head_bytes_max < 1024 {
            return fail("--head-bytes-max must be at least 1024".into());
        }
        if self.payload_bytes_max == 0 || self.payload_bytes_max >= self.body_bytes_max {
            return fail(format!(
                "--payload-bytes-max ({}) must be above 0 and below --body-bytes-max ({}): \
                 the body also holds the type and dedup id",
                self.payload_bytes_max, self.body_bytes_max
            ));
        }
        if self.body_bytes_max > 64 << 20 {
            return fail("--body-bytes-max must be at most 64 MiB".into());
        }
        if self.batch_events_max > self.write_queue_events_max {
            return fail(format!(
                "--batch-events-max ({}) cannot exceed --write-queue-events-max ({})",
                self.batch_events_max, self.write_queue_events_max
            ));
        }
        if self.batch_linger_us > 100_000 || self.batch_overlap_us.unwrap_or(0) > 1_000_000 {
            return fail(
                "--batch-linger-us must be at most 100000 and --batch-overlap-us at most 1000000"
                    .into(),
            );
        }
        for (name, ms) in [
            ("head-timeout-ms", self.head_timeout_ms),
            ("body-timeout-ms", self.body_timeout_ms),
            ("idle-timeout-ms", self.idle_timeout_ms),
            ("db-timeout-ms", self.db_timeout_ms),
            ("reply-timeout-ms", self.reply_timeout_ms),
            ("db-connect-timeout-ms", self.db_connect_timeout_ms),
            ("delivery-timeout-ms", self.delivery_timeout_ms),
            ("delivery-poll-ms", self.delivery_poll_ms),
        ] {
            if ms == 0 || ms > 3_600_000 {
                return fail(format!("--{name} must be 1..=3600000"));
            }
        }
        if self.delivery_lease_s * 1000 <= self.delivery_timeout_ms {
            return fail(format!(
                "--delivery-lease-s ({} s) must exceed --delivery-timeout-ms ({} ms): \
                 a lease must outlive the attempt it covers",
                self.delivery_lease_s, self.delivery_timeout_ms
            ));
        }
        if self.clock_offset_max_ms != 0 && self.clock_offset_max_ms < 1000 {
            return fail(format!(
                "--clock-offset-max-ms must be 0 (never) or at least 1000, got {}: below a \
                 second the probe's own round trip would count",
                self.clock_offset_max_ms
            ));
        }
        if self.shutdown_timeout_s == 0 || self.shutdown_timeout_s > 600 {
            return fail("--shutdown-timeout-s must be 1..=600".into());
        }
        if self.admin_token.as_deref().is_some_and(|t| t.len() < 16) {
            return fail("--admin-token must be at least 16 characters".into());
        }
        Ok(())
    }

    /// The text of `triggers --help`.
    pub fn help() -> String {
        let mut out = String::from(
            "triggers: the Triggers API server\n\n\
             usage: triggers [serve|migrate|probe] [--flag value]...\n\n\
             commands:\n  serve    run the server (default); applies migrations first\n  \
             migrate  apply migrations and exit\n  \
             probe    exit 0 if the server answers /health/live with 200 on \
             --metrics-listen or else on --listen (a container health check)\n\noptions (flag, environment variable, default):\n",
        );
        for (flag, env, default, doc, _) in OPTIONS {
            let default = if default.is_empty() { "none" } else { default };
            let _ = writeln!(
                out,
                "  --{flag}\n      {env}  [default: {default}]\n      {}",
                doc.trim()
            );
        }
        out
    }

    /// The configured retry delays.
    pub fn retry_delays(&self) -> &[Duration] {
        &self.retry_schedule.0
    }

    /// Query jobs running at once in the store pool.
    pub fn query_jobs_running_max(&self) -> usize {
        self.store_pool_size * QUERY_JOBS_PER_CONNECTION
    }

    /// Query jobs of one tenant (an organization, or a client address for work asked without a
    /// key) running at once in the store pool: one per connection, so that another tenant's job
    /// waits for a connection behind none of them (`store::lanes`). Measured with one tenant
    /// reading inbox pages on 256 connections: its throughput the same as with 2 or 8 per
    /// connection (within the runs' spread); the other tenant's read p50 9.5 ms against 51 ms
    /// with 2 (BENCHMARKS.md, thirty-fifth session).
    pub fn query_jobs_per_lane_max(&self) -> usize {
        self.store_pool_size
    }

    /// How long a query job may wait for its turn: a job that waited longer is answered 503
    /// without being run, so that a run of it under the database deadline still ends within the
    /// reply timeout.
    pub fn query_wait_max(&self) -> Duration {
        Config::ms(
            self.db_timeout_ms
                .min(self.reply_timeout_ms.saturating_sub(self.db_timeout_ms)),
        )
    }

    /// Outcomes waiting for the delivery recorders.
    pub fn recorder_queue_max(&self) -> usize {
        self.delivery_concurrency * RECORDER_QUEUE_PER_SLOT
    }

    /// Connections of the delivery pool.
    pub fn delivery_pool_size(&self) -> usize {
        RECORDERS + DELIVERY_POOL_EXTRA_CONNECTIONS
    }

    /// Connections to PostgreSQL this node opens, at most.
    pub fn database_connections_max(&self) -> usize {
        self.store_writers
            + self.store_pool_size
            + self.delivery_pool_size()
            + DATABASE_CONNECTIONS_BESIDE_POOLS
    }

    /// File descriptors the node needs besides its API connections: its database connections,
    /// a connection for each delivery in flight and a second one it may be racing to another
    /// address of the host while connecting, one for each idle connection the delivery client
    /// keeps (as many), the metrics listener's own connections, and the process's own.
    pub fn descriptors_reserved(&self) -> usize {
        self.database_connections_max()
            + 3 * self.delivery_concurrency
            + METRICS_CONNECTIONS_EXTRA
            + DESCRIPTORS_FIXED
            + DESCRIPTORS_PER_CORE * self.ingress_cores
    }

    /// API connections per ingress core within an open files limit of `open_files`: what is
    /// left after [`Config::descriptors_reserved`], shared by the cores, at most
    /// `--connections-per-core-max` and at least [`CONNECTIONS_PER_CORE_MIN`] (or that option,
    /// if lower). A flood of connections is then answered 503 while the database and the
    /// deliveries still have the descriptors they need, instead of making the accept fail
    /// (EMFILE: the connection waits unanswered) and every reconnect to PostgreSQL with it.
    pub fn connections_within(&self, open_files: u64) -> usize {
        let left = open_files.saturating_sub(self.descriptors_reserved() as u64);
        // At least one core: a configuration not yet resolved (`--version`) says 0.
        let cores = self.ingress_cores.max(1) as u64;
        let per_core = usize::try_from(left / cores).unwrap_or(usize::MAX);
        per_core
            .max(CONNECTIONS_PER_CORE_MIN)
            .min(self.connections_per_core_max)
    }

    /// Deliveries one endpoint may hold in memory; the rest wait in the database.
    pub fn delivery_endpoint_in_memory_max(&self) -> usize {
        (self.delivery_endpoint_concurrency * DELIVERY_ENDPOINT_IN_MEMORY_PER_SLOT)
            .min(self.delivery_queue_max)
    }

    /// Shorthand for a millisecond option as a Duration.
    pub fn ms(value: u64) -> Duration {
        Duration::from_millis(value)
    }
}

/// Ingress cores when none are set: every CPU, less one for a PostgreSQL on the same host, which
/// otherwise competes with a pinned ingress thread on every core. Measured on the 2-core box
/// (BENCHMARKS.md, 2026-12-03 fourth session): one ingress core instead of two serves more events
/// a second, at less server CPU per event, with a lower p99.
fn default_ingress_cores(cpus: usize, database_is_local: bool) -> usize {
    if database_is_local {
        cpus.saturating_sub(1).max(1)
    } else {
        cpus
    }
}

/// Group-commit writers and overlap wait (µs) when none are set. Up to 4 CPUs: 2 writers, and a
/// second commit waits up to 2 ms for the first, so batches grow and PostgreSQL, sharing the CPUs,
/// spends less per event (the 2-core box: −14 % PostgreSQL CPU at peak, BENCHMARKS.md). More CPUs:
/// 8 writers that never wait, since there PostgreSQL's commit of one batch on one backend is the
/// limit, not its CPU (a 16-core box, 8 ingress cores, c512: 107k → 139k events/s,
/// BENCHMARKS.md 2026-12-04 eleventh session).
fn default_group_commit(cpus: usize) -> (usize, u64) {
    if cpus <= 4 {
        (2, 2000)
    } else {
        (8, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str], env: &[(&str, &str)]) -> Result<(Command, Config), ConfigError> {
        Config::from_args_and_env(
            args.iter().map(|s| s.to_string()),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    const DB: (&str, &str) = ("DATABASE_URL", "postgres://u@localhost/db");

    #[test]
    fn defaults_match_the_documented_table() {
        // The defaults that scripts and the Dockerfile rely on.
        let (cmd, c) = parse(&[], &[DB]).unwrap();
        assert_eq!(cmd, Command::Serve);
        assert_eq!(c.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.metrics_listen, Some("0.0.0.0:9090".parse().unwrap()));
        assert_eq!(c.ack, AckMode::Durable);
        assert_eq!(c.io_driver, IoDriver::Auto);
        assert!(c.uring_coop_taskrun);
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(!c.allow_private_webhooks);
        assert_eq!(c.admin_token, None);
        assert_eq!(
            c.retry_schedule.0,
            [1, 2, 4, 8, 16].map(Duration::from_secs).to_vec()
        );
        assert!(c.ingress_cores >= 1);
    }

    #[test]
    fn the_group_commit_follows_the_machine_unless_set() {
        assert_eq!(default_group_commit(1), (2, 2000));
        assert_eq!(default_group_commit(4), (2, 2000));
        assert_eq!(default_group_commit(5), (8, 0));
        assert_eq!(default_group_commit(64), (8, 0));
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (_, c) = parse(&[], &[DB]).unwrap();
        let (writers, overlap_us) = default_group_commit(cpus);
        assert_eq!(
            (c.store_writers, c.batch_overlap_us),
            (writers, Some(overlap_us))
        );
        // What an operator sets stays, 0 included.
        let set = ["--store-writers", "3", "--batch-overlap-us", "0"];
        let (_, c) = parse(&set, &[DB]).unwrap();
        assert_eq!((c.store_writers, c.batch_overlap_us), (3, Some(0)));
        let env = [DB, ("TRIGGERS_BATCH_OVERLAP_US", "2500")];
        assert_eq!(parse(&[], &env).unwrap().1.batch_overlap_us, Some(2500));
        assert!(parse(&["--batch-overlap-us", "soon"], &[DB]).is_err());
    }

    #[test]
    fn connections_per_core_leave_the_reserved_descriptors_of_the_open_files_limit() {
        let args = [
            "--ingress-cores",
            "2",
            "--store-writers",
            "2",
            "--store-pool-size",
            "8",
            "--delivery-concurrency",
            "100",
        ];
        let (_, c) = parse(&args, &[DB]).unwrap();
        // 2 + 8 + 5 + 4 database connections, 300 for deliveries (in flight, raced while
        // connecting, idle), 8 for scrapes, 64 fixed, 8 for the cores.
        assert_eq!(c.database_connections_max(), 19);
        assert_eq!(c.descriptors_reserved(), 399);
        // A limit far above the option's: the option.
        assert_eq!(c.connections_within(1 << 20), 20_000);
        assert_eq!(c.connections_within(u64::MAX), 20_000);
        // Below it: what is left, shared by the cores.
        assert_eq!(c.connections_within(4096), (4096 - 399) / 2);
        assert_eq!(c.connections_within(399 + 2 * 500 + 1), 500);
        // A limit that does not even hold the reserve: the floor.
        assert_eq!(c.connections_within(400), CONNECTIONS_PER_CORE_MIN);
        assert_eq!(c.connections_within(0), CONNECTIONS_PER_CORE_MIN);
        // An option below the floor stays.
        let (_, c) = parse(
            &[&args[..], &["--connections-per-core-max", "3"]].concat(),
            &[DB],
        )
        .unwrap();
        assert_eq!(c.connections_within(0), 3);
        assert_eq!(c.connections_within(1 << 20), 3);
    }

    #[test]
    fn an_ingress_slice_is_off_or_within_what_the_kernel_takes() {
        assert_eq!(parse(&[], &[DB]).unwrap().1.ingress_slice_us, 0);
        for ok in ["0", "100", "100000"] {
            let (_, c) = parse(&["--ingress-slice-us", ok], &[DB]).unwrap();
            assert_eq!(c.ingress_slice_us.to_string(), ok);
        }
        for bad in ["1", "99", "100001", "-1", "short"] {
            assert!(parse(&["--ingress-slice-us", bad], &[DB]).is_err(), "{bad}");
        }
    }

    #[test]
    fn ingress_cores_leave_a_core_to_a_local_database() {
        for url in [
            "postgres://u@localhost/db",
            "postgres://u@127.0.0.1:5432/db",
            "postgres://u@[::1]/db",
            "postgresql:///db?host=/var/run/postgresql",
            "host=/tmp,localhost dbname=db",
            "dbname=db",
        ] {
            assert!(DatabaseUrl::parse(url).unwrap().is_local(), "{url}");
        }
        for url in [
            "postgres://u@db.internal/db",
            "postgres://u@10.0.0.5/db",
            "host=localhost,db.internal dbname=db",
            "not a url",
        ] {
            assert!(
                !DatabaseUrl::parse(url).is_ok_and(|u| u.is_local()),
                "{url}"
            );
        }
        assert_eq!(default_ingress_cores(2, true), 1);
        assert_eq!(default_ingress_cores(1, true), 1);
        assert_eq!(default_ingress_cores(16, true), 15);
        assert_eq!(default_ingress_cores(2, false), 2);
        let cpus = std::thread::available_parallelism().unwrap().get();
        let (_, local) = parse(&[], &[DB]).unwrap();
        assert_eq!(local.ingress_cores, cpus.saturating_sub(1).max(1));
        let (_, remote) = parse(&[], &[("DATABASE_URL", "postgres://u@db.internal/db")]).unwrap();
        assert_eq!(remote.ingress_cores, cpus);
    }

    #[test]
    fn flags_win_over_environment() {
        // A flag overrides the variable, which overrides the default.
        let (_, c) = parse(
            &["--ack", "fast", "--ingress-cores=3"],
            &[
                DB,
                ("TRIGGERS_ACK", "durable"),
                ("TRIGGERS_LISTEN", "127.0.0.1:1"),
            ],
        )
        .unwrap();
        assert_eq!(c.ack, AckMode::Fast);
        assert_eq!(c.ingress_cores, 3);
        assert_eq!(c.listen, "127.0.0.1:1".parse().unwrap());
    }

    #[test]
    fn triggers_database_url_wins_over_database_url() {
        let (_, c) = parse(
            &[],
            &[DB, ("TRIGGERS_DATABASE_URL", "postgres://x@h/other")],
        )
        .unwrap();
        assert_eq!(c.database_url.pg, "postgres://x@h/other");
    }

    #[test]
    fn bare_boolean_flag_means_true() {
        let (_, c) = parse(&["--allow-private-webhooks", "migrate"], &[DB]).unwrap();
        assert!(c.allow_private_webhooks);
        let (cmd, c) = parse(&["--allow-private-webhooks", "false", "migrate"], &[DB]).unwrap();
        assert!(!c.allow_private_webhooks);
        assert_eq!(cmd, Command::Migrate);
        // probe needs no database URL: an image's health check has only the listen address.
        let (cmd, c) = parse(&["probe", "--listen", "0.0.0.0:8181"], &[]).unwrap();
        assert_eq!(cmd, Command::Probe);
        assert_eq!(c.listen, "0.0.0.0:8181".parse().unwrap());
    }

    #[test]
    fn malformed_values_name_the_option() {
        let e = parse(&["--ack", "maybe"], &[DB]).unwrap_err();
        assert_eq!(e.0, "--ack \"maybe\": expected durable or fast");
        let e = parse(&[], &[DB, ("TRIGGERS_INGRESS_CORES", "two")]).unwrap_err();
        assert_eq!(
            e.0,
            "TRIGGERS_INGRESS_CORES=\"two\": expected a whole number"
        );
        let e = parse(&["--retry-schedule", "1s,2x"], &[DB]).unwrap_err();
        assert!(e.0.contains("`2x` is not a duration"), "{}", e.0);
    }

    #[test]
    fn unknown_flags_and_variables_stop_start_up() {
        assert!(parse(&["--lsiten", "x"], &[DB])
            .unwrap_err()
            .0
            .contains("unknown flag --lsiten"));
        let e = parse(&[], &[DB, ("TRIGGERS_LISTN", "x")]).unwrap_err();
        assert!(e.0.contains("unknown environment variable TRIGGERS_LISTN"));
    }

    #[test]
    fn database_url_is_required() {
        let e = parse(&[], &[]).unwrap_err();
        assert!(e.0.contains("--database-url"), "{}", e.0);
        // --help needs nothing.
        assert_eq!(parse(&["--help"], &[]).unwrap().0, Command::Help);
    }

    #[test]
    fn a_password_file_is_for_a_url_without_a_password() {
        let file = ["--database-password-file", "/run/secrets/db"];
        let (_, c) = parse(&file, &[("DATABASE_URL", "postgres://u@h/d")]).unwrap();
        assert_eq!(c.database_password_file.as_deref(), Some("/run/secrets/db"));
        let e = parse(&file, &[("DATABASE_URL", "postgres://u:p@h/d")]).unwrap_err();
        assert!(e.0.contains("give it once"), "{}", e.0);
        let e = parse(&file, &[("DATABASE_URL", "host=h user=u password=p")]).unwrap_err();
        assert!(e.0.contains("give it once"), "{}", e.0);
    }

    #[test]
    fn limit_relations_are_checked() {
        let e = parse(&["--payload-bytes-max", "600000"], &[DB]).unwrap_err();
        assert!(
            e.0.contains("must be above 0 and below --body-bytes-max"),
            "{}",
            e.0
        );
        let e = parse(
            &[
                "--batch-events-max",
                "20000",
                "--write-queue-events-max",
                "100",
            ],
            &[DB],
        )
        .unwrap_err();
        assert!(e.0.contains("cannot exceed"), "{}", e.0);
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("s").is_err());
        let (_, c) = parse(&["--retry-schedule", "100ms, 200ms"], &[DB]).unwrap();
        assert_eq!(
            c.retry_delays(),
            &[Duration::from_millis(100), Duration::from_millis(200)]
        );
    }

    #[test]
    fn no_time_option_names_more_than_ten_years() {
        let base = [("DATABASE_URL", "postgres://x@h/db")];
        let try_one = |flag: &str, value: String| {
            let args = vec![format!("--{flag}"), value];
            let env: Vec<(String, String)> = base
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Config::from_args_and_env(args, env).map(|_| ())
        };
        let mut checked = 0;
        for (flag, _, _, _, _) in OPTIONS {
            let per_second: u64 = match flag.rsplit('-').next() {
                Some("us") => 1_000_000,
                Some("ms") => 1_000,
                Some("s") => 1,
                _ => continue,
            };
            let max = TIME_OPTION_MAX.as_secs() * per_second;
            for over in [max + 1, u64::MAX] {
                let e = try_one(flag, over.to_string()).unwrap_err();
                assert!(format!("{e}").contains("ten years"), "--{flag} {over}: {e}");
            }
            checked += 1;
        }
        assert!(checked >= 19, "{checked} time options");
        for schedule in ["18446744073709551615m", "5256001m", "315360001s"] {
            let e = try_one("retry-schedule", schedule.into()).unwrap_err();
            let e = format!("{e}");
            assert!(
                e.contains("ten years") || e.contains("not a duration"),
                "{e}"
            );
        }
        assert!(try_one("retry-schedule", "1s,5256000m".into()).is_ok());
        // A count that would make a runtime of that many threads is refused, not a panic.
        let e = try_one("store-threads", u64::MAX.to_string()).unwrap_err();
        assert!(format!("{e}").contains("1..=1024"), "{e}");
    }

    #[test]
    fn the_readme_table_lists_every_option() {
        // `python3 scripts/readme-config.py` rewrites it from `triggers --help`.
        let readme = include_str!("../README.md");
        for (flag, env, default, _, _) in OPTIONS {
            let default = if default.is_empty() { "none" } else { default };
            let row = format!("| `--{flag}` | `{env}` | `{default}` |");
            assert!(readme.contains(&row), "README.md lacks {row}");
        }
    }

    #[test]
    fn help_lists_every_option_with_env_and_default() {
        let help = Config::help();
        for (flag, env, _, _, _) in OPTIONS {
            assert!(help.contains(&format!("--{flag}")), "{flag}");
            assert!(help.contains(env), "{env}");
        }
        assert!(help.contains("[default: 0.0.0.0:8080]"));
    }
}
