//! The OS parameters Ganeti passes as `OSP_*` (snf-image's names, plus imgforge's own), parsed
//! and checked — pure functions over the environment's strings.

use imgforge_protocol::helper_vm::TARGET_DISK;
use serde::Deserialize;
use std::collections::BTreeMap;
use thiserror::Error;

/// Every parameter with its one-line description (`parameters.list`).
pub const PARAMETERS: &[(&str, &str)] = &[
    ("img_id", "Image to deploy: a file name in IMAGE_DIR (also tried with .raw, .img, .qcow2, .diskdump) or an http(s) URL"),
    ("img_format", "diskdump (a disk image in any detected format) or liveimg (its root filesystem is written and grown)"),
    ("img_passwd", "Root password (hashed with SHA-512 crypt before it leaves this host process)"),
    ("img_passwd_hash", "Root password as a crypt(3) hash, used as is"),
    ("img_properties", "JSON object: EXCLUDE_TASK_<Name>, EXCLUDE_ALL_TASKS, ROOT_PARTITION (partition number), USERS (whose password img_passwd sets), OSFAMILY (linux), PASSWORD_HASHING_METHOD (sha512|sha256); SWAP is refused"),
    ("img_personality", "JSON list of files to inject: {path, contents (base64), owner, group, mode (decimal, default 0440)}"),
    ("auth_keys", "SSH public keys for root, one a line"),
    ("install_rpms", "RPM files in IMAGE_DIR to install in one transaction (comma-separated names)"),
    ("repo", "A yum/dnf repository directory in IMAGE_DIR, for install"),
    ("install", "Packages to install from repo with the guest's dnf or yum (comma-separated)"),
];

/// A parameter that cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("OS parameter {param}: {reason}")]
pub struct ParamError {
    /// The parameter (`img_id`).
    pub param: String,
    /// What is wrong and what to do.
    pub reason: String,
}

fn err(param: &str, reason: impl Into<String>) -> ParamError {
    ParamError { param: param.into(), reason: reason.into() }
}

/// `img_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// A disk image.
    Diskdump,
    /// A liveimg.
    Liveimg,
}

/// One `img_personality` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersonalityFile {
    /// Absolute guest path.
    pub path: String,
    /// base64 contents.
    pub contents: String,
    /// Owner (name or number).
    #[serde(default = "root")]
    pub owner: String,
    /// Group.
    #[serde(default = "root")]
    pub group: String,
    /// Mode, decimal (as snf-image).
    #[serde(default = "default_mode")]
    pub mode: u32,
}

fn root() -> String {
    "root".into()
}

fn default_mode() -> u32 {
    0o440
}

/// The parsed parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// `img_id`.
    pub img_id: String,
    /// `img_format`.
    pub img_format: ImageFormat,
    /// `img_passwd` (clear text; never logged).
    pub passwd: Option<String>,
    /// `img_passwd_hash`.
    pub passwd_hash: Option<String>,
    /// `img_properties`, keys upper-cased.
    pub properties: BTreeMap<String, String>,
    /// `img_personality`, decoded.
    pub personality: Vec<(PersonalityFile, Vec<u8>)>,
    /// `auth_keys`.
    pub auth_keys: Vec<String>,
    /// `install_rpms`.
    pub install_rpms: Vec<String>,
    /// `repo`.
    pub repo: Option<String>,
    /// `install`.
    pub install: Vec<String>,
}

impl Params {
    /// `USERS`: whose password img_passwd sets (default root).
    pub fn users(&self) -> Vec<String> {
        match self.properties.get("USERS") {
            Some(u) if !u.trim().is_empty() => u.split_whitespace().map(String::from).collect(),
            _ => vec!["root".into()],
        }
    }

    /// `ROOT_PARTITION`: the root's partition number, as the helper names its device.
    pub fn root_partition(&self) -> Option<String> {
        self.properties.get("ROOT_PARTITION").map(|n| format!("{TARGET_DISK}{n}"))
    }

    /// Hashes `img_passwd` with `PASSWORD_HASHING_METHOD` (sha512, the default, or sha256).
    pub fn hash_password(&self, pw: &str) -> Result<String, ParamError> {
        match self.properties.get("PASSWORD_HASHING_METHOD").map(|m| m.to_ascii_lowercase()).as_deref() {
            None | Some("sha512") => {
                crate::ops::password::sha512_crypt(pw).map_err(|e| err("img_passwd", e.to_string()))
            }
            Some("sha256") => crate::ops::password::sha256_crypt(pw).map_err(|e| err("img_passwd", e.to_string())),
            Some(other) => Err(err(
                "img_properties",
                format!("PASSWORD_HASHING_METHOD {other:?} is not supported (sha512 or sha256)"),
            )),
        }
    }

    /// True if `img_properties` excludes the task `name` (or all tasks).
    pub fn excludes(&self, name: &str) -> bool {
        excluded(&self.properties, name)
    }
}

/// A file name inside IMAGE_DIR: no path separators, no `..`.
pub fn check_image_name(param: &str, name: &str) -> Result<(), ParamError> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." || name.contains('\0') {
        return Err(err(param, format!("{name:?} must be a file name in IMAGE_DIR (no '/', no '..')")));
    }
    Ok(())
}

fn list(text: &str) -> Vec<String> {
    text.split([',', ' ', '\n']).map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

/// Decodes `img_personality` contents as the hand-written decoder this replaced did: the
/// standard alphabet with `=` padding, ASCII whitespace anywhere ignored, stray bits in a
/// group's last character ignored, and more groups allowed after a padded one (concatenated
/// encodings).
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{GeneralPurpose, PAD};
    use base64::Engine;
    const STANDARD_LENIENT: GeneralPurpose =
        GeneralPurpose::new(&base64::alphabet::STANDARD, PAD.with_decode_allow_trailing_bits(true));
    let clean: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(clean.len() / 4 * 3);
    let mut rest = clean.as_slice();
    while !rest.is_empty() {
        // The engine takes padding only at the end of its input: each padded group ends one.
        let end = rest.chunks(4).position(|group| group.ends_with(b"=")).map_or(rest.len(), |i| 4 * i + 4);
        let (encoding, tail) = rest.split_at(end.min(rest.len()));
        STANDARD_LENIENT.decode_vec(encoding, &mut out).ok()?;
        rest = tail;
    }
    Some(out)
}

/// Parses and checks `img_properties` (a JSON object; keys are case-insensitive).
pub fn parse_properties(text: &str) -> Result<BTreeMap<String, String>, ParamError> {
    let mut properties = BTreeMap::new();
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| err("img_properties", format!("is not JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| err("img_properties", "must be a JSON object"))?;
    for (k, v) in obj {
        let value = match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => {
                if *b {
                    "1".into()
                } else {
                    "0".into()
                }
            }
            _ => return Err(err("img_properties", format!("{k} must be a string, number or boolean"))),
        };
        properties.insert(k.to_ascii_uppercase(), value);
    }
    if let Some(n) = properties.get("ROOT_PARTITION") {
        if crate::plain_number::parse::<u32>(n).is_none_or(|n| n == 0 || n > 128) {
            return Err(err("img_properties", format!("ROOT_PARTITION {n:?} must be a partition number (1-128)")));
        }
    }
    if let Some(users) = properties.get("USERS") {
        if users.split_whitespace().any(|u| !u.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))) {
            return Err(err("img_properties", format!("USERS {users:?} must be user names separated by spaces")));
        }
    }
    if let Some(m) = properties.get("PASSWORD_HASHING_METHOD") {
        if !["sha512", "sha256"].contains(&m.to_ascii_lowercase().as_str()) {
            return Err(err(
                "img_properties",
                format!("PASSWORD_HASHING_METHOD {m:?} is not supported (sha512 or sha256)"),
            ));
        }
    }
    if let Some(f) = properties.get("OSFAMILY") {
        if !f.eq_ignore_ascii_case("linux") {
            return Err(err("img_properties", format!("OSFAMILY {f:?}: imgforge customizes Linux images only")));
        }
    }
    if properties.contains_key("SWAP") {
        return Err(err(
            "img_properties",
            "SWAP (adding a swap partition) is not supported: size the image's own swap instead",
        ));
    }
    Ok(properties)
}

/// True if `properties` exclude the task `name` (or all tasks): snf-image's
/// `EXCLUDE_TASK_<Name>` and `EXCLUDE_ALL_TASKS`, set to anything but empty, 0, no or false.
pub fn excluded(properties: &BTreeMap<String, String>, name: &str) -> bool {
    let yes = |k: &str| {
        properties.get(k).is_some_and(|v| {
            !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("no") && !v.eq_ignore_ascii_case("false")
        })
    };
    yes("EXCLUDE_ALL_TASKS") || yes(&format!("EXCLUDE_TASK_{}", name.to_ascii_uppercase()))
}

/// Parses the `OSP_*` variables (keys as Ganeti passes them, `OSP_IMG_ID`).
pub fn parse(env: &BTreeMap<String, String>) -> Result<Params, ParamError> {
    let get = |name: &str| {
        env.get(&format!("OSP_{}", name.to_ascii_uppercase())).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
    };
    let img_id = get("img_id").ok_or_else(|| err("img_id", "is required (the image to deploy)"))?;
    if !(img_id.starts_with("http://") || img_id.starts_with("https://")) {
        check_image_name("img_id", &img_id)?;
    }
    let img_format = match get("img_format").as_deref() {
        None | Some("diskdump") => ImageFormat::Diskdump,
        Some("liveimg") => ImageFormat::Liveimg,
        Some(other) => return Err(err("img_format", format!("{other:?} is not diskdump or liveimg"))),
    };
    let passwd = get("img_passwd");
    let passwd_hash = get("img_passwd_hash");
    if let Some(h) = &passwd_hash {
        if !h.starts_with('$') || h.contains([':', '\n']) {
            return Err(err("img_passwd_hash", "is not a crypt(3) hash such as $6$salt$hash"));
        }
        if passwd.is_some() {
            return Err(err("img_passwd_hash", "give img_passwd or img_passwd_hash, not both"));
        }
    }
    let properties = match get("img_properties") {
        Some(text) => parse_properties(&text)?,
        None => BTreeMap::new(),
    };
    let mut personality = Vec::new();
    if let Some(text) = get("img_personality") {
        let files: Vec<PersonalityFile> = serde_json::from_str(&text).map_err(|e| {
            err("img_personality", format!("is not a JSON list of {{path, contents, owner, group, mode}}: {e}"))
        })?;
        for f in files {
            crate::ops::check_guest_path(&f.path).map_err(|r| err("img_personality", r))?;
            if f.mode > 0o7777 {
                return Err(err(
                    "img_personality",
                    format!("mode {} of {} is out of range (decimal, at most 4095)", f.mode, f.path),
                ));
            }
            for name in [&f.owner, &f.group] {
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
                    return Err(err("img_personality", format!("{name:?} is not a user or group name")));
                }
            }
            let data = base64_decode(&f.contents)
                .ok_or_else(|| err("img_personality", format!("contents of {} are not base64", f.path)))?;
            personality.push((f, data));
        }
    }
    let auth_keys: Vec<String> = get("auth_keys")
        .map(|t| t.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())
        .unwrap_or_default();
    let install_rpms = get("install_rpms").map(|t| list(&t)).unwrap_or_default();
    for r in &install_rpms {
        check_image_name("install_rpms", r)?;
    }
    let repo = get("repo");
    if let Some(r) = &repo {
        check_image_name("repo", r)?;
    }
    let install = get("install").map(|t| list(&t)).unwrap_or_default();
    if !install.is_empty() && repo.is_none() {
        return Err(err("install", "needs repo (a repository directory in IMAGE_DIR)"));
    }
    Ok(Params {
        img_id,
        img_format,
        passwd,
        passwd_hash,
        properties,
        personality,
        auth_keys,
        install_rpms,
        repo,
        install,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn good_parameters() {
        let p = parse(&env(&[
            ("OSP_IMG_ID", "debian"),
            ("OSP_IMG_PASSWD", "pw"),
            ("OSP_IMG_PROPERTIES", r#"{"exclude_task_assignhostname": "yes", "ROOT_PARTITION": 1}"#),
            (
                "OSP_IMG_PERSONALITY",
                r#"[{"path": "/etc/motd", "contents": "aGVsbG8=", "owner": "root", "group": "root", "mode": 420}]"#,
            ),
            ("OSP_AUTH_KEYS", "ssh-ed25519 AAAA a\n\nssh-rsa BBBB b\n"),
        ]))
        .unwrap();
        assert_eq!(p.img_format, ImageFormat::Diskdump);
        assert!(p.excludes("AssignHostname") && !p.excludes("ChangePassword"));
        assert_eq!(p.properties["ROOT_PARTITION"], "1");
        assert_eq!(p.personality[0].1, b"hello");
        assert_eq!(p.personality[0].0.mode, 0o644);
        assert_eq!(p.auth_keys.len(), 2);
        let defaults =
            parse(&env(&[("OSP_IMG_ID", "x"), ("OSP_IMG_PERSONALITY", r#"[{"path": "/a", "contents": ""}]"#)]))
                .unwrap();
        assert_eq!(defaults.personality[0].0.mode, 0o440);
    }

    #[test]
    fn bad_parameters() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[], "img_id"),
            (&[("OSP_IMG_ID", "../etc/shadow")], "img_id"),
            (&[("OSP_IMG_ID", "/etc/shadow")], "img_id"),
            (&[("OSP_IMG_ID", "x"), ("OSP_IMG_FORMAT", "vmdk")], "img_format"),
            (&[("OSP_IMG_ID", "x"), ("OSP_IMG_PROPERTIES", "{not json")], "img_properties"),
            (&[("OSP_IMG_ID", "x"), ("OSP_IMG_PROPERTIES", "[1]")], "img_properties"),
            (
                &[("OSP_IMG_ID", "x"), ("OSP_IMG_PERSONALITY", r#"[{"path": "etc/x", "contents": ""}]"#)],
                "img_personality",
            ),
            (
                &[("OSP_IMG_ID", "x"), ("OSP_IMG_PERSONALITY", r#"[{"path": "/../x", "contents": ""}]"#)],
                "img_personality",
            ),
            (
                &[("OSP_IMG_ID", "x"), ("OSP_IMG_PERSONALITY", r#"[{"path": "/x", "contents": "!!"}]"#)],
                "img_personality",
            ),
            (
                &[("OSP_IMG_ID", "x"), ("OSP_IMG_PERSONALITY", r#"[{"path": "/x", "contents": "", "mode": 99999}]"#)],
                "img_personality",
            ),
            (
                &[("OSP_IMG_ID", "x"), ("OSP_IMG_PERSONALITY", r#"[{"path": "/x", "contents": "", "owner": "a b"}]"#)],
                "img_personality",
            ),
            (&[("OSP_IMG_ID", "x"), ("OSP_IMG_PASSWD_HASH", "plain")], "img_passwd_hash"),
            (&[("OSP_IMG_ID", "x"), ("OSP_IMG_PASSWD_HASH", "$6$a$b"), ("OSP_IMG_PASSWD", "p")], "img_passwd_hash"),
            (&[("OSP_IMG_ID", "x"), ("OSP_INSTALL", "demo")], "install"),
            (&[("OSP_IMG_ID", "x"), ("OSP_IMG_PROPERTIES", r#"{"ROOT_PARTITION": "a"}"#)], "img_properties"),
            (&[("OSP_IMG_ID", "x"), ("OSP_IMG_PROPERTIES", r#"{"ROOT_PARTITION": "+3"}"#)], "img_properties"),
            (&[("OSP_IMG_ID", "x"), ("OSP_IMG_PROPERTIES", r#"{"ROOT_PARTITION": " 3"}"#)], "img_properties"),
            (&[("OSP_IMG_ID", "x"), ("OSP_IMG_PROPERTIES", r#"{"ROOT_PARTITION": 3.0}"#)], "img_properties"),
            (&[("OSP_IMG_ID", "x"), ("OSP_IMG_PROPERTIES", r#"{"PASSWORD_HASHING_METHOD": "md5"}"#)], "img_properties"),
            (&[("OSP_IMG_ID", "x"), ("OSP_IMG_PROPERTIES", r#"{"OSFAMILY": "windows"}"#)], "img_properties"),
            (&[("OSP_IMG_ID", "x"), ("OSP_IMG_PROPERTIES", r#"{"SWAP": "2:512"}"#)], "img_properties"),
            (&[("OSP_IMG_ID", "x"), ("OSP_IMG_PROPERTIES", r#"{"USERS": "root;rm"}"#)], "img_properties"),
            (&[("OSP_IMG_ID", "x"), ("OSP_INSTALL_RPMS", "../a.rpm")], "install_rpms"),
        ];
        for (pairs, param) in cases {
            let e = parse(&env(pairs)).unwrap_err();
            assert_eq!(e.param, *param, "{pairs:?}: {e}");
        }
        let e = parse(&env(&[("OSP_IMG_ID", "x"), ("OSP_IMG_PASSWD", "s3cret"), ("OSP_IMG_PASSWD_HASH", "$6$x")]))
            .unwrap_err();
        assert!(!e.to_string().contains("s3cret"));
    }

    #[test]
    fn base64() {
        assert_eq!(base64_decode("aGVsbG8gd29ybGQ=").unwrap(), b"hello world");
        assert_eq!(base64_decode("").unwrap(), b"");
        assert!(base64_decode("abc").is_none());
        assert!(base64_decode("a=bc").is_none());
        assert_eq!(base64_decode(" aGVs\nbG8g\r\nd29y\tbGQ= ").unwrap(), b"hello world");
        assert_eq!(base64_decode("aGk=aGk=").unwrap(), b"hihi");
        assert_eq!(base64_decode("aGl=").unwrap(), b"hi", "stray bits in the last character");
        for bad in ["ab=c", "a===", "====", "abc=d", "ab-c", "abcd=", "YQ\x0b==", "aé=="] {
            assert!(base64_decode(bad).is_none(), "{bad:?}");
        }
    }

    proptest::proptest! {
        #[test]
        /// Whatever Ganeti passes, what is accepted is in range: a partition number of plain
        /// digits, file modes of at most 07777, absolute paths.
        fn accepted_parameters_are_in_range(p in ".{0,200}", q in r#"\{"(ROOT_PARTITION|root_partition|USERS)": ("[-+ 0-9a-z]{0,5}"|[-0-9.e]{1,6})\}|.{0,100}"#) {
            if let Ok(params) = parse(&env(&[("OSP_IMG_ID", "x"), ("OSP_IMG_PERSONALITY", &p), ("OSP_IMG_PROPERTIES", &q)])) {
                if let Some(n) = params.properties.get("ROOT_PARTITION") {
                    proptest::prop_assert!(n.bytes().all(|b| b.is_ascii_digit()), "{n:?}");
                    proptest::prop_assert!((1..=128).contains(&n.parse::<u32>().unwrap_or(0)), "{n:?}");
                }
                for (f, _) in &params.personality {
                    proptest::prop_assert!(f.mode <= 0o7777 && f.path.starts_with('/'), "{f:?}");
                }
            }
        }
    }
}

/// Ganeti's NICs (`NIC_COUNT`, `NIC_<i>_MAC`, `NIC_<i>_IP`, `NIC_<i>_NETWORK_SUBNET`,
/// `NIC_<i>_NETWORK_GATEWAY`) as interfaces to configure: static where Ganeti knows the
/// address and its subnet, DHCP otherwise.
pub fn nics(env: &BTreeMap<String, String>) -> Result<Vec<imgforge_protocol::rules::Nic>, ParamError> {
    let count: usize = match env.get("NIC_COUNT").map(|v| v.trim()) {
        None | Some("") => return Ok(Vec::new()),
        Some(v) => crate::plain_number::parse(v).ok_or_else(|| err("NIC_COUNT", format!("{v:?} is not a number")))?,
    };
    let mut out = Vec::new();
    for i in 0..count.min(64) {
        let get = |k: &str| env.get(&format!("NIC_{i}_{k}")).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        let mac = get("MAC").ok_or_else(|| err(&format!("NIC_{i}_MAC"), "is missing"))?;
        let hex_pairs = mac.split(':').collect::<Vec<_>>();
        if hex_pairs.len() != 6 || !hex_pairs.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit())) {
            return Err(err(&format!("NIC_{i}_MAC"), format!("{mac:?} is not a MAC address")));
        }
        let ip = get("IP");
        let subnet = get("NETWORK_SUBNET");
        let ipv4 = match (&ip, &subnet) {
            (Some(ip), Some(subnet)) => {
                ip.parse::<std::net::Ipv4Addr>()
                    .map_err(|_| err(&format!("NIC_{i}_IP"), format!("{ip:?} is not an IPv4 address")))?;
                let prefix = subnet
                    .split_once('/')
                    .and_then(|(_, p)| crate::plain_number::parse::<u8>(p))
                    .filter(|p| *p <= 32)
                    .ok_or_else(|| {
                        err(
                            &format!("NIC_{i}_NETWORK_SUBNET"),
                            format!("{subnet:?} is not a subnet such as 192.0.2.0/24"),
                        )
                    })?;
                Some(format!("{ip}/{prefix}"))
            }
            _ => None,
        };
        let gateway4 = match (&ipv4, get("NETWORK_GATEWAY")) {
            (Some(_), Some(gw)) => {
                gw.parse::<std::net::Ipv4Addr>()
                    .map_err(|_| err(&format!("NIC_{i}_NETWORK_GATEWAY"), format!("{gw:?} is not an IPv4 address")))?;
                Some(gw)
            }
            _ => None,
        };
        out.push(imgforge_protocol::rules::Nic { mac: mac.to_ascii_lowercase(), ipv4, gateway4 });
    }
    Ok(out)
}

#[cfg(test)]
mod nic_tests {
    use super::*;

    #[test]
    fn nic_table() {
        let env: BTreeMap<String, String> = [
            ("NIC_COUNT", "2"),
            ("NIC_0_MAC", "AA:00:00:77:5e:a9"),
            ("NIC_0_IP", "192.0.2.10"),
            ("NIC_0_NETWORK_SUBNET", "192.0.2.0/24"),
            ("NIC_0_NETWORK_GATEWAY", "192.0.2.1"),
            ("NIC_1_MAC", "aa:00:00:77:5e:aa"),
            ("NIC_1_IP", "198.51.100.7"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let n = nics(&env).unwrap();
        assert_eq!(n[0].ipv4.as_deref(), Some("192.0.2.10/24"));
        assert_eq!(n[0].gateway4.as_deref(), Some("192.0.2.1"));
        assert_eq!(n[0].mac, "aa:00:00:77:5e:a9");
        assert_eq!(n[1].ipv4, None, "an address without a subnet is left to DHCP");
        let mut bad = env.clone();
        bad.insert("NIC_0_MAC".into(), "nope".into());
        assert!(nics(&bad).is_err());
        let mut bad = env.clone();
        bad.insert("NIC_0_NETWORK_SUBNET".into(), "192.0.2.0".into());
        assert!(nics(&bad).is_err());
        // Plain digits only: Rust's parse takes a leading +.
        let mut bad = env.clone();
        bad.insert("NIC_0_NETWORK_SUBNET".into(), "192.0.2.0/+24".into());
        assert!(nics(&bad).is_err());
        let mut bad = env.clone();
        bad.insert("NIC_COUNT".into(), "+2".into());
        assert!(nics(&bad).is_err());
        assert!(nics(&BTreeMap::new()).unwrap().is_empty());
    }
}
