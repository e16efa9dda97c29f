//! The store pool: tokio tasks on deadpool-postgres connections. It reads the queues the ingress
//! cores write to, answers with values (never HTTP), and publishes committed events to delivery
//! through the sink the server wired.
//!
//! - `pool`: start and finish. `ctx`: what the tasks share; deadlines and failure mapping.
//! - `writer`: group commit. Writers take turns at the write queue; each takes what is waiting (up
//!   to `batch_events_max`), writes it in one transaction (binary COPY for events without dedup id,
//!   one `INSERT … ON CONFLICT DO NOTHING` into `dedup_keys` and `events` for those with one) and
//!   answers every event after COMMIT.
//!   `copy`: the binary COPY row encoder.
//! - `jobs`: everything else a request waits for, one file per area: `keys` (verification,
//!   generation, rotation), `endpoints` (the endpoints API), `webhook` (the default endpoint),
//!   `events` (detail, redeliver), `inbox` (pages, acks);
//!   `org`: changes every node must hear of; `rows`: the event columns the reads share;
//!   `rate`: each core's rate-limit spend, reported into the cluster's buckets; `lanes`: the
//!   tenants' fair turns at the job slots.
//! - `health`: the probe behind the health flag. `listen`: LISTEN/NOTIFY, so a key rotated or a
//!   webhook changed on another node reaches this node's caches within milliseconds. `stalled`:
//!   ends the sessions a stopped node left mid-COPY.
//! - `migrate`: the SQL files of `migrations/`. `retention`: the daily partitions, created ahead and
//!   dropped when expired.
//!
//! Every queue is bounded; a full one, or a database known to be down, answers 503 at once.

pub mod copy;
pub mod ctx;
pub mod endpoints;
pub mod events;
pub mod health;
pub mod inbox;
pub mod jobs;
pub mod keys;
pub mod lanes;
pub mod listen;
pub mod migrate;
pub mod org;
pub mod pool;
pub mod rate;
pub mod retention;
pub mod rows;
pub mod stalled;
pub mod webhook;
pub mod writer;
