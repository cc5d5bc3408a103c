//! A minimal NBD client (fixed newstyle handshake, `NBD_OPT_GO`, structured replies when the
//! server offers them, so that holes arrive as a length instead of zeros): how the host reads a
//! qemu-format image that only the confined qemu parses ([`crate::source::qemu`]). Every length,
//! offset and size the server sends is checked before use.

use crate::stream::buffer::{AlignedBuf, ALIGN_BYTES};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const OPT_STRUCTURED_REPLY: u32 = 8;
const CHUNK_DONE: u16 = 1;
const CHUNK_NONE: u16 = 0;
const CHUNK_OFFSET_DATA: u16 = 1;
const CHUNK_OFFSET_HOLE: u16 = 2;
const CHUNK_ERROR_BIT: u16 = 1 << 15;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERROR_BIT: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;
/// Longest option reply accepted (qemu's are a few dozen bytes, error texts a few hundred).
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// How long the confined qemu may stay silent (or refuse our bytes) before it is taken as hung:
/// a 4 MiB read of a compressed qcow2 under TCG takes well under a second.
pub const NBD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
/// Longest read asked for in one request (qemu serves up to 32 MiB).
pub const MAX_READ: usize = 4 << 20;

/// What can go wrong talking NBD.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed.
    #[error("NBD connection: {0}")]
    Io(#[from] std::io::Error),
    /// The server broke the protocol.
    #[error("NBD server sent {0}")]
    Protocol(String),
    /// The server refused the export.
    #[error("NBD server refused the export: {0}")]
    Refused(String),
    /// A read failed on the server (the image is damaged, or its file is short).
    #[error("reading {len} bytes at offset {offset} failed on the NBD server (errno {errno})")]
    Read { offset: u64, len: usize, errno: u32 },
}

/// A connected client in the transmission phase.
pub struct Client {
    stream: UnixStream,
    size: u64,
    handle: u64,
    structured: bool,
}

/// What a read found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// The buffer holds the bytes (holes in it zeroed).
    Data,
    /// The whole range is a hole: the buffer was not touched.
    Hole,
}

fn u16_be(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn u32_be(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}
fn u64_be(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// Checks the server's greeting (18 bytes); returns its handshake flags (pure).
pub fn parse_greeting(b: &[u8; 18]) -> Result<u16, NbdError> {
    if &b[..8] != NBDMAGIC || &b[8..16] != IHAVEOPT {
        return Err(NbdError::Protocol("a greeting that is not fixed-newstyle NBD".into()));
    }
    let flags = u16_be(&b[16..]);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::Protocol("no fixed-newstyle support".into()));
    }
    Ok(flags)
}

/// One option reply header (20 bytes): (option, reply type, payload length) (pure).
pub fn parse_option_reply(b: &[u8; 20]) -> Result<(u32, u32, u32), NbdError> {
    if u64_be(b) != OPT_REPLY_MAGIC {
        return Err(NbdError::Protocol("an option reply with a bad magic".into()));
    }
    let (option, kind, len) = (u32_be(&b[8..]), u32_be(&b[12..]), u32_be(&b[16..]));
    if len > MAX_OPTION_REPLY {
        return Err(NbdError::Protocol(format!("an option reply of {len} bytes")));
    }
    Ok((option, kind, len))
}

/// The export size in an `NBD_REP_INFO` payload, if it is `NBD_INFO_EXPORT` (pure).
pub fn parse_info_export(payload: &[u8]) -> Option<u64> {
    (payload.len() >= 12 && u16_be(payload) == INFO_EXPORT).then(|| u64_be(&payload[2..]))
}

/// A structured reply chunk header (20 bytes): (flags, type, handle, payload length) (pure).
pub fn parse_chunk_header(b: &[u8; 20]) -> Result<(u16, u16, u64, u32), NbdError> {
    if u32_be(b) != STRUCTURED_REPLY_MAGIC {
        return Err(NbdError::Protocol("a reply chunk with a bad magic".into()));
    }
    let len = u32_be(&b[16..]);
    if len as usize > MAX_READ + 8 {
        return Err(NbdError::Protocol(format!("a reply chunk of {len} bytes")));
    }
    Ok((u16_be(&b[4..]), u16_be(&b[6..]), u64_be(&b[8..]), len))
}

/// Where a chunk's bytes go in a request for `len` bytes at `offset`: the range in the
/// buffer, or a protocol error if it falls outside the request (pure).
pub fn chunk_range(
    offset: u64,
    len: usize,
    chunk_offset: u64,
    chunk_len: u64,
) -> Result<std::ops::Range<usize>, NbdError> {
    let start = chunk_offset.checked_sub(offset).filter(|s| *s <= len as u64);
    let end = |s: u64| s.checked_add(chunk_len).filter(|e| *e <= len as u64);
    match start.and_then(|s| Some(usize::try_from(s).ok()?..usize::try_from(end(s)?).ok()?)) {
        Some(range) => Ok(range),
        None => Err(NbdError::Protocol(format!(
            "a chunk of {chunk_len} bytes at {chunk_offset}, outside the request for {len} bytes at {offset}"
        ))),
    }
}

/// A simple reply header (16 bytes): (errno, handle) (pure).
pub fn parse_simple_reply(b: &[u8; 16]) -> Result<(u32, u64), NbdError> {
    if u32_be(b) != SIMPLE_REPLY_MAGIC {
        return Err(NbdError::Protocol("a reply with a bad magic".into()));
    }
    Ok((u32_be(&b[4..]), u64_be(&b[8..])))
}

/// A transmission-phase request (pure).
fn request(command: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut req = [0u8; 28];
    req[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    req[6..8].copy_from_slice(&command.to_be_bytes());
    req[8..16].copy_from_slice(&handle.to_be_bytes());
    req[16..24].copy_from_slice(&offset.to_be_bytes());
    req[24..].copy_from_slice(&len.to_be_bytes());
    req
}

/// Sends option `code` with `data` and reads its replies up to the acknowledgement, handing
/// each other reply's type and payload to `each`; an error reply is [`NbdError::Refused`].
fn option(stream: &mut UnixStream, code: u32, data: &[u8], mut each: impl FnMut(u32, &[u8])) -> Result<(), NbdError> {
    let mut opt = Vec::with_capacity(16 + data.len());
    opt.extend_from_slice(IHAVEOPT);
    opt.extend_from_slice(&code.to_be_bytes());
    let data_len = u32::try_from(data.len())
        .map_err(|_| NbdError::Protocol(format!("an option of {} bytes is too long to send", data.len())))?;
    opt.extend_from_slice(&data_len.to_be_bytes());
    opt.extend_from_slice(data);
    stream.write_all(&opt)?;
    loop {
        let mut header = [0u8; 20];
        stream.read_exact(&mut header)?;
        let (option, kind, len) = parse_option_reply(&header)?;
        let mut payload = vec![0u8; len as usize];
        stream.read_exact(&mut payload)?;
        if option != code {
            return Err(NbdError::Protocol(format!("a reply to option {option}, not to option {code}")));
        }
        match kind {
            REP_ACK => return Ok(()),
            k if k & REP_ERROR_BIT != 0 => return Err(NbdError::Refused(String::from_utf8_lossy(&payload).into())),
            k => each(k, &payload),
        }
    }
}

impl Client {
    /// Connects to the server listening on `socket` and opens `export`.
    pub fn connect(socket: &Path, export: &str) -> Result<Client, NbdError> {
        let mut stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(NBD_TIMEOUT))?;
        stream.set_write_timeout(Some(NBD_TIMEOUT))?;
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting)?;
        parse_greeting(&greeting)?;
        stream.write_all(&u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
        // Structured replies when offered (holes then come as lengths); simple ones otherwise.
        let structured = match option(&mut stream, OPT_STRUCTURED_REPLY, &[], |_, _| ()) {
            Ok(()) => true,
            Err(NbdError::Refused(_)) => false,
            Err(e) => return Err(e),
        };
        let name = export.as_bytes();
        let mut go = Vec::with_capacity(6 + name.len());
        let name_len = u16::try_from(name.len())
            .map_err(|_| NbdError::Protocol(format!("export name of {} bytes is too long", name.len())))?;
        go.extend_from_slice(&u32::from(name_len).to_be_bytes());
        go.extend_from_slice(name);
        go.extend_from_slice(&0u16.to_be_bytes());
        let mut size = None;
        option(&mut stream, OPT_GO, &go, |kind, payload| {
            if kind == REP_INFO {
                size = size.or(parse_info_export(payload));
            }
        })?;
        let size = size.ok_or_else(|| NbdError::Protocol("no export size".into()))?;
        Ok(Client { stream, size, handle: 0, structured })
    }

    /// A handle on the connection whose `shutdown` makes a read blocked in another thread
    /// return at once (an interrupt, or a confined qemu that stopped answering).
    pub fn interrupter(&self) -> std::io::Result<UnixStream> {
        self.stream.try_clone()
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Fills `buf` from `offset` (at most [`MAX_READ`] bytes, within the export).
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<Filled, NbdError> {
        let mut pending = VecDeque::from([self.send_read(offset, buf.len(), AlignedBuf::new(buf.len()))?]);
        while !pending[0].done {
            self.receive(&mut pending)?;
        }
        let read = pending.pop_front().expect("one read");
        let filled = read.result()?;
        buf.copy_from_slice(read.buf.data());
        Ok(filled)
    }

    /// Sends a read of `len` bytes at `offset` (at most [`MAX_READ`], within the export), to be
    /// answered into `buf` (at least `len` bytes) by [`Self::receive`].
    fn send_read(&mut self, offset: u64, len: usize, mut buf: AlignedBuf) -> Result<PendingRead, NbdError> {
        if len > MAX_READ || len > buf.capacity() || offset.checked_add(len as u64).is_none_or(|end| end > self.size) {
            return Err(NbdError::Protocol(format!("a request for {len} bytes at {offset} was about to be sent")));
        }
        // At most MAX_READ, checked above.
        let len32 = u32::try_from(len).map_err(|_| NbdError::Protocol(format!("a read of {len} bytes")))?;
        self.handle += 1;
        self.stream.write_all(&request(CMD_READ, self.handle, offset, len32))?;
        buf.len = len;
        Ok(PendingRead {
            handle: self.handle,
            offset,
            len,
            buf,
            hole_bytes: 0,
            covered: std::collections::BTreeMap::new(),
            error: None,
            done: false,
        })
    }

    /// Reads one reply (or one chunk of a structured reply) and fills the read of `pending` it
    /// answers: the server may answer reads in any order, and interleave their chunks.
    fn receive(&mut self, pending: &mut VecDeque<PendingRead>) -> Result<(), NbdError> {
        let find = |pending: &mut VecDeque<PendingRead>, handle: u64| -> Result<usize, NbdError> {
            pending
                .iter()
                .position(|p| p.handle == handle && !p.done)
                .ok_or_else(|| NbdError::Protocol(format!("a reply to request {handle}, which is not waiting for one")))
        };
        if !self.structured {
            let mut header = [0u8; 16];
            self.stream.read_exact(&mut header)?;
            let (errno, handle) = parse_simple_reply(&header)?;
            let i = find(pending, handle)?;
            let read = &mut pending[i];
            read.done = true;
            if errno != 0 {
                read.error = Some(errno);
                return Ok(());
            }
            self.stream.read_exact(&mut read.buf.as_mut_full()[..read.len])?;
            read.covered.insert(0, read.len);
            return Ok(());
        }
        let mut header = [0u8; 20];
        self.stream.read_exact(&mut header)?;
        let (flags, kind, handle, chunk_len) = parse_chunk_header(&header)?;
        let i = find(pending, handle)?;
        let read = &mut pending[i];
        let (offset, len) = (read.offset, read.len);
        let mut fixed = [0u8; 12];
        match kind {
            CHUNK_OFFSET_DATA if chunk_len >= 8 => {
                self.stream.read_exact(&mut fixed[..8])?;
                let range = chunk_range(offset, len, u64_be(&fixed), u64::from(chunk_len - 8))?;
                read.cover(&range)?;
                self.stream.read_exact(&mut read.buf.as_mut_full()[range])?;
            }
            CHUNK_OFFSET_HOLE if chunk_len == 12 => {
                self.stream.read_exact(&mut fixed)?;
                let range = chunk_range(offset, len, u64_be(&fixed), u64::from(u32_be(&fixed[8..])))?;
                read.cover(&range)?;
                read.hole_bytes += range.len() as u64;
                read.buf.as_mut_full()[range].fill(0);
            }
            CHUNK_NONE if chunk_len == 0 => {}
            k if k & CHUNK_ERROR_BIT != 0 && chunk_len >= 6 => {
                let mut payload = vec![0u8; chunk_len as usize];
                self.stream.read_exact(&mut payload)?;
                read.error = Some(u32_be(&payload));
            }
            k => return Err(NbdError::Protocol(format!("a reply chunk of type {k} and {chunk_len} bytes"))),
        }
        read.done = flags & CHUNK_DONE != 0;
        Ok(())
    }
}

/// A read sent to the server and not yet handed on.
struct PendingRead {
    handle: u64,
    offset: u64,
    len: usize,
    /// Where its bytes go (its first `len` bytes).
    buf: AlignedBuf,
    hole_bytes: u64,
    /// The ranges of the buffer the reply filled (start → end), none overlapping another: a
    /// buffer is reused, so a byte no chunk filled would hold an earlier read's.
    covered: std::collections::BTreeMap<usize, usize>,
    error: Option<u32>,
    /// The whole reply arrived.
    done: bool,
}

impl PendingRead {
    /// Records that a chunk fills `range`; a protocol error if another chunk filled any of it
    /// (the hole count would be wrong, and a gap elsewhere could go unnoticed).
    fn cover(&mut self, range: &std::ops::Range<usize>) -> Result<(), NbdError> {
        if range.is_empty() {
            return Ok(());
        }
        let before = self.covered.range(..range.end).next_back().is_some_and(|(_, &end)| end > range.start);
        if before {
            return Err(NbdError::Protocol(format!(
                "reply chunks for the read of {} bytes at {} overlap at byte {} of it",
                self.len, self.offset, range.start
            )));
        }
        self.covered.insert(range.start, range.end);
        Ok(())
    }

    /// What the finished read found, or the server's error.
    fn result(&self) -> Result<Filled, NbdError> {
        if let Some(errno) = self.error {
            return Err(NbdError::Read { offset: self.offset, len: self.len, errno });
        }
        let filled: usize = self.covered.iter().map(|(start, end)| end - start).sum();
        if filled != self.len {
            return Err(NbdError::Protocol(format!(
                "the reply to the read of {} bytes at {} filled {filled} of them",
                self.len, self.offset
            )));
        }
        Ok(if self.hole_bytes == self.len as u64 { Filled::Hole } else { Filled::Data })
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.stream.write_all(&request(CMD_DISC, 0, 0, 0));
    }
}

/// Reads kept in flight by [`Reader`]: the confined qemu reads the image file for the next
/// ones while this side receives one (qemu serves up to 16 at once per connection).
pub const READS_IN_FLIGHT: usize = 4;

/// The export read front to back, [`MAX_READ`] bytes per request, [`READS_IN_FLIGHT`]
/// requests ahead, holes reported as such.
pub struct Reader {
    client: Client,
    /// Where the next request starts.
    pos: u64,
    /// Requests sent, oldest first.
    pending: VecDeque<PendingRead>,
    /// Buffers for the next requests.
    spare: Vec<AlignedBuf>,
}

impl Reader {
    /// Reads `client`'s export from the start.
    pub fn new(client: Client) -> Reader {
        Reader { client, pos: 0, pending: VecDeque::new(), spare: Vec::new() }
    }

    /// Keeps [`READS_IN_FLIGHT`] requests of `piece` bytes sent, then waits for the oldest.
    fn next_read(&mut self, piece: usize) -> Result<Option<PendingRead>, NbdError> {
        let piece = piece.clamp(ALIGN_BYTES, MAX_READ);
        while self.pending.len() < READS_IN_FLIGHT && self.pos < self.client.size() {
            let n = crate::stream::at_most(self.client.size() - self.pos, piece);
            let buf = match self.spare.pop() {
                Some(b) if b.capacity() >= n => b,
                _ => AlignedBuf::new(piece),
            };
            let read = self.client.send_read(self.pos, n, buf)?;
            self.pending.push_back(read);
            self.pos += n as u64;
        }
        if self.pending.is_empty() {
            return Ok(None);
        }
        while !self.pending[0].done {
            self.client.receive(&mut self.pending)?;
        }
        Ok(self.pending.pop_front())
    }
}

impl crate::stream::ChunkReader for Reader {
    fn next(&mut self, buf: &mut [u8]) -> std::io::Result<crate::stream::Piece> {
        use crate::stream::Piece;
        let Some(read) = self.next_read(buf.len()).map_err(std::io::Error::other)? else { return Ok(Piece::End) };
        let filled = read.result().map_err(std::io::Error::other);
        let n = read.len;
        if filled.as_ref().is_ok_and(|f| *f == Filled::Data) {
            buf[..n].copy_from_slice(read.buf.data());
        }
        self.spare.push(read.buf);
        Ok(match filled? {
            Filled::Data => Piece::Data(n),
            Filled::Hole => Piece::Hole(n as u64),
        })
    }

    /// Hands over the filled buffer itself (no copy) and keeps `buf` for a later request.
    fn next_into(&mut self, buf: &mut AlignedBuf) -> std::io::Result<crate::stream::Piece> {
        use crate::stream::Piece;
        let Some(mut read) = self.next_read(buf.capacity()).map_err(std::io::Error::other)? else {
            return Ok(Piece::End);
        };
        let filled = read.result().map_err(std::io::Error::other);
        let n = read.len;
        if filled.as_ref().is_ok_and(|f| *f == Filled::Data) {
            std::mem::swap(buf, &mut read.buf);
        }
        self.spare.push(read.buf);
        Ok(match filled? {
            Filled::Data => Piece::Data(n),
            Filled::Hole => Piece::Hole(n as u64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test server's reply to the handshake option `option`.
    fn reply_to(s: &mut UnixStream, option: u32, kind: u32, payload: &[u8]) {
        let mut r = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&option.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        r.extend_from_slice(payload);
        s.write_all(&r).unwrap();
    }

    /// A server that speaks just enough NBD for one export of `data`, in a thread.
    /// From a request at `hang_from` on, it answers nothing more (a hung qemu).
    fn serve(
        data: Vec<u8>,
        fail_at: Option<u64>,
        hang_from: Option<u64>,
        reversed: bool,
    ) -> (tempfile::TempDir, std::thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let listener = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"NBDMAGICIHAVEOPT\x00\x03").unwrap();
            let mut flags = [0u8; 4];
            s.read_exact(&mut flags).unwrap();
            // Structured replies refused (NBD_REP_ERR_UNSUP): the client falls back to simple ones.
            loop {
                let mut head = [0u8; 16];
                s.read_exact(&mut head).unwrap();
                let mut body = vec![0u8; u32_be(&head[12..]) as usize];
                s.read_exact(&mut body).unwrap();
                match u32_be(&head[8..]) {
                    OPT_GO => break,
                    other => reply_to(&mut s, other, REP_ERROR_BIT | 1, b""),
                }
            }
            let reply = |s: &mut UnixStream, kind: u32, payload: &[u8]| reply_to(s, OPT_GO, kind, payload);
            let mut info = INFO_EXPORT.to_be_bytes().to_vec();
            info.extend_from_slice(&(data.len() as u64).to_be_bytes());
            info.extend_from_slice(&1u16.to_be_bytes());
            reply(&mut s, REP_INFO, &info);
            reply(&mut s, REP_ACK, &[]);
            // With `reversed`, requests are taken two at a time and the second answered first.
            let mut held: Option<[u8; 28]> = None;
            loop {
                let mut req = [0u8; 28];
                if s.read_exact(&mut req).is_err() || u16_be(&req[6..]) == CMD_DISC {
                    return;
                }
                if reversed && held.is_none() && u64_be(&req[16..]) + (u32_be(&req[24..]) as u64) < data.len() as u64 {
                    held = Some(req);
                    continue;
                }
                for req in std::iter::once(req).chain(held.take()) {
                    let (handle, offset, len) = (u64_be(&req[8..]), u64_be(&req[16..]), u32_be(&req[24..]) as usize);
                    if hang_from.is_some_and(|h| offset >= h) {
                        while s.read(&mut [0u8; 64]).unwrap_or(0) > 0 {}
                        return;
                    }
                    let errno = u32::from(fail_at.is_some_and(|f| (offset..offset + len as u64).contains(&f))) * 5;
                    let mut r = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
                    r.extend_from_slice(&errno.to_be_bytes());
                    r.extend_from_slice(&handle.to_be_bytes());
                    if errno == 0 {
                        r.extend_from_slice(&data[offset as usize..offset as usize + len]);
                    }
                    s.write_all(&r).unwrap();
                }
            }
        });
        (dir, t)
    }

    #[test]
    fn reads_an_export_front_to_back() {
        for (len, reversed) in [(MAX_READ + 12345, false), (3 * MAX_READ + 4096, true)] {
            reads_front_to_back(len, reversed);
        }
    }

    /// Reads an export of `len` bytes through [`Reader`], the server answering each pair of
    /// requests in reverse order when `reversed`.
    fn reads_front_to_back(len: usize, reversed: bool) {
        let data: Vec<u8> = (0..len as u32).map(|i| ((i / 4096 + i) % 251) as u8).collect();
        let (dir, t) = serve(data.clone(), None, None, reversed);
        let client = Client::connect(&dir.path().join("s"), "src").unwrap();
        assert_eq!(client.size(), data.len() as u64);
        let mut got = Vec::new();
        let mut reader = Reader::new(client);
        let mut buf = vec![0u8; MAX_READ];
        let mut own = AlignedBuf::new(MAX_READ);
        // Copied out and handed over in turn: both ways keep the order.
        for piece in 0.. {
            use crate::stream::{ChunkReader, Piece};
            let (got_piece, filled) = if piece % 2 == 0 {
                (reader.next(&mut buf).unwrap(), &buf[..])
            } else {
                let p = reader.next_into(&mut own).unwrap();
                (p, &*own.as_mut_full())
            };
            match got_piece {
                Piece::Data(n) => got.extend_from_slice(&filled[..n]),
                Piece::Hole(n) => got.resize(got.len() + n as usize, 0),
                Piece::End => break,
            }
        }
        assert!(got == data, "the export read back differs (reversed: {reversed})");
        drop(reader);
        t.join().unwrap();
    }

    #[test]
    fn a_failed_read_names_the_offset() {
        let (dir, t) = serve(vec![1u8; 8192], Some(5000), None, false);
        let mut client = Client::connect(&dir.path().join("s"), "src").unwrap();
        let mut buf = [0u8; 4096];
        client.read_at(0, &mut buf).unwrap();
        let err = client.read_at(4096, &mut buf).unwrap_err();
        assert!(err.to_string().contains("offset 4096"), "{err}");
        assert!(client.read_at(8000, &mut buf).is_err(), "past the end is never requested");
        drop(client);
        t.join().unwrap();
    }

    /// A server that stops answering mid-export: the read is bounded by [`NBD_TIMEOUT`], and
    /// the interrupter ends it at once.
    #[test]
    fn a_hung_server_is_interrupted() {
        let (dir, t) = serve(vec![1u8; 8192], None, Some(4096), false);
        let mut client = Client::connect(&dir.path().join("s"), "src").unwrap();
        assert_eq!(client.stream.read_timeout().unwrap(), Some(NBD_TIMEOUT));
        let mut buf = [0u8; 4096];
        client.read_at(0, &mut buf).unwrap();
        let interrupter = client.interrupter().unwrap();
        let started = std::time::Instant::now();
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            interrupter.shutdown(std::net::Shutdown::Both).unwrap();
        });
        assert!(client.read_at(4096, &mut buf).is_err());
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
        stopper.join().unwrap();
        drop(client);
        t.join().unwrap();
    }

    /// The chunks (flags, type, payload) a test server answers a read (handle, offset, length)
    /// with.
    type Reply = fn(u64, u64, u32) -> Vec<(u16, u16, Vec<u8>)>;

    /// A server that offers structured replies and answers each read with the chunks `reply`
    /// makes.
    fn serve_structured(size: u64, reply: Reply) -> (tempfile::TempDir, std::thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let listener = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"NBDMAGICIHAVEOPT\x00\x03").unwrap();
            s.read_exact(&mut [0u8; 4]).unwrap();
            loop {
                let mut head = [0u8; 16];
                s.read_exact(&mut head).unwrap();
                s.read_exact(&mut vec![0u8; u32_be(&head[12..]) as usize]).unwrap();
                match u32_be(&head[8..]) {
                    OPT_GO => break,
                    other => reply_to(&mut s, other, REP_ACK, b""),
                }
            }
            let mut info = INFO_EXPORT.to_be_bytes().to_vec();
            info.extend_from_slice(&size.to_be_bytes());
            info.extend_from_slice(&1u16.to_be_bytes());
            reply_to(&mut s, OPT_GO, REP_INFO, &info);
            reply_to(&mut s, OPT_GO, REP_ACK, &[]);
            loop {
                let mut req = [0u8; 28];
                if s.read_exact(&mut req).is_err() || u16_be(&req[6..]) == CMD_DISC {
                    return;
                }
                let handle = u64_be(&req[8..]);
                for (flags, kind, payload) in reply(handle, u64_be(&req[16..]), u32_be(&req[24..])) {
                    let mut c = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
                    c.extend_from_slice(&flags.to_be_bytes());
                    c.extend_from_slice(&kind.to_be_bytes());
                    c.extend_from_slice(&handle.to_be_bytes());
                    c.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                    c.extend_from_slice(&payload);
                    s.write_all(&c).unwrap();
                }
            }
        });
        (dir, t)
    }

    fn hole(at: u64, len: u32) -> Vec<u8> {
        [&at.to_be_bytes()[..], &len.to_be_bytes()].concat()
    }

    fn data(at: u64, bytes: &[u8]) -> Vec<u8> {
        [&at.to_be_bytes()[..], bytes].concat()
    }

    /// A structured reply must fill each byte of the read once: a reply that leaves bytes
    /// unfilled (a reused buffer would hand on an earlier read's) or fills some twice (its
    /// hole count then passes data for a hole) is a protocol error; a reply in data and hole
    /// chunks, out of order, is read as its bytes.
    #[test]
    fn structured_replies_must_fill_the_read_exactly_once() {
        let cases: [(&str, Reply, bool); 4] = [
            ("nothing", |_, _, _| vec![(CHUNK_DONE, CHUNK_NONE, vec![])], false),
            ("half", |_, at, _| vec![(CHUNK_DONE, CHUNK_OFFSET_DATA, data(at, &[9; 4096]))], false),
            (
                "one hole twice",
                |_, at, _| {
                    vec![(0, CHUNK_OFFSET_HOLE, hole(at, 4096)), (CHUNK_DONE, CHUNK_OFFSET_HOLE, hole(at, 4096))]
                },
                false,
            ),
            (
                "data after a hole, out of order",
                |_, at, _| {
                    vec![
                        (0, CHUNK_OFFSET_DATA, data(at + 4096, &[9; 4096])),
                        (CHUNK_DONE, CHUNK_OFFSET_HOLE, hole(at, 4096)),
                    ]
                },
                true,
            ),
        ];
        for (name, reply, sound) in cases {
            let (dir, t) = serve_structured(1 << 20, reply);
            let mut client = Client::connect(&dir.path().join("s"), "src").unwrap();
            let mut buf = vec![0xeeu8; 8192];
            let got = client.read_at(4096, &mut buf);
            if sound {
                assert_eq!(got.unwrap(), Filled::Data, "{name}");
                assert!(buf[..4096].iter().all(|b| *b == 0) && buf[4096..].iter().all(|b| *b == 9), "{name}");
            } else {
                assert!(matches!(got, Err(NbdError::Protocol(_))), "{name}: {got:?}");
            }
            drop(client);
            t.join().unwrap();
        }
    }

    #[test]
    fn chunks_stay_inside_the_request() {
        assert_eq!(chunk_range(1000, 100, 1000, 100).unwrap(), 0..100);
        assert_eq!(chunk_range(1000, 100, 1050, 50).unwrap(), 50..100);
        assert!(chunk_range(1000, 100, 999, 10).is_err());
        assert!(chunk_range(1000, 100, 1050, 51).is_err());
        assert!(chunk_range(1000, 100, u64::MAX, 1).is_err());
        let mut h = [0u8; 20];
        h[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&CHUNK_DONE.to_be_bytes());
        h[6..8].copy_from_slice(&CHUNK_OFFSET_HOLE.to_be_bytes());
        h[8..16].copy_from_slice(&7u64.to_be_bytes());
        h[16..20].copy_from_slice(&12u32.to_be_bytes());
        assert_eq!(parse_chunk_header(&h).unwrap(), (CHUNK_DONE, CHUNK_OFFSET_HOLE, 7, 12));
        h[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_chunk_header(&h).is_err());
    }

    proptest::proptest! {
        /// Whatever the bytes: accepted lengths are within the limits, a chunk's range lies in
        /// its request and is as long as the chunk, a greeting carries its magic.
        #[test]
        fn parsers_keep_their_bounds(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let mut g = [0u8; 18];
            let mut o = [0u8; 20];
            let mut r = [0u8; 16];
            for (dst, src) in [(&mut g[..], &bytes), (&mut o[..], &bytes), (&mut r[..], &bytes)] {
                let n = dst.len().min(src.len());
                dst[..n].copy_from_slice(&src[..n]);
            }
            if parse_greeting(&g).is_ok() {
                proptest::prop_assert!(&g[..8] == NBDMAGIC && &g[8..16] == IHAVEOPT);
            }
            if let Ok((_, _, len)) = parse_option_reply(&o) {
                proptest::prop_assert!(len <= MAX_OPTION_REPLY);
            }
            let _ = parse_simple_reply(&r);
            if let Ok((_, _, _, len)) = parse_chunk_header(&o) {
                proptest::prop_assert!(len as usize <= MAX_READ + 8);
            }
            if bytes.len() >= 16 {
                let chunk_len = u64::from(bytes[0]) << 8;
                if let Ok(range) = chunk_range(u64_be(&bytes), 4096, u64_be(&bytes[8..]), chunk_len) {
                    proptest::prop_assert!(range.start <= range.end && range.end <= 4096);
                    proptest::prop_assert_eq!((range.end - range.start) as u64, chunk_len);
                }
            }
            if parse_info_export(&bytes).is_some() {
                proptest::prop_assert!(bytes.len() >= 12);
            }
        }
    }
}
