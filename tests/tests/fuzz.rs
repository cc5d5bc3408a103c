//! Bounded mutation fuzzing of every parser that reads untrusted bytes, on stable Rust (no
//! cargo-fuzz): each target starts from a corpus built from the test fixtures or made by the
//! real tools, mutates it (bit flips, interesting byte values, u32/u64 fields set to huge or
//! boundary values in both byte orders, truncations, splices), and checks a property of the
//! result, not only that nothing panicked. A case that takes more than a second or allocates
//! more than 256 MiB fails too.
//!
//! - `IMGFORGE_FUZZ_SECONDS`: the whole run's budget, shared out among the targets (default
//!   150; the targets run two at a time under `--test-threads 2`, so about 75 s of wall time).
//! - `IMGFORGE_FUZZ_SEED`: the seed (printed; a run with the same seed makes the same cases).
//! - `IMGFORGE_FUZZ_REPLAY=PATH`: runs the one saved case `PATH` on its target instead.
//!
//! A failing case is saved under `target/tmp/fuzz-failures/` and its path printed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Default budget of the whole run, in seconds.
const DEFAULT_BUDGET_SECS: u64 = 150;
/// Default seed.
const DEFAULT_SEED: u64 = 0x1f0e_2d3c_4b5a_6978;
/// Number of targets sharing the budget.
const TARGETS: u64 = 8;
/// A case slower than this is a failure.
const CASE_TIME_LIMIT: Duration = Duration::from_secs(1);
/// A case still running after this is a hang: saved, and the process aborted.
const CASE_HANG_LIMIT: Duration = Duration::from_secs(20);
/// A case that allocates more than this (live, above what was live when it started) fails.
const CASE_MEMORY_BYTES: usize = 256 << 20;

// ---- memory accounting ----------------------------------------------------------------------

/// The system allocator, counting each thread's live bytes and their peak.
struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn grew(bytes: usize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get().wrapping_add(bytes);
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn shrank(bytes: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(bytes)));
}

// SAFETY: every call goes to `System` unchanged; only thread-local counters are updated, and
// they are const-initialized `Cell`s without destructors (no allocation, no reentrancy).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is System's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is System's.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is System's.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract is System's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            shrank(layout.size());
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

// ---- randomness and mutations ---------------------------------------------------------------

/// splitmix64: small, fast, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

const INTERESTING_BYTES: [u8; 8] = [0, 0xff, 0x7f, 0x80, 1, 0xfe, 0x20, b'\n'];

fn interesting_u64(rng: &mut Rng, len: usize) -> u64 {
    let len = len as u64;
    match rng.below(14) {
        0 => 0,
        1 => 1,
        2 => u64::MAX,
        3 => u64::MAX / 512,
        4 => u64::MAX / 512 + 1,
        5 => i64::MAX as u64,
        6 => u64::from(u32::MAX),
        7 => 0x8000_0000,
        8 => len,
        9 => len + 1,
        10 => len.saturating_mul(2),
        11 => len / 512,
        12 => 1 << rng.below(64),
        _ => rng.next(),
    }
}

/// A position in `data`, mostly among the headers at its start.
fn position(rng: &mut Rng, len: usize) -> usize {
    if rng.chance(70) {
        rng.below(len.min(4096))
    } else {
        rng.below(len)
    }
}

/// One to four mutations of `data`, with `corpus` as the source of splices.
fn mutate(rng: &mut Rng, data: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    for _ in 0..1 + rng.below(4) {
        if data.is_empty() {
            data.push(rng.next() as u8);
            continue;
        }
        let len = data.len();
        match rng.below(9) {
            0 => {
                let at = position(rng, len);
                data[at] ^= 1 << rng.below(8);
            }
            1 => {
                let at = position(rng, len);
                data[at] = INTERESTING_BYTES[rng.below(INTERESTING_BYTES.len())];
            }
            2 | 3 => {
                let width = if rng.chance(50) { 4 } else { 8 };
                let at = position(rng, len) & if rng.chance(70) { !(width - 1) } else { !0 };
                let value = interesting_u64(rng, len);
                let bytes = if rng.chance(50) { value.to_le_bytes() } else { value.to_be_bytes() };
                let bytes = if width == 4 { &bytes[if rng.chance(50) { 0..4 } else { 4..8 }] } else { &bytes[..] };
                for (i, b) in bytes.iter().enumerate() {
                    if let Some(slot) = data.get_mut(at + i) {
                        *slot = *b;
                    }
                }
            }
            4 => data.truncate(rng.below(len)),
            5 => {
                let donor = &corpus[rng.below(corpus.len())];
                if donor.is_empty() {
                    continue;
                }
                let from = rng.below(donor.len());
                let n = 1 + rng.below((donor.len() - from).min(256));
                let at = position(rng, len);
                let end = (at + n).min(len);
                data[at..end].copy_from_slice(&donor[from..from + (end - at)]);
            }
            6 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                data.splice(at..at, bytes);
            }
            7 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                data.drain(at..at + n);
            }
            _ => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                let chunk = data[at..at + n].to_vec();
                let to = rng.below(len + 1);
                data.splice(to..to, chunk);
            }
        }
    }
}

// ---- the harness ----------------------------------------------------------------------------

/// The property every case of a target must keep (`Err` says what broke).
type Property = Box<dyn Fn(&[u8]) -> Result<(), String>>;

/// One target: its corpus and its property.
struct Target {
    name: &'static str,
    corpus: Vec<Vec<u8>>,
    check: Property,
}

fn seed() -> u64 {
    match std::env::var("IMGFORGE_FUZZ_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("IMGFORGE_FUZZ_SEED={s:?} is not a number"))
        }
        Err(_) => DEFAULT_SEED,
    }
}

fn budget() -> Duration {
    let total = std::env::var("IMGFORGE_FUZZ_SECONDS")
        .ok()
        .map(|s| s.trim().parse::<u64>().unwrap_or_else(|_| panic!("IMGFORGE_FUZZ_SECONDS={s:?} is not a number")))
        .unwrap_or(DEFAULT_BUDGET_SECS);
    Duration::from_millis(total * 1000 / TARGETS)
}

fn failures_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn save(target: &str, seed: u64, case: u64, data: &[u8]) -> PathBuf {
    let path = failures_dir().join(format!("fuzz-{target}-{seed:#x}-{case}.bin"));
    std::fs::write(&path, data).unwrap();
    path
}

/// What the hang watchdog sees of the running case.
struct Running {
    /// Milliseconds since `epoch` when the current case started (0: between cases).
    started_ms: AtomicU64,
    case: Mutex<(u64, Vec<u8>)>,
    done: AtomicBool,
}

/// Runs `case` through the check, with its time and memory measured.
fn run_case(target: &Target, data: &[u8]) -> Result<(), String> {
    let live = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(live));
    let started = Instant::now();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (target.check)(data)));
    let elapsed = started.elapsed();
    let used = PEAK.with(Cell::get).saturating_sub(live);
    match outcome {
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("panicked: {what}"))
        }
        Ok(Err(broken)) => Err(broken),
        Ok(Ok(())) if elapsed > CASE_TIME_LIMIT => Err(format!("took {elapsed:?} (limit {CASE_TIME_LIMIT:?})")),
        Ok(Ok(())) if used > CASE_MEMORY_BYTES => Err(format!("allocated {} MiB (limit 256 MiB)", used >> 20)),
        Ok(Ok(())) => Ok(()),
    }
}

/// Fuzzes `target` for its share of the budget (or replays `IMGFORGE_FUZZ_REPLAY`).
fn fuzz(target: Target) {
    if let Ok(path) = std::env::var("IMGFORGE_FUZZ_REPLAY") {
        let name = Path::new(&path).file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with(&format!("fuzz-{}-", target.name)) {
            let data = std::fs::read(&path).unwrap();
            if let Err(e) = run_case(&target, &data) {
                panic!("{}: {path}: {e}", target.name);
            }
        }
        return;
    }
    assert!(!target.corpus.is_empty(), "{}: empty corpus", target.name);
    let seed = seed();
    let mut rng = Rng(seed ^ target.name.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b))));
    let budget = budget();
    eprintln!(
        "fuzz {}: seed {seed:#x} (IMGFORGE_FUZZ_SEED), {budget:?}, corpus of {}",
        target.name,
        target.corpus.len()
    );

    // Every corpus entry holds the property as it is.
    for (i, entry) in target.corpus.iter().enumerate() {
        if let Err(e) = run_case(&target, entry) {
            let path = save(target.name, seed, u64::MAX - i as u64, entry);
            panic!("{}: corpus entry {i} fails: {e}; saved as {}", target.name, path.display());
        }
    }

    let epoch = Instant::now();
    let running = Arc::new(Running {
        started_ms: AtomicU64::new(0),
        case: Mutex::new((0, Vec::new())),
        done: AtomicBool::new(false),
    });
    let watchdog = {
        let (running, name) = (running.clone(), target.name);
        std::thread::spawn(move || {
            while !running.done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let started = running.started_ms.load(Ordering::Relaxed);
                if started != 0 && epoch.elapsed().as_millis() as u64 > started + CASE_HANG_LIMIT.as_millis() as u64 {
                    let (case, data) = running.case.lock().unwrap().clone();
                    let path = save(name, seed, case, &data);
                    eprintln!("fuzz {name}: case {case} hung for {CASE_HANG_LIMIT:?}; saved as {}", path.display());
                    std::process::abort();
                }
            }
        })
    };
    let mut cases = 0u64;
    while epoch.elapsed() < budget {
        let mut data = target.corpus[rng.below(target.corpus.len())].clone();
        mutate(&mut rng, &mut data, &target.corpus);
        {
            let mut slot = running.case.lock().unwrap();
            slot.0 = cases;
            slot.1.clear();
            slot.1.extend_from_slice(&data);
        }
        running.started_ms.store(epoch.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
        let result = run_case(&target, &data);
        running.started_ms.store(0, Ordering::Relaxed);
        if let Err(e) = result {
            running.done.store(true, Ordering::Relaxed);
            let path = save(target.name, seed, cases, &data);
            panic!(
                "fuzz {}: case {cases} (seed {seed:#x}) {e}\nsaved as {path} (IMGFORGE_FUZZ_REPLAY={path} replays it)",
                target.name,
                path = path.display()
            );
        }
        cases += 1;
    }
    running.done.store(true, Ordering::Relaxed);
    watchdog.join().unwrap();
    eprintln!("fuzz {}: {cases} cases in {:?}, all held", target.name, epoch.elapsed());
}

fn sh(script: &str, dir: &Path) {
    let ok = Command::new("sh").arg("-c").arg(script).current_dir(dir).status().unwrap();
    assert!(ok.success(), "{script}");
}

/// A file in a fresh temporary directory holding `data`, for the targets that read files.
struct CaseFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl CaseFile {
    fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        CaseFile { _dir: dir, path }
    }

    fn write(&self, data: &[u8]) -> &Path {
        std::fs::write(&self.path, data).unwrap();
        &self.path
    }
}

// ---- inspect: MBR/GPT tables and filesystem superblocks -------------------------------------

const MIB: usize = 1 << 20;
/// What each partition keeps of a fixture in a compact case: its superblocks (XFS and ext4
/// at its start, LVM's label in its second sector).
const PARTITION_HEAD: usize = 128 << 10;

fn read_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    std::fs::File::open(path).unwrap().read_exact_at(&mut buf, offset).unwrap();
    buf
}

/// A fixture disk made compact: its first 64 KiB (tables), then the head of each partition,
/// the table rewritten to point at them (MBR entries or GPT entries; CRCs are not checked).
fn compact_disk(path: &Path) -> Vec<u8> {
    let head = read_range(path, 0, 64 << 10);
    let mut out = head.clone();
    let le32 = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let le64 = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    if &head[512..520] == b"EFI PART" {
        let entries = le64(&head, 512 + 72) as usize * 512;
        for i in 0..le32(&head, 512 + 80) as usize {
            let e = entries + i * le32(&head, 512 + 84) as usize;
            if e + 128 > head.len() || head[e..e + 16].iter().all(|b| *b == 0) {
                continue;
            }
            let start = le64(&head, e + 32) * 512;
            let first = (out.len() / 512) as u64;
            out.extend(read_range(path, start, PARTITION_HEAD));
            out[e + 32..e + 40].copy_from_slice(&first.to_le_bytes());
            out[e + 40..e + 48].copy_from_slice(&(first + (PARTITION_HEAD / 512) as u64 - 1).to_le_bytes());
        }
    } else {
        for i in 0..4 {
            let e = 446 + i * 16;
            if head[e + 4] == 0 {
                continue;
            }
            let start = u64::from(le32(&head, e + 8)) * 512;
            let first = (out.len() / 512) as u32;
            out.extend(read_range(path, start, PARTITION_HEAD));
            out[e + 8..e + 12].copy_from_slice(&first.to_le_bytes());
            out[e + 12..e + 16].copy_from_slice(&((PARTITION_HEAD / 512) as u32).to_le_bytes());
        }
    }
    out
}

fn inspect_corpus() -> Vec<Vec<u8>> {
    use imgforge_tests::fixtures::{self, Shape};
    let mut corpus = Vec::new();
    for shape in [Shape::DosExt4, Shape::GptXfsBoot, Shape::LvmExt4] {
        let disk = fixtures::disk(shape).unwrap();
        corpus.push(compact_disk(&disk));
        // The real layout too: the tables and the first partition's start where they are.
        corpus.push(read_range(&disk, 0, MIB + PARTITION_HEAD));
    }
    corpus
}

#[test]
fn inspect_tables_and_superblocks() {
    let file = CaseFile::new("disk.img");
    let cancel = AtomicBool::new(false);
    let confinement = imgforge::vm::blockdev_qemu::Confinement::default();
    fuzz(Target {
        name: "inspect",
        corpus: inspect_corpus(),
        check: Box::new(move |data| {
            use imgforge::inspect::partitions::Table;
            use imgforge::source::Format;
            let path = file.write(data);
            // A mutation that makes a compressed, squashfs or qemu-format header is another
            // target's business (and qemu's).
            match imgforge::source::detect(data) {
                Format::Raw => {}
                _ => return Ok(()),
            }
            let report = match imgforge::inspect::inspect(path, &confinement, &cancel) {
                Ok(report) => report,
                Err(imgforge::inspect::InspectError::Corrupt { .. }) => return Ok(()),
                Err(e) => return Err(format!("unexpected error: {e}")),
            };
            let size = report.virtual_size.ok_or("a raw image without a size")?;
            if size != data.len() as u64 {
                return Err(format!("virtual size {size} for a {}-byte file", data.len()));
            }
            if let Some(Table::Mbr { partitions } | Table::Gpt { partitions, .. }) = &report.partition_table {
                for p in partitions {
                    if p.size == 0 || p.start.checked_add(p.size).is_none_or(|end| end > size) {
                        return Err(format!("partition {p:?} is not inside the {size}-byte disk"));
                    }
                }
            }
            for f in &report.filesystems {
                if f.offset >= size {
                    return Err(format!("a filesystem at {} on a {size}-byte disk", f.offset));
                }
            }
            Ok(())
        }),
    });
}

// ---- qcow2 header and tables ----------------------------------------------------------------

fn qcow2_corpus() -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let mut corpus = Vec::new();
    for (name, opts) in [
        ("a", "cluster_size=65536"),
        ("b", "cluster_size=4096,compat=0.10"),
        ("c", "cluster_size=65536,extended_l2=on"),
    ] {
        sh(
            &format!(
                "qemu-img create -q -f qcow2 -o {opts} {name}.qcow2 64M && \
                 qemu-io -c 'write -P 0x5a 0 256k' -c 'write -P 0xa5 32M 64k' -c 'write -z 48M 64k' {name}.qcow2 >/dev/null"
            ),
            dir.path(),
        );
        corpus.push(std::fs::read(dir.path().join(format!("{name}.qcow2"))).unwrap());
    }
    corpus
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

#[test]
fn qcow2_header_and_tables() {
    let file = CaseFile::new("image.qcow2");
    fuzz(Target {
        name: "qcow2",
        corpus: qcow2_corpus(),
        check: Box::new(move |data| {
            let path = file.write(data);
            let f = std::fs::File::open(path).unwrap();
            let len = data.len() as u64;
            let Ok(header) = imgforge::source::qcow2::check(&f, len, imgforge::source::qcow2::Backing::Refused) else {
                return Ok(());
            };
            // Accepted: every table it names lies inside the file.
            let l1_end = header.l1_offset.checked_add(header.l1_entries * 8);
            if l1_end.is_none_or(|end| end > len) {
                return Err(format!("accepted an L1 table at {} past the end ({len} bytes)", header.l1_offset));
            }
            let cluster = 1u64 << header.cluster_bits;
            // Only the L1 entries that map the virtual disk are ever read (by qemu too).
            let l2_entries = cluster / if header.incompatible & 16 != 0 { 16 } else { 8 };
            let l1_used = header.size.div_ceil(cluster).div_ceil(l2_entries).min(header.l1_entries);
            for i in 0..l1_used {
                let at = usize::try_from(header.l1_offset + i * 8).unwrap();
                let l2 = be64(data, at).unwrap_or(0) & 0x00ff_ffff_ffff_fe00;
                if l2 != 0 && l2.checked_add(cluster).is_none_or(|end| end > len) {
                    return Err(format!("accepted an L2 table at {l2} past the end ({len} bytes)"));
                }
            }
            // The reader in Rust takes it or leaves it to qemu; what it reads (its first
            // stretches) stays inside the disk, and a bad cluster is an error, not a panic.
            if let Ok(plan) = imgforge::source::qcow2_reader::plan(&f, len) {
                use imgforge::stream::{prefetch, ChunkReader, Piece};
                let size = plan.size();
                let source = prefetch::SourceFile::new(f, len, "fuzz.qcow2");
                let mut reader = prefetch::Prefetch::new(source, Box::new(plan));
                let mut buf = imgforge::stream::buffer::AlignedBuf::new(imgforge::stream::CHUNK_BYTES);
                let mut at = 0u64;
                for _ in 0..32 {
                    match reader.next_into(&mut buf) {
                        Ok(Piece::End) | Err(_) => break,
                        Ok(Piece::Hole(n)) => at += n,
                        Ok(Piece::Data(n)) => at += n as u64,
                    }
                    if at > size {
                        return Err(format!("the reader in Rust read {at} bytes of a {size}-byte disk"));
                    }
                }
            }
            Ok(())
        }),
    });
}

// ---- NBD replies ----------------------------------------------------------------------------

fn nbd_corpus() -> Vec<Vec<u8>> {
    let mut chunk = vec![0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1];
    chunk.extend_from_slice(&7u64.to_be_bytes());
    chunk.extend_from_slice(&4104u32.to_be_bytes());
    // A request (offset, length) and a chunk (offset, length) for chunk_range.
    for v in [1u64 << 20, 65536, (1 << 20) + 4096, 4096] {
        chunk.extend_from_slice(&v.to_be_bytes());
    }
    let mut option = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
    option.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 12]);
    option.extend_from_slice(&[0, 0]);
    option.extend_from_slice(&(64u64 << 20).to_be_bytes());
    option.extend_from_slice(&[0, 3]);
    let mut simple = vec![0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0];
    simple.extend_from_slice(&9u64.to_be_bytes());
    let mut greeting = b"NBDMAGICIHAVEOPT".to_vec();
    greeting.extend_from_slice(&[0, 3]);
    vec![chunk, option, simple, greeting]
}

/// The first `N` bytes of `data`, zero-padded.
fn fixed<const N: usize>(data: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let n = data.len().min(N);
    out[..n].copy_from_slice(&data[..n]);
    out
}

#[test]
fn nbd_replies() {
    use imgforge::source::nbd;
    fuzz(Target {
        name: "nbd",
        corpus: nbd_corpus(),
        check: Box::new(|data| {
            if let Ok((_, _, _, len)) = nbd::parse_chunk_header(&fixed::<20>(data)) {
                if len as usize > nbd::MAX_READ + 8 {
                    return Err(format!("a chunk header of {len} bytes accepted"));
                }
            }
            let tail = data.get(20..).unwrap_or_default();
            let words: Vec<u64> = (0..4).map(|i| be64(tail, i * 8).unwrap_or(0)).collect();
            let request_len = (words[1] % (2 * nbd::MAX_READ as u64)) as usize;
            if let Ok(range) = nbd::chunk_range(words[0], request_len, words[2], words[3]) {
                if range.start > range.end || range.end > request_len || (range.end - range.start) as u64 != words[3] {
                    return Err(format!("chunk range {range:?} for a request of {request_len} bytes"));
                }
            }
            if let Ok((_, _, len)) = nbd::parse_option_reply(&fixed::<20>(data)) {
                if len > 64 * 1024 {
                    return Err(format!("an option reply of {len} bytes accepted"));
                }
            }
            let _ = nbd::parse_info_export(tail);
            let _ = nbd::parse_simple_reply(&fixed::<16>(data));
            if nbd::parse_greeting(&fixed::<18>(data)).is_ok() && !data.starts_with(b"NBDMAGICIHAVEOPT") {
                return Err("a greeting without its magic accepted".into());
            }
            Ok(())
        }),
    });
}

// ---- xz index, zstd header ------------------------------------------------------------------

fn compressed_corpus() -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i / 7 % 251) as u8).collect();
    std::fs::write(dir.path().join("raw"), &data).unwrap();
    sh(
        "xz -kc raw > one.xz && xz -kc --block-size=50000 raw > blocks.xz && (xz -c raw; xz -c raw) > two.xz && \
         zstd -qc raw > one.zst && zstd -qc --no-content-size raw > nosize.zst && head -c 5000 raw | zstd -qc > small.zst",
        dir.path(),
    );
    ["one.xz", "blocks.xz", "two.xz", "one.zst", "nosize.zst", "small.zst"]
        .iter()
        .map(|n| std::fs::read(dir.path().join(n)).unwrap())
        .collect()
}

/// How much of a mutated xz stream is decoded to compare with its index.
const MAX_DECODED_BYTES: u64 = 64 << 20;

#[test]
fn xz_index_and_zstd_header() {
    use imgforge::source::{decompress, Format};
    let file = CaseFile::new("image.comp");
    fuzz(Target {
        name: "compressed",
        corpus: compressed_corpus(),
        check: Box::new(move |data| {
            let path = file.write(data);
            let len = data.len() as u64;
            if let Some(size) = decompress::uncompressed_size(Format::Xz, path) {
                // A size comes only from a footer whose index fits in the file.
                let footer: [u8; 12] = data[data.len() - 12..].try_into().unwrap();
                let index = decompress::xz_index_len(&footer).ok_or("a size without a footer")?;
                if index + 24 > len {
                    return Err(format!("an index of {index} bytes in a {len}-byte file"));
                }
                // And when the whole stream decodes (the decoder checks the index at its end),
                // the size is what it decodes to.
                let mut reader = std::io::Read::take(decompress::decompressor(Format::Xz, data), MAX_DECODED_BYTES);
                if let Ok(decoded) = std::io::copy(&mut reader, &mut std::io::sink()) {
                    if decoded < MAX_DECODED_BYTES && decoded != size {
                        return Err(format!("the index says {size} bytes, the stream decodes to {decoded}"));
                    }
                }
            }
            if decompress::uncompressed_size(Format::Zstd, path).is_some()
                && !data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
                && !(data.len() >= 4 && data[0] & 0xf0 == 0x50 && data[1..4] == [0x2a, 0x4d, 0x18])
            {
                return Err("a zstd size without a zstd or skippable frame's magic".into());
            }
            Ok(())
        }),
    });
}

// ---- squashfs -------------------------------------------------------------------------------

fn squashfs_corpus() -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("LiveOS/sub")).unwrap();
    let data: Vec<u8> = (0..20_000u32).map(|i| (i / 3 % 253) as u8).collect();
    std::fs::write(tree.join("LiveOS/rootfs.img"), &data).unwrap();
    std::fs::write(tree.join("LiveOS/sub/small"), b"a fragment").unwrap();
    std::os::unix::fs::symlink("rootfs.img", tree.join("LiveOS/link")).unwrap();
    let mut corpus = Vec::new();
    for comp in ["gzip", "xz", "zstd", "lz4"] {
        sh(&format!("mksquashfs tree {comp}.img -comp {comp} -b 4K -noappend -quiet -no-progress"), dir.path());
        corpus.push(std::fs::read(dir.path().join(format!("{comp}.img"))).unwrap());
    }
    corpus
}

#[test]
fn squashfs_superblock_and_tables() {
    fuzz(Target {
        name: "squashfs",
        corpus: squashfs_corpus(),
        check: Box::new(|data| {
            let Ok(fs) = imgforge::source::squashfs::open(std::io::Cursor::new(data)) else { return Ok(()) };
            // The write path's parallel block reader preads the image through a descriptor.
            let mut image = tempfile::tempfile().map_err(|e| e.to_string())?;
            std::io::Write::write_all(&mut image, data).map_err(|e| e.to_string())?;
            for node in fs.files().take(64) {
                if let backhand::InnerNode::File(f) = &node.inner {
                    let copy = image.try_clone().map_err(|e| e.to_string())?;
                    if let Some(mut r) =
                        imgforge::source::squashfs_blocks::ParallelFile::new(&fs, f, copy, data.len() as u64, 2)
                    {
                        let (mut got, mut buf) = (0u64, vec![0u8; 256 << 10]);
                        while got <= MIB as u64 {
                            match imgforge::stream::ChunkReader::next(&mut r, &mut buf) {
                                Ok(imgforge::stream::Piece::Data(n)) => got += n as u64,
                                Ok(imgforge::stream::Piece::Hole(n)) => got = got.saturating_add(n),
                                Ok(imgforge::stream::Piece::End) | Err(_) => break,
                            }
                        }
                        if got > f.file_len() as u64 {
                            return Err(format!(
                                "{}: {got} bytes of a {}-byte file",
                                node.fullpath.display(),
                                f.file_len()
                            ));
                        }
                    }
                    // At most 1 MiB of each: a declared size is image data too.
                    let want = f.file_len().min(MIB);
                    let mut got = Vec::new();
                    let Ok(reader) = fs.file(f).reader_checked() else { continue };
                    if std::io::Read::read_to_end(&mut std::io::Read::take(reader, want as u64 + 1), &mut got).is_ok()
                        && got.len() > f.file_len()
                    {
                        return Err(format!(
                            "{}: read {} bytes of a {}-byte file",
                            node.fullpath.display(),
                            got.len(),
                            f.file_len()
                        ));
                    }
                }
            }
            Ok(())
        }),
    });
}

// ---- report lines ---------------------------------------------------------------------------

const SUCCESS_REPORT: &str = "PHASE rules-read 1840\nTASK-START 10-MountRoot\nWARNING 10-MountRoot \"no \\\"fstab\\\"\"\n\
TASK-END 10-MountRoot 412\nTASK-START 70-CheckPackages\nCHECK ok package-dnf \"rpm: 4.18\"\nCHECK fail fs-vda1 \"bad\"\n\
TASK-END 70-CheckPackages 9\nSUCCESS\n";

#[test]
fn report_lines() {
    use imgforge_protocol::report::{verdict_of, ReportLine, Verdict};
    let mut corpus: Vec<Vec<u8>> = SUCCESS_REPORT.lines().map(|l| l.as_bytes().to_vec()).collect();
    corpus.push(SUCCESS_REPORT.as_bytes().to_vec());
    corpus.push(b"TASK-START 50-Customize\nERROR 50-Customize \"it failed\\n\\u001b[2J\"\nSUCCESS\n".to_vec());
    fuzz(Target {
        name: "report",
        corpus,
        check: Box::new(|data| {
            let text = String::from_utf8_lossy(data);
            for line in text.split('\n') {
                if let Ok(parsed) = ReportLine::parse(line) {
                    let formatted = parsed.to_string();
                    if formatted.contains('\n') {
                        return Err(format!("{parsed:?} formats over two lines"));
                    }
                    if ReportLine::parse(&formatted).as_ref() != Ok(&parsed) {
                        return Err(format!("{line:?} -> {parsed:?} -> {formatted:?} does not parse back"));
                    }
                }
            }
            // A report is a success only with a complete SUCCESS line and no ERROR line.
            if verdict_of(data) == Verdict::Success {
                let lines: Vec<&str> = text.split('\n').collect();
                let complete = &lines[..lines.len() - 1];
                if !complete.iter().any(|l| l.trim_end_matches('\r') == "SUCCESS") {
                    return Err("a success without a complete SUCCESS line".into());
                }
                if complete.iter().any(|l| matches!(ReportLine::parse(l), Ok(ReportLine::Error { .. }))) {
                    return Err("a success despite an ERROR line".into());
                }
            }
            // Any cut of a success report before its last newline is not a success.
            let cut = data.len() % SUCCESS_REPORT.len();
            if verdict_of(&SUCCESS_REPORT.as_bytes()[..cut]) == Verdict::Success {
                return Err(format!("the success report cut at {cut} reads as a success"));
            }
            Ok(())
        }),
    });
}

// ---- rules ----------------------------------------------------------------------------------

fn rules_corpus() -> Vec<Vec<u8>> {
    use imgforge_protocol::rules::{Ipv6Mode, Nic, Operation, Rules};
    let mut full = Rules::new();
    full.operations = vec![
        Operation::Hostname { name: "web1".into() },
        Operation::Password { user: "root".into(), shadow_field: "$6$salt$hash".into() },
        Operation::Upload {
            payload_path: "uploads/1".into(),
            guest_path: "/etc/x".into(),
            file_name: "x".into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        },
        Operation::Write { path: "/etc/motd".into(), content: "hi\n\"there\"".into() },
        Operation::Chmod { mode: 0o600, path: "/etc/x".into() },
        Operation::RunCommand { command: "echo 'a b' > /tmp/x".into() },
        Operation::Network {
            nics: vec![Nic {
                mac: "aa:00:00:77:5e:a9".into(),
                ipv4: Some("192.0.2.10/24".into()),
                gateway4: None,
                dhcp4: false,
                ipv6: Ipv6Mode::Slaac,
            }],
            network_manager: true,
        },
    ];
    full.excluded_tasks = vec!["selinuxrelabel".into()];
    full.root_partition = Some("/dev/vda1".into());
    full.rpms = vec!["a.rpm".into()];
    let mut verify = Rules::new();
    verify.verify = true;
    verify.required_packages = vec!["dnf".into()];
    vec![Rules::new().to_json().into_bytes(), full.to_json().into_bytes(), verify.to_json().into_bytes()]
}

#[test]
fn rules_documents() {
    use imgforge_protocol::rules::Rules;
    fuzz(Target {
        name: "rules",
        corpus: rules_corpus(),
        check: Box::new(|data| {
            let Ok(rules) = Rules::from_json(&String::from_utf8_lossy(data)) else { return Ok(()) };
            match Rules::from_json(&rules.to_json()) {
                Ok(again) if again == rules => Ok(()),
                other => Err(format!("{rules:?} does not come back from its JSON: {other:?}")),
            }
        }),
    });
}

// ---- Ganeti parameters ----------------------------------------------------------------------

/// Ganeti's environment as text, `KEY=value` a line (values need no escape here).
const GANETI_ENV: &str = "OSP_IMG_ID=debian-12.img\nOSP_IMG_FORMAT=diskdump\nOSP_IMG_PASSWD=s3cret\n\
OSP_IMG_PROPERTIES={\"ROOT_PARTITION\": 1, \"USERS\": \"root user\", \"EXCLUDE_TASK_SELINUXRELABEL\": \"yes\", \"OSFAMILY\": \"linux\"}\n\
OSP_IMG_PERSONALITY=[{\"path\": \"/etc/x\", \"contents\": \"aGk=\", \"owner\": \"root\", \"group\": \"root\", \"mode\": 384}]\n\
OSP_AUTH_KEYS=ssh-ed25519 AAAA test\nNIC_COUNT=1\nNIC_0_MAC=aa:00:00:77:5e:a9\nNIC_0_IP=192.0.2.10\n\
NIC_0_NETWORK_SUBNET=192.0.2.0/24\nNIC_0_NETWORK_GATEWAY=192.0.2.1\n";

#[test]
fn ganeti_parameters() {
    use imgforge::ganeti::params;
    fuzz(Target {
        name: "ganeti",
        corpus: vec![GANETI_ENV.as_bytes().to_vec()],
        check: Box::new(|data| {
            let env: BTreeMap<String, String> = String::from_utf8_lossy(data)
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            if let Ok(p) = params::parse(&env) {
                if let Some(n) = p.properties.get("ROOT_PARTITION") {
                    let plain = !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit());
                    if !plain || !(1..=128).contains(&n.parse::<u32>().unwrap_or(0)) {
                        return Err(format!("ROOT_PARTITION {n:?} accepted"));
                    }
                }
                if let Some((f, _)) = p.personality.iter().find(|(f, _)| f.mode > 0o7777 || !f.path.starts_with('/')) {
                    return Err(format!("personality file {:?} mode {:o} accepted", f.path, f.mode));
                }
            }
            if let Ok(nics) = imgforge::ganeti::nics::nics(&env, &Default::default()) {
                if nics.len() > 64 {
                    return Err(format!("{} NICs", nics.len()));
                }
                for nic in &nics {
                    let prefix = nic.ipv4.as_deref().and_then(|a| a.split_once('/')).map(|(_, p)| p);
                    if prefix.is_some_and(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
                        return Err(format!("address {:?} accepted", nic.ipv4));
                    }
                }
            }
            Ok(())
        }),
    });
}
