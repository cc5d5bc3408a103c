//! `--copy-in LOCALPATH:REMOTEDIR`: the host tree read as tar would archive it (symlinks stored
//! as symlinks, never followed; modes, numeric owners and times kept), as payload entries.

use crate::ops::{PayloadFile, TreeNode, TreeNodeKind};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// How many entries one `--copy-in` tree may hold: a bound on the payload disk's index and
/// on the helper's work, far above any tree a user means to copy.
pub const MAX_COPY_IN_ENTRIES: usize = 1_000_000;

/// A host node's metadata as the payload disk stores it.
fn node(meta: &std::fs::Metadata, kind: TreeNodeKind) -> TreeNode {
    TreeNode {
        kind,
        mode: (meta.mode() & 0o7777) as u16,
        uid: meta.uid(),
        gid: meta.gid(),
        // squashfs keeps whole seconds in 32 bits; times outside that range are clamped.
        mtime: meta.mtime().clamp(0, i64::from(u32::MAX)) as u32,
    }
}

/// The entries of the tree at `local` (a file, a symlink or a directory), named under `prefix`
/// (`prefix/<name of local>/...`), parents before children.
pub fn tree_entries(local: &Path, prefix: &str) -> Result<Vec<PayloadFile>, String> {
    let name = local
        .file_name()
        .ok_or_else(|| format!("{} has no final name: name the file or directory to copy", local.display()))?;
    let mut out = Vec::new();
    let mut stack = vec![(local.to_owned(), format!("{prefix}/{}", name.to_string_lossy()))];
    while let Some((path, name)) = stack.pop() {
        if out.len() >= MAX_COPY_IN_ENTRIES {
            return Err(format!("{} holds more than {MAX_COPY_IN_ENTRIES} entries", local.display()));
        }
        let meta =
            std::fs::symlink_metadata(&path).map_err(|e| format!("cannot use host path {}: {e}", path.display()))?;
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            let mut children: Vec<_> = std::fs::read_dir(&path)
                .map_err(|e| format!("cannot list {}: {e}", path.display()))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()
                .map_err(|e| format!("cannot list {}: {e}", path.display()))?;
            // Reversed onto the stack, so that they come out in name order.
            children.sort_by(|a, b| b.cmp(a));
            for child in children {
                stack.push((path.join(&child), format!("{name}/{}", child.to_string_lossy())));
            }
            TreeNodeKind::Dir
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path).map_err(|e| format!("cannot read link {}: {e}", path.display()))?;
            TreeNodeKind::Symlink(target)
        } else if ft.is_file() {
            std::fs::File::open(&path).map_err(|e| format!("cannot read host file {}: {e}", path.display()))?;
            TreeNodeKind::File
        } else {
            let what = if ft.is_socket() { "a socket" } else { "a device or FIFO" };
            return Err(format!("{} is {what}: only files, directories and symlinks are copied in", path.display()));
        };
        out.push(PayloadFile { name, source: path, tree: Some(node(&meta, kind)) });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn trees_are_read_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "host secret").unwrap();
        let t = dir.path().join("tree");
        std::fs::create_dir_all(t.join("sub")).unwrap();
        std::fs::write(t.join("sub/f"), "f").unwrap();
        std::fs::set_permissions(t.join("sub/f"), std::fs::Permissions::from_mode(0o4711)).unwrap();
        std::os::unix::fs::symlink(outside.path(), t.join("out")).unwrap();
        let entries = tree_entries(&t, "copyin/0001").unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            ["copyin/0001/tree", "copyin/0001/tree/out", "copyin/0001/tree/sub", "copyin/0001/tree/sub/f"]
        );
        let node = |i: usize| entries[i].tree.clone().unwrap();
        assert_eq!(node(0).kind, TreeNodeKind::Dir);
        assert_eq!(node(1).kind, TreeNodeKind::Symlink(outside.path().to_owned()), "the link, not what it leads to");
        assert_eq!((node(3).kind, node(3).mode), (TreeNodeKind::File, 0o4711));
        assert!(!entries.iter().any(|e| e.source.starts_with(outside.path())));
        // A symlink given as LOCALPATH is copied as a symlink too.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(outside.path(), &link).unwrap();
        let entries = tree_entries(&link, "p").unwrap();
        assert_eq!(entries.len(), 1);
        assert!(matches!(entries[0].tree.as_ref().unwrap().kind, TreeNodeKind::Symlink(_)));
    }

    #[test]
    fn unusable_trees_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = tree_entries(&dir.path().join("missing"), "p").unwrap_err();
        assert!(err.contains("missing"), "{err}");
        assert!(tree_entries(Path::new("/"), "p").unwrap_err().contains("final name"));
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(tree_entries(dir.path(), "p").unwrap_err().contains("FIFO"));
    }
}
