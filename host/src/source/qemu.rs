//! Images in qemu's formats (qcow2, vmdk, vdi, vhdx, vpc, qed), parsed by qemu only, and only
//! inside the same confinement as the helper VM: `qemu-system-x86_64 -machine none` runs as
//! the unprivileged user under `-sandbox`, gets the image as an inherited descriptor (an fdset,
//! never a path), opens it with an explicit driver and no backing file, and serves the raw disk
//! over NBD on a socket the host created and handed over through QMP. The host reads it with
//! [`crate::source::nbd`]; no C code on the host parses the image. qcow2 metadata is checked in Rust
//! first ([`crate::source::qcow2`]), where qemu would read zeros past the end of a truncated file.

use crate::source::nbd;
use crate::source::SourceError;
use crate::vm::blockdev_qemu::{BlockdevQemu, StartError};
use crate::vm::qmp::QmpError;
use serde_json::{json, Value};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
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

/// An image served by a confined qemu, readable as a raw disk.
pub struct QemuImage {
    server: BlockdevQemu,
    client: nbd::Client,
    /// What qemu found.
    pub info: Info,
}

/// The raw disk of a [`QemuImage`], front to back, holes as holes.
pub struct QemuReader {
    _server: BlockdevQemu,
    inner: nbd::Reader,
}

impl crate::stream::ChunkReader for QemuReader {
    fn next(&mut self, buf: &mut [u8]) -> std::io::Result<crate::stream::Piece> {
        self.inner.next(buf)
    }

    fn next_into(&mut self, buf: &mut crate::stream::buffer::AlignedBuf) -> std::io::Result<crate::stream::Piece> {
        self.inner.next_into(buf)
    }
}

impl QemuImage {
    /// A handle whose `shutdown` makes a read blocked on the confined qemu return.
    pub fn interrupter(&self) -> std::io::Result<std::os::unix::net::UnixStream> {
        self.client.interrupter()
    }

    /// Reads the whole disk in order.
    pub fn into_reader(self) -> QemuReader {
        QemuReader { _server: self.server, inner: nbd::Reader::new(self.client) }
    }

    /// Reads `len` bytes at `offset` (fewer at the end of the disk).
    pub fn read_at(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let end = offset.saturating_add(len as u64).min(self.info.virtual_size);
        let mut out = vec![0u8; crate::stream::at_most(end.saturating_sub(offset), len)];
        for (i, chunk) in out.chunks_mut(nbd::MAX_READ).enumerate() {
            let at = offset + (i * nbd::MAX_READ) as u64;
            self.client.read_at(at, chunk).map_err(std::io::Error::other)?;
        }
        Ok(out)
    }
}

/// Why a qemu-format image could not be opened for reading.
#[derive(Debug, thiserror::Error)]
pub enum QemuSourceError {
    /// The image is refused or unreadable (its own fault).
    #[error(transparent)]
    Image(#[from] SourceError),
    /// The confined qemu could not be reached (the host's fault).
    #[error("cannot {what}: {reason}")]
    Confinement {
        /// What was being set up, naming the socket or image.
        what: String,
        /// Why.
        reason: String,
    },
}

/// Opens the image `image` (shown as `name`) as `format` in a confined qemu. It takes the open
/// file, never a path, so qemu reads the very descriptor the caller checked or hashed. A backing
/// file named in the image is refused unless it is `allowed_backing` (then qemu gets that file
/// as a descriptor too).
pub fn open(
    image: &std::fs::File,
    name: &str,
    format: &'static str,
    allowed_backing: Option<&Path>,
    confinement: &crate::vm::blockdev_qemu::Confinement,
) -> Result<QemuImage, QemuSourceError> {
    let name = name.to_owned();
    let refuse = |reason: String| -> QemuSourceError { SourceError::Unsupported { name: name.clone(), reason }.into() };
    let io = |source| SourceError::Io { name: name.clone(), source };
    let len = image.metadata().map_err(io)?.len();
    check_metadata(image, len, format, allowed_backing.is_some()).map_err(refuse)?;
    let backing = match allowed_backing {
        Some(b) => {
            let file = std::fs::File::open(b).map_err(io)?;
            let fmt = backing_format(b).map_err(io)?;
            if fmt == "qcow2" {
                // The backing file is opened as qcow2 too: the same check, and no chain of its own.
                let len = file.metadata().map_err(io)?.len();
                crate::source::qcow2::check(&file, len, crate::source::qcow2::Backing::Refused)
                    .map_err(|e| refuse(format!("its backing file {}: {e}", b.display())))?;
            }
            Some((file, fmt))
        }
        None => None,
    };
    let mut fdsets = vec![(1, image.as_raw_fd(), "source")];
    let mut blockdevs =
        vec![json!({"driver": "file", "node-name": "src-file", "filename": "/dev/fdset/1", "read-only": true})];
    let mut source = json!({"driver": format, "node-name": "src", "file": "src-file", "read-only": true});
    if let Some((file, fmt)) = &backing {
        fdsets.push((2, file.as_raw_fd(), "backing"));
        blockdevs.push(
            json!({"driver": "file", "node-name": "backing-file", "filename": "/dev/fdset/2", "read-only": true}),
        );
        let mut node = json!({"driver": fmt, "node-name": "backing", "file": "backing-file", "read-only": true});
        if WITH_BACKING.contains(fmt) {
            node["backing"] = Value::Null;
        }
        blockdevs.push(node);
        source["backing"] = json!("backing");
    } else if WITH_BACKING.contains(&format) {
        // Never a file named inside the image.
        source["backing"] = Value::Null;
    }
    blockdevs.push(source);
    let opened = BlockdevQemu::start(confinement, &fdsets, &blockdevs);
    drop(backing);
    let mut server = opened.map_err(|e| match e {
        StartError::Refused(e) => refuse(format!("qemu cannot read it as {format}: {e}")),
        StartError::Host(reason) => {
            QemuSourceError::Confinement { what: format!("start the confined qemu to read {name}"), reason }
        }
    })?;
    let nbd_path = server.socket_path("nbd.sock");
    let nbd_listener = UnixListener::bind(&nbd_path).map_err(|e| QemuSourceError::Confinement {
        what: format!("listen on {}", nbd_path.display()),
        reason: e.to_string(),
    })?;
    let qmp = &mut server.qmp;
    let setup = (|| -> Result<Value, QmpError> {
        qmp.execute_with_fd("getfd", Some(json!({"fdname": "nbd"})), nbd_listener.as_fd())?;
        qmp.execute("nbd-server-start", Some(json!({"addr": {"type": "fd", "data": {"str": "nbd"}}})))?;
        qmp.execute("block-export-add", Some(json!({"type": "nbd", "id": "src", "node-name": "src", "name": EXPORT})))?;
        qmp.execute("query-named-block-nodes", Some(json!({"flat": true})))
    })();
    drop(nbd_listener);
    let nodes =
        setup.map_err(|e| refuse(format!("qemu cannot read it as {format}: {}", server.failure(e.to_string()))))?;
    let info = parse_nodes(&nodes).map_err(|e| refuse(format!("qemu cannot read it as {format}: {e}")))?;
    if let Some(backing) = &info.backing_file {
        let allowed = allowed_backing.is_some_and(|b| {
            Path::new(backing) == b || std::fs::canonicalize(b).ok() == std::fs::canonicalize(backing).ok()
        });
        if !allowed {
            return Err(refuse(format!("it has the backing file {backing}, which could be any host file: pass --backing-file {backing} if you mean it, or flatten the image")));
        }
    }
    let client = nbd::Client::connect(&nbd_path, EXPORT).map_err(|e| QemuSourceError::Confinement {
        what: format!("read {name} from the confined qemu"),
        reason: e.to_string(),
    })?;
    Ok(QemuImage { server, client, info })
}

/// Refuses, before qemu opens it, an image whose metadata would make qemu open other files
/// (or read part of the disk from nowhere). The formats not checked here name no other file
/// that qemu opens: vdi has none, qcow and qed backing files are pinned to nothing (and then
/// refused from what qemu reports), and qemu refuses differencing vhdx itself.
fn check_metadata(image: &std::fs::File, len: u64, format: &str, backing_allowed: bool) -> Result<(), String> {
    use crate::source::{qcow2, vmdk, vpc};
    match format {
        "qcow2" => {
            let backing = if backing_allowed { qcow2::Backing::Allowed } else { qcow2::Backing::Refused };
            qcow2::check(image, len, backing).map(drop).map_err(|e| e.to_string())
        }
        "vmdk" => vmdk::check(image, len).map(drop).map_err(|e| e.to_string()),
        "vpc" => vpc::check(image).map_err(|e| e.to_string()),
        _ => Ok(()),
    }
}

/// The format of a backing file, from its first bytes (qcow2 or raw).
fn backing_format(path: &Path) -> std::io::Result<&'static str> {
    let mut head = [0u8; 4];
    let n = std::io::Read::read(&mut std::fs::File::open(path)?, &mut head)?;
    Ok(if head[..n] == *crate::source::qcow2::MAGIC { "qcow2" } else { "raw" })
}

/// The virtual size and backing file of node `src` in `query-named-block-nodes` (pure).
pub fn parse_nodes(nodes: &Value) -> Result<Info, String> {
    let Some(listed) = nodes.as_array() else {
        let mut reply = nodes.to_string();
        reply.truncate(200);
        return Err(format!("qemu answered the node listing with {reply} instead of a list"));
    };
    let src = listed.iter().find(|n| n["node-name"] == "src").ok_or_else(|| {
        let names: Vec<String> = listed.iter().map(|n| n["node-name"].to_string()).take(8).collect();
        format!("qemu lists no node for the image (it lists {} node(s): {})", listed.len(), names.join(", "))
    })?;
    let image = &src["image"];
    let virtual_size = image["virtual-size"].as_u64().ok_or("qemu reports no virtual size")?;
    let backing_file = image["backing-filename"].as_str().map(String::from);
    Ok(Info { virtual_size, backing_file })
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
        let missing = parse_nodes(&json!([{"node-name": "src-file", "image": {}}])).unwrap_err();
        assert!(missing.contains("1 node(s): \"src-file\""), "{missing}");
        let not_a_list = parse_nodes(&json!(null)).unwrap_err();
        assert!(not_a_list.contains("with null instead of a list"), "{not_a_list}");
    }
}
