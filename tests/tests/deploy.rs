//! `imgforge deploy`: stream, then customize in the helper, one command, one exit status.

use imgforge_tests::crafted;
use imgforge_tests::fixtures::{self, sh, Shape};
use imgforge_tests::readback::{check_sha512_crypt, shadow_field, Mount};
use imgforge_tests::run::{code, imgforge, s};
use std::process::Command;

mod progress_schema;

#[test]
fn liveimg_onto_a_larger_target_grows_and_customizes() {
    let live = fixtures::liveimg("xz").unwrap();
    let before = sh(Command::new("sha256sum").arg(&live)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("live-root.img");
    let out = imgforge(&[
        "deploy",
        "--accel",
        "tcg",
        "--image",
        &s(&live),
        "--target",
        &s(&target),
        "--size",
        "4G",
        "--hostname",
        "live1",
        "--root-password",
        "random",
        "--progress",
        "json",
    ]);
    assert_eq!(code(&out), 0);
    assert_eq!(std::fs::metadata(&target).unwrap().len(), 4 << 30);
    sh(Command::new("e2fsck").args(["-n", "-f"]).arg(&target)).expect("the filesystem is clean");
    let dump = sh(Command::new("dumpe2fs").arg("-h").arg(&target)).unwrap();
    let field =
        |name: &str| -> u64 { dump.lines().find_map(|l| l.strip_prefix(name)).unwrap().trim().parse().unwrap() };
    let fs_bytes = field("Block count:") * field("Block size:");
    assert!(fs_bytes > (4u64 << 30) - (64 << 20), "filesystem not grown: {fs_bytes} bytes");
    let m = Mount::at(&target, 0, 4 << 30).unwrap();
    assert_eq!(m.read("/etc/hostname").unwrap(), "live1\n");
    assert_eq!(sh(Command::new("sha256sum").arg(&live)).unwrap(), before, "the source changed");
    let events = progress_schema::events(&String::from_utf8_lossy(&out.stdout));
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    let first_helper = types.iter().position(|t| *t == "image-helper").expect("helper events");
    assert!(types[..first_helper].contains(&"image-copy-progress"), "copy progress comes before the helper: {types:?}");
    assert!(events.iter().any(|e| e["subtype"] == "task-end" && e["task"] == "15-GrowFilesystem"));
    assert_eq!(*types.last().unwrap(), "image-done");
    // The random password: an event naming the user in the stream, the clear text on stderr
    // (stdout carries the stream) and nowhere in the stream.
    assert!(events.iter().any(|e| e["type"] == "random-password" && e["user"] == "root"), "{types:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let password = stderr
        .lines()
        .find_map(|l| l.strip_prefix("Setting random password of root to "))
        .expect("the random password is told on stderr");
    assert!(!String::from_utf8_lossy(&out.stdout).contains(password), "the password is in the JSON stream");
    check_sha512_crypt(password, &shadow_field(&m.read("/etc/shadow").unwrap(), "root").unwrap())
        .expect("the random password is root's");
}

#[test]
fn qcow2_disk_image_deployed_and_customized() {
    let dir = tempfile::tempdir().unwrap();
    let qcow2 = dir.path().join("disk.qcow2");
    sh(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(fixtures::disk(Shape::DosExt4).unwrap())
        .arg(&qcow2))
    .unwrap();
    let target = dir.path().join("deployed.img");
    let out = imgforge(&[
        "deploy",
        "--accel",
        "tcg",
        "--image",
        &s(&qcow2),
        "--target",
        &s(&target),
        "--hostname",
        "deployed1",
        "--run-command",
        "echo ok > /root/deployed",
    ]);
    assert_eq!(code(&out), 0);
    let m = Mount::partition(&target, 0).unwrap();
    assert_eq!(m.read("/etc/hostname").unwrap(), "deployed1\n");
    assert_eq!(m.read("/root/deployed").unwrap(), "ok\n");
}

#[test]
fn a_failing_customization_fails_the_deploy() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("deployed.img");
    let out = imgforge(&[
        "deploy",
        "--accel",
        "tcg",
        "--image",
        &s(&fixtures::disk(Shape::DosExt4).unwrap()),
        "--target",
        &s(&target),
        "--run-command",
        "false",
    ]);
    assert_eq!(code(&out), 1);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--run-command 'false'"));
}

/// A 10 MB image of random bytes (no filesystem: the customization fails) deployed with
/// `--hostname`: onto a new file, exit 1 and neither the output nor a temporary file is left;
/// onto a `--force` file, exit 1 and its first MiB is zeroed, as the message says.
#[test]
fn a_failed_customization_leaves_no_complete_looking_output() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.img");
    sh(Command::new("head").args(["-c", "10M", "/dev/urandom"]).stdout(std::fs::File::create(&garbage).unwrap()))
        .unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let target = out_dir.path().join("deployed.img");
    let deploy = |target: &std::path::Path, extra: &[&str]| {
        let (image, target) = (s(&garbage), s(target));
        let mut args = vec!["deploy", "--accel", "tcg", "--image", &image, "--target", &target, "--hostname", "x"];
        args.extend_from_slice(extra);
        imgforge(&args)
    };
    let out = deploy(&target, &[]);
    assert_eq!(code(&out), 1);
    let left: Vec<_> = std::fs::read_dir(out_dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "a failed deploy left {left:?}");

    let forced = crafted::filled_file(&out_dir.path().join("forced.img"), 16 << 20);
    let out = deploy(&forced, &["--force"]);
    assert_eq!(code(&out), 1);
    assert!(crafted::head(&forced, 1 << 20).iter().all(|b| *b == 0), "the start of the target was not zeroed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("the first MiB of {} was zeroed", forced.display())), "{stderr}");
    assert_eq!(std::fs::metadata(&forced).unwrap().len(), 16 << 20);
}

/// deploy's write refuses what does not fit (a 2 KB .zst of 64 MiB onto a 1 MiB `--force`
/// file: exit 2, size kept) and a wrong `--sha256` (exit 2, first MiB zeroed) before any
/// helper VM starts.
#[test]
fn deploy_writes_nothing_past_the_target_and_holds_back_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let frames = crafted::zstd_frames(dir.path());
    let forced = crafted::filled_file(&dir.path().join("forced.img"), 1 << 20);
    let out = imgforge(&[
        "deploy",
        "--accel",
        "tcg",
        "--image",
        &s(&frames),
        "--target",
        &s(&forced),
        "--force",
        "--hostname",
        "x",
    ]);
    assert_eq!(code(&out), 2);
    assert_eq!(std::fs::metadata(&forced).unwrap().len(), 1 << 20, "deploy grew the target");
    assert!(String::from_utf8_lossy(&out.stderr).contains("larger than target"));

    let disk = fixtures::disk(Shape::DosExt4).unwrap();
    let big = crafted::filled_file(&dir.path().join("big.img"), std::fs::metadata(&disk).unwrap().len());
    let out = imgforge(&[
        "deploy",
        "--accel",
        "tcg",
        "--image",
        &s(&disk),
        "--target",
        &s(&big),
        "--force",
        "--sha256",
        &"0".repeat(64),
        "--hostname",
        "x",
    ]);
    assert_eq!(code(&out), 2);
    assert!(crafted::head(&big, 1 << 20).iter().all(|b| *b == 0), "the image's start reached the target");
    assert!(String::from_utf8_lossy(&out.stderr).contains("was zeroed"));
}

/// SIGTERM while the helper customizes a deploy onto a new file: exit 130, and neither the
/// output nor its temporary name is left.
#[test]
fn an_interrupted_deploy_leaves_no_new_output() {
    use std::time::{Duration, Instant};
    let out_dir = tempfile::tempdir().unwrap();
    let target = out_dir.path().join("deployed.img");
    let disk = fixtures::disk(Shape::DosExt4).unwrap();
    let mut child = Command::new(imgforge_tests::run::binary())
        .args(["deploy", "--accel", "tcg", "--progress", "none", "--image", &s(&disk), "--target", &s(&target)])
        .args(["--run-command", "sleep 300"])
        .spawn()
        .unwrap();
    // The write is done once the written image has a name (the hidden one, or the target's
    // own): the helper runs then.
    let started = Instant::now();
    let hidden_prefix = format!(".imgforge-{}-", child.id());
    let hidden = || {
        std::fs::read_dir(out_dir.path()).unwrap().flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(&hidden_prefix) && name.contains("-deploy-")
        })
    };
    while !hidden() && !target.exists() {
        assert!(started.elapsed() < Duration::from_secs(120), "the write did not finish");
        assert!(child.try_wait().unwrap().is_none(), "imgforge ended early");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(130));
    let left: Vec<_> = std::fs::read_dir(out_dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "an interrupted deploy left {left:?}");
}
