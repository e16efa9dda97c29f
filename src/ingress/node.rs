//! What the ingress cores of a node share: the in-flight body budget, and whether each core is
//! alive.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// What every core of the node holds.
#[derive(Clone)]
pub struct Node {
    /// The in-flight body budget.
    pub bodies: Arc<BodyBudget>,
    /// Which cores are alive.
    pub liveness: Arc<Liveness>,
}

/// Bytes of request bodies being read or handled at once, node-wide (`--inflight-body-bytes-max`).
pub struct BodyBudget {
    used: AtomicUsize,
    max: usize,
}

/// Bytes of the budget held by one request; given back when dropped.
pub struct BodyLease {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl BodyBudget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> Arc<BodyBudget> {
        Arc::new(BodyBudget {
            used: AtomicUsize::new(0),
            max,
        })
    }

    /// An empty lease to grow as the body's size becomes known.
    pub fn lease(self: &Arc<Self>) -> BodyLease {
        BodyLease {
            budget: Arc::clone(self),
            bytes: 0,
        }
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

impl BodyLease {
    /// Take `n` more bytes; `false` (and nothing taken) when the budget has no room.
    pub fn grow(&mut self, n: usize) -> bool {
        let budget = &self.budget;
        let mut used = budget.used.load(Ordering::Relaxed);
        loop {
            let Some(next) = used.checked_add(n).filter(|&t| t <= budget.max) else {
                return false;
            };
            match budget.used.compare_exchange_weak(
                used,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.bytes += n;
                    return true;
                }
                Err(actual) => used = actual,
            }
        }
    }
}

impl Drop for BodyLease {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Whether each ingress core is running. A core that stops for any reason other than shutdown
/// (in builds that unwind on panic; release builds abort the whole process) is marked dead, and
/// `/health/live` answers 503 while any core is.
pub struct Liveness {
    alive: Vec<AtomicBool>,
    stopping: AtomicBool,
}

/// Marks its core alive while it lives, and dead when dropped (by a panic, or at shutdown). A
/// core stopped by a panic also shuts its listeners down, so the kernel stops handing it new
/// connections and the other cores take them all.
pub struct AliveGuard {
    liveness: Arc<Liveness>,
    core: usize,
    listeners: Vec<std::os::fd::RawFd>,
}

impl Liveness {
    /// `cores` cores, none started yet (each is alive from when its guard is taken).
    pub fn new(cores: usize) -> Arc<Liveness> {
        Arc::new(Liveness {
            alive: (0..cores).map(|_| AtomicBool::new(false)).collect(),
            stopping: AtomicBool::new(false),
        })
    }

    /// Mark `core` (listening on `listeners`) alive until the guard drops.
    pub fn guard(self: &Arc<Self>, core: usize, listeners: Vec<std::os::fd::RawFd>) -> AliveGuard {
        self.alive[core].store(true, Ordering::SeqCst);
        AliveGuard {
            liveness: Arc::clone(self),
            core,
            listeners,
        }
    }

    /// The server is shutting down: cores that stop now are not dead.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// The cores that stopped while the server was not shutting down.
    pub fn dead(&self) -> Vec<usize> {
        if self.stopping.load(Ordering::SeqCst) {
            return Vec::new();
        }
        (0..self.alive.len())
            .filter(|&i| !self.alive[i].load(Ordering::SeqCst))
            .collect()
    }
}

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.liveness.alive[self.core].store(false, Ordering::SeqCst);
        if std::thread::panicking() {
            tracing::error!(core = self.core, "ingress core stopped by a panic");
            for &fd in &self.listeners {
                // SAFETY: shutdown(2) on a descriptor this core's listener owns and that stays
                // open (only its owner closes it); it takes the socket out of the SO_REUSEPORT
                // group, so new connections go to the live cores.
                unsafe {
                    libc::shutdown(fd, libc::SHUT_RDWR);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_take_and_give_back_bytes_within_the_budget() {
        let b = BodyBudget::new(100);
        let mut a = b.lease();
        assert!(a.grow(60));
        let mut c = b.lease();
        assert!(!c.grow(41), "over the budget: refused, nothing taken");
        assert!(c.grow(40));
        assert_eq!(b.used(), 100);
        drop(a);
        assert_eq!(b.used(), 40);
        assert!(!c.grow(usize::MAX), "no overflow");
        drop(c);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn a_core_whose_guard_drops_is_dead_unless_the_server_stops() {
        let l = Liveness::new(2);
        let g0 = l.guard(0, Vec::new());
        let g1 = l.guard(1, Vec::new());
        assert!(l.dead().is_empty());
        drop(g1);
        assert_eq!(l.dead(), vec![1]);
        l.stopping();
        drop(g0);
        assert!(l.dead().is_empty());
    }
}
