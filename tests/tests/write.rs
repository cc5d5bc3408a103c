//! `imgforge write`: every source kind, byte-exact onto new files and onto a loop device full
//! of 0xff (proving zero ranges are really zeroed), refusals, URLs, interruption.

use imgforge_tests::crafted;
use imgforge_tests::fixtures::{self, sh};
use imgforge_tests::http::{self, Response};
use imgforge_tests::run::{binary, code, imgforge, s};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod progress_schema;

use imgforge_tests::fixtures::sha256_hex as digest;

/// Every way imgforge can be handed the synthetic image: (name, source file).
fn sources(dir: &Path, raw: &Path) -> Vec<(&'static str, PathBuf)> {
    let mut out = vec![("raw", raw.to_owned())];
    let qcow2 = dir.join("src.qcow2");
    sh(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(raw).arg(&qcow2)).unwrap();
    out.push(("qcow2", qcow2));
    let vmdk = dir.join("src.vmdk");
    sh(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "vmdk"]).arg(raw).arg(&vmdk)).unwrap();
    out.push(("vmdk", vmdk));
    for (name, tool, ext) in [("gzip", "gzip", "gz"), ("xz", "xz", "xz"), ("zstd", "zstd", "zst")] {
        let p = dir.join(format!("src.raw.{ext}"));
        sh(Command::new("sh").arg("-c").arg(format!("{tool} -c < '{}' > '{}'", raw.display(), p.display()))).unwrap();
        out.push((name, p));
    }
    // Several blocks, decoded on worker threads.
    let blocks = dir.join("src-blocks.raw.xz");
    sh(Command::new("sh").arg("-c").arg(format!(
        "xz -T2 --block-size=1MiB -c < '{}' > '{}'",
        raw.display(),
        blocks.display()
    )))
    .unwrap();
    out.push(("xz-blocks", blocks));
    out.push(("liveimg-xz", fixtures::liveimg_of(raw, "xz", dir).unwrap()));
    out.push(("liveimg-zstd", fixtures::liveimg_of(raw, "zstd", dir).unwrap()));
    out
}

fn same_prefix(a: &Path, b: &str, len: u64) -> bool {
    Command::new("cmp").args(["-n", &len.to_string()]).arg(a).arg(b).status().unwrap().success()
}

#[test]
fn every_source_kind_round_trips_onto_files_and_a_dirty_block_device() {
    fixtures::require_root();
    let dir = tempfile::tempdir().unwrap();
    let raw = fixtures::synthetic_raw(dir.path()).unwrap();
    let size = std::fs::metadata(&raw).unwrap().len();
    let lo = crafted::Loop::filled(dir.path(), "loop-backing", size + (8 << 20));
    for (kind, src) in sources(dir.path(), &raw) {
        let before = digest(&src);
        let out_file = dir.path().join(format!("out-{kind}.img"));
        let out = imgforge(&["write", "--image", &s(&src), "--target", &s(&out_file), "--progress", "none"]);
        assert_eq!(code(&out), 0, "{kind} onto a file");
        assert_eq!(digest(&out_file), digest(&raw), "{kind}: file differs from the source image");
        // Zero ranges of the image must overwrite the 0xff on the device.
        sh(Command::new("sh").arg("-c").arg(format!(
            "head -c {} /dev/zero | tr '\\0' '\\377' | dd of={} bs=1M oflag=direct status=none",
            size, lo.dev
        )))
        .unwrap();
        let out = imgforge(&["write", "--image", &s(&src), "--target", &lo.dev, "--progress", "none"]);
        assert_eq!(code(&out), 0, "{kind} onto {}", lo.dev);
        assert!(same_prefix(&raw, &lo.dev, size), "{kind}: block device differs from the source image");
        assert_eq!(digest(&src), before, "{kind}: the source changed");
    }
}

#[test]
fn json_progress_reports_the_copy() {
    fixtures::require_root();
    let dir = tempfile::tempdir().unwrap();
    let raw = fixtures::synthetic_raw(dir.path()).unwrap();
    let out =
        imgforge(&["write", "--image", &s(&raw), "--target", &s(&dir.path().join("o.img")), "--progress", "json"]);
    assert_eq!(code(&out), 0);
    let events = progress_schema::events(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(events[0]["type"], "image-info");
    assert_eq!(events[0]["size"], 64 << 20);
    let last_copy = events.iter().rev().find(|e| e["type"] == "image-copy-progress").expect("copy progress");
    assert_eq!((last_copy["position"].as_u64(), last_copy["progress"].as_f64()), (Some(64 << 20), Some(100.0)));
    assert_eq!(events.last().unwrap()["type"], "image-done");
}

/// Every kind of source (files, URLs with and without a length, a qcow2 downloaded first) and a
/// failure: every line on stdout matches the published schema.
#[test]
fn json_progress_lines_match_the_schema() {
    fixtures::require_root();
    let dir = tempfile::tempdir().unwrap();
    let raw = fixtures::synthetic_raw(dir.path()).unwrap();
    let body = std::fs::read(&raw).unwrap();
    let sources = sources(dir.path(), &raw);
    let qcow2 = std::fs::read(&sources.iter().find(|(name, _)| *name == "qcow2").unwrap().1).unwrap();
    let mut runs: Vec<(String, i32)> = sources.iter().map(|(_, src)| (s(src), 0)).collect();
    runs.push((http::serve(Response::full(body.clone())), 0));
    runs.push((http::serve(Response { announce: None, ..Response::full(body) }), 0));
    runs.push((http::serve(Response::full(qcow2)), 0));
    runs.push((s(&dir.path().join("missing.img")), 2));
    for (i, (src, want)) in runs.iter().enumerate() {
        let target = dir.path().join(format!("out-{i}.img"));
        let out = imgforge(&["write", "--image", src, "--target", &s(&target), "--progress", "json"]);
        assert_eq!(code(&out), *want, "{src}");
        let events = progress_schema::events(&String::from_utf8_lossy(&out.stdout));
        let last = if *want == 0 { "image-done" } else { "image-error" };
        assert_eq!(events.last().unwrap()["type"], last, "{src}");
        assert!(events.iter().all(|e| e["v"] == 1), "{src}");
    }
}

#[test]
fn refusals_leave_source_and_target_untouched() {
    fixtures::require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = fixtures::synthetic_raw(d).unwrap();
    let empty = d.join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    let random = d.join("random.img");
    sh(Command::new("sh")
        .arg("-c")
        .arg(format!("printf 'hsqs' > {0}; head -c 100000 /dev/urandom >> {0}", random.display())))
    .unwrap();
    let truncated_xz = d.join("trunc.raw.xz");
    sh(Command::new("sh").arg("-c").arg(format!(
        "xz -c < {} | head -c 100000 > {}",
        raw.display(),
        truncated_xz.display()
    )))
    .unwrap();
    let truncated_qcow2 = d.join("trunc.qcow2");
    sh(Command::new("sh").arg("-c").arg(format!(
        "qemu-img convert -f raw -O qcow2 {} {}.full && head -c 300000 {}.full > {}",
        raw.display(),
        truncated_qcow2.display(),
        truncated_qcow2.display(),
        truncated_qcow2.display()
    )))
    .unwrap();
    let backed = d.join("backed.qcow2");
    sh(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"]).arg(&raw).arg(&backed))
        .unwrap();
    let no_liveos = d.join("plain.squashfs");
    std::fs::create_dir_all(d.join("plain/etc")).unwrap();
    sh(Command::new("mksquashfs").arg(d.join("plain")).arg(&no_liveos).args(["-quiet", "-no-progress"])).unwrap();
    let existing = d.join("existing.img");
    std::fs::write(&existing, vec![7u8; 1 << 20]).unwrap();
    let small = d.join("small.img");
    std::fs::write(&small, vec![7u8; 1 << 20]).unwrap();

    let new_target = d.join("new.img");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![s(&d.join("missing.img")), s(&new_target)], "missing.img"),
        (vec![s(&empty), s(&new_target)], "is empty"),
        (vec![s(&random), s(&new_target)], "random.img"),
        (vec![s(&truncated_xz), s(&new_target)], "truncated or corrupt"),
        (vec![s(&truncated_qcow2), s(&new_target)], "trunc.qcow2"),
        (vec![s(&backed), s(&new_target)], "backing file"),
        (vec![s(&no_liveos), s(&new_target)], "not a liveimg"),
        (vec![s(&raw), s(&existing)], "--force"),
        (vec![s(&raw), s(&small), "--force".into()], "holds 1048576 bytes"),
        (vec![s(&raw), s(d)], "neither a block device nor a regular file"),
        (vec![s(&raw), s(&raw), "--force".into()], "source image itself"),
        (vec![s(&raw), s(&new_target), "--sha256".into(), "0".repeat(64)], "does not match --sha256"),
        (vec![s(d), s(&new_target)], "directory"),
    ];
    let digests: Vec<(PathBuf, String)> =
        [&raw, &existing, &small, &truncated_xz, &backed].iter().map(|p| (p.to_path_buf(), digest(p))).collect();
    for (args, want) in cases {
        let mut full = vec![
            "write".to_owned(),
            "--progress".into(),
            "none".into(),
            "--image".into(),
            args[0].clone(),
            "--target".into(),
            args[1].clone(),
        ];
        full.extend(args[2..].iter().cloned());
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        let out = imgforge(&refs);
        assert_eq!(code(&out), 2, "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!new_target.exists(), "{args:?} left an output file");
        let leftovers: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".imgforge-"))
            .collect();
        assert!(leftovers.is_empty(), "{args:?} left temporary files: {leftovers:?}");
    }
    for (p, before) in digests {
        assert_eq!(digest(&p), before, "{} changed", p.display());
    }
}

#[test]
fn mounted_block_device_is_refused() {
    fixtures::require_root();
    let dir = tempfile::tempdir().unwrap();
    let raw = fixtures::synthetic_raw(dir.path()).unwrap();
    let lo = crafted::Loop::filled(dir.path(), "loop-backing", 80 << 20);
    sh(Command::new("mkfs.ext4").args(["-q", "-F", &lo.dev])).unwrap();
    let mnt = tempfile::tempdir().unwrap();
    sh(Command::new("mount").arg(&lo.dev).arg(mnt.path())).unwrap();
    let out = imgforge(&["write", "--image", &s(&raw), "--target", &lo.dev, "--progress", "none"]);
    let _ = Command::new("umount").arg(mnt.path()).status();
    assert_eq!(code(&out), 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
    // Not a byte of the image reached the device: the filesystem is intact.
    assert!(!same_prefix(&raw, &lo.dev, 8 << 20));
    sh(Command::new("e2fsck").args(["-n", "-f", &lo.dev])).expect("the mounted filesystem is intact");
}

#[test]
fn url_sources_stream_and_short_reads_fail_cleanly() {
    fixtures::require_root();
    let dir = tempfile::tempdir().unwrap();
    let raw = fixtures::synthetic_raw(dir.path()).unwrap();
    let body = std::fs::read(&raw).unwrap();
    let url = http::serve(Response::full(body.clone()));
    let target = dir.path().join("from-url.img");
    let out = imgforge(&["write", "--image", &url, "--target", &s(&target), "--progress", "none"]);
    assert_eq!(code(&out), 0);
    assert_eq!(digest(&target), digest(&raw));

    let xz = dir.path().join("src.xz");
    sh(Command::new("sh").arg("-c").arg(format!("xz -c < {} > {}", raw.display(), xz.display()))).unwrap();
    let url = http::serve(Response::full(std::fs::read(&xz).unwrap()));
    let target = dir.path().join("from-url-xz.img");
    let out =
        imgforge(&["write", "--image", &url, "--target", &s(&target), "--progress", "none", "--sha256", &digest(&xz)]);
    assert_eq!(code(&out), 0);
    assert_eq!(digest(&target), digest(&raw));

    let short = Response { announce: Some(body.len() as u64), send: body.len() / 3, ..Response::full(body) };
    let url = http::serve(short);
    let target = dir.path().join("short.img");
    let out = imgforge(&["write", "--image", &url, "--target", &s(&target), "--progress", "none"]);
    assert_eq!(code(&out), 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("truncated"));
    assert!(!target.exists());
    assert_eq!(
        std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .count(),
        0
    );
}

#[test]
fn sigint_leaves_no_output_and_no_temporary_file() {
    fixtures::require_root();
    let dir = tempfile::tempdir().unwrap();
    let raw = fixtures::synthetic_raw(dir.path()).unwrap();
    let slow = Response { pause: Duration::from_millis(50), ..Response::full(std::fs::read(&raw).unwrap()) };
    let url = http::serve(slow);
    let out_dir = tempfile::tempdir().unwrap();
    let target = out_dir.path().join("interrupted.img");
    let mut child = Command::new(binary())
        .args(["write", "--progress", "none", "--image", &url, "--target", &s(&target)])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let started = std::time::Instant::now();
    let status = child.wait().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?} to stop", started.elapsed());
    assert_eq!(status.code(), Some(130));
    assert_eq!(std::fs::read_dir(out_dir.path()).unwrap().count(), 0, "output or temporary file left behind");
}

/// SIGTERM at moments spread over a whole `write --force` onto an existing file (from before
/// the handlers are installed to after the end): exit 0 only with the image whole on the
/// target; exit 130 with the target's first MiB zeroed; killed by the signal itself only
/// before anything was written. Never a success with a partial image, nor a partial image with
/// a bootable start.
#[test]
fn a_signal_at_any_moment_leaves_a_whole_image_or_a_zeroed_start() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let image = fixtures::pseudo_random_bytes(7, 96 << 20);
    let source = dir.path().join("source.img");
    std::fs::write(&source, &image).unwrap();
    let target = dir.path().join("target.img");
    let run = |delay: Option<Duration>| {
        std::fs::write(&target, vec![0xffu8; image.len()]).unwrap();
        let started = Instant::now();
        let child = Command::new(binary())
            .args(write_args(&s(&source), &s(&target), &["--force"]))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(delay) = delay {
            std::thread::sleep(delay);
            // SAFETY: signalling our own child (gone already is fine: kill fails harmlessly).
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        let out = child.wait_with_output().unwrap();
        (out.status, String::from_utf8_lossy(&out.stderr).into_owned(), started.elapsed())
    };
    let (status, stderr, whole) = run(None);
    assert!(status.success(), "{stderr}");
    let mut outcomes = std::collections::BTreeMap::new();
    for step in 0..=24u32 {
        let (status, stderr, _) = run(Some(whole * step / 20));
        let written = std::fs::read(&target).unwrap();
        let outcome = match (status.code(), status.signal()) {
            (Some(0), _) => {
                assert!(written == image, "exit 0 after SIGTERM at step {step} with the image not whole");
                "finished"
            }
            (Some(130), _) => {
                assert!(stderr.contains("interrupted"), "{stderr}");
                assert!(written[..1 << 20].iter().all(|b| *b == 0), "step {step}: exit 130, a start not zeroed");
                "interrupted"
            }
            (None, Some(libc::SIGTERM)) => {
                assert!(written.iter().all(|b| *b == 0xff), "step {step}: killed outright after writing");
                "killed before starting"
            }
            other => panic!("step {step}: {other:?}: {stderr}"),
        };
        *outcomes.entry(outcome).or_insert(0) += 1;
    }
    eprintln!("one write {whole:?}; outcomes of SIGTERM over it: {outcomes:?}");
    assert!(outcomes.contains_key("interrupted"), "no signal landed during the write: {outcomes:?}");
}

/// A host file the helper user may read (and write): what a hostile image would name.
fn host_file(dir: &Path) -> (PathBuf, Vec<u8>) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.join("host-secret");
    let bytes: Vec<u8> = b"HOST-SECRET-7f3a9c ".iter().copied().cycle().take(64 << 10).collect();
    std::fs::write(&path, &bytes).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    (path, bytes)
}

fn qemu_img(args: &[&str]) {
    sh(Command::new("qemu-img").args(args)).unwrap();
}

/// A `KDMV` sparse header of `capacity` sectors with `descriptor` embedded at sector 1.
fn vmdk_with_descriptor(capacity: u64, descriptor: &str) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    b[..4].copy_from_slice(b"KDMV");
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    b[8..12].copy_from_slice(&3u32.to_le_bytes());
    b[12..20].copy_from_slice(&capacity.to_le_bytes());
    b[20..28].copy_from_slice(&128u64.to_le_bytes());
    b[28..36].copy_from_slice(&1u64.to_le_bytes());
    b[36..44].copy_from_slice(&1u64.to_le_bytes());
    b[44..48].copy_from_slice(&512u32.to_le_bytes());
    b[512..512 + descriptor.len()].copy_from_slice(descriptor.as_bytes());
    b
}

/// A VHD made by qemu-img, turned into a differencing disk (type 4, checksums fixed).
fn vpc_differencing(dir: &Path) -> PathBuf {
    let p = dir.join("made.vpc");
    qemu_img(&["create", "-q", "-f", "vpc", &s(&p), "1M"]);
    let mut b = std::fs::read(&p).unwrap();
    let end = b.len() - 512;
    for at in [0, end] {
        let footer = &mut b[at..at + 512];
        footer[0x3c..0x40].copy_from_slice(&4u32.to_be_bytes());
        footer[0x40..0x44].fill(0);
        let sum = !footer.iter().map(|x| u32::from(*x)).sum::<u32>();
        footer[0x40..0x44].copy_from_slice(&sum.to_be_bytes());
    }
    let out = dir.join("diff.vpc");
    std::fs::write(&out, b).unwrap();
    out
}

/// A VHDX made by qemu-img whose file parameters say it has a parent (a differencing disk).
fn vhdx_differencing(dir: &Path) -> PathBuf {
    const FILE_PARAMETERS: [u8; 16] =
        [0x37, 0x67, 0xa1, 0xca, 0x36, 0xfa, 0x43, 0x4d, 0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b];
    let p = dir.join("made.vhdx");
    qemu_img(&["create", "-q", "-f", "vhdx", &s(&p), "1M"]);
    let mut b = std::fs::read(&p).unwrap();
    let table = b.windows(8).position(|w| w == b"metadata").expect("a metadata table");
    let count = u16::from_le_bytes([b[table + 10], b[table + 11]]) as usize;
    let entry = (0..count).map(|i| table + 32 + 32 * i).find(|e| b[*e..*e + 16] == FILE_PARAMETERS).unwrap();
    let item = table + u32::from_le_bytes(b[entry + 16..entry + 20].try_into().unwrap()) as usize;
    b[item + 4] |= 2; // HasParent
    let out = dir.join("diff.vhdx");
    std::fs::write(&out, b).unwrap();
    out
}

/// Images whose metadata name host files, one per format (and a VMDK over http, as Ganeti's
/// `img_id=http://…/x.vmdk` fetches it): refused with exit 2 naming the image, no output,
/// the host file unchanged.
#[test]
fn images_naming_host_files_are_refused() {
    fixtures::require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (host, host_bytes) = host_file(d);
    let host_s = s(&host);
    let flat = format!("# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 128 FLAT \"{host_s}\" 0\n");
    let mut images: Vec<(&str, PathBuf)> = Vec::new();
    let mut add = |name: &'static str, bytes: Vec<u8>| {
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        images.push((name, p));
    };
    add("capacity0.vmdk", vmdk_with_descriptor(0, &flat));
    add("flat-extent.vmdk", vmdk_with_descriptor(128, &flat));
    let data_file = d.join("data-file.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", &format!("data_file={host_s}"), &s(&data_file), "64K"]);
    std::fs::write(&host, &host_bytes).unwrap(); // qemu-img created it empty
    let json = format!("json:{{\"driver\": \"raw\", \"file\": {{\"driver\": \"file\", \"filename\": \"{host_s}\"}}}}");
    let json_backing = d.join("json-backing.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", &json, &s(&json_backing), "64K"]);
    let qed = d.join("backing.qed");
    qemu_img(&["create", "-q", "-f", "qed", "-F", "raw", "-b", &host_s, &s(&qed), "64K"]);
    let qcow = d.join("backing.qcow");
    qemu_img(&["create", "-q", "-f", "qcow", "-F", "raw", "-b", &host_s, &s(&qcow), "64K"]);
    let mut cases: Vec<(String, String)> = images.iter().map(|(n, p)| (n.to_string(), s(p))).collect();
    for p in [data_file, json_backing, qed, qcow, vpc_differencing(d), vhdx_differencing(d)] {
        cases.push((p.file_name().unwrap().to_string_lossy().into_owned(), s(&p)));
    }
    let served = http::serve(Response::full(vmdk_with_descriptor(0, &flat)));
    cases.push(("over http".into(), served));

    for (name, image) in &cases {
        let target = d.join("out.img");
        let out = imgforge(&["write", "--progress", "none", "--image", image, "--target", &s(&target)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code(&out), 2, "{name}: {stderr}");
        let shown = if image.starts_with("http") { image.as_str() } else { name.as_str() };
        assert!(stderr.contains(shown), "{name}: {stderr}");
        assert!(!target.exists(), "{name} left an output");
        assert!(std::fs::read(&host).unwrap() == host_bytes, "{name} changed the host file");
    }
}

/// A qemu that cannot be started is the host's trouble (exit 4); a qemu that refuses the
/// image is the image's (exit 2, tested above with differencing VHDX).
#[test]
fn a_qemu_that_cannot_start_is_an_environment_error() {
    fixtures::require_root();
    let dir = tempfile::tempdir().unwrap();
    let raw = fixtures::synthetic_raw(dir.path()).unwrap();
    let qcow2 = dir.path().join("src.qcow2");
    qemu_img(&["convert", "-q", "-f", "raw", "-O", "qcow2", &s(&raw), &s(&qcow2)]);
    let target = dir.path().join("out.img");
    for qemu in ["/nonexistent/qemu-system-x86_64", "/bin/false"] {
        let out = imgforge(&[
            "deploy",
            "--progress",
            "none",
            "--image",
            &s(&qcow2),
            "--target",
            &s(&target),
            "--qemu",
            qemu,
            "--hostname",
            "x",
        ]);
        assert_eq!(code(&out), 4, "{qemu}");
        assert!(!target.exists());
    }
}

fn write_args<'a>(src: &'a str, target: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["write", "--progress", "none", "--image", src, "--target", target];
    args.extend_from_slice(extra);
    args
}

/// Images that decode to 64 MiB while announcing 4 KiB or nothing (two zstd frames, two gzip
/// members, two xz streams) and a raw download with no Content-Length, onto a 1 MiB `--force`
/// file, a new file of `--size 1M` and a 1 MiB block device: refused with exit 2 as soon as
/// the image outgrows the target, and a file target keeps its size.
#[test]
fn nothing_is_written_past_the_end_of_a_target() {
    fixtures::require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let body = vec![crafted::FILL; 8 << 20];
    let mut sources: Vec<String> =
        [crafted::zstd_frames(d), crafted::gzip_members(d), crafted::xz_streams(d)].iter().map(|p| s(p)).collect();
    sources.push(http::serve(Response { announce: None, ..Response::full(body) }));
    let lo = crafted::Loop::filled(d, "loop-backing", 1 << 20);
    let forced = d.join("forced.img");
    let new = d.join("new.img");
    for src in &sources {
        crafted::filled_file(&forced, 1 << 20);
        let out = imgforge(&write_args(src, &s(&forced), &["--force"]));
        assert_eq!(code(&out), 2, "{src} onto a --force file");
        assert_eq!(std::fs::metadata(&forced).unwrap().len(), 1 << 20, "{src} grew the --force target");
        let stderr = String::from_utf8_lossy(&out.stderr);
        // A download is refused by its body limit, before it reaches the writer.
        assert!(stderr.contains("larger than target") || stderr.contains("more than the target"), "{src}");

        let out = imgforge(&write_args(src, &s(&new), &["--size", "1M"]));
        assert_eq!(code(&out), 2, "{src} onto a new file of --size 1M");
        assert!(!new.exists(), "{src}: a new file appeared");

        let out = imgforge(&write_args(src, &lo.dev, &[]));
        assert_eq!(code(&out), 2, "{src} onto {}", lo.dev);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // A download is refused by its body limit, before it reaches the writer.
        assert!(stderr.contains("larger than target") || stderr.contains("more than the target"), "{src}");
    }
    let leftovers: Vec<_> =
        std::fs::read_dir(d).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with('.')).collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

/// `--sha256` that does not match, onto a block device and a `--force` file: exit 2, the
/// first MiB reads as zeros (the message says so); a matching one gives the image byte for
/// byte.
#[test]
fn a_checksum_mismatch_leaves_the_start_of_a_disk_zeroed() {
    fixtures::require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = fixtures::synthetic_raw(d).unwrap();
    let size = std::fs::metadata(&raw).unwrap().len();
    let compressed = d.join("src.raw.zst");
    sh(Command::new("sh").arg("-c").arg(format!("zstd -qc < '{}' > '{}'", raw.display(), compressed.display())))
        .unwrap();
    let lo = crafted::Loop::filled(d, "loop-backing", size + (1 << 20));
    let forced = d.join("forced.img");
    let wrong = "0".repeat(64);
    for src in [&raw, &compressed] {
        let right = digest(src);
        crafted::filled_file(&forced, size);
        let src_arg = s(src);
        for target in [lo.dev.clone(), s(&forced)] {
            let out = imgforge(&write_args(&src_arg, &target, &["--force", "--sha256", &wrong]));
            assert_eq!(code(&out), 2, "{} onto {target}", src.display());
            assert!(crafted::head(Path::new(&target), 1 << 20).iter().all(|b| *b == 0), "{target}: start not zeroed");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("does not match --sha256"), "{stderr}");
            assert!(stderr.contains(&format!("the first MiB of {target} was zeroed")), "{stderr}");

            let out = imgforge(&write_args(&src_arg, &target, &["--force", "--sha256", &right]));
            assert_eq!(code(&out), 0, "{} onto {target}", src.display());
            assert!(same_prefix(&raw, &target, size), "{target} differs from the image");
        }
        assert_eq!(std::fs::metadata(&forced).unwrap().len(), size);
    }
}

/// Waits for `child` at most `limit`; kills it (and fails) when it takes longer.
fn wait_within(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("imgforge still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The first bytes of a qcow2 declaring a `virtual_size`-byte disk with 64 KiB clusters.
fn qcow2_header(virtual_size: u64) -> Vec<u8> {
    let mut h = b"QFI\xfb\0\0\0\x03".to_vec();
    h.resize(4096, 0);
    h[20..24].copy_from_slice(&16u32.to_be_bytes());
    h[24..32].copy_from_slice(&virtual_size.to_be_bytes());
    h
}

/// A server that sends its headers (and maybe part of a body) and then nothing: SIGTERM stops
/// imgforge within a second or two, with the interrupted status and nothing left behind.
#[test]
fn url_stalled_server_stops_on_sigterm() {
    fixtures::require_root();
    let partial = Response { announce: None, after: http::After::Stall, ..Response::full(qcow2_header(1 << 20)) };
    let silent = Response { announce: Some(1 << 20), send: 0, after: http::After::Stall, ..Response::full(vec![]) };
    for (case, response) in [("after headers", silent), ("in a qcow2 body", partial)] {
        let url = http::serve(response);
        let out_dir = tempfile::tempdir().unwrap();
        let target = out_dir.path().join("stalled.img");
        let mut child = Command::new(binary())
            .args(["write", "--progress", "json", "--image", &url, "--target", &s(&target)])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        assert!(child.try_wait().unwrap().is_none(), "{case}: imgforge ended before the signal");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let started = std::time::Instant::now();
        let status = wait_within(&mut child, Duration::from_secs(20));
        eprintln!("{case}: stopped {:?} after SIGTERM", started.elapsed());
        assert!(started.elapsed() < Duration::from_secs(3), "{case}: took {:?} to stop", started.elapsed());
        assert_eq!(status.code(), Some(130), "{case}");
        assert_eq!(std::fs::read_dir(out_dir.path()).unwrap().count(), 0, "{case}: output or download left behind");
    }
}

/// `kill -9` of a URL write stalled mid-download leaves the download beside the target (no
/// destructor runs); the next write there removes it, and nothing imgforge-named stays in the
/// private TMPDIR either.
#[test]
fn url_download_left_by_sigkill_is_removed_by_the_next_write() {
    fixtures::require_root();
    let partial = Response { announce: None, after: http::After::Stall, ..Response::full(qcow2_header(1 << 20)) };
    let url = http::serve(partial);
    let (out_dir, tmp, src) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let target = out_dir.path().join("killed.img");
    let entries = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
    };
    let mut child = Command::new(binary())
        .args(["write", "--progress", "none", "--image", &url, "--target", &s(&target)])
        .env("TMPDIR", tmp.path())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while entries(out_dir.path()).is_empty() {
        assert!(started.elapsed() < Duration::from_secs(20), "no download file appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let left = entries(out_dir.path());
    eprintln!("left by the killed imgforge: {left:?}");
    assert!(left.iter().all(|n| n.starts_with(".imgforge-")), "{left:?}");

    let raw = fixtures::synthetic_raw(src.path()).unwrap();
    let out = imgforge(&["write", "--progress", "none", "--image", &s(&raw), "--target", &s(&target)]);
    assert_eq!(code(&out), 0);
    assert_eq!(entries(out_dir.path()), vec!["killed.img".to_owned()], "the old download was left");
    assert_eq!(entries(tmp.path()), Vec::<String>::new());
}

/// An imgforge in another pid namespace (a container, or another node writing into a shared
/// Ganeti file-storage directory) names its temporaries with pids that mean nothing here: a
/// write beside its target must leave its live download alone (it was removed as a dead
/// process's leftover, pid 1 of the namespace read as a reused pid).
#[test]
fn a_live_download_of_another_pid_namespace_is_not_swept() {
    fixtures::require_root();
    let partial = Response { announce: None, after: http::After::Stall, ..Response::full(qcow2_header(1 << 20)) };
    let url = http::serve(partial);
    let (out_dir, tmp, src) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let entries = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
    };
    let mut other = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg(binary())
        .args(["write", "--progress", "none", "--image", &url, "--target", &s(&out_dir.path().join("theirs.img"))])
        .env("TMPDIR", tmp.path())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while entries(out_dir.path()).is_empty() {
        assert!(other.try_wait().unwrap().is_none(), "the namespaced imgforge ended early");
        assert!(started.elapsed() < Duration::from_secs(20), "no download file appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    let theirs = entries(out_dir.path());
    eprintln!("the other namespace's download: {theirs:?}");

    let raw = fixtures::synthetic_raw(src.path()).unwrap();
    let mine = out_dir.path().join("mine.img");
    let out = imgforge(&["write", "--progress", "none", "--image", &s(&raw), "--target", &s(&mine)]);
    let still_running = other.try_wait().unwrap().is_none();
    other.kill().unwrap();
    other.wait().unwrap();
    assert_eq!(code(&out), 0);
    assert!(still_running, "the namespaced imgforge ended during the other write");
    let mut left = entries(out_dir.path());
    left.sort();
    assert_eq!(left, [theirs, vec!["mine.img".to_owned()]].concat(), "the live download was removed");
}

/// A silent server fails the download after --http-idle-timeout, naming the (redacted) URL.
#[test]
fn url_idle_timeout_fails_a_silent_server() {
    fixtures::require_root();
    let silent = Response { announce: Some(1 << 20), send: 0, after: http::After::Stall, ..Response::full(vec![]) };
    let url = http::serve(silent);
    let out_dir = tempfile::tempdir().unwrap();
    let target = out_dir.path().join("silent.img");
    let started = std::time::Instant::now();
    let mut child = Command::new(binary())
        .args(["write", "--progress", "none", "--http-idle-timeout", "2", "--image", &url, "--target", &s(&target)])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_within(&mut child, Duration::from_secs(30));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    eprintln!("after {:?}: {status}: {stderr}", started.elapsed());
    assert!(started.elapsed() >= Duration::from_secs(2) && started.elapsed() < Duration::from_secs(10));
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains(&url) && stderr.contains("timeout"), "{stderr}");
    assert_eq!(std::fs::read_dir(out_dir.path()).unwrap().count(), 0);
}

/// A body without end onto a 1 MiB target is refused once it passes what the target can hold
/// (raw: its size; qcow2: its size plus room for metadata), and a qcow2 whose header declares a
/// larger disk is refused at the header; the target keeps its size, no download is left.
#[test]
fn url_endless_body_is_refused_near_the_target_size() {
    fixtures::require_root();
    const MIB: u64 = 1 << 20;
    // Bounds the old, unbounded client: it stops after this much and the test fails on it.
    const CAP: u64 = 256 * MIB;
    let endless = |body: Vec<u8>| Response { announce: None, after: http::After::Endless(CAP), ..Response::full(body) };
    let cases = [
        ("raw", endless(vec![0x11; 4096]), 16 * MIB, "passed 1048576 bytes"),
        ("qcow2 of 1 MiB", endless(qcow2_header(MIB)), 17 * MIB + 16 * MIB, "passed 17956864 bytes"),
        ("qcow2 of 64 MiB", endless(qcow2_header(64 * MIB)), 16 * MIB, "the image needs 67108864"),
    ];
    for (case, response, most, message) in cases {
        let server = http::start(response);
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("small.img");
        std::fs::write(&target, vec![0xaa; MIB as usize]).unwrap();
        let mut child = Command::new(binary())
            .args(["write", "--progress", "none", "--force", "--image", &server.url, "--target", &s(&target)])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let status = wait_within(&mut child, Duration::from_secs(120));
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        let sent = server.sent.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!("{case}: {status}, server sent {sent} bytes: {stderr}");
        assert!(sent < most, "{case}: {sent} bytes downloaded for a 1 MiB target");
        assert_eq!(status.code(), Some(2), "{case}");
        assert!(stderr.contains(message), "{case}: {stderr}");
        assert_eq!(std::fs::metadata(&target).unwrap().len(), MIB, "{case}: the target changed size");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "{case}: a download was left behind");
    }
}

/// The HTTP client's own trace log (RUST_LOG=trace) shows the URL whole and the request's bytes:
/// its level is capped, so neither the query token nor the basic-auth header reaches stderr.
#[test]
fn url_credentials_stay_out_of_a_trace_log() {
    fixtures::require_root();
    let dir = tempfile::tempdir().unwrap();
    let raw = fixtures::synthetic_raw(dir.path()).unwrap();
    let server = http::start(Response::full(std::fs::read(&raw).unwrap()));
    let url = server.url.replace("http://", "http://alice:s3cret@") + "?token=t0ken";
    for filter in ["trace", "ureq=trace,ureq_proto=trace"] {
        let target = dir.path().join(format!("{filter}.img"));
        let out = Command::new(binary())
            .args(["write", "-vv", "--progress", "none", "--image", &url, "--target", &s(&target)])
            .env("RUST_LOG", filter)
            .output()
            .unwrap();
        assert_eq!(code(&out), 0, "{filter}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("DEBUG"), "{filter}: no log at all, the test proves nothing");
        // "YWxpY2U6czNjcmV0" is base64("alice:s3cret"), as the Authorization header carries it.
        for secret in ["s3cret", "t0ken", "YWxpY2U6czNjcmV0"] {
            assert!(!stderr.contains(secret), "{filter}: {secret} shown");
        }
    }
}

/// `user:pass@` and query tokens reach the server (as basic authentication and the query) but
/// never stderr, the JSON progress or the verbose log, on success and on failure.
#[test]
fn url_credentials_are_never_shown() {
    fixtures::require_root();
    let dir = tempfile::tempdir().unwrap();
    let raw = fixtures::synthetic_raw(dir.path()).unwrap();
    let body = std::fs::read(&raw).unwrap();
    let short = Response { send: body.len() / 3, ..Response::full(body.clone()) };
    for (case, response, want) in [("complete", Response::full(body), 0), ("truncated", short, 2)] {
        let server = http::start(response);
        let url = server.url.replace("http://", "http://alice:s3cret@") + "?token=t0ken";
        let target = dir.path().join(format!("{case}.img"));
        let out = imgforge(&["write", "-vv", "--progress", "json", "--image", &url, "--target", &s(&target)]);
        assert_eq!(code(&out), want, "{case}");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        for secret in ["s3cret", "t0ken", "alice"] {
            assert!(!stdout.contains(secret) && !stderr.contains(secret), "{case}: {secret} shown");
        }
        let shown = server.url.replace("http://", "http://***@") + "?token=***";
        assert!(stdout.contains(&format!("\"source\":\"{shown}\"")), "{case}: {stdout}");
        let request = server.requests.lock().unwrap().join("");
        assert!(request.contains("GET /image?token=t0ken "), "{request}");
        // base64("alice:s3cret"); header names may come in any case.
        let basic = "authorization: basic YWxpY2U6czNjcmV0\r\n".to_ascii_lowercase();
        assert!(request.to_ascii_lowercase().contains(&basic), "{request}");
    }
}

/// Whether process `pid` holds `path` open.
fn has_open(pid: u32, path: &Path) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == path))
}

/// `--sha256` on a qcow2: another image renamed over the source path once imgforge has it
/// open changes nothing — what is written is what was hashed (one descriptor for the hash,
/// the format check and qemu), never the file the path names later.
#[test]
fn a_source_renamed_over_after_the_open_is_not_what_gets_written() {
    fixtures::require_root();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("original.raw");
    // Random, so the hash takes a while and no zero-skipping hides a difference.
    sh(Command::new("head").args(["-c", "96M", "/dev/urandom"]).stdout(std::fs::File::create(&raw).unwrap())).unwrap();
    let src = dir.path().join("src.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", &s(&raw), &s(&src)]);
    let other = dir.path().join("other.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&other), "96M"]);
    let src = std::fs::canonicalize(&src).unwrap();
    let target = dir.path().join("out.img");
    let mut child = Command::new(binary())
        .args(["write", "--progress", "none", "--image", &s(&src), "--target", &s(&target)])
        .args(["--sha256", &digest(&src)])
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !has_open(child.id(), &src) {
        assert!(started.elapsed() < Duration::from_secs(30), "imgforge never opened {}", src.display());
        assert!(child.try_wait().unwrap().is_none(), "imgforge ended before it was seen holding the source");
        std::thread::sleep(Duration::from_micros(200));
    }
    std::fs::rename(&other, &src).unwrap();
    let status = wait_within(&mut child, Duration::from_secs(300));
    assert_eq!(status.code(), Some(0));
    assert!(std::fs::read(&target).unwrap() == std::fs::read(&raw).unwrap(), "the output is not the verified image");
}

/// A qcow2 and a liveimg by URL with `--sha256`: downloaded beside the target, verified, then
/// read by the confined qemu (or backhand) through the download's own descriptor — which qemu
/// accepts only read-only — and written byte-exact, the download removed.
#[test]
fn url_random_access_formats_are_written_from_the_verified_download() {
    fixtures::require_root();
    let dir = tempfile::tempdir().unwrap();
    let raw = fixtures::synthetic_raw(dir.path()).unwrap();
    let qcow2 = dir.path().join("src.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", &s(&raw), &s(&qcow2)]);
    let liveimg = fixtures::liveimg_of(&raw, "xz", dir.path()).unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    for (name, src) in [("qcow2", &qcow2), ("liveimg", &liveimg)] {
        let url = http::serve(Response::full(std::fs::read(src).unwrap()));
        let target = out_dir.path().join(format!("{name}.img"));
        let out = imgforge(&write_args(&url, &s(&target), &["--sha256", &digest(src)]));
        assert_eq!(code(&out), 0, "{name}");
        assert_eq!(digest(&target), digest(&raw), "{name}");
    }
    let left: Vec<_> = std::fs::read_dir(out_dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left.len(), 2, "downloads left behind: {left:?}");
}
