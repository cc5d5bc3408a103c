//! The tree manifest of the guest (`imgforge_protocol::manifest`), computed after a variant's
//! operations: the guest's own filesystems (the root and what its fstab mounted) are bound
//! again, without the pseudo filesystems mounted for chroots, on a scratch directory, so that
//! the walk sees `/dev`, `/proc` and `/sys` as the image holds them, as any other reader of the
//! image would.

use crate::snapshot::{self, Snapshot};
use imgforge_protocol::manifest::{is_random_content, manifest_line_into, ManifestContent};
use sha2::Digest;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Manifest bytes rendered before they are hashed.
const HASHED_BATCH_BYTES: usize = 64 << 10;

/// Runs `with` on `scratch` with the guest's own filesystems (mounted at `target`, the root
/// first, as `mounts_file` lists them) bound on it, and unbinds them after.
pub fn with_guest_tree<T>(
    target: &Path,
    mounts_file: &Path,
    scratch: &Path,
    with: impl FnOnce(&Path) -> Result<T, String>,
) -> Result<T, String> {
    let text = std::fs::read_to_string(mounts_file)
        .map_err(|e| format!("cannot read the list of the guest's mounts {}: {e}", mounts_file.display()))?;
    std::fs::create_dir_all(scratch).map_err(|e| format!("cannot create {}: {e}", scratch.display()))?;
    let mut bound: Vec<PathBuf> = Vec::new();
    let result = bind_guest_filesystems(target, &text, scratch, &mut bound).and_then(|()| with(scratch));
    for at in bound.iter().rev() {
        if let Err(e) = unmount(at) {
            return Err(format!("cannot unmount {} after the manifest: {e}", at.display()));
        }
    }
    result
}

/// The guest's own filesystems among the mounts `mounts_file` lists under `target` (the
/// pseudo filesystems mounted for chroots left out): each mount point, relative to `target`,
/// and its status.
fn guest_mount_points(target: &Path, mounts_file: &Path) -> Result<Vec<(PathBuf, libc::stat)>, String> {
    let text = std::fs::read_to_string(mounts_file)
        .map_err(|e| format!("cannot read the list of the guest's mounts {}: {e}", mounts_file.display()))?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let at = Path::new(line);
        let Ok(rel) = at.strip_prefix(target) else { continue };
        let st = snapshot::lstat(at).map_err(|e| format!("cannot look at {line}: {e}"))?;
        if !is_pseudo_path(at, &st) {
            out.push((rel.to_owned(), st));
        }
    }
    Ok(out)
}

/// What of the guest's mounts a walk's record depends on: each block-backed mount point
/// (relative to `target`) and the metadata of the root of the filesystem mounted there. Two
/// disks of one base, mounted alike, give the same.
pub fn mounts_fingerprint(target: &Path, mounts_file: &Path) -> Result<Vec<(PathBuf, snapshot::Meta)>, String> {
    guest_mount_points(target, mounts_file)?
        .into_iter()
        .map(|(rel, st)| {
            let meta =
                snapshot::Meta::of(&st).ok_or_else(|| format!("{} is not a directory", target.join(&rel).display()))?;
            Ok((rel, meta))
        })
        .collect()
}

/// [`snapshot::is_pseudo`] of the helper's mount point `at`.
fn is_pseudo_path(at: &Path, st: &libc::stat) -> bool {
    let path = crate::confinement::path_cstring(at);
    snapshot::is_pseudo(libc::AT_FDCWD, &path, st)
}

/// Records where each of the guest's filesystems (mounted at `target` as `mounts_file` lists
/// them) is mounted, for [`snapshot::mount_registry`]: call it before any guest program runs.
pub fn register_mounts(target: &Path, mounts_file: &Path) -> Result<(), String> {
    let mut mounts = Vec::new();
    for (rel, st) in guest_mount_points(target, mounts_file)? {
        let mut point = b"/".to_vec();
        point.extend_from_slice(std::os::unix::ffi::OsStrExt::as_bytes(rel.as_os_str()));
        mounts.push((st.st_dev, point));
    }
    snapshot::mount_registry::record(mounts);
    Ok(())
}

fn bind_guest_filesystems(target: &Path, mounts: &str, scratch: &Path, bound: &mut Vec<PathBuf>) -> Result<(), String> {
    for line in mounts.lines().filter(|l| !l.is_empty()) {
        let at = Path::new(line);
        let Ok(rel) = at.strip_prefix(target) else { continue };
        let st = snapshot::lstat(at).map_err(|e| format!("cannot look at {line}: {e}"))?;
        // The chroots' /dev, /proc, /sys: not on the guest's disk (a btrfs one is).
        if is_pseudo_path(at, &st) {
            continue;
        }
        let onto = scratch.join(rel);
        bind(at, &onto).map_err(|e| format!("cannot bind {line} on {} for the manifest: {e}", onto.display()))?;
        bound.push(onto);
    }
    if bound.is_empty() {
        return Err(format!("the guest root is not mounted on {}", target.display()));
    }
    Ok(())
}

/// The manifest's digest of a walk that read every file (`snapshot::record_with_contents`).
pub fn digest_of(snapshot: &Snapshot, contents: &BTreeMap<Vec<u8>, ManifestContent>) -> Result<String, String> {
    if !snapshot.left_out.is_empty() {
        return Err(format!("the guest's tree is too large for a manifest: {}", snapshot.left_out.join(", ")));
    }
    let mut hasher = sha2::Sha256::new();
    // Lines rendered into one buffer, hashed a batch at a time: no allocation a path.
    let mut lines = String::with_capacity(HASHED_BATCH_BYTES + 8192);
    // Both maps are in path order: walked side by side, not looked up a path at a time.
    let mut known = contents.iter().peekable();
    for (path, meta) in &snapshot.entries {
        while known.next_if(|(at, _)| *at < path).is_some() {}
        let content = match known.next_if(|(at, _)| *at == path) {
            _ if is_random_content(path, meta.file_type) => &ManifestContent::Random,
            Some((_, content)) => content,
            None => &ManifestContent::None,
        };
        manifest_line_into(&mut lines, path, meta.file_type, meta.mode, meta.uid, meta.gid, content);
        if lines.len() >= HASHED_BATCH_BYTES {
            hasher.update(lines.as_bytes());
            lines.clear();
        }
    }
    hasher.update(lines.as_bytes());
    Ok(imgforge_protocol::bytes::hex(&hasher.finalize()))
}

fn bind(from: &Path, onto: &Path) -> std::io::Result<()> {
    let (from, onto) = (crate::confinement::path_cstring(from), crate::confinement::path_cstring(onto));
    // SAFETY: NUL-terminated paths that outlive the call; no data.
    let rc = unsafe { libc::mount(from.as_ptr(), onto.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn unmount(at: &Path) -> std::io::Result<()> {
    let at = crate::confinement::path_cstring(at);
    // SAFETY: a NUL-terminated path that outlives the call.
    if unsafe { libc::umount(at.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn walk(root: &Path) -> Result<String, String> {
        let (snapshot, contents) = snapshot::record_with_contents(root).map_err(|e| e.to_string())?;
        digest_of(&snapshot, &contents)
    }

    /// A btrfs guest root (an anonymous device number, as the chroots' /proc has) and a btrfs
    /// /home are the guest's: bound for the manifest and in the mounts' fingerprint, their
    /// files in the digest; the /proc mounted in the root is not, and the manifest sees the
    /// directory under it as the image holds it.
    #[test]
    fn a_btrfs_root_is_the_guests_and_its_proc_is_not() {
        use crate::change_watch::tests::{LoopFs, MountedInside};
        let Some(root) = LoopFs::mount("btrfs") else { return };
        let target = root.path();
        std::fs::create_dir_all(target.join("etc")).unwrap();
        std::fs::write(target.join("etc/hostname"), "btrfs\n").unwrap();
        let home = target.join("home");
        let Some(_home) = MountedInside::new("btrfs", &home) else { return };
        std::fs::write(home.join("notes"), "on /home\n").unwrap();
        let proc_at = target.join("proc");
        std::fs::create_dir_all(&proc_at).unwrap();
        // As any reader of the image sees it: /proc an empty directory.
        let (as_stored, contents) = snapshot::record_with_contents(target).unwrap();
        assert!(as_stored.entries.contains_key(b"/home/notes".as_slice()), "the btrfs /home left out");
        let expected = digest_of(&as_stored, &contents).unwrap();
        let mounted = std::process::Command::new("mount").args(["-t", "proc", "proc"]).arg(&proc_at).status().unwrap();
        assert!(mounted.success(), "mount -t proc");
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let _proc = Unmount(proc_at.clone());
        let mounts = tempfile::NamedTempFile::new().unwrap();
        let listed = format!("{}\n{}\n{}\n", target.display(), proc_at.display(), home.display());
        std::fs::write(mounts.path(), listed).unwrap();

        let fingerprint = mounts_fingerprint(target, mounts.path()).unwrap();
        let points: Vec<&Path> = fingerprint.iter().map(|(p, _)| p.as_path()).collect();
        assert_eq!(points, [Path::new(""), Path::new("home")]);
        let scratch = tempfile::tempdir().unwrap();
        let digest = with_guest_tree(target, mounts.path(), scratch.path(), walk).unwrap();
        assert_eq!(digest, expected);
    }

    /// The same as `change_watch::tests::a_subvolume_renamed_over_another_does_not_keep_its_digests_or_hide_the_change`
    /// without btrfs: a guest program may rename the directories holding two of the guest's
    /// mount points (only the mount points themselves refuse it). Two ext4 filesystems of a
    /// hostile base, at /m/a and /n/a, each with a file `f` of one inode number, size and times
    /// (inode numbers are per filesystem; a crafted image sets any time; here written within one
    /// clock tick): `mv m x; mv n m; ln -s x n` puts the second filesystem at /m/a and leaves
    /// every listed mount point reachable. The manifest gives /m/a/f the digest of its own bytes
    /// (the file is not on the filesystem recorded as mounted at /m/a), and the change list
    /// lists it.
    #[test]
    fn a_mount_moved_under_another_ones_name_does_not_keep_its_digests() {
        use crate::change_watch::tests::{LoopFs, MountedInside};
        use sha2::Digest;
        let Some(root) = LoopFs::mount("ext4") else { return };
        let target = root.path();
        std::fs::create_dir_all(target.join("etc")).unwrap();
        std::fs::write(target.join("etc/hostname"), "ext4\n").unwrap();
        let (first, second) = (target.join("m/a"), target.join("n/a"));
        let Some(_first) = MountedInside::new("ext4", &first) else { return };
        let Some(_second) = MountedInside::new("ext4", &second) else { return };
        let (good, evil) = ("the base's good bytes\n", "the guest's evil byte\n");
        let key = |p: &Path| {
            let st = snapshot::lstat(p).unwrap();
            (st.st_ino, st.st_size, st.st_mtime, st.st_mtime_nsec, st.st_ctime, st.st_ctime_nsec)
        };
        let collided = (0..200).any(|_| {
            let _ = (std::fs::remove_file(first.join("f")), std::fs::remove_file(second.join("f")));
            std::fs::write(first.join("f"), good).unwrap();
            std::fs::write(second.join("f"), evil).unwrap();
            key(&first.join("f")) == key(&second.join("f"))
        });
        if !collided {
            eprintln!("skipped: no two writes within one clock tick");
            return;
        }
        let mounts = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(mounts.path(), format!("{}\n{}\n{}\n", target.display(), first.display(), second.display()))
            .unwrap();
        let scratch = tempfile::tempdir().unwrap();
        // As the variants' engine does once the guest is mounted, before any guest program.
        register_mounts(target, mounts.path()).unwrap();
        let (base, base_contents) = with_guest_tree(target, mounts.path(), scratch.path(), |r| {
            snapshot::record_with_contents(r).map_err(|e| e.to_string())
        })
        .unwrap();
        assert!(base.entries.contains_key(b"/m/a/f".as_slice()));

        // The guest's program, without the capabilities guest programs lose.
        let moved = std::process::Command::new("capsh")
            .args([
                "--drop=cap_sys_admin,cap_sys_time,cap_mknod,cap_sys_chroot",
                "--",
                "-c",
                "mv m x && mv n m && ln -s x n",
            ])
            .current_dir(target)
            .status()
            .unwrap();
        assert!(moved.success(), "mv and ln as a guest program");
        let (after, contents) = with_guest_tree(target, mounts.path(), scratch.path(), |r| {
            snapshot::record_with_contents(r).map_err(|e| e.to_string())
        })
        .unwrap();
        assert_eq!(std::fs::read_to_string(target.join("m/a/f")).unwrap(), evil);
        let sha = |text: &str| imgforge_protocol::bytes::hex(&sha2::Sha256::digest(text.as_bytes()));
        let reported = contents.get(b"/m/a/f".as_slice()).cloned();
        let change_listed =
            crate::changes::diff_with_contents(&base.entries, &base_contents, &after.entries, &contents)
                .iter()
                .any(|c| c.path.as_bytes() == b"/m/a/f");
        assert!(
            reported == Some(ManifestContent::Sha256(sha(evil))) && change_listed,
            "/m/a/f holds {evil:?}: the manifest says {reported:?} (the digest of {good:?} is {}); its change \
             listed: {change_listed}",
            sha(good)
        );
    }

    /// The digest covers content, mode and link targets, and not times.
    #[test]
    fn the_digest_follows_content_not_times() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/hostname"), "a\n").unwrap();
        symlink("hostname", root.join("etc/link")).unwrap();
        let first = walk(root).unwrap();
        assert_eq!(first.len(), 64);
        std::fs::write(root.join("etc/hostname"), "a\n").unwrap();
        assert_eq!(walk(root).unwrap(), first, "rewritten with the same bytes");
        std::fs::write(root.join("etc/hostname"), "b\n").unwrap();
        let second = walk(root).unwrap();
        assert_ne!(second, first);
        std::fs::remove_file(root.join("etc/link")).unwrap();
        symlink("other", root.join("etc/link")).unwrap();
        assert_ne!(walk(root).unwrap(), second);
    }
}
