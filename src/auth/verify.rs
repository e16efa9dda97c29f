//! Key verification in the store pool: Argon2id on blocking threads, never on an ingress core, at
//! most `argon2_concurrency` at once; and a throttle on failures per client address, so a flood of
//! bad keys costs a map lookup each, not 20 ms of CPU.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use tokio::sync::Semaphore;

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
}

impl Verifier {
    /// `concurrency` Argon2 runs at once; `failures_per_minute` failed keys per address.
    pub fn new(concurrency: usize, failures_per_minute: usize) -> Self {
        Verifier {
            argon2_slots: Semaphore::new(concurrency),
            failures: Mutex::new(HashMap::new()),
            failures_per_minute: failures_per_minute as f64,
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
    fn failures_are_throttled_per_address() {
        let v = Verifier::new(1, 3);
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
