//! Filesystems recognized by their superblocks (pure, over the first bytes of a partition):
//! the host inspects images with it, the helper finds the guest's filesystems with it.

use crate::bytes::{be32, be64, le16, le32, le64};
use serde::Serialize;

/// How many bytes from the start of a partition detection looks at.
pub const PROBE_BYTES: usize = 128 * 1024;

/// What a superblock says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Filesystem {
    /// `ext2`, `ext3`, `ext4`, `xfs`, `vfat`, `swap`, `LVM2_member`, `squashfs`, `btrfs`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Label, when the superblock has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// UUID, when the superblock has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Size the filesystem says it has, in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

fn at(b: &[u8], offset: usize, len: usize) -> Option<&[u8]> {
    b.get(offset..offset.checked_add(len)?)
}

fn text(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    let s = String::from_utf8_lossy(&b[..end]).trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn uuid(b: &[u8]) -> Option<String> {
    if b.iter().all(|c| *c == 0) {
        return None;
    }
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Some(format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32]))
}

fn ext(b: &[u8]) -> Option<Filesystem> {
    let sb = at(b, 1024, 1024)?;
    if le16(sb, 56)? != 0xef53 {
        return None;
    }
    let compat = le32(sb, 92)?;
    let incompat = le32(sb, 96)?;
    let log_block = le32(sb, 24)?;
    if log_block > 6 {
        return None;
    }
    let block = 1024u64 << log_block;
    let mut blocks = le32(sb, 4)? as u64;
    const INCOMPAT_64BIT: u32 = 0x80;
    if incompat & INCOMPAT_64BIT != 0 {
        blocks |= (le32(sb, 0x150)? as u64) << 32;
    }
    // ext4-only features: extents, 64bit, flex_bg; a journal alone makes ext3.
    let kind = if incompat & (0x40 | 0x80 | 0x200) != 0 {
        "ext4"
    } else if compat & 0x4 != 0 {
        "ext3"
    } else {
        "ext2"
    };
    Some(Filesystem {
        kind,
        label: text(at(sb, 120, 16)?),
        uuid: uuid(at(sb, 104, 16)?),
        size: blocks.checked_mul(block),
    })
}

fn xfs(b: &[u8]) -> Option<Filesystem> {
    if at(b, 0, 4)? != b"XFSB" {
        return None;
    }
    let block = be32(b, 4)? as u64;
    let blocks = be64(b, 8)?;
    Some(Filesystem {
        kind: "xfs",
        label: text(at(b, 108, 12)?),
        uuid: uuid(at(b, 32, 16)?),
        size: blocks.checked_mul(block),
    })
}

fn simple(b: &[u8]) -> Option<Filesystem> {
    let plain = |kind| Some(Filesystem { kind, label: None, uuid: None, size: None });
    if at(b, 0, 4) == Some(b"hsqs") {
        return Some(Filesystem {
            kind: "squashfs",
            label: None,
            uuid: None,
            size: le32(b, 40).map(|lo| lo as u64 | (le32(b, 44).unwrap_or(0) as u64) << 32),
        });
    }
    if at(b, 512, 8) == Some(b"LABELONE") && at(b, 512 + 24, 8) == Some(b"LVM2 001") {
        return plain("LVM2_member");
    }
    if at(b, BTRFS_SUPER + 0x40, 8) == Some(b"_BHRfS_M") {
        return Some(Filesystem {
            kind: "btrfs",
            label: text(at(b, BTRFS_SUPER + 0x12b, 256)?),
            uuid: uuid(at(b, BTRFS_SUPER + 0x20, 16)?),
            // What it uses of this device: the whole filesystem's size when it has one device.
            size: le64(b, BTRFS_DEV_ITEM + 8),
        });
    }
    if at(b, 4086, 10) == Some(b"SWAPSPACE2") {
        return Some(Filesystem {
            kind: "swap",
            label: text(at(b, 1024 + 28, 16)?),
            uuid: uuid(at(b, 1024 + 12, 16)?),
            size: None,
        });
    }
    if at(b, 510, 2) == Some(&[0x55, 0xaa]) {
        // The volume id and label sit after the FAT12/16 or the longer FAT32 boot sector fields.
        let fat = if at(b, 54, 5) == Some(b"FAT16") || at(b, 54, 5) == Some(b"FAT12") {
            Some(39)
        } else if at(b, 82, 5) == Some(b"FAT32") {
            Some(67)
        } else {
            None
        };
        if let Some(id_at) = fat {
            let id = le32(b, id_at)?;
            return Some(Filesystem {
                kind: "vfat",
                label: text(at(b, id_at + 4, 11)?).filter(|l| l != "NO NAME"),
                // As blkid and fstab write it.
                uuid: Some(format!("{:04X}-{:04X}", id >> 16, id & 0xffff)),
                size: None,
            });
        }
    }
    None
}

/// Where a btrfs superblock starts, and its `dev_item` (this device's id, size, use).
const BTRFS_SUPER: usize = 0x10000;
const BTRFS_DEV_ITEM: usize = BTRFS_SUPER + 0xc9;

/// The device id of the btrfs device whose first bytes are `b` (what `btrfs filesystem resize
/// DEVID:max` names), `None` when `b` holds no btrfs superblock.
pub fn btrfs_devid(b: &[u8]) -> Option<u64> {
    (at(b, BTRFS_SUPER + 0x40, 8)? == b"_BHRfS_M").then(|| le64(b, BTRFS_DEV_ITEM))?
}

/// Recognizes the filesystem whose first bytes are `b`.
pub fn detect(b: &[u8]) -> Option<Filesystem> {
    ext(b).or_else(|| xfs(b)).or_else(|| simple(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real(cmd: &str) -> Option<Vec<u8>> {
        let dir = tempfile::tempdir().ok()?;
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img).ok()?.set_len(64 << 20).ok()?;
        let ok = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{cmd} {} >/dev/null 2>&1", img.display()))
            .status()
            .ok()?
            .success();
        ok.then(|| {
            std::fs::read(&img).ok().map(|mut v| {
                v.truncate(PROBE_BYTES);
                v
            })
        })?
    }

    #[test]
    fn real_filesystems() {
        for (cmd, kind, label) in [
            ("mkfs.ext4 -q -F -L lbl4", "ext4", Some("lbl4")),
            ("mkfs.ext2 -q -F", "ext2", None),
            ("mkfs.ext3 -q -F", "ext3", None),
            ("mkfs.xfs -q -f -L lblx", "xfs", Some("lblx")),
            ("mkswap -L sw", "swap", Some("sw")),
            ("mkfs.vfat -i 1234abcd", "vfat", None),
            ("mkfs.vfat -F 32 -i 0badf00d -n EFI", "vfat", Some("EFI")),
        ] {
            let Some(bytes) = real(cmd) else { continue };
            let fs = detect(&bytes).unwrap_or_else(|| panic!("{cmd} not recognized"));
            assert_eq!((fs.kind, fs.label.as_deref()), (kind, label), "{cmd}");
            if kind == "vfat" {
                let want = if label.is_some() { "0BAD-F00D" } else { "1234-ABCD" };
                assert_eq!(fs.uuid.as_deref(), Some(want), "{cmd}");
            }
            if kind == "ext4" || kind == "xfs" {
                assert_eq!(fs.size, Some(64 << 20), "{cmd}");
                assert!(fs.uuid.is_some());
            }
        }
    }

    #[test]
    fn real_btrfs() {
        // btrfs wants at least 114 MiB a device.
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img).unwrap().set_len(128 << 20).unwrap();
        let made = std::process::Command::new("mkfs.btrfs").args(["-q", "-f", "-L", "lblb"]).arg(&img).output();
        if !made.is_ok_and(|o| o.status.success()) {
            return;
        }
        let mut bytes = std::fs::read(&img).unwrap();
        bytes.truncate(PROBE_BYTES);
        let fs = detect(&bytes).unwrap();
        assert_eq!((fs.kind, fs.label.as_deref(), fs.size), ("btrfs", Some("lblb"), Some(128 << 20)));
        assert!(fs.uuid.is_some());
        assert_eq!(btrfs_devid(&bytes), Some(1));
        assert_eq!(btrfs_devid(&bytes[..BTRFS_DEV_ITEM + 4]), None);
        bytes[BTRFS_SUPER + 0x40] = b'X';
        assert_eq!(btrfs_devid(&bytes), None);
        assert_eq!(btrfs_devid(&[]), None);
    }

    #[test]
    fn nothing_in_zeros() {
        assert_eq!(detect(&vec![0u8; PROBE_BYTES]), None);
        assert_eq!(detect(&[]), None);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..5000), magic in 0usize..6) {
            let mut b = bytes;
            // Plant each magic so the parsers behind it run on garbage.
            let plants: [(usize, &[u8]); 6] = [(1080, &[0x53, 0xef]), (0, b"XFSB"), (0, b"hsqs"), (4086, b"SWAPSPACE2"), (512, b"LABELONE"), (510, &[0x55, 0xaa])];
            let (o, m) = plants[magic];
            if b.len() >= o + m.len() { b[o..o + m.len()].copy_from_slice(m); }
            // Detection reads the probe only, and what it reports is printable text.
            let found = detect(&b);
            let mut longer = b.clone();
            longer.resize(PROBE_BYTES, 0);
            longer.extend_from_slice(&[0xa5; 64]);
            let padded = detect(&longer);
            b.resize(PROBE_BYTES, 0);
            proptest::prop_assert_eq!(detect(&b), padded);
            if let Some(fs) = found {
                for text in fs.label.iter().chain(fs.uuid.iter()) {
                    proptest::prop_assert!(!text.contains('\0'), "{text:?}");
                }
            }
        }
    }
}
