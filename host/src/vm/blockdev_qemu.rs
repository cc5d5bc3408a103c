//! qemu without a machine (`-machine none`): its block layer alone, confined like the helper
//! VM — the unprivileged user, `-sandbox`, every file an inherited descriptor (fdsets), QMP on a
//! listening socket in a private directory. It serves qemu-format images over NBD
//! ([`crate::source::qemu`]) and commits overlays ([`crate::job::overlay`]), so that only a confined
//! qemu ever parses qcow2 and its kin.

use super::cmdline::SANDBOX;
use super::privilege::{self, Unprivileged};
use super::qmp::Qmp;
use serde_json::Value;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long qemu may take to answer one QMP command or send the next event.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long qemu may take to exit after `quit` before it is killed: a hung qemu must not hang
/// imgforge.
pub const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Which qemu serves images and commits, and as whom: the helper VM's settings
/// (`--qemu`, `--helper-user`, Ganeti's `HELPER_USER`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confinement {
    /// qemu-system-x86_64.
    pub qemu: std::path::PathBuf,
    /// The unprivileged user it runs as when imgforge runs as root
    /// ([`privilege::DYNAMIC_HELPER_USER`]: a uid of its own, reserved while it runs).
    pub user: String,
}

impl Default for Confinement {
    fn default() -> Self {
        Self { qemu: "qemu-system-x86_64".into(), user: privilege::DEFAULT_HELPER_USER.into() }
    }
}

/// Why the confined qemu did not start serving.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    /// qemu could not be started or confined, or died for a reason not tied to a disk: the
    /// host's trouble.
    #[error("{0}")]
    Host(String),
    /// qemu started and refused one of its `-blockdev` nodes (its error names the option): the
    /// image's fault.
    #[error("{0}")]
    Refused(String),
}

impl StartError {
    /// Classifies what qemu printed when it stopped before its monitor answered (pure).
    pub fn from_qemu_output(output: String) -> Self {
        // qemu prefixes an option's error with the option itself: "qemu-system-x86_64:
        // -blockdev {...}: Could not open ...".
        if output.lines().any(|l| l.contains(": -blockdev ")) {
            StartError::Refused(output)
        } else {
            StartError::Host(output)
        }
    }
}

/// A running confined qemu; killed when dropped.
pub struct BlockdevQemu {
    child: Child,
    // Its uid's reservation: dropped after the child was reaped (fields drop after `drop`).
    _user: Option<Unprivileged>,
    dir: tempfile::TempDir,
    /// Its monitor (the commands imgforge sends it exist in qemu 7.2 to 10).
    pub qmp: Qmp,
}

impl Drop for BlockdevQemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl BlockdevQemu {
    /// Starts qemu with `fdsets` (set number, descriptor, label) and the `-blockdev` nodes
    /// `blockdevs`, and connects to its monitor. An error carries qemu's own message.
    pub fn start(
        confinement: &Confinement,
        fdsets: &[(u32, RawFd, &str)],
        blockdevs: &[Value],
    ) -> Result<BlockdevQemu, StartError> {
        let host = StartError::Host;
        let user = privilege::for_this_process(&confinement.user)
            .map_err(|e| host(format!("cannot run qemu unprivileged: {e}")))?;
        let dir = crate::workdir::private_tempdir("qemu")
            .map_err(|e| host(format!("cannot create a private directory for qemu's sockets: {e}")))?;
        let qmp_path = dir.path().join("qmp.sock");
        let listener =
            UnixListener::bind(&qmp_path).map_err(|e| host(format!("cannot listen on {}: {e}", qmp_path.display())))?;
        let mut args: Vec<String> =
            ["-machine", "none", "-nodefaults", "-no-user-config", "-display", "none", "-sandbox", SANDBOX]
                .map(String::from)
                .to_vec();
        for (set, fd, label) in fdsets {
            args.extend(["-add-fd".into(), format!("fd={fd},set={set},opaque={label}")]);
        }
        for node in blockdevs {
            args.extend(["-blockdev".into(), node.to_string()]);
        }
        args.extend([
            "-chardev".into(),
            format!("socket,id=qmp,fd={},server=on,wait=off", listener.as_raw_fd()),
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
        ]);
        let mut inherited: Vec<RawFd> = fdsets.iter().map(|(_, fd, _)| *fd).collect();
        inherited.push(listener.as_raw_fd());
        let child = spawn(&confinement.qemu, &args, inherited, user.clone()).map_err(host)?;
        // qemu holds its own copy: if it dies, connecting fails instead of waiting forever.
        drop(listener);
        let mut child = child;
        let qmp = match Qmp::connect(&qmp_path, QMP_TIMEOUT) {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(StartError::from_qemu_output(stderr_or(&mut child, e.to_string())));
            }
        };
        Ok(BlockdevQemu { child, _user: user, dir, qmp })
    }

    /// A path for a socket in qemu's private directory.
    pub fn socket_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Stops qemu after a failure; returns what it printed, or `detail` if nothing.
    pub fn failure(&mut self, detail: String) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        stderr_or(&mut self.child, detail)
    }

    /// Asks qemu to quit and waits for it, at most [`QUIT_TIMEOUT`] (then kills it).
    pub fn quit(mut self) -> Result<(), String> {
        let _ = self.qmp.quit();
        let status = wait_bounded(&mut self.child, QUIT_TIMEOUT)?;
        if status.success() {
            Ok(())
        } else {
            Err(stderr_or(&mut self.child, format!("qemu exited with {status}")))
        }
    }
}

/// Waits for `child` at most `limit`; kills it after that.
fn wait_bounded(child: &mut Child, limit: Duration) -> Result<std::process::ExitStatus, String> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("waiting for qemu: {e}"))? {
            return Ok(status);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("qemu did not exit within {} s of being asked to: killed", limit.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr_or(child: &mut Child, detail: String) -> String {
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    if stderr.trim().is_empty() {
        detail
    } else {
        stderr.trim().to_owned()
    }
}

fn spawn(qemu: &Path, args: &[String], inherited: Vec<RawFd>, user: Option<Unprivileged>) -> Result<Child, String> {
    let mut command = Command::new(qemu);
    command.env_clear().envs(privilege::confined_environment());
    command.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: only async-signal-safe syscalls run between fork and exec.
    unsafe {
        command.pre_exec(privilege::child_setup(inherited, user, Vec::new()));
    }
    command.spawn().map_err(|e| format!("cannot start {} (install qemu-system-x86): {e}", qemu.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_failures_are_told_apart() {
        let refused =
            "qemu-system-x86_64: -blockdev {\"driver\":\"vhdx\"}: Could not open '/dev/fdset/1': Invalid argument";
        assert_eq!(StartError::from_qemu_output(refused.into()), StartError::Refused(refused.into()));
        for host in [
            "qemu-system-x86_64: -sandbox on,obsolete=deny: seccomp support is disabled",
            "cannot connect to qemu's monitor: connection refused",
            "",
        ] {
            assert_eq!(StartError::from_qemu_output(host.into()), StartError::Host(host.into()), "{host}");
        }
    }

    #[test]
    fn a_child_that_does_not_exit_is_killed_after_the_limit() {
        let mut quick = Command::new("true").spawn().unwrap();
        assert!(wait_bounded(&mut quick, Duration::from_secs(10)).unwrap().success());
        let mut hung = Command::new("sleep").arg("60").spawn().unwrap();
        let started = std::time::Instant::now();
        let err = wait_bounded(&mut hung, Duration::from_millis(300)).unwrap_err();
        assert!(err.contains("killed"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(hung.try_wait().unwrap().is_some(), "the hung child is gone");
    }
}
