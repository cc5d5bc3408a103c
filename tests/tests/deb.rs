//! Offline package changes in Debian guests with the guest's own apt-get, from a `--repo`
//! directory of `.deb` files (imgforge writes its index) or `--install-deb` files, built here
//! with dpkg-deb. Read back from dpkg's database and the files, through the test's own mounts.

use imgforge_tests::deb::{self, installed, HELLO_FILE, LIB_FILE};
use imgforge_tests::fixtures::{self, Shape};
use imgforge_tests::readback::Mount;
use imgforge_tests::run::{code, customize_tcg, imgforge, s};
use std::process::Command;

const HELLO: &str = "imgforge-test-hello";
const LIB: &str = "imgforge-test-lib";

/// Nothing of the run is left in the guest: apt's scratch lists and caches, the payload's
/// mount point, the policy-rc.d that kept services from starting, and the payload path in
/// apt's logs.
fn assert_no_trace(m: &Mount) {
    let tmp: Vec<String> = std::fs::read_dir(m.join("/tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("imgforge"))
        .collect();
    assert!(tmp.is_empty(), "left in /tmp: {tmp:?}");
    assert!(!m.join("/usr/sbin/policy-rc.d").exists(), "policy-rc.d left behind");
    for dir in ["/var/log/apt", "/var/lib/apt", "/var/cache/apt"] {
        let out = Command::new("grep").args(["-rlI", "imgforge-payload"]).arg(m.join(dir)).output().unwrap();
        assert!(out.stdout.is_empty(), "the payload path is in {}", String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn install_from_a_directory_of_debs_pulls_dependencies_then_update_and_uninstall() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let repo = deb::hello_and_lib(&work.path().join("repo")).unwrap();
    let out = customize_tcg(&img, &["--install", HELLO, "--repo", &s(&repo)]);
    assert_eq!(code(&out), 0);
    {
        let m = Mount::partition(&img, 0).unwrap();
        assert_eq!(m.read(HELLO_FILE).unwrap(), format!("{HELLO} 1.0\n"));
        assert_eq!(m.read(LIB_FILE).unwrap(), format!("{LIB} 1.0\n"), "the dependency came from the directory");
        assert!(installed(m.path(), HELLO).unwrap() && installed(m.path(), LIB).unwrap());
        let history = m.read("/var/log/apt/history.log").unwrap();
        assert!(history.contains(&format!("Commandline: apt-get -q install {HELLO}\n")), "{history}");
        assert_no_trace(&m);
    }

    // A second run: --update from a repository with a newer library, then --uninstall.
    let newer = work.path().join("newer");
    deb::build(&newer, LIB, "2.0", "lib", None).unwrap();
    let out = customize_tcg(&img, &["--uninstall", HELLO, "--update", "--repo", &s(&newer)]);
    assert_eq!(code(&out), 0);
    let m = Mount::partition(&img, 0).unwrap();
    assert!(!m.join(HELLO_FILE).exists(), "--uninstall removed the file");
    assert!(!installed(m.path(), HELLO).unwrap(), "{:?}", deb::dpkg_status(m.path(), HELLO));
    assert_eq!(m.read(LIB_FILE).unwrap(), format!("{LIB} 2.0\n"), "--update upgraded the library");
    assert!(installed(m.path(), LIB).unwrap());
    assert_no_trace(&m);
}

#[test]
fn a_missing_package_fails_and_leaves_the_disk_byte_identical() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let repo = deb::hello_and_lib(&work.path().join("repo")).unwrap();
    let before = fixtures::sha256_hex(&img);
    let out = customize_tcg(&img, &["--install", &format!("{HELLO},imgforge-no-such-package"), "--repo", &s(&repo)]);
    assert_eq!(code(&out), 1);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("60-InstallPackages") && stderr.contains("Unable to locate package imgforge-no-such-package"),
        "{stderr}"
    );
    assert_eq!(fixtures::sha256_hex(&img), before, "the disk changed");
}

/// `--install-deb` files in one apt-get transaction (the dependency given after the package
/// that needs it), and `--firstboot-install` leaving apt-get's install for the first boot.
#[test]
fn install_deb_files_and_firstboot_install() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let debs = deb::hello_and_lib(&work.path().join("debs")).unwrap();
    let file = |name: &str| s(&debs.join(format!("{name}_1.0_all.deb")));
    let out = customize_tcg(
        &img,
        &["--install-deb", &file(HELLO), "--install-deb", &file(LIB), "--firstboot-install", "vim, lib*"],
    );
    assert_eq!(code(&out), 0);
    let m = Mount::partition(&img, 0).unwrap();
    assert!(installed(m.path(), HELLO).unwrap() && installed(m.path(), LIB).unwrap());
    assert_eq!(m.read(HELLO_FILE).unwrap(), format!("{HELLO} 1.0\n"));
    let scripts = m.join("/usr/lib/imgforge/firstboot/scripts");
    let names: Vec<_> = std::fs::read_dir(&scripts).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(names.len(), 1, "{names:?}");
    let script = std::fs::read_to_string(&names[0]).unwrap();
    assert!(script.contains("apt-get $apt_opts update\n") && script.contains("install 'vim' 'lib*'\n"), "{script}");
    assert!(!m.join("/usr/sbin/policy-rc.d").exists());
}

#[test]
fn refusals_before_any_vm_boots() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let before = fixtures::sha256_hex(&img);
    let not_deb = work.path().join("x.deb");
    std::fs::write(&not_deb, b"#!/bin/sh\n").unwrap();
    let debs = deb::hello_and_lib(&work.path().join("debs")).unwrap();
    let empty = work.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let cases: &[(&[&str], &[&str])] = &[
        (&["--update"], &["--update", "no network", "--repo DIR"]),
        (&["--install", HELLO], &["needs --repo"]),
        (&["--install-deb", &s(&not_deb)], &["not a Debian package"]),
        (&["--uninstall=-y"], &["\"-y\" is not a package name"]),
        (&["--install", HELLO, "--repo", &s(&empty)], &["not a package repository"]),
        (&["--install", HELLO, "--repo", &s(work.path())], &["x.deb: not a Debian package"]),
        (&["--install", HELLO, "--repo", &s(&debs), "--gpgcheck"], &["unsigned", "--gpgcheck"]),
    ];
    for (args, wants) in cases {
        let mut full = vec!["customize", "-a", img.to_str().unwrap(), "--accel", "tcg"];
        full.extend(args.iter());
        let out = imgforge(&full);
        assert_eq!(code(&out), 2, "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        for want in *wants {
            assert!(stderr.contains(want), "{args:?}: {stderr}");
        }
    }
    assert_eq!(fixtures::sha256_hex(&img), before);
}
