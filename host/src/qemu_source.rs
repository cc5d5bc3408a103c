//! Images in qemu's formats (qcow2, vmdk, vdi, vhdx, vpc, qed), parsed by qemu only, and only
//! inside the same confinement as the helper VM: `qemu-system-x86_64 -machine none` runs as
//! the unprivileged user under `-sandbox`, gets the image as an inherited descriptor (an fdset,
//! never a path), opens it with an explicit driver and no backing file, and serves the raw disk
//! over NBD on a socket the host created and handed over through QMP. The host reads it with
//! [`crate::nbd`]; no C code on the host parses the image. qcow2 metadata is checked in Rust
//! first ([`crate::qcow2`]), where qemu would read zeros past the end of a truncated file.

use crate::exit::Failure;
use crate::nbd;
use crate::source::SourceError;
use crate::vm::privilege::{self, Unprivileged};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long qemu may take to answer one QMP command (opening a large image included).
const QMP_TIMEOUT: Duration = Duration::from_secs(60);
/// The qemu that serves images (the helper VM's, without a machine).
const QEMU: &str = "qemu-system-x86_64";
/// The NBD export's name.
const EXPORT: &str = "src";
/// Formats whose qemu driver takes a `backing` option.
const WITH_BACKING: [&str; 4] = ["qcow2", "qcow", "qed", "vmdk"];

/// What qemu says about the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// Virtual (raw) size.
    pub virtual_size: u64,
    /// Backing file named in the image, if any.
    pub backing_file: Option<String>,
}

/// The confined qemu serving one image; stopped when dropped.
struct Server {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An image served by a confined qemu, readable as a raw disk.
pub struct QemuImage {
    server: Server,
    client: nbd::Client,
    /// What qemu found.
    pub info: Info,
}

/// The raw disk of a [`QemuImage`], front to back.
pub struct QemuReader {
    _server: Server,
    inner: nbd::Reader,
}

impl std::io::Read for QemuReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

impl QemuImage {
    /// Reads the whole disk in order.
    pub fn into_reader(self) -> QemuReader {
        QemuReader { _server: self.server, inner: nbd::Reader::new(self.client) }
    }

    /// Reads `len` bytes at `offset` (fewer at the end of the disk).
    pub fn read_at(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let end = offset.saturating_add(len as u64).min(self.info.virtual_size);
        let mut out = vec![0u8; end.saturating_sub(offset) as usize];
        for (i, chunk) in out.chunks_mut(nbd::MAX_READ).enumerate() {
            let at = offset + (i * nbd::MAX_READ) as u64;
            self.client.read_at(at, chunk).map_err(std::io::Error::other)?;
        }
        Ok(out)
    }
}

/// Opens `path` as `format` in a confined qemu. A backing file named in the image is refused
/// unless it is `allowed_backing` (then qemu gets that file as a descriptor too).
pub fn open(path: &Path, format: &'static str, allowed_backing: Option<&Path>) -> Result<QemuImage, Failure> {
    let name = path.display().to_string();
    let refuse = |reason: String| -> Failure { SourceError::Unsupported { name: name.clone(), reason }.into() };
    let io = |source| SourceError::Io { name: name.clone(), source };
    let image = std::fs::File::open(path).map_err(io)?;
    let len = image.metadata().map_err(io)?.len();
    if format == "qcow2" {
        crate::qcow2::check(&image, len).map_err(|e| refuse(e.to_string()))?;
    }
    let backing = match allowed_backing {
        Some(b) => Some((std::fs::File::open(b).map_err(io)?, backing_format(b).map_err(io)?)),
        None => None,
    };
    let user = privilege::for_this_process(privilege::DEFAULT_HELPER_USER)
        .map_err(|e| Failure::environment(format!("cannot run qemu unprivileged: {e}")))?;
    let dir = tempfile::Builder::new()
        .prefix("imgforge-qemu-")
        .tempdir()
        .map_err(|e| Failure::environment(format!("cannot create a private directory for qemu's sockets: {e}")))?;
    let qmp_path = dir.path().join("qmp.sock");
    let nbd_path = dir.path().join("nbd.sock");
    let listen = |p: &Path| {
        UnixListener::bind(p).map_err(|e| Failure::environment(format!("cannot listen on {}: {e}", p.display())))
    };
    let qmp_listener = listen(&qmp_path)?;
    let nbd_listener = listen(&nbd_path)?;

    let mut args = vec![
        "-machine".to_owned(),
        "none".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-sandbox".into(),
        crate::vm::cmdline::SANDBOX.into(),
        "-add-fd".into(),
        format!("fd={},set=1,opaque=source", image.as_raw_fd()),
        "-blockdev".into(),
        json!({"driver": "file", "node-name": "src-file", "filename": "/dev/fdset/1", "read-only": true}).to_string(),
    ];
    let mut source = json!({"driver": format, "node-name": "src", "file": "src-file", "read-only": true});
    if let Some((file, fmt)) = &backing {
        args.extend(["-add-fd".into(), format!("fd={},set=2,opaque=backing", file.as_raw_fd())]);
        let file_node =
            json!({"driver": "file", "node-name": "backing-file", "filename": "/dev/fdset/2", "read-only": true});
        args.extend(["-blockdev".into(), file_node.to_string()]);
        let mut node = json!({"driver": fmt, "node-name": "backing", "file": "backing-file", "read-only": true});
        if WITH_BACKING.contains(fmt) {
            node["backing"] = Value::Null;
        }
        args.extend(["-blockdev".into(), node.to_string()]);
        source["backing"] = json!("backing");
    } else if WITH_BACKING.contains(&format) {
        // Never a file named inside the image.
        source["backing"] = Value::Null;
    }
    args.extend(["-blockdev".into(), source.to_string()]);
    args.extend([
        "-chardev".into(),
        format!("socket,id=qmp,fd={},server=on,wait=off", qmp_listener.as_raw_fd()),
        "-mon".into(),
        "chardev=qmp,mode=control".into(),
    ]);
    let mut inherited: Vec<RawFd> = vec![image.as_raw_fd(), qmp_listener.as_raw_fd()];
    inherited.extend(backing.as_ref().map(|(f, _)| f.as_raw_fd()));
    let child = spawn(&args, &inherited, user)?;
    // qemu holds its own copies: if it dies, connecting fails instead of waiting forever.
    drop((qmp_listener, image, backing));
    let mut server = Server { child, _dir: dir };

    let mut qmp = match Qmp::connect(&qmp_path) {
        Ok(q) => q,
        Err(e) => return Err(qemu_failure(&mut server, &name, format, &e)),
    };
    let setup = (|| -> Result<Value, String> {
        qmp.execute(&json!({"execute": "qmp_capabilities"}))?;
        qmp.send_fd(&json!({"execute": "getfd", "arguments": {"fdname": "nbd"}}), nbd_listener.as_raw_fd())?;
        qmp.execute(
            &json!({"execute": "nbd-server-start", "arguments": {"addr": {"type": "fd", "data": {"str": "nbd"}}}}),
        )?;
        qmp.execute(&json!({"execute": "block-export-add", "arguments": {"type": "nbd", "id": "src", "node-name": "src", "name": EXPORT}}))?;
        qmp.execute(&json!({"execute": "query-named-block-nodes", "arguments": {"flat": true}}))
    })();
    drop(nbd_listener);
    let nodes = setup.map_err(|e| qemu_failure(&mut server, &name, format, &e))?;
    let info = parse_nodes(&nodes).map_err(|e| qemu_failure(&mut server, &name, format, &e))?;
    if let Some(backing) = &info.backing_file {
        let allowed = allowed_backing.is_some_and(|b| {
            Path::new(backing) == b || std::fs::canonicalize(b).ok() == std::fs::canonicalize(backing).ok()
        });
        if !allowed {
            return Err(refuse(format!("it has the backing file {backing}, which could be any host file: pass --backing-file {backing} if you mean it, or flatten the image")));
        }
    }
    let client = nbd::Client::connect(&nbd_path, EXPORT)
        .map_err(|e| Failure::environment(format!("cannot read {name} from the confined qemu: {e}")))?;
    Ok(QemuImage { server, client, info })
}

/// The format of a backing file, from its first bytes (qcow2 or raw).
fn backing_format(path: &Path) -> std::io::Result<&'static str> {
    let mut head = [0u8; 4];
    let n = std::io::Read::read(&mut std::fs::File::open(path)?, &mut head)?;
    Ok(if head[..n] == *b"QFI\xfb" { "qcow2" } else { "raw" })
}

/// The virtual size and backing file of node `src` in `query-named-block-nodes` (pure).
pub fn parse_nodes(nodes: &Value) -> Result<Info, String> {
    let src = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == "src"))
        .ok_or("qemu lists no node for the image")?;
    let image = &src["image"];
    let virtual_size = image["virtual-size"].as_u64().ok_or("qemu reports no virtual size")?;
    let backing_file = image["backing-filename"].as_str().map(String::from);
    Ok(Info { virtual_size, backing_file })
}

/// A failure while qemu opened the image: its stderr says why (a damaged image, mostly).
fn qemu_failure(server: &mut Server, name: &str, format: &str, detail: &str) -> Failure {
    let _ = server.child.kill();
    let _ = server.child.wait();
    let mut stderr = String::new();
    if let Some(mut e) = server.child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    let why = if stderr.trim().is_empty() { detail.to_owned() } else { stderr.trim().to_owned() };
    SourceError::Unsupported { name: name.to_owned(), reason: format!("qemu cannot read it as {format}: {why}") }.into()
}

fn spawn(args: &[String], inherited: &[RawFd], user: Option<Unprivileged>) -> Result<Child, Failure> {
    let qemu = PathBuf::from(QEMU);
    let inherited = inherited.to_vec();
    let mut command = Command::new(&qemu);
    command.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: only async-signal-safe syscalls run between fork and exec.
    unsafe {
        command.pre_exec(move || {
            libc::setsid();
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            for fd in &inherited {
                if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(u) = &user {
                privilege::drop_to(u, &[])?;
            }
            Ok(())
        });
    }
    command
        .spawn()
        .map_err(|e| Failure::environment(format!("cannot start {} (install qemu-system-x86): {e}", qemu.display())))
}

/// A QMP connection speaking plain JSON lines (the commands used here exist in qemu 7.2 to 10).
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp, String> {
        let stream = UnixStream::connect(path).map_err(|e| format!("QMP: {e}"))?;
        stream.set_read_timeout(Some(QMP_TIMEOUT)).map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Qmp { reader: BufReader::new(stream), writer };
        qmp.answer()?; // The greeting.
        Ok(qmp)
    }

    /// The next line that is not an event.
    fn answer(&mut self) -> Result<Value, String> {
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return Err("qemu closed its QMP connection".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("QMP: {e}")),
            }
            let v: Value = serde_json::from_str(&line).map_err(|e| format!("QMP sent invalid JSON: {e}"))?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    }

    fn result(&mut self) -> Result<Value, String> {
        let v = self.answer()?;
        if let Some(e) = v.get("error") {
            return Err(e["desc"].as_str().unwrap_or("QMP error").to_owned());
        }
        Ok(v["return"].clone())
    }

    fn execute(&mut self, command: &Value) -> Result<Value, String> {
        self.writer.write_all(format!("{command}\n").as_bytes()).map_err(|e| format!("QMP: {e}"))?;
        self.result()
    }

    /// Sends `command` with `fd` attached (SCM_RIGHTS), as `getfd` wants.
    fn send_fd(&mut self, command: &Value, fd: RawFd) -> Result<Value, String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_listing() {
        let nodes = json!([
            {"node-name": "src-file", "image": {"virtual-size": 393216}},
            {"node-name": "src", "image": {"virtual-size": 67108864, "backing-filename": "/etc/shadow"}}
        ]);
        let info = parse_nodes(&nodes).unwrap();
        assert_eq!(info, Info { virtual_size: 64 << 20, backing_file: Some("/etc/shadow".into()) });
        assert!(parse_nodes(&json!([{"node-name": "src", "image": {}}])).is_err());
        assert!(parse_nodes(&json!({})).is_err());
    }
}
