//! A tiny HTTP server on 127.0.0.1 for URL-source tests.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

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
}

impl Response {
    /// The whole body with a correct Content-Length.
    pub fn full(body: Vec<u8>) -> Self {
        let n = body.len();
        Self { announce: Some(n as u64), body, send: n, pause: Duration::ZERO }
    }
}

/// Serves `response` to every connection, in a background thread; returns the URL.
pub fn serve(response: Response) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let r = response.clone();
            std::thread::spawn(move || {
                let mut request = Vec::new();
                let mut byte = [0u8; 1];
                while !request.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                    request.push(byte[0]);
                }
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
                    if !r.pause.is_zero() {
                        std::thread::sleep(r.pause);
                    }
                }
            });
        }
    });
    format!("http://127.0.0.1:{port}/image")
}
