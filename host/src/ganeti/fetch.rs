//! Small files the OS parameters point at (`config_url`, an image's `.sha256`), fetched with a
//! bound on their size: over http(s) with the image download's client, or from `file://`.

use crate::source::http::{self, Client, HttpTimeouts};
use std::io::Read;
use std::sync::atomic::AtomicBool;
use thiserror::Error;

/// A small file that could not be fetched.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("cannot fetch {url} ({param}): {reason}")]
pub struct FetchError {
    /// The parameter that named it (`config_url`, `img_id`'s `.sha256`).
    pub param: String,
    /// The URL, redacted.
    pub url: String,
    /// What went wrong.
    pub reason: String,
}

/// Where a small file comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// An `http://` or `https://` URL.
    Http(String),
    /// The absolute path of a `file://` URL.
    File(String),
}

/// Reads `url` as a place: `http(s)://…`, or `file:///PATH` (`file://localhost/PATH`) when
/// `file` is allowed. Pure.
pub fn place(url: &str, file: bool) -> Result<Place, String> {
    if url.starts_with("http://") || url.starts_with("https://") {
        return Ok(Place::Http(url.to_owned()));
    }
    if let Some(rest) = url.strip_prefix("file://").filter(|_| file) {
        let path = rest.strip_prefix("localhost").unwrap_or(rest);
        if !path.starts_with('/') || path.contains(['?', '#']) || path.contains('\0') {
            return Err(format!(
                "{:?} is not a file URL of this host (file:///ABSOLUTE/PATH, no query)",
                imgforge_protocol::printable::printable(url)
            ));
        }
        return Ok(Place::File(path.to_owned()));
    }
    let takes = if file { "http://, https:// or file:///" } else { "http:// or https://" };
    Err(format!(
        "{:?} is not a URL imgforge fetches ({takes})",
        imgforge_protocol::printable::printable(http::redact(url).as_str())
    ))
}

/// Fetches at most `max` bytes from `place` (more fails, naming the bound); `Ok(None)` when an
/// http server answers 404 or 410 and `may_be_missing`.
pub fn fetch(
    param: &str,
    place: &Place,
    max: u64,
    may_be_missing: bool,
    timeouts: HttpTimeouts,
    cancel: &AtomicBool,
) -> Result<Option<Vec<u8>>, FetchError> {
    let shown = match place {
        Place::Http(url) => http::redact(url),
        Place::File(path) => format!("file://{path}"),
    };
    let fail = |reason: String| FetchError { param: param.to_owned(), url: shown.clone(), reason };
    let bounded = |reader: &mut dyn Read| -> Result<Vec<u8>, FetchError> {
        let mut data = Vec::new();
        reader.take(max + 1).read_to_end(&mut data).map_err(|e| fail(e.to_string()))?;
        if data.len() as u64 > max {
            return Err(fail(format!("larger than {max} bytes, which is all imgforge reads of it")));
        }
        Ok(data)
    };
    match place {
        Place::Http(url) => {
            let client = Client::new(timeouts);
            client.cancellable(cancel, || match client.get_if_present(url, cancel) {
                Ok(Ok(mut download)) => bounded(&mut download.body).map(Some),
                Ok(Err(_)) if may_be_missing => Ok(None),
                Ok(Err(status)) => Err(fail(format!("http status: {status}"))),
                Err(e) => Err(fail(match e {
                    crate::source::SourceError::Http { reason, .. } => reason,
                    other => other.to_string(),
                })),
            })
        }
        Place::File(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            // Non-blocking, so that a FIFO named here does not hang the open.
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)
                .map_err(|e| fail(e.to_string()))?;
            let meta = f.metadata().map_err(|e| fail(e.to_string()))?;
            if !meta.is_file() {
                return Err(fail("not a regular file".into()));
            }
            bounded(&mut f).map(Some)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places() {
        assert_eq!(place("http://h/c.json", true).unwrap(), Place::Http("http://h/c.json".into()));
        assert_eq!(place("https://h/c.json", false).unwrap(), Place::Http("https://h/c.json".into()));
        assert_eq!(place("file:///etc/c.json", true).unwrap(), Place::File("/etc/c.json".into()));
        assert_eq!(place("file://localhost/etc/c.json", true).unwrap(), Place::File("/etc/c.json".into()));
        for (bad, file) in [
            ("file:///etc/c.json", false),
            ("file://other/etc/c.json", true),
            ("file://relative", true),
            ("file:///a?b", true),
            ("ftp://h/c.json", true),
            ("/etc/c.json", true),
            ("", true),
        ] {
            assert!(place(bad, file).is_err(), "{bad} accepted");
        }
        let e = place("ftp://u:secret@h/x", true).unwrap_err();
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn files_are_bounded_and_regular() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = AtomicBool::new(false);
        let path = dir.path().join("c.json");
        std::fs::write(&path, b"0123456789").unwrap();
        let get = |p: &std::path::Path, max| {
            fetch("config_url", &Place::File(p.display().to_string()), max, false, HttpTimeouts::default(), &cancel)
        };
        assert_eq!(get(&path, 10).unwrap().unwrap(), b"0123456789");
        assert!(get(&path, 9).unwrap_err().reason.contains("larger than 9 bytes"));
        assert!(get(dir.path(), 10).unwrap_err().reason.contains("not a regular file"));
        assert!(get(std::path::Path::new("/dev/zero"), 10).unwrap_err().reason.contains("not a regular file"));
        let fifo = dir.path().join("fifo");
        nix_mkfifo(&fifo);
        assert!(get(&fifo, 10).unwrap_err().reason.contains("not a regular file"));
        assert!(get(&dir.path().join("missing"), 10).is_err());
    }

    fn nix_mkfifo(path: &std::path::Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string, for a test's own directory.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }
}
