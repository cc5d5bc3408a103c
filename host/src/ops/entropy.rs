//! Where the random choices imgforge makes on the host come from: the system's CSPRNG, or
//! (a recipe's `seed`) bytes derived from the seed and the variant's name, so that two builds of
//! the same recipe make the same choices and two variants make different ones.
//!
//! Derived bytes are HMAC-SHA256(seed, variant ‖ 0 ‖ purpose ‖ 0 ‖ draw ‖ block): `draw`
//! counts the draws of this variant, so two salts of one variant differ too, and the order of
//! the operations fixes every draw. Whoever knows the seed knows every salt and random
//! password it gives: a seed is a secret like the passwords it stands for.

use sha2::{Digest, Sha256};

/// HMAC-SHA256's block size.
const HMAC_BLOCK_BYTES: usize = 64;

/// The source of the host's random choices.
#[derive(Clone, Default)]
pub enum Entropy {
    /// The operating system's CSPRNG (every run differs).
    #[default]
    System,
    /// Derived from a seed and a variant's name.
    Derived {
        /// The seed's bytes (the HMAC key).
        seed: Vec<u8>,
        /// The variant's name.
        variant: String,
        /// Draws so far.
        draws: u64,
    },
}

impl std::fmt::Debug for Entropy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Entropy::System => f.write_str("System"),
            Entropy::Derived { variant, draws, .. } => write!(f, "Derived({variant:?}, {draws} draws)"),
        }
    }
}

/// HMAC-SHA256 (RFC 2104) of `message` under `key`.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; HMAC_BLOCK_BYTES];
    if key.len() > HMAC_BLOCK_BYTES {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(message).finalize();
    Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().into()
}

impl Entropy {
    /// Choices derived from `seed` for the variant `variant`.
    pub fn derived(seed: &str, variant: &str) -> Self {
        Entropy::Derived { seed: seed.as_bytes().to_vec(), variant: variant.to_owned(), draws: 0 }
    }

    /// Fills `buf` with bytes for `purpose` (`password-salt`, `random-password`, ...).
    pub fn fill(&mut self, purpose: &str, buf: &mut [u8]) {
        match self {
            Entropy::System => rand::Rng::fill_bytes(&mut rand::rng(), buf),
            Entropy::Derived { seed, variant, draws } => {
                let draw = *draws;
                *draws += 1;
                for (block, chunk) in buf.chunks_mut(32).enumerate() {
                    let mut message = Vec::with_capacity(variant.len() + purpose.len() + 18);
                    message.extend_from_slice(variant.as_bytes());
                    message.push(0);
                    message.extend_from_slice(purpose.as_bytes());
                    message.push(0);
                    message.extend_from_slice(&draw.to_be_bytes());
                    message.extend_from_slice(&(block as u64).to_be_bytes());
                    let mac = hmac_sha256(seed, &message);
                    chunk.copy_from_slice(&mac[..chunk.len()]);
                }
            }
        }
    }

    /// `count` characters of `alphabet` (at most 256 of them), each equally likely.
    pub fn choose(&mut self, purpose: &str, alphabet: &[u8], count: usize) -> String {
        assert!(!alphabet.is_empty() && alphabet.len() <= 256, "alphabet of 1 to 256 characters");
        // Bytes at or past the last whole multiple of the alphabet's size would favour its start.
        let limit = 256 - 256 % alphabet.len();
        let mut out = String::with_capacity(count);
        let mut buf = [0u8; 64];
        while out.len() < count {
            self.fill(purpose, &mut buf);
            for b in buf {
                if (b as usize) < limit && out.len() < count {
                    out.push(alphabet[b as usize % alphabet.len()] as char);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231's test cases 1, 2 and 6 (a key longer than the block).
    #[test]
    fn hmac_matches_rfc_4231() {
        let cases: [(&[u8], &[u8], &str); 3] = [
            (&[0x0b; 20], b"Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
            (
                b"Jefe",
                b"what do ya want for nothing?",
                "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            ),
            (
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First",
                "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
            ),
        ];
        for (key, message, want) in cases {
            assert_eq!(hex::encode(hmac_sha256(key, message)), want);
        }
    }

    /// The same seed and variant give the same draws in the same order; another variant, another
    /// seed, or the next draw give other bytes.
    #[test]
    fn derived_draws_table() {
        let draw = |seed: &str, variant: &str, skip: usize| {
            let mut e = Entropy::derived(seed, variant);
            let mut buf = [0u8; 40];
            for _ in 0..=skip {
                e.fill("password-salt", &mut buf);
            }
            buf
        };
        let base = draw("s3cret", "ath-web", 0);
        assert_eq!(base, draw("s3cret", "ath-web", 0));
        for other in [draw("s3cret", "ath-db", 0), draw("other", "ath-web", 0), draw("s3cret", "ath-web", 1)] {
            assert_ne!(base, other);
        }
        let mut a = Entropy::derived("s", "v");
        let mut b = Entropy::derived("s", "v");
        let (mut x, mut y) = ([0u8; 16], [0u8; 16]);
        a.fill("password-salt", &mut x);
        b.fill("random-password", &mut y);
        assert_ne!(x, y, "the purpose is part of the derivation");
    }

    #[test]
    fn choices_stay_in_the_alphabet() {
        let mut e = Entropy::derived("s", "v");
        let text = e.choose("p", b"abc", 500);
        assert_eq!(text.len(), 500);
        assert!(text.bytes().all(|c| b"abc".contains(&c)));
        assert!(b"abc".iter().all(|c| text.as_bytes().contains(c)), "every character turns up");
        let mut system = Entropy::System;
        assert_ne!(system.choose("p", b"0123456789", 32), system.choose("p", b"0123456789", 32));
        assert_eq!(format!("{:?}", Entropy::derived("hunter2", "v")), "Derived(\"v\", 0 draws)");
    }
}
