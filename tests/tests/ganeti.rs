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

/// The tests' image servers listen on 127.0.0.1, which tenants' URLs may not reach by default.
const ALLOW_PRIVATE: &str = "URL_ALLOW_PRIVATE_ADDRESSES=yes\n";

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
            "IMAGE_DIR={}\nACCEL=tcg\nHELPER_SOFT_TIMEOUT=300\nHELPER_HARD_TIMEOUT=5\nPROGRESS_MONITOR=\"cat >> {}\"\n{ALLOW_PRIVATE}",
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

    /// `create` of instance `name` onto `disk` with the OS parameters `params` (Ganeti's
    /// `INSTANCE_NAME` and `DISK_0_PATH` added).
    fn create(&self, name: &str, disk: &str, params: &[(&str, &str)]) -> Output {
        let mut env = vec![("INSTANCE_NAME", name), ("DISK_0_PATH", disk)];
        env.extend_from_slice(params);
        self.run("create", &env, None)
    }
}

#[test]
fn os_definition_files() {
    let s = site();
    assert_eq!(std::fs::read_to_string(s.os_dir.join("ganeti_api_version")).unwrap(), "20\n");
    assert_eq!(std::fs::read_to_string(s.os_dir.join("variants.list")).unwrap(), "default\n");
    let params = std::fs::read_to_string(s.os_dir.join("parameters.list")).unwrap();
    for p in [
        "img_id",
        "img_format",
        "img_passwd",
        "img_passwd_hash",
        "img_properties",
        "img_personality",
        "auth_keys",
        "cloud_userdata",
    ] {
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
    let out = s.create(
        "inst1.example.com",
        disk_str,
        &[
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
            // IPv6 with no DHCPv6 tag: SLAAC, as snf-image.
            ("NIC_0_NETWORK_SUBNET6", "2001:db8:1::/64"),
            ("NIC_0_NETWORK_GATEWAY6", "2001:db8:1::1"),
            ("NIC_1_MAC", "aa:00:00:77:5e:aa"),
            // nfdhcpd, snf-image's DHCP and stateless-DHCPv6 tag: DHCP despite the subnet.
            ("NIC_1_IP", "198.51.100.7"),
            ("NIC_1_NETWORK_SUBNET", "198.51.100.0/24"),
            ("NIC_1_NETWORK_GATEWAY", "198.51.100.1"),
            ("NIC_1_NETWORK_SUBNET6", "2001:db8:2::/64"),
            ("NIC_1_NETWORK_GATEWAY6", "2001:db8:2::1"),
            ("NIC_1_NETWORK_TAGS", "public nfdhcpd"),
        ],
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
                && nic0.contains("Gateway=192.0.2.1")
                && nic0.contains("IPv6AcceptRA=yes\nIPv6PrivacyExtensions=no")
                && !nic0.contains("DHCP"),
            "{nic0}"
        );
        let nic1 = m.read("/etc/systemd/network/50-imgforge-nic1.network").unwrap();
        assert!(
            nic1.contains("MACAddress=aa:00:00:77:5e:aa")
                && nic1.contains("DHCP=ipv4\n")
                && nic1.contains("IPv6AcceptRA=yes")
                && !nic1.contains("\nAddress="),
            "{nic1}"
        );
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
        ("OSP_IMG_PROPERTIES", r#"{"PASSWD_HASHING_METHOD": "blowfish"}"#, "glibc's own crypt cannot check it"),
        ("OSP_IMG_PROPERTIES", r#"{"passwd_hashing_method": "sha1"}"#, "PASSWD_HASHING_METHOD"),
        ("OSP_IMG_PROPERTIES", r#"{"SWAP": "a"}"#, "cannot be the first disk"),
        ("OSP_IMG_PROPERTIES", r#"{"custom_task": "rm -rf /"}"#, "CUSTOM_TASK is not base64"),
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
    let out = s.create(
        "local.example.com",
        disk.to_str().unwrap(),
        &[
            ("OSP_IMG_ID", "local://debian.img"),
            ("OSP_IMG_FORMAT", "diskdump"),
            ("OSP_IMG_PROPERTIES", r#"{"exclude_all_tasks": "yes"}"#),
        ],
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
    let out =
        s.create("small.example.com", disk_str, &[("OSP_IMG_ID", "frames.raw.zst"), ("OSP_IMG_FORMAT", "diskdump")]);
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
        let out = s.create(
            name,
            disk.to_str().unwrap(),
            &[("OSP_IMG_ID", "debian"), ("OSP_IMG_FORMAT", "diskdump"), ("OSP_IMG_PROPERTIES", properties)],
        );
        assert!(out.status.success());
        let part = imgforge_tests::readback::partitions(&disk).unwrap()[0];
        assert_eq!(part.offset + part.size, 2 << 30, "{name}: the root partition does not reach the end of the disk");
        let fs = df_bytes(Mount::partition(&disk, 0).unwrap().path());
        assert_eq!(fs > 1900 << 20, grown, "{name}: the root filesystem has {fs} bytes");
    }
}

/// Copies the fixture `shape` into the site's IMAGE_DIR as `name`, with `plant` run on its
/// mounted root (what the fixture lacks to stand for the guest under test).
fn image_with(s: &Site, shape: Shape, name: &str, plant: impl FnOnce(&Mount)) {
    let image = s.config.parent().unwrap().join("images").join(name);
    sh(Command::new("cp").arg("--sparse=always").arg(fixtures::disk(shape).unwrap()).arg(&image)).unwrap();
    plant(&Mount::writable_partition(&image, 0).unwrap());
}

fn put(m: &Mount, path: &str, text: &str) {
    std::fs::create_dir_all(m.join(path).parent().unwrap()).unwrap();
    std::fs::write(m.join(path), text).unwrap();
}

/// A Red Hat-family guest (the RPM fixture with /etc/redhat-release and network-scripts, as
/// CentOS has them) gets snf-image's ifcfg files and /etc/sysconfig/network entries: static
/// IPv4 with SLAAC, DHCP (the `dhcp` tag) with stateful DHCPv6 (the `dhcpv6` tag).
#[test]
fn ifcfg_on_a_red_hat_guest() {
    let s = site();
    image_with(&s, Shape::RpmDosExt4, "centos.img", |m| {
        put(m, "/etc/redhat-release", "CentOS Stream release 9\n");
        put(m, "/etc/sysconfig/network", "NETWORKING=no\nNOZEROCONF=yes\n");
        std::fs::create_dir_all(m.join("/etc/sysconfig/network-scripts")).unwrap();
    });
    let disk = s.disk("rh.disk0");
    let out = s.create(
        "rh.example.com",
        disk.to_str().unwrap(),
        &[
            ("OSP_IMG_ID", "centos.img"),
            ("NIC_COUNT", "2"),
            ("NIC_0_MAC", "aa:00:00:11:22:33"),
            ("NIC_0_IP", "192.0.2.10"),
            ("NIC_0_NETWORK_SUBNET", "192.0.2.0/24"),
            ("NIC_0_NETWORK_GATEWAY", "192.0.2.1"),
            ("NIC_0_NETWORK_GATEWAY6", "2001:db8:1::1"),
            ("NIC_1_MAC", "aa:00:00:11:22:34"),
            ("NIC_1_IP", "198.51.100.7"),
            ("NIC_1_NETWORK_SUBNET", "198.51.100.0/24"),
            ("NIC_1_NETWORK_GATEWAY6", "2001:db8:2::1"),
            ("NIC_1_NETWORK_TAGS", "dhcp dhcpv6"),
        ],
    );
    assert!(out.status.success());
    let m = Mount::partition(&disk, 0).unwrap();
    assert_eq!(
        m.read("/etc/sysconfig/network-scripts/ifcfg-eth0").unwrap(),
        "DEVICE=eth0\nONBOOT=yes\nHWADDR=aa:00:00:11:22:33\nNM_CONTROLLED=yes\nBOOTPROTO=static\nIPADDR=192.0.2.10\nNETMASK=255.255.255.0\nIPV6INIT=yes\nIPV6_AUTOCONF=yes\n"
    );
    let eth1 = m.read("/etc/sysconfig/network-scripts/ifcfg-eth1").unwrap();
    assert!(
        eth1.contains("HWADDR=aa:00:00:11:22:34\n") && eth1.contains("BOOTPROTO=dhcp\nIPV6INIT=yes\nDHCPV6C=yes\n"),
        "{eth1}"
    );
    assert_eq!(
        m.read("/etc/sysconfig/network").unwrap(),
        "NOZEROCONF=yes\nNETWORKING=yes\nNETWORKING_IPV6=yes\nGATEWAY=192.0.2.1\nGATEWAYDEV=eth0\n"
    );
    assert!(m.read("/etc/systemd/network/10-imgforge-nic1.link").unwrap().contains("MACAddress=aa:00:00:11:22:34"));
    assert!(!m.join("/etc/systemd/network/50-imgforge-nic0.network").exists(), "networkd files on an ifcfg guest");
}

/// CLOUD_INIT (snf-image's NoCloud seed and cloud.cfg.d snippets instead of edited files, with
/// cloud_userdata as the seed's user-data) and NM_NETWORKING (NetworkManager keyfiles on a guest
/// whose own stack is networkd), on the Debian fixture given a cloud.cfg.d.
#[test]
fn cloud_init_seed_and_nm_networking() {
    let s = site();
    image_with(&s, Shape::DosExt4, "cloud.img", |m| {
        std::fs::create_dir_all(m.join("/etc/cloud/cloud.cfg.d")).unwrap();
        put(m, "/etc/hostname", "image-hostname\n");
        put(m, "/etc/ssh/ssh_host_ed25519_key", "image key\n");
    });
    let before = {
        let image = s.config.parent().unwrap().join("images/cloud.img");
        shadow_field(&Mount::partition(&image, 0).unwrap().read("/etc/shadow").unwrap(), "root").unwrap()
    };
    let disk = s.disk("cloud.disk0");
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICloudInitKey0000000000000000000000000000 ci@test";
    let user_data = "#cloud-config\nruncmd:\n  - [touch, /root/user-data-ran]\n";
    // base64 of user_data.
    let encoded = "I2Nsb3VkLWNvbmZpZwpydW5jbWQ6CiAgLSBbdG91Y2gsIC9yb290L3VzZXItZGF0YS1yYW5dCg==";
    let out = s.create(
        "cloud.example.com",
        disk.to_str().unwrap(),
        &[
            ("OSP_IMG_ID", "cloud.img"),
            ("OSP_IMG_PASSWD", "Cloud-Pw-1"),
            ("OSP_AUTH_KEYS", key),
            ("OSP_CLOUD_USERDATA", encoded),
            ("OSP_IMG_PROPERTIES", r#"{"Cloud_Init": "yes", "nm_networking": "on"}"#),
            ("NIC_COUNT", "1"),
            ("NIC_0_MAC", "aa:00:00:44:55:66"),
            ("NIC_0_IP", "192.0.2.10"),
            ("NIC_0_NETWORK_SUBNET", "192.0.2.0/24"),
            ("NIC_0_NETWORK_GATEWAY", "192.0.2.1"),
            ("NIC_0_NETWORK_GATEWAY6", "2001:db8:1::1"),
        ],
    );
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!log.contains("not honoured"), "{log}");
    let m = Mount::partition(&disk, 0).unwrap();
    use std::os::unix::fs::MetadataExt;
    let mode = |p: &str| std::fs::metadata(m.join(p)).unwrap().mode() & 0o7777;
    // The seed, as snf-image's InitializeDatasource, AssignHostname and ChangePassword write it.
    let seed = "/var/lib/cloud/seed/nocloud-net";
    assert_eq!(
        m.read(&format!("{seed}/meta-data")).unwrap(),
        format!(
            "instance-id: \"cloud.example.com\"\nlocal-hostname: \"cloud.example.com\"\npublic-keys:\n  - \"{key}\"\n"
        )
    );
    assert_eq!(m.read(&format!("{seed}/user-data")).unwrap(), user_data);
    assert_eq!((mode(&format!("{seed}/meta-data")), mode(&format!("{seed}/user-data"))), (0o600, 0o600));
    let cfg = "/etc/cloud/cloud.cfg.d/98_snf-image-";
    assert_eq!(m.read(&format!("{cfg}InitializeDatasource.cfg")).unwrap(), "datasource_list: [ NoCloud ]\n");
    assert_eq!(m.read(&format!("{cfg}DeleteSSHKeys.cfg")).unwrap(), "ssh_deletekeys: true\n");
    assert_eq!(m.read(&format!("{cfg}ConfigureNetwork.cfg")).unwrap(), "network: {config: disabled}\n");
    let pw = m.read(&format!("{cfg}ChangePassword.cfg")).unwrap();
    assert!(pw.starts_with("ssh_pwauth: True\nchpasswd:\n  expire: false\n  list: |\n    root:$6$"), "{pw}");
    let hash = pw.lines().last().unwrap().trim().strip_prefix("root:").unwrap();
    assert!(password_matches("Cloud-Pw-1", hash), "chpasswd's hash does not verify: {pw}");
    assert_eq!(mode(&format!("{cfg}ChangePassword.cfg")), 0o600);
    assert!(m
        .read("/var/lib/cloud/scripts/per-once/rm_98_snf-image-ChangePassword.cfg.sh")
        .unwrap()
        .contains("rm -f /etc/cloud/cloud.cfg.d/98_snf-image-ChangePassword.cfg"));
    assert_eq!(mode("/var/lib/cloud/scripts/per-once/clear_user_data.sh"), 0o755);
    // Nothing cloud-init does at first boot is done now.
    assert_eq!(m.read("/etc/hostname").unwrap(), "image-hostname\n");
    assert_eq!(shadow_field(&m.read("/etc/shadow").unwrap(), "root").unwrap(), before);
    assert!(!m.join("/root/.ssh/authorized_keys").exists());
    assert_eq!(m.read("/etc/ssh/ssh_host_ed25519_key").unwrap(), "image key\n");
    // NM_NETWORKING: a keyfile, not networkd's file this guest would otherwise get.
    let nm = m.read("/etc/NetworkManager/system-connections/imgforge-nic0.nmconnection").unwrap();
    for want in [
        "mac-address=aa:00:00:44:55:66\n",
        "[ipv4]\nmethod=manual\naddress1=192.0.2.10/24,192.0.2.1\n",
        "[ipv6]\naddr-gen-mode=eui64\nip6-privacy=0\nmethod=auto\n",
    ] {
        assert!(nm.contains(want), "{want:?} not in {nm}");
    }
    assert_eq!(mode("/etc/NetworkManager/system-connections/imgforge-nic0.nmconnection"), 0o600);
    assert!(!m.join("/etc/systemd/network/50-imgforge-nic0.network").exists());
}

/// Under CLOUD_INIT, snf-image's AddSwap ignores the swap partition and has cloud-init make a
/// swap file (`swap:` with `size: auto` and `maxsize`), and FixPartitionTable makes no
/// partition; a rename then sets the seed's local-hostname (cloud-init owns the hostname),
/// keeping its instance-id and the guest's files.
#[test]
fn cloud_init_swap_file_and_rename() {
    let s = site();
    image_with(&s, Shape::DosExt4, "cloud.img", |m| {
        std::fs::create_dir_all(m.join("/etc/cloud/cloud.cfg.d")).unwrap();
        put(m, "/etc/hostname", "image-hostname\n");
    });
    let fstab_before =
        Mount::partition(&s.config.parent().unwrap().join("images/cloud.img"), 0).unwrap().read("/etc/fstab").unwrap();
    let disk = s.disk("cs.disk0");
    let disk_str = disk.to_str().unwrap();
    let properties = r#"{"Cloud_Init": "yes", "swap": "2:256"}"#;
    let out = s.create("cs1.example.com", disk_str, &[("OSP_IMG_ID", "cloud.img"), ("OSP_IMG_PROPERTIES", properties)]);
    assert!(out.status.success());
    let parts = imgforge_tests::readback::partitions(&disk).unwrap();
    assert_eq!(parts.len(), 1, "a swap partition was made under CLOUD_INIT");
    {
        let m = Mount::partition(&disk, 0).unwrap();
        let cfg = m.read("/etc/cloud/cloud.cfg.d/98_snf-image-AddSwap.cfg").unwrap();
        let file = cfg
            .strip_prefix("swap:\n  filename: /swap-")
            .and_then(|rest| rest.split_once(".img\n"))
            .filter(|(n, _)| n.parse::<u16>().is_ok_and(|n| n < 32768))
            .map(|(_, rest)| rest);
        assert_eq!(file, Some("  size: auto\n  maxsize: 268435456\n"), "{cfg}");
        assert_eq!(m.read("/etc/fstab").unwrap(), fstab_before, "AddSwap wrote fstab under CLOUD_INIT");
    }
    let out = s.run(
        "rename",
        &[
            ("INSTANCE_NAME", "cs2.example.com"),
            ("OLD_INSTANCE_NAME", "cs1.example.com"),
            ("DISK_0_PATH", disk_str),
            ("OSP_IMG_ID", "cloud.img"),
            ("OSP_IMG_PROPERTIES", properties),
        ],
        None,
    );
    assert!(out.status.success());
    let m = Mount::partition(&disk, 0).unwrap();
    assert_eq!(
        m.read("/var/lib/cloud/seed/nocloud-net/meta-data").unwrap(),
        "instance-id: \"cs1.example.com\"\nlocal-hostname: \"cs2.example.com\"\n"
    );
    assert_eq!(m.read("/etc/hostname").unwrap(), "image-hostname\n");
}

fn base64(data: &str) -> String {
    sh(Command::new("sh").args(["-c", "printf %s \"$1\" | base64", "sh", data])).unwrap().trim().to_owned()
}

/// snf-image's `CUSTOM_TASK` runs after the personality with snf-image's task variables,
/// chrooted into the guest and confined (no disk, no report port, no mknod); a task that fails
/// fails `create`, naming it.
#[test]
fn create_runs_the_custom_task_confined_with_snf_images_variables() {
    let s = site();
    let task = r#"#!/bin/sh
out="$SNF_IMAGE_TARGET/etc/custom-task-ran"
printf '%s\n' "target=$SNF_IMAGE_TARGET" "hostname=$SNF_IMAGE_HOSTNAME" "users=$SNF_IMAGE_PROPERTY_USERS" \
    "nics=$SNF_IMAGE_NIC_COUNT $SNF_IMAGE_NIC_0_MAC" "passwd=${SNF_IMAGE_PASSWD:-unset}" > "$out"
for dev in /dev/vda /dev/ttyS1 /dev/fd0; do [ -e "$dev" ] && echo "reached $dev" >> "$out"; done
mknod /tmp/x b 254 0 2>/dev/null && echo "made a disk node" >> "$out"
cat /etc/personality-file >> "$out"
"#;
    // base64 wraps at 76 columns: the line breaks are read through, as snf-image's base64 -d does.
    let encoded = base64(task);
    assert!(encoded.contains('\n'));
    let properties = serde_json::json!({"users": "root", "Custom_Task": encoded}).to_string();
    let personality = r#"[{"path": "/etc/personality-file", "contents": "cGVyc29uYWxpdHkK"}]"#;
    let disk = s.disk("ct1.disk0");
    let out = s.create(
        "ct1.example.com",
        disk.to_str().unwrap(),
        &[
            ("OSP_IMG_ID", "debian"),
            ("OSP_IMG_PASSWD", "Ganeti-Pw-1"),
            ("OSP_IMG_PERSONALITY", personality),
            ("OSP_IMG_PROPERTIES", &properties),
            ("NIC_COUNT", "1"),
            ("NIC_0_MAC", "aa:00:00:77:5e:b1"),
        ],
    );
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("CUSTOM_TASK"), "CUSTOM_TASK was warned about");
    let ran = Mount::partition(&disk, 0).unwrap().read("/etc/custom-task-ran").expect("the custom task did not run");
    assert_eq!(
        ran,
        "target=/\nhostname=ct1.example.com\nusers=root\nnics=1 aa:00:00:77:5e:b1\npasswd=unset\npersonality\n"
    );

    let failing = serde_json::json!({"CUSTOM_TASK": base64("#!/bin/sh\necho custom task says no\nexit 3\n")});
    let disk = s.disk("ct2.disk0");
    let out = s.create(
        "ct2",
        disk.to_str().unwrap(),
        &[("OSP_IMG_ID", "debian"), ("OSP_IMG_PROPERTIES", &failing.to_string())],
    );
    assert!(!out.status.success(), "a custom task exiting 3 did not fail create");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("RunCustomTask") && log.contains("status 3"), "{log}");
}

/// A guest program that leaves a process running (here `CUSTOM_TASK` starting a daemon in its
/// own session, and one that would write into the guest after the task ended) has it ended
/// when the program returns: nothing of the guest runs beside the helper's later tasks, and the
/// guest's filesystems unmount (they stayed busy, failing create).
#[test]
fn a_custom_task_leaves_nothing_running() {
    let s = site();
    let task = "#!/bin/sh
setsid sleep 600 </dev/null >/dev/null 2>&1 &
        (sleep 3; echo late > /etc/written-after-the-task) </dev/null >/dev/null 2>&1 &
        echo started
";
    let properties = serde_json::json!({"CUSTOM_TASK": base64(task)});
    let disk = s.disk("lo.disk0");
    let out = s.create(
        "lo",
        disk.to_str().unwrap(),
        &[("OSP_IMG_ID", "debian"), ("OSP_IMG_PROPERTIES", &properties.to_string())],
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("processes a guest program left running"), "{log}");
    let m = Mount::partition(&disk, 0).unwrap();
    assert!(m.read("/etc/written-after-the-task").is_err(), "a process of the task wrote after it ended");
}

/// What the guest's programs print reaches Ganeti's OS log (a file on the node) only up to
/// imgforge's console budget: here a CUSTOM_TASK prints 20 MB, and the log stays under 10 MB,
/// saying the rest was not shown (before, all of it went there: 62 MB for 50 MB printed).
#[test]
fn guest_output_reaches_the_os_log_bounded() {
    let s = site();
    let task = format!("#!/bin/sh\nyes {} | head -c 20000000\n", "A".repeat(100));
    let properties = serde_json::json!({"CUSTOM_TASK": base64(&task)});
    let disk = s.disk("fl.disk0");
    let mut c = Command::new(s.os_dir.join("create"));
    c.env_clear()
        .env("PATH", "/sbin:/bin:/usr/sbin:/usr/bin")
        .env("OS_API_VERSION", "20")
        .env("OS_NAME", "imgforge")
        .env("OS_VARIANT", "default")
        .env("DISK_COUNT", "1")
        .env("IMGFORGE_GANETI_CONFIG", &s.config)
        .env("INSTANCE_NAME", "fl")
        .env("DISK_0_PATH", &disk)
        .env("OSP_IMG_ID", "debian")
        .env("OSP_IMG_PROPERTIES", properties.to_string())
        .current_dir(&s.os_dir);
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr[out.stderr.len().saturating_sub(4000)..]));
    assert!(out.stderr.len() < 10 << 20, "the OS log got {} bytes", out.stderr.len());
    assert!(String::from_utf8_lossy(&out.stderr).contains("console output past 8 MiB not shown"));
}

/// snf-image's `EXCLUDE_MOUNTED_TASKS`: the image grows into the disk (FixPartitionTable,
/// FilesystemResizeUnmounted) and nothing of the mounted guest changes: no hostname, no
/// password, no new machine id, no custom task.
#[test]
fn exclude_mounted_tasks_grows_the_image_and_customizes_nothing() {
    let s = site();
    let image = s.config.parent().unwrap().join("images/debian.img");
    let before = {
        let m = Mount::partition(&image, 0).unwrap();
        (m.read("/etc/hostname").unwrap(), m.read("/etc/shadow").unwrap(), m.read("/etc/machine-id").ok())
    };
    let properties = serde_json::json!({
        "exclude_mounted_tasks": "yes",
        "CUSTOM_TASK": base64("#!/bin/sh\ntouch /etc/custom-task-ran\n"),
    });
    let disk = s.disk("em1.disk0");
    let out = s.create(
        "em1",
        disk.to_str().unwrap(),
        &[("OSP_IMG_ID", "debian"), ("OSP_IMG_PASSWD", "Ganeti-Pw-1"), ("OSP_IMG_PROPERTIES", &properties.to_string())],
    );
    assert!(out.status.success());
    let part = imgforge_tests::readback::partitions(&disk).unwrap()[0];
    assert_eq!(part.offset + part.size, 2 << 30, "the root partition does not reach the end of the disk");
    let m = Mount::partition(&disk, 0).unwrap();
    assert!(df_bytes(m.path()) > 1900 << 20, "the root filesystem was not grown");
    assert_eq!(
        (m.read("/etc/hostname").unwrap(), m.read("/etc/shadow").unwrap(), m.read("/etc/machine-id").ok()),
        before
    );
    assert!(m.read("/etc/custom-task-ran").is_err(), "the custom task ran");
}

fn put_executable(m: &Mount, path: &str, text: &str) {
    put(m, path, text);
    std::fs::set_permissions(m.join(path), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// snf-image's `ALLOW_MOUNTED_TASK_OVERWRITING`: the image's
/// `/root/snf-image/helper/overwrite_task_<Task>` (any case, any depth below) runs instead of
/// the task, chrooted and confined with snf-image's task variables: exit 0 skips the task's
/// work (AssignHostname: the image keeps its hostname), 101 runs it between `pre-exec` and
/// `post-exec` (ChangeMachineId), any other status fails create. Unset, the same files are
/// ignored.
#[test]
fn the_image_overwrites_mounted_tasks_when_allowed() {
    let s = site();
    let helper = "/root/snf-image/helper";
    image_with(&s, Shape::DosExt4, "ow.img", |m| {
        put(m, "/etc/hostname", "image-hostname\n");
        put(m, "/etc/machine-id", IMAGE_MACHINE_ID);
        put_executable(
            m,
            &format!("{helper}/overwrite_task_AssignHostname"),
            r#"#!/bin/sh
out=/etc/overwrite-AssignHostname
echo "$1 target=$SNF_IMAGE_TARGET hostname=$SNF_IMAGE_HOSTNAME allow=$SNF_IMAGE_PROPERTY_ALLOW_MOUNTED_TASK_OVERWRITING" > $out
for dev in /dev/vda /dev/ttyS1 /dev/fd0; do [ -e "$dev" ] && echo "reached $dev" >> $out; done
exit 0
"#,
        );
        put_executable(
            m,
            &format!("{helper}/sub/Overwrite_Task_ChangeMachineId"),
            r#"#!/bin/sh
echo "$1 $(cat /etc/machine-id)" >> /etc/overwrite-ChangeMachineId
[ "$1" = pre-exec ] && exit 101
exit 0
"#,
        );
        // Any other status fails the task (here only for instance ow3).
        put_executable(
            m,
            &format!("{helper}/overwrite_task_DeleteSSHKeys"),
            "#!/bin/sh\n[ \"$SNF_IMAGE_HOSTNAME\" = ow3 ] && { echo overwrite says no; exit 3; }\n[ \"$1\" = pre-exec ] && exit 101\nexit 0\n",
        );
    });
    let disk = s.disk("ow3.disk0");
    let properties = r#"{"ALLOW_MOUNTED_TASK_OVERWRITING": "yes"}"#;
    let out = s.create("ow3", disk.to_str().unwrap(), &[("OSP_IMG_ID", "ow.img"), ("OSP_IMG_PROPERTIES", properties)]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an overwriting program exiting 3 did not fail create");
    assert!(log.contains("task DeleteSSHKeys") && log.contains("pre-exec exited with status 3"), "{log}");
    let image_id = IMAGE_MACHINE_ID.trim();
    for (name, allow) in [("ow1", true), ("ow2", false)] {
        let disk = s.disk(&format!("{name}.disk0"));
        let properties = serde_json::json!({"Allow_Mounted_Task_Overwriting": if allow { "yes" } else { "no" }});
        let out = s.create(
            name,
            disk.to_str().unwrap(),
            &[("OSP_IMG_ID", "ow.img"), ("OSP_IMG_PROPERTIES", &properties.to_string())],
        );
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {log}");
        assert!(!log.contains("not honoured"), "{log}");
        let m = Mount::partition(&disk, 0).unwrap();
        let id = m.read("/etc/machine-id").unwrap();
        assert!(id.trim() != image_id && id.len() == 33, "{name}: ChangeMachineId did not run: {id:?}");
        if allow {
            assert!(log.contains("task AssignHostname was overwritten by the image's"), "{log}");
            assert_eq!(m.read("/etc/hostname").unwrap(), "image-hostname\n", "AssignHostname's own work ran");
            assert_eq!(
                m.read("/etc/overwrite-AssignHostname").unwrap(),
                "pre-exec target=/ hostname=ow1 allow=yes\n",
                "the overwriting program did not run once, confined, with snf-image's variables"
            );
            assert_eq!(
                m.read("/etc/overwrite-ChangeMachineId").unwrap(),
                format!("pre-exec {image_id}\npost-exec {}\n", id.trim()),
                "101 did not run the task between pre-exec and post-exec"
            );
        } else {
            assert_eq!(m.read("/etc/hostname").unwrap(), "ow2\n");
            for task in ["AssignHostname", "ChangeMachineId"] {
                assert!(
                    m.read(&format!("/etc/overwrite-{task}")).is_err(),
                    "{task} was overwritten though not allowed"
                );
            }
        }
    }
}

/// The two tasks imgforge does as helper tasks are overwritten as the others are: an
/// `overwrite_task_FilesystemResizeMounted` exiting 0 leaves the XFS root at the image's size
/// though its partition grew; an `overwrite_task_SELinuxAutorelabel` exiting 101 runs before
/// and after the task. Read back with sfdisk and the XFS superblock.
#[test]
fn the_image_overwrites_the_helper_tasks_when_allowed() {
    let s = site();
    let image = s.config.parent().unwrap().join("images").join("xfs-ow.img");
    sh(Command::new("cp").arg("--sparse=always").arg(fixtures::disk(Shape::GptXfsBoot).unwrap()).arg(&image)).unwrap();
    {
        let m = Mount::writable_partition(&image, 1).unwrap();
        for (task, pre_exec_status) in [("FilesystemResizeMounted", 0), ("SELinuxAutorelabel", 101)] {
            put_executable(
                &m,
                &format!("/root/snf-image/helper/overwrite_task_{task}"),
                &format!(
                    "#!/bin/sh\necho \"$1\" >> /etc/overwrite-{task}\n[ \"$1\" = pre-exec ] && exit {pre_exec_status}\nexit 0\n"
                ),
            );
        }
    }
    let (_, image_part, _) = sfdisk_partition(&image, 2);
    let image_fs = xfs_bytes(&image, 2);
    let disk = s.disk("xo1.disk0");
    std::fs::File::options().write(true).open(&disk).unwrap().set_len(3 << 30).unwrap();
    let properties = r#"{"ALLOW_MOUNTED_TASK_OVERWRITING": "yes"}"#;
    let out =
        s.create("xo1", disk.to_str().unwrap(), &[("OSP_IMG_ID", "xfs-ow.img"), ("OSP_IMG_PROPERTIES", properties)]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    let (_, part, _) = sfdisk_partition(&disk, 2);
    assert!(part >= image_part + (1 << 21), "the root partition did not grow: {image_part} -> {part} sectors");
    assert_eq!(xfs_bytes(&disk, 2), image_fs, "FilesystemResizeMounted's own work ran though pre-exec exited 0");
    let m = Mount::partition(&disk, 1).unwrap();
    assert_eq!(m.read("/etc/overwrite-FilesystemResizeMounted").unwrap(), "pre-exec\n");
    assert_eq!(m.read("/etc/overwrite-SELinuxAutorelabel").unwrap(), "pre-exec\npost-exec\n");
    assert!(log.contains("task FilesystemResizeMounted was overwritten by the image's"), "{log}");
}

/// The bytes of the XFS filesystem on partition `number` of `disk`, from its superblock
/// (`sb_blocksize` at byte 4, `sb_dblocks` at byte 8, big-endian).
fn xfs_bytes(disk: &Path, number: u32) -> u64 {
    use std::io::{Read, Seek, SeekFrom};
    let (start, _, _) = sfdisk_partition(disk, number);
    let mut sb = [0u8; 16];
    let mut f = std::fs::File::open(disk).unwrap();
    f.seek(SeekFrom::Start(start * 512)).unwrap();
    f.read_exact(&mut sb).unwrap();
    assert_eq!(&sb[..4], b"XFSB", "no XFS superblock on partition {number} of {}", disk.display());
    u64::from(u32::from_be_bytes(sb[4..8].try_into().unwrap())) * u64::from_be_bytes(sb[8..16].try_into().unwrap())
}

/// The partition `number` of `disk` as sfdisk lists it: start and size in sectors, type.
fn sfdisk_partition(disk: &Path, number: u32) -> (u64, u64, String) {
    let json: serde_json::Value =
        serde_json::from_str(&sh(Command::new("sfdisk").arg("--json").arg(disk)).unwrap()).unwrap();
    // sfdisk names the partitions of a file ending in a digit FILEpN.
    let nodes = [format!("{}{number}", disk.display()), format!("{}p{number}", disk.display())];
    let p = json["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| nodes.iter().any(|n| p["node"] == n.as_str()))
        .cloned();
    let p = p.unwrap_or_else(|| panic!("no partition {number} on {}: {json}", disk.display()));
    (p["start"].as_u64().unwrap(), p["size"].as_u64().unwrap(), p["type"].as_str().unwrap().to_owned())
}

/// snf-image's `SWAP=<N>:<MB>`: partition N, MB MiB, ending 2048 sectors short of the disk's
/// end, with a swap signature whose UUID the guest's fstab names; the root partition grows up
/// to it. On an MBR (primary partition 2, ext4 root) and a GPT (partition 3, XFS root), read
/// back with sfdisk, blkid and sgdisk.
#[test]
fn create_adds_the_swap_partition_snf_image_adds() {
    let s = site();
    let images = s.config.parent().unwrap().join("images");
    sh(Command::new("cp")
        .arg("--sparse=always")
        .arg(fixtures::disk(Shape::GptXfsBoot).unwrap())
        .arg(images.join("gpt.img")))
    .unwrap();
    for (name, image, disk_bytes, swap, root, root_index, swap_type) in [
        ("sw1", "debian", 2u64 << 30, "2:256", 1, 0, "82"),
        ("sw2", "gpt", 3 << 30, "3:300", 2, 1, "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"),
        // A logical partition: in a new extended partition 2, which starts 1 MiB before it.
        ("sw3", "debian", 2 << 30, "5:200", 1, 0, "82"),
    ] {
        let disk = s.disk(&format!("{name}.disk0"));
        std::fs::File::options().write(true).open(&disk).unwrap().set_len(disk_bytes).unwrap();
        let properties = serde_json::json!({"swap": swap}).to_string();
        let out = s.create(name, disk.to_str().unwrap(), &[("OSP_IMG_ID", image), ("OSP_IMG_PROPERTIES", &properties)]);
        assert!(out.status.success(), "{name}");
        let (number, mib) = swap.split_once(':').unwrap();
        let (number, mib): (u32, u64) = (number.parse().unwrap(), mib.parse().unwrap());
        let (start, size, kind) = sfdisk_partition(&disk, number);
        let sectors = disk_bytes / 512;
        assert_eq!(
            (start + size, size, kind.as_str()),
            (sectors - 2048, mib * 2048, swap_type),
            "{name}: the swap partition"
        );
        let (root_start, root_size, _) = sfdisk_partition(&disk, root);
        let gap = if number >= 5 {
            assert_eq!(sfdisk_partition(&disk, 2), (start - 2048, size + 2048, "5".to_owned()), "{name}: extended");
            2048
        } else {
            0
        };
        assert_eq!(root_start + root_size + gap, start, "{name}: the root partition does not reach the swap partition");
        let probe = |tag: &str| {
            sh(Command::new("blkid")
                .args(["-p", "-o", "value", "-s", tag, "-O", &(start * 512).to_string()])
                .arg(&disk))
            .unwrap()
            .trim()
            .to_owned()
        };
        assert_eq!(probe("TYPE"), "swap", "{name}: no swap signature");
        let uuid = probe("UUID");
        let m = Mount::partition(&disk, root_index).unwrap();
        let fstab = m.read("/etc/fstab").unwrap();
        assert!(fstab.ends_with(&format!("UUID=\"{uuid}\"\tnone\tswap\tsw\t0\t0\n")), "{name}: {fstab}");
        assert!(
            df_bytes(m.path()) > (disk_bytes - (mib << 20)) - (700 << 20),
            "{name}: the root filesystem was not grown"
        );
        if name == "sw2" {
            let verify = sh(Command::new("sgdisk").arg("-v").arg(&disk)).unwrap();
            assert!(verify.contains("No problems found"), "{verify}");
        }
    }
}

/// `SWAP=6:<MB>` on an MBR that already has an extended partition, last, holding logical
/// partition 5 (the test adds both after the fixture's root, in 16 MiB it appends): as
/// snf-image, the extended partition grows to the disk's end and the swap is its next logical
/// partition, at the end; every other partition keeps its fields. Read back with sfdisk, blkid
/// and the test's own mount.
#[test]
fn create_adds_a_logical_swap_partition_to_an_existing_extended_partition() {
    let s = site();
    let image = s.config.parent().unwrap().join("images").join("ext.img");
    sh(Command::new("cp").arg("--sparse=always").arg(fixtures::disk(Shape::DosExt4).unwrap()).arg(&image)).unwrap();
    let (root_start, root_size, _) = sfdisk_partition(&image, 1);
    let ext_start = root_start + root_size;
    std::fs::File::options().write(true).open(&image).unwrap().set_len((ext_start + 32768) * 512).unwrap();
    let script = format!("start={ext_start}, size=32768, type=5\nstart={}, size=8192, type=83\n", ext_start + 2048);
    let mut sfdisk =
        Command::new("sfdisk").args(["--append", "--quiet"]).arg(&image).stdin(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(&mut sfdisk.stdin.take().unwrap(), script.as_bytes()).unwrap();
    assert!(sfdisk.wait().unwrap().success(), "sfdisk could not add the extended partition");
    let before = sh(Command::new("sfdisk").arg("--dump").arg(&image)).unwrap();
    assert!(before.contains("type=5") && before.contains("ext.img5"), "{before}");
    let disk = s.disk("swx.disk0");
    let disk_bytes = 2u64 << 30;
    std::fs::File::options().write(true).open(&disk).unwrap().set_len(disk_bytes).unwrap();
    let properties = serde_json::json!({"swap": "6:64"}).to_string();
    let out =
        s.create("swx", disk.to_str().unwrap(), &[("OSP_IMG_ID", "ext.img"), ("OSP_IMG_PROPERTIES", &properties)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let sectors = disk_bytes / 512;
    let (start, size, kind) = sfdisk_partition(&disk, 6);
    assert_eq!((start + size, size, kind.as_str()), (sectors - 2048, 64 * 2048, "82"), "the swap partition");
    assert_eq!(sfdisk_partition(&disk, 2), (ext_start, sectors - 2048 - ext_start, "5".to_owned()), "extended");
    assert_eq!(sfdisk_partition(&disk, 1), (root_start, root_size, "83".to_owned()), "the root partition moved");
    assert_eq!(sfdisk_partition(&disk, 5), (ext_start + 2048, 8192, "83".to_owned()), "logical partition 5");
    let dump = sh(Command::new("sfdisk").arg("--dump").arg(&disk)).unwrap();
    assert!(dump.lines().any(|l| l.contains("disk0p1 :") && l.ends_with("bootable")), "{dump}");
    let probe = |tag: &str| {
        sh(Command::new("blkid").args(["-p", "-o", "value", "-s", tag, "-O", &(start * 512).to_string()]).arg(&disk))
            .unwrap()
            .trim()
            .to_owned()
    };
    assert_eq!(probe("TYPE"), "swap", "no swap signature");
    let uuid = probe("UUID");
    let fstab = Mount::partition(&disk, 0).unwrap().read("/etc/fstab").unwrap();
    assert!(fstab.ends_with(&format!("UUID=\"{uuid}\"\tnone\tswap\tsw\t0\t0\n")), "{fstab}");
}

/// snf-image's `SWAP=<disk letter>`: the instance's second disk (`DISK_1_PATH`) made swap,
/// whole, its signature's UUID in the guest's fstab; a letter past `DISK_COUNT` is refused
/// before any disk is written. Read back with blkid -p and the test's own mount.
#[test]
fn create_makes_the_second_disk_swap() {
    let s = site();
    let disk0 = s.disk("swd.disk0");
    let disk1 = s.disks.join("swd.disk1");
    // A used disk: what was there must not survive as a filesystem signature.
    sh(Command::new("truncate").args(["-s", "96M"]).arg(&disk1)).unwrap();
    sh(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&disk1)).unwrap();
    let (d0, d1) = (disk0.to_str().unwrap(), disk1.to_str().unwrap());
    let properties = r#"{"SWAP": "B"}"#;
    let refused = s.create(
        "swd",
        d0,
        &[
            ("OSP_IMG_ID", "debian"),
            ("OSP_IMG_PROPERTIES", r#"{"SWAP": "c"}"#),
            ("DISK_COUNT", "2"),
            ("DISK_1_PATH", d1),
        ],
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no such disk"));
    // The image's own disk, under another name, is no swap disk: refused before it is written.
    let alias = s.disks.join("swd.alias");
    std::os::unix::fs::symlink(&disk0, &alias).unwrap();
    let before0 = sha256(&disk0);
    let refused = s.create(
        "swd",
        d0,
        &[
            ("OSP_IMG_ID", "debian"),
            ("OSP_IMG_PROPERTIES", properties),
            ("DISK_COUNT", "2"),
            ("DISK_1_PATH", alias.to_str().unwrap()),
        ],
    );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("under another name"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(sha256(&disk0), before0, "the disk was written before the swap disk was refused");
    let before1 = sha256(&disk1);
    let out = s.create(
        "swd",
        d0,
        &[("OSP_IMG_ID", "debian"), ("OSP_IMG_PROPERTIES", properties), ("DISK_COUNT", "2"), ("DISK_1_PATH", d1)],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_ne!(sha256(&disk1), before1, "the second disk was not written");
    let probe = |tag: &str| {
        let out = Command::new("blkid").args(["-p", "-o", "value", "-s", tag]).arg(&disk1).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(probe("TYPE"), "swap", "no swap signature on the second disk");
    let uuid = probe("UUID");
    assert_eq!(uuid.len(), 36, "{uuid}");
    let m = Mount::partition(&disk0, 0).unwrap();
    let fstab = m.read("/etc/fstab").unwrap();
    assert!(fstab.ends_with(&format!("UUID=\"{uuid}\"\tnone\tswap\tsw\t0\t0\n")), "{fstab}");
    assert_eq!(m.read("/etc/hostname").unwrap(), "swd\n");
}

/// A small raw "image" of `len` bytes that differ from block to block (no VM reads it: the
/// tests that deploy it exclude every task).
fn small_image(len: usize) -> Vec<u8> {
    imgforge_tests::fixtures::pseudo_random_bytes(0x2545_f491_4f6c_dd1d, len)
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
    let file = images.join("config.json");
    std::fs::write(&file, &doc).unwrap();
    let (base, _) = imgforge_tests::http::serve_files(vec![
        ("/c.json".into(), doc.into_bytes()),
        ("/broken.json".into(), br#"{"img_id": 2}"#.to_vec()),
    ]);
    let create = |url: &str, disk: &Path| {
        let out = s.create(
            "cfg.example.com",
            disk.to_str().unwrap(),
            &[
                ("OSP_IMG_ID", "one.raw"),
                ("OSP_IMG_FORMAT", "diskdump"),
                ("OSP_IMG_PROPERTIES", r#"{"EXCLUDE_TASK_AssignHostname": "yes"}"#),
                ("OSP_CONFIG_URL", url),
            ],
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
        (format!("file://{}/missing.json", images.display()), "No such file"),
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

/// By default a tenant's URLs (img_id, its .sha256, config_url) may not reach the node's
/// loopback: refused by the address they resolve to (a name, `localhost`, too), naming the
/// parameter, the address and the setting that allows it, before any request reaches the
/// server; the disk is untouched.
#[test]
fn tenant_urls_to_loopback_are_refused_by_default() {
    let s = site();
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(&s.config, text.replace(ALLOW_PRIVATE, "")).unwrap();
    let image = small_image(3 << 20);
    let (base, requests) = imgforge_tests::http::serve_files(vec![
        ("/img/good.raw".into(), image.clone()),
        ("/c.json".into(), br#"{"img_id": "debian.img"}"#.to_vec()),
    ]);
    let port = base.rsplit(':').next().unwrap().to_owned();
    let by_name = format!("http://localhost:{port}/img/good.raw");
    let disk = crafted::filled_file(&s.disks.join("ssrf.disk0"), 16 << 20);
    let before = sha256(&disk);
    let image_url = format!("{base}/img/good.raw");
    let config_url = format!("{base}/c.json");
    for (param, params, url) in [
        ("img_id", vec![("OSP_IMG_ID", image_url.as_str())], format!("{image_url}.sha256")),
        ("img_id", vec![("OSP_IMG_ID", image_url.as_str()), ("OSP_IMG_SHA256", "none")], image_url.clone()),
        ("img_id", vec![("OSP_IMG_ID", by_name.as_str()), ("OSP_IMG_SHA256", "none")], by_name.clone()),
        ("config_url", vec![("OSP_CONFIG_URL", config_url.as_str())], config_url.clone()),
    ] {
        let mut params = params;
        params.extend([("OSP_IMG_FORMAT", "diskdump"), ("OSP_IMG_PROPERTIES", NO_TASKS)]);
        let out = s.create("ssrf.example.com", disk.to_str().unwrap(), &params);
        let log = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{params:?}: {log}");
        for want in [url.as_str(), param, "loopback address", "URL_ALLOW_PRIVATE_ADDRESSES=yes"] {
            assert!(log.contains(want), "{params:?}: {want:?} missing: {log}");
        }
        assert!(log.contains("127.0.0.1") || log.contains("::1"), "{params:?}: no address: {log}");
        assert_eq!(sha256(&disk), before, "{params:?} touched the disk");
    }
    let asked = requests.lock().unwrap().clone();
    assert!(asked.is_empty(), "the server was asked {asked:?}");
}

/// A tenant's `file://` config_url (Ganeti's `OSP_CONFIG_URL`) reads nothing of the node but
/// IMAGE_DIR: a host file outside it (here a JSON document with a parameter and a key the
/// warnings would echo) is refused by verify and create before it is opened, naming IMAGE_DIR
/// and nothing of the file, the disk untouched; a variant's CONFIG_URL (the operator's) may
/// still name such a file.
#[test]
fn tenant_config_url_reads_no_host_file() {
    let s = site();
    let root = s.config.parent().unwrap().to_owned();
    let images = root.join("images");
    let image = small_image(2 << 20);
    std::fs::write(images.join("two.raw"), &image).unwrap();
    let secret = root.join("host-secret.json");
    std::fs::write(
        &secret,
        format!(r#"{{"img_id": "two.raw", "img_properties": {NO_TASKS}, "host_token_xyzzy": "1"}}"#),
    )
    .unwrap();
    std::os::unix::fs::symlink(&secret, images.join("link.json")).unwrap();
    let disk = crafted::filled_file(&s.disks.join("t.disk0"), 16 << 20);
    let before = sha256(&disk);
    for url in [
        format!("file://{}", secret.display()),
        format!("file://{}/../host-secret.json", images.display()),
        format!("file://{}/link.json", images.display()),
        "file:///etc/shadow".to_owned(),
    ] {
        let verify = s.run("verify", &[("OSP_CONFIG_URL", &url)], None);
        assert_eq!(verify.status.code(), Some(2), "verify took {url}");
        let out =
            s.create("t.example.com", disk.to_str().unwrap(), &[("OSP_IMG_ID", "debian"), ("OSP_CONFIG_URL", &url)]);
        let log = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{url}: {log}");
        assert!(log.contains("must name a file inside IMAGE_DIR"), "{url}: {log}");
        assert!(!log.contains("xyzzy") && !log.contains("root:"), "{url}: {log}");
        assert_eq!(sha256(&disk), before, "{url} touched the disk");
    }
    let variants = root.join("variants");
    std::fs::create_dir_all(&variants).unwrap();
    std::fs::write(variants.join("site.conf"), format!("CONFIG_URL=file://{}\n", secret.display())).unwrap();
    let mut config = std::fs::read_to_string(&s.config).unwrap();
    config.push_str(&format!("VARIANTS_DIR={}\n", variants.display()));
    std::fs::write(&s.config, config).unwrap();
    let out = s.run(
        "create",
        &[("INSTANCE_NAME", "t.example.com"), ("DISK_0_PATH", disk.to_str().unwrap()), ("OS_VARIANT", "site")],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(holds(&disk, &image), "the operator's config_url was not read");
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
    let out = s.create(
        "inst.example.com",
        disk.to_str().unwrap(),
        &[
            ("OSP_IMG_ID", "debian"),
            ("OSP_IMG_FORMAT", "diskdump"),
            ("OSP_IMG_PASSWD", "Ganeti-Pw-1"),
            ("OSP_IMG_PROPERTIES", r#"{"USERS": "root"}"#),
            ("OSP_CONFIG_URL", &format!("{base}/c.json")),
        ],
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
