//! `cargo xtask bench customize --upload-mib N[,N..]`: the cost that grows with the bytes. For
//! each size, the same operations as `bench customize` with an N MiB upload of incompressible
//! bytes, by imgforge (median of RUNS) and virt-customize (once: a minute or more a run),
//! every guest's copy compared byte for byte; then each tool's cost per extra MB between the
//! smallest size and each larger one, and the ratios.

use crate::sparse_copy;
use crate::{
    bench_operations, ensure_virt_customize, imgforge, median, timed, virt_customize, warmed_peers, KEY, PASSWORD, RUNS,
};
use anyhow::{ensure, Context, Result};
use imgforge_tests::fixtures::{self, Shape};
use imgforge_tests::readback::{shadow_field, Mount};
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Where the guests receive the upload.
const GUEST_PATH: &str = "/opt/bench-upload.bin";

/// Writes `mib` MiB of incompressible bytes (xorshift, seeded by the size) to `path`.
fn write_payload(path: &Path, mib: u64) -> Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ mib;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        crate::xorshift_fill(&mut block, &mut x);
        out.write_all(&block)?;
    }
    out.flush()?;
    Ok(())
}

/// True when the two files hold the same bytes (read a MiB at a time).
fn same_bytes(a: &Path, b: &Path) -> Result<bool> {
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

fn verify(img: &Path, payload: &Path, tool: &str) -> Result<()> {
    let root = Mount::partition(img, 1)?;
    ensure!(root.read("/etc/hostname")?.trim() == "bench1", "{tool}: hostname not set");
    let hash = shadow_field(&root.read("/etc/shadow")?, "root")?;
    ensure!(imgforge_tests::readback::password_matches(PASSWORD, &hash), "{tool}: root password does not verify");
    ensure!(root.read("/root/.ssh/authorized_keys")?.contains(KEY), "{tool}: key not injected");
    ensure!(same_bytes(&root.join(GUEST_PATH), payload)?, "{tool}: {GUEST_PATH} differs from the upload");
    ensure!(root.read("/root/command-ran")?.trim() == "bench1", "{tool}: run-command did not run");
    Ok(())
}

/// Parses `1,256,1024` (sorted, at least one size).
pub fn parse_sizes(text: &str) -> Result<Vec<u64>> {
    let mut sizes: Vec<u64> = text
        .split(',')
        .map(|s| s.trim().parse::<u64>().with_context(|| format!("--upload-mib: {s:?} is not a number of MiB")))
        .collect::<Result<_>>()?;
    ensure!(!sizes.is_empty() && sizes.iter().all(|&n| n > 0), "--upload-mib wants sizes of 1 MiB or more");
    sizes.sort_unstable();
    sizes.dedup();
    Ok(sizes)
}

/// Runs the benchmark for `sizes` (MiB).
pub fn run(sizes: &[u64]) -> Result<()> {
    fixtures::require_root();
    let imgforge = imgforge()?;
    ensure_virt_customize()?;
    let work = tempfile::tempdir_in("/var/tmp")?;
    let fixture = fixtures::disk(Shape::GptXfsBoot)?;
    println!(
        "fixture: {} ({} MiB, GPT, XFS root, ext4 /boot)",
        fixture.display(),
        std::fs::metadata(&fixture)?.len() >> 20
    );
    let copy = |name: &str| sparse_copy(&fixture, work.path().join(name));
    let env = warmed_peers(&imgforge, work.path(), &fixture)?;
    let virt = |img: &Path| virt_customize(&env, img);

    let mut rows = Vec::new();
    for &mib in sizes {
        let payload = work.path().join(format!("upload-{mib}.bin"));
        write_payload(&payload, mib)?;
        let ops = bench_operations(&format!("{}:{GUEST_PATH}", payload.display()));
        let mut ours = Vec::new();
        for _ in 0..RUNS {
            let a = copy("imgforge.img")?;
            ours.push(timed(
                Command::new(&imgforge)
                    .args(["customize", "--accel", "tcg", "--progress", "none", "-a"])
                    .arg(&a)
                    .args(&ops),
            )?);
            verify(&a, &payload, "imgforge")?;
            std::fs::remove_file(&a)?;
        }
        let b = copy("virt-customize.img")?;
        let t_virt = timed(virt(&b).args(&ops))?;
        verify(&b, &payload, "virt-customize")?;
        std::fs::remove_file(&b)?;
        std::fs::remove_file(&payload)?;
        let t_ours = median(&ours);
        let runs = ours.iter().map(|d| format!("{:.2}", d.as_secs_f64())).collect::<Vec<_>>().join(" ");
        println!(
            "upload {mib:>5} MiB: imgforge {:>7.2} s (median of {RUNS}: {runs})   virt-customize {:>7.2} s (once)   {:>5.2}x",
            t_ours.as_secs_f64(),
            t_virt.as_secs_f64(),
            t_virt.as_secs_f64() / t_ours.as_secs_f64()
        );
        rows.push((mib, t_ours, t_virt));
    }
    report(&rows);
    Ok(())
}

/// The summary: per size, both times and the ratio; per larger size, each tool's cost per
/// extra MB (1 MB = 10^6 bytes) over the smallest size, as ms/MB and MB/s.
fn report(rows: &[(u64, Duration, Duration)]) {
    println!("\nsize MiB   imgforge s   virt-customize s   virt/imgforge");
    for (mib, ours, virt) in rows {
        println!(
            "{mib:>8}   {:>10.2}   {:>16.2}   {:>12.2}x",
            ours.as_secs_f64(),
            virt.as_secs_f64(),
            virt.as_secs_f64() / ours.as_secs_f64()
        );
    }
    let Some((base_mib, base_ours, base_virt)) = rows.first() else { return };
    for (mib, ours, virt) in &rows[1..] {
        let extra_mb = (mib - base_mib) as f64 * 1.048_576;
        let per = |t: &Duration, base: &Duration| (t.as_secs_f64() - base.as_secs_f64()) / extra_mb;
        let (p_ours, p_virt) = (per(ours, base_ours), per(virt, base_virt));
        println!(
            "extra {extra_mb:>7.1} MB ({base_mib} -> {mib} MiB): imgforge {:.2} ms/MB ({:.0} MB/s), virt-customize {:.2} ms/MB ({:.0} MB/s); imgforge's cost per MB is {:.2}x virt-customize's",
            p_ours * 1000.0,
            1.0 / p_ours,
            p_virt * 1000.0,
            1.0 / p_virt,
            p_ours / p_virt
        );
    }
}
