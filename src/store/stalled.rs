//! Sessions a stopped node left mid-protocol. A COPY waiting for its rows (or a pipeline waiting
//! for its Sync) is `active` in PostgreSQL, waiting on `ClientRead`, and so is a large answer
//! the node no longer reads (`ClientWrite`): no idle timeout ends it, a statement timeout is not
//! acted on while it waits for the client, and TCP keepalive does not either when the node's
//! kernel answers for it (a process stopped with SIGSTOP, a container paused by the cgroup
//! freezer; a network cut or a paused VM is found by keepalive). Its locks (on the partitions it
//! writes or reads: a retention round's detach waits on them), its connection slot and the
//! vacuum horizon stay held for as long as the node is stopped.
//!
//! No live node leaves a session so for long: each of its transactions has `--db-timeout-ms`,
//! after which it drops the connection. So every node, every [`STALLED_CHECK_EVERY`] (on the
//! health probe's connection, while the database takes writes), ends the server's sessions
//! (known by their application names) in this database that have waited so for longer than
//! [`STALLED_AFTER_TIMEOUTS`] times its `--db-timeout-ms` (the nodes of a cluster share it). The
//! stopped node, when it goes on, finds its connection gone: the transaction was rolled back
//! whole, and is retried or answered 503 like any other.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::config::{Config, STALLED_AFTER_TIMEOUTS, STALLED_CHECK_EVERY};
use crate::db::{application_names, describe};
use crate::metrics::Metrics;

/// End the sessions stalled mid-protocol (`$1`: the server's application names, one a line,
/// which PostgreSQL keeps to printable ASCII; `$2`: after how many milliseconds, as text);
/// how many were ended.
const END_STALLED: &str = "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) \
     FROM pg_stat_activity \
     WHERE datname = current_database() AND pid <> pg_backend_pid() \
       AND application_name = ANY(string_to_array($1, chr(10))) AND state = 'active' \
       AND wait_event IN ('ClientRead', 'ClientWrite') \
       AND query_start < clock_timestamp() - $2::text::bigint * interval '1 millisecond'";

/// What the check needs, and when it last ran.
pub struct Stalled {
    names: String,
    after_ms: String,
    last: Instant,
    warned: bool,
}

impl Stalled {
    /// The check for `config`'s application names and `--db-timeout-ms`.
    pub fn new(config: &Config) -> Self {
        let names = application_names(config).unwrap_or_default();
        let after = Config::ms(config.db_timeout_ms) * STALLED_AFTER_TIMEOUTS;
        Self {
            names: names.join("\n"),
            after_ms: after.as_millis().to_string(),
            last: Instant::now(),
            warned: false,
        }
    }

    /// When [`STALLED_CHECK_EVERY`] has passed since the last, end the stalled sessions, on
    /// `client`, within `limit`; counted in `triggers_db_stalled_sessions_ended_total`.
    pub async fn check(&mut self, client: &Client, limit: Duration, metrics: &Metrics) {
        if self.last.elapsed() < STALLED_CHECK_EVERY {
            return;
        }
        self.last = Instant::now();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&self.names, &self.after_ms];
        let ended = client.query_one(END_STALLED, &params);
        match tokio::time::timeout(limit, ended).await {
            Ok(Ok(row)) => {
                let ended: i64 = row.get(0);
                if ended > 0 {
                    metrics
                        .stalled_sessions_ended
                        .fetch_add(ended as u64, Ordering::Relaxed);
                    tracing::warn!(
                        sessions = ended,
                        after_ms = %self.after_ms,
                        "ended database sessions of a node stopped mid-statement (a COPY \
                         waiting for its rows, an answer not read); their locks are free"
                    );
                }
            }
            // Ending another role's session needs its membership (or pg_signal_backend): said
            // once. A check that failed or took too long is made again at the next.
            Ok(Err(e)) if !self.warned => {
                self.warned = true;
                tracing::warn!(error = %describe(&e), "stalled sessions could not be checked");
            }
            _ => {}
        }
    }
}
