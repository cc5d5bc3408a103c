//! Growing into a larger disk (snf-image's FixPartitionTable and FilesystemResize* tasks):
//! `deploy` onto a target 1 GiB larger than the image, `customize --grow`. Read back with the
//! test's own tools: sfdisk and sgdisk for the tables, dumpe2fs, xfs_db, e2fsck and xfs_repair
//! on a read-only loop device over the partition, the LVM metadata text for LVM.

use imgforge_tests::fixtures::{self, sh, Shape, LVM_DATA_OFFSET};
use imgforge_tests::readback::Mount;
use imgforge_tests::run::{code, imgforge, s};
use std::path::{Path, PathBuf};
use std::process::Command;

mod progress_schema;

const GIB: u64 = 1 << 30;
const SECTOR: u64 = 512;

/// One partition of a table, in sectors.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Part {
    start: u64,
    size: u64,
    kind: String,
    uuid: Option<String>,
    name: Option<String>,
}

impl Part {
    /// Its last sector.
    fn last(&self) -> u64 {
        self.start + self.size - 1
    }
}

/// The partitions of `img`, in table order (sfdisk --json).
fn parts(img: &Path) -> Vec<Part> {
    let json: serde_json::Value =
        serde_json::from_str(&sh(Command::new("sfdisk").arg("--json").arg(img)).unwrap()).unwrap();
    json["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Part {
            start: p["start"].as_u64().unwrap(),
            size: p["size"].as_u64().unwrap(),
            kind: p["type"].as_str().unwrap().to_owned(),
            uuid: p["uuid"].as_str().map(str::to_owned),
            name: p["name"].as_str().map(str::to_owned),
        })
        .collect()
}

fn sectors(img: &Path) -> u64 {
    std::fs::metadata(img).unwrap().len() / SECTOR
}

/// A read-only loop device over `size` bytes at `offset` of `img`, detached on drop.
struct Loop(String);

impl Loop {
    fn new(img: &Path, offset: u64, size: u64) -> Self {
        let dev = sh(Command::new("losetup")
            .args([
                "--find",
                "--show",
                "--read-only",
                "--offset",
                &offset.to_string(),
                "--sizelimit",
                &size.to_string(),
            ])
            .arg(img))
        .unwrap();
        Self(dev.trim().to_owned())
    }

    fn of(img: &Path, p: &Part) -> Self {
        Self::new(img, p.start * SECTOR, p.size * SECTOR)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// Size of the ext2/3/4 filesystem on `dev`, checked clean first (e2fsck -fn).
fn ext_bytes(dev: &str) -> u64 {
    sh(Command::new("e2fsck").args(["-f", "-n", dev])).expect("the ext4 filesystem is clean");
    let dump = sh(Command::new("dumpe2fs").args(["-h", dev])).unwrap();
    let field =
        |name: &str| -> u64 { dump.lines().find_map(|l| l.strip_prefix(name)).unwrap().trim().parse().unwrap() };
    field("Block count:") * field("Block size:")
}

/// Size of the XFS filesystem on `dev`, checked clean first (xfs_repair -n).
fn xfs_bytes(dev: &str) -> u64 {
    sh(Command::new("xfs_repair").args(["-n", dev])).expect("the XFS filesystem is clean");
    let out = sh(Command::new("xfs_db").args(["-r", "-c", "sb 0", "-c", "p dblocks blocksize", dev])).unwrap();
    let field = |name: &str| -> u64 {
        out.lines().find_map(|l| l.strip_prefix(name)).unwrap().trim_start_matches([' ', '=']).trim().parse().unwrap()
    };
    field("dblocks") * field("blocksize")
}

/// `imgforge deploy` of `image` onto a new file `grow` bytes larger, with JSON progress; the
/// target and the helper tasks that ended.
fn deploy_larger(image: &Path, dir: &Path, grow: u64, extra: &[&str]) -> (PathBuf, Vec<String>) {
    let target = dir.join("grown.img");
    let size = std::fs::metadata(image).unwrap().len() + grow;
    let size = format!("{}M", size >> 20);
    let mut args = vec!["deploy", "--accel", "tcg", "--progress", "json", "--image"];
    let image = s(image);
    let target_s = s(&target);
    args.extend([image.as_str(), "--target", &target_s, "--size", &size]);
    args.extend(extra);
    let out = imgforge(&args);
    assert_eq!(code(&out), 0);
    let events = progress_schema::events(&String::from_utf8_lossy(&out.stdout));
    let ended = events
        .iter()
        .filter(|e| e["subtype"] == "task-end")
        .filter_map(|e| e["task"].as_str().map(str::to_owned))
        .collect();
    (target, ended)
}

fn sgdisk_clean(img: &Path) {
    let out = sh(Command::new("sgdisk").arg("-v").arg(img)).unwrap();
    assert!(out.contains("No problems found"), "sgdisk -v finds problems:\n{out}");
}

#[test]
fn gpt_xfs_root_grows_to_the_end_of_a_larger_target() {
    fixtures::require_root();
    let dir = tempfile::tempdir().unwrap();
    let image = fixtures::disk(Shape::GptXfsBoot).unwrap();
    let before = parts(&image);
    let (target, ended) = deploy_larger(&image, dir.path(), GIB, &[]);
    for task in ["08-FixPartitionTable", "09-FilesystemResizeUnmounted", "16-FilesystemResizeMounted"] {
        assert!(ended.iter().any(|t| t == task), "{task} did not run: {ended:?}");
    }
    sgdisk_clean(&target);
    let after = parts(&target);
    assert_eq!(after[0], before[0], "the boot partition changed");
    // The root keeps its start, type, GUID and name, and ends where the backup GPT begins.
    assert_eq!(after[1].last(), sectors(&target) - 34);
    assert_eq!(
        (&after[1].start, &after[1].kind, &after[1].uuid, &after[1].name),
        (&before[1].start, &before[1].kind, &before[1].uuid, &before[1].name)
    );
    let root = Loop::of(&target, &after[1]);
    let fs = xfs_bytes(&root.0);
    assert!(fs > after[1].size * SECTOR - (16 << 20), "XFS not grown: {fs} of {} bytes", after[1].size * SECTOR);
    let boot = Loop::of(&target, &after[0]);
    ext_bytes(&boot.0);
}

#[test]
fn mbr_ext4_root_grows_to_the_end_of_a_larger_target() {
    fixtures::require_root();
    let dir = tempfile::tempdir().unwrap();
    let image = fixtures::disk(Shape::DosExt4).unwrap();
    let before = parts(&image);
    let (target, _) = deploy_larger(&image, dir.path(), GIB, &["--hostname", "grown1"]);
    let after = parts(&target);
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].last(), sectors(&target) - 1, "the root partition does not reach the end of the disk");
    assert_eq!((after[0].start, &after[0].kind), (before[0].start, &before[0].kind));
    let fs = ext_bytes(&Loop::of(&target, &after[0]).0);
    assert!(fs > after[0].size * SECTOR - (4 << 20), "ext4 not grown: {fs} of {} bytes", after[0].size * SECTOR);
    let m = Mount::partition(&target, 0).unwrap();
    assert_eq!(m.read("/etc/hostname").unwrap(), "grown1\n");
}

/// One number of the newest LVM metadata: the value of the first `key` after `anchor`.
fn lvm_value(metadata: &str, anchor: &str, key: &str) -> u64 {
    let from = metadata.find(anchor).unwrap_or_else(|| panic!("no {anchor} in the LVM metadata:\n{metadata}"));
    metadata[from..]
        .lines()
        .find_map(|l| l.trim().strip_prefix(key).and_then(|r| r.trim().strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key} after {anchor} in the LVM metadata:\n{metadata}"))
        .trim()
        .parse()
        .unwrap()
}

/// The newest copy (highest seqno) of the volume group's metadata text, read from the metadata
/// area at the start of the physical volume at `offset` of `img`.
fn lvm_metadata(img: &Path, offset: u64) -> String {
    use std::io::{Read, Seek};
    let mut area = vec![0u8; LVM_DATA_OFFSET as usize];
    let mut f = std::fs::File::open(img).unwrap();
    f.seek(std::io::SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut area).unwrap();
    area.split(|b| *b == 0)
        .map(|chunk| String::from_utf8_lossy(chunk).into_owned())
        .filter(|text| text.contains("seqno = ") && text.contains("logical_volumes"))
        .max_by_key(|text| lvm_value(text, "", "seqno"))
        .expect("no LVM metadata on the physical volume")
}

#[test]
fn lvm_root_grows_with_its_physical_volume() {
    fixtures::require_root();
    let dir = tempfile::tempdir().unwrap();
    let image = fixtures::disk(Shape::LvmExt4).unwrap();
    let (target, _) = deploy_larger(&image, dir.path(), GIB, &[]);
    let after = parts(&target);
    assert_eq!(after[0].last(), sectors(&target) - 1, "the PV partition does not reach the end of the disk");
    // The host has no device-mapper: the PV and LV sizes come from the metadata text, the root
    // filesystem is read where its single segment starts.
    let metadata = lvm_metadata(&target, after[0].start * SECTOR);
    let extent_sectors = lvm_value(&metadata, "extent_size", "extent_size");
    let extent = extent_sectors * SECTOR;
    let pe_count = lvm_value(&metadata, "physical_volumes", "pe_count");
    let pe_start = lvm_value(&metadata, "physical_volumes", "pe_start");
    assert_eq!(pe_count, (after[0].size - pe_start) / extent_sectors, "the PV does not take its whole partition");
    let root = metadata.find("root {").expect("no LV root");
    let lv = &metadata[root..];
    assert_eq!(lvm_value(lv, "", "segment_count"), 1);
    assert_eq!(lvm_value(lv, "", "extent_count"), pe_count, "the root LV does not take every extent");
    let lv_bytes = pe_count * extent;
    assert!(lv_bytes > GIB + (900 << 20) - extent * 2, "LV only {lv_bytes} bytes");
    let fs = ext_bytes(&Loop::new(&target, after[0].start * SECTOR + LVM_DATA_OFFSET, lv_bytes).0);
    assert_eq!(fs, lv_bytes, "ext4 does not fill the grown LV");
}

/// A swap partition after the root: the backup GPT moves to the end of the disk, nothing else
/// changes.
#[test]
fn a_partition_after_the_root_keeps_everything_its_size() {
    fixtures::require_root();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("root-then-swap.img");
    sh(Command::new("cp").arg("--sparse=always").arg(fixtures::disk(Shape::GptXfsBoot).unwrap()).arg(&image)).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&image).unwrap();
    f.set_len(f.metadata().unwrap().len() + (256 << 20)).unwrap();
    drop(f);
    sh(Command::new("sfdisk").args(["-q", "--relocate", "gpt-bak-std"]).arg(&image)).unwrap();
    let mut child = Command::new("sfdisk")
        .args(["-q", "--append"])
        .arg(&image)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b",,S\n").unwrap();
    assert!(child.wait().unwrap().success());
    let before = parts(&image);
    assert_eq!(before.len(), 3);
    let (start, size) = ((before[2].start * SECTOR).to_string(), (before[2].size * SECTOR).to_string());
    let swap =
        sh(Command::new("losetup").args(["--find", "--show", "--offset", &start, "--sizelimit", &size]).arg(&image))
            .unwrap();
    let made = sh(Command::new("mkswap").arg(swap.trim()));
    sh(Command::new("losetup").args(["-d", swap.trim()])).unwrap();
    made.unwrap();
    let root_before = xfs_bytes(&Loop::of(&image, &before[1]).0);
    let (target, _) = deploy_larger(&image, dir.path(), GIB, &[]);
    sgdisk_clean(&target);
    let after = parts(&target);
    assert_eq!(after, before, "a partition changed");
    assert_eq!(xfs_bytes(&Loop::of(&target, &after[1]).0), root_before, "the root filesystem changed size");
}

/// `customize --grow` grows an image enlarged in place; FilesystemResizeUnmounted excluded,
/// the partition grows and the filesystem keeps its size.
#[test]
fn customize_grow_and_its_tasks_excluded_by_name() {
    fixtures::require_root();
    let dir = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, dir.path()).unwrap();
    let grow = |img: &Path, extra: &[&str]| {
        let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
        f.set_len(f.metadata().unwrap().len() + GIB).unwrap();
        drop(f);
        let mut args = vec!["customize", "--accel", "tcg", "-a"];
        let img = s(img);
        args.extend([img.as_str(), "--grow"]);
        args.extend(extra);
        assert_eq!(code(&imgforge(&args)), 0);
    };
    let fs_before = ext_bytes(&Loop::of(&img, &parts(&img)[0]).0);
    // A run that fails after growing leaves the disk as it was: the overlay is discarded.
    let p_before = parts(&img)[0].clone();
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(f.metadata().unwrap().len() + GIB).unwrap();
    drop(f);
    let out = imgforge(&["customize", "--accel", "tcg", "-a", &s(&img), "--grow", "--run-command", "exit 3"]);
    assert_ne!(code(&out), 0);
    assert_eq!(parts(&img)[0], p_before, "a failed run grew the partition");
    assert_eq!(ext_bytes(&Loop::of(&img, &p_before).0), fs_before, "a failed run grew the filesystem");
    grow(&img, &["--exclude-task", "FilesystemResizeUnmounted"]);
    let p = parts(&img)[0].clone();
    assert_eq!(p.last(), sectors(&img) - 1, "the partition did not grow");
    assert_eq!(ext_bytes(&Loop::of(&img, &p).0), fs_before, "an excluded task grew the filesystem");

    grow(&img, &["--exclude-task", "FixPartitionTable"]);
    let q = parts(&img)[0].clone();
    assert_eq!(q, p, "an excluded FixPartitionTable grew the partition");
    let fs = ext_bytes(&Loop::of(&img, &q).0);
    assert!(fs > q.size * SECTOR - (4 << 20), "the filesystem did not grow into its partition: {fs}");
}

/// A field of `btrfs inspect-internal dump-super` (`total_bytes`, `dev_item.devid`, ...).
fn dump_super_field(dump: &str, name: &str) -> u64 {
    dump.lines()
        .find_map(|l| l.strip_prefix(name).filter(|rest| rest.starts_with([' ', '\t'])))
        .unwrap_or_else(|| panic!("no {name} in dump-super:\n{dump}"))
        .trim()
        .parse()
        .unwrap()
}

/// Size of the btrfs filesystem on `dev` and what it uses of `dev`, checked clean first
/// (btrfs check --readonly).
fn btrfs_bytes(dev: &str) -> (u64, u64) {
    sh(Command::new("btrfs").args(["check", "--readonly", dev])).expect("the btrfs filesystem is clean");
    let dump = sh(Command::new("btrfs").args(["inspect-internal", "dump-super", dev])).unwrap();
    (dump_super_field(&dump, "total_bytes"), dump_super_field(&dump, "dev_item.total_bytes"))
}

#[test]
fn gpt_btrfs_root_grows_mounted_to_the_end_of_a_larger_target() {
    fixtures::require_root();
    let dir = tempfile::tempdir().unwrap();
    let image = fixtures::btrfs_gpt(dir.path(), 768 << 20).unwrap();
    let before = parts(&image);
    assert_eq!(btrfs_bytes(&Loop::of(&image, &before[0]).0), (768 << 20, 768 << 20));
    let (target, ended) = deploy_larger(&image, dir.path(), GIB, &["--hostname", "btrfs1"]);
    for task in ["08-FixPartitionTable", "16-FilesystemResizeMounted"] {
        assert!(ended.iter().any(|t| t == task), "{task} did not run: {ended:?}");
    }
    sgdisk_clean(&target);
    let after = parts(&target);
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].last(), sectors(&target) - 34, "the root partition does not reach the backup GPT");
    assert_eq!((&after[0].start, &after[0].uuid, &after[0].name), (&before[0].start, &before[0].uuid, &before[0].name));
    let root = Loop::of(&target, &after[0]);
    let (total, on_device) = btrfs_bytes(&root.0);
    let partition = after[0].size * SECTOR;
    // btrfs grows in whole sectors of 4 KiB.
    assert!(total == on_device && total > partition - 4096, "btrfs not grown: {total} of {partition} bytes");
    // The customization landed in the grown filesystem: read back without mounting it.
    let out = dir.path().join("restored");
    std::fs::create_dir(&out).unwrap();
    sh(Command::new("btrfs").args(["restore", "--path-regex", "^/(|etc(|/hostname))$", &root.0]).arg(&out)).unwrap();
    assert_eq!(std::fs::read_to_string(out.join("etc/hostname")).unwrap(), "btrfs1\n");
    drop(root);
    // verify checks the btrfs read-only (btrfs check --readonly in the helper).
    let out = imgforge(&["verify", "--accel", "tcg", "--json", &s(&target)]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((code(&out), &report["ok"]), (0, &serde_json::Value::Bool(true)), "{report}");
    let checks = report["checks"].as_array().unwrap();
    assert!(checks.iter().any(|c| c["name"] == "filesystem-vda1"), "btrfs not checked: {report}");
}
