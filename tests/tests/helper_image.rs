//! The helper image: reproducible builds, and `--accel auto` finding its way on this host.

use imgforge_tests::fixtures::{self, Shape};
use imgforge_tests::run::{binary, code};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel package the main cache already holds (so fresh caches need no download).
fn kernel_deb() -> PathBuf {
    let out = Command::new(binary()).args(["helper-image", "build"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let debs = Path::new("/var/cache/imgforge/debs");
    let cache =
        std::env::var_os("IMGFORGE_CACHE_DIR").map(PathBuf::from).map(|c| c.join("debs")).unwrap_or(debs.to_owned());
    std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("a kernel package in the cache")
}

fn build_in(cache: &Path, deb: &Path) -> (Vec<u8>, Vec<u8>) {
    let out = Command::new(binary())
        .args(["helper-image", "build"])
        .env("IMGFORGE_CACHE_DIR", cache)
        .env("IMGFORGE_KERNEL_DEB", deb)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = |label: &str| {
        stdout.lines().find_map(|l| l.trim().strip_prefix(label)).map(|p| PathBuf::from(p.trim())).expect(label)
    };
    (std::fs::read(path("kernel ")).unwrap(), std::fs::read(path("initrd ")).unwrap())
}

/// `customize -v --hostname NAME` with its own helper image cache.
fn customize_with_cache(cache: &Path, deb: &Path, img: &Path, accel: &str, name: &str) -> std::process::Output {
    Command::new(binary())
        .args(["customize", "-v", "-a", img.to_str().unwrap(), "--accel", accel, "--hostname", name])
        .env("IMGFORGE_CACHE_DIR", cache)
        .env("IMGFORGE_KERNEL_DEB", deb)
        .output()
        .unwrap()
}

#[test]
fn two_builds_are_byte_identical() {
    let deb = kernel_deb();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = build_in(a.path(), &deb);
    let second = build_in(b.path(), &deb);
    assert!(first.1.len() > 1_000_000, "initramfs suspiciously small");
    assert!(first == second, "two builds from the same inputs differ");
}

#[test]
fn stale_cache_is_rebuilt() {
    let deb = kernel_deb();
    let cache = tempfile::tempdir().unwrap();
    build_in(cache.path(), &deb);
    let manifest = cache.path().join("helper-image/current.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    // Pretend an input changed since the build (a package upgrade changes size/mtime/inode).
    let stale = text.replacen("\"len\": ", "\"len\": 1", 1);
    assert_ne!(stale, text);
    std::fs::write(&manifest, stale).unwrap();
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let out = customize_with_cache(cache.path(), &deb, &img, "tcg", "rebuilt");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), 0, "{stderr}");
    assert!(stderr.contains("building the helper image"), "the stale image was used: {stderr}");
    assert_ne!(std::fs::read_to_string(&manifest).unwrap(), text.replacen("\"len\": ", "\"len\": 1", 1));
}

#[test]
fn accel_auto_finds_a_working_accelerator_and_remembers_it() {
    let deb = kernel_deb();
    let cache = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let out = customize_with_cache(cache.path(), &deb, &img, "auto", "auto1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), 0, "{stderr}");
    let kvm_device = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if kvm_device {
        let verdict =
            std::fs::read_to_string(cache.path().join("kvm-verdict.json")).expect("the KVM verdict is remembered");
        assert!(
            verdict.contains("works") || (verdict.contains("broken") && stderr.contains("using TCG")),
            "{verdict} / {stderr}"
        );
    }
    let m = imgforge_tests::readback::Mount::partition(&img, 0).unwrap();
    assert_eq!(m.read("/etc/hostname").unwrap(), "auto1\n");
}

/// A qemu whose KVM guests hang silently (as KVM does on these machines): `--accel auto` must
/// give up on KVM after the sign-of-life window, fall back to TCG and remember the verdict.
#[test]
fn accel_auto_falls_back_when_kvm_guests_hang() {
    use std::os::unix::fs::PermissionsExt;
    let deb = kernel_deb();
    let cache = tempfile::tempdir().unwrap();
    // qemu runs as nobody: the wrapper must be reachable by it.
    let bin = tempfile::tempdir().unwrap();
    std::fs::set_permissions(bin.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let fake = bin.path().join("qemu-kvm-hangs");
    std::fs::write(
        &fake,
        "#!/bin/sh\ncase \" $* \" in *' -accel kvm '*) exec sleep 600 ;; esac\nexec qemu-system-x86_64 \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let run = || {
        Command::new(binary())
            .args(["customize", "-v", "-a", img.to_str().unwrap(), "--accel", "auto", "--hostname", "fallback1"])
            .arg("--qemu")
            .arg(&fake)
            .env("IMGFORGE_CACHE_DIR", cache.path())
            .env("IMGFORGE_KERNEL_DEB", &deb)
            .env("IMGFORGE_ASSUME_KVM_DEVICE", "1")
            .output()
            .unwrap()
    };
    let first = run();
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert_eq!(code(&first), 0, "{stderr}");
    assert!(stderr.contains("no sign of life") && stderr.contains("using TCG"), "{stderr}");
    let verdict = std::fs::read_to_string(cache.path().join("kvm-verdict.json")).unwrap();
    assert!(verdict.contains("broken"), "{verdict}");
    // The verdict holds for this host boot: the next run goes straight to TCG.
    let started = std::time::Instant::now();
    let second = run();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(code(&second), 0, "{stderr}");
    assert!(!stderr.contains("accel=kvm"), "KVM was tried again: {stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}
