//! The key format, tiers, and what a verified key tells a core about its organization.
//!
//! A key is exactly 64 characters: `zap_live_` (or `zap_test_`), then 55 base62 characters, the
//! first 16 of which are the public key id (looked up by index) and the other 39 the secret (only
//! its Argon2id hash is stored).

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
}

impl OrgInfo {
    /// A free-tier organization without webhook, for unit tests.
    #[cfg(test)]
    pub fn test(id: OrgId) -> OrgInfo {
        OrgInfo {
            id,
            limit: Tier::Free.limit_per_minute(),
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

/// `X-API-Key` and `Authorization: Bearer` both name keys of this server's shape, different ones:
/// a gateway in front that judged the request by one may have passed it for the other's
/// organization, so neither is taken. A bearer token of another shape (a gateway's own) is not
/// the server's to judge: `X-API-Key` is the key then.
pub fn keys_disagree(api_key: Option<&[u8]>, authorization: Option<&[u8]>) -> bool {
    // The bearer is read only beside an X-API-Key (the usual request has one or the other).
    let Some(key) = api_key else {
        return false;
    };
    let Some(bearer) = key_from_headers(None, authorization) else {
        return false;
    };
    bearer != key.trim_ascii() && ApiKey::parse(bearer).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_different_keys_in_one_request_disagree() {
        let (a, b) = (ApiKey::generate().unwrap(), ApiKey::generate().unwrap());
        let bearer = |k: &str| format!("Bearer {k}").into_bytes();
        let disagree = |key: &str, auth: &[u8]| keys_disagree(Some(key.as_bytes()), Some(auth));
        assert!(disagree(a.as_str(), &bearer(b.as_str())));
        assert!(!disagree(a.as_str(), &bearer(a.as_str())));
        assert!(!disagree(&format!(" {} ", a.as_str()), &bearer(a.as_str())));
        // A gateway's own token, or another scheme, beside the key.
        assert!(!disagree(a.as_str(), b"Bearer eyJhbGciOiJIUzI1NiJ9.e30.x"));
        assert!(!disagree(a.as_str(), b"Basic dXNlcjpwYXNz"));
        assert!(!keys_disagree(None, Some(&bearer(b.as_str()))));
        assert!(!keys_disagree(Some(a.as_str().as_bytes()), None));
    }

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
    fn tiers() {
        assert_eq!(
            Tier::parse("business").map(Tier::limit_per_minute),
            Some(10_000)
        );
        assert_eq!(Tier::parse("gold"), None);
        assert_eq!(Tier::Enterprise.as_str(), "enterprise");
    }
}
