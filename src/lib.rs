//! # triggers
//!
//! A Triggers API server: organizations POST events with an API key; every `201` means the event
//! is committed to PostgreSQL; committed events are delivered, with retries, to each of the
//! organization's endpoints whose event-type patterns take them, and pull clients page and ack
//! their inbox.
//!
//! ## Layout
//! The runtime flow is ingress → shard (the owner core) → store (group commit) → delivery, and the
//! imports follow it: a stage names only the bottom modules and never a later stage; `server`
//! hands each later stage to the earlier ones as a bounded channel or a trait object
//! (`scripts/import-cycles.py` and `../shared/tools/arch-check.sh` check it).
//!
//! - [`server`]: `run(config, listeners, shutdown)` starts everything and wires the sinks;
//!   `Running::finish` is the shutdown sequence. `main` parses the configuration and calls it.
//! - [`ingress`]: HTTP on monoio, one pinned thread per core: sockets, parsing, routing, rendering.
//! - [`shard`]: what an owner core owns (token buckets, dedup window), admission and forwarding,
//!   and the mesh of mailboxes between cores.
//! - [`store`]: the tokio store pool: group commit, the queries (answering values), LISTEN/NOTIFY,
//!   the health probe, migrations.
//! - [`delivery`]: the webhook delivery pool: its connections and SQL, claims, attempts, retries.
//! - Bottom modules every stage may use: [`flow`] (the messages between stages and the sinks),
//!   [`auth`] (keys, caches, Argon2, single flight), [`config`] (every option and fixed limit),
//!   [`db`] (connections, error classes, binary COPY), [`chunked`] (the chunked decoder of
//!   HTTP/1.1 bodies, for requests and receivers' answers), [`url_policy`] (webhook URL rules, SSRF
//!   policy), [`hosts`] (webhook hosts' addresses: one lookup for many connections, old addresses
//!   while the resolver fails), [`event_types`] (endpoint patterns, the operational types), [`endpoint_headers`]
//!   (the headers an endpoint sends of its own), [`signing_secret`] (the form of a `whsec_`
//!   secret), [`tls`] (the TLS set-up of every connection out: deliveries, PostgreSQL),
//!   [`metrics`], [`error`] and [`reply`] (the HTTP error table and answer), [`json`], [`ids`],
//!   [`logging`], [`shutdown`] (core-local signals), [`deadline`] (core-local deadlines).
//!
//! ## The life of `POST /api/events`
//! 1. An ingress core reads the request into the connection's buffer, enforcing head and body
//!    limits before reading on, and validates the body with simd-json. The payload stays the bytes
//!    it arrived in: a `Bytes` slice of the request.
//! 2. The core's key cache maps a keyed hash of the key to the organization; a miss asks the store
//!    pool, which looks the key id up and runs Argon2id on a blocking thread (one verification per
//!    key at a time, per core and per node).
//! 3. The organization's owner core (a pure function of its id) spends a token from its bucket and
//!    checks its recent-dedup window; a request that landed elsewhere hops there over a bounded
//!    mailbox. No locks: each core touches only its own state.
//! 4. The owner queues the event for the store pool (bounded; full → 503). A writer takes all that
//!    is waiting, asks delivery for a plan per event, writes the batch in one transaction (binary
//!    COPY; dedup ids through the unique index) and, after COMMIT, sends every answer (an
//!    [`flow::answer::Ingested`] value) to its connection's core, one message per core, then
//!    publishes the committed events to delivery.
//! 5. The core renders `201` with the id and creation time.

#![warn(missing_docs)]
#![deny(clippy::print_stdout)]

pub mod auth;
pub mod chunked;
pub mod config;
pub mod db;
pub mod deadline;
pub mod delivery;
pub mod endpoint_headers;
pub mod error;
pub mod event_types;
pub mod flow;
pub mod hosts;
pub mod ids;
pub mod ingress;
pub mod json;
pub mod logging;
pub mod metrics;
pub mod reply;
pub mod server;
pub mod shard;
pub mod shutdown;
pub mod signing_secret;
pub mod store;
pub mod tls;
pub mod url_policy;
