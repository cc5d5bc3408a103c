//! The OS parameters Ganeti passes as `OSP_*` (snf-image's names, plus imgforge's own), parsed
//! and checked — pure functions over the environment's strings.

use crate::ops::password::PasswordCrypto;
use imgforge_protocol::helper_vm::TARGET_DISK;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use std::borrow::Cow;
use std::collections::BTreeMap;
use thiserror::Error;

/// Every parameter with its one-line description (`parameters.list`).
pub const PARAMETERS: &[(&str, &str)] = &[
    ("img_id", "Image to deploy: NAME or local://NAME (a file in IMAGE_DIR, also tried with .raw, .img, .qcow2, .diskdump), an http(s):// URL, or null (nothing written, nothing customized); other schemes (file://, pithos://, ftp://) are refused"),
    ("img_format", "diskdump (a disk image in any detected format) or liveimg (its root filesystem is written and grown)"),
    ("img_sha256", "SHA-256 of the image file as fetched or stored (64 hex digits), checked before anything is written to the disk; without it an http(s) image is checked against IMAGE_URL.sha256 when the server has one (sha256sum's format); none: no check"),
    ("config_url", "http(s):// or file:/// URL of a JSON object of OS parameters (at most 1 MiB), fetched at create; its values replace those given here, as snf-image's"),
    ("img_passwd", "Root password (hashed with SHA-512 crypt before it leaves this host process)"),
    ("img_passwd_hash", "Root password as a crypt(3) hash, used as is"),
    ("img_properties", "JSON object, names case-insensitive: EXCLUDE_TASK_<Name>, EXCLUDE_ALL_TASKS, EXCLUDE_FilesystemResize_TASKS, ROOT_PARTITION (partition number), USERS (whose password img_passwd sets), OSFAMILY (linux), CUSTOM_TASK (base64 program run chrooted in the guest), EXCLUDE_MOUNTED_TASKS, DO_SYNC, SWAP (N:MB, a swap partition at the disk's end, a cloud-init swap file under CLOUD_INIT; or a disk letter, b for DISK_1_PATH, that disk made swap whole), CLOUD_INIT, NM_NETWORKING, ALLOW_MOUNTED_TASK_OVERWRITING (the image's /root/snf-image/helper/overwrite_task_<Task> run confined instead of the task), PASSWD_HASHING_METHOD (sha512|sha256|md5; sha1 and blowfish refused; alias PASSWORD_HASHING_METHOD); any other property is ignored with a warning in the OS log"),
    ("img_personality", "JSON list of files to inject: {path, contents (base64), owner, group, mode (decimal, default 0440)}"),
    ("inst_properties", "JSON object of properties as img_properties, each replacing img_properties' of the same name (snf-image's instance properties)"),
    ("auth_keys", "SSH public keys for root, one a line"),
    ("install_rpms", "RPM files in IMAGE_DIR to install in one transaction (comma-separated names)"),
    ("repo", "A package repository directory in IMAGE_DIR, for install: yum/dnf (repodata/), apt (Packages at its top, or dists/), or a directory of .deb files"),
    ("install", "Packages to install from repo with the guest's apt-get, dnf or yum (comma-separated)"),
    ("cloud_userdata", "base64 cloud-init user-data, written to the NoCloud seed when img_properties has CLOUD_INIT"),
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

/// What `img_id` names (snf-image's source back-ends that imgforge has).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageId {
    /// A file in IMAGE_DIR: `local://NAME`, or a plain `NAME` without `:`.
    Local(String),
    /// An `http://` or `https://` URL.
    Url(String),
    /// `null`: no image; the disk is left as it is.
    Null,
}

/// What imgforge's `img_id` takes, for the messages refusing the rest.
const IMG_ID_FORMS: &str = "NAME or local://NAME (a file in IMAGE_DIR), http://URL, https://URL, or null";

/// Parses `img_id` as snf-image reads it: `null`, `local://NAME`, `http(s)://…`, or a plain
/// `NAME` (without `:`, which would make it a scheme). The other back-ends snf-image has
/// (`file://`, `ftp(s)://`, `pithos://`, `pithosmap://`) are refused, naming what is taken.
pub fn parse_image_id(text: &str) -> Result<ImageId, ParamError> {
    if text == "null" {
        return Ok(ImageId::Null);
    }
    if text.starts_with("http://") || text.starts_with("https://") {
        return Ok(ImageId::Url(text.to_owned()));
    }
    if let Some(name) = text.strip_prefix("local://") {
        check_image_name("img_id", name)?;
        return Ok(ImageId::Local(name.to_owned()));
    }
    if let Some((scheme, _)) = text.split_once(':') {
        let why = match scheme {
            "file" => "file:// is snf-image's deprecated spelling of local://: write local://NAME",
            "pithos" | "pithosmap" => "imgforge has no Pithos back-end",
            "ftp" | "ftps" => "imgforge fetches over http and https only",
            _ if scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b"+.-".contains(&b)) && !scheme.is_empty() => {
                "not an image source imgforge has (a file name with ':' is written local://NAME)"
            }
            _ => "a file name with ':' is written local://NAME",
        };
        let scheme = imgforge_protocol::printable::printable(scheme);
        return Err(err("img_id", format!("{scheme:?}: {why}; img_id takes {IMG_ID_FORMS}")));
    }
    check_image_name("img_id", text)?;
    Ok(ImageId::Local(text.to_owned()))
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
    pub img_id: ImageId,
    /// `img_format`.
    pub img_format: ImageFormat,
    /// `img_passwd` (clear text; never logged).
    pub passwd: Option<String>,
    /// `img_passwd_hash`.
    pub passwd_hash: Option<String>,
    /// `img_properties`, keys upper-cased.
    pub properties: BTreeMap<String, String>,
    /// The hash `img_passwd` is written with (`PASSWD_HASHING_METHOD`).
    pub password_crypto: PasswordCrypto,
    /// What `img_properties` asks that imgforge ignores, one line each for Ganeti's OS log.
    pub warnings: Vec<String>,
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
    /// `cloud_userdata`, decoded.
    pub cloud_userdata: Option<Vec<u8>>,
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

    /// Hashes `img_passwd` with `PASSWD_HASHING_METHOD`, through the code `--password-crypto` uses.
    pub fn hash_password(&self, pw: &str) -> Result<String, ParamError> {
        self.password_crypto.hash(pw).map_err(|e| err("img_passwd", e.to_string()))
    }

    /// True if `img_properties` excludes the task `name` (or all tasks).
    pub fn excludes(&self, name: &str) -> bool {
        excluded(&self.properties, name)
    }
}

/// A file name inside IMAGE_DIR: no path separators, no `..`, and nothing that would not show
/// as itself in Ganeti's OS log, where the name is written (a newline would forge a line).
pub fn check_image_name(param: &str, name: &str) -> Result<(), ParamError> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." || !plain(name) {
        return Err(err(
            param,
            format!("{name:?} must be a file name in IMAGE_DIR (no '/', no '..', no control characters)"),
        ));
    }
    Ok(())
}

/// True if every character of `text` prints as itself (Rust's `{:?}` escapes none but quotes
/// and backslashes): no control character, newline or bidirectional override.
fn plain(text: &str) -> bool {
    text.chars().all(|c| matches!(c, '"' | '\'' | '\\') || c.escape_debug().nth(1).is_none())
}

/// A property name as written into Ganeti's log: as it is when plain ASCII, else quoted with
/// escapes, so that a newline, an escape sequence or a bidirectional override in a hostile name
/// neither forges a log line nor hides one.
fn shown(name: &str) -> Cow<'_, str> {
    if name.bytes().all(|b| b.is_ascii_graphic()) {
        Cow::Borrowed(name)
    } else {
        Cow::Owned(format!("{name:?}"))
    }
}

/// A JSON object's members in the order written, a repeated name kept each time (serde_json's
/// own map keeps only the last, so `{"USERS": "a", "USERS": "b"}` would silently be `b`).
pub(crate) struct Members(pub(crate) Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Collect;
        impl<'de> Visitor<'de> for Collect {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(Collect)
    }
}

fn list(text: &str) -> Vec<String> {
    text.split([',', ' ', '\n']).map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

/// Decodes `img_personality` contents as the hand-written decoder this replaced did: the
/// standard alphabet with `=` padding, ASCII whitespace anywhere ignored, stray bits in a
/// group's last character ignored, and more groups allowed after a padded one (concatenated
/// encodings).
pub(super) fn base64_decode(text: &str) -> Option<Vec<u8>> {
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

/// snf-image's configuration tasks, the names `EXCLUDE_TASK_<Name>` takes.
pub const SNF_IMAGE_TASKS: &[&str] = &[
    "FixPartitionTable",
    "FilesystemResizeUnmounted",
    "MountImage",
    "InitializeDatasource",
    "InstallUnattend",
    "FilesystemResizeMounted",
    "AddSwap",
    "AssignHostname",
    "ChangeMachineId",
    "ChangePassword",
    "ConfigureNetwork",
    "DeleteSSHKeys",
    "DisableRemoteDesktopConnections",
    "SELinuxAutorelabel",
    "EnforcePersonality",
    "RunCustomTask",
    "UmountImage",
    "FilesystemResizeAfterUmount",
];

/// imgforge's helper tasks (tasks/NN-Name), which `EXCLUDE_TASK_<Name>` also skips.
pub const HELPER_TASKS: &[&str] = &[
    "MountPayload",
    "AddSwap",
    "CheckFilesystems",
    "FixPartitionTable",
    "FilesystemResizeUnmounted",
    "MountRoot",
    "GrowFilesystem",
    "FilesystemResizeMounted",
    "DryRunSnapshot",
    "RandomSeed",
    "Customize",
    "InstallPackages",
    "CheckPackages",
    "SELinuxRelabel",
    "DryRunChanges",
    "Unmount",
];

/// snf-image's properties for Windows guests, which imgforge does not customize.
const WINDOWS_ONLY: &[&str] = &["IGNORE_UNATTEND", "OFFLINE_NTFSRESIZE", "OFFLINE_NTFSRESIZE_NOCHECK"];

/// snf-image's boolean reading (`check_yes_no`): yes, true, on, 1, set are yes; no, false, off,
/// 0, unset and empty are no (case-insensitive); `None` for anything else, which snf-image
/// takes as yes with a warning.
pub fn yes_no(value: &str) -> Option<bool> {
    let v = value.trim().to_ascii_lowercase();
    match v.as_str() {
        "yes" | "true" | "on" | "1" | "set" => Some(true),
        "no" | "false" | "off" | "0" | "unset" | "" => Some(false),
        _ => None,
    }
}

/// True if snf-image would take `value` as yes.
pub fn yes(value: &str) -> bool {
    yes_no(value).unwrap_or(true)
}

/// What imgforge does with one `img_properties` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Used as snf-image does (or nothing to do: a "no" for something imgforge never does).
    Honoured,
    /// Ignored, or read in a way worth saying: the line for Ganeti's OS log.
    Warn(String),
    /// Refused: the reason.
    Refuse(String),
}

/// Decides what becomes of the property `name` (upper-cased) with `value`: honoured, ignored
/// with a warning naming it (unknown, or for Windows), or refused (SWAP).
/// Values of honoured properties are checked apart (`parse_properties`).
pub fn judge_property(name: &str, value: &str) -> Verdict {
    if let Some(verdict) = super::task_properties::judge(name, value) {
        return verdict;
    }
    let invalid_boolean =
        || Verdict::Warn(format!("{}={value:?} is not yes or no: taken as yes, as snf-image does", shown(name)));
    match name {
        "ROOT_PARTITION" | "USERS" | "OSFAMILY" | "PASSWD_HASHING_METHOD" | "PASSWORD_HASHING_METHOD" => {
            return Verdict::Honoured;
        }
        "EXCLUDE_ALL_TASKS" | "EXCLUDE_FILESYSTEMRESIZE_TASKS" | "CLOUD_INIT" | "NM_NETWORKING" => {
            return yes_no(value).map_or_else(invalid_boolean, |_| Verdict::Honoured)
        }
        _ => {}
    }
    if let Some(task) = name.strip_prefix("EXCLUDE_TASK_") {
        let known = SNF_IMAGE_TASKS.iter().chain(HELPER_TASKS).any(|t| t.eq_ignore_ascii_case(task));
        if !known {
            return Verdict::Warn(format!(
                "{}: no task {} in snf-image's ({}) or imgforge's ({}): ignored",
                shown(name),
                shown(task),
                SNF_IMAGE_TASKS.join(", "),
                HELPER_TASKS.join(", ")
            ));
        }
        return yes_no(value).map_or_else(invalid_boolean, |_| Verdict::Honoured);
    }
    if WINDOWS_ONLY.contains(&name) {
        if !yes(value) {
            return Verdict::Honoured;
        }
        return Verdict::Warn(format!("{name} is for Windows guests, which imgforge does not customize: ignored"));
    }
    Verdict::Warn(format!("unknown property {} ignored (not one of snf-image's)", shown(name)))
}

/// The hash `img_passwd` is written with: `PASSWD_HASHING_METHOD` (snf-image's name) or its
/// alias `PASSWORD_HASHING_METHOD`, read by `--password-crypto`'s parser. snf-image also takes
/// sha1 and blowfish; they are refused, each saying why.
pub fn hashing_method(properties: &BTreeMap<String, String>) -> Result<PasswordCrypto, ParamError> {
    const NAME: &str = "PASSWD_HASHING_METHOD";
    const ALIAS: &str = "PASSWORD_HASHING_METHOD";
    let (name, value) = match (properties.get(NAME), properties.get(ALIAS)) {
        (None, None) => return Ok(PasswordCrypto::default()),
        (Some(a), Some(b)) if !a.trim().eq_ignore_ascii_case(b.trim()) => {
            return Err(err("img_properties", format!("{NAME} {a:?} and {ALIAS} {b:?} disagree: give one")))
        }
        (Some(v), _) => (NAME, v),
        (None, Some(v)) => (ALIAS, v),
    };
    let method = value.trim().to_ascii_lowercase();
    let refused = match method.as_str() {
        "blowfish" => Some(
            "blowfish (bcrypt, $2b$) is refused: glibc's own crypt cannot check it (only libxcrypt can, and \
             imgforge does not tell which a guest has), so the password might never match; use sha512 (the \
             default), sha256 or md5",
        ),
        "sha1" => Some(
            "sha1 (NetBSD's $sha1$) is refused: glibc's crypt on Linux guests cannot check it; \
             use sha512 (the default), sha256 or md5",
        ),
        _ => None,
    };
    if let Some(why) = refused {
        return Err(err("img_properties", format!("{name}: {why}")));
    }
    PasswordCrypto::parse(&method).map_err(|e| err("img_properties", format!("{name}: {e}")))
}

/// Parses and checks `img_properties` (a JSON object; names are case-insensitive, as
/// snf-image's). Returns the properties (names upper-cased) and the warnings for Ganeti's log.
pub fn parse_properties(text: &str) -> Result<(BTreeMap<String, String>, Vec<String>), ParamError> {
    let mut properties = BTreeMap::new();
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| err("img_properties", format!("is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(err("img_properties", "must be a JSON object"));
    }
    let Members(members) =
        serde_json::from_str(text).map_err(|e| err("img_properties", format!("is not JSON: {e}")))?;
    for (k, v) in &members {
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
            _ => return Err(err("img_properties", format!("{} must be a string, number or boolean", shown(k)))),
        };
        let name = k.to_ascii_uppercase();
        // Which one a reader takes (the first, the last) differs: two that disagree are refused.
        if let Some(earlier) = properties.insert(name.clone(), value.clone()) {
            if earlier != value {
                return Err(err(
                    "img_properties",
                    format!(
                        "{} is given twice with different values (names are case-insensitive): give it once",
                        shown(&name)
                    ),
                ));
            }
        }
    }
    let mut warnings = Vec::new();
    for (name, value) in &properties {
        match judge_property(name, value) {
            Verdict::Honoured => {}
            Verdict::Warn(w) => warnings.push(w),
            Verdict::Refuse(r) => return Err(err("img_properties", r)),
        }
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
    hashing_method(&properties)?;
    super::task_properties::custom_task(&properties)?;
    if let Some(f) = properties.get("OSFAMILY") {
        if !f.eq_ignore_ascii_case("linux") {
            return Err(err("img_properties", format!("OSFAMILY {f:?}: imgforge customizes Linux images only")));
        }
    }
    let warnings = warnings
        .into_iter()
        .map(|w| format!("img_properties: {}", imgforge_protocol::printable::printable(&w)))
        .collect();
    Ok((properties, warnings))
}

/// `img_properties` with `inst_properties` over it, name by name, as snf-image's helper
/// reads the second after the first; each is checked as `img_properties` is, its errors and
/// warnings naming it.
pub fn merged_properties(
    img: Option<&str>,
    inst: Option<&str>,
) -> Result<(BTreeMap<String, String>, Vec<String>), ParamError> {
    let (mut properties, mut warnings) = match img.filter(|t| !t.trim().is_empty()) {
        Some(text) => parse_properties(text)?,
        None => (BTreeMap::new(), Vec::new()),
    };
    if let Some(text) = inst.filter(|t| !t.trim().is_empty()) {
        let (inst, inst_warnings) =
            parse_properties(text).map_err(|e| ParamError { param: "inst_properties".into(), ..e })?;
        warnings.extend(inst_warnings.into_iter().map(|w| w.replacen("img_properties: ", "inst_properties: ", 1)));
        properties.extend(inst);
        hashing_method(&properties).map_err(|e| ParamError { param: "inst_properties".into(), ..e })?;
    }
    Ok((properties, warnings))
}

/// True if `properties` exclude the task `name` (or all tasks): snf-image's
/// `EXCLUDE_TASK_<Name>` and `EXCLUDE_ALL_TASKS`, read as snf-image reads a boolean.
pub fn excluded(properties: &BTreeMap<String, String>, name: &str) -> bool {
    let set = |k: &str| properties.get(k).is_some_and(|v| yes(v));
    set("EXCLUDE_ALL_TASKS") || set(&format!("EXCLUDE_TASK_{}", name.to_ascii_uppercase()))
}

/// The imgforge helper tasks `properties` exclude, for the helper's rules: each by
/// `EXCLUDE_TASK_<Name>`, the two resize tasks also by snf-image's
/// `EXCLUDE_FilesystemResize_TASKS`.
pub fn excluded_helper_tasks(properties: &BTreeMap<String, String>) -> Vec<String> {
    let resize_excluded = properties.get("EXCLUDE_FILESYSTEMRESIZE_TASKS").is_some_and(|v| yes(v));
    HELPER_TASKS
        .iter()
        .filter(|t| excluded(properties, t) || (resize_excluded && t.starts_with("FilesystemResize")))
        .map(|t| t.to_string())
        .collect()
}

/// Parses the `OSP_*` variables (keys as Ganeti passes them, `OSP_IMG_ID`).
pub fn parse(env: &BTreeMap<String, String>) -> Result<Params, ParamError> {
    let get = |name: &str| {
        env.get(&format!("OSP_{}", name.to_ascii_uppercase())).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
    };
    let img_id = parse_image_id(&get("img_id").ok_or_else(|| err("img_id", "is required (the image to deploy)"))?)?;
    let img_format = match get("img_format").as_deref() {
        None | Some("diskdump") => ImageFormat::Diskdump,
        Some("liveimg") => ImageFormat::Liveimg,
        Some(other) => return Err(err("img_format", format!("{other:?} is not diskdump or liveimg"))),
    };
    let passwd = get("img_passwd");
    let passwd_hash = get("img_passwd_hash");
    if let Some(h) = &passwd_hash {
        // It goes as is into /etc/shadow and into cloud-init's YAML (where a \r, a line break
        // to YAML, would end the chpasswd list and start keys of the tenant's choosing).
        if !h.starts_with('$') || h.contains(':') || !h.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(err("img_passwd_hash", "is not a crypt(3) hash such as $6$salt$hash"));
        }
        if passwd.is_some() {
            return Err(err("img_passwd_hash", "give img_passwd or img_passwd_hash, not both"));
        }
    }
    let (properties, warnings) =
        merged_properties(get("img_properties").as_deref(), get("inst_properties").as_deref())?;
    let password_crypto = hashing_method(&properties)?;
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
                    format!("mode {} of {:?} is out of range (decimal, at most 4095)", f.mode, f.path),
                ));
            }
            for name in [&f.owner, &f.group] {
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
                    return Err(err("img_personality", format!("{name:?} is not a user or group name")));
                }
            }
            let data = base64_decode(&f.contents)
                .ok_or_else(|| err("img_personality", format!("contents of {:?} are not base64", f.path)))?;
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
    let cloud_userdata = match get("cloud_userdata") {
        Some(text) => Some(base64_decode(&text).ok_or_else(|| err("cloud_userdata", "is not base64"))?),
        None => None,
    };
    Ok(Params {
        cloud_userdata,
        img_id,
        img_format,
        passwd,
        passwd_hash,
        properties,
        password_crypto,
        warnings,
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
            (&[("OSP_IMG_ID", "x"), ("OSP_IMG_PASSWD_HASH", "$6$a$b\rruncmd: [reboot]")], "img_passwd_hash"),
            (&[("OSP_IMG_ID", "x"), ("OSP_IMG_PASSWD_HASH", "$6$a$b\u{85}x")], "img_passwd_hash"),
            (&[("OSP_IMG_ID", "x"), ("OSP_IMG_PASSWD_HASH", "$6$a$b #x")], "img_passwd_hash"),
            (&[("OSP_IMG_ID", "x"), ("OSP_IMG_PASSWD_HASH", "$6$a$b"), ("OSP_IMG_PASSWD", "p")], "img_passwd_hash"),
            (&[("OSP_IMG_ID", "x"), ("OSP_INSTALL", "demo")], "install"),
            (&[("OSP_IMG_ID", "x"), ("OSP_IMG_PROPERTIES", r#"{"ROOT_PARTITION": "a"}"#)], "img_properties"),
            (&[("OSP_IMG_ID", "x"), ("OSP_IMG_PROPERTIES", r#"{"ROOT_PARTITION": "+3"}"#)], "img_properties"),
            (&[("OSP_IMG_ID", "x"), ("OSP_IMG_PROPERTIES", r#"{"ROOT_PARTITION": " 3"}"#)], "img_properties"),
            (&[("OSP_IMG_ID", "x"), ("OSP_IMG_PROPERTIES", r#"{"ROOT_PARTITION": 3.0}"#)], "img_properties"),
            (
                &[("OSP_IMG_ID", "x"), ("OSP_IMG_PROPERTIES", r#"{"PASSWORD_HASHING_METHOD": "blowfish"}"#)],
                "img_properties",
            ),
            (&[("OSP_IMG_ID", "x"), ("OSP_IMG_PROPERTIES", r#"{"OSFAMILY": "windows"}"#)], "img_properties"),
            (&[("OSP_IMG_ID", "x"), ("OSP_IMG_PROPERTIES", r#"{"SWAP": "a"}"#)], "img_properties"),
            (&[("OSP_IMG_ID", "x"), ("OSP_IMG_PROPERTIES", r#"{"swap": "2:0"}"#)], "img_properties"),
            (&[("OSP_IMG_ID", "x"), ("OSP_IMG_PROPERTIES", r#"{"CUSTOM_TASK": "*"}"#)], "img_properties"),
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
    fn image_id_table() {
        use ImageId::*;
        let good: &[(&str, ImageId)] = &[
            ("debian", Local("debian".into())),
            ("debian.img", Local("debian.img".into())),
            ("local://debian.img", Local("debian.img".into())),
            ("local://a:b", Local("a:b".into())),
            ("http://example.com/d.img", Url("http://example.com/d.img".into())),
            ("https://example.com/d.img", Url("https://example.com/d.img".into())),
            ("null", Null),
            // snf-image reads only the exact `null`: anything else without ':' is a file name.
            ("NULL", Local("NULL".into())),
            ("nullx", Local("nullx".into())),
        ];
        for (text, want) in good {
            assert_eq!(&parse_image_id(text).unwrap(), want, "{text}");
        }
        let bad: &[(&str, &str)] = &[
            ("local://", "file name"),
            ("local://../etc/shadow", "file name"),
            ("local://..", "file name"),
            ("local:///etc/shadow", "file name"),
            ("local://a/b", "file name"),
            ("file:///var/lib/snf-image/debian", "local://NAME"),
            ("file://debian", "local://NAME"),
            ("pithos://uuid/container/debian", "Pithos"),
            ("pithosmap://map/1024", "Pithos"),
            ("ftp://example.com/d.img", "http and https"),
            ("ftps://example.com/d.img", "http and https"),
            ("HTTP://example.com/d.img", "not an image source"),
            ("s3://bucket/d.img", "not an image source"),
            ("a:b", "not an image source"),
            ("../x", "file name"),
            ("/etc/shadow", "file name"),
        ];
        for (text, want) in bad {
            let e = parse_image_id(text).unwrap_err();
            assert_eq!(e.param, "img_id", "{text}");
            assert!(e.to_string().contains(want), "{text}: {e}");
        }
        // Every refused scheme names what img_id takes.
        assert!(parse_image_id("gopher://x").unwrap_err().to_string().contains("local://NAME"));
        assert_eq!(
            parse(&env(&[("OSP_IMG_ID", " local://debian ")])).unwrap().img_id,
            Local("debian".into()),
            "Ganeti's value is trimmed"
        );
    }

    #[test]
    fn property_verdicts() {
        use Verdict::*;
        let honoured = [
            ("ROOT_PARTITION", "1"),
            ("USERS", "root"),
            ("OSFAMILY", "linux"),
            ("PASSWD_HASHING_METHOD", "sha256"),
            ("PASSWORD_HASHING_METHOD", "sha256"),
            ("EXCLUDE_ALL_TASKS", "yes"),
            ("EXCLUDE_ALL_TASKS", "off"),
            ("EXCLUDE_TASK_ASSIGNHOSTNAME", "yes"),
            ("EXCLUDE_TASK_DELETESSHKEYS", "1"),
            ("EXCLUDE_TASK_SELINUXRELABEL", "true"),
            ("EXCLUDE_TASK_FILESYSTEMRESIZEAFTERUMOUNT", "no"),
            ("SWAP", ""),
            ("SWAP", "2:512"),
            ("SWAP", "b"),
            ("SWAP", "C"),
            ("CUSTOM_TASK", ""),
            // A no for what imgforge never does asks nothing.
            ("CLOUD_INIT", "no"),
            ("CLOUD_INIT", "yes"),
            ("NM_NETWORKING", "false"),
            ("NM_NETWORKING", "ON"),
            ("DO_SYNC", "0"),
            ("ALLOW_MOUNTED_TASK_OVERWRITING", "off"),
            ("ALLOW_MOUNTED_TASK_OVERWRITING", "yes"),
            ("EXCLUDE_MOUNTED_TASKS", "unset"),
            ("EXCLUDE_MOUNTED_TASKS", "set"),
            ("DO_SYNC", "1"),
            ("CUSTOM_TASK", "IyEvYmluL3NoCg=="),
            ("EXCLUDE_FILESYSTEMRESIZE_TASKS", ""),
            ("IGNORE_UNATTEND", "no"),
        ];
        for (name, value) in honoured {
            assert_eq!(judge_property(name, value), Honoured, "{name}={value}");
        }
        let warned = [
            ("CLOUD_INIT", "maybe", "taken as yes"),
            ("NM_NETWORKING", "y", "taken as yes"),
            ("DO_SYNC", "sometimes", "taken as yes"),
            ("ALLOW_MOUNTED_TASK_OVERWRITING", "perhaps", "taken as yes"),
            ("EXCLUDE_MOUNTED_TASKS", "maybe", "taken as yes"),
            ("OFFLINE_NTFSRESIZE", "yes", "Windows"),
            ("OFFLINE_NTFSRESIZE_NOCHECK", "yes", "Windows"),
            ("IGNORE_UNATTEND", "yes", "Windows"),
            ("EXCLUDE_ALL_TASKS", "maybe", "taken as yes"),
            ("EXCLUDE_TASK_CHANGEPASSWORD", "sometimes", "taken as yes"),
            ("EXCLUDE_TASK_ASSIGNHOSTNAM", "yes", "no task ASSIGNHOSTNAM"),
            ("FROBNICATE", "1", "unknown property FROBNICATE ignored"),
            ("PASSWD_HASHING", "sha256", "unknown property PASSWD_HASHING ignored"),
        ];
        for (name, value, want) in warned {
            match judge_property(name, value) {
                Warn(w) => assert!(w.contains(name) && w.contains(want), "{name}={value}: {w}"),
                other => panic!("{name}={value}: {other:?}"),
            }
        }
        for value in ["a", "2:0", "bc"] {
            assert!(matches!(judge_property("SWAP", value), Refuse(r) if r.contains("SWAP")), "{value}");
        }
    }

    #[test]
    fn property_names_are_case_insensitive_and_unknown_ones_warn() {
        let (p, w) = parse_properties(
            r#"{"Passwd_Hashing_Method": "SHA256", "users": "root", "Frobnicate": 1, "allow_mounted_task_overwriting": "yes", "do_sync": "yes", "exclude_task_changepassword": "off"}"#,
        )
        .unwrap();
        assert_eq!(p["PASSWD_HASHING_METHOD"], "SHA256");
        assert_eq!(p["USERS"], "root");
        assert!(!excluded(&p, "ChangePassword"), "off is no, as snf-image reads it");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w.iter().any(|l| l.contains("FROBNICATE") && l.contains("ignored")), "{w:?}");
        assert!(w.iter().all(|l| l.starts_with("img_properties: ")));
        // The same name twice: the same value is fine, two values are refused.
        assert!(parse_properties(r#"{"users": "root", "USERS": "root"}"#).is_ok());
        let e = parse_properties(r#"{"users": "root", "USERS": "alice"}"#).unwrap_err();
        assert!(e.to_string().contains("USERS is given twice"), "{e}");
        // Control characters in a name are not written raw into Ganeti's log.
        let (_, w) = parse_properties("{\"A\\u001b[2J\": 1}").unwrap();
        assert!(!w[0].contains('\x1b'), "{w:?}");
    }

    /// Nothing of a hostile name reaches Ganeti's OS log as a line of its own, an escape
    /// sequence or a bidirectional override, whether warned about or refused.
    #[test]
    fn property_names_cannot_forge_log_lines() {
        let hostile = [
            r#"{"FOO\nimgforge: img_id=null: nothing written": "1"}"#,
            r#"{"EXCLUDE_TASK_Customize\nX": "yes"}"#,
            r#"{"EXCLUDE_TASK_CHANGEPASSWORD": "maybe\n"}"#,
            r#"{"\u202eFOO": "1"}"#,
        ];
        for text in hostile {
            let (_, w) = parse_properties(text).unwrap();
            assert!(w.len() == 1 && plain(&w[0]), "{text}: {w:?}");
        }
        for text in [r#"{"X\n\u001b[2Jfake": [1]}"#, r#"{"a\nb": "1", "A\nB": "2"}"#] {
            let e = parse_properties(text).unwrap_err().to_string();
            assert!(plain(&e), "{text}: {e}");
        }
        for id in ["deb\nian", "local://x\u{1b}[31m", "local://\u{202e}gpj.exe", "a\rb"] {
            let e = parse_image_id(id).unwrap_err().to_string();
            assert!(plain(&e) && e.contains("no control characters"), "{id:?}: {e}");
        }
        assert!(parse_image_id("local://débian \"2\"").is_ok(), "printable names are file names");
    }

    /// The same name twice, in one spelling or two: one value is fine, two are refused, as
    /// they are when the spellings differ (serde_json's map would keep the last silently).
    #[test]
    fn a_name_given_twice_with_two_values_is_refused() {
        let (p, _) = parse_properties(r#"{"USERS": "root", "USERS": "root"}"#).unwrap();
        assert_eq!(p["USERS"], "root");
        for text in
            [r#"{"ROOT_PARTITION": "1", "ROOT_PARTITION": "2"}"#, r#"{"root_partition": 1, "ROOT_PARTITION": 2}"#]
        {
            let e = parse_properties(text).unwrap_err().to_string();
            assert!(e.contains("ROOT_PARTITION is given twice"), "{text}: {e}");
        }
        assert!(parse_properties("[1]").unwrap_err().to_string().contains("must be a JSON object"));
    }

    #[test]
    fn yes_no_as_snf_image() {
        for v in ["yes", "YES", "true", "True", "on", "1", "set", " yes "] {
            assert_eq!(yes_no(v), Some(true), "{v}");
        }
        for v in ["no", "No", "false", "off", "0", "unset", ""] {
            assert_eq!(yes_no(v), Some(false), "{v}");
        }
        for v in ["maybe", "2", "y"] {
            assert_eq!(yes_no(v), None, "{v}");
        }
        let props = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert!(excluded(&props("EXCLUDE_ALL_TASKS", "maybe"), "AssignHostname"), "snf-image takes it as yes");
        assert!(!excluded(&props("EXCLUDE_ALL_TASKS", "unset"), "AssignHostname"));
        assert!(excluded(&props("EXCLUDE_TASK_ASSIGNHOSTNAME", "on"), "AssignHostname"));
        assert_eq!(excluded_helper_tasks(&props("EXCLUDE_TASK_SELINUXRELABEL", "yes")), ["SELinuxRelabel"]);
        assert_eq!(excluded_helper_tasks(&props("EXCLUDE_ALL_TASKS", "yes")).len(), HELPER_TASKS.len());
        assert!(excluded_helper_tasks(&props("EXCLUDE_TASK_ASSIGNHOSTNAME", "yes")).is_empty());
    }

    #[test]
    fn hashing_method_table() {
        let props = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let good: &[(&[(&str, &str)], PasswordCrypto)] = &[
            (&[], PasswordCrypto::Sha512),
            (&[("PASSWD_HASHING_METHOD", "sha512")], PasswordCrypto::Sha512),
            (&[("PASSWD_HASHING_METHOD", "sha256")], PasswordCrypto::Sha256),
            (&[("PASSWD_HASHING_METHOD", "SHA256")], PasswordCrypto::Sha256),
            (&[("PASSWORD_HASHING_METHOD", "sha256")], PasswordCrypto::Sha256),
            (&[("PASSWORD_HASHING_METHOD", "Sha512")], PasswordCrypto::Sha512),
            (&[("PASSWD_HASHING_METHOD", "md5")], PasswordCrypto::Md5),
            (&[("PASSWD_HASHING_METHOD", "MD5")], PasswordCrypto::Md5),
            (&[("PASSWORD_HASHING_METHOD", "md5")], PasswordCrypto::Md5),
            (&[("PASSWD_HASHING_METHOD", "sha256"), ("PASSWORD_HASHING_METHOD", "SHA256")], PasswordCrypto::Sha256),
        ];
        for (pairs, want) in good {
            assert_eq!(hashing_method(&props(pairs)).unwrap(), *want, "{pairs:?}");
        }
        let bad: &[(&[(&str, &str)], &str)] = &[
            (&[("PASSWORD_HASHING_METHOD", "blowfish")], "PASSWORD_HASHING_METHOD: blowfish"),
            (&[("PASSWD_HASHING_METHOD", "blowfish")], "glibc's own crypt cannot check it"),
            (&[("PASSWD_HASHING_METHOD", "sha1")], "glibc's crypt"),
            (&[("PASSWD_HASHING_METHOD", "des")], "not a password hash imgforge writes"),
            (
                &[("PASSWD_HASHING_METHOD", "sha256"), ("PASSWORD_HASHING_METHOD", "sha512")],
                "PASSWD_HASHING_METHOD \"sha256\" and PASSWORD_HASHING_METHOD \"sha512\" disagree",
            ),
        ];
        for (pairs, want) in bad {
            let e = hashing_method(&props(pairs)).unwrap_err();
            assert_eq!(e.param, "img_properties");
            assert!(e.to_string().contains(want), "{pairs:?}: {e}");
            let json = serde_json::to_string(&props(pairs)).unwrap();
            assert!(parse_properties(&json).is_err(), "{json} accepted");
        }
        // The method reaches the hash img_passwd is written with.
        for (json, prefix) in [
            (r#"{"passwd_hashing_method": "sha256"}"#, "$5$"),
            (r#"{"PASSWORD_HASHING_METHOD": "sha256"}"#, "$5$"),
            (r#"{"PASSWD_HASHING_METHOD": "sha512"}"#, "$6$"),
            (r#"{"PASSWD_HASHING_METHOD": "md5"}"#, "$1$"),
            ("{}", "$6$"),
        ] {
            let p = parse(&env(&[("OSP_IMG_ID", "x"), ("OSP_IMG_PROPERTIES", json)])).unwrap();
            let hash = p.hash_password("pw").unwrap();
            assert!(hash.starts_with(prefix), "{json}: {hash}");
        }
    }

    #[test]
    fn helper_tasks_are_the_tasks_directory() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tasks");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().into_string().ok())
            .filter_map(|n| {
                n.split_once('-').filter(|(nn, _)| nn.bytes().all(|b| b.is_ascii_digit())).map(|(_, t)| t.to_owned())
            })
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = HELPER_TASKS.iter().map(|t| t.to_string()).collect();
        listed.sort();
        assert_eq!(listed, on_disk, "HELPER_TASKS must name every task in tasks/ (EXCLUDE_TASK_<Name> checks it)");
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
