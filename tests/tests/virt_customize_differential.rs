//! Differential: one virt-customize command line given to virt-customize (libguestfs-tools,
//! direct backend, TCG) and to `imgforge customize`, on two copies of one fixture; both guest
//! trees read back with the test's own read-only mounts and compared path by path (type, mode,
//! owner, bytes, link target). `/etc/shadow` is compared but for the salts (same lines, same
//! hash method, each hash checked against its password), and the firstboot scripts by what
//! they run, each tool keeping them in its own place.

use imgforge_tests::fixtures::{self, Shape};
use imgforge_tests::readback::{password_matches, Mount};
use imgforge_tests::run::{code, customize_tcg, s};
use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// The root password and alice's ([`ops`]).
const ROOT_PASSWORD: &str = "Diff-Pw-1";
const ALICE_PASSWORD: &str = "Alice-Pw-2";

/// Where each tool keeps its firstboot scripts, and the rest of its firstboot machinery (the
/// runner, its systemd unit and the unit's link), which the README lists as a difference:
/// virt-customize's is guestfs-firstboot.service running /usr/lib/virt-sysprep/firstboot.sh,
/// also linked as a SysV init script (imgforge has only the systemd unit).
const VC_FIRSTBOOT_SCRIPTS: &str = "/usr/lib/virt-sysprep/scripts";
const VC_FIRSTBOOT: &[&str] = &[
    "/usr/lib/virt-sysprep",
    "/usr/lib/virt-sysprep/firstboot.sh",
    "/usr/lib/systemd/system/guestfs-firstboot.service",
    "/etc/systemd/system/multi-user.target.wants/guestfs-firstboot.service",
    "/etc/init.d/guestfs-firstboot",
    "/etc/rc2.d/S99guestfs-firstboot",
    "/etc/rc3.d/S99guestfs-firstboot",
    "/etc/rc5.d/S99guestfs-firstboot",
];
const IF_FIRSTBOOT_SCRIPTS: &str = "/usr/lib/imgforge/firstboot/scripts";
const IF_FIRSTBOOT: &[&str] = &[
    "/usr/lib/imgforge",
    "/usr/lib/imgforge/firstboot",
    "/usr/lib/imgforge/firstboot/run",
    "/etc/systemd/system/imgforge-firstboot.service",
    "/etc/systemd/system/multi-user.target.wants/imgforge-firstboot.service",
];

/// Differences the README lists, with why imgforge differs: virt-customize's `--run-command`
/// log, which imgforge does not write; `/etc/timezone`, which virt-customize 1.48 leaves naming
/// the old zone; the random seed, which virt-customize writes on Debian only under an existing
/// `/var/lib/urandom`.
const DOCUMENTED: &[&str] = &["/tmp/builder.log", "/etc/timezone", "/var/lib/systemd/random-seed"];

/// What is compared of one path.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    owner: (u32, u32),
    bytes: Option<Vec<u8>>,
    link: Option<std::path::PathBuf>,
}

fn tree(root: &Path) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let ft = meta.file_type();
            let kind = match () {
                _ if ft.is_dir() => "directory",
                _ if ft.is_symlink() => "symlink",
                _ if ft.is_file() => "file",
                _ if ft.is_fifo() => "fifo",
                _ if ft.is_char_device() => "char",
                _ if ft.is_block_device() => "block",
                _ => "socket",
            };
            let rel = format!("/{}", path.strip_prefix(root).unwrap().display());
            let e = Entry {
                kind,
                mode: meta.mode() & 0o7777,
                owner: (meta.uid(), meta.gid()),
                bytes: ft.is_file().then(|| std::fs::read(&path).unwrap()),
                link: ft.is_symlink().then(|| std::fs::read_link(&path).unwrap()),
            };
            if ft.is_dir() {
                stack.push(path);
            }
            out.insert(rel, e);
        }
    }
    out
}

/// The command line both tools get: every operation virt-customize 1.48 runs offline on a
/// Debian guest (it has no `--chown`; packages need its network, `--firstboot-install` only
/// at the first boot).
fn ops(work: &Path) -> Vec<String> {
    let tree_dir = work.join("tree");
    std::fs::create_dir_all(tree_dir.join("sub")).unwrap();
    std::fs::write(tree_dir.join("sub/f"), "hi\n").unwrap();
    std::os::unix::fs::symlink("f", tree_dir.join("sub/l")).unwrap();
    std::fs::write(work.join("up.txt"), "up\n").unwrap();
    let upload = format!("{}:/opt/", s(&work.join("up.txt")));
    let copy_in = format!("{}:/opt", s(&tree_dir));
    let firstboot = work.join("first.sh");
    std::fs::write(&firstboot, "#!/bin/sh\necho first > /root/fb1\n").unwrap();
    let commands = work.join("commands.txt");
    std::fs::write(
        &commands,
        "# virt-customize's commands file\nwrite /etc/cf:from-file\nmkdir /opt/cf\n\nwrite /etc/cf2:two \\\n  lines\nchmod 0640:/etc/cf\n",
    )
    .unwrap();
    let (firstboot, commands) = (s(&firstboot), s(&commands));
    [
        "--no-network",
        "--hostname",
        "diff1",
        "--write",
        "/etc/w:hello",
        "--append-line",
        "/etc/w:more",
        "--mkdir",
        "/opt/a/b",
        "--chmod",
        "0600:/etc/w",
        "--delete",
        "/etc/issue",
        "--link",
        "/etc/w:/opt/lnk",
        "--touch",
        "/opt/t",
        "--truncate",
        "/etc/motd",
        "--copy",
        "/etc/hosts:/opt/a",
        "--move",
        "/opt/t:/opt/t2",
        "--edit",
        "/etc/w:s/hello/HELLO/",
        "--timezone",
        "Europe/Athens",
        "--upload",
        &upload,
        "--copy-in",
        &copy_in,
        "--run-command",
        "echo ran > /root/ran",
        "--scrub",
        "/etc/issue.net",
        "--truncate-recursive",
        "/opt/a",
        "--ssh-inject",
        "alice:string:ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDiffKeyAlice alice@diff",
        "--ssh-inject",
        "root:string:ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDiffKeyRoot root@diff",
        "--firstboot",
        &firstboot,
        "--firstboot-command",
        "touch /root/fb2",
        "--firstboot-install",
        "htop,tree",
        "--commands-from-file",
        &commands,
        "--password-crypto",
        "md5",
        "--root-password",
        &format!("password:{ROOT_PASSWORD}"),
        "--password",
        &format!("alice:password:{ALICE_PASSWORD}"),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

/// What a firstboot script runs: its lines trimmed, without its `#!` line, comments and empty
/// lines (virt-customize writes a `--firstboot-command` bare and its install script indented).
fn script_lines(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// The firstboot scripts under `dir` of `tree`, in the order they run, by what they run.
fn firstboot_scripts(tree: &BTreeMap<String, Entry>, dir: &str) -> Vec<(u32, Vec<String>)> {
    let prefix = format!("{dir}/");
    tree.iter()
        .filter(|(path, _)| path.starts_with(&prefix))
        .map(|(_, e)| (e.mode, script_lines(e.bytes.as_deref().unwrap_or_default())))
        .collect()
}

/// Compares two `/etc/shadow` files line by line: every field equal but the password hashes,
/// which must use one method (`$1$`, md5-crypt) and each match its password.
fn shadow_differences(vc: &str, imgforge: &str) -> Vec<String> {
    let (a, b): (Vec<&str>, Vec<&str>) = (vc.lines().collect(), imgforge.lines().collect());
    if a.len() != b.len() {
        return vec![format!("/etc/shadow: virt-customize has {} lines, imgforge {}", a.len(), b.len())];
    }
    let mut out = Vec::new();
    for (la, lb) in a.iter().zip(&b) {
        let (fa, fb): (Vec<&str>, Vec<&str>) = (la.split(':').collect(), lb.split(':').collect());
        let password = match fa[0] {
            "root" => Some(ROOT_PASSWORD),
            "alice" => Some(ALICE_PASSWORD),
            _ => None,
        };
        let same_but_hash = fa.len() == fb.len() && fa.iter().zip(&fb).enumerate().all(|(i, (x, y))| i == 1 || x == y);
        let hashes_ok = match password {
            Some(pw) => [fa[1], fb[1]].iter().all(|h| h.starts_with("$1$") && password_matches(pw, h)),
            None => fa.get(1) == fb.get(1),
        };
        if !same_but_hash || !hashes_ok {
            out.push(format!("/etc/shadow: virt-customize {la:?}, imgforge {lb:?}"));
        }
    }
    out
}

#[test]
fn virt_customize_and_imgforge_leave_the_same_guest() {
    let work = tempfile::tempdir().unwrap();
    let dir_vc = work.path().join("vc");
    let dir_if = work.path().join("if");
    std::fs::create_dir_all(&dir_vc).unwrap();
    std::fs::create_dir_all(&dir_if).unwrap();
    let img_vc = fixtures::copy(Shape::DosExt4, &dir_vc).unwrap();
    let img_if = fixtures::copy(Shape::DosExt4, &dir_if).unwrap();
    let args = ops(work.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let out = std::process::Command::new("virt-customize")
        .arg("-a")
        .arg(&img_vc)
        .args(&args)
        .env("LIBGUESTFS_BACKEND", "direct")
        .env("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
        .output()
        .expect("virt-customize (libguestfs-tools; scripts/setup.sh installs it)");
    assert!(out.status.success(), "virt-customize: {}", String::from_utf8_lossy(&out.stderr));
    let out = customize_tcg(&img_if, &args);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));

    let m_vc = Mount::partition(&img_vc, 0).unwrap();
    let m_if = Mount::partition(&img_if, 0).unwrap();
    let (t_vc, t_if) = (tree(m_vc.path()), tree(m_if.path()));
    for path in ["/opt/tree/sub/l", "/opt/a/hosts", "/home/alice/.ssh/authorized_keys", "/opt/cf"] {
        assert!(t_if.contains_key(path), "the operations ran: no {path}");
    }
    let mut differences = shadow_differences(&m_vc.read("/etc/shadow").unwrap(), &m_if.read("/etc/shadow").unwrap());
    let (fb_vc, fb_if) =
        (firstboot_scripts(&t_vc, VC_FIRSTBOOT_SCRIPTS), firstboot_scripts(&t_if, IF_FIRSTBOOT_SCRIPTS));
    assert_eq!(fb_vc.len(), 3, "virt-customize's firstboot scripts: {fb_vc:?}");
    if fb_vc != fb_if {
        differences.push(format!("firstboot scripts: virt-customize {fb_vc:?}, imgforge {fb_if:?}"));
    }
    let firstboot = |path: &str| {
        [VC_FIRSTBOOT_SCRIPTS, IF_FIRSTBOOT_SCRIPTS].iter().any(|d| path.starts_with(d))
            || VC_FIRSTBOOT.contains(&path)
            || IF_FIRSTBOOT.contains(&path)
    };
    for path in t_vc.keys().chain(t_if.keys().filter(|k| !t_vc.contains_key(*k))) {
        if path == "/etc/shadow" || DOCUMENTED.contains(&path.as_str()) || firstboot(path) {
            continue;
        }
        let (a, b) = (t_vc.get(path), t_if.get(path));
        if a != b {
            let brief = |e: Option<&Entry>| {
                e.map(|e| {
                    let size = e.bytes.as_ref().map(Vec::len);
                    format!("{} {:o} {:?} link {:?} size {size:?}", e.kind, e.mode, e.owner, e.link)
                })
            };
            differences.push(format!("{path}: virt-customize {:?}, imgforge {:?}", brief(a), brief(b)));
        }
    }
    // (A difference in bytes alone shows as two equal summaries: the contents differ.)
    assert!(differences.is_empty(), "{} differences:\n{}", differences.len(), differences.join("\n"));
}
