//! `cargo xtask bench customize`: imgforge against virt-customize, same fixture, same
//! operations, every result verified; virt-customize runs once, the bare helper boot and the
//! imgforge customization three times each, alternating (their medians are compared); prints
//! every time and the ratios. `cargo xtask bench ganeti OLD_IMGFORGE [RUNS]`: Ganeti's create,
//! this tree's imgforge against another build (`bench_ganeti.rs`); with `--cluster`, the whole
//! `gnt-instance add` on a real single-node cluster. `cargo xtask bench customize --upload-mib
//! 1,256,1024`: the cost per uploaded MB (`bench_upload.rs`). `cargo xtask bench rpm [COUNT
//! [MIB_EACH]]`: an RPM set installed (`bench_rpm.rs`). `cargo xtask bench variants [N]`: many
//! variants of one base (`bench_variants.rs`).

use anyhow::{bail, ensure, Context, Result};
use imgforge_tests::fixtures::{self, sh, Shape};
use imgforge_tests::readback::{shadow_field, Mount};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod bench_ganeti;
mod bench_rpm;
mod bench_upload;
mod bench_variants;
mod bench_write;

pub(crate) const PASSWORD: &str = "Bench-Pw-1";
pub(crate) const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBenchKeyOfImgforge000000000000000000000000 bench@imgforge";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["bench", "customize"] => bench_customize(),
        ["bench", "customize", "--upload-mib", sizes] => bench_upload::run(&bench_upload::parse_sizes(sizes)?),
        ["bench", "rpm", rest @ ..] if rest.len() <= 2 => {
            let n = rest.first().map(|r| r.parse()).transpose().context("COUNT must be a number")?;
            let mib = rest.get(1).map(|r| r.parse()).transpose().context("MIB must be a number")?;
            bench_rpm::run(n.unwrap_or(50), mib.unwrap_or(6))
        }
        ["bench", "write", kinds @ ..] => {
            // IMGFORGE_BENCH_BIN: another build (an older one, for before/after numbers).
            let bin = match std::env::var_os("IMGFORGE_BENCH_BIN") {
                Some(bin) => PathBuf::from(bin),
                None => imgforge()?,
            };
            bench_write::run(&bin, &kinds.iter().map(|k| k.to_string()).collect::<Vec<_>>())
        }
        ["bench", "liveimg"] => bench_liveimg(),
        ["bench", "ganeti", "--cluster", old, rest @ ..] if rest.len() <= 1 => {
            let runs = rest.first().map(|r| r.parse()).transpose().context("RUNS must be a number")?;
            bench_ganeti::run_cluster(&imgforge()?, Path::new(old), runs.unwrap_or(RUNS))
        }
        ["bench", "variants", rest @ ..] if rest.len() <= 1 => {
            let n = rest.first().map(|r| r.parse()).transpose().context("N must be a number")?;
            bench_variants::run(&imgforge()?, n.unwrap_or(16))
        }
        ["bench", "ganeti", old, rest @ ..] if rest.len() <= 1 => {
            let runs = rest.first().map(|r| r.parse()).transpose().context("RUNS must be a number")?;
            bench_ganeti::run(&imgforge()?, Path::new(old), runs.unwrap_or(RUNS))
        }
        _ => bail!(
            "usage: cargo xtask bench customize [--upload-mib N[,N..]]|rpm [COUNT [MIB_EACH]]|write [raw|qcow2|xz|liveimg]...|liveimg|variants [N]|ganeti [--cluster] OLD_IMGFORGE [RUNS]"
        ),
    }
}

/// `dst`, made a sparse copy of `src` (`cp --sparse=always`): a benchmark's fresh image.
fn sparse_copy(src: impl AsRef<Path>, dst: impl Into<PathBuf>) -> Result<PathBuf> {
    let dst = dst.into();
    sh(Command::new("cp").arg("--sparse=always").arg(src.as_ref()).arg(&dst))?;
    Ok(dst)
}

/// The environment virt-customize runs in (`supermin_kernel`), after both tools' caches
/// (imgforge's helper image, libguestfs's appliance) were warmed outside the timing by a run of
/// each on a throwaway copy of `base` made in `work`.
fn warmed_peers(imgforge: &Path, work: &Path, base: &Path) -> Result<Vec<(String, String)>> {
    let env = supermin_kernel(work)?;
    let img = sparse_copy(base, work.join("warm.img"))?;
    sh(Command::new(imgforge).args(["customize", "--accel", "tcg", "-a"]).arg(&img).args(["--hostname", "warm"]))?;
    sh(virt_customize(&env, &img).args(["--hostname", "warm"]))?;
    std::fs::remove_file(&img)?;
    Ok(env)
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// The release imgforge, freshly built, or the binary `IMGFORGE_BIN` names (another build, for
/// before-and-after numbers).
fn imgforge() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("IMGFORGE_BIN") {
        return Ok(PathBuf::from(bin));
    }
    sh(Command::new("cargo").args(["build", "--release", "--quiet", "-p", "imgforge"]).current_dir(workspace()))?;
    Ok(workspace().join("target/release/imgforge"))
}

/// libguestfs-tools, installed on demand (only the benchmark needs it).
fn ensure_virt_customize() -> Result<()> {
    if Command::new("virt-customize").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    sh(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends", "libguestfs-tools"])
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("installing libguestfs-tools")?;
    Ok(())
}

/// Fills `block` (a multiple of 8 bytes) with xorshift64 words from `state`, advancing it: the
/// benchmarks' incompressible bytes.
fn xorshift_fill(block: &mut [u8], state: &mut u64) {
    for word in block.chunks_exact_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        word.copy_from_slice(&state.to_le_bytes());
    }
}

/// The operations `bench customize` times, with `--upload UPLOAD`.
fn bench_operations(upload: &str) -> Vec<String> {
    vec![
        "--hostname".into(),
        "bench1".into(),
        "--root-password".into(),
        format!("password:{PASSWORD}"),
        "--ssh-inject".into(),
        format!("root:string:{KEY}"),
        "--upload".into(),
        upload.into(),
        "--run-command".into(),
        "cat /etc/hostname > /root/command-ran".into(),
    ]
}

/// virt-customize on the raw image `img`, forced to TCG, with `env` (supermin's kernel, from
/// [`supermin_kernel`]).
fn virt_customize(env: &[(String, String)], img: &Path) -> Command {
    let mut c = Command::new("virt-customize");
    c.args(["-q", "--format", "raw", "-a"])
        .arg(img)
        .envs(env.iter().cloned())
        .env("LIBGUESTFS_BACKEND", "direct")
        .env("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg");
    c
}

/// supermin needs a kernel; hosts without one in /boot get the helper's Debian kernel package.
fn supermin_kernel(work: &Path) -> Result<Vec<(String, String)>> {
    if std::fs::read_dir("/boot")
        .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-")))
        .unwrap_or(false)
    {
        return Ok(Vec::new());
    }
    let built = sh(Command::new(imgforge()?).args(["helper-image", "build"]))?;
    let deb = built
        .lines()
        .find_map(|l| l.trim().strip_prefix("package "))
        .map(PathBuf::from)
        .context("`imgforge helper-image build` named no kernel package")?;
    let tree = work.join("kernel");
    std::fs::create_dir_all(&tree)?;
    sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    let release = std::fs::read_dir(tree.join("lib/modules"))?
        .flatten()
        .next()
        .context("no modules in the kernel package")?
        .file_name()
        .to_string_lossy()
        .into_owned();
    sh(Command::new("depmod").arg("-b").arg(&tree).arg(&release))?;
    // supermin lstat()s the host's /lib/modules even when pointed elsewhere.
    std::fs::create_dir_all("/lib/modules")?;
    Ok(vec![
        ("SUPERMIN_KERNEL".into(), tree.join(format!("boot/vmlinuz-{release}")).display().to_string()),
        ("SUPERMIN_MODULES".into(), tree.join(format!("lib/modules/{release}")).display().to_string()),
        ("SUPERMIN_KERNEL_VERSION".into(), release),
    ])
}

fn timed(cmd: &mut Command) -> Result<Duration> {
    let started = Instant::now();
    sh(cmd)?;
    Ok(started.elapsed())
}

fn verify(img: &Path, payload: &[u8], tool: &str) -> Result<()> {
    let root = Mount::partition(img, 1)?;
    ensure!(root.read("/etc/hostname")?.trim() == "bench1", "{tool}: hostname not set");
    // virt-customize picks the guest's default (yescrypt on Debian 12): check with libcrypt.
    let hash = shadow_field(&root.read("/etc/shadow")?, "root")?;
    ensure!(imgforge_tests::readback::password_matches(PASSWORD, &hash), "{tool}: root password does not verify");
    ensure!(root.read("/root/.ssh/authorized_keys")?.contains(KEY), "{tool}: key not injected");
    ensure!(std::fs::read(root.join("/opt/bench-payload.bin"))? == payload, "{tool}: upload differs");
    ensure!(root.read("/root/command-ran")?.trim() == "bench1", "{tool}: run-command did not run after --hostname");
    Ok(())
}

fn bench_customize() -> Result<()> {
    fixtures::require_root();
    let imgforge = imgforge()?;
    ensure_virt_customize()?;
    let work = tempfile::tempdir()?;
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    let payload_file = work.path().join("bench-payload.bin");
    std::fs::write(&payload_file, &payload)?;
    let ops = |_: &str| -> Vec<String> { bench_operations(&format!("{}:/opt/", payload_file.display())) };
    let fixture = fixtures::disk(Shape::GptXfsBoot)?;
    println!(
        "fixture: {} ({} MiB, GPT, XFS root, ext4 /boot)",
        fixture.display(),
        std::fs::metadata(&fixture)?.len() >> 20
    );

    let env = warmed_peers(&imgforge, work.path(), &fixture)?;
    let virt = |img: &Path| virt_customize(&env, img);

    // The helper runs take about two seconds and vary by a tenth or two on these machines: the
    // bare boot and the customization alternate RUNS times, each on a fresh copy, and the
    // medians are compared (every run is printed). virt-customize runs once.
    let copy = |name: &str| sparse_copy(&fixture, work.path().join(name));
    let (mut bare_runs, mut imgforge_runs) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let bare = copy("bare.img")?;
        bare_runs.push(timed(
            Command::new(&imgforge)
                .args(["customize", "--accel", "tcg", "--progress", "none", "--exclude-all-tasks", "-a"])
                .arg(&bare),
        )?);
        let a = copy("imgforge.img")?;
        imgforge_runs.push(timed(
            Command::new(&imgforge)
                .args(["customize", "--accel", "tcg", "--progress", "none", "-a"])
                .arg(&a)
                .args(ops("imgforge")),
        )?);
        verify(&a, &payload, "imgforge")?;
    }
    let b = copy("virt-customize.img")?;
    let t_virt = timed(virt(&b).args(ops("virt-customize")))?;
    verify(&b, &payload, "virt-customize")?;
    let (t_bare, t_imgforge) = (median(&bare_runs), median(&imgforge_runs));
    let runs = |v: &[Duration]| v.iter().map(|d| format!("{:.2}", d.as_secs_f64())).collect::<Vec<_>>().join(" ");

    println!("operations: --hostname --root-password --ssh-inject --upload (1 MB) --run-command, TCG, warm caches");
    println!(
        "helper bare boot        {:>7.2} s   (median of {RUNS}: {}; no task: boot, read the rules, stop)",
        t_bare.as_secs_f64(),
        runs(&bare_runs)
    );
    println!(
        "imgforge customize      {:>7.2} s   (median of {RUNS}: {}; {:.2}x the bare boot)",
        t_imgforge.as_secs_f64(),
        runs(&imgforge_runs),
        t_imgforge.as_secs_f64() / t_bare.as_secs_f64()
    );
    println!("virt-customize          {:>7.2} s", t_virt.as_secs_f64());
    println!("ratio (virt/imgforge)   {:>7.2}x", t_virt.as_secs_f64() / t_imgforge.as_secs_f64());
    Ok(())
}

/// How many times the bench runs the bare boot and the imgforge customization.
const RUNS: usize = 3;

fn median(runs: &[Duration]) -> Duration {
    let mut sorted = runs.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

/// liveimg repack: imgforge (backhand) against mksquashfs with the same compressor and block
/// size, on the same filesystem image.
fn bench_liveimg() -> Result<()> {
    fixtures::require_root();
    for comp in ["zstd", "xz"] {
        let live = fixtures::liveimg(comp)?;
        let work = tempfile::tempdir()?;
        let tree = work.path().join("tree");
        std::fs::create_dir_all(tree.join("LiveOS"))?;
        let rootfs = tree.join("LiveOS/rootfs.img");
        sh(Command::new("sh").arg("-c").arg(format!(
            "unsquashfs -cat '{}' LiveOS/rootfs.img > '{}'",
            live.display(),
            rootfs.display()
        )))?;
        let ours = work.path().join("imgforge.squashfs");
        let started = Instant::now();
        imgforge::source::liveimg::repack(&live, &rootfs, &ours)?;
        let t_ours = started.elapsed();
        let peer = work.path().join("mksquashfs.squashfs");
        let t_peer = timed(Command::new("mksquashfs").arg(&tree).arg(&peer).args([
            "-comp",
            comp,
            "-b",
            "131072",
            "-noappend",
            "-quiet",
            "-no-progress",
        ]))?;
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len() >> 20).unwrap_or(0);
        println!("liveimg repack, {comp}, {} MiB rootfs.img (2 cores):", std::fs::metadata(&rootfs)?.len() >> 20);
        println!("  imgforge              {:>7.2} s  -> {} MiB", t_ours.as_secs_f64(), size(&ours));
        println!(
            "  mksquashfs            {:>7.2} s  -> {} MiB   (imgforge takes {:.2}x as long)",
            t_peer.as_secs_f64(),
            size(&peer),
            t_ours.as_secs_f64() / t_peer.as_secs_f64()
        );
    }
    Ok(())
}
