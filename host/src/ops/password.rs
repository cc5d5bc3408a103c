//! virt-customize's password selectors, reduced on the host to an `/etc/shadow` field.
//!
//! Clear text lives only in this process: it is hashed (SHA-512 crypt) here and only the hash
//! reaches the rules. `Debug` never prints a password.

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

/// Hashes clear text with SHA-512 crypt and a random salt.
pub fn sha512_crypt(password: &str) -> Result<String, PasswordError> {
    let params =
        sha_crypt::Sha512Params::new(sha_crypt::ROUNDS_DEFAULT).map_err(|e| PasswordError::Hash(format!("{e:?}")))?;
    sha_crypt::sha512_simple(password, &params).map_err(|e| PasswordError::Hash(format!("{e:?}")))
}

/// Hashes clear text with SHA-256 crypt and a random salt.
pub fn sha256_crypt(password: &str) -> Result<String, PasswordError> {
    let params =
        sha_crypt::Sha256Params::new(sha_crypt::ROUNDS_DEFAULT).map_err(|e| PasswordError::Hash(format!("{e:?}")))?;
    sha_crypt::sha256_simple(password, &params).map_err(|e| PasswordError::Hash(format!("{e:?}")))
}

fn random_password() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::thread_rng();
    (0..RANDOM_PASSWORD_LEN).map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char).collect()
}

impl PasswordSelector {
    /// Reduces the selector to a shadow field (reading `file:` here, on the host).
    pub fn to_shadow_field(&self) -> Result<ShadowField, PasswordError> {
        match self {
            Self::Password(pw) if pw.is_empty() => Err(PasswordError::Empty("password:".into())),
            Self::Password(pw) => Ok(ShadowField { field: sha512_crypt(pw)?, random_password: None }),
            Self::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| PasswordError::File { path: path.clone(), source })?;
                let pw = text.lines().next().unwrap_or("");
                if pw.is_empty() {
                    return Err(PasswordError::Empty(path.display().to_string()));
                }
                Ok(ShadowField { field: sha512_crypt(pw)?, random_password: None })
            }
            Self::Random => {
                let pw = random_password();
                Ok(ShadowField { field: sha512_crypt(&pw)?, random_password: Some(pw) })
            }
            Self::Disabled => Ok(ShadowField { field: "*".into(), random_password: None }),
            Self::Locked(inner) => {
                let inner = inner.to_shadow_field()?;
                Ok(ShadowField { field: format!("!{}", inner.field), random_password: inner.random_password })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let f = sel.to_shadow_field().unwrap();
        assert!(f.field.starts_with("$6$"), "{}", f.field);
        sha_crypt::sha512_check("hunter2", &f.field).unwrap();
        assert!(sha_crypt::sha512_check("hunter3", &f.field).is_err());
    }

    #[test]
    fn locked_and_disabled_fields() {
        assert_eq!(PasswordSelector::Disabled.to_shadow_field().unwrap().field, "*");
        let locked = PasswordSelector::parse("locked:random").unwrap().to_shadow_field().unwrap();
        assert!(locked.field.starts_with("!$6$"));
        let pw = locked.random_password.unwrap();
        assert_eq!(pw.len(), RANDOM_PASSWORD_LEN);
        sha_crypt::sha512_check(&pw, &locked.field[1..]).unwrap();
    }

    #[test]
    fn file_selector_reads_first_line() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), "fromfile\nignored\n").unwrap();
        let field = PasswordSelector::File(f.path().into()).to_shadow_field().unwrap().field;
        sha_crypt::sha512_check("fromfile", &field).unwrap();
        let missing = PasswordSelector::File("/nonexistent/pw".into()).to_shadow_field().unwrap_err().to_string();
        assert!(missing.contains("/nonexistent/pw"), "{missing}");
    }
}
