//! `imgforge verify`: the image "test" step — filesystems checked read-only, required packages
//! present; exit 0 only if all hold; the image never changes.

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
