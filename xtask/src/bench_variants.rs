//! `cargo xtask bench variants [N]`: N variants (16 by default: a 4 × 4 matrix of hostname and
//! key, each with a 1 MB upload and a run-command) of the GPT/XFS fixture, made three ways on
//! this machine: the variants engine (several variants a helper boot, two boots side by side),
//! N sequential `imgforge customize` runs on copies, and virt-customize on 2 copies, its time
//! scaled to N (said so in the output). Every output is verified with the bench's own mounts.

use crate::sparse_copy;
use anyhow::{ensure, Context, Result};
use imgforge::job::variants::{customize_variants, BaseCheck, OutputFormat, VariantBase, VariantJob};
use imgforge::job::{KnownFormat, VmSettings};
use imgforge_tests::fixtures::{self, sh, Shape};
use imgforge_tests::readback::Mount;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Side-by-side helper VMs of the engine (the machine has two cores).
const JOBS: usize = 2;
/// virt-customize runs this many variants; its time is scaled to N.
const VIRT_RUNS: usize = 2;

/// The options of variant `i`.
fn ops(i: usize, payload: &Path) -> Vec<(String, String)> {
    let (site, role) = (["ath", "ber", "cdg", "dub"][i / 4 % 4], ["web", "db", "mq", "ci"][i % 4]);
    vec![
        ("hostname".into(), format!("{site}-{role}-{i}")),
        ("ssh-inject".into(), format!("root:string:{}", key(i))),
        ("upload".into(), format!("{}:/opt/", payload.display())),
        ("run-command".into(), "cat /etc/hostname > /root/command-ran".into()),
    ]
}

fn key(i: usize) -> String {
    format!("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBenchVariantKey{i:04}0000000000000000000000000 v{i}@imgforge")
}

fn verify(img: &Path, i: usize, payload: &[u8], tool: &str) -> Result<()> {
    let root = Mount::partition(img, 1)?;
    let hostname = ops(i, Path::new("x"))[0].1.clone();
    ensure!(root.read("/etc/hostname")?.trim() == hostname, "{tool} variant {i}: hostname not set");
    ensure!(root.read("/root/.ssh/authorized_keys")?.contains(&key(i)), "{tool} variant {i}: key not injected");
    ensure!(std::fs::read(root.join("/opt/bench-payload.bin"))? == payload, "{tool} variant {i}: upload differs");
    ensure!(root.read("/root/command-ran")?.trim() == hostname, "{tool} variant {i}: run-command did not run");
    Ok(())
}

/// Runs the benchmark with `n` variants.
pub fn run(imgforge: &Path, n: usize) -> Result<()> {
    fixtures::require_root();
    let work = tempfile::tempdir()?;
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    let payload_file = work.path().join("bench-payload.bin");
    std::fs::write(&payload_file, &payload)?;
    let base = fixtures::copy(Shape::GptXfsBoot, work.path())?;
    println!(
        "fixture: {} ({} MiB, GPT, XFS root, ext4 /boot), {n} variants",
        base.display(),
        std::fs::metadata(&base)?.len() >> 20
    );
    // Warm the helper image outside the timing.
    let warm = fixtures::copy(Shape::GptXfsBoot, &work.path().join("warm-dir").tap_mkdir()?)?;
    sh(Command::new(imgforge)
        .args(["customize", "--accel", "tcg", "--progress", "none", "-a"])
        .arg(&warm)
        .args(["--hostname", "warm"]))?;
    std::fs::remove_file(&warm)?;

    // The engine: four builds, each checking the base's SHA-256 (the recipe's, known here
    // first) beside its helper VMs, as `imgforge build` does. Cold: no digests of the base's
    // files kept from an earlier build; warm: those the cold build kept; thin: warm, with qcow2
    // outputs backed by the base; thin cold: thin with no digests kept.
    let started = Instant::now();
    let base_sha256 = base_digest(&base)?;
    let t_base_digest = started.elapsed();
    let kept = imgforge::job::variants::kept_digests_path(&base_sha256).context("base digest")?;
    // IMGFORGE_BENCH_ROWS=thin-cold,cold,... runs only those engine rows (profiling one).
    let rows_wanted = std::env::var("IMGFORGE_BENCH_ROWS").ok();
    let wanted = |label: &str| rows_wanted.as_deref().is_none_or(|w| w.split(',').any(|r| r.trim() == label));
    let mut engine_rows = Vec::new();
    for (label, what, format, keep) in [
        ("cold", "raw outputs, no digests kept (cold)", OutputFormat::Raw, false),
        ("warm", "raw outputs, digests kept (warm)", OutputFormat::Raw, true),
        ("thin", "qcow2 outputs backed by the base, warm", OutputFormat::Qcow2Backed, true),
        ("thin-cold", "qcow2 outputs backed by the base, cold", OutputFormat::Qcow2Backed, false),
    ] {
        if !wanted(label) {
            continue;
        }
        if !keep {
            let _ = std::fs::remove_file(&kept);
        }
        ensure!(!keep || kept.exists(), "the {label} row needs the digests a cold build keeps: run the cold row first");
        let t = engine(&base, &base_sha256, n, &payload_file, &payload, work.path(), label, format)?;
        ensure!(kept.exists(), "the {label} build kept no digests of the base at {}", kept.display());
        engine_rows.push((what, t));
    }
    if std::env::var_os("IMGFORGE_BENCH_ENGINE_ONLY").is_some() {
        for &(what, t) in &engine_rows {
            println!("variants engine, {what}  {:>8.1} s", t.as_secs_f64());
        }
        return Ok(());
    }

    // Sequential imgforge customize runs on copies (the copy is part of each run's time).
    let seq = work.path().join("sequential").tap_mkdir()?;
    let started = Instant::now();
    let mut copies = Vec::new();
    for i in 0..n {
        let img = seq.join(format!("v{i}.raw"));
        sparse_copy(&base, &img)?;
        let mut args: Vec<String> = vec![
            "customize".into(),
            "--accel".into(),
            "tcg".into(),
            "--progress".into(),
            "none".into(),
            "-a".into(),
            img.display().to_string(),
        ];
        for (option, value) in ops(i, &payload_file) {
            args.push(format!("--{option}"));
            args.push(value);
        }
        sh(Command::new(imgforge).args(&args))?;
        copies.push(img);
    }
    let t_sequential = started.elapsed();
    for (i, img) in copies.iter().enumerate() {
        verify(img, i, &payload, "sequential imgforge")?;
    }

    let t_virt = virt_customize(&base, &payload_file, &payload, work.path(), n.min(VIRT_RUNS))?;
    let per = |d: Duration| d.as_secs_f64() / n as f64;
    println!(
        "base SHA-256 alone {:.1} s (checked beside the helper VMs in every engine time below)",
        t_base_digest.as_secs_f64()
    );
    for &(what, t) in &engine_rows {
        println!("engine ({JOBS} VMs), {what:<40} {:>8.1} s  ({:.1} s a variant)", t.as_secs_f64(), per(t));
    }
    println!(
        "{n} sequential imgforge customize on copies           {:>8.1} s  ({:.1} s a variant)",
        t_sequential.as_secs_f64(),
        per(t_sequential)
    );
    let scaled = t_virt.map(|(runs, t)| {
        let scaled = t.as_secs_f64() / runs as f64 * n as f64;
        println!(
            "virt-customize, {runs} runs scaled to {n}                 {scaled:>8.1} s  ({:.1} s a variant)",
            scaled / n as f64
        );
        scaled
    });
    for (what, t) in engine_rows {
        let t = t.as_secs_f64();
        print!("ratios for {what:<40} sequential/engine {:>5.1}x", t_sequential.as_secs_f64() / t);
        match scaled {
            Some(v) => println!("   virt-customize/engine {:>5.1}x", v / t),
            None => println!(),
        }
    }
    Ok(())
}

/// The SHA-256 of the base file (its holes hashed from memory, as `imgforge build` does).
fn base_digest(base: &Path) -> Result<String> {
    imgforge::file_digest::sha256_of_file(&std::fs::File::open(base)?, &Default::default())
        .map_err(|e| anyhow::anyhow!("hashing the base: {e:?}"))
}

/// One engine build of `n` variants of `base` into `work/<label>` in `format`, every output
/// verified and removed: its time.
#[allow(clippy::too_many_arguments)]
fn engine(
    base: &Path,
    base_sha256: &str,
    n: usize,
    payload_file: &Path,
    payload: &[u8],
    work: &Path,
    label: &str,
    format: OutputFormat,
) -> Result<Duration> {
    let out = work.join(label).tap_mkdir()?;
    let ext = if format == OutputFormat::Raw { "raw" } else { "qcow2" };
    let variants: Vec<VariantJob> = (0..n)
        .map(|i| {
            let mut plan = imgforge::ops::Plan::default();
            for (option, value) in ops(i, payload_file) {
                plan.add(&option, Some(&value)).map_err(|e| anyhow::anyhow!("--{option}: {e}"))?;
            }
            plan.finish()?;
            Ok(VariantJob {
                name: format!("v{i}"),
                plan,
                output: out.join(format!("v{i}.{ext}")),
                format,
                source_date_epoch: None,
            })
        })
        .collect::<Result<_>>()?;
    let mut settings = VmSettings::tcg(Duration::from_secs(900));
    settings.show_console = std::env::var_os("IMGFORGE_BENCH_CONSOLE").is_some();
    let (_tx, interrupt) = tokio::sync::watch::channel(None);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (verdict, check) = BaseCheck::pending();
    let variant_base = VariantBase {
        path: base.to_owned(),
        format: KnownFormat::FromHeader,
        sha256: Some(base_sha256.to_owned()),
        check: Some(check),
    };
    let started = Instant::now();
    let checking = async {
        let path = base.to_owned();
        let actual = tokio::task::spawn_blocking(move || base_digest(&path)).await?;
        let passed = actual.as_ref().is_ok_and(|a| a == base_sha256);
        let _ = verdict.send(Some(if passed { Ok(()) } else { Err("the base's SHA-256 does not match".into()) }));
        ensure!(passed, "the base's SHA-256 changed: {actual:?}");
        anyhow::Ok(())
    };
    let (checked, outcomes) = runtime.block_on(async {
        tokio::join!(
            checking,
            customize_variants(&variant_base, variants, JOBS, &settings, &imgforge::progress::Silent, &interrupt)
        )
    });
    let elapsed = started.elapsed();
    checked?;
    for (i, outcome) in outcomes.iter().enumerate() {
        let product = outcome.result.as_ref().map_err(|e| anyhow::anyhow!("{label} {}: {e}", outcome.name))?;
        let kept = std::fs::metadata(&product.output).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)?;
        if i == 0 {
            println!("engine {label} output v0: {} MiB allocated", kept >> 20);
        }
        if format == OutputFormat::Raw {
            verify(&product.output, i, payload, label)?;
        } else {
            let raw = out.join("check.raw");
            sh(Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&product.output).arg(&raw))?;
            verify(&raw, i, payload, label)?;
            std::fs::remove_file(&raw)?;
        }
        // Sixteen 2 GiB outputs do not all fit beside the sequential copies on a small disk.
        std::fs::remove_file(&product.output)?;
    }
    println!("engine {label}: {:.1} s, {n} outputs verified", elapsed.as_secs_f64());
    Ok(elapsed)
}

/// virt-customize on `runs` copies, when it is installed: (runs, time).
fn virt_customize(
    base: &Path,
    payload_file: &Path,
    payload: &[u8],
    work: &Path,
    runs: usize,
) -> Result<Option<(usize, Duration)>> {
    if !Command::new("virt-customize").arg("--version").output().is_ok_and(|o| o.status.success()) {
        println!("virt-customize is not installed: `cargo xtask bench customize` installs it; skipped");
        return Ok(None);
    }
    let dir = work.join("virt").tap_mkdir()?;
    // A host without a kernel of its own lends supermin the helper's; libguestfs's appliance
    // is built (or found cached) by a run outside the timing, as imgforge's helper image is.
    let env = crate::supermin_kernel(work)?;
    let warm = sparse_copy(base, dir.join("warm.raw"))?;
    sh(crate::virt_customize(&env, &warm).args(["--hostname", "warm"])).context("virt-customize (warming)")?;
    std::fs::remove_file(&warm)?;
    let mut total = Duration::ZERO;
    for i in 0..runs {
        let img = dir.join(format!("v{i}.raw"));
        sparse_copy(base, &img)?;
        let mut c = crate::virt_customize(&env, &img);
        for (option, value) in ops(i, payload_file) {
            c.arg(format!("--{option}")).arg(value);
        }
        let started = Instant::now();
        sh(&mut c).context("virt-customize")?;
        total += started.elapsed();
        verify(&img, i, payload, "virt-customize")?;
    }
    Ok(Some((runs, total)))
}

/// A directory made on the way.
trait TapMkdir: Sized {
    fn tap_mkdir(self) -> Result<PathBuf>;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> Result<PathBuf> {
        std::fs::create_dir_all(&self)?;
        Ok(self)
    }
}
