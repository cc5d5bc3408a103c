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
/// bytes and entries. The helper ran guest programs, so every length and entry is checked.
pub fn read_export(export: &Path, offset: u64) -> Result<(Vec<u8>, Vec<Entry>), String> {
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
    written: bool,
}

impl ShareBoard {
    /// Counts the boot reading share `part`, whose import disk is `import`.
    pub fn join(&self, part: u32, import: PathBuf) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).imports.insert(part, import);
    }

    /// Takes share `part`'s digests from its export disk `export` (once; later lines are
    /// ignored); when every boot that joined gave, writes them all to every import disk.
    pub fn give(&self, part: u32, export: &Path) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.written || state.given.contains_key(&part) || !state.imports.contains_key(&part) {
            return;
        }
        let entries = match read_export(export, digest_cache::SHARE_OFFSET) {
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

    fn entry(path: &str) -> Entry {
        Entry { path: path.as_bytes().to_vec(), ino: 1, size: 2, mtime: (3, 4), ctime: (5, 6), sha256: "c".repeat(64) }
    }

    fn export_of(dir: &Path, name: &str, entries: &[Entry]) -> PathBuf {
        let path = dir.join(name);
        create_disk(&path, 2).unwrap();
        let bytes = digest_cache::render(entries);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        // The first region (the boot's whole cache, for keeping) is not the share.
        let other = digest_cache::render(&[entry("/not-the-share")]);
        f.write_all_at(&(other.len() as u64).to_le_bytes(), 0).unwrap();
        f.write_all_at(&other, 8).unwrap();
        f.write_all_at(&(bytes.len() as u64).to_le_bytes(), digest_cache::SHARE_OFFSET).unwrap();
        f.write_all_at(&bytes, digest_cache::SHARE_OFFSET + 8).unwrap();
        path
    }

    fn import_of(path: &Path) -> Option<Vec<Entry>> {
        read_export(path, 0).ok().map(|(_, entries)| entries)
    }

    /// Nothing is handed over until every boot that joined gave; then every import disk holds
    /// every share, and later lines change nothing.
    #[test]
    fn every_boot_gets_every_share_once_all_gave() {
        let dir = tempfile::tempdir().unwrap();
        let board = ShareBoard::default();
        let imports: Vec<PathBuf> = (0..2u32)
            .map(|k| {
                let p = dir.path().join(format!("import{k}"));
                create_disk(&p, 1).unwrap();
                board.join(k, p.clone());
                p
            })
            .collect();
        board.give(0, &export_of(dir.path(), "e0", &[entry("/a"), entry("/b")]));
        assert!(imports.iter().all(|i| import_of(i).is_none()), "one share of two: nothing handed over");
        board.give(0, &export_of(dir.path(), "e0bis", &[entry("/forged")]));
        board.give(5, &export_of(dir.path(), "e5", &[entry("/not-joined")]));
        board.give(1, &export_of(dir.path(), "e1", &[entry("/c")]));
        for import in &imports {
            assert_eq!(import_of(import).unwrap(), [entry("/a"), entry("/b"), entry("/c")]);
        }
    }

    /// A boot whose export disk holds no digest cache gives nothing: the others never get a
    /// hand-over (they read every file themselves), rather than a damaged one.
    #[test]
    fn a_damaged_share_is_not_handed_over() {
        let dir = tempfile::tempdir().unwrap();
        let board = ShareBoard::default();
        let import = dir.path().join("import");
        create_disk(&import, 1).unwrap();
        board.join(0, import.clone());
        board.join(1, dir.path().join("import1"));
        let bad = dir.path().join("bad");
        create_disk(&bad, 2).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&bad).unwrap();
        f.write_all_at(&[9, 0, 0, 0, 0, 0, 0, 0], digest_cache::SHARE_OFFSET).unwrap();
        board.give(0, &export_of(dir.path(), "e0", &[entry("/a")]));
        board.give(1, &bad);
        assert!(import_of(&import).is_none());
        let huge = dir.path().join("huge");
        create_disk(&huge, 1).unwrap();
        std::fs::OpenOptions::new().write(true).open(&huge).unwrap().write_all_at(&u64::MAX.to_le_bytes(), 0).unwrap();
        assert!(read_export(&huge, 0).unwrap_err().contains("more than"));
    }
}
