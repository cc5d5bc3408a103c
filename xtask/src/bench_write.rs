//! `cargo xtask bench write`: imgforge write against dd (snf-image's way) and the best
//! qemu-img setting, onto a direct-I/O loop device pre-filled with 0xff, caches dropped
//! before every run, best of three; then liveimg and xz sources against their shell pipelines.

use anyhow::{ensure, Context, Result};
use imgforge_tests::fixtures::{self, sh};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const RUNS: usize = 3;

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
        for b in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            b.copy_from_slice(&state.to_le_bytes());
        }
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

    /// Fills the device with 0xff, as a disk that held something else.
    fn dirty(&self, size: u64) -> Result<()> {
        sh(Command::new("sh").arg("-c").arg(format!(
            "head -c {size} /dev/zero | tr '\\0' '\\377' | dd of={} bs=4M oflag=direct iflag=fullblock status=none",
            self.dev
        )))?;
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

/// Best wall time of `RUNS` runs of `script` (a shell command line), each on a dirty target with
/// cold caches, checking the target afterwards against `expect` (first `len` bytes).
fn best_of(lo: &Loop, len: u64, expect: &Path, script: &str) -> Result<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..RUNS {
        lo.dirty(len)?;
        drop_caches()?;
        let started = Instant::now();
        sh(Command::new("sh").arg("-c").arg(script))?;
        best = best.min(started.elapsed());
        let same = Command::new("cmp").args(["-n", &len.to_string()]).arg(expect).arg(&lo.dev).status()?.success();
        ensure!(same, "after `{script}` the target differs from the image");
    }
    Ok(best)
}

fn row(name: &str, t: Duration, reference: Duration) {
    println!(
        "  {name:<44} {:>7.2} s   imgforge is {:>5.2}x faster",
        t.as_secs_f64(),
        t.as_secs_f64() / reference.as_secs_f64()
    );
}

pub fn run(imgforge: &Path) -> Result<()> {
    fixtures::require_root();
    let raw = raw_image()?;
    let size = std::fs::metadata(&raw)?.len();
    let lo = Loop::new(size + 64 * MIB)?;
    let dev = lo.dev.clone();
    let img = raw.display();
    let ours =
        |src: &Path| format!("{} write --progress none --image '{}' --target {dev}", imgforge.display(), src.display());

    println!("raw image {img}: 2 GiB (1 GiB data, 256 MiB written zeros, 768 MiB hole) onto {dev} (loop, direct-io, pre-filled with 0xff); cold cache, best of {RUNS}");
    let t_ours = best_of(&lo, size, &raw, &ours(&raw))?;
    let t_dd =
        best_of(&lo, size, &raw, &format!("dd if='{img}' of={dev} bs=1M oflag=direct conv=notrunc status=none"))?;
    let t_qemu = best_of(&lo, size, &raw, &format!("qemu-img convert -f raw -O raw -t none -W -m 8 -n '{img}' {dev}"))?;
    println!("  {:<44} {:>7.2} s", "imgforge write", t_ours.as_secs_f64());
    row("dd bs=1M oflag=direct conv=notrunc", t_dd, t_ours);
    row("qemu-img convert -t none -W -m 8 -n -O raw", t_qemu, t_ours);

    let live = fixtures::liveimg("xz")?;
    let fs = fixtures::rootfs_ext4()?;
    let fs_len = std::fs::metadata(&fs)?.len();
    println!("liveimg {} (xz squashfs, {} MiB rootfs.img)", live.display(), fs_len >> 20);
    let t_ours = best_of(&lo, fs_len, &fs, &ours(&live))?;
    let t_peer = best_of(
        &lo,
        fs_len,
        &fs,
        &format!(
            "unsquashfs -cat '{}' LiveOS/rootfs.img | dd of={dev} bs=1M oflag=direct iflag=fullblock status=none",
            live.display()
        ),
    )?;
    println!("  {:<44} {:>7.2} s", "imgforge write", t_ours.as_secs_f64());
    row("unsquashfs -cat | dd oflag=direct", t_peer, t_ours);

    let xz = xz_image()?;
    let disk = fixtures::disk(fixtures::Shape::DosExt4)?;
    let disk_len = std::fs::metadata(&disk)?.len();
    println!("xz image {} ({} MiB raw OS disk)", xz.display(), disk_len >> 20);
    let t_ours = best_of(&lo, disk_len, &disk, &ours(&xz))?;
    let t_peer = best_of(
        &lo,
        disk_len,
        &disk,
        &format!("xz -dc '{}' | dd of={dev} bs=1M oflag=direct iflag=fullblock status=none", xz.display()),
    )?;
    println!("  {:<44} {:>7.2} s", "imgforge write", t_ours.as_secs_f64());
    row("xz -dc | dd oflag=direct", t_peer, t_ours);
    Ok(())
}
