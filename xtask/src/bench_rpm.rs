//! `cargo xtask bench rpm [COUNT [MIB_EACH]]`: a package payload. COUNT RPMs (50 by default)
//! of MIB_EACH MiB (6) of incompressible data each, built with rpmbuild (zstd payload), installed
//! into the RPM fixture (grown by 1 GiB on the host first, the bench's own copy, so that
//! virt-customize has room for the uploaded files too) by imgforge's `--install-rpm` (median of
//! RUNS, `-v`: its phase table printed) and by virt-customize, which has no offline RPM option:
//! the same files `--upload`ed and installed by `--run-command 'rpm -i …'` (once). Both guests
//! are checked: every package known to rpm, every installed file byte for byte.

use crate::sparse_copy;
use crate::{ensure_virt_customize, imgforge, median, timed, virt_customize, warmed_peers, RUNS};
use anyhow::{ensure, Context, Result};
use imgforge_tests::fixtures::{self, sh, Shape};
use imgforge_tests::readback::Mount;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Where the virt-customize run puts the RPMs in the guest before `rpm -i`.
const GUEST_RPM_DIR: &str = "/var/tmp/bench-rpms";

fn name(i: usize) -> String {
    format!("bench-payload-{i:03}")
}

/// Builds `count` RPMs of `mib` MiB each into `out`; returns their paths.
fn build_rpms(top: &Path, out: &Path, count: usize, mib: u64) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(top.join("SOURCES"))?;
    std::fs::create_dir_all(out)?;
    let mut rpms = Vec::new();
    for i in 0..count {
        let n = name(i);
        let data = top.join(format!("SOURCES/{n}.bin"));
        let mut f = std::io::BufWriter::new(std::fs::File::create(&data)?);
        let mut x: u64 = 0x2545_F491_4F6C_DD1D ^ (i as u64 + 1);
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..mib {
            crate::xorshift_fill(&mut block, &mut x);
            f.write_all(&block)?;
        }
        f.flush()?;
        let spec = top.join(format!("{n}.spec"));
        std::fs::write(
            &spec,
            format!(
                "Name: {n}\nVersion: 1.0\nRelease: 1\nSummary: imgforge bench payload\nLicense: MIT\nBuildArch: noarch\nAutoReqProv: no\n\
                 %description\nimgforge bench payload.\n\
                 %install\nmkdir -p %{{buildroot}}/opt/bench-rpm\ncp {} %{{buildroot}}/opt/bench-rpm/{n}.bin\n\
                 %files\n/opt/bench-rpm/{n}.bin\n",
                data.display()
            ),
        )?;
        imgforge_tests::rpm::rpmbuild(top, &spec, "w3.zstdio").with_context(|| format!("rpmbuild {n}"))?;
        let file = format!("{n}-1.0-1.noarch.rpm");
        std::fs::rename(top.join("RPMS/noarch").join(&file), out.join(&file))?;
        rpms.push(out.join(&file));
    }
    Ok(rpms)
}

/// A copy of the RPM fixture with its disk, partition and ext4 filesystem 1 GiB larger.
fn grown_fixture(dir: &Path) -> Result<PathBuf> {
    let img = fixtures::copy(Shape::RpmDosExt4, dir)?;
    let len = std::fs::metadata(&img)?.len();
    std::fs::OpenOptions::new().write(true).open(&img)?.set_len(len + (1 << 30))?;
    let mut sfdisk = Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel", "-N", "1"])
        .arg(&img)
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    sfdisk.stdin.take().context("sfdisk stdin")?.write_all(b", +\n")?;
    ensure!(sfdisk.wait()?.success(), "sfdisk could not grow partition 1 of {}", img.display());
    let part = imgforge_tests::readback::partitions(&img)?[0];
    let dev = sh(Command::new("losetup")
        .args(["--show", "-f", "-o"])
        .arg(part.offset.to_string())
        .arg("--sizelimit")
        .arg(part.size.to_string())
        .arg(&img))?;
    let dev = dev.trim();
    let grown = sh(Command::new("e2fsck").args(["-fy", dev])).and_then(|_| sh(Command::new("resize2fs").arg(dev)));
    sh(Command::new("losetup").args(["-d", dev]))?;
    grown?;
    Ok(img)
}

fn verify(img: &Path, rpms_data: &Path, count: usize, tool: &str) -> Result<()> {
    let root = Mount::partition(img, 0)?;
    let names: Vec<String> = (0..count).map(name).collect();
    let q = Command::new("chroot").arg(root.path()).arg("rpm").arg("-q").args(&names).output()?;
    ensure!(q.status.success(), "{tool}: rpm -q does not know every package: {}", String::from_utf8_lossy(&q.stdout));
    for n in &names {
        let got = std::fs::read(root.join(&format!("/opt/bench-rpm/{n}.bin")))?;
        let want = std::fs::read(rpms_data.join(format!("SOURCES/{n}.bin")))?;
        ensure!(got == want, "{tool}: /opt/bench-rpm/{n}.bin differs");
    }
    ensure!(!root.join(GUEST_RPM_DIR).exists(), "{tool}: {GUEST_RPM_DIR} left behind");
    Ok(())
}

/// Runs the benchmark.
pub fn run(count: usize, mib: u64) -> Result<()> {
    fixtures::require_root();
    ensure!(count > 0 && mib > 0, "COUNT and MIB_EACH must be at least 1");
    let imgforge = imgforge()?;
    ensure_virt_customize()?;
    let work = tempfile::tempdir_in("/var/tmp")?;
    let top = work.path().join("rpmbuild");
    let started = Instant::now();
    let rpms = build_rpms(&top, &work.path().join("rpms"), count, mib)?;
    let total: u64 = rpms.iter().map(|r| std::fs::metadata(r).map(|m| m.len()).unwrap_or(0)).sum();
    println!(
        "{count} RPMs of {mib} MiB incompressible data each, {:.1} MB of RPM files (built in {:.1} s)",
        total as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    let base_dir = work.path().join("base");
    std::fs::create_dir_all(&base_dir)?;
    let base = grown_fixture(&base_dir)?;
    let copy = |n: &str| sparse_copy(&base, work.path().join(n));
    let env = warmed_peers(&imgforge, work.path(), &base)?;
    let virt = |img: &Path| virt_customize(&env, img);

    let mut ours = Vec::new();
    let mut table = String::new();
    for _ in 0..RUNS {
        let a = copy("imgforge.img")?;
        let mut cmd = Command::new(&imgforge);
        cmd.args(["customize", "-v", "--accel", "tcg", "--progress", "none", "-a"]).arg(&a);
        for r in &rpms {
            cmd.arg("--install-rpm").arg(r);
        }
        let t0 = Instant::now();
        let out = cmd.output()?;
        ours.push(t0.elapsed());
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.success(), "imgforge failed: {stderr}");
        table = phase_lines(&stderr);
        verify(&a, &top, count, "imgforge")?;
        std::fs::remove_file(&a)?;
    }
    let b = copy("virt-customize.img")?;
    let mut cmd = virt(&b);
    cmd.args(["--mkdir", GUEST_RPM_DIR]);
    for r in &rpms {
        cmd.arg("--upload").arg(format!("{}:{GUEST_RPM_DIR}/", r.display()));
    }
    cmd.args(["--run-command", &format!("rpm -i {GUEST_RPM_DIR}/*.rpm && rm -rf {GUEST_RPM_DIR}")]);
    let t_virt = timed(&mut cmd)?;
    verify(&b, &top, count, "virt-customize")?;
    let t_ours: Duration = median(&ours);
    let runs = ours.iter().map(|d| format!("{:.2}", d.as_secs_f64())).collect::<Vec<_>>().join(" ");
    println!("imgforge --install-rpm x{count}       {:>7.2} s   (median of {RUNS}: {runs})", t_ours.as_secs_f64());
    println!("virt-customize --upload + rpm -i   {:>7.2} s   (once)", t_virt.as_secs_f64());
    println!("ratio (virt/imgforge)              {:>7.2}x", t_virt.as_secs_f64() / t_ours.as_secs_f64());
    println!("imgforge's last run, where the time went:\n{table}");
    Ok(())
}

/// The phase table and the host-side timings from `imgforge -v`'s log.
fn phase_lines(stderr: &str) -> String {
    let mut keep = false;
    let mut out = String::new();
    for line in stderr.lines() {
        if line.starts_with("helper VM phases:") {
            keep = true;
        }
        let timing = line.contains("changes committed") || line.contains("task=60-InstallPackages");
        if keep || timing {
            out.push_str(line);
            out.push('\n');
        }
        if line.contains("qemu exited") {
            keep = false;
        }
    }
    out
}
