//! A deterministic `newc` cpio writer for the helper initramfs.
//!
//! Entries are written sorted by path with zero timestamps and owners, so the same inputs
//! always give the same bytes.

use std::collections::BTreeMap;

/// One initramfs entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A directory with these permission bits.
    Dir(u32),
    /// A regular file.
    File {
        /// Permission bits.
        mode: u32,
        /// Contents.
        data: Vec<u8>,
    },
    /// A symbolic link to this target.
    Symlink(String),
    /// A character device node.
    CharDev {
        /// Permission bits.
        mode: u32,
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
}

/// An initramfs being assembled: paths (without leading `/`) to entries.
#[derive(Debug, Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl Archive {
    /// Adds or replaces `path`, creating missing parent directories (0755).
    pub fn insert(&mut self, path: &str, entry: Entry) {
        let path = path.trim_start_matches('/').trim_end_matches('/').to_owned();
        let mut parent = String::new();
        for part in path.split('/').collect::<Vec<_>>().iter().rev().skip(1).rev() {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            self.entries.entry(parent.clone()).or_insert(Entry::Dir(0o755));
        }
        self.entries.insert(path, entry);
    }

    /// True if `path` is present.
    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(path.trim_start_matches('/'))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Serializes to `newc` cpio bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let (mode, data, rdev, nlink): (u32, &[u8], (u32, u32), u32) = match entry {
                Entry::Dir(m) => (S_IFDIR | m, &[], (0, 0), 2),
                Entry::File { mode, data } => (S_IFREG | mode, data, (0, 0), 1),
                Entry::Symlink(target) => (S_IFLNK | 0o777, target.as_bytes(), (0, 0), 1),
                Entry::CharDev { mode, major, minor } => (S_IFCHR | mode, &[], (*major, *minor), 1),
            };
            write_entry(&mut out, ino as u32 + 1, mode, nlink, rdev, path, data);
        }
        write_entry(&mut out, 0, 0, 1, (0, 0), "TRAILER!!!", &[]);
        out
    }
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn write_entry(out: &mut Vec<u8>, ino: u32, mode: u32, nlink: u32, rdev: (u32, u32), name: &str, data: &[u8]) {
    let fields = [ino, mode, 0, 0, nlink, 0, data.len() as u32, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_created_and_output_is_stable() {
        let mut a = Archive::default();
        a.insert("/usr/bin/tool", Entry::File { mode: 0o755, data: b"abc".to_vec() });
        a.insert("/dev/console", Entry::CharDev { mode: 0o600, major: 5, minor: 1 });
        a.insert("/bin/sh", Entry::Symlink("busybox".into()));
        assert!(a.contains("usr") && a.contains("/usr/bin"));
        let bytes = a.to_bytes();
        assert_eq!(bytes, a.to_bytes());
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        assert!(bytes.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn cpio_tool_lists_it() {
        let Ok(_) = std::process::Command::new("cpio").arg("--version").output() else { return };
        let mut a = Archive::default();
        a.insert("/init", Entry::File { mode: 0o755, data: b"#!/bin/sh\n".to_vec() });
        a.insert("/bin/sh", Entry::Symlink("busybox".into()));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.cpio");
        std::fs::write(&path, a.to_bytes()).unwrap();
        let out = std::process::Command::new("cpio").args(["-t", "-F"]).arg(&path).output().unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(listing.lines().collect::<Vec<_>>(), ["bin", "bin/sh", "init"]);
    }
}
