//! What one core owns: the organizations whose owner it is ([`mesh::owner_core`]), their token
//! buckets and recent-dedup window, and the mesh between cores. Plain structs touched only by
//! their core: no locks.
//!
//! - `owner`: admission, token spend, dedup window, forwarding to the owner and to the store.
//! - `state`: the shard itself (buckets and the dedup window of one core's organizations).
//! - `mesh`: mailboxes between cores and from the pools, the hop messages, the table of waiting
//!   requests; it is the `CoreLink` the pools answer through.
//! - `rate_limit`: the token bucket. `dedup`: the bounded recent-dedup window.

pub mod dedup;
pub mod mesh;
pub mod owner;
pub mod rate_limit;
pub mod state;
