//! A dry run's list of changes: the guest's tree recorded before the first operation
//! (`20-DryRunSnapshot`), walked again after the operations and package installs
//! (`85-DryRunChanges`), and the difference reported as `CHANGE` lines. The host then drops the
//! overlay the run wrote into. A dry run that fails still lists what it had changed before the
//! failure ([`report_after_failure`]), ahead of its `ERROR`.
//!
//! Only a dry run pays for the walks: both tasks run `only-if: IMGFORGE_DRY_RUN=yes`.

use crate::reporter::Reporter;
use crate::snapshot::{self, Meta, Snapshot};
use crate::task_env::TaskEnv;
use imgforge_protocol::change::{escape_path, Aspect, ChangeKind, FileChange, FileState, FileType};
use imgforge_protocol::manifest::ManifestContent;
use imgforge_protocol::report::ReportLine;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Mutex;

/// Most changes listed; the rest are counted (`CHANGES-OMITTED`).
pub const MAX_LISTED_CHANGES: usize = 10_000;

/// The tree as it was before the operations, between the two tasks. Both run in the helper's
/// own process (their scripts only exec the helper), so memory is where it waits.
static BEFORE: Mutex<Option<Snapshot>> = Mutex::new(None);

/// The 20-DryRunSnapshot task: records the guest's tree before the first operation.
pub fn record_before(env: &TaskEnv) -> Result<(), String> {
    let target = env.require("IMGFORGE_TARGET")?;
    let before = snapshot::record(Path::new(target))
        .map_err(|e| format!("cannot walk the guest tree at {target} for the dry run: {e}"))?;
    println!("dry run: {} paths recorded before the operations", before.entries.len());
    warn_left_out(&before, |w| println!("WARNING: {w}"));
    *BEFORE.lock().unwrap_or_else(|p| p.into_inner()) = Some(before);
    Ok(())
}

/// The 85-DryRunChanges task: walks the tree again and reports what changed.
pub fn report_changes(env: &TaskEnv) -> Result<(), String> {
    let target = env.require("IMGFORGE_TARGET")?;
    let before = BEFORE.lock().unwrap_or_else(|p| p.into_inner()).take().ok_or_else(|| {
        "no record of the guest's tree before the operations: was the task DryRunSnapshot excluded?".to_owned()
    })?;
    let after = snapshot::record(Path::new(target))
        .map_err(|e| format!("cannot walk the guest tree at {target} for the dry run: {e}"))?;
    warn_left_out(&after, |w| println!("WARNING: {w}"));
    let mut reporter = Reporter::open();
    let (listed, omitted) = send(&diff(&before.entries, &after.entries), &mut |line| reporter.send(&line));
    println!("dry run: changes listed: {listed}; past the cap, not listed: {omitted}");
    Ok(())
}

/// After a failed dry run: what the tasks before the failure had changed, if the tree was
/// recorded and the guest root is still mounted at `target` (the failure came before
/// 85-DryRunChanges, so before 90-Unmount).
pub fn report_after_failure(target: &Path, reporter: &mut Reporter) {
    let Some(before) = BEFORE.lock().unwrap_or_else(|p| p.into_inner()).take() else { return };
    if !is_mount_point(target) {
        return;
    }
    match snapshot::record(target) {
        Ok(after) => {
            send(&diff(&before.entries, &after.entries), &mut |line| reporter.send(&line));
        }
        Err(e) => reporter.send(&ReportLine::Warning {
            task: "helper".into(),
            message: format!("cannot list the dry run's changes before the failure: {e}"),
        }),
    }
}

fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let dev = |p: &Path| std::fs::symlink_metadata(p).map(|m| m.dev()).ok();
    path.parent().is_some_and(|parent| dev(path).is_some() && dev(path) != dev(parent))
}

fn warn_left_out(snapshot: &Snapshot, warn: impl Fn(&str)) {
    if !snapshot.left_out.is_empty() {
        warn(&format!(
            "the dry run's list of changes is incomplete: the walk left out {}",
            snapshot.left_out.join(", ")
        ));
    }
}

/// Sends the first [`MAX_LISTED_CHANGES`] of `changes` as `CHANGE` lines and counts the rest
/// in a `CHANGES-OMITTED` line, each handed to `report`: (listed, omitted).
pub fn send(changes: &[FileChange], report: &mut dyn FnMut(ReportLine)) -> (usize, usize) {
    let listed = changes.len().min(MAX_LISTED_CHANGES);
    for change in &changes[..listed] {
        report(ReportLine::Change(change.clone()));
    }
    let omitted = changes.len() - listed;
    if omitted > 0 {
        report(ReportLine::ChangesOmitted { count: omitted as u64 });
    }
    (listed, omitted)
}

fn state(meta: &Meta) -> FileState {
    FileState { file_type: meta.file_type, mode: meta.mode, uid: meta.uid, gid: meta.gid }
}

/// The directory holding `path` (`/etc` for `/etc/x`, `/` for `/x`).
pub fn parent(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|b| *b == b'/') {
        Some(0) => b"/",
        Some(at) => &path[..at],
        None => b"",
    }
}

/// What changed between two records of the tree, in path order (pure). A directory whose
/// entries were added, removed or replaced is not listed for that alone: its entries are.
pub fn diff(before: &BTreeMap<Vec<u8>, Meta>, after: &BTreeMap<Vec<u8>, Meta>) -> Vec<FileChange> {
    // Both records are in path order: walked side by side (a few thousand paths after every
    // variant, on an emulated CPU), never looked up a path at a time.
    changes_of(|| side_by_side(before, after), |_| false)
}

/// [`diff`], with each side's contents (file digests, link targets) too: a path whose content
/// differs has changed content, even where its inode number, size and times are those it had
/// (a guest program renamed another filesystem or btrfs subvolume, whose inode numbers are its
/// own, over its place).
pub fn diff_with_contents(
    before: &BTreeMap<Vec<u8>, Meta>,
    before_contents: &BTreeMap<Vec<u8>, ManifestContent>,
    after: &BTreeMap<Vec<u8>, Meta>,
    after_contents: &BTreeMap<Vec<u8>, ManifestContent>,
) -> Vec<FileChange> {
    changes_of(|| side_by_side(before, after), |path| before_contents.get(path) != after_contents.get(path))
}

/// The changes of every path `paths` gives, with its entry before and after, in path order
/// (`paths` is walked twice: first for the directories whose entries changed).
fn changes_of<'a, I>(paths: impl Fn() -> I, content_differs: impl Fn(&[u8]) -> bool) -> Vec<FileChange>
where
    I: Iterator<Item = (&'a Vec<u8>, Option<&'a Meta>, Option<&'a Meta>)>,
{
    let entries_changed: BTreeSet<&[u8]> = paths()
        .filter_map(|(path, old, new)| match (old, new) {
            (Some(old), Some(new)) if new.ino == old.ino => None,
            _ => Some(parent(path)),
        })
        .collect();
    let change = |kind, path: &[u8], meta: &Meta, what, was| FileChange {
        change: kind,
        path: escape_path(path),
        state: state(meta),
        what,
        was,
    };
    paths()
        .filter_map(|(path, old, new)| match (old, new) {
            (None, Some(new)) => Some(change(ChangeKind::Added, path, new, Vec::new(), None)),
            (Some(old), None) => Some(change(ChangeKind::Removed, path, old, Vec::new(), None)),
            (Some(old), Some(new)) => {
                let explained = new.file_type == FileType::Directory && entries_changed.contains(path.as_slice());
                let mut what = aspects(old, new, explained);
                if !what.contains(&Aspect::Content) && content_differs(path) {
                    what.retain(|a| *a != Aspect::ContentOrMetadata);
                    what.push(Aspect::Content);
                }
                (!what.is_empty()).then(|| change(ChangeKind::Changed, path, new, what, Some(state(old))))
            }
            (None, None) => None,
        })
        .collect()
}

/// Every path of either record, in order, with its entry in each.
fn side_by_side<'a>(
    before: &'a BTreeMap<Vec<u8>, Meta>,
    after: &'a BTreeMap<Vec<u8>, Meta>,
) -> impl Iterator<Item = (&'a Vec<u8>, Option<&'a Meta>, Option<&'a Meta>)> {
    let (mut old, mut new) = (before.iter().peekable(), after.iter().peekable());
    std::iter::from_fn(move || match (old.peek(), new.peek()) {
        (Some((a, _)), Some((b, _))) if a == b => {
            let ((path, was), (_, is)) = (old.next()?, new.next()?);
            Some((path, Some(was), Some(is)))
        }
        (Some((a, _)), Some((b, _))) if a < b => old.next().map(|(path, was)| (path, Some(was), None)),
        (_, Some(_)) => new.next().map(|(path, is)| (path, None, Some(is))),
        (Some(_), None) => old.next().map(|(path, was)| (path, Some(was), None)),
        (None, None) => None,
    })
}

/// What differs between `old` and `new` of one path; `entries_changed`: a directory whose
/// entries changed, whose times moved for that reason (pure).
fn aspects(old: &Meta, new: &Meta, entries_changed: bool) -> Vec<Aspect> {
    let mut what = Vec::new();
    if old.file_type != new.file_type {
        what.push(Aspect::Type);
    }
    if old.mode != new.mode {
        what.push(Aspect::Mode);
    }
    if (old.uid, old.gid) != (new.uid, new.gid) {
        what.push(Aspect::Owner);
    }
    if !entries_changed {
        if old.size != new.size || old.mtime != new.mtime {
            what.push(Aspect::Content);
        } else if old.ctime != new.ctime || old.ino != new.ino {
            // Only the change time moved (or the inode, its times kept): extended attributes,
            // links, or content written back with its old modification time.
            if what.is_empty() {
                what.push(Aspect::ContentOrMetadata);
            }
        }
    }
    what
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(file_type: FileType, mode: u32, ino: u64) -> Meta {
        Meta { file_type, mode, uid: 0, gid: 0, size: 10, mtime: (100, 0), ctime: (100, 0), ino }
    }

    fn tree(entries: &[(&str, Meta)]) -> BTreeMap<Vec<u8>, Meta> {
        entries.iter().map(|(p, m)| (p.as_bytes().to_vec(), *m)).collect()
    }

    fn shown(changes: &[FileChange]) -> Vec<String> {
        changes
            .iter()
            .map(|c| {
                let what: Vec<&str> = c.what.iter().map(|a| a.as_str()).collect();
                format!("{} {} {:o} {}", c.change.as_str(), c.path, c.state.mode, what.join(","))
            })
            .collect()
    }

    #[test]
    fn the_difference_of_two_walks() {
        let (dir, file) = (FileType::Directory, FileType::File);
        let before = tree(&[
            ("/", meta(dir, 0o755, 2)),
            ("/etc", meta(dir, 0o755, 3)),
            ("/etc/hostname", meta(file, 0o644, 4)),
            ("/etc/motd", meta(file, 0o644, 5)),
            ("/etc/passwd", meta(file, 0o644, 6)),
            ("/etc/shadow", meta(file, 0o640, 7)),
            ("/etc/xattr", meta(file, 0o644, 8)),
            ("/opt", meta(dir, 0o755, 9)),
            ("/srv", meta(dir, 0o755, 10)),
            ("/var", meta(dir, 0o755, 11)),
        ]);
        let touched = |m: Meta| Meta { mtime: (200, 5), ctime: (200, 5), ..m };
        let after = tree(&[
            ("/", meta(dir, 0o755, 2)),
            // Entries added and removed: its times moved for that, and it is not listed.
            ("/etc", touched(meta(dir, 0o755, 3))),
            ("/etc/hostname", Meta { ctime: (200, 0), ..meta(file, 0o600, 4) }),
            ("/etc/passwd", Meta { size: 11, ..touched(meta(file, 0o644, 6)) }),
            // Replaced by rename, same times (cp -a, an edit keeping them): content or metadata.
            ("/etc/shadow", meta(file, 0o640, 70)),
            ("/etc/x", meta(file, 0o644, 12)),
            ("/etc/xattr", Meta { ctime: (300, 0), ..meta(file, 0o644, 8) }),
            ("/opt", touched(meta(dir, 0o755, 9))),
            ("/opt/new", meta(dir, 0o755, 13)),
            // A directory whose times moved with no entry added or removed (a file made and
            // deleted again) is listed.
            ("/srv", touched(meta(dir, 0o700, 10))),
            ("/var", touched(meta(dir, 0o755, 11))),
        ]);
        assert_eq!(
            shown(&diff(&before, &after)),
            [
                "changed /etc/hostname 600 mode",
                "removed /etc/motd 644 ",
                "changed /etc/passwd 644 content",
                "changed /etc/shadow 640 content or metadata",
                "added /etc/x 644 ",
                "changed /etc/xattr 644 content or metadata",
                "added /opt/new 755 ",
                "changed /srv 700 mode,content",
                "changed /var 755 content",
            ]
        );
        assert!(diff(&before, &before).is_empty());
    }

    #[test]
    fn the_list_is_capped_and_the_rest_counted() {
        let before = tree(&[("/", meta(FileType::Directory, 0o755, 1))]);
        let mut after = before.clone();
        for i in 0..MAX_LISTED_CHANGES + 7 {
            after.insert(format!("/f{i:05}").into_bytes(), meta(FileType::File, 0o644, 10 + i as u64));
        }
        let mut lines = Vec::new();
        assert_eq!(send(&diff(&before, &after), &mut |l| lines.push(l)), (MAX_LISTED_CHANGES, 7));
        assert_eq!(lines.len(), MAX_LISTED_CHANGES + 1);
        assert_eq!(lines.last(), Some(&ReportLine::ChangesOmitted { count: 7 }));
        assert!(matches!(&lines[0], ReportLine::Change(c) if c.path == "/f00000"));
        lines.clear();
        assert_eq!(send(&diff(&before, &before), &mut |l| lines.push(l)), (0, 0));
        assert!(lines.is_empty());
    }

    #[test]
    fn a_type_and_owner_change_and_a_crafted_name() {
        let before = tree(&[("/x", meta(FileType::File, 0o644, 2))]);
        let mut new = meta(FileType::Directory, 0o755, 3);
        new.uid = 1000;
        let after = tree(&[("/x", new), ("/x\nSUCCESS", meta(FileType::File, 0o644, 4))]);
        let changes = diff(&before, &after);
        assert_eq!(changes[0].what, [Aspect::Type, Aspect::Mode, Aspect::Owner]);
        assert_eq!(changes[0].was.map(|w| w.file_type), Some(FileType::File));
        assert_eq!(changes[1].path, "/x\\nSUCCESS");
        assert_eq!(parent(b"/x"), b"/");
        assert_eq!(parent(b"/etc/x"), b"/etc");
    }
}

#[cfg(test)]
#[path = "changes_reference_tests.rs"]
mod reference;
