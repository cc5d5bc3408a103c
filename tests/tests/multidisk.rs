//! A guest on several disks (`customize -a D1 -a D2`, virt-customize's form): the root on the
//! first, filesystems the guest's fstab lists on the second (by UUID, and by a device name of
//! the guest's own), each disk behind an overlay of its own and committed only when every
//! operation succeeded. Read back with the test's own read-only loop mounts.

use imgforge_tests::fixtures::{self, sh, sha256_hex, Shape};
use imgforge_tests::readback::Mount;
use imgforge_tests::run::{code, imgforge, s};
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1024 * 1024;
/// The UUID of the second disk's first filesystem, which the guest's fstab names.
const SRV_UUID: &str = "5e1f0c2a-7d1b-4c55-9a51-2f3c0e6d9b01";

/// A second disk: an MBR with two ext4 partitions, the first (UUID [`SRV_UUID`]) holding
/// `/existing`, the second empty; as qcow2 when `qcow2` (then also returned as raw for
/// reading back, see [`raw_copy`]).
fn second_disk(dir: &Path, qcow2: bool) -> PathBuf {
    let raw = dir.join("disk2.img");
    let content = dir.join("srv-content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("existing"), "was here\n").unwrap();
    let part = |name: &str, extra: &[&str]| {
        let fs = dir.join(name);
        sh(Command::new("truncate").args(["-s", "30M"]).arg(&fs)).unwrap();
        sh(Command::new("mkfs.ext4").args(["-q", "-F"]).args(extra).arg(&fs)).unwrap();
        fs
    };
    let p1 = part("p1.ext4", &["-U", SRV_UUID, "-d", content.to_str().unwrap()]);
    let p2 = part("p2.ext4", &[]);
    sh(Command::new("truncate").args(["-s", "64M"]).arg(&raw)).unwrap();
    let mut sfdisk = Command::new("sfdisk");
    sfdisk.arg("-q").arg(&raw).stdin(std::process::Stdio::piped());
    let mut child = sfdisk.spawn().unwrap();
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        b"label: dos\nstart=2048, size=61440, type=83\nstart=63488, size=61440, type=83\n",
    )
    .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk");
    for (fs, sector) in [(&p1, 2048u64), (&p2, 63488)] {
        sh(Command::new("dd").arg(format!("if={}", fs.display())).arg(format!("of={}", raw.display())).args([
            "bs=512",
            &format!("seek={sector}"),
            "conv=notrunc,sparse",
            "status=none",
        ]))
        .unwrap();
    }
    if !qcow2 {
        return raw;
    }
    let q = dir.join("disk2.qcow2");
    sh(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&q)).unwrap();
    std::fs::remove_file(&raw).unwrap();
    q
}

/// A raw copy of the qcow2 `disk`, to loop-mount.
fn raw_copy(disk: &Path) -> PathBuf {
    let raw = disk.with_extension("readback.img");
    sh(Command::new("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw"]).arg(disk).arg(&raw)).unwrap();
    raw
}

/// The first disk: the fixture's root, its fstab naming the second disk's filesystems, `/srv`
/// by UUID, `/mnt` by the guest's own device name for them (`/dev/sdb2`).
fn first_disk(dir: &Path) -> PathBuf {
    let img = fixtures::copy(Shape::DosExt4, dir).unwrap();
    let m = Mount::writable_partition(&img, 0).unwrap();
    let fstab = m.join("/etc/fstab");
    let mut text = std::fs::read_to_string(&fstab).unwrap_or_default();
    text.push_str(&format!("UUID={SRV_UUID}\t/srv\text4\tdefaults\t0\t2\n/dev/sdb2\t/mnt\text4\tdefaults\t0\t2\n"));
    std::fs::write(&fstab, text).unwrap();
    drop(m);
    img
}

fn customize(disk1: &Path, disk2: &Path, ops: &[&str]) -> std::process::Output {
    let (d1, d2) = (s(disk1), s(disk2));
    let mut args = vec!["customize", "--format", "raw", "-a", &d1, "--format", "qcow2", "-a", &d2, "--accel", "tcg"];
    args.extend_from_slice(ops);
    imgforge(&args)
}

#[test]
fn a_guest_on_two_disks_is_customized_on_both() {
    let work = tempfile::tempdir().unwrap();
    let disk1 = first_disk(work.path());
    let disk2 = second_disk(work.path(), true);
    let out = customize(
        &disk1,
        &disk2,
        &[
            "--write",
            "/srv/hello:from the second disk",
            "--append-line",
            "/srv/existing:appended",
            "--write",
            "/mnt/by-device-name:sdb2",
            "--write",
            "/etc/on-root:first disk",
            "--run-command",
            "ls /srv > /root/srv-seen",
        ],
    );
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));

    let root = Mount::partition(&disk1, 0).unwrap();
    assert_eq!(root.read("/etc/on-root").unwrap(), "first disk");
    let seen = root.read("/root/srv-seen").unwrap();
    assert!(seen.contains("existing") && seen.contains("hello"), "{seen}");
    // Written to the second disk, not into the first disk's (hidden) mount points.
    assert!(!root.join("/srv/hello").exists(), "/srv/hello landed on the root filesystem");
    assert!(!root.join("/mnt/by-device-name").exists(), "/mnt/by-device-name landed on the root filesystem");
    drop(root);

    let raw2 = raw_copy(&disk2);
    let srv = Mount::partition(&raw2, 0).unwrap();
    assert_eq!(srv.read("/hello").unwrap(), "from the second disk");
    assert_eq!(srv.read("/existing").unwrap(), "was here\nappended\n");
    let mnt = Mount::partition(&raw2, 1).unwrap();
    assert_eq!(mnt.read("/by-device-name").unwrap(), "sdb2");
}

/// One failing operation: neither disk changes by a byte, though both were written first.
#[test]
fn a_failure_leaves_every_disk_untouched() {
    let work = tempfile::tempdir().unwrap();
    let disk1 = first_disk(work.path());
    let disk2 = second_disk(work.path(), true);
    let before = (sha256_hex(&disk1), sha256_hex(&disk2));
    let out =
        customize(&disk1, &disk2, &["--write", "/srv/hello:x", "--write", "/etc/on-root:y", "--run-command", "exit 3"]);
    assert_ne!(code(&out), 0);
    assert_eq!((sha256_hex(&disk1), sha256_hex(&disk2)), before, "a disk changed although the run failed");
}

/// One disk under two names is refused before anything runs: its two overlays would each hold
/// half of the changes.
#[test]
fn one_disk_given_twice_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("d.img");
    std::fs::write(&disk, vec![0u8; MIB as usize]).unwrap();
    let link = work.path().join("link.img");
    std::os::unix::fs::symlink(&disk, &link).unwrap();
    let out = imgforge(&["customize", "-a", &s(&disk), "-a", &s(&link), "--accel", "tcg", "--hostname", "h"]);
    assert_eq!(code(&out), 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("given twice"), "{}", String::from_utf8_lossy(&out.stderr));
}
