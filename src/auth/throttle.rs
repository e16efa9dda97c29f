//! Throttles by client address, with a hard memory bound: failed keys per address (so a flood of
//! bad keys costs a map lookup each, not Argon2), and key generations and rotations per address
//! and per node.
//!
//! An address is an IPv4 address or an IPv6 /64 (one subscriber's network: an attacker with a
//! /64 must not get 2^64 buckets). Buckets live in a map of fixed capacity; when it is full the
//! oldest bucket is forgotten (first in, first out, O(1)), which at worst gives an address a fresh
//! budget, never more memory.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// The unit a throttle counts: an IPv4 address, or the /64 an IPv6 address is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressKey {
    /// An IPv4 address (also one written as IPv4-mapped IPv6).
    V4([u8; 4]),
    /// The first 64 bits of an IPv6 address.
    V6Prefix(u64),
}

impl From<IpAddr> for AddressKey {
    fn from(ip: IpAddr) -> AddressKey {
        match ip {
            IpAddr::V4(v4) => AddressKey::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddressKey::V4(v4.octets()),
                None => AddressKey::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// A token bucket refilled continuously to `capacity` over a minute.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(capacity: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: capacity,
            at: now,
        }
    }

    fn refill(&mut self, capacity: f64, now: Instant) {
        let per_s = capacity / 60.0;
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * per_s).min(capacity);
        self.at = now;
    }

    /// Seconds until one token is there (0 when there is one now).
    fn wait_s(&self, capacity: f64) -> u32 {
        if self.tokens >= 1.0 {
            return 0;
        }
        let per_s = capacity / 60.0;
        (((1.0 - self.tokens) / per_s).ceil() as u32).max(1)
    }
}

/// Buckets by address, at most `capacity` of them; the oldest goes first.
struct Buckets {
    map: HashMap<AddressKey, Bucket, ahash::RandomState>,
    order: VecDeque<AddressKey>,
    capacity: usize,
    per_minute: f64,
}

impl Buckets {
    fn new(capacity: usize, per_minute: usize) -> Buckets {
        Buckets {
            map: HashMap::with_hasher(ahash::RandomState::new()),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            per_minute: per_minute as f64,
        }
    }

    /// The bucket of `key`, refilled to `now` (a full one if it is not known).
    fn get(&mut self, key: AddressKey, now: Instant) -> &mut Bucket {
        if !self.map.contains_key(&key) {
            while self.map.len() >= self.capacity {
                match self.order.pop_front() {
                    Some(old) => {
                        self.map.remove(&old);
                    }
                    None => break,
                }
            }
            self.order.push_back(key);
            self.map.insert(key, Bucket::full(self.per_minute, now));
        }
        let per_minute = self.per_minute;
        let b = self.map.get_mut(&key).expect("inserted above");
        b.refill(per_minute, now);
        b
    }

    /// Seconds until `key` may act, without spending; `None` when it may now. Unknown keys are
    /// not stored.
    fn peek(&mut self, key: AddressKey, now: Instant) -> Option<u32> {
        if !self.map.contains_key(&key) {
            return None;
        }
        let per_minute = self.per_minute;
        let b = self.get(key, now);
        match b.wait_s(per_minute) {
            0 => None,
            s => Some(s),
        }
    }

    /// Spend one token of `key`; `Err(seconds)` when there is none.
    fn take(&mut self, key: AddressKey, now: Instant) -> Result<(), u32> {
        let per_minute = self.per_minute;
        let b = self.get(key, now);
        match b.wait_s(per_minute) {
            0 => {
                b.tokens -= 1.0;
                Ok(())
            }
            s => Err(s),
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

/// Failed keys allowed per address per minute before the address is refused without checking.
pub struct FailureThrottle {
    buckets: Mutex<Buckets>,
}

impl FailureThrottle {
    /// `per_minute` failures per address, at most `entries` addresses remembered.
    pub fn new(per_minute: usize, entries: usize) -> FailureThrottle {
        FailureThrottle {
            buckets: Mutex::new(Buckets::new(entries, per_minute)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buckets> {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Some(seconds)` when `peer` has used up its failures and must wait before trying again.
    pub fn throttled(&self, peer: IpAddr) -> Option<u32> {
        self.lock().peek(peer.into(), Instant::now())
    }

    /// Count one failed key from `peer`.
    pub fn record_failure(&self, peer: IpAddr) {
        let mut b = self.lock();
        let bucket = b.get(peer.into(), Instant::now());
        bucket.tokens = (bucket.tokens - 1.0).max(0.0);
    }

    /// Addresses remembered now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Key generations and rotations: a budget per address and one for the node.
pub struct KeyOpsLimiter {
    per_address: Mutex<Buckets>,
    node: Mutex<(Bucket, f64)>,
}

impl KeyOpsLimiter {
    /// `per_address` and `per_node` operations a minute; `entries` addresses remembered.
    pub fn new(per_address: usize, per_node: usize, entries: usize) -> KeyOpsLimiter {
        KeyOpsLimiter {
            per_address: Mutex::new(Buckets::new(entries, per_address)),
            node: Mutex::new((
                Bucket::full(per_node as f64, Instant::now()),
                per_node as f64,
            )),
        }
    }

    /// Spend one operation for `peer`; `Err(seconds)` to wait when its or the node's budget is
    /// spent (then nothing is spent).
    pub fn take(&self, peer: IpAddr) -> Result<(), u32> {
        let now = Instant::now();
        let mut node = self.node.lock().unwrap_or_else(|p| p.into_inner());
        let (bucket, capacity) = &mut *node;
        bucket.refill(*capacity, now);
        match bucket.wait_s(*capacity) {
            0 => {}
            s => return Err(s),
        }
        self.per_address
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(peer.into(), now)?;
        bucket.tokens -= 1.0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_addresses_count_by_their_64_prefix() {
        assert_eq!(
            AddressKey::from(ip("2001:db8:1:2::1")),
            AddressKey::from(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        );
        assert_ne!(
            AddressKey::from(ip("2001:db8:1:2::1")),
            AddressKey::from(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            AddressKey::from(ip("::ffff:10.0.0.1")),
            AddressKey::from(ip("10.0.0.1"))
        );
    }

    #[test]
    fn failures_are_throttled_per_address() {
        let t = FailureThrottle::new(3, 100);
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        for _ in 0..3 {
            assert_eq!(t.throttled(a), None);
            t.record_failure(a);
        }
        // 3 a minute: the next one is 20 s away.
        let wait = t.throttled(a).unwrap();
        assert!((19..=20).contains(&wait), "{wait}");
        assert_eq!(t.throttled(b), None, "other addresses are not affected");
        // Another address of the same IPv6 /64 shares its budget.
        let t = FailureThrottle::new(1, 100);
        t.record_failure(ip("2001:db8::1"));
        assert!(t.throttled(ip("2001:db8::2")).is_some());
    }

    #[test]
    fn memory_is_bounded_and_the_oldest_address_goes_first() {
        let t = FailureThrottle::new(1, 3);
        for i in 0..1000u32 {
            t.record_failure(IpAddr::from(i.to_be_bytes()));
        }
        assert_eq!(t.len(), 3);
        // The last three are remembered; the first is forgotten.
        assert!(t.throttled(IpAddr::from(999u32.to_be_bytes())).is_some());
        assert!(t.throttled(IpAddr::from(0u32.to_be_bytes())).is_none());
        // Peeking at an unknown address stores nothing.
        assert!(t.throttled(ip("192.0.2.1")).is_none());
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn key_operations_are_limited_per_address_and_per_node() {
        let l = KeyOpsLimiter::new(2, 3, 100);
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        assert!(l.take(a).is_ok());
        assert!(l.take(a).is_ok());
        assert!(l.take(a).is_err(), "two per address");
        assert!(l.take(b).is_ok());
        let wait = l.take(b).unwrap_err();
        assert!(wait >= 1, "three per node: {wait}");
    }
}
