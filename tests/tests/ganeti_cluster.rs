//! A real single-node Ganeti 3.0 cluster (fake hypervisor, `file` disks) in namespaces the test
//! creates (`tests/ganeti/cluster.sh`): `gnt-instance add -o imgforge+default`, reinstall,
//! rename, export -> import into a second instance, and a bad `img_properties` rejected by
//! verify; the disks are read back with loop mounts. And the OS definition as the Debian
//! package ships it (`scripts/package.sh`), found valid by `gnt-os diagnose`.

use imgforge_tests::fixtures::{self, sh, Shape};
use imgforge_tests::readback::{password_matches, shadow_field, Mount};
use imgforge_tests::run::binary;
use std::process::Command;

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGanetiClusterKey00000000000000000000000000 cluster@imgforge";

#[test]
fn ganeti_instance_life_cycle_with_imgforge() {
    fixtures::require_root();
    let images = tempfile::tempdir().unwrap();
    sh(Command::new("cp")
        .arg("--sparse=always")
        .arg(fixtures::disk(Shape::DosExt4).unwrap())
        .arg(images.path().join("debian.img")))
    .unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("ganeti/cluster.sh");
    let out = Command::new("timeout")
        .args(["900", "unshare", "--net", "--uts", "--mount", "--pid", "--fork", "--mount-proc"])
        .arg(&script)
        .arg(binary())
        .arg(images.path())
        .arg(out_dir.path())
        .arg(KEY)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("CLUSTER-DONE"), "the cluster run failed");
    assert!(stdout.contains("BAD-PROPERTIES-REJECTED"), "a bad img_properties was accepted");
    if let Some(ms) = stdout.lines().find_map(|l| l.strip_prefix("ADD-MS ")) {
        eprintln!("gnt-instance add took {ms} ms");
    }

    let create = out_dir.path().join("create.disk0");
    assert_eq!(std::fs::metadata(&create).unwrap().len(), 2 << 30);
    {
        let m = Mount::partition(&create, 0).unwrap();
        assert_eq!(m.read("/etc/hostname").unwrap(), "inst1.imgforge.test\n");
        assert!(password_matches("Cluster-Pw-1", &shadow_field(&m.read("/etc/shadow").unwrap(), "root").unwrap()));
        assert_eq!(m.read("/root/.ssh/authorized_keys").unwrap(), format!("{KEY}\n"));
        assert_eq!(m.read("/etc/imgforge-personality").unwrap(), "personality\n");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(m.join("/etc/imgforge-personality")).unwrap().mode() & 0o7777,
            0o440,
            "snf-image's default mode"
        );
    }
    let reinstall = out_dir.path().join("reinstall.disk0");
    let m = Mount::partition(&reinstall, 0).unwrap();
    assert!(password_matches("Reinstall-Pw-2", &shadow_field(&m.read("/etc/shadow").unwrap(), "root").unwrap()));
    drop(m);
    let renamed = out_dir.path().join("rename.disk0");
    assert_eq!(Mount::partition(&renamed, 0).unwrap().read("/etc/hostname").unwrap(), "inst2.imgforge.test\n");
    // Ganeti runs the OS rename script after importing under a new name: the imported disk is
    // the exported one with the new hostname.
    let imported = out_dir.path().join("import.disk0");
    let m = Mount::partition(&imported, 0).unwrap();
    assert_eq!(m.read("/etc/hostname").unwrap(), "inst3.imgforge.test\n");
    assert_eq!(m.read("/etc/imgforge-personality").unwrap(), "personality\n", "the exported contents came along");
    assert!(password_matches("Reinstall-Pw-2", &shadow_field(&m.read("/etc/shadow").unwrap(), "root").unwrap()));
    drop(m);
    let logs: String = std::fs::read_dir(out_dir.path().join("os-log"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(logs.contains("imgforge-helper"), "the OS log lacks the helper's console");
}

/// The package's OS definition, unpacked from the .deb with the package's /usr/bin/imgforge
/// (no `install-os`): Ganeti finds it valid and runs it (`img_id=null`: no helper VM, so this
/// stays short).
#[test]
fn the_packaged_os_definition_is_valid_for_ganeti() {
    fixtures::require_root();
    let debs = tempfile::tempdir().unwrap();
    let deb = imgforge_tests::package::build_deb(debs.path(), false);
    let images = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("ganeti/cluster.sh");
    let out = Command::new("timeout")
        .args(["300", "unshare", "--net", "--uts", "--mount", "--pid", "--fork", "--mount-proc"])
        .arg(&script)
        .arg(binary())
        .arg(images.path())
        .arg(out_dir.path())
        .arg(KEY)
        .arg(&deb)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("CLUSTER-DONE"), "the cluster run failed");
    assert!(stdout.contains("OS: imgforge [global status: valid]"), "gnt-os diagnose: the packaged OS is not valid");
    assert!(stdout.contains("/srv/ganeti/os/imgforge"), "gnt-os diagnose names another path");
    assert!(stdout.contains("PACKAGED-ADD-OK"), "gnt-instance add with the packaged OS failed");
    let logs: String = std::fs::read_dir(out_dir.path().join("os-log"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(logs.contains("img_id=null: nothing written"), "the packaged imgforge did not run: {logs}");
}
