//! Files whose digests a tree walk needs, opened as the walk finds them and read ahead of their
//! hashing. Under TCG a virtio read's round trip, not the hashing, is most of a cold walk's time
//! (a base of 171 MB: 4.7 s waiting in `read`, 2.0 s hashing): reading one file after another
//! leaves the disk idle while a file is hashed and the vCPU idle while the next one is read.
//! Asking the kernel for the next files' first bytes (`POSIX_FADV_WILLNEED`, which starts the
//! reads and returns) keeps several requests in flight while the walk lists directories and
//! hashes what has arrived. Bounded: at most [`MAX_OPEN`] files held open and [`AHEAD_BYTES`]
//! asked for and not yet hashed.

use sha2::Digest;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;

/// Most files held open, waiting for their hashing: with a walk's directories (at most
/// `snapshot::MAX_DEPTH` open at once) well under the 1024 descriptors a process starts with.
pub const MAX_OPEN: usize = 128;
/// Most bytes asked for ahead and not yet hashed.
pub const AHEAD_BYTES: u64 = 32 << 20;
/// Most of one file asked for at a time: a large file is asked for in pieces while it is hashed.
pub const PIECE_BYTES: u64 = 4 << 20;
/// Bytes read per `read`.
const READ_BYTES: usize = 256 << 10;

/// Files hashed: each key with its digest or why it has none.
pub type Hashed<K> = Vec<(K, io::Result<String>)>;

/// What identifies a file's bytes as listed: device, inode, size and change time.
type Listed = (u64, u64, i64, i64, i64);

fn listed_of(st: &libc::stat) -> Listed {
    (st.st_dev, st.st_ino, st.st_size, st.st_ctime, st.st_ctime_nsec)
}

/// A file opened and asked for, not yet hashed.
struct Queued<K> {
    key: K,
    file: File,
    size: u64,
    /// Its device, inode, size and change time when it was listed.
    listed: Listed,
    /// Bytes asked for ahead (counted in the queue's total until the file is hashed).
    advised: u64,
}

/// Files waiting to be hashed, in the order they were added, each named by a `K`.
pub struct DigestQueue<K> {
    queued: VecDeque<Queued<K>>,
    ahead: u64,
    buf: Vec<u8>,
}

impl<K> Default for DigestQueue<K> {
    fn default() -> Self {
        Self { queued: VecDeque::new(), ahead: 0, buf: Vec::new() }
    }
}

impl<K> DigestQueue<K> {
    /// Adds the open regular file `file`, listed as `listed`, asking for its first bytes;
    /// hashes the oldest files while the queue is over its bounds and returns their digests.
    /// A file that is not the inode listed, or whose size or change time moved since it was
    /// listed, gives an error: `file` need not have been checked, as no more than the size
    /// listed is ever read from it.
    pub fn push(&mut self, key: K, file: File, listed: &libc::stat) -> Hashed<K> {
        let size = u64::try_from(listed.st_size).unwrap_or(0);
        let advised = size.min(PIECE_BYTES);
        advise(&file, 0, advised);
        self.ahead += advised;
        self.queued.push_back(Queued { key, file, size, listed: listed_of(listed), advised });
        let mut done = Vec::new();
        while self.queued.len() > MAX_OPEN || (self.ahead > AHEAD_BYTES && self.queued.len() > 1) {
            done.extend(self.hash_oldest());
        }
        done
    }

    /// Hashes every file still queued.
    pub fn finish(&mut self) -> Hashed<K> {
        let mut done = Vec::new();
        while !self.queued.is_empty() {
            done.extend(self.hash_oldest());
        }
        done
    }

    /// Takes out, unread, the files whose digests `known` now gives (they arrived from
    /// elsewhere while the files waited).
    pub fn take_known(&mut self, known: impl Fn(&K) -> Option<String>) -> Hashed<K> {
        let mut done = Vec::new();
        let mut kept = VecDeque::with_capacity(self.queued.len());
        for queued in std::mem::take(&mut self.queued) {
            match known(&queued.key) {
                Some(digest) => {
                    self.ahead -= queued.advised;
                    done.push((queued.key, Ok(digest)));
                }
                None => kept.push_back(queued),
            }
        }
        self.queued = kept;
        done
    }

    fn hash_oldest(&mut self) -> Option<(K, io::Result<String>)> {
        let Queued { key, mut file, size, listed, advised } = self.queued.pop_front()?;
        self.ahead -= advised;
        if self.buf.is_empty() {
            self.buf = vec![0u8; READ_BYTES];
        }
        let digest = sha256(&mut file, size, advised, &mut self.buf).and_then(|(digest, read)| {
            let st = crate::snapshot::fstat(&file.into())?;
            if (st.st_dev, st.st_ino) != (listed.0, listed.1) {
                return Err(io::Error::other("replaced while the tree was walked"));
            }
            let same = read == size && listed_of(&st) == listed;
            same.then_some(digest).ok_or_else(|| io::Error::other("changed while the tree was walked"))
        });
        Some((key, digest))
    }
}

/// SHA-256 (hex) of the first `size` bytes of `file` (fewer where it ends first), and the
/// bytes read, asking for the next piece of a file larger than one piece before the bytes
/// asked for so far run out. No read past `size`: the caller's check of the file's size and
/// change time afterwards says whether these were all its bytes, which spares a `read` to
/// find the end (a syscall costs tens of microseconds under TCG), and bounds what is read of
/// anything swapped in for the file (a device, a FIFO) before that check turns it down.
fn sha256(file: &mut File, size: u64, mut advised: u64, buf: &mut [u8]) -> io::Result<(String, u64)> {
    let mut hasher = sha2::Sha256::new();
    let mut pos = 0u64;
    while pos < size {
        if advised < size && pos + PIECE_BYTES / 2 >= advised {
            let next = size.min(advised + PIECE_BYTES);
            advise(file, advised, next - advised);
            advised = next;
        }
        let want = buf.len().min(usize::try_from(size - pos).unwrap_or(usize::MAX));
        let n = file.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    Ok((imgforge_protocol::bytes::hex(&hasher.finalize()), pos))
}

/// Asks the kernel to start reading `len` bytes of `file` at `offset` (advice: a failure
/// changes only the speed).
fn advise(file: &File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else { return };
    if len == 0 {
        return;
    }
    // SAFETY: advice on a descriptor `file` owns.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_WILLNEED) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(dir: &std::path::Path, name: &str, bytes: &[u8]) -> (File, libc::stat) {
        let path = dir.join(name);
        std::fs::File::create(&path).unwrap().write_all(bytes).unwrap();
        let file = File::open(&path).unwrap();
        let st = crate::snapshot::lstat(&path).unwrap();
        (file, st)
    }

    fn hex_sha256(bytes: &[u8]) -> String {
        imgforge_protocol::bytes::hex(&sha2::Sha256::digest(bytes))
    }

    /// Every file pushed comes out once, in order, with its own digest, whether it was hashed
    /// to keep the queue within its bounds or at the end; a file larger than several pieces
    /// hashes whole.
    #[test]
    fn every_file_comes_out_once_in_order_with_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = DigestQueue::default();
        let mut expected = Vec::new();
        let mut got = Vec::new();
        let big: Vec<u8> = (0..(PIECE_BYTES * 2 + 12_345)).map(|i| (i * 7 % 251) as u8).collect();
        for i in 0..(MAX_OPEN + 40) {
            let bytes: Vec<u8> = if i == 3 { big.clone() } else { format!("file {i}").repeat(i % 7).into_bytes() };
            expected.push((i, hex_sha256(&bytes)));
            let (file, st) = file_of(dir.path(), &format!("f{i}"), &bytes);
            got.extend(queue.push(i, file, &st).into_iter().map(|(k, d)| (k, d.unwrap())));
            assert!(queue.queued.len() <= MAX_OPEN);
        }
        assert!(!got.is_empty(), "the bound on open files hashed some before the end");
        got.extend(queue.finish().into_iter().map(|(k, d)| (k, d.unwrap())));
        assert_eq!(got, expected);
        assert_eq!(queue.ahead, 0);
    }

    /// Bytes asked for ahead stay within the bound: pushing files larger than it hashes the
    /// older ones first.
    #[test]
    fn bytes_ahead_stay_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = DigestQueue::default();
        let bytes = vec![1u8; PIECE_BYTES as usize];
        let per = AHEAD_BYTES / PIECE_BYTES;
        for i in 0..(per + 3) {
            let (file, st) = file_of(dir.path(), &format!("f{i}"), &bytes);
            let done = queue.push(i, file, &st);
            assert!(queue.ahead <= AHEAD_BYTES, "{} bytes ahead after {i}", queue.ahead);
            assert_eq!(done.is_empty(), i < per, "file {i}");
        }
    }

    /// A file written between its listing and its hashing is not given a digest: the bytes
    /// read are not those of the file listed.
    #[test]
    fn a_file_changed_after_its_listing_has_no_digest() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = DigestQueue::default();
        let (file, st) = file_of(dir.path(), "grows", b"before");
        assert!(queue.push("grows", file, &st).is_empty());
        let (file, st) = file_of(dir.path(), "rewritten", b"same size");
        assert!(queue.push("rewritten", file, &st).is_empty());
        let (file, st) = file_of(dir.path(), "kept", b"kept");
        assert!(queue.push("kept", file, &st).is_empty());
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("grows"))
            .unwrap()
            .write_all(b" and after")
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("rewritten"))
            .unwrap()
            .write_all(b"SAME SIZE")
            .unwrap();
        let done: Vec<_> = queue.finish().into_iter().map(|(k, d)| (k, d.map_err(|e| e.to_string()))).collect();
        assert_eq!(done[0], ("grows", Err("changed while the tree was walked".into())));
        assert_eq!(done[1], ("rewritten", Err("changed while the tree was walked".into())));
        assert_eq!(done[2], ("kept", Ok(hex_sha256(b"kept"))));
    }

    /// Files whose digests arrive while they wait leave the queue unread, with the digest given,
    /// and their bytes no longer count ahead; the others are still hashed in order.
    #[test]
    fn files_known_meanwhile_leave_unread() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = DigestQueue::default();
        for i in 0..4u32 {
            let (file, st) = file_of(dir.path(), &format!("f{i}"), format!("bytes {i}").as_bytes());
            assert!(queue.push(i, file, &st).is_empty());
        }
        let ahead = queue.ahead;
        let known = queue.take_known(|k| (*k % 2 == 1).then(|| format!("given {k}")));
        let known: Vec<_> = known.into_iter().map(|(k, d)| (k, d.unwrap())).collect();
        assert_eq!(known, [(1, "given 1".to_owned()), (3, "given 3".to_owned())]);
        assert_eq!(queue.ahead, ahead - 2 * "bytes 1".len() as u64);
        let rest: Vec<_> = queue.finish().into_iter().map(|(k, d)| (k, d.unwrap())).collect();
        assert_eq!(rest, [(0, hex_sha256(b"bytes 0")), (2, hex_sha256(b"bytes 2"))]);
        assert_eq!(queue.ahead, 0);
    }
}
