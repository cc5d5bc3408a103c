//! Local qcow2 images read in Rust, without qemu: the virtual disk mapped through the L1 and
//! L2 tables [`qcow2::check`] already bounded, data clusters read straight from the file,
//! unallocated and zero clusters handed over as holes, deflate-compressed clusters decoded to
//! exactly one cluster each. Serving every byte through a confined qemu and an NBD socket cost
//! about as much system time as the write itself.
//!
//! Only images this reader fully understands are taken: self-contained (no backing file, no
//! external data file, not encrypted — `check` refuses those), standard L2 entries, an L1
//! table covering the disk, every cluster inside the file and cluster-aligned, compressed
//! clusters only in deflate. Anything else is read by qemu as before ([`plan`] says why).
//! The file is hostile and may change while read: every entry is checked again when used,
//! memory is one L2 table plus the L1 table (at most 32 MiB, as `check` allows), and a read
//! past the end or a cluster that does not decode is an error, never zeros.

use crate::source::qcow2::{self, Backing, COMPRESSED, INCOMPAT_EXTENDED_L2, OFFSET_MASK};
use crate::stream::prefetch::{Part, Planner, Stretch};
use crate::stream::{at_most, CHUNK_BYTES};
use imgforge_protocol::bytes::be64;
use std::os::unix::fs::FileExt;

/// The L2 entry bit of a cluster that reads as zeros.
const ZERO: u64 = 1;
/// Where a version 3 header keeps its compression type (0: deflate).
const COMPRESSION_TYPE_AT: u64 = 104;
/// Compressed clusters are stored in 512-byte sectors.
const SECTOR_BYTES: u64 = 512;

/// What one guest cluster is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cluster {
    /// Reads as zeros (unallocated, or the zero flag).
    Zero,
    /// Stored as it is at this file offset.
    Data(u64),
    /// A deflate stream in up to `stored` bytes at `offset`.
    Compressed { offset: u64, stored: u64 },
}

/// Reads L2 entry `entry` of an image of `cluster_bits`-sized clusters in a file of `len`
/// bytes, for a guest cluster of which `used` bytes lie inside the disk (pure).
fn classify(entry: u64, cluster_bits: u32, len: u64, used: u64) -> Result<Cluster, String> {
    let cluster = 1u64 << cluster_bits;
    if entry & COMPRESSED != 0 {
        // The host offset takes the low bits, the count of further sectors the next ones.
        let shift = 62 - (cluster_bits - 8);
        let offset = entry & ((1u64 << shift) - 1);
        let sectors = ((entry >> shift) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
        let stored = sectors * SECTOR_BYTES - (offset % SECTOR_BYTES);
        if offset >= len {
            return Err(format!("a compressed cluster at byte {offset}, past the end of the file ({len} bytes)"));
        }
        return Ok(Cluster::Compressed { offset, stored });
    }
    let offset = entry & OFFSET_MASK;
    if !offset.is_multiple_of(cluster) {
        return Err(format!("a cluster at byte {offset}, not on a cluster boundary"));
    }
    if entry & ZERO != 0 || offset == 0 {
        return Ok(Cluster::Zero);
    }
    if offset.checked_add(used).is_none_or(|end| end > len) {
        return Err(format!("a data cluster at byte {offset} reaching past the end of the file ({len} bytes)"));
    }
    Ok(Cluster::Data(offset))
}

/// A qcow2 image's virtual disk, planned front to back for [`crate::stream::prefetch`].
pub struct Qcow2Plan {
    file: std::fs::File,
    /// The file's length when checked.
    len: u64,
    /// The virtual disk's size.
    size: u64,
    cluster_bits: u32,
    /// Offsets of the L2 tables (0: none), one per L1 entry covering the disk.
    l1: Vec<u64>,
    /// The L2 table read last, and which L1 entry it belongs to.
    l2: Vec<u8>,
    l2_of: Option<usize>,
    /// Where the next stretch starts.
    pos: u64,
}

/// The qcow2 image `file` (`len` bytes) planned for reading in Rust, or why it is left to qemu
/// (not an error: qemu then reads it, or refuses it with its usual message).
pub fn plan(file: &std::fs::File, len: u64) -> Result<Qcow2Plan, String> {
    let header = qcow2::check(file, len, Backing::Refused).map_err(|e| e.to_string())?;
    if header.incompatible & INCOMPAT_EXTENDED_L2 != 0 {
        return Err("it has extended L2 entries (subclusters)".into());
    }
    let cluster = 1u64 << header.cluster_bits;
    let l2_entries = cluster / 8;
    let l1_needed = header.size.div_ceil(cluster).div_ceil(l2_entries);
    if l1_needed > header.l1_entries {
        return Err("its L1 table does not cover its disk".into());
    }
    let io = |e: std::io::Error| format!("reading its tables: {e}");
    // `check` bounded the L1 table (at most 4 Mi entries) and placed it inside the file.
    let mut l1_bytes = vec![0u8; usize::try_from(l1_needed * 8).map_err(|e| e.to_string())?];
    file.read_exact_at(&mut l1_bytes, header.l1_offset).map_err(io)?;
    let l1: Vec<u64> = l1_bytes.chunks_exact(8).filter_map(|c| be64(c, 0)).map(|e| e & OFFSET_MASK).collect();
    let compression = if header.header_bytes > COMPRESSION_TYPE_AT {
        let mut kind = [0u8; 1];
        file.read_exact_at(&mut kind, COMPRESSION_TYPE_AT).map_err(io)?;
        kind[0]
    } else {
        0
    };
    let mut me = Qcow2Plan {
        file: file.try_clone().map_err(io)?,
        len,
        // qemu counts the disk in whole 512-byte sectors (bs->total_sectors) and reads none of
        // a last partial one: the same disk here, whichever reader takes the image.
        size: header.size / SECTOR_BYTES * SECTOR_BYTES,
        cluster_bits: header.cluster_bits,
        l1,
        l2: Vec::new(),
        l2_of: None,
        pos: 0,
    };
    // Every mapping entry once, before a byte is written: what qemu alone would read is left
    // to it. Each L2 table is read once, however many L1 entries name it: a hostile L1 naming
    // one 2 MiB table thousands of times (a petabyte disk in an 8 MiB file) otherwise cost
    // 2 MiB of reading and 256 Ki entries per name, minutes to hours before the target was
    // even opened. The first time a table is named it maps whole clusters only (the last,
    // partial guest cluster comes last), the strictest reading of its entries.
    let guest_clusters = me.size.div_ceil(cluster);
    let mut seen = std::collections::HashSet::new();
    for index in 0..l1_needed {
        let l2_offset = me.l1[usize::try_from(index).map_err(|e| e.to_string())?];
        if l2_offset == 0 || !seen.insert(l2_offset) {
            continue;
        }
        let first = index * l2_entries;
        for c in first..guest_clusters.min(first + l2_entries) {
            if let Cluster::Compressed { .. } = me.cluster(c).map_err(|e| e.to_string())? {
                if compression != 0 {
                    return Err(format!("its clusters are compressed with compression type {compression}"));
                }
            }
        }
    }
    me.l2_of = None;
    Ok(me)
}

impl Qcow2Plan {
    /// The virtual disk's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// What guest cluster `c` is, its L2 table read if it is not the one in memory.
    fn cluster(&mut self, c: u64) -> std::io::Result<Cluster> {
        let bad =
            |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("the qcow2 image has {why}"));
        let cluster = 1u64 << self.cluster_bits;
        let l2_entries = cluster / 8;
        let index = usize::try_from(c / l2_entries).map_err(|e| bad(e.to_string()))?;
        let Some(&l2_offset) = self.l1.get(index) else { return Err(bad(format!("no L1 entry for cluster {c}"))) };
        if l2_offset == 0 {
            return Ok(Cluster::Zero);
        }
        if self.l2_of != Some(index) {
            if !l2_offset.is_multiple_of(cluster) || l2_offset.checked_add(cluster).is_none_or(|end| end > self.len) {
                return Err(bad(format!("an L2 table at byte {l2_offset} outside the file")));
            }
            self.l2_of = None;
            self.l2.resize(at_most(cluster, usize::MAX), 0);
            self.file.read_exact_at(&mut self.l2, l2_offset)?;
            self.l2_of = Some(index);
        }
        let at = usize::try_from(c % l2_entries).map_err(|e| bad(e.to_string()))? * 8;
        let entry = be64(&self.l2, at).ok_or_else(|| bad(format!("a short L2 table at byte {l2_offset}")))?;
        let used = (self.size - c * cluster).min(cluster);
        classify(entry, self.cluster_bits, self.len, used).map_err(bad)
    }
}

impl Planner for Qcow2Plan {
    /// One [`CHUNK_BYTES`] window of the disk at a time (clusters divide it): contiguous data
    /// clusters as one read, zero clusters as zeros, a window of nothing but zeros as a hole.
    fn next(&mut self) -> std::io::Result<Option<Stretch>> {
        if self.pos >= self.size {
            return Ok(None);
        }
        let cluster = 1u64 << self.cluster_bits;
        // What one L2 table maps: with no table, all of it is a hole, however large the disk.
        let l2_span = cluster * (cluster / 8);
        let index = self.pos / l2_span;
        if usize::try_from(index).ok().and_then(|i| self.l1.get(i)) == Some(&0) {
            let end = index.saturating_add(1).saturating_mul(l2_span).min(self.size);
            let hole = end - self.pos;
            self.pos = end;
            return Ok(Some(Stretch::Hole(hole)));
        }
        let end = self.pos.saturating_add(CHUNK_BYTES as u64).min(self.size);
        let mut parts: Vec<Part> = Vec::new();
        let mut c = self.pos >> self.cluster_bits;
        while c * cluster < end {
            let n = at_most((end - c * cluster).min(cluster), CHUNK_BYTES);
            let part = match self.cluster(c)? {
                Cluster::Zero => Part::Zero(n),
                Cluster::Data(offset) => Part::Read { offset, len: n },
                Cluster::Compressed { offset, stored } => {
                    // qemu decodes whole clusters: the last one must fill its cluster too.
                    let whole = at_most(cluster, CHUNK_BYTES);
                    Part::Deflate { offset, stored: at_most(stored, usize::MAX), len: n, whole }
                }
            };
            match (parts.last_mut(), part) {
                (Some(Part::Zero(m)), Part::Zero(n)) => *m += n,
                (Some(Part::Read { offset: o, len: m }), Part::Read { offset, len: n })
                    if o.checked_add(*m as u64) == Some(offset) =>
                {
                    *m += n;
                }
                _ => parts.push(part),
            }
            c += 1;
        }
        let len = end - self.pos;
        self.pos = end;
        Ok(Some(match parts.as_slice() {
            [Part::Zero(_)] => Stretch::Hole(len),
            _ => Stretch::Fill(parts),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::prefetch::{Prefetch, SourceFile};

    use std::path::Path;
    use std::process::Command;

    fn run(program: &str, args: &[&str]) {
        let out = Command::new(program).args(args).output().expect("qemu-utils is installed by scripts/setup.sh");
        assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The disk read natively, holes as zeros.
    fn read_native(path: &Path) -> Result<Vec<u8>, String> {
        let file = std::fs::File::open(path).unwrap();
        let len = file.metadata().unwrap().len();
        let plan = plan(&file, len)?;
        let mut reader = Prefetch::new(SourceFile::new(file, len, "test.qcow2"), Box::new(plan));
        crate::stream::read_back(&mut reader, false).map_err(|e| e.to_string())
    }

    /// What qemu-img makes of the image.
    fn read_qemu(path: &Path) -> Vec<u8> {
        let raw = path.with_extension("qemu.raw");
        run(
            "qemu-img",
            &["convert", "-f", "qcow2", "-O", "raw", &path.display().to_string(), &raw.display().to_string()],
        );
        std::fs::read(raw).unwrap()
    }

    /// A disk of `size` bytes: data, zeros, a hole, repeated text (compressible), an odd tail.
    fn disk(dir: &Path, size: u64) -> std::path::PathBuf {
        use std::os::unix::fs::FileExt;
        let path = dir.join("disk.raw");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(size).unwrap();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..(3 << 20) + 777)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        f.write_all_at(&noise, 512).unwrap();
        f.write_all_at(&vec![0u8; 1 << 20], 5 << 20).unwrap();
        let text: Vec<u8> = b"imgforge qcow2 ".iter().copied().cycle().take(2 << 20).collect();
        f.write_all_at(&text, (9 << 20) + 4096).unwrap();
        f.write_all_at(b"the end", size - 7).unwrap();
        path
    }

    /// Images made by qemu-img with every cluster size, plain and compressed, and zero
    /// clusters written by qemu-io: the native read equals qemu's, byte for byte.
    #[test]
    fn native_reads_equal_qemus() {
        let dir = tempfile::tempdir().unwrap();
        let raw = disk(dir.path(), (13 << 20) + 4096 + 1536);
        let raw_s = raw.display().to_string();
        let want = std::fs::read(&raw).unwrap();
        let qemu_io = Command::new("qemu-io").arg("--version").output().is_ok_and(|o| o.status.success());
        for bits in [9u32, 12, 16, 21] {
            for compressed in [false, true] {
                let q = dir.path().join(format!("c{bits}-{compressed}.qcow2"));
                let q_s = q.display().to_string();
                let opts = format!("cluster_size={}", 1u32 << bits);
                let mut args = vec!["convert", "-q", "-f", "raw", "-O", "qcow2", "-o", &opts];
                if compressed {
                    args.push("-c");
                }
                args.extend([raw_s.as_str(), q_s.as_str()]);
                run("qemu-img", &args);
                if qemu_io {
                    run("qemu-io", &["-f", "qcow2", "-c", "write -z 1M 1M", "-c", "write -P 0x5a 12M 4k", &q_s]);
                }
                let got = read_native(&q).unwrap_or_else(|e| panic!("{q_s}: {e}"));
                let qemu = read_qemu(&q);
                assert!(got == qemu, "{q_s}: differs from qemu-img's reading");
                if !qemu_io {
                    assert!(got == want, "{q_s}: differs from the disk");
                }
            }
        }
    }

    /// What the native reader leaves to qemu (extended L2, zstd), and what it refuses in a
    /// hostile file: a truncated one, an entry pointing past the end, a compressed cluster
    /// that does not decode.
    #[test]
    fn odd_and_broken_images() {
        let dir = tempfile::tempdir().unwrap();
        let raw = disk(dir.path(), 16 << 20);
        let raw_s = raw.display().to_string();
        let make = |name: &str, opts: &str, compress: bool| {
            let q = dir.path().join(name);
            let mut args = vec!["convert", "-q", "-f", "raw", "-O", "qcow2", "-o", opts];
            if compress {
                args.push("-c");
            }
            let q_s = q.display().to_string();
            args.extend([raw_s.as_str(), q_s.as_str()]);
            run("qemu-img", &args);
            q
        };
        let ext = make("ext.qcow2", "extended_l2=on", false);
        assert!(read_native(&ext).unwrap_err().contains("extended L2"));
        let zstd = make("zstd.qcow2", "compression_type=zstd", true);
        assert!(read_native(&zstd).unwrap_err().contains("compression type 1"));
        // zstd chosen, nothing compressed: read natively.
        let zstd_plain = make("zstd-plain.qcow2", "compression_type=zstd", false);
        assert!(read_native(&zstd_plain).unwrap() == read_qemu(&zstd_plain));

        let plain = make("plain.qcow2", "cluster_size=65536", false);
        let bytes = std::fs::read(&plain).unwrap();
        let cut = dir.path().join("cut.qcow2");
        std::fs::write(&cut, &bytes[..bytes.len() - 70_000]).unwrap();
        assert!(read_native(&cut).unwrap_err().contains("past the end"));

        // The first L2 entry pointed past the end of the file.
        let l1_offset = usize::try_from(be64(&bytes, 40).unwrap()).unwrap();
        let l2_offset = usize::try_from(be64(&bytes, l1_offset).unwrap() & OFFSET_MASK).unwrap();
        let mut past = bytes.clone();
        past[l2_offset..l2_offset + 8].copy_from_slice(&((1u64 << 63) | (1u64 << 40)).to_be_bytes());
        let past_path = dir.path().join("past.qcow2");
        std::fs::write(&past_path, &past).unwrap();
        assert!(read_native(&past_path).unwrap_err().contains("past the end"));

        // A compressed cluster whose stream is garbage: an error, not zeros or a panic.
        let comp = make("comp.qcow2", "cluster_size=65536", true);
        let mut bytes = std::fs::read(&comp).unwrap();
        let l1_offset = usize::try_from(be64(&bytes, 40).unwrap()).unwrap();
        let l2_offset = usize::try_from(be64(&bytes, l1_offset).unwrap() & OFFSET_MASK).unwrap();
        // A cluster of the repeated text.
        let entry = be64(&bytes, l2_offset + 150 * 8).unwrap();
        assert!(entry & COMPRESSED != 0);
        let Cluster::Compressed { offset, .. } = classify(entry, 16, bytes.len() as u64, 65536).unwrap() else {
            panic!("not compressed")
        };
        let offset = usize::try_from(offset).unwrap();
        bytes[offset..offset + 64].fill(0xff);
        let bad = dir.path().join("bad.qcow2");
        std::fs::write(&bad, &bytes).unwrap();
        let err = read_native(&bad).unwrap_err();
        assert!(err.contains("compressed cluster at byte"), "{err}");
    }

    /// A 64 TiB disk holding 1 MiB: planned in a few stretches, not one per 4 MiB.
    #[test]
    fn unmapped_tables_are_one_hole_each() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("huge.qcow2");
        let q_s = q.display().to_string();
        run("qemu-img", &["create", "-q", "-f", "qcow2", &q_s, "64T"]);
        if Command::new("qemu-io").arg("--version").output().is_ok_and(|o| o.status.success()) {
            run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x5a 1G 1M", &q_s]);
        }
        let file = std::fs::File::open(&q).unwrap();
        let len = file.metadata().unwrap().len();
        let mut plan = plan(&file, len).unwrap();
        let (mut stretches, mut total, mut data) = (0u64, 0u64, 0u64);
        while let Some(stretch) = plan.next().unwrap() {
            stretches += 1;
            match stretch {
                Stretch::Hole(n) => total += n,
                Stretch::Fill(parts) => {
                    for p in parts {
                        let n = match p {
                            Part::Read { len, .. } => {
                                data += len as u64;
                                len
                            }
                            Part::Zero(len) | Part::Deflate { len, .. } => len,
                        };
                        total += n as u64;
                    }
                }
            }
        }
        assert_eq!(total, 64 << 40);
        assert!(stretches < 200_000, "{stretches} stretches");
        assert!(data <= 1 << 20);
    }

    /// A crafted image with 2 MiB clusters whose 4000 L1 entries all name the same L2 table
    /// (a 2000 TiB disk in an 8 MiB file): planned in well under a second, not by reading
    /// and classifying the one table 4000 times (8 GiB and a billion entries).
    #[test]
    fn a_table_named_many_times_is_checked_once() {
        const BITS: u32 = 21;
        const L1_ENTRIES: u64 = 4000;
        let cluster = 1u64 << BITS;
        let mut b = vec![0u8; 4 * cluster as usize];
        b[..4].copy_from_slice(b"QFI\xfb");
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&BITS.to_be_bytes());
        b[24..32].copy_from_slice(&(L1_ENTRIES * cluster * (cluster / 8)).to_be_bytes());
        b[36..40].copy_from_slice(&(L1_ENTRIES as u32).to_be_bytes());
        b[40..48].copy_from_slice(&cluster.to_be_bytes());
        b[100..104].copy_from_slice(&104u32.to_be_bytes());
        let (l1, l2) = (cluster as usize, 2 * cluster as usize);
        for i in 0..L1_ENTRIES as usize {
            b[l1 + 8 * i..l1 + 8 * i + 8].copy_from_slice(&((1u64 << 63) | l2 as u64).to_be_bytes());
        }
        // Every entry a data cluster inside the file.
        for i in 0..(cluster / 8) as usize {
            b[l2 + 8 * i..l2 + 8 * i + 8].copy_from_slice(&((1u64 << 63) | (3 * cluster)).to_be_bytes());
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared.qcow2");
        std::fs::write(&path, &b).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let started = std::time::Instant::now();
        let mut plan = plan(&file, b.len() as u64).unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(3), "planned in {:?}", started.elapsed());
        assert_eq!(plan.size(), L1_ENTRIES * cluster * (cluster / 8));
        let Some(Stretch::Fill(parts)) = plan.next().unwrap() else { panic!("data first") };
        assert_eq!(parts, vec![Part::Read { offset: 3 * cluster, len: cluster as usize }; 2]);
    }

    /// A header whose disk size is not a multiple of 512: qemu reads (and `qemu-img info`
    /// reports) whole sectors only, so the native reader gives the same, shorter disk, not a
    /// few bytes more that a target of qemu's size could not hold.
    #[test]
    fn an_odd_disk_size_is_rounded_down_as_qemu_does() {
        let dir = tempfile::tempdir().unwrap();
        let raw = disk(dir.path(), 8 << 20);
        for bits in [9u32, 16, 21] {
            let q = dir.path().join(format!("odd{bits}.qcow2"));
            let opts = format!("cluster_size={}", 1u32 << bits);
            let (raw_s, q_s) = (raw.display().to_string(), q.display().to_string());
            run("qemu-img", &["convert", "-q", "-f", "raw", "-O", "qcow2", "-o", &opts, "-c", &raw_s, &q_s]);
            let mut bytes = std::fs::read(&q).unwrap();
            bytes[24..32].copy_from_slice(&((5u64 << 20) + 77).to_be_bytes());
            std::fs::write(&q, &bytes).unwrap();
            let file = std::fs::File::open(&q).unwrap();
            assert_eq!(plan(&file, bytes.len() as u64).unwrap().size(), 5 << 20, "{q_s}");
            let qemu = read_qemu(&q);
            assert_eq!(qemu.len(), 5 << 20);
            assert!(read_native(&q).unwrap() == qemu, "{q_s}: differs from qemu-img's reading");
        }
    }

    /// The disk's last cluster partly past its end, compressed as a stream shorter than a
    /// cluster but longer than the part inside the disk: qemu decodes whole clusters and
    /// refuses it (a stream must fill its cluster), so the native reader refuses it too
    /// instead of writing a disk qemu-img would not.
    #[test]
    fn a_short_last_compressed_cluster_is_refused_as_qemu_does() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let raw = disk(dir.path(), 8 << 20);
        let q = dir.path().join("short.qcow2");
        let (raw_s, q_s) = (raw.display().to_string(), q.display().to_string());
        run("qemu-img", &["convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536", "-c", &raw_s, &q_s]);
        let mut bytes = std::fs::read(&q).unwrap();
        // Cluster 150 holds the repeated text (compressed); the disk now ends 512 bytes into it.
        bytes[24..32].copy_from_slice(&(150 * 65536 + 512u64).to_be_bytes());
        let l1_offset = usize::try_from(be64(&bytes, 40).unwrap()).unwrap();
        let l2_offset = usize::try_from(be64(&bytes, l1_offset).unwrap() & OFFSET_MASK).unwrap();
        let entry = be64(&bytes, l2_offset + 150 * 8).unwrap();
        let Cluster::Compressed { offset, stored } = classify(entry, 16, bytes.len() as u64, 65536).unwrap() else {
            panic!("not compressed")
        };
        // A stream of 1024 bytes where a cluster's 65536 were.
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&[b'q'; 1024]).unwrap();
        let short = enc.finish().unwrap();
        assert!(short.len() as u64 <= stored);
        let offset = usize::try_from(offset).unwrap();
        bytes[offset..offset + short.len()].copy_from_slice(&short);
        std::fs::write(&q, &bytes).unwrap();
        let raw_out = dir.path().join("short.qemu.raw").display().to_string();
        let qemu = Command::new("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw", &q_s, &raw_out]).output();
        assert!(!qemu.unwrap().status.success(), "qemu-img reads the short stream");
        let err = read_native(&q).map(|disk| disk.len()).unwrap_err();
        assert!(err.contains("compressed cluster at byte"), "{err}");
    }

    #[test]
    fn entries() {
        let len = 1 << 30;
        assert_eq!(classify(0, 16, len, 65536), Ok(Cluster::Zero));
        assert_eq!(classify(ZERO, 16, len, 65536), Ok(Cluster::Zero));
        assert_eq!(classify((1 << 63) | 0x50000 | ZERO, 16, len, 65536), Ok(Cluster::Zero));
        assert_eq!(classify((1 << 63) | 0x50000, 16, len, 65536), Ok(Cluster::Data(0x50000)));
        assert!(classify(0x50200, 16, len, 65536).unwrap_err().contains("cluster boundary"));
        assert!(classify(len - 4096, 16, len, 65536).is_err(), "a cluster reaching past the end");
        assert_eq!(classify(len - 4096, 12, len, 4096), Ok(Cluster::Data(len - 4096)));
        // Compressed, 64 KiB clusters: offset in the low 54 bits, 3 more sectors above them.
        let c = COMPRESSED | (3 << 54) | 0x10100;
        assert_eq!(classify(c, 16, len, 65536), Ok(Cluster::Compressed { offset: 0x10100, stored: 4 * 512 - 0x100 }));
        assert!(classify(COMPRESSED | len, 16, len, 65536).is_err());
        // Every entry of every cluster size: no panic.
        for bits in 9..=21 {
            for entry in [u64::MAX, COMPRESSED | u64::MAX >> 2, OFFSET_MASK, 1 << 55, 0x8000_0000_0000_0200] {
                let _ = classify(entry, bits, len, 1 << bits);
            }
        }
    }
}
