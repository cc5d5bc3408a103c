//! qemu without a machine (`-machine none`): its block layer alone, confined like the helper
//! VM — the unprivileged user, `-sandbox`, every file an inherited descriptor (fdsets), QMP on a
//! listening socket in a private directory. It serves qemu-format images over NBD
//! ([`crate::source::qemu`]) and commits overlays ([`crate::job::overlay`]), so that only a confined
//! qemu ever parses qcow2 and its kin.

use super::cmdline::SANDBOX;
use super::privilege::{self, Unprivileged};
use serde_json::Value;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long qemu may take to answer one QMP command or send the next event.
const QMP_TIMEOUT: Duration = Duration::from_secs(120);
/// The qemu binary (the helper VM's, without a machine).
const QEMU: &str = "qemu-system-x86_64";

/// A running confined qemu; killed when dropped.
pub struct BlockdevQemu {
    child: Child,
    dir: tempfile::TempDir,
    /// Its monitor.
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
    pub fn start(fdsets: &[(u32, RawFd, &str)], blockdevs: &[Value]) -> Result<BlockdevQemu, String> {
        let user = privilege::for_this_process(privilege::DEFAULT_HELPER_USER)
            .map_err(|e| format!("cannot run qemu unprivileged: {e}"))?;
        let dir = tempfile::Builder::new()
            .prefix("imgforge-qemu-")
            .tempdir()
            .map_err(|e| format!("cannot create a private directory for qemu's sockets: {e}"))?;
        let qmp_path = dir.path().join("qmp.sock");
        let listener =
            UnixListener::bind(&qmp_path).map_err(|e| format!("cannot listen on {}: {e}", qmp_path.display()))?;
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
        let child = spawn(&args, inherited, user)?;
        // qemu holds its own copy: if it dies, connecting fails instead of waiting forever.
        drop(listener);
        let mut child = child;
        let qmp = match Qmp::connect(&qmp_path) {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(stderr_or(&mut child, e));
            }
        };
        Ok(BlockdevQemu { child, dir, qmp })
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

    /// Asks qemu to quit and waits for it.
    pub fn quit(mut self) -> Result<(), String> {
        let _ = self.qmp.execute(&serde_json::json!({"execute": "quit"}));
        let status = self.child.wait().map_err(|e| format!("waiting for qemu: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(stderr_or(&mut self.child, format!("qemu exited with {status}")))
        }
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

fn spawn(args: &[String], inherited: Vec<RawFd>, user: Option<Unprivileged>) -> Result<Child, String> {
    let mut command = Command::new(QEMU);
    command.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: only async-signal-safe syscalls run between fork and exec.
    unsafe {
        command.pre_exec(privilege::child_setup(inherited, user, Vec::new()));
    }
    command.spawn().map_err(|e| format!("cannot start {QEMU} (install qemu-system-x86): {e}"))
}

/// A QMP connection speaking plain JSON lines (the commands used exist in qemu 7.2 to 10);
/// events that arrive while a command waits for its answer are kept for [`Qmp::next_event`].
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<Value>,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp, String> {
        let stream = UnixStream::connect(path).map_err(|e| format!("QMP: {e}"))?;
        stream.set_read_timeout(Some(QMP_TIMEOUT)).map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Qmp { reader: BufReader::new(stream), writer, events: VecDeque::new() };
        qmp.line()?; // The greeting.
        qmp.execute(&serde_json::json!({"execute": "qmp_capabilities"}))?;
        Ok(qmp)
    }

    fn line(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("qemu closed its QMP connection".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("QMP sent invalid JSON: {e}")),
            Err(e) => Err(format!("QMP: {e}")),
        }
    }

    fn result(&mut self) -> Result<Value, String> {
        loop {
            let v = self.line()?;
            if v.get("event").is_some() {
                self.events.push_back(v);
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(e["desc"].as_str().unwrap_or("QMP error").to_owned());
            }
            return Ok(v["return"].clone());
        }
    }

    /// The next event (kept or newly arrived).
    pub fn next_event(&mut self) -> Result<Value, String> {
        if let Some(e) = self.events.pop_front() {
            return Ok(e);
        }
        loop {
            let v = self.line()?;
            if v.get("event").is_some() {
                return Ok(v);
            }
        }
    }

    /// Runs a command; its `return` value, or its error's description.
    pub fn execute(&mut self, command: &Value) -> Result<Value, String> {
        self.writer.write_all(format!("{command}\n").as_bytes()).map_err(|e| format!("QMP: {e}"))?;
        self.result()
    }

    /// Runs `command` with `fd` attached (SCM_RIGHTS), as `getfd` wants.
    pub fn send_fd(&mut self, command: &Value, fd: RawFd) -> Result<Value, String> {
        let text = format!("{command}\n");
        let mut iov = libc::iovec { iov_base: text.as_ptr() as *mut libc::c_void, iov_len: text.len() };
        // SAFETY: CMSG_SPACE/CMSG_LEN are pure computations.
        let (space, cmsg_len) = unsafe {
            (libc::CMSG_SPACE(size_of::<RawFd>() as u32) as usize, libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize)
        };
        let mut control = vec![0u8; space];
        // SAFETY: msghdr is plain data; every pointer in it is valid for the sendmsg call, and the
        // control buffer is CMSG_SPACE bytes, room for one header and one descriptor.
        let sent = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = space;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = cmsg_len;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut RawFd, fd);
            libc::sendmsg(self.writer.as_raw_fd(), &msg, 0)
        };
        if sent != text.len() as isize {
            return Err(format!("QMP: cannot pass a descriptor: {}", std::io::Error::last_os_error()));
        }
        self.result()
    }
}
