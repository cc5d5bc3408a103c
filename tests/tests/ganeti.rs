//! The Ganeti OS definition, run as Ganeti runs it: the installed scripts, an emptied
//! environment (`PATH=/sbin:/bin:/usr/sbin:/usr/bin`, no HOME, cwd = the OS directory), a file
//! disk; results read back with the test's own loop mount.

use imgforge_tests::crafted;
use imgforge_tests::fixtures::{self, sh, Shape};
use imgforge_tests::readback::{password_matches, shadow_field, Mount};
use imgforge_tests::run::binary;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

mod progress_schema;

struct Site {
    _dir: tempfile::TempDir,
    os_dir: PathBuf,
    config: PathBuf,
    disks: PathBuf,
}

fn site() -> Site {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    sh(Command::new("cp")
        .arg("--sparse=always")
        .arg(fixtures::disk(Shape::DosExt4).unwrap())
        .arg(images.join("debian.img")))
    .unwrap();
    let config = dir.path().join("imgforge.default");
    let monitor = dir.path().join("monitor.jsonl");
    std::fs::write(
        &config,
        format!(
            "IMAGE_DIR={}\nACCEL=tcg\nHELPER_SOFT_TIMEOUT=300\nHELPER_HARD_TIMEOUT=5\nPROGRESS_MONITOR=\"cat >> {}\"\n",
            images.display(),
            monitor.display()
        ),
    )
    .unwrap();
    let os_dir = dir.path().join("os");
    let out = Command::new(binary()).args(["ganeti", "install-os", "--os-dir"]).arg(&os_dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let disks = dir.path().join("disks");
    std::fs::create_dir_all(&disks).unwrap();
    Site { os_dir: os_dir.join("imgforge"), config, disks, _dir: dir }
}

impl Site {
    fn disk(&self, name: &str) -> PathBuf {
        let p = self.disks.join(name);
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(2 << 30).unwrap();
        p
    }

    fn run(&self, script: &str, env: &[(&str, &str)], stdin: Option<&Path>) -> Output {
        let mut c = Command::new(self.os_dir.join(script));
        c.env_clear()
            .env("PATH", "/sbin:/bin:/usr/sbin:/usr/bin")
            .env("OS_API_VERSION", "20")
            .env("OS_NAME", "imgforge")
            .env("OS_VARIANT", "default")
            .env("DISK_COUNT", "1")
            .env("IMGFORGE_GANETI_CONFIG", &self.config)
            .current_dir(&self.os_dir)
            .envs(env.iter().copied());
        if let Some(p) = stdin {
            c.stdin(Stdio::from(std::fs::File::open(p).unwrap()));
        }
        let out = c.output().unwrap();
        eprintln!("{script} -> {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
        out
    }
}

#[test]
fn os_definition_files() {
    let s = site();
    assert_eq!(std::fs::read_to_string(s.os_dir.join("ganeti_api_version")).unwrap(), "20\n");
    assert_eq!(std::fs::read_to_string(s.os_dir.join("variants.list")).unwrap(), "default\n");
    let params = std::fs::read_to_string(s.os_dir.join("parameters.list")).unwrap();
    for p in ["img_id", "img_format", "img_passwd", "img_passwd_hash", "img_properties", "img_personality", "auth_keys"]
    {
        assert!(params.lines().any(|l| l.starts_with(&format!("{p} "))), "{p} missing");
    }
    for script in ["create", "import", "export", "rename", "verify"] {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(s.os_dir.join(script)).unwrap().permissions().mode() & 0o100, 0o100);
    }
}

/// A group's id in `/etc/group` text.
fn group_id(group_file: &str, name: &str) -> u32 {
    group_file
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:x:")).and_then(|rest| rest.split(':').next()?.parse().ok()))
        .unwrap_or_else(|| panic!("no group {name} in the guest"))
}

/// The machine id planted in the test's image.
const IMAGE_MACHINE_ID: &str = "0123456789abcdef0123456789abcdef\n";

#[test]
fn create_rename_export_import() {
    let s = site();
    {
        // The personality's chown is the helper's own: a guest chown that ran would leave a mark
        // (and change no owner).
        let image = Mount::writable_partition(&s.config.parent().unwrap().join("images/debian.img"), 0).unwrap();
        let chown = image.join("/usr/bin/chown");
        std::fs::write(&chown, "#!/bin/sh\necho \"$@\" >> /root/guest-chown-ran\n").unwrap();
        std::fs::set_permissions(&chown, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        // What every instance of this image would share but for ChangeMachineId and DeleteSSHKeys.
        std::fs::write(image.join("/etc/machine-id"), IMAGE_MACHINE_ID).unwrap();
        std::fs::create_dir_all(image.join("/etc/ssh")).unwrap();
        std::fs::write(image.join("/etc/ssh/ssh_host_ed25519_key"), "image key\n").unwrap();
    }
    let disk = s.disk("inst1.disk0");
    let disk_str = disk.to_str().unwrap();
    // A path with a quote and a group that is not the owner's primary group.
    let personality = r#"[{"path": "/etc/imgforge-personality", "contents": "cGVyc29uYWxpdHkK", "owner": "alice", "group": "adm", "mode": 384},
        {"path": "/etc/it's-mine", "contents": "", "owner": "root", "group": "alice", "mode": 420}]"#;
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGanetiTestKey000000000000000000000000000 ganeti@test";
    let out = s.run(
        "create",
        &[
            ("INSTANCE_NAME", "inst1.example.com"),
            ("DISK_0_PATH", disk_str),
            ("OSP_IMG_ID", "debian"),
            ("OSP_IMG_FORMAT", "diskdump"),
            ("OSP_IMG_PASSWD", "Ganeti-Pw-1"),
            ("OSP_IMG_PERSONALITY", personality),
            ("OSP_AUTH_KEYS", key),
            (
                "OSP_IMG_PROPERTIES",
                r#"{"USERS": "root alice", "root_partition": 1, "Passwd_Hashing_Method": "sha256", "Frobnicate": "1"}"#,
            ),
            ("NIC_COUNT", "2"),
            ("NIC_0_MAC", "aa:00:00:77:5e:a9"),
            ("NIC_0_IP", "192.0.2.10"),
            ("NIC_0_NETWORK_SUBNET", "192.0.2.0/24"),
            ("NIC_0_NETWORK_GATEWAY", "192.0.2.1"),
            ("NIC_0_MODE", "bridged"),
            ("NIC_0_LINK", "gntbr0"),
            ("NIC_1_MAC", "aa:00:00:77:5e:aa"),
        ],
        None,
    );
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("warning: img_properties: unknown property FROBNICATE ignored"),
        "an unknown property vanished from the OS log: {log}"
    );
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 2 << 30, "Ganeti's disk file was replaced or resized");
    // The progress went to PROGRESS_MONITOR as snf-image monitor messages.
    let monitor = std::fs::read_to_string(s.config.parent().unwrap().join("monitor.jsonl")).unwrap();
    let types: Vec<String> =
        progress_schema::events(&monitor).iter().map(|e| e["type"].as_str().unwrap().to_owned()).collect();
    for t in ["image-info", "image-copy-progress", "image-helper", "image-done"] {
        assert!(types.iter().any(|x| x == t), "{t} missing from the monitor's input: {types:?}");
    }
    {
        let m = Mount::partition(&disk, 0).unwrap();
        assert_eq!(m.read("/etc/hostname").unwrap(), "inst1.example.com\n");
        // snf-image's PASSWD_HASHING_METHOD (any case) picks SHA-256 crypt.
        let root_hash = shadow_field(&m.read("/etc/shadow").unwrap(), "root").unwrap();
        assert!(root_hash.starts_with("$5$"), "PASSWD_HASHING_METHOD=sha256 wrote {root_hash}");
        assert!(
            password_matches("Ganeti-Pw-1", &shadow_field(&m.read("/etc/shadow").unwrap(), "root").unwrap()),
            "password does not verify"
        );
        assert!(
            password_matches("Ganeti-Pw-1", &shadow_field(&m.read("/etc/shadow").unwrap(), "alice").unwrap()),
            "password does not verify"
        );
        assert_eq!(m.read("/etc/imgforge-personality").unwrap(), "personality\n");
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(m.join("/etc/imgforge-personality")).unwrap();
        let alice = std::fs::metadata(m.join("/home/alice")).unwrap();
        let adm = group_id(&m.read("/etc/group").unwrap(), "adm");
        assert_eq!((meta.mode() & 0o7777, meta.uid(), meta.gid()), (0o600, alice.uid(), adm));
        let quoted = std::fs::metadata(m.join("/etc/it's-mine")).unwrap();
        assert_eq!((quoted.mode() & 0o7777, quoted.uid(), quoted.gid()), (0o644, 0, alice.gid()));
        assert!(!m.join("/root/guest-chown-ran").exists(), "the guest's chown ran");
        assert_eq!(m.read("/root/.ssh/authorized_keys").unwrap(), format!("{key}\n"));
        let id = m.read("/etc/machine-id").unwrap();
        assert!(id != IMAGE_MACHINE_ID && id.len() == 33, "the instance kept the image's machine id: {id:?}");
        assert!(!m.join("/etc/ssh/ssh_host_ed25519_key").exists(), "the instance kept the image's host key");
        // A Debian image with neither /etc/network nor networkd enabled: networkd files,
        // directories created (snf-image fails here).
        let nic0 = m.read("/etc/systemd/network/50-imgforge-nic0.network").unwrap();
        assert!(
            nic0.contains("MACAddress=aa:00:00:77:5e:a9")
                && nic0.contains("Address=192.0.2.10/24")
                && nic0.contains("Gateway=192.0.2.1"),
            "{nic0}"
        );
        assert!(m.read("/etc/systemd/network/50-imgforge-nic1.network").unwrap().contains("DHCP=yes"));
    }

    let out = s.run(
        "rename",
        &[("INSTANCE_NAME", "inst2"), ("OLD_INSTANCE_NAME", "inst1.example.com"), ("DISK_0_PATH", disk_str)],
        None,
    );
    assert!(out.status.success());
    assert_eq!(Mount::partition(&disk, 0).unwrap().read("/etc/hostname").unwrap(), "inst2\n");

    let exported = s.disks.join("exported.raw");
    let out = s.run("export", &[("INSTANCE_NAME", "inst2"), ("DISK_0_PATH", disk_str)], None);
    assert!(out.status.success());
    std::fs::write(&exported, &out.stdout).unwrap();
    assert_eq!(out.stdout.len() as u64, 2 << 30);
    let second = s.disk("inst3.disk0");
    let out =
        s.run("import", &[("INSTANCE_NAME", "inst3"), ("DISK_0_PATH", second.to_str().unwrap())], Some(&exported));
    assert!(out.status.success());
    assert_eq!(
        sh(Command::new("sha256sum").arg(&second)).unwrap().split_whitespace().next(),
        sh(Command::new("sha256sum").arg(&disk)).unwrap().split_whitespace().next()
    );
}

#[test]
fn verify_rejects_bad_parameters_before_touching_a_disk() {
    let s = site();
    let ok = s.run("verify", &[("OSP_IMG_ID", "debian")], None);
    assert!(ok.status.success());
    for (param, value, want) in [
        ("OSP_IMG_PROPERTIES", "{not json", "img_properties"),
        ("OSP_IMG_ID", "../images/debian.img", "img_id"),
        ("OSP_IMG_ID", "nonexistent", "no such image"),
        ("OSP_IMG_FORMAT", "vmdk", "img_format"),
        ("OSP_IMG_PROPERTIES", r#"{"OSFAMILY": "windows"}"#, "Linux images only"),
        ("OSP_IMG_PERSONALITY", r#"[{"path": "relative", "contents": ""}]"#, "img_personality"),
        ("OSP_IMG_ID", "file://debian", "write local://NAME"),
        ("OSP_IMG_ID", "local://nonexistent", "no such image"),
        ("OSP_IMG_PROPERTIES", r#"{"PASSWD_HASHING_METHOD": "blowfish"}"#, "glibc's crypt"),
        ("OSP_IMG_PROPERTIES", r#"{"passwd_hashing_method": "md5"}"#, "md5 crypt is refused"),
        ("OSP_IMG_PROPERTIES", r#"{"SWAP": "2:512"}"#, "SWAP"),
    ] {
        let mut env = vec![("OSP_IMG_ID", "debian")];
        env.retain(|(k, _)| *k != param);
        env.push((param, value));
        let out = s.run("verify", &env, None);
        assert!(!out.status.success(), "{param}={value} accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(want),
            "{param}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A symlink in IMAGE_DIR leading outside it is refused.
    let images = s.config.parent().unwrap().join("images");
    std::os::unix::fs::symlink("/etc/passwd", images.join("escape.img")).unwrap();
    let out = s.run("verify", &[("OSP_IMG_ID", "escape")], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("outside IMAGE_DIR"));
}

use imgforge_tests::fixtures::sha256_hex as sha256;

/// `img_id=local://NAME` deploys the file NAME of IMAGE_DIR (byte for byte, with every task
/// excluded), with the checks a plain name gets; `img_id=null` writes nothing (the disk keeps
/// every byte, even with a password given) and says so, for create, rename and verify; other
/// schemes are refused naming img_id.
#[test]
fn local_and_null_image_ids() {
    let s = site();
    let image = s.config.parent().unwrap().join("images/debian.img");
    let image_len = std::fs::metadata(&image).unwrap().len();
    let disk = s.disk("local.disk0");
    let out = s.run(
        "create",
        &[
            ("INSTANCE_NAME", "local.example.com"),
            ("DISK_0_PATH", disk.to_str().unwrap()),
            ("OSP_IMG_ID", "local://debian.img"),
            ("OSP_IMG_FORMAT", "diskdump"),
            ("OSP_IMG_PROPERTIES", r#"{"exclude_all_tasks": "yes"}"#),
        ],
        None,
    );
    assert!(out.status.success());
    let status = Command::new("cmp").arg("-n").arg(image_len.to_string()).arg(&image).arg(&disk).status().unwrap();
    assert!(status.success(), "the disk does not hold local://debian.img");

    let untouched = crafted::filled_file(&s.disks.join("null.disk0"), 8 << 20);
    let before = sha256(&untouched);
    for id in ["local://../images/debian.img", "local://", "file://debian.img", "pithos://u/c/debian"] {
        let out = s.run(
            "create",
            &[("INSTANCE_NAME", "bad.example.com"), ("DISK_0_PATH", untouched.to_str().unwrap()), ("OSP_IMG_ID", id)],
            None,
        );
        assert!(!out.status.success(), "img_id={id} accepted");
        assert!(String::from_utf8_lossy(&out.stderr).contains("OS parameter img_id"), "img_id={id}");
        assert_eq!(sha256(&untouched), before, "img_id={id} touched the disk");
    }

    let null_env = [
        ("INSTANCE_NAME", "null.example.com"),
        ("DISK_0_PATH", untouched.to_str().unwrap()),
        ("OSP_IMG_ID", "null"),
        ("OSP_IMG_PASSWD", "Ganeti-Pw-1"),
        ("OSP_IMG_PROPERTIES", r#"{"Frobnicate": "1"}"#),
    ];
    let out = s.run("create", &null_env, None);
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("img_id=null: nothing written to"), "{log}");
    assert!(log.contains("img_id=null: img_passwd ignored"), "{log}");
    assert!(log.contains("unknown property FROBNICATE ignored"), "{log}");
    assert_eq!(sha256(&untouched), before, "img_id=null touched the disk");
    let out = s.run("rename", &null_env, None);
    assert!(out.status.success());
    assert_eq!(sha256(&untouched), before, "rename of an img_id=null instance touched the disk");
    assert!(s.run("verify", &[("OSP_IMG_ID", "null")], None).status.success());
    assert!(s.run("verify", &[("OSP_IMG_ID", "local://debian")], None).status.success());
}

/// Ganeti's disks are raw: a tenant who wrote a qcow2 header at sector 0 of the instance's
/// disk (in the MBR's boot code, the partition table intact) still gets a raw disk renamed.
/// Sniffed, the disk was opened as a qcow2 (with whatever data file the header named).
#[test]
fn a_raw_disk_starting_with_a_qcow2_header_stays_raw() {
    let s = site();
    let disk = s.disks.join("inst9.disk0");
    sh(Command::new("cp").arg("--sparse=always").arg(fixtures::disk(Shape::DosExt4).unwrap()).arg(&disk)).unwrap();
    let mut header = vec![0u8; 104];
    header[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
    header[20..24].copy_from_slice(&16u32.to_be_bytes());
    header[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
    header[100..104].copy_from_slice(&104u32.to_be_bytes());
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().write_all_at(&header, 0).unwrap();
    let out = s.run("rename", &[("INSTANCE_NAME", "inst9"), ("DISK_0_PATH", disk.to_str().unwrap())], None);
    assert!(out.status.success());
    assert_eq!(Mount::partition(&disk, 0).unwrap().read("/etc/hostname").unwrap(), "inst9\n");
    let mut kept = vec![0u8; 104];
    std::fs::File::open(&disk).unwrap().read_exact_at(&mut kept, 0).unwrap();
    assert_eq!(kept, header, "the header the tenant wrote is kept");
}

/// `create` with a 2 KB `img_id` that decodes to 64 MiB (two zstd frames, the first announcing
/// 4 KiB) and `import` of 8 MiB on stdin, onto a 1 MiB file disk: exit 2 as soon as the image
/// outgrows the disk, which keeps its size.
#[test]
fn create_and_import_never_write_past_the_disk() {
    let s = site();
    let images = s.config.parent().unwrap().join("images");
    let crafted_dir = tempfile::tempdir().unwrap();
    std::fs::copy(crafted::zstd_frames(crafted_dir.path()), images.join("frames.raw.zst")).unwrap();
    let disk = crafted::filled_file(&s.disks.join("small.disk0"), 1 << 20);
    let disk_str = disk.to_str().unwrap();
    let out = s.run(
        "create",
        &[
            ("INSTANCE_NAME", "small.example.com"),
            ("DISK_0_PATH", disk_str),
            ("OSP_IMG_ID", "frames.raw.zst"),
            ("OSP_IMG_FORMAT", "diskdump"),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 1 << 20, "create grew DISK_0_PATH");
    assert!(String::from_utf8_lossy(&out.stderr).contains("larger than target"));

    let stream = crafted::filled_file(&crafted_dir.path().join("stream.raw"), 8 << 20);
    let out = s.run("import", &[("INSTANCE_NAME", "small.example.com"), ("DISK_0_PATH", disk_str)], Some(&stream));
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 1 << 20, "import grew DISK_0_PATH");
    assert!(String::from_utf8_lossy(&out.stderr).contains("larger than target"));
}

/// `export` blocked on a pipe nobody reads (Ganeti's transfer stalled) stops on SIGTERM with
/// the interrupted status instead of ignoring it.
#[test]
fn export_stops_on_sigterm() {
    let s = site();
    let disk = s.disk("inst-export.disk0");
    let mut child = Command::new(s.os_dir.join("export"))
        .env_clear()
        .env("PATH", "/sbin:/bin:/usr/sbin:/usr/bin")
        .env("OS_API_VERSION", "20")
        .env("IMGFORGE_GANETI_CONFIG", &s.config)
        .env("DISK_COUNT", "1")
        .env("DISK_0_PATH", &disk)
        .current_dir(&s.os_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(child.try_wait().unwrap().is_none(), "export ended before the signal");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > std::time::Duration::from_secs(20) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("export still running 20 s after SIGTERM");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    eprintln!("export stopped {:?} after SIGTERM: {status}", started.elapsed());
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(status.code(), Some(130));
}

/// Size of the filesystem mounted at `dir`, as df reports it.
fn df_bytes(dir: &Path) -> u64 {
    sh(Command::new("df").args(["-B1", "--output=size"]).arg(dir))
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// `create` grows the 1 GiB image into the 2 GiB instance disk, as snf-image does; snf-image's
/// `EXCLUDE_FilesystemResize_TASKS` keeps the filesystem its size, the partition still grown.
#[test]
fn create_grows_the_image_into_the_instance_disk() {
    let s = site();
    for (name, properties, grown) in
        [("grow1", "{}", true), ("grow2", r#"{"EXCLUDE_FilesystemResize_TASKS": "yes"}"#, false)]
    {
        let disk = s.disk(&format!("{name}.disk0"));
        let out = s.run(
            "create",
            &[
                ("INSTANCE_NAME", name),
                ("DISK_0_PATH", disk.to_str().unwrap()),
                ("OSP_IMG_ID", "debian"),
                ("OSP_IMG_FORMAT", "diskdump"),
                ("OSP_IMG_PROPERTIES", properties),
            ],
            None,
        );
        assert!(out.status.success());
        let part = imgforge_tests::readback::partitions(&disk).unwrap()[0];
        assert_eq!(part.offset + part.size, 2 << 30, "{name}: the root partition does not reach the end of the disk");
        let fs = df_bytes(Mount::partition(&disk, 0).unwrap().path());
        assert_eq!(fs > 1900 << 20, grown, "{name}: the root filesystem has {fs} bytes");
    }
}

/// A small raw "image" of `len` bytes that differ from block to block (no VM reads it: the
/// tests that deploy it exclude every task).
fn small_image(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn hex_digest(data: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d");
    std::fs::write(&p, data).unwrap();
    sha256(&p)
}

/// Whether `disk` starts with `image`.
fn holds(disk: &Path, image: &[u8]) -> bool {
    crafted::head(disk, image.len()) == image
}

const NO_TASKS: &str = r#"{"EXCLUDE_ALL_TASKS": "yes"}"#;

/// An http image is checked against `img_sha256`, or else the `.sha256` beside it, before
/// anything is written: a wrong digest (either way) or a `.sha256` that is not one fails the
/// create naming the URL and both digests, the disk byte-identical; a right one deploys; an
/// image without `.sha256` deploys unchecked, saying so; `img_sha256=none` fetches none.
/// A local image is checked against `img_sha256` too.
#[test]
fn url_images_are_checked_before_the_disk_is_written() {
    let s = site();
    let image = small_image(24 << 20);
    let right = hex_digest(&image);
    let wrong = hex_digest(b"another image");
    let files = vec![
        ("/img/good.raw".to_string(), image.clone()),
        ("/img/good.raw.sha256".to_string(), format!("{wrong}  other.raw\n{right}  good.raw\n").into_bytes()),
        ("/img/bad.raw".to_string(), image.clone()),
        ("/img/bad.raw.sha256".to_string(), format!("{wrong} *bad.raw\n").into_bytes()),
        ("/img/plain.raw".to_string(), image.clone()),
        ("/img/html.raw".to_string(), image.clone()),
        ("/img/html.raw.sha256".to_string(), b"<html>not found</html>\n".to_vec()),
    ];
    let (base, requests) = imgforge_tests::http::serve_files(files);
    std::fs::write(s.config.parent().unwrap().join("images/small.raw"), &image).unwrap();
    let create = |id: &str, sha: Option<&str>, disk: &Path| {
        let mut env = vec![
            ("INSTANCE_NAME", "sum.example.com"),
            ("DISK_0_PATH", disk.to_str().unwrap()),
            ("OSP_IMG_ID", id),
            ("OSP_IMG_FORMAT", "diskdump"),
            ("OSP_IMG_PROPERTIES", NO_TASKS),
        ];
        if let Some(sha) = sha {
            env.push(("OSP_IMG_SHA256", sha));
        }
        let out = s.run("create", &env, None);
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };

    // Refused: the disk keeps every byte (a disk of 0xff, larger than the image).
    let disk = crafted::filled_file(&s.disks.join("sum.disk0"), 64 << 20);
    let before = sha256(&disk);
    let bad_url = format!("{base}/img/bad.raw");
    let good_url = format!("{base}/img/good.raw");
    for (id, sha, want) in [
        (bad_url.as_str(), None, vec![bad_url.clone(), wrong.clone(), right.clone()]),
        (good_url.as_str(), Some(wrong.as_str()), vec![good_url.clone(), wrong.clone(), right.clone()]),
        ("small.raw", Some(wrong.as_str()), vec!["small.raw".into(), wrong.clone(), right.clone()]),
        (
            &format!("{base}/img/html.raw"),
            None,
            vec![format!("{base}/img/html.raw.sha256"), "line 1 is not".into(), "img_sha256".into()],
        ),
        (good_url.as_str(), Some("12345"), vec!["img_sha256".into()]),
    ] {
        let (code, log) = create(id, sha, &disk);
        assert_ne!(code, Some(0), "{id} with {sha:?} deployed");
        for w in want {
            assert!(log.contains(&w), "{id} with {sha:?}: {w:?} missing from the log: {log}");
        }
        assert_eq!(sha256(&disk), before, "{id} with {sha:?} touched the disk");
    }

    // Accepted.
    for (name, id, sha, said) in [
        ("sidecar", good_url.clone(), None, format!("SHA-256 {right} ({base}/img/good.raw.sha256)")),
        ("given", good_url.clone(), Some(right.to_ascii_uppercase()), format!("SHA-256 {right} (img_sha256)")),
        ("local", "small.raw".to_string(), Some(right.clone()), "(img_sha256)".to_string()),
        ("none", bad_url.clone(), Some("none".to_string()), "deploying".to_string()),
        ("unchecked", format!("{base}/img/plain.raw"), None, "the image is not checked".to_string()),
    ] {
        let disk = crafted::filled_file(&s.disks.join(format!("{name}.disk0")), 64 << 20);
        let (code, log) = create(&id, sha.as_deref(), &disk);
        assert_eq!(code, Some(0), "{name}: {log}");
        assert!(log.contains(&said), "{name}: {said:?} missing from the log: {log}");
        assert!(holds(&disk, &image), "{name}: the disk does not hold the image");
    }
    let asked = requests.lock().unwrap().clone();
    assert_eq!(
        asked.iter().filter(|l| l.contains("/img/bad.raw.sha256")).count(),
        1,
        "img_sha256=none fetched the .sha256 (or the refusal did not): {asked:?}"
    );
}

/// `config_url` (file:// and http://) replaces Ganeti's parameters with its own, as
/// snf-image's: here `img_id`, so the disk shows which image was deployed; a bad document
/// fails naming config_url, the disk untouched; verify takes config_url without img_id.
#[test]
fn config_url_parameters_replace_ganetis() {
    let s = site();
    let images = s.config.parent().unwrap().join("images");
    let (one, two) = (small_image(3 << 20), small_image(5 << 20)[1 << 20..].to_vec());
    std::fs::write(images.join("one.raw"), &one).unwrap();
    std::fs::write(images.join("two.raw"), &two).unwrap();
    let doc = format!(r#"{{"IMG_ID": "two.raw", "img_properties": {NO_TASKS}, "frobnicate": "1"}}"#);
    let file = s.config.parent().unwrap().join("config.json");
    std::fs::write(&file, &doc).unwrap();
    let (base, _) = imgforge_tests::http::serve_files(vec![
        ("/c.json".into(), doc.into_bytes()),
        ("/broken.json".into(), br#"{"img_id": 2}"#.to_vec()),
    ]);
    let create = |url: &str, disk: &Path| {
        let out = s.run(
            "create",
            &[
                ("INSTANCE_NAME", "cfg.example.com"),
                ("DISK_0_PATH", disk.to_str().unwrap()),
                ("OSP_IMG_ID", "one.raw"),
                ("OSP_IMG_FORMAT", "diskdump"),
                ("OSP_IMG_PROPERTIES", r#"{"EXCLUDE_TASK_AssignHostname": "yes"}"#),
                ("OSP_CONFIG_URL", url),
            ],
            None,
        );
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    for (name, url) in [("file", format!("file://{}", file.display())), ("http", format!("{base}/c.json"))] {
        let disk = crafted::filled_file(&s.disks.join(format!("{name}.disk0")), 16 << 20);
        let (code, log) = create(&url, &disk);
        assert_eq!(code, Some(0), "{name}: {log}");
        assert!(holds(&disk, &two), "{name}: config_url's img_id did not replace Ganeti's");
        assert!(log.contains("config_url: unknown parameter \"frobnicate\" ignored"), "{name}: {log}");
    }
    let disk = crafted::filled_file(&s.disks.join("bad.disk0"), 16 << 20);
    let before = sha256(&disk);
    for (url, want) in [
        (format!("{base}/broken.json"), "img_id must be a string"),
        (format!("{base}/missing.json"), "404"),
        ("file:///nonexistent/c.json".into(), "No such file"),
        ("ftp://h/c.json".into(), "not a URL imgforge fetches"),
    ] {
        let (code, log) = create(&url, &disk);
        assert_eq!(code, Some(2), "{url}: {log}");
        assert!(log.contains("config_url") && log.contains(want), "{url}: {log}");
        assert_eq!(sha256(&disk), before, "{url} touched the disk");
    }
    assert!(s.run("verify", &[("OSP_CONFIG_URL", &format!("{base}/c.json"))], None).status.success());
    assert!(!s.run("verify", &[("OSP_CONFIG_URL", "gopher://h/c")], None).status.success());
}

/// An OS variant's `NAME.conf` (read, never executed) gives parameter defaults under Ganeti's
/// and settings over `/etc/default/imgforge`'s; `install-os` lists it in `variants.list`; a
/// variant without its file, or with a bad line, fails naming the file (and line).
#[test]
fn os_variants_from_their_conf_files() {
    let s = site();
    let root = s.config.parent().unwrap().to_owned();
    let variants = root.join("variants");
    let other_images = root.join("other-images");
    std::fs::create_dir_all(&variants).unwrap();
    std::fs::create_dir_all(&other_images).unwrap();
    let image = small_image(2 << 20);
    std::fs::write(other_images.join("web.raw"), &image).unwrap();
    let mark = root.join("executed");
    std::fs::write(
        variants.join("web.conf"),
        format!(
            "# the web variant\nIMAGE_DIR={}\nIMG_ID=web.raw\nIMG_FORMAT=diskdump\nIMG_PROPERTIES='{NO_TASKS}'\nSTRAY=1\n",
            other_images.display()
        ),
    )
    .unwrap();
    std::fs::write(variants.join("evil.conf"), format!("IMG_ID=\"$(touch {})\"\n", mark.display())).unwrap();
    let mut config = std::fs::read_to_string(&s.config).unwrap();
    config.push_str(&format!("VARIANTS_DIR={}\n", variants.display()));
    std::fs::write(&s.config, config).unwrap();
    let out = Command::new(binary())
        .args(["ganeti", "install-os", "--os-dir"])
        .arg(s.os_dir.parent().unwrap())
        .env("IMGFORGE_GANETI_CONFIG", &s.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(s.os_dir.join("variants.list")).unwrap(), "default\nevil\nweb\n");

    let run = |variant: &str, disk: &Path, env: &[(&str, &str)]| {
        let mut all = vec![("INSTANCE_NAME", "v.example.com"), ("DISK_0_PATH", disk.to_str().unwrap())];
        all.extend_from_slice(env);
        all.push(("OS_VARIANT", variant));
        let out = s.run("create", &all, None);
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let disk = crafted::filled_file(&s.disks.join("web.disk0"), 8 << 20);
    let (code, log) = run("web", &disk, &[]);
    assert_eq!(code, Some(0), "{log}");
    assert!(holds(&disk, &image), "the variant's IMG_ID (from its IMAGE_DIR) was not deployed");
    assert!(log.contains("web.conf: line 6: unknown setting STRAY ignored"), "{log}");
    // Ganeti's parameter wins over the variant's default: debian is not in the variant's
    // IMAGE_DIR, so this fails naming it there.
    let (code, log) = run("web", &disk, &[("OSP_IMG_ID", "debian")]);
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains(&format!("no such image in IMAGE_DIR {}", other_images.display())), "{log}");

    let before = sha256(&disk);
    for (variant, want) in [
        ("evil", "evil.conf: line 1: IMG_ID: expansions ($, `) are not evaluated".to_string()),
        ("gone", format!("no configuration file {}", variants.join("gone.conf").display())),
        ("../web", "is not a variant name".to_string()),
    ] {
        let (code, log) = run(variant, &disk, &[("OSP_IMG_ID", "debian")]);
        assert_eq!(code, Some(2), "{variant}: {log}");
        assert!(log.contains(&want), "{variant}: {log}");
        assert_eq!(sha256(&disk), before, "{variant} touched the disk");
    }
    assert!(!mark.exists(), "a variant's file was executed");
    assert!(!s.run("verify", &[("OS_VARIANT", "gone"), ("OSP_IMG_ID", "debian")], None).status.success());
}

/// Through the helper VM: `config_url`'s `img_passwd` and `inst_properties`' `USERS` over
/// `img_properties`' (alice's password set, root's left), snf-image's way.
#[test]
fn config_url_and_inst_properties_reach_the_guest() {
    let s = site();
    let doc = r#"{"img_passwd": "Config-Url-Pw-1", "inst_properties": "{\"users\": \"alice\"}"}"#;
    let (base, _) = imgforge_tests::http::serve_files(vec![("/c.json".into(), doc.as_bytes().to_vec())]);
    let disk = s.disk("inst.disk0");
    let root_before = {
        let image = s.config.parent().unwrap().join("images/debian.img");
        shadow_field(&Mount::partition(&image, 0).unwrap().read("/etc/shadow").unwrap(), "root").unwrap()
    };
    let out = s.run(
        "create",
        &[
            ("INSTANCE_NAME", "inst.example.com"),
            ("DISK_0_PATH", disk.to_str().unwrap()),
            ("OSP_IMG_ID", "debian"),
            ("OSP_IMG_FORMAT", "diskdump"),
            ("OSP_IMG_PASSWD", "Ganeti-Pw-1"),
            ("OSP_IMG_PROPERTIES", r#"{"USERS": "root"}"#),
            ("OSP_CONFIG_URL", &format!("{base}/c.json")),
        ],
        None,
    );
    assert!(out.status.success());
    let m = Mount::partition(&disk, 0).unwrap();
    let shadow = m.read("/etc/shadow").unwrap();
    assert!(
        password_matches("Config-Url-Pw-1", &shadow_field(&shadow, "alice").unwrap()),
        "alice's password is not config_url's"
    );
    assert_eq!(shadow_field(&shadow, "root").unwrap(), root_before, "inst_properties' USERS did not replace root");
    assert_eq!(m.read("/etc/hostname").unwrap(), "inst.example.com\n");
}
