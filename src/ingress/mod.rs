//! HTTP on monoio, one instance per ingress core: sockets, parsing, routing and rendering. The
//! owner-core logic behind a request lives in `shard`; the work behind a query in `store`.
//!
//! - `listen`: the SO_REUSEPORT listeners, the pinned core threads, each core's accept loop.
//! - `core`: a core's context, its mailbox task, and the waits of its requests (each bounded).
//! - `node`: what the cores share: the in-flight body budget, each core's liveness.
//! - `conn`: one keep-alive connection: buffers, limits, timeouts, pipelining.
//! - `parse`: request head and body framing. `router`: (method, path) to a route.
//! - `request`: a complete request and the checks every handler shares.
//! - `handle`: authentication and dispatch to the handlers, one file per API area, each rendering
//!   its own answers: `events`, `inbox`, `endpoints`, `admin` (keys and webhook), `ops` (health,
//!   metrics).
//! - `response`: status line, headers and body into the write buffer.

pub mod access;
mod admin;
pub mod conn;
pub mod core;
pub mod endpoints;
pub mod events;
pub mod handle;
pub mod inbox;
pub mod listen;
pub mod node;
pub mod ops;
pub mod parse;
pub mod request;
pub mod response;
pub mod router;
