//! `cargo xtask bench ganeti OLD_IMGFORGE [RUNS]`: Ganeti's `create` of the 2 GiB GPT+XFS
//! fixture onto an 8 GiB file disk, under TCG, by this tree's imgforge and by `OLD_IMGFORGE`
//! (an imgforge built from another commit, such as the one before the grow and clone-hygiene
//! work), each through its own installed OS definition and run as Ganeti runs it (emptied
//! environment, cwd the OS directory). One warm-up each (builds its helper image), then RUNS
//! (default 3) alternating pairs on fresh disks; every time is printed with the load average,
//! and the medians compared. Each result is read back: the root partition's end.
//!
//! `--cluster`: the same image through the whole `gnt-instance add` of a real single-node Ganeti
//! cluster (`tests/ganeti/bench.sh`, in namespaces of its own), both builds installed as two OS
//! definitions of it, so Ganeti's own work (locks, jobs, disk creation) is in both times.

use crate::sparse_copy;
use anyhow::{ensure, Context, Result};
use imgforge_tests::fixtures::{self, sh, Shape};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const DISK_BYTES: u64 = 8 << 30;

struct Side {
    name: &'static str,
    os_dir: PathBuf,
    config: PathBuf,
    cache: PathBuf,
    times: Vec<Duration>,
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn install(imgforge: &Path, work: &Path, name: &'static str, images: &Path) -> Result<Side> {
    let dir = work.join(name);
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("imgforge.default");
    std::fs::write(
        &config,
        format!("IMAGE_DIR={}\nACCEL=tcg\nHELPER_SOFT_TIMEOUT=900\nHELPER_HARD_TIMEOUT=10\n", images.display()),
    )?;
    let os = dir.join("os");
    sh(Command::new(imgforge)
        .args(["ganeti", "install-os", "--os-dir"])
        .arg(&os)
        .env("IMGFORGE_GANETI_CONFIG", &config))?;
    let base = std::env::var_os("IMGFORGE_CACHE_DIR").map(PathBuf::from).unwrap_or_else(|| "/var/tmp".into());
    Ok(Side {
        name,
        os_dir: os.join("imgforge"),
        config,
        cache: base.join(format!("bench-ganeti-{name}")),
        times: Vec::new(),
    })
}

/// One `create` of a fresh 8 GiB disk; returns its time and the root partition's end.
fn create(side: &Side, disks: &Path, run: &str) -> Result<(Duration, u64)> {
    let disk = disks.join(format!("{}-{run}.disk0", side.name));
    std::fs::File::create(&disk)?.set_len(DISK_BYTES)?;
    let started = Instant::now();
    let out = Command::new(side.os_dir.join("create"))
        .env_clear()
        .env("PATH", "/sbin:/bin:/usr/sbin:/usr/bin")
        .env("OS_API_VERSION", "20")
        .env("OS_NAME", "imgforge")
        .env("OS_VARIANT", "default")
        .env("DISK_COUNT", "1")
        .env("IMGFORGE_GANETI_CONFIG", &side.config)
        .env("IMGFORGE_CACHE_DIR", &side.cache)
        .env("INSTANCE_NAME", format!("bench-{run}.example.com"))
        .env("DISK_0_PATH", &disk)
        .env("OSP_IMG_ID", "gpt-xfs-boot")
        .env("OSP_IMG_FORMAT", "diskdump")
        .env("OSP_IMG_PASSWD", "Bench-Pw-1")
        .current_dir(&side.os_dir)
        .output()?;
    let took = started.elapsed();
    ensure!(
        out.status.success(),
        "{} create {run}: {}\n{}",
        side.name,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let parts = imgforge_tests::readback::partitions(&disk)?;
    let end = parts.iter().map(|p| p.offset + p.size).max().context("no partitions")?;
    std::fs::remove_file(&disk)?;
    Ok((took, end))
}

/// Runs the benchmark of `new` (this tree's release imgforge) against `old`.
pub fn run(new: &Path, old: &Path, runs: usize) -> Result<()> {
    fixtures::require_root();
    let work = tempfile::Builder::new().prefix("bench-ganeti-").tempdir_in("/var/tmp")?;
    let images = work.path().join("images");
    std::fs::create_dir_all(&images)?;
    let fixture = fixtures::disk(Shape::GptXfsBoot)?;
    sparse_copy(&fixture, images.join("gpt-xfs-boot.img"))?;
    let image_bytes = std::fs::metadata(&fixture)?.len();
    let disks = work.path().join("disks");
    std::fs::create_dir_all(&disks)?;
    let mut sides = [install(old, work.path(), "before", &images)?, install(new, work.path(), "after", &images)?];
    println!(
        "gnt-instance add's create: {} ({} MiB, GPT, XFS root, ext4 /boot) onto an {} GiB file disk, TCG",
        fixture.display(),
        image_bytes >> 20,
        DISK_BYTES >> 30
    );
    println!("before: {}\nafter:  {}", old.display(), new.display());
    for side in &sides {
        let (t, end) = create(side, &disks, "warm")?;
        println!(
            "warm-up {:<6} {:>7.2} s  root ends at {:>5} MiB  (load {})",
            side.name,
            t.as_secs_f64(),
            end >> 20,
            load()
        );
    }
    for i in 0..runs {
        // Alternate which goes first, so a load that drifts favours neither.
        let order: [usize; 2] = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for s in order {
            let side = &mut sides[s];
            let before = load();
            let (t, end) = create(side, &disks, &i.to_string())?;
            println!(
                "run {i} {:<6} {:>7.2} s  root ends at {:>5} MiB  (load before {before}, after {})",
                side.name,
                t.as_secs_f64(),
                end >> 20,
                load()
            );
            side.times.push(t);
        }
    }
    let (b, a) = (crate::median(&sides[0].times), crate::median(&sides[1].times));
    println!(
        "median before {:>7.2} s   after {:>7.2} s   (after/before {:.2}x, of {runs} runs each)",
        b.as_secs_f64(),
        a.as_secs_f64(),
        a.as_secs_f64() / b.as_secs_f64()
    );
    Ok(())
}

/// The times `bench.sh` printed for `os` (`ADD os run ms end load…`), warm-up apart.
fn cluster_times(stdout: &str, os: &str) -> Vec<Duration> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("ADD "))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() >= 3 && f[0] == os && f[1] != "warm")
        .filter_map(|f| f[2].parse().ok().map(Duration::from_millis))
        .collect()
}

/// Runs `gnt-instance add` of the 2 GiB fixture onto an 8 GiB disk with `new` and `old`.
pub fn run_cluster(new: &Path, old: &Path, runs: usize) -> Result<()> {
    fixtures::require_root();
    let work = tempfile::Builder::new().prefix("bench-ganeti-").tempdir_in("/var/tmp")?;
    let images = work.path().join("images");
    let disks = work.path().join("disks");
    std::fs::create_dir_all(&images)?;
    std::fs::create_dir_all(&disks)?;
    let fixture = fixtures::disk(Shape::GptXfsBoot)?;
    sparse_copy(&fixture, images.join("gpt-xfs-boot.img"))?;
    println!(
        "gnt-instance add -t file --disk 0:size=8192 of {} ({} MiB, GPT, XFS root) on a single-node cluster, TCG",
        fixture.display(),
        std::fs::metadata(&fixture)?.len() >> 20
    );
    println!(
        "before (imgforgeold): {}
after (imgforge):     {}",
        old.display(),
        new.display()
    );
    let script = crate::workspace().join("tests/ganeti/bench.sh");
    let out = Command::new("unshare")
        .args(["--net", "--uts", "--mount", "--pid", "--fork", "--mount-proc"])
        .arg(&script)
        .args([new, old, &images])
        .arg("gpt-xfs-boot")
        .arg(&disks)
        .arg(runs.to_string())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in stdout.lines().filter(|l| l.starts_with("ADD ")) {
        println!("{line}");
    }
    ensure!(
        out.status.success() && stdout.contains("BENCH-DONE"),
        "the cluster benchmark failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let (before, after) = (cluster_times(&stdout, "imgforgeold"), cluster_times(&stdout, "imgforge"));
    ensure!(!before.is_empty() && before.len() == after.len(), "bench.sh printed no comparable times:\n{stdout}");
    let (b, a) = (crate::median(&before), crate::median(&after));
    println!(
        "median gnt-instance add: before {:>7.2} s   after {:>7.2} s   (after/before {:.2}x, of {runs} runs each)",
        b.as_secs_f64(),
        a.as_secs_f64(),
        a.as_secs_f64() / b.as_secs_f64()
    );
    Ok(())
}
