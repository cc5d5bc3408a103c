//! The QMP client: qemu's monitor spoken as plain JSON lines, with a descriptor attached by
//! SCM_RIGHTS where `getfd` wants one. It stops the helper VM gracefully ([`quit`]) and drives
//! the block-layer qemu ([`super::blockdev_qemu`]).
//!
//! Plain JSON rather than the `qapi` crate (0.15): its `Qmp::execute` serializes a command
//! straight into its `Write` stream, with no way to attach a descriptor; it cannot block for an
//! event (events are only queued while a reply is read, and `nop()` polls with
//! `query-version`); its `Event` enum, generated from qemu 9.1's schema, has no fallback, so an
//! event that schema lacks fails the exchange it arrives in; and its handshake panics
//! (`expect`) when qemu closes the socket before the greeting.

use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thiserror::Error;

/// How long each exchange may take while stopping the helper VM.
const QUIT_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest line read: the largest reply asked for (the named block nodes) is a few KiB.
const MAX_LINE_BYTES: usize = 1 << 20;
/// Events kept while a reply is awaited; beyond this the oldest go (none asked for is that late).
const MAX_QUEUED_EVENTS: usize = 1024;

/// Why a QMP exchange failed.
#[derive(Debug, Error)]
pub enum QmpError {
    /// Nothing accepted the connection (qemu is gone, or never listened).
    #[error("cannot connect to QMP at {path}: {source}")]
    Connect {
        /// The monitor socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("QMP at {path} failed while {doing}: {source}")]
    Io {
        /// The monitor socket.
        path: PathBuf,
        /// What the client was doing.
        doing: String,
        /// Why.
        source: std::io::Error,
    },
    /// qemu closed the connection.
    #[error("qemu closed its QMP connection at {path} while imgforge waited for {awaiting}")]
    Closed {
        /// The monitor socket.
        path: PathBuf,
        /// What the client waited for.
        awaiting: String,
    },
    /// A line was not JSON.
    #[error("QMP at {path} sent invalid JSON while imgforge waited for {awaiting}: {source}")]
    InvalidJson {
        /// The monitor socket.
        path: PathBuf,
        /// What the client waited for.
        awaiting: String,
        /// The parser's complaint.
        source: serde_json::Error,
    },
    /// qemu stayed silent too long.
    #[error("qemu did not send {awaiting} on QMP at {path} within {timeout:?}")]
    Timeout {
        /// The monitor socket.
        path: PathBuf,
        /// What the client waited for.
        awaiting: String,
        /// How long it waited.
        timeout: Duration,
    },
    /// A line longer than any reply imgforge asks for (a qemu confused by the image).
    #[error("qemu sent a line of over {limit} bytes on QMP at {path} while imgforge waited for {awaiting}")]
    TooLong {
        /// The monitor socket.
        path: PathBuf,
        /// What the client waited for.
        awaiting: String,
        /// The limit.
        limit: usize,
    },
    /// qemu answered a command with an error.
    #[error("qemu refused {command}: {desc}")]
    Refused {
        /// The command.
        command: String,
        /// qemu's error class (`GenericError`, `DeviceNotFound`, ...).
        class: String,
        /// qemu's description.
        desc: String,
    },
}

/// Something qemu announced on its own (`BLOCK_JOB_READY`, `JOB_STATUS_CHANGE`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event's name.
    pub name: String,
    /// Its `data` (null when it has none).
    pub data: Value,
}

/// One line from qemu, classified.
#[derive(Debug, Clone, PartialEq)]
enum Message {
    /// A command's `return` value. The greeting, and anything else that is neither an event nor
    /// an error, reads as one whose value is null.
    Return(Value),
    /// A command's `error`.
    Error {
        /// Its `class`.
        class: String,
        /// Its `desc`.
        desc: String,
    },
    /// An event.
    Event(Event),
}

impl Message {
    /// Classifies one line (pure).
    fn parse(line: &[u8]) -> Result<Message, serde_json::Error> {
        let mut value: Value = serde_json::from_slice(line)?;
        let mut take = |key: &str| value.get_mut(key).map(Value::take);
        if let Some(name) = take("event") {
            let name = name.as_str().unwrap_or_default().to_owned();
            return Ok(Message::Event(Event { name, data: take("data").unwrap_or_default() }));
        }
        if let Some(error) = take("error") {
            let field = |key: &str, default: &str| error[key].as_str().unwrap_or(default).to_owned();
            return Ok(Message::Error { class: field("class", "GenericError"), desc: field("desc", "QMP error") });
        }
        Ok(Message::Return(take("return").unwrap_or_default()))
    }
}

/// The line that runs `command` (pure).
fn command_line(command: &str, arguments: Option<Value>) -> Vec<u8> {
    let message = match arguments {
        Some(arguments) => json!({"execute": command, "arguments": arguments}),
        None => json!({"execute": command}),
    };
    let mut line = message.to_string().into_bytes();
    line.push(b'\n');
    line
}

/// A connection to one qemu's monitor, past the handshake. Events that arrive while a command
/// waits for its reply are kept for [`Qmp::wait_for_event`].
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<Event>,
    reply_timeout: Duration,
}

impl Qmp {
    /// Connects to the monitor at `path` and negotiates capabilities; qemu must answer each
    /// command within `reply_timeout`.
    pub fn connect(path: &Path, reply_timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect { path: path.to_owned(), source })?;
        Qmp::handshake(stream, path, reply_timeout)
    }

    /// Reads the greeting and leaves capabilities negotiation mode on a connected `stream`.
    fn handshake(stream: UnixStream, path: &Path, reply_timeout: Duration) -> Result<Qmp, QmpError> {
        let io = |source| QmpError::Io { path: path.to_owned(), doing: "setting up the connection".into(), source };
        stream.set_write_timeout(Some(reply_timeout)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut qmp = Qmp {
            path: path.to_owned(),
            reader: BufReader::new(stream),
            writer,
            events: VecDeque::new(),
            reply_timeout,
        };
        qmp.receive(Instant::now(), reply_timeout, "the greeting")?;
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs `command`; its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let line = command_line(command, arguments);
        self.writer.write_all(&line).map_err(|source| self.io_error(format!("sending {command}"), source))?;
        self.reply(command)
    }

    /// Runs `command` with `fd` attached (SCM_RIGHTS), as `getfd` wants.
    pub fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        let line = command_line(command, arguments);
        send_with_fd(&self.writer, &line, fd.as_raw_fd())
            .map_err(|source| self.io_error(format!("sending {command} with a descriptor"), source))?;
        self.reply(command)
    }

    /// The first event named one of `names`, kept or newly arrived within `timeout`; other events
    /// on the way are dropped.
    pub fn wait_for_event(&mut self, names: &[&str], timeout: Duration) -> Result<Event, QmpError> {
        while let Some(event) = self.events.pop_front() {
            if names.contains(&event.name.as_str()) {
                return Ok(event);
            }
        }
        let started = Instant::now();
        let awaiting = format!("event {}", names.join(" or "));
        loop {
            // A reply here answers nothing this client sent: skipped like an unwanted event.
            if let Message::Event(event) = self.receive(started, timeout, &awaiting)? {
                if names.contains(&event.name.as_str()) {
                    return Ok(event);
                }
            }
        }
    }

    /// Asks qemu to quit; qemu closing the connection before it answers counts as success.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None) {
            Ok(_) | Err(QmpError::Closed { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Reads until `command`'s reply, keeping the events that come first.
    fn reply(&mut self, command: &str) -> Result<Value, QmpError> {
        let started = Instant::now();
        let awaiting = format!("the reply to {command}");
        loop {
            match self.receive(started, self.reply_timeout, &awaiting)? {
                Message::Event(event) => {
                    if self.events.len() == MAX_QUEUED_EVENTS {
                        self.events.pop_front();
                    }
                    self.events.push_back(event);
                }
                Message::Error { class, desc } => {
                    return Err(QmpError::Refused { command: command.into(), class, desc })
                }
                Message::Return(value) => return Ok(value),
            }
        }
    }

    /// The next message, if it arrives within `timeout` of `started`.
    fn receive(&mut self, started: Instant, timeout: Duration, awaiting: &str) -> Result<Message, QmpError> {
        let timed_out = || QmpError::Timeout { path: self.path.clone(), awaiting: awaiting.into(), timeout };
        let doing = || format!("waiting for {awaiting}");
        let mut line = Vec::new();
        // The deadline holds for the whole line: a peer that trickles bytes cannot stretch it.
        loop {
            let remaining = timeout.saturating_sub(started.elapsed());
            if remaining.is_zero() {
                return Err(timed_out());
            }
            self.reader.get_ref().set_read_timeout(Some(remaining)).map_err(|e| self.io_error(doing(), e))?;
            let (taken, complete) = match self.reader.fill_buf() {
                Ok([]) => return Err(QmpError::Closed { path: self.path.clone(), awaiting: awaiting.into() }),
                Ok(buf) => {
                    let (taken, complete) =
                        buf.iter().position(|b| *b == b'\n').map_or((buf.len(), false), |i| (i + 1, true));
                    line.extend_from_slice(&buf[..taken]);
                    (taken, complete)
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return Err(timed_out()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io_error(doing(), e)),
            };
            self.reader.consume(taken);
            if line.len() > MAX_LINE_BYTES {
                return Err(QmpError::TooLong {
                    path: self.path.clone(),
                    awaiting: awaiting.into(),
                    limit: MAX_LINE_BYTES,
                });
            }
            if complete {
                return Message::parse(&line).map_err(|source| QmpError::InvalidJson {
                    path: self.path.clone(),
                    awaiting: awaiting.into(),
                    source,
                });
            }
        }
    }

    fn io_error(&self, doing: String, source: std::io::Error) -> QmpError {
        QmpError::Io { path: self.path.clone(), doing, source }
    }
}

/// Connects to the monitor at `socket` and asks qemu to quit. Blocking; a closed connection
/// after the command counts as success.
pub fn quit(socket: &Path) -> Result<(), QmpError> {
    Qmp::connect(socket, QUIT_TIMEOUT)?.quit()
}

/// Writes `bytes` to `socket` with `fd` attached to the first of them.
fn send_with_fd(mut socket: &UnixStream, bytes: &[u8], fd: RawFd) -> std::io::Result<()> {
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
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
        libc::sendmsg(socket.as_raw_fd(), &msg, 0)
    };
    let sent = usize::try_from(sent).map_err(|_| std::io::Error::last_os_error())?;
    // The descriptor went with the first byte; the rest of a short write is plain data.
    socket.write_all(&bytes[sent..])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};
    use std::thread::JoinHandle;

    const GREETING: &str =
        r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}"#;
    pub(crate) const EMPTY_RETURN: &str = r#"{"return": {}}"#;
    const TEST_SOCKET: &str = "/run/test/qmp.sock";
    const TEST_TIMEOUT: Duration = Duration::from_secs(5);

    fn event(name: &str, data: Value) -> Message {
        Message::Event(Event { name: name.into(), data })
    }

    #[test]
    fn messages_are_classified() {
        let error = |class: &str, desc: &str| Message::Error { class: class.into(), desc: desc.into() };
        let cases: &[(&[u8], Message)] = &[
            (br#"{"return": {}}"#, Message::Return(json!({}))),
            (b"{\"return\": [{\"node-name\": \"src\"}]}\n", Message::Return(json!([{"node-name": "src"}]))),
            (br#"{"return": {}, "id": 7}"#, Message::Return(json!({}))),
            (GREETING.as_bytes(), Message::Return(Value::Null)),
            (b"42", Message::Return(Value::Null)),
            (
                br#"{"error": {"class": "GenericError", "desc": "Parameter 'fdname' is missing"}}"#,
                error("GenericError", "Parameter 'fdname' is missing"),
            ),
            (br#"{"error": {"class": "DeviceNotFound", "desc": "no node"}}"#, error("DeviceNotFound", "no node")),
            (br#"{"error": {}}"#, error("GenericError", "QMP error")),
            (
                br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "BLOCK_JOB_READY", "data": {"device": "commit", "len": 65536}}"#,
                event("BLOCK_JOB_READY", json!({"device": "commit", "len": 65536})),
            ),
            (br#"{"event": "RESUME"}"#, event("RESUME", Value::Null)),
            // An event and an error at once is an event: qemu's replies never carry "event".
            (br#"{"event": "STOP", "error": {"desc": "x"}}"#, event("STOP", Value::Null)),
        ];
        for (line, want) in cases {
            let got = Message::parse(line).unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(line)));
            assert_eq!(&got, want, "{}", String::from_utf8_lossy(line));
        }
        for bad in [&b""[..], b"{\"return\"", b"not json", b"\xff\n", b"{\"return\": {}} {}"] {
            assert!(Message::parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn command_lines() {
        let cases: &[(&str, Option<Value>, &str)] = &[
            ("quit", None, "{\"execute\":\"quit\"}\n"),
            ("getfd", Some(json!({"fdname": "nbd"})), "{\"arguments\":{\"fdname\":\"nbd\"},\"execute\":\"getfd\"}\n"),
        ];
        for (command, arguments, want) in cases {
            assert_eq!(String::from_utf8(command_line(command, arguments.clone())).unwrap(), *want);
        }
    }

    /// One command the fake qemu expects, and the lines it answers with (`None`: it hangs up).
    pub(crate) struct Step {
        execute: &'static str,
        answer: Option<Vec<&'static str>>,
    }

    pub(crate) fn step(execute: &'static str, answer: &[&'static str]) -> Step {
        Step { execute, answer: Some(answer.to_vec()) }
    }

    /// A command the fake qemu got, with the descriptors that came with it.
    pub(crate) struct Received {
        pub(crate) command: Value,
        fds: Vec<OwnedFd>,
    }

    /// The fake qemu's thread; it yields what it received.
    pub(crate) type FakeQemu = JoinHandle<Vec<Received>>;

    /// A fake qemu on the far end of a socket pair: greets, then follows `script`. Returns the
    /// client's end and the server thread.
    fn fake_qemu(script: Vec<Step>) -> (UnixStream, FakeQemu) {
        let (client, mut server) = UnixStream::pair().unwrap();
        let thread = std::thread::spawn(move || {
            server.write_all(format!("{GREETING}\n").as_bytes()).unwrap();
            let mut received = Vec::new();
            for Step { execute, answer } in script {
                let (line, fds) = receive_line(&server);
                let command: Value = serde_json::from_slice(&line).unwrap();
                assert_eq!(command["execute"], execute, "{command}");
                received.push(Received { command, fds });
                let Some(answer) = answer else { break };
                for reply in answer {
                    server.write_all(format!("{reply}\n").as_bytes()).unwrap();
                }
            }
            received
        });
        (client, thread)
    }

    /// One line from `socket` by recvmsg, with any descriptors that came with it.
    fn receive_line(socket: &UnixStream) -> (Vec<u8>, Vec<OwnedFd>) {
        let (mut line, mut fds) = (Vec::new(), Vec::new());
        while !line.ends_with(b"\n") {
            let mut buf = [0u8; 4096];
            let mut control = [0u8; 64];
            let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() };
            // SAFETY: every pointer in msg is valid for the call; the kernel writes within the
            // lengths given, and the descriptors it reports are new and ours to own.
            unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = &mut iov;
                msg.msg_iovlen = 1;
                msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
                msg.msg_controllen = control.len();
                let n = libc::recvmsg(socket.as_raw_fd(), &mut msg, 0);
                assert!(n > 0, "the client hung up mid-line");
                line.extend_from_slice(&buf[..n as usize]);
                let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
                while !cmsg.is_null() {
                    if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const RawFd);
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                    cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
                }
            }
        }
        (line, fds)
    }

    /// A client past the handshake with a fake qemu that then follows `script`.
    pub(crate) fn connected(mut script: Vec<Step>) -> (Qmp, FakeQemu) {
        script.insert(0, step("qmp_capabilities", &[EMPTY_RETURN]));
        let (client, server) = fake_qemu(script);
        (Qmp::handshake(client, Path::new(TEST_SOCKET), TEST_TIMEOUT).unwrap(), server)
    }

    #[test]
    fn events_before_a_reply_are_kept_for_later() {
        let (mut qmp, server) = connected(vec![
            step(
                "block-commit",
                &[
                    r#"{"event": "JOB_STATUS_CHANGE", "data": {"id": "commit", "status": "created"}}"#,
                    r#"{"event": "BLOCK_JOB_READY", "data": {"device": "commit"}}"#,
                    EMPTY_RETURN,
                ],
            ),
            step("job-complete", &[EMPTY_RETURN, r#"{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "commit"}}"#]),
        ]);
        let arguments = json!({"job-id": "commit", "device": "overlay"});
        assert_eq!(qmp.execute("block-commit", Some(arguments.clone())).unwrap(), json!({}));
        let ready = qmp.wait_for_event(&["BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED"], TEST_TIMEOUT).unwrap();
        assert_eq!(ready, Event { name: "BLOCK_JOB_READY".into(), data: json!({"device": "commit"}) });
        qmp.execute("job-complete", Some(json!({"id": "commit"}))).unwrap();
        let completed = qmp.wait_for_event(&["BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED"], TEST_TIMEOUT).unwrap();
        assert_eq!(completed.name, "BLOCK_JOB_COMPLETED");
        let received = server.join().unwrap();
        assert_eq!(received[1].command, json!({"execute": "block-commit", "arguments": arguments}));
    }

    #[test]
    fn an_error_reply_names_the_command() {
        let (mut qmp, server) = connected(vec![step(
            "block-export-add",
            &[r#"{"error": {"class": "GenericError", "desc": "no node 'src'"}}"#],
        )]);
        let err = qmp.execute("block-export-add", Some(json!({"node-name": "src"}))).unwrap_err();
        assert!(matches!(&err, QmpError::Refused { class, .. } if class == "GenericError"), "{err:?}");
        assert_eq!(err.to_string(), "qemu refused block-export-add: no node 'src'");
        server.join().unwrap();
    }

    #[test]
    fn a_descriptor_goes_with_its_command() {
        let (mut qmp, server) = connected(vec![step("getfd", &[EMPTY_RETURN])]);
        let (mut pipe_r, pipe_w) = std::io::pipe().unwrap();
        qmp.execute_with_fd("getfd", Some(json!({"fdname": "nbd"})), pipe_w.as_fd()).unwrap();
        drop(pipe_w);
        let Received { command, fds } = server.join().unwrap().pop().unwrap();
        assert_eq!(command, json!({"execute": "getfd", "arguments": {"fdname": "nbd"}}));
        let [fd]: [OwnedFd; 1] = fds.try_into().expect("one descriptor");
        std::fs::File::from(fd).write_all(b"through the descriptor").unwrap();
        let mut got = String::new();
        pipe_r.read_to_string(&mut got).unwrap();
        assert_eq!(got, "through the descriptor");
    }

    #[test]
    fn a_hang_up_ends_quit_well_and_anything_else_badly() {
        let (mut qmp, server) = connected(vec![Step { execute: "quit", answer: None }]);
        qmp.quit().unwrap();
        server.join().unwrap();

        let (mut qmp, server) = connected(vec![Step { execute: "query-named-block-nodes", answer: None }]);
        let err = qmp.execute("query-named-block-nodes", None).unwrap_err();
        assert!(matches!(err, QmpError::Closed { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("qemu closed its QMP connection at {TEST_SOCKET} while imgforge waited for the reply to query-named-block-nodes")
        );
        server.join().unwrap();
    }

    #[test]
    fn silence_times_out_naming_what_was_awaited() {
        let (client, _server) = UnixStream::pair().unwrap();
        let err = match Qmp::handshake(client, Path::new(TEST_SOCKET), Duration::from_millis(50)) {
            Err(e) => e,
            Ok(_) => panic!("a silent peer passed the handshake"),
        };
        assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");
        assert_eq!(err.to_string(), format!("qemu did not send the greeting on QMP at {TEST_SOCKET} within 50ms"));
    }

    #[test]
    fn garbage_is_invalid_json() {
        let (client, mut server) = UnixStream::pair().unwrap();
        server.write_all(b"Welcome\n").unwrap();
        let err = match Qmp::handshake(client, Path::new(TEST_SOCKET), TEST_TIMEOUT) {
            Err(e) => e,
            Ok(_) => panic!("garbage passed the handshake"),
        };
        assert!(matches!(err, QmpError::InvalidJson { .. }), "{err:?}");
        assert!(err.to_string().starts_with(&format!("QMP at {TEST_SOCKET} sent invalid JSON")), "{err}");
    }

    #[test]
    fn connecting_to_nothing_names_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let err = quit(&path).unwrap_err();
        assert!(err.to_string().starts_with(&format!("cannot connect to QMP at {}: ", path.display())), "{err}");
    }

    #[test]
    fn a_confused_qemu_cannot_exhaust_memory_or_time() {
        // One line longer than any reply.
        let long: &'static str = Box::leak(format!(r#"{{"return": "{}"}}"#, "x".repeat(2 << 20)).into_boxed_str());
        let (mut qmp, server) = connected(vec![step("query-status", &[long])]);
        let err = qmp.execute("query-status", None).unwrap_err();
        assert!(matches!(err, QmpError::TooLong { limit: MAX_LINE_BYTES, .. }), "{err:?}");
        drop(qmp);
        let _ = server.join();

        // A flood of events before the reply: only the latest are kept.
        let flood: Vec<&'static str> = (0..5000)
            .map(|i| &*Box::leak(format!(r#"{{"event": "E{i}"}}"#).into_boxed_str()))
            .chain([EMPTY_RETURN])
            .collect();
        let (mut qmp, server) = connected(vec![step("query-status", &flood)]);
        qmp.execute("query-status", None).unwrap();
        assert_eq!(qmp.events.len(), MAX_QUEUED_EVENTS);
        assert_eq!(qmp.events.back().map(|e| e.name.as_str()), Some("E4999"));
        server.join().unwrap();
    }

    #[test]
    fn a_trickling_qemu_cannot_stretch_the_deadline() {
        let (client, mut server) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            server.write_all(format!("{GREETING}\n").as_bytes()).unwrap();
            receive_line(&server);
            server.write_all(format!("{EMPTY_RETURN}\n").as_bytes()).unwrap();
            receive_line(&server);
            // A byte every 20 ms, never a newline: each read succeeds, the line never ends.
            for _ in 0..100 {
                if server.write_all(b" ").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let timeout = Duration::from_millis(300);
        let mut qmp = Qmp::handshake(client, Path::new(TEST_SOCKET), timeout).unwrap();
        let started = Instant::now();
        let err = qmp.execute("query-status", None).unwrap_err();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < timeout * 3, "waited {:?}", started.elapsed());
        drop(qmp);
        let _ = peer.join();
    }
}
