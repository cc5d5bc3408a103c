//! http(s) sources: one GET with connect and idle timeouts, credentials moved from the URL into
//! an `Authorization` header, cancellation that unblocks a read on a silent server, a body
//! bounded by what the target can hold, and [`redact`], the one way a URL is shown.

use super::reach::{PublicOnlyResolver, Reach};
use super::{declared_cluster_bytes, declared_virtual_size, squashfs_bytes_used, Format, SourceError};
use std::io::{BufReader, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Default time allowed to establish a connection (TCP and TLS).
pub const CONNECT_TIMEOUT_SECS: u64 = 30;
/// Default time a server may stay silent (headers or body) before the download fails.
pub const IDLE_TIMEOUT_SECS: u64 = 60;
/// What a download may exceed its target's size by: container metadata (qcow2 tables, gzip
/// framing, squashfs padding) never comes near it.
const DOWNLOAD_SLACK_BYTES: u64 = 16 << 20;
/// How often a request still connecting looks at the cancel flag: bounds how long a signal
/// waits for a server that does not answer.
const CANCEL_POLL: Duration = Duration::from_millis(100);
/// What replaces a credential in a shown URL.
const HIDDEN: &str = "***";

/// How long a download may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpTimeouts {
    /// To connect (TCP and TLS handshake).
    pub connect: Duration,
    /// Between two reads that deliver bytes (headers and body).
    pub idle: Duration,
}

impl Default for HttpTimeouts {
    fn default() -> Self {
        Self { connect: Duration::from_secs(CONNECT_TIMEOUT_SECS), idle: Duration::from_secs(IDLE_TIMEOUT_SECS) }
    }
}

/// `url` safe to show: user information and every query value replaced by `***` (presigned
/// and SAS URLs carry their tokens in the query). Pure.
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else { return url.to_owned() };
    let (head, rest) = url.split_at(scheme_end);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rfind('@') {
        Some(at) => format!("{HIDDEN}{}", &authority[at..]),
        None => authority.to_owned(),
    };
    let (path_query, fragment) = match tail.find('#') {
        Some(i) => tail.split_at(i),
        None => (tail, ""),
    };
    let shown_tail = match path_query.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((key, _)) => format!("{key}={HIDDEN}"),
                    None if p.is_empty() => String::new(),
                    None => HIDDEN.to_owned(),
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => path_query.to_owned(),
    };
    format!("{head}{authority}{shown_tail}{}", if fragment.is_empty() { "" } else { "#***" })
}

/// `text` (a message from the HTTP client) with whatever it quotes of `url`'s secrets hidden.
fn scrub(text: &str, url: &str) -> String {
    let mut out = text.replace(url, &redact(url));
    let (userinfo, query) = secrets(url);
    for secret in [userinfo, query].into_iter().flatten().filter(|s| !s.is_empty()) {
        out = out.replace(secret, HIDDEN);
    }
    out
}

/// The user information and the query of `url`, if any.
fn secrets(url: &str) -> (Option<&str>, Option<&str>) {
    let rest = url.find("://").map_or(url, |i| &url[i + 3..]);
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let userinfo = authority.rfind('@').map(|at| &authority[..at]);
    let query = url.split_once('?').map(|(_, q)| q.split('#').next().unwrap_or(q));
    (userinfo, query)
}

/// `url` without its user information, and that information percent-decoded (`user:pass`).
fn split_credentials(url: &str) -> (String, Option<String>) {
    let (Some(scheme_end), (Some(userinfo), _)) = (url.find("://").map(|i| i + 3), secrets(url)) else {
        return (url.to_owned(), None);
    };
    let without = format!("{}{}", &url[..scheme_end], &url[scheme_end + userinfo.len() + 1..]);
    (without, Some(percent_decode(userinfo)))
}

/// Decodes `%XX` escapes (user information may escape `:` and `@`); anything else stays.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One download's HTTP client; [`Client::cancellable`] lets a signal interrupt it.
pub struct Client {
    agent: ureq::Agent,
    /// What a [`Reach::PublicOnly`] resolver refused, reported instead of ureq's wording.
    refused: Option<Arc<std::sync::Mutex<Option<String>>>>,
}

/// An HTTP body with its announced length.
pub struct Download {
    /// The body, buffered so its first bytes can be inspected.
    pub body: BufReader<Box<dyn Read + Send>>,
    /// Content-Length, if the server sent one.
    pub length: Option<u64>,
}

impl Client {
    /// A client with these timeouts, connecting to the addresses `reach` allows.
    pub fn new(timeouts: HttpTimeouts, reach: Reach) -> Self {
        let config =
            ureq::Agent::config_builder().timeout_connect(Some(timeouts.connect)).timeout_per_read(Some(timeouts.idle));
        Self::build(config, reach)
    }

    /// As [`Client::new`], with `total` the most a whole request may take, headers and body
    /// (for small files: the idle timeout alone lets a server that sends a byte a minute hold
    /// the fetch for days).
    pub fn with_total(timeouts: HttpTimeouts, total: Duration, reach: Reach) -> Self {
        let config = ureq::Agent::config_builder()
            .timeout_connect(Some(timeouts.connect))
            .timeout_per_read(Some(timeouts.idle))
            .timeout_global(Some(total));
        Self::build(config, reach)
    }

    fn build(config: ureq::config::ConfigBuilder<ureq::typestate::AgentScope>, reach: Reach) -> Self {
        match reach {
            Reach::Any => Self { agent: config.build().new_agent(), refused: None },
            Reach::PublicOnly { param } => {
                let resolver = PublicOnlyResolver::new(param);
                let refused = resolver.refused.clone();
                // A proxy (http_proxy, from the environment) would resolve and reach the
                // target for us, where the resolver cannot check it.
                let config = config.proxy(None).build();
                let connector = ureq::unversioned::transport::DefaultConnector::default();
                Self { agent: ureq::Agent::with_parts(config, connector, resolver), refused: Some(refused) }
            }
        }
    }

    /// The refusal of an address, if the resolver made one.
    fn refusal(&self) -> Option<String> {
        self.refused.as_ref()?.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Starts downloading `url` (credentials in it are sent as HTTP basic authentication); a
    /// raised `cancel` ends the wait for the connection and the response headers.
    pub fn get(&self, url: &str, cancel: &AtomicBool) -> Result<Download, SourceError> {
        let missing = |status: u16| SourceError::Http { url: redact(url), reason: format!("http status: {status}") };
        self.request(url, cancel)?.map_err(missing)
    }

    /// As [`Client::get`], but a 404 or 410 answer is `Ok(Err(status))`: for files that may
    /// be absent, such as an image's `.sha256`.
    pub fn get_if_present(&self, url: &str, cancel: &AtomicBool) -> Result<Result<Download, u16>, SourceError> {
        self.request(url, cancel)
    }

    fn request(&self, url: &str, cancel: &AtomicBool) -> Result<Result<Download, u16>, SourceError> {
        let err = |reason: String| SourceError::Http { url: redact(url), reason: scrub(&reason, url) };
        let (bare, credentials) = split_credentials(url);
        let mut request = self.agent.get(&bare);
        if let Some(credentials) = credentials {
            use base64::Engine;
            let token = base64::engine::general_purpose::STANDARD.encode(credentials);
            request = request.header("Authorization", format!("Basic {token}"));
        }
        // ureq cannot abort a connect in progress (shutting the agent down closes only its
        // pooled connections), so the request runs in a thread of its own that a cancel
        // leaves behind: it holds only its socket and ends by the connect timeout, or with
        // the process.
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("http-request".into())
            .spawn(move || {
                let _ = tx.send(request.call());
            })
            .map_err(|e| err(format!("cannot start the request: {e}")))?;
        let response = loop {
            match rx.recv_timeout(CANCEL_POLL) {
                Ok(Err(ureq::Error::StatusCode(status @ (404 | 410)))) => return Ok(Err(status)),
                Ok(response) => break response.map_err(|e| err(self.refusal().unwrap_or_else(|| e.to_string())))?,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if cancel.load(Ordering::Relaxed) => {
                    return Err(err("interrupted while connecting".into()));
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(err("the request ended without an answer".into()));
                }
            }
        };
        let length =
            response.headers().get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        let reader: Box<dyn Read + Send> = Box::new(response.into_body().into_reader());
        Ok(Ok(Download { body: BufReader::with_capacity(1 << 20, reader), length }))
    }

    /// Runs `f` while a watcher closes this client's connections once `cancel` is raised, so a
    /// read blocked on a silent server returns at once.
    pub fn cancellable<T>(&self, cancel: &AtomicBool, f: impl FnOnce() -> T) -> T {
        crate::cancel::watch(cancel, || self.agent.clone().shutdown(), f)
    }
}

impl Download {
    /// The first bytes, without consuming them.
    pub fn peek(&mut self, url: &str) -> Result<Vec<u8>, SourceError> {
        use std::io::BufRead;
        let buf = self
            .body
            .fill_buf()
            .map_err(|e| SourceError::Http { url: redact(url), reason: scrub(&e.to_string(), url) })?;
        if buf.is_empty() {
            return Err(SourceError::Empty(redact(url)));
        }
        Ok(buf[..buf.len().min(super::HEADER_BYTES)].to_vec())
    }
}

/// How many bytes a body of `format` (first bytes `header`) may have when its target holds
/// `room` bytes (None: a new file without `--size`); None means unbounded. Pure.
pub fn body_limit(format: Format, header: &[u8], room: Option<u64>) -> Option<u64> {
    let with_slack = |bytes: u64, slack: u64| bytes.saturating_add(bytes / 8).saturating_add(slack);
    match format {
        // A raw body is the disk: one byte more cannot fit.
        Format::Raw => room,
        Format::Gzip | Format::Xz | Format::Zstd => room.map(|r| with_slack(r, DOWNLOAD_SLACK_BYTES)),
        Format::Qemu(_) => {
            // A few metadata clusters (header, L1, refcounts, L2) come on top of the data.
            let slack = DOWNLOAD_SLACK_BYTES.max(declared_cluster_bytes(format, header).unwrap_or(0) * 8);
            room.or(declared_virtual_size(format, header)).map(|c| with_slack(c, slack))
        }
        Format::Squashfs => {
            let own = squashfs_bytes_used(header).map(|b| b.saturating_add(DOWNLOAD_SLACK_BYTES));
            let fits = room.map(|r| with_slack(r, DOWNLOAD_SLACK_BYTES));
            match (own, fits) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
    }
}

/// Fails a body that delivers more than `limit` bytes, raising `exceeded` so the caller can
/// tell this refusal from a broken connection.
pub struct Bounded<R> {
    inner: R,
    left: u64,
    limit: u64,
    exceeded: Arc<AtomicBool>,
}

impl<R> Bounded<R> {
    /// Wraps `inner`, allowing `limit` bytes.
    pub fn new(inner: R, limit: u64, exceeded: Arc<AtomicBool>) -> Self {
        Self { inner, left: limit, limit, exceeded }
    }
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // One byte more than allowed is enough to know the body is too large.
        let want = buf.len().min(usize::try_from(self.left.saturating_add(1)).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n as u64 > self.left {
            self.exceeded.store(true, Ordering::Relaxed);
            return Err(std::io::Error::other(format!("the download passed {} bytes", self.limit)));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener whose accept queue is full: the kernel drops new SYNs, so a connect to it
    /// hangs until its timeout (what an unreachable or overloaded server does).
    fn unanswering_server() -> (std::net::TcpListener, Vec<std::net::TcpStream>) {
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // SAFETY: listen again on our own socket, with the smallest queue.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let addr = listener.local_addr().unwrap();
        let queued = (0..4)
            .filter_map(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok())
            .collect();
        (listener, queued)
    }

    #[test]
    fn a_cancel_ends_a_hanging_connect() {
        let (listener, _queued) = unanswering_server();
        let url = format!("http://{}/image", listener.local_addr().unwrap());
        let timeouts = HttpTimeouts { connect: Duration::from_secs(20), idle: Duration::from_secs(20) };
        let client = Client::new(timeouts, Reach::Any);
        let cancel = AtomicBool::new(false);
        let started = std::time::Instant::now();
        let result = std::thread::scope(|scope| {
            scope.spawn(|| {
                std::thread::sleep(Duration::from_millis(500));
                cancel.store(true, Ordering::Relaxed);
            });
            client.get(&url, &cancel).map(|_| ())
        });
        let took = started.elapsed();
        eprintln!("connect interrupted after {took:?}: {result:?}");
        assert!(
            matches!(&result, Err(SourceError::Http { reason, .. }) if reason.contains("interrupted")),
            "{result:?}"
        );
        assert!(took < Duration::from_secs(2), "took {took:?}");
    }

    /// A tenant's URL is refused by the address its name resolves to (`localhost`, not an
    /// address in the URL's text), and the server never sees a connection.
    #[test]
    fn public_only_refuses_a_name_resolving_to_loopback() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let cancel = AtomicBool::new(false);
        for url in [format!("http://localhost:{port}/x.img"), format!("http://127.0.0.1:{port}/x.img")] {
            let client = Client::new(HttpTimeouts::default(), Reach::PublicOnly { param: "img_id" });
            let result = client.get(&url, &cancel).map(|_| ());
            let Err(SourceError::Http { reason, .. }) = &result else { panic!("{url}: {result:?}") };
            assert!(reason.contains("127.0.0.1") || reason.contains("::1"), "{reason}");
            assert!(reason.contains("loopback") && reason.contains("URL_ALLOW_PRIVATE_ADDRESSES"), "{reason}");
            assert!(reason.contains("img_id"), "{reason}");
            assert!(listener.accept().is_err(), "{url}: the server got a connection");
        }
    }

    #[test]
    fn redaction_table() {
        for (url, shown) in [
            ("https://host/x.img", "https://host/x.img"),
            ("https://user:pass@host/x.img", "https://***@host/x.img"),
            ("https://user@host:8443/x.img", "https://***@host:8443/x.img"),
            ("http://u:p@ss@host/x", "http://***@host/x"),
            (
                "https://h/x?X-Amz-Signature=abc&X-Amz-Credential=k",
                "https://h/x?X-Amz-Signature=***&X-Amz-Credential=***",
            ),
            ("https://h/x?sig=abc#frag", "https://h/x?sig=***#***"),
            ("https://u:p@h?token", "https://***@h?***"),
            ("https://h/a@b/c", "https://h/a@b/c"),
            ("no-scheme", "no-scheme"),
        ] {
            assert_eq!(redact(url), shown, "{url}");
        }
    }

    #[test]
    fn scrubbed_messages_hide_secrets() {
        let url = "https://alice:s3cret@h/x?token=t0ken";
        let msg = scrub(&format!("failed {url}; also alice:s3cret and token=t0ken"), url);
        assert!(!msg.contains("s3cret") && !msg.contains("t0ken"), "{msg}");
    }

    #[test]
    fn credentials_move_out_of_the_url() {
        assert_eq!(
            split_credentials("https://al%40ce:p%3Ass@h:1/x?a=b"),
            ("https://h:1/x?a=b".to_owned(), Some("al@ce:p:ss".to_owned()))
        );
        assert_eq!(split_credentials("https://h/x@y"), ("https://h/x@y".to_owned(), None));
    }

    #[test]
    fn bounded_refuses_one_byte_more() {
        let exceeded = Arc::new(AtomicBool::new(false));
        let mut out = Vec::new();
        Bounded::new(&[1u8; 10][..], 10, exceeded.clone()).read_to_end(&mut out).unwrap();
        assert_eq!(out.len(), 10);
        assert!(!exceeded.load(Ordering::Relaxed));
        out.clear();
        let err = Bounded::new(&[1u8; 11][..], 10, exceeded.clone()).read_to_end(&mut out).unwrap_err();
        assert!(err.to_string().contains("passed 10 bytes"), "{err}");
        assert!(exceeded.load(Ordering::Relaxed));
    }

    #[test]
    fn body_limits() {
        let mut qcow2 = b"QFI\xfb\0\0\0\x03".to_vec();
        qcow2.resize(32, 0);
        qcow2[20..24].copy_from_slice(&21u32.to_be_bytes());
        qcow2[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        let mib = 1u64 << 20;
        assert_eq!(body_limit(Format::Raw, &[], Some(mib)), Some(mib));
        assert_eq!(body_limit(Format::Raw, &[], None), None);
        assert_eq!(body_limit(Format::Zstd, &[], Some(8 * mib)), Some(9 * mib + DOWNLOAD_SLACK_BYTES));
        // 2 MiB clusters: eight of them are the slack.
        assert_eq!(body_limit(Format::Qemu("qcow2"), &qcow2, None), Some(mib + mib / 8 + 16 * mib));
        assert_eq!(body_limit(Format::Qemu("qcow2"), &qcow2, Some(8 * mib)), Some(9 * mib + 16 * mib));
        assert_eq!(body_limit(Format::Qemu("vmdk"), b"KDMV", None), None);
        let mut sq = b"hsqs".to_vec();
        sq.resize(48, 0);
        sq[40..48].copy_from_slice(&mib.to_le_bytes());
        assert_eq!(body_limit(Format::Squashfs, &sq, None), Some(mib + DOWNLOAD_SLACK_BYTES));
        assert_eq!(body_limit(Format::Squashfs, &sq, Some(u64::MAX)), Some(mib + DOWNLOAD_SLACK_BYTES));
    }

    proptest::proptest! {
        #[test]
        fn redacted_urls_never_hold_the_password(user in "[a-z]{1,8}", pass in "[A-Za-z0-9]{6,12}", token in "[A-Za-z0-9]{6,12}") {
            let url = format!("https://{user}:{pass}@example.org/img.qcow2?t={token}");
            let shown = redact(&url);
            proptest::prop_assert!(!shown.contains(&pass) && !shown.contains(&token));
            proptest::prop_assert!(shown.starts_with("https://***@example.org/img.qcow2?t="));
        }
    }
}
