//! `/etc/default/imgforge`: `KEY=value` lines (shell syntax, read — never executed).

use thiserror::Error;

/// Where the configuration lives.
pub const CONFIG_PATH: &str = "/etc/default/imgforge";

/// Where the OS variants' configuration files are, unless `VARIANTS_DIR` says otherwise.
pub const DEFAULT_VARIANTS_DIR: &str = "/etc/ganeti/imgforge/variants";

/// A bad configuration value.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{path}: line {line}: {reason}")]
pub struct ConfigError {
    /// The file.
    pub path: String,
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// The settings, with snf-image's names where snf-image has them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where `img_id` names are looked up.
    pub image_dir: String,
    /// Helper VM soft timeout (seconds).
    pub helper_soft_timeout: u64,
    /// Grace after the soft timeout before SIGKILL (seconds).
    pub helper_hard_timeout: u64,
    /// Helper VM memory (MiB).
    pub helper_memory: u32,
    /// User qemu runs as: `dynamic` (the default), a uid of each qemu's own; or a named user,
    /// which every other process of that user shares.
    pub helper_user: String,
    /// Command fed the progress JSON on stdin (empty: none).
    pub progress_monitor: String,
    /// `auto`, `kvm` or `tcg`.
    pub accel: String,
    /// `DHCP_TAGS`, `STATEFUL_DHCPV6_TAGS`, `STATELESS_DHCPV6_TAGS`, `DEFAULT_NIC_CONFIG`.
    pub nics: super::nics::NicSettings,
    /// Where the OS variants' `NAME.conf` files are (snf-image's `VARIANTS_DIR`).
    pub variants_dir: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            image_dir: "/var/lib/imgforge/images".into(),
            helper_soft_timeout: 600,
            helper_hard_timeout: 10,
            helper_memory: 1024,
            helper_user: crate::vm::privilege::DEFAULT_HELPER_USER.into(),
            progress_monitor: String::new(),
            accel: "auto".into(),
            nics: Default::default(),
            variants_dir: DEFAULT_VARIANTS_DIR.into(),
        }
    }
}

/// Removes shell quoting from a value: `'a b'`, `"a b"`, or a bare word.
fn unquote(raw: &str) -> Result<String, String> {
    let raw = raw.trim();
    if let Some(inner) = raw.strip_prefix('\'') {
        return inner.strip_suffix('\'').map(String::from).ok_or_else(|| "unterminated single quote".into());
    }
    if let Some(inner) = raw.strip_prefix('"') {
        let inner = inner.strip_suffix('"').ok_or("unterminated double quote")?;
        if inner.contains('$') || inner.contains('`') {
            return Err("expansions ($, `) are not evaluated: write the value literally".into());
        }
        return Ok(inner.replace("\\\"", "\"").replace("\\\\", "\\"));
    }
    if raw.contains(char::is_whitespace) || raw.contains('$') || raw.contains('`') {
        return Err("quote values with spaces; expansions are not evaluated".into());
    }
    Ok(raw.to_owned())
}

/// One `KEY=value` line (an `export ` prefix allowed, the value unquoted); `None` for a blank
/// or comment line. Shared by this file and the variants' files.
pub fn split_line(line: &str) -> Option<Result<(String, String), String>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let line = line.strip_prefix("export ").unwrap_or(line);
    let Some((key, raw)) = line.split_once('=') else {
        return Some(Err(format!("expected KEY=value, found {:?}", imgforge_protocol::printable::printable(line))));
    };
    let key = key.trim();
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Some(Err(format!("{:?} is not a setting name", imgforge_protocol::printable::printable(key))));
    }
    Some(unquote(raw).map(|v| (key.to_owned(), v)).map_err(|r| format!("{key}: {r}")))
}

/// Sets `key` to `value` in `c`: `Ok(false)` when `key` is no setting of this file.
pub fn set(c: &mut Config, key: &str, value: String) -> Result<bool, String> {
    let number = |max: u64| -> Result<u64, String> {
        crate::plain_number::parse::<u64>(&value)
            .filter(|n| *n >= 1 && *n <= max)
            .ok_or_else(|| format!("{key}={value:?} must be a whole number from 1 to {max}"))
    };
    match key {
        "IMAGE_DIR" | "VARIANTS_DIR" => {
            if !value.starts_with('/') {
                return Err(format!("{key}={value:?} must be an absolute path"));
            }
            if key == "IMAGE_DIR" {
                c.image_dir = value;
            } else {
                c.variants_dir = value;
            }
        }
        "HELPER_SOFT_TIMEOUT" => c.helper_soft_timeout = number(86_400)?,
        "HELPER_HARD_TIMEOUT" => c.helper_hard_timeout = number(3_600)?,
        "HELPER_MEMORY" => c.helper_memory = number(65_536)?.max(128) as u32,
        "HELPER_USER" => {
            if value.is_empty() || value == "root" {
                return Err("HELPER_USER must name an unprivileged user".into());
            }
            c.helper_user = value;
        }
        "PROGRESS_MONITOR" => c.progress_monitor = value,
        "ACCEL" => {
            if !["auto", "kvm", "tcg"].contains(&value.as_str()) {
                return Err(format!("ACCEL={value:?} must be auto, kvm or tcg"));
            }
            c.accel = value;
        }
        other => match c.nics.set(other, &value) {
            Some(result) => result?,
            None => return Ok(false),
        },
    }
    Ok(true)
}

/// Parses the file's text; returns the settings and warnings (unknown keys).
pub fn parse(path: &str, text: &str) -> Result<(Config, Vec<String>), ConfigError> {
    let mut c = Config::default();
    let mut warnings = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let err = |reason: String| ConfigError { path: path.into(), line: i + 1, reason };
        let Some(pair) = split_line(line) else { continue };
        let (key, value) = pair.map_err(err)?;
        if !set(&mut c, &key, value).map_err(err)? {
            warnings.push(format!("{path}: line {}: unknown setting {key} ignored", i + 1));
        }
    }
    Ok((c, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let (c, w) = parse("f", "# c\nIMAGE_DIR=/srv/images\nHELPER_SOFT_TIMEOUT='120'\nexport ACCEL=\"tcg\"\nPROGRESS_MONITOR=\"logger -t x\"\nFOO=1\n").unwrap();
        assert_eq!(c.image_dir, "/srv/images");
        assert_eq!(c.helper_soft_timeout, 120);
        assert_eq!(c.accel, "tcg");
        assert_eq!(c.progress_monitor, "logger -t x");
        assert_eq!(c.helper_user, "dynamic", "qemu gets a uid of its own unless HELPER_USER names one");
        assert_eq!(parse("f", "HELPER_USER=imgforge-qemu").unwrap().0.helper_user, "imgforge-qemu");
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("FOO"));
        let (c, w) = parse("f", "DHCP_TAGS=\"a b\"\nSTATELESS_DHCPV6_TAGS=\nDEFAULT_NIC_CONFIG=dhcp+slaac\n").unwrap();
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(c.nics.dhcp_tags, ["a", "b"]);
        assert!(c.nics.stateless_dhcpv6_tags.is_empty());
        assert_eq!(c.nics.stateful_dhcpv6_tags, ["dhcpv6", "stateful_dhcpv6"], "snf-image's default kept");
        assert!(c.nics.default_nic.dhcp4);
        let bad = [
            "IMAGE_DIR=relative",
            "HELPER_SOFT_TIMEOUT=soon",
            "HELPER_SOFT_TIMEOUT=0",
            "HELPER_SOFT_TIMEOUT=+60",
            "ACCEL=xen",
            "HELPER_USER=root",
            "IMAGE_DIR=\"/a/$(reboot)\"",
            "NOEQUALS",
            "IMAGE_DIR='/unterminated",
            "IMAGE_DIR=/a b",
            "DEFAULT_NIC_CONFIG=static",
        ];
        for line in bad {
            let e = parse("f", line).unwrap_err();
            assert_eq!(e.line, 1, "{line}");
        }
    }

    proptest::proptest! {
        #[test]
        /// A parsed configuration holds only values its checks allow.
        fn parsed_values_are_in_range(text in "(HELPER_SOFT_TIMEOUT|HELPER_HARD_TIMEOUT|IMAGE_DIR|ACCEL)=[-+0-9a-z/ ]{0,12}\n.{0,100}") {
            if let Ok((c, _)) = parse("f", &text) {
                proptest::prop_assert!((1..=86_400).contains(&c.helper_soft_timeout), "{}", c.helper_soft_timeout);
                proptest::prop_assert!((1..=3_600).contains(&c.helper_hard_timeout), "{}", c.helper_hard_timeout);
                proptest::prop_assert!(c.image_dir.starts_with('/'));
            }
        }
    }
}
