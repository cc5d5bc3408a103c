//! The mounting tasks, done by the helper binary: `mount-payload` (05-MountPayload),
//! `mount-root` (10-MountRoot) and `unmount` (90-Unmount).
//!
//! `mount-root` finds the guest's root filesystem on a
//! partitioned disk, a bare filesystem or LVM, mounts it, then what its fstab lists (/boot, …),
//! then /dev, /proc and /sys for chroots. In Rust rather than shell because under TCG every
//! process costs tens of milliseconds: superblocks are read in-process (blkid only for what
//! they cannot tell, such as PARTUUID, and then once for every device), the mounts are
//! syscalls and the modules load in-process.

use crate::guest::GuestRoot;
use crate::kmod;
use crate::task_env::TaskEnv;
use imgforge_protocol::filesystems::{self, PROBE_BYTES};
use imgforge_protocol::helper_vm::{self, PAYLOAD_SERIAL};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What is known about one device: TYPE, UUID, LABEL from its superblock, or everything
/// `blkid -o export` says (PARTUUID, PARTLABEL, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Device node.
    pub dev: String,
    /// Tags by name.
    pub tags: HashMap<String, String>,
}

impl Probe {
    fn tag(&self, name: &str) -> Option<&str> {
        self.tags.get(name).map(String::as_str)
    }
}

/// Parses `blkid -o export` output: blocks of `KEY=value` lines separated by blank lines (pure).
pub fn parse_blkid_export(text: &str) -> Vec<Probe> {
    text.split("\n\n")
        .filter_map(|block| {
            let tags: HashMap<String, String> = block
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .collect();
            let dev = tags.get("DEVNAME")?.clone();
            Some(Probe { dev, tags })
        })
        .collect()
}

/// One line of the guest's fstab that imgforge may mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FstabEntry {
    /// Device spec (`UUID=…`, `/dev/…`).
    pub spec: String,
    /// Mount point in the guest.
    pub mount_point: String,
    /// Filesystem type.
    pub fstype: String,
    /// Mount options (only `nofail`/`noauto` matter here).
    pub options: String,
}

/// The filesystem types imgforge mounts from the guest's fstab.
const FSTAB_TYPES: [&str; 6] = ["ext2", "ext3", "ext4", "xfs", "vfat", "btrfs"];

impl FstabEntry {
    /// The btrfs subvolume the entry names (`subvol=` or `subvolid=`), as mount data; the
    /// only option passed on, checked to be one option (pure).
    pub fn btrfs_subvolume(&self) -> Option<String> {
        if self.fstype != "btrfs" {
            return None;
        }
        self.options.split(',').find_map(|o| {
            let (key, value) = o.split_once('=')?;
            let ok = match key {
                "subvol" => !value.is_empty() && !value.contains(['\0', '\\']) && !value.split('/').any(|c| c == ".."),
                "subvolid" => value.parse::<u64>().is_ok(),
                _ => false,
            };
            ok.then(|| format!("{key}={value}"))
        })
    }
}

/// The fstab entries to mount, shallow mount points first so that /boot comes before /boot/efi
/// (pure).
pub fn parse_fstab(text: &str) -> Vec<FstabEntry> {
    let mut entries: Vec<FstabEntry> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // `none`, `swap` and relative or `..` mount points are not mounted.
            let mount_point = normal_mount_point(f.get(1)?)?;
            (f.len() >= 3).then(|| FstabEntry {
                spec: f[0].to_owned(),
                mount_point,
                fstype: f[2].to_owned(),
                options: f.get(3).copied().unwrap_or("defaults").to_owned(),
            })
        })
        // The root is mounted already; also written `//` or `/.`, never over it again (the
        // guest root's descriptor would then name what is under the new mount).
        .filter(|e| e.mount_point != "/")
        .filter(|e| FSTAB_TYPES.contains(&e.fstype.as_str()))
        .collect();
    entries.sort_by_key(|e| e.mount_point.len());
    entries
}

/// An fstab mount point with its empty and `.` components dropped (`//boot/./efi/` is
/// `/boot/efi`); None for one not absolute or holding `..` (pure).
fn normal_mount_point(point: &str) -> Option<String> {
    let rest = point.strip_prefix('/')?;
    let parts: Vec<&str> = rest.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
    if parts.contains(&"..") {
        return None;
    }
    Some(format!("/{}", parts.join("/")))
}

/// The device an fstab spec names, among the probed devices (pure).
pub fn resolve_spec(spec: &str, probes: &[Probe]) -> Option<String> {
    let by = |tag: &str, value: &str| probes.iter().find(|p| p.tag(tag) == Some(value)).map(|p| p.dev.clone());
    for (prefix, tag) in
        [("UUID=", "UUID"), ("LABEL=", "LABEL"), ("PARTUUID=", "PARTUUID"), ("PARTLABEL=", "PARTLABEL")]
    {
        if let Some(v) = spec.strip_prefix(prefix) {
            return by(tag, v.trim_matches('"'));
        }
    }
    for (dir, tag) in
        [("/dev/disk/by-uuid/", "UUID"), ("/dev/disk/by-label/", "LABEL"), ("/dev/disk/by-partuuid/", "PARTUUID")]
    {
        if let Some(v) = spec.strip_prefix(dir) {
            return by(tag, v);
        }
    }
    // LVM names (/dev/mapper/vg-lv, /dev/vg/lv) exist in the helper once the groups are active.
    let lvm_name = spec.starts_with("/dev/mapper/")
        || spec.strip_prefix("/dev/").is_some_and(|rest| rest.split('/').count() == 2 && !rest.starts_with("disk/"));
    (lvm_name && is_block_device(Path::new(spec))).then(|| spec.to_owned())
}

/// The helper's device for a guest's device name (`/dev/sdb1`, `/dev/vdb1`, `/dev/hdb1`,
/// `/dev/xvdb1`, `/dev/nvme1n1p1`) as libguestfs remaps them: the guest's Nth disk is the Nth
/// disk attached, `disks[N]` (`/dev/vdb`), the partition number kept (pure).
pub fn remap_device(spec: &str, disks: &[String]) -> Option<String> {
    let name = spec.strip_prefix("/dev/")?;
    let (index, partition) = if let Some(rest) = name.strip_prefix("nvme") {
        let (disk, rest) = rest.split_once('n')?;
        let index: usize = disk.parse().ok()?;
        let (_namespace, partition) = rest.split_once('p').unwrap_or((rest, ""));
        (index, partition)
    } else {
        let rest = ["xvd", "sd", "hd", "vd"].iter().find_map(|p| name.strip_prefix(p))?;
        let letters = rest.bytes().take_while(u8::is_ascii_lowercase).count();
        let (letters, partition) = rest.split_at(letters);
        // sda..sdz, then sdaa..: base 26 with no zero digit.
        let index = letters.bytes().try_fold(0usize, |n, b| n.checked_mul(26)?.checked_add((b - b'a') as usize + 1))?;
        (index.checked_sub(1)?, partition)
    };
    if !partition.bytes().all(|b| b.is_ascii_digit()) || partition.starts_with('0') {
        return None;
    }
    disks.get(index).map(|disk| format!("{disk}{partition}"))
}

/// Root candidates: the root-partition rule alone if given; else the partitions largest first
/// (the root is rarely the small /boot or ESP, and every wrong guess costs a mount), or the
/// whole disk if it has none; then the LVM volumes (pure).
pub fn candidates(rule: Option<&str>, disk: &str, partitions: &[(String, u64)], volumes: &[String]) -> Vec<String> {
    if let Some(dev) = rule.filter(|r| !r.is_empty()) {
        return vec![dev.to_owned()];
    }
    let mut parts = partitions.to_vec();
    parts.sort_by_key(|p| std::cmp::Reverse(p.1));
    let mut out: Vec<String> =
        if parts.is_empty() { vec![disk.to_owned()] } else { parts.into_iter().map(|p| p.0).collect() };
    out.extend(volumes.iter().cloned());
    out
}

/// The module a filesystem type needs, if it is one imgforge mounts.
fn module_for(fstype: &str) -> Option<&'static str> {
    match fstype {
        "ext2" | "ext3" | "ext4" => Some("ext4"),
        "xfs" => Some("xfs"),
        "btrfs" => Some("btrfs"),
        "vfat" => Some("vfat"),
        _ => None,
    }
}

/// How the task was called (from the variables the task runner sets).
struct Env {
    target: PathBuf,
    disk: String,
    /// The guest's other disks, in the host's order (`/dev/vdb` for the second `-a`).
    other_disks: Vec<String>,
    state: PathBuf,
    root_rule: Option<String>,
    read_only: bool,
    /// Warm the guest's shell once the root is mounted: the run starts guest programs.
    prefetch: bool,
}

/// The 10-MountRoot task.
pub fn mount_root(vars: &TaskEnv) -> Result<(), String> {
    let extra: usize = vars
        .get("IMGFORGE_EXTRA_DISKS")
        .filter(|n| !n.is_empty())
        .map_or(Ok(0), str::parse)
        .map_err(|e| format!("IMGFORGE_EXTRA_DISKS is not a number: {e}"))?;
    let env = Env {
        target: PathBuf::from(vars.require("IMGFORGE_TARGET")?),
        disk: vars.require("IMGFORGE_DISK")?.to_owned(),
        other_disks: other_disks(extra)?,
        state: PathBuf::from(vars.require("IMGFORGE_STATE")?),
        root_rule: vars.get("IMGFORGE_ROOT_PARTITION").map(str::to_owned),
        // verify looks, never writes: read-only, and no journal replay.
        read_only: vars.get("IMGFORGE_MODE") == Some("verify"),
        prefetch: vars.get("IMGFORGE_GUEST_PROGRAMS") == Some("yes"),
    };
    run(&env)
}

/// How long the guest's other disks may take to appear after the first.
const OTHER_DISKS_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// The guest's other `count` disks, in the host's order, found by their serials (the virtio
/// disks' names follow the PCI order, which nothing promises to be the host's).
fn other_disks(count: usize) -> Result<Vec<String>, String> {
    let started = std::time::Instant::now();
    loop {
        let mut found: Vec<Option<String>> = vec![None; count];
        for (name, serial) in virtio_disks() {
            if let Some(slot) =
                helper_vm::disk_index(&serial).and_then(|i| i.checked_sub(1)).and_then(|i| found.get_mut(i))
            {
                *slot = Some(format!("/dev/{name}"));
            }
        }
        let ready = found.iter().all(|d| d.as_deref().is_some_and(|d| Path::new(d).exists()));
        if ready {
            return Ok(found.into_iter().flatten().collect());
        }
        if started.elapsed() > OTHER_DISKS_WAIT {
            let missing: Vec<String> =
                (1..=count).filter(|i| found[i - 1].is_none()).map(helper_vm::disk_serial).collect();
            return Err(format!(
                "the guest's other disks did not all appear within {} s (missing: {})",
                OTHER_DISKS_WAIT.as_secs(),
                missing.join(", ")
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The helper's device of the guest's disk at `index` in the host's order (0: the target
/// disk), waited for as [`other_disks`] waits.
pub fn guest_disk(index: usize) -> Result<String, String> {
    if index == 0 {
        return Ok(helper_vm::TARGET_DISK.to_owned());
    }
    other_disks(index).map(|mut disks| disks.swap_remove(index - 1))
}

/// The virtio disks (`vda`, …) with their serial numbers, sorted by name.
pub(crate) fn virtio_disks() -> Vec<(String, String)> {
    let Ok(dir) = std::fs::read_dir("/sys/block") else { return Vec::new() };
    let mut disks: Vec<(String, String)> = dir
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vd"))
        .map(|name| {
            let serial = std::fs::read_to_string(format!("/sys/block/{name}/serial")).unwrap_or_default();
            (name, serial.trim().to_owned())
        })
        .collect();
    disks.sort();
    disks
}

/// The 05-MountPayload task: mounts the read-only payload disk (uploaded files, scripts, RPMs)
/// when there is one, found by its serial number.
pub fn mount_payload(vars: &TaskEnv) -> Result<(), String> {
    let dir = Path::new(vars.require("IMGFORGE_PAYLOAD")?);
    for (name, serial) in virtio_disks() {
        if serial != PAYLOAD_SERIAL {
            continue;
        }
        let dev = format!("/dev/{name}");
        load_modules(&["squashfs"]);
        let flags = libc::MS_RDONLY | libc::MS_NODEV | libc::MS_NOSUID;
        mount_flags(&dev, dir, "squashfs", flags)
            .map_err(|e| format!("cannot mount the payload disk {dev} (squashfs): {e}"))?;
        println!("payload disk {dev} mounted on {}", dir.display());
        return Ok(());
    }
    println!("no payload disk");
    Ok(())
}

/// The 90-Unmount task: unmounts what mount-root mounted, in reverse order, deactivates LVM
/// and syncs.
pub fn unmount_all(vars: &TaskEnv) -> Result<(), String> {
    let state = Path::new(vars.require("IMGFORGE_STATE")?);
    crate::prefetch::wait();
    let mounts = state.join("mounts");
    if let Ok(text) = std::fs::read_to_string(&mounts) {
        for where_ in text.lines().rev().filter(|l| !l.is_empty()) {
            unmount(Path::new(where_))
                .map_err(|e| format!("cannot unmount {where_} (a process left running in the guest?): {e}"))?;
        }
        let _ = std::fs::remove_file(&mounts);
    }
    if state.join("lvm-active").exists() {
        let ok = Command::new("lvm").args(["vgchange", "-an"]).stdout(std::process::Stdio::null()).status();
        if !ok.is_ok_and(|s| s.success()) {
            return Err("cannot deactivate the guest's LVM volume groups".into());
        }
    }
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    Ok(())
}

/// Finds the guest's root filesystem as 10-MountRoot does, before it runs: each candidate is
/// mounted read-only on `scratch` and unmounted again. Its device and type. LVM is activated
/// (and recorded in `state`) when the disk holds a physical volume, as 10-MountRoot would.
pub fn probe_root(
    disk: &str,
    state: &Path,
    root_rule: Option<&str>,
    scratch: &Path,
) -> Result<(String, String), String> {
    let env = Env {
        target: scratch.to_owned(),
        disk: disk.to_owned(),
        // Growing concerns the first disk: the root is looked for there only.
        other_disks: Vec::new(),
        state: state.to_owned(),
        root_rule: root_rule.map(str::to_owned),
        read_only: true,
        prefetch: false,
    };
    std::fs::create_dir_all(scratch).map_err(|e| format!("cannot create {}: {e}", scratch.display()))?;
    let devices = Devices::find(&env)?;
    let found = mount_guest_root(&env, &devices)?;
    unmount(scratch).map_err(|e| format!("cannot unmount {} from {}: {e}", found.0, scratch.display()))?;
    Ok(found)
}

/// What a device's superblock says (filesystem, LVM or swap), if it says anything.
pub fn superblock(dev: &str) -> Option<filesystems::Filesystem> {
    filesystems::detect(&head(dev, FIRST_PROBE_BYTES)).or_else(|| filesystems::detect(&head(dev, PROBE_BYTES as u64)))
}

fn run(env: &Env) -> Result<(), String> {
    let mounts = env.state.join("mounts");
    std::fs::write(&mounts, "").map_err(|e| format!("cannot write {}: {e}", mounts.display()))?;
    let mut disk = Devices::find(env)?;
    let (root, fstype) = mount_guest_root(env, &disk)?;
    record_mount(&mounts, &env.target)?;
    println!("guest root: {root} ({fstype})");
    std::fs::write(env.state.join("root-device"), format!("{root}\n"))
        .map_err(|e| format!("cannot record the root device: {e}"))?;

    let guest = GuestRoot::open(&env.target)
        .map_err(|e| format!("cannot open the guest root {}: {e}", env.target.display()))?;
    if env.prefetch {
        crate::prefetch::start(env.target.clone());
    }
    if let Ok(fstab) = guest.read_to_string("/etc/fstab") {
        mount_fstab(env, &guest, &fstab, &root, &mut disk, &mounts)?;
    }
    crate::confinement::mount_chroot_filesystems(&guest, &mut |where_| record_mount(&mounts, where_))
}

/// The block devices of the guest's disks and what their superblocks say.
struct Devices {
    /// The guest's disks, in the host's order (the target disk first).
    disks: Vec<String>,
    /// Each disk's partitions with their sizes in sectors.
    partitions: Vec<Vec<(String, u64)>>,
    /// LVM logical volumes, once activated.
    volumes: Vec<String>,
    /// Every device probed: the partitions (or the whole disk), then the volumes.
    devices: Vec<String>,
    /// Their superblocks.
    probes: Vec<Probe>,
    /// Whether blkid's slower, fuller probe already ran.
    blkid_done: bool,
}

impl Devices {
    /// Probes the disk's partitions (the disk when it has none; never the floppy: probing a
    /// floppy costs seconds), activating LVM only where a partition is a physical volume (lvm
    /// is slow to start).
    fn find(env: &Env) -> Result<Self, String> {
        let disks: Vec<String> = std::iter::once(env.disk.clone()).chain(env.other_disks.iter().cloned()).collect();
        let partitions: Vec<Vec<(String, u64)>> = disks
            .iter()
            .map(|disk| {
                let name = Path::new(disk).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                partitions(&name)
            })
            .collect();
        let mut devices: Vec<String> =
            disks
                .iter()
                .zip(&partitions)
                .flat_map(|(disk, parts)| {
                    if parts.is_empty() {
                        vec![disk.clone()]
                    } else {
                        parts.iter().map(|p| p.0.clone()).collect()
                    }
                })
                .collect();
        let mut probes = superblocks(&devices);
        let mut volumes = Vec::new();
        // Activated once a run: FixPartitionTable may have done it already.
        let active = env.state.join("lvm-active");
        if probes.iter().any(|p| p.tag("TYPE") == Some("LVM2_member")) && !active.exists() {
            load_modules(&["dm_mod"]);
            let ok =
                Command::new("lvm").args(["vgchange", "-ay", "--sysinit"]).stdout(std::process::Stdio::null()).status();
            if !ok.is_ok_and(|s| s.success()) {
                println!("WARNING: could not activate every LVM volume group");
            }
            std::fs::write(&active, "").map_err(|e| format!("cannot record LVM activation: {e}"))?;
        }
        if active.exists() {
            volumes = mapper_volumes();
            devices.extend(volumes.iter().cloned());
            probes = superblocks(&devices);
        }
        Ok(Self { disks, partitions, volumes, devices, probes, blkid_done: false })
    }

    fn fstype(&self, dev: &str) -> Option<String> {
        self.probes.iter().find(|p| p.dev == dev).and_then(|p| p.tag("TYPE")).map(str::to_owned)
    }

    /// The device an fstab `spec` names: from the superblocks read so far, then once from
    /// blkid (PARTUUID, PARTLABEL: what only the partition table knows), then as a guest's
    /// device name remapped onto the helper's disks ([`remap_device`]).
    fn resolve(&mut self, spec: &str) -> Option<String> {
        let found = resolve_spec(spec, &self.probes);
        if found.is_some() {
            return found;
        }
        if !self.blkid_done {
            self.probes = blkid(&self.devices);
            self.blkid_done = true;
            if let Some(found) = resolve_spec(spec, &self.probes) {
                return Some(found);
            }
        }
        remap_device(spec, &self.disks).filter(|dev| self.devices.contains(dev))
    }

    /// Root candidates on every disk, the target disk's first, then the LVM volumes.
    fn root_candidates(&self, rule: Option<&str>) -> Vec<String> {
        if let Some(dev) = rule.filter(|r| !r.is_empty()) {
            return vec![dev.to_owned()];
        }
        let mut out: Vec<String> = self
            .disks
            .iter()
            .zip(&self.partitions)
            .flat_map(|(disk, parts)| candidates(None, disk, parts, &[]))
            .collect();
        out.extend(self.volumes.iter().cloned());
        out
    }
}

/// Filesystem types a guest root may have. A btrfs root is its default subvolume or, where
/// that holds no root, one of the subvolumes at its top (Fedora's `root`, Ubuntu's `@`).
const ROOT_TYPES: [&str; 5] = ["ext2", "ext3", "ext4", "xfs", "btrfs"];
/// Subvolumes at the top of a btrfs filesystem tried as the root, at most.
const MAX_ROOT_SUBVOLUMES: usize = 32;
/// The inode number of every btrfs subvolume's top directory.
const BTRFS_SUBVOLUME_INO: u64 = 256;

/// Mounts the first candidate holding a root filesystem on the target: its device and type.
fn mount_guest_root(env: &Env, disk: &Devices) -> Result<(String, String), String> {
    for dev in disk.root_candidates(env.root_rule.as_deref()) {
        if !is_block_device(Path::new(&dev)) {
            continue;
        }
        let Some(fstype) = disk.fstype(&dev).filter(|t| ROOT_TYPES.contains(&t.as_str())) else {
            continue;
        };
        load_modules(&[module_for(&fstype).unwrap_or_default()]);
        if mount_guest_fs(&dev, &env.target, &fstype, env.read_only).is_ok() {
            if looks_like_root(&env.target) {
                return Ok((dev, fstype));
            }
            let _ = unmount(&env.target);
            // `subvol=NAME` is looked up from the top level, which the default subvolume may
            // not be: listed there.
            let top = "subvolid=5";
            let subvolumes =
                if fstype == "btrfs" && mount_guest_fs_with(&dev, &env.target, &fstype, true, Some(top)).is_ok() {
                    let names = top_subvolumes(&env.target);
                    let _ = unmount(&env.target);
                    names
                } else {
                    Vec::new()
                };
            for name in subvolumes {
                let data = format!("subvol={name}");
                if mount_guest_fs_with(&dev, &env.target, &fstype, env.read_only, Some(&data)).is_ok() {
                    if looks_like_root(&env.target) {
                        println!("the guest root is the btrfs subvolume {name:?} of {dev}");
                        return Ok((dev, fstype));
                    }
                    let _ = unmount(&env.target);
                }
            }
        }
    }
    Err(format!(
        "no root filesystem found on {} (looked for ext2/3/4, xfs or btrfs, its default subvolume or one at its top, holding /etc and /bin/sh{})",
        disk.disks.join(", "),
        env.root_rule.as_deref().map(|r| format!(" on {r}")).unwrap_or_default()
    ))
}

/// Mounts what the guest's fstab lists (`/boot` & co.) under the guest root.
fn mount_fstab(
    env: &Env,
    guest: &GuestRoot,
    fstab: &str,
    root: &str,
    disk: &mut Devices,
    mounts: &Path,
) -> Result<(), String> {
    for entry in parse_fstab(fstab) {
        load_modules(&[module_for(&entry.fstype).unwrap_or_default()]);
        let Some(dev) = disk.resolve(&entry.spec) else {
            if entry.options.split(',').any(|o| o == "nofail" || o == "noauto") {
                continue;
            }
            return Err(format!(
                "fstab lists {} on {}, but no such device is on the guest's disks",
                entry.spec, entry.mount_point
            ));
        };
        let subvolume = entry.btrfs_subvolume();
        // The root's device again: only another btrfs subvolume of it (Fedora's /home).
        if dev == root && subvolume.is_none() {
            continue;
        }
        let where_ = guest
            .resolve(&entry.mount_point)
            .map_err(|_| format!("fstab mount point {} does not exist in the guest", entry.mount_point))?;
        // A mount point that is the guest root itself (through a symlink to `/`): mounted over,
        // the root's descriptor would check later mount points under the new mount.
        if guest.resolve("/").is_ok_and(|root| root == where_) {
            return Err(format!("fstab mount point {} is the guest root itself", entry.mount_point));
        }
        mount_guest_fs_with(&dev, &where_, &entry.fstype, env.read_only, subvolume.as_deref()).map_err(|e| {
            format!("cannot mount {dev} ({}) on {} from the guest's fstab: {e}", entry.fstype, entry.mount_point)
        })?;
        record_mount(mounts, &where_)?;
        println!("mounted {dev} on {}", entry.mount_point);
    }
    Ok(())
}

/// The disk's partitions (`/dev/vdaN`) with their sizes in sectors, from sysfs.
fn partitions(disk_name: &str) -> Vec<(String, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/sys/block/{disk_name}")) else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with(disk_name) || name == disk_name {
                return None;
            }
            let size = std::fs::read_to_string(e.path().join("size")).ok()?.trim().parse().ok()?;
            Some((format!("/dev/{name}"), size))
        })
        .collect()
}

/// Active LVM volumes (`/dev/mapper/*` but the control node).
fn mapper_volumes() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/dev/mapper") else { return Vec::new() };
    let mut out: Vec<String> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n != "control") && is_block_device(p))
        .map(|p| p.display().to_string())
        .collect();
    out.sort();
    out
}

/// What a first read of a device covers: the superblocks of ext2/3/4, XFS, vfat and LVM.
const FIRST_PROBE_BYTES: u64 = 4096;

/// TYPE, UUID and LABEL of each device from its first bytes (4 KiB, all `PROBE_BYTES` only
/// when those tell nothing: under TCG every byte read costs).
fn superblocks(devices: &[String]) -> Vec<Probe> {
    devices
        .iter()
        .map(|dev| {
            let detected = superblock(dev);
            let mut tags = HashMap::new();
            if let Some(fs) = detected {
                tags.insert("TYPE".to_owned(), fs.kind.to_owned());
                tags.extend(fs.uuid.map(|u| ("UUID".to_owned(), u)));
                tags.extend(fs.label.map(|l| ("LABEL".to_owned(), l)));
            }
            Probe { dev: dev.clone(), tags }
        })
        .collect()
}

/// The first `len` bytes of `dev` (fewer if it is shorter or unreadable).
pub fn head(dev: &str, len: u64) -> Vec<u8> {
    let mut head = Vec::with_capacity(len as usize);
    let _ = std::fs::File::open(dev).and_then(|f| f.take(len).read_to_end(&mut head));
    head
}

/// One blkid call for every device (each process costs under TCG).
fn blkid(devices: &[String]) -> Vec<Probe> {
    // blkid exits 2 when some device has no filesystem: the output is still right.
    match Command::new("blkid").args(["-o", "export"]).args(devices).output() {
        Ok(out) => parse_blkid_export(&String::from_utf8_lossy(&out.stdout)),
        Err(e) => {
            println!("WARNING: cannot run blkid: {e}");
            Vec::new()
        }
    }
}

fn load_modules(names: &[&str]) {
    let names: Vec<String> = names.iter().filter(|n| !n.is_empty()).map(|n| (*n).to_owned()).collect();
    for failure in kmod::load_modules(&names) {
        println!("WARNING: {failure}");
    }
}

fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// The subvolumes at the top of the btrfs filesystem mounted at `at` (directories there whose
/// inode is a subvolume's top), Fedora's `root` and Ubuntu's `@` first, then by name; at most
/// [`MAX_ROOT_SUBVOLUMES`].
fn top_subvolumes(at: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let Ok(dir) = std::fs::read_dir(at) else { return Vec::new() };
    let mut names: Vec<String> = dir
        .flatten()
        .take(4096)
        .filter(|e| e.metadata().is_ok_and(|m| m.is_dir() && m.ino() == BTRFS_SUBVOLUME_INO))
        .filter_map(|e| e.file_name().into_string().ok())
        // Passed as mount data, and printed: one option, one line.
        .filter(|n| !n.contains(',') && !n.chars().any(char::is_control))
        .collect();
    names.sort_by_key(|n| (!matches!(n.as_str(), "root" | "@"), n != "root", n.clone()));
    names.truncate(MAX_ROOT_SUBVOLUMES);
    names
}

fn looks_like_root(target: &Path) -> bool {
    let etc = std::fs::symlink_metadata(target.join("etc"));
    etc.is_ok_and(|m| m.is_dir()) && std::fs::symlink_metadata(target.join("bin/sh")).is_ok()
}

fn record_mount(mounts: &Path, where_: &Path) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .append(true)
        .open(mounts)
        .and_then(|mut f| writeln!(f, "{}", where_.display()))
        .map_err(|e| format!("cannot record a mount in {}: {e}", mounts.display()))
}

/// mount(2) of `source` on `target` as `fstype`, read-only if asked.
pub fn mount(source: &str, target: &Path, fstype: &str, read_only: bool) -> std::io::Result<()> {
    mount_flags(source, target, fstype, if read_only { libc::MS_RDONLY } else { 0 })
}

/// Mounts one of the guest's filesystems: `nodev`, so that a device node the image carries
/// (the report port's, the floppy's) opens nothing for the guest's programs or for the helper.
fn mount_guest_fs(source: &str, target: &Path, fstype: &str, read_only: bool) -> std::io::Result<()> {
    mount_guest_fs_with(source, target, fstype, read_only, None)
}

/// [`mount_guest_fs`] with mount data (a btrfs subvolume).
fn mount_guest_fs_with(
    source: &str,
    target: &Path,
    fstype: &str,
    read_only: bool,
    data: Option<&str>,
) -> std::io::Result<()> {
    let flags = libc::MS_NODEV | if read_only { libc::MS_RDONLY } else { 0 };
    crate::confinement::mount_flags(source, target, fstype, flags, data)
}

/// mount(2) with `flags` and no data string.
fn mount_flags(source: &str, target: &Path, fstype: &str, flags: libc::c_ulong) -> std::io::Result<()> {
    crate::confinement::mount_flags(source, target, fstype, flags, None)
}

fn unmount(target: &Path) -> std::io::Result<()> {
    let target = crate::confinement::path_cstring(target);
    // SAFETY: a NUL-terminated path that outlives the call.
    crate::copy::cvt(unsafe { libc::umount(target.as_ptr()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLKID: &str =
        "DEVNAME=/dev/vda1\nUUID=1111-2222\nBLOCK_SIZE=512\nTYPE=vfat\nPARTLABEL=EFI\nPARTUUID=aaaa\n\n\
DEVNAME=/dev/vda2\nUUID=8c1a\nTYPE=ext4\nPARTUUID=bbbb\n\nDEVNAME=/dev/vda3\nLABEL=root fs\nTYPE=xfs\n";

    #[test]
    fn blkid_export_and_fstab_specs() {
        let probes = parse_blkid_export(BLKID);
        assert_eq!(probes.len(), 3);
        assert_eq!(probes[2].tag("LABEL"), Some("root fs"));
        let cases = [
            ("UUID=1111-2222", Some("/dev/vda1")),
            ("UUID=\"8c1a\"", Some("/dev/vda2")),
            ("PARTUUID=bbbb", Some("/dev/vda2")),
            ("PARTLABEL=EFI", Some("/dev/vda1")),
            ("/dev/disk/by-uuid/8c1a", Some("/dev/vda2")),
            ("/dev/disk/by-partuuid/aaaa", Some("/dev/vda1")),
            ("UUID=none", None),
            ("/dev/sda1", None),
            ("/dev/mapper/vg-nonexistent", None),
        ];
        for (spec, want) in cases {
            assert_eq!(resolve_spec(spec, &probes).as_deref(), want, "{spec}");
        }
    }

    /// Guest device names as libguestfs remaps them: the Nth disk of the guest is the Nth
    /// attached.
    #[test]
    fn guest_device_names_remapped() {
        let disks = ["/dev/vda".to_owned(), "/dev/vdc".to_owned()];
        let cases = [
            ("/dev/sda1", Some("/dev/vda1")),
            ("/dev/vda", Some("/dev/vda")),
            ("/dev/sdb", Some("/dev/vdc")),
            ("/dev/sdb2", Some("/dev/vdc2")),
            ("/dev/hdb15", Some("/dev/vdc15")),
            ("/dev/vdb1", Some("/dev/vdc1")),
            ("/dev/xvdb3", Some("/dev/vdc3")),
            ("/dev/nvme0n1p2", Some("/dev/vda2")),
            ("/dev/nvme1n1", Some("/dev/vdc")),
            ("/dev/sdc1", None),
            ("/dev/sdaa1", None),
            ("/dev/sda01", None),
            ("/dev/sda1x", None),
            ("/dev/mapper/vg-root", None),
            ("/dev/disk/by-uuid/x", None),
            ("UUID=x", None),
            ("/dev/sd", None),
            ("/dev/nvmexn1", None),
        ];
        for (spec, want) in cases {
            assert_eq!(remap_device(spec, &disks).as_deref(), want, "{spec}");
        }
    }

    #[test]
    fn fstab_entries_shallow_first() {
        let text = "# c\nUUID=a / ext4 defaults 0 1\nUUID=c /boot/efi vfat umask=077 0 1\nUUID=b /boot ext4 defaults 0 2\n\
UUID=d none swap sw 0 0\nproc /proc proc defaults 0 0\nUUID=e /srv btrfs defaults 0 0\nUUID=f /data xfs nofail\nshort line\n";
        let got: Vec<(String, String)> = parse_fstab(text).into_iter().map(|e| (e.mount_point, e.options)).collect();
        let want = [("/srv", "defaults"), ("/boot", "defaults"), ("/data", "nofail"), ("/boot/efi", "umask=077")];
        assert_eq!(got, want.map(|(a, b)| (a.to_owned(), b.to_owned())));
    }

    /// Mount points are taken normalised; `//`, `/.` (the root again), relative ones and
    /// ones with `..` are not mounted.
    #[test]
    fn fstab_mount_points_normalised() {
        let text = "UUID=a // ext4 defaults\nUUID=b /. ext4 defaults\nUUID=c //boot/./efi/ vfat defaults\n\
UUID=d /srv/../etc ext4 defaults\nUUID=e boot ext4 defaults\nUUID=f /home//user ext4 defaults\n";
        let got: Vec<String> = parse_fstab(text).into_iter().map(|e| e.mount_point).collect();
        assert_eq!(got, ["/boot/efi", "/home/user"]);
        assert_eq!(normal_mount_point("/"), Some("/".into()));
        assert_eq!(normal_mount_point("none"), None);
    }

    /// Only a btrfs entry names a subvolume, by one `subvol=` (no `..`, no escapes) or a
    /// numeric `subvolid=` option; nothing else of its options is passed on.
    #[test]
    fn btrfs_subvolumes_of_fstab_entries() {
        let entry = |fstype: &str, options: &str| FstabEntry {
            spec: "UUID=a".into(),
            mount_point: "/home".into(),
            fstype: fstype.into(),
            options: options.into(),
        };
        let cases = [
            ("btrfs", "subvol=home,compress=zstd:1", Some("subvol=home")),
            ("btrfs", "compress=zstd:1,subvolid=257", Some("subvolid=257")),
            ("btrfs", "subvol=/@/home", Some("subvol=/@/home")),
            ("btrfs", "defaults", None),
            ("btrfs", "subvol=", None),
            ("btrfs", "subvol=../../x", None),
            ("btrfs", "subvol=a\\054b", None),
            ("btrfs", "subvolid=x", None),
            ("ext4", "subvol=home", None),
        ];
        for (fstype, options, want) in cases {
            assert_eq!(entry(fstype, options).btrfs_subvolume().as_deref(), want, "{fstype} {options}");
        }
    }

    /// A btrfs filesystem's subvolumes at its top, Fedora's and Ubuntu's root names first;
    /// plain directories are not subvolumes.
    #[test]
    fn top_subvolumes_root_names_first() {
        let Some(fs) = crate::change_watch::tests::LoopFs::mount("btrfs") else { return };
        for name in ["home", "root", "@", "var"] {
            let made = std::process::Command::new("btrfs")
                .args(["-q", "subvolume", "create"])
                .arg(fs.path().join(name))
                .output();
            assert!(made.unwrap().status.success(), "btrfs subvolume create {name}");
        }
        std::fs::create_dir(fs.path().join("plain")).unwrap();
        assert_eq!(top_subvolumes(fs.path()), ["root", "@", "home", "var"]);
    }

    #[test]
    fn root_candidates() {
        let parts =
            vec![("/dev/vda1".to_owned(), 2048), ("/dev/vda2".to_owned(), 900_000), ("/dev/vda3".to_owned(), 4096)];
        let lv = vec!["/dev/mapper/vg-root".to_owned()];
        assert_eq!(
            candidates(None, "/dev/vda", &parts, &lv),
            ["/dev/vda2", "/dev/vda3", "/dev/vda1", "/dev/mapper/vg-root"]
        );
        assert_eq!(candidates(None, "/dev/vda", &[], &[]), ["/dev/vda"]);
        assert_eq!(candidates(Some("/dev/vda3"), "/dev/vda", &parts, &lv), ["/dev/vda3"]);
        assert_eq!(candidates(Some(""), "/dev/vda", &[], &[]), ["/dev/vda"]);
    }

    /// Whether `path` is a mount point (its own line in /proc/self/mountinfo).
    fn mount_count(path: &Path) -> usize {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let want = path.to_str().unwrap();
        text.lines().filter(|l| l.split(' ').nth(4) == Some(want)).count()
    }

    /// The device mounted at `path`.
    fn source_of(path: &Path) -> String {
        let out = Command::new("findmnt").args(["-n", "-o", "SOURCE", "--target"]).arg(path).output().unwrap();
        String::from_utf8(out.stdout).unwrap().lines().last().unwrap().trim().to_owned()
    }

    /// A btrfs guest whose root is its top level, with a subvolume `evil` holding `x`, a
    /// symlink to a directory outside the guest (`outside`), and a plain directory `/x`; the
    /// loop device and its UUID, the guest root canonical.
    fn guest_with_evil_subvolume(fs: &crate::change_watch::tests::LoopFs, outside: &Path) -> (PathBuf, String, String) {
        let target = std::fs::canonicalize(fs.path()).unwrap();
        let dev = source_of(&target);
        let made = Command::new("btrfs").args(["-q", "subvolume", "create"]).arg(target.join("evil")).output().unwrap();
        assert!(made.status.success(), "btrfs subvolume create evil");
        std::os::unix::fs::symlink(outside, target.join("evil/x")).unwrap();
        std::fs::create_dir_all(target.join("evil/etc")).unwrap();
        std::fs::create_dir_all(target.join("x")).unwrap();
        std::fs::create_dir_all(target.join("etc")).unwrap();
        let out = Command::new("blkid").args(["-s", "UUID", "-o", "value"]).arg(&dev).output().unwrap();
        let uuid = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        assert!(!uuid.is_empty(), "no UUID for {dev}");
        (target, dev, uuid)
    }

    /// Unmounts whatever a test left on `outside` and on `target` above the loop mount.
    fn undo_mounts(outside: &Path, target: &Path) {
        let detach = |p: &Path| {
            let c = crate::confinement::path_cstring(p);
            // SAFETY: a NUL-terminated path that outlives the call.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        };
        while mount_count(outside) > 0 {
            detach(outside);
        }
        let inside = target.join("x");
        while mount_count(&inside) > 0 {
            let before = mount_count(&inside);
            detach(&inside);
            if mount_count(&inside) == before {
                break;
            }
        }
        while mount_count(target) > 1 {
            let before = mount_count(target);
            detach(target);
            if mount_count(target) == before {
                break;
            }
        }
    }

    /// Runs [`mount_fstab`] of `fstab` on the guest at `target`, its root the device `dev`.
    fn run_fstab(target: &Path, dev: &str, uuid: &str, fstab: &str) -> Result<(), String> {
        run_fstab_with(target, dev, uuid, fstab, &[])
    }

    /// [`run_fstab`] with other devices (device, type, UUID) beside the root's.
    fn run_fstab_with(
        target: &Path,
        dev: &str,
        uuid: &str,
        fstab: &str,
        others: &[(&str, &str, &str)],
    ) -> Result<(), String> {
        let state = tempfile::tempdir().unwrap();
        let mounts = state.path().join("mounts");
        std::fs::write(&mounts, "").unwrap();
        let env = Env {
            target: target.to_owned(),
            disk: dev.to_owned(),
            other_disks: Vec::new(),
            state: state.path().to_owned(),
            root_rule: None,
            read_only: false,
            prefetch: false,
        };
        let tags: HashMap<String, String> =
            [("TYPE".to_owned(), "btrfs".to_owned()), ("UUID".to_owned(), uuid.to_owned())].into_iter().collect();
        let mut probes = vec![Probe { dev: dev.to_owned(), tags }];
        for (other, kind, id) in others {
            let tags = [("TYPE".to_owned(), (*kind).to_owned()), ("UUID".to_owned(), (*id).to_owned())];
            probes.push(Probe { dev: (*other).to_owned(), tags: tags.into_iter().collect() });
        }
        let mut disk = Devices {
            disks: vec![dev.to_owned()],
            partitions: vec![Vec::new()],
            volumes: Vec::new(),
            devices: probes.iter().map(|p| p.dev.clone()).collect(),
            probes,
            blkid_done: true,
        };
        let guest = GuestRoot::open(target).unwrap();
        mount_fstab(&env, &guest, fstab, dev, &mut disk, &mounts)
    }

    /// An fstab entry written `//` naming another subvolume of the root's own btrfs device is
    /// the root again, not mounted over it (the kernel would refuse it with EBUSY anyway); a
    /// later entry lands inside the guest.
    #[test]
    fn fstab_cannot_mount_a_subvolume_of_the_root_over_the_root() {
        let Some(fs) = crate::change_watch::tests::LoopFs::mount("btrfs") else { return };
        let outside = tempfile::Builder::new().prefix("outside-the-guest").tempdir().unwrap();
        let outside = std::fs::canonicalize(outside.path()).unwrap();
        let (target, dev, uuid) = guest_with_evil_subvolume(&fs, &outside);
        let fstab = format!("UUID={uuid} // btrfs subvol=evil 0 0\nUUID={uuid} /x btrfs subvol=evil 0 0\n");
        let result = run_fstab(&target, &dev, &uuid, &fstab);
        let (escaped, over_root) = (mount_count(&outside), mount_count(&target));
        undo_mounts(&outside, &target);
        assert_eq!(escaped, 0, "the guest's fstab mounted one of its filesystems outside the guest ({result:?})");
        assert_eq!(over_root, 1, "the guest's fstab mounted over the guest root ({result:?})");
        assert!(result.is_ok(), "`//` is the root, not mounted again; /x inside the guest: {result:?}");
    }

    /// An fstab mount point that is the guest root itself (`//`) is not mounted: over the root,
    /// the guest's other filesystem would leave the GuestRoot descriptor on the old root, so a
    /// later entry's mount point would be checked there (`/x`, a plain directory) while mount(2)
    /// looked the string `<target>/x` up again through the new top mount, whose `x` is a
    /// symlink out of the guest: the guest's filesystem would land on a helper directory.
    #[test]
    fn fstab_cannot_mount_over_the_guest_root_to_escape_it() {
        let Some(fs) = crate::change_watch::tests::LoopFs::mount("btrfs") else { return };
        let outside = tempfile::Builder::new().prefix("outside-the-guest").tempdir().unwrap();
        let outside = std::fs::canonicalize(outside.path()).unwrap();
        let (target, dev, uuid) = guest_with_evil_subvolume(&fs, &outside);
        // The guest's second filesystem: `x` a symlink out of the guest.
        let images = tempfile::tempdir().unwrap();
        let image = images.path().join("second.img");
        std::fs::File::create(&image).unwrap().set_len(64 << 20).unwrap();
        assert!(Command::new("mkfs.ext4").arg("-q").arg(&image).status().unwrap().success());
        let scratch = images.path().join("mnt");
        std::fs::create_dir(&scratch).unwrap();
        let loop_dev = Command::new("losetup").args(["--find", "--show"]).arg(&image).output().unwrap();
        let second = String::from_utf8(loop_dev.stdout).unwrap().trim().to_owned();
        assert!(second.starts_with("/dev/loop"), "losetup");
        assert!(Command::new("mount").arg(&second).arg(&scratch).status().unwrap().success());
        std::os::unix::fs::symlink(&outside, scratch.join("x")).unwrap();
        std::fs::create_dir(scratch.join("etc")).unwrap();
        assert!(Command::new("umount").arg(&scratch).status().unwrap().success());
        let out = Command::new("blkid").args(["-s", "UUID", "-o", "value"]).arg(&second).output().unwrap();
        let uuid2 = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        let fstab = format!("UUID={uuid2} // ext4 defaults 0 0\nUUID={uuid2} /x ext4 defaults 0 0\n");
        let result = run_fstab_with(&target, &dev, &uuid, &fstab, &[(&second, "ext4", &uuid2)]);
        let (escaped, over_root) = (mount_count(&outside), mount_count(&target));
        eprintln!("result {result:?}, mounts on the outside directory: {escaped}, on the guest root: {over_root}");
        undo_mounts(&outside, &target);
        let _ = Command::new("losetup").arg("-d").arg(&second).status();
        assert_eq!(escaped, 0, "the guest's fstab mounted one of its filesystems outside the guest ({result:?})");
        assert_eq!(over_root, 1, "the guest's fstab mounted over the guest root ({result:?})");
    }

    /// A mount point that is a symlink out of the guest is resolved inside it (and
    /// is missing there), and a subvolume of the root's device named by its fstab entry
    /// (here the top level, subvolid=5) lands inside the guest.
    #[test]
    fn fstab_subvolume_mount_points_resolve_inside_the_guest() {
        let Some(fs) = crate::change_watch::tests::LoopFs::mount("btrfs") else { return };
        let outside = tempfile::Builder::new().prefix("outside-the-guest").tempdir().unwrap();
        let outside = std::fs::canonicalize(outside.path()).unwrap();
        let (target, dev, uuid) = guest_with_evil_subvolume(&fs, &outside);
        std::os::unix::fs::symlink(&outside, target.join("up")).unwrap();
        let up = run_fstab(&target, &dev, &uuid, &format!("UUID={uuid} /up btrfs subvol=evil 0 0\n"));
        let escaped = mount_count(&outside);
        let x = run_fstab(&target, &dev, &uuid, &format!("UUID={uuid} /x btrfs subvolid=5 0 0\n"));
        let at_x = mount_count(&target.join("x"));
        undo_mounts(&outside, &target);
        while mount_count(&target.join("x")) > 0 {
            let c = crate::confinement::path_cstring(&target.join("x"));
            // SAFETY: a NUL-terminated path that outlives the call.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                break;
            }
        }
        assert_eq!(escaped, 0, "{up:?}");
        assert!(up.is_err_and(|e| e.contains("does not exist in the guest")));
        assert!(x.is_ok(), "{x:?}");
        assert_eq!(at_x, 1, "subvolid=5 on /x");
    }

    /// A subvolume name with a newline would write lines of its own into the task's output
    /// when printed (the task runner scans it for `WARNING:` lines and, in verify, `CHECK`
    /// report lines): names with control characters are not tried.
    #[test]
    fn top_subvolume_names_carry_no_lines() {
        let Some(fs) = crate::change_watch::tests::LoopFs::mount("btrfs") else { return };
        let name = "root\nCHECK ok filesystems \"forged\"";
        let made =
            Command::new("btrfs").args(["-q", "subvolume", "create"]).arg(fs.path().join(name)).output().unwrap();
        assert!(made.status.success(), "btrfs subvolume create: {}", String::from_utf8_lossy(&made.stderr));
        let found = top_subvolumes(fs.path());
        assert!(found.iter().all(|n| !n.chars().any(char::is_control)), "{found:?}");
    }
}
