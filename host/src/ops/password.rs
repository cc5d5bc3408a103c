//! virt-customize's password selectors, reduced on the host to an `/etc/shadow` field.
//!
//! Clear text lives only in this process: it is hashed (SHA-512 crypt, or SHA-256 or MD5 crypt
//! with `--password-crypto sha256|md5`) here and only the hash reaches the rules. `Debug` never prints a
//! password.

use crate::ops::entropy::Entropy;
use crate::ops::md5_crypt;
use std::path::PathBuf;
use thiserror::Error;

/// Why a password selector was refused.
#[derive(Debug, Error)]
pub enum PasswordError {
    /// Unknown selector keyword (never echoed: it may be a mistyped password).
    #[error("the password selector is not one of password:PW, file:PATH, random, disabled, locked:SELECTOR")]
    Selector,
    /// `file:PATH` could not be read.
    #[error("cannot read the password file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error reading it.
        source: std::io::Error,
    },
    /// The password is empty (or the file holds none).
    #[error("the password from {0} is empty")]
    Empty(String),
    /// The hash could not be computed.
    #[error("cannot hash the password: {0}")]
    Hash(String),
    /// `--password-crypto` names a method imgforge does not write.
    #[error("{0:?} is not a password hash imgforge writes: use sha512 (the default), sha256 or md5")]
    Crypto(String),
}

/// The hash `--root-password`/`--password` write (virt-customize's `--password-crypto`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PasswordCrypto {
    /// SHA-256 crypt, `$5$`.
    Sha256,
    /// SHA-512 crypt, `$6$` (virt-customize's default for the guests imgforge handles).
    #[default]
    Sha512,
    /// MD5 crypt, `$1$`: weak, for old guests and sites that ask for it.
    Md5,
}

impl PasswordCrypto {
    /// Parses virt-customize's names: `md5`, `sha256`, `sha512`.
    pub fn parse(text: &str) -> Result<Self, PasswordError> {
        match text {
            "sha256" => Ok(Self::Sha256),
            "sha512" => Ok(Self::Sha512),
            "md5" => Ok(Self::Md5),
            _ => Err(PasswordError::Crypto(text.to_owned())),
        }
    }

    /// Hashes clear text with this method and a random salt.
    pub fn hash(self, password: &str) -> Result<String, PasswordError> {
        self.hash_with(password, &mut Entropy::System)
    }

    /// Hashes clear text with this method and a salt drawn from `entropy`.
    pub fn hash_with(self, password: &str, entropy: &mut Entropy) -> Result<String, PasswordError> {
        match self {
            Self::Sha256 => crypt_with_salt(password, sha_crypt::Algorithm::Sha256Crypt, &salt_from(entropy)),
            Self::Sha512 => crypt_with_salt(password, sha_crypt::Algorithm::Sha512Crypt, &salt_from(entropy)),
            Self::Md5 => Ok(md5_crypt::md5_crypt(password.as_bytes(), &md5_crypt::salt_from(entropy))),
        }
    }
}

/// A parsed selector.
#[derive(Clone, PartialEq, Eq)]
pub enum PasswordSelector {
    /// `password:PW`.
    Password(String),
    /// `file:PATH` — the first line of the file.
    File(PathBuf),
    /// `random` — a new random password, printed for the user.
    Random,
    /// `disabled` — no password login.
    Disabled,
    /// `locked:SELECTOR` — the account is locked (`!` prefix), the password kept for later.
    Locked(Box<PasswordSelector>),
}

impl std::fmt::Debug for PasswordSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PasswordSelector::Password(_) => f.write_str("Password(<redacted>)"),
            PasswordSelector::File(p) => write!(f, "File({})", p.display()),
            PasswordSelector::Random => f.write_str("Random"),
            PasswordSelector::Disabled => f.write_str("Disabled"),
            PasswordSelector::Locked(inner) => write!(f, "Locked({inner:?})"),
        }
    }
}

impl PasswordSelector {
    /// Parses virt-customize's selector grammar. The error never echoes a password.
    pub fn parse(text: &str) -> Result<Self, PasswordError> {
        if let Some(pw) = text.strip_prefix("password:") {
            return Ok(Self::Password(pw.to_owned()));
        }
        if let Some(path) = text.strip_prefix("file:") {
            return Ok(Self::File(PathBuf::from(path)));
        }
        if let Some(inner) = text.strip_prefix("locked:") {
            let inner = Self::parse(inner)?;
            if matches!(inner, Self::Locked(_) | Self::Disabled) {
                return Err(PasswordError::Selector);
            }
            return Ok(Self::Locked(Box::new(inner)));
        }
        match text {
            "random" => Ok(Self::Random),
            "disabled" => Ok(Self::Disabled),
            "locked" => Ok(Self::Locked(Box::new(Self::Disabled))),
            _ => Err(PasswordError::Selector),
        }
    }
}

/// What a selector becomes: the shadow field, and a generated password the user must be told.
#[derive(Clone, PartialEq, Eq)]
pub struct ShadowField {
    /// The second field of `/etc/shadow`.
    pub field: String,
    /// The clear text of a `random` password, to show the user once.
    pub random_password: Option<String>,
}

impl std::fmt::Debug for ShadowField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShadowField").field("field", &self.field).finish_non_exhaustive()
    }
}

/// Length of generated passwords, as virt-customize.
const RANDOM_PASSWORD_LEN: usize = 16;

/// crypt(3)'s default SHA-crypt rounds, which it leaves out of the hash (no `rounds=` field).
const ROUNDS_DEFAULT: u32 = 5000;

/// Random bytes in a salt. SHA-crypt uses at most 16 salt characters of `./0-9A-Za-z`; sha-crypt
/// takes the salt as bytes and writes them in crypt's base64, where 12 bytes are exactly 16
/// characters (so every such salt is equally likely).
const SALT_BYTES: usize = 12;

/// Hashes clear text with SHA-512 crypt and a random salt: `$6$<16-char salt>$<86-char hash>`.
pub fn sha512_crypt(password: &str) -> Result<String, PasswordError> {
    crypt_with_salt(password, sha_crypt::Algorithm::Sha512Crypt, &random_salt())
}

/// Hashes clear text with SHA-256 crypt and a random salt: `$5$<16-char salt>$<43-char hash>`.
pub fn sha256_crypt(password: &str) -> Result<String, PasswordError> {
    crypt_with_salt(password, sha_crypt::Algorithm::Sha256Crypt, &random_salt())
}

fn random_salt() -> [u8; SALT_BYTES] {
    salt_from(&mut Entropy::System)
}

fn salt_from(entropy: &mut Entropy) -> [u8; SALT_BYTES] {
    let mut salt = [0; SALT_BYTES];
    entropy.fill("password-salt", &mut salt);
    salt
}

/// SHA-crypt with default rounds, formatted as glibc's crypt(3): `$<id>$<salt>$<hash>`.
fn crypt_with_salt(
    password: &str,
    algorithm: sha_crypt::Algorithm,
    salt: &[u8; SALT_BYTES],
) -> Result<String, PasswordError> {
    use sha_crypt::PasswordHasher;
    let hash_err = |e: &dyn std::fmt::Display| PasswordError::Hash(e.to_string());
    let params = sha_crypt::Params::new(ROUNDS_DEFAULT).map_err(|e| hash_err(&e))?;
    let full = sha_crypt::ShaCrypt::new(algorithm, params)
        .hash_password_with_salt(password.as_bytes(), salt)
        .map_err(|e| hash_err(&e))?;
    // sha-crypt always writes the rounds (`$6$rounds=5000$SALT$HASH`); crypt(3) leaves the
    // default out (`$6$SALT$HASH`), as sha-crypt 0.5 did for the hashes we wrote before.
    let mut fields = full.fields();
    let (Some(rounds), Some(salt), Some(hash), None) = (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(hash_err(&"sha-crypt wrote an unexpected hash layout"));
    };
    if rounds.as_str() != format!("rounds={ROUNDS_DEFAULT}") {
        return Err(hash_err(&"sha-crypt wrote unexpected rounds"));
    }
    let mut short = sha_crypt::PasswordHash::from_id(full.id()).map_err(|e| hash_err(&e))?;
    short.push_field(salt);
    short.push_field(hash);
    Ok(short.into())
}

fn random_password(entropy: &mut Entropy) -> String {
    const CHARS: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    entropy.choose("random-password", CHARS, RANDOM_PASSWORD_LEN)
}

impl PasswordSelector {
    /// Reduces the selector to a shadow field hashed with `crypto` (reading `file:` here, on
    /// the host).
    pub fn to_shadow_field(&self, crypto: PasswordCrypto) -> Result<ShadowField, PasswordError> {
        self.to_shadow_field_with(crypto, &mut Entropy::System)
    }

    /// As [`Self::to_shadow_field`], with salts and random passwords drawn from `entropy`.
    pub fn to_shadow_field_with(
        &self,
        crypto: PasswordCrypto,
        entropy: &mut Entropy,
    ) -> Result<ShadowField, PasswordError> {
        match self {
            Self::Password(pw) if pw.is_empty() => Err(PasswordError::Empty("password:".into())),
            Self::Password(pw) => Ok(ShadowField { field: crypto.hash_with(pw, entropy)?, random_password: None }),
            Self::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| PasswordError::File { path: path.clone(), source })?;
                let pw = text.lines().next().unwrap_or("");
                if pw.is_empty() {
                    return Err(PasswordError::Empty(path.display().to_string()));
                }
                Ok(ShadowField { field: crypto.hash_with(pw, entropy)?, random_password: None })
            }
            Self::Random => {
                let pw = random_password(entropy);
                Ok(ShadowField { field: crypto.hash_with(&pw, entropy)?, random_password: Some(pw) })
            }
            Self::Disabled => Ok(ShadowField { field: "*".into(), random_password: None }),
            Self::Locked(inner) => {
                let inner = inner.to_shadow_field_with(crypto, entropy)?;
                Ok(ShadowField { field: format!("!{}", inner.field), random_password: inner.random_password })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha_crypt::PasswordVerifier;

    /// Checks `password` against a SHA-crypt hash (either method, as the hash says).
    fn verify(password: &str, hash: &str) -> Result<(), sha_crypt::password_hash::Error> {
        sha_crypt::ShaCrypt::default().verify_password(password.as_bytes(), hash)
    }

    /// The bytes whose crypt base64 is the salt `saltsaltsaltsalt` (decoded with base64ct's
    /// `Base64ShaCrypt`, the encoding sha-crypt writes salts in).
    const SALT_SALT: [u8; SALT_BYTES] = [184, 25, 231, 184, 25, 231, 184, 25, 231, 184, 25, 231];
    /// The bytes whose crypt base64 is the salt `./09AZaz.Zz9/aA0`.
    const SALT_MIXED: [u8; SALT_BYTES] = [64, 32, 44, 76, 105, 254, 64, 249, 47, 129, 201, 8];

    /// Our hashes against glibc's crypt(3) for the same password and salt, computed with
    /// Python 3.11's `crypt.crypt('hunter2', '$6$saltsaltsaltsalt')` (and `$5$`, and the second
    /// pair) and matched by `openssl passwd -6 -salt saltsaltsaltsalt hunter2` (and `-5`).
    #[test]
    fn matches_glibc_crypt() {
        use sha_crypt::Algorithm::{Sha256Crypt, Sha512Crypt};
        let cases = [
            (
                "hunter2",
                Sha512Crypt,
                SALT_SALT,
                "$6$saltsaltsaltsalt$dJX0KuyM7nCXuBPN.nYtdrJDotQEB1rFBumzix6FHzliKxLBinGY49pMJNvCoNf9fHmNyZ1IgX/glbcKhuXoh.",
            ),
            ("hunter2", Sha256Crypt, SALT_SALT, "$5$saltsaltsaltsalt$LTm0e1epoLCOhH8WjaKAzYHFbzuOTFXssEJnxJiG5YC"),
            (
                "correct horse battery staple",
                Sha512Crypt,
                SALT_MIXED,
                "$6$./09AZaz.Zz9/aA0$xNrdo460lN40fty8q0XOj22uZXKcaKJ/Aav25AR6LvxwW28xys13ohc9zlzOY/I0REimszhV8av0d1T.X4njO.",
            ),
            (
                "correct horse battery staple",
                Sha256Crypt,
                SALT_MIXED,
                "$5$./09AZaz.Zz9/aA0$kAzAnYbbu0fwNlOTy6Zv6Y1pMBNpx5XjH5JU6sipL89",
            ),
        ];
        for (password, algorithm, salt, glibc) in cases {
            assert_eq!(crypt_with_salt(password, algorithm, &salt).unwrap(), glibc, "{algorithm:?}");
            verify(password, glibc).unwrap();
        }
    }

    /// `$6$` or `$5$`, 16 salt characters from `./0-9A-Za-z`, no `rounds=`, the hash's length.
    fn assert_crypt_layout(hash: &str, id: &str, hash_len: usize) {
        let crypt_char = |c: char| c.is_ascii_alphanumeric() || c == '.' || c == '/';
        let fields: Vec<&str> = hash.split('$').collect();
        assert_eq!(fields.len(), 4, "{hash}");
        assert_eq!((fields[0], fields[1]), ("", id), "{hash}");
        assert_eq!(fields[2].len(), 16, "{hash}");
        assert_eq!(fields[3].len(), hash_len, "{hash}");
        assert!(fields[2].chars().chain(fields[3].chars()).all(crypt_char), "{hash}");
    }

    #[test]
    fn random_salts_have_the_crypt_layout_and_verify() {
        let a = sha512_crypt("hunter2").unwrap();
        let b = sha512_crypt("hunter2").unwrap();
        assert_crypt_layout(&a, "6", 86);
        assert_crypt_layout(&b, "6", 86);
        assert_ne!(a, b, "two random salts");
        verify("hunter2", &a).unwrap();
        assert!(verify("hunter3", &a).is_err());
        let c = sha256_crypt("hunter2").unwrap();
        assert_crypt_layout(&c, "5", 43);
        verify("hunter2", &c).unwrap();
        assert!(verify("hunter3", &c).is_err());
    }

    #[test]
    fn parse_table() {
        let ok = [
            ("password:s3cret", PasswordSelector::Password("s3cret".into())),
            ("password:a:b", PasswordSelector::Password("a:b".into())),
            ("file:/etc/pw", PasswordSelector::File("/etc/pw".into())),
            ("random", PasswordSelector::Random),
            ("disabled", PasswordSelector::Disabled),
            ("locked:random", PasswordSelector::Locked(Box::new(PasswordSelector::Random))),
            ("locked", PasswordSelector::Locked(Box::new(PasswordSelector::Disabled))),
        ];
        for (text, want) in ok {
            assert_eq!(PasswordSelector::parse(text).unwrap(), want, "{text}");
        }
        for bad in ["", "pw:x", "Random", "locked:locked:random", "locked:disabled", "passwd:topsecret", "topsecret"] {
            let err = PasswordSelector::parse(bad).unwrap_err().to_string();
            assert!(!err.contains("topsecret") && !err.contains("passwd"), "{err}");
        }
    }

    #[test]
    fn hashes_verify_and_never_debug_print() {
        let sel = PasswordSelector::parse("password:hunter2").unwrap();
        assert!(!format!("{sel:?}").contains("hunter2"));
        let f = sel.to_shadow_field(PasswordCrypto::Sha512).unwrap();
        assert!(f.field.starts_with("$6$"), "{}", f.field);
        verify("hunter2", &f.field).unwrap();
        assert!(verify("hunter3", &f.field).is_err());
    }

    #[test]
    fn locked_and_disabled_fields() {
        assert_eq!(PasswordSelector::Disabled.to_shadow_field(PasswordCrypto::Sha512).unwrap().field, "*");
        let locked = PasswordSelector::parse("locked:random").unwrap().to_shadow_field(PasswordCrypto::Sha512).unwrap();
        assert!(locked.field.starts_with("!$6$"));
        let pw = locked.random_password.unwrap();
        assert_eq!(pw.len(), RANDOM_PASSWORD_LEN);
        assert!(pw.chars().all(|c| c.is_ascii_alphanumeric()), "{pw}");
        verify(&pw, &locked.field[1..]).unwrap();
    }

    #[test]
    fn file_selector_reads_first_line() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), "fromfile\nignored\n").unwrap();
        let field = PasswordSelector::File(f.path().into()).to_shadow_field(PasswordCrypto::Sha512).unwrap().field;
        verify("fromfile", &field).unwrap();
        let missing = PasswordSelector::File("/nonexistent/pw".into())
            .to_shadow_field(PasswordCrypto::Sha512)
            .unwrap_err()
            .to_string();
        assert!(missing.contains("/nonexistent/pw"), "{missing}");
    }

    /// What virt-customize's `--password-crypto` takes (md5, sha256, sha512, exact lower case)
    /// and refuses (anything else, blowfish included: it takes no such name).
    #[test]
    fn password_crypto_names() {
        assert_eq!(PasswordCrypto::parse("sha256").unwrap(), PasswordCrypto::Sha256);
        assert_eq!(PasswordCrypto::parse("sha512").unwrap(), PasswordCrypto::Sha512);
        assert_eq!(PasswordCrypto::parse("md5").unwrap(), PasswordCrypto::Md5);
        assert_eq!(PasswordCrypto::default(), PasswordCrypto::Sha512);
        for bad in ["", "SHA256", "MD5", "md5 ", "sha1", "blowfish", "yescrypt", "des"] {
            let err = PasswordCrypto::parse(bad).unwrap_err().to_string();
            assert!(err.contains("sha512") && err.contains("md5"), "{bad}: {err}");
        }
    }

    /// The hash a glibc guest checks: what `openssl passwd -1 -salt` gives for its salt.
    #[test]
    fn md5_hashes_verify_against_openssl_for_their_salt() {
        let hash =
            PasswordSelector::parse("password:hunter2").unwrap().to_shadow_field(PasswordCrypto::Md5).unwrap().field;
        let fields: Vec<&str> = hash.split('$').collect();
        assert_eq!((fields.len(), fields[1], fields[2].len(), fields[3].len()), (4, "1", 8, 22), "{hash}");
        assert_eq!(md5_crypt::md5_crypt(b"hunter2", fields[2]), hash);
        assert_ne!(md5_crypt::md5_crypt(b"hunter3", fields[2]), hash);
    }

    #[test]
    fn password_crypto_picks_the_hash() {
        let sel = PasswordSelector::parse("password:hunter2").unwrap();
        let sha256 = sel.to_shadow_field(PasswordCrypto::Sha256).unwrap().field;
        assert!(sha256.starts_with("$5$") && verify("hunter2", &sha256).is_ok(), "{sha256}");
        let sha512 = sel.to_shadow_field(PasswordCrypto::Sha512).unwrap().field;
        assert!(sha512.starts_with("$6$") && verify("hunter2", &sha512).is_ok(), "{sha512}");
        let locked = PasswordSelector::parse("locked:random").unwrap().to_shadow_field(PasswordCrypto::Sha256).unwrap();
        assert!(locked.field.starts_with("!$5$"), "{}", locked.field);
        let md5 = sel.to_shadow_field(PasswordCrypto::Md5).unwrap().field;
        assert!(md5.starts_with("$1$"), "{md5}");
    }

    /// A seed fixes every salt and random password of a variant: the same seed and variant give
    /// the same shadow fields, another variant or seed other ones (every method and selector).
    #[test]
    fn seeded_fields_repeat_per_variant_table() {
        let field = |seed: &str, variant: &str, crypto, selector: &str| {
            let mut entropy = Entropy::derived(seed, variant);
            let sel = PasswordSelector::parse(selector).unwrap();
            // Two draws: the second one shows the draws are ordered, not reset.
            let first = sel.to_shadow_field_with(crypto, &mut entropy).unwrap();
            let second = sel.to_shadow_field_with(crypto, &mut entropy).unwrap();
            (first, second)
        };
        for crypto in [PasswordCrypto::Sha512, PasswordCrypto::Sha256, PasswordCrypto::Md5] {
            for selector in ["password:hunter2", "random", "locked:random"] {
                let (a1, a2) = field("seed-1", "ath-web", crypto, selector);
                let (b1, b2) = field("seed-1", "ath-web", crypto, selector);
                assert_eq!((&a1, &a2), (&b1, &b2), "{crypto:?} {selector}");
                assert_eq!(a1.random_password, b1.random_password);
                assert_ne!(a1.field, a2.field, "{crypto:?} {selector}: two draws of one variant");
                let (c1, _) = field("seed-1", "ath-db", crypto, selector);
                let (d1, _) = field("seed-2", "ath-web", crypto, selector);
                assert_ne!(a1.field, c1.field, "{crypto:?} {selector}: another variant");
                assert_ne!(a1.field, d1.field, "{crypto:?} {selector}: another seed");
                let hash = a1.field.trim_start_matches('!');
                if let Some(pw) = &a1.random_password {
                    assert_eq!(pw.len(), RANDOM_PASSWORD_LEN);
                    if crypto != PasswordCrypto::Md5 {
                        verify(pw, hash).unwrap();
                    }
                } else if crypto != PasswordCrypto::Md5 {
                    verify("hunter2", hash).unwrap();
                }
            }
        }
    }
}
