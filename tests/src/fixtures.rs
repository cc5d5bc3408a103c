//! Fixture disk images, built from a debootstrap'd Debian bookworm and cached.
//!
//! The cache (`$IMGFORGE_FIXTURES`, default `/var/tmp/imgforge-fixtures`) survives between
//! runs on one machine; anything missing is rebuilt. Builders take a file lock, so parallel
//! tests build each fixture once.

use anyhow::{bail, Context, Result};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Bumped when the fixtures change shape, so stale caches are rebuilt.
const FIXTURE_VERSION: u32 = 2;
/// Debian suite of the fixture guest.
const SUITE: &str = "bookworm";
/// Mirror used by debootstrap.
const MIRROR: &str = "http://deb.debian.org/debian";
/// Fixed filesystem UUIDs, so fstab lines are known in advance.
pub const ROOT_UUID: &str = "1b2c3d4e-0000-4000-8000-00000000f001";
/// UUID of the separate /boot filesystem.
pub const BOOT_UUID: &str = "1b2c3d4e-0000-4000-8000-00000000f002";
/// A second user in the fixture, for --password and --ssh-inject.
pub const FIXTURE_USER: &str = "alice";

/// The disk layouts the tests use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// MBR (dos label), one ext4 root partition.
    DosExt4,
    /// GPT, an ext4 /boot partition and an XFS root partition.
    GptXfsBoot,
    /// MBR, one LVM physical volume; volume group `imgforge`, ext4 root on LV `root`.
    LvmExt4,
    /// Like `DosExt4`, the guest carrying rpm and dnf (the stand-in for an RPM distribution).
    RpmDosExt4,
}

impl Shape {
    fn file_name(self) -> &'static str {
        match self {
            Shape::DosExt4 => "dos-ext4.img",
            Shape::GptXfsBoot => "gpt-xfs-boot.img",
            Shape::LvmExt4 => "lvm-ext4.img",
            Shape::RpmDosExt4 => "rpm-dos-ext4.img",
        }
    }
}

/// The fixture cache directory.
pub fn dir() -> PathBuf {
    let base = std::env::var_os("IMGFORGE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/imgforge-fixtures"));
    base.join(format!("v{FIXTURE_VERSION}"))
}

/// Fails unless the tests run as root (loop devices, mounts, debootstrap need it).
pub fn require_root() {
    // SAFETY: geteuid cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the integration tests need root (loop devices, mounts, debootstrap): run them as CI does, as root"
    );
}

/// Runs a command, failing with its output if it fails.
pub fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) struct Lock {
    _file: std::fs::File,
}

pub(crate) fn lock(name: &str) -> Result<Lock> {
    std::fs::create_dir_all(dir())?;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir().join(format!(".{name}.lock")))?;
    // SAFETY: valid fd.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!("cannot lock the fixture cache: {}", std::io::Error::last_os_error());
    }
    Ok(Lock { _file: f })
}

/// The debootstrap'd root tree (minbase + tzdata, a user `alice`).
pub fn rootfs() -> Result<PathBuf> {
    require_root();
    let done = dir().join("rootfs");
    if done.join(".complete").exists() {
        return Ok(done);
    }
    let _l = lock("rootfs")?;
    if done.join(".complete").exists() {
        return Ok(done);
    }
    let tmp = dir().join("rootfs.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_dir_all(&done);
    sh(Command::new("debootstrap").args(["--variant=minbase", "--include=tzdata", SUITE]).arg(&tmp).arg(MIRROR))
        .context("debootstrap of the fixture guest (apt-get install debootstrap; needs the Debian mirror)")?;
    sh(Command::new("chroot").arg(&tmp).args(["useradd", "--create-home", "--shell", "/bin/bash", FIXTURE_USER]))?;
    std::fs::write(tmp.join("etc/hostname"), "fixture\n")?;
    std::fs::write(tmp.join("etc/hosts"), "127.0.0.1\tlocalhost\n127.0.1.1\tfixture\n")?;
    // debootstrap leaves apt caches: not needed in an image.
    let _ = sh(Command::new("chroot").arg(&tmp).args(["apt-get", "clean"]));
    std::fs::write(tmp.join(".complete"), "")?;
    std::fs::rename(&tmp, &done)?;
    Ok(done)
}

/// The cached fixture image of `shape` (never modify it: use [`copy`]).
pub fn disk(shape: Shape) -> Result<PathBuf> {
    let path = dir().join(shape.file_name());
    if path.exists() {
        return Ok(path);
    }
    let root = if shape == Shape::RpmDosExt4 { crate::rpm::rootfs()? } else { rootfs()? };
    let _l = lock(shape.file_name())?;
    if path.exists() {
        return Ok(path);
    }
    let work = tempfile::Builder::new().prefix("fixture-").tempdir_in(dir())?;
    let staging = work.path().join("root");
    sh(Command::new("cp").arg("-a").arg(&root).arg(&staging))?;
    std::fs::remove_file(staging.join(".complete"))?;
    let img = work.path().join("disk.img");
    match shape {
        Shape::DosExt4 | Shape::RpmDosExt4 => build_dos_ext4(&staging, &img)?,
        Shape::GptXfsBoot => build_gpt_xfs_boot(&staging, &img)?,
        Shape::LvmExt4 => build_lvm_ext4(&staging, &img, work.path())?,
    }
    std::fs::rename(&img, &path)?;
    Ok(path)
}

const MIB: u64 = 1024 * 1024;

fn build_dos_ext4(staging: &Path, img: &Path) -> Result<()> {
    let size = 1024 * MIB;
    std::fs::write(staging.join("etc/fstab"), format!("UUID={ROOT_UUID} / ext4 errors=remount-ro 0 1\n"))?;
    create_sparse(img, size)?;
    partition(img, "label: dos\nstart=2048, type=83, bootable\n")?;
    mkfs_ext4(staging, img, MIB, size - MIB, ROOT_UUID, "root")
}

fn build_gpt_xfs_boot(staging: &Path, img: &Path) -> Result<()> {
    let size = 2048 * MIB;
    let boot_size = 256 * MIB;
    std::fs::write(
        staging.join("etc/fstab"),
        format!("UUID={ROOT_UUID} / xfs defaults 0 1\nUUID={BOOT_UUID} /boot ext4 defaults 0 2\n"),
    )?;
    create_sparse(img, size)?;
    // Leave the backup GPT room at the end (33 sectors).
    partition(
        img,
        &format!(
            "label: gpt\nstart=2048, size={}, type=linux, name=boot\nstart={}, type=linux, name=root\n",
            boot_size / 512,
            (MIB + boot_size) / 512
        ),
    )?;
    // /boot's contents go to their own filesystem; the root keeps an empty /boot.
    let boot_tree = staging.parent().unwrap().join("boot");
    std::fs::rename(staging.join("boot"), &boot_tree)?;
    std::fs::create_dir(staging.join("boot"))?;
    std::fs::write(boot_tree.join("fixture-boot-marker"), "boot partition\n")?;
    mkfs_ext4(&boot_tree, img, MIB, boot_size, BOOT_UUID, "boot")?;
    let root_offset = MIB + boot_size;
    let root_size = size - root_offset - MIB;
    let loopdev = sh(Command::new("losetup")
        .args(["--find", "--show", "--offset", &root_offset.to_string(), "--sizelimit", &root_size.to_string()])
        .arg(img))?;
    let loopdev = loopdev.trim().to_owned();
    let result = (|| -> Result<()> {
        sh(Command::new("mkfs.xfs").args(["-q", "-f", "-L", "root", "-m", &format!("uuid={ROOT_UUID}"), &loopdev]))?;
        let mnt = tempfile::tempdir()?;
        sh(Command::new("mount").arg(&loopdev).arg(mnt.path()))?;
        let copied = sh(Command::new("cp").arg("-a").arg(format!("{}/.", staging.display())).arg(mnt.path()));
        sh(Command::new("umount").arg(mnt.path()))?;
        copied.map(drop)
    })();
    sh(Command::new("losetup").args(["-d", &loopdev]))?;
    result
}

/// Where the LV's data starts inside the PV partition (`pvcreate --dataalignment 1m`, the
/// first LV allocated from extent 0): lets tests read the root without device-mapper.
pub const LVM_DATA_OFFSET: u64 = MIB;
/// Size of the LVM fixture's root LV.
pub const LVM_ROOT_BYTES: u64 = 900 * MIB;

/// The host kernel has no device-mapper: the volume group is assembled inside a VM booted from
/// the helper image, with this /init appended to its initramfs.
const LVM_INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
while read -r m; do insmod "$m" 2>/dev/null; done < /lib/modules/imgforge.load
i=0; while [ ! -b /dev/vda1 ] || [ ! -b /dev/vdb ]; do i=$((i+1)); [ $i -gt 300 ] && break; sleep 0.1; done
lvm pvcreate -ff -y --dataalignment 1m /dev/vda1 && lvm vgcreate imgforge /dev/vda1   && lvm lvcreate -y -n root -L 900m imgforge && dd if=/dev/vdb of=/dev/imgforge/root bs=1M conv=fsync   && lvm vgchange -an imgforge && echo FIXTURE-OK
sync; poweroff -f
"#;

fn build_lvm_ext4(staging: &Path, img: &Path, work: &Path) -> Result<()> {
    std::fs::write(staging.join("etc/fstab"), "/dev/mapper/imgforge-root / ext4 errors=remount-ro 0 1\n")?;
    let fs = work.join("root.ext4");
    create_sparse(&fs, LVM_ROOT_BYTES)?;
    mkfs_ext4(staging, &fs, 0, LVM_ROOT_BYTES, ROOT_UUID, "root")?;
    create_sparse(img, 1024 * MIB)?;
    partition(img, "label: dos\nstart=2048, type=8e\n")?;

    let out = sh(Command::new(crate::run::binary()).args(["helper-image", "build"]))?;
    let path = |label: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .map(|p| PathBuf::from(p.trim()))
            .context("helper image paths")
    };
    let (kernel, initrd) = (path("kernel ")?, path("initrd ")?);
    let extra = work.join("init");
    std::fs::create_dir_all(&extra)?;
    std::fs::write(extra.join("init"), LVM_INIT)?;
    std::fs::set_permissions(extra.join("init"), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let combined = work.join("initrd.cpio");
    let mut bytes = std::fs::read(&initrd)?;
    bytes.extend(
        Command::new("sh").arg("-c").arg("echo init | cpio --quiet -o -H newc").current_dir(&extra).output()?.stdout,
    );
    std::fs::write(&combined, bytes)?;
    let log = work.join("console.log");
    sh(Command::new("timeout")
        .args([
            "300",
            "qemu-system-x86_64",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-machine",
            "pc",
            "-accel",
            "tcg",
            "-m",
            "512",
        ])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&combined)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", img.display()))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio,readonly=on", fs.display()))
        .arg("-serial")
        .arg(format!("file:{}", log.display())))?;
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    if !console.contains("FIXTURE-OK") {
        bail!("assembling the LVM fixture failed; console:\n{console}");
    }
    Ok(())
}

fn create_sparse(img: &Path, size: u64) -> Result<()> {
    let f = std::fs::File::create(img)?;
    f.set_len(size)?;
    Ok(())
}

fn partition(img: &Path, script: &str) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("sfdisk")
        .arg("-q")
        .arg(img)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    child.stdin.take().unwrap().write_all(script.as_bytes())?;
    if !child.wait()?.success() {
        bail!("sfdisk failed on {}", img.display());
    }
    Ok(())
}

fn mkfs_ext4(tree: &Path, img: &Path, offset: u64, size: u64, uuid: &str, label: &str) -> Result<()> {
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", label, "-U", uuid, "-E", &format!("offset={offset}"), "-d"])
        .arg(tree)
        .arg(img)
        .arg(format!("{}k", size / 1024)))?;
    Ok(())
}

/// A sparse copy of the fixture `shape` in `dir`, for a test to modify.
pub fn copy(shape: Shape, dir: &Path) -> Result<PathBuf> {
    let src = disk(shape)?;
    let dest = dir.join(shape.file_name());
    sh(Command::new("cp").arg("--sparse=always").arg(&src).arg(&dest))?;
    Ok(dest)
}

/// A 64 MiB raw image with every kind of content: random data, written zeros, holes.
/// Layout (MiB): 0–8 data, 8–16 written zeros, 16–48 hole, 48–56 data, 56–64 hole.
pub fn synthetic_raw(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::FileExt;
    let path = dir.join("synthetic.raw");
    let f = std::fs::File::create(&path)?;
    f.set_len(64 * MIB)?;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = |len: usize| -> Vec<u8> {
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    };
    f.write_all_at(&random(8 * MIB as usize), 0)?;
    f.write_all_at(&vec![0u8; 8 * MIB as usize], 8 * MIB)?;
    f.write_all_at(&random(8 * MIB as usize), 48 * MIB)?;
    f.sync_all()?;
    Ok(path)
}

/// An ext4 image of the fixture root (what a liveimg carries as `LiveOS/rootfs.img`).
pub fn rootfs_ext4() -> Result<PathBuf> {
    fs_image_of("rootfs.ext4", rootfs)
}

/// An ext4 image of the root tree `tree()`, cached as `name`.
pub fn fs_image_of(name: &str, tree: fn() -> Result<PathBuf>) -> Result<PathBuf> {
    let path = dir().join(name);
    if path.exists() {
        return Ok(path);
    }
    let root = tree()?;
    let _l = lock(name)?;
    if path.exists() {
        return Ok(path);
    }
    let work = tempfile::Builder::new().prefix("fixture-").tempdir_in(dir())?;
    let staging = work.path().join("root");
    sh(Command::new("cp").arg("-a").arg(&root).arg(&staging))?;
    std::fs::remove_file(staging.join(".complete"))?;
    std::fs::write(staging.join("etc/fstab"), "LABEL=rootfs / ext4 defaults 0 1\n")?;
    let img = work.path().join(name);
    create_sparse(&img, 896 * MIB)?;
    sh(Command::new("mkfs.ext4").args(["-q", "-F", "-L", "rootfs", "-d"]).arg(&staging).arg(&img))?;
    std::fs::rename(&img, &path)?;
    Ok(path)
}

/// A liveimg (squashfs holding `LiveOS/rootfs.img`) of `fs_image`, compressed with `comp`.
pub fn liveimg_of(fs_image: &Path, comp: &str, dir: &Path) -> Result<PathBuf> {
    let tree = dir.join(format!("liveimg-tree-{comp}"));
    std::fs::create_dir_all(tree.join("LiveOS"))?;
    sh(Command::new("cp").arg("--sparse=always").arg(fs_image).arg(tree.join("LiveOS/rootfs.img")))?;
    let out = dir.join(format!("live-{comp}.squashfs.img"));
    let _ = std::fs::remove_file(&out);
    sh(Command::new("mksquashfs").arg(&tree).arg(&out).args(["-comp", comp, "-noappend", "-quiet", "-no-progress"]))?;
    std::fs::remove_dir_all(&tree)?;
    Ok(out)
}

/// The cached liveimg of the fixture root, compressed with `comp` (`xz`, `zstd`).
pub fn liveimg(comp: &str) -> Result<PathBuf> {
    liveimg_cached(&format!("live-{comp}.squashfs.img"), comp, rootfs_ext4)
}

/// A cached liveimg named `name` of the filesystem image `fs()`.
pub fn liveimg_cached(name: &str, comp: &str, fs: fn() -> Result<PathBuf>) -> Result<PathBuf> {
    let path = dir().join(name);
    if path.exists() {
        return Ok(path);
    }
    let fs = fs()?;
    let _l = lock(name)?;
    if path.exists() {
        return Ok(path);
    }
    let work = tempfile::Builder::new().prefix("fixture-").tempdir_in(dir())?;
    let built = liveimg_of(&fs, comp, work.path())?;
    std::fs::rename(built, &path)?;
    Ok(path)
}
