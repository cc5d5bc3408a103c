//! The helper image: reproducible builds, and `--accel auto` finding its way on this host.

use imgforge_tests::fixtures::{self, sh, Shape};
use imgforge_tests::run::{binary, code};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel package the main cache's helper image was built from (so that fresh caches need
/// no download).
fn kernel_deb() -> PathBuf {
    let out = Command::new(binary()).args(["helper-image", "build"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = stdout.lines().find_map(|l| l.trim().strip_prefix("package ")).expect("a package line");
    assert!(deb.ends_with(".deb") && Path::new(deb).is_file(), "{stdout}");
    PathBuf::from(deb)
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

/// A stand-in for qemu: `script` runs first (a POSIX sh `case` on the arguments), then the real
/// qemu. qemu runs as a uid of its own, which owns nothing: the wrapper and its directory must
/// be readable and executable by anyone (0755).
fn fake_qemu(name: &str, script: &str) -> (tempfile::TempDir, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let bin = tempfile::tempdir().unwrap();
    std::fs::set_permissions(bin.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let fake = bin.path().join(name);
    std::fs::write(&fake, format!("#!/bin/sh\n{script}\nexec qemu-system-x86_64 \"$@\"\n")).unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    (bin, fake)
}

/// `customize -v -a IMG --accel ACCEL --hostname NAME` with the stand-in `qemu`, its own helper
/// image cache, and /dev/kvm taken as usable.
fn customize_with_qemu(qemu: &Path, cache: &Path, img: &Path, accel: &str, name: &str) -> std::process::Output {
    let out = Command::new(binary())
        .args(["customize", "-v", "-a", img.to_str().unwrap(), "--accel", accel, "--hostname", name])
        .arg("--qemu")
        .arg(qemu)
        .env("IMGFORGE_CACHE_DIR", cache)
        .env("IMGFORGE_KERNEL_DEB", kernel_deb())
        .env("IMGFORGE_ASSUME_KVM_DEVICE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("customize --accel {accel} -> {}\n{stderr}", out.status);
    // Logs read by CI and Ganeti carry no terminal colour codes.
    assert!(!stderr.contains('\u{1b}'), "ANSI escapes in a log that is not a terminal: {stderr}");
    out
}

/// A qemu whose KVM guests hang silently (as KVM does on these machines): `--accel auto` must
/// give up on KVM after the sign-of-life window, fall back to TCG and remember the verdict.
#[test]
fn accel_auto_falls_back_when_kvm_guests_hang() {
    let cache = tempfile::tempdir().unwrap();
    let (_bin, fake) = fake_qemu("qemu-kvm-hangs", "case \" $* \" in *' -accel kvm '*) exec sleep 600 ;; esac");
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let first = customize_with_qemu(&fake, cache.path(), &img, "auto", "fallback1");
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert_eq!(code(&first), 0, "{stderr}");
    assert!(stderr.contains("no sign of life") && stderr.contains("using TCG"), "{stderr}");
    let verdict = std::fs::read_to_string(cache.path().join("kvm-verdict.json")).unwrap();
    assert!(verdict.contains("broken"), "{verdict}");
    // The verdict holds for this host boot: the next run goes straight to TCG.
    let started = std::time::Instant::now();
    let second = customize_with_qemu(&fake, cache.path(), &img, "auto", "fallback1");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(code(&second), 0, "{stderr}");
    assert!(!stderr.contains("accel=kvm") && !stderr.contains("KVM probe"), "KVM was tried again: {stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}

/// What qemu 7.2 says and does when the host (itself a VM) refuses an MSR `-cpu host` implies.
const MSR_ABORT: &str = "echo 'qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69' >&2; \
echo 'qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: Assertion failed.' >&2; kill -ABRT $$";

/// A qemu that aborts at once under KVM (nested-virtualization hosts refusing an MSR):
/// `--accel auto` narrows the CPU model, then finishes under TCG; `--accel kvm` fails with
/// exit 4 and qemu's own message.
#[test]
fn accel_auto_falls_back_when_qemu_aborts_under_kvm() {
    let cache = tempfile::tempdir().unwrap();
    let (_bin, fake) = fake_qemu("qemu-kvm-aborts", &format!("case \" $* \" in *' -accel kvm '*) {MSR_ABORT} ;; esac"));
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();

    let auto = customize_with_qemu(&fake, cache.path(), &img, "auto", "aborted1");
    let stderr = String::from_utf8_lossy(&auto.stderr);
    assert_eq!(code(&auto), 0, "{stderr}");
    assert!(stderr.contains("trying -cpu host,-arch-capabilities"), "the CPU model was not narrowed: {stderr}");
    assert!(stderr.contains("failed to set MSR 0x10a") && stderr.contains("using TCG"), "{stderr}");
    assert!(stderr.contains("accel=tcg"), "{stderr}");
    let verdict = std::fs::read_to_string(cache.path().join("kvm-verdict.json")).unwrap();
    assert!(verdict.contains("broken"), "{verdict}");
    let m = imgforge_tests::readback::Mount::partition(&img, 0).unwrap();
    assert_eq!(m.read("/etc/hostname").unwrap(), "aborted1\n");
    drop(m);

    let before = std::fs::read(&img).unwrap();
    let kvm = customize_with_qemu(&fake, cache.path(), &img, "kvm", "aborted2");
    let stderr = String::from_utf8_lossy(&kvm.stderr);
    assert_eq!(code(&kvm), 4, "{stderr}");
    assert!(stderr.contains("KVM does not work") && stderr.contains("failed to set MSR 0x10a"), "{stderr}");
    assert!(std::fs::read(&img).unwrap() == before, "the disk changed although nothing ran");
}

/// A stand-in qemu whose KVM works for the probe (its KVM guests run under TCG: -accel and
/// -cpu values swapped, argument by argument) and whose helper runs (they have disks) fail
/// with `message` when the arguments match the sh pattern `failing`.
fn kvm_works_but_helper_runs_fail(failing: &str, message: &str) -> (tempfile::TempDir, PathBuf) {
    let script = format!(
        r#"case " $* " in
  {failing}) echo "qemu-system-x86_64: {message}" >&2; exit 1 ;;
  *' -accel kvm '*)
    n=$#; prev=
    while [ "$n" -gt 0 ]; do
      a=$1; shift; n=$((n - 1)); orig=$a
      case "$prev" in -accel) a=tcg ;; -cpu) a=max ;; esac
      set -- "$@" "$a"; prev=$orig
    done ;;
esac"#
    );
    fake_qemu("qemu-kvm-probe-ok", &script)
}

/// A disk qemu refuses under any accelerator (as a corrupt image): the failure is reported in
/// qemu's words, and KVM, whose probe guest ran, is not marked broken for the rest of the boot.
#[test]
fn an_image_qemu_refuses_does_not_mark_kvm_broken() {
    let cache = tempfile::tempdir().unwrap();
    let (_bin, fake) =
        kvm_works_but_helper_runs_fail("*' -blockdev '*", "-blockdev driver=raw,node-name=disk: Image is corrupt");
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let out = customize_with_qemu(&fake, cache.path(), &img, "auto", "corrupt1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(code(&out), 0, "{stderr}");
    assert!(stderr.contains("Image is corrupt"), "qemu's message was lost: {stderr}");
    assert!(stderr.contains("a guest runs under KVM with -cpu host"), "{stderr}");
    let verdict = std::fs::read_to_string(cache.path().join("kvm-verdict.json")).unwrap();
    assert!(verdict.contains("works") && verdict.contains("\"cpu\":\"host\""), "{verdict}");
}

/// KVM that fails for a helper run after its probe passed (say the module went away): the run
/// finishes under TCG instead of failing, and the verdict is left for the next probe.
#[test]
fn a_helper_run_qemu_fails_under_kvm_finishes_under_tcg() {
    let cache = tempfile::tempdir().unwrap();
    let (_bin, fake) = kvm_works_but_helper_runs_fail(
        "*' -accel kvm '*' -blockdev '*",
        "-accel kvm: failed to initialize kvm: No such file or directory",
    );
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let out = customize_with_qemu(&fake, cache.path(), &img, "auto", "retried1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), 0, "{stderr}");
    assert!(stderr.contains("qemu failed under KVM") && stderr.contains("trying TCG"), "{stderr}");
    assert!(stderr.contains("failed to initialize kvm"), "{stderr}");
    let m = imgforge_tests::readback::Mount::partition(&img, 0).unwrap();
    assert_eq!(m.read("/etc/hostname").unwrap(), "retried1\n");
}

/// qemu runs as the helper user, who can read its `/proc/PID/environ`: it gets nothing of
/// imgforge's environment but PATH — Ganeti passes `OSP_IMG_PASSWD` in it. Both qemus of a
/// customization, the helper VM and the block-layer one that commits, are the `--qemu` given.
/// Each runs as a uid of its own, so each writes a record of its own.
#[test]
fn qemu_gets_no_secrets_in_its_environment() {
    use std::os::unix::fs::PermissionsExt;
    let seen = tempfile::tempdir().unwrap();
    std::fs::set_permissions(seen.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let script = format!("{{ echo \"ARGS $*\"; env; }} > '{}/call.'$$", seen.path().display());
    let (_bin, fake) = fake_qemu("qemu-records-env", &script);
    let cache = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let out = Command::new(binary())
        .args(["customize", "-a", img.to_str().unwrap(), "--accel", "tcg", "--hostname", "env1"])
        .arg("--qemu")
        .arg(&fake)
        .env("IMGFORGE_CACHE_DIR", cache.path())
        .env("IMGFORGE_KERNEL_DEB", kernel_deb())
        .env("OSP_IMG_PASSWD", "hunter2-in-the-environment")
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let records: Vec<String> =
        std::fs::read_dir(seen.path()).unwrap().map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap()).collect();
    let args: Vec<&str> = records.iter().filter_map(|r| r.lines().next()?.strip_prefix("ARGS ")).collect();
    assert_eq!(args.len(), records.len(), "a stand-in qemu could not write its record: {records:?}");
    assert!(
        args.iter().any(|a| a.contains("-machine pc")) && args.iter().any(|a| a.contains("-machine none")),
        "{args:?}"
    );
    for record in &records {
        let environ: Vec<&str> = record.lines().skip(1).collect();
        assert!(environ.iter().all(|l| !l.contains("hunter2") && !l.contains("OSP_")), "{record}");
        let names: Vec<&str> = environ.iter().filter_map(|l| l.split('=').next()).collect();
        // sh itself adds PWD (and may add SHLVL, _); nothing else of imgforge's comes through.
        assert!(names.iter().all(|n| matches!(*n, "PATH" | "PWD" | "SHLVL" | "_")), "{record}");
    }
}

/// A descriptor imgforge inherited without close-on-exec (as a caller's pipe or disk) never
/// reaches qemu: the stand-in block-layer qemu of a vmdk `deploy` lists its descriptors, and
/// holds only 0-2 and the ones named in its arguments (`fd=N`), besides its script.
#[test]
fn qemu_gets_only_the_descriptors_passed_to_it() {
    use std::os::unix::fs::PermissionsExt;
    let seen = tempfile::tempdir().unwrap();
    std::fs::set_permissions(seen.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let record = seen.path().join("fds");
    let script = format!(
        // python3 writes the record itself: a shell redirection would add descriptors.
        "python3 -c 'import os, sys\nd = \"/proc/%s/fd\" % sys.argv[1]\nwith open(sys.argv[2], \"a\") as f:\n    \
         f.writelines(\"%s -> %s\\n\" % (n, os.readlink(d + \"/\" + n)) for n in os.listdir(d))\n    \
         f.write(\"args \" + \" \".join(sys.argv[3:]) + \"\\n\")' $$ '{0}' \"$@\"",
        record.display()
    );
    let (_bin, fake) = fake_qemu("qemu-lists-fds", &script);
    let work = tempfile::tempdir().unwrap();
    let raw = work.path().join("src.raw");
    std::fs::write(&raw, vec![0x42u8; 1 << 20]).unwrap();
    // A vmdk: a self-contained qcow2 is read in Rust (source/qcow2_reader.rs), without qemu.
    let image = work.path().join("src.vmdk");
    sh(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "vmdk"]).arg(&raw).arg(&image)).unwrap();
    let leaked = work.path().join("leaked-descriptor");
    std::fs::write(&leaked, b"not for qemu").unwrap();
    let c_path = std::ffi::CString::new(leaked.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string; the descriptor is closed below. No O_CLOEXEC, on purpose.
    let fd = unsafe { libc::open(c_path.as_ptr(), libc::O_RDONLY) };
    assert!(fd > 2);
    let target = work.path().join("out.img");
    let out = Command::new(binary())
        .args(["deploy", "--progress", "none", "--image", image.to_str().unwrap(), "--target"])
        .arg(&target)
        .arg("--qemu")
        .arg(&fake)
        .output()
        .unwrap();
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let listing = std::fs::read_to_string(&record).expect("the stand-in qemu ran");
    eprintln!("{listing}");
    let args = listing.lines().find_map(|l| l.strip_prefix("args ")).unwrap();
    for line in listing.lines().filter_map(|l| l.split_once(" -> ")) {
        let (n, target) = (line.0.rsplit(' ').next().unwrap(), line.1);
        let passed = n.parse::<u32>().unwrap() <= 2
            || args.contains(&format!("fd={n},"))
            || target.contains(&*fake.to_string_lossy());
        assert!(passed && !target.contains("leaked-descriptor"), "qemu holds descriptor {n} ({target}):\n{listing}");
    }
    assert_eq!(std::fs::read(&target).unwrap(), std::fs::read(&raw).unwrap());
}
