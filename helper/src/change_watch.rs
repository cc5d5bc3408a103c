//! Which directories of the guest's filesystems anything changed in while a variant's
//! operations ran, told by the kernel (fanotify, one mark on each of the guest's filesystems)
//! rather than found by walking the whole tree again: under TCG a walk of a small Debian costs
//! most of a variant's time in the helper. The tree after the operations is then the tree before
//! them with those directories listed again (`snapshot::refresh_with_contents`).
//!
//! What is reported covers every way a path's entry, metadata or bytes can change through the
//! filesystem: entries created, removed or moved (in the directory holding them), metadata
//! (`FAN_ATTRIB`, also a link count), bytes written, truncated or allocated (`FAN_MODIFY`), and
//! any file opened for writing when it is closed (`FAN_CLOSE_WRITE`: a write through a shared
//! mapping raises no `FAN_MODIFY`). An inode changed under one name is also changed under its
//! other hard links: the object's inode number is reported with it, and every path of that inode
//! is listed again. Anything this cannot account for — the kernel or a filesystem refuses the
//! marks, two filesystems share an identifier, events were lost (the queue overflowed), an
//! event does not parse — is an error, and the caller walks the whole tree instead.
//! A filesystem whose handles do not persist (vfat: an inode out of the cache cannot be opened
//! by handle, and its change would be taken for a removal) is not watched: its mount is walked
//! whole.

use crate::snapshot::Snapshot;
use imgforge_protocol::change::FileType;
use std::collections::BTreeSet;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Events that can change a path's entry, metadata or bytes.
const MASK: u64 = libc::FAN_MODIFY
    | libc::FAN_ATTRIB
    | libc::FAN_CLOSE_WRITE
    | libc::FAN_CREATE
    | libc::FAN_DELETE
    | libc::FAN_MOVED_FROM
    | libc::FAN_MOVED_TO
    | libc::FAN_DELETE_SELF
    | libc::FAN_MOVE_SELF
    | libc::FAN_ONDIR;

/// The length of `struct fanotify_event_metadata`.
const METADATA_LEN: usize = 24;

/// A watch on the guest's filesystems, from [`ChangeWatch::start`] to [`ChangeWatch::finish`].
pub struct ChangeWatch {
    group: OwnedFd,
    filesystems: Vec<Watched>,
    /// Guest paths of the mounts of filesystems not watched (see [`handles_persist`]).
    unwatched: BTreeSet<Vec<u8>>,
}

/// One marked filesystem: its identifier in events and a descriptor on it to open handles with.
struct Watched {
    fsid: [i32; 2],
    mount: OwnedFd,
}

/// What the operations touched: guest directories (absolute guest paths) and inode numbers of
/// other objects (any filesystem).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Touched {
    /// Directories whose entries, or whose entries' metadata or bytes, changed; or that changed
    /// themselves.
    pub dirs: BTreeSet<Vec<u8>>,
    /// Inode numbers of files, links and nodes changed (their every path is listed again).
    pub inodes: BTreeSet<u64>,
    /// Guest paths of mounted filesystems that were not watched: walked whole.
    pub whole: BTreeSet<Vec<u8>>,
}

impl Touched {
    /// The directories to list again: those named, and those holding a path of `base` whose
    /// inode is named (a file changed through another of its hard links) (pure).
    pub fn dirs_to_list(&self, base: &Snapshot) -> BTreeSet<Vec<u8>> {
        let mut dirs = self.dirs.clone();
        for (path, meta) in &base.entries {
            if meta.file_type != FileType::Directory && self.inodes.contains(&meta.ino) {
                dirs.insert(crate::changes::parent(path).to_vec());
            }
        }
        dirs
    }
}

impl ChangeWatch {
    /// Marks every block-backed filesystem mounted under `target` as `mounts_file` lists them
    /// (the root first), for the events of [`MASK`].
    pub fn start(target: &Path, mounts_file: &Path) -> Result<Self, String> {
        Self::start_with(target, mounts_file, handles_persist)
    }

    /// [`ChangeWatch::start`], watching only the filesystems of the types `persist` accepts
    /// (see [`handles_persist`]); the mounts of the others are walked whole.
    fn start_with(target: &Path, mounts_file: &Path, persist: fn(i64) -> bool) -> Result<Self, String> {
        let text = std::fs::read_to_string(mounts_file)
            .map_err(|e| format!("cannot read the list of the guest's mounts {}: {e}", mounts_file.display()))?;
        let flags = libc::FAN_CLASS_NOTIF
            | libc::FAN_CLOEXEC
            | libc::FAN_NONBLOCK
            | libc::FAN_REPORT_FID
            | libc::FAN_REPORT_DIR_FID;
        // SAFETY: plain flags; a new descriptor or -1.
        let fd = unsafe { libc::fanotify_init(flags, (libc::O_RDONLY | libc::O_CLOEXEC) as libc::c_uint) };
        if fd < 0 {
            return Err(format!("fanotify_init: {}", io::Error::last_os_error()));
        }
        // SAFETY: fanotify_init returned a new descriptor that we now own.
        let group = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut filesystems: Vec<Watched> = Vec::new();
        let mut unwatched = BTreeSet::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            let at = Path::new(line);
            if at.strip_prefix(target).is_err() {
                continue;
            }
            let mount = crate::snapshot::open_dir(at).map_err(|e| format!("cannot open {line}: {e}"))?;
            let st = crate::snapshot::fstat(&mount).map_err(|e| format!("cannot look at {line}: {e}"))?;
            // The chroots' /dev, /proc, /sys: not the guest's, and no walk enters them. (A
            // btrfs one is the guest's; its type is not one whose handles persist, below.)
            if crate::snapshot::is_pseudo(libc::AT_FDCWD, &crate::confinement::path_cstring(at), &st) {
                continue;
            }
            let (fsid, kind) = fsid_of(&mount).map_err(|e| format!("cannot read the filesystem id of {line}: {e}"))?;
            if !persist(kind) {
                // Its handles may name nothing once its inodes leave the cache (vfat finds an
                // inode by handle only while it is cached): a change there could be taken for
                // an object since removed. Such a filesystem (an EFI system partition) is small.
                let path = guest_path(line.as_bytes(), target.as_os_str().as_bytes())
                    .ok_or_else(|| format!("{line} is not under the guest root {}", target.display()))?;
                if path == b"/" {
                    return Err(format!("the guest's root filesystem, of type {kind:#x}, cannot be watched"));
                }
                unwatched.insert(path);
                continue;
            }
            if filesystems.iter().any(|w| w.fsid == fsid) {
                return Err(format!("{line} shares its filesystem id with another of the guest's filesystems"));
            }
            let c = CString::new(line).map_err(|_| format!("{line} holds a NUL byte"))?;
            // SAFETY: our fanotify descriptor, a NUL-terminated path; no memory is kept.
            let rc = unsafe {
                libc::fanotify_mark(
                    group.as_raw_fd(),
                    libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM,
                    MASK,
                    libc::AT_FDCWD,
                    c.as_ptr(),
                )
            };
            if rc != 0 {
                return Err(format!("cannot watch the filesystem at {line}: {}", io::Error::last_os_error()));
            }
            filesystems.push(Watched { fsid, mount });
        }
        if filesystems.is_empty() {
            return Err(format!("no filesystem of the guest is mounted under {}", target.display()));
        }
        Ok(Self { group, filesystems, unwatched })
    }

    /// Reads every event queued and resolves them to guest paths under `target`. Call it once
    /// no guest program runs any more.
    pub fn finish(self, target: &Path) -> Result<Touched, String> {
        let mut touched = Touched { whole: self.unwatched.clone(), ..Touched::default() };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: our descriptor and a writable buffer of the length given.
            let n = unsafe { libc::read(self.group.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    break;
                }
                return Err(format!("cannot read the filesystem events: {e}"));
            }
            if n == 0 {
                break;
            }
            for event in parse_events(&buf[..n as usize])? {
                if event.mask & libc::FAN_Q_OVERFLOW != 0 {
                    return Err("the filesystem events overflowed their queue: some were lost".into());
                }
                for fid in &event.fids {
                    self.resolve(fid, target, &mut touched)?;
                }
            }
        }
        Ok(touched)
    }

    /// Adds what `fid` names to `touched`: a directory by its guest path, anything else by its
    /// inode number. An object that no longer exists is left: the directory that held it has
    /// an event of its own (its entry was removed or moved).
    fn resolve(&self, fid: &Fid, target: &Path, touched: &mut Touched) -> Result<(), String> {
        let watched = self
            .filesystems
            .iter()
            .find(|w| w.fsid == fid.fsid)
            .ok_or_else(|| format!("an event names filesystem id {:?}, which is not watched", fid.fsid))?;
        let Some(object) = open_handle(&watched.mount, fid)? else { return Ok(()) };
        let st = crate::snapshot::fstat(&object).map_err(|e| format!("cannot look at a changed object: {e}"))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            touched.inodes.insert(st.st_ino);
            return Ok(());
        }
        if st.st_nlink == 0 {
            return Ok(());
        }
        let shown = std::fs::read_link(format!("/proc/self/fd/{}", object.as_raw_fd()))
            .map_err(|e| format!("cannot find the path of a changed directory: {e}"))?;
        let path = guest_path(shown.as_os_str().as_bytes(), target.as_os_str().as_bytes()).ok_or_else(|| {
            format!("a changed directory, {}, is not under the guest root {}", shown.display(), target.display())
        })?;
        touched.dirs.insert(path);
        Ok(())
    }
}

/// The guest path of `shown` (a path in the helper's view) under `target`: `/` for the target
/// itself (pure).
pub fn guest_path(shown: &[u8], target: &[u8]) -> Option<Vec<u8>> {
    let rest = shown.strip_prefix(target)?;
    match rest {
        [] => Some(b"/".to_vec()),
        [b'/', ..] => Some(rest.to_vec()),
        _ => None,
    }
}

/// One event: its mask and the objects it names.
#[derive(Debug, PartialEq, Eq)]
pub struct Event {
    /// `FAN_*` bits.
    pub mask: u64,
    /// The file identifiers reported (the directory, the object, or both).
    pub fids: Vec<Fid>,
}

/// A file identifier: the filesystem and a handle of the object on it.
#[derive(Debug, PartialEq, Eq)]
pub struct Fid {
    /// `statfs`'s `f_fsid`.
    pub fsid: [i32; 2],
    /// `file_handle.handle_type`.
    pub handle_type: i32,
    /// `file_handle.f_handle`.
    pub handle: Vec<u8>,
}

/// Parses a buffer of fanotify events of a group reporting file identifiers (pure). Anything
/// out of bounds or of another version is an error: the caller then walks the tree.
pub fn parse_events(buf: &[u8]) -> Result<Vec<Event>, String> {
    let mut events = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let rest = &buf[at..];
        if rest.len() < METADATA_LEN {
            return Err(format!("a filesystem event is cut short at byte {at}"));
        }
        let event_len = u32_at(rest, 0) as usize;
        let version = rest[4];
        let metadata_len = u16::from_ne_bytes([rest[6], rest[7]]) as usize;
        if version != libc::FANOTIFY_METADATA_VERSION {
            return Err(format!("filesystem events of version {version} are not understood"));
        }
        if event_len < METADATA_LEN || event_len > rest.len() || metadata_len < METADATA_LEN || metadata_len > event_len
        {
            return Err(format!("a filesystem event at byte {at} has lengths {event_len} and {metadata_len}"));
        }
        let mask = u64::from_ne_bytes(rest[8..16].try_into().expect("8 bytes"));
        let mut fids = Vec::new();
        let mut info = &rest[metadata_len..event_len];
        while !info.is_empty() {
            if info.len() < 4 {
                return Err("a filesystem event's information is cut short".into());
            }
            let (kind, len) = (info[0], u16::from_ne_bytes([info[2], info[3]]) as usize);
            if len < 4 || len > info.len() {
                return Err(format!("a filesystem event's information has length {len}"));
            }
            if matches!(
                kind,
                libc::FAN_EVENT_INFO_TYPE_FID | libc::FAN_EVENT_INFO_TYPE_DFID | libc::FAN_EVENT_INFO_TYPE_DFID_NAME
            ) {
                fids.push(parse_fid(&info[4..len])?);
            }
            info = &info[len..];
        }
        events.push(Event { mask, fids });
        at += event_len;
    }
    Ok(events)
}

/// An fsid and a `struct file_handle` (a name may follow it: not needed).
fn parse_fid(body: &[u8]) -> Result<Fid, String> {
    if body.len() < 16 {
        return Err("a file identifier is cut short".into());
    }
    let fsid = [u32_at(body, 0) as i32, u32_at(body, 4) as i32];
    let handle_bytes = u32_at(body, 8) as usize;
    let handle_type = u32_at(body, 12) as i32;
    let handle = body
        .get(16..16 + handle_bytes)
        .ok_or_else(|| format!("a file handle of {handle_bytes} bytes overruns its event"))?;
    Ok(Fid { fsid, handle_type, handle: handle.to_vec() })
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

/// Whether handles of a filesystem of type `kind` (`statfs`'s `f_type`) open its objects for
/// as long as they exist, cached or not: ext2/3/4 and XFS, the types of the guest's root; not
/// vfat, whose handles name only inodes in the cache (pure).
pub fn handles_persist(kind: i64) -> bool {
    const EXT_SUPER_MAGIC: i64 = 0xEF53;
    const XFS_SUPER_MAGIC: i64 = 0x5846_5342;
    matches!(kind, EXT_SUPER_MAGIC | XFS_SUPER_MAGIC)
}

/// The filesystem id and type (`f_type`) of the filesystem of `fd`.
fn fsid_of(fd: &OwnedFd) -> io::Result<([i32; 2], i64)> {
    // SAFETY: statfs is plain old data.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a writable statfs.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fsid_t is two C ints, with private fields.
    let fsid = unsafe { std::mem::transmute::<libc::fsid_t, [i32; 2]>(st.f_fsid) };
    Ok((fsid, st.f_type as i64))
}

/// Opens the object of `fid` on the filesystem of `mount` (`O_PATH`); `None` if it no longer
/// exists.
fn open_handle(mount: &OwnedFd, fid: &Fid) -> Result<Option<OwnedFd>, String> {
    // struct file_handle: handle_bytes, handle_type, then the bytes; kept 4-byte aligned.
    let mut words = vec![0u32; 2 + fid.handle.len().div_ceil(4)];
    words[0] = fid.handle.len() as u32;
    words[1] = fid.handle_type as u32;
    // SAFETY: the words hold at least the handle's bytes past the two header fields.
    unsafe {
        std::ptr::copy_nonoverlapping(fid.handle.as_ptr(), words.as_mut_ptr().add(2).cast::<u8>(), fid.handle.len());
    }
    // SAFETY: a descriptor on the filesystem and a file_handle laid out as the kernel reads it.
    let fd = unsafe {
        libc::open_by_handle_at(mount.as_raw_fd(), words.as_mut_ptr().cast(), libc::O_PATH | libc::O_CLOEXEC)
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ESTALE) | Some(libc::ENOENT) => Ok(None),
            _ => Err(format!("cannot open a changed object by its handle: {e}")),
        };
    }
    // SAFETY: open_by_handle_at returned a new descriptor that we now own.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::snapshot;
    use std::io::Write;
    use std::os::unix::fs::{symlink, PermissionsExt};

    /// An event as the kernel lays it out: metadata, then info records of `(type, fsid,
    /// handle type, handle)`.
    fn event(mask: u64, fids: &[(u8, [i32; 2], i32, &[u8])]) -> Vec<u8> {
        let mut info = Vec::new();
        for (kind, fsid, handle_type, handle) in fids {
            let len = (4 + 8 + 8 + handle.len()).div_ceil(4) * 4;
            let start = info.len();
            info.extend_from_slice(&[*kind, 0]);
            info.extend_from_slice(&(len as u16).to_ne_bytes());
            info.extend_from_slice(&fsid[0].to_ne_bytes());
            info.extend_from_slice(&fsid[1].to_ne_bytes());
            info.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
            info.extend_from_slice(&handle_type.to_ne_bytes());
            info.extend_from_slice(handle);
            info.resize(start + len, 0);
        }
        let mut out = Vec::new();
        out.extend_from_slice(&((METADATA_LEN + info.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&[libc::FANOTIFY_METADATA_VERSION, 0]);
        out.extend_from_slice(&(METADATA_LEN as u16).to_ne_bytes());
        out.extend_from_slice(&mask.to_ne_bytes());
        out.extend_from_slice(&(-1i32).to_ne_bytes());
        out.extend_from_slice(&7i32.to_ne_bytes());
        out.extend_from_slice(&info);
        out
    }

    #[test]
    fn events_parse_with_their_file_identifiers() {
        let mut buf = event(
            libc::FAN_MODIFY,
            &[
                (libc::FAN_EVENT_INFO_TYPE_DFID, [1, 2], 0x81, &[9; 8]),
                (libc::FAN_EVENT_INFO_TYPE_FID, [1, 2], 0x81, &[7; 12]),
            ],
        );
        buf.extend(event(libc::FAN_Q_OVERFLOW, &[]));
        let events = parse_events(&buf).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].mask, libc::FAN_MODIFY);
        assert_eq!(
            events[0].fids,
            [
                Fid { fsid: [1, 2], handle_type: 0x81, handle: vec![9; 8] },
                Fid { fsid: [1, 2], handle_type: 0x81, handle: vec![7; 12] }
            ]
        );
        assert_eq!((events[1].mask, events[1].fids.len()), (libc::FAN_Q_OVERFLOW, 0));
    }

    #[test]
    fn malformed_events_are_errors() {
        let good = event(libc::FAN_CREATE, &[(libc::FAN_EVENT_INFO_TYPE_DFID, [1, 2], 1, &[3; 8])]);
        assert!(parse_events(&good[..good.len() - 1]).is_err(), "cut short");
        assert!(parse_events(&good[..10]).is_err(), "metadata cut short");
        let mut version = good.clone();
        version[4] = 2;
        assert!(parse_events(&version).is_err(), "another version");
        let mut overrun = good.clone();
        overrun[METADATA_LEN + 12..METADATA_LEN + 16].copy_from_slice(&200u32.to_ne_bytes());
        assert!(parse_events(&overrun).is_err(), "a handle longer than its record");
        let mut info_len = good.clone();
        info_len[METADATA_LEN + 2..METADATA_LEN + 4].copy_from_slice(&2u16.to_ne_bytes());
        assert!(parse_events(&info_len).is_err(), "a record shorter than its header");
        let mut event_len = good.clone();
        event_len[..4].copy_from_slice(&4u32.to_ne_bytes());
        assert!(parse_events(&event_len).is_err(), "an event shorter than its metadata");
    }

    #[test]
    fn guest_paths_are_under_the_target_only() {
        assert_eq!(guest_path(b"/mnt/t", b"/mnt/t").unwrap(), b"/");
        assert_eq!(guest_path(b"/mnt/t/etc/x", b"/mnt/t").unwrap(), b"/etc/x");
        assert_eq!(guest_path(b"/mnt/target", b"/mnt/t"), None);
        assert_eq!(guest_path(b"/other", b"/mnt/t"), None);
    }

    /// A filesystem of type `kind` made in a file and loop-mounted for the test (the helper
    /// watches only block-backed filesystems), unmounted when dropped.
    pub(crate) struct LoopFs {
        // Unmounted before its directory goes: fields drop in order.
        mounted: MountedInside,
        _at: tempfile::TempDir,
    }

    impl LoopFs {
        pub(crate) fn mount(kind: &str) -> Option<Self> {
            let at = tempfile::tempdir().unwrap();
            Some(Self { mounted: MountedInside::new(kind, at.path())?, _at: at })
        }

        pub(crate) fn path(&self) -> &Path {
            &self.mounted.at
        }
    }

    /// A filesystem of type `kind` made in a file and loop-mounted at `at` (made), inside
    /// another one; unmounted when dropped.
    pub(crate) struct MountedInside {
        at: std::path::PathBuf,
        _image: tempfile::TempDir,
    }

    impl MountedInside {
        pub(crate) fn new(kind: &str, at: &Path) -> Option<Self> {
            std::fs::create_dir_all(at).unwrap();
            let image = tempfile::tempdir().unwrap();
            let file = image.path().join("fs.img");
            std::fs::File::create(&file).unwrap().set_len(320 << 20).unwrap();
            let made = std::process::Command::new(format!("mkfs.{kind}")).arg("-q").arg(&file).output().unwrap();
            assert!(made.status.success(), "mkfs.{kind}: {}", String::from_utf8_lossy(&made.stderr));
            let mounted = std::process::Command::new("mount").args(["-o", "loop"]).arg(&file).arg(at).output().unwrap();
            if !mounted.status.success() {
                eprintln!("skipped: cannot loop-mount {kind} here: {}", String::from_utf8_lossy(&mounted.stderr));
                return None;
            }
            Some(Self { at: at.to_owned(), _image: image })
        }
    }

    impl Drop for MountedInside {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.at).status();
        }
    }

    /// The tree refreshed from `touched` and the base, checked to be the one a whole walk gives.
    fn refresh_is_whole_walk(
        root: &Path,
        base: &Snapshot,
        base_contents: &std::collections::BTreeMap<Vec<u8>, imgforge_protocol::manifest::ManifestContent>,
        touched: &Touched,
    ) -> snapshot::WithContents {
        let whole = snapshot::record_with_contents(root).unwrap();
        let refreshed =
            snapshot::refresh_with_contents(root, base, base_contents, &touched.dirs_to_list(base), &touched.whole)
                .unwrap();
        assert_eq!(refreshed.0.entries, whole.0.entries);
        assert_eq!(refreshed.1, whole.1);
        refreshed
    }

    fn write(root: &Path, path: &str, text: &str) {
        let at = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::fs::write(at, text).unwrap();
    }

    /// Every kind of change the operations can make, made under a watch: the tree the changed
    /// directories give is the one a whole walk gives. Without the inodes' other links listed
    /// again, it is not (a file changed through a hard link elsewhere).
    #[test]
    fn the_changed_directories_give_the_tree_a_whole_walk_gives() {
        for kind in ["ext4", "xfs"] {
            let Some(fs) = LoopFs::mount(kind) else { return };
            changes_under_a_watch(fs.path());
        }
    }

    /// A base with a tree deeper than a walk goes, which the operations remove: the whole
    /// walk then leaves nothing out (the manifest can be made), so the tree from the changed
    /// directories must not keep the base's count of what was left out.
    #[test]
    fn a_tree_left_out_of_the_base_and_removed_is_not_still_left_out() {
        let Some(fs) = LoopFs::mount("ext4") else { return };
        let root = fs.path();
        write(root, "/etc/hostname", "base\n");
        let mut deep = root.join("opt/deep");
        for _ in 0..snapshot::MAX_DEPTH + 2 {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        let (base, base_contents) = snapshot::record_with_contents(root).unwrap();
        assert!(!base.left_out.is_empty(), "the base's walk leaves the deepest directories out");
        let mounts = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(mounts.path(), format!("{}\n", root.display())).unwrap();

        let watch = ChangeWatch::start(root, mounts.path()).expect("a loop-mounted filesystem can be watched");
        std::fs::remove_dir_all(root.join("opt/deep")).unwrap();
        let touched = watch.finish(root).unwrap();

        let whole = snapshot::record_with_contents(root).unwrap();
        assert!(whole.0.left_out.is_empty());
        // An error is fine: the caller then walks the whole tree.
        if let Ok(refreshed) =
            snapshot::refresh_with_contents(root, &base, &base_contents, &touched.dirs_to_list(&base), &touched.whole)
        {
            assert_eq!(refreshed.0.left_out, whole.0.left_out);
            assert_eq!(refreshed.0.entries, whole.0.entries);
        }
    }

    /// vfat (an EFI system partition) opens a handle only while its inode is cached: a change
    /// resolved after memory pressure pushed the inodes out would be taken for an object since
    /// removed, and lost. Only filesystems whose handles persist are watched; the mounts of
    /// the others are walked whole.
    #[test]
    fn only_filesystems_whose_handles_persist_are_watched() {
        assert!(handles_persist(0xEF53) && handles_persist(0x5846_5342), "ext2/3/4, XFS");
        assert!(!handles_persist(0x4d44), "vfat");
        assert!(!handles_persist(0x9123_683E), "btrfs: walked whole");
    }

    /// A btrfs filesystem in the guest (its subvolumes have anonymous device numbers, as the
    /// chroots' /proc and /sys do), with a subvolume inside: not skipped as a pseudo
    /// filesystem but walked whole, subvolume and all, so what changed on it is in the tree.
    #[test]
    fn a_btrfs_filesystem_and_its_subvolumes_are_walked_whole() {
        let Some(fs) = LoopFs::mount("ext4") else { return };
        let root = fs.path();
        write(root, "/etc/hostname", "base\n");
        let home = root.join("home");
        let Some(_home) = MountedInside::new("btrfs", &home) else { return };
        let made =
            std::process::Command::new("btrfs").args(["-q", "subvolume", "create"]).arg(home.join("sub")).output();
        assert!(made.unwrap().status.success(), "btrfs subvolume create");
        write(root, "/home/user/notes", "base notes\n");
        write(root, "/home/sub/kept", "in a subvolume\n");
        let (base, base_contents) = snapshot::record_with_contents(root).unwrap();
        for path in ["/home/user/notes", "/home/sub/kept"] {
            assert!(base.entries.contains_key(path.as_bytes()), "{path} left out of the walk");
        }
        let mounts = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(mounts.path(), format!("{}\n{}\n", root.display(), home.display())).unwrap();

        let watch = ChangeWatch::start(root, mounts.path()).expect("the root can be watched");
        write(root, "/home/user/notes", "variant notes\n");
        write(root, "/home/sub/new", "made in a subvolume\n");
        write(root, "/etc/hostname", "variant\n");
        let touched = watch.finish(root).unwrap();
        assert_eq!(touched.whole, BTreeSet::from([b"/home".to_vec()]));

        let refreshed = refresh_is_whole_walk(root, &base, &base_contents, &touched);
        assert!(refreshed.0.entries.contains_key(b"/home/sub/new".as_slice()));
    }

    /// Two subvolumes `keep` and `swap` made in `home` (a btrfs mount), each with a file `f`, of
    /// `keep_text` and `swap_text` (the same length): the two files have the same inode number
    /// (each subvolume numbers its own from 256), size and times, as a hostile image can hold
    /// them (a crafted image sets any time; here both are written within one clock tick, tried
    /// again until they are). `None` if no two writes shared a tick.
    fn colliding_subvolumes(home: &Path, keep_text: &str, swap_text: &str) -> Option<()> {
        assert_eq!(keep_text.len(), swap_text.len());
        let create = |name: &str| {
            let made =
                std::process::Command::new("btrfs").args(["-q", "subvolume", "create"]).arg(home.join(name)).output();
            assert!(made.unwrap().status.success(), "btrfs subvolume create {name}");
        };
        let delete = |name: &str| {
            let _ =
                std::process::Command::new("btrfs").args(["-q", "subvolume", "delete"]).arg(home.join(name)).output();
        };
        for _ in 0..200 {
            create("keep");
            create("swap");
            std::fs::write(home.join("keep/f"), keep_text).unwrap();
            std::fs::write(home.join("swap/f"), swap_text).unwrap();
            let (a, b) =
                (snapshot::lstat(&home.join("keep/f")).unwrap(), snapshot::lstat(&home.join("swap/f")).unwrap());
            let same =
                |st: &libc::stat| (st.st_ino, st.st_size, st.st_mtime, st.st_mtime_nsec, st.st_ctime, st.st_ctime_nsec);
            if same(&a) == same(&b) {
                assert_ne!(a.st_dev, b.st_dev, "two subvolumes, two devices");
                return Some(());
            }
            delete("keep");
            delete("swap");
        }
        eprintln!("skipped: no two writes within one clock tick");
        None
    }

    /// btrfs subvolumes number their inodes each on their own, so a hostile base can hold, in
    /// two subvolumes, two files of the same inode number, size and times and different bytes.
    /// A guest program (root, without CAP_SYS_ADMIN or CAP_SYS_TIME: a plain rename(2) is
    /// enough) renames one subvolume over the other's name: the file now at the path has the
    /// path, inode number, size and times the base's file had there. Its digest is not taken
    /// from the base's (it is not on a filesystem recorded as mounted above it:
    /// `snapshot::mount_registry`), and the change list, comparing contents, lists it.
    #[test]
    fn a_subvolume_renamed_over_another_does_not_keep_its_digests_or_hide_the_change() {
        use sha2::Digest;
        let Some(fs) = LoopFs::mount("ext4") else { return };
        let root = fs.path();
        write(root, "/etc/hostname", "base\n");
        let home = root.join("home");
        let Some(_home) = MountedInside::new("btrfs", &home) else { return };
        let (good, evil) = ("the base's good bytes\n", "the guest's evil bytes\n");
        let (good, evil) = (good, &evil[..good.len()]);
        let Some(()) = colliding_subvolumes(&home, good, evil) else { return };
        let mounts = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(mounts.path(), format!("{}\n{}\n", root.display(), home.display())).unwrap();
        // As the variants' engine does once the guest is mounted, before any guest program.
        crate::manifest::register_mounts(root, mounts.path()).unwrap();
        let (base, base_contents) = snapshot::record_with_contents(root).unwrap();

        let watch = ChangeWatch::start(root, mounts.path()).expect("the root can be watched");
        // What the guest's program does, without the capabilities guest programs lose: two
        // renames of subvolumes.
        let renamed = std::process::Command::new("capsh")
            .args([
                "--drop=cap_sys_admin,cap_sys_time,cap_mknod,cap_sys_chroot",
                "--",
                "-c",
                "mv keep old && mv swap keep",
            ])
            .current_dir(&home)
            .status();
        if !renamed.is_ok_and(|s| s.success()) {
            std::fs::rename(home.join("keep"), home.join("old")).unwrap();
            std::fs::rename(home.join("swap"), home.join("keep")).unwrap();
        }
        let touched = watch.finish(root).unwrap();
        let (after, contents) =
            snapshot::refresh_with_contents(root, &base, &base_contents, &touched.dirs_to_list(&base), &touched.whole)
                .unwrap();

        let path = b"/home/keep/f".as_slice();
        assert_eq!(std::fs::read_to_string(home.join("keep/f")).unwrap(), evil);
        let sha = |text: &str| imgforge_protocol::bytes::hex(&sha2::Sha256::digest(text.as_bytes()));
        let reported = contents.get(path).cloned();
        let listed = crate::changes::diff_with_contents(&base.entries, &base_contents, &after.entries, &contents);
        let change_listed = listed.iter().any(|c| c.path.as_bytes() == path);
        let whole = snapshot::record_with_contents(root).unwrap().1.get(path).cloned();
        assert!(
            reported == Some(imgforge_protocol::manifest::ManifestContent::Sha256(sha(evil))) && change_listed,
            "/home/keep/f holds {evil:?}: the manifest says {reported:?} (the digest of {good:?} is {}; a whole \
             walk says {whole:?}); its change listed: {change_listed}",
            sha(good)
        );
    }

    /// Held (review of c66f5e1): a btrfs guest root is not watched (the watch fails to start, and
    /// the caller walks the whole tree), and a walk of the root as mounted (the dry run's, and
    /// `changes::report_after_failure`) enters its subvolumes but not the procfs, sysfs and tmpfs
    /// mounted on it, anonymous devices all. `is_pseudo` given a listing (`stat`) that is no
    /// longer what the name holds (a subvolume swapped for the procfs, or the other way round)
    /// says pseudo: the walk skips it.
    #[test]
    fn a_btrfs_root_is_not_watched_and_its_pseudo_mounts_are_not_walked() {
        let Some(fs) = LoopFs::mount("btrfs") else { return };
        let root = fs.path();
        write(root, "/etc/hostname", "btrfs\n");
        let made =
            std::process::Command::new("btrfs").args(["-q", "subvolume", "create"]).arg(root.join("sub")).output();
        assert!(made.unwrap().status.success(), "btrfs subvolume create");
        write(root, "/sub/kept", "in a subvolume\n");
        struct Unmount(std::path::PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let mut mounted = Vec::new();
        for (kind, at) in [("proc", "proc"), ("sysfs", "sys"), ("tmpfs", "dev")] {
            let at = root.join(at);
            std::fs::create_dir_all(&at).unwrap();
            let ok = std::process::Command::new("mount").args(["-t", kind, kind]).arg(&at).status().unwrap();
            assert!(ok.success(), "mount -t {kind}");
            mounted.push(Unmount(at));
        }
        write(root, "/dev/on-the-tmpfs", "not the guest's\n");
        let mounts = tempfile::NamedTempFile::new().unwrap();
        let listed: String = [root.to_owned(), root.join("dev"), root.join("proc"), root.join("sys")]
            .iter()
            .map(|p| format!("{}\n", p.display()))
            .collect();
        std::fs::write(mounts.path(), listed).unwrap();
        let e = ChangeWatch::start(root, mounts.path()).err().expect("a btrfs root is not watched");
        assert!(e.contains("root filesystem"), "{e}");

        let tree = snapshot::record(root).unwrap();
        assert!(tree.entries.contains_key(b"/sub/kept".as_slice()), "the subvolume walked");
        let pseudo: Vec<_> = tree
            .entries
            .keys()
            .filter(|k| ["/proc", "/sys", "/dev"].iter().any(|p| k.starts_with(p.as_bytes())))
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        assert!(pseudo.is_empty(), "walked into the pseudo filesystems: {pseudo:?}");

        let dir = snapshot::open_dir(root).unwrap();
        let (sub, proc_) = (snapshot::lstat(&root.join("sub")).unwrap(), snapshot::lstat(&root.join("proc")).unwrap());
        assert!(!snapshot::is_pseudo(dir.as_raw_fd(), c"sub", &sub));
        assert!(snapshot::is_pseudo(dir.as_raw_fd(), c"proc", &proc_));
        assert!(snapshot::is_pseudo(dir.as_raw_fd(), c"proc", &sub), "a subvolume's listing, the procfs there now");
        assert!(snapshot::is_pseudo(dir.as_raw_fd(), c"sub", &proc_), "the procfs's listing, a subvolume there now");
        assert!(snapshot::is_pseudo(dir.as_raw_fd(), c"gone", &sub), "nothing there now");
    }

    /// A filesystem that is not watched (XFS taken for one here, as vfat cannot be mounted on
    /// every test machine), mounted inside the guest's root: what changed on it is in the tree.
    #[test]
    fn a_filesystem_not_watched_is_walked_whole() {
        let Some(fs) = LoopFs::mount("ext4") else { return };
        let root = fs.path();
        write(root, "/etc/hostname", "base\n");
        let esp = root.join("boot/efi");
        let Some(_esp) = MountedInside::new("xfs", &esp) else { return };
        write(root, "/boot/efi/EFI/debian/grubx64.efi", "base loader\n");
        write(root, "/boot/efi/EFI/BOOT/BOOTX64.EFI", "fallback\n");
        let (base, base_contents) = snapshot::record_with_contents(root).unwrap();
        let mounts = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(mounts.path(), format!("{}\n{}\n", root.display(), esp.display())).unwrap();

        let ext_only = |kind| kind == 0xEF53;
        let watch = ChangeWatch::start_with(root, mounts.path(), ext_only).expect("the root can be watched");
        write(root, "/boot/efi/EFI/debian/grubx64.efi", "variant loader\n");
        std::fs::remove_dir_all(esp.join("EFI/BOOT")).unwrap();
        write(root, "/etc/hostname", "variant\n");
        let touched = watch.finish(root).unwrap();
        assert_eq!(touched.whole, BTreeSet::from([b"/boot/efi".to_vec()]));

        refresh_is_whole_walk(root, &base, &base_contents, &touched);
    }

    /// More changes than the kernel queues (each file made is an event of its own): the
    /// events lost are said, and the caller walks the whole tree.
    #[test]
    fn an_overflowed_queue_is_an_error() {
        let Some(fs) = LoopFs::mount("ext4") else { return };
        let root = fs.path();
        std::fs::create_dir(root.join("many")).unwrap();
        let mounts = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(mounts.path(), format!("{}\n", root.display())).unwrap();
        let limit: usize = std::fs::read_to_string("/proc/sys/fs/fanotify/max_queued_events")
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(16384);
        let watch = ChangeWatch::start(root, mounts.path()).expect("a loop-mounted filesystem can be watched");
        for i in 0..limit + 100 {
            std::fs::File::create(root.join(format!("many/{i}"))).unwrap();
        }
        let finished = watch.finish(root);
        assert!(finished.as_ref().is_err_and(|e| e.contains("overflowed")), "{finished:?}");
    }

    /// A base file's other hard links change (their link count and change time) when one of
    /// its names is removed, replaced by a rename, or a new name is made: every name of it
    /// is listed again, so the records and the CHANGE list are the whole walk's.
    #[test]
    fn removing_or_adding_a_name_of_a_base_file_changes_its_other_names() {
        let Some(fs) = LoopFs::mount("ext4") else { return };
        let root = fs.path();
        for (path, text) in [("/a/f", "f\n"), ("/c/h", "h\n"), ("/e/k", "k\n"), ("/x/new", "new\n")] {
            write(root, path, text);
        }
        std::fs::create_dir_all(root.join("b")).unwrap();
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::create_dir_all(root.join("g")).unwrap();
        std::fs::hard_link(root.join("a/f"), root.join("b/f-twin")).unwrap();
        std::fs::hard_link(root.join("c/h"), root.join("d/h-twin")).unwrap();
        std::fs::hard_link(root.join("e/k"), root.join("g/k-twin")).unwrap();
        let (base, base_contents) = snapshot::record_with_contents(root).unwrap();
        let mounts = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(mounts.path(), format!("{}\n", root.display())).unwrap();

        std::thread::sleep(std::time::Duration::from_millis(20));
        let watch = ChangeWatch::start(root, mounts.path()).expect("a loop-mounted filesystem can be watched");
        std::fs::remove_file(root.join("a/f")).unwrap();
        std::fs::rename(root.join("x/new"), root.join("d/h-twin")).unwrap();
        std::fs::hard_link(root.join("e/k"), root.join("x/k-third")).unwrap();
        let touched = watch.finish(root).unwrap();

        let whole = snapshot::record_with_contents(root).unwrap();
        let refreshed =
            snapshot::refresh_with_contents(root, &base, &base_contents, &touched.dirs_to_list(&base), &touched.whole)
                .unwrap();
        for path in ["/b/f-twin", "/c/h", "/g/k-twin"] {
            assert_ne!(base.entries[path.as_bytes()].ctime, whole.0.entries[path.as_bytes()].ctime, "{path}");
        }
        assert_eq!(refreshed.0.entries, whole.0.entries);
        assert_eq!(refreshed.1, whole.1);
    }

    fn changes_under_a_watch(root: &Path) {
        for (path, text) in [
            ("/etc/hostname", "base\n"),
            ("/etc/passwd", "root:x:0:0\n"),
            ("/etc/default/grub", "GRUB=1\n"),
            ("/etc/default/locale", "C\n"),
            ("/usr/share/doc/a/copyright", "a\n"),
            ("/usr/share/doc/b/copyright", "b\n"),
            ("/var/log/dmesg", "log\n"),
            ("/var/cache/apt/pkgcache.bin", "cache\n"),
            ("/opt/keep/deep/file", "deep\n"),
            ("/srv/truncate-me", "0123456789\n"),
            ("/srv/linked/data", "linked\n"),
        ] {
            write(root, path, text);
        }
        symlink("hostname", root.join("etc/name-link")).unwrap();
        std::fs::hard_link(root.join("srv/linked/data"), root.join("opt/data-twin")).unwrap();
        let (base, base_contents) = snapshot::record_with_contents(root).unwrap();
        let mounts = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(mounts.path(), format!("{}\n", root.display())).unwrap();

        let watch = ChangeWatch::start(root, mounts.path()).expect("a loop-mounted filesystem can be watched");
        write(root, "/etc/hostname", "variant\n");
        write(root, "/opt/new/a/b/c", "new tree\n");
        std::fs::rename(root.join("opt/new"), root.join("opt/moved")).unwrap();
        std::fs::rename(root.join("etc/default"), root.join("etc/default-old")).unwrap();
        write(root, "/etc/default/fresh", "made anew\n");
        std::fs::remove_dir_all(root.join("usr/share/doc/a")).unwrap();
        std::fs::remove_dir_all(root.join("var/cache/apt")).unwrap();
        std::fs::create_dir(root.join("var/cache/apt")).unwrap();
        std::fs::set_permissions(root.join("var/log"), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(root.join("opt/keep/deep/file"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::OpenOptions::new().append(true).open(root.join("opt/data-twin")).unwrap().write_all(b"x\n").unwrap();
        std::fs::OpenOptions::new().write(true).open(root.join("srv/truncate-me")).unwrap().set_len(3).unwrap();
        std::fs::remove_file(root.join("etc/name-link")).unwrap();
        symlink("passwd", root.join("etc/name-link")).unwrap();
        std::os::unix::fs::chown(root.join("usr/share/doc/b/copyright"), Some(1), Some(1)).unwrap();
        let touched = watch.finish(root).unwrap();

        let refreshed = refresh_is_whole_walk(root, &base, &base_contents, &touched);
        assert!(refreshed.0.left_out.is_empty());
        assert!(!touched.dirs.contains(b"/srv/linked".as_slice()), "no change was made in /srv/linked by name");

        let links_left =
            snapshot::refresh_with_contents(root, &base, &base_contents, &touched.dirs, &touched.whole).unwrap();
        assert_ne!(links_left.1, refreshed.1, "/srv/linked/data changed through /opt/data-twin");
    }
}
