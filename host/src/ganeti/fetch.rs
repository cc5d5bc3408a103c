//! Small files the OS parameters point at (`config_url`, an image's `.sha256`), fetched with a
//! bound on their size: over http(s) with the image download's client, or from `file://`.

use crate::source::http::{self, Client, HttpTimeouts};
use crate::source::reach::Reach;
use std::io::Read;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
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

/// Confines the `file://` path a tenant gave (Ganeti's `OSP_CONFIG_URL`, which an instance's
/// owner sets) to `image_dir`: as root, imgforge would otherwise read any file of the node for
/// them (its keys echoed in warnings, its known values put into their guest, its existence told
/// by the error). The path is checked by its text before the filesystem is asked anything, then
/// resolved (symbolic links included) and checked again; the resolved path is returned.
pub fn confine_file(path: &str, image_dir: &std::path::Path) -> Result<String, String> {
    use std::path::{Component, Path};
    let refused = || {
        format!(
            "{:?}: a file:// config_url given as an OS parameter must name a file inside IMAGE_DIR {} \
             (other files of this node are the operator's: name them in an OS variant's CONFIG_URL)",
            imgforge_protocol::printable::printable(path),
            image_dir.display()
        )
    };
    let given = Path::new(path);
    if given.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(refused());
    }
    let dir = std::fs::canonicalize(image_dir).map_err(|e| format!("IMAGE_DIR {}: {e}", image_dir.display()))?;
    if !(given.starts_with(&dir) || given.starts_with(image_dir)) {
        return Err(refused());
    }
    let real = std::fs::canonicalize(given).map_err(|e| format!("cannot read {}: {e}", given.display()))?;
    if !real.starts_with(&dir) || real == dir {
        return Err(refused());
    }
    Ok(real.display().to_string())
}

/// The most an http fetch of a small file may take, from connect to its last byte.
pub const SMALL_FILE_DEADLINE: Duration = Duration::from_secs(120);

/// Fetches at most `max` bytes from `place` (more fails, naming the bound) within
/// [`SMALL_FILE_DEADLINE`], over http connecting only where `reach` allows; `Ok(None)` when an
/// http server answers 404 or 410 and `may_be_missing`.
pub fn fetch(
    param: &str,
    place: &Place,
    max: u64,
    may_be_missing: bool,
    timeouts: HttpTimeouts,
    reach: Reach,
    cancel: &AtomicBool,
) -> Result<Option<Vec<u8>>, FetchError> {
    fetch_within(param, place, max, may_be_missing, (timeouts, reach), SMALL_FILE_DEADLINE, cancel)
}

/// [`fetch`] with `deadline` for an http fetch.
fn fetch_within(
    param: &str,
    place: &Place,
    max: u64,
    may_be_missing: bool,
    (timeouts, reach): (HttpTimeouts, Reach),
    deadline: Duration,
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
            let client = Client::with_total(timeouts, deadline, reach);
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
            let place = Place::File(p.display().to_string());
            fetch(
                "config_url",
                &place,
                max,
                false,
                HttpTimeouts::default(),
                Reach::PublicOnly { param: "config_url" },
                &cancel,
            )
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

    /// A tenant's file:// config_url reads only IMAGE_DIR: other host files (/etc/shadow, a
    /// JSON file of Ganeti's) are refused before they are opened or even looked up, and a link
    /// inside IMAGE_DIR leading out is refused once resolved.
    #[test]
    fn tenant_files_are_confined_to_image_dir() {
        let root = tempfile::tempdir().unwrap();
        let images = root.path().join("images");
        std::fs::create_dir(&images).unwrap();
        std::fs::write(images.join("c.json"), "{}").unwrap();
        let secret = root.path().join("secret.json");
        std::fs::write(&secret, r#"{"auth_keys": "host secret"}"#).unwrap();
        std::os::unix::fs::symlink(&secret, images.join("link.json")).unwrap();
        let inside = images.join("c.json").display().to_string();
        assert_eq!(
            confine_file(&inside, &images).unwrap(),
            std::fs::canonicalize(&inside).unwrap().display().to_string()
        );
        let missing_outside = root.path().join("nothing-here.json").display().to_string();
        let missing_inside = images.join("nothing-here.json").display().to_string();
        for bad in [
            "/etc/shadow".to_owned(),
            "/proc/self/environ".to_owned(),
            secret.display().to_string(),
            images.join("link.json").display().to_string(),
            format!("{}/../secret.json", images.display()),
            images.display().to_string(),
            missing_outside,
        ] {
            let e = confine_file(&bad, &images).unwrap_err();
            assert!(e.contains("must name a file inside IMAGE_DIR"), "{bad}: {e}");
        }
        assert!(confine_file(&missing_inside, &images).unwrap_err().contains("cannot read"));
    }

    /// A server that sends its small file a byte at a time, each well within the idle timeout,
    /// is cut off at the deadline (before, only the idle timeout applied: 1 MiB of config_url at
    /// a byte a minute held create for two years).
    #[test]
    fn a_dribbling_server_is_cut_off_at_the_deadline() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/c.json", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = [0u8; 4096];
            let _ = std::io::Read::read(&mut conn, &mut request);
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n{");
            while conn.write_all(b" ").is_ok() {
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let cancel = AtomicBool::new(false);
        let started = std::time::Instant::now();
        let timeouts = HttpTimeouts { connect: Duration::from_secs(5), idle: Duration::from_secs(5) };
        let result = fetch_within(
            "config_url",
            &Place::Http(url),
            1 << 20,
            false,
            (timeouts, Reach::Any),
            Duration::from_secs(2),
            &cancel,
        );
        let took = started.elapsed();
        assert!(result.is_err(), "{result:?}");
        assert!(took < Duration::from_secs(8), "the fetch took {took:?}");
    }

    fn nix_mkfifo(path: &std::path::Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string, for a test's own directory.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }
}
