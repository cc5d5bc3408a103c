//! A dry run's record of the guest's tree: for every path, the inode's type, permission bits,
//! owner, size, modification and change times and inode number — metadata only, no file's
//! content is read, so two walks cost two `fstatat` a path even under TCG.
//!
//! The guest is hostile: the walk follows no symlink (every step is `openat(O_NOFOLLOW |
//! O_DIRECTORY)` from the parent's descriptor, checked to be the inode that was listed), stops
//! at a depth and a path length, and records at most [`MAX_ENTRIES`] paths. It walks the guest's
//! own filesystems as the helper mounted them (the root, then `/boot` & co. from the fstab,
//! each block-backed, btrfs subvolumes included) and skips the pseudo filesystems mounted for
//! chroots (`/dev`, `/proc`, `/sys`: anonymous devices, major number 0, see [`is_pseudo`]).

use crate::digest_queue::{DigestQueue, Hashed};
use imgforge_protocol::change::FileType;
use imgforge_protocol::digest_cache::{Share, Shares};
use imgforge_protocol::manifest::ManifestContent;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Deepest directory the walk enters, counted from the guest root.
pub const MAX_DEPTH: usize = 256;
/// Longest guest path recorded, in bytes (Linux's PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;
/// Most paths recorded; past it the walk stops (about 150 bytes each in the helper's memory).
pub const MAX_ENTRIES: usize = 500_000;
/// SHA-256 of no bytes: the digest of a file listed empty.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// What the walk records of one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// The inode's type.
    pub file_type: FileType,
    /// `st_mode & 0o7777`.
    pub mode: u32,
    /// Owning uid.
    pub uid: u32,
    /// Owning gid.
    pub gid: u32,
    /// Bytes (a symlink: its target's length).
    pub size: u64,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (i64, i64),
    /// Change time (seconds, nanoseconds).
    pub ctime: (i64, i64),
    /// Inode number: a path replaced by rename has another.
    pub ino: u64,
}

impl Meta {
    /// The record of a `stat`; `None` for a type the tree does not hold (a socket).
    pub fn of(st: &libc::stat) -> Option<Self> {
        Some(Self {
            file_type: FileType::from_mode(st.st_mode)?,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size as u64,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
            ino: st.st_ino,
        })
    }
}

/// The guest's tree at one moment: guest paths (bytes, absolute) to what they were.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Every path recorded, in byte order.
    pub entries: BTreeMap<Vec<u8>, Meta>,
    /// Why some of the tree was left out (depth, path length, entry count), for a warning.
    pub left_out: Vec<String>,
}

/// Walks the guest tree mounted at `root`.
pub fn record(root: &Path) -> io::Result<Snapshot> {
    record_walk(root, false, None).map(|(snapshot, _)| snapshot)
}

/// Walks the guest tree mounted at `root` as [`record`] does, and also reads every regular
/// file's bytes (their SHA-256) and every symlink's target, for the tree manifest. A file that
/// cannot be read is an error: a manifest must not pass over it.
pub fn record_with_contents(root: &Path) -> io::Result<WithContents> {
    with_contents(record_walk(root, true, None)?)
}

/// [`record_with_contents`] for one of several boots that walk the same base side by side:
/// it reads the files of its `share` first and gives their digests to `exchange`, then reads
/// the others' files itself until `exchange` says their digests arrived, and takes those.
pub fn record_with_contents_shared(
    root: &Path,
    share: Share,
    exchange: &mut dyn DigestExchange,
) -> io::Result<WithContents> {
    with_contents(record_walk(root, true, Some((share, exchange)))?)
}

/// What the boots that share a base's reading say to one another (through the host).
pub trait DigestExchange {
    /// The walk `tree` read its share: every digest it read is in [`digest_cache`].
    fn share(&mut self, tree: &Snapshot);
    /// Whether the other boots' digests arrived (into [`digest_cache`]); asked every
    /// [`EXCHANGE_POLL`] while this walk reads their share itself, until it says yes.
    fn arrived(&mut self) -> bool;
}

/// How often a walk reading the other boots' share asks whether their digests arrived.
pub const EXCHANGE_POLL: std::time::Duration = std::time::Duration::from_millis(20);

fn with_contents((snapshot, contents): (Snapshot, Contents)) -> io::Result<WithContents> {
    if let Some((path, e)) = contents.1 {
        return Err(unreadable(path, e));
    }
    Ok((snapshot, contents.0))
}

/// A walk that read contents: the tree, and each file's digest and each symlink's target.
pub type WithContents = (Snapshot, BTreeMap<Vec<u8>, ManifestContent>);

type Contents = (BTreeMap<Vec<u8>, ManifestContent>, Option<(Vec<u8>, io::Error)>);

/// The tree at `root`, with contents as [`record_with_contents`] gives them, after changes
/// confined to the directories `dirs` (guest paths; see `change_watch`), from `base` and
/// `base_contents`, a walk with contents of the same tree before them. Each of `dirs` is
/// listed again, parents first: an entry that is new, or no longer the same directory, is
/// walked whole; a subdirectory whose own record moved is listed again too (a directory
/// removed and made anew can get the old inode number back, never the old change time).
/// An error if a directory of `dirs` is in the tree but its parent's listing does not hold it
/// (the changes reported were not all there were), or if the walk of `base` left paths out:
/// the caller then walks the whole tree. Each directory of `whole` (a filesystem's mount that
/// no watch covered) is walked whole, after `dirs`.
pub fn refresh_with_contents(
    root: &Path,
    base: &Snapshot,
    base_contents: &BTreeMap<Vec<u8>, ManifestContent>,
    dirs: &BTreeSet<Vec<u8>>,
    whole: &BTreeSet<Vec<u8>>,
) -> io::Result<WithContents> {
    // What a cut-short walk left out is known only as counts, which the changes can make
    // wrong (a tree too deep removed): only a whole walk can tell what is left out now.
    if !base.left_out.is_empty() {
        return Err(io::Error::other(format!(
            "the walk of the tree before the changes left paths out ({})",
            base.left_out.join(", ")
        )));
    }
    let root_fd = open_dir(root)?;
    let mut entries = base.entries.clone();
    let mut contents = base_contents.clone();
    let mut left = LeftOut::default();
    let mut pending = dirs.clone();
    while let Some(dir) = pending.pop_first() {
        let Some((fd, depth)) = open_guest_dir(&root_fd, &dir) else { continue };
        if entries.get(&dir).is_none_or(|m| m.file_type != FileType::Directory) {
            return Err(io::Error::other(format!(
                "{} changed but the listing of its parent does not hold it as a directory",
                String::from_utf8_lossy(&dir)
            )));
        }
        let st = fstat(&fd)?;
        if let Some(meta) = Meta::of(&st) {
            entries.insert(dir.clone(), meta);
        }
        let old = children(&entries, &dir);
        let mut walk = Walk {
            read_contents: true,
            known_dirs: old.iter().filter(|(_, m)| m.file_type == FileType::Directory).cloned().collect(),
            ..Walk::default()
        };
        walk.directory(fd, dir.clone(), depth);
        if let Some((path, e)) = walk.unreadable.take() {
            return Err(unreadable(path, e));
        }
        for (child, was) in old {
            let now = walk.snapshot.entries.get(&child);
            let same_dir = was.file_type == FileType::Directory
                && now.is_some_and(|n| n.file_type == FileType::Directory && n.ino == was.ino);
            if same_dir {
                if now != Some(&was) {
                    pending.insert(child);
                }
                continue;
            }
            if was.file_type == FileType::Directory {
                remove_subtree(&mut entries, &mut contents, &child);
            }
            entries.remove(&child);
            contents.remove(&child);
        }
        walk.merge_into(&mut entries, &mut contents, &mut left);
    }
    for dir in whole {
        let (fd, depth) = open_guest_dir(&root_fd, dir).ok_or_else(|| {
            io::Error::other(format!("the mount {} to walk whole cannot be opened", String::from_utf8_lossy(dir)))
        })?;
        if entries.get(dir).is_none_or(|m| m.file_type != FileType::Directory) {
            return Err(io::Error::other(format!(
                "the mount {} is not a directory of the tree",
                String::from_utf8_lossy(dir)
            )));
        }
        if let Some(meta) = Meta::of(&fstat(&fd)?) {
            entries.insert(dir.clone(), meta);
        }
        remove_subtree(&mut entries, &mut contents, dir);
        let mut walk = Walk { read_contents: true, ..Walk::default() };
        walk.directory(fd, dir.clone(), depth);
        if let Some((path, e)) = walk.unreadable.take() {
            return Err(unreadable(path, e));
        }
        walk.merge_into(&mut entries, &mut contents, &mut left);
    }
    let mut left_out = left.described();
    if entries.len() > MAX_ENTRIES {
        left_out.push(format!("{} paths past the first {MAX_ENTRIES}", entries.len() - MAX_ENTRIES));
    }
    Ok((Snapshot { entries, left_out }, contents))
}

/// The entries directly in the directory `dir` (pure).
fn children(entries: &BTreeMap<Vec<u8>, Meta>, dir: &[u8]) -> Vec<(Vec<u8>, Meta)> {
    let prefix = if dir == b"/" { b"/".to_vec() } else { [dir, b"/"].concat() };
    entries
        .range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
        .filter(|(k, _)| k.len() > prefix.len() && !k[prefix.len()..].contains(&b'/'))
        .map(|(k, m)| (k.clone(), *m))
        .collect()
}

/// Removes everything below the directory `dir` (not `dir` itself).
fn remove_subtree(
    entries: &mut BTreeMap<Vec<u8>, Meta>,
    contents: &mut BTreeMap<Vec<u8>, ManifestContent>,
    dir: &[u8],
) {
    let prefix = [dir, b"/"].concat();
    let below: Vec<Vec<u8>> =
        entries.range(prefix.clone()..).take_while(|(k, _)| k.starts_with(&prefix)).map(|(k, _)| k.clone()).collect();
    for key in below {
        entries.remove(&key);
        contents.remove(&key);
    }
}

/// Opens the guest directory `path` below `root` one component at a time, following no link;
/// with its depth. `None` if it is not there (or deeper than a walk goes).
fn open_guest_dir(root: &OwnedFd, path: &[u8]) -> Option<(OwnedFd, usize)> {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: a valid descriptor; the duplicate is ours.
    let fd = unsafe { libc::fcntl(root.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fcntl returned a new descriptor that we now own.
    let mut at = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut depth = 0;
    for name in path.split(|b| *b == b'/').filter(|c| !c.is_empty()) {
        depth += 1;
        if depth > MAX_DEPTH {
            return None;
        }
        let c = CString::new(name).ok()?;
        at = open_leaving_atime(at.as_raw_fd(), &c, flags).ok()?;
    }
    Some((at, depth))
}

/// Opens the directory `root` (following links: it is the helper's own path, not the guest's).
pub fn open_dir(root: &Path) -> io::Result<OwnedFd> {
    let c_root = CString::new(root.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "root path holds a NUL byte"))?;
    // SAFETY: a NUL-terminated path; the descriptor returned is ours.
    let fd = unsafe { libc::open(c_root.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open returned a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn record_walk(
    root: &Path,
    read_contents: bool,
    sharing: Option<(Share, &mut dyn DigestExchange)>,
) -> io::Result<(Snapshot, Contents)> {
    let dir = open_dir(root)?;
    let st = fstat(&dir)?;
    let mut walk = Walk { read_contents, ..Walk::default() };
    if let Some((share, _)) = &sharing {
        walk.shares = Some((share.part, Shares::new(share.parts)));
    }
    if let Some(meta) = Meta::of(&st) {
        walk.snapshot.entries.insert(b"/".to_vec(), meta);
    }
    let again = if sharing.is_some() { Some(open_dir(root)?) } else { None };
    walk.directory(dir, b"/".to_vec(), 0);
    if let (Some((_, exchange)), Some(root_fd)) = (sharing, again) {
        exchange.share(&walk.snapshot);
        walk.read_deferred(&root_fd, exchange);
    }
    let mut snapshot = walk.snapshot;
    snapshot.left_out = walk.left.described();
    Ok((snapshot, (walk.contents, walk.unreadable)))
}

/// How much of the tree walks left out, by reason.
#[derive(Default)]
struct LeftOut {
    too_deep: u64,
    too_long: u64,
    over_cap: u64,
}

impl LeftOut {
    /// The reasons with a count, as a snapshot's `left_out` says them.
    fn described(&self) -> Vec<String> {
        [
            (self.too_deep, format!("directories deeper than {MAX_DEPTH} levels")),
            (self.too_long, format!("paths longer than {MAX_PATH_BYTES} bytes")),
            (self.over_cap, format!("paths past the first {MAX_ENTRIES}")),
        ]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect()
    }
}

/// The error of a file a walk could not read, naming it.
fn unreadable(path: Vec<u8>, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", String::from_utf8_lossy(&path)))
}

#[derive(Default)]
struct Walk {
    snapshot: Snapshot,
    left: LeftOut,
    read_contents: bool,
    contents: BTreeMap<Vec<u8>, ManifestContent>,
    /// The first file that could not be read, and why.
    unreadable: Option<(Vec<u8>, io::Error)>,
    /// Directories recorded before (path and record): one listed again as the same inode is
    /// not entered (its own changes, if any, are listed on their own).
    known_dirs: BTreeMap<Vec<u8>, Meta>,
    /// Files opened, waiting for their digests.
    reads: DigestQueue<digest_cache::Key>,
    /// When boots share the reading: this boot's share, and the dealer of files to shares.
    shares: Option<(u32, Shares)>,
    /// Files of the other boots' shares, in the order listed, for [`Walk::read_deferred`].
    deferred: Vec<Deferred>,
}

/// A file of another boot's share: listed, not read.
struct Deferred {
    path: Vec<u8>,
    name: CString,
    listed: libc::stat,
}

impl Walk {
    /// Adds what this walk recorded to `entries` and `contents` and what it left out to `left`.
    fn merge_into(
        self,
        entries: &mut BTreeMap<Vec<u8>, Meta>,
        contents: &mut BTreeMap<Vec<u8>, ManifestContent>,
        left: &mut LeftOut,
    ) {
        entries.extend(self.snapshot.entries);
        contents.extend(self.contents);
        left.too_deep += self.left.too_deep;
        left.too_long += self.left.too_long;
        left.over_cap += self.left.over_cap;
    }

    /// Records the entries of the open directory `dir` (guest path `path`, `depth` levels
    /// below the root), entering its subdirectories, with the digests of its files.
    fn directory(&mut self, dir: OwnedFd, path: Vec<u8>, depth: usize) {
        self.enter(dir, path, depth);
        let done = self.reads.finish();
        self.take_digests(done);
    }

    /// The digest of the regular file `name` of `stream` (guest path `path`, listed as `st`):
    /// known from earlier in this boot, or queued to be read.
    fn file_contents(&mut self, stream: &DirStream, name: &CStr, path: &[u8], st: &libc::stat) {
        let key = digest_cache::key(path, st);
        if let Some(digest) = digest_cache::get(&key) {
            self.contents.insert(path.to_vec(), ManifestContent::Sha256(digest));
            return;
        }
        if st.st_size == 0 {
            // Listed empty: nothing to read (opening it would cost five syscalls under TCG); kept
            // like any digest, so the digests kept of a base name every file of it.
            digest_cache::insert(key, EMPTY_SHA256.to_owned());
            self.contents.insert(path.to_vec(), ManifestContent::Sha256(EMPTY_SHA256.to_owned()));
            return;
        }
        if let Some((part, shares)) = &mut self.shares {
            if shares.deal(st.st_size as u64) != *part {
                self.deferred.push(Deferred { path: path.to_vec(), name: name.to_owned(), listed: *st });
                return;
            }
        }
        match stream.open_file_at(name) {
            Ok(file) => {
                let done = self.reads.push(key, file, st);
                self.take_digests(done);
            }
            Err(e) => self.note_unreadable(path.to_vec(), e),
        }
    }

    /// Reads the files of the other boots' shares (the walk is over), taking their digests from
    /// the digest cache once `exchange` says they arrived. Each is opened again from `root`,
    /// one directory at a time and following no link, and must be the inode listed.
    fn read_deferred(&mut self, root: &OwnedFd, exchange: &mut dyn DigestExchange) {
        let deferred = std::mem::take(&mut self.deferred);
        let mut arrived = false;
        // Asked at once: the other boots may have given theirs while this one read its share.
        let mut asked: Option<std::time::Instant> = None;
        let mut dir: Option<(Vec<u8>, DirStream)> = None;
        for Deferred { path, name, listed } in deferred {
            if !arrived && asked.is_none_or(|at| at.elapsed() >= EXCHANGE_POLL) {
                arrived = exchange.arrived();
                asked = Some(std::time::Instant::now());
                if arrived {
                    let known = self.reads.take_known(digest_cache::get);
                    self.take_digests(known);
                }
            }
            let key = digest_cache::key(&path, &listed);
            if let Some(digest) = digest_cache::get(&key) {
                self.contents.insert(path, ManifestContent::Sha256(digest));
                continue;
            }
            let parent = crate::changes::parent(&path).to_vec();
            if dir.as_ref().is_none_or(|(at, _)| *at != parent) {
                dir = open_guest_dir(root, &parent).and_then(|(fd, _)| DirStream::open(fd)).map(|s| (parent, s));
            }
            let opened = match &dir {
                Some((_, stream)) => stream.open_file_at(&name),
                None => Err(io::Error::other("its directory is no longer there")),
            };
            match opened {
                Ok(file) => {
                    let done = self.reads.push(key, file, &listed);
                    self.take_digests(done);
                }
                Err(e) => self.note_unreadable(path, e),
            }
        }
        let done = self.reads.finish();
        self.take_digests(done);
    }

    /// Records the digests of files the queue has hashed.
    fn take_digests(&mut self, done: Hashed<digest_cache::Key>) {
        for (key, digest) in done {
            let path = key.0.clone();
            match digest {
                Ok(digest) => {
                    digest_cache::insert(key, digest.clone());
                    self.contents.insert(path, ManifestContent::Sha256(digest));
                }
                Err(e) => self.note_unreadable(path, e),
            }
        }
    }

    /// Keeps the first file that could not be read.
    fn note_unreadable(&mut self, path: Vec<u8>, e: io::Error) {
        self.unreadable.get_or_insert((path, e));
    }

    fn enter(&mut self, dir: OwnedFd, path: Vec<u8>, depth: usize) {
        let Ok(parent) = fstat(&dir) else { return };
        let Some(stream) = DirStream::open(dir) else { return };
        while let Some(name) = stream.next_name() {
            let mut child = path.clone();
            if child.len() > 1 {
                child.push(b'/');
            }
            child.extend_from_slice(name.to_bytes());
            if child.len() > MAX_PATH_BYTES {
                self.left.too_long += 1;
                continue;
            }
            let Ok(st) = stream.stat_at(&name) else { continue };
            // A mount point of a pseudo filesystem (the chroots' /dev, /proc, /sys): not the
            // guest's, and not on its disk. (A btrfs subvolume is the guest's: walked.)
            if st.st_dev != parent.st_dev && is_pseudo(stream.fd(), &name, &st) {
                continue;
            }
            let Some(meta) = Meta::of(&st) else { continue };
            if self.snapshot.entries.len() >= MAX_ENTRIES {
                self.left.over_cap += 1;
                continue;
            }
            self.snapshot.entries.insert(child.clone(), meta);
            if self.read_contents {
                match meta.file_type {
                    FileType::File => self.file_contents(&stream, &name, &child, &st),
                    FileType::Symlink => match stream.link_at(&name) {
                        Ok(target) => {
                            self.contents.insert(child.clone(), ManifestContent::LinkTarget(target));
                        }
                        Err(e) => self.note_unreadable(child.clone(), e),
                    },
                    _ => {
                        self.contents.insert(child.clone(), ManifestContent::None);
                    }
                }
            }
            if meta.file_type != FileType::Directory {
                continue;
            }
            if self.known_dirs.get(&child).is_some_and(|was| was.ino == meta.ino && was.file_type == meta.file_type) {
                continue;
            }
            if depth + 1 > MAX_DEPTH {
                self.left.too_deep += 1;
                continue;
            }
            if let Some(sub) = stream.open_dir_at(&name, &st) {
                self.enter(sub, child, depth + 1);
            }
        }
    }
}

/// `openat(dir, name, flags)`, asking that reading leave the access time alone (`O_NOATIME`):
/// the walks read every file of the base, which would otherwise write each one's inode into
/// every output (and, on an emulated CPU, cost the journal's work). Opened without it where
/// the kernel refuses it (a caller without `CAP_FOWNER` and not the owner).
fn open_leaving_atime(dir: libc::c_int, name: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    for flags in [flags | libc::O_NOATIME, flags] {
        // SAFETY: a directory descriptor the caller holds and a NUL-terminated name.
        let fd = unsafe { libc::openat(dir, name.as_ptr(), flags) };
        if fd >= 0 {
            // SAFETY: openat returned a new descriptor that we now own.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EPERM) {
            return Err(e);
        }
    }
    Err(io::Error::from_raw_os_error(libc::EPERM))
}

/// Whether `st`, the status of `name` in the directory `dir` (or of the path `name` with
/// `AT_FDCWD`), is on one of the pseudo filesystems mounted for chroots (`/dev`, `/proc`,
/// `/sys`) rather than on the guest's disks: an anonymous device (major 0) whose filesystem is
/// not btrfs, whose every subvolume has an anonymous device too. One that cannot be looked at
/// counts as pseudo.
pub fn is_pseudo(dir: libc::c_int, name: &CStr, st: &libc::stat) -> bool {
    if libc::major(st.st_dev) != 0 {
        return false;
    }
    // SAFETY: a directory descriptor the caller holds (or AT_FDCWD) and a NUL-terminated name.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC) };
    if fd < 0 {
        return true;
    }
    // SAFETY: openat returned a new descriptor that we now own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: statfs is plain old data.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a descriptor we own and a writable statfs.
    let looked = unsafe { libc::fstatfs(fd.as_raw_fd(), &mut fs) } == 0;
    // The same inode still: not something swapped in since it was listed.
    let same = fstat(&fd).is_ok_and(|now| now.st_dev == st.st_dev && now.st_ino == st.st_ino);
    !(looked && same && fs.f_type == libc::BTRFS_SUPER_MAGIC)
}

/// `lstat(path)`.
pub fn lstat(path: &Path) -> io::Result<libc::stat> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    // SAFETY: stat is plain old data.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a writable stat.
    if unsafe { libc::lstat(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// `fstat(fd)`.
pub fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: stat is plain old data; fstat fills it for a valid descriptor.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a descriptor we own and a writable stat.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// An open directory being listed (`fdopendir`), closed when dropped.
struct DirStream(*mut libc::DIR);

impl DirStream {
    fn open(dir: OwnedFd) -> Option<Self> {
        let raw = dir.into_raw_fd();
        // SAFETY: a descriptor we own; fdopendir takes it over, on success only.
        let stream = unsafe { libc::fdopendir(raw) };
        if stream.is_null() {
            // SAFETY: fdopendir failed, so the descriptor is still ours to close.
            unsafe { libc::close(raw) };
            return None;
        }
        Some(Self(stream))
    }

    fn fd(&self) -> libc::c_int {
        // SAFETY: a stream fdopendir returned, not yet closed.
        unsafe { libc::dirfd(self.0) }
    }

    /// The next name but `.` and `..`; `None` at the end (or on a read error: the rest of a
    /// directory that cannot be read is left out of both walks alike).
    fn next_name(&self) -> Option<CString> {
        loop {
            // SAFETY: a stream fdopendir returned; the entry is copied before the next call.
            let entry = unsafe { libc::readdir(self.0) };
            if entry.is_null() {
                return None;
            }
            // SAFETY: readdir returned a valid entry whose d_name is NUL-terminated.
            let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
            if name.to_bytes() != b"." && name.to_bytes() != b".." {
                return Some(name.to_owned());
            }
        }
    }

    /// `fstatat(name, AT_SYMLINK_NOFOLLOW)`: a symlink is recorded as itself.
    fn stat_at(&self, name: &CStr) -> io::Result<libc::stat> {
        // SAFETY: stat is plain old data.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a valid directory descriptor, a NUL-terminated name, a writable stat.
        if unsafe { libc::fstatat(self.fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st)
    }

    /// The file `name`, opened without following a link or waiting (a FIFO swapped in), for
    /// a [`DigestQueue`]: it reads no more than the size listed and then checks the file is
    /// the inode listed, unchanged, so no check is spent here (a syscall costs tens of
    /// microseconds under TCG).
    fn open_file_at(&self, name: &CStr) -> io::Result<std::fs::File> {
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK;
        open_leaving_atime(self.fd(), name, flags).map(std::fs::File::from)
    }

    /// The target of the symlink `name`.
    fn link_at(&self, name: &CStr) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; MAX_PATH_BYTES + 1];
        // SAFETY: a valid directory descriptor, a NUL-terminated name and a writable buffer of
        // the length given.
        let n = unsafe { libc::readlinkat(self.fd(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    /// Opens the subdirectory `name`, listed as `listed`, without following a link; `None` if
    /// it is no longer that directory (a guest process may still be running and swapping it).
    fn open_dir_at(&self, name: &CStr, listed: &libc::stat) -> Option<OwnedFd> {
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        let sub = open_leaving_atime(self.fd(), name, flags).ok()?;
        let st = fstat(&sub).ok()?;
        (st.st_dev == listed.st_dev && st.st_ino == listed.st_ino).then_some(sub)
    }
}

impl Drop for DirStream {
    fn drop(&mut self) {
        // SAFETY: a stream fdopendir returned, closed once here.
        unsafe { libc::closedir(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    #[test]
    fn the_empty_digest_is_that_of_no_bytes() {
        use sha2::Digest;
        assert_eq!(imgforge_protocol::bytes::hex(&sha2::Sha256::digest(b"")), EMPTY_SHA256);
    }

    #[test]
    fn records_metadata_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc/deep")).unwrap();
        std::fs::write(root.join("etc/hostname"), "h\n").unwrap();
        std::fs::set_permissions(root.join("etc/hostname"), std::fs::Permissions::from_mode(0o600)).unwrap();
        symlink("/", root.join("etc/evil")).unwrap();
        symlink("../../..", root.join("etc/deep/up")).unwrap();
        let snapshot = record(root).unwrap();
        let paths: Vec<String> = snapshot.entries.keys().map(|k| String::from_utf8_lossy(k).into_owned()).collect();
        assert_eq!(paths, ["/", "/etc", "/etc/deep", "/etc/deep/up", "/etc/evil", "/etc/hostname"]);
        let hostname = snapshot.entries[&b"/etc/hostname".to_vec()];
        assert_eq!((hostname.file_type, hostname.mode, hostname.size), (FileType::File, 0o600, 2));
        assert_eq!(snapshot.entries[&b"/etc/evil".to_vec()].file_type, FileType::Symlink);
        assert!(snapshot.left_out.is_empty());
    }

    #[test]
    fn the_walk_is_bounded_in_depth_and_path_length() {
        let dir = tempfile::tempdir().unwrap();
        let mut deep = dir.path().to_path_buf();
        for _ in 0..MAX_DEPTH + 3 {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        // Deeper than PATH_MAX lets a path name: made one level at a time from the parent.
        let name = CString::new("n".repeat(250)).unwrap();
        std::fs::create_dir(dir.path().join("long")).unwrap();
        let mut at = std::fs::File::open(dir.path().join("long")).unwrap();
        for _ in 0..(MAX_PATH_BYTES / 251 + 2) {
            // SAFETY: a valid directory descriptor and a NUL-terminated name.
            assert_eq!(unsafe { libc::mkdirat(at.as_raw_fd(), name.as_ptr(), 0o755) }, 0);
            // SAFETY: likewise; the descriptor returned is owned by the File.
            let fd = unsafe { libc::openat(at.as_raw_fd(), name.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
            assert!(fd >= 0);
            // SAFETY: openat returned a new descriptor.
            at = unsafe { std::fs::File::from_raw_fd(fd) };
        }
        let snapshot = record(dir.path()).unwrap();
        assert!(snapshot.entries.keys().all(|k| k.len() <= MAX_PATH_BYTES));
        let deepest = snapshot.entries.keys().map(|k| k.iter().filter(|b| **b == b'/').count()).max().unwrap();
        assert_eq!(deepest, MAX_DEPTH + 1, "entries of the deepest directory entered are recorded, no deeper");
        assert_eq!(snapshot.left_out.len(), 2, "{:?}", snapshot.left_out);
    }

    /// The other boots of a shared reading, played by the test: what the walk gave, and the
    /// digests to hand over at the `arrive_at`th question (never if `None`).
    struct OtherBoots {
        given: Option<Vec<Vec<u8>>>,
        asked: usize,
        arrive_at: Option<usize>,
        hand_over: Vec<imgforge_protocol::digest_cache::Entry>,
        on_share: Option<Box<dyn FnOnce()>>,
    }

    impl DigestExchange for OtherBoots {
        fn share(&mut self, tree: &Snapshot) {
            let known = tree.entries.iter().filter(|(p, m)| digest_cache::known(p, m).is_some());
            self.given = Some(known.map(|(p, _)| p.clone()).collect());
            if let Some(f) = self.on_share.take() {
                f();
            }
        }
        fn arrived(&mut self) -> bool {
            self.asked += 1;
            if Some(self.asked) == self.arrive_at {
                digest_cache::preload(std::mem::take(&mut self.hand_over));
                return true;
            }
            false
        }
    }

    fn tree_of_files(root: &Path) -> BTreeMap<Vec<u8>, String> {
        use sha2::Digest;
        let mut files = BTreeMap::new();
        for (k, dir) in ["etc", "usr/lib", "usr/share/doc", "var"].iter().enumerate() {
            std::fs::create_dir_all(root.join(dir)).unwrap();
            for i in 0..6 {
                let bytes = format!("{dir} {i}").repeat(1 + 997 * ((i + k) % 3));
                std::fs::write(root.join(dir).join(format!("f{i}")), &bytes).unwrap();
                let hex = imgforge_protocol::bytes::hex(&sha2::Sha256::digest(bytes.as_bytes()));
                files.insert(format!("/{dir}/f{i}").into_bytes(), hex);
            }
        }
        symlink("/", root.join("etc/evil")).unwrap();
        files
    }

    fn other_boots(arrive_at: Option<usize>) -> OtherBoots {
        OtherBoots { given: None, asked: 0, arrive_at, hand_over: Vec::new(), on_share: None }
    }

    /// A boot reads its share, gives it, then takes the others' digests once they arrive, for
    /// the files it had not read yet: its tree and contents are those of a whole walk but for
    /// the digests handed over.
    #[test]
    fn a_shared_walk_reads_its_share_and_takes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let files = tree_of_files(dir.path());
        let whole = record(dir.path()).unwrap();
        let handed = "e".repeat(64);
        let mut others = other_boots(Some(1));
        // Every file of the tree handed over: only those the walk had not read may be taken.
        others.hand_over = whole
            .entries
            .iter()
            .filter(|(_, m)| m.file_type == FileType::File)
            .map(|(p, m)| imgforge_protocol::digest_cache::Entry {
                path: p.clone(),
                ino: m.ino,
                size: m.size,
                mtime: m.mtime,
                ctime: m.ctime,
                sha256: handed.clone(),
            })
            .collect();
        let (tree, contents) =
            record_with_contents_shared(dir.path(), Share { part: 1, parts: 2 }, &mut others).unwrap();
        assert_eq!(tree.entries, whole.entries);
        let given = others.given.unwrap();
        assert!(!given.is_empty() && given.len() < files.len(), "a share, not all: {given:?}");
        for (path, sha256) in &files {
            let expected = if given.contains(path) { sha256 } else { &handed };
            assert_eq!(contents.get(path), Some(&ManifestContent::Sha256(expected.clone())), "{path:?}");
        }
        assert_eq!(contents[&b"/etc/evil".to_vec()], ManifestContent::LinkTarget(b"/".to_vec()));
    }

    /// Digests that never arrive cost only time: the boot reads the other shares itself.
    #[test]
    fn a_shared_walk_whose_others_never_answer_reads_everything() {
        let dir = tempfile::tempdir().unwrap();
        let files = tree_of_files(dir.path());
        let mut others = other_boots(None);
        let (_, contents) = record_with_contents_shared(dir.path(), Share { part: 0, parts: 3 }, &mut others).unwrap();
        assert!(others.asked > 0);
        for (path, sha256) in &files {
            assert_eq!(contents.get(path), Some(&ManifestContent::Sha256(sha256.clone())), "{path:?}");
        }
    }

    /// A file of another share is opened again after the walk, following no link: a directory
    /// swapped for a symlink in between makes the walk fail and name the file.
    #[test]
    fn a_deferred_file_is_not_reached_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        tree_of_files(dir.path());
        let root = dir.path().to_owned();
        let mut others = other_boots(None);
        others.on_share = Some(Box::new(move || {
            for d in ["etc", "usr", "var"] {
                std::fs::rename(root.join(d), root.join(format!("{d}.moved"))).unwrap();
                symlink(format!("{d}.moved"), root.join(d)).unwrap();
            }
        }));
        let e = record_with_contents_shared(dir.path(), Share { part: 0, parts: 2 }, &mut others).unwrap_err();
        assert!(e.to_string().contains("its directory is no longer there"), "{e}");
    }
}

/// The file digests of one helper boot, shared by its variants: they start from one base, so a
/// file no operation touched has the same path, inode, size and times in every variant, and is
/// read once, not once a variant (reading the whole guest under TCG costs seconds). Any change
/// to a file moves its ctime, which no program can set, so a changed file is never matched.
pub mod digest_cache {
    use super::Meta;
    use imgforge_protocol::digest_cache::Entry;
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    /// What identifies a file's bytes within a boot (see [`key`]); the last field says
    /// whether the file sits on the filesystem mounted where its path says (a key without it
    /// is never looked up nor kept: see [`super::mount_registry`]).
    pub type Key = (Vec<u8>, u64, u64, i64, i64, i64, i64, bool);

    fn cache() -> &'static Mutex<HashMap<Key, String>> {
        static CACHE: OnceLock<Mutex<HashMap<Key, String>>> = OnceLock::new();
        CACHE.get_or_init(Default::default)
    }

    fn key_of(path: &[u8], meta: &Meta) -> Key {
        (path.to_vec(), meta.ino, meta.size, meta.mtime.0, meta.mtime.1, meta.ctime.0, meta.ctime.1, true)
    }

    /// What identifies a file's bytes within a boot: its guest path, inode, size and times,
    /// on the filesystem mounted where the path says. Inode numbers are unique on one
    /// filesystem only (on btrfs, one subvolume): a file on another filesystem or subvolume
    /// than the one its path was on when the guest was mounted (a guest program renamed the
    /// directories above two mounts, or a subvolume over another) may have the inode number,
    /// size and times of the file that was there, and other bytes.
    pub fn key(path: &[u8], st: &libc::stat) -> Key {
        let placed = super::mount_registry::placed(path, st.st_dev);
        let (size, ino) = (st.st_size as u64, st.st_ino);
        (path.to_vec(), ino, size, st.st_mtime, st.st_mtime_nsec, st.st_ctime, st.st_ctime_nsec, placed)
    }

    /// The digest of the file `key` names, if it was read before in this boot.
    pub fn get(key: &Key) -> Option<String> {
        if !key.7 {
            return None;
        }
        cache().lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
    }

    /// Keeps the digest of the file `key` names.
    pub fn insert(key: Key, digest: String) {
        if key.7 {
            cache().lock().unwrap_or_else(|p| p.into_inner()).insert(key, digest);
        }
    }

    /// Takes digests an earlier boot of the same base computed (the host's digest cache).
    pub fn preload(entries: Vec<Entry>) {
        let mut cache = cache().lock().unwrap_or_else(|p| p.into_inner());
        for e in entries {
            cache.insert((e.path, e.ino, e.size, e.mtime.0, e.mtime.1, e.ctime.0, e.ctime.1, true), e.sha256);
        }
    }

    /// The known digest of the file recorded as `meta` at `path`.
    pub fn known(path: &[u8], meta: &Meta) -> Option<String> {
        cache().lock().unwrap_or_else(|p| p.into_inner()).get(&key_of(path, meta)).cloned()
    }

    #[cfg(test)]
    mod tests {
        /// A file seen before (same path, inode, size, times) is not read again; one whose
        /// ctime moved is.
        #[test]
        fn unchanged_files_are_read_once() {
            // SAFETY: a plain C struct, all zeros is a valid value.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            st.st_ino = 42;
            st.st_size = 7;
            st.st_ctime = 1_700_000_000;
            let path = b"/digest-cache-test";
            assert_eq!(super::get(&super::key(path, &st)), None);
            super::insert(super::key(path, &st), "first".into());
            assert_eq!(super::get(&super::key(path, &st)).as_deref(), Some("first"));
            st.st_ctime_nsec = 1;
            assert_eq!(super::get(&super::key(path, &st)), None, "a file whose ctime moved is read again");
        }
    }
}

/// Where each of the guest's filesystems was mounted, recorded before any guest program ran:
/// a file's digest is kept and looked up only where the file sits on the filesystem mounted
/// deepest above its path (see [`digest_cache::key`]). Empty (nothing recorded: a walk outside
/// a variant build), every file counts as placed.
pub mod mount_registry {
    /// (device, guest mount point) of each mount, as recorded.
    type Mounts = Vec<(u64, Vec<u8>)>;

    #[cfg(not(test))]
    static MOUNTS: std::sync::Mutex<Mounts> = std::sync::Mutex::new(Vec::new());

    // Each test thread its own record: unit tests run side by side.
    #[cfg(test)]
    thread_local! {
        static MOUNTS: std::cell::RefCell<Mounts> = const { std::cell::RefCell::new(Vec::new()) };
    }

    fn with<T>(f: impl FnOnce(&mut Mounts) -> T) -> T {
        #[cfg(not(test))]
        return f(&mut MOUNTS.lock().unwrap_or_else(|p| p.into_inner()));
        #[cfg(test)]
        return MOUNTS.with(|m| f(&mut m.borrow_mut()));
    }

    /// Records the guest's mounts (device number, guest path of the mount point), replacing
    /// what was recorded.
    pub fn record(mounts: Mounts) {
        with(|m| *m = mounts);
    }

    /// Whether `point` is `path` or one of its parent directories.
    fn above(point: &[u8], path: &[u8]) -> bool {
        point == b"/" || path == point || path.strip_prefix(point).is_some_and(|rest| rest.first() == Some(&b'/'))
    }

    /// Whether a file at `path` on device `dev` sits on the filesystem recorded as mounted
    /// deepest above `path` (pure but for the record).
    pub fn placed(path: &[u8], dev: u64) -> bool {
        with(|mounts| {
            if mounts.is_empty() {
                return true;
            }
            let deepest = mounts.iter().filter(|(_, point)| above(point, path)).max_by_key(|(_, point)| point.len());
            deepest.is_some_and(|(owner, _)| *owner == dev)
        })
    }

    #[cfg(test)]
    mod tests {
        /// The deepest mount above a path owns it: a file of another device there (a mount
        /// renamed under another's name, a btrfs subvolume) is not placed.
        #[test]
        fn the_deepest_mount_above_a_path_owns_it() {
            super::record(vec![(1, b"/".to_vec()), (2, b"/boot".to_vec()), (3, b"/boot/efi".to_vec())]);
            assert!(super::placed(b"/etc/passwd", 1));
            assert!(super::placed(b"/boot/vmlinuz", 2));
            assert!(super::placed(b"/boot/efi/EFI/x", 3));
            assert!(super::placed(b"/bootx/y", 1), "a sibling with the same prefix");
            assert!(!super::placed(b"/boot/vmlinuz", 1));
            assert!(!super::placed(b"/etc/passwd", 2));
            assert!(!super::placed(b"/etc/passwd", 9), "a device not recorded: a subvolume");
            super::record(Vec::new());
            assert!(super::placed(b"/etc/passwd", 9), "nothing recorded");
        }
    }
}

/// What a walk does with a file swapped or written between its listing (`fstatat`) and its
/// reading, through the walk's own path (`Walk::file_contents`, then the queue's check).
#[cfg(test)]
mod swaps {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::ffi::OsStrExt;

    /// A walk of the directory `dir`, listing `name` now; `between` runs after the listing and
    /// before the open; then the queue is drained. The walk's contents and first error.
    fn list_then(
        dir: &Path,
        name: &str,
        between: impl FnOnce(),
    ) -> (Option<ManifestContent>, Option<String>, libc::stat) {
        let stream = DirStream::open(open_dir(dir).unwrap()).unwrap();
        let c = CString::new(name).unwrap();
        let st = stream.stat_at(&c).unwrap();
        between();
        let mut walk = Walk { read_contents: true, ..Walk::default() };
        let path = [b"/walked-", dir.as_os_str().as_bytes(), b"/", name.as_bytes()].concat();
        walk.file_contents(&stream, &c, &path, &st);
        let done = walk.reads.finish();
        walk.take_digests(done);
        let content = walk.contents.get(&path).cloned();
        (content, walk.unreadable.map(|(_, e)| e.to_string()), st)
    }

    fn hex_sha256(bytes: &[u8]) -> String {
        use sha2::Digest;
        imgforge_protocol::bytes::hex(&sha2::Sha256::digest(bytes))
    }

    /// Held: a FIFO renamed over a listed file, with a writer holding it and bytes waiting, is
    /// refused; no more than the listed size is taken from it; no hang.
    #[test]
    fn a_fifo_swapped_in_is_refused_after_at_most_the_listed_size() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"0123456789").unwrap();
        let fifo = dir.path().join("fifo");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        // Read and write ends held (O_RDWR does not wait), 100 bytes waiting.
        let mut held = std::fs::OpenOptions::new().read(true).write(true).open(&fifo).unwrap();
        held.write_all(&[b'x'; 100]).unwrap();
        let (content, error, _) = list_then(dir.path(), "f", || std::fs::rename(&fifo, dir.path().join("f")).unwrap());
        assert_eq!(content, None);
        assert_eq!(error.as_deref(), Some("replaced while the tree was walked"));
        let mut left = [0u8; 200];
        assert_eq!(held.read(&mut left).unwrap(), 90, "the walk took the listed 10 bytes, no more");

        // A writer but nothing waiting: EAGAIN (O_NONBLOCK), not a hang.
        std::fs::write(dir.path().join("g"), b"0123456789").unwrap();
        let (content, error, _) =
            list_then(dir.path(), "g", || std::fs::rename(dir.path().join("f"), dir.path().join("g")).unwrap());
        assert_eq!(content, None);
        assert!(error.is_some(), "{error:?}");
        drop(held);
        // No writer at all: reads nothing, then refused.
        std::fs::write(dir.path().join("h"), b"0123456789").unwrap();
        let (content, error, _) =
            list_then(dir.path(), "h", || std::fs::rename(dir.path().join("g"), dir.path().join("h")).unwrap());
        assert_eq!(content, None);
        assert_eq!(error.as_deref(), Some("replaced while the tree was walked"));
    }

    /// Held: a file rewritten with the same size after its listing (the change time moves) is
    /// refused; a file truncated and written again to the same size too; a hard link added (the
    /// change time moves, bytes do not) is refused too (conservative).
    #[test]
    fn same_size_rewrites_and_links_after_the_listing_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"AAAAAAAA").unwrap();
        let (content, error, _) = list_then(dir.path(), "f", || std::fs::write(&p, b"BBBBBBBB").unwrap());
        assert_eq!((content, error.as_deref()), (None, Some("changed while the tree was walked")));
        let (content, error, _) =
            list_then(dir.path(), "f", || std::fs::hard_link(&p, dir.path().join("link")).unwrap());
        assert_eq!((content, error.as_deref()), (None, Some("changed while the tree was walked")));
        // Unchanged: its digest, and that digest is cached under its key.
        let (content, error, st) = list_then(dir.path(), "f", || {});
        assert_eq!((content, error), (Some(ManifestContent::Sha256(hex_sha256(b"BBBBBBBB"))), None));
        let path = [b"/walked-", dir.path().as_os_str().as_bytes(), b"/f"].concat();
        assert_eq!(digest_cache::get(&digest_cache::key(&path, &st)), Some(hex_sha256(b"BBBBBBBB")));
    }

    /// Held: a larger file renamed over the listed one (another inode) is read only to the listed
    /// size and refused.
    #[test]
    fn a_larger_file_swapped_in_is_read_to_the_listed_size_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"small").unwrap();
        std::fs::write(dir.path().join("big"), vec![7u8; 1 << 20]).unwrap();
        let (content, error, _) =
            list_then(dir.path(), "f", || std::fs::rename(dir.path().join("big"), dir.path().join("f")).unwrap());
        assert_eq!((content, error.as_deref()), (None, Some("replaced while the tree was walked")));
    }

    /// Held: a character device (here /dev/zero) standing where a regular file was listed is read
    /// to the listed size only and refused (the guest's filesystems are nodev besides).
    #[test]
    fn a_device_in_place_of_a_listed_file_is_read_to_the_listed_size_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![1u8; 1 << 20]).unwrap();
        let listed = lstat(&p).unwrap();
        let zero = std::fs::File::open("/dev/zero").unwrap();
        let mut queue = DigestQueue::default();
        assert!(queue.push("f", zero, &listed).is_empty());
        let done: Vec<_> = queue.finish().into_iter().map(|(k, d)| (k, d.map_err(|e| e.to_string()))).collect();
        assert_eq!(done, [("f", Err("replaced while the tree was walked".to_owned()))]);
    }

    /// The walks leave access times alone: reading a file whose access time is older than its
    /// modification time would otherwise move it (relatime) and write its inode into the output.
    #[test]
    fn a_walk_leaves_access_times_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/f"), b"bytes").unwrap();
        let old = libc::timespec { tv_sec: 1000, tv_nsec: 0 };
        let keep = libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT };
        for p in ["d/f", "d"] {
            let c = CString::new(dir.path().join(p).as_os_str().as_bytes()).unwrap();
            // SAFETY: a NUL-terminated path and two timespecs.
            assert_eq!(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), [old, keep].as_ptr(), 0) }, 0);
        }
        let (_, contents) = record_with_contents(dir.path()).unwrap();
        assert_eq!(contents.get(b"/d/f".as_slice()), Some(&ManifestContent::Sha256(hex_sha256(b"bytes"))));
        for p in ["d/f", "d"] {
            assert_eq!(lstat(&dir.path().join(p)).unwrap().st_atime, 1000, "{p}");
        }
    }
}
