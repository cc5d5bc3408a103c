//! The digests of the base's files the helper gives the host (`imgforge_protocol::digest_cache`):
//! read from a boot's export disk, kept for the next builds of the base (`variants`), or handed
//! at once to the other boots that read the same base cold side by side ([`ShareBoard`]).

use imgforge_protocol::digest_cache::{self, Entry};
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Makes an empty export disk (two regions) or import disk (one) at `path`: sparse, every
/// region's length 0 (nothing written).
pub fn create_disk(path: &Path, regions: u64) -> std::io::Result<()> {
    std::fs::File::create(path)?.set_len(digest_cache::REGION_BYTES * regions)
}

/// The digest cache the helper wrote to the region at `offset` of the export disk `export`: its
/// bytes and entries, if they are the bytes whose SHA-256 the helper announced (`sha256`, on its
/// report line, before any guest program ran). The disk is the guest's too once its programs
/// run, and the host reads it when it gets to the line, or after the boot: what the helper said
/// decides, not what the disk holds. Every length and entry is checked too.
pub fn read_export(export: &Path, offset: u64, sha256: &str) -> Result<(Vec<u8>, Vec<Entry>), String> {
    let file = std::fs::File::open(export).map_err(|e| e.to_string())?;
    let mut len = [0u8; 8];
    file.read_exact_at(&mut len, offset).map_err(|e| e.to_string())?;
    let len = u64::from_le_bytes(len);
    if len == 0 {
        return Err("the helper wrote none".into());
    }
    if len > digest_cache::MAX_BYTES as u64 {
        return Err(format!("the helper said {len} bytes, more than the {} allowed", digest_cache::MAX_BYTES));
    }
    let mut bytes = vec![0u8; len as usize];
    file.read_exact_at(&mut bytes, offset + 8).map_err(|e| e.to_string())?;
    use sha2::Digest;
    if hex::encode(sha2::Sha256::digest(&bytes)) != sha256 {
        return Err("the export disk does not hold the digests the helper announced (written since?)".into());
    }
    let entries = digest_cache::parse(&bytes).map_err(|e| e.to_string())?;
    Ok((bytes, entries))
}

/// The first boots of a cold build, side by side, each reading a share of the base's files:
/// each gives its share's digests (a `DIGESTS-SHARED` line, the digests on its export disk);
/// once every boot that joined gave, the host writes them all to every boot's import disk, and
/// each boot takes what it has not read yet. A boot that never gives (it failed) only costs the
/// others the reading of its share.
#[derive(Debug, Default)]
pub struct ShareBoard {
    state: Mutex<BoardState>,
}

#[derive(Debug, Default)]
struct BoardState {
    /// Each joined boot's share and import disk.
    imports: BTreeMap<u32, PathBuf>,
    /// The digests given, by share.
    given: BTreeMap<u32, Vec<Entry>>,
    /// The shares whose boot said it gave (the first line of each counts, given or not: a
    /// later one may come from the guest's programs).
    said: std::collections::BTreeSet<u32>,
    written: bool,
}

impl ShareBoard {
    /// Counts the boot reading share `part`, whose import disk is `import`.
    pub fn join(&self, part: u32, import: PathBuf) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).imports.insert(part, import);
    }

    /// Takes share `part`'s digests from its export disk `export`, if they are those whose
    /// SHA-256 its boot said (`sha256`), on its first line only (later ones are ignored: the
    /// guest's programs may have written them); when every boot that joined gave, writes them
    /// all to every import disk.
    pub fn give(&self, part: u32, export: &Path, sha256: &str) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.written || !state.imports.contains_key(&part) || !state.said.insert(part) {
            return;
        }
        let entries = match read_export(export, digest_cache::SHARE_OFFSET, sha256) {
            Ok((_, entries)) => entries,
            Err(e) => {
                tracing::warn!(share = part, "the digests a boot gave are not used: {e}");
                return;
            }
        };
        tracing::debug!(share = part, files = entries.len(), "a boot gave its share of the base's digests");
        state.given.insert(part, entries);
        if state.given.len() < state.imports.len() {
            return;
        }
        state.written = true;
        let all: Vec<Entry> = state.given.values().flatten().cloned().collect();
        let bytes = digest_cache::render(&all);
        if bytes.len() > digest_cache::MAX_BYTES {
            tracing::warn!(files = all.len(), "the base's digests are too many to hand over: each boot reads them");
            return;
        }
        for import in state.imports.values() {
            // The length last: the helper takes nothing until it reads one.
            let written = std::fs::OpenOptions::new().write(true).open(import).and_then(|f| {
                f.write_all_at(&bytes, 8)?;
                f.write_all_at(&(bytes.len() as u64).to_le_bytes(), 0)
            });
            if let Err(e) = written {
                tracing::warn!(import = %import.display(), "cannot hand the base's digests over: {e}");
            }
        }
        tracing::info!(files = all.len(), boots = state.imports.len(), "the base's digests handed to every boot");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    fn entry(path: &str) -> Entry {
        Entry { path: path.as_bytes().to_vec(), ino: 1, size: 2, mtime: (3, 4), ctime: (5, 6), sha256: "c".repeat(64) }
    }

    fn sha256_of(entries: &[Entry]) -> String {
        hex::encode(sha2::Sha256::digest(digest_cache::render(entries)))
    }

    /// Writes `entries` as a digest cache to the region at `offset` of `path`.
    fn write_region(path: &Path, offset: u64, entries: &[Entry]) {
        let bytes = digest_cache::render(entries);
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(&(bytes.len() as u64).to_le_bytes(), offset).unwrap();
        f.write_all_at(&bytes, offset + 8).unwrap();
    }

    /// An export disk whose share region holds `entries`, and the SHA-256 its helper announced.
    fn export_of(dir: &Path, name: &str, entries: &[Entry]) -> (PathBuf, String) {
        let path = dir.join(name);
        create_disk(&path, 2).unwrap();
        // The first region (the boot's whole cache, for keeping) is not the share.
        write_region(&path, 0, &[entry("/not-the-share")]);
        write_region(&path, digest_cache::SHARE_OFFSET, entries);
        (path, sha256_of(entries))
    }

    fn import_of(path: &Path) -> Option<Vec<Entry>> {
        let file = std::fs::File::open(path).unwrap();
        let mut len = [0u8; 8];
        file.read_exact_at(&mut len, 0).unwrap();
        let mut bytes = vec![0u8; u64::from_le_bytes(len) as usize];
        file.read_exact_at(&mut bytes, 8).unwrap();
        (!bytes.is_empty()).then(|| digest_cache::parse(&bytes).unwrap())
    }

    fn joined(board: &ShareBoard, dir: &Path, parts: u32) -> Vec<PathBuf> {
        (0..parts)
            .map(|k| {
                let p = dir.join(format!("import{k}"));
                create_disk(&p, 1).unwrap();
                board.join(k, p.clone());
                p
            })
            .collect()
    }

    /// Nothing is handed over until every boot that joined gave; then every import disk holds
    /// every share, and later lines change nothing.
    #[test]
    fn every_boot_gets_every_share_once_all_gave() {
        let dir = tempfile::tempdir().unwrap();
        let board = ShareBoard::default();
        let imports = joined(&board, dir.path(), 2);
        let (e0, s0) = export_of(dir.path(), "e0", &[entry("/a"), entry("/b")]);
        board.give(0, &e0, &s0);
        assert!(imports.iter().all(|i| import_of(i).is_none()), "one share of two: nothing handed over");
        let (e0bis, s0bis) = export_of(dir.path(), "e0bis", &[entry("/forged")]);
        board.give(0, &e0bis, &s0bis);
        let (e5, s5) = export_of(dir.path(), "e5", &[entry("/not-joined")]);
        board.give(5, &e5, &s5);
        let (e1, s1) = export_of(dir.path(), "e1", &[entry("/c")]);
        board.give(1, &e1, &s1);
        for import in &imports {
            assert_eq!(import_of(import).unwrap(), [entry("/a"), entry("/b"), entry("/c")]);
        }
    }

    /// A share region written after the helper's line (by the guest's programs: the host may
    /// get to the line late) is not what the helper announced: not taken, and no later line of
    /// that boot counts, so nothing is handed over rather than the guest's digests.
    #[test]
    fn a_share_rewritten_after_its_line_is_not_handed_over() {
        let dir = tempfile::tempdir().unwrap();
        let board = ShareBoard::default();
        let imports = joined(&board, dir.path(), 2);
        let (e0, said) = export_of(dir.path(), "e0", &[entry("/a")]);
        let forged = Entry { sha256: "f".repeat(64), ..entry("/b") };
        write_region(&e0, digest_cache::SHARE_OFFSET, std::slice::from_ref(&forged));
        board.give(0, &e0, &said);
        // The guest's own line, announcing what it wrote: too late, the boot already spoke.
        board.give(0, &e0, &sha256_of(&[forged]));
        let (e1, s1) = export_of(dir.path(), "e1", &[entry("/c")]);
        board.give(1, &e1, &s1);
        assert!(imports.iter().all(|i| import_of(i).is_none()), "the guest's digests were handed over");
    }

    /// A boot whose export disk holds no digest cache gives nothing: the others never get a
    /// hand-over (they read every file themselves), rather than a damaged one.
    #[test]
    fn a_damaged_share_is_not_handed_over() {
        let dir = tempfile::tempdir().unwrap();
        let board = ShareBoard::default();
        let imports = joined(&board, dir.path(), 2);
        let bad = dir.path().join("bad");
        create_disk(&bad, 2).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&bad).unwrap();
        f.write_all_at(&[9, 0, 0, 0, 0, 0, 0, 0], digest_cache::SHARE_OFFSET).unwrap();
        let (e0, s0) = export_of(dir.path(), "e0", &[entry("/a")]);
        board.give(0, &e0, &s0);
        board.give(1, &bad, &hex::encode(sha2::Sha256::digest([0u8; 9])));
        assert!(import_of(&imports[0]).is_none());
        let huge = dir.path().join("huge");
        create_disk(&huge, 1).unwrap();
        std::fs::OpenOptions::new().write(true).open(&huge).unwrap().write_all_at(&u64::MAX.to_le_bytes(), 0).unwrap();
        assert!(read_export(&huge, 0, &s0).unwrap_err().contains("more than"));
    }
}
