//! `cargo xtask bench write [KIND...]`: imgforge write against dd (snf-image's way) and the
//! best qemu-img setting, and against this machine's limit measured in the same run, onto a
//! direct-I/O loop device pre-filled with 0xff, caches dropped before every timed run, runs
//! interleaved (one of each contestant per round), best of [`RUNS`]. Kinds: raw, qcow2, xz,
//! liveimg (default: all).
//!
//! The limit of a source is the slowest of the stages any writer must go through, each timed
//! alone: a cold read of the source file's data (its allocated extents, caches dropped), for
//! compressed sources a warm decode to nowhere, and an O_DIRECT write of the image's bytes from
//! memory onto the same device: the same 4 MiB ranges imgforge writes as data, the ranges it
//! treats as zeros zeroed with BLKZEROOUT (what imgforge does on a device), then a flush. Each
//! stage is run in the ways that might be fastest (one stream, and several requests in flight;
//! the decodes on every core: `xz -T0` on the multi-block xz made here, `unsquashfs` with its
//! one thread per processor) and its best time kept. A pipelined writer overlaps the stages,
//! so it cannot beat the slowest; nor can it beat the read and the write running at once with
//! no dependency between them (here the source and the target share one disk, so they
//! compete). The limit is the largest of these times; the ratio printed is imgforge's time
//! over it.

use anyhow::{bail, ensure, Context, Result};
use imgforge::stream::buffer::{is_zero, AlignedBuf};
use imgforge_tests::fixtures::{self, sh};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// Rounds (`IMGFORGE_BENCH_RUNS` overrides).
const RUNS: usize = 3;
/// The unit the limit reads and writes in: imgforge's buffer size.
const PIECE_BYTES: u64 = imgforge::stream::CHUNK_BYTES as u64;
/// Requests in flight when a stage is measured with several.
const LIMIT_THREADS: usize = 4;
const BLKZEROOUT: libc::c_ulong = 0x127f;
/// The read and the write at once, the read done each way the read stage is (threads, name).
const BOTH: [(usize, &str); 2] =
    [(1, "read and write at once (1 buffered stream)"), (LIMIT_THREADS, "read and write at once (4 O_DIRECT reads)")];
const KINDS: [&str; 4] = ["raw", "qcow2", "xz", "liveimg"];

fn bench_dir() -> PathBuf {
    PathBuf::from("/var/tmp/imgforge-bench")
}

/// 2 GiB: 1 GiB of incompressible data, 256 MiB of written zeros, 768 MiB of hole.
fn raw_image() -> Result<PathBuf> {
    let path = bench_dir().join("bench-2g.raw");
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(bench_dir())?;
    let tmp = bench_dir().join("bench-2g.raw.tmp");
    let f = std::fs::File::create(&tmp)?;
    f.set_len(2048 * MIB)?;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut block = vec![0u8; MIB as usize];
    for i in 0..1024u64 {
        crate::xorshift_fill(&mut block, &mut state);
        f.write_all_at(&block, i * MIB)?;
    }
    let zeros = vec![0u8; MIB as usize];
    for i in 1024..1280u64 {
        f.write_all_at(&zeros, i * MIB)?;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// The raw image as an uncompressed qcow2 (its zeros and hole unallocated, as qemu-img makes it).
fn qcow2_image(raw: &Path) -> Result<PathBuf> {
    let path = bench_dir().join("bench-2g.qcow2");
    if !path.exists() {
        let tmp = bench_dir().join("bench-2g.qcow2.tmp");
        sh(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(raw).arg(&tmp))?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(path)
}

fn xz_image() -> Result<PathBuf> {
    let path = bench_dir().join("os-disk.raw.xz");
    if !path.exists() {
        let disk = fixtures::disk(fixtures::Shape::DosExt4)?;
        sh(Command::new("sh").arg("-c").arg(format!(
            "xz -T0 -6 -c < '{}' > '{}.tmp' && mv '{}.tmp' '{}'",
            disk.display(),
            path.display(),
            path.display(),
            path.display()
        )))?;
    }
    Ok(path)
}

struct Loop {
    dev: String,
    backing: PathBuf,
}

impl Loop {
    fn new(size: u64) -> Result<Self> {
        let backing = bench_dir().join("loop-target");
        let f = std::fs::File::create(&backing)?;
        f.set_len(size)?;
        let dev =
            sh(Command::new("losetup").args(["--find", "--show", "--direct-io=on"]).arg(&backing))?.trim().to_owned();
        Ok(Self { dev, backing })
    }

    /// Fills the first `size` bytes of the device with 0xff, as a disk that held something else.
    fn dirty(&self, size: u64) -> Result<()> {
        let file = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(&self.dev)?;
        let mut ff = AlignedBuf::new(PIECE_BYTES as usize);
        ff.as_mut_full().fill(0xff);
        ff.len = ff.capacity();
        let pieces = size.div_ceil(PIECE_BYTES) as usize;
        in_flight(pieces, LIMIT_THREADS, &|_, i| {
            let offset = i as u64 * PIECE_BYTES;
            let n = (size - offset).min(PIECE_BYTES).div_ceil(4096) * 4096;
            file.write_all_at(&ff.data()[..n as usize], offset)
        })?;
        file.sync_all()?;
        Ok(())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        let _ = std::fs::remove_file(&self.backing);
    }
}

fn drop_caches() -> Result<()> {
    sh(&mut Command::new("sync"))?;
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache (needs root)")
}

/// The allocated extents of `file` (SEEK_DATA/SEEK_HOLE), cut into pieces of at most
/// [`PIECE_BYTES`].
fn data_pieces(file: &std::fs::File) -> Result<Vec<(u64, u64)>> {
    let len = file.metadata()?.len();
    let seek = |pos: u64, whence| {
        // SAFETY: lseek on a descriptor `file` owns.
        let r = unsafe { libc::lseek(file.as_raw_fd(), pos as i64, whence) };
        if r < 0 {
            len
        } else {
            (r as u64).min(len)
        }
    };
    let mut pieces = Vec::new();
    let mut pos = 0;
    while pos < len {
        let start = seek(pos, libc::SEEK_DATA);
        if start >= len {
            break;
        }
        let end = seek(start, libc::SEEK_HOLE).max(start + 1);
        let mut at = start;
        while at < end {
            let n = (end - at).min(PIECE_BYTES);
            pieces.push((at, n));
            at += n;
        }
        pos = end;
    }
    Ok(pieces)
}

/// The image as imgforge writes it: its data pieces, in memory, and the ranges it zeroes.
struct ImageMap {
    data: Vec<(u64, AlignedBuf)>,
    zeros: Vec<(u64, u64)>,
}

impl ImageMap {
    fn of(image: &Path) -> Result<Self> {
        let file = std::fs::File::open(image)?;
        let len = file.metadata()?.len();
        ensure!(len % 4096 == 0, "{}: not a whole number of 4 KiB blocks", image.display());
        let mut data = Vec::new();
        let mut zeros: Vec<(u64, u64)> = Vec::new();
        let mut zero = |offset: u64, n: u64| match zeros.last_mut() {
            Some((o, l)) if *o + *l == offset => *l += n,
            _ => zeros.push((offset, n)),
        };
        let mut pos = 0;
        for (offset, n) in data_pieces(&file)? {
            if offset > pos {
                zero(pos, offset - pos);
            }
            let mut buf = AlignedBuf::new(n as usize);
            buf.len = n as usize;
            file.read_exact_at(&mut buf.as_mut_full()[..n as usize], offset)?;
            if is_zero(buf.data()) {
                zero(offset, n);
            } else {
                data.push((offset, buf));
            }
            pos = offset + n;
        }
        if pos < len {
            zero(pos, len - pos);
        }
        Ok(Self { data, zeros })
    }

    fn data_bytes(&self) -> u64 {
        self.data.iter().map(|(_, b)| b.len as u64).sum()
    }
}

/// Runs `op(thread, index)` on every index below `n` from `threads` threads, each taking the
/// next index.
fn in_flight(n: usize, threads: usize, op: &(dyn Fn(usize, usize) -> std::io::Result<()> + Sync)) -> Result<()> {
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|thread| {
                let next = &next;
                s.spawn(move || -> std::io::Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return Ok(());
                        }
                        op(thread, i)?;
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("worker")?;
        }
        Ok(())
    })
}

/// Cold read of `source`'s allocated bytes, `threads` requests in flight (O_DIRECT) or one
/// buffered stream read ahead by the kernel (`threads` = 1).
fn read_stage(source: &Path, threads: usize) -> Result<Duration> {
    drop_caches()?;
    read_cold(source, threads)
}

/// [`read_stage`] without dropping the caches first.
fn read_cold(source: &Path, threads: usize) -> Result<Duration> {
    let probe = std::fs::File::open(source)?;
    let pieces = data_pieces(&probe)?;
    let flags = if threads > 1 { libc::O_DIRECT } else { 0 };
    let file = std::fs::OpenOptions::new().read(true).custom_flags(flags).open(source)?;
    let started = Instant::now();
    let per_thread: Vec<std::sync::Mutex<AlignedBuf>> =
        (0..threads).map(|_| std::sync::Mutex::new(AlignedBuf::new(PIECE_BYTES as usize))).collect();
    in_flight(pieces.len(), threads, &|thread, i| {
        let (offset, n) = pieces[i];
        let mut buf = per_thread[thread].lock().expect("buffer");
        // O_DIRECT reads whole blocks: a short tail is read rounded up, which ends at EOF.
        let want = (n as usize).div_ceil(4096) * 4096;
        let mut got = 0;
        while got < n as usize {
            let r = file.read_at(&mut buf.as_mut_full()[got..want], offset + got as u64)?;
            if r == 0 {
                break;
            }
            got += r;
        }
        Ok(())
    })?;
    Ok(started.elapsed())
}

/// O_DIRECT write of `map` from memory onto `dev` with `threads` writes in flight, its zero
/// ranges zeroed with BLKZEROOUT, then a flush.
fn write_stage(dev: &str, map: &ImageMap, threads: usize) -> Result<Duration> {
    let file = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(dev)?;
    let started = Instant::now();
    for (offset, len) in &map.zeros {
        let range: [u64; 2] = [*offset, *len];
        // SAFETY: BLKZEROOUT reads two u64 from `range`, alive across the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKZEROOUT, &range) };
        ensure!(rc == 0, "BLKZEROOUT on {dev}: {}", std::io::Error::last_os_error());
    }
    in_flight(map.data.len(), threads, &|_, i| {
        let (offset, buf) = &map.data[i];
        file.write_all_at(buf.data(), *offset)
    })?;
    file.sync_all()?;
    Ok(started.elapsed())
}

/// The cold read and the write from memory at once, with no dependency between them: on a
/// machine whose source and target share a disk (or a bus) they compete, and no pipelined
/// writer can beat this.
fn both_stages(source: &Path, dev: &str, map: &ImageMap, read_threads: usize) -> Result<Duration> {
    drop_caches()?;
    let started = Instant::now();
    std::thread::scope(|s| {
        let reader = s.spawn(|| read_cold(source, read_threads));
        write_stage(dev, map, LIMIT_THREADS)?;
        reader.join().expect("reader")?;
        Ok(started.elapsed())
    })
}

/// One source to write and what to compare imgforge with.
struct Case {
    kind: String,
    title: String,
    source: PathBuf,
    /// The raw image the target must hold afterwards.
    expected: PathBuf,
    /// Decodes the source to /dev/null (warm), for compressed sources.
    decode: Option<(String, String)>,
    peers: Vec<(String, String)>,
}

/// What each contestant's best time was.
struct Best(Vec<(String, Duration)>);

impl Best {
    fn record(&mut self, name: &str, t: Duration) {
        match self.0.iter_mut().find(|(n, _)| n == name) {
            Some((_, best)) => *best = (*best).min(t),
            None => self.0.push((name.to_owned(), t)),
        }
    }

    fn get(&self, name: &str) -> Duration {
        self.0.iter().find(|(n, _)| n == name).map(|(_, t)| *t).unwrap_or(Duration::MAX)
    }
}

/// Times `script` (a shell command line) on a dirty target with cold caches, then checks the
/// target against the expected image.
fn timed_write(lo: &Loop, len: u64, expect: &Path, script: &str) -> Result<Duration> {
    lo.dirty(len)?;
    drop_caches()?;
    let started = Instant::now();
    sh(Command::new("sh").arg("-c").arg(script))?;
    let t = started.elapsed();
    verify(lo, len, expect, script)?;
    Ok(t)
}

fn verify(lo: &Loop, len: u64, expect: &Path, what: &str) -> Result<()> {
    let same = Command::new("cmp").args(["-n", &len.to_string()]).arg(expect).arg(&lo.dev).status()?.success();
    ensure!(same, "after `{what}` the target differs from the image");
    Ok(())
}

fn runs() -> usize {
    std::env::var("IMGFORGE_BENCH_RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(RUNS)
}

fn secs(t: Duration) -> f64 {
    t.as_secs_f64()
}

fn run_case(case: &Case, lo: &Loop, imgforge: &Path) -> Result<()> {
    let len = std::fs::metadata(&case.expected)?.len();
    let map = ImageMap::of(&case.expected)?;
    let source_data: u64 = data_pieces(&std::fs::File::open(&case.source)?)?.iter().map(|(_, n)| n).sum();
    println!("{}", case.title);
    println!(
        "  image {} MiB: {} MiB written as data, {} MiB zeroed; source file {} MiB allocated",
        len >> 20,
        map.data_bytes() >> 20,
        (len - map.data_bytes()) >> 20,
        source_data >> 20
    );
    let ours =
        format!("{} write --progress none --image '{}' --target {}", imgforge.display(), case.source.display(), lo.dev);
    // IMGFORGE_BENCH_BASELINE: another build run beside this one (before/after numbers).
    let baseline = std::env::var_os("IMGFORGE_BENCH_BASELINE").map(|bin| {
        format!(
            "{} write --progress none --image '{}' --target {}",
            Path::new(&bin).display(),
            case.source.display(),
            lo.dev
        )
    });
    let read_names = ["read: 1 buffered stream".to_owned(), format!("read: {LIMIT_THREADS} O_DIRECT in flight")];
    let write_names = ["write: 1 in flight".to_owned(), format!("write: {LIMIT_THREADS} in flight")];
    let mut best = Best(Vec::new());
    if let Some((_, decode)) = &case.decode {
        sh(Command::new("sh").arg("-c").arg(decode))?;
    }
    let runs = runs();
    for round in 0..runs {
        for (name, threads) in read_names.iter().zip([1, LIMIT_THREADS]) {
            best.record(name, read_stage(&case.source, threads)?);
        }
        if let Some((name, decode)) = &case.decode {
            let started = Instant::now();
            sh(Command::new("sh").arg("-c").arg(decode))?;
            best.record(name, started.elapsed());
        }
        for (name, threads) in write_names.iter().zip([1, LIMIT_THREADS]) {
            lo.dirty(len)?;
            drop_caches()?;
            best.record(name, write_stage(&lo.dev, &map, threads)?);
            verify(lo, len, &case.expected, name)?;
        }
        for (threads, name) in BOTH {
            lo.dirty(len)?;
            best.record(name, both_stages(&case.source, &lo.dev, &map, threads)?);
            verify(lo, len, &case.expected, name)?;
        }
        best.record("imgforge write", timed_write(lo, len, &case.expected, &ours)?);
        if let Some(baseline) = &baseline {
            best.record("imgforge write (baseline build)", timed_write(lo, len, &case.expected, baseline)?);
        }
        for (name, script) in &case.peers {
            best.record(name, timed_write(lo, len, &case.expected, script)?);
        }
        eprintln!("  (round {} of {runs} done)", round + 1);
    }
    let read = best.get(&read_names[0]).min(best.get(&read_names[1]));
    let write = best.get(&write_names[0]).min(best.get(&write_names[1]));
    let decode = case.decode.as_ref().map(|(name, _)| best.get(name));
    let both = BOTH.iter().map(|(_, name)| best.get(name)).min().unwrap_or_default();
    let limit = read.max(write).max(decode.unwrap_or_default()).max(both);
    let line = |name: &str, t: Duration, note: String| println!("  {name:<52} {:>6.2} s  {note}", secs(t));
    for name in read_names.iter().chain(&write_names) {
        line(name, best.get(name), String::new());
    }
    if let (Some((name, _)), Some(t)) = (&case.decode, decode) {
        line(name, t, String::new());
    }
    for (_, name) in BOTH {
        line(name, best.get(name), String::new());
    }
    line(
        "limit = max(read, decode, write, read and write at once)",
        limit,
        format!("(read + decode + write: {:.2} s)", secs(read + write + decode.unwrap_or_default())),
    );
    let t_ours = best.get("imgforge write");
    line("imgforge write", t_ours, format!("{:.2}x the limit", secs(t_ours) / secs(limit)));
    let baseline_name = baseline.as_ref().map(|_| "imgforge write (baseline build)".to_owned());
    for name in baseline_name.iter().chain(case.peers.iter().map(|(name, _)| name)) {
        let t = best.get(name);
        line(
            name,
            t,
            format!("{:.2}x the limit; imgforge {:.2}x faster", secs(t) / secs(limit), secs(t) / secs(t_ours)),
        );
    }
    Ok(())
}

fn cases(imgforge_kinds: &[&str], dev: &str) -> Result<Vec<Case>> {
    let mut out = Vec::new();
    for kind in imgforge_kinds {
        out.push(match *kind {
            "raw" => {
                let raw = raw_image()?;
                let img = raw.display();
                Case {
                    kind: kind.to_string(),
                    title: format!("raw image {img}: 2 GiB (1 GiB data, 256 MiB written zeros, 768 MiB hole)"),
                    source: raw.clone(),
                    expected: raw.clone(),
                    decode: None,
                    peers: vec![
                        (
                            "dd bs=1M oflag=direct conv=notrunc".into(),
                            format!("dd if='{img}' of={dev} bs=1M oflag=direct conv=notrunc status=none"),
                        ),
                        (
                            "qemu-img convert -t none -W -m 8 -n -O raw".into(),
                            format!("qemu-img convert -f raw -O raw -t none -W -m 8 -n '{img}' {dev}"),
                        ),
                    ],
                }
            }
            "qcow2" => {
                let raw = raw_image()?;
                let qcow2 = qcow2_image(&raw)?;
                let img = qcow2.display();
                Case {
                    kind: kind.to_string(),
                    title: format!("qcow2 image {img}: the raw image's data, uncompressed qcow2 (read in Rust)"),
                    source: qcow2.clone(),
                    expected: raw,
                    decode: None,
                    peers: vec![(
                        "qemu-img convert -t none -W -m 8 -n -O raw".into(),
                        format!("qemu-img convert -f qcow2 -O raw -t none -W -m 8 -n '{img}' {dev}"),
                    )],
                }
            }
            "xz" => {
                let xz = xz_image()?;
                let disk = fixtures::disk(fixtures::Shape::DosExt4)?;
                let img = xz.display();
                Case {
                    kind: kind.to_string(),
                    title: format!(
                        "xz image {img} ({} MiB raw OS disk)",
                        std::fs::metadata(&disk)?.len() >> 20
                    ),
                    source: xz.clone(),
                    expected: disk,
                    decode: Some(("decode: xz -dc -T0 > /dev/null (warm, all cores)".into(), format!("xz -dc -T0 '{img}' > /dev/null"))),
                    peers: vec![(
                        "xz -dc | dd oflag=direct".into(),
                        format!("xz -dc '{img}' | dd of={dev} bs=1M oflag=direct iflag=fullblock status=none"),
                    )],
                }
            }
            "liveimg" => {
                let live = fixtures::liveimg("xz")?;
                let fs = fixtures::rootfs_ext4()?;
                let img = live.display();
                Case {
                    kind: kind.to_string(),
                    title: format!(
                        "liveimg {img} (xz squashfs, {} MiB rootfs.img)",
                        std::fs::metadata(&fs)?.len() >> 20
                    ),
                    source: live.clone(),
                    expected: fs,
                    decode: Some((
                        "decode: unsquashfs -cat > /dev/null (warm, all cores)".into(),
                        format!("unsquashfs -cat '{img}' LiveOS/rootfs.img > /dev/null"),
                    )),
                    peers: vec![(
                        "unsquashfs -cat | dd oflag=direct".into(),
                        format!(
                            "unsquashfs -cat '{img}' LiveOS/rootfs.img | dd of={dev} bs=1M oflag=direct iflag=fullblock status=none"
                        ),
                    )],
                }
            }
            other => bail!("unknown kind {other}: choose among {}", KINDS.join(", ")),
        });
    }
    Ok(out)
}

pub fn run(imgforge: &Path, kinds: &[String]) -> Result<()> {
    fixtures::require_root();
    let kinds: Vec<&str> = if kinds.is_empty() { KINDS.to_vec() } else { kinds.iter().map(String::as_str).collect() };
    std::fs::create_dir_all(bench_dir())?;
    let lo = Loop::new(2048 * MIB + 64 * MIB)?;
    println!(
        "onto {} (loop, direct-io, pre-filled with 0xff); caches dropped before each timed run; rounds interleaved, best of {}",
        lo.dev,
        runs()
    );
    println!("limit: the slowest of: a cold read of the source's data, a warm decode, an O_DIRECT write of the image from memory, each alone; and that read and write running at once");
    for case in cases(&kinds, &lo.dev)? {
        let need = std::fs::metadata(&case.expected)?.len();
        ensure!(need <= 2048 * MIB, "{}: the image is larger than the bench target", case.kind);
        run_case(&case, &lo, imgforge)?;
    }
    Ok(())
}
