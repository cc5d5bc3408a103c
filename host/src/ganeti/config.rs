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
    /// Whether URLs given as OS parameters may reach loopback, link-local, private and other
    /// non-public addresses (`URL_ALLOW_PRIVATE_ADDRESSES`).
    pub url_allow_private_addresses: bool,
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
            url_allow_private_addresses: false,
        }
    }
}

/// Every setting with what it does, in the order `/etc/default/imgforge` lists them.
const SETTINGS: &[(&str, &str)] = &[
    ("IMAGE_DIR", "Where img_id names (local://NAME or NAME) are looked up: an absolute path."),
    ("VARIANTS_DIR", "Where the OS variants' NAME.conf files are (snf-image's VARIANTS_DIR): an absolute path."),
    ("HELPER_SOFT_TIMEOUT", "Seconds a helper VM may run before it is asked to stop (1 to 86400)."),
    ("HELPER_HARD_TIMEOUT", "Seconds after that request before qemu is killed (1 to 3600)."),
    ("HELPER_MEMORY", "Helper VM memory in MiB (128 to 65536)."),
    (
        "HELPER_USER",
        "Whom qemu runs as: dynamic (a uid and gid of each qemu's own, shared with no other \
         process), or a named unprivileged user, which every other process of that user shares: \
         name a dedicated one, never nobody or root.",
    ),
    ("PROGRESS_MONITOR", "A command fed the JSON progress lines (snf-image's monitor messages) on stdin; empty: none."),
    ("ACCEL", "auto (KVM where it works, TCG otherwise), kvm or tcg."),
    (
        "URL_ALLOW_PRIVATE_ADDRESSES",
        "no: the Ganeti OS definition's http(s) fetches (img_id, config_url, an image's .sha256, \
         their redirects; a variant's CONFIG_URL too) refuse a host that resolves to a loopback, \
         link-local (cloud metadata), private, shared, unspecified, multicast or reserved \
         address, and ignore http_proxy; yes: any address, for an image server on a private \
         network (tenants' URLs then reach it, and the node's own services, too). The imgforge \
         command's URLs are never restricted.",
    ),
    ("DHCP_TAGS", "Network tags (space-separated) whose NICs get IPv4 by DHCP, as snf-image's."),
    ("STATEFUL_DHCPV6_TAGS", "Network tags whose NICs get IPv6 by stateful DHCPv6."),
    ("STATELESS_DHCPV6_TAGS", "Network tags whose NICs get IPv6 by SLAAC and stateless DHCPv6."),
    (
        "DEFAULT_NIC_CONFIG",
        "How a lone NIC with no address and no IPv6 gateway is configured: '' (none), dhcp, dhcpv6, \
         slaac, slaac_dhcp, dhcp+dhcpv6, dhcp+slaac or dhcp+slaac_dhcp.",
    ),
];

/// `/etc/default/imgforge` as the package installs it: every setting described and commented
/// out at its default, so that the file changes nothing until a line is uncommented.
pub fn commented_defaults() -> String {
    let d = Config::default();
    let value = |key: &str| match key {
        "IMAGE_DIR" => d.image_dir.clone(),
        "VARIANTS_DIR" => d.variants_dir.clone(),
        "HELPER_SOFT_TIMEOUT" => d.helper_soft_timeout.to_string(),
        "HELPER_HARD_TIMEOUT" => d.helper_hard_timeout.to_string(),
        "HELPER_MEMORY" => d.helper_memory.to_string(),
        "HELPER_USER" => d.helper_user.clone(),
        "PROGRESS_MONITOR" => "''".into(),
        "ACCEL" => d.accel.clone(),
        "URL_ALLOW_PRIVATE_ADDRESSES" => if d.url_allow_private_addresses { "yes" } else { "no" }.into(),
        "DHCP_TAGS" => format!("'{}'", d.nics.dhcp_tags.join(" ")),
        "STATEFUL_DHCPV6_TAGS" => format!("'{}'", d.nics.stateful_dhcpv6_tags.join(" ")),
        "STATELESS_DHCPV6_TAGS" => format!("'{}'", d.nics.stateless_dhcpv6_tags.join(" ")),
        // The default checked against the parser by the test below.
        "DEFAULT_NIC_CONFIG" => "dhcp".into(),
        other => unreachable!("{other} has no default"),
    };
    let mut text = String::from(
        "# Settings of imgforge's Ganeti OS definition (imgforge ganeti create, import, export,\n\
         # rename, verify). KEY=value lines in shell syntax, read by imgforge, never executed: no\n\
         # expansions ($, `); quote values with spaces. Each line below shows the default.\n",
    );
    for (key, what) in SETTINGS {
        text.push('\n');
        for line in wrap(what, 90) {
            text.push_str(&format!("# {line}\n"));
        }
        text.push_str(&format!("#{key}={}\n", value(key)));
    }
    text
}

/// `text` in lines of at most `width` characters, broken at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let line = lines.last_mut().expect("one line at least");
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(word.to_owned());
        } else {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    lines
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
        "URL_ALLOW_PRIVATE_ADDRESSES" => {
            c.url_allow_private_addresses = match value.as_str() {
                "yes" => true,
                "no" => false,
                _ => return Err(format!("{key}={value:?} must be yes or no")),
            }
        }
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
            "URL_ALLOW_PRIVATE_ADDRESSES=true",
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

    #[test]
    fn the_commented_defaults_name_every_setting_at_its_default() {
        let text = commented_defaults();
        let (as_shipped, warnings) = parse("f", &text).unwrap();
        assert_eq!((as_shipped, warnings.len()), (Config::default(), 0), "every line is commented out");
        // The setting lines ("#KEY=value"), uncommented; the descriptions stay comments.
        let setting = |l: &str| {
            l.split_once('=')
                .is_some_and(|(k, _)| k.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'))
        };
        let uncommented: String = text
            .lines()
            .map(|l| l.strip_prefix('#').filter(|l| setting(l)).unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let (c, warnings) = parse("f", &uncommented).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(c, Config::default(), "each line shows the default");
        // A field added to Config without a line here fails to compile.
        let Config {
            image_dir: _,
            helper_soft_timeout: _,
            helper_hard_timeout: _,
            helper_memory: _,
            helper_user: _,
            progress_monitor: _,
            accel: _,
            nics: _,
            variants_dir: _,
            url_allow_private_addresses: _,
        } = c;
        for (key, other) in [
            ("IMAGE_DIR", "/x"),
            ("VARIANTS_DIR", "/y"),
            ("HELPER_SOFT_TIMEOUT", "7"),
            ("HELPER_HARD_TIMEOUT", "7"),
            ("HELPER_MEMORY", "777"),
            ("HELPER_USER", "imgforge-qemu"),
            ("PROGRESS_MONITOR", "cat"),
            ("ACCEL", "tcg"),
            ("URL_ALLOW_PRIVATE_ADDRESSES", "yes"),
            ("DHCP_TAGS", "x"),
            ("STATEFUL_DHCPV6_TAGS", "x"),
            ("STATELESS_DHCPV6_TAGS", "x"),
            ("DEFAULT_NIC_CONFIG", "slaac"),
        ] {
            let line = format!("#{key}=");
            assert!(text.lines().any(|l| l.starts_with(&line)), "{key} is listed");
            let changed = uncommented
                .lines()
                .map(|l| if l.starts_with(&line[1..]) { format!("{key}={other}") } else { l.to_owned() })
                .collect::<Vec<_>>()
                .join("\n");
            assert_ne!(parse("f", &changed).unwrap().0, Config::default(), "{key} is a setting parse() reads");
        }
        assert!(text.lines().all(|l| l.len() <= 100), "{text}");
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
