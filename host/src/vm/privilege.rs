//! The unprivileged user qemu runs as, and dropping to it between fork and exec.

use super::dynamic_user::{self, DynamicUserError, Lease};
use std::ffi::CString;
use std::sync::Arc;
use thiserror::Error;

/// The `--helper-user` (and Ganeti `HELPER_USER`) value that asks for a uid and gid of each
/// qemu's own, shared with no other process (see [`dynamic_user`]).
pub const DYNAMIC_HELPER_USER: &str = "dynamic";

/// Default helper user: a per-qemu uid. A named user (snf-image's `nobody`) is shared with every
/// other process of that user, which may then open qemu's memory and descriptors.
pub const DEFAULT_HELPER_USER: &str = DYNAMIC_HELPER_USER;

/// Why the helper user cannot be used.
#[derive(Debug, Error)]
pub enum PrivilegeError {
    /// No such user.
    #[error("helper user {0:?} does not exist on this host: create it or pass --helper-user")]
    NoSuchUser(String),
    /// The user is root.
    #[error("helper user {0:?} is root: qemu must run unprivileged, pick another user")]
    Root(String),
    /// No per-qemu uid could be reserved: the host's trouble.
    #[error(transparent)]
    Dynamic(#[from] DynamicUserError),
}

/// A user and group to run qemu as.
#[derive(Debug, Clone)]
pub struct Unprivileged {
    /// User name (for a per-qemu uid, a description of it).
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// For a per-qemu uid, its reservation: held as long as any copy of this user lives.
    lease: Option<Arc<Lease>>,
}

impl PartialEq for Unprivileged {
    fn eq(&self, other: &Self) -> bool {
        (&self.name, self.uid, self.gid) == (&other.name, other.uid, other.gid)
    }
}

impl Eq for Unprivileged {}

impl Unprivileged {
    /// The user and group of a reserved uid: the gid is the same number.
    pub fn dynamic(lease: Lease) -> Self {
        let uid = lease.uid();
        Self { name: format!("per-job uid {uid}"), uid, gid: uid, lease: Some(Arc::new(lease)) }
    }

    /// Whether this is a reserved per-qemu uid rather than a named user.
    pub fn is_dynamic(&self) -> bool {
        self.lease.is_some()
    }
}

/// Looks the user up in the host's user database.
pub fn lookup(name: &str) -> Result<Unprivileged, PrivilegeError> {
    let c = CString::new(name).map_err(|_| PrivilegeError::NoSuchUser(name.to_owned()))?;
    // SAFETY: passwd is plain old data; all-zero is a valid value that getpwnam_r overwrites.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the call; the buffer outlives the use of `pwd`.
    let rc = unsafe { libc::getpwnam_r(c.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return Err(PrivilegeError::NoSuchUser(name.to_owned()));
    }
    if pwd.pw_uid == 0 {
        return Err(PrivilegeError::Root(name.to_owned()));
    }
    Ok(Unprivileged { name: name.to_owned(), uid: pwd.pw_uid, gid: pwd.pw_gid, lease: None })
}

/// The user one qemu drops to: when running as root, a freshly reserved uid for
/// [`DYNAMIC_HELPER_USER`], or the user `name`; nobody to drop to otherwise (an unprivileged
/// caller's qemu already runs unprivileged). Keep the result as long as the qemu runs.
pub fn for_this_process(name: &str) -> Result<Option<Unprivileged>, PrivilegeError> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    if name == DYNAMIC_HELPER_USER {
        let user = Unprivileged::dynamic(dynamic_user::Allocator::host().allocate()?);
        tracing::debug!(uid = user.uid, "qemu gets a uid of its own");
        return Ok(Some(user));
    }
    lookup(name).map(Some)
}

/// What a confined qemu does between fork and exec: its own session (a terminal's Ctrl-C
/// reaches imgforge, which stops qemu itself), death with imgforge, `inherited` descriptors kept
/// across exec, then the drop to `user` with only `extra_groups`. Pass it to `pre_exec`.
pub fn child_setup(
    inherited: Vec<std::os::fd::RawFd>,
    user: Option<Unprivileged>,
    extra_groups: Vec<u32>,
) -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
    // SAFETY: getpid cannot fail.
    let parent = unsafe { libc::getpid() };
    move || {
        // SAFETY: async-signal-safe syscalls on plain arguments.
        unsafe {
            libc::setsid();
            // Whatever imgforge inherited or opened without close-on-exec (a Ganeti pipe, a
            // disk) must not reach qemu: only 0-2 and `inherited` survive the exec.
            close_on_exec_from(3);
            for fd in &inherited {
                if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
        }
        if let Some(u) = &user {
            drop_to(u, &extra_groups)?;
        }
        // The kernel clears the parent-death signal when the uid changes: armed only now.
        // SAFETY: async-signal-safe syscalls on plain arguments.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // imgforge may have died before the signal was armed: then nobody is left to stop
            // this qemu.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("imgforge exited while starting qemu"));
            }
        }
        Ok(())
    }
}

/// Marks every descriptor from `first` up close-on-exec. Between fork and exec:
/// async-signal-safe calls only.
///
/// # Safety
/// Changes descriptor flags process-wide: call it in a forked child.
unsafe fn close_on_exec_from(first: u32) {
    // SAFETY: plain syscalls on integers (the caller runs in a forked child).
    unsafe {
        if libc::syscall(libc::SYS_close_range, first, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) == 0 {
            return;
        }
        // Kernels before 5.11 have no CLOSE_RANGE_CLOEXEC: one descriptor at a time.
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        let last = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur.min(MAX_FD_SCAN) as libc::c_int
        } else {
            MAX_FD_SCAN as libc::c_int
        };
        for fd in first as libc::c_int..last {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

/// Highest descriptor number the fallback of [`close_on_exec_from`] looks at.
const MAX_FD_SCAN: u64 = 1 << 16;

/// The environment a confined qemu gets: only PATH (where the stand-ins and qemu's helpers are
/// found). Nothing of imgforge's own environment — Ganeti's `OSP_IMG_PASSWD` among it — may be
/// readable by the helper user in `/proc/PID/environ`.
pub fn confined_environment() -> Vec<(&'static str, std::ffi::OsString)> {
    std::env::var_os("PATH").map(|path| ("PATH", path)).into_iter().collect()
}

/// The supplementary group that lets qemu open /dev/kvm: its group, when that group may read
/// and write it and is not root's (qemu never gets group 0).
pub fn kvm_device_groups() -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata("/dev/kvm") {
        Ok(m) if m.gid() != 0 && m.mode() & 0o060 == 0o060 => vec![m.gid()],
        _ => Vec::new(),
    }
}

/// Drops to `user` with only `extra_groups` as supplementary groups. Called between fork and
/// exec: async-signal-safe calls only.
pub fn drop_to(user: &Unprivileged, extra_groups: &[u32]) -> std::io::Result<()> {
    // SAFETY: plain syscalls on valid arguments; the group list outlives the call.
    unsafe {
        if libc::setgroups(extra_groups.len(), extra_groups.as_ptr()) != 0
            || libc::setgid(user.gid) != 0
            || libc::setuid(user.uid) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        // Verify the drop is irreversible.
        if libc::setuid(0) == 0 {
            return Err(std::io::Error::other("could still regain root after dropping privileges"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With `IMGFORGE_TEST_SPAWN_CONFINED` set (see `confined_children_die_with_imgforge`):
    /// starts a confined `sleep` as nobody, prints its pid, and waits to be killed.
    #[test]
    #[ignore = "a helper process of confined_children_die_with_imgforge"]
    fn spawn_confined_sleep() {
        use std::os::unix::process::CommandExt;
        if std::env::var_os("IMGFORGE_TEST_SPAWN_CONFINED").is_none() {
            return;
        }
        let nobody = lookup("nobody").unwrap();
        let mut command = std::process::Command::new("sleep");
        command.arg("120");
        // SAFETY: child_setup runs only async-signal-safe syscalls.
        unsafe { command.pre_exec(child_setup(Vec::new(), Some(nobody), Vec::new())) };
        let mut child = command.spawn().unwrap();
        println!("CONFINED-PID {}", child.id());
        // Killed before this returns: the confined child must die with this process.
        let _ = child.wait();
    }

    #[test]
    fn confined_children_die_with_imgforge() {
        use std::io::BufRead;
        // SAFETY: geteuid cannot fail.
        assert_eq!(unsafe { libc::geteuid() }, 0, "run the tests as root, as CI does");
        let mut parent = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "vm::privilege::tests::spawn_confined_sleep", "--nocapture"])
            .env("IMGFORGE_TEST_SPAWN_CONFINED", "1")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(parent.stdout.take().unwrap());
        let pid: u32 = out
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("CONFINED-PID ").map(|p| p.trim().parse().unwrap()))
            .expect("the confined child's pid");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(status.lines().any(|l| l.starts_with("Uid:") && !l.contains("\t0\t")), "{status}");
        parent.kill().unwrap();
        parent.wait().unwrap();
        let gone = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |stat| stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
        });
        if !gone {
            // SAFETY: the test's own leftover.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        assert!(gone, "the confined child outlived its parent");
    }

    #[test]
    fn private_directories_and_environment() {
        use std::os::unix::fs::PermissionsExt;
        let dir = crate::workdir::private_tempdir("test").unwrap();
        assert_eq!(std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777, 0o700);
        let env = confined_environment();
        assert!(env.iter().all(|(k, _)| *k == "PATH"), "{env:?}");
    }

    #[test]
    fn lookups() {
        assert!(matches!(lookup("root"), Err(PrivilegeError::Root(_))));
        assert!(matches!(lookup("no-such-user-imgforge"), Err(PrivilegeError::NoSuchUser(_))));
        if let Ok(u) = lookup("nobody") {
            assert_ne!(u.uid, 0);
        }
    }
}
