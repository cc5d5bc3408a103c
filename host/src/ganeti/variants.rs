//! OS variants (`imgforge+NAME`, Ganeti's `OS_VARIANT`): `variants.list` in the OS definition,
//! and per variant `VARIANTS_DIR/NAME.conf` (default `/etc/ganeti/imgforge/variants`), read as
//! `KEY=value` lines as `/etc/default/imgforge` is — never executed. As snf-image's sourced
//! variant file, it may set the settings of `/etc/default/imgforge` (over that file's) and give
//! defaults for OS parameters (`IMG_ID=…`, `IMG_PROPERTIES='{…}'`), which Ganeti's parameters
//! and `config_url` replace.

use super::config::{self, Config};
use super::params::PARAMETERS;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The most of a variant's file imgforge reads.
pub const MAX_CONF_BYTES: u64 = 64 << 10;
/// The variant every installation has, whose file may be absent.
pub const DEFAULT: &str = "default";

/// A variant that cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum VariantError {
    /// `OS_VARIANT` is not a plain name.
    #[error("OS variant {0:?} is not a variant name (letters, digits, '.', '_', '-')")]
    Name(String),
    /// A variant other than `default` without its file.
    #[error("OS variant {name}: no configuration file {}: create it (KEY=value lines), or remove {name} from variants.list", path.display())]
    Missing {
        /// The variant.
        name: String,
        /// The file looked for.
        path: PathBuf,
    },
    /// The file cannot be read, or is not a small regular text file.
    #[error("OS variant {name}: cannot read {}: {reason}", path.display())]
    Read {
        /// The variant.
        name: String,
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A bad line.
    #[error("{}: line {line}: {reason}", path.display())]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// What a variant's file gives: settings applied onto the configuration, parameter defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Variant {
    /// Defaults for OS parameters, as `OSP_<NAME>` keys.
    pub defaults: BTreeMap<String, String>,
    /// Lines for the OS log (unknown keys).
    pub warnings: Vec<String>,
}

/// True if `name` is a variant name: letters, digits, `.`, `_`, `-`, not starting with `.`,
/// at most 64 bytes. Pure.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Parses a variant's file `text` (at `path`), applying its settings onto `config`. Pure.
pub fn parse(path: &Path, text: &str, config: &mut Config) -> Result<Variant, VariantError> {
    let mut variant = Variant::default();
    for (i, line) in text.lines().enumerate() {
        let fail = |reason: String| VariantError::Line { path: path.to_owned(), line: i + 1, reason };
        let Some(pair) = config::split_line(line) else { continue };
        let (key, value) = pair.map_err(fail)?;
        if key == "VARIANTS_DIR" {
            return Err(fail(format!("VARIANTS_DIR is set in {} only", config::CONFIG_PATH)));
        }
        if config::set(config, &key, value.clone()).map_err(fail)? {
            continue;
        }
        let param = key.to_ascii_lowercase();
        // A CONFIG_URL default is fetched for every instance of the variant, as snf-image's
        // sourced file allows.
        if key.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            && PARAMETERS.iter().any(|(p, _)| *p == param)
        {
            variant.defaults.insert(format!("OSP_{key}"), value);
        } else {
            variant.warnings.push(format!("{}: line {}: unknown setting {key} ignored", path.display(), i + 1));
        }
    }
    Ok(variant)
}

/// Reads the variant `name`'s file from `config.variants_dir` and applies it: `default`
/// without a file is no change; any other variant must have one.
pub fn load(name: &str, config: &mut Config) -> Result<Variant, VariantError> {
    if !valid_name(name) {
        return Err(VariantError::Name(imgforge_protocol::printable::printable(name).into_owned()));
    }
    let path = Path::new(&config.variants_dir).join(format!("{name}.conf"));
    let read = |reason: String| VariantError::Read { name: name.to_owned(), path: path.clone(), reason };
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && name == DEFAULT => return Ok(Variant::default()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(VariantError::Missing { name: name.to_owned(), path });
        }
        Err(e) => return Err(read(e.to_string())),
    };
    let meta = file.metadata().map_err(|e| read(e.to_string()))?;
    if !meta.is_file() {
        return Err(read("not a regular file".into()));
    }
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_CONF_BYTES + 1), &mut data)
        .map_err(|e| read(e.to_string()))?;
    if data.len() as u64 > MAX_CONF_BYTES {
        return Err(read(format!("larger than {MAX_CONF_BYTES} bytes")));
    }
    let text = String::from_utf8(data).map_err(|_| read("not UTF-8 text".into()))?;
    parse(&path, &text, config)
}

/// The variants to list in `variants.list`: `default`, then every `NAME.conf` of `dir` with
/// a valid name, sorted. A missing directory lists `default` alone.
pub fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".conf").map(str::to_owned))
        .filter(|n| valid_name(n) && n != DEFAULT)
        .collect();
    names.sort();
    names.insert(0, DEFAULT.to_owned());
    names
}

/// Puts a variant's parameter defaults into Ganeti's environment where Ganeti gave none.
pub fn apply_defaults(env: &mut BTreeMap<String, String>, variant: &Variant) {
    for (k, v) in &variant.defaults {
        env.entry(k.clone()).or_insert_with(|| v.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Result<(Config, Variant), VariantError> {
        let mut c = Config::default();
        let v = parse(Path::new("/v/x.conf"), text, &mut c)?;
        Ok((c, v))
    }

    #[test]
    fn variant_file_table() {
        let (c, v) = parsed(
            "# a comment\n\nIMG_ID=debian-12\nIMG_PROPERTIES='{\"USERS\": \"root admin\"}'\nexport HELPER_MEMORY=2048\nIMAGE_DIR=\"/srv/images\"\nINSTALL=vim,curl\nFROB=1\n",
        )
        .unwrap();
        assert_eq!(c.helper_memory, 2048);
        assert_eq!(c.image_dir, "/srv/images");
        assert_eq!(v.defaults["OSP_IMG_ID"], "debian-12");
        assert_eq!(v.defaults["OSP_IMG_PROPERTIES"], r#"{"USERS": "root admin"}"#);
        assert_eq!(v.defaults["OSP_INSTALL"], "vim,curl");
        assert_eq!(v.defaults.len(), 3);
        assert_eq!(v.warnings, ["/v/x.conf: line 8: unknown setting FROB ignored"]);
        let (_, v) = parsed("CONFIG_URL=file:///etc/x.json\n").unwrap();
        assert_eq!(v.defaults["OSP_CONFIG_URL"], "file:///etc/x.json");
        // Lower-case names are not parameters of the file's (as shell variables, they differ).
        assert_eq!(parsed("img_id=x\n").unwrap().1.warnings.len(), 1);

        let bad = [
            ("IMG_ID=$(reboot)\n", 1, "expansions"),
            ("IMG_ID=\"a`b`\"\n", 1, "expansions"),
            ("\nIMG_ID=two words\n", 2, "quote values"),
            ("IMG_ID='unterminated\n", 1, "unterminated"),
            ("reboot\n", 1, "expected KEY=value"),
            ("IMG ID=x\n", 1, "not a setting name"),
            ("=x\n", 1, "not a setting name"),
            ("HELPER_MEMORY=lots\n", 1, "whole number"),
            ("ACCEL=xen\n", 1, "auto, kvm or tcg"),
            ("IMAGE_DIR=relative\n", 1, "absolute path"),
            ("HELPER_USER=root\n", 1, "unprivileged"),
            ("# ok\nVARIANTS_DIR=/x\n", 2, "VARIANTS_DIR is set in /etc/default/imgforge only"),
            ("IMG_ID=a\u{1b}[2J b\n", 1, "quote values"),
        ];
        for (text, line, want) in bad {
            match parsed(text) {
                Err(VariantError::Line { path, line: l, reason }) => {
                    assert_eq!((path.to_str().unwrap(), l), ("/v/x.conf", line), "{text:?}");
                    assert!(reason.contains(want), "{text:?}: {reason}");
                    assert!(!reason.contains('\u{1b}'), "{text:?}: {reason}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn names_files_and_list() {
        for good in ["default", "debian-12", "a.b_c"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", ".hidden", "../x", "a/b", "a b", "x\n", &"a".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config { variants_dir: dir.path().display().to_string(), ..Config::default() };
        assert_eq!(load(DEFAULT, &mut c).unwrap(), Variant::default(), "default needs no file");
        assert!(matches!(load("web", &mut c), Err(VariantError::Missing { .. })));
        assert!(matches!(load("../etc/passwd", &mut c), Err(VariantError::Name(_))));
        std::fs::write(dir.path().join("web.conf"), "IMG_ID=web\nHELPER_SOFT_TIMEOUT=99\n").unwrap();
        assert_eq!(load("web", &mut c).unwrap().defaults["OSP_IMG_ID"], "web");
        assert_eq!(c.helper_soft_timeout, 99);
        std::fs::write(dir.path().join("big.conf"), "#".repeat(MAX_CONF_BYTES as usize + 1)).unwrap();
        assert!(load("big", &mut c).unwrap_err().to_string().contains("larger than"));
        std::fs::write(dir.path().join("bin.conf"), b"IMG_ID=\xff\n").unwrap();
        assert!(load("bin", &mut c).unwrap_err().to_string().contains("UTF-8"));
        std::fs::create_dir(dir.path().join("dir.conf")).unwrap();
        assert!(load("dir", &mut c).unwrap_err().to_string().contains("not a regular file"));
        std::fs::write(dir.path().join(".x.conf"), "").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "").unwrap();
        assert_eq!(list(dir.path()), ["default", "big", "bin", "web"]);
        assert_eq!(list(&dir.path().join("missing")), ["default"]);

        let mut env = BTreeMap::from([("OSP_IMG_ID".to_string(), "given".to_string())]);
        let v = Variant {
            defaults: BTreeMap::from([
                ("OSP_IMG_ID".to_string(), "variant".to_string()),
                ("OSP_IMG_FORMAT".to_string(), "diskdump".to_string()),
            ]),
            warnings: Vec::new(),
        };
        apply_defaults(&mut env, &v);
        assert_eq!(env["OSP_IMG_ID"], "given", "Ganeti's parameter wins over the variant's default");
        assert_eq!(env["OSP_IMG_FORMAT"], "diskdump");
    }
}
