//! API keys: their format, and each core's cache of verified keys.
//!
//! A key is exactly 64 characters: `zap_live_` (or `zap_test_`), then 55 base62 characters, the
//! first 16 of which are the public key id (looked up by index) and the other 39 the secret (only
//! its Argon2id hash is stored). The cache maps a keyed 128-bit hash of the whole key to its
//! organization, so a warm request costs one hash and one map lookup and never runs Argon2.
//! `verify` holds the pool-side check.

pub mod verify;

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use crate::ids::OrgId;

/// Total key length.
pub const KEY_LEN: usize = 64;
/// `zap_live_` / `zap_test_`.
pub const KEY_SCHEME_LEN: usize = 9;
/// Length of the public key id.
pub const KEY_ID_LEN: usize = 16;
/// Characters shown as `key_prefix`: scheme plus key id.
pub const KEY_PREFIX_LEN: usize = KEY_SCHEME_LEN + KEY_ID_LEN;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A pricing tier and its events-per-minute limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// 100 events per minute.
    Free,
    /// 1,000 events per minute.
    Pro,
    /// 10,000 events per minute.
    Business,
    /// 100,000 events per minute.
    Enterprise,
}

impl Tier {
    /// Parse the API name of a tier.
    pub fn parse(s: &str) -> Option<Tier> {
        match s {
            "free" => Some(Tier::Free),
            "pro" => Some(Tier::Pro),
            "business" => Some(Tier::Business),
            "enterprise" => Some(Tier::Enterprise),
            _ => None,
        }
    }

    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Free => "free",
            Tier::Pro => "pro",
            Tier::Business => "business",
            Tier::Enterprise => "enterprise",
        }
    }

    /// Events per minute.
    pub fn limit_per_minute(self) -> u32 {
        match self {
            Tier::Free => 100,
            Tier::Pro => 1_000,
            Tier::Business => 10_000,
            Tier::Enterprise => 100_000,
        }
    }
}

/// What a verified key tells a core about its organization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrgInfo {
    /// The organization.
    pub id: OrgId,
    /// Events per minute (from the organization's row, so an operator can tune one org).
    pub limit: u32,
    /// Whether a webhook is configured (its events are delivered).
    pub has_webhook: bool,
}

impl OrgInfo {
    /// A free-tier organization without webhook, for unit tests.
    #[cfg(test)]
    pub fn test(id: OrgId) -> OrgInfo {
        OrgInfo {
            id,
            limit: Tier::Free.limit_per_minute(),
            has_webhook: false,
        }
    }
}

/// A syntactically valid API key.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey([u8; KEY_LEN]);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKey({}…)", self.prefix())
    }
}

impl ApiKey {
    /// Parse a key as sent by a client; `None` when it cannot be a key.
    pub fn parse(text: &[u8]) -> Option<ApiKey> {
        let bytes: [u8; KEY_LEN] = text.try_into().ok()?;
        let scheme = &bytes[..KEY_SCHEME_LEN];
        if scheme != b"zap_live_" && scheme != b"zap_test_" {
            return None;
        }
        if !bytes[KEY_SCHEME_LEN..]
            .iter()
            .all(u8::is_ascii_alphanumeric)
        {
            return None;
        }
        Some(ApiKey(bytes))
    }

    /// A new random live key.
    pub fn generate() -> Result<ApiKey, getrandom::Error> {
        let mut key = [0u8; KEY_LEN];
        key[..KEY_SCHEME_LEN].copy_from_slice(b"zap_live_");
        let mut filled = KEY_SCHEME_LEN;
        let mut random = [0u8; 96];
        while filled < KEY_LEN {
            getrandom::fill(&mut random)?;
            for b in random {
                // 248 = 4 × 62: rejecting the rest keeps every character equally likely.
                if b < 248 && filled < KEY_LEN {
                    key[filled] = BASE62[(b % 62) as usize];
                    filled += 1;
                }
            }
        }
        Ok(ApiKey(key))
    }

    /// The whole key.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("keys are ASCII by construction")
    }

    /// The public key id (16 characters after the scheme).
    pub fn key_id(&self) -> &str {
        &self.as_str()[KEY_SCHEME_LEN..KEY_PREFIX_LEN]
    }

    /// The secret part (39 characters).
    pub fn secret(&self) -> &str {
        &self.as_str()[KEY_PREFIX_LEN..]
    }

    /// Scheme and key id: the first 25 characters, safe to show.
    pub fn prefix(&self) -> &str {
        &self.as_str()[..KEY_PREFIX_LEN]
    }
}

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

/// How long a refused key is refused without asking again.
const REFUSED_TTL: Duration = Duration::from_secs(10);

/// When organizations last changed, so a verification that began before *its* organization changed
/// is not cached, while changes to other organizations don't disturb it.
#[derive(Debug, Default)]
pub struct Changes {
    epoch: u64,
    flushed_at: u64,
    by_org: HashMap<OrgId, u64, ahash::RandomState>,
}

/// Organizations remembered by [`Changes`]; past this they are forgotten and count as one flush.
const CHANGES_MAX: usize = 16_384;

impl Changes {
    /// The current epoch: take it before a verification starts.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// `org` changed now (`None`: any may have).
    pub fn record(&mut self, org: Option<OrgId>) {
        self.epoch += 1;
        match org {
            Some(org) if self.by_org.len() < CHANGES_MAX => {
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
            Some(at) if at.elapsed() < REFUSED_TTL => Cached::Refused,
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
            self.refused.retain(|_, at| at.elapsed() < REFUSED_TTL);
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

/// The key of a request: `X-API-Key: <key>` or `Authorization: Bearer <key>`.
pub fn key_from_headers<'a>(
    api_key: Option<&'a [u8]>,
    authorization: Option<&'a [u8]>,
) -> Option<&'a [u8]> {
    if let Some(k) = api_key {
        return Some(k.trim_ascii());
    }
    let auth = authorization?.trim_ascii();
    if auth.len() > 7 && auth[..7].eq_ignore_ascii_case(b"bearer ") {
        return Some(auth[7..].trim_ascii());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let k = ApiKey::generate().unwrap();
        let s = k.as_str();
        assert_eq!(s.len(), 64);
        assert!(s.starts_with("zap_live_"));
        assert!(s[9..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(k.key_id().len(), 16);
        assert_eq!(k.secret().len(), 39);
        assert_eq!(k.prefix(), &s[..25]);
        assert_eq!(ApiKey::parse(s.as_bytes()), Some(k.clone()));
        assert_ne!(ApiKey::generate().unwrap(), k);
    }

    #[test]
    fn malformed_keys_do_not_parse() {
        let good = ApiKey::generate().unwrap();
        let s = good.as_str();
        assert!(ApiKey::parse(&s.as_bytes()[..63]).is_none());
        assert!(ApiKey::parse(format!("{s}x").as_bytes()).is_none());
        assert!(ApiKey::parse(s.replacen("zap_live_", "zap_prod_", 1).as_bytes()).is_none());
        let mut bad = s.as_bytes().to_vec();
        bad[40] = b'-';
        assert!(ApiKey::parse(&bad).is_none());
        assert!(ApiKey::parse(s.replacen("zap_live_", "zap_test_", 1).as_bytes()).is_some());
    }

    #[test]
    fn headers_give_the_key() {
        assert_eq!(key_from_headers(Some(b" k "), None), Some(&b"k"[..]));
        assert_eq!(
            key_from_headers(None, Some(b"Bearer abc")),
            Some(&b"abc"[..])
        );
        assert_eq!(
            key_from_headers(None, Some(b"bearer  abc ")),
            Some(&b"abc"[..])
        );
        assert_eq!(key_from_headers(None, Some(b"Basic abc")), None);
        assert_eq!(key_from_headers(None, None), None);
    }

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

    #[test]
    fn tiers() {
        assert_eq!(
            Tier::parse("business").map(Tier::limit_per_minute),
            Some(10_000)
        );
        assert_eq!(Tier::parse("gold"), None);
        assert_eq!(Tier::Enterprise.as_str(), "enterprise");
    }
}
