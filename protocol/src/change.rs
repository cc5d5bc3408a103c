//! What a dry run (`customize -n`) changed in the guest: one file added, removed or changed,
//! as the helper reports it on a `CHANGE` line and the host shows it (a line for people, a
//! `file-change` progress event for programs).
//!
//! Paths come from a hostile guest: the helper escapes them ([`escape_path`]) before they
//! travel, so that a name holding a newline, a terminal escape or bytes that are not UTF-8
//! reaches the host as printable text and can never be read as a report line of its own.

use serde::{Deserialize, Serialize};

/// Added, removed or changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChangeKind {
    /// The path exists after the operations and did not before.
    Added,
    /// The path existed before the operations and does not after.
    Removed,
    /// The path exists before and after, and something of it changed.
    Changed,
}

impl ChangeKind {
    /// The word shown for it.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Added => "added",
            ChangeKind::Removed => "removed",
            ChangeKind::Changed => "changed",
        }
    }
}

/// An inode's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileType {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
    /// A character device node.
    CharDevice,
    /// A block device node.
    BlockDevice,
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
}

impl FileType {
    /// The type an `st_mode` names (its `S_IFMT` bits); `None` for a type Linux does not have.
    pub fn from_mode(st_mode: u32) -> Option<Self> {
        Some(match st_mode & 0o170000 {
            0o100000 => FileType::File,
            0o040000 => FileType::Directory,
            0o120000 => FileType::Symlink,
            0o020000 => FileType::CharDevice,
            0o060000 => FileType::BlockDevice,
            0o010000 => FileType::Fifo,
            0o140000 => FileType::Socket,
            _ => return None,
        })
    }

    /// The word shown for it.
    pub fn as_str(self) -> &'static str {
        match self {
            FileType::File => "file",
            FileType::Directory => "directory",
            FileType::Symlink => "symlink",
            FileType::CharDevice => "char-device",
            FileType::BlockDevice => "block-device",
            FileType::Fifo => "fifo",
            FileType::Socket => "socket",
        }
    }
}

/// What of a changed path changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Aspect {
    /// The inode's type (a file became a directory, ...).
    Type,
    /// The permission bits (with setuid, setgid, sticky).
    Mode,
    /// The owning uid or gid.
    Owner,
    /// The bytes: the size or the modification time moved.
    Content,
    /// Only the change time moved: extended attributes, the link count, or content written
    /// back with its old modification time; which one, the metadata alone cannot tell.
    ContentOrMetadata,
}

impl Aspect {
    /// The words shown for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Aspect::Type => "type",
            Aspect::Mode => "mode",
            Aspect::Owner => "owner",
            Aspect::Content => "content",
            Aspect::ContentOrMetadata => "content or metadata",
        }
    }
}

/// A path's type, permission bits and owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileState {
    /// The inode's type.
    pub file_type: FileType,
    /// The permission bits (`st_mode & 0o7777`), as four octal digits (`"0644"`).
    #[serde(with = "octal_mode")]
    pub mode: u32,
    /// Owning uid.
    pub uid: u32,
    /// Owning gid.
    pub gid: u32,
}

/// One path a dry run added, removed or changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChange {
    /// Added, removed or changed.
    pub change: ChangeKind,
    /// The guest path, absolute, escaped by [`escape_path`].
    pub path: String,
    /// The path as it is after the operations (as it was, for a removed path).
    #[serde(flatten)]
    pub state: FileState,
    /// What changed (a changed path only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub what: Vec<Aspect>,
    /// The path as it was before (a changed path only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub was: Option<FileState>,
}

impl FileChange {
    /// The line shown to people: `changed  file       0600 0:0    /etc/hostname  (mode: was 0644)`.
    pub fn human_line(&self) -> String {
        let s = &self.state;
        let mut line = format!(
            "{:<8} {:<12} {:04o} {:<9} {}",
            self.change.as_str(),
            s.file_type.as_str(),
            s.mode,
            format!("{}:{}", s.uid, s.gid),
            self.path
        );
        if !self.what.is_empty() {
            let was = self.was.unwrap_or(*s);
            let parts: Vec<String> = self
                .what
                .iter()
                .map(|aspect| match aspect {
                    Aspect::Type => format!("type: was {}", was.file_type.as_str()),
                    Aspect::Mode => format!("mode: was {:04o}", was.mode),
                    Aspect::Owner => format!("owner: was {}:{}", was.uid, was.gid),
                    other => other.as_str().to_owned(),
                })
                .collect();
            line.push_str(&format!("  ({})", parts.join("; ")));
        }
        line
    }
}

/// `mode` as four octal digits in JSON, so that people read it as `chmod` takes it.
mod octal_mode {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(mode: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:04o}", mode & 0o7777))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let text = String::deserialize(d)?;
        let valid = text.len() == 4 && text.bytes().all(|b| (b'0'..=b'7').contains(&b));
        let mode = u32::from_str_radix(&text, 8).ok().filter(|_| valid);
        mode.ok_or_else(|| serde::de::Error::custom(format!("mode {text:?} is not four octal digits")))
    }
}

/// A path's bytes as printable text that names them exactly: UTF-8 is kept, except that a
/// backslash becomes `\\`, tab, newline and carriage return `\t`, `\n`, `\r`, any other control
/// character or Unicode line separator or direction override `\u{…}`, and each byte that is
/// not UTF-8 `\xNN` (pure). The result holds no control character, so it fits on one line and
/// cannot drive a terminal.
pub fn escape_path(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    escape_path_into(&mut out, bytes);
    out
}

/// [`escape_path`], appended to `out` (one allocation fewer a path: the helper renders a
/// manifest line for every path of a tree after each variant, on an emulated CPU).
pub fn escape_path_into(out: &mut String, bytes: &[u8]) {
    // Most paths are printable ASCII, which stands for itself.
    if bytes.iter().all(|&b| (b' '..=b'~').contains(&b) && b != b'\\') {
        if let Ok(plain) = std::str::from_utf8(bytes) {
            out.push_str(plain);
            return;
        }
    }
    escape_each_char(out, bytes);
}

/// [`escape_path_into`] without its shortcut for printable ASCII: each character looked at.
pub(crate) fn escape_each_char(out: &mut String, bytes: &[u8]) {
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                c if is_hidden(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
}

/// Characters that move or hide text rather than show: controls, line and paragraph
/// separators, and the bidirectional overrides that reorder what follows them.
fn is_hidden(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_escaped_to_one_printable_line() {
        let cases: &[(&[u8], &str)] = &[
            (b"/etc/hostname", "/etc/hostname"),
            (b"/x\nSUCCESS", "/x\\nSUCCESS"),
            (b"/a\\nb", "/a\\\\nb"),
            (b"/tab\there\r", "/tab\\there\\r"),
            (b"/\x1b]0;owned\x07", "/\\u{1b}]0;owned\\u{7}"),
            (b"/latin1-\xe9t\xe9", "/latin1-\\xe9t\\xe9"),
            ("/délétère ✓".as_bytes(), "/délétère ✓"),
            ("/rtl\u{202e}txt.exe".as_bytes(), "/rtl\\u{202e}txt.exe"),
            ("/c1\u{9b}31m".as_bytes(), "/c1\\u{9b}31m"),
            (b"/\xff\xfe", "/\\xff\\xfe"),
        ];
        for (path, want) in cases {
            let got = escape_path(path);
            assert_eq!(got, *want, "{:?}", String::from_utf8_lossy(path));
            assert!(!got.chars().any(is_hidden), "{got:?}");
        }
        // Distinct names stay distinct: a literal backslash-n is not a newline.
        assert_ne!(escape_path(b"/a\nb"), escape_path(b"/a\\nb"));
    }

    #[test]
    fn changes_round_trip_through_json() {
        let state = |mode, uid| FileState { file_type: FileType::File, mode, uid, gid: 0 };
        let change = FileChange {
            change: ChangeKind::Changed,
            path: "/etc/hostname".into(),
            state: state(0o600, 0),
            what: vec![Aspect::Mode, Aspect::Owner],
            was: Some(state(0o644, 1000)),
        };
        let json = serde_json::to_string(&change).unwrap();
        assert!(json.contains("\"mode\":\"0600\"") && json.contains("\"file_type\":\"file\""), "{json}");
        assert_eq!(serde_json::from_str::<FileChange>(&json).unwrap(), change);
        assert_eq!(
            change.human_line(),
            "changed  file         0600 0:0       /etc/hostname  (mode: was 0644; owner: was 1000:0)"
        );
        let added = FileChange { change: ChangeKind::Added, what: vec![], was: None, ..change };
        let json = serde_json::to_string(&added).unwrap();
        assert!(!json.contains("what") && !json.contains("was"), "{json}");
        for bad in ["644", "0x64", "09999", "12345"] {
            let text = json.replace("\"0600\"", &format!("{bad:?}"));
            assert!(serde_json::from_str::<FileChange>(&text).is_err(), "{text}");
        }
    }

    #[test]
    fn file_types_from_st_mode() {
        assert_eq!(FileType::from_mode(0o100644), Some(FileType::File));
        assert_eq!(FileType::from_mode(0o040755), Some(FileType::Directory));
        assert_eq!(FileType::from_mode(0o120777), Some(FileType::Symlink));
        assert_eq!(FileType::from_mode(0o020666), Some(FileType::CharDevice));
        assert_eq!(FileType::from_mode(0o060660), Some(FileType::BlockDevice));
        assert_eq!(FileType::from_mode(0o010644), Some(FileType::Fifo));
        assert_eq!(FileType::from_mode(0o140755), Some(FileType::Socket));
        assert_eq!(FileType::from_mode(0o000644), None);
    }
}
