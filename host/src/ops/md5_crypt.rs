//! MD5 crypt (`$1$`), Poul-Henning Kamp's FreeBSD algorithm as glibc's crypt(3) checks it.
//!
//! virt-customize's `--password-crypto md5` and snf-image's `PASSWD_HASHING_METHOD=md5` write
//! it; it is weak (1000 MD5 rounds), kept only because old guests and sites ask for it. The
//! MD5 itself is RustCrypto's `md-5`; this module is the published construction around it.

use md5::{Digest, Md5};

/// crypt's base64 alphabet (not RFC 4648's: `./` first, then digits and letters).
const CRYPT_ALPHABET: &[u8; 64] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// MD5 crypt reads at most this many salt characters.
pub const SALT_MAX_CHARS: usize = 8;

/// The algorithm's fixed number of strengthening rounds.
const ROUNDS: usize = 1000;

/// Hashes `password` with `salt` (crypt characters, at most [`SALT_MAX_CHARS`] used):
/// `$1$<salt>$<22 characters>`.
pub fn md5_crypt(password: &[u8], salt: &str) -> String {
    const MAGIC: &str = "$1$";
    let salt = &salt.as_bytes()[..salt.len().min(SALT_MAX_CHARS)];
    let alternate = Md5::new().chain_update(password).chain_update(salt).chain_update(password).finalize();
    let mut context = Md5::new().chain_update(password).chain_update(MAGIC).chain_update(salt);
    for chunk in (0..password.len()).step_by(16) {
        context.update(&alternate[..(password.len() - chunk).min(16)]);
    }
    // The C original feeds either a NUL or the password's first byte for each bit of the
    // length; glibc and OpenSSL keep that quirk, so must we.
    let mut bits = password.len();
    while bits > 0 {
        context.update(if bits & 1 == 1 { &[0u8][..] } else { &password[..1] });
        bits >>= 1;
    }
    let mut digest = context.finalize();
    for round in 0..ROUNDS {
        let mut step = Md5::new();
        if round % 2 == 1 {
            step.update(password);
        } else {
            step.update(digest);
        }
        if round % 3 != 0 {
            step.update(salt);
        }
        if round % 7 != 0 {
            step.update(password);
        }
        if round % 2 == 1 {
            step.update(digest);
        } else {
            step.update(password);
        }
        digest = step.finalize();
    }
    let mut out = String::with_capacity(MAGIC.len() + salt.len() + 23);
    out.push_str(MAGIC);
    out.extend(salt.iter().map(|&b| b as char));
    out.push('$');
    // The digest's bytes are written in this interleaved order, three at a time.
    for [a, b, c] in [[0, 6, 12], [1, 7, 13], [2, 8, 14], [3, 9, 15], [4, 10, 5]] {
        push_crypt64(&mut out, (u32::from(digest[a]) << 16) | (u32::from(digest[b]) << 8) | u32::from(digest[c]), 4);
    }
    push_crypt64(&mut out, u32::from(digest[11]), 2);
    out
}

/// Appends `count` crypt-base64 characters of `value`, least significant six bits first.
fn push_crypt64(out: &mut String, mut value: u32, count: usize) {
    for _ in 0..count {
        out.push(CRYPT_ALPHABET[(value & 0x3f) as usize] as char);
        value >>= 6;
    }
}

/// A random salt of [`SALT_MAX_CHARS`] crypt characters, each equally likely.
pub fn random_salt() -> String {
    salt_from(&mut crate::ops::entropy::Entropy::System)
}

/// A salt of [`SALT_MAX_CHARS`] crypt characters drawn from `entropy`.
pub fn salt_from(entropy: &mut crate::ops::entropy::Entropy) -> String {
    entropy.choose("password-salt", CRYPT_ALPHABET, SALT_MAX_CHARS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known answers from `openssl passwd -1 -salt SALT PASSWORD` (OpenSSL 3.0, Debian 12).
    #[test]
    fn matches_openssl_passwd_1() {
        let cases = [
            ("hunter2", "saltsalt", "$1$saltsalt$ZliGyAN3DciDHEkDboonh/"),
            ("hunter2", "./09AZaz", "$1$./09AZaz$2X.GxRKOMzPW9MaWp1O1O1"),
            ("hunter2", "ab", "$1$ab$YTP8LwpHAEK53FJF7Ni8G/"),
            ("correct horse battery staple", "saltsalt", "$1$saltsalt$BsXyQbZiQujHkdhwPwdol."),
            ("correct horse battery staple", "./09AZaz", "$1$./09AZaz$LYl1HEgS8aImt5RVjdCUr."),
            ("", "saltsalt", "$1$saltsalt$5Jhcit4zN9UlGiA0txPkO0"),
            ("", "ab", "$1$ab$rn6aQS/o7141mj179E/zA."),
            ("a", "saltsalt", "$1$saltsalt$MzDjbImyzEz2m0NTiPzNW/"),
            ("a", "./09AZaz", "$1$./09AZaz$djgsBCf1BcoI5QIg1IwgN."),
            // 33 bytes: the alternate digest is fed twice whole and once in part.
            ("0123456789abcdef0123456789abcdefX", "saltsalt", "$1$saltsalt$Gjnnf57/M93nkC4X1OV6/."),
            ("0123456789abcdef0123456789abcdefX", "ab", "$1$ab$5Q73kLDgoFzVwpUYv8mTG0"),
        ];
        for (password, salt, openssl) in cases {
            assert_eq!(md5_crypt(password.as_bytes(), salt), openssl, "{password:?} {salt:?}");
        }
        // Salt characters past the eighth are not read (as crypt(3)).
        assert_eq!(md5_crypt(b"hunter2", "saltsaltEXTRA"), "$1$saltsalt$ZliGyAN3DciDHEkDboonh/");
    }

    #[test]
    fn random_salts_are_eight_crypt_characters() {
        let a = random_salt();
        let b = random_salt();
        assert_eq!(a.len(), SALT_MAX_CHARS);
        assert!(a.bytes().all(|c| CRYPT_ALPHABET.contains(&c)), "{a}");
        assert_ne!(a, b, "two random salts");
    }
}
