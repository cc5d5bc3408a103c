//! Security and robustness of customize: transactional writes, confinement of qemu, no
//! secrets in argv, interruption, outside kills, concurrency, full disks.

use imgforge_tests::fixtures::{self, sh, Shape};
use imgforge_tests::readback::Mount;
use imgforge_tests::run::{binary, code, customize_tcg, holders, imgforge, s};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use imgforge_tests::fixtures::sha256_hex as digest;

fn spawn(args: &[&str], tmpdir: &Path) -> Child {
    Command::new(binary())
        .args(args)
        .env("TMPDIR", tmpdir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}
/// A customization of `img` (TMPDIR `tmpdir`) whose helper VM sleeps in its guest, started and
/// waited for until its qemus hold the disk: (imgforge, the qemus).
fn sleeping_customization(img: &Path, tmpdir: &Path, extra: &[&str]) -> (Child, Vec<u32>) {
    let image = s(img);
    let mut args = vec!["customize", "-a", &image, "--accel", "tcg"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--run-command", "sleep 300"]);
    let mut child = spawn(&args, tmpdir);
    let qemu = wait_for_holders(img, &mut child);
    (child, qemu)
}

/// Waits until some process holds `path` open (qemu started), returning its pids.
fn wait_for_holders(path: &Path, child: &mut Child) -> Vec<u32> {
    let started = Instant::now();
    loop {
        let pids: Vec<u32> = holders(path).into_iter().filter(|p| *p != child.id()).collect();
        if !pids.is_empty() {
            return pids;
        }
        assert!(child.try_wait().unwrap().is_none(), "imgforge exited before qemu started");
        assert!(started.elapsed() < Duration::from_secs(60), "qemu never opened {}", path.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

fn nobody_uid() -> u32 {
    sh(Command::new("id").args(["-u", "nobody"])).unwrap().trim().parse().unwrap()
}

/// qemu runs as a uid (and gid) of its own, from the range imgforge hands out, not as a user
/// other processes share.
fn assert_per_job_uid(pid: u32, line: &str) {
    if let Err(e) = per_job_uid(pid, line) {
        panic!("{e}");
    }
}

/// Whether `pid` (gone: nothing to say) runs as a per-job uid and gid.
fn per_job_uid(pid: u32, line: &str) -> Result<(), String> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return Ok(()) };
    let first =
        |key: &str| status.lines().find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse::<u32>().ok());
    let (uid, gid) = (first("Uid:"), first("Gid:"));
    match uid {
        Some(uid) if imgforge::vm::dynamic_user::DYNAMIC_UIDS.contains(&uid) && gid == Some(uid) => Ok(()),
        _ => Err(format!("qemu runs as uid {uid:?} gid {gid:?}, not a per-job uid: {line}")),
    }
}

fn all_cmdlines() -> Vec<(u32, String)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .map(|p| (p, cmdline(p)))
        .collect()
}

fn empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

#[test]
fn a_failed_customization_leaves_the_disk_byte_identical() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let before = digest(&img);
    // The first operation changes the disk, the second fails: nothing may reach the disk.
    let out = customize_tcg(&img, &["--hostname", "changed", "--run-command", "rm -rf /etc/apt; exit 9"]);
    assert_eq!(code(&out), 1);
    assert_eq!(digest(&img), before);
    let out = customize_tcg(&img, &["--hostname", "changed", "--timeout", "15", "--run-command", "sleep 300"]);
    assert_eq!(code(&out), 3);
    assert_eq!(digest(&img), before);
    let out = customize_tcg(&img, &["--hostname", "changed"]);
    assert_eq!(code(&out), 0);
    assert_ne!(digest(&img), before);
    assert_eq!(Mount::partition(&img, 0).unwrap().read("/etc/hostname").unwrap(), "changed\n");
}

#[test]
fn qemu_is_unprivileged_confined_and_sees_no_secret_or_host_mount() {
    let work = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let secret = "Very-Secret-Pw-42";
    let pw = format!("password:{secret}");
    let mut child = spawn(
        &["customize", "-a", &s(&img), "--accel", "tcg", "--root-password", &pw, "--run-command", "sleep 4"],
        tmp.path(),
    );
    let qemu = wait_for_holders(&img, &mut child);
    let mut sampled = 0;
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(120) {
        for (pid, line) in all_cmdlines() {
            assert!(!line.contains(secret), "the password is in the argv of pid {pid}: {line}");
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(img.to_str().unwrap()), "the image is mounted on the host");
        for lo in std::fs::read_dir("/sys/block").unwrap().flatten() {
            let backing = std::fs::read_to_string(lo.path().join("loop/backing_file")).unwrap_or_default();
            assert!(!backing.contains(img.to_str().unwrap()), "the image is loop-attached on the host");
        }
        for pid in &qemu {
            let line = cmdline(*pid);
            if line.is_empty() {
                continue;
            }
            assert_per_job_uid(*pid, &line);
            assert!(line.contains("-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny"), "{line}");
            assert!(
                line.contains("-nodefaults") && !line.contains("-netdev") && !line.contains(img.to_str().unwrap()),
                "{line}"
            );
            sampled += 1;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(sampled > 3, "qemu was sampled only {sampled} times");
    assert!(!String::from_utf8_lossy(&out.stderr).contains(secret));
    assert!(empty_dir(tmp.path()), "temporary files left behind");
}

#[test]
fn sigint_stops_qemu_cleans_up_and_keeps_the_disk() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let work = tempfile::tempdir().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
        let before = digest(&img);
        let (mut child, _) = sleeping_customization(&img, tmp.path(), &["--hostname", "x"]);
        std::thread::sleep(Duration::from_secs(2));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let started = Instant::now();
        let status = child.wait().unwrap();
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
        assert_eq!(status.code(), Some(130), "signal {signal}");
        assert_eq!(holders(&img), Vec::<u32>::new(), "qemu left running");
        assert!(empty_dir(tmp.path()), "temporary files left behind");
        assert_eq!(digest(&img), before);
    }
}

#[test]
fn qemu_killed_from_outside_is_reported() {
    let work = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let before = digest(&img);
    let (child, qemu) = sleeping_customization(&img, tmp.path(), &[]);
    std::thread::sleep(Duration::from_secs(1));
    for pid in qemu {
        // SAFETY: killing the qemu this test started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("killed by signal 9 from outside"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(digest(&img), before);
    assert!(empty_dir(tmp.path()));
}

#[test]
fn concurrent_runs_work_and_the_same_disk_is_locked() {
    let work = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let a = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let b: PathBuf = work.path().join("second.img");
    sh(Command::new("cp").arg("--sparse=always").arg(&a).arg(&b)).unwrap();
    let mut first = spawn(
        &["customize", "-a", &s(&a), "--accel", "tcg", "--hostname", "first", "--run-command", "sleep 3"],
        tmp.path(),
    );
    wait_for_holders(&a, &mut first);
    let second = spawn(&["customize", "-a", &s(&b), "--accel", "tcg", "--hostname", "second"], tmp.path());
    let same = customize_tcg(&a, &["--hostname", "third"]);
    assert_eq!(code(&same), 2);
    assert!(String::from_utf8_lossy(&same.stderr).contains("in use"));
    let (o1, o2) = (first.wait_with_output().unwrap(), second.wait_with_output().unwrap());
    assert!(
        o1.status.success() && o2.status.success(),
        "{} / {}",
        String::from_utf8_lossy(&o1.stderr),
        String::from_utf8_lossy(&o2.stderr)
    );
    assert_eq!(Mount::partition(&a, 0).unwrap().read("/etc/hostname").unwrap(), "first\n");
    assert_eq!(Mount::partition(&b, 0).unwrap().read("/etc/hostname").unwrap(), "second\n");
}

#[test]
fn a_full_target_filesystem_is_a_clear_error() {
    fixtures::require_root();
    let dir = tempfile::tempdir().unwrap();
    sh(Command::new("mount").args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"]).arg(dir.path())).unwrap();
    let src = tempfile::tempdir().unwrap();
    let raw = fixtures::synthetic_raw(src.path()).unwrap();
    let target = dir.path().join("out.img");
    let out = imgforge(&["write", "--image", &s(&raw), "--target", &s(&target), "--progress", "none"]);
    let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
    let _ = Command::new("umount").arg(dir.path()).status();
    assert_eq!(code(&out), 4);
    assert!(String::from_utf8_lossy(&out.stderr).contains("No space left"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(leftovers, 0, "a partial file was left on the full filesystem");
}

/// qemu formats are opened by a confined qemu only: sampled while a vmdk is written, the one
/// process holding the image is qemu without a machine, as nobody, in its sandbox, given the
/// image as a descriptor; no qemu-img runs; the result is the raw disk.
#[test]
fn qemu_formats_are_read_by_a_confined_qemu_only() {
    let work = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let raw = fixtures::synthetic_raw(work.path()).unwrap();
    // 2 GiB, the rest zeros: a write long enough to watch.
    std::fs::OpenOptions::new().write(true).open(&raw).unwrap().set_len(2 << 30).unwrap();
    // A vmdk: a self-contained qcow2 is read in Rust (source/qcow2_reader.rs), without qemu.
    let image = work.path().join("src.vmdk");
    sh(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "vmdk"]).arg(&raw).arg(&image)).unwrap();
    let target = work.path().join("out.raw");
    let mut child = spawn(&["write", "--progress", "none", "--image", &s(&image), "--target", &s(&target)], tmp.path());
    let qemu = wait_for_holders(&image, &mut child);
    let mut sampled = 0;
    while child.try_wait().unwrap().is_none() {
        for (pid, line) in all_cmdlines() {
            assert!(!line.starts_with("qemu-img"), "qemu-img runs as pid {pid}: {line}");
        }
        for pid in &qemu {
            let line = cmdline(*pid);
            if line.is_empty() {
                continue;
            }
            assert!(line.contains("-machine none") && line.contains("-sandbox on,"), "{line}");
            assert!(line.contains("/dev/fdset/1") && !line.contains(image.to_str().unwrap()), "{line}");
            assert_per_job_uid(*pid, &line);
            sampled += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(sampled > 0, "the serving qemu was never sampled");
    assert_eq!(digest(&target), digest(&raw));
    assert!(empty_dir(tmp.path()), "temporary files left behind");
}

/// A host file the helper user may write, and a qcow2 whose data file it is.
fn qcow2_over_host_file(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let host = dir.join("host-file");
    let disk = dir.join("evil.qcow2");
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o"])
        .arg(format!("data_file={}", host.display()))
        .arg(&disk)
        .arg("64M"))
    .unwrap();
    // After qemu-img, which creates the data file empty.
    let bytes: Vec<u8> = b"HOST-FILE ".iter().copied().cycle().take(1 << 20).collect();
    std::fs::write(&host, &bytes).unwrap();
    std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o666)).unwrap();
    (disk, host, bytes)
}

/// `customize` and `verify` of a qcow2 whose data file is a host file: refused before any
/// qemu runs (the helper read the file and the commit wrote into it), exit 2 naming the disk.
#[test]
fn a_qcow2_with_a_host_data_file_is_refused_by_customize_and_verify() {
    fixtures::require_root();
    let dir = tempfile::tempdir().unwrap();
    let (disk, host, bytes) = qcow2_over_host_file(dir.path());
    let before = digest(&disk);
    for args in [
        vec!["customize", "-a", &s(&disk), "--accel", "tcg", "--hostname", "x", "--progress", "none"],
        vec!["verify", &s(&disk), "--accel", "tcg"],
    ] {
        let out = imgforge(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code(&out), 2, "{}: {stderr}", args[0]);
        assert!(stderr.contains("evil.qcow2") && stderr.contains("external file"), "{stderr}");
        assert!(std::fs::read(&host).unwrap() == bytes, "{} changed the host file", args[0]);
        assert_eq!(digest(&disk), before);
    }
}

/// A mounted block device is refused by customize, verify and Ganeti's rename (each holds
/// the device with O_EXCL for its run); the mounted filesystem is intact.
#[test]
fn a_mounted_block_device_is_refused_by_every_helper_run() {
    fixtures::require_root();
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("loop-backing");
    std::fs::File::create(&backing).unwrap().set_len(80 << 20).unwrap();
    sh(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&backing)).unwrap();
    let dev = sh(Command::new("losetup").args(["--find", "--show"]).arg(&backing)).unwrap().trim().to_owned();
    let mnt = tempfile::tempdir().unwrap();
    let mounted = sh(Command::new("mount").arg(&dev).arg(mnt.path()));
    let runs: Vec<(&str, Output)> = if mounted.is_ok() {
        vec![
            (
                "customize",
                imgforge(&["customize", "-a", &dev, "--accel", "tcg", "--hostname", "x", "--progress", "none"]),
            ),
            ("verify", imgforge(&["verify", &dev, "--accel", "tcg"])),
            (
                "rename",
                Command::new(binary())
                    .args(["ganeti", "rename"])
                    .env("DISK_0_PATH", &dev)
                    .env("INSTANCE_NAME", "inst2")
                    .env("IMGFORGE_GANETI_CONFIG", dir.path().join("no-config"))
                    .output()
                    .unwrap(),
            ),
        ]
    } else {
        Vec::new()
    };
    let _ = Command::new("umount").arg(mnt.path()).status();
    let fsck = sh(Command::new("e2fsck").args(["-n", "-f", &dev]));
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    mounted.unwrap();
    for (name, out) in runs {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code(&out), 2, "{name}: {stderr}");
        assert!(stderr.contains(&dev) && stderr.contains("in use"), "{name}: {stderr}");
    }
    fsck.expect("the mounted filesystem is intact");
}

/// This process's start time, `/proc/self/stat` field 22 (counted after the command name).
fn own_start_time() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    stat.rsplit_once(')').unwrap().1.split_whitespace().nth(19).unwrap().parse().unwrap()
}

/// A pid no process has: a child that exited and was waited for.
fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

fn private_dir(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs `imgforge inspect` on a small raw file with `tmpdir` as TMPDIR (any command sweeps).
fn inspect_with_tmpdir(tmpdir: &Path) {
    let work = tempfile::tempdir().unwrap();
    let small = work.path().join("small.raw");
    std::fs::write(&small, vec![0u8; 1 << 20]).unwrap();
    let out = spawn(&["inspect", &s(&small)], tmpdir).wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// What a dead imgforge left in TMPDIR (work dirs `imgforge-<pid>-<start time>-<host>-<kind>-XXXX`,
/// hidden downloads) is removed by the next command, without following a symlink inside; a
/// live process's dir, another user's, one open to others and a symlink named like ours stay.
#[test]
fn leftovers_of_dead_processes_are_removed_at_the_next_start() {
    use std::os::unix::fs::symlink;
    fixtures::require_root();
    let tmp = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let precious = outside.path().join("precious");
    std::fs::write(&precious, "keep me").unwrap();
    let (dead, own, start) = (dead_pid(), std::process::id(), own_start_time());
    // The tag of this machine and pid namespace: the binary run below computes the same.
    let host = format!("{:08x}", imgforge::workdir::this_process().host);
    let name = |pid: u32, start: u64, rest: &str| tmp.path().join(format!("imgforge-{pid}-{start}-{host}-{rest}"));

    let stale = name(dead, 12345, "job-a1b2c3");
    private_dir(&stale, 0o700);
    std::fs::create_dir_all(stale.join("qmp/deeper")).unwrap();
    std::fs::write(stale.join("rules.img"), vec![1u8; 4096]).unwrap();
    std::fs::write(stale.join("qmp/deeper/sock"), "x").unwrap();
    symlink(&precious, stale.join("link-to-file")).unwrap();
    symlink(outside.path(), stale.join("qmp/link-to-dir")).unwrap();
    let stale_download = tmp.path().join(format!(".imgforge-{dead}-12345-{host}-download-xyz"));
    std::fs::write(&stale_download, "partial").unwrap();
    // This test's own pid, started at another time: the pid was reused.
    let reused = name(own, start + 1, "qmp-d4e5f6");
    private_dir(&reused, 0o700);

    let live = name(own, start, "job-live00");
    private_dir(&live, 0o700);
    let others = name(dead, 12345, "job-nobody");
    private_dir(&others, 0o700);
    std::os::unix::fs::chown(&others, Some(nobody_uid()), None).unwrap();
    let open = name(dead, 12345, "job-open00");
    private_dir(&open, 0o755);
    let link = name(dead, 12345, "job-link00");
    symlink(outside.path(), &link).unwrap();

    inspect_with_tmpdir(tmp.path());

    for gone in [&stale, &stale_download, &reused] {
        assert!(gone.symlink_metadata().is_err(), "{} was left", gone.display());
    }
    for kept in [&live, &others, &open] {
        assert!(kept.is_dir(), "{} was removed", kept.display());
    }
    assert!(link.symlink_metadata().unwrap().file_type().is_symlink(), "the symlink was removed");
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1);
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 4, "only the four kept entries remain");
}

/// `kill -9` of a customization leaves its work dirs (no destructor runs); the next imgforge
/// removes them all, and the disk is as it was.
#[test]
fn nothing_is_left_after_sigkill_of_a_customization() {
    let work = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let before = digest(&img);
    let (mut child, _) = sleeping_customization(&img, tmp.path(), &["--hostname", "x"]);
    child.kill().unwrap();
    child.wait().unwrap();
    let started = Instant::now();
    while !holders(&img).is_empty() {
        assert!(started.elapsed() < Duration::from_secs(10), "qemu outlived imgforge");
        std::thread::sleep(Duration::from_millis(100));
    }
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    eprintln!("left by the killed imgforge: {left:?}");
    assert!(!left.is_empty(), "the killed imgforge left nothing: this test proves nothing");
    inspect_with_tmpdir(tmp.path());
    assert!(empty_dir(tmp.path()), "left behind: {:?}", std::fs::read_dir(tmp.path()).unwrap().collect::<Vec<_>>());
    assert_eq!(digest(&img), before);
}

/// Another process of the helper user (any daemon running as `nobody`, or a qemu a hostile
/// image took over in a concurrent job) must not reach a job's qemu: through its memory it
/// holds the guest's RAM (uploads, keys, the rules), the disk and overlay descriptors and the
/// report pipe. qemu execs after the drop to the helper user, so the kernel leaves it dumpable
/// and a same-uid process passes the ptrace check of /proc/PID/mem: each qemu runs as a uid of
/// its own instead, which no other process has (`vm::dynamic_user`'s tests show two jobs never
/// share one).
#[test]
fn another_process_of_the_helper_user_cannot_reach_qemu() {
    fixtures::require_root();
    let work = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let (mut child, qemu) = sleeping_customization(&img, tmp.path(), &[]);
    let nobody = nobody_uid();
    // Held between fork and exec too, while still root: looked at once qemu runs.
    let started = Instant::now();
    while !qemu.iter().all(|pid| cmdline(*pid).contains("-sandbox")) && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let owners: Vec<Result<(), String>> = qemu.iter().map(|pid| per_job_uid(*pid, &cmdline(*pid))).collect();
    let reached: Vec<String> = qemu
        .iter()
        .filter_map(|pid| {
            let mem = format!("/proc/{pid}/mem");
            // The probe runs as the helper user, as another of its processes would.
            let probe = Command::new("setpriv")
                .args(["--reuid", &nobody.to_string(), "--regid", &nobody.to_string(), "--clear-groups"])
                .args(["dd", &format!("if={mem}"), "of=/dev/null", "count=0", "status=none"])
                .status()
                .unwrap();
            probe.success().then_some(mem)
        })
        .collect();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(reached.is_empty(), "the helper user opened {reached:?}");
    for owner in owners {
        owner.unwrap();
    }
}

/// `--helper-user NAME` still means that user (here `nobody`), for sites that chose a dedicated
/// one; the default is a uid of each qemu's own.
#[test]
fn a_named_helper_user_is_used_as_given() {
    fixtures::require_root();
    let work = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let (mut child, qemu) = sleeping_customization(&img, tmp.path(), &["--helper-user", "nobody"]);
    let started = Instant::now();
    while !qemu.iter().all(|pid| cmdline(*pid).contains("-sandbox")) && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let nobody = nobody_uid().to_string();
    let uids: Vec<Option<String>> = qemu
        .iter()
        .map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            Some(status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.to_owned())
        })
        .collect();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!uids.is_empty() && uids.iter().all(|u| u.as_deref() == Some(nobody.as_str())), "{uids:?}");
}

/// A guest that writes more than TMPDIR holds (the overlay grows with every block it writes,
/// and the image's own programs decide how much) fails at once, naming TMPDIR (exit 4): qemu
/// paused the VM on ENOSPC and imgforge waited for the soft timeout (600 s by default) with
/// TMPDIR full, then blamed the timeout (exit 3). The disk keeps its bytes, TMPDIR empties.
/// (`werror=report` is no fix: tried, the guest's `sync` ignored the lost writes, the helper
/// reported SUCCESS and a filesystem with lost writes was committed.)
#[test]
fn a_guest_filling_tmpdir_fails_at_once() {
    fixtures::require_root();
    let work = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    sh(Command::new("mount").args(["-t", "tmpfs", "-o", "size=48m", "imgforge-test-small-tmp"]).arg(tmp.path()))
        .unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let before = digest(&img);
    let started = Instant::now();
    let child = spawn(
        &[
            "customize",
            "-a",
            &s(&img),
            "--accel",
            "tcg",
            "--timeout",
            "240",
            "--run-command",
            "dd if=/dev/urandom of=/fill bs=1M count=100 && sync",
        ],
        tmp.path(),
    );
    let out = child.wait_with_output().unwrap();
    let spent = started.elapsed();
    let left = std::fs::read_dir(tmp.path()).unwrap().count();
    sh(Command::new("umount").arg(tmp.path())).unwrap();
    eprintln!("exit {:?} after {spent:?}: {}", out.status.code(), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(4), "no space is the host's trouble, not a timeout");
    assert!(String::from_utf8_lossy(&out.stderr).contains("space"), "the message names the cause");
    assert!(spent < Duration::from_secs(150), "took {spent:?}");
    assert_eq!(digest(&img), before);
    assert_eq!(left, 0, "TMPDIR not emptied");
}

/// The write end of a pipe whose read end is already closed: every write fails with EPIPE.
fn broken_pipe() -> Stdio {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just returned by pipe2 and are owned here alone.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    Stdio::from(write)
}

/// stdout and stderr a closed pipe (`imgforge … 2>&1 | head -1` once `head` is gone): every
/// command ends with its normal status — never a panic (101) or a hang — and leaves neither a
/// temporary nor a partial output behind.
#[test]
fn a_closed_stdout_and_stderr_change_no_exit_status() {
    fixtures::require_root();
    let dir = tempfile::tempdir().unwrap();
    let raw = fixtures::synthetic_raw(dir.path()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let target = s(&out_dir.path().join("out.img"));
    let wrong = "0".repeat(64);
    // No filesystem: the helper VM runs and the customization fails (exit 1).
    let garbage = dir.path().join("garbage.img");
    sh(Command::new("head").args(["-c", "10M", "/dev/urandom"]).stdout(std::fs::File::create(&garbage).unwrap()))
        .unwrap();
    let (garbage, deployed) = (s(&garbage), s(&out_dir.path().join("deployed.img")));
    let cases: [(&[&str], i32); 7] = [
        (&["-vv", "write", "--progress", "json", "--image", &s(&raw), "--target", &target], 0),
        (&["write", "--progress", "bar", "--image", &s(&raw), "--target", &target, "--force"], 0),
        (&["write", "--progress", "none", "--image", &s(&raw), "--target", &target, "--force", "--sha256", &wrong], 2),
        (&["inspect", &s(&raw)], 0),
        (&["inspect", "--json", &s(&raw)], 0),
        (&["customize", "-a", "/nonexistent/disk.img", "--hostname", "x"], 2),
        (
            &[
                "-v",
                "deploy",
                "--accel",
                "tcg",
                "--progress",
                "bar",
                "--image",
                &garbage,
                "--target",
                &deployed,
                "--hostname",
                "x",
                "--root-password",
                "random",
            ],
            1,
        ),
    ];
    for (args, want) in cases {
        let mut child = Command::new(binary())
            .args(args)
            .env("TMPDIR", tmp.path())
            .stdout(broken_pipe())
            .stderr(broken_pipe())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("imgforge {args:?} still running after 60 s with a closed stderr");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(want), "imgforge {args:?}");
        assert!(empty_dir(tmp.path()), "imgforge {args:?} left work files in TMPDIR");
        let left: Vec<_> = std::fs::read_dir(out_dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(left.iter().all(|n| n == "out.img"), "imgforge {args:?} left {left:?}");
        if args.contains(&"write") && want == 0 {
            assert!(std::fs::read(&target).unwrap() == std::fs::read(&raw).unwrap(), "imgforge {args:?}: wrong output");
        }
    }
}
