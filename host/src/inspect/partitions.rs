//! MBR and GPT partition tables, parsed from bytes (pure, bounded, never panics).

use serde::Serialize;
use thiserror::Error;

/// Sector size the tables are read with.
pub const SECTOR: u64 = 512;
/// Most GPT entries read (the standard array holds 128).
pub const MAX_GPT_ENTRIES: u32 = 256;

/// A malformed table.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TableError {
    /// Too few bytes.
    #[error("partition table truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Needed.
        need: usize,
        /// Present.
        have: usize,
    },
    /// GPT header fields out of range.
    #[error("GPT header invalid: {0}")]
    BadGpt(String),
    /// A partition whose bounds do not fit the numbers or the disk.
    #[error("partition {number} {reason}")]
    BadPartition {
        /// Its number in the table.
        number: u32,
        /// What is wrong with it.
        reason: String,
    },
}

/// `sectors` sectors in bytes, or an error naming partition `number` (image data: no wrap).
fn sector_bytes(number: u32, what: &str, sectors: u64) -> Result<u64, TableError> {
    sectors.checked_mul(SECTOR).ok_or_else(|| TableError::BadPartition {
        number,
        reason: format!("{what} {sectors} sectors is past the largest disk"),
    })
}

/// Checks that every partition lies inside a disk of `disk_bytes` bytes and is not empty.
pub fn check_within(partitions: &[Partition], disk_bytes: u64) -> Result<(), TableError> {
    for p in partitions {
        let bad = |reason: String| TableError::BadPartition { number: p.number, reason };
        let end = p.start.checked_add(p.size).ok_or_else(|| bad("ends past the largest disk".into()))?;
        if p.size == 0 {
            return Err(bad("is empty".into()));
        }
        if end > disk_bytes {
            return Err(bad(format!(
                "(bytes {} to {end}) ends past the end of the disk ({disk_bytes} bytes)",
                p.start
            )));
        }
    }
    Ok(())
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Partition {
    /// 1-based number.
    pub number: u32,
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
    /// MBR type byte (as hex) or GPT type GUID.
    pub type_id: String,
    /// GPT partition name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A partition table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Table {
    /// DOS/MBR label.
    Mbr {
        /// Primary partitions (extended partitions are listed as such, not walked).
        partitions: Vec<Partition>,
    },
    /// GUID partition table.
    Gpt {
        /// Disk GUID.
        disk_guid: String,
        /// Used entries.
        partitions: Vec<Partition>,
    },
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Formats a GUID stored in GPT's mixed-endian layout.
pub fn guid(b: &[u8]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{}",
        le32(b, 0),
        u16::from_le_bytes([b[4], b[5]]),
        u16::from_le_bytes([b[6], b[7]]),
        b[8],
        b[9],
        b[10..16].iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

/// Parses sector 0: `None` if it has no boot signature or holds only a protective MBR entry.
pub fn parse_mbr(sector0: &[u8]) -> Result<Option<(Vec<Partition>, bool)>, TableError> {
    if sector0.len() < 512 {
        return Err(TableError::Truncated { need: 512, have: sector0.len() });
    }
    if sector0[510..512] != [0x55, 0xaa] {
        return Ok(None);
    }
    let mut parts = Vec::new();
    let mut protective = false;
    for (i, number) in (0..4).zip(1u32..) {
        let e = &sector0[446 + i * 16..446 + (i + 1) * 16];
        let kind = e[4];
        let (start, count) = (le32(e, 8) as u64, le32(e, 12) as u64);
        if kind == 0 || count == 0 {
            continue;
        }
        if kind == 0xee {
            protective = true;
        }
        parts.push(Partition {
            number,
            start: sector_bytes(number, "start", start)?,
            size: sector_bytes(number, "length", count)?,
            type_id: format!("{kind:02x}"),
            name: None,
        });
    }
    Ok(Some((parts, protective)))
}

/// Parses a GPT header (sector 1) and returns (entries LBA, entry count, entry size, disk GUID).
pub fn parse_gpt_header(sector1: &[u8]) -> Result<Option<(u64, u32, u32, String)>, TableError> {
    if sector1.len() < 92 {
        return Err(TableError::Truncated { need: 92, have: sector1.len() });
    }
    if &sector1[..8] != b"EFI PART" {
        return Ok(None);
    }
    let entries_lba = le64(sector1, 72);
    let count = le32(sector1, 80);
    let entry_size = le32(sector1, 84);
    if !(128..=4096).contains(&entry_size) || !entry_size.is_power_of_two() {
        return Err(TableError::BadGpt(format!("entry size {entry_size}")));
    }
    if count == 0 || count > MAX_GPT_ENTRIES * 4 {
        return Err(TableError::BadGpt(format!("{count} entries")));
    }
    if entries_lba < 2 {
        return Err(TableError::BadGpt(format!("entries at LBA {entries_lba}")));
    }
    Ok(Some((entries_lba, count.min(MAX_GPT_ENTRIES), entry_size, guid(&sector1[56..72]))))
}

/// Parses the GPT entry array.
pub fn parse_gpt_entries(bytes: &[u8], count: u32, entry_size: u32) -> Result<Vec<Partition>, TableError> {
    if entry_size < 128 {
        return Err(TableError::BadGpt(format!("entry size {entry_size}")));
    }
    let need = count as usize * entry_size as usize;
    if bytes.len() < need {
        return Err(TableError::Truncated { need, have: bytes.len() });
    }
    let mut parts = Vec::new();
    for (i, number) in (0..count as usize).zip(1u32..) {
        let e = &bytes[i * entry_size as usize..(i + 1) * entry_size as usize];
        if e[..16].iter().all(|b| *b == 0) {
            continue;
        }
        let (first, last) = (le64(e, 32), le64(e, 40));
        if last < first {
            return Err(TableError::BadPartition { number, reason: "ends before it starts".into() });
        }
        let sectors = (last - first).checked_add(1).ok_or_else(|| TableError::BadPartition {
            number,
            reason: format!("spans sectors {first} to {last}: past the largest disk"),
        })?;
        let name: String =
            char::decode_utf16(e[56..128].chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|c| *c != 0))
                .map(|c| c.unwrap_or('?'))
                .collect();
        parts.push(Partition {
            number,
            start: sector_bytes(number, "start", first)?,
            size: sector_bytes(number, "length", sectors)?,
            type_id: guid(&e[..16]),
            name: (!name.is_empty()).then_some(name),
        });
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mbr(entries: &[(u8, u32, u32)]) -> Vec<u8> {
        let mut s = vec![0u8; 512];
        for (i, (kind, start, count)) in entries.iter().enumerate() {
            let e = &mut s[446 + i * 16..446 + (i + 1) * 16];
            e[4] = *kind;
            e[8..12].copy_from_slice(&start.to_le_bytes());
            e[12..16].copy_from_slice(&count.to_le_bytes());
        }
        s[510] = 0x55;
        s[511] = 0xaa;
        s
    }

    #[test]
    fn mbr_table() {
        let (parts, protective) =
            parse_mbr(&mbr(&[(0x83, 2048, 4096), (0, 0, 0), (0x8e, 8192, 100)])).unwrap().unwrap();
        assert!(!protective);
        assert_eq!(parts.len(), 2);
        assert_eq!(
            (parts[0].number, parts[0].start, parts[0].size, parts[0].type_id.as_str()),
            (1, 1 << 20, 2 << 20, "83")
        );
        assert_eq!(parts[1].number, 3);
        assert!(parse_mbr(&mbr(&[(0xee, 1, 100)])).unwrap().unwrap().1);
        assert_eq!(parse_mbr(&[0u8; 512]).unwrap(), None);
        assert!(matches!(parse_mbr(&[0u8; 100]), Err(TableError::Truncated { .. })));
    }

    #[test]
    fn gpt_tables() {
        let mut h = vec![0u8; 512];
        h[..8].copy_from_slice(b"EFI PART");
        h[72..80].copy_from_slice(&2u64.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        let (lba, count, size, _) = parse_gpt_header(&h).unwrap().unwrap();
        assert_eq!((lba, count, size), (2, 128, 128));
        let mut entries = vec![0u8; 128 * 128];
        entries[0] = 0xaf;
        entries[32..40].copy_from_slice(&2048u64.to_le_bytes());
        entries[40..48].copy_from_slice(&4095u64.to_le_bytes());
        for (i, c) in "boot".encode_utf16().enumerate() {
            entries[56 + i * 2..58 + i * 2].copy_from_slice(&c.to_le_bytes());
        }
        let parts = parse_gpt_entries(&entries, 128, 128).unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!((parts[0].start, parts[0].size, parts[0].name.as_deref()), (1 << 20, 1 << 20, Some("boot")));
        h[84..88].copy_from_slice(&7u32.to_le_bytes());
        assert!(parse_gpt_header(&h).is_err());
        assert_eq!(parse_gpt_header(&[0u8; 512]).unwrap(), None);
    }

    proptest::proptest! {
        #[test]
        fn parsed_partitions_do_not_wrap(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048), count in 0u32..300, size in 0u32..5000) {
            let mut parts = Vec::new();
            if let Ok(Some((mbr, _))) = parse_mbr(&bytes) {
                parts.extend(mbr);
            }
            if let Ok(Some((lba, count, size, _))) = parse_gpt_header(&bytes) {
                proptest::prop_assert!(lba >= 2 && (1..=MAX_GPT_ENTRIES).contains(&count) && (128..=4096).contains(&size));
            }
            if let Ok(gpt) = parse_gpt_entries(&bytes, count.min(MAX_GPT_ENTRIES), size.clamp(128, 4096)) {
                parts.extend(gpt);
            }
            for p in parts {
                proptest::prop_assert!(p.size > 0 && p.start.checked_add(p.size).is_some(), "{p:?}");
                proptest::prop_assert!(p.start % SECTOR == 0 && p.size % SECTOR == 0, "{p:?}");
            }
        }
    }
}
