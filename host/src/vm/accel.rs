//! Choosing the accelerator: KVM where it works, TCG otherwise, remembered per host boot.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The `--accel` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM where it works, TCG otherwise.
    Auto,
    /// Hardware virtualization only.
    Kvm,
    /// Software emulation only.
    Tcg,
}

impl Accel {
    /// qemu's `-accel` name.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg | Accel::Auto => "tcg",
        }
    }

    /// The CPU model for this accelerator. Under TCG every instruction set the guest's programs
    /// may need (RHEL 10 userlands require x86-64-v3), but not 5-level paging: the helper has
    /// 1 GiB of memory, and each page walk TCG emulates got one level longer (measured: the
    /// bare boot's median 1.76 s against 1.94 s with it, the customize part 45 ms shorter).
    pub fn cpu_model(self) -> &'static str {
        match self {
            Accel::Kvm => "host",
            Accel::Tcg | Accel::Auto => "max,la57=off",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// What was learnt about KVM on this host boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvmVerdict {
    /// A KVM guest showed signs of life.
    Works,
    /// KVM failed to start or the guest stayed silent.
    Broken,
}

#[derive(Debug, Serialize, Deserialize)]
struct Remembered {
    boot_id: String,
    kvm: KvmVerdict,
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_owned())
}

/// Where the verdict is kept.
pub fn verdict_path(cache: &Path) -> PathBuf {
    cache.join("kvm-verdict.json")
}

/// The verdict remembered for this boot, if any.
pub fn remembered(cache: &Path) -> Option<KvmVerdict> {
    let r: Remembered = serde_json::from_str(&std::fs::read_to_string(verdict_path(cache)).ok()?).ok()?;
    (Some(r.boot_id) == boot_id()).then_some(r.kvm)
}

/// Remembers a verdict for this boot (best effort).
pub fn remember(cache: &Path, kvm: KvmVerdict) {
    let Some(boot_id) = boot_id() else { return };
    let _ = std::fs::create_dir_all(cache);
    let tmp = cache.join(format!(".kvm-verdict.{}", std::process::id()));
    if std::fs::write(&tmp, serde_json::to_vec(&Remembered { boot_id, kvm }).unwrap_or_default()).is_ok() {
        let _ = std::fs::rename(&tmp, verdict_path(cache));
    }
}

/// True if `/dev/kvm` can be opened read-write (`IMGFORGE_ASSUME_KVM_DEVICE=1` pretends it can,
/// for tests that stand in a qemu whose KVM guests hang).
pub fn kvm_device_usable() -> bool {
    std::env::var_os("IMGFORGE_ASSUME_KVM_DEVICE").is_some_and(|v| v == "1")
        || std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

/// The accelerators to try, in order, for a `--accel` choice.
pub fn plan(choice: Accel, device_usable: bool, remembered: Option<KvmVerdict>) -> Vec<Accel> {
    match choice {
        Accel::Kvm => vec![Accel::Kvm],
        Accel::Tcg => vec![Accel::Tcg],
        Accel::Auto if device_usable && remembered != Some(KvmVerdict::Broken) => vec![Accel::Kvm, Accel::Tcg],
        Accel::Auto => vec![Accel::Tcg],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans() {
        assert_eq!(plan(Accel::Auto, true, None), [Accel::Kvm, Accel::Tcg]);
        assert_eq!(plan(Accel::Auto, true, Some(KvmVerdict::Works)), [Accel::Kvm, Accel::Tcg]);
        assert_eq!(plan(Accel::Auto, true, Some(KvmVerdict::Broken)), [Accel::Tcg]);
        assert_eq!(plan(Accel::Auto, false, None), [Accel::Tcg]);
        assert_eq!(plan(Accel::Kvm, false, Some(KvmVerdict::Broken)), [Accel::Kvm]);
        assert_eq!(plan(Accel::Tcg, true, None), [Accel::Tcg]);
    }

    #[test]
    fn verdict_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(remembered(dir.path()), None);
        remember(dir.path(), KvmVerdict::Broken);
        assert_eq!(remembered(dir.path()), Some(KvmVerdict::Broken));
        std::fs::write(verdict_path(dir.path()), r#"{"boot_id":"other","kvm":"works"}"#).unwrap();
        assert_eq!(remembered(dir.path()), None);
    }
}
