//! # triggers
//!
//! A Triggers API server: organizations POST events with an API key; every `201` means the event
//! is committed to PostgreSQL; committed events are delivered to the organization's webhook with
//! retries, and pull clients page and ack their inbox.
//!
//! ## Layout
//! - [`config`]: flags and `TRIGGERS_*` variables, every default and limit, validated.
//! - [`ingress`]: HTTP on monoio, one pinned thread per core, each with its own listener.
//! - [`shard`]: what one core owns (token buckets, dedup window) and the mesh between cores.
//! - [`auth`]: key format, per-core key cache; `auth::verify`: Argon2id off-core, failure throttle.
//! - [`store`]: the tokio store pool: group commit, queries, migrations, LISTEN/NOTIFY.
//! - [`delivery`]: the webhook delivery pool.
//! - [`metrics`]: per-core counters merged on scrape.
//! - [`error`], [`reply`], [`json`], [`ids`], [`shutdown`]: shared pieces.
//!
//! ## The life of `POST /api/events`
//! 1. An ingress core reads the request into the connection's buffer, enforcing head and body
//!    limits before reading on, and validates the body with simd-json. The payload stays the bytes
//!    it arrived in: a `Bytes` slice of the request.
//! 2. The core's key cache maps a keyed hash of the key to the organization; a miss asks the store
//!    pool, which looks the key id up and runs Argon2id on a blocking thread.
//! 3. The organization's owner core (a pure function of its id) spends a token from its bucket and
//!    checks its recent-dedup window; a request that landed elsewhere hops there over a bounded
//!    mailbox. No locks: each core touches only its own state.
//! 4. The owner queues the event for the store pool (bounded; full → 503). A writer takes all that
//!    is waiting, writes it in one transaction (binary COPY; dedup ids through the unique index)
//!    and, after COMMIT, sends every answer to its connection's core, one message per core.
//! 5. The core writes `201` with the id and creation time.

#![warn(missing_docs)]
#![deny(clippy::print_stdout)]

pub mod auth;
pub mod config;
pub mod delivery;
pub mod error;
pub mod ids;
pub mod ingress;
pub mod json;
pub mod logging;
pub mod metrics;
pub mod reply;
pub mod shard;
pub mod shutdown;
pub mod store;
