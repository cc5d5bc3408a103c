//! qcow2 metadata checked in Rust before the confined qemu opens an image: the header's
//! feature bits and every table entry against the file's length. A truncated qcow2 otherwise
//! reads as zeros where its tables point past the end (qemu pads short reads), which would
//! write a silently wrong disk. Bounded: each L2 table is read once, however many L1 entries
//! name it.

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
const INCOMPAT_EXTENDED_L2: u64 = 16;
/// Host offset bits of L1 and standard L2 entries.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;
/// Largest L1 table qemu accepts (32 MiB of entries).
const MAX_L1_ENTRIES: u64 = 4 << 20;

/// Why a qcow2 image is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Qcow2Error {
    /// Not a qcow2 header qemu would accept.
    #[error("its qcow2 header is invalid: {0}")]
    Header(String),
    /// The image names an external data file (any host file).
    #[error("it keeps its data in an external file: convert it to a self-contained image first")]
    DataFile,
    /// qemu marked the image corrupt.
    #[error("qemu marked it corrupt: repair it with qemu-img check -r all first")]
    MarkedCorrupt,
    /// A table points past the end of the file.
    #[error("it is truncated or corrupt: its {what} at offset {offset} lies past the end of the file ({len} bytes)")]
    Truncated { what: &'static str, offset: u64, len: u64 },
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
}

/// Parses a qcow2 header (pure).
pub fn parse_header(b: &[u8]) -> Result<Header, Qcow2Error> {
    let short = || Qcow2Error::Header("it is shorter than a qcow2 header".into());
    if b.get(..4) != Some(MAGIC) {
        return Err(Qcow2Error::Header("no qcow2 magic".into()));
    }
    let version = be32(b, 4).ok_or_else(short)?;
    let incompatible = match version {
        2 => 0,
        3 => be64(b, 72).ok_or_else(short)?,
        v => return Err(Qcow2Error::Header(format!("version {v} is unknown"))),
    };
    let cluster_bits = be32(b, 20).ok_or_else(short)?;
    if !(9..=21).contains(&cluster_bits) {
        return Err(Qcow2Error::Header(format!("cluster bits {cluster_bits} out of range")));
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
    })
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

/// Checks the header and every L1/L2 entry of the qcow2 `file` (`len` bytes long).
pub fn check(file: &std::fs::File, len: u64) -> Result<Header, Qcow2Error> {
    let read = |offset: u64, n: u64| -> Result<Vec<u8>, Qcow2Error> {
        // Every length here was checked against the file's length first.
        let n = usize::try_from(n).map_err(|_| Qcow2Error::Io(format!("a table of {n} bytes")))?;
        let mut buf = vec![0u8; n];
        file.read_exact_at(&mut buf, offset).map_err(|e| Qcow2Error::Io(e.to_string()))?;
        Ok(buf)
    };
    let header = parse_header(&read(0, len.min(104))?)?;
    if header.incompatible & INCOMPAT_DATA_FILE != 0 {
        return Err(Qcow2Error::DataFile);
    }
    if header.incompatible & INCOMPAT_CORRUPT != 0 {
        return Err(Qcow2Error::MarkedCorrupt);
    }
    let cluster = 1u64 << header.cluster_bits;
    let past_end = |offset: u64, n: u64| offset.checked_add(n).is_none_or(|end| end > len);
    let l1_bytes = header.l1_entries * 8;
    if past_end(header.l1_offset, l1_bytes) {
        return Err(Qcow2Error::Truncated { what: "L1 table", offset: header.l1_offset, len });
    }
    let l1 = read(header.l1_offset, l1_bytes)?;
    let entry_bytes = if header.incompatible & INCOMPAT_EXTENDED_L2 != 0 { 16 } else { 8 };
    let mut seen = HashSet::new();
    for l1_entry in l1.chunks_exact(8).filter_map(|c| be64(c, 0)) {
        let l2_offset = l1_entry & OFFSET_MASK;
        if l2_offset == 0 || !seen.insert(l2_offset) {
            continue;
        }
        if past_end(l2_offset, cluster) {
            return Err(Qcow2Error::Truncated { what: "L2 table", offset: l2_offset, len });
        }
        let l2 = read(l2_offset, cluster)?;
        for entry in l2.chunks_exact(entry_bytes).filter_map(|c| be64(c, 0)) {
            if let Some(data) = l2_data_offset(entry, header.cluster_bits) {
                if data >= len {
                    return Err(Qcow2Error::Truncated { what: "data cluster", offset: data, len });
                }
            }
        }
    }
    Ok(header)
}

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
        b
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
        assert_eq!(check(&file, len).unwrap().size, 4 << 20);
        let err = check(&file, len / 2).unwrap_err();
        assert!(matches!(err, Qcow2Error::Truncated { .. }), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn header_parsing_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120)) {
            let mut b = bytes;
            if b.len() >= 4 { b[..4].copy_from_slice(b"QFI\xfb"); }
            let _ = parse_header(&b);
            if b.len() >= 8 { let _ = l2_data_offset(be64(&b, 0).unwrap_or(0), 9 + u32::from(b[0] % 13)); }
        }
    }
}
