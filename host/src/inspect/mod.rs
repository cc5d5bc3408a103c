//! `imgforge inspect`: format, virtual size, partition table and filesystems of an image, read
//! from headers in Rust — nothing booted, nothing mounted.

// Image data decides lengths and offsets here: no silent truncation.
#![cfg_attr(not(test), deny(clippy::cast_possible_truncation))]

pub use imgforge_protocol::filesystems;
pub mod partitions;

use crate::source::{self, Format, SourceError};
use filesystems::{Filesystem, PROBE_BYTES};
use partitions::{Partition, Table, SECTOR};

/// What the partition tables need from the disk's start: the MBR and the GPT header (two
/// 512-byte sectors).
const TABLE_HEAD_BYTES: usize = 1024;
use serde::Serialize;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use thiserror::Error;

/// Random reads from the raw view of an image.
trait ReadAt {
    /// Up to `len` bytes at `offset` (fewer at the end).
    fn read_at(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>>;
}

struct RawAt(std::fs::File);

impl RawAt {
    /// The file's or block device's size (a device's metadata says 0).
    fn size(&self) -> std::io::Result<u64> {
        std::io::Seek::seek(&mut &self.0, std::io::SeekFrom::End(0))
    }
}

impl ReadAt for RawAt {
    fn read_at(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match self.0.read_at(&mut buf[got..], offset + got as u64)? {
                0 => break,
                n => got += n,
            }
        }
        buf.truncate(got);
        Ok(buf)
    }
}

/// A qemu-format image read from the confined qemu that serves it.
struct QemuAt(crate::source::qemu::QemuImage);

impl ReadAt for QemuAt {
    fn read_at(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        self.0.read_at(offset, len)
    }
}

/// How much of a stream is skipped between two looks at the cancel flag.
const SKIP_CHUNK_BYTES: u64 = 16 << 20;

/// A forward-only stream (decompressor, file in a squashfs), restarted to go backwards.
struct StreamAt<'c, F: FnMut() -> std::io::Result<Box<dyn Read + Send>>> {
    open: F,
    stream: Option<Box<dyn Read + Send>>,
    pos: u64,
    /// Raised by an interrupt: reaching a partition far into a compressed image decodes
    /// everything before it, which can take hours (a decompression bomb).
    cancel: &'c AtomicBool,
}

impl<F: FnMut() -> std::io::Result<Box<dyn Read + Send>>> ReadAt for StreamAt<'_, F> {
    fn read_at(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        if self.stream.is_none() || offset < self.pos {
            self.stream = Some((self.open)()?);
            self.pos = 0;
        }
        let s = self.stream.as_mut().expect("opened above");
        while self.pos < offset {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(std::io::Error::new(std::io::ErrorKind::Interrupted, INTERRUPTED));
            }
            let chunk = (offset - self.pos).min(SKIP_CHUNK_BYTES);
            let skipped = std::io::copy(&mut s.take(chunk), &mut std::io::sink())?;
            self.pos += skipped;
            if skipped < chunk {
                break;
            }
        }
        let mut buf = Vec::with_capacity(len);
        s.take(len as u64).read_to_end(&mut buf)?;
        self.pos += buf.len() as u64;
        Ok(buf)
    }
}

/// A filesystem found on the image.
#[derive(Debug, Clone, Serialize)]
pub struct FoundFilesystem {
    /// Partition number (none: the whole image).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    /// Byte offset.
    pub offset: u64,
    /// What is there.
    #[serde(flatten)]
    pub filesystem: Filesystem,
}

/// A liveimg's squashfs details.
#[derive(Debug, Clone, Serialize)]
pub struct LiveImg {
    /// squashfs compressor.
    pub compressor: String,
    /// squashfs block size.
    pub block_size: u32,
    /// The filesystem image inside.
    pub rootfs: String,
    /// Its size.
    pub rootfs_size: u64,
}

/// The inspection result.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The image.
    pub image: PathBuf,
    /// Its format.
    pub format: &'static str,
    /// Size of the raw disk (or of the liveimg's filesystem image).
    pub virtual_size: Option<u64>,
    /// Partition table.
    pub partition_table: Option<Table>,
    /// Filesystems found.
    pub filesystems: Vec<FoundFilesystem>,
    /// liveimg details.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub liveimg: Option<LiveImg>,
}

/// The partition table at the start of `r`, a disk of `disk_bytes` bytes when known: every
/// partition it reports lies inside the disk.
fn table(r: &mut dyn ReadAt, disk_bytes: Option<u64>) -> std::io::Result<Option<Table>> {
    let table = table_unchecked(r)?;
    if let (Some(Table::Mbr { partitions } | Table::Gpt { partitions, .. }), Some(size)) = (&table, disk_bytes) {
        partitions::check_within(partitions, size).map_err(std::io::Error::other)?;
    }
    Ok(table)
}

fn table_unchecked(r: &mut dyn ReadAt) -> std::io::Result<Option<Table>> {
    let head = r.read_at(0, TABLE_HEAD_BYTES)?;
    if head.len() < 1024 {
        return Ok(None);
    }
    let Some((mbr, protective)) = partitions::parse_mbr(&head[..512]).map_err(std::io::Error::other)? else {
        return Ok(None);
    };
    if protective {
        if let Some((lba, count, size, disk_guid)) =
            partitions::parse_gpt_header(&head[512..1024]).map_err(std::io::Error::other)?
        {
            let at = lba.checked_mul(SECTOR).ok_or_else(|| {
                std::io::Error::other(partitions::TableError::BadGpt(format!("entries at LBA {lba}")))
            })?;
            let entries = r.read_at(at, count as usize * size as usize)?;
            let partitions = partitions::parse_gpt_entries(&entries, count, size).map_err(std::io::Error::other)?;
            return Ok(Some(Table::Gpt { disk_guid, partitions }));
        }
    }
    // A boot signature alone (a FAT or NTFS boot sector) is not a partition table.
    if mbr.is_empty() || filesystems::detect(&r.read_at(0, PROBE_BYTES)?).is_some() {
        return Ok(None);
    }
    Ok(Some(Table::Mbr { partitions: mbr }))
}

fn scan(r: &mut dyn ReadAt, disk_bytes: Option<u64>) -> std::io::Result<(Option<Table>, Vec<FoundFilesystem>)> {
    let table = table(r, disk_bytes)?;
    let mut found = Vec::new();
    let parts: Vec<Partition> = match &table {
        Some(Table::Mbr { partitions }) | Some(Table::Gpt { partitions, .. }) => partitions.clone(),
        None => Vec::new(),
    };
    if parts.is_empty() {
        if let Some(fs) = filesystems::detect(&r.read_at(0, PROBE_BYTES)?) {
            found.push(FoundFilesystem { partition: None, offset: 0, filesystem: fs });
        }
    }
    let mut sorted = parts;
    sorted.sort_by_key(|p| p.start);
    for p in sorted {
        if let Some(fs) = filesystems::detect(&r.read_at(p.start, PROBE_BYTES)?) {
            found.push(FoundFilesystem { partition: Some(p.number), offset: p.start, filesystem: fs });
        }
    }
    Ok((table, found))
}

/// The filesystem types on a raw disk (or bare filesystem) at `path`, from its partition table
/// and superblocks, largest partition first: the order in which the helper looks for the root;
/// empty when nothing can be read.
pub fn raw_filesystem_kinds(path: &Path) -> Vec<&'static str> {
    let Ok(file) = std::fs::File::open(path) else { return Vec::new() };
    let mut raw = RawAt(file);
    let Ok(size) = raw.size() else { return Vec::new() };
    let Ok((table, mut found)) = scan(&mut raw, Some(size)) else { return Vec::new() };
    let parts = match &table {
        Some(Table::Mbr { partitions }) | Some(Table::Gpt { partitions, .. }) => partitions.as_slice(),
        None => &[],
    };
    let size = |f: &FoundFilesystem| parts.iter().find(|p| Some(p.number) == f.partition).map_or(0, |p| p.size);
    found.sort_by_key(|f| std::cmp::Reverse(size(f)));
    found.into_iter().map(|f| f.filesystem.kind).collect()
}

/// Why an image could not be inspected.
#[derive(Debug, Error)]
pub enum InspectError {
    /// The image cannot be opened or read.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// Its contents do not read as its format says.
    #[error("image {name} {reason}")]
    Corrupt {
        /// The image.
        name: String,
        /// What did not read.
        reason: String,
    },
    /// A qemu-format image could not be opened in the confined qemu.
    #[error(transparent)]
    Qemu(#[from] crate::source::qemu::QemuSourceError),
    /// An interrupt stopped the inspection.
    #[error("inspecting {0} was interrupted")]
    Interrupted(String),
}

/// The message of the I/O error an interrupted read ends with.
const INTERRUPTED: &str = "interrupted";

/// Inspects `path`, stopping when `cancel` is raised.
pub fn inspect(
    path: &Path,
    confinement: &crate::vm::blockdev_qemu::Confinement,
    cancel: &AtomicBool,
) -> Result<Report, InspectError> {
    let name = path.display().to_string();
    let io = |source| SourceError::Io { name: name.clone(), source };
    let source::LocalImage { file, header, .. } = source::open_local(path)?;
    let format = source::detect(&header);
    let corrupt = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::Interrupted && cancel.load(Ordering::Relaxed) {
            return InspectError::Interrupted(name.clone());
        }
        InspectError::Corrupt { name: name.clone(), reason: format!("could not be read as {}: {e}", format.name()) }
    };
    let mut report = Report {
        image: path.to_owned(),
        format: format.name(),
        virtual_size: None,
        partition_table: None,
        filesystems: Vec::new(),
        liveimg: None,
    };
    let (table, found) = match format {
        Format::Raw => {
            let mut raw = RawAt(file);
            report.virtual_size = Some(raw.size().map_err(io)?);
            scan(&mut raw, report.virtual_size).map_err(corrupt)?
        }
        Format::Qemu(f) => {
            let image = crate::source::qemu::open(&file, &name, f, None, confinement)?;
            report.virtual_size = Some(image.info.virtual_size);
            scan(&mut QemuAt(image), report.virtual_size).map_err(corrupt)?
        }
        Format::Gzip | Format::Xz | Format::Zstd => {
            report.virtual_size = crate::source::decompress::uncompressed_size(format, path);
            let p = path.to_owned();
            let open = move || -> std::io::Result<Box<dyn Read + Send>> {
                Ok(crate::source::decompress::decompressor(format, std::fs::File::open(&p)?))
            };
            scan(&mut StreamAt { open, stream: None, pos: 0, cancel }, report.virtual_size).map_err(corrupt)?
        }
        Format::Squashfs => {
            let fs = crate::source::squashfs::open(std::io::BufReader::new(file)).map_err(|e| {
                InspectError::Corrupt { name: name.clone(), reason: format!("is not a readable squashfs: {e}") }
            })?;
            let (inner, size) = crate::job::write::liveimg_rootfs(&fs).ok_or_else(|| InspectError::Corrupt {
                name: name.clone(),
                reason: "is a squashfs without LiveOS/rootfs.img or LiveOS/ext3fs.img: not a liveimg".into(),
            })?;
            report.virtual_size = Some(size);
            report.liveimg = Some(LiveImg {
                compressor: fs.compressor.map(|c| format!("{c:?}").to_lowercase()).unwrap_or_else(|| "unknown".into()),
                block_size: fs.block_size,
                rootfs: inner.trim_start_matches('/').to_owned(),
                rootfs_size: size,
            });
            // The filesystem image's superblock is at its start: one read suffices.
            let node = fs.files().find(|n| n.fullpath == Path::new(&inner)).expect("found above");
            let backhand::InnerNode::File(f) = &node.inner else { unreachable!("a file") };
            let mut head = Vec::new();
            fs.file(f).reader().take(PROBE_BYTES as u64).read_to_end(&mut head).map_err(corrupt)?;
            let found =
                filesystems::detect(&head).map(|filesystem| FoundFilesystem { partition: None, offset: 0, filesystem });
            (None, found.into_iter().collect())
        }
    };
    report.partition_table = table;
    report.filesystems = found;
    Ok(report)
}

/// The report for people.
pub fn render(r: &Report) -> String {
    let mut out = format!("image:        {}\nformat:       {}\n", r.image.display(), r.format);
    if let Some(s) = r.virtual_size {
        out.push_str(&format!("virtual size: {s} bytes ({:.2} GiB)\n", s as f64 / (1u64 << 30) as f64));
    }
    if let Some(l) = &r.liveimg {
        out.push_str(&format!(
            "liveimg:      {} ({} bytes), squashfs {} compression, {} byte blocks\n",
            l.rootfs, l.rootfs_size, l.compressor, l.block_size
        ));
    }
    match &r.partition_table {
        Some(Table::Mbr { partitions }) | Some(Table::Gpt { partitions, .. }) => {
            let kind = if matches!(r.partition_table, Some(Table::Gpt { .. })) { "gpt" } else { "dos (MBR)" };
            out.push_str(&format!("partitions:   {kind}\n"));
            for p in partitions {
                out.push_str(&format!(
                    "  {:>3}  start {:>12}  size {:>12}  type {}{}\n",
                    p.number,
                    p.start,
                    p.size,
                    p.type_id,
                    p.name.as_ref().map(|n| format!("  name {}", one_line(n))).unwrap_or_default()
                ));
            }
        }
        None => out.push_str("partitions:   none\n"),
    }
    for f in &r.filesystems {
        let place = f.partition.map(|n| format!("partition {n}")).unwrap_or_else(|| "whole image".into());
        out.push_str(&format!(
            "filesystem:   {place}: {}{}{}{}\n",
            f.filesystem.kind,
            f.filesystem.label.as_ref().map(|l| format!(" label={}", one_line(l))).unwrap_or_default(),
            f.filesystem.uuid.as_ref().map(|u| format!(" uuid={u}")).unwrap_or_default(),
            f.filesystem.size.map(|s| format!(" size={s}")).unwrap_or_default()
        ));
    }
    out
}

/// A name from the image on one line of the table: its newlines shown as `\n`, so a label
/// cannot add a forged row (the caller escapes every other control character).
fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\n') {
        text.replace('\n', "\\n").into()
    } else {
        text.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_from_the_image_stay_on_their_line() {
        assert_eq!(one_line("root\nfilesystem:   partition 9: ext4"), "root\\nfilesystem:   partition 9: ext4");
        assert_eq!(one_line("plain"), "plain");
        let label = "root\nfilesystem:   partition 9: ext4 label=forged";
        let report = Report {
            image: "disk.img".into(),
            format: "raw",
            virtual_size: Some(1 << 20),
            partition_table: None,
            filesystems: vec![FoundFilesystem {
                partition: None,
                offset: 0,
                filesystem: imgforge_protocol::filesystems::Filesystem {
                    kind: "ext4",
                    label: Some(label.into()),
                    uuid: None,
                    size: None,
                },
            }],
            liveimg: None,
        };
        let table = render(&report);
        assert_eq!(table.lines().filter(|l| l.starts_with("filesystem:")).count(), 1, "{table}");
    }

    /// A disk in memory.
    struct MemAt(Vec<u8>);

    impl ReadAt for MemAt {
        fn read_at(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
            let start = usize::try_from(offset).unwrap_or(usize::MAX).min(self.0.len());
            Ok(self.0[start..start.saturating_add(len).min(self.0.len())].to_vec())
        }
    }

    /// Sector numbers as a hostile table holds them: small, near the disk, or huge.
    fn lba() -> impl Strategy<Value = u64> {
        prop_oneof![0u64..80, Just(u64::MAX), Just(u64::MAX / SECTOR), Just(u64::MAX / SECTOR + 1), any::<u64>()]
    }

    fn put(disk: &mut [u8], at: usize, bytes: &[u8]) {
        if let Some(slot) = at.checked_add(bytes.len()).and_then(|end| disk.get_mut(at..end)) {
            slot.copy_from_slice(bytes);
        }
    }

    /// A GPT as the tests write it: entries LBA, entry count, entry size, entries (first, last).
    type GptSpec = (u64, u32, u32, Vec<(u64, u64)>);

    /// A disk of `sectors` sectors with an MBR of `mbr` entries (type, start, count) and, when
    /// given, a GPT.
    fn disk(sectors: usize, mbr: &[(u8, u32, u32)], gpt: Option<GptSpec>) -> Vec<u8> {
        let mut d = vec![0u8; sectors * 512];
        for (i, (kind, start, count)) in mbr.iter().enumerate().take(4) {
            let e = 446 + i * 16;
            d[e + 4] = *kind;
            put(&mut d, e + 8, &start.to_le_bytes());
            put(&mut d, e + 12, &count.to_le_bytes());
        }
        d[510] = 0x55;
        d[511] = 0xaa;
        if let Some((entries_lba, count, size, entries)) = gpt {
            d[446 + 4] = 0xee;
            put(&mut d, 446 + 8, &1u32.to_le_bytes());
            put(&mut d, 446 + 12, &(sectors as u32 - 1).to_le_bytes());
            put(&mut d, 512, b"EFI PART");
            put(&mut d, 512 + 72, &entries_lba.to_le_bytes());
            put(&mut d, 512 + 80, &count.to_le_bytes());
            put(&mut d, 512 + 84, &size.to_le_bytes());
            for (i, (first, last)) in entries.iter().enumerate() {
                let Some(at) = entries_lba.checked_mul(SECTOR).and_then(|a| usize::try_from(a).ok()) else { break };
                let e = at.saturating_add(i.saturating_mul(size as usize));
                put(&mut d, e, &[0xaf; 16]);
                put(&mut d, e.saturating_add(32), &first.to_le_bytes());
                put(&mut d, e.saturating_add(40), &last.to_le_bytes());
            }
        }
        d
    }

    fn gpt() -> impl Strategy<Value = Option<GptSpec>> {
        proptest::option::of((
            prop_oneof![2u64..6, lba()],
            prop_oneof![1u32..8, Just(128), any::<u32>()],
            prop_oneof![Just(128u32), Just(256), any::<u32>()],
            proptest::collection::vec((lba(), lba()), 0..6),
        ))
    }

    proptest! {
        /// Whole tables, MBR and GPT, with hostile numbers: inspect never panics, and every
        /// partition it reports is non-empty, does not wrap and lies inside the disk.
        #[test]
        fn reported_partitions_lie_inside_the_disk(
            sectors in 3usize..96,
            mbr in proptest::collection::vec((prop_oneof![Just(0x83u8), Just(0xee), Just(0x05), any::<u8>()], prop_oneof![0u32..100, any::<u32>()], prop_oneof![1u32..100, any::<u32>()]), 0..4),
            gpt in gpt(),
        ) {
            let bytes = disk(sectors, &mbr, gpt);
            let len = bytes.len() as u64;
            if let Ok(Some(Table::Mbr { partitions } | Table::Gpt { partitions, .. })) = table(&mut MemAt(bytes), Some(len)) {
                for p in &partitions {
                    let end = p.start.checked_add(p.size);
                    prop_assert!(p.size > 0 && end.is_some_and(|e| e <= len), "{p:?} on a disk of {len} bytes");
                }
            }
        }
    }

    /// A GPT entry spanning every sector (last - first + 1 wraps) and an MBR partition past the
    /// end: refused, naming the partition.
    #[test]
    fn partitions_that_wrap_or_overrun_are_named() {
        let wrap = disk(40, &[], Some((2, 4, 128, vec![(0, u64::MAX)])));
        let e = table(&mut MemAt(wrap), Some(40 * 512)).unwrap_err().to_string();
        assert!(e.contains("partition 1 "), "{e}");
        let huge = disk(40, &[], Some((2, 4, 128, vec![(1, 2), (u64::MAX / SECTOR + 1, u64::MAX / SECTOR + 1)])));
        let e = table(&mut MemAt(huge), Some(40 * 512)).unwrap_err().to_string();
        assert!(e.contains("partition 2 "), "{e}");
        let past = disk(40, &[(0x83, 2, 10), (0x83, 30, 20)], None);
        let e = table(&mut MemAt(past), Some(40 * 512)).unwrap_err().to_string();
        assert!(e.contains("partition 2 ") && e.contains("past the end of the disk (20480 bytes)"), "{e}");
        let fine = disk(40, &[(0x83, 2, 10), (0x83, 30, 10)], None);
        assert!(table(&mut MemAt(fine), Some(40 * 512)).unwrap().is_some());
        let lba_wraps = disk(40, &[], Some((u64::MAX, 4, 128, vec![])));
        assert!(table(&mut MemAt(lba_wraps), Some(40 * 512)).is_err());
    }
}
