//! Growing the guest into a disk larger than its image, snf-image's tasks done by the helper
//! binary: `fix-partition-table` (08-FixPartitionTable), `filesystem-resize-unmounted`
//! (09-FilesystemResizeUnmounted) and `filesystem-resize-mounted` (16-FilesystemResizeMounted).
//!
//! A GPT's backup header always moves to the disk's end. Only the root filesystem grows, and
//! only when it is on the disk's last partition, or on an LVM volume group with a physical
//! volume there: extending the last partition is the one change that moves no data. ext2/3/4
//! grow before they are mounted, checked first (e2fsck -f, then resize2fs, as snf-image does);
//! XFS and btrfs can only grow mounted (xfs_growfs, btrfs filesystem resize). All of it lands
//! in the host's overlay, so a failure leaves the disk as it was.

use crate::mounts;
use crate::task_env::TaskEnv;
use imgforge_protocol::filesystems;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where the grow tasks record what grows (`DEVICE FSTYPE`, empty when nothing does).
const TARGET_FILE: &str = "grow-target";
/// Where 10-MountRoot records the root device.
const ROOT_DEVICE_FILE: &str = "root-device";
/// Where the grow tasks mount a root candidate to look at it.
const PROBE_DIR: &str = "probe-root";
/// Growth worth a partition table write and a filesystem check: 1 MiB.
const MIN_GROWTH_BYTES: u64 = 1 << 20;
/// MBR partition type codes of an extended partition.
const EXTENDED_TYPES: [&str; 3] = ["5", "f", "85"];

/// The kind of a partition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    /// GUID partition table.
    Gpt,
    /// MBR (`dos`).
    Dos,
}

/// One partition, as sfdisk lists it, in sectors of its table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Its number (`N` of `/dev/vdaN`).
    pub number: u32,
    /// Its device node.
    pub node: String,
    /// First sector.
    pub start: u64,
    /// Length in sectors.
    pub size: u64,
    /// Type: an MBR code (`83`) or a GPT type GUID.
    pub kind: String,
}

impl Partition {
    /// The sector after its last.
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.size)
    }

    /// Whether it is an MBR extended partition.
    pub fn is_extended(&self) -> bool {
        EXTENDED_TYPES.contains(&self.kind.to_ascii_lowercase().as_str())
    }
}

/// A partition table, as `sfdisk --json` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// GPT or MBR.
    pub label: Label,
    /// Bytes per sector.
    pub sector_size: u64,
    /// GPT: the last usable sector the header records.
    pub last_lba: Option<u64>,
    /// The partitions, in table order.
    pub partitions: Vec<Partition>,
}

impl Table {
    /// The last sector a partition may use on a disk of `disk_sectors` (pure).
    pub fn last_usable(&self, disk_sectors: u64) -> u64 {
        match self.label {
            // The backup GPT takes the last sectors: its header and 16 KiB of entries.
            Label::Gpt => disk_sectors.saturating_sub(2 + 16384u64.div_ceil(self.sector_size)),
            // MBR counts sectors in 32 bits.
            Label::Dos => disk_sectors.min(1 << 32).saturating_sub(1),
        }
    }

    /// Whether the GPT backup header is short of the end of a disk of `disk_sectors` (pure).
    pub fn backup_header_misplaced(&self, disk_sectors: u64) -> bool {
        self.label == Label::Gpt && self.last_lba.is_some_and(|l| l < self.last_usable(disk_sectors))
    }
}

/// Parses `sfdisk --json` output (pure).
pub fn parse_sfdisk_json(text: &str) -> Result<Table, String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("sfdisk --json printed something else than JSON: {e}"))?;
    let t = &v["partitiontable"];
    let label = match t["label"].as_str() {
        Some("gpt") => Label::Gpt,
        Some("dos") => Label::Dos,
        other => {
            return Err(format!(
                "the disk has a partition table of type {}: only GPT and MBR (dos) tables are grown",
                other.unwrap_or("(none)")
            ))
        }
    };
    let mut partitions = Vec::new();
    for p in t["partitions"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let node = p["node"].as_str().ok_or("sfdisk listed a partition without a device node")?.to_owned();
        let number = trailing_number(&node).ok_or_else(|| format!("partition {node} has no number"))?;
        let (Some(start), Some(size)) = (p["start"].as_u64(), p["size"].as_u64()) else {
            return Err(format!("sfdisk listed partition {node} without its start or size"));
        };
        let kind = p["type"].as_str().unwrap_or_default().to_owned();
        partitions.push(Partition { number, node, start, size, kind });
    }
    Ok(Table {
        label,
        sector_size: t["sectorsize"].as_u64().filter(|s| *s >= 512).unwrap_or(512),
        last_lba: t["lastlba"].as_u64(),
        partitions,
    })
}

fn trailing_number(node: &str) -> Option<u32> {
    let digits = node.len() - node.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    node[node.len() - digits..].parse().ok()
}

/// The disk's last partition, with the partitions to extend to the disk's end to grow it,
/// outermost first: an MBR extended partition before the logical partition at its end. An
/// empty extended partition is last with nothing to extend (pure).
pub fn last_partition(table: &Table) -> Option<(Vec<u32>, Partition)> {
    let last_of = |primary: bool| {
        table
            .partitions
            .iter()
            .filter(|p| table.label == Label::Gpt || (p.number <= 4) == primary)
            .max_by_key(|p| p.end())
    };
    let last = last_of(true)?.clone();
    if table.label == Label::Gpt || !last.is_extended() {
        return Some((vec![last.number], last));
    }
    match last_of(false) {
        Some(logical) => Some((vec![last.number, logical.number], logical.clone())),
        None => Some((Vec::new(), last)),
    }
}

/// Parses the rows of an lvm report printed with `--noheadings --separator :` (pure).
pub fn parse_lvm_report(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| l.split(':').map(|f| f.trim().to_owned()).collect())
        .collect()
}

/// The root filesystem that grows, and what holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    /// The root filesystem's device: the last partition, the whole disk, or a logical volume.
    dev: String,
    /// Its type.
    fstype: String,
}

/// How a grow task was called.
struct Context {
    disk: String,
    state: PathBuf,
    root_rule: Option<String>,
}

impl Context {
    fn new(vars: &TaskEnv) -> Result<Self, String> {
        Ok(Self {
            disk: vars.require("IMGFORGE_DISK")?.to_owned(),
            state: PathBuf::from(vars.require("IMGFORGE_STATE")?),
            root_rule: vars.get("IMGFORGE_ROOT_PARTITION").filter(|r| !r.is_empty()).map(str::to_owned),
        })
    }

    /// The target recorded by an earlier grow task: `None` if none ran, `Some(None)` if one
    /// found nothing to grow.
    fn recorded(&self) -> Option<Option<Target>> {
        let text = std::fs::read_to_string(self.state.join(TARGET_FILE)).ok()?;
        Some(text.split_once(' ').map(|(dev, fstype)| Target { dev: dev.into(), fstype: fstype.trim().into() }))
    }

    fn record(&self, target: Option<&Target>) -> Result<(), String> {
        let path = self.state.join(TARGET_FILE);
        let text = target.map(|t| format!("{} {}\n", t.dev, t.fstype)).unwrap_or_default();
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// The root device and type: 10-MountRoot's when it ran, else found by mounting the
    /// candidates read-only, as it will.
    fn root(&self) -> Result<(String, String), String> {
        if let Ok(dev) = std::fs::read_to_string(self.state.join(ROOT_DEVICE_FILE)) {
            let dev = dev.trim().to_owned();
            let fstype = mounts::superblock(&dev).map(|f| f.kind.to_owned()).unwrap_or_default();
            return Ok((dev, fstype));
        }
        mounts::probe_root(&self.disk, &self.state, self.root_rule.as_deref(), &self.state.join(PROBE_DIR))
    }
}

/// What holds the root filesystem's growth: the last partition (with the partitions to
/// extend) or, without a partition table, the whole disk.
struct Container {
    dev: String,
    table: Option<Table>,
    extend: Vec<u32>,
    /// Sectors of the table it would gain.
    gain: u64,
}

/// The 08-FixPartitionTable task: the GPT backup header to the disk's end, and the last
/// partition (and its LVM volume) to the disk's end when the root filesystem is there.
pub fn fix_partition_table(vars: &TaskEnv) -> Result<(), String> {
    let ctx = Context::new(vars)?;
    let swap = crate::swap::parse_request(vars.get("IMGFORGE_SWAP").unwrap_or_default())?;
    let mut container = container(&ctx.disk)?;
    let placement = match (&swap, &container.table) {
        (None, _) => None,
        (Some(_), None) => return Err(format!("SWAP: {} has no partition table to add a swap partition to", ctx.disk)),
        (Some(request), Some(table)) => {
            let used_end = table.partitions.iter().map(Partition::end).max().unwrap_or(0);
            let placement = crate::swap::place(table, disk_sectors(&ctx.disk, table), used_end, request)?;
            // The last partition grows up to the swap partition, no further.
            let last_end = table.partitions.iter().find(|p| p.node == container.dev).map_or(used_end, Partition::end);
            container.gain = placement.limit.saturating_sub(last_end);
            Some(placement)
        }
    };
    let target = locate(&ctx, &container)?;
    ctx.record(target.as_ref())?;
    let misplaced = container.table.as_ref().is_some_and(|t| t.backup_header_misplaced(disk_sectors(&ctx.disk, t)));
    let sector = container.table.as_ref().map_or(512, |t| t.sector_size);
    let grows = target.is_some() && !container.extend.is_empty() && container.gain * sector >= MIN_GROWTH_BYTES;
    if misplaced && !grows && placement.is_none() {
        // sfdisk moves the backup header when it writes the table; here it writes nothing else.
        sfdisk(&ctx.disk, &["--relocate", "gpt-bak-std"], None)?;
        println!("moved the GPT backup header to the end of {}", ctx.disk);
    }
    if grows {
        let before = device_bytes(&container.dev)?;
        let table = container.table.as_ref().ok_or("a partition grows without a partition table")?;
        for number in &container.extend {
            let script = match (&placement, table.partitions.iter().find(|p| p.number == *number)) {
                (Some(swap), Some(p)) => format!(", {}\n", swap.limit - p.start),
                _ => ", +\n".to_owned(),
            };
            // The kernel is told below: sfdisk's re-read fails while LVM holds the partition.
            sfdisk(&ctx.disk, &["--no-reread", "--no-tell-kernel", "-N", &number.to_string()], Some(&script))?;
        }
        let table =
            read_table(&ctx.disk)?.ok_or_else(|| format!("sfdisk left {} without a partition table", ctx.disk))?;
        let grown = table
            .partitions
            .iter()
            .find(|p| p.node == container.dev)
            .ok_or_else(|| format!("sfdisk left no partition {} on {}", container.dev, ctx.disk))?;
        tell_kernel(&ctx.disk, grown, table.sector_size)?;
        let after = device_bytes(&container.dev)?;
        println!("extended {} from {before} to {after} bytes", container.dev);
    } else if container.table.is_some() && target.is_some() {
        println!("{} already reaches the end of the disk", container.dev);
    }
    if let (Some(request), Some(placement)) = (&swap, &placement) {
        add_swap(&ctx.disk, request, placement)?;
    }
    let Some(target) = target else { return Ok(()) };
    if target.dev != container.dev {
        grow_volume(&container.dev, &target.dev)?;
    }
    Ok(())
}

/// Adds the swap partition to the table (rewritten whole from sfdisk's dump, the GPT's last
/// usable sector left for sfdisk to set at the disk's end) and writes its swap signature.
fn add_swap(disk: &str, request: &crate::swap::Request, placement: &crate::swap::Placement) -> Result<(), String> {
    let table = read_table(disk)?.ok_or_else(|| format!("{disk} has no partition table"))?;
    let out = Command::new("sfdisk")
        .args(["--dump", disk])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run sfdisk: {e}"))?;
    if !out.status.success() {
        return Err(format!("sfdisk --dump {disk} failed ({})", out.status));
    }
    let mut script: String = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with("last-lba:"))
        .map(|l| format!("{l}\n"))
        .collect();
    if let Some(ext) = placement.extended.as_ref().filter(|e| e.existing) {
        let node = table
            .partitions
            .iter()
            .find(|p| p.number == ext.number)
            .map(|p| p.node.clone())
            .ok_or_else(|| format!("{disk} has no extended partition {} to grow", ext.number))?;
        script = crate::swap::resize_in_dump(&script, &node, ext.size)?;
        println!("extended {node} to the end of {disk} for the logical swap partition");
    }
    script.push_str(&crate::swap::sfdisk_line(disk, &table, request.number, placement));
    sfdisk(disk, &["--no-reread", "--no-tell-kernel"], Some(&script))?;
    let offset = placement.start * table.sector_size;
    let page = crate::swap::signature(placement.size * table.sector_size, &request.uuid)?;
    let failed = |e: std::io::Error| format!("cannot write the swap signature on {disk}{}: {e}", request.number);
    {
        use std::io::{Seek, SeekFrom};
        let mut file = std::fs::OpenOptions::new().write(true).open(disk).map_err(failed)?;
        file.seek(SeekFrom::Start(offset)).map_err(failed)?;
        file.write_all(&page).map_err(failed)?;
        file.sync_all().map_err(failed)?;
    }
    println!("made swap partition {disk}{} of {} MiB at sector {}", request.number, request.mib, placement.start);
    Ok(())
}

/// The 09-FilesystemResizeUnmounted task: grows an ext2/3/4 root filesystem to its device
/// before it is mounted, checked first.
pub fn filesystem_resize_unmounted(vars: &TaskEnv) -> Result<(), String> {
    let ctx = Context::new(vars)?;
    let Some(target) = target(&ctx)? else { return Ok(()) };
    match target.fstype.as_str() {
        "ext2" | "ext3" | "ext4" => grow_ext(&target),
        "xfs" | "btrfs" => {
            println!("{} on {} grows once mounted (FilesystemResizeMounted)", target.fstype, target.dev);
            Ok(())
        }
        other => {
            println!("WARNING: imgforge cannot grow a {other} filesystem ({}): it keeps its size", target.dev);
            Ok(())
        }
    }
}

/// The 16-FilesystemResizeMounted task: grows a mounted XFS or btrfs root filesystem to its
/// device.
pub fn filesystem_resize_mounted(vars: &TaskEnv) -> Result<(), String> {
    crate::task_overwrite::run_helper_task(vars, "FilesystemResizeMounted", || resize_mounted(vars))
}

/// FilesystemResizeMounted's own work.
fn resize_mounted(vars: &TaskEnv) -> Result<(), String> {
    let ctx = Context::new(vars)?;
    let mount_point = vars.require("IMGFORGE_TARGET")?;
    let Some(target) = target(&ctx)? else { return Ok(()) };
    match target.fstype.as_str() {
        "xfs" => grow_xfs(&target, mount_point),
        "btrfs" => grow_btrfs(&target, mount_point),
        _ => {
            println!(
                "{} on {} is not grown mounted (ext2/3/4 grow before, in FilesystemResizeUnmounted)",
                target.fstype, target.dev
            );
            Ok(())
        }
    }
}

/// Grows the XFS filesystem of `target`, mounted on `mount_point`, to its device.
fn grow_xfs(target: &Target, mount_point: &str) -> Result<(), String> {
    let Some(spare) = spare_bytes(&target.dev)? else { return Ok(()) };
    let status = Command::new("xfs_growfs")
        .arg(mount_point)
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run xfs_growfs: {e}"))?;
    if !status.success() {
        return Err(format!("xfs_growfs could not grow the XFS filesystem on {} ({status})", target.dev));
    }
    println!("grew XFS on {} by {spare} bytes", target.dev);
    Ok(())
}

/// Grows the btrfs device `target`, of the filesystem mounted on `mount_point`, to its
/// partition: `btrfs filesystem resize DEVID:max`, the device named by the id its own
/// superblock gives (as snf-image names it from `btrfs filesystem show`), so that in a
/// filesystem of several devices it is this one that grows.
fn grow_btrfs(target: &Target, mount_point: &str) -> Result<(), String> {
    let Some(spare) = spare_bytes(&target.dev)? else { return Ok(()) };
    let devid = filesystems::btrfs_devid(&mounts::head(&target.dev, filesystems::PROBE_BYTES as u64))
        .ok_or_else(|| format!("{} holds no btrfs superblock to read its device id from", target.dev))?;
    let out = Command::new("btrfs")
        .args(["filesystem", "resize", &format!("{devid}:max"), mount_point])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run btrfs: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "btrfs filesystem resize {devid}:max could not grow the btrfs filesystem on {} ({}): {}",
            target.dev,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    println!("grew btrfs device {devid} on {} by {spare} bytes", target.dev);
    Ok(())
}

/// What grows: recorded by an earlier grow task, or found now (the earlier ones excluded).
fn target(ctx: &Context) -> Result<Option<Target>, String> {
    if let Some(recorded) = ctx.recorded() {
        if recorded.is_none() {
            println!("nothing to grow (see FixPartitionTable)");
        }
        return Ok(recorded);
    }
    let target = locate(ctx, &container(&ctx.disk)?)?;
    ctx.record(target.as_ref())?;
    Ok(target)
}

/// The disk's last partition (or the disk itself, without a partition table).
fn container(disk: &str) -> Result<Container, String> {
    let Some(table) = read_table(disk)? else {
        return Ok(Container { dev: disk.to_owned(), table: None, extend: Vec::new(), gain: 0 });
    };
    let Some((extend, last)) = last_partition(&table) else {
        return Err(format!("the partition table of {disk} lists no partition: there is nothing to grow"));
    };
    let gain = (table.last_usable(disk_sectors(disk, &table)) + 1).saturating_sub(last.end());
    Ok(Container { dev: last.node.clone(), table: Some(table), extend, gain })
}

/// The root filesystem, if it is what `container` holds (directly or through LVM); says why
/// not otherwise.
fn locate(ctx: &Context, container: &Container) -> Result<Option<Target>, String> {
    let (root, fstype) = match ctx.root() {
        Ok(found) => found,
        Err(e) => {
            println!("WARNING: nothing grown: {e}");
            return Ok(None);
        }
    };
    let content = mounts::superblock(&container.dev).map(|f| f.kind).unwrap_or("no filesystem");
    let what = if container.table.is_some() { "the last partition" } else { "the disk" };
    if root == container.dev {
        println!("the root filesystem ({fstype}) is on {what}, {root}");
        return Ok(Some(Target { dev: root, fstype }));
    }
    if content == "LVM2_member" {
        if let Some(how) = same_volume_group(&container.dev, &root)? {
            println!(
                "the root filesystem ({fstype}) is on {root}, a logical volume {how} on {what}, {}",
                container.dev
            );
            return Ok(Some(Target { dev: root, fstype }));
        }
    }
    println!("{what}, {} ({content}), does not hold the root filesystem ({root}): nothing grows", container.dev);
    Ok(None)
}

/// How the logical volume `lv` relates to the physical volume `pv` when it is in its volume
/// group (`None` when it is not).
fn same_volume_group(pv: &str, lv: &str) -> Result<Option<String>, String> {
    // Most often the volume lies on the physical volume: sysfs says so without starting lvm
    // (each start costs about half a second under TCG).
    if dm_lies_on(lv, pv) {
        return Ok(Some("with extents".into()));
    }
    let pvs = parse_lvm_report(&lvm(&["pvs", "--noheadings", "--separator", ":", "-o", "pv_name,vg_name"])?);
    let Some(vg) = pvs.iter().find(|r| r.first().map(String::as_str) == Some(pv)).and_then(|r| r.get(1)) else {
        return Ok(None);
    };
    let lvs = parse_lvm_report(&lvm(&["lvs", "--noheadings", "--separator", ":", "-o", "lv_dm_path,lv_path,vg_name"])?);
    let found = lvs.iter().any(|r| r.len() == 3 && (r[0] == lv || r[1] == lv) && &r[2] == vg);
    Ok(found.then(|| format!("in volume group {vg}, with a physical volume")))
}

/// Whether the device-mapper device `dm` is mapped onto the partition `part` (sysfs `slaves`).
fn dm_lies_on(dm: &str, part: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(meta), Some(part)) = (std::fs::metadata(dm), Path::new(part).file_name()) else { return false };
    let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
    Path::new(&format!("/sys/dev/block/{major}:{minor}/slaves")).join(part).exists()
}

/// Grows the physical volume `pv` to its partition and the logical volume `lv` into what that
/// freed in its volume group.
fn grow_volume(pv: &str, lv: &str) -> Result<(), String> {
    lvm(&["pvresize", pv])?;
    let free = parse_lvm_report(&lvm(&["lvs", "--noheadings", "--separator", ":", "-o", "vg_free_count", lv])?);
    let free: u64 = free.first().and_then(|r| r.first()).and_then(|n| n.parse().ok()).unwrap_or(0);
    if free == 0 {
        println!("the volume group of {lv} has no free extent: {lv} keeps its size");
        return Ok(());
    }
    lvm(&["lvextend", "-l", "+100%FREE", lv])?;
    println!("extended {lv} by {free} extents");
    Ok(())
}

/// Checks (e2fsck -f -p) and grows an unmounted ext2/3/4 filesystem to its device.
fn grow_ext(target: &Target) -> Result<(), String> {
    let Some(spare) = spare_bytes(&target.dev)? else { return Ok(()) };
    let status = Command::new("e2fsck")
        .args(["-f", "-p", &target.dev])
        .status()
        .map_err(|e| format!("cannot run e2fsck: {e}"))?;
    // 1: errors corrected; 4 and above: errors left, or e2fsck failed.
    if status.code().is_none_or(|c| c >= 4) {
        return Err(format!(
            "e2fsck found errors it could not repair on the {} filesystem on {} ({status}): it was not grown and the disk was left unchanged; check the image with e2fsck -f",
            target.fstype, target.dev
        ));
    }
    let status =
        Command::new("resize2fs").arg(&target.dev).status().map_err(|e| format!("cannot run resize2fs: {e}"))?;
    if !status.success() {
        return Err(format!("resize2fs could not grow the {} filesystem on {} ({status})", target.fstype, target.dev));
    }
    println!("grew {} on {} by {spare} bytes", target.fstype, target.dev);
    Ok(())
}

/// How many bytes of `dev` its filesystem does not use, or `None` (said) when that is less
/// than is worth growing.
fn spare_bytes(dev: &str) -> Result<Option<u64>, String> {
    let device = device_bytes(dev)?;
    let fs = mounts::superblock(dev).and_then(|f| f.size).unwrap_or(0);
    let spare = device.saturating_sub(fs);
    if spare < MIN_GROWTH_BYTES {
        println!("the filesystem on {dev} already fills it ({fs} of {device} bytes)");
        return Ok(None);
    }
    Ok(Some(spare))
}

/// The disk's partition table, `None` when it has none.
fn read_table(disk: &str) -> Result<Option<Table>, String> {
    let out = Command::new("sfdisk")
        .args(["--json", disk])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run sfdisk: {e}"))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        println!("no partition table on {disk}: {}", why.trim());
        return Ok(None);
    }
    parse_sfdisk_json(&String::from_utf8_lossy(&out.stdout)).map(Some)
}

/// Runs sfdisk on `disk` with `args`, `script` on its standard input.
fn sfdisk(disk: &str, args: &[&str], script: Option<&str>) -> Result<(), String> {
    let mut child = Command::new("sfdisk")
        .arg("-q")
        .args(args)
        .arg(disk)
        .stdin(if script.is_some() { Stdio::piped() } else { Stdio::null() })
        .spawn()
        .map_err(|e| format!("cannot run sfdisk: {e}"))?;
    if let (Some(script), Some(mut stdin)) = (script, child.stdin.take()) {
        stdin.write_all(script.as_bytes()).map_err(|e| format!("cannot write to sfdisk: {e}"))?;
    }
    let status = child.wait().map_err(|e| format!("cannot wait for sfdisk: {e}"))?;
    if !status.success() {
        return Err(format!("sfdisk {} {disk} failed ({status}): the disk was left unchanged", args.join(" ")));
    }
    Ok(())
}

/// `BLKPG` (`_IO(0x12, 105)`) and its resize operation, from linux/blkpg.h and linux/fs.h.
const BLKPG: libc::c_ulong = 0x1269;
const BLKPG_RESIZE_PARTITION: libc::c_int = 3;

/// `struct blkpg_partition`.
#[repr(C)]
struct BlkpgPartition {
    start: libc::c_longlong,
    length: libc::c_longlong,
    pno: libc::c_int,
    devname: [libc::c_char; 64],
    volname: [libc::c_char; 64],
}

/// `struct blkpg_ioctl_arg`.
#[repr(C)]
struct BlkpgIoctlArg {
    op: libc::c_int,
    flags: libc::c_int,
    datalen: libc::c_int,
    data: *mut libc::c_void,
}

/// Gives the kernel the new size of partition `p` of `disk` (BLKPG_RESIZE_PARTITION, as
/// resizepart does): unlike re-reading the whole table, it works while the partition is in use.
fn tell_kernel(disk: &str, p: &Partition, sector_size: u64) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let failed = |e: std::io::Error| format!("cannot tell the kernel the new size of {}: {e}", p.node);
    let file = std::fs::File::open(disk).map_err(failed)?;
    let bytes = |sectors: u64| {
        sectors
            .checked_mul(sector_size)
            .and_then(|b| i64::try_from(b).ok())
            .ok_or_else(|| format!("partition {} does not fit in the kernel's partition offsets", p.node))
    };
    let mut part = BlkpgPartition {
        start: bytes(p.start)?,
        length: bytes(p.size)?,
        pno: p.number as libc::c_int,
        devname: [0; 64],
        volname: [0; 64],
    };
    let mut arg = BlkpgIoctlArg {
        op: BLKPG_RESIZE_PARTITION,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as libc::c_int,
        data: (&mut part as *mut BlkpgPartition).cast(),
    };
    // SAFETY: BLKPG reads `arg` and the `part` it points to, both alive for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKPG as _, &mut arg as *mut BlkpgIoctlArg) };
    if rc != 0 {
        return Err(failed(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Runs an lvm command: its standard output.
fn lvm(args: &[&str]) -> Result<String, String> {
    let out = Command::new("lvm")
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run lvm: {e}"))?;
    if !out.status.success() {
        return Err(format!("lvm {} failed ({}): the disk was left unchanged", args.join(" "), out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The size of a block device in bytes.
fn device_bytes(dev: &str) -> Result<u64, String> {
    use std::io::Seek;
    std::fs::File::open(dev)
        .and_then(|mut f| f.seek(std::io::SeekFrom::End(0)))
        .map_err(|e| format!("cannot read the size of {dev}: {e}"))
}

/// The disk's size in sectors of `table`.
fn disk_sectors(disk: &str, table: &Table) -> u64 {
    device_bytes(disk).unwrap_or(0) / table.sector_size
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPT: &str = r#"{"partitiontable": {"label": "gpt", "id": "6253EECE", "device": "/dev/vda",
        "unit": "sectors", "firstlba": 2048, "lastlba": 4194270, "sectorsize": 512, "partitions": [
        {"node": "/dev/vda1", "start": 2048, "size": 524288, "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "name": "boot"},
        {"node": "/dev/vda2", "start": 526336, "size": 3665920, "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "name": "root"}]}}"#;

    fn dos(parts: &[(u32, u64, u64, &str)]) -> Table {
        Table {
            label: Label::Dos,
            sector_size: 512,
            last_lba: None,
            partitions: parts
                .iter()
                .map(|&(number, start, size, kind)| Partition {
                    number,
                    node: format!("/dev/vda{number}"),
                    start,
                    size,
                    kind: kind.into(),
                })
                .collect(),
        }
    }

    #[test]
    fn sfdisk_json() {
        let t = parse_sfdisk_json(GPT).unwrap();
        assert_eq!((t.label, t.sector_size, t.last_lba), (Label::Gpt, 512, Some(4194270)));
        assert_eq!(t.partitions[1].number, 2);
        assert_eq!(t.partitions[1].end(), 4192256);
        let dos = r#"{"partitiontable": {"label": "dos", "id": "0x2c96170d", "device": "/dev/vda", "unit": "sectors",
            "sectorsize": 512, "partitions": [{"node": "/dev/vda1", "start": 2048, "size": 2095104, "type": "83", "bootable": true}]}}"#;
        let t = parse_sfdisk_json(dos).unwrap();
        assert_eq!((t.label, t.last_lba, t.partitions[0].kind.as_str()), (Label::Dos, None, "83"));
        for bad in [
            "",
            "{}",
            r#"{"partitiontable": {"label": "sun", "partitions": []}}"#,
            r#"{"partitiontable": {"label": "dos", "partitions": [{"node": "/dev/vda", "start": 1, "size": 2}]}}"#,
            r#"{"partitiontable": {"label": "dos", "partitions": [{"node": "/dev/vda1", "start": 1}]}}"#,
        ] {
            assert!(parse_sfdisk_json(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn gpt_geometry() {
        let t = parse_sfdisk_json(GPT).unwrap();
        // 2 GiB: the backup already at the end; 3 GiB: 34 sectors kept, the header misplaced.
        assert_eq!(t.last_usable(4194304), 4194270);
        assert!(!t.backup_header_misplaced(4194304));
        assert_eq!(t.last_usable(6291456), 6291456 - 34);
        assert!(t.backup_header_misplaced(6291456));
        let four_k = Table { sector_size: 4096, ..t };
        assert_eq!(four_k.last_usable(1000), 1000 - 6);
        let mbr = dos(&[(1, 2048, 100, "83")]);
        assert_eq!(mbr.last_usable(4096), 4095);
        assert_eq!(mbr.last_usable(u64::MAX), (1 << 32) - 1);
        assert!(!mbr.backup_header_misplaced(1 << 40));
    }

    #[test]
    fn the_last_partition_and_what_to_extend() {
        // A table, and the partitions to extend with the number of the last one.
        type Case = (Table, Option<(Vec<u32>, u32)>);
        let cases: [Case; 7] = [
            (parse_sfdisk_json(GPT).unwrap(), Some((vec![2], 2))),
            // GPT numbers need not follow the disk's order.
            (Table { label: Label::Gpt, ..dos(&[(1, 9000, 10, "L"), (2, 2048, 100, "L")]) }, Some((vec![1], 1))),
            (dos(&[(1, 2048, 100, "83")]), Some((vec![1], 1))),
            // Swap after root: swap is last.
            (dos(&[(1, 2048, 100, "83"), (2, 4096, 100, "82")]), Some((vec![2], 2))),
            // An extended partition last: its last logical partition grows with it.
            (
                dos(&[(1, 2048, 100, "83"), (2, 4096, 9000, "5"), (5, 6144, 100, "82"), (6, 8192, 400, "83")]),
                Some((vec![2, 6], 6)),
            ),
            // An extended partition before the last primary one: the primary grows.
            (
                dos(&[(1, 2048, 100, "83"), (2, 4096, 900, "f"), (5, 4200, 100, "83"), (3, 6000, 100, "83")]),
                Some((vec![3], 3)),
            ),
            (dos(&[(1, 2048, 100, "83"), (2, 4096, 900, "5")]), Some((vec![], 2))),
        ];
        for (table, want) in cases {
            let got = last_partition(&table).map(|(extend, last)| (extend, last.number));
            assert_eq!(got, want, "{table:?}");
        }
        assert_eq!(last_partition(&dos(&[])), None);
    }

    #[test]
    fn lvm_reports() {
        let text = "  /dev/vda1:vg0\n  /dev/vdb: \n\n  /dev/mapper/vg0-root:/dev/vg0/root:vg0  \n";
        assert_eq!(
            parse_lvm_report(text),
            [vec!["/dev/vda1", "vg0"], vec!["/dev/vdb", ""], vec!["/dev/mapper/vg0-root", "/dev/vg0/root", "vg0"]]
        );
    }
}
