//! Retention: the daily partitions of `events`, `deliveries` and `delivery_attempts` (see
//! `migrations/0004_retention.sql`). One node at a time (an advisory lock) creates the partitions
//! a week ahead and drops, whole, those older than `--retention-days`, with their dedup keys, a
//! day at a time and by the earlier of two clocks (see [`maintain`], [`Clocks`]); and
//! it removes the rate-limit buckets idle long enough to be full. It runs at start (before the
//! node is ready), every `RETENTION_EVERY`, and at once when a write finds no partition for its
//! row (a clock that jumped past the week made ahead).
//!
//! Locks: a new partition is created on its own and then attached, and an expired one detached
//! `CONCURRENTLY` before it is dropped; both take `SHARE UPDATE EXCLUSIVE` on the parent, which
//! does not wait for (nor stop) the writers' COPY. DDL waits at most `PARTITION_LOCK_TIMEOUT` for
//! its locks; what it could not do is done at the next round.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio_postgres::Client;
use uuid::Uuid;

use crate::config::{
    Config, PARTITIONS_AHEAD_DAYS, PARTITION_LOCK_TIMEOUT, RETENTION_DROP_PACE, RETENTION_EVERY,
    RETENTION_KICK_SPACING,
};
use crate::db::describe;
use crate::ids::Micros;
use crate::metrics::Metrics;

/// The partitioned tables, in the order a day is dropped (the records before their events).
pub const TABLES: [&str; 3] = ["delivery_attempts", "deliveries", "events"];

/// Arbitrary constant naming the maintainer's lock ("retentio"). DDL of one's own on the
/// partitioned tables (a trigger, say) takes it too, so it never races a partition being attached
/// (which copies the parent's triggers to the new partition).
pub const LOCK_ID: i64 = 0x7265_7465_6e74_696f;

const MS_PER_DAY: i64 = 86_400_000;

/// What one round did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Maintained {
    /// Partitions created.
    pub created: Vec<String>,
    /// Partitions dropped.
    pub dropped: Vec<String>,
    /// Dedup keys removed with the dropped events.
    pub dedup_keys_removed: u64,
    /// Idle rate-limit buckets removed, organizations' and endpoints' (`rate::prune_idle`).
    pub rate_budgets_removed: u64,
}

/// One partition as the catalog shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Partition {
    name: String,
    /// Its lower bound in ms (`None`: MINVALUE).
    from_ms: Option<i64>,
    /// Its upper bound in ms.
    to_ms: i64,
    /// A `DETACH … CONCURRENTLY` was interrupted: it must be finalized.
    detach_pending: bool,
}

/// The uuid that starts UTC day `day` (days since 1970-01-01): its first millisecond in the
/// UUIDv7 time field, every other bit zero. Every id created that day sorts at or after it.
pub fn day_bound(day: i64) -> Uuid {
    let ms = (day * MS_PER_DAY) as u128;
    Uuid::from_u128(ms << 80)
}

/// The millisecond time field of a UUIDv7.
fn uuid_ms(id: Uuid) -> i64 {
    (id.as_u128() >> 80) as i64
}

/// The UTC day (days since 1970-01-01) of `t`.
fn day_of(t: Micros) -> i64 {
    t.0.div_euclid(MS_PER_DAY * 1000)
}

/// `YYYYMMDD` of UTC day `day`, the suffix of its partitions' names.
fn day_name(day: i64) -> String {
    let rfc = Micros(day * MS_PER_DAY * 1000).rfc3339();
    rfc[..10].replace('-', "")
}

/// The bounds of `FOR VALUES FROM (…) TO (…)` as `pg_get_expr` writes them; `None` for anything
/// else (a partition someone attached by hand with other bounds is left alone).
fn parse_bounds(expr: &str) -> Option<(Option<i64>, i64)> {
    let rest = expr.strip_prefix("FOR VALUES FROM (")?;
    let (from, rest) = rest.split_once(") TO (")?;
    let to = rest.strip_suffix(')')?;
    let value = |v: &str| -> Option<Option<i64>> {
        if v == "MINVALUE" {
            return Some(None);
        }
        let text = v.strip_prefix('\'')?.strip_suffix('\'')?;
        Some(Some(uuid_ms(Uuid::parse_str(text).ok()?)))
    };
    Some((value(from)?, value(to)??))
}

async fn partitions(client: &Client, table: &str) -> Result<Vec<Partition>, String> {
    let rows = client
        .query(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid), i.inhdetachpending \
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = $1::text::regclass",
            &[&table],
        )
        .await
        .map_err(|e| describe(&e))?;
    let mut out: Vec<Partition> = rows
        .iter()
        .filter_map(|r| {
            let (from_ms, to_ms) = parse_bounds(r.get::<_, &str>(1))?;
            Some(Partition {
                name: r.get(0),
                from_ms,
                to_ms,
                detach_pending: r.get(2),
            })
        })
        .collect();
    out.sort_unstable_by_key(|p| p.to_ms);
    Ok(out)
}

/// The two clocks a round goes by: this node's (its ids carry it) and the database's (every
/// node's round reads the same one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clocks {
    /// This node's clock.
    pub node: Micros,
    /// The database's `clock_timestamp()`.
    pub database: Micros,
}

impl Clocks {
    /// Both clocks at `t` (as when they agree; a test moves time with it).
    pub fn at(t: Micros) -> Clocks {
        Clocks {
            node: t,
            database: t,
        }
    }

    /// The database's clock read between `sent` and `answered` by this node's, taken as
    /// halfway.
    fn halfway(sent: Micros, database_us: i64, answered: Micros) -> Clocks {
        Clocks {
            node: Micros(sent.0 + (answered.0 - sent.0) / 2),
            database: Micros(database_us),
        }
    }

    /// This node's clock less the database's, in µs.
    pub fn offset_us(self) -> i64 {
        self.node.0 - self.database.0
    }

    /// What expiry goes by: the earlier clock, so that neither one running ahead (one node's,
    /// or the database host's) drops a day before it has expired.
    fn expiry_now(self) -> Micros {
        Micros(self.node.0.min(self.database.0))
    }

    /// The last day to have partitions: a week past the later clock's day (this node writes
    /// ids by its own clock), but no more than two weeks past the database's (a node clock
    /// years ahead would otherwise have a partition made for every day in between; its events
    /// find none, and are answered 503, until its clock is set right).
    fn last_day(self) -> i64 {
        let database = day_of(self.database);
        day_of(self.node)
            .max(database)
            .min(database + PARTITIONS_AHEAD_DAYS)
            + PARTITIONS_AHEAD_DAYS
    }
}

/// Create the partitions up to `Clocks::last_day` and drop, when `retention_days` is not 0,
/// the oldest day whose every event is older than `retention_days` by `Clocks::expiry_now`:
/// one day a round, and only when the last drop was `RETENTION_DROP_PACE` or more before (by
/// the same clock; `triggers_retention`). A clock that jumps weeks ahead on a box where the node
/// and the database share it, or a node restarting in a loop, drops at most a day an hour, not
/// the whole window at once; after a long stop, expired days go one an hour. The caller makes
/// sure no other node does the same at once ([`round_on`] takes a lock).
pub async fn maintain(
    client: &Client,
    clocks: Clocks,
    retention_days: u64,
) -> Result<Maintained, String> {
    let mut done = Maintained::default();
    client
        .batch_execute(&format!(
            "SET lock_timeout = {}",
            PARTITION_LOCK_TIMEOUT.as_millis()
        ))
        .await
        .map_err(|e| describe(&e))?;
    let now_ms = clocks.expiry_now().0 / 1000;
    let cutoff_ms = now_ms - retention_days as i64 * MS_PER_DAY;
    let mut expired = Vec::new();
    for table in TABLES {
        let existing = partitions(client, table).await?;
        // Ahead: from the end of the last partition (day-aligned by construction).
        let mut day = existing.last().map_or_else(
            || day_of(clocks.expiry_now()).max(day_of(clocks.database) - 1),
            |p| p.to_ms.div_euclid(MS_PER_DAY),
        );
        while day <= clocks.last_day() {
            let name = format!("{table}_{}", day_name(day));
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS {name} (LIKE {table} INCLUDING DEFAULTS); \
                 ALTER TABLE {table} ATTACH PARTITION {name} FOR VALUES FROM ('{}') TO ('{}')",
                day_bound(day),
                day_bound(day + 1)
            );
            client.batch_execute(&sql).await.map_err(|e| describe(&e))?;
            done.created.push(name);
            day += 1;
        }
        if retention_days != 0 {
            expired.extend(
                existing
                    .into_iter()
                    .filter(|p| p.to_ms <= cutoff_ms)
                    .map(|p| (table, p)),
            );
        }
    }
    // One day: the earliest end among the expired partitions of the three tables (they are the
    // same days, unless a round failed half-way). A detach that was interrupted is finished
    // whatever the pace.
    let pace_ms = RETENTION_DROP_PACE.as_millis() as i64;
    let paced = !expired.is_empty()
        && last_drop_ms(client)
            .await?
            .is_some_and(|last| last <= now_ms && now_ms - last < pace_ms);
    let day_end = expired
        .iter()
        .map(|(_, p)| p.to_ms)
        .min()
        .filter(|_| !paced);
    for (table, p) in &expired {
        if !p.detach_pending && Some(p.to_ms) > day_end {
            continue;
        }
        drop_partition(client, table, p, &mut done).await?;
    }
    if day_end.is_some() {
        client
            .execute(
                "INSERT INTO triggers_retention (id, last_drop_ms) VALUES (1, $1) \
                 ON CONFLICT (id) DO UPDATE SET last_drop_ms = EXCLUDED.last_drop_ms",
                &[&now_ms],
            )
            .await
            .map_err(|e| describe(&e))?;
    }
    done.rate_budgets_removed = super::rate::prune_idle(client).await?;
    client
        .batch_execute("RESET lock_timeout")
        .await
        .map_err(|e| describe(&e))?;
    Ok(done)
}

/// When a round last dropped a day, by the clock it went by.
async fn last_drop_ms(client: &Client) -> Result<Option<i64>, String> {
    Ok(client
        .query_opt(
            "SELECT last_drop_ms FROM triggers_retention WHERE id = 1",
            &[],
        )
        .await
        .map_err(|e| describe(&e))?
        .map(|r| r.get(0)))
}

/// Detach and drop one expired partition of `table` (an events partition with its dedup keys).
async fn drop_partition(
    client: &Client,
    table: &str,
    p: &Partition,
    done: &mut Maintained,
) -> Result<(), String> {
    if table == "events" {
        let from = p
            .from_ms
            .map_or(Uuid::nil(), |ms| day_bound(ms / MS_PER_DAY));
        let to = day_bound(p.to_ms / MS_PER_DAY);
        done.dedup_keys_removed += client
            .execute(
                "DELETE FROM dedup_keys WHERE event_id >= $1 AND event_id < $2",
                &[&from, &to],
            )
            .await
            .map_err(|e| describe(&e))?;
    }
    let detach = if p.detach_pending {
        format!("ALTER TABLE {table} DETACH PARTITION {} FINALIZE", p.name)
    } else {
        format!(
            "ALTER TABLE {table} DETACH PARTITION {} CONCURRENTLY",
            p.name
        )
    };
    client
        .batch_execute(&detach)
        .await
        .map_err(|e| describe(&e))?;
    client
        .batch_execute(&format!("DROP TABLE {}", p.name))
        .await
        .map_err(|e| describe(&e))?;
    done.dropped.push(p.name.clone());
    Ok(())
}

/// A connection for a round (its advisory lock goes with it).
pub async fn connect(config: &Config) -> Result<Client, String> {
    crate::db::connect(
        config,
        crate::db::Part::Retention,
        std::time::Duration::ZERO,
    )
    .await
}

/// One round on a connection of [`connect`]'s (which it closes), if no other node is doing one
/// (`Ok(None)` when another is), with the clocks it read (`None` when it could not).
async fn maintain_on(
    client: Client,
    config: &Config,
    metrics: &Metrics,
) -> (Option<Clocks>, Result<Option<Maintained>, String>) {
    let sent = Micros::now();
    // The lock is the session's, so PostgreSQL ends the session (and the lock goes with it) once
    // it has been idle for `idle_session_timeout`: a round sends its statements back to back, so
    // only a node stopped mid-round (SIGSTOP, a paused VM) leaves it idle; before, such a node
    // kept every other node's rounds out for as long as it stayed stopped. Set here, not when
    // the connection is made: the first round's connection waits idle while migrations run.
    let idle = crate::db::idle_ms(config).to_string();
    let row = client
        .query_one(
            "SELECT pg_try_advisory_lock($1), \
                    (extract(epoch FROM clock_timestamp()) * 1000000)::bigint, \
                    (SELECT id FROM events ORDER BY id DESC LIMIT 1), \
                    set_config('idle_session_timeout', $2, false)",
            &[&LOCK_ID, &idle],
        )
        .await;
    let row = match row {
        Ok(row) => row,
        Err(e) => return (None, Err(describe(&e))),
    };
    let clocks = Clocks::halfway(sent, row.get(1), Micros::now());
    note_newest(metrics, config, clocks, row.get(2));
    if !row.get::<_, bool>(0) {
        metrics
            .retention_ok_at
            .store(Micros::now().0 / 1_000_000, Ordering::Relaxed);
        return (Some(clocks), Ok(None));
    }
    let result = maintain(&client, clocks, config.retention_days).await;
    // The lock goes with the connection when it is dropped here.
    match &result {
        Ok(done) => {
            metrics
                .partitions_dropped
                .fetch_add(done.dropped.len() as u64, Ordering::Relaxed);
            metrics
                .retention_ok_at
                .store(Micros::now().0 / 1_000_000, Ordering::Relaxed);
        }
        Err(_) => {
            metrics.retention_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
    (Some(clocks), result.map(Some))
}

/// How far the newest event stored (`newest`) is ahead of the earlier of the two clocks, in µs;
/// 0 when it is not ahead.
fn newest_ahead_us(clocks: Clocks, newest: Option<Uuid>) -> i64 {
    let earlier = clocks.node.0.min(clocks.database.0);
    newest.map_or(0, |id| (uuid_ms(id) * 1000 - earlier).max(0))
}

/// Record how far the newest event is ahead of the clocks, and say so once when it goes past
/// `--clock-offset-max-ms` (and once when it is back): the clocks of a single box (node and
/// database on one clock, so no offset between them shows it) were set back, as on a board
/// without a real-time clock that started with an old time. Events taken meanwhile sort before
/// older ones, carry that time in their ids and `created_at`, and expire that much early.
fn note_newest(metrics: &Metrics, config: &Config, clocks: Clocks, newest: Option<Uuid>) {
    let ahead = newest_ahead_us(clocks, newest);
    let before = metrics.newest_event_ahead_us.swap(ahead, Ordering::Relaxed);
    let limit = config.clock_offset_max_ms as i64 * 1000;
    if limit == 0 {
        return;
    }
    if ahead > limit && before <= limit {
        tracing::error!(
            ahead_s = ahead / 1_000_000,
            newest = %newest.unwrap_or_default(),
            "the newest event stored is ahead of this node's and the database's clocks: they were \
             set back (a board without a real-time clock that started with an old time, or a clock \
             stepped back from far ahead). Events taken now sort before it and carry the clocks' \
             time; set the clocks right (NTP)"
        );
    } else if ahead <= limit && before > limit {
        tracing::info!("the clocks are past the newest event stored again");
    }
}

/// A round now, logged; the clocks it read, `None` when it could not.
pub async fn round(config: &Config, metrics: &Metrics) -> Option<Clocks> {
    round_on(None, config, metrics).await
}

/// A round on a connection opened beforehand (at start, while the migrations ran), or on a new
/// one (none given, or that one failed: the database was not up yet), logged; the clocks it
/// read (this node's and the database's), `None` when it could not.
///
/// Boxed, behind a `dyn Future`: its two callers (start-up, the periodic task) share one copy of
/// its state machine; as an `async fn` each had one inlined (with the one call of `maintain_on`
/// below, the binary 18.5 KB smaller).
#[inline(never)]
pub fn round_on<'a>(client: Option<Client>, config: &'a Config, metrics: &'a Metrics) -> Round<'a> {
    Box::pin(async move {
        let client = match client {
            Some(client) => Ok(client),
            None => connect(config).await,
        };
        // One call of `maintain_on`, so one copy of its state machine in the binary (there were
        // two calls, and two copies of ~12 KB).
        let (clocks, done) = match client {
            Ok(client) => maintain_on(client, config, metrics).await,
            Err(e) => (None, Err(e)),
        };
        match done {
            Ok(Some(done)) => {
                if !done.created.is_empty() || !done.dropped.is_empty() {
                    tracing::info!(
                        created = ?done.created,
                        dropped = ?done.dropped,
                        dedup_keys_removed = done.dedup_keys_removed,
                        rate_budgets_removed = done.rate_budgets_removed,
                        retention_days = config.retention_days,
                        "partitions maintained"
                    );
                }
            }
            Ok(None) => tracing::debug!("another node is maintaining the partitions"),
            Err(e) => {
                tracing::warn!(error = %e, "partition maintenance failed; retrying at the next round")
            }
        }
        clocks
    })
}

/// A round of [`round_on`], under way.
pub type Round<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Option<Clocks>> + Send + 'a>>;

/// Maintain the partitions every `RETENTION_EVERY` until the runtime stops, and when told that
/// a row found no partition (`missing`): then at once, but no sooner than `RETENTION_KICK_SPACING`
/// after the round before.
pub fn spawn(config: Arc<Config>, metrics: Arc<Metrics>, missing: Arc<tokio::sync::Notify>) {
    tokio::spawn(async move {
        let mut last = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RETENTION_EVERY) => {}
                _ = missing.notified() => {
                    tokio::time::sleep_until(last + RETENTION_KICK_SPACING).await;
                    tracing::warn!("a row found no partition: making the partitions now");
                }
            }
            round(&config, &metrics).await;
            last = tokio::time::Instant::now();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_US: i64 = MS_PER_DAY * 1000;

    #[test]
    fn the_newest_event_is_measured_against_the_earlier_clock() {
        let t = Micros(1_796_169_600_000_000);
        let at = |ms: i64| Some(new_v7_at(ms));
        let clocks = Clocks {
            node: t,
            database: Micros(t.0 + 5_000_000),
        };
        assert_eq!(newest_ahead_us(clocks, None), 0);
        assert_eq!(newest_ahead_us(clocks, at(t.0 / 1000 - 1_000)), 0);
        assert_eq!(newest_ahead_us(clocks, at(t.0 / 1000 + 2_000)), 2_000_000);
        let behind = Clocks {
            node: Micros(t.0 + 5_000_000),
            database: t,
        };
        assert_eq!(newest_ahead_us(behind, at(t.0 / 1000 + 2_000)), 2_000_000);
    }

    /// A UUIDv7 of millisecond `ms`.
    fn new_v7_at(ms: i64) -> Uuid {
        Uuid::from_u128(((ms as u128) << 80) | (0x7 << 76) | (0b10 << 62))
    }

    #[test]
    fn expiry_goes_by_the_earlier_clock_and_partitions_by_the_later_within_two_weeks() {
        let t = Micros(1_796_169_600_000_000); // 2026-12-02T00:00:00Z
        let today = day_of(t);
        let at = |node: i64, database: i64| Clocks {
            node: Micros(t.0 + node * DAY_US),
            database: Micros(t.0 + database * DAY_US),
        };
        for (node, database) in [(0, 0), (40, 0), (0, 40), (-3, 0), (0, -3)] {
            let clocks = at(node, database);
            assert_eq!(
                clocks.expiry_now(),
                Micros(t.0 + node.min(database) * DAY_US)
            );
        }
        assert_eq!(at(0, 0).last_day(), today + 7);
        // A node a day ahead writes tomorrow's ids: a week past its day.
        assert_eq!(at(1, 0).last_day(), today + 8);
        // A node behind: a week past the database's day.
        assert_eq!(at(-3, 0).last_day(), today + 7);
        // A node far ahead: no more than two weeks past the database's day.
        assert_eq!(at(40, 0).last_day(), today + 14);
        assert_eq!(at(3650, 0).last_day(), today + 14);
        // The database's clock ahead: a week past its day.
        assert_eq!(at(0, 40).last_day(), today + 47);
        assert_eq!(at(5, 0).offset_us(), 5 * DAY_US);
    }

    #[test]
    fn a_day_bound_is_the_v7_prefix_of_its_first_millisecond() {
        // 2026-12-02T00:00:00Z = 1_796_169_600_000 ms = 0x01a2_340d_0c00.
        let day = 1_796_169_600_000 / MS_PER_DAY;
        assert_eq!(
            day_bound(day).to_string(),
            "01a2340d-0c00-0000-0000-000000000000"
        );
        assert_eq!(day_name(day), "20261202");
        // An id made at any time that day (whatever its other bits) sorts in
        // [bound(day), bound(day + 1)), and its time field reads back.
        for offset_ms in [0, 1, MS_PER_DAY - 1] {
            let ms = day * MS_PER_DAY + offset_ms;
            for low in [0, (1u128 << 80) - 1] {
                let id = Uuid::from_u128(((ms as u128) << 80) | low);
                assert!(
                    day_bound(day) <= id && id < day_bound(day + 1),
                    "{offset_ms}"
                );
                assert_eq!(uuid_ms(id), ms);
            }
            assert_eq!(day_of(Micros(ms * 1000)), day);
        }
        assert_eq!(day_of(Micros(-1)), -1);
    }

    #[test]
    fn bounds_parse_as_postgres_writes_them() {
        assert_eq!(
            parse_bounds(
                "FOR VALUES FROM ('01a2340d-0c00-0000-0000-000000000000') \
                 TO ('01a23933-6800-0000-0000-000000000000')"
            ),
            Some((Some(1_796_169_600_000), 1_796_256_000_000))
        );
        assert_eq!(
            parse_bounds("FOR VALUES FROM (MINVALUE) TO ('01a2340d-0c00-0000-0000-000000000000')"),
            Some((None, 1_796_169_600_000))
        );
        for other in [
            "DEFAULT",
            "FOR VALUES IN (1)",
            "FOR VALUES FROM (MINVALUE) TO (MAXVALUE)",
            "FOR VALUES FROM ('x') TO ('y')",
        ] {
            assert_eq!(parse_bounds(other), None, "{other}");
        }
    }
}
