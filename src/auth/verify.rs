//! Key verification in the store pool: Argon2id on blocking threads, never on an ingress core, at
//! most `argon2_concurrency` at once; a throttle on failures per client address, so a flood of bad
//! keys costs a map lookup each, not 20 ms of CPU; and the node's cache of verified keys, shared by
//! its cores, so a key pays for Argon2 once per node (not once per core) and a key verified before
//! a flood of bad ones keeps working whichever core its next request lands on.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use tokio::sync::Semaphore;

use super::cache::{Changes, KeyHash};
use super::key::{ApiKey, OrgInfo};
use crate::ids::OrgId;

/// Why a key was not accepted (the database's own trouble is the caller's to report).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// Unknown key id, wrong secret, or a malformed key.
    Refused,
    /// This client address failed too often; it may try again after this many seconds.
    Throttled {
        /// Seconds until the next try is checked.
        retry_after_s: u32,
    },
}

/// Hash a secret with Argon2id (default parameters: 19 MiB, 2 passes) and a fresh random salt.
/// Blocking: call it on a blocking thread.
pub fn hash_secret(secret: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(secret.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| format!("argon2: {e}"))
}

/// Check a secret against a stored Argon2 PHC string. Blocking.
pub fn secret_matches(secret: &str, phc: &str) -> bool {
    Argon2::default()
        .verify_password(secret.as_bytes(), phc)
        .is_ok()
}

/// Failures allowed per address: a bucket of `per_minute` refilled over a minute.
struct FailureBucket {
    tokens: f64,
    at: Instant,
}

/// Verification state shared by the store pool's tasks.
pub struct Verifier {
    argon2_slots: Semaphore,
    failures: Mutex<HashMap<IpAddr, FailureBucket>>,
    failures_per_minute: f64,
    verified: Mutex<(HashMap<KeyHash, OrgInfo>, Changes)>,
    verified_max: usize,
    hash_a: ahash::RandomState,
    hash_b: ahash::RandomState,
}

impl Verifier {
    /// `concurrency` Argon2 runs at once; `failures_per_minute` failed keys per address;
    /// `verified_max` keys remembered.
    pub fn new(concurrency: usize, failures_per_minute: usize, verified_max: usize) -> Self {
        Verifier {
            argon2_slots: Semaphore::new(concurrency),
            failures: Mutex::new(HashMap::new()),
            failures_per_minute: failures_per_minute as f64,
            verified: Mutex::new((HashMap::new(), Changes::default())),
            verified_max,
            hash_a: ahash::RandomState::new(),
            hash_b: ahash::RandomState::new(),
        }
    }

    /// This node's hash of a key.
    pub fn hash_key(&self, key: &ApiKey) -> KeyHash {
        let h = |s: &ahash::RandomState| {
            let mut h = s.build_hasher();
            h.write(key.as_str().as_bytes());
            h.finish()
        };
        (u128::from(h(&self.hash_a)) << 64) | u128::from(h(&self.hash_b))
    }

    fn verified(&self) -> std::sync::MutexGuard<'_, (HashMap<KeyHash, OrgInfo>, Changes)> {
        self.verified.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A key this node verified before, if it still stands.
    pub fn cached(&self, hash: KeyHash) -> Option<OrgInfo> {
        self.verified().0.get(&hash).copied()
    }

    /// The invalidation epoch; take it before looking a key up, hand it to [`Verifier::remember`].
    pub fn epoch(&self) -> u64 {
        self.verified().1.epoch()
    }

    /// Remember a verified key unless its organization changed since `epoch`.
    pub fn remember(&self, hash: KeyHash, org: OrgInfo, epoch: u64) {
        let mut guard = self.verified();
        let (map, changes) = &mut *guard;
        if changes.changed_since(org.id, epoch) {
            return;
        }
        if map.len() >= self.verified_max {
            if let Some(k) = map.keys().next().copied() {
                map.remove(&k);
            }
        }
        map.insert(hash, org);
    }

    /// Forget what is known about `org` (every organization with `None`).
    pub fn org_changed(&self, org: Option<OrgId>) {
        let mut guard = self.verified();
        let (map, changes) = &mut *guard;
        changes.record(org);
        match org {
            Some(org) => map.retain(|_, info| info.id != org),
            None => map.clear(),
        }
    }

    fn refill(&self, b: &mut FailureBucket, now: Instant) {
        let per_s = self.failures_per_minute / 60.0;
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * per_s)
            .min(self.failures_per_minute);
        b.at = now;
    }

    /// `Some(seconds)` when `peer` has used up its failures and must wait before trying again.
    pub fn throttled(&self, peer: IpAddr) -> Option<u32> {
        let now = Instant::now();
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let b = map.get_mut(&peer)?;
        self.refill(b, now);
        if b.tokens >= 1.0 {
            return None;
        }
        let per_s = self.failures_per_minute / 60.0;
        Some((((1.0 - b.tokens) / per_s).ceil() as u32).max(1))
    }

    /// Count one failed key from `peer`.
    pub fn record_failure(&self, peer: IpAddr) {
        let now = Instant::now();
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 100_000 {
            // Addresses whose bucket is full again are the same as unknown ones.
            let full = self.failures_per_minute;
            let per_s = full / 60.0;
            map.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * per_s < full);
        }
        let b = map.entry(peer).or_insert(FailureBucket {
            tokens: self.failures_per_minute,
            at: now,
        });
        self.refill(b, now);
        b.tokens = (b.tokens - 1.0).max(0.0);
    }

    /// Check `secret` against `phc` on a blocking thread, waiting for an Argon2 slot first.
    pub async fn check(&self, secret: String, phc: String) -> bool {
        let Ok(_slot) = self.argon2_slots.acquire().await else {
            return false;
        };
        tokio::task::spawn_blocking(move || secret_matches(&secret, &phc))
            .await
            .unwrap_or(false)
    }

    /// Hash a new secret on a blocking thread, sharing the Argon2 slots with checks.
    pub async fn hash(&self, secret: String) -> Result<String, String> {
        let _slot = self
            .argon2_slots
            .acquire()
            .await
            .map_err(|e| e.to_string())?;
        tokio::task::spawn_blocking(move || hash_secret(&secret))
            .await
            .map_err(|e| e.to_string())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_check_round_trip_with_random_salts() {
        let a = hash_secret("s3cret").unwrap();
        let b = hash_secret("s3cret").unwrap();
        assert!(a.starts_with("$argon2id$"));
        assert_ne!(a, b, "each hash has its own salt");
        assert!(secret_matches("s3cret", &a));
        assert!(!secret_matches("s3cre7", &a));
        assert!(!secret_matches("s3cret", "not a phc string"));
    }

    #[test]
    fn verified_keys_are_shared_until_their_org_changes() {
        let v = Verifier::new(1, 3, 10);
        let key = ApiKey::generate().unwrap();
        let org = OrgInfo::test(OrgId(uuid::Uuid::from_u128(1)));
        let h = v.hash_key(&key);
        let e = v.epoch();
        v.remember(h, org, e);
        assert_eq!(v.cached(h), Some(org));
        v.org_changed(Some(org.id));
        assert_eq!(v.cached(h), None);
        // A verification that raced with the change is not remembered.
        v.remember(h, org, e);
        assert_eq!(v.cached(h), None);
    }

    #[test]
    fn failures_are_throttled_per_address() {
        let v = Verifier::new(1, 3, 10);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(v.throttled(a), None);
            v.record_failure(a);
        }
        // 3 a minute: the next one is 20 s away.
        let wait = v.throttled(a).unwrap();
        assert!((19..=20).contains(&wait), "{wait}");
        assert_eq!(v.throttled(b), None, "other addresses are not affected");
    }
}
