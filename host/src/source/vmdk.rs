//! VMDK checked in Rust before the confined qemu opens it: only a single-file sparse image
//! (`KDMV` header, monolithicSparse or streamOptimized) is served. qemu's vmdk driver opens
//! the extents a descriptor names *by path*: a `KDMV` header with capacity 0 and an embedded
//! descriptor reading `RW 8 FLAT "/etc/passwd"` made qemu copy that host file into the output.

use imgforge_protocol::bytes::{le32, le64};
use std::os::unix::fs::FileExt;

/// What a sparse VMDK starts with.
pub const MAGIC: &[u8; 4] = b"KDMV";
/// Bytes per VMDK sector.
const SECTOR_BYTES: u64 = 512;
/// Length of the sparse extent header.
const HEADER_BYTES: usize = 512;
/// Largest embedded descriptor read (qemu reads at most 1 MiB of one).
const MAX_DESCRIPTOR_BYTES: u64 = 1 << 20;
/// The layouts that keep everything in the one file.
const SINGLE_FILE_TYPES: [&str; 2] = ["monolithicSparse", "streamOptimized"];

/// Why a VMDK is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VmdkError {
    /// Not a sparse extent header.
    #[error("its VMDK header is invalid: {0}")]
    Header(String),
    /// A descriptor in place of a disk: its extents are other files.
    #[error("its header has capacity 0, so qemu would read the disk from the files its descriptor names (any host file): convert it to a single-file image first (qemu-img convert -O vmdk -o subformat=streamOptimized)")]
    DescriptorOnly,
    /// The embedded descriptor describes something other than this one file.
    #[error("its descriptor {0}: only single-file monolithicSparse or streamOptimized VMDKs are read (convert it with qemu-img convert -O vmdk -o subformat=streamOptimized)")]
    Descriptor(String),
    /// Reading the file failed.
    #[error("it cannot be read: {0}")]
    Io(String),
}

/// The fields of a sparse extent header that decide what qemu opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Virtual size in sectors.
    pub capacity_sectors: u64,
    /// Where the embedded descriptor is (sectors; 0: none).
    pub descriptor_sector: u64,
    /// Its length (sectors).
    pub descriptor_sectors: u64,
}

/// Parses a sparse extent header (pure).
pub fn parse_header(b: &[u8]) -> Result<Header, VmdkError> {
    let short = || VmdkError::Header("it is shorter than a VMDK header".into());
    if b.get(..4) != Some(MAGIC) {
        return Err(VmdkError::Header("no KDMV magic".into()));
    }
    let version = le32(b, 4).ok_or_else(short)?;
    if !(1..=3).contains(&version) {
        return Err(VmdkError::Header(format!("version {version} is unknown")));
    }
    let header = Header {
        capacity_sectors: le64(b, 12).ok_or_else(short)?,
        descriptor_sector: le64(b, 28).ok_or_else(short)?,
        descriptor_sectors: le64(b, 36).ok_or_else(short)?,
    };
    if header.capacity_sectors == 0 {
        return Err(VmdkError::DescriptorOnly);
    }
    Ok(header)
}

/// Checks an embedded descriptor: one sparse extent (this file), a single-file layout, no
/// parent (pure).
pub fn check_descriptor(text: &str) -> Result<(), VmdkError> {
    let refuse = |what: String| Err(VmdkError::Descriptor(what));
    let mut create_type = None;
    let mut extents = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            let value = value.trim().trim_matches('"');
            match key.trim() {
                "createType" => create_type = Some(value.to_owned()),
                "parentFileNameHint" => return refuse(format!("names a parent file {value:?}")),
                _ => {}
            }
            continue;
        }
        let mut words = line.split_whitespace();
        if matches!(words.next(), Some("RW" | "RDONLY" | "NOACCESS")) {
            extents.push(words.nth(1).unwrap_or("").to_owned());
        }
    }
    match create_type.as_deref() {
        Some(t) if SINGLE_FILE_TYPES.contains(&t) => {}
        Some(t) => return refuse(format!("says createType {t:?}")),
        None => return refuse("has no createType".into()),
    }
    match extents.as_slice() {
        [kind] if kind == "SPARSE" => Ok(()),
        _ => refuse(format!("lists the extents {extents:?} where one SPARSE extent (this file) is expected")),
    }
}

/// Checks the VMDK `file` (`len` bytes long) before qemu opens it.
pub fn check(file: &std::fs::File, len: u64) -> Result<Header, VmdkError> {
    let io = |e: std::io::Error| VmdkError::Io(e.to_string());
    let mut head = vec![0u8; HEADER_BYTES.min(usize::try_from(len).unwrap_or(HEADER_BYTES))];
    file.read_exact_at(&mut head, 0).map_err(io)?;
    let header = parse_header(&head)?;
    if header.descriptor_sector == 0 {
        return Ok(header);
    }
    let offset = header.descriptor_sector.saturating_mul(SECTOR_BYTES);
    let bytes = header.descriptor_sectors.saturating_mul(SECTOR_BYTES).min(MAX_DESCRIPTOR_BYTES);
    if offset.checked_add(bytes).is_none_or(|end| end > len) {
        return Err(VmdkError::Header(format!("its descriptor at byte {offset} lies past the end of the file")));
    }
    let mut text = vec![0u8; usize::try_from(bytes).map_err(|_| VmdkError::Header("a huge descriptor".into()))?];
    file.read_exact_at(&mut text, offset).map_err(io)?;
    let end = text.iter().position(|b| *b == 0).unwrap_or(text.len());
    check_descriptor(&String::from_utf8_lossy(&text[..end]))?;
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(capacity: u64, descriptor_sector: u64) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_BYTES];
        b[..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[12..20].copy_from_slice(&capacity.to_le_bytes());
        b[28..36].copy_from_slice(&descriptor_sector.to_le_bytes());
        b[36..44].copy_from_slice(&1u64.to_le_bytes());
        b
    }

    #[test]
    fn headers() {
        assert_eq!(parse_header(&header(2048, 1)).unwrap().capacity_sectors, 2048);
        assert_eq!(parse_header(&header(0, 1)), Err(VmdkError::DescriptorOnly));
        assert!(matches!(parse_header(&header(2048, 1)[..20]), Err(VmdkError::Header(_))));
        let mut v9 = header(2048, 1);
        v9[4] = 9;
        assert!(matches!(parse_header(&v9), Err(VmdkError::Header(_))));
    }

    #[test]
    fn descriptors() {
        let ok = "# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicSparse\"\nRW 2048 SPARSE \"s.vmdk\"\n";
        check_descriptor(ok).unwrap();
        check_descriptor(&ok.replace("monolithicSparse", "streamOptimized")).unwrap();
        let refused = [
            ok.replace("monolithicSparse", "monolithicFlat"),
            ok.replace("SPARSE", "FLAT"),
            ok.replace("RW 2048 SPARSE \"s.vmdk\"", "RW 8 FLAT \"/etc/passwd\" 0"),
            format!("{ok}RW 8 FLAT \"/etc/passwd\" 0\n"),
            format!("{ok}parentFileNameHint=\"/etc/shadow\"\n"),
            ok.replace("createType=\"monolithicSparse\"\n", ""),
            "createType=\"monolithicSparse\"\n".into(),
        ];
        for text in refused {
            assert!(matches!(check_descriptor(&text), Err(VmdkError::Descriptor(_))), "{text}");
        }
    }

    /// Images qemu-img makes pass; the capacity-0 image that read a host file does not.
    #[test]
    fn real_and_crafted_images() {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["monolithicSparse", "streamOptimized"] {
            let p = dir.path().join(format!("{sub}.vmdk"));
            let made = std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "vmdk", "-o", &format!("subformat={sub}")])
                .arg(&p)
                .arg("1M")
                .status()
                .expect("qemu-utils is installed");
            assert!(made.success());
            let f = std::fs::File::open(&p).unwrap();
            assert_eq!(check(&f, f.metadata().unwrap().len()).unwrap().capacity_sectors, 2048, "{sub}");
        }
        let mut evil = header(0, 1);
        evil.extend(b"createType=\"monolithicFlat\"\nRW 8 FLAT \"/etc/passwd\" 0\n");
        evil.resize(1024, 0);
        let p = dir.path().join("evil.vmdk");
        std::fs::write(&p, &evil).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        assert_eq!(check(&f, 1024), Err(VmdkError::DescriptorOnly));
        // The same descriptor behind a non-zero capacity: refused for its extents.
        evil[12] = 8;
        std::fs::write(&p, &evil).unwrap();
        assert!(matches!(check(&f, 1024), Err(VmdkError::Descriptor(_))));
        // A descriptor said to lie past the end.
        assert!(matches!(check(&f, 600), Err(VmdkError::Header(_))));
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let mut b = bytes;
            if b.len() >= 4 { b[..4].copy_from_slice(MAGIC); }
            let _ = parse_header(&b);
            let _ = check_descriptor(&String::from_utf8_lossy(&b));
        }
    }
}
