//! End to end: several variants of one base customized in one helper VM boot
//! (`imgforge::job::variants::customize_variants`, the engine `imgforge build` drives), under
//! qemu TCG, each output read back with the test's own read-only loop mounts, and its tree
//! manifest recomputed here from those mounts.

use imgforge::job::variants::{customize_variants, BaseCheck, OutputFormat, VariantBase, VariantJob, VariantOutcome};
use imgforge::job::{JobError, KnownFormat, VmSettings};
use imgforge::ops::Plan;
use imgforge::progress::{Event, HelperEvent, Progress};
use imgforge_protocol::change::{ChangeKind, FileType};
use imgforge_protocol::manifest::{content_for, manifest_line, ManifestContent};
use imgforge_tests::fixtures::{self, sha256_hex, Shape};
use imgforge_tests::readback::Mount;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

/// Every event, kept.
#[derive(Default)]
struct Recorded(Mutex<Vec<Event>>);

impl Progress for Recorded {
    fn emit(&self, event: Event) {
        self.0.lock().unwrap().push(event);
    }
}

impl Recorded {
    /// How many helper VMs started.
    fn boots(&self) -> usize {
        let events = self.0.lock().unwrap();
        events
            .iter()
            .filter(|e| matches!(e, Event::ImageHelper(HelperEvent::Phase { phase, .. }) if phase.starts_with("qemu started")))
            .count()
    }

    fn names(&self, pick: fn(&Event) -> Option<&str>) -> Vec<String> {
        self.0.lock().unwrap().iter().filter_map(|e| pick(e).map(str::to_owned)).collect()
    }
}

fn settings() -> VmSettings {
    VmSettings::tcg(Duration::from_secs(900))
}

fn plan(ops: &[(&str, &str)]) -> Plan {
    let mut plan = Plan::default();
    for (option, value) in ops {
        plan.add(option, Some(value)).unwrap_or_else(|e| panic!("--{option} {value}: {e}"));
    }
    plan.finish().unwrap();
    plan
}

fn variant(name: &str, dir: &Path, ext: &str, format: OutputFormat, ops: &[(&str, &str)]) -> VariantJob {
    VariantJob {
        name: name.into(),
        plan: plan(ops),
        output: dir.join(format!("{name}.{ext}")),
        format,
        source_date_epoch: None,
    }
}

fn run(base: &Path, variants: Vec<VariantJob>, jobs: usize, progress: &Recorded) -> Vec<VariantOutcome> {
    run_keyed(base, None, variants, jobs, progress)
}

/// [`run`] with the base's SHA-256 given: the digests of its files are kept between builds.
fn run_keyed(
    base: &Path,
    sha256: Option<&str>,
    variants: Vec<VariantJob>,
    jobs: usize,
    progress: &Recorded,
) -> Vec<VariantOutcome> {
    run_checked(base, sha256, None, variants, jobs, progress)
}

/// [`run_keyed`] with a check of the base beside the build.
fn run_checked(
    base: &Path,
    sha256: Option<&str>,
    check: Option<BaseCheck>,
    variants: Vec<VariantJob>,
    jobs: usize,
    progress: &Recorded,
) -> Vec<VariantOutcome> {
    let (_tx, interrupt) = tokio::sync::watch::channel(None);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let base = VariantBase {
        path: base.to_owned(),
        format: KnownFormat::FromHeader,
        sha256: sha256.map(str::to_owned),
        check,
    };
    runtime.block_on(customize_variants(&base, variants, jobs, &settings(), progress, &interrupt))
}

/// A copy of the dos/ext4 fixture in a work directory, its SHA-256, where the digests of its
/// files would be kept (nothing kept yet), and an empty output directory.
fn keyed_base() -> (tempfile::TempDir, PathBuf, String, PathBuf, PathBuf) {
    let work = tempfile::tempdir().unwrap();
    let base = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let sha256 = sha256_hex(&base);
    let kept = imgforge::job::variants::kept_digests_path(&sha256).unwrap();
    let _ = std::fs::remove_file(&kept);
    let out = work.path().join("out");
    std::fs::create_dir(&out).unwrap();
    (work, base, sha256, kept, out)
}

/// A raw copy of `image` (any format qemu-img reads) for the test's loop mounts.
fn as_raw(image: &Path, dir: &Path) -> PathBuf {
    let raw = dir.join(format!("{}.readback.raw", image.file_name().unwrap().to_string_lossy()));
    let out = Command::new("qemu-img").arg("convert").arg("-O").arg("raw").arg(image).arg(&raw).output().unwrap();
    assert!(out.status.success(), "qemu-img convert {}: {}", image.display(), String::from_utf8_lossy(&out.stderr));
    raw
}

fn qemu_img_info(image: &Path) -> serde_json::Value {
    let out = Command::new("qemu-img").args(["info", "--output=json", "-U"]).arg(image).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The tree manifest's SHA-256 of the tree at `root`, computed here with std::fs, as the
/// protocol defines it (the helper computes it in the VM).
fn manifest_sha256(root: &Path) -> String {
    let mut entries = BTreeMap::new();
    walk(root, b"/".to_vec(), &mut entries);
    let mut hasher = Sha256::new();
    for line in entries.values() {
        hasher.update(line.as_bytes());
    }
    hex(&hasher.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn walk(at: &Path, guest: Vec<u8>, entries: &mut BTreeMap<Vec<u8>, String>) {
    let meta = std::fs::symlink_metadata(at).unwrap();
    let ty = FileType::from_mode(meta.mode()).unwrap();
    let content = match ty {
        FileType::File => ManifestContent::Sha256(hex(&Sha256::digest(std::fs::read(at).unwrap()))),
        FileType::Symlink => {
            ManifestContent::LinkTarget(std::fs::read_link(at).unwrap().as_os_str().as_bytes().to_vec())
        }
        _ => ManifestContent::None,
    };
    let content = content_for(&guest, ty, content);
    entries.insert(guest.clone(), manifest_line(&guest, ty, meta.mode(), meta.uid(), meta.gid(), &content));
    if ty == FileType::Directory {
        for entry in std::fs::read_dir(at).unwrap() {
            let entry = entry.unwrap();
            let mut child = guest.clone();
            if child.len() > 1 {
                child.push(b'/');
            }
            child.extend_from_slice(entry.file_name().as_bytes());
            walk(&entry.path(), child, entries);
        }
    }
}

/// Three variants and a failing one of the dos/ext4 fixture in one helper boot: the three are
/// written (raw, qcow2, qcow2 backed by the base), each with its own hostname and file, their
/// manifests match what the test reads; the failing one is reported by name with its task and
/// message and has no output; the base is byte for byte as before.
#[test]
fn three_variants_in_one_boot_and_one_that_fails_alone() {
    let work = tempfile::tempdir().unwrap();
    let base = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let base_sha = sha256_hex(&base);
    let out = work.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let site_file = work.path().join("site.conf");
    std::fs::write(&site_file, "site = ath\n").unwrap();
    let upload = format!("{}:/etc/site.conf", site_file.display());
    let variants = vec![
        variant("ath-web", &out, "raw", OutputFormat::Raw, &[("hostname", "ath-web"), ("upload", &upload)]),
        variant("ath-db", &out, "qcow2", OutputFormat::Qcow2, &[("hostname", "ath-db"), ("write", "/etc/role:db")]),
        variant(
            "ber-web",
            &out,
            "qcow2",
            OutputFormat::Qcow2Backed,
            &[("hostname", "ber-web"), ("delete", "/etc/motd")],
        ),
        variant("broken", &out, "raw", OutputFormat::Raw, &[("hostname", "broken"), ("run-command", "exit 3")]),
    ];
    let progress = Recorded::default();
    let outcomes = run(&base, variants, 1, &progress);

    assert_eq!(progress.boots(), 1, "the four variants share one helper VM boot");
    assert_eq!(sha256_hex(&base), base_sha, "the base image changed");
    let names: Vec<&str> = outcomes.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["ath-web", "ath-db", "ber-web", "broken"]);
    match &outcomes[3].result {
        Err(JobError::TaskFailed { task, message }) => {
            assert_eq!(task, "50-Customize");
            assert!(message.contains("exit 3"), "{message}");
        }
        other => panic!("the broken variant: {other:?}"),
    }
    assert!(!out.join("broken.raw").exists(), "the failed variant has an output");
    let failed = progress.names(|e| match e {
        Event::VariantFailed { name, .. } => Some(name),
        _ => None,
    });
    assert_eq!(failed, ["broken"]);
    let done = progress.names(|e| match e {
        Event::VariantDone { name, .. } => Some(name),
        _ => None,
    });
    assert_eq!(done, ["ath-web", "ath-db", "ber-web"]);
    assert_eq!(
        progress.names(|e| match e {
            Event::VariantStarted { name, .. } => Some(name),
            _ => None,
        }),
        ["ath-web", "ath-db", "ber-web", "broken"]
    );

    let mut manifests = Vec::new();
    for (outcome, hostname) in outcomes[..3].iter().zip(["ath-web", "ath-db", "ber-web"]) {
        let product = outcome.result.as_ref().unwrap_or_else(|e| panic!("{}: {e}", outcome.name));
        assert_eq!(product.output_sha256, sha256_hex(&product.output), "{}", outcome.name);
        let raw = match outcome.name.as_str() {
            "ath-web" => {
                // Sparse as its base: holes stay holes, not written zeros.
                let allocated = |p: &Path| std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(p).unwrap()) * 512;
                let (out_bytes, base_bytes) = (allocated(&product.output), allocated(&base));
                assert!(out_bytes < base_bytes + (64 << 20), "raw output allocates {out_bytes}, its base {base_bytes}");
                product.output.clone()
            }
            _ => as_raw(&product.output, work.path()),
        };
        let mount = Mount::partition(&raw, 0).unwrap();
        assert_eq!(mount.read("/etc/hostname").unwrap().trim(), hostname);
        assert_eq!(product.manifest_sha256, manifest_sha256(mount.path()), "{}: the helper's manifest", outcome.name);
        manifests.push(product.manifest_sha256.clone());
        let changed = |path: &str, kind: ChangeKind| product.changes.iter().any(|c| c.path == path && c.change == kind);
        assert!(changed("/etc/hostname", ChangeKind::Changed), "{}: {:?}", outcome.name, product.changes);
        match outcome.name.as_str() {
            "ath-web" => {
                assert_eq!(mount.read("/etc/site.conf").unwrap(), "site = ath\n");
                assert!(changed("/etc/site.conf", ChangeKind::Added));
            }
            "ath-db" => {
                assert_eq!(mount.read("/etc/role").unwrap(), "db");
                assert!(!mount.join("/etc/site.conf").exists(), "another variant's file");
                assert_eq!(qemu_img_info(&product.output)["format"], "qcow2");
                assert!(qemu_img_info(&product.output).get("backing-filename").is_none());
            }
            _ => {
                assert!(!mount.join("/etc/motd").exists());
                assert!(changed("/etc/motd", ChangeKind::Removed));
                let info = qemu_img_info(&product.output);
                let backing = std::fs::canonicalize(&base).unwrap();
                assert_eq!(info["full-backing-filename"], backing.display().to_string());
                // Thin: it holds what the variant changed, a small part of what the standalone
                // qcow2 of a like variant holds.
                let size = std::fs::metadata(&product.output).unwrap().len();
                let full = std::fs::metadata(&outcomes[1].result.as_ref().unwrap().output).unwrap().len();
                assert!(size * 8 < full, "thin {size} bytes, standalone {full} bytes");
            }
        }
    }
    manifests.sort();
    manifests.dedup();
    assert_eq!(manifests.len(), 3, "three variants with different content, one manifest each");
}

/// Two builds of the same variant give the same tree manifest (and not the same random seed
/// file: its content is listed as `random`), and it is the manifest the test computes.
#[test]
fn identical_rules_give_identical_manifests() {
    let work = tempfile::tempdir().unwrap();
    let base = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let ops = [("hostname", "twin"), ("write", "/etc/twin:same"), ("mkdir", "/opt/twin")];
    let mut digests = Vec::new();
    for run_number in 0..2 {
        let out = work.path().join(format!("run{run_number}"));
        std::fs::create_dir(&out).unwrap();
        let progress = Recorded::default();
        let outcomes = run(&base, vec![variant("twin", &out, "raw", OutputFormat::Raw, &ops)], 2, &progress);
        let product = outcomes[0].result.as_ref().unwrap();
        let mount = Mount::partition(&product.output, 0).unwrap();
        assert_eq!(mount.read("/etc/twin").unwrap(), "same");
        assert_eq!(product.manifest_sha256, manifest_sha256(mount.path()));
        digests.push((product.manifest_sha256.clone(), std::fs::read(mount.join("/var/lib/systemd/random-seed")).ok()));
    }
    assert_eq!(digests[0].0, digests[1].0, "two builds of the same rules");
    if let (Some(a), Some(b)) = (&digests[0].1, &digests[1].1) {
        assert_ne!(a, b, "each image gets its own random seed");
    }
}

/// A base whose root is btrfs (its device number anonymous, as the chroots' /proc's is): two
/// variants of it in one boot, raw and thin, each with the manifest the test computes from its
/// own mount and the change list of what it changed.
#[test]
fn a_btrfs_base_gives_whole_manifests() {
    let work = tempfile::tempdir().unwrap();
    let base = fixtures::btrfs_gpt(work.path(), 768 << 20).unwrap();
    let base_sha = sha256_hex(&base);
    let out = work.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let variants = vec![
        variant("b-raw", &out, "raw", OutputFormat::Raw, &[("hostname", "b-raw"), ("write", "/etc/role:raw")]),
        variant("b-thin", &out, "qcow2", OutputFormat::Qcow2Backed, &[("hostname", "b-thin"), ("delete", "/etc/motd")]),
    ];
    let outcomes = run(&base, variants, 1, &Recorded::default());
    assert_eq!(sha256_hex(&base), base_sha, "the base image changed");
    for outcome in &outcomes {
        let product = outcome.result.as_ref().unwrap_or_else(|e| panic!("{}: {e}", outcome.name));
        let raw = match outcome.name.as_str() {
            "b-raw" => product.output.clone(),
            _ => as_raw(&product.output, work.path()),
        };
        let mount = Mount::partition(&raw, 0).unwrap();
        assert_eq!(mount.read("/etc/hostname").unwrap().trim(), outcome.name);
        assert_eq!(product.manifest_sha256, manifest_sha256(mount.path()), "{}: the helper's manifest", outcome.name);
        let changed = |path: &str, kind: ChangeKind| product.changes.iter().any(|c| c.path == path && c.change == kind);
        assert!(changed("/etc/hostname", ChangeKind::Changed), "{}: {:?}", outcome.name, product.changes);
        match outcome.name.as_str() {
            "b-raw" => assert!(changed("/etc/role", ChangeKind::Added), "{:?}", product.changes),
            _ => assert!(changed("/etc/motd", ChangeKind::Removed), "{:?}", product.changes),
        }
    }
}

/// The digests of the base's files that a build keeps are given to the next build of that base:
/// its manifest is the same and the one the test computes; the kept digests are used (a wrong
/// one shows in the manifest); a damaged cache is not used, and is replaced by a sound one.
#[test]
fn kept_digests_of_the_base_give_the_same_manifests() {
    use imgforge_protocol::digest_cache;
    let work = tempfile::tempdir().unwrap();
    let base = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let sha256 = sha256_hex(&base);
    let kept = imgforge::job::variants::kept_digests_path(&sha256).unwrap();
    let _ = std::fs::remove_file(&kept);
    let ops = [("hostname", "kept"), ("write", "/etc/kept:digests")];
    let build = |label: &str| -> String {
        let out = work.path().join(label);
        std::fs::create_dir(&out).unwrap();
        let outcomes = run_keyed(
            &base,
            Some(&sha256),
            vec![variant("v", &out, "raw", OutputFormat::Raw, &ops)],
            1,
            &Recorded::default(),
        );
        let product = outcomes[0].result.as_ref().unwrap_or_else(|e| panic!("{label}: {e}"));
        let digest = product.manifest_sha256.clone();
        std::fs::remove_file(&product.output).unwrap();
        digest
    };

    let cold = build("cold");
    let entries = digest_cache::parse(&std::fs::read(&kept).expect("the cold build kept the digests")).unwrap();
    let passwd = entries.iter().find(|e| e.path == b"/etc/passwd").expect("an untouched file of the base is kept");
    let mount = Mount::partition(&base, 0).unwrap();
    assert_eq!(passwd.sha256, sha256_hex(&mount.join("/etc/passwd")));
    // A file the variant changed is kept as the base holds it (its record is the base's).
    let hostname = entries.iter().find(|e| e.path == b"/etc/hostname").expect("the base's hostname is kept");
    assert_eq!(hostname.sha256, sha256_hex(&mount.join("/etc/hostname")));
    drop(mount);

    assert_eq!(build("warm"), cold, "the kept digests give the manifest the files do");

    let mut poisoned = entries.clone();
    poisoned.iter_mut().find(|e| e.path == b"/etc/passwd").unwrap().sha256 = "0".repeat(64);
    std::fs::write(&kept, digest_cache::render(&poisoned)).unwrap();
    assert_ne!(build("poisoned"), cold, "the kept digests are what the helper uses");

    std::fs::write(&kept, b"imgforge-digests 1\nnot an entry\n").unwrap();
    assert_eq!(build("damaged"), cold, "a damaged cache is not used");
    assert!(digest_cache::parse(&std::fs::read(&kept).unwrap()).is_ok(), "and a sound one replaces it");
}

/// The base file changed while the helper VM read it (its SHA-256 was checked before): the
/// digests that boot found are of some other bytes than those the SHA-256 names, and are not
/// kept for the next build of that base.
#[test]
fn a_base_changed_during_the_build_keeps_no_digests() {
    let (_work, base, sha256, kept, out) = keyed_base();
    let watched = base.clone();
    let toucher = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        while imgforge_tests::run::holders(&watched).is_empty() {
            assert!(std::time::Instant::now() < deadline, "nothing opened the base");
            std::thread::sleep(Duration::from_millis(20));
        }
        // A write of the same bytes: the file's change time moves, as with any other write.
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&watched).unwrap();
        let mut first = [0u8; 512];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut first, 0).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &first, 0).unwrap();
    });
    let outcomes = run_keyed(
        &base,
        Some(&sha256),
        vec![variant("v", &out, "raw", OutputFormat::Raw, &[("hostname", "changed")])],
        1,
        &Recorded::default(),
    );
    toucher.join().unwrap();
    outcomes[0].result.as_ref().unwrap();
    assert!(!kept.exists(), "digests of a base that changed during the build were kept");
}

/// After each variant's operations the helper lists again only the directories the kernel
/// reported changes in (fanotify), not the whole tree: with every kind of change an operation
/// can make (a new tree then moved, a directory moved and made anew under its old name, a tree
/// removed, a directory's mode, a file changed through a hard link elsewhere, truncated, its
/// owner changed, a file replaced by a symlink), the manifests of two variants of one boot
/// (the second starts from the first's record of the base) are what the test computes.
#[test]
fn the_manifest_from_reported_changes_is_the_whole_tree_s() {
    let work = tempfile::tempdir().unwrap();
    let base = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let out = work.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let script = "set -e; \
        mkdir -p /opt/t/a/b; echo x > /opt/t/a/b/f; mv /opt/t /opt/moved; \
        mv /etc/default /etc/default-old; mkdir /etc/default; echo y > /etc/default/fresh; \
        rm -r \"$(ls -d /usr/share/doc/* | head -n 1)\"; \
        rm -rf /var/cache/apt; mkdir /var/cache/apt; \
        chmod 0700 /var/log; \
        ln /usr/share/base-files/motd /root/motd-twin; echo twin >> /root/motd-twin; \
        truncate -s 1 /etc/issue.net; chown 1:1 /etc/issue; \
        rm -f /etc/motd; ln -s issue /etc/motd";
    let variants = ["one", "two"]
        .iter()
        .map(|name| variant(name, &out, "raw", OutputFormat::Raw, &[("hostname", name), ("run-command", script)]))
        .collect();
    let progress = Recorded::default();
    let outcomes = run(&base, variants, 1, &progress);
    assert_eq!(progress.boots(), 1);
    let tracked = progress
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(
            |e| matches!(e, Event::ImageHelper(HelperEvent::Phase { phase, .. }) if phase == "helper manifest-tracked"),
        )
        .count();
    assert_eq!(tracked, 2, "both variants' trees came from the changes the kernel reported");
    for outcome in &outcomes {
        let product = outcome.result.as_ref().unwrap_or_else(|e| panic!("{}: {e}", outcome.name));
        let mount = Mount::partition(&product.output, 0).unwrap();
        assert!(mount.read("/usr/share/base-files/motd").unwrap().ends_with("twin\n"));
        assert_eq!(mount.read("/etc/default/fresh").unwrap(), "y\n");
        assert_eq!(
            product.manifest_sha256,
            manifest_sha256(mount.path()),
            "{}: the helper's manifest against the whole tree's",
            outcome.name
        );
        let changed = |path: &str| product.changes.iter().any(|c| c.path == path && c.change == ChangeKind::Changed);
        assert!(changed("/usr/share/base-files/motd"), "{}: {:?}", outcome.name, product.changes);
    }
}

/// A base whose check (run beside the build) fails: every variant fails with the check's
/// reason, no output is published (none left half-made either), and no digest of the base's
/// files is kept.
#[test]
fn a_base_failing_its_check_publishes_nothing() {
    let (_work, base, sha256, kept, out) = keyed_base();
    let (verdict, check) = BaseCheck::pending();
    verdict.send(Some(Err("base.img is not the base the recipe names".into()))).unwrap();
    let variants = ["one", "two"]
        .iter()
        .map(|name| variant(name, &out, "raw", OutputFormat::Raw, &[("hostname", name)]))
        .collect();
    let outcomes = run_checked(&base, Some(&sha256), Some(check), variants, 1, &Recorded::default());
    for outcome in &outcomes {
        let error = outcome.result.as_ref().err().unwrap_or_else(|| panic!("{} was published", outcome.name));
        assert!(error.to_string().contains("is not the base the recipe names"), "{}: {error}", outcome.name);
    }
    let left: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "files left in the output directory: {left:?}");
    assert!(!kept.exists(), "digests kept for a base that failed its check");
}

/// Two boots side by side read a cold base: each reads a share of its files, gives their
/// digests, and takes the other's through the host rather than reading them too. Each variant's
/// manifest is the one the test computes from its own mount, and the digests kept afterwards
/// cover every file of the base, each as the base holds it.
#[test]
fn boots_side_by_side_share_the_reading_of_a_cold_base() {
    let (_work, base, sha256, kept, out) = keyed_base();
    let progress = Recorded::default();
    let variants = ["left", "right"]
        .iter()
        .map(|name| {
            let file = format!("/etc/side:{name}");
            variant(name, &out, "raw", OutputFormat::Raw, &[("hostname", name), ("write", &file)])
        })
        .collect();
    let outcomes = run_keyed(&base, Some(&sha256), variants, 2, &progress);
    assert_eq!(progress.boots(), 2, "one boot a lane");
    let phases = |name: &str| {
        let events = progress.0.lock().unwrap();
        events
            .iter()
            .filter(|e| matches!(e, Event::ImageHelper(HelperEvent::Phase { phase, .. }) if phase == &format!("helper {name}")))
            .count()
    };
    assert_eq!(phases("digests-given"), 2, "each boot gave its share");
    // The boot that gives last reads the rest for a second or more while the host hands over.
    assert!(phases("digests-taken") >= 1, "no boot took the other's digests");
    for outcome in &outcomes {
        let product = outcome.result.as_ref().unwrap_or_else(|e| panic!("{}: {e}", outcome.name));
        let mount = Mount::partition(&product.output, 0).unwrap();
        assert_eq!(mount.read("/etc/side").unwrap(), outcome.name);
        assert_eq!(product.manifest_sha256, manifest_sha256(mount.path()), "{}", outcome.name);
    }
    let entries = imgforge_protocol::digest_cache::parse(&std::fs::read(&kept).expect("digests kept")).unwrap();
    let mount = Mount::partition(&base, 0).unwrap();
    let mut files = BTreeMap::new();
    walk(mount.path(), b"/".to_vec(), &mut files);
    let regular =
        files.keys().filter(|p| std::fs::symlink_metadata(mount.join(&String::from_utf8_lossy(p))).unwrap().is_file());
    assert_eq!(entries.len(), regular.count(), "every file of the base is kept");
    for e in entries.iter().filter(|e| [&b"/etc/passwd"[..], b"/etc/hostname", b"/bin/sh"].contains(&e.path.as_slice()))
    {
        assert_eq!(e.sha256, sha256_hex(&mount.join(&String::from_utf8_lossy(&e.path))), "{:?}", e.path);
    }
}
