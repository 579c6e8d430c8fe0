//! A rotated token's grace period: until a set time, agents may still join
//! with the token before the current one. Only its SHA-256 is kept (in the
//! Cluster's annotations, where anyone who can read the Cluster sees it), so
//! the old token itself is written nowhere once it is replaced.
//! [`crate::clusters::rotation`] decides when a grace applies.

use jiff::Timestamp;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

/// `sha256:<64 hex>`: how a token is named where it must not be written.
pub fn fingerprint(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The previous token of a cluster, by fingerprint, and until when it is
/// accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grace {
    pub previous: String,
    pub until: Timestamp,
}

impl Grace {
    /// Whether `token` is the previous token and the grace is not over.
    /// Constant time in the fingerprint comparison.
    pub fn accepts(&self, token: &str, now: Timestamp) -> bool {
        let given = fingerprint(token);
        let same: bool = given.as_bytes().ct_eq(self.previous.as_bytes()).into();
        same && now < self.until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_sha256_hex() {
        assert_eq!(
            fingerprint("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn the_previous_token_is_accepted_until_the_end() {
        let until: Timestamp = "2026-12-03T18:00:00Z".parse().unwrap();
        let grace = Grace {
            previous: fingerprint("old"),
            until,
        };
        let before: Timestamp = "2026-12-03T17:59:59Z".parse().unwrap();
        assert!(grace.accepts("old", before));
        assert!(!grace.accepts("other", before));
        assert!(!grace.accepts("", before));
        assert!(!grace.accepts("old", until));
    }
}
