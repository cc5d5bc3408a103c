//! VHD (qemu's `vpc`) checked in Rust before the confined qemu opens it: a differencing disk
//! (disk type 4) is refused. qemu reads one as if it were a dynamic disk and never its
//! parent, so every block the parent holds would silently come out as zeros.

use imgforge_protocol::bytes::be32;
use std::os::unix::fs::FileExt;

/// What a VHD footer (and its copy at the start of a dynamic disk) starts with.
pub const MAGIC: &[u8; 8] = b"conectix";
/// Where the disk type lies in the footer.
const DISK_TYPE_OFFSET: usize = 60;
/// The disk type of a differencing disk.
const DIFFERENCING: u32 = 4;

/// Why a VHD is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VpcError {
    /// A differencing disk: its data is partly in a parent file.
    #[error("it is a differencing VHD whose parent holds part of the disk: merge it into a standalone VHD first")]
    Differencing,
    /// Not a footer.
    #[error("its VHD footer is invalid: {0}")]
    Footer(String),
}

/// Checks the footer copy at the start of a VHD (pure).
pub fn check_footer(footer: &[u8]) -> Result<(), VpcError> {
    if footer.get(..8) != Some(MAGIC) {
        return Err(VpcError::Footer("no conectix cookie".into()));
    }
    match be32(footer, DISK_TYPE_OFFSET) {
        None => Err(VpcError::Footer("it is shorter than a VHD footer".into())),
        Some(DIFFERENCING) => Err(VpcError::Differencing),
        Some(_) => Ok(()),
    }
}

/// Checks the VHD `file` before qemu opens it.
pub fn check(file: &std::fs::File) -> Result<(), VpcError> {
    let mut footer = [0u8; 512];
    let n = file.read_at(&mut footer, 0).map_err(|e| VpcError::Footer(e.to_string()))?;
    check_footer(&footer[..n])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footers() {
        let mut f = vec![0u8; 512];
        f[..8].copy_from_slice(MAGIC);
        for (kind, ok) in [(2u32, true), (3, true), (4, false)] {
            f[60..64].copy_from_slice(&kind.to_be_bytes());
            assert_eq!(check_footer(&f).is_ok(), ok, "disk type {kind}");
        }
        assert_eq!(check_footer(&f), Err(VpcError::Differencing));
        assert!(matches!(check_footer(&f[..40]), Err(VpcError::Footer(_))));
        assert!(matches!(check_footer(b"nothing here"), Err(VpcError::Footer(_))));
    }
}
