//! A tiny HTTP server on 127.0.0.1 for URL-source tests: well-behaved, short, slow, silent
//! after its headers, or sending without end.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the server does once the body (`send` bytes of it) is out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// Closes the connection.
    Close,
    /// Keeps the connection open and sends nothing more (a hung server).
    Stall,
    /// Sends 0x5a bytes until the client goes away, or until this many more were sent (a
    /// bound, so a client that never stops cannot fill the test machine's disk).
    Endless(u64),
}

/// How the server answers.
#[derive(Clone)]
pub struct Response {
    /// The body.
    pub body: Vec<u8>,
    /// Content-Length to announce (None: none, close to end).
    pub announce: Option<u64>,
    /// Send only this many body bytes, then close (a short read).
    pub send: usize,
    /// Pause between 64 KiB pieces (a slow server).
    pub pause: Duration,
    /// What follows the body.
    pub after: After,
}

impl Response {
    /// The whole body with a correct Content-Length.
    pub fn full(body: Vec<u8>) -> Self {
        let n = body.len();
        Self { announce: Some(n as u64), body, send: n, pause: Duration::ZERO, after: After::Close }
    }
}

/// A running server: its URL, the body bytes it sent, the requests it received (headers).
pub struct Server {
    /// `http://127.0.0.1:PORT/image`.
    pub url: String,
    /// Body bytes written to clients so far (those still in socket buffers included).
    pub sent: Arc<AtomicU64>,
    /// Each request's head, as received.
    pub requests: Arc<Mutex<Vec<String>>>,
}

/// Serves `response` to every connection, in a background thread; returns the URL.
pub fn serve(response: Response) -> String {
    start(response).url
}

/// Serves `response` to every connection, in a background thread.
pub fn start(response: Response) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let port = listener.local_addr().unwrap().port();
    let sent = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let (sent_count, request_log) = (sent.clone(), requests.clone());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let r = response.clone();
            let (sent, requests) = (sent_count.clone(), request_log.clone());
            std::thread::spawn(move || {
                let mut request = Vec::new();
                let mut byte = [0u8; 1];
                while !request.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                    request.push(byte[0]);
                }
                requests.lock().unwrap().push(String::from_utf8_lossy(&request).into_owned());
                let mut head =
                    String::from("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n");
                if let Some(n) = r.announce {
                    head.push_str(&format!("Content-Length: {n}\r\n"));
                }
                head.push_str("\r\n");
                if conn.write_all(head.as_bytes()).is_err() {
                    return;
                }
                for piece in r.body[..r.send].chunks(64 * 1024) {
                    if conn.write_all(piece).is_err() {
                        return;
                    }
                    sent.fetch_add(piece.len() as u64, Ordering::Relaxed);
                    if !r.pause.is_zero() {
                        std::thread::sleep(r.pause);
                    }
                }
                match r.after {
                    After::Close => {}
                    // Returns when the client closes its end.
                    After::Stall => while conn.read(&mut byte).unwrap_or(0) == 1 {},
                    After::Endless(cap) => {
                        let filler = vec![0x5au8; 64 * 1024];
                        let mut more = 0u64;
                        while more < cap && conn.write_all(&filler).is_ok() {
                            more += filler.len() as u64;
                            sent.fetch_add(filler.len() as u64, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    Server { url: format!("http://127.0.0.1:{port}/image"), sent, requests }
}

/// Serves files by path (`/debian.img`, `/debian.img.sha256`): each request for one of
/// `files` gets it whole, any other path a 404, as a plain web server. Returns the base URL
/// (`http://127.0.0.1:PORT`) and the request lines received.
pub fn serve_files(files: Vec<(String, Vec<u8>)>) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let port = listener.local_addr().unwrap().port();
    let files = Arc::new(files);
    let requests = Arc::new(Mutex::new(Vec::new()));
    let log = requests.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let (files, log) = (files.clone(), log.clone());
            std::thread::spawn(move || {
                let mut request = Vec::new();
                let mut byte = [0u8; 1];
                while !request.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                    request.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&request).into_owned();
                let line = head.lines().next().unwrap_or("").to_owned();
                log.lock().unwrap().push(line.clone());
                let path = line.split(' ').nth(1).unwrap_or("");
                let (status, body): (&str, &[u8]) = match files.iter().find(|(p, _)| p == path) {
                    Some((_, body)) => ("200 OK", body),
                    None => ("404 Not Found", b"not found\n"),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                if conn.write_all(head.as_bytes()).is_ok() {
                    let _ = conn.write_all(body);
                }
            });
        }
    });
    (format!("http://127.0.0.1:{port}"), requests)
}
