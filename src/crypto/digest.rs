//! SHA-256 of a sequence of byte strings: the link of the audit chains
//! (`hash = SHA-256(prev_hash ‖ encoding)`), the same function Postgres's
//! built-in `sha256()` computes in the trail's trigger.

use sha2::{Digest, Sha256};

/// Length in bytes of a SHA-256 digest.
pub const DIGEST_LEN: usize = 32;

/// SHA-256 of the concatenation of `parts`.
pub fn sha256(parts: &[&[u8]]) -> [u8; DIGEST_LEN] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_published_test_vector_whatever_the_split() {
        // FIPS 180-2, "abc".
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(hex::encode(sha256(&[b"abc"])), want);
        assert_eq!(hex::encode(sha256(&[b"a", b"", b"bc"])), want);
    }
}
