//! `imgforge verify`: the image "test" step — filesystems checked read-only, required packages
//! present; exit 0 only if all hold; the image never changes.

use imgforge_tests::crafted;
use imgforge_tests::fixtures::{self, sh, Shape};
use imgforge_tests::rpm;
use imgforge_tests::run::{code, imgforge, s};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

fn digest(p: &Path) -> String {
    sh(Command::new("sha256sum").arg(p)).unwrap()
}

fn report(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn a_good_image_passes_and_a_missing_package_is_named() {
    let img = fixtures::disk(Shape::RpmDosExt4).unwrap();
    let before = digest(&img);
    let out = imgforge(&[
        "verify",
        "--accel",
        "tcg",
        "--json",
        &s(&img),
        "--require-package",
        "dnf",
        "--require-package",
        "imgforge-base-provides",
    ]);
    assert_eq!(code(&out), 0);
    let r = report(&out);
    assert_eq!(r["ok"], true);
    let names: Vec<&str> = r["checks"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert!(
        names.contains(&"filesystem-vda1")
            && names.contains(&"package-dnf")
            && names.contains(&"package-imgforge-base-provides"),
        "{names:?}"
    );

    let out = imgforge(&[
        "verify",
        "--accel",
        "tcg",
        &s(&img),
        "--require-package",
        "dnf",
        "--require-package",
        "no-such-package",
    ]);
    assert_eq!(code(&out), 1);
    assert!(String::from_utf8_lossy(&out.stderr).contains("package-no-such-package"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAIL package-no-such-package"));
    assert_eq!(digest(&img), before, "verify changed the image");
}

#[test]
fn a_corrupted_superblock_fails() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    // s_log_block_size of the root's superblock (partition at 1 MiB, superblock at +1024).
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&[0x7f, 0, 0, 0], (1 << 20) + 1024 + 24).unwrap();
    drop(f);
    let out = imgforge(&["verify", "--accel", "tcg", "--json", &s(&img)]);
    assert_eq!(code(&out), 1);
    let r = report(&out);
    assert_eq!(r["ok"], false);
}

#[test]
fn liveimgs_are_verified_too() {
    let live = rpm::liveimg("zstd").unwrap();
    let out = imgforge(&["verify", "--accel", "tcg", "--json", &s(&live), "--require-package", "rpm"]);
    assert_eq!(code(&out), 0);
    assert_eq!(report(&out)["checks"][0]["name"], "filesystem-vda");
}

/// verify unpacks a compressed image to a work file sized by what the image announces: a 2 KB
/// .zst whose frame announces 4 KiB and holds 64 MiB is refused (exit 2) without writing past
/// the 4 KiB (the run is limited to 16 MiB files: a longer write would kill it).
#[test]
fn unpacking_stops_at_the_announced_size() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let liar = crafted::zstd_liar(dir.path());
    let mut cmd = Command::new(imgforge_tests::run::binary());
    cmd.args(["verify", "--accel", "tcg"]).arg(&liar);
    // SAFETY: setrlimit is async-signal-safe; the limit is for the child only.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: 16 << 20, rlim_max: 16 << 20 };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{:?}: {stderr}", out.status);
    assert!(stderr.contains("more than the 4096 bytes it announces"), "{stderr}");
}

/// A helper run (a stand-in qemu writing the serial ports, then exiting) whose task printed a
/// `CHECK` line that does not parse, beside a good one and `SUCCESS`: `verify` fails, naming
/// the line quoted with its escapes (the helper drops such a line from the report; its
/// console log keeps it).
#[test]
fn an_unparseable_check_line_fails_verify() {
    let bin = tempfile::tempdir().unwrap();
    let qemu = imgforge_tests::stand_in::serial_qemu(
        bin.path(),
        "qemu-check-lines",
        r#"printf '%s\n' '[70-CheckPackages] CHECK ok package-dnf "1.0"' "[70-CheckPackages] CHECK ok package-x $(printf '\033')[2J" >&"$c"
printf '%s\n' 'TASK-START 70-CheckPackages' 'CHECK ok package-dnf "1.0"' 'TASK-END 70-CheckPackages 5' SUCCESS >&"$r"
"#,
    );
    let img = fixtures::disk(Shape::DosExt4).unwrap();
    let out = imgforge(&["verify", "--accel", "tcg", "--json", "--qemu", &s(&qemu), &s(&img)]);
    assert_eq!(code(&out), 1, "a check that could not be read passed verify");
    let r = report(&out);
    assert_eq!(r["ok"], false);
    let checks = r["checks"].as_array().unwrap();
    assert!(checks.iter().any(|c| c["name"] == "package-dnf" && c["ok"] == true), "{r}");
    let bad = checks.iter().find(|c| c["name"] == "malformed-check").unwrap_or_else(|| panic!("{r}"));
    assert_eq!(bad["ok"], false);
    let detail = bad["detail"].as_str().unwrap();
    assert!(detail.contains(r#""CHECK ok package-x \\u{1b}[2J""#), "{detail}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains('\u{1b}'), "the guest's escape reached the terminal");
}

/// The guest's rpm, asked by verify whether a package is installed, is the image's program: a
/// hostile one that writes a forged passing CHECK and SUCCESS on the report port and ends the
/// VM must not make verify pass.
#[test]
fn the_guests_rpm_cannot_forge_a_check() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    {
        let m = imgforge_tests::readback::Mount::writable_partition(&img, 0).unwrap();
        let rpm = m.join("/usr/bin/rpm");
        std::fs::write(
            &rpm,
            "#!/bin/sh\nfor port in /dev/ttyS1 /proc/1/root/dev/ttyS1; do\n\
             printf 'CHECK ok package-no-such-package \"forged\"\\nSUCCESS\\n' > \"$port\"\ndone\n\
             echo b > /proc/sysrq-trigger\nsleep 30\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&rpm, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let out = imgforge(&["verify", "--accel", "tcg", "--json", &s(&img), "--require-package", "no-such-package"]);
    assert_ne!(code(&out), 0, "a forged CHECK was believed: {}", String::from_utf8_lossy(&out.stdout));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("forged"), "{}", String::from_utf8_lossy(&out.stdout));
}
