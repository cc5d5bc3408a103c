//! Choosing the accelerator: KVM where it works, TCG otherwise, remembered per host boot.
//!
//! Whether KVM works is decided by a probe of its own ([`super::kvm_probe`]), never by a helper
//! run: a qemu that fails on an image must not mark KVM broken for the rest of the boot.

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

/// qemu's CPU model under KVM when nothing is known to fail: the host's own CPU.
pub const KVM_CPU: &str = "host";

/// The CPU model under TCG: every instruction set the guest's programs may need (RHEL 10
/// userlands require x86-64-v3), but not 5-level paging: the helper has 1 GiB of memory, and
/// each page walk TCG emulates got one level longer (measured: the bare boot's median 1.76 s
/// against 1.94 s with it, the customize part 45 ms shorter). Nor fast `rep movsb`/`stosb`
/// (ERMS, FSRM): with them the guest's kernel copies every byte read and clears every page with
/// one `rep movsb`/`stosb`, which TCG (qemu 7.2) runs a byte an iteration; without them it
/// copies eight bytes at a time (a first build's walk of 171 MB of files: 10.5 s against 14.3 s
/// for a 16-variant thin build).
pub const TCG_CPU: &str = "max,la57=off,erms=off,fsrm=off";

impl Accel {
    /// qemu's `-accel` name.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg | Accel::Auto => "tcg",
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kvm")]
pub enum KvmVerdict {
    /// A KVM guest printed on its console with this CPU model.
    Works {
        /// The `-cpu` value that worked.
        #[serde(default = "default_kvm_cpu")]
        cpu: String,
    },
    /// KVM failed to start or its guest stayed silent.
    Broken {
        /// Why, in qemu's words where it said something.
        #[serde(default)]
        reason: String,
    },
}

fn default_kvm_cpu() -> String {
    KVM_CPU.to_owned()
}

#[derive(Debug, Serialize, Deserialize)]
struct Remembered {
    boot_id: String,
    /// The qemu binary the verdict is about: another one may behave otherwise.
    #[serde(default)]
    qemu: PathBuf,
    #[serde(flatten)]
    verdict: KvmVerdict,
}

/// The verdict file is a few hundred bytes: anything larger is not one.
const VERDICT_MAX_BYTES: u64 = 4096;

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_owned())
}

/// Where the verdict is kept.
pub fn verdict_path(cache: &Path) -> PathBuf {
    cache.join("kvm-verdict.json")
}

/// The verdict remembered for this boot and `qemu`, if any. The file is only trusted as a
/// small regular file (not through a symlink, not a FIFO) naming a CPU model of ours.
pub fn remembered(cache: &Path, qemu: &Path) -> Option<KvmVerdict> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(verdict_path(cache))
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut text = String::new();
    file.take(VERDICT_MAX_BYTES).read_to_string(&mut text).ok()?;
    let r: Remembered = serde_json::from_str(&text).ok()?;
    if Some(&r.boot_id) != boot_id().as_ref() || r.qemu != qemu {
        return None;
    }
    match &r.verdict {
        KvmVerdict::Works { cpu } if !is_kvm_cpu_model(cpu) => None,
        _ => Some(r.verdict),
    }
}

/// Remembers a verdict about `qemu` for this boot (best effort: without it the next run
/// probes again). Written to a fresh temporary file, then renamed over the old verdict.
pub fn remember(cache: &Path, qemu: &Path, verdict: &KvmVerdict) {
    use std::io::Write;
    let Some(boot_id) = boot_id() else { return };
    let remembered = Remembered { boot_id, qemu: qemu.to_owned(), verdict: verdict.clone() };
    let Ok(bytes) = serde_json::to_vec(&remembered) else { return };
    let _ = std::fs::create_dir_all(cache);
    crate::workdir::sweep_logged(cache, crate::workdir::Reach::Files);
    let Ok(mut tmp) = tempfile::Builder::new().prefix(&crate::workdir::hidden_prefix("kvm-verdict")).tempfile_in(cache)
    else {
        return;
    };
    if tmp.write_all(&bytes).is_ok() {
        let _ = tmp.persist(verdict_path(cache));
    }
}

/// Whether `cpu` is a CPU model the probe can have chosen: `host` or `max`, less features
/// of [`REFUSED_MSRS`] (pure).
pub fn is_kvm_cpu_model(cpu: &str) -> bool {
    let mut parts = cpu.split(',');
    matches!(parts.next(), Some(KVM_CPU | "max"))
        && parts.all(|option| REFUSED_MSRS.iter().any(|(_, _, o)| *o == option))
        && cpu.len() <= 128
}

/// True if `/dev/kvm` can be opened read-write (`IMGFORGE_ASSUME_KVM_DEVICE=1` pretends it can,
/// for tests that stand in a qemu whose KVM misbehaves).
pub fn kvm_device_usable() -> bool {
    std::env::var_os("IMGFORGE_ASSUME_KVM_DEVICE").is_some_and(|v| v == "1")
        || std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

/// How to get the KVM CPU model for a run, before anything is started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmPlan {
    /// Do not use KVM.
    Skip,
    /// Use KVM with this CPU model (remembered from this boot's probe).
    Use(String),
    /// Probe first; `required`: a broken KVM is an error rather than a reason to use TCG.
    Probe {
        /// `--accel kvm`.
        required: bool,
    },
}

/// What to do about KVM for a `--accel` choice (pure).
pub fn plan(choice: Accel, device_usable: bool, remembered: Option<KvmVerdict>) -> KvmPlan {
    match (choice, remembered) {
        (Accel::Tcg, _) => KvmPlan::Skip,
        (Accel::Kvm | Accel::Auto, Some(KvmVerdict::Works { cpu })) if device_usable => KvmPlan::Use(cpu),
        // The user asked for KVM: find out again, so that the error is qemu's own.
        (Accel::Kvm, _) => KvmPlan::Probe { required: true },
        (Accel::Auto, _) if !device_usable => KvmPlan::Skip,
        (Accel::Auto, Some(KvmVerdict::Broken { .. })) => KvmPlan::Skip,
        (Accel::Auto, _) => KvmPlan::Probe { required: false },
    }
}

/// MSRs that hosts running nested under another hypervisor are known to refuse, and the CPU
/// option that keeps qemu from setting them: (first MSR, last MSR, option).
const REFUSED_MSRS: &[(u32, u32, &str)] = &[
    // IA32_ARCH_CAPABILITIES: some clouds' nested KVM rejects the value qemu derives.
    (0x10a, 0x10a, "-arch-capabilities"),
    // IA32_SPEC_CTRL.
    (0x48, 0x48, "-spec-ctrl"),
    // Performance counters (IA32_PMCx, IA32_PERFEVTSELx, the fixed counters and their controls).
    (0xc1, 0xc8, "pmu=off"),
    (0x186, 0x18f, "pmu=off"),
    (0x309, 0x30b, "pmu=off"),
    (0x38d, 0x390, "pmu=off"),
];

/// The MSR number of qemu's `failed to set MSR 0x10a to 0x69` in its error output (pure).
pub fn refused_msr(qemu_stderr: &str) -> Option<u32> {
    qemu_stderr.lines().find_map(|line| {
        let rest = line.split("failed to set MSR 0x").nth(1)?;
        let hex: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
        u32::from_str_radix(&hex, 16).ok()
    })
}

/// The CPU model to try after `tried` failed with `qemu_stderr` (`crashed`: qemu died of a
/// signal), if any is worth a try (pure): `-cpu host` without the feature behind a refused MSR;
/// after a crash that names none, `max` once. A qemu that could not open or set up KVM at all
/// exits with an error, and no CPU model helps it.
pub fn next_kvm_cpu(tried: &str, qemu_stderr: &str, crashed: bool) -> Option<String> {
    if let Some(msr) = refused_msr(qemu_stderr) {
        let option = REFUSED_MSRS.iter().find(|(first, last, _)| (*first..=*last).contains(&msr)).map(|r| r.2)?;
        if tried.split(',').any(|o| o == option) {
            return None;
        }
        return Some(format!("{tried},{option}"));
    }
    (crashed && tried == KVM_CPU).then(|| "max".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn works(cpu: &str) -> Option<KvmVerdict> {
        Some(KvmVerdict::Works { cpu: cpu.into() })
    }

    #[test]
    fn plans() {
        let broken = Some(KvmVerdict::Broken { reason: "x".into() });
        assert_eq!(plan(Accel::Auto, true, None), KvmPlan::Probe { required: false });
        assert_eq!(plan(Accel::Auto, true, works("host")), KvmPlan::Use("host".into()));
        assert_eq!(plan(Accel::Auto, true, broken.clone()), KvmPlan::Skip);
        assert_eq!(plan(Accel::Auto, false, None), KvmPlan::Skip);
        assert_eq!(plan(Accel::Kvm, false, broken), KvmPlan::Probe { required: true });
        assert_eq!(
            plan(Accel::Kvm, true, works("host,-arch-capabilities")),
            KvmPlan::Use("host,-arch-capabilities".into())
        );
        assert_eq!(plan(Accel::Tcg, true, works("host")), KvmPlan::Skip);
        // /dev/kvm gone since the verdict (module unloaded, permissions changed).
        assert_eq!(plan(Accel::Auto, false, works("host")), KvmPlan::Skip);
        assert_eq!(plan(Accel::Kvm, false, works("host")), KvmPlan::Probe { required: true });
    }

    #[test]
    fn cpu_models() {
        for good in ["host", "max", "host,-arch-capabilities", "host,-arch-capabilities,pmu=off"] {
            assert!(is_kvm_cpu_model(good), "{good}");
        }
        let long = format!("host{}", ",pmu=off".repeat(30_000));
        for bad in ["", "help", "host,foo=bar", "max,-sandbox off", "qemu64", "host,", &long] {
            assert!(!is_kvm_cpu_model(bad), "{bad}");
        }
    }

    #[test]
    fn verdict_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = Path::new("/usr/bin/qemu-system-x86_64");
        assert_eq!(remembered(dir.path(), qemu), None);
        let broken = KvmVerdict::Broken { reason: "qemu aborted".into() };
        remember(dir.path(), qemu, &broken);
        assert_eq!(remembered(dir.path(), qemu), Some(broken));
        remember(dir.path(), qemu, &KvmVerdict::Works { cpu: "host,pmu=off".into() });
        assert_eq!(remembered(dir.path(), qemu), works("host,pmu=off"));
        // About another qemu, another boot: nothing is known.
        assert_eq!(remembered(dir.path(), Path::new("/opt/qemu/bin/qemu-system-x86_64")), None);
        std::fs::write(verdict_path(dir.path()), r#"{"boot_id":"other","kvm":"works"}"#).unwrap();
        assert_eq!(remembered(dir.path(), qemu), None);
        let boot = boot_id().unwrap();
        let q = qemu.display();
        let write = |json: String| std::fs::write(verdict_path(dir.path()), json).unwrap();
        // A verdict written before the CPU model was kept.
        write(format!(r#"{{"boot_id":"{boot}","qemu":"{q}","kvm":"works"}}"#));
        assert_eq!(remembered(dir.path(), qemu), works(KVM_CPU));
        write(format!(r#"{{"boot_id":"{boot}","qemu":"{q}","kvm":"broken"}}"#));
        assert_eq!(remembered(dir.path(), qemu), Some(KvmVerdict::Broken { reason: String::new() }));
        // A CPU model no probe chooses is not passed to qemu.
        write(format!(r#"{{"boot_id":"{boot}","qemu":"{q}","kvm":"works","cpu":"help"}}"#));
        assert_eq!(remembered(dir.path(), qemu), None);
    }

    #[test]
    fn verdict_files_are_not_followed() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let qemu = Path::new("qemu-system-x86_64");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        // A link where the verdict goes: replaced, never written through.
        symlink(&victim, verdict_path(dir.path())).unwrap();
        assert_eq!(remembered(dir.path(), qemu), None);
        remember(dir.path(), qemu, &KvmVerdict::Broken { reason: "x".into() });
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(!std::fs::symlink_metadata(verdict_path(dir.path())).unwrap().file_type().is_symlink());
        // A FIFO or an endless file does not hang or exhaust the run.
        std::fs::remove_file(verdict_path(dir.path())).unwrap();
        let path = std::ffi::CString::new(verdict_path(dir.path()).into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        assert_eq!(remembered(dir.path(), qemu), None);
        std::fs::remove_file(verdict_path(dir.path())).unwrap();
        symlink("/dev/zero", verdict_path(dir.path())).unwrap();
        assert_eq!(remembered(dir.path(), qemu), None);
    }

    #[test]
    fn refused_msrs() {
        let abort = "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\n\
                     qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: Assertion failed.";
        assert_eq!(refused_msr(abort), Some(0x10a));
        assert_eq!(refused_msr("failed to set MSR 0x38d to 0x0"), Some(0x38d));
        assert_eq!(refused_msr("failed to set MSR 0xzz"), None);
        assert_eq!(refused_msr("Could not access KVM kernel module"), None);
        let denied = "Could not access KVM kernel module: Permission denied\n\
                      qemu-system-x86_64: -accel kvm: failed to initialize kvm: Permission denied";
        let cases: &[(&str, &str, bool, Option<&str>)] = &[
            ("host", abort, true, Some("host,-arch-capabilities")),
            ("host,-arch-capabilities", abort, true, None),
            (
                "host,-arch-capabilities",
                "failed to set MSR 0x38f to 0x1",
                true,
                Some("host,-arch-capabilities,pmu=off"),
            ),
            ("host", "failed to set MSR 0x4b564d00 to 0x1", true, None),
            ("host", "kvm_init_vcpu: something else went wrong", true, Some("max")),
            ("max", "kvm_init_vcpu: something else went wrong", true, None),
            ("host", denied, false, None),
        ];
        for (tried, stderr, crashed, want) in cases {
            assert_eq!(next_kvm_cpu(tried, stderr, *crashed).as_deref(), *want, "{tried} / {stderr}");
        }
    }
}
