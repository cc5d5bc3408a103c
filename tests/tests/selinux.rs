//! End to end: an SELinux guest is relabelled after a customization, as virt-customize does,
//! by its own setfiles run confined in the helper; `--no-selinux-relabel` leaves it alone;
//! without setfiles it is marked for a relabel at its next boot.
//!
//! No fixture carries an SELinux policy, so the test makes a Debian fixture copy an SELinux
//! guest of its own: an `/etc/selinux/config` naming a policy whose `file_contexts` it writes,
//! a stub `load_policy`, and the host's Debian 12 `setfiles` (policycoreutils, the fixture's
//! release) with the libraries the guest lacks.

use imgforge_tests::fixtures::{self, Shape};
use imgforge_tests::readback::Mount;
use imgforge_tests::run::{code, customize_tcg};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const POLICY: &str = "imgforgetest";
/// Labels by path: everything default_t, /etc etc_t, the test's link a type of its own.
const FILE_CONTEXTS: &str = "\
/.*\tsystem_u:object_r:default_t:s0
/etc(/.*)?\tsystem_u:object_r:etc_t:s0
/etc/hostname\t--\tsystem_u:object_r:hostname_etc_t:s0
/opt/imgforge-link\t-l\tsystem_u:object_r:test_link_t:s0
/dev(/.*)?\t<<none>>
/proc(/.*)?\t<<none>>
/sys(/.*)?\t<<none>>
";
const WRONG: &str = "system_u:object_r:wrong_t:s0";
/// The host's setfiles, copied into the guest.
const HOST_SETFILES: &str = "/sbin/setfiles";

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// The `security.selinux` label of `path` itself (a symlink not followed), without its NUL.
fn label(path: &Path) -> Option<String> {
    let mut buf = [0u8; 256];
    let name = CString::new("security.selinux").unwrap();
    // SAFETY: NUL-terminated strings and a buffer of the length passed.
    let n = unsafe { libc::lgetxattr(cpath(path).as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (n > 0).then(|| String::from_utf8_lossy(&buf[..n as usize]).trim_end_matches('\0').to_owned())
}

fn set_label(path: &Path, value: &str) {
    let name = CString::new("security.selinux").unwrap();
    let value = CString::new(value).unwrap();
    let bytes = value.as_bytes_with_nul();
    // SAFETY: NUL-terminated strings and a value of the length passed.
    let rc = unsafe { libc::lsetxattr(cpath(path).as_ptr(), name.as_ptr(), bytes.as_ptr().cast(), bytes.len(), 0) };
    assert_eq!(rc, 0, "labelling {}: {}", path.display(), std::io::Error::last_os_error());
}

/// The libraries `program` loads, as the host's ldd names them.
fn libraries(program: &str) -> Vec<String> {
    let out = std::process::Command::new("ldd").arg(program).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(" => ").map(|(_, rest)| rest.split_whitespace().next().unwrap_or("").to_owned()))
        .filter(|p| p.starts_with('/'))
        .collect()
}

/// Makes the fixture copy an SELinux guest; with `setfiles`, the host's is put in it. Sets a
/// wrong label on /etc/hostname and leaves a stale /.autorelabel.
fn make_selinux_guest(img: &Path, setfiles: bool) {
    let m = Mount::writable_partition(img, 0).unwrap();
    let policy = m.join(&format!("/etc/selinux/{POLICY}/contexts/files"));
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::write(policy.join("file_contexts"), FILE_CONTEXTS).unwrap();
    std::fs::write(m.join("/etc/selinux/config"), format!("SELINUX=enforcing\nSELINUXTYPE={POLICY}\n")).unwrap();
    std::fs::write(m.join("/usr/sbin/load_policy"), "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(m.join("/usr/sbin/load_policy"), std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .unwrap();
    std::fs::write(m.join("/.autorelabel"), "").unwrap();
    set_label(&m.join("/etc/hostname"), WRONG);
    if setfiles {
        assert!(
            Path::new(HOST_SETFILES).is_file(),
            "{HOST_SETFILES} missing: install policycoreutils (scripts/setup.sh does)"
        );
        std::fs::copy(HOST_SETFILES, m.join("/usr/sbin/setfiles")).unwrap();
        for lib in libraries(HOST_SETFILES) {
            let into = m.join(&lib);
            if std::fs::symlink_metadata(&into).is_err() {
                std::fs::copy(&lib, &into).unwrap();
            }
        }
    }
}

/// The guest's setfiles labels every path as its policy says — files the customization made,
/// a symlink itself, a file with a wrong label — and the stale /.autorelabel is removed; with
/// `--no-selinux-relabel` first, nothing is relabelled and the mark stays.
#[test]
fn an_selinux_guest_is_relabelled_by_its_own_setfiles() {
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    make_selinux_guest(&img, true);

    let out = customize_tcg(&img, &["--no-selinux-relabel", "--write", "/etc/imgforge-new:x"]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    {
        let m = Mount::partition(&img, 0).unwrap();
        assert_eq!(label(&m.join("/etc/hostname")).as_deref(), Some(WRONG), "relabelled despite --no-selinux-relabel");
        assert_eq!(label(&m.join("/etc/imgforge-new")), None);
        assert!(m.join("/.autorelabel").is_file());
    }

    let out = customize_tcg(
        &img,
        &["--selinux-relabel", "--write", "/opt/imgforge-file:y", "--link", "/etc/hostname:/opt/imgforge-link", "-v"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), 0, "{stderr}");
    assert!(stderr.contains("with the guest's setfiles"), "{stderr}");
    let m = Mount::partition(&img, 0).unwrap();
    let want = [
        ("/etc/hostname", "system_u:object_r:hostname_etc_t:s0"),
        ("/etc/imgforge-new", "system_u:object_r:etc_t:s0"),
        ("/etc", "system_u:object_r:etc_t:s0"),
        ("/opt/imgforge-file", "system_u:object_r:default_t:s0"),
        ("/opt/imgforge-link", "system_u:object_r:test_link_t:s0"),
        ("/usr/bin/ls", "system_u:object_r:default_t:s0"),
        ("/", "system_u:object_r:default_t:s0"),
    ];
    for (path, context) in want {
        assert_eq!(label(&m.join(path)).as_deref(), Some(context), "{path}");
    }
    // The link's label is its own: its target keeps the one for /etc/hostname.
    assert!(std::fs::symlink_metadata(m.join("/opt/imgforge-link")).unwrap().file_type().is_symlink());
    assert!(!m.join("/.autorelabel").exists(), "relabelled here, no relabel left for the next boot");
}

/// Without setfiles in the guest, an SELinux guest is marked for a relabel at its next boot,
/// and the mark is made inside the guest root, never through a link: a hostile image's
/// `/.autorelabel` pointing at a helper path (one that holds the guest's /etc/hostname) leaves
/// that file whole and becomes a regular, empty `/.autorelabel`.
#[test]
fn without_setfiles_the_guest_is_marked_and_never_through_a_link() {
    const HELPER_GUEST_ROOT: &str = "/mnt/guest";
    let work = tempfile::tempdir().unwrap();
    let img = fixtures::copy(Shape::DosExt4, work.path()).unwrap();
    make_selinux_guest(&img, false);
    let hostname = {
        let m = Mount::writable_partition(&img, 0).unwrap();
        std::fs::remove_file(m.join("/.autorelabel")).unwrap();
        std::os::unix::fs::symlink(format!("{HELPER_GUEST_ROOT}/etc/hostname"), m.join("/.autorelabel")).unwrap();
        m.read("/etc/hostname").unwrap()
    };
    assert!(!hostname.is_empty());
    let out = customize_tcg(&img, &["--write", "/etc/imgforge-new:x"]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let m = Mount::partition(&img, 0).unwrap();
    assert_eq!(m.read("/etc/hostname").unwrap(), hostname, "the mark went through the guest's link");
    let mark = std::fs::symlink_metadata(m.join("/.autorelabel")).unwrap();
    assert!(mark.file_type().is_file() && mark.len() == 0, "{mark:?}");
    assert_eq!(label(&m.join("/etc/hostname")).as_deref(), Some(WRONG));
}
