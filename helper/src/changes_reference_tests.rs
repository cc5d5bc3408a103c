//! `diff` (a merge of two sorted records) and `manifest::digest_of` against the plainer versions
//! they replaced (lookups a path at a time), on random records: the old `diff` is the same
//! [`changes_of`] over paths looked up one at a time.
use super::*;
use crate::snapshot::{Meta, Snapshot};
use imgforge_protocol::manifest::{content_for, manifest_line, ManifestContent, RANDOM_CONTENT_PATHS};
use std::collections::{BTreeMap, BTreeSet};

/// `diff` as it was before the merge: the paths of both records gathered in a set, each looked
/// up in both.
fn old_diff(before: &BTreeMap<Vec<u8>, Meta>, after: &BTreeMap<Vec<u8>, Meta>) -> Vec<FileChange> {
    let paths: BTreeSet<&Vec<u8>> = before.keys().chain(after.keys()).collect();
    changes_of(|| paths.iter().map(|path| (*path, before.get(*path), after.get(*path))), |_| false)
}

/// `manifest::digest_of` as it was before the merge.
fn old_digest_of(snapshot: &Snapshot, contents: &BTreeMap<Vec<u8>, ManifestContent>) -> Result<String, String> {
    use sha2::Digest;
    if !snapshot.left_out.is_empty() {
        return Err(format!("the guest's tree is too large for a manifest: {}", snapshot.left_out.join(", ")));
    }
    let mut hasher = sha2::Sha256::new();
    for (path, meta) in &snapshot.entries {
        let content = contents.get(path).cloned().unwrap_or(ManifestContent::None);
        let content = content_for(path, meta.file_type, content);
        hasher.update(manifest_line(path, meta.file_type, meta.mode, meta.uid, meta.gid, &content).as_bytes());
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const TYPES: [FileType; 7] = [
    FileType::File,
    FileType::Directory,
    FileType::Symlink,
    FileType::CharDevice,
    FileType::BlockDevice,
    FileType::Fifo,
    FileType::Socket,
];

/// A path from a small alphabet, so that records share many paths, prefixes and parents; some
/// random seed paths; odd bytes ('/' sorts before letters, 0x00..0x2e before '/', 0xff after).
fn path(rng: &mut Rng) -> Vec<u8> {
    if rng.below(20) == 0 {
        return RANDOM_CONTENT_PATHS[rng.below(RANDOM_CONTENT_PATHS.len() as u64) as usize].as_bytes().to_vec();
    }
    let alphabet: &[u8] = b"ab-.\x01\xff ";
    let mut p = Vec::new();
    for _ in 0..=rng.below(3) {
        p.extend_from_slice(b"/");
        for _ in 0..=rng.below(2) {
            p.push(alphabet[rng.below(alphabet.len() as u64) as usize]);
        }
    }
    p
}

fn meta(rng: &mut Rng) -> Meta {
    let s = |rng: &mut Rng| rng.below(2) as i64;
    Meta {
        file_type: TYPES[rng.below(7) as usize],
        mode: rng.below(2) as u32 * 0o755,
        uid: rng.below(2) as u32,
        gid: rng.below(2) as u32,
        size: rng.below(2),
        mtime: (s(rng), s(rng)),
        ctime: (s(rng), s(rng)),
        ino: rng.below(3),
    }
}

fn record(rng: &mut Rng, n: u64) -> BTreeMap<Vec<u8>, Meta> {
    (0..rng.below(n + 1)).map(|_| (path(rng), meta(rng))).collect()
}

#[test]
fn diff_is_unchanged_on_random_records() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..20_000 {
        let before = record(&mut rng, 12);
        // After: the same record with some entries moved, removed, added.
        let mut after = if rng.below(4) == 0 { record(&mut rng, 12) } else { before.clone() };
        for _ in 0..rng.below(5) {
            match rng.below(3) {
                0 => {
                    after.insert(path(&mut rng), meta(&mut rng));
                }
                1 => {
                    let p = path(&mut rng);
                    after.remove(&p);
                }
                _ => {
                    if let Some(k) = after.keys().nth(rng.below(after.len() as u64 + 1) as usize).cloned() {
                        after.insert(k, meta(&mut rng));
                    }
                }
            }
        }
        assert_eq!(diff(&before, &after), old_diff(&before, &after), "round {round}");
        assert_eq!(diff(&after, &before), old_diff(&after, &before), "round {round} reversed");
    }
    let empty = BTreeMap::new();
    let one = record(&mut rng, 5);
    assert_eq!(diff(&empty, &empty), old_diff(&empty, &empty));
    assert_eq!(diff(&empty, &one), old_diff(&empty, &one));
    assert_eq!(diff(&one, &empty), old_diff(&one, &empty));
}

#[test]
fn digest_of_is_unchanged_on_random_trees() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for round in 0..5_000 {
        let entries = record(&mut rng, 12);
        // Contents: for some entries, for paths not in the tree, and random seeds given a digest.
        let mut contents = BTreeMap::new();
        for p in entries.keys().chain([path(&mut rng), path(&mut rng)].iter()) {
            let content = match rng.below(5) {
                0 => continue,
                1 => ManifestContent::None,
                2 => ManifestContent::Random,
                3 => ManifestContent::LinkTarget(path(&mut rng)),
                _ => ManifestContent::Sha256(format!("{:064x}", rng.next())),
            };
            contents.insert(p.clone(), content);
        }
        let snapshot = Snapshot { entries, left_out: Vec::new() };
        assert_eq!(
            crate::manifest::digest_of(&snapshot, &contents),
            old_digest_of(&snapshot, &contents),
            "round {round}"
        );
    }
    // Past one hashed batch (64 KiB of lines).
    let mut entries = BTreeMap::new();
    let mut contents = BTreeMap::new();
    for i in 0..3000u32 {
        let p = format!("/d{}/f\\{i}\x7f", i % 7).into_bytes();
        entries.insert(p.clone(), meta(&mut rng));
        contents.insert(p, ManifestContent::Sha256(format!("{:064x}", rng.next())));
    }
    let snapshot = Snapshot { entries, left_out: Vec::new() };
    assert_eq!(crate::manifest::digest_of(&snapshot, &contents), old_digest_of(&snapshot, &contents));
}
