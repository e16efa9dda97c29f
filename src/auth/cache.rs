//! Each core's cache of verified keys, and the change epochs that keep a verification that raced
//! with a rotation from being cached.
//!
//! The cache maps a keyed 128-bit hash of the whole key to its organization, so a warm request
//! costs one hash and one map lookup and never runs Argon2.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::time::Instant;

use super::key::OrgInfo;
use crate::config::{AUTH_REFUSED_TTL, ORG_CHANGES_REMEMBERED_MAX};
use crate::ids::OrgId;

/// A keyed hash of a whole key: what the cache stores instead of the key.
pub type KeyHash = u128;

/// The answer of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cached {
    /// Verified before.
    Hit(OrgInfo),
    /// Refused recently: refuse again without asking the store.
    Refused,
    /// Not known: verify in the store pool.
    Miss,
}

/// When organizations last changed, so a verification that began before *its* organization changed
/// is not cached, while changes to other organizations don't disturb it.
#[derive(Debug, Default)]
pub struct Changes {
    epoch: u64,
    flushed_at: u64,
    by_org: HashMap<OrgId, u64, ahash::RandomState>,
}

impl Changes {
    /// The current epoch: take it before a verification starts.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// `org` changed now (`None`: any may have).
    pub fn record(&mut self, org: Option<OrgId>) {
        self.epoch += 1;
        match org {
            Some(org) if self.by_org.len() < ORG_CHANGES_REMEMBERED_MAX => {
                self.by_org.insert(org, self.epoch);
            }
            _ => {
                self.by_org.clear();
                self.flushed_at = self.epoch;
            }
        }
    }

    /// Whether `org` changed after `epoch`.
    pub fn changed_since(&self, org: OrgId, epoch: u64) -> bool {
        self.flushed_at > epoch || self.by_org.get(&org).is_some_and(|&at| at > epoch)
    }
}

/// One core's verified keys. Invalidated by organization when a key rotates or a webhook changes.
pub struct KeyCache {
    verified: HashMap<KeyHash, OrgInfo, ahash::RandomState>,
    refused: HashMap<KeyHash, Instant, ahash::RandomState>,
    capacity: usize,
    hash_a: ahash::RandomState,
    hash_b: ahash::RandomState,
    changes: Changes,
}

impl KeyCache {
    /// A cache holding up to `capacity` verified keys (and as many refused ones).
    pub fn new(capacity: usize) -> Self {
        KeyCache {
            verified: HashMap::with_hasher(ahash::RandomState::new()),
            refused: HashMap::with_hasher(ahash::RandomState::new()),
            capacity,
            hash_a: ahash::RandomState::new(),
            hash_b: ahash::RandomState::new(),
            changes: Changes::default(),
        }
    }

    /// The cache's hash of `key`.
    pub fn hash(&self, key: &[u8]) -> KeyHash {
        let h = |s: &ahash::RandomState| {
            let mut h = s.build_hasher();
            h.write(key);
            h.finish()
        };
        (u128::from(h(&self.hash_a)) << 64) | u128::from(h(&self.hash_b))
    }

    /// Look a key up by its hash.
    pub fn get(&mut self, hash: KeyHash) -> Cached {
        if let Some(info) = self.verified.get(&hash) {
            return Cached::Hit(*info);
        }
        match self.refused.get(&hash) {
            Some(at) if at.elapsed() < AUTH_REFUSED_TTL => Cached::Refused,
            Some(_) => {
                self.refused.remove(&hash);
                Cached::Miss
            }
            None => Cached::Miss,
        }
    }

    /// The invalidation epoch: take it before asking the store, hand it back to `insert`.
    pub fn epoch(&self) -> u64 {
        self.changes.epoch()
    }

    /// Remember a verified key, unless its organization changed since `epoch` (then the answer may
    /// describe a key that was just rotated away, and the caller must verify again).
    pub fn insert(&mut self, hash: KeyHash, info: OrgInfo, epoch: u64) -> bool {
        if self.changes.changed_since(info.id, epoch) {
            return false;
        }
        if self.verified.len() >= self.capacity {
            // Forget an arbitrary entry; a forgotten key costs one verification.
            if let Some(k) = self.verified.keys().next().copied() {
                self.verified.remove(&k);
            }
        }
        self.verified.insert(hash, info);
        true
    }

    /// Remember a refused key for a few seconds.
    pub fn insert_refused(&mut self, hash: KeyHash) {
        if self.refused.len() >= self.capacity {
            self.refused.retain(|_, at| at.elapsed() < AUTH_REFUSED_TTL);
            if self.refused.len() >= self.capacity {
                self.refused.clear();
            }
        }
        self.refused.insert(hash, Instant::now());
    }

    /// Forget what is cached about `org` (all organizations with `None`).
    pub fn org_changed(&mut self, org: Option<OrgId>) {
        self.changes.record(org);
        match org {
            Some(org) => self.verified.retain(|_, info| info.id != org),
            None => self.verified.clear(),
        }
        // A rotated-in key may have been refused a moment ago by a node that didn't know it yet.
        self.refused.clear();
    }

    /// Verified keys held.
    pub fn len(&self) -> usize {
        self.verified.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.verified.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn cache_invalidation_by_org_and_epoch() {
        let mut c = KeyCache::new(10);
        let a = OrgInfo::test(OrgId(Uuid::from_u128(1)));
        let b = OrgInfo::test(OrgId(Uuid::from_u128(2)));
        let (ha, hb) = (c.hash(b"key-a"), c.hash(b"key-b"));
        assert_ne!(ha, hb);
        let e = c.epoch();
        assert!(c.insert(ha, a, e));
        assert!(c.insert(hb, b, e));
        assert_eq!(c.get(ha), Cached::Hit(a));
        c.org_changed(Some(a.id));
        assert_eq!(c.get(ha), Cached::Miss);
        assert_eq!(c.get(hb), Cached::Hit(b));
        // An answer that raced with the invalidation is not cached...
        assert!(!c.insert(ha, a, e));
        assert_eq!(c.get(ha), Cached::Miss);
        // ...but a change to another organization does not disturb B's verification.
        assert!(c.insert(hb, b, e));
        c.org_changed(None);
        assert!(
            !c.insert(hb, b, e),
            "a flush invalidates every answer in flight"
        );
    }

    #[test]
    fn changes_are_tracked_per_organization() {
        let (a, b) = (OrgId(Uuid::from_u128(1)), OrgId(Uuid::from_u128(2)));
        let mut ch = Changes::default();
        let start = ch.epoch();
        ch.record(Some(a));
        assert!(ch.changed_since(a, start));
        assert!(!ch.changed_since(b, start));
        assert!(!ch.changed_since(a, ch.epoch()));
        ch.record(None);
        assert!(ch.changed_since(b, start));
    }

    #[test]
    fn refused_keys_are_remembered_and_capacity_holds() {
        let mut c = KeyCache::new(2);
        let h = c.hash(b"bad");
        c.insert_refused(h);
        assert_eq!(c.get(h), Cached::Refused);
        for i in 0..5u128 {
            let e = c.epoch();
            c.insert(i, OrgInfo::test(OrgId(Uuid::from_u128(i))), e);
        }
        assert_eq!(c.len(), 2);
    }
}
