//! The form of an endpoint's signing secret (Standard Webhooks): `whsec_` and the standard
//! base64 of the key's bytes, padded or not. The key is those bytes (HMAC-SHA256 takes any
//! length). The server makes [`SIGNING_SECRET_BYTES`](crate::config::SIGNING_SECRET_BYTES)
//! random bytes; a secret given on create or rotate (a team that keeps the secret its receivers
//! already verify with, as when moving from Svix or another Standard Webhooks sender) holds 24
//! to 64 bytes, as Svix takes. It is kept
//! with its `=` padding (the form every secret the server makes has), whether it came with it or
//! not: the key, and so every signature, is the same.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine;

use crate::config::{SIGNING_SECRET_GIVEN_BYTES_MAX, SIGNING_SECRET_GIVEN_BYTES_MIN};

/// What every secret starts with.
pub const PREFIX: &str = "whsec_";

/// The standard base64 (`+` and `/`) of `text`, with all of its `=` padding or none; bits left
/// over at the end must be zero, so a key has one spelling but for the padding.
fn decode(text: &str) -> Option<Vec<u8>> {
    STANDARD
        .decode(text)
        .or_else(|_| STANDARD_NO_PAD.decode(text))
        .ok()
}

/// The secret of these key bytes (padded base64).
pub fn encode(bytes: &[u8]) -> String {
    format!("{PREFIX}{}", STANDARD.encode(bytes))
}

/// The key of a secret: its bytes; `None` when it is not `whsec_` and base64. Any length, so a
/// secret stored before the length rule (a version 1 database's) still signs.
pub fn key_bytes(secret: &str) -> Option<Vec<u8>> {
    decode(secret.strip_prefix(PREFIX)?)
}

/// A secret given on create or rotate as it is kept: `whsec_` and the padded base64 of its key
/// (the same key, and so the same signatures, as the secret given, which may lack its padding;
/// a node of an older build reads only the padded form). `Err`: why it can't be used.
pub fn normalize(secret: &str) -> Result<String, String> {
    let Some(b64) = secret.strip_prefix(PREFIX) else {
        return Err(format!(
            "signing_secret must start with `{PREFIX}` (a Standard Webhooks secret)"
        ));
    };
    let Some(bytes) = decode(b64) else {
        return Err(format!(
            "signing_secret must be `{PREFIX}` and the standard base64 of the key's bytes"
        ));
    };
    let n = bytes.len();
    if !(SIGNING_SECRET_GIVEN_BYTES_MIN..=SIGNING_SECRET_GIVEN_BYTES_MAX).contains(&n) {
        return Err(format!(
            "signing_secret must hold {SIGNING_SECRET_GIVEN_BYTES_MIN} to \
             {SIGNING_SECRET_GIVEN_BYTES_MAX} bytes of key, got {n}"
        ));
    }
    Ok(encode(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SIGNING_SECRET_BYTES;

    #[test]
    fn secrets_of_24_to_64_bytes_in_standard_base64_are_taken_padded_or_not() {
        // Svix's own example secret: 24 bytes, no padding needed.
        let svix = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        assert_eq!(normalize(svix).as_deref(), Ok(svix));
        let b64 = |n: usize| STANDARD.encode(vec![0xfb; n]);
        for n in [24, 25, 26, 32, 63, 64] {
            let padded = format!("whsec_{}", b64(n));
            assert_eq!(normalize(&padded).as_ref(), Ok(&padded), "{n} bytes");
            assert_eq!(key_bytes(&padded), Some(vec![0xfb; n]));
            let bare = padded.trim_end_matches('=');
            assert_eq!(normalize(bare).as_ref(), Ok(&padded), "{n} bytes unpadded");
            assert_eq!(key_bytes(bare), Some(vec![0xfb; n]));
        }
        for n in [0, 1, 23, 65, 1000] {
            let e = normalize(&format!("whsec_{}", b64(n))).unwrap_err();
            assert!(e.contains(&format!("got {n}")), "{e}");
        }
    }

    #[test]
    fn anything_else_is_refused_with_what_is_wrong() {
        let form = "the standard base64";
        for (secret, says) in [
            (
                "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                "must start with `whsec_`",
            ),
            ("WHSEC_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "must start"),
            ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLa-w", form), // base64url's `-`
            ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLa_w", form),
            ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS w", form),
            ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n", form),
            ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwA", form), // 33 characters: no whole byte
            ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwAB", form), // leftover bits set
            ("whsec_", "got 0"),
            // 25 bytes: `==` or no padding, never half of it.
            ("whsec_WlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWg=", form),
            ("whsec_WlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpa=Wg", form),
        ] {
            let e = normalize(secret).expect_err(secret);
            assert!(e.contains(says), "{secret:?}: {e}");
        }
    }

    #[test]
    fn a_made_secret_is_one_that_would_be_taken() {
        let s = encode(&[7; SIGNING_SECRET_BYTES]);
        assert_eq!(normalize(&s).as_ref(), Ok(&s));
        assert_eq!(key_bytes(&s), Some(vec![7; SIGNING_SECRET_BYTES]));
    }
}
