//! SHA-256 of a whole file, its holes hashed from memory: a 2 GiB raw image with 200 MB of data
//! costs the hashing of 2 GiB, not also the reading of 1.8 GB of zeros through the page cache.

use sha2::{Digest, Sha256};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};

const CHUNK: usize = 1 << 20;
static ZEROS: [u8; CHUNK] = [0; CHUNK];

/// Why a file could not be hashed.
#[derive(Debug)]
pub enum DigestError {
    /// `cancel` was set.
    Cancelled,
    /// Reading the file failed.
    Io(io::Error),
}

/// The SHA-256 (hex) of `file`'s bytes from offset 0, read with `pread` (its position does not
/// matter). Ranges the filesystem reports as holes (`SEEK_DATA`/`SEEK_HOLE`) are hashed as the
/// zeros they read as; where the file cannot say (a pipe, a filesystem without them), every
/// byte is read.
pub fn sha256_of_file(file: &File, cancel: &AtomicBool) -> Result<String, DigestError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    // Where the current run of data ends, if the file has said so.
    let mut data_end: Option<u64> = None;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(DigestError::Cancelled);
        }
        if data_end.is_none_or(|end| at >= end) {
            match next_data(file, at) {
                Some(Extent::Data { start, end }) => {
                    hash_zeros(&mut hasher, start - at, cancel)?;
                    at = start;
                    data_end = Some(end);
                }
                Some(Extent::HoleToEnd { size }) => {
                    hash_zeros(&mut hasher, size.saturating_sub(at), cancel)?;
                    return Ok(hex::encode(hasher.finalize()));
                }
                None => data_end = Some(u64::MAX),
            }
        }
        let want = data_end.map_or(CHUNK as u64, |end| (end - at).min(CHUNK as u64)) as usize;
        let n = match file.read_at(&mut buf[..want], at) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DigestError::Io(e)),
        };
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
        at += n as u64;
    }
}

enum Extent {
    /// Data from `start` (≥ the offset asked) to `end` (a hole or the end of the file).
    Data { start: u64, end: u64 },
    /// No data from the offset asked to the end of the file, `size` bytes long.
    HoleToEnd { size: u64 },
}

/// The next run of data at or after `at`; `None` when the file cannot say.
fn next_data(file: &File, at: u64) -> Option<Extent> {
    let fd = file.as_raw_fd();
    let at_off = libc::off_t::try_from(at).ok()?;
    // SAFETY: lseek on a descriptor we hold; it only moves a position we never use (pread).
    let start = unsafe { libc::lseek(fd, at_off, libc::SEEK_DATA) };
    if start < 0 {
        // ENXIO: nothing but hole from `at` on (read before anything else can change errno).
        let no_more_data = io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
        let meta = file.metadata().ok()?;
        return (no_more_data && meta.is_file()).then_some(Extent::HoleToEnd { size: meta.len() });
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
    if end <= start {
        return None;
    }
    Some(Extent::Data { start: start as u64, end: end as u64 })
}

fn hash_zeros(hasher: &mut Sha256, mut n: u64, cancel: &AtomicBool) -> Result<(), DigestError> {
    while n > 0 {
        if cancel.load(Ordering::Relaxed) {
            return Err(DigestError::Cancelled);
        }
        let k = n.min(CHUNK as u64) as usize;
        hasher.update(&ZEROS[..k]);
        n -= k as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain_sha256(path: &std::path::Path) -> String {
        hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
    }

    /// Sparse files with holes at the start, the middle and the end, data at odd offsets, and
    /// a file without holes hash as their bytes do.
    #[test]
    fn holes_hash_as_the_zeros_they_read_as() {
        let dir = tempfile::tempdir().unwrap();
        let never = AtomicBool::new(false);
        // (name, size, writes at offsets)
        type Case<'a> = (&'a str, u64, &'a [(u64, &'a [u8])]);
        let cases: [Case; 5] = [
            ("empty", 0, &[]),
            ("all-hole", 5 << 20, &[]),
            ("hole-data-hole", 9 << 20, &[(3 << 20, b"middle"), ((3 << 20) + 77, &[0xff; 5000])]),
            ("data-at-both-ends", (4 << 20) + 13, &[(0, b"first"), ((4 << 20) + 8, b"last!")]),
            ("odd-sizes", 3_000_001, &[(1, &[7; 3_000_000])]),
        ];
        for (name, size, writes) in cases {
            let path = dir.path().join(name);
            let file = File::create(&path).unwrap();
            file.set_len(size).unwrap();
            for (at, bytes) in writes {
                file.write_all_at(bytes, *at).unwrap();
            }
            let file = File::open(&path).unwrap();
            assert_eq!(sha256_of_file(&file, &never).unwrap(), plain_sha256(&path), "{name}");
        }
    }

    #[test]
    fn a_cancelled_digest_stops() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(64 << 20).unwrap();
        assert!(matches!(sha256_of_file(&file, &AtomicBool::new(true)), Err(DigestError::Cancelled)));
    }
}
