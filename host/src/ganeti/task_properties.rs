//! snf-image's `img_properties` that shape which configuration tasks run and how:
//! `SWAP`, `CUSTOM_TASK`, `EXCLUDE_MOUNTED_TASKS`, `DO_SYNC` and
//! `ALLOW_MOUNTED_TASK_OVERWRITING` — pure functions over the parsed
//! properties (names upper-cased), apart from `params.rs` so that each family of properties
//! keeps to its own module.

use super::params::{yes_no, ParamError, Verdict};
use std::collections::BTreeMap;

/// The name of snf-image's task that runs `CUSTOM_TASK` (`EXCLUDE_TASK_RunCustomTask`).
pub const CUSTOM_TASK_NAME: &str = "RunCustomTask";

/// imgforge's helper tasks that need the guest mounted, which `EXCLUDE_MOUNTED_TASKS` skips (as
/// snf-image skips its `mounted_excludable` tasks). What is left is what snf-image keeps:
/// FixPartitionTable and FilesystemResizeUnmounted, with the helper's own MountPayload,
/// CheckFilesystems and Unmount (which only undoes what ran).
pub const MOUNTED_HELPER_TASKS: &[&str] = &[
    // snf-image's AddSwap is mounted-excludable; imgforge's runs before the mount.
    "AddSwap",
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
];

/// What becomes of the properties this module owns (`None` for any other): `CUSTOM_TASK`
/// (its value checked apart, [`custom_task`]), and the booleans `EXCLUDE_MOUNTED_TASKS`,
/// `DO_SYNC` and `ALLOW_MOUNTED_TASK_OVERWRITING`, read as snf-image's `check_yes_no` reads them.
pub fn judge(name: &str, value: &str) -> Option<Verdict> {
    match name {
        "SWAP" => Some(parse_swap(value).map_or_else(Verdict::Refuse, |_| Verdict::Honoured)),
        "CUSTOM_TASK" => Some(Verdict::Honoured),
        // DO_SYNC asks for resize2fs with fsync: imgforge's resize2fs always syncs (it never
        // runs under eatmydata, as snf-image's does by default), and the helper syncs before it
        // powers off, so either value is honoured.
        "EXCLUDE_MOUNTED_TASKS" | "DO_SYNC" | "ALLOW_MOUNTED_TASK_OVERWRITING" => Some(yes_no(value).map_or_else(
            || Verdict::Warn(format!("{name}={value:?} is not yes or no: taken as yes, as snf-image does")),
            |_| Verdict::Honoured,
        )),
        _ => None,
    }
}

/// snf-image's `SWAP`: a swap partition of a number and size on the first disk, or a whole
/// other disk of the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swap {
    /// `SWAP=<partition id>:<size in MB>`.
    Partition {
        /// The partition number.
        number: u32,
        /// Its size in MiB (snf-image's MB: 2048 sectors of 512 bytes).
        mib: u64,
    },
    /// `SWAP=<disk letter>`: the instance's disk of that letter (`b`: `DISK_1_PATH`), whole.
    Disk {
        /// The disk's index among the instance's (1 for `b`; never 0, the image's disk).
        index: usize,
    },
}

/// Parses `SWAP` as snf-image's `^(([A-Za-z])|(([1-9][0-9]*):([1-9][0-9]*)))$` reads it:
/// `None` when empty (no swap); refused as snf-image refuses it (a malformed value, the first
/// disk `a`, which holds the image); whether a disk letter names one of the instance's disks is
/// checked against `DISK_COUNT` by [`swap_disk`] (pure).
pub fn parse_swap(value: &str) -> Result<Option<Swap>, String> {
    if value.is_empty() {
        return Ok(None);
    }
    let number =
        |t: &str| (t.bytes().all(|b| b.is_ascii_digit()) && !t.starts_with('0')).then(|| t.parse().ok()).flatten();
    if let Some((n, size)) = value.split_once(':') {
        if let (Some(n), Some(mib)) = (number(n), number(size)) {
            let number = u32::try_from(n)
                .ok()
                .filter(|n| *n <= 128)
                .ok_or_else(|| format!("SWAP {value:?}: no disk has a partition {n}"))?;
            return Ok(Some(Swap::Partition { number, mib }));
        }
    } else if let [letter] = value.as_bytes() {
        if letter.is_ascii_alphabetic() {
            let index = (letter.to_ascii_lowercase() - b'a') as usize;
            if index == 0 {
                return Err(format!(
                    "SWAP {value:?}: the swap disk cannot be the first disk (it holds the image); give the letter \
                     of another of the instance's disks (b for the second)"
                ));
            }
            return Ok(Some(Swap::Disk { index }));
        }
    }
    Err(format!("SWAP property {value:?} is not valid: give <partition number>:<MB> (2:512) or a disk letter"))
}

/// A fresh random (version 4, RFC 4122 variant) UUID for a swap signature.
fn random_uuid() -> String {
    let mut bytes = [0u8; 16];
    rand::Rng::fill_bytes(&mut rand::rng(), &mut bytes);
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

/// The fstab line snf-image's AddSwap appends for a swap area with `uuid` (`UUID="..."`, as it
/// copies blkid's output, then `none swap sw 0 0`, tab-separated).
fn fstab_line(uuid: &str) -> String {
    format!("UUID=\"{uuid}\"\tnone\tswap\tsw\t0\t0")
}

/// The swap partition `SWAP` asks for, with a fresh UUID for its signature, and the fstab line
/// snf-image's AddSwap writes for it.
pub fn swap_partition(
    properties: &BTreeMap<String, String>,
) -> Option<(imgforge_protocol::rules::SwapPartition, String)> {
    let Swap::Partition { number, mib } = properties.get("SWAP").and_then(|v| parse_swap(v).ok().flatten())? else {
        return None;
    };
    let uuid = random_uuid();
    let line = fstab_line(&uuid);
    Some((imgforge_protocol::rules::SwapPartition { number, mib, uuid }, line))
}

/// The whole disk `SWAP=<letter>` makes swap: its index among the instance's `disk_count`
/// disks, with a fresh UUID for its signature, and the fstab line snf-image's AddSwap writes
/// for it; refused, as snf-image refuses it, when the instance has no disk of that letter.
pub fn swap_disk(
    properties: &BTreeMap<String, String>,
    disk_count: usize,
) -> Result<Option<(imgforge_protocol::rules::SwapDisk, String)>, String> {
    let Some(Swap::Disk { index }) = properties.get("SWAP").and_then(|v| parse_swap(v).ok().flatten()) else {
        return Ok(None);
    };
    if index >= disk_count {
        return Err(format!(
            "SWAP {:?}: the instance has no such disk (it has {disk_count}: a to {})",
            properties["SWAP"],
            (b'a' + disk_count.saturating_sub(1).min(25) as u8) as char
        ));
    }
    let uuid = random_uuid();
    let line = fstab_line(&uuid);
    Ok(Some((imgforge_protocol::rules::SwapDisk { disk: index as u32, uuid }, line)))
}

/// True if `ALLOW_MOUNTED_TASK_OVERWRITING` is yes: the image's
/// `/root/snf-image/helper/overwrite_task_<Task>` replace snf-image's mounted tasks.
pub fn task_overwriting(properties: &BTreeMap<String, String>) -> bool {
    properties.get("ALLOW_MOUNTED_TASK_OVERWRITING").is_some_and(|v| yes_no(v).unwrap_or(true))
}

/// `SWAP=<N>:<MB>` under `CLOUD_INIT`: snf-image's AddSwap then ignores the partition and has
/// cloud-init make a swap file `/swap-<random>.img` of at most MB MiB.
pub fn swap_file(properties: &BTreeMap<String, String>) -> Option<imgforge_protocol::rules::CloudInitSwap> {
    // A disk letter is made swap as without CLOUD_INIT, as snf-image's AddSwap does.
    let Swap::Partition { mib, .. } = properties.get("SWAP").and_then(|v| parse_swap(v).ok().flatten())? else {
        return None;
    };
    // snf-image's ${RANDOM}: 0 to 32767.
    let n: u32 = rand::RngExt::random_range(&mut rand::rng(), 0..32768);
    Some(imgforge_protocol::rules::CloudInitSwap { filename: format!("/swap-{n}.img"), max_bytes: mib << 20 })
}

/// True if `EXCLUDE_MOUNTED_TASKS` is yes (snf-image's reading: anything but a "no" is yes).
pub fn mounted_tasks_excluded(properties: &BTreeMap<String, String>) -> bool {
    properties.get("EXCLUDE_MOUNTED_TASKS").is_some_and(|v| yes_no(v).unwrap_or(true))
}

/// The helper tasks to skip: `excluded` (by `EXCLUDE_TASK_<Name>` and the like) and, with
/// `EXCLUDE_MOUNTED_TASKS`, every task that needs the guest mounted.
pub fn with_mounted_tasks(properties: &BTreeMap<String, String>, mut excluded: Vec<String>) -> Vec<String> {
    if mounted_tasks_excluded(properties) {
        for task in MOUNTED_HELPER_TASKS {
            if !excluded.iter().any(|t| t.eq_ignore_ascii_case(task)) {
                excluded.push((*task).to_owned());
            }
        }
    }
    excluded
}

/// `CUSTOM_TASK`: the program it carries, base64-decoded as snf-image's `base64 --decode`
/// reads it (line breaks ignored); `None` when absent or empty (snf-image then warns and runs
/// nothing).
pub fn custom_task(properties: &BTreeMap<String, String>) -> Result<Option<Vec<u8>>, ParamError> {
    let Some(text) = properties.get("CUSTOM_TASK").filter(|t| !t.trim().is_empty()) else { return Ok(None) };
    let program = super::params::base64_decode(text).ok_or_else(|| ParamError {
        param: "img_properties".into(),
        reason: "CUSTOM_TASK is not base64: give the task's program base64-encoded (base64 -w0 task.sh)".into(),
    })?;
    if program.is_empty() {
        return Ok(None);
    }
    Ok(Some(program))
}

/// The variables a configuration task gets, snf-image's (all prefixed `SNF_IMAGE_`): `TARGET`
/// (`/`: the task runs chrooted into the guest), `HOSTNAME`, `PROPERTY_<NAME>` for every
/// property, `PASSWD_HASH` when given as a hash, and Ganeti's `NIC_COUNT` and `NIC_<N>_*` from
/// `ganeti_env`. Clear-text passwords never leave the host process, so `PASSWD` is not set;
/// nor are `DEV*`: no disk device is reachable from the task's confinement. A name that cannot
/// be a variable's (anything but letters, digits and `_`) and a value with a NUL are left out.
pub fn task_env(
    properties: &BTreeMap<String, String>,
    hostname: &str,
    passwd_hash: Option<&str>,
    ganeti_env: &BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let mut env = vec![("SNF_IMAGE_TARGET".to_owned(), "/".to_owned()), ("SNF_IMAGE_HOSTNAME".into(), hostname.into())];
    if let Some(hash) = passwd_hash {
        env.push(("SNF_IMAGE_PASSWD_HASH".into(), hash.into()));
    }
    let nics = ganeti_env.iter().filter(|(k, _)| {
        *k == "NIC_COUNT" || k.strip_prefix("NIC_").is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
    });
    env.extend(nics.map(|(k, v)| (format!("SNF_IMAGE_{k}"), v.clone())));
    env.extend(properties.iter().map(|(k, v)| (format!("SNF_IMAGE_PROPERTY_{k}"), v.clone())));
    env.retain(|(k, v)| k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') && !v.contains('\0'));
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// Every spelling snf-image's `check_yes_no` reads, for the two booleans.
    #[test]
    fn booleans_read_as_snf_image_reads_them() {
        let yes = ["yes", "YES", "true", "On", "1", "set"];
        let no = ["no", "False", "OFF", "0", "unset", ""];
        for name in ["EXCLUDE_MOUNTED_TASKS", "DO_SYNC", "ALLOW_MOUNTED_TASK_OVERWRITING"] {
            for v in yes.iter().chain(&no) {
                assert_eq!(judge(name, v), Some(Verdict::Honoured), "{name}={v}");
            }
            assert!(matches!(judge(name, "maybe"), Some(Verdict::Warn(w)) if w.contains("taken as yes")), "{name}");
        }
        for v in yes.iter().chain(&["maybe"]) {
            assert!(mounted_tasks_excluded(&props(&[("EXCLUDE_MOUNTED_TASKS", v)])), "{v}");
        }
        for v in no {
            assert!(!mounted_tasks_excluded(&props(&[("EXCLUDE_MOUNTED_TASKS", v)])), "{v}");
        }
        assert!(!mounted_tasks_excluded(&props(&[])));
        for v in yes.iter().chain(&["maybe"]) {
            assert!(task_overwriting(&props(&[("ALLOW_MOUNTED_TASK_OVERWRITING", v)])), "{v}");
        }
        for v in no {
            assert!(!task_overwriting(&props(&[("ALLOW_MOUNTED_TASK_OVERWRITING", v)])), "{v}");
        }
        assert_eq!(judge("CUSTOM_TASK", "anything"), Some(Verdict::Honoured));
        assert_eq!(judge("USERS", "root"), None, "not this module's");
    }

    #[test]
    fn mounted_tasks_join_the_excluded_ones_once() {
        let p = props(&[("EXCLUDE_MOUNTED_TASKS", "yes")]);
        let got = with_mounted_tasks(&p, vec!["customize".into(), "FixPartitionTable".into()]);
        assert_eq!(got.iter().filter(|t| t.eq_ignore_ascii_case("Customize")).count(), 1);
        for kept in ["FixPartitionTable", "FilesystemResizeUnmounted", "Unmount", "MountPayload"] {
            assert!(!MOUNTED_HELPER_TASKS.contains(&kept), "{kept}");
        }
        assert!(got.contains(&"MountRoot".to_owned()) && got.contains(&"FilesystemResizeMounted".to_owned()));
        assert_eq!(with_mounted_tasks(&props(&[("EXCLUDE_MOUNTED_TASKS", "no")]), vec!["x".into()]), ["x"]);
    }

    /// Every form snf-image's AddSwap takes, and what it refuses.
    #[test]
    fn swap_values() {
        let ok = |number, mib| Ok(Some(Swap::Partition { number, mib }));
        assert_eq!(parse_swap("2:512"), ok(2, 512));
        assert_eq!(parse_swap("5:1024"), ok(5, 1024));
        assert_eq!(parse_swap("128:1"), ok(128, 1));
        assert_eq!(parse_swap(""), Ok(None));
        for (letter, index) in [("b", 1), ("C", 2), ("z", 25), ("Z", 25)] {
            assert_eq!(parse_swap(letter), Ok(Some(Swap::Disk { index })), "{letter}");
        }
        for first in ["a", "A"] {
            assert!(parse_swap(first).unwrap_err().contains("cannot be the first disk"), "{first}");
        }
        for bad in
            ["0:512", "2:0", "02:512", "2:0512", "2:", ":512", "2:512:1", "-1:512", "2:5x", "bc", " 2:512", "1", "é"]
        {
            assert!(parse_swap(bad).unwrap_err().contains("is not valid"), "{bad}");
        }
        assert!(parse_swap("129:512").unwrap_err().contains("no disk has a partition 129"));
        assert_eq!(judge("SWAP", "2:512"), Some(Verdict::Honoured));
        assert_eq!(judge("SWAP", "c"), Some(Verdict::Honoured));
        assert!(matches!(judge("SWAP", "a"), Some(Verdict::Refuse(_))));
        let (swap, line) = swap_partition(&props(&[("SWAP", "3:256")])).unwrap();
        assert_eq!((swap.number, swap.mib, swap.uuid.len()), (3, 256, 36));
        assert_eq!(line, format!("UUID=\"{}\"\tnone\tswap\tsw\t0\t0", swap.uuid));
        assert_ne!(swap.uuid, swap_partition(&props(&[("SWAP", "3:256")])).unwrap().0.uuid);
        assert!(swap_partition(&props(&[])).is_none());
        assert!(swap_partition(&props(&[("SWAP", "b")])).is_none());
        let file = swap_file(&props(&[("SWAP", "2:300")])).unwrap();
        assert_eq!(file.max_bytes, 300 << 20);
        let n: u32 = file.filename.strip_prefix("/swap-").unwrap().strip_suffix(".img").unwrap().parse().unwrap();
        assert!(n < 32768);
        assert!(swap_file(&props(&[("SWAP", "")])).is_none());
        assert!(swap_file(&props(&[("SWAP", "b")])).is_none());
    }

    /// `SWAP=<letter>` against the instance's disks, as snf-image's AddSwap checks it.
    #[test]
    fn swap_disk_values() {
        let (disk, line) = swap_disk(&props(&[("SWAP", "B")]), 2).unwrap().unwrap();
        assert_eq!((disk.disk, disk.uuid.len()), (1, 36));
        assert_eq!(line, format!("UUID=\"{}\"\tnone\tswap\tsw\t0\t0", disk.uuid));
        assert_eq!(swap_disk(&props(&[("SWAP", "c")]), 4).unwrap().unwrap().0.disk, 2);
        for (value, count) in [("b", 1), ("c", 2), ("z", 3)] {
            let err = swap_disk(&props(&[("SWAP", value)]), count).unwrap_err();
            assert!(err.contains("no such disk"), "{value}: {err}");
        }
        assert!(swap_disk(&props(&[("SWAP", "2:512")]), 2).unwrap().is_none());
        assert!(swap_disk(&props(&[]), 2).unwrap().is_none());
    }

    #[test]
    fn mounted_tasks_are_helper_tasks() {
        for task in MOUNTED_HELPER_TASKS {
            assert!(super::super::params::HELPER_TASKS.contains(task), "{task}");
        }
    }

    /// A CUSTOM_TASK that is not base64 is refused by `img_properties`' parser (verify and
    /// create), any case of its name; a good one is not warned about.
    #[test]
    fn img_properties_check_the_custom_task() {
        use super::super::params::parse_properties;
        let e = parse_properties(r#"{"custom_task": "rm -rf /"}"#).unwrap_err();
        assert!(e.to_string().contains("CUSTOM_TASK is not base64"), "{e}");
        let (p, w) = parse_properties(r#"{"Custom_Task": "IyEvYmluL3NoCg==", "do_sync": "yes"}"#).unwrap();
        assert_eq!(p["CUSTOM_TASK"], "IyEvYmluL3NoCg==");
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn custom_task_is_base64() {
        let task = |v: &str| custom_task(&props(&[("CUSTOM_TASK", v)]));
        assert_eq!(task("IyEvYmluL3NoCnRydWUK").unwrap().as_deref(), Some(&b"#!/bin/sh\ntrue\n"[..]));
        // base64 wraps its output at 76 columns; snf-image's `base64 --decode` reads that back.
        assert_eq!(task("IyEvYmluL3No\nCnRydWUK\n").unwrap().as_deref(), Some(&b"#!/bin/sh\ntrue\n"[..]));
        assert_eq!(task("").unwrap(), None);
        assert_eq!(task("  ").unwrap(), None);
        assert_eq!(custom_task(&props(&[])).unwrap(), None);
        for bad in ["not base64!", "#!/bin/sh"] {
            let e = task(bad).unwrap_err();
            assert!(e.to_string().contains("CUSTOM_TASK is not base64"), "{bad}: {e}");
        }
    }

    #[test]
    fn task_variables_are_snf_images() {
        let p = props(&[("USERS", "root alice"), ("CUSTOM_TASK", "eA=="), ("BAD NAME", "x"), ("NUL", "a\0b")]);
        let ganeti = props(&[
            ("NIC_COUNT", "1"),
            ("NIC_0_MAC", "aa:00:00:00:00:01"),
            ("NIC_FOO", "no"),
            ("INSTANCE_NAME", "i"),
            ("OSP_IMG_PASSWD", "secret"),
        ]);
        let env = task_env(&p, "inst1", Some("$6$s$h"), &ganeti);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("SNF_IMAGE_TARGET"), Some("/"));
        assert_eq!(get("SNF_IMAGE_HOSTNAME"), Some("inst1"));
        assert_eq!(get("SNF_IMAGE_PASSWD_HASH"), Some("$6$s$h"));
        assert_eq!(get("SNF_IMAGE_PROPERTY_USERS"), Some("root alice"));
        assert_eq!(get("SNF_IMAGE_PROPERTY_CUSTOM_TASK"), Some("eA=="));
        assert_eq!(get("SNF_IMAGE_NIC_COUNT"), Some("1"));
        assert_eq!(get("SNF_IMAGE_NIC_0_MAC"), Some("aa:00:00:00:00:01"));
        assert!(env.iter().all(|(k, v)| !k.contains(' ') && !v.contains('\0')), "{env:?}");
        assert!(env.iter().all(|(k, v)| !k.contains("FOO") && !k.contains("PASSWD\0") && v != "secret"), "{env:?}");
        assert_eq!(get("SNF_IMAGE_PASSWD"), None);
    }
}
