//! Differential: one virt-customize command line given to virt-customize (libguestfs-tools,
//! direct backend, TCG) and to `imgforge customize`, on two copies of one fixture; both guest
//! trees read back with the test's own read-only mounts and compared path by path (type, mode,
//! owner, bytes, link target).

use imgforge_tests::fixtures::{self, Shape};
use imgforge_tests::readback::Mount;
use imgforge_tests::run::{code, customize_tcg, s};
use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// Paths where virt-customize differs from itself between two runs of [`ops`] on the same
/// fixture (found by running it twice and comparing the trees as below): the shadow field, for
/// its random salt.
const SELF_DIFFERENT: &[&str] = &["/etc/shadow"];

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
/// Debian guest (it has no `--chown`; packages need its network).
fn ops(work: &Path) -> Vec<String> {
    let tree_dir = work.join("tree");
    std::fs::create_dir_all(tree_dir.join("sub")).unwrap();
    std::fs::write(tree_dir.join("sub/f"), "hi\n").unwrap();
    std::os::unix::fs::symlink("f", tree_dir.join("sub/l")).unwrap();
    std::fs::write(work.join("up.txt"), "up\n").unwrap();
    let upload = format!("{}:/opt/", s(&work.join("up.txt")));
    let copy_in = format!("{}:/opt", s(&tree_dir));
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
        "--password-crypto",
        "md5",
        "--root-password",
        "password:Diff-Pw-1",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
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
    assert!(t_if.contains_key("/opt/tree/sub/l") && t_if.contains_key("/opt/a/hosts"), "the operations ran");
    let mut differences = Vec::new();
    for path in t_vc.keys().chain(t_if.keys().filter(|k| !t_vc.contains_key(*k))) {
        if SELF_DIFFERENT.contains(&path.as_str()) || DOCUMENTED.contains(&path.as_str()) {
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
    // Both wrote an MD5-crypt root password.
    let shadow = |m: &Mount| m.read("/etc/shadow").unwrap();
    for text in [shadow(&m_vc), shadow(&m_if)] {
        let field = text.lines().find_map(|l| l.strip_prefix("root:")).unwrap().split(':').next().unwrap().to_owned();
        assert!(field.starts_with("$1$"), "{field}");
    }
}
