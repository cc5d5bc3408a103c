//! Whether a work entry was left by a process that is gone (the pure decision).

use super::WorkName;

/// What kind of directory entry was found (never following a symbolic link).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Directory,
    /// A regular file.
    File,
    /// A symbolic link, device, socket or pipe: never ours.
    Other,
}

/// A directory entry whose name parsed as a work entry, as `fstatat` saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    /// The process its name records.
    pub name: WorkName,
    /// Its type.
    pub kind: EntryKind,
    /// Its owner.
    pub uid: u32,
    /// Its permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Its hard-link count.
    pub links: u64,
}

/// What is known of the process a name records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// No such process, or a zombie.
    Gone,
    /// A process with that pid runs, started at this time.
    Running {
        /// Its `/proc/PID/stat` start time.
        start_time: u64,
    },
    /// It could not be told (no /proc, a stat that does not parse): keep its entries.
    Unknown,
}

/// True if `found` is ours (owned by `euid`, a 0700 directory or a singly-linked regular file:
/// what imgforge makes) and the process that made it is gone or its pid now belongs to a
/// process started at another time.
pub fn is_stale(found: &Found, euid: u32, liveness: Liveness) -> bool {
    let ours = found.uid == euid
        && match found.kind {
            EntryKind::Directory => found.mode == 0o700,
            // Another link to a file is not ours to take away.
            EntryKind::File => found.links == 1,
            EntryKind::Other => false,
        };
    ours && match liveness {
        Liveness::Gone => true,
        // An unknown start time (0) cannot tell a reused pid from the maker.
        Liveness::Running { start_time } => found.name.start_time != 0 && start_time != found.name.start_time,
        Liveness::Unknown => false,
    }
}

/// True if no one but `euid` (and root) can rename entries inside a directory owned by `uid`
/// with permission bits `mode`: it is root's or ours, and either others cannot write to it or
/// its sticky bit keeps them to their own entries. Only there may a sweep remove directories:
/// elsewhere a user could rename someone else's private directory to a dead process's name
/// and have the sweep empty it.
pub fn renames_guarded(uid: u32, mode: u32, euid: u32) -> bool {
    const STICKY: u32 = 0o1000;
    (uid == 0 || uid == euid) && (mode & STICKY != 0 || mode & 0o022 == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: u32 = 0;

    fn found(kind: EntryKind, uid: u32, mode: u32, links: u64, start_time: u64) -> Found {
        Found { name: WorkName { pid: 4242, start_time, host: 0 }, kind, uid, mode, links }
    }

    #[test]
    fn decision_table() {
        use EntryKind::*;
        let dir = found(Directory, ROOT, 0o700, 2, 100);
        let file = found(File, ROOT, 0o600, 1, 100);
        let gone = Liveness::Gone;
        let same = Liveness::Running { start_time: 100 };
        let reused = Liveness::Running { start_time: 101 };
        let cases: &[(&str, Found, Liveness, bool)] = &[
            ("our dir, process gone", dir, gone, true),
            ("our dir, pid reused", dir, reused, true),
            ("our dir, its process running", dir, same, false),
            ("our dir, process unknown", dir, Liveness::Unknown, false),
            ("our file, process gone", file, gone, true),
            ("our file, pid reused", file, reused, true),
            ("our file, its process running", file, same, false),
            ("a file with a second link", Found { links: 2, ..file }, gone, false),
            ("a dir of another user", Found { uid: 1000, ..dir }, gone, false),
            ("a file of another user", Found { uid: 1000, ..file }, gone, false),
            ("a dir others may read", Found { mode: 0o755, ..dir }, gone, false),
            ("a sticky dir", Found { mode: 0o1700, ..dir }, gone, false),
            ("a symlink", Found { kind: Other, mode: 0o777, ..file }, gone, false),
            ("a symlink, pid reused", Found { kind: Other, mode: 0o777, ..file }, reused, false),
            ("no start time, pid running", found(Directory, ROOT, 0o700, 2, 0), reused, false),
            ("no start time, pid gone", found(Directory, ROOT, 0o700, 2, 0), gone, true),
        ];
        for (case, f, liveness, want) in cases {
            assert_eq!(is_stale(f, ROOT, *liveness), *want, "{case}");
        }
        // The owner that counts is the running imgforge's, not root's.
        assert!(is_stale(&Found { uid: 1000, ..dir }, 1000, gone));
        assert!(!is_stale(&dir, 1000, gone));
    }

    #[test]
    fn where_directories_may_be_removed() {
        let cases: &[(&str, u32, u32, u32, bool)] = &[
            ("/tmp: root's, sticky, writable by all", ROOT, 0o1777, ROOT, true),
            ("root's 0755", ROOT, 0o755, ROOT, true),
            ("root's 0700", ROOT, 0o700, ROOT, true),
            ("root's 0775: the group may rename", ROOT, 0o775, ROOT, false),
            ("root's 0777", ROOT, 0o777, ROOT, false),
            ("a user's 0755", 1000, 0o755, ROOT, false),
            ("a user's sticky 1777: its owner may rename", 1000, 0o1777, ROOT, false),
            ("our own 0755, running as that user", 1000, 0o755, 1000, true),
            ("our own sticky 1777, running as that user", 1000, 0o1777, 1000, true),
            ("another user's 0700", 1001, 0o700, 1000, false),
        ];
        for (case, uid, mode, euid, want) in cases {
            assert_eq!(renames_guarded(*uid, *mode, *euid), *want, "{case}");
        }
    }
}
