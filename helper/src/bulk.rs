//! The raw bulk disk: large payload files the host laid at 4 KiB-aligned offsets. Their bytes
//! go from that disk into the guest's file by DMA — an O_DIRECT read into an aligned buffer,
//! an O_DIRECT write from it — so the helper's CPU, which TCG emulates at a few tens of MB/s,
//! never copies them; only a tail shorter than a block is written through the page cache.

use imgforge_protocol::rules::{BulkFile, BULK_ALIGN_BYTES};
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

/// Bytes moved by one read and one write: large requests keep the number of (emulated)
/// system calls and virtio round trips per MB small.
const CHUNK_BYTES: usize = 8 << 20;

/// The bulk disk, opened for O_DIRECT reads, and where each of its files lies.
pub struct BulkDisk {
    device: Option<File>,
    files: BTreeMap<String, BulkFile>,
}

/// How the bytes reached the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// O_DIRECT writes (a short tail buffered).
    Direct,
    /// Buffered writes: the destination's filesystem refused O_DIRECT.
    Buffered,
}

impl BulkDisk {
    /// The bulk disk the rules describe (found by its serial number), or an empty one when the
    /// rules place no file there.
    pub fn open(files: &[BulkFile]) -> Result<Self, String> {
        let files: BTreeMap<String, BulkFile> = files.iter().map(|f| (f.payload_path.clone(), f.clone())).collect();
        if files.is_empty() {
            return Ok(Self { device: None, files });
        }
        let serial = imgforge_protocol::helper_vm::BULK_SERIAL;
        let name = crate::mounts::virtio_disks()
            .into_iter()
            .find(|(_, s)| s == serial)
            .map(|(name, _)| name)
            .ok_or_else(|| format!("the rules place files on the bulk disk, but no disk has serial {serial}"))?;
        let dev = format!("/dev/{name}");
        let device = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&dev)
            .map_err(|e| format!("cannot open the bulk disk {dev}: {e}"))?;
        Ok(Self { device: Some(device), files })
    }

    /// Where `payload_path` lies on the bulk disk, if it is there.
    pub fn get(&self, payload_path: &str) -> Option<&BulkFile> {
        self.files.get(payload_path)
    }

    /// Copies `file` into `dest` (opened for writing, empty).
    pub fn copy_to(&self, file: &BulkFile, dest: &File) -> io::Result<Written> {
        let device = self.device.as_ref().ok_or_else(|| io::Error::other("no bulk disk"))?;
        copy_extent(device, file.offset, file.length, dest)
    }
}

/// Copies `length` bytes at `offset` of `source` (opened with O_DIRECT; `offset` aligned and
/// the source readable up to the next aligned end) to the start of `dest`.
pub fn copy_extent(source: &File, offset: u64, length: u64, dest: &File) -> io::Result<Written> {
    if !offset.is_multiple_of(BULK_ALIGN_BYTES) {
        return Err(io::Error::other(format!("bulk offset {offset} is not a multiple of {BULK_ALIGN_BYTES}")));
    }
    let mut direct = set_direct(dest, true).is_ok();
    let mut buf = AlignedBuffer::new(CHUNK_BYTES)?;
    let mut pos = 0u64;
    while pos < length {
        let n = (length - pos).min(CHUNK_BYTES as u64) as usize;
        let read_len = n.next_multiple_of(BULK_ALIGN_BYTES as usize);
        read_at_least(source, &mut buf.as_mut()[..read_len], n, offset + pos)?;
        let whole = if direct { n - n % BULK_ALIGN_BYTES as usize } else { 0 };
        if whole > 0 {
            match dest.write_all_at(&buf.as_mut()[..whole], pos) {
                Ok(()) => {}
                // Accepted at fcntl, refused at the write (alignment rules of the filesystem):
                // the rest goes through the page cache.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && pos == 0 => {
                    set_direct(dest, false)?;
                    direct = false;
                    dest.write_all_at(&buf.as_mut()[..n], pos)?;
                    pos += n as u64;
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        if whole < n {
            if direct {
                set_direct(dest, false)?;
            }
            dest.write_all_at(&buf.as_mut()[whole..n], pos + whole as u64)?;
            if direct {
                set_direct(dest, true)?;
            }
        }
        pos += n as u64;
    }
    if direct {
        set_direct(dest, false)?;
    }
    Ok(if direct { Written::Direct } else { Written::Buffered })
}

/// Turns O_DIRECT on or off on an open file (EINVAL: its filesystem has no direct I/O).
fn set_direct(file: &File, on: bool) -> io::Result<()> {
    // SAFETY: valid descriptor.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on { flags | libc::O_DIRECT } else { flags & !libc::O_DIRECT };
    // SAFETY: valid descriptor and flags.
    crate::copy::cvt(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags) })
}

/// Fills `buf` from `offset`, or at least its first `need` bytes where the disk ends before
/// `buf` does: a disk that is the host file itself ends at its length rounded up to a sector,
/// not to a block.
pub(crate) fn read_at_least(file: &File, buf: &mut [u8], need: usize, offset: u64) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) if filled >= need => return Ok(()),
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the disk ends early")),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A zeroed heap buffer aligned for O_DIRECT.
pub(crate) struct AlignedBuffer {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

impl AlignedBuffer {
    /// `len` zeroed bytes (not 0) at a 4 KiB boundary.
    pub(crate) fn new(len: usize) -> io::Result<Self> {
        let layout = std::alloc::Layout::from_size_align(len, BULK_ALIGN_BYTES as usize)
            .map_err(|e| io::Error::other(format!("buffer of {len} bytes: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(ptr).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(Self { ptr, layout })
    }

    /// The bytes.
    pub(crate) fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` owns `layout.size()` initialized (zeroed) bytes for as long as `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn source_with(data: &[u8], offset: u64) -> (tempfile::NamedTempFile, File) {
        let mut f = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
        let padded = (offset + data.len() as u64).next_multiple_of(BULK_ALIGN_BYTES);
        f.as_file().set_len(padded).unwrap();
        f.as_file().write_all_at(data, offset).unwrap();
        f.flush().unwrap();
        let direct = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(f.path()).unwrap();
        (f, direct)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
    }

    /// Sizes around the block and chunk boundaries, at an offset past another file: the bytes
    /// arrive exactly, and the file ends at its length.
    #[test]
    fn extents_arrive_byte_for_byte() {
        for len in [0, 1, 4095, 4096, 4097, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 513, 2 * CHUNK_BYTES + 4096] {
            let data = pattern(len);
            let (_keep, source) = source_with(&data, 3 * BULK_ALIGN_BYTES);
            let dest = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
            let how = copy_extent(&source, 3 * BULK_ALIGN_BYTES, len as u64, dest.as_file()).unwrap();
            assert_eq!(how, Written::Direct, "length {len}");
            assert_eq!(std::fs::read(dest.path()).unwrap(), data, "length {len}");
        }
    }

    /// A destination whose filesystem has no O_DIRECT (ramfs) gets the same bytes, buffered.
    #[test]
    fn a_filesystem_without_direct_io_is_written_buffered() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let c = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: NUL-terminated strings.
        let rc = unsafe { libc::mount(c"ramfs".as_ptr(), c.as_ptr(), c"ramfs".as_ptr(), 0, std::ptr::null()) };
        if rc != 0 {
            eprintln!("skipped: cannot mount a ramfs here: {}", io::Error::last_os_error());
            return;
        }
        let data = pattern(CHUNK_BYTES + 777);
        let (_keep, source) = source_with(&data, 0);
        let path = dir.path().join("f");
        let result = File::create(&path).and_then(|dest| copy_extent(&source, 0, data.len() as u64, &dest));
        let read = std::fs::read(&path);
        // SAFETY: NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        assert_eq!(result.unwrap(), Written::Buffered);
        assert_eq!(read.unwrap(), data);
    }

    /// A source that ends at a sector, not a block, boundary (the host file itself as the
    /// disk): the last read comes back short and the copy still completes.
    #[test]
    fn a_source_ending_inside_a_block_is_read_to_its_end() {
        let data = pattern(CHUNK_BYTES + 4096 + 100);
        let mut f = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
        f.write_all(&data).unwrap();
        f.as_file().set_len((data.len() as u64).next_multiple_of(512)).unwrap();
        let source = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(f.path()).unwrap();
        let dest = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
        copy_extent(&source, 0, data.len() as u64, dest.as_file()).unwrap();
        assert_eq!(std::fs::read(dest.path()).unwrap(), data);
        let short = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
        assert!(copy_extent(&source, 0, data.len() as u64 + 4096, short.as_file()).is_err(), "past its end");
    }

    #[test]
    fn a_misaligned_offset_is_refused() {
        let (_keep, source) = source_with(b"x", 0);
        let dest = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
        assert!(copy_extent(&source, 512, 1, dest.as_file()).is_err());
    }
}
