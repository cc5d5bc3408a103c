//! Offline RPM installation in the helper: `--install-rpm` (one rpm transaction) and
//! `--install --repo` (the guest's dnf, that repository alone). Read back with the guest's
//! own rpm run by the test in a chroot of a read-only loop mount.

use imgforge_tests::fixtures::{self, Shape};
use imgforge_tests::readback::Mount;
use imgforge_tests::rpm;
use imgforge_tests::run::{code, customize_tcg, imgforge, s};
use std::process::Command;

/// `rpm -q NAMES` inside the mounted guest (read-only: rpm only reads its database).
fn rpm_q(m: &Mount, names: &[&str]) -> bool {
    Command::new("chroot").arg(m.path()).arg("rpm").arg("-q").args(names).status().unwrap().success()
}

#[test]
fn install_rpm_in_one_transaction_runs_scriptlets() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::RpmDosExt4, work.path()).unwrap();
    // Given application first, library second: rpm orders the transaction itself.
    let (demo, lib) = (rpm::package("demo").unwrap(), rpm::package("libdemo").unwrap());
    let out = customize_tcg(&img, &["--install-rpm", &s(&demo), "--install-rpm", &s(&lib)]);
    assert_eq!(code(&out), 0);
    let m = Mount::partition(&img, 0).unwrap();
    assert!(rpm_q(&m, &["demo", "libdemo"]));
    assert_eq!(m.read(rpm::POST_MARK).unwrap(), "demo post ran\n");
    assert!(m.join("/usr/bin/demo").is_file());
}

#[test]
fn a_missing_dependency_fails_with_rpms_message() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::RpmDosExt4, work.path()).unwrap();
    let out = customize_tcg(&img, &["--install-rpm", &s(&rpm::package("broken").unwrap())]);
    assert_eq!(code(&out), 1);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("60-InstallPackages") && stderr.contains("no-such-capability-imgforge"), "{stderr}");
    let m = Mount::partition(&img, 0).unwrap();
    assert!(!rpm_q(&m, &["broken"]));
}

#[test]
fn install_from_a_local_repo_pulls_dependencies() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::RpmDosExt4, work.path()).unwrap();
    let out = customize_tcg(&img, &["--install", "demo", "--repo", &s(&rpm::repo().unwrap())]);
    assert_eq!(code(&out), 0);
    let m = Mount::partition(&img, 0).unwrap();
    assert!(rpm_q(&m, &["demo", "libdemo"]), "libdemo came from the repository as a dependency");
    assert_eq!(m.read(rpm::POST_MARK).unwrap(), "demo post ran\n");
}

#[test]
fn host_side_refusals() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::RpmDosExt4, work.path()).unwrap();
    let not_rpm = work.path().join("fake.rpm");
    std::fs::write(&not_rpm, b"#!/bin/sh\necho not an rpm\n").unwrap();
    for (args, want) in [
        (vec!["--install-rpm", not_rpm.to_str().unwrap()], "not an RPM"),
        (vec!["--install", "demo"], "needs --repo"),
        (vec!["--install", "demo", "--repo", work.path().to_str().unwrap()], "repomd.xml"),
    ] {
        let mut full = vec!["customize", "-a", img.to_str().unwrap(), "--accel", "tcg"];
        full.extend(args.iter());
        let out = imgforge(&full);
        assert_eq!(code(&out), 2, "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(want), "{args:?}");
    }
}

#[test]
fn a_debian_guest_is_told_a_yum_repository_needs_an_rpm_guest() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let out = customize_tcg(&img, &["--install", "demo", "--repo", &s(&rpm::repo().unwrap())]);
    assert_eq!(code(&out), 1);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("need an RPM-based guest") && stderr.contains("use --install-deb"), "{stderr}");
}

/// Package names reach dnf as they were given: `*` is dnf's pattern (every package of the
/// repository), never expanded by a shell against the helper's files.
#[test]
fn a_package_pattern_reaches_dnf_unexpanded() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::RpmDosExt4, work.path()).unwrap();
    let out = customize_tcg(&img, &["--install", "*", "--repo", &s(&rpm::repo().unwrap())]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let m = Mount::partition(&img, 0).unwrap();
    assert!(rpm_q(&m, &["demo", "libdemo"]), "dnf installed what '*' matched in the repository");
}
