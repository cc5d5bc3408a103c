//! Which reads of a local image go around the page cache (O_DIRECT, on a second descriptor of
//! the same file): those of [`DIRECT_MIN_BYTES`] or more, aligned to [`DIRECT_ALIGN`] in memory,
//! offset and length, of bytes the page cache does not hold (`mincore`). The disk then fills
//! the buffers itself, with no copy and no page-cache pages to allocate and reclaim, and an
//! image written does not evict what the machine had cached. Bytes already cached (an image
//! just built or downloaded) are copied from memory instead: read again from the disk they
//! would compete with the writes.
//!
//! Measured with `cargo xtask bench write`'s raw image (2 GiB, 1.25 GiB stored, onto a
//! direct-I/O loop device on the same disk), runs interleaved: cold, 0.70-0.82 s around the page
//! cache against 0.79-1.10 s through it, with a third of the system time (0.10-0.17 s against
//! 0.41 s); cached, 0.84 s around it against 0.34-0.57 s through it. (Session 11 measured
//! O_DIRECT reads slower here, 0.87-1.0 s against 0.45 s for the same 1.25 GiB; the same bench's
//! cold read alone now takes 0.43 s with 4 O_DIRECT reads in flight against 0.54-0.57 s through
//! the page cache.)

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The alignment (of offset, length and memory) a read must have to go around the page
/// cache: a page, as large as any common device's logical block.
pub const DIRECT_ALIGN: usize = super::buffer::ALIGN_BYTES;
/// The smallest read that goes around the page cache: smaller ones, one at a time per worker
/// with no read-ahead (scattered 4 KiB qcow2 clusters), were five times slower direct (8192
/// reads of 4 KiB: 0.50 s against 0.10 s through the page cache, read ahead).
pub const DIRECT_MIN_BYTES: usize = 64 << 10;

/// The O_DIRECT side of an image file (see the module).
pub struct DirectReads {
    /// The file opened again with O_DIRECT.
    file: std::fs::File,
    /// Its length when opened: where [`page_cache_holds`] stops answering.
    len: u64,
    /// Set once a direct read was refused (a device that wants a larger alignment, a
    /// filesystem that reads some files only through the page cache): every read goes
    /// through the page cache from then on.
    refused: AtomicBool,
    /// Bytes read around the page cache.
    direct_bytes: AtomicU64,
}

impl DirectReads {
    /// `file` (`len` bytes long) opened again with O_DIRECT through its `/proc/self/fd` link,
    /// if that is the same file and its filesystem allows direct I/O.
    pub fn open(file: &std::fs::File, len: u64) -> Option<Self> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
        // Only what O_DIRECT is for: opening a FIFO again waits for a writer, a character
        // device again does whatever its driver does on open.
        let meta = file.metadata().ok()?;
        if !(meta.file_type().is_file() || meta.file_type().is_block_device()) {
            return None;
        }
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .ok()?;
        let again = direct.metadata().ok()?;
        (meta.dev() == again.dev() && meta.ino() == again.ino()).then(|| Self {
            file: direct,
            len,
            refused: AtomicBool::new(false),
            direct_bytes: AtomicU64::new(0),
        })
    }

    /// Whether a read of `len` bytes at `offset` into memory at `addr` may go around the page
    /// cache (aligned, and direct reads not refused), whatever the cache holds.
    pub fn may_read(&self, addr: usize, offset: u64, len: usize) -> bool {
        !self.refused.load(Ordering::Relaxed)
            && len >= DIRECT_MIN_BYTES
            && addr.is_multiple_of(DIRECT_ALIGN)
            && offset.is_multiple_of(DIRECT_ALIGN as u64)
            && len.is_multiple_of(DIRECT_ALIGN)
    }

    /// The descriptor to read `len` bytes at `offset` into memory at `addr` with, if that
    /// read goes around the page cache: aligned, and not every page of it cached.
    pub fn for_read(&self, addr: usize, offset: u64, len: usize) -> Option<&std::fs::File> {
        (self.may_read(addr, offset, len) && !page_cache_holds(&self.file, self.len, offset, len)).then_some(&self.file)
    }

    /// Counts `n` bytes read around the page cache.
    pub fn count(&self, n: usize) {
        self.direct_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// A direct read was refused: reads go through the page cache from now on.
    pub fn refuse(&self) {
        self.refused.store(true, Ordering::Relaxed);
    }

    /// Whether a direct read was refused.
    pub fn refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    /// Direct reads through `file` as given (which may refuse them), every byte taken as not
    /// cached.
    #[cfg(test)]
    pub(crate) fn through(file: std::fs::File) -> Self {
        Self { file, len: 0, refused: AtomicBool::new(false), direct_bytes: AtomicU64::new(0) }
    }

    /// Bytes read around the page cache so far.
    pub fn direct_bytes(&self) -> u64 {
        self.direct_bytes.load(Ordering::Relaxed)
    }
}

/// Whether every page of `len` bytes at `offset` of `file` (`file_len` bytes long) is in the
/// page cache (false past its end, or when the kernel cannot say): `mincore` over a read-only
/// shared mapping of just that range, made for the question and never touched (a mapping of
/// the whole image would hold its size of address space for the whole write). Any descriptor
/// of the file will do: O_DIRECT does not change what a mapping sees.
fn page_cache_holds(file: &std::fs::File, file_len: u64, offset: u64, len: usize) -> bool {
    let page = DIRECT_ALIGN as u64;
    let Some(end) = offset.checked_add(len as u64) else { return false };
    if len == 0 || end > file_len {
        return false;
    }
    let first = offset / page * page;
    let (Ok(span), Ok(at)) = (usize::try_from(end - first), libc::off_t::try_from(first)) else { return false };
    // SAFETY: a new read-only mapping of a descriptor the caller holds, never dereferenced:
    // only mincore looks at it, and it is unmapped below.
    let ptr =
        unsafe { libc::mmap(std::ptr::null_mut(), span, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), at) };
    if ptr == libc::MAP_FAILED {
        return false;
    }
    let mut pages = vec![0u8; span.div_ceil(DIRECT_ALIGN)];
    // SAFETY: the mapping just made, one byte per page of it.
    let rc = unsafe { libc::mincore(ptr, span, pages.as_mut_ptr()) };
    // SAFETY: the mapping made above, unmapped once.
    unsafe { libc::munmap(ptr, span) };
    rc == 0 && pages.iter().all(|p| p & 1 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// The page cache is said to hold only ranges wholly inside the file and wholly cached, and never
    /// panics on ranges past the end or overflowing.
    #[test]
    fn cached_only_for_ranges_inside_the_file() {
        let dir = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")).unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![9u8; 3 * 4096 + 100]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        file.sync_all().unwrap();
        // SAFETY: advice on a descriptor this test owns: drop the clean pages just written.
        assert_eq!(unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
        let holds = |offset, len| page_cache_holds(&file, 3 * 4096 + 100, offset, len);
        assert!(!holds(0, 4096), "a page just dropped");
        file.read_exact_at(&mut [0u8; 4096], 4096).unwrap();
        assert!(holds(4096, 4096));
        assert!(!holds(0, 8192), "half cached is not cached");
        assert!(holds(4096 + 10, 100), "an unaligned range inside a cached page");
        assert!(!holds(4096, 0));
        assert!(!holds(3 * 4096, 4096), "past the end");
        assert!(!holds(u64::MAX - 10, 4096));
        assert!(!page_cache_holds(&file, 0, 4096, 4096), "an empty file holds nothing");
    }

    /// Nothing is mapped for longer than a question: a mapping of the whole image would
    /// hold its size of address space (counted by `ulimit -v`) for the whole write.
    #[test]
    fn nothing_stays_mapped() {
        let dir = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")).unwrap();
        let path = dir.path().join("sparse-view");
        std::fs::File::create(&path).unwrap().set_len(448 << 20).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let direct = DirectReads::open(&file, 448 << 20).unwrap();
        let mapped = || std::fs::read_to_string("/proc/self/maps").unwrap().contains("sparse-view");
        assert!(!mapped(), "mapped when opened");
        assert!(direct.for_read(0, 0, 4 << 20).is_some(), "a hole is not cached");
        assert!(!mapped(), "mapped after a question");
    }
}
