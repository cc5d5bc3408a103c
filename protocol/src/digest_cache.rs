//! The content digests of a base image's files, carried from one helper boot to the next: a
//! multi-variant build's first boot reads every file of the base once for the tree manifest
//! (seconds under TCG); the host keeps what it found under the base's SHA-256 and gives it to
//! the next boots of that base on the payload disk, so an untouched file is not read again.
//!
//! An entry holds what identifies a file of one base: its path, inode number, size, and
//! modification and change times. Any change to a file moves its change time, which no program
//! can set, so a changed file never matches. Both sides read the other's bytes as untrusted
//! (the helper ran guest programs; the host's cache file could be damaged): [`parse`] is strict
//! and bounded.
//!
//! Format: the line [`MAGIC`], then one line an entry:
//! `PATH_HEX\tINO\tSIZE\tMTIME_S\tMTIME_NS\tCTIME_S\tCTIME_NS\tSHA256\n`, PATH_HEX the path's bytes
//! in lowercase hex, SHA256 64 lowercase hex digits.

use crate::bytes::hex;
use thiserror::Error;

/// The first line of a digest cache.
pub const MAGIC: &str = "imgforge-digests 1";
/// The largest digest cache read or written, in bytes.
pub const MAX_BYTES: usize = 64 << 20;
/// The most entries a digest cache holds.
pub const MAX_ENTRIES: usize = 500_000;
/// The longest path of an entry, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;
/// The payload disk's name of the digest cache given to a boot (`+` is in no variant's name).
pub const PAYLOAD_NAME: &str = "+digests";
/// Serial number of the disk the helper writes the digest cache of its boot to: two regions
/// of [`REGION_BYTES`], each an 8-byte little-endian length (0: nothing written), then a digest
/// cache; the first holds every file of the base the boot knows (kept for the next builds), the
/// second, at [`SHARE_OFFSET`], its share of a reading shared with other boots. Two places, so
/// that the host never reads one while the helper writes the other.
pub const EXPORT_SERIAL: &str = "imgforge-export";
/// Serial number of the disk the host writes the other boots' shares to, read-only to the
/// helper: one region, as the export disk's.
pub const IMPORT_SERIAL: &str = "imgforge-import";
/// Room for the largest digest cache and its length, in whole 4 KiB blocks.
pub const REGION_BYTES: u64 = (MAX_BYTES as u64 + 8).div_ceil(4096) * 4096;
/// Where the share region of the export disk starts.
pub const SHARE_OFFSET: u64 = REGION_BYTES;

/// Which share of a base's files one of several boots side by side reads first: `part` of
/// `parts` (see [`Shares`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Share {
    /// This boot's share, below `parts`.
    pub part: u32,
    /// How many boots share the reading.
    pub parts: u32,
}

/// Most boots that share the reading of one base.
pub const MAX_PARTS: u32 = 64;

/// Deals the files of a walk to the shares as the walk lists them, each to the share with the
/// fewest bytes so far (a file counts its size plus [`FILE_COST_BYTES`]; ties to the lowest
/// share): boots that list the same base in the same order deal it alike, with no word
/// between them. A boot that lists it otherwise only reads more itself.
#[derive(Debug)]
pub struct Shares {
    loads: Vec<u64>,
}

/// What a file costs beyond its bytes (opening it, one read's round trip), in bytes.
pub const FILE_COST_BYTES: u64 = 16 << 10;

impl Shares {
    /// Shares for `parts` boots (at least 1, at most [`MAX_PARTS`]).
    pub fn new(parts: u32) -> Self {
        Self { loads: vec![0; parts.clamp(1, MAX_PARTS) as usize] }
    }

    /// The share the next file listed, of `size` bytes, goes to (pure).
    pub fn deal(&mut self, size: u64) -> u32 {
        let (k, _) = self.loads.iter().enumerate().min_by_key(|(k, load)| (**load, *k)).expect("at least one share");
        self.loads[k] = self.loads[k].saturating_add(size.saturating_add(FILE_COST_BYTES));
        k as u32
    }
}

/// One file of a base and the SHA-256 of its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Absolute guest path, as bytes.
    pub path: Vec<u8>,
    /// Inode number.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (i64, i64),
    /// Change time (seconds, nanoseconds).
    pub ctime: (i64, i64),
    /// SHA-256 of the bytes, lowercase hex.
    pub sha256: String,
}

/// Why bytes are not a digest cache.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DigestCacheError {
    /// Larger than [`MAX_BYTES`].
    #[error("the digest cache is {0} bytes, more than the {MAX_BYTES} allowed")]
    TooLarge(usize),
    /// The first line is not [`MAGIC`].
    #[error("the digest cache does not start with `{MAGIC}`")]
    NoMagic,
    /// More than [`MAX_ENTRIES`] entries.
    #[error("the digest cache has more than {MAX_ENTRIES} entries")]
    TooManyEntries,
    /// A line that is not an entry.
    #[error("line {line} of the digest cache is not an entry: {reason}")]
    BadLine {
        /// 1-based.
        line: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// The digest cache of `entries` (pure).
pub fn render(entries: &[Entry]) -> Vec<u8> {
    let mut out = format!("{MAGIC}\n").into_bytes();
    for e in entries {
        out.extend_from_slice(hex(&e.path).as_bytes());
        let line = format!(
            "\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
            e.ino, e.size, e.mtime.0, e.mtime.1, e.ctime.0, e.ctime.1, e.sha256
        );
        out.extend_from_slice(line.as_bytes());
    }
    out
}

/// The entries of a digest cache (pure).
pub fn parse(bytes: &[u8]) -> Result<Vec<Entry>, DigestCacheError> {
    if bytes.len() > MAX_BYTES {
        return Err(DigestCacheError::TooLarge(bytes.len()));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| DigestCacheError::NoMagic)?;
    let mut lines = text.split_terminator('\n');
    if lines.next() != Some(MAGIC) {
        return Err(DigestCacheError::NoMagic);
    }
    let mut out = Vec::new();
    for (k, line) in lines.enumerate() {
        if out.len() >= MAX_ENTRIES {
            return Err(DigestCacheError::TooManyEntries);
        }
        out.push(entry(line).map_err(|reason| DigestCacheError::BadLine { line: k + 2, reason })?);
    }
    Ok(out)
}

fn entry(line: &str) -> Result<Entry, &'static str> {
    let fields: Vec<&str> = line.split('\t').collect();
    let [path, ino, size, ms, mns, cs, cns, sha256] = fields[..] else {
        return Err("not 8 tab-separated fields");
    };
    let path = unhex(path).ok_or("the path is not hex")?;
    if path.first() != Some(&b'/') || path.len() > MAX_PATH_BYTES || path.contains(&0) {
        return Err("the path is not absolute, too long, or holds a NUL byte");
    }
    let number = |s: &str| s.parse::<i64>().map_err(|_| "a time is not a number");
    let unsigned = |s: &str| s.parse::<u64>().map_err(|_| "an inode number or size is not a number");
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err("the digest is not 64 lowercase hex digits");
    }
    Ok(Entry {
        path,
        ino: unsigned(ino)?,
        size: unsigned(size)?,
        mtime: (number(ms)?, number(mns)?),
        ctime: (number(cs)?, number(cns)?),
        sha256: sha256.to_owned(),
    })
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.is_empty() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|pair| u8::from_str_radix(pair, 16).ok())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Entry> {
        vec![
            Entry {
                path: b"/etc/hostname".to_vec(),
                ino: 131,
                size: 5,
                mtime: (1_700_000_000, 12),
                ctime: (1_700_000_001, 999_999_999),
                sha256: "a".repeat(64),
            },
            Entry {
                path: b"/odd\tname\n\xff".to_vec(),
                ino: 7,
                size: 0,
                mtime: (-1, 0),
                ctime: (0, 0),
                sha256: "0123456789abcdef".repeat(4),
            },
        ]
    }

    #[test]
    fn shares_are_dealt_by_bytes_alike_in_every_boot() {
        let sizes = [100 << 20, 1, 2, 3 << 20, 0, 5 << 20, 7];
        let mut one = Shares::new(2);
        let dealt: Vec<u32> = sizes.iter().map(|s| one.deal(*s)).collect();
        // The big first file fills share 0; the small ones go to share 1 until it catches up.
        assert_eq!(dealt, [0, 1, 1, 1, 1, 1, 1]);
        let mut other = Shares::new(2);
        assert_eq!(sizes.iter().map(|s| other.deal(*s)).collect::<Vec<_>>(), dealt, "the same order deals alike");
        let mut three = Shares::new(3);
        assert_eq!((0..6).map(|_| three.deal(10)).collect::<Vec<_>>(), [0, 1, 2, 0, 1, 2]);
        assert_eq!(Shares::new(0).deal(5), 0, "no share is one share");
        assert_eq!(Shares::new(u32::MAX).loads.len(), MAX_PARTS as usize);
        assert_eq!(Shares::new(1).deal(u64::MAX), 0, "sizes saturate");
    }

    #[test]
    fn entries_survive_the_round_trip() {
        assert_eq!(parse(&render(&sample())).unwrap(), sample());
        assert_eq!(parse(&render(&[])).unwrap(), []);
    }

    #[test]
    fn damaged_caches_are_refused() {
        let good = String::from_utf8(render(&sample())).unwrap();
        let bad: Vec<(String, &str)> = vec![
            (String::new(), "no magic"),
            ("imgforge-digests 2\n".into(), "other version"),
            (good.replace("\t131\t", "\t-131\t"), "negative inode"),
            (good.replace(&"a".repeat(64), &"A".repeat(64)), "uppercase digest"),
            (good.replace(&"a".repeat(64), &"a".repeat(63)), "short digest"),
            (good.replacen("2f657463", "657463", 1), "relative path"),
            (good.replacen("2f657463", "2f65746", 1), "odd hex"),
            (good.replacen("2f657463", "2f650063", 1), "NUL in path"),
            (format!("{good}extra\n"), "a line of one field"),
            (good.replace("\t5\t", "\t5\t\t"), "nine fields"),
        ];
        for (text, why) in bad {
            assert!(parse(text.as_bytes()).is_err(), "{why}");
        }
        assert_eq!(parse(&vec![b' '; MAX_BYTES + 1]), Err(DigestCacheError::TooLarge(MAX_BYTES + 1)));
        let long = format!("{MAGIC}\n2f{}\t1\t1\t1\t1\t1\t1\t{}\n", "61".repeat(MAX_PATH_BYTES), "a".repeat(64));
        assert!(parse(long.as_bytes()).is_err(), "path over the limit");
    }
}
