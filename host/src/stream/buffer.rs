//! Page-aligned I/O buffers, as O_DIRECT requires.

use std::alloc::{alloc_zeroed, dealloc, Layout};

/// Alignment of every buffer: a page, enough for any logical block size.
pub const ALIGN_BYTES: usize = 4096;
/// Buffers this large are mapped rather than allocated: the kernel hands out zeroed pages
/// as they are first touched, by the threads that fill them beside the I/O, where
/// `alloc_zeroed` wrote every byte up front: the writer's ten 4 MiB buffers cost ~45 ms
/// before its first read that way (strace).
const MAPPED_BYTES: usize = 1 << 20;

/// A heap buffer aligned to [`ALIGN_BYTES`], holding `len` valid bytes.
pub struct AlignedBuf {
    ptr: *mut u8,
    capacity: usize,
    /// Bytes of valid data at the start.
    pub len: usize,
}

// SAFETY: the buffer owns its allocation exclusively; moving it between threads is fine, and
// shared references only read it.
unsafe impl Send for AlignedBuf {}
// SAFETY: see above: `&AlignedBuf` gives read-only access.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `capacity` bytes (rounded up to the alignment).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.div_ceil(ALIGN_BYTES).max(1) * ALIGN_BYTES;
        if capacity >= MAPPED_BYTES {
            // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    capacity,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert!(ptr != libc::MAP_FAILED, "out of memory mapping an I/O buffer");
            // Advice only: huge pages make a 4 MiB buffer a couple of faults instead of a
            // thousand, where the kernel allows them.
            // SAFETY: advice on the mapping just made.
            unsafe { libc::madvise(ptr, capacity, libc::MADV_HUGEPAGE) };
            return Self { ptr: ptr.cast(), capacity, len: 0 };
        }
        let layout = Layout::from_size_align(capacity, ALIGN_BYTES).expect("valid layout");
        // SAFETY: non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory allocating an I/O buffer");
        Self { ptr, capacity, len: 0 }
    }

    /// Start of the buffer.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The whole buffer, for filling.
    pub fn as_mut_full(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for capacity bytes and uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.capacity) }
    }

    /// The valid bytes.
    pub fn data(&self) -> &[u8] {
        // SAFETY: ptr is valid for capacity >= len bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.capacity >= MAPPED_BYTES {
            // SAFETY: mapped with this length in `new`, and no longer borrowed.
            unsafe { libc::munmap(self.ptr.cast(), self.capacity) };
            return;
        }
        let layout = Layout::from_size_align(self.capacity, ALIGN_BYTES).expect("valid layout");
        // SAFETY: allocated with this layout in `new`.
        unsafe { dealloc(self.ptr, layout) }
    }
}

/// True if every byte is zero (word-at-a-time; the compiler vectorizes it).
pub fn is_zero(data: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u128.
    let (head, words, tail) = unsafe { data.align_to::<u128>() };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_and_zero_detection() {
        let mut b = AlignedBuf::new(10_000);
        assert_eq!(b.capacity(), 12_288);
        assert_eq!(b.as_mut_full().as_ptr() as usize % ALIGN_BYTES, 0);
        b.len = 5000;
        assert!(is_zero(b.data()));
        b.as_mut_full()[4999] = 1;
        assert!(!is_zero(b.data()));
        for n in 0..70 {
            let mut v = vec![0u8; n];
            assert!(is_zero(&v));
            if n > 0 {
                v[n - 1] = 7;
                assert!(!is_zero(&v));
            }
        }
    }
}
