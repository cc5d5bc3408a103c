//! qcow2 metadata checked in Rust before any qemu opens an image — the one check every qcow2
//! opener runs (a write's source, a backing file the user allowed, the disk `customize` and
//! `verify` work on, the disk an overlay is committed into). It refuses what imgforge does
//! not need and what names other files: a backing file (unless the user allowed one), an
//! external data file, encryption, unknown incompatible features. Then every table entry that
//! maps the virtual disk is checked against the file's length: a truncated qcow2 otherwise
//! reads as zeros where its tables point past the end (qemu pads short reads), which would
//! write a silently wrong disk. Bounded by the file's length: L2 tables must be distinct,
//! cluster-aligned clusters of the file clear of the header and the L1 table (qemu requires
//! alignment too), so the tables read add up to at most the file; entries past the virtual
//! size are not read.

use imgforge_protocol::bytes::{be32, be64};
use std::collections::HashSet;
use std::os::unix::fs::FileExt;

/// What a qcow2 file starts with.
pub const MAGIC: &[u8; 4] = b"QFI\xfb";
/// Incompatible feature bits imgforge understands.
const INCOMPAT_DIRTY: u64 = 1;
const INCOMPAT_CORRUPT: u64 = 2;
const INCOMPAT_DATA_FILE: u64 = 4;
const INCOMPAT_COMPRESSION: u64 = 8;
pub(crate) const INCOMPAT_EXTENDED_L2: u64 = 16;
/// Header extension naming an external data file ("DATA").
const EXTENSION_DATA_FILE: u32 = 0x4441_5441;
/// Header length of a version 2 image (version 3 records its own).
const V2_HEADER_BYTES: u64 = 72;
/// Host offset bits of L1 and standard L2 entries.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The L2 entry bit of a compressed cluster.
pub(crate) const COMPRESSED: u64 = 1 << 62;
/// Largest L1 table qemu accepts (32 MiB of entries).
const MAX_L1_ENTRIES: u64 = 4 << 20;

/// Whether a qcow2 may name a backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Refused: the name could be any host file.
    Refused,
    /// The user named the backing file explicitly; qemu gets that file, never the name.
    Allowed,
}

/// Why a qcow2 image is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Qcow2Error {
    /// Not a qcow2 header qemu would accept.
    #[error("its qcow2 header is invalid: {0}")]
    Header(String),
    /// The image names an external data file (any host file).
    #[error("it keeps its data in an external file, which could be any host file: convert it to a self-contained image first (qemu-img convert -O qcow2)")]
    DataFile,
    /// The image names a backing file (any host file).
    #[error("it has a backing file, which could be any host file: flatten it first (qemu-img convert -O qcow2)")]
    BackingFile,
    /// The image is encrypted.
    #[error("it is encrypted: decrypt it first (qemu-img convert -O qcow2)")]
    Encrypted,
    /// qemu marked the image corrupt.
    #[error("qemu marked it corrupt: repair it with qemu-img check -r all first")]
    MarkedCorrupt,
    /// A table points past the end of the file.
    #[error("it is truncated or corrupt: its {what} at offset {offset} lies past the end of the file ({len} bytes)")]
    Truncated { what: &'static str, offset: u64, len: u64 },
    /// A table lies where no table may be.
    #[error("it is corrupt: its {what} at offset {offset} is {problem}")]
    Misplaced { what: &'static str, offset: u64, problem: &'static str },
    /// Reading the file failed.
    #[error("it cannot be read: {0}")]
    Io(String),
}

/// What the header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size.
    pub size: u64,
    /// Entries in the L1 table.
    pub l1_entries: u64,
    /// Where the L1 table is.
    pub l1_offset: u64,
    /// Whether a backing file is named.
    pub has_backing: bool,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Encryption method (0: none).
    pub crypt_method: u32,
    /// Where the header extensions start.
    pub header_bytes: u64,
}

/// Parses a qcow2 header (pure).
pub fn parse_header(b: &[u8]) -> Result<Header, Qcow2Error> {
    let short = || Qcow2Error::Header("it is shorter than a qcow2 header".into());
    if b.get(..4) != Some(MAGIC) {
        return Err(Qcow2Error::Header("no qcow2 magic".into()));
    }
    let version = be32(b, 4).ok_or_else(short)?;
    let (incompatible, header_bytes) = match version {
        2 => (0, V2_HEADER_BYTES),
        3 => (be64(b, 72).ok_or_else(short)?, u64::from(be32(b, 100).ok_or_else(short)?)),
        v => return Err(Qcow2Error::Header(format!("version {v} is unknown"))),
    };
    let cluster_bits = be32(b, 20).ok_or_else(short)?;
    if !(9..=21).contains(&cluster_bits) {
        return Err(Qcow2Error::Header(format!("cluster bits {cluster_bits} out of range")));
    }
    if header_bytes < V2_HEADER_BYTES || header_bytes >= 1u64 << cluster_bits {
        return Err(Qcow2Error::Header(format!("a header of {header_bytes} bytes")));
    }
    let l1_entries = u64::from(be32(b, 36).ok_or_else(short)?);
    if l1_entries > MAX_L1_ENTRIES {
        return Err(Qcow2Error::Header(format!("an L1 table of {l1_entries} entries")));
    }
    let known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTENDED_L2;
    if incompatible & !known != 0 {
        return Err(Qcow2Error::Header(format!("unknown incompatible features {:#x}", incompatible & !known)));
    }
    Ok(Header {
        cluster_bits,
        size: be64(b, 24).ok_or_else(short)?,
        l1_entries,
        l1_offset: be64(b, 40).ok_or_else(short)?,
        has_backing: be64(b, 8).ok_or_else(short)? != 0,
        incompatible,
        crypt_method: be32(b, 32).ok_or_else(short)?,
        header_bytes,
    })
}

/// The backing file a qcow2 names and its format (the "backing file format name" header
/// extension, if any), from the image's first bytes `first` (up to its first cluster) and
/// its parsed `header`; `None` when it names none or the name lies outside `first` (pure).
pub fn backing_of(first: &[u8], header: &Header) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
    const EXTENSION_BACKING_FORMAT: u32 = 0xE279_2ACA;
    let offset = usize::try_from(be64(first, 8)?).ok()?;
    let len = usize::try_from(be32(first, 16)?).ok()?;
    if offset == 0 {
        return None;
    }
    let name = first.get(offset..offset.checked_add(len)?)?.to_vec();
    let area = first.get(usize::try_from(header.header_bytes).ok()?..)?;
    let mut at = 0usize;
    let mut format = None;
    while let (Some(kind), Some(len)) = (be32(area, at), be32(area, at + 4)) {
        if kind == 0 {
            break;
        }
        let len = usize::try_from(len).ok()?;
        if kind == EXTENSION_BACKING_FORMAT {
            format = Some(area.get(at + 8..(at + 8).checked_add(len)?)?.to_vec());
        }
        at = at.checked_add(8)?.checked_add(len.checked_add(7)? & !7)?;
    }
    Some((name, format))
}

/// The header extension types in `area` (the bytes after the header, up to the end of the
/// first cluster), up to the end marker (pure).
fn extension_types(area: &[u8]) -> Vec<u32> {
    let mut types = Vec::new();
    let mut at = 0usize;
    while let (Some(kind), Some(len)) = (be32(area, at), be32(area, at + 4)) {
        if kind == 0 {
            break;
        }
        types.push(kind);
        // Data is padded to 8 bytes; a length running past the area ends the list.
        let Some(next) = usize::try_from(len).ok().and_then(|l| l.checked_add(7)).map(|l| at + 8 + (l & !7)) else {
            break;
        };
        at = next;
    }
    types
}

/// Refuses what the header asks for that imgforge does not allow (pure).
fn refuse_features(header: &Header, extensions: &[u32], backing: Backing) -> Result<(), Qcow2Error> {
    if header.incompatible & INCOMPAT_DATA_FILE != 0 || extensions.contains(&EXTENSION_DATA_FILE) {
        return Err(Qcow2Error::DataFile);
    }
    if header.has_backing && backing == Backing::Refused {
        return Err(Qcow2Error::BackingFile);
    }
    if header.crypt_method != 0 {
        return Err(Qcow2Error::Encrypted);
    }
    if header.incompatible & INCOMPAT_CORRUPT != 0 {
        return Err(Qcow2Error::MarkedCorrupt);
    }
    Ok(())
}

/// Where one L2 entry's data lies, if anywhere: (offset, what) (pure).
fn l2_data_offset(entry: u64, cluster_bits: u32) -> Option<u64> {
    if entry & COMPRESSED != 0 {
        // Compressed: the host offset takes the low 62 - (cluster_bits - 8) bits.
        let bits = 62 - (cluster_bits - 8);
        return Some(entry & ((1u64 << bits) - 1));
    }
    Some(entry & OFFSET_MASK).filter(|o| *o != 0)
}

/// Checks the header and every mapping L1/L2 entry of the qcow2 `file` (`len` bytes long).
pub fn check(file: &std::fs::File, len: u64, backing: Backing) -> Result<Header, Qcow2Error> {
    let read = |offset: u64, n: u64| -> Result<Vec<u8>, Qcow2Error> {
        // Every length here was checked against the file's length first.
        let n = usize::try_from(n).map_err(|_| Qcow2Error::Io(format!("a table of {n} bytes")))?;
        let mut buf = vec![0u8; n];
        file.read_exact_at(&mut buf, offset).map_err(|e| Qcow2Error::Io(e.to_string()))?;
        Ok(buf)
    };
    let header = parse_header(&read(0, len.min(104))?)?;
    let cluster = 1u64 << header.cluster_bits;
    let extensions = if header.header_bytes < len {
        extension_types(&read(header.header_bytes, len.min(cluster) - header.header_bytes)?)
    } else {
        Vec::new()
    };
    refuse_features(&header, &extensions, backing)?;
    let past_end = |offset: u64, n: u64| offset.checked_add(n).is_none_or(|end| end > len);
    let l1_bytes = header.l1_entries * 8;
    if !header.l1_offset.is_multiple_of(cluster) || header.l1_offset == 0 {
        return Err(Qcow2Error::Misplaced { what: "L1 table", offset: header.l1_offset, problem: PLACEMENT });
    }
    if past_end(header.l1_offset, l1_bytes) {
        return Err(Qcow2Error::Truncated { what: "L1 table", offset: header.l1_offset, len });
    }
    // Extended L2 entries carry a second word (subcluster bits) after the mapping.
    let entry_len: usize = if header.incompatible & INCOMPAT_EXTENDED_L2 != 0 { 16 } else { 8 };
    let entry_bytes = entry_len as u64;
    let l2_entries = cluster / entry_bytes;
    // Only the entries that map the virtual disk matter (qemu reads no others).
    let guest_clusters = header.size.div_ceil(cluster);
    let l1_used = guest_clusters.div_ceil(l2_entries).min(header.l1_entries);
    let l1 = read(header.l1_offset, l1_used * 8)?;
    let l1_end = header.l1_offset + l1_bytes;
    let mut seen = HashSet::new();
    for (index, l1_entry) in (0u64..).zip(l1.chunks_exact(8).filter_map(|c| be64(c, 0))) {
        let l2_offset = l1_entry & OFFSET_MASK;
        if l2_offset == 0 {
            continue;
        }
        let misplaced = !l2_offset.is_multiple_of(cluster)
            || l2_offset < cluster
            || (l2_offset < l1_end && header.l1_offset < l2_offset + cluster);
        if misplaced {
            return Err(Qcow2Error::Misplaced { what: "L2 table", offset: l2_offset, problem: PLACEMENT });
        }
        if !seen.insert(l2_offset) {
            continue;
        }
        if past_end(l2_offset, cluster) {
            return Err(Qcow2Error::Truncated { what: "L2 table", offset: l2_offset, len });
        }
        let mapped = (guest_clusters - index * l2_entries).min(l2_entries);
        let l2 = read(l2_offset, mapped * entry_bytes)?;
        for entry in l2.chunks_exact(entry_len).filter_map(|c| be64(c, 0)) {
            if let Some(data) = l2_data_offset(entry, header.cluster_bits) {
                if data >= len {
                    return Err(Qcow2Error::Truncated { what: "data cluster", offset: data, len });
                }
            }
        }
    }
    Ok(header)
}

/// Where tables may lie, for messages.
const PLACEMENT: &str = "not on a cluster boundary, or on the header or the L1 table";

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: u32, cluster_bits: u32, incompat: u64) -> Vec<u8> {
        let mut b = vec![0u8; 104];
        b[..4].copy_from_slice(b"QFI\xfb");
        b[4..8].copy_from_slice(&version.to_be_bytes());
        b[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        b[36..40].copy_from_slice(&2u32.to_be_bytes());
        b[40..48].copy_from_slice(&65536u64.to_be_bytes());
        b[72..80].copy_from_slice(&incompat.to_be_bytes());
        b[100..104].copy_from_slice(&104u32.to_be_bytes());
        b
    }

    #[test]
    fn backing_names_and_formats() {
        let mut b = header(3, 16, 0);
        // Extensions: the backing format ("raw", padded to 8), then the end marker.
        b.extend_from_slice(&0xE279_2ACAu32.to_be_bytes());
        b.extend_from_slice(&3u32.to_be_bytes());
        b.extend_from_slice(b"raw\0\0\0\0\0");
        b.extend_from_slice(&[0; 8]);
        let name_at = b.len() as u64;
        b.extend_from_slice(b"/srv/base.img");
        b[8..16].copy_from_slice(&name_at.to_be_bytes());
        b[16..20].copy_from_slice(&13u32.to_be_bytes());
        let h = parse_header(&b).unwrap();
        assert_eq!(backing_of(&b, &h), Some((b"/srv/base.img".to_vec(), Some(b"raw".to_vec()))));
        assert_eq!(backing_of(&b[..b.len() - 1], &h), None, "a name past the bytes given");
        let mut none = b.clone();
        none[8..16].fill(0);
        assert_eq!(backing_of(&none, &h), None);
    }

    #[test]
    fn headers() {
        let h = parse_header(&header(3, 16, 0)).unwrap();
        assert_eq!((h.cluster_bits, h.size, h.l1_entries, h.has_backing), (16, 1 << 30, 2, false));
        assert!(matches!(parse_header(&header(4, 16, 0)), Err(Qcow2Error::Header(_))));
        assert!(matches!(parse_header(&header(3, 8, 0)), Err(Qcow2Error::Header(_))));
        assert!(matches!(parse_header(&header(3, 16, 1 << 9)), Err(Qcow2Error::Header(_))));
        assert!(matches!(parse_header(&header(3, 16, 0)[..50]), Err(Qcow2Error::Header(_))));
        assert_eq!(parse_header(&header(2, 16, 0xff)).unwrap().incompatible, 0, "v2 has no feature bits");
    }

    #[test]
    fn entries() {
        assert_eq!(l2_data_offset(0, 16), None);
        assert_eq!(l2_data_offset(0x8000_0000_0005_0000, 16), Some(0x50000));
        assert_eq!(l2_data_offset(1, 16), None, "the zero flag alone");
        assert_eq!(l2_data_offset(COMPRESSED | 0x1234, 16), Some(0x1234));
    }

    /// Real images made by qemu-img: a whole one passes, a cut one names what lies past the end.
    #[test]
    fn real_images() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("d.raw");
        std::fs::write(&raw, (0..4u32 << 20).map(|i| (i % 7) as u8).collect::<Vec<u8>>()).unwrap();
        let q = dir.path().join("d.qcow2");
        let made = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&q)
            .status()
            .expect("qemu-utils is installed by scripts/setup.sh");
        assert!(made.success());
        let file = std::fs::File::open(&q).unwrap();
        let len = file.metadata().unwrap().len();
        assert_eq!(check(&file, len, Backing::Refused).unwrap().size, 4 << 20);
        let err = check(&file, len / 2, Backing::Refused).unwrap_err();
        assert!(matches!(err, Qcow2Error::Truncated { .. }), "{err}");
    }

    fn qemu_img(args: &[&str]) {
        let made = std::process::Command::new("qemu-img").args(args).output().expect("qemu-utils is installed");
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    }

    fn check_path(path: &std::path::Path, backing: Backing) -> Result<Header, Qcow2Error> {
        let file = std::fs::File::open(path).unwrap();
        check(&file, file.metadata().unwrap().len(), backing)
    }

    /// Real images made by qemu-img that name other files: refused whatever their names say.
    #[test]
    fn other_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host-file");
        std::fs::write(&host, vec![b's'; 1 << 20]).unwrap();
        let q = |name: &str| dir.path().join(name).display().to_string();
        let host = host.display().to_string();
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", &format!("data_file={host}"), &q("data.qcow2"), "1M"]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={host},data_file_raw=on"),
            &q("raw.qcow2"),
            "1M",
        ]);
        qemu_img(&["create", "-q", "-f", "qcow2", "-F", "raw", "-b", &host, &q("backed.qcow2"), "1M"]);
        let json =
            format!("json:{{\"driver\": \"raw\", \"file\": {{\"driver\": \"file\", \"filename\": \"{host}\"}}}}");
        qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", &json, &q("json.qcow2"), "1M"]);
        for name in ["data.qcow2", "raw.qcow2"] {
            for backing in [Backing::Refused, Backing::Allowed] {
                assert_eq!(check_path(q(name).as_ref(), backing), Err(Qcow2Error::DataFile), "{name}");
            }
        }
        for name in ["backed.qcow2", "json.qcow2"] {
            assert_eq!(check_path(q(name).as_ref(), Backing::Refused), Err(Qcow2Error::BackingFile), "{name}");
            assert!(check_path(q(name).as_ref(), Backing::Allowed).unwrap().has_backing);
        }
        // The data file's header extension alone (its feature bit cleared) is refused too.
        let mut bytes = std::fs::read(q("data.qcow2")).unwrap();
        bytes[79] &= !(INCOMPAT_DATA_FILE as u8);
        std::fs::write(q("ext.qcow2"), &bytes).unwrap();
        assert_eq!(check_path(q("ext.qcow2").as_ref(), Backing::Refused), Err(Qcow2Error::DataFile));
        // Encryption: the method field set on a plain image.
        qemu_img(&["create", "-q", "-f", "qcow2", &q("plain.qcow2"), "1M"]);
        let mut bytes = std::fs::read(q("plain.qcow2")).unwrap();
        check_path(q("plain.qcow2").as_ref(), Backing::Refused).unwrap();
        bytes[35] = 2;
        std::fs::write(q("crypt.qcow2"), &bytes).unwrap();
        assert_eq!(check_path(q("crypt.qcow2").as_ref(), Backing::Refused), Err(Qcow2Error::Encrypted));
    }

    /// A crafted image with 2 MiB clusters whose L1 names 12000 distinct, unaligned L2 offsets
    /// in an 8 MiB file: the check once read 2 MiB for each (24 GiB, 2.5 minutes); now the
    /// first unaligned one ends it, and an aligned L2 table on the L1 table is refused too.
    #[test]
    fn misplaced_l2_tables_end_the_check_at_once() {
        const CLUSTER_BITS: u32 = 21;
        const L1_ENTRIES: u64 = 12000;
        let cluster = 1u64 << CLUSTER_BITS;
        let mut b = header(3, CLUSTER_BITS, 0);
        b.resize(8 << 20, 0);
        let size = L1_ENTRIES * cluster * (cluster / 8);
        b[24..32].copy_from_slice(&size.to_be_bytes());
        b[36..40].copy_from_slice(&(L1_ENTRIES as u32).to_be_bytes());
        b[40..48].copy_from_slice(&cluster.to_be_bytes());
        let l1 = cluster as usize;
        for i in 0..L1_ENTRIES as usize {
            let l2 = (1u64 << 63) | (cluster + 0x200 * (i as u64 + 1));
            b[l1 + 8 * i..l1 + 8 * i + 8].copy_from_slice(&l2.to_be_bytes());
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slow.qcow2");
        std::fs::write(&path, &b).unwrap();
        let started = std::time::Instant::now();
        let err = check_path(&path, Backing::Refused).unwrap_err();
        assert!(matches!(err, Qcow2Error::Misplaced { what: "L2 table", .. }), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());

        // Aligned, but the L1 table's own cluster.
        b[l1..l1 + 8].copy_from_slice(&cluster.to_be_bytes());
        std::fs::write(&path, &b).unwrap();
        let err = check_path(&path, Backing::Refused).unwrap_err();
        assert!(matches!(err, Qcow2Error::Misplaced { offset, .. } if offset == cluster), "{err}");
        // Aligned and clear of the tables, each distinct cluster read once: passes.
        for i in 0..L1_ENTRIES as usize {
            let l2 = (i as u64 % 2 + 2) * cluster;
            b[l1 + 8 * i..l1 + 8 * i + 8].copy_from_slice(&l2.to_be_bytes());
        }
        std::fs::write(&path, &b).unwrap();
        check_path(&path, Backing::Refused).unwrap();
    }

    #[test]
    fn extension_lists() {
        let mut area = Vec::new();
        for (kind, data) in [(0xe279_2aca_u32, &b"raw"[..]), (EXTENSION_DATA_FILE, b"/etc/passwd")] {
            area.extend(kind.to_be_bytes());
            area.extend((data.len() as u32).to_be_bytes());
            area.extend(data);
            area.resize(area.len().div_ceil(8) * 8, 0);
        }
        area.extend([0u8; 8]);
        assert_eq!(extension_types(&area), vec![0xe279_2aca, EXTENSION_DATA_FILE]);
        assert_eq!(extension_types(&[0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff]), vec![1], "a length past the end ends it");
        assert!(extension_types(&[]).is_empty());
    }

    proptest::proptest! {
        #[test]
        fn header_parsing_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120)) {
            let mut b = bytes;
            if b.len() >= 4 { b[..4].copy_from_slice(b"QFI\xfb"); }
            let _ = parse_header(&b);
            let _ = extension_types(&b);
            if b.len() >= 8 { let _ = l2_data_offset(be64(&b, 0).unwrap_or(0), 9 + u32::from(b[0] % 13)); }
        }
    }
}
