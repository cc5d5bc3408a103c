//! The digests of the base's files, between this boot and the host: the export disk the
//! helper writes them to (kept by the host for the next builds of the base, or given at once to
//! the other boots reading the same base cold), and the import disk the host writes the other
//! boots' shares to ([`imgforge_protocol::digest_cache`]).

use crate::reporter::{uptime_ms, Reporter};
use crate::snapshot::{self, DigestExchange, Snapshot};
use imgforge_protocol::change::FileType;
use imgforge_protocol::digest_cache::{self, Entry, EXPORT_SERIAL, IMPORT_SERIAL};
use imgforge_protocol::report::ReportLine;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The files of `tree` whose digests this boot knows, as digest cache entries.
pub fn known_entries(tree: &Snapshot) -> Vec<Entry> {
    tree.entries
        .iter()
        .filter(|(_, meta)| meta.file_type == FileType::File)
        .filter_map(|(path, meta)| {
            let sha256 = snapshot::digest_cache::known(path, meta)?;
            Some(Entry {
                path: path.clone(),
                ino: meta.ino,
                size: meta.size,
                mtime: meta.mtime,
                ctime: meta.ctime,
                sha256,
            })
        })
        .collect()
}

/// The digest cache of `entries` and its SHA-256 (lowercase hex), which the helper says on the
/// report line that announces it: the host takes those bytes only.
pub fn rendered(entries: &[Entry]) -> (Vec<u8>, String) {
    use sha2::Digest;
    let bytes = digest_cache::render(entries);
    let sha256 = imgforge_protocol::bytes::hex(&sha2::Sha256::digest(&bytes));
    (bytes, sha256)
}

/// The export disk's device, if the host attached one.
pub fn export_disk() -> Option<String> {
    crate::variants::disk_with_serial(Path::new("/sys/block"), EXPORT_SERIAL)
}

/// Writes the digest cache `bytes` to the region at `offset` of the export disk `disk`: an
/// 8-byte little-endian length, then the bytes.
pub fn export(disk: &str, bytes: &[u8], offset: u64) -> Result<(), String> {
    if bytes.len() > digest_cache::MAX_BYTES {
        return Err(format!("the digests are too large to give ({} bytes)", bytes.len()));
    }
    let written = (|| -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let dev = std::fs::OpenOptions::new().write(true).open(disk)?;
        dev.write_all_at(&(bytes.len() as u64).to_le_bytes(), offset)?;
        dev.write_all_at(bytes, offset + 8)?;
        dev.sync_all()
    })();
    written.map_err(|e| format!("cannot write the digests to {disk}: {e}"))
}

/// One boot's side of a shared reading of the base: it gives its share through the export
/// disk and a `DIGESTS-SHARED` line, and looks for the others' on the import disk.
pub struct Exchange<'a> {
    reporter: &'a mut Reporter,
    import: Option<File>,
}

impl<'a> Exchange<'a> {
    /// The exchange of this boot, reporting on `reporter`; without an import disk it only
    /// gives (the walk then reads every file itself).
    pub fn new(reporter: &'a mut Reporter) -> Self {
        let import = crate::variants::disk_with_serial(Path::new("/sys/block"), IMPORT_SERIAL).and_then(|disk| {
            // O_DIRECT: the host writes the disk's file while the VM runs, and the guest's page
            // cache would keep showing the empty disk it read first.
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&disk)
                .map_err(|e| println!("WARNING: the import disk {disk} cannot be opened: {e}"))
                .ok()
        });
        Self { reporter, import }
    }

    /// The other boots' digests, once the host wrote them; an error stops the asking.
    fn read_import(file: &File) -> Result<Option<Vec<Entry>>, String> {
        const BLOCK: usize = imgforge_protocol::rules::BULK_ALIGN_BYTES as usize;
        let mut head = crate::bulk::AlignedBuffer::new(BLOCK).map_err(|e| e.to_string())?;
        crate::bulk::read_at_least(file, head.as_mut(), 8, 0)
            .map_err(|e| format!("cannot read the import disk: {e}"))?;
        let len = u64::from_le_bytes(head.as_mut()[..8].try_into().expect("8 bytes"));
        if len == 0 {
            return Ok(None);
        }
        if len > digest_cache::MAX_BYTES as u64 {
            return Err(format!("the import disk says {len} bytes, more than the {} allowed", digest_cache::MAX_BYTES));
        }
        let need = 8 + len as usize;
        let mut all = crate::bulk::AlignedBuffer::new(need.div_ceil(BLOCK) * BLOCK).map_err(|e| e.to_string())?;
        crate::bulk::read_at_least(file, all.as_mut(), need, 0)
            .map_err(|e| format!("cannot read the import disk: {e}"))?;
        digest_cache::parse(&all.as_mut()[8..need]).map(Some).map_err(|e| format!("the import disk: {e}"))
    }
}

impl DigestExchange for Exchange<'_> {
    fn share(&mut self, tree: &Snapshot) {
        let Some(disk) = export_disk() else {
            println!("digest share: no export disk, nothing given");
            return;
        };
        let entries = known_entries(tree);
        let (bytes, sha256) = rendered(&entries);
        let said = ReportLine::DigestsShared { files: entries.len() as u64, sha256 };
        match export(&disk, &bytes, digest_cache::SHARE_OFFSET) {
            Ok(()) => {
                println!("digest share: {} files' digests given", entries.len());
                self.reporter.send(&said);
                self.reporter.send(&ReportLine::Phase { name: "digests-given".into(), uptime_ms: uptime_ms() });
            }
            Err(e) => {
                println!("WARNING: digest share: {e}");
                // Said all the same, though the disk does not hold it: the host takes a boot's
                // first line only, and a later one could be the guest programs'.
                self.reporter.send(&said);
            }
        }
    }

    fn arrived(&mut self) -> bool {
        let Some(file) = &self.import else { return false };
        match Self::read_import(file) {
            Ok(None) => false,
            Ok(Some(entries)) => {
                println!("digest share: {} files' digests taken from the other boots", entries.len());
                snapshot::digest_cache::preload(entries);
                self.import = None;
                self.reporter.send(&ReportLine::Phase { name: "digests-taken".into(), uptime_ms: uptime_ms() });
                true
            }
            Err(e) => {
                println!("WARNING: digest share: {e}; reading the other boots' files here");
                self.import = None;
                false
            }
        }
    }
}
