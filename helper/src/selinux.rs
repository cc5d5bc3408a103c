//! The 80-SELinuxRelabel task: an SELinux guest's files get the labels its own policy gives
//! them, as virt-customize does after every customization.
//!
//! A guest is an SELinux guest when it has `/etc/selinux/config` and `/usr/sbin/load_policy`
//! (virt-customize's test). Its own `setfiles` runs chrooted and confined, in its dry-run mode
//! (`-n -v`), against the file contexts of the policy `SELINUXTYPE` names: it says which label
//! each path should get, and the helper writes those labels itself. The confined program cannot
//! write them: without an active security module, setting `security.*` attributes takes
//! CAP_SYS_ADMIN, which guest programs never get (see `confinement`). setfiles is the guest's,
//! so what it prints is trusted only to label the guest's own files: every path is resolved
//! inside the guest root, never into the helper's mounts, and a final symlink is labelled
//! itself, as `lsetfilecon` does. When the guest lacks setfiles or its file contexts, or
//! setfiles fails, the guest is marked for a relabel at its next boot (`/.autorelabel`), as
//! virt-customize falls back to; after a relabel done here, `/.autorelabel` is removed.

use crate::confinement::GuestCommand;
use crate::guest::GuestRoot;
use crate::task_env::TaskEnv;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// What makes a guest an SELinux guest (virt-customize's `is_selinux_guest`).
const SELINUX_CONFIG: &str = "/etc/selinux/config";
const LOAD_POLICY: &str = "/usr/sbin/load_policy";
/// Where the guest's setfiles may be.
const SETFILES: [&str; 2] = ["/usr/sbin/setfiles", "/sbin/setfiles"];
/// libselinux's policy when the configuration names none.
const DEFAULT_POLICY: &str = "targeted";
/// The mark that has the guest relabel itself at its next boot.
const AUTORELABEL: &str = "/.autorelabel";
/// The extended attribute that holds a path's label.
const XATTR_SELINUX: &str = "security.selinux";
/// What setfiles prints, with `-n -v`, for a path whose label would change.
const WOULD_RELABEL: &str = "Would relabel ";
/// What setfiles prints, and its exit status, when it cannot send the audit record of a
/// relabel of `/`: it does so after the whole walk (so its dry-run lines are complete), and the
/// helper kernel offers no audit socket. virt-customize never meets it: it names the guest's
/// root by a longer path, which setfiles does not audit.
const AUDIT_FAILED: &str = "Error connecting to audit system.";
const AUDIT_FAILED_STATUS: i32 = 255;
/// The helper's mounts for guest programs, which setfiles must not walk.
const EXCLUDED: [&str; 3] = ["/dev", "/proc", "/sys"];

/// The task's entry point.
pub fn relabel(env: &TaskEnv) -> Result<(), String> {
    if env.get("IMGFORGE_SELINUX_RELABEL") != Some("yes") {
        return Ok(());
    }
    crate::task_overwrite::run_helper_task(env, "SELinuxAutorelabel", || relabel_guest(env))
}

/// SELinuxAutorelabel's own work: the labels written here, or `/.autorelabel`.
fn relabel_guest(env: &TaskEnv) -> Result<(), String> {
    let target = env.require("IMGFORGE_TARGET")?;
    let guest = GuestRoot::open(Path::new(target)).map_err(|e| format!("cannot open the guest root {target}: {e}"))?;
    if !(is_file(&guest, SELINUX_CONFIG) && is_file(&guest, LOAD_POLICY)) {
        println!("not an SELinux guest (no {SELINUX_CONFIG} or {LOAD_POLICY}): nothing to relabel");
        return Ok(());
    }
    match relabel_with_setfiles(&guest) {
        Ok(count) => {
            guest.remove_all(AUTORELABEL).map_err(|e| format!("cannot remove {AUTORELABEL}: {e}"))?;
            println!("relabelled {count} paths with the guest's setfiles");
            Ok(())
        }
        Err(why) => {
            println!("WARNING: SELinux labels left for the guest's next boot ({AUTORELABEL}): {why}");
            mark_for_autorelabel(&guest)
        }
    }
}

/// Creates `/.autorelabel` as an empty regular file, replacing (never following) a link there.
fn mark_for_autorelabel(guest: &GuestRoot) -> Result<(), String> {
    guest.create_empty_file(AUTORELABEL, 0o644).map_err(|e| format!("cannot create {AUTORELABEL}: {e}"))?;
    println!("created {AUTORELABEL}");
    Ok(())
}

fn is_file(guest: &GuestRoot, path: &str) -> bool {
    guest.open_read(path).and_then(|f| f.metadata()).is_ok_and(|m| m.is_file())
}

/// Runs the guest's setfiles in its dry-run mode and writes the labels it names; the number of
/// paths labelled, or why the relabel could not be done here.
fn relabel_with_setfiles(guest: &GuestRoot) -> Result<usize, String> {
    let config = guest.read_to_string(SELINUX_CONFIG).map_err(|e| format!("cannot read {SELINUX_CONFIG}: {e}"))?;
    let policy = policy_name(&config)?;
    let spec = format!("/etc/selinux/{policy}/contexts/files/file_contexts");
    if !is_file(guest, &spec) {
        return Err(format!("the guest has no {spec}"));
    }
    let setfiles = SETFILES.iter().find(|p| guest.is_executable(p)).ok_or("the guest has no setfiles")?;
    let mut argv: Vec<&str> = vec![setfiles, "-F", "-m", "-n", "-v"];
    for dir in EXCLUDED.iter().filter(|d| guest.is_dir(d)) {
        argv.extend(["-e", dir]);
    }
    argv.extend([spec.as_str(), "/"]);
    let run = GuestCommand::new(guest, &argv).output()?;
    let errors = String::from_utf8_lossy(&run.stderr);
    for line in errors.lines().filter(|l| !l.trim().is_empty()) {
        println!("setfiles: {}", line.escape_debug());
    }
    let labels = relabel_lines(&String::from_utf8_lossy(&run.stdout))?;
    let last = errors.lines().rfind(|l| !l.trim().is_empty()).unwrap_or_default();
    let only_audit_failed = run.status.code() == Some(AUDIT_FAILED_STATUS) && last == AUDIT_FAILED;
    if !(run.status.success() || only_audit_failed) {
        return Err(format!("the guest's setfiles failed ({}): {}", run.status, last.escape_debug()));
    }
    for (path, context) in &labels {
        set_label(guest, path, context).map_err(|e| format!("cannot label {}: {e}", path.escape_debug()))?;
    }
    Ok(labels.len())
}

/// `SELINUXTYPE` of `/etc/selinux/config` (shell-variable syntax, optionally quoted), or
/// libselinux's default; a name that could leave `/etc/selinux` is refused.
pub fn policy_name(config: &str) -> Result<String, String> {
    let value = config
        .lines()
        .filter_map(|line| line.trim().split_once('='))
        .filter(|(key, _)| key.trim() == "SELINUXTYPE")
        .map(|(_, value)| value.trim().trim_matches(|c| c == '"' || c == '\''))
        .next_back();
    let name = match value {
        None | Some("") => return Ok(DEFAULT_POLICY.to_owned()),
        Some(name) => name,
    };
    let valid = name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) && !name.starts_with('.');
    if valid {
        Ok(name.to_owned())
    } else {
        Err(format!("SELINUXTYPE {:?} in {SELINUX_CONFIG} is not a policy name", name.escape_debug().to_string()))
    }
}

/// The `(path, new label)` pairs of setfiles's `Would relabel PATH from OLD to NEW` lines; other
/// lines (its warnings) are shown in the log. A relabel line that does not read so, or a label
/// that is not one, fails: the relabel would be partial.
pub fn relabel_lines(output: &str) -> Result<Vec<(String, String)>, String> {
    let mut labels = Vec::new();
    for line in output.lines() {
        let Some(rest) = line.strip_prefix(WOULD_RELABEL) else {
            if !line.trim().is_empty() {
                println!("setfiles: {}", line.escape_debug());
            }
            continue;
        };
        // A label has no space: the last " to " and the " from " before it end the path.
        let parsed = rest.rsplit_once(" to ").and_then(|(left, new)| {
            let (path, _old) = left.rsplit_once(" from ")?;
            (path.starts_with('/') && valid_label(new)).then(|| (path.to_owned(), new.to_owned()))
        });
        labels.push(
            parsed.ok_or_else(|| format!("setfiles printed a line imgforge cannot read: {}", line.escape_debug()))?,
        );
    }
    Ok(labels)
}

/// A label as SELinux writes them: `user:role:type[:range]`, printable ASCII without spaces.
fn valid_label(label: &str) -> bool {
    label.split(':').count() >= 3 && label.bytes().all(|b| b.is_ascii_graphic())
}

/// Writes `label` as the `security.selinux` attribute of `path` itself (a final symlink not
/// followed), never on the helper's mounts.
fn set_label(guest: &GuestRoot, path: &str, label: &str) -> std::io::Result<()> {
    if path.bytes().all(|b| b == b'/') {
        // The guest root itself: the directory the helper mounted it on.
        return lsetxattr(&crate::confinement::path_cstring(guest.path()), label);
    }
    let (dir, name) = guest.parent(path)?;
    let object = crate::copy::open_at(dir.as_fd(), &name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
    crate::pseudo_filesystems::refuse_helper_mount(object.as_fd(), path)?;
    let parent = std::fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd()))?;
    if !parent.starts_with(guest.path()) {
        return Err(std::io::Error::other(format!("{path} resolves outside the guest root")));
    }
    let full = crate::confinement::path_cstring(&parent.join(std::ffi::OsStr::from_bytes(name.as_bytes())));
    // No guest program runs while this task does, so the path checked above is the one written.
    lsetxattr(&full, label)
}

/// `lsetxattr(path, "security.selinux", label)`.
fn lsetxattr(full: &std::ffi::CStr, label: &str) -> std::io::Result<()> {
    let attribute = std::ffi::CString::new(XATTR_SELINUX).unwrap_or_default();
    // libselinux stores the label with its terminating NUL; so do we.
    let mut value = label.as_bytes().to_vec();
    value.push(0);
    // SAFETY: NUL-terminated path and name; the value's pointer and length match.
    crate::copy::cvt(unsafe {
        libc::lsetxattr(full.as_ptr(), attribute.as_ptr(), value.as_ptr().cast(), value.len(), 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_name_table() {
        let ok = [
            ("SELINUX=enforcing\nSELINUXTYPE=targeted\n", "targeted"),
            ("# SELINUXTYPE=mls\nSELINUXTYPE=minimum\n", "minimum"),
            ("SELINUXTYPE = \"mls\"\n", "mls"),
            ("SELINUXTYPE='default'\n", "default"),
            ("SELINUX=permissive\n", "targeted"),
            ("SELINUXTYPE=\n", "targeted"),
            ("", "targeted"),
            ("SELINUXTYPE=a\nSELINUXTYPE=b\n", "b"),
            ("SELINUXTYPE=src_1.2-x\n", "src_1.2-x"),
        ];
        for (config, want) in ok {
            assert_eq!(policy_name(config).unwrap(), want, "{config:?}");
        }
        for bad in ["SELINUXTYPE=../../etc\n", "SELINUXTYPE=a/b\n", "SELINUXTYPE=..\n", "SELINUXTYPE=a b\n"] {
            assert!(policy_name(bad).unwrap_err().contains("not a policy name"), "{bad:?}");
        }
    }

    #[test]
    fn relabel_lines_table() {
        let output =
            "Would relabel /etc/passwd from system_u:object_r:unlabeled_t:s0 to system_u:object_r:passwd_file_t:s0\n\
            setfiles: conflicting specifications for /a and /b, using x.\n\
            Would relabel /a dir with spaces from to here from <no context> to system_u:object_r:etc_t:s0\n\
            \n\
            Would relabel /etc from <no context> to system_u:object_r:etc_t\n";
        assert_eq!(
            relabel_lines(output).unwrap(),
            [
                ("/etc/passwd".to_owned(), "system_u:object_r:passwd_file_t:s0".to_owned()),
                ("/a dir with spaces from to here".to_owned(), "system_u:object_r:etc_t:s0".to_owned()),
                ("/etc".to_owned(), "system_u:object_r:etc_t".to_owned()),
            ]
        );
        assert!(relabel_lines("setfiles: nothing\n").unwrap().is_empty());
        for bad in [
            "Would relabel /x to y\n",
            "Would relabel x from a to system_u:object_r:etc_t:s0\n",
            "Would relabel /x from a to etc_t\n",
            "Would relabel /x from a to system_u:object_r:etc_t:s0\u{7}\n",
        ] {
            assert!(relabel_lines(bad).unwrap_err().contains("cannot read"), "{bad:?}");
        }
    }
}
