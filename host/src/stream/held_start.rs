//! The first MiB of an existing target, held back until the image is known good.
//!
//! A disk whose first MiB (partition table, boot code, a filesystem's superblock) reads as
//! zeros does not boot and is not mistaken for a good image. So while an image streams onto a
//! device or an existing file, that MiB is written as zeros and the image's own bytes wait in
//! memory; they are written last, once the whole source was read and verified. On any failure
//! the start of the target stays zeroed (what coreos-installer does).

use super::buffer::AlignedBuf;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// How much of the start of a target is held back.
pub const HELD_BYTES: usize = 1 << 20;

/// The image's first bytes, waiting to be written.
pub struct HeldStart {
    buf: AlignedBuf,
}

impl HeldStart {
    /// Room for the start of an image on a target of `capacity` bytes (zeros until captured).
    pub fn new(capacity: u64) -> Self {
        let mut buf = AlignedBuf::new(HELD_BYTES);
        buf.len = super::at_most(capacity, HELD_BYTES);
        Self { buf }
    }

    /// Bytes held (the target's first bytes that are zeroed meanwhile).
    pub fn len(&self) -> usize {
        self.buf.len
    }

    /// True when the target has no room at all.
    pub fn is_empty(&self) -> bool {
        self.buf.len == 0
    }

    /// Keeps the part of `data` (image bytes at `offset`) that falls in the held range, and
    /// leaves zeros in its place, so that only zeros go there until [`Self::data`] is written.
    pub fn capture(&mut self, offset: u64, data: &mut [u8]) {
        let held = self.buf.len;
        let Ok(start) = usize::try_from(offset) else { return };
        if start >= held {
            return;
        }
        let n = (held - start).min(data.len());
        self.buf.as_mut_full()[start..start + n].copy_from_slice(&data[..n]);
        data[..n].fill(0);
    }

    /// The held bytes, aligned for O_DIRECT.
    pub fn data(&self) -> &[u8] {
        self.buf.data()
    }
}

/// Zeroes the first MiB of the disk or file at `path` and flushes it, so that an image left
/// incomplete there does not boot; returns the bytes zeroed. A block device is opened
/// exclusively: a mounted one is refused.
pub fn zero_start(path: &Path) -> std::io::Result<u64> {
    let meta = std::fs::metadata(path)?;
    let block_device = meta.file_type().is_block_device();
    let file =
        std::fs::OpenOptions::new().write(true).custom_flags(if block_device { libc::O_EXCL } else { 0 }).open(path)?;
    let size = if block_device {
        use std::io::Seek;
        (&file).seek(std::io::SeekFrom::End(0))?
    } else {
        meta.len()
    };
    let zeros = HeldStart::new(size);
    file.write_all_at(zeros.data(), 0)?;
    file.sync_all()?;
    Ok(zeros.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_keeps_the_start_and_leaves_zeros() {
        let mut held = HeldStart::new(10 << 20);
        assert_eq!(held.len(), HELD_BYTES);
        let mut first = vec![1u8; HELD_BYTES / 2];
        held.capture(0, &mut first);
        assert!(first.iter().all(|b| *b == 0));
        let mut straddling = vec![2u8; HELD_BYTES];
        held.capture((HELD_BYTES / 2) as u64, &mut straddling);
        assert!(straddling[..HELD_BYTES / 2].iter().all(|b| *b == 0));
        assert!(straddling[HELD_BYTES / 2..].iter().all(|b| *b == 2), "bytes past the held range go through");
        let mut later = vec![3u8; 100];
        held.capture(HELD_BYTES as u64, &mut later);
        assert_eq!(later, vec![3u8; 100]);
        assert!(held.data()[..HELD_BYTES / 2].iter().all(|b| *b == 1));
        assert!(held.data()[HELD_BYTES / 2..].iter().all(|b| *b == 2));
        assert_eq!(HeldStart::new(5000).len(), 5000, "never more than the target holds");
    }

    #[test]
    fn zero_start_zeroes_a_mib_and_keeps_the_size() {
        let dir = tempfile::tempdir().unwrap();
        for size in [3u64 << 20, 5000] {
            let path = dir.path().join(format!("disk-{size}"));
            std::fs::write(&path, vec![0xabu8; size as usize]).unwrap();
            let zeroed = zero_start(&path).unwrap();
            let data = std::fs::read(&path).unwrap();
            assert_eq!(data.len() as u64, size);
            assert_eq!(zeroed, size.min(HELD_BYTES as u64));
            assert!(data[..zeroed as usize].iter().all(|b| *b == 0));
            assert!(data[zeroed as usize..].iter().all(|b| *b == 0xab));
        }
    }
}
