//! snf-image's swap partition (`SWAP=<N>:<MB>`), made by FixPartitionTable: where it goes
//! (the end of the disk, 1 MiB short of it, as snf-image places it), and its swap signature,
//! written here rather than by mkswap (a page of zeros, the header and `SWAPSPACE2`).

use crate::grow::{Label, Partition, Table};

/// The page size of the guests imgforge customizes (x86_64).
const PAGE_SIZE: u64 = 4096;
/// MBR's type code and GPT's type GUID of a Linux swap partition.
const MBR_SWAP_TYPE: &str = "82";
const GPT_SWAP_TYPE: &str = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F";

/// The swap partition asked for (`IMGFORGE_SWAP`: `N:MIB:UUID`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Its partition number.
    pub number: u32,
    /// Its size in MiB.
    pub mib: u64,
    /// Its swap signature's UUID.
    pub uuid: [u8; 16],
}

/// Parses `IMGFORGE_SWAP`; `None` when empty (pure).
pub fn parse_request(text: &str) -> Result<Option<Request>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    let bad = || format!("IMGFORGE_SWAP {text:?} is not NUMBER:MIB:UUID");
    let mut fields = text.splitn(3, ':');
    let (Some(number), Some(mib), Some(uuid)) = (fields.next(), fields.next(), fields.next()) else {
        return Err(bad());
    };
    Ok(Some(Request {
        number: number.parse().map_err(|_| bad())?,
        mib: mib.parse().ok().filter(|m| *m > 0).ok_or_else(bad)?,
        uuid: parse_uuid(uuid).ok_or_else(bad)?,
    }))
}

/// The 16 bytes of a UUID written with or without dashes (pure).
fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(bytes)
}

/// Parses `IMGFORGE_SWAP_DISK` (`INDEX:UUID`: the guest disk in the host's order, never the
/// first, and the UUID of its signature); `None` when empty (pure).
pub fn parse_disk_request(text: &str) -> Result<Option<(usize, [u8; 16])>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    let bad = || format!("IMGFORGE_SWAP_DISK {text:?} is not INDEX:UUID of a disk other than the first");
    let (index, uuid) = text.split_once(':').ok_or_else(bad)?;
    let index: usize = index.parse().ok().filter(|i| *i > 0).ok_or_else(bad)?;
    Ok(Some((index, parse_uuid(uuid).ok_or_else(bad)?)))
}

/// The 06-AddSwap task (snf-image's AddSwap for `SWAP=<disk letter>`): a swap signature over
/// the whole of the guest's disk that `IMGFORGE_SWAP_DISK` names, found by its serial.
pub fn add_swap_disk(vars: &crate::task_env::TaskEnv) -> Result<(), String> {
    let Some((index, uuid)) = parse_disk_request(vars.get("IMGFORGE_SWAP_DISK").unwrap_or_default())? else {
        return Ok(());
    };
    let dev = crate::mounts::guest_disk(index)?;
    let failed = |e: std::io::Error| format!("cannot write the swap signature on {dev}: {e}");
    let mut file = std::fs::OpenOptions::new().read(true).write(true).open(&dev).map_err(failed)?;
    let bytes = std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0)).map_err(failed)?;
    let page = signature(bytes, &uuid).map_err(|e| format!("swap disk {dev}: {e}"))?;
    std::os::unix::fs::FileExt::write_all_at(&file, &page, 0).map_err(failed)?;
    file.sync_all().map_err(failed)?;
    println!("made {dev} (the guest's disk {}) swap, {} MiB", index + 1, bytes >> 20);
    Ok(())
}

/// Where the swap partition goes, in sectors of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Its first sector.
    pub start: u64,
    /// Its length.
    pub size: u64,
    /// The first sector the last partition may not grow into.
    pub limit: u64,
    /// For a logical swap partition: the extended partition that holds it.
    pub extended: Option<Extended>,
}

/// The extended partition of a logical swap partition, as it is after FixPartitionTable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extended {
    /// Its number (the primary slot).
    pub number: u32,
    /// Its first sector.
    pub start: u64,
    /// Its length.
    pub size: u64,
    /// Whether the table already has it (grown to the disk's end) or it is made for the swap.
    pub existing: bool,
}

/// Places the swap partition as snf-image does: its last sector 1 MiB (2048 sectors of 512
/// bytes) short of the disk's end, `mib` long; refused when the space after the last
/// partition (ending before sector `used_end`) is not larger, or the number is taken or is not
/// one snf-image's placement gives (pure). A logical swap partition (MBR, 5 and up) goes in a
/// new extended partition (then only as 5), or, when the table has one as its last primary
/// partition, as its next logical partition, the extended partition grown to hold it.
pub fn place(table: &Table, disk_sectors: u64, used_end: u64, request: &Request) -> Result<Placement, String> {
    let n = request.number;
    let logical = table.label == Label::Dos && n >= 5;
    let existing = if logical { existing_extended(table, n)? } else { None };
    match table.label {
        Label::Dos if logical && existing.is_none() && n != 5 => {
            return Err(format!(
                "SWAP partition {n}: without an extended partition, imgforge makes a logical swap partition \
                 only as the first one (5) of a new extended partition"
            ))
        }
        Label::Dos if n == 0 => return Err("SWAP partition 0: partitions count from 1".into()),
        Label::Gpt if !(1..=128).contains(&n) => return Err(format!("SWAP partition {n}: a GPT has partitions 1-128")),
        _ => {}
    }
    if table.partitions.iter().any(|p| p.number == n) {
        return Err(format!("SWAP partition {n}: the disk already has a partition {n}"));
    }
    // In an existing extended partition the swap follows its last logical partition: the
    // extended partition's own end (free space in it) is no partition to keep clear of.
    let used_end = match existing {
        Some(ext) => {
            table.partitions.iter().filter(|p| !p.is_extended()).map(Partition::end).fold(ext.start + 1, u64::max)
        }
        None => used_end,
    };
    let per_mib = (1u64 << 20) / table.sector_size;
    let size = request.mib.checked_mul(per_mib).ok_or("SWAP size is too large")?;
    let last = disk_sectors.saturating_sub(1 + per_mib).min(table.last_usable(disk_sectors));
    // A logical partition's boot record is 1 MiB before it (its extended partition starts
    // there when made for it), so that the last partition ends where snf-image ends it, 2049
    // sectors before the swap.
    let reserve = if logical { per_mib } else { 0 };
    let start =
        (last + 1).checked_sub(size).filter(|s| *s >= used_end + reserve && *s > used_end).ok_or_else(|| {
            format!(
                "not enough space for the swap partition: {} MiB asked, {} MiB free after the last partition",
                request.mib,
                (last + 1).saturating_sub(used_end) / per_mib
            )
        })?;
    let limit = start - reserve;
    let extended = match (logical, existing) {
        (false, _) => None,
        (true, Some(ext)) => {
            Some(Extended { number: ext.number, start: ext.start, size: last + 1 - ext.start, existing: true })
        }
        (true, None) => {
            let slot = (1..=4).find(|s| !table.partitions.iter().any(|p| p.number == *s));
            let slot = slot.ok_or("SWAP: the MBR has no free primary slot for the extended partition")?;
            Some(Extended { number: slot, start: limit, size: last + 1 - limit, existing: false })
        }
    };
    Ok(Placement { start, size, limit, extended })
}

/// The MBR's extended partition that logical swap partition `n` goes in, if it has one: it
/// must be the last primary partition (snf-image grows it to the disk's end) and `n` its next
/// logical number (pure).
fn existing_extended(table: &Table, n: u32) -> Result<Option<&Partition>, String> {
    let Some(ext) = table.partitions.iter().find(|p| p.number <= 4 && p.is_extended()) else { return Ok(None) };
    let last_primary = table.partitions.iter().filter(|p| p.number <= 4).max_by_key(|p| p.end());
    if last_primary.map(|p| p.number) != Some(ext.number) {
        return Err(format!(
            "SWAP partition {n}: the extended partition {} is not the disk's last primary partition, so it \
             cannot grow to hold a logical swap partition",
            ext.number
        ));
    }
    let next = table.partitions.iter().map(|p| p.number).filter(|m| *m > 4).max().unwrap_or(4) + 1;
    if n != next {
        return Err(format!(
            "SWAP partition {n}: a logical swap partition in the existing extended partition {} is its next \
             logical partition, {next}",
            ext.number
        ));
    }
    Ok(Some(ext))
}

/// The sfdisk script line that adds the partition to a dump of the table (`sfdisk -d`).
/// A new extended partition is added before it; an existing one is resized by
/// [`resize_in_dump`].
pub fn sfdisk_line(disk: &str, table: &Table, number: u32, placement: &Placement) -> String {
    let extended = match &placement.extended {
        Some(e) if !e.existing => format!("{disk}{} : start={}, size={}, type=5\n", e.number, e.start, e.size),
        _ => String::new(),
    };
    let kind = match table.label {
        Label::Dos => MBR_SWAP_TYPE.to_owned(),
        // snf-image names the GPT partition "swap".
        Label::Gpt => format!("{GPT_SWAP_TYPE}, name=\"swap\""),
    };
    format!("{extended}{disk}{number} : start={}, size={}, type={kind}\n", placement.start, placement.size)
}

/// `dump` (`sfdisk --dump`) with partition `node`'s size set to `size`, its other fields (start,
/// type, flags) kept (pure).
pub fn resize_in_dump(dump: &str, node: &str, size: u64) -> Result<String, String> {
    let mut found = false;
    let mut out = String::new();
    for line in dump.lines() {
        match line.split_once(" : ") {
            Some((name, fields)) if name.trim() == node => {
                let fields: Vec<String> = fields
                    .split(',')
                    .map(|f| if f.trim().starts_with("size=") { format!(" size={size}") } else { f.to_owned() })
                    .collect();
                found = fields.iter().any(|f| f.trim().starts_with("size="));
                out.push_str(&format!("{name} : {}\n", fields.join(",").trim_start()));
            }
            _ => out.push_str(&format!("{line}\n")),
        }
    }
    found.then_some(out).ok_or_else(|| format!("sfdisk's dump has no partition {node} with a size to grow"))
}

/// The first page of a swap area of `bytes` with `uuid` (what mkswap writes, no label; pure).
pub fn signature(bytes: u64, uuid: &[u8; 16]) -> Result<Vec<u8>, String> {
    let pages = bytes / PAGE_SIZE;
    if pages < 10 {
        return Err(format!("a swap area of {bytes} bytes is too small"));
    }
    let last_page = u32::try_from(pages - 1).map_err(|_| format!("a swap area of {bytes} bytes is too large"))?;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    // struct swap_header_v1_2 after 1024 bytes of boot bits: version, last_page, nr_badpages,
    // uuid, volume name.
    page[1024..1028].copy_from_slice(&1u32.to_le_bytes());
    page[1028..1032].copy_from_slice(&last_page.to_le_bytes());
    page[1036..1052].copy_from_slice(uuid);
    page[PAGE_SIZE as usize - 10..].copy_from_slice(b"SWAPSPACE2");
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swap_disk_requests() {
        let uuid = "0123456789abcdef0123456789ABCDEF";
        let (index, bytes) = parse_disk_request(&format!("1:{uuid}")).unwrap().unwrap();
        assert_eq!((index, bytes[0], bytes[15]), (1, 0x01, 0xef));
        assert_eq!(parse_disk_request("2:01234567-89ab-cdef-0123-456789abcdef").unwrap().unwrap().0, 2);
        assert_eq!(parse_disk_request("").unwrap(), None);
        for bad in [format!("0:{uuid}"), format!("x:{uuid}"), "1:0123".into(), uuid.into(), format!("-1:{uuid}")] {
            assert!(parse_disk_request(&bad).is_err(), "{bad}");
        }
    }

    fn table(label: Label, parts: &[(u32, u64, u64)]) -> Table {
        Table {
            label,
            sector_size: 512,
            last_lba: None,
            partitions: parts
                .iter()
                .map(|&(number, start, size)| Partition {
                    number,
                    node: format!("/dev/vda{number}"),
                    start,
                    size,
                    kind: "83".into(),
                })
                .collect(),
        }
    }

    const UUID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    #[test]
    fn requests() {
        let r = parse_request(&format!("2:512:{UUID}")).unwrap().unwrap();
        assert_eq!((r.number, r.mib, r.uuid[0], r.uuid[15]), (2, 512, 0x0f, 0xf0));
        assert_eq!(parse_request("").unwrap(), None);
        for bad in [
            "2:512",
            "x:512:{UUID}",
            "2:0:0f1e2d3c4b5a69788796a5b4c3d2e1f0",
            "2:5:0f1e",
            "2:5:zz1e2d3c4b5a69788796a5b4c3d2e1f0",
        ] {
            assert!(parse_request(&bad.replace("{UUID}", UUID)).is_err(), "{bad}");
        }
    }

    /// snf-image's geometry: on a 4 GiB disk (8388608 sectors) a 512 MiB swap ends at sector
    /// 8388608 - 2049 and starts 1048576 sectors before its end.
    #[test]
    fn placement() {
        let req = |number, mib| Request { number, mib, uuid: [0; 16] };
        let dos = table(Label::Dos, &[(1, 2048, 2095104)]);
        let p = place(&dos, 8388608, 2097152, &req(2, 512)).unwrap();
        assert_eq!(p, Placement { start: 8388608 - 2049 - 1048576 + 1, size: 1048576, limit: 7337984, extended: None });
        let gpt = Table { label: Label::Gpt, ..dos.clone() };
        let mut with_extended = table(Label::Dos, &[(1, 2048, 2048), (2, 4096, 9000), (5, 6144, 100)]);
        with_extended.partitions[1].kind = "5".into();
        let mut extended_not_last = with_extended.clone();
        extended_not_last.partitions.push(Partition {
            number: 3,
            node: "/dev/vda3".into(),
            start: 20000,
            size: 100,
            kind: "83".into(),
        });
        assert_eq!(place(&gpt, 8388608, 2097152, &req(3, 512)).unwrap(), p);
        for (t, r, want) in [
            (&dos, req(6, 512), "first one (5)"),
            (&with_extended, req(7, 512), "next logical partition, 6"),
            (&with_extended, req(5, 512), "next logical partition, 6"),
            (&extended_not_last, req(6, 512), "not the disk's last primary"),
            (&dos, req(1, 512), "already has a partition 1"),
            (&gpt, req(129, 512), "1-128"),
            (&dos, req(2, 4096), "not enough space"),
        ] {
            let e = place(t, 8388608, 2097152, &r).unwrap_err();
            assert!(e.contains(want), "{r:?}: {e}");
        }
        // Logical: in a new extended partition 1 MiB longer, the root ending 2049 sectors
        // before the swap partition, as snf-image ends it.
        let l = place(&dos, 8388608, 2097152, &req(5, 512)).unwrap();
        assert_eq!(
            (l.start, l.limit, l.extended.clone()),
            (
                p.start,
                p.start - 2048,
                Some(Extended { number: 2, start: p.start - 2048, size: 1048576 + 2048, existing: false })
            )
        );
        // Next in an existing extended partition, grown to the disk's end (its own end, past
        // its last logical partition, not counted as used); the last logical partition ends
        // 2049 sectors before the swap.
        let mut roomy = with_extended.clone();
        roomy.partitions[1].size = 8000000;
        let e = place(&roomy, 8388608, 8004096, &req(6, 512)).unwrap();
        assert_eq!(
            (e.start, e.limit, e.extended.clone()),
            (
                p.start,
                p.start - 2048,
                Some(Extended { number: 2, start: 4096, size: 8388608 - 2048 - 4096, existing: true })
            )
        );
        assert_eq!(
            sfdisk_line("/dev/vda", &roomy, 6, &e),
            format!("/dev/vda6 : start={}, size=1048576, type=82\n", p.start)
        );
        let dump = "label: dos\n\n/dev/vda1 : start=2048, size=2048, type=83, bootable\n/dev/vda2 : start=4096, size=9000, type=f\n/dev/vda5 : start=6144, size=100, type=83\n";
        assert_eq!(
            resize_in_dump(dump, "/dev/vda2", 8384512).unwrap(),
            dump.replace("start=4096, size=9000", "start=4096, size=8384512")
        );
        assert!(resize_in_dump(dump, "/dev/vda3", 1).is_err());
        assert_eq!(
            sfdisk_line("/dev/vda", &dos, 5, &l),
            "/dev/vda2 : start=7335936, size=1050624, type=5\n/dev/vda5 : start=7337984, size=1048576, type=82\n"
        );
        assert!(sfdisk_line("/dev/vda", &dos, 2, &p).starts_with("/dev/vda2 : start=7337984, size=1048576, type=82"));
        assert!(sfdisk_line("/dev/vda", &gpt, 3, &p).contains(&format!("type={GPT_SWAP_TYPE}, name=\"swap\"")));
    }

    #[test]
    fn swap_signature() {
        let uuid = [7u8; 16];
        let page = signature(512 << 20, &uuid).unwrap();
        assert_eq!(page.len(), 4096);
        assert_eq!(&page[4086..], b"SWAPSPACE2");
        assert_eq!(u32::from_le_bytes(page[1024..1028].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(page[1028..1032].try_into().unwrap()), (512 << 20) / 4096 - 1);
        assert_eq!(&page[1036..1052], &uuid);
        assert!(page[..1024].iter().all(|b| *b == 0));
        assert!(signature(4096 * 9, &uuid).is_err());
    }
}
