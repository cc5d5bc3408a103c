//! End to end: `imgforge customize -a` on debootstrap'd images under qemu TCG, results read
//! back with the test's own loop mounts.

use imgforge_tests::fixtures::{self, Shape, FIXTURE_USER};
use imgforge_tests::readback::{check_sha512_crypt, shadow_field, Mount};
use imgforge_tests::run::{code, customize_tcg, holders, imgforge, s};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

mod progress_schema;

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIImgforgeFixtureKeyForTestsOnly000000000000 test@imgforge";

#[test]
fn every_operation_on_a_dos_ext4_disk() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let payload_file = work.path().join("payload.bin");
    std::fs::write(&payload_file, &payload).unwrap();
    let script = work.path().join("script.sh");
    std::fs::write(&script, "#!/bin/sh\necho script-ran > /root/script-ran\nid -u >> /root/script-ran\n").unwrap();
    let firstboot = work.path().join("firstboot.sh");
    std::fs::write(&firstboot, "#!/bin/sh\necho first boot\n").unwrap();
    let commands = work.path().join("commands");
    std::fs::write(&commands, "# virt-customize syntax\nappend-line /etc/motd:from-file\n").unwrap();

    let ssh = format!("{FIXTURE_USER}:string:{KEY}");
    let alice_pw = format!("{FIXTURE_USER}:password:Alice-Pw-2");
    let upload = format!("{}:/opt/", s(&payload_file));
    let out = customize_tcg(
        &img,
        &[
            "--progress",
            "json",
            "--hostname",
            "web1.example.com",
            "--root-password",
            "password:Root-Pw-1",
            "--password",
            &alice_pw,
            "--ssh-inject",
            &ssh,
            "--upload",
            &upload,
            "--mkdir",
            "/opt/newdir/sub",
            "--write",
            "/etc/motd:first",
            "--write",
            "/etc/motd:second",
            "--append-line",
            "/etc/motd:third",
            "--commands-from-file",
            &s(&commands),
            "--delete",
            "/etc/issue",
            "--chmod",
            "0600:/opt/payload.bin",
            "--run",
            &s(&script),
            "--run-command",
            "cat /etc/hostname > /root/hostname-at-run",
            "--write",
            "/root/order:before-run-command",
            "--run-command",
            "cat /root/order > /root/order-seen",
            "--timezone",
            "Europe/Athens",
            "--firstboot",
            &s(&firstboot),
            "--firstboot-command",
            "touch /root/firstboot-ran",
            "--selinux-relabel",
        ],
    );
    assert_eq!(code(&out), 0);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for secret in ["Root-Pw-1", "Alice-Pw-2"] {
        assert!(!stdout.contains(secret) && !stderr.contains(secret), "a password leaked into the output");
    }
    let events = progress_schema::events(&stdout);
    assert!(events
        .iter()
        .any(|e| e["type"] == "image-helper" && e["subtype"] == "task-start" && e["task"] == "50-Customize"));
    assert_eq!(events.last().unwrap()["type"], "image-done");

    let m = Mount::partition(&img, 0).unwrap();
    assert_eq!(m.read("/etc/hostname").unwrap(), "web1.example.com\n");
    assert!(m.read("/etc/hosts").unwrap().contains("127.0.1.1\tweb1.example.com web1\n"));
    let shadow = m.read("/etc/shadow").unwrap();
    check_sha512_crypt("Root-Pw-1", &shadow_field(&shadow, "root").unwrap()).expect("root password verifies");
    check_sha512_crypt("Alice-Pw-2", &shadow_field(&shadow, FIXTURE_USER).unwrap()).expect("alice password verifies");
    let shadow_meta = std::fs::metadata(m.join("/etc/shadow")).unwrap();
    assert_eq!(shadow_meta.mode() & 0o777, 0o640, "shadow keeps its mode");

    let alice_home = std::fs::metadata(m.join("/home/alice")).unwrap();
    let ssh_dir = std::fs::metadata(m.join("/home/alice/.ssh")).unwrap();
    let keys = std::fs::metadata(m.join("/home/alice/.ssh/authorized_keys")).unwrap();
    assert_eq!((ssh_dir.mode() & 0o777, ssh_dir.uid(), ssh_dir.gid()), (0o700, alice_home.uid(), alice_home.gid()));
    assert_eq!((keys.mode() & 0o777, keys.uid()), (0o600, alice_home.uid()));
    assert_eq!(m.read("/home/alice/.ssh/authorized_keys").unwrap(), format!("{KEY}\n"));

    assert_eq!(std::fs::read(m.join("/opt/payload.bin")).unwrap(), payload);
    assert_eq!(std::fs::metadata(m.join("/opt/payload.bin")).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(m.join("/opt/newdir/sub").is_dir());
    assert_eq!(
        m.read("/etc/motd").unwrap(),
        "second\nthird\nfrom-file\n",
        "later --write wins, appends follow in order"
    );
    assert!(!m.join("/etc/issue").exists());
    assert_eq!(m.read("/root/script-ran").unwrap(), "script-ran\n0\n");
    assert_eq!(m.read("/root/hostname-at-run").unwrap(), "web1.example.com\n", "--hostname ran before --run-command");
    assert_eq!(m.read("/root/order-seen").unwrap(), "before-run-command");
    assert_eq!(
        std::fs::read_link(m.join("/etc/localtime")).unwrap().to_str().unwrap(),
        "/usr/share/zoneinfo/Europe/Athens"
    );
    assert_eq!(m.read("/etc/timezone").unwrap(), "Europe/Athens\n");
    assert!(m.join("/etc/systemd/system/imgforge-firstboot.service").is_file());
    assert!(std::fs::symlink_metadata(
        m.join("/etc/systemd/system/multi-user.target.wants/imgforge-firstboot.service")
    )
    .unwrap()
    .file_type()
    .is_symlink());
    let scripts: Vec<_> = std::fs::read_dir(m.join("/usr/lib/imgforge/firstboot/scripts")).unwrap().collect();
    assert_eq!(scripts.len(), 2);
    // Not an SELinux guest: --selinux-relabel (virt-customize's no-op) marks nothing.
    assert!(!m.join("/.autorelabel").exists());
}

#[test]
fn gpt_xfs_root_with_separate_boot() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::GptXfsBoot, work.path()).unwrap();
    let out = customize_tcg(
        &img,
        &["--hostname", "gpt1", "--write", "/boot/imgforge-marker:on boot", "--write", "/etc/marker:on root"],
    );
    assert_eq!(code(&out), 0);
    let boot = Mount::partition(&img, 0).unwrap();
    assert_eq!(boot.read("/imgforge-marker").unwrap(), "on boot");
    assert!(boot.join("/fixture-boot-marker").exists());
    let root = Mount::partition(&img, 1).unwrap();
    assert_eq!(root.read("/etc/marker").unwrap(), "on root");
    assert_eq!(root.read("/etc/hostname").unwrap(), "gpt1\n");
    assert!(!root.join("/boot/imgforge-marker").exists(), "the /boot write went to the boot partition");
}

#[test]
fn failing_command_names_task_and_command() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let out = customize_tcg(&img, &["--run-command", "exit 7"]);
    assert_eq!(code(&out), 1);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("50-Customize") && stderr.contains("--run-command 'exit 7'") && stderr.contains("status 7"),
        "{stderr}"
    );
}

/// What a program in a hostile image prints reaches the user's terminal only as text: the
/// console with -v and the failing task's output in the error, escape sequences escaped.
#[test]
fn guest_output_cannot_drive_the_terminal() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let evil = r"printf 'owned\033]0;title\007\033[2J\r\n'; printf 'tail\033[8m\n'; exit 3";
    let out = customize_tcg(&img, &["-v", "--run-command", evil]);
    assert_eq!(code(&out), 1);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("owned") && stderr.contains("tail"), "the output was lost: {stderr}");
    assert!(!stderr.contains(['\u{1b}', '\u{7}', '\r']), "raw control characters reached stderr: {stderr:?}");
    assert!(stderr.contains(r"\u{1b}]0;title"), "{stderr}");
}

#[test]
fn hanging_command_times_out_and_leaves_no_qemu() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let started = Instant::now();
    let out = customize_tcg(&img, &["--timeout", "20", "--run-command", "sleep 600"]);
    assert_eq!(code(&out), 3);
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("timed out after 20 s") && stderr.contains("50-Customize"), "{stderr}");
    assert_eq!(holders(&img), Vec::<u32>::new(), "a process still holds the disk");
}

#[test]
fn bad_input_is_refused_before_any_vm() {
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["customize", "-a", "/nonexistent/disk.img", "--hostname", "a"], "/nonexistent/disk.img"),
        (&["customize", "-a", &s(work.path()), "--hostname", "a"], "not a regular file or block device"),
        (&["customize", "-a", &s(&img), "--hostname", "bad_name"], "RFC 1123"),
        (&["customize", "-a", &s(&img), "--write", "etc/motd:x"], "absolute"),
        (&["customize", "-a", &s(&img), "--root-password", "plain:secret-text"], "selector"),
        (&["customize", "-a", &s(&img), "--upload", "/nonexistent/f:/x"], "/nonexistent/f"),
        (&["customize", "-a", &s(&img), "--accel", "xen"], "xen"),
        (&["customize", "-a", &s(&img), "--edit", "/etc/hosts:s/a/b/e"], "\"s/a/b/e\": the e flag runs Perl code"),
        (&["customize", "-a", &s(&img), "--edit", "/etc/hosts:system('x')"], "s/REGEX/REPLACEMENT/"),
    ];
    for (args, want) in cases {
        let started = Instant::now();
        let out = imgforge(args);
        assert_eq!(code(&out), 2, "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!stderr.contains("secret-text"));
        assert!(started.elapsed() < Duration::from_secs(5), "{args:?} took {:?}: a VM was booted?", started.elapsed());
    }
    assert_eq!(std::fs::read(&img).unwrap(), vec![0u8; 1 << 20], "the disk is unchanged");
}

#[test]
fn lvm_root() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::LvmExt4, work.path()).unwrap();
    let out = customize_tcg(&img, &["--hostname", "lvm1", "--write", "/etc/marker:on lvm"]);
    assert_eq!(code(&out), 0);
    // Read the LV without device-mapper: it starts LVM_DATA_OFFSET into the PV partition.
    let part = imgforge_tests::readback::partitions(&img).unwrap()[0];
    let m = Mount::at(&img, part.offset + fixtures::LVM_DATA_OFFSET, fixtures::LVM_ROOT_BYTES).unwrap();
    assert_eq!(m.read("/etc/hostname").unwrap(), "lvm1\n");
    assert_eq!(m.read("/etc/marker").unwrap(), "on lvm");
}

/// A block device is customized in place too (qemu's `host_device` driver, for the helper VM
/// and for the confined commit): a loop device over the fixture, read back after detaching.
#[test]
fn a_block_device_is_customized() {
    fixtures::require_root();
    let dir = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, dir.path()).unwrap();
    let dev = fixtures::sh(std::process::Command::new("losetup").args(["--find", "--show"]).arg(&img))
        .unwrap()
        .trim()
        .to_owned();
    let out = customize_tcg(std::path::Path::new(&dev), &["--hostname", "on-a-device"]);
    let _ = std::process::Command::new("losetup").args(["-d", &dev]).status();
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let m = Mount::partition(&img, 0).unwrap();
    assert_eq!(m.read("/etc/hostname").unwrap(), "on-a-device\n");
}

/// Where the helper mounts the guest root: a guest symlink to a path under it names, as the
/// helper sees it, a guest file the link itself does not lead to inside the guest.
const HELPER_GUEST_ROOT: &str = "/mnt/guest";

/// A script that tries every way from the chroot to the report port (the helper's node, PID
/// 1's root, a node the image carries, a node it makes), writes a forged SUCCESS there and
/// resets the VM before the rest of the customization ran. (A regular file named
/// /dev/ttyS1 in the guest's own /dev is no port: only character devices count.)
const FORGE_REPORT: &str = r#"#!/bin/sh
line=${1:-SUCCESS}
for port in /dev/ttyS1 /proc/1/root/dev/ttyS1 /root/ttyS1; do
    [ -c "$port" ] && printf '%b\n' "$line" > "$port" && echo "forged through $port"
done
mknod /tmp/ttyS1 c 4 65 && printf '%b\n' "$line" > /tmp/ttyS1 && echo "forged through mknod"
echo b > /proc/sysrq-trigger
sleep 30
exit 1
"#;

/// The report port is out of reach of the guest's programs: a `--run` script that forges
/// SUCCESS on it and ends the VM leaves the customization failed, the operations after it
/// undone.
#[test]
fn a_guest_program_cannot_forge_the_report() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    {
        let m = Mount::writable_partition(&img, 0).unwrap();
        let node = std::ffi::CString::new(m.join("/root/ttyS1").into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path; makedev is a pure computation.
        assert_eq!(unsafe { libc::mknod(node.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(4, 65)) }, 0);
    }
    let script = work.path().join("forge.sh");
    std::fs::write(&script, FORGE_REPORT).unwrap();
    let out = customize_tcg(&img, &["-v", "--run", &s(&script), "--write", "/etc/after-run:done"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(code(&out), 0, "a forged SUCCESS was believed: {stderr}");
    assert!(!stderr.contains("forged through"), "{stderr}");
    let m = Mount::partition(&img, 0).unwrap();
    assert!(!m.join("/etc/after-run").exists());
}

/// A guest program cannot set the helper VM's clock (a file it changes could otherwise get back
/// the change time the base's file had, and pass for unchanged in a tree manifest).
#[test]
fn a_guest_program_cannot_set_the_clock() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let script = "if date -s @1000000000 >/dev/null 2>&1; then echo set; else echo refused; fi > /root/clock";
    let out = customize_tcg(&img, &["--run-command", script]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let m = Mount::partition(&img, 0).unwrap();
    assert_eq!(m.read("/root/clock").unwrap(), "refused\n");
}

/// A marker no fixture holds, to find scrubbed data on the raw disk.
const SCRUB_MARKER: &str = "imgforge-scrub-marker-7c1e5b0d9a4f-do-not-keep";

/// True if `image`'s raw bytes contain `text` anywhere.
fn image_contains(image: &std::path::Path, text: &str) -> bool {
    std::process::Command::new("grep").args(["-q", "-a", "-F", text]).arg(image).status().unwrap().success()
}

/// virt-customize's in-guest file operations on a hostile guest (`/etc/evil -> /`, links to the
/// guest's files as the helper sees them): each has virt-customize's effect, and nothing is
/// reached through a link outside the guest root. Some come from a commands file.
#[test]
fn file_operations_keep_metadata_and_stay_in_the_guest() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let link = |target: &str, at: &std::path::Path| std::os::unix::fs::symlink(target, at).unwrap();
    let mode = |p: &std::path::Path, m: u32| std::fs::set_permissions(p, PermissionsExt::from_mode(m)).unwrap();
    let helper_hostname = format!("{HELPER_GUEST_ROOT}/etc/hostname");
    let (passwd, hostname) = {
        let m = Mount::writable_partition(&img, 0).unwrap();
        link("/", &m.join("/etc/evil"));
        let tree = m.join("/srv/tree");
        std::fs::create_dir_all(tree.join("sub")).unwrap();
        std::fs::write(tree.join("a"), "file a\n").unwrap();
        mode(&tree.join("a"), 0o640);
        std::fs::write(tree.join("sub/b"), "file b\n").unwrap();
        mode(&tree.join("sub/b"), 0o4755);
        mode(&tree.join("sub"), 0o710);
        std::os::unix::fs::chown(tree.join("sub"), Some(1234), Some(4321)).unwrap();
        link("/etc/passwd", &tree.join("abs"));
        link("/", &tree.join("up"));
        link(&helper_hostname, &tree.join("helper"));
        let t = libc::timespec { tv_sec: 1_000_000_000, tv_nsec: 0 };
        let c = std::ffi::CString::new(tree.join("sub/b").into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path and two timespecs.
        assert_eq!(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), [t, t].as_ptr(), 0) }, 0);
        let logs = m.join("/srv/logs");
        std::fs::create_dir_all(logs.join("sub")).unwrap();
        std::fs::write(logs.join("x.log"), "x\n").unwrap();
        std::fs::write(logs.join("sub/y.log"), "y\n").unwrap();
        link(&helper_hostname, &logs.join("hostname-link"));
        link("/etc/passwd", &logs.join("passwd-link"));
        link("/", &logs.join("evil"));
        std::fs::write(m.join("/srv/secret"), SCRUB_MARKER.repeat(100)).unwrap();
        std::fs::write(m.join("/srv/scrub-target"), "scrub target\n").unwrap();
        link("/srv/scrub-target", &m.join("/srv/scrub-link"));
        std::fs::write(m.join("/srv/moveme"), "moved\n").unwrap();
        std::fs::write(m.join("/srv/truncme"), "long text\n").unwrap();
        std::fs::write(m.join("/srv/chowned"), "").unwrap();
        (m.read("/etc/passwd").unwrap(), m.read("/etc/hostname").unwrap())
    };
    assert!(image_contains(&img, SCRUB_MARKER), "the marker is not on the disk to begin with");
    let commands = work.path().join("commands");
    std::fs::write(&commands, "touch /root/touched-from-file\nlink /etc/hostname:/root/l3\ntruncate /srv/truncme\n")
        .unwrap();
    let out = customize_tcg(
        &img,
        &[
            "--chown",
            "1000:100:/srv/tree/a",
            "--copy",
            "/srv/tree:/opt",
            "--copy",
            "/etc/evil:/root/evil-copy",
            "--copy",
            "/etc/evil/etc/hostname:/root/hostname-copy",
            "--scrub",
            "/etc/evil/srv/secret",
            "--scrub",
            "/srv/scrub-link",
            "--move",
            "/srv/moveme:/root",
            "--move",
            "/etc/evil:/srv/evil-moved",
            "--link",
            "/etc/hostname:/root/l1:/root/l2",
            "--touch",
            "/root/touched",
            "--truncate-recursive",
            "/srv/logs",
            "--mkdir",
            "/srv/newdir/a/b",
            "--chown",
            "1000:1000:/srv/evil-moved/srv/chowned",
            "--commands-from-file",
            &s(&commands),
        ],
    );
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!image_contains(&img, SCRUB_MARKER), "the scrubbed file's data is still on the disk");
    let m = Mount::partition(&img, 0).unwrap();
    let meta = |p: &str| std::fs::symlink_metadata(m.join(p)).unwrap();
    let target = |p: &str| std::fs::read_link(m.join(p)).unwrap().to_string_lossy().into_owned();
    // --chown, then --copy keeping it, modes, times and links verbatim.
    assert_eq!(m.read("/opt/tree/a").unwrap(), "file a\n");
    let a = meta("/opt/tree/a");
    assert_eq!((a.mode() & 0o7777, a.uid(), a.gid()), (0o640, 1000, 100));
    let sub = meta("/opt/tree/sub");
    assert_eq!((sub.mode() & 0o7777, sub.uid(), sub.gid()), (0o710, 1234, 4321));
    let b = meta("/opt/tree/sub/b");
    assert_eq!(
        (m.read("/opt/tree/sub/b").unwrap().as_str(), b.mode() & 0o7777, b.mtime()),
        ("file b\n", 0o4755, 1_000_000_000)
    );
    assert_eq!(target("/opt/tree/abs"), "/etc/passwd");
    assert_eq!(target("/opt/tree/up"), "/");
    assert_eq!(target("/opt/tree/helper"), helper_hostname);
    assert_eq!(target("/root/evil-copy"), "/", "a final symlink is copied, not followed");
    assert_eq!(m.read("/root/hostname-copy").unwrap(), hostname, "/etc/evil/etc/hostname is the guest's");
    // --scrub: the file a link leads to inside the guest is scrubbed and deleted, the link stays.
    assert!(!m.join("/srv/secret").exists() && !m.join("/srv/scrub-target").exists());
    assert_eq!(target("/srv/scrub-link"), "/srv/scrub-target");
    // --move into a directory; a final symlink moved, not what it leads to.
    assert_eq!(m.read("/root/moveme").unwrap(), "moved\n");
    assert!(!m.join("/srv/moveme").exists());
    assert_eq!(target("/srv/evil-moved"), "/");
    assert!(std::fs::symlink_metadata(m.join("/etc/evil")).is_err());
    for l in ["/root/l1", "/root/l2", "/root/l3"] {
        assert_eq!(target(l), "/etc/hostname", "{l}");
    }
    for t in ["/root/touched", "/root/touched-from-file"] {
        let t = meta(t);
        assert!(t.is_file() && t.len() == 0 && t.mode() & 0o7777 == 0o644, "{t:?}");
    }
    assert_eq!(meta("/srv/truncme").len(), 0);
    // --truncate-recursive: regular files only; links below are not followed, in the guest
    // or to the guest's files as the helper sees them.
    assert_eq!((meta("/srv/logs/x.log").len(), meta("/srv/logs/sub/y.log").len()), (0, 0));
    assert_eq!(m.read("/etc/passwd").unwrap(), passwd);
    assert_eq!(m.read("/etc/hostname").unwrap(), hostname);
    assert_eq!(target("/srv/logs/hostname-link"), helper_hostname);
    // --mkdir: mkdir -p with 0755, as guestfs mkdir-p under its umask 022.
    for d in ["/srv/newdir", "/srv/newdir/a", "/srv/newdir/a/b"] {
        let d = meta(d);
        assert!(d.is_dir() && d.mode() & 0o7777 == 0o755, "{d:?}");
    }
    let chowned = meta("/srv/chowned");
    assert_eq!((chowned.uid(), chowned.gid()), (1000, 1000));
}

/// `--copy-in` of a host tree: types, modes, numeric owners, times and symlinks arrive as tar
/// would bring them; a host symlink to a file outside the tree arrives as a symlink, never as
/// that file's bytes; REMOTEDIR is resolved inside the guest (`/etc/evil -> /`).
#[test]
fn copy_in_keeps_the_tree_and_follows_no_host_link() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    {
        let m = Mount::writable_partition(&img, 0).unwrap();
        std::os::unix::fs::symlink("/", m.join("/etc/evil")).unwrap();
        std::fs::create_dir_all(m.join("/srv/merge/conf")).unwrap();
        std::fs::write(m.join("/srv/merge/conf/old"), "kept\n").unwrap();
        std::fs::write(m.join("/srv/merge/conf/replaced"), "old\n").unwrap();
    }
    let secret_marker = "imgforge-host-secret-3b8e61f2-never-in-a-guest";
    let secret = work.path().join("host-secret");
    std::fs::write(&secret, secret_marker).unwrap();
    let conf = work.path().join("conf");
    std::fs::create_dir_all(conf.join("sub")).unwrap();
    std::fs::write(conf.join("replaced"), "new\n").unwrap();
    std::fs::write(conf.join("sub/tool"), "#!/bin/sh\n").unwrap();
    // chown first: it clears the set-id bits.
    std::os::unix::fs::chown(conf.join("sub/tool"), Some(1234), Some(4321)).unwrap();
    std::fs::set_permissions(conf.join("sub/tool"), PermissionsExt::from_mode(0o4755)).unwrap();
    std::fs::set_permissions(conf.join("sub"), PermissionsExt::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink(&secret, conf.join("secret-link")).unwrap();
    std::os::unix::fs::symlink("sub/tool", conf.join("rel-link")).unwrap();
    let t = libc::timespec { tv_sec: 1_100_000_000, tv_nsec: 0 };
    let c = std::ffi::CString::new(conf.join("sub/tool").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path and two timespecs.
    assert_eq!(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), [t, t].as_ptr(), 0) }, 0);
    let single = work.path().join("single.txt");
    std::fs::write(&single, "single\n").unwrap();

    let missing = imgforge(&["customize", "-a", &s(&img), "--copy-in", "/nonexistent/tree:/srv"]);
    assert_eq!(code(&missing), 2);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--copy-in /nonexistent/tree:/srv"));

    let out = customize_tcg(
        &img,
        &[
            "--copy-in",
            &format!("{}:/etc/evil/srv/merge", s(&conf)),
            "--copy-in",
            &format!("{}:/root", s(&single)),
            "--mkdir",
            "/srv/tree-link",
            "--copy-in",
            &format!("{}:/srv/tree-link", s(&conf.join("secret-link"))),
        ],
    );
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!image_contains(&img, secret_marker), "a host file outside the tree reached the guest");
    let m = Mount::partition(&img, 0).unwrap();
    let meta = |p: &str| std::fs::symlink_metadata(m.join(p)).unwrap();
    assert_eq!(m.read("/srv/merge/conf/old").unwrap(), "kept\n", "an existing directory is merged into");
    assert_eq!(m.read("/srv/merge/conf/replaced").unwrap(), "new\n");
    let tool = meta("/srv/merge/conf/sub/tool");
    assert_eq!((tool.mode() & 0o7777, tool.uid(), tool.gid(), tool.mtime()), (0o4755, 1234, 4321, 1_100_000_000));
    assert_eq!(meta("/srv/merge/conf/sub").mode() & 0o7777, 0o750);
    assert_eq!(std::fs::read_link(m.join("/srv/merge/conf/secret-link")).unwrap(), secret);
    assert_eq!(std::fs::read_link(m.join("/srv/merge/conf/rel-link")).unwrap(), std::path::Path::new("sub/tool"));
    assert_eq!(m.read("/root/single.txt").unwrap(), "single\n");
    assert_eq!(std::fs::read_link(m.join("/srv/tree-link/secret-link")).unwrap(), secret, "LOCALPATH's own link");
    drop(m);
    // REMOTEDIR must exist, as virt-customize's copy-in requires.
    let out = customize_tcg(&img, &["--copy-in", &format!("{}:/srv/no-such-dir", s(&single))]);
    assert_eq!(code(&out), 1);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/srv/no-such-dir"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// virt-customize's global options: `-q` leaves a terminal blank (run under a pseudo-terminal
/// by script(1), where a bar would otherwise show), `--password-crypto sha256` writes `$5$`, and
/// the others are accepted.
#[test]
fn global_options_as_virt_customize() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let args = [
        s(&imgforge_tests::run::binary()),
        "customize".into(),
        "-a".into(),
        s(&img),
        "--accel".into(),
        "tcg".into(),
        "-q".into(),
        "--memsize".into(),
        "384".into(),
        "--smp".into(),
        "2".into(),
        "--no-network".into(),
        "--format".into(),
        "raw".into(),
        "--colors".into(),
        "--password-crypto".into(),
        "sha256".into(),
        "--root-password".into(),
        "password:x".into(),
        "--hostname".into(),
        "y".into(),
    ];
    let line = args.iter().map(|a| format!("'{}'", a.replace('\'', r"'\''"))).collect::<Vec<_>>().join(" ");
    // stdout and stderr both on one terminal, which script copies to its stdout.
    let out = std::process::Command::new("script").args(["-qefc", &line, "/dev/null"]).output().unwrap();
    let terminal = String::from_utf8_lossy(&out.stdout);
    assert_eq!(code(&out), 0, "{terminal}");
    assert_eq!(terminal, "", "-q: nothing on the terminal but errors");
    let m = Mount::partition(&img, 0).unwrap();
    assert_eq!(m.read("/etc/hostname").unwrap(), "y\n");
    let field = shadow_field(&m.read("/etc/shadow").unwrap(), "root").unwrap();
    assert!(field.starts_with("$5$"), "{field}");
    use sha_crypt::PasswordVerifier;
    sha_crypt::ShaCrypt::default().verify_password(b"x", field.as_str()).expect("root's password verifies");
}

/// A stand-in qemu that prints its arguments on the console, which `-v` shows; it reports no
/// success, so the disk stays as it was.
fn qemu_args_seen(dir: &std::path::Path, img: &std::path::Path, args: &[&str]) -> (i32, String) {
    let qemu = imgforge_tests::stand_in::serial_qemu(dir, "qemu-args", "echo \"qemu-args: $*\" >&\"$c\"\n");
    let mut all = vec!["-v", "--qemu", qemu.to_str().unwrap(), "--hostname", "h"];
    all.extend_from_slice(args);
    let out = customize_tcg(img, &all);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr.lines().find(|l| l.contains("qemu-args: ")).unwrap_or_default().to_owned();
    (code(&out), line)
}

#[test]
fn memsize_and_smp_reach_qemu() {
    let bin = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, bin.path()).unwrap();
    let (_, line) = qemu_args_seen(bin.path(), &img, &["--memsize", "384", "--smp", "2"]);
    assert!(line.contains(" -m 384 -smp 2 "), "{line}");
    let (_, line) = qemu_args_seen(bin.path(), &img, &["-m", "200"]);
    assert!(line.contains(" -m 200 -smp 1 "), "{line}");
    for (bad, named) in [("--smp=0", "--smp"), ("--memsize=64", "--memsize")] {
        let out = imgforge(&["customize", "-a", &s(&img), bad, "--hostname", "h"]);
        assert_eq!(code(&out), 2, "{bad}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(named), "{bad}");
    }
}

/// `--format raw` is the user's word: a raw disk whose first bytes read as a qcow2 header (which
/// could name a host file as its backing file) goes to qemu as raw, never parsed as qcow2.
#[test]
fn format_raw_is_used_as_raw_whatever_the_header_says() {
    let bin = tempfile::tempdir().unwrap();
    let img = bin.path().join("looks-like-qcow2.img");
    let mut bytes = vec![0u8; 4 << 20];
    bytes[..4].copy_from_slice(b"QFI\xfb");
    bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
    bytes[8..16].copy_from_slice(&512u64.to_be_bytes());
    bytes[16..20].copy_from_slice(&11u32.to_be_bytes());
    bytes[512..523].copy_from_slice(b"/etc/shadow");
    std::fs::write(&img, &bytes).unwrap();
    let sniffed = imgforge(&["customize", "-a", &s(&img), "--accel", "tcg", "--hostname", "h"]);
    assert_eq!(code(&sniffed), 2, "without --format the header is read, and this one refused");
    let (_, line) = qemu_args_seen(bin.path(), &img, &["--format", "raw"]);
    assert!(line.contains("driver=raw,node-name=disk,"), "{line}");
    assert!(!line.contains("driver=qcow2,node-name=disk,"), "{line}");
    assert_eq!(std::fs::read(&img).unwrap(), bytes, "the disk is untouched");
}

#[test]
fn network_is_refused_naming_the_offline_ways() {
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let out = customize_tcg(&img, &["--network", "--hostname", "h"]);
    assert_eq!(code(&out), 2);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for named in ["--network", "--install-rpm", "--repo DIR", "--copy-in", "--upload"] {
        assert!(stderr.contains(named), "{named} missing from {stderr}");
    }
}

/// `-x` shows each operation as the helper runs it (its console), which a plain run does not.
#[test]
fn trace_shows_each_operation_as_the_helper_runs_it() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let traced = "==> [2/2] --write /etc/motd";
    for (flag, shown) in [("-x", true), ("--hostname=z", false)] {
        let out = customize_tcg(&img, &[flag, "--hostname", "y", "--write", "/etc/motd:traced"]);
        assert_eq!(code(&out), 0);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.contains(traced), shown, "{flag}: {stderr}");
    }
}

/// `--edit FILE:EXPR` as virt-customize's (virt-edit's Perl loop): each line through the
/// expression, a line set to '' deleted, the file a guest link leads to edited in place of the
/// link, its mode and owner kept, bytes that are not UTF-8 kept; it sees what an earlier
/// `--write` wrote. A missing file fails the run, naming it, and leaves the disk as it was.
#[test]
fn edit_runs_perl_substitutions_in_the_guest() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let conf: &[u8] = b"a=1\n# drop me\nb=2\r\n\xff\xfe c=3";
    let hostname = {
        let m = Mount::writable_partition(&img, 0).unwrap();
        std::fs::write(m.join("/srv/conf"), conf).unwrap();
        std::fs::set_permissions(m.join("/srv/conf"), PermissionsExt::from_mode(0o640)).unwrap();
        std::os::unix::fs::chown(m.join("/srv/conf"), Some(1000), Some(100)).unwrap();
        std::os::unix::fs::symlink("/srv/conf", m.join("/srv/conf-link")).unwrap();
        std::os::unix::fs::symlink("/", m.join("/etc/evil")).unwrap();
        m.read("/etc/hostname").unwrap()
    };
    let out = customize_tcg(
        &img,
        &[
            "--edit",
            "/etc/hostname:s/^/edited-/",
            "--edit",
            "/etc/evil/srv/conf-link:s/=/: /g; $_ = '' if /^#/",
            "--write",
            "/srv/written:hello world",
            "--edit",
            "/srv/written:s{(\\w+) (\\w+)}{$2 $1}; $_ .= \"\\n\"",
        ],
    );
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let digest = || fixtures::sha256_hex(&img);
    {
        let m = Mount::partition(&img, 0).unwrap();
        assert_eq!(m.read("/etc/hostname").unwrap(), format!("edited-{hostname}"));
        assert_eq!(std::fs::read(m.join("/srv/conf")).unwrap(), b"a: 1\nb: 2\r\n\xff\xfe c: 3");
        let meta = std::fs::symlink_metadata(m.join("/srv/conf")).unwrap();
        assert_eq!((meta.is_file(), meta.mode() & 0o7777, meta.uid(), meta.gid()), (true, 0o640, 1000, 100));
        assert_eq!(std::fs::read_link(m.join("/srv/conf-link")).unwrap(), std::path::Path::new("/srv/conf"));
        assert_eq!(m.read("/srv/written").unwrap(), "world hello\n");
        let temporaries: Vec<_> = std::fs::read_dir(m.join("/srv"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("imgforge"))
            .collect();
        assert!(temporaries.is_empty(), "{temporaries:?}");
    }
    let before = digest();
    let out = customize_tcg(&img, &["--write", "/srv/first:x", "--edit", "/srv/missing:s/a/b/"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), 1, "{stderr}");
    assert!(stderr.contains("/srv/missing does not exist in the guest"), "{stderr}");
    assert_eq!(digest(), before, "a failed --edit leaves the disk byte-identical");
}

/// The machine id an image carries, which its clones must not keep.
const IMAGE_MACHINE_ID: &str = "0123456789abcdef0123456789abcdef\n";

/// Makes the fixture a golden image with what clones must not share: a machine id (mode 0444
/// as systemd writes it) that D-Bus reaches through a symlink, SSH host keys (a file, its
/// public half, and a symlink named as a key leading to a file that must stay), an sshd_config.
fn plant_image_identity(img: &std::path::Path) {
    let m = Mount::writable_partition(img, 0).unwrap();
    std::fs::write(m.join("/etc/machine-id"), IMAGE_MACHINE_ID).unwrap();
    std::fs::set_permissions(m.join("/etc/machine-id"), std::fs::Permissions::from_mode(0o444)).unwrap();
    std::fs::create_dir_all(m.join("/var/lib/dbus")).unwrap();
    std::os::unix::fs::symlink("/etc/machine-id", m.join("/var/lib/dbus/machine-id")).unwrap();
    std::fs::create_dir_all(m.join("/etc/ssh")).unwrap();
    std::fs::write(m.join("/etc/ssh/ssh_host_ed25519_key"), "image private key\n").unwrap();
    std::fs::write(m.join("/etc/ssh/ssh_host_ed25519_key.pub"), "ssh-ed25519 AAAA image\n").unwrap();
    std::os::unix::fs::symlink("/etc/hostname", m.join("/etc/ssh/ssh_host_rsa_key")).unwrap();
    std::fs::write(m.join("/etc/ssh/sshd_config"), "PermitRootLogin no\n").unwrap();
    let _ = std::fs::remove_file(m.join("/var/lib/systemd/random-seed"));
    assert!(m.join("/var/lib/systemd").is_dir(), "the fixture has /var/lib/systemd");
}

/// The names in the guest's /etc/ssh, sorted.
fn ssh_dir(m: &Mount) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(m.join("/etc/ssh"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Two clones of one image, each customized with --reset-machine-id and
/// --regenerate-ssh-host-keys: each has a machine id of its own (neither the image's nor the
/// other's), D-Bus's symlink is left alone, the host keys are gone (the fixture is a minbase
/// Debian without openssh-server: no sshd, so they stay removed for the first boot), and each
/// got a random seed of its own, 0600 and 512 bytes, without being asked.
#[test]
fn clones_get_their_own_machine_id_host_keys_and_random_seed() {
    let work = tempfile::tempdir().unwrap();
    let img_a = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    plant_image_identity(&img_a);
    let img_b = work.path().join("clone-b.img");
    std::fs::copy(&img_a, &img_b).unwrap();
    let hostname = Mount::partition(&img_a, 0).unwrap().read("/etc/hostname").unwrap();

    let mut seen = Vec::new();
    for img in [&img_a, &img_b] {
        let out = customize_tcg(img, &["--reset-machine-id", "--regenerate-ssh-host-keys"]);
        assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
        let m = Mount::partition(img, 0).unwrap();
        let id = m.read("/etc/machine-id").unwrap();
        assert!(id.len() == 33 && id.ends_with('\n'), "{id:?}");
        assert!(id.trim_end().bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{id:?}");
        assert_ne!(id, IMAGE_MACHINE_ID, "the image's machine id was kept");
        let meta = std::fs::symlink_metadata(m.join("/etc/machine-id")).unwrap();
        assert_eq!((meta.is_file(), meta.mode() & 0o7777, meta.uid()), (true, 0o444, 0), "mode and owner kept");
        let dbus = std::fs::read_link(m.join("/var/lib/dbus/machine-id")).ok();
        assert_eq!(dbus, Some("/etc/machine-id".into()), "D-Bus's symlink was replaced");

        assert_eq!(ssh_dir(&m), ["sshd_config"], "host keys left in the clone");
        assert_eq!(m.read("/etc/ssh/sshd_config").unwrap(), "PermitRootLogin no\n");
        assert_eq!(m.read("/etc/hostname").unwrap(), hostname, "a key's symlink was followed");

        let seed_path = m.join("/var/lib/systemd/random-seed");
        let seed = std::fs::read(&seed_path).unwrap();
        let meta = std::fs::symlink_metadata(&seed_path).unwrap();
        assert_eq!((seed.len(), meta.mode() & 0o7777, meta.uid(), meta.gid()), (512, 0o600, 0, 0));
        assert!(!m.join("/var/lib/urandom").exists(), "no directory made for a legacy seed");
        seen.push((id, seed));
    }
    assert_ne!(seen[0].0, seen[1].0, "two clones got the same machine id");
    assert_ne!(seen[0].1, seen[1].1, "two clones got the same random seed");
}

/// A guest with sshd and ssh-keygen (the host's Debian 12 ssh-keygen and its libcrypto,
/// copied into the Debian 12 fixture, which lacks openssh-server) gets new host keys of every
/// default type, made by its own ssh-keygen in the helper; the image's key is gone.
#[test]
fn host_keys_are_regenerated_by_the_guests_ssh_keygen() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    plant_image_identity(&img);
    {
        let m = Mount::writable_partition(&img, 0).unwrap();
        for (host, guest, mode) in [
            ("/usr/bin/ssh-keygen", "/usr/bin/ssh-keygen", 0o755),
            ("/usr/lib/x86_64-linux-gnu/libcrypto.so.3", "/usr/lib/x86_64-linux-gnu/libcrypto.so.3", 0o644),
            // Never run: its presence says the guest wants host keys.
            ("/usr/bin/true", "/usr/sbin/sshd", 0o755),
        ] {
            std::fs::copy(host, m.join(guest)).unwrap_or_else(|e| panic!("{host}: {e}"));
            std::fs::set_permissions(m.join(guest), std::fs::Permissions::from_mode(mode)).unwrap();
        }
        // A key at a place of the image's choosing, named by sshd_config.
        std::fs::write(m.join("/etc/ssh/sshd_config"), "HostKey /srv/ssh/extra\nHostKey /etc/ssh/ssh_host_rsa_key\n")
            .unwrap();
        std::fs::create_dir_all(m.join("/srv/ssh")).unwrap();
        std::fs::write(m.join("/srv/ssh/extra"), "image private key\n").unwrap();
        std::fs::write(m.join("/srv/ssh/extra.pub"), "ssh-ed25519 AAAA image\n").unwrap();
    }
    let out = customize_tcg(&img, &["--regenerate-ssh-host-keys"]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let m = Mount::partition(&img, 0).unwrap();
    let mut want = vec!["sshd_config".to_owned()];
    for kind in ["ecdsa", "ed25519", "rsa"] {
        want.push(format!("ssh_host_{kind}_key"));
        want.push(format!("ssh_host_{kind}_key.pub"));
    }
    want.sort();
    assert_eq!(ssh_dir(&m), want);
    for kind in ["ecdsa", "ed25519", "rsa"] {
        let key = m.join(&format!("/etc/ssh/ssh_host_{kind}_key"));
        let meta = std::fs::symlink_metadata(&key).unwrap();
        assert_eq!((meta.is_file(), meta.mode() & 0o777, meta.uid()), (true, 0o600, 0), "{kind}");
        let fingerprint = std::process::Command::new("ssh-keygen").arg("-l").arg("-f").arg(&key).output().unwrap();
        let text = String::from_utf8_lossy(&fingerprint.stdout);
        assert!(fingerprint.status.success() && text.to_lowercase().contains(kind), "{kind}: {text}");
    }
    assert!(!m.read("/etc/ssh/ssh_host_ed25519_key").unwrap().contains("image private key"));
    let extra =
        std::process::Command::new("ssh-keygen").args(["-l", "-f"]).arg(m.join("/srv/ssh/extra")).output().unwrap();
    let text = String::from_utf8_lossy(&extra.stdout);
    assert!(extra.status.success() && text.contains("ED25519"), "the HostKey of sshd_config: {text}");
}

/// The operations of the dry-run tests: one path added, removed, changed and made of each kind.
const DRY_RUN_OPS: [&str; 8] =
    ["--write", "/etc/x:hi", "--delete", "/etc/motd", "--chmod", "0600:/etc/hostname", "--mkdir", "/opt/new"];

/// Paths the helper may change on a run of `DRY_RUN_OPS` beyond what they ask, each with why.
const DRY_RUN_TOLERATED: &[(&str, &str)] =
    &[("/var/lib/systemd/random-seed", "45-RandomSeed gives every customization a fresh seed, as virt-customize")];

/// True if a printed change line is about a path of [`DRY_RUN_TOLERATED`].
fn tolerated(line: &str) -> bool {
    DRY_RUN_TOLERATED.iter().any(|(path, _)| line.ends_with(&format!(" {path}")))
}

/// `customize -n` (virt-customize's `--dry-run`) runs every operation into the overlay and
/// drops it: the disk keeps every byte, and stdout lists exactly the paths the operations
/// added, removed and changed, with type, mode, owner and (for a change) what changed. Then the
/// same as `file-change` events with `--progress json`, checked against the schema.
#[test]
fn dry_run_lists_the_changes_and_leaves_the_disk_unchanged() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    // The modes and owners the fixture gives the files the operations change.
    let (hostname, motd) = {
        let m = Mount::partition(&img, 0).unwrap();
        let meta = |p: &str| std::fs::symlink_metadata(m.join(p)).unwrap();
        (meta("/etc/hostname"), meta("/etc/motd"))
    };
    let owner = |m: &std::fs::Metadata| format!("{}:{}", m.uid(), m.gid());
    assert!(hostname.is_file() && motd.is_file());
    let before = fixtures::sha256_hex(&img);
    let mut args = vec!["-n"];
    args.extend(DRY_RUN_OPS);
    let out = customize_tcg(&img, &args);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(code(&out), 0, "{stderr}");
    assert_eq!(fixtures::sha256_hex(&img), before, "a dry run changed the disk");
    let mut listed: Vec<&str> = stdout.lines().filter(|l| !tolerated(l)).collect();
    listed.sort_unstable();
    let mut want = vec![
        "added    file         0644 0:0       /etc/x".to_owned(),
        format!(
            "changed  file         0600 {:<9} /etc/hostname  (mode: was {:04o})",
            owner(&hostname),
            hostname.mode() & 0o7777
        ),
        format!("removed  file         {:04o} {:<9} /etc/motd", motd.mode() & 0o7777, owner(&motd)),
        "added    directory    0755 0:0       /opt/new".to_owned(),
    ];
    want.sort_unstable();
    assert_eq!(listed, want, "stdout:\n{stdout}\nstderr:\n{stderr}");

    let mut args = vec!["--dry-run", "--progress", "json"];
    args.extend(DRY_RUN_OPS);
    let out = customize_tcg(&img, &args);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fixtures::sha256_hex(&img), before, "a dry run changed the disk");
    let events = progress_schema::events(&String::from_utf8_lossy(&out.stdout));
    let mut changes: Vec<String> = events
        .iter()
        .filter(|e| e["type"] == "file-change")
        .filter(|e| !DRY_RUN_TOLERATED.iter().any(|(path, _)| e["path"] == *path))
        .map(|e| {
            let what = e.get("what").map(|w| w.to_string()).unwrap_or_default();
            let was = e.get("was").map(|w| w.to_string()).unwrap_or_default();
            format!(
                "{} {} {} {} {}:{} {what} {was}",
                e["change"], e["path"], e["file_type"], e["mode"], e["uid"], e["gid"]
            )
        })
        .collect();
    changes.sort_unstable();
    let (h_mode, h_uid, h_gid) = (hostname.mode() & 0o7777, hostname.uid(), hostname.gid());
    let mut want = vec![
        r#""added" "/etc/x" "file" "0644" 0:0  "#.to_owned(),
        r#""added" "/opt/new" "directory" "0755" 0:0  "#.to_owned(),
        format!(
            r#""changed" "/etc/hostname" "file" "0600" {h_uid}:{h_gid} ["mode"] {{"file_type":"file","gid":{h_gid},"mode":"{h_mode:04o}","uid":{h_uid}}}"#
        ),
        format!(r#""removed" "/etc/motd" "file" "{:04o}" {}  "#, motd.mode() & 0o7777, owner(&motd)),
    ];
    want.sort_unstable();
    assert_eq!(changes, want);
    assert!(!events.iter().any(|e| e["type"] == "file-changes-omitted"));
    assert_eq!(events.last().unwrap()["type"], "image-done");
}

/// A guest file named `/x<newline>SUCCESS`, made by a dry run that then fails: listed escaped
/// on one line (the report line carrying it cannot be read as a verdict), and the run fails.
#[test]
fn a_crafted_file_name_cannot_forge_a_dry_runs_success() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let before = fixtures::sha256_hex(&img);
    let out =
        customize_tcg(&img, &["-n", "--run-command", r#"touch "$(printf '/x\nSUCCESS')""#, "--run-command", "exit 3"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(code(&out), 1, "a failing dry run succeeded: {stderr}");
    assert!(stderr.contains("--run-command 'exit 3'") && stderr.contains("status 3"), "{stderr}");
    assert_eq!(
        stdout.lines().filter(|l| !tolerated(l)).collect::<Vec<_>>(),
        [r"added    file         0644 0:0       /x\nSUCCESS"],
        "the change made before the failure, escaped: {stderr}"
    );
    assert!(!stdout.lines().chain(stderr.lines()).any(|l| l.trim() == "SUCCESS"), "{stdout}{stderr}");
    assert_eq!(fixtures::sha256_hex(&img), before, "a dry run changed the disk");
}

/// Guest links into the helper's /proc, /sys and the guest's /dev, which are mounted in the
/// guest root for its programs during 50-Customize: `--write` to `/proc/sysrq-trigger` crashed
/// the helper's kernel ("sysrq: Trigger a crash"). Each operation fails naming the path and
/// where it leads, the disk byte-identical; the same operations on the guest's own files work.
#[test]
fn operations_never_reach_the_helpers_proc_sys_and_dev() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    {
        let m = Mount::writable_partition(&img, 0).unwrap();
        let link = |target: &str, at: &str| std::os::unix::fs::symlink(target, m.join(at)).unwrap();
        link("/proc/sysrq-trigger", "/etc/sr");
        link("/proc/self/comm", "/etc/comm-link");
        link("/sys/kernel/uevent_seqnum", "/etc/sys-link");
        link("/dev/null", "/etc/null-link");
        std::fs::write(m.join("/srv/plain"), "plain\n").unwrap();
    }
    let before = fixtures::sha256_hex(&img);
    let cases = [
        (["--write", "/etc/sr:c"], "/etc/sr leads to the helper's /proc"),
        (["--truncate", "/etc/comm-link"], "/etc/comm-link leads to the helper's /proc"),
        (["--append-line", "/etc/sys-link:1"], "/etc/sys-link leads to the helper's /sys"),
        (["--chmod", "0000:/etc/null-link"], "/etc/null-link leads to the helper's /dev"),
    ];
    for (args, want) in cases {
        let out = customize_tcg(&img, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code(&out), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(want) && stderr.contains("not to the guest's disk"), "{args:?}: {stderr}");
        assert!(!stderr.contains("Kernel panic") && !stderr.contains("sysrq"), "{args:?}: {stderr}");
        assert_eq!(fixtures::sha256_hex(&img), before, "{args:?}: a refused operation leaves the disk byte-identical");
    }
    let out = customize_tcg(
        &img,
        &["--write", "/srv/plain:new", "--append-line", "/srv/plain:more", "--chmod", "0600:/srv/plain"],
    );
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let m = Mount::writable_partition(&img, 0).unwrap();
    assert_eq!(std::fs::read_to_string(m.join("/srv/plain")).unwrap(), "new\nmore\n");
    assert_eq!(std::fs::metadata(m.join("/srv/plain")).unwrap().mode() & 0o7777, 0o600);
}

/// `--edit` on what a hostile image makes of FILE: a sparse file of one 400 MiB line (read
/// whole, it took the helper's kernel down, out of memory) and a link to `/proc/kcore` (the
/// helper's procfs is the guest's /proc then: read until memory ran out). Each fails the run
/// naming why, and the disk stays byte-identical.
#[test]
fn edit_of_hostile_files_fails_cleanly() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    {
        let m = Mount::writable_partition(&img, 0).unwrap();
        std::fs::File::create(m.join("/srv/huge")).unwrap().set_len(400 << 20).unwrap();
        std::os::unix::fs::symlink("/proc/kcore", m.join("/etc/kcore-link")).unwrap();
    }
    let digest = || fixtures::sha256_hex(&img);
    let before = digest();
    let cases = [
        ("/srv/huge", "line 1 of /srv/huge: a line longer than 16777216 bytes"),
        ("/etc/kcore-link", "/etc/kcore-link leads to the helper's /proc"),
    ];
    for (file, want) in cases {
        let out = customize_tcg(&img, &["--edit", &format!("{file}:s/a/b/")]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code(&out), 1, "{file}: {stderr}");
        assert!(stderr.contains(want) && !stderr.contains("Kernel panic"), "{file}: {stderr}");
        assert_eq!(digest(), before, "{file}: a failed --edit leaves the disk byte-identical");
    }
}

/// Uploads of a MiB or more reach the guest through the raw bulk disk by direct I/O: a file of
/// an odd size (not a multiple of 512 or 4096) onto the XFS root, one of whole blocks onto the
/// ext4 /boot, one under the threshold beside them through the squashfs, and one onto an existing
/// file through an in-root absolute symlink; each read back byte for byte, with the host file's
/// mode and owner, by the test's own mounts.
#[test]
fn large_uploads_arrive_byte_for_byte_through_the_bulk_disk() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::GptXfsBoot, work.path()).unwrap();
    let bytes = |len: usize, seed: u32| -> Vec<u8> {
        (0..len as u32).map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13) as u8).collect()
    };
    let file = |name: &str, data: &[u8], mode: u32| {
        let p = work.path().join(name);
        std::fs::write(&p, data).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(&p, Some(1234), Some(4321)).unwrap();
        p
    };
    let odd = bytes(24 * 1024 * 1024 + 4096 + 511, 1);
    let whole = bytes(8 * 1024 * 1024, 2);
    let small = bytes(300_000, 3);
    let linked = bytes(3 * 1024 * 1024 + 17, 4);
    let (f_odd, f_whole, f_small, f_linked) = (
        file("odd.bin", &odd, 0o640),
        file("whole.bin", &whole, 0o600),
        file("small.bin", &small, 0o644),
        file("linked.bin", &linked, 0o751),
    );
    let out = customize_tcg(
        &img,
        &[
            "-v",
            "--upload",
            &format!("{}:/opt/", s(&f_odd)),
            "--upload",
            &format!("{}:/boot/whole.bin", s(&f_whole)),
            "--upload",
            &format!("{}:/opt/", s(&f_small)),
            "--write",
            "/etc/bulk-target:old contents that are longer than nothing\n",
            "--link",
            "/etc/bulk-target:/opt/bulk-link",
            "--upload",
            &format!("{}:/opt/bulk-link", s(&f_linked)),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), 0, "{stderr}");
    for (dest, len) in [("/opt/odd.bin", odd.len()), ("/boot/whole.bin", whole.len()), ("/opt/bulk-link", linked.len())]
    {
        assert!(stderr.contains(&format!("{dest}: {len} bytes from the bulk disk, direct I/O")), "{dest}: {stderr}");
    }
    assert!(!stderr.contains("/opt/small.bin: 300000 bytes from the bulk disk"), "small files stay on the squashfs");
    let root = Mount::partition(&img, 1).unwrap();
    let boot = Mount::partition(&img, 0).unwrap();
    for (path, want, mode) in [
        (root.join("/opt/odd.bin"), &odd, 0o640),
        (boot.join("/whole.bin"), &whole, 0o600),
        (root.join("/opt/small.bin"), &small, 0o644),
        (root.join("/etc/bulk-target"), &linked, 0o751),
    ] {
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.mode() & 0o7777, meta.uid(), meta.gid()), (mode, 1234, 4321), "{}", path.display());
        assert!(std::fs::read(&path).unwrap() == *want, "{} differs from the upload", path.display());
    }
    assert!(std::fs::symlink_metadata(root.join("/opt/bulk-link")).unwrap().file_type().is_symlink());
}

/// A single large upload is its own bulk disk, the host file itself (no copy on the host): a
/// size that ends inside a sector is read up to its end and arrives byte for byte.
#[test]
fn a_single_large_upload_of_an_odd_size_arrives_byte_for_byte() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let data: Vec<u8> =
        (0..(5 * 1024 * 1024 + 4096 + 3) as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 9) as u8).collect();
    let src = work.path().join("single.bin");
    std::fs::write(&src, &data).unwrap();
    let out = customize_tcg(&img, &["-v", "--upload", &format!("{}:/root/single.bin", s(&src))]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), 0, "{stderr}");
    assert!(
        stderr.contains(&format!("/root/single.bin: {} bytes from the bulk disk, direct I/O", data.len())),
        "{stderr}"
    );
    let root = Mount::partition(&img, 0).unwrap();
    assert!(std::fs::read(root.join("/root/single.bin")).unwrap() == data, "/root/single.bin differs from the upload");
}

/// A single large upload is read in place by the helper VM, during the run: a host file
/// rewritten meanwhile, longer, would reach the guest cut at the planned length (a file the
/// host never held), exit 0. It is an error instead, and the disk is left as it was.
#[test]
fn a_single_large_upload_changed_during_the_run_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    let src = work.path().join("shrinks.bin");
    std::fs::write(&src, vec![0x5au8; 6 << 20]).unwrap();
    let disk = s(&img);
    let upload = format!("{}:/root/shrinks.bin", s(&src));
    // The sleep keeps the upload well after qemu has opened the file.
    let args = ["customize", "-a", &disk, "--accel", "tcg", "--run-command", "sleep 5", "--upload", &upload];
    let child = std::process::Command::new(imgforge_tests::run::binary())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while holders(&src).is_empty() {
        assert!(Instant::now() < deadline, "no process opened the upload");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(&src).unwrap();
    std::io::Write::write_all(&mut f, &vec![0xa5u8; 7 << 20]).unwrap();
    drop(f);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), 2, "{stderr}");
    assert!(stderr.contains("changed while the helper VM was reading it"), "{stderr}");
    let root = Mount::partition(&img, 0).unwrap();
    assert!(!root.join("/root/shrinks.bin").exists(), "nothing was written");
}

/// A disk laid out as Fedora's: btrfs, its default subvolume holding no root, the root in the
/// subvolume `root` and /home the subvolume `home`, both named by `subvol=` in the guest's
/// fstab. Customize finds the root in its subvolume and mounts /home as the guest does: a file
/// written to /home lands in the `home` subvolume, where the booted guest sees it, not hidden
/// under it in `root`.
#[test]
fn a_fedora_btrfs_layout_of_root_and_home_subvolumes() {
    let dir = tempfile::tempdir().unwrap();
    let img = fixtures::btrfs_fedora_gpt(dir.path(), 768 << 20).unwrap();
    let out = customize_tcg(
        &img,
        &["--hostname", "fedora-like", "--write", "/home/added:by imgforge", "--append-line", "/home/notes:appended"],
    );
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let root = Mount::btrfs_subvolume(&img, 0, "root").unwrap();
    assert_eq!(root.read("/etc/hostname").unwrap().trim(), "fedora-like");
    assert!(!root.join("/home/added").exists(), "written under the /home mount point, hidden by it");
    let home = Mount::btrfs_subvolume(&img, 0, "home").unwrap();
    assert_eq!(home.read("/added").unwrap(), "by imgforge");
    assert_eq!(home.read("/notes").unwrap(), "on the home subvolume\nappended\n");
}
