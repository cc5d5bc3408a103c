//! The SHA-256 an instance's image must have: the OS parameter `img_sha256` (imgforge's own:
//! snf-image checks no image), or for an http(s) image the `.sha256` file beside it, in
//! `sha256sum`'s format. Pure parsers; the fetch is `fetch.rs`'s.

use super::params::ParamError;
use std::collections::BTreeMap;

/// The most of a `.sha256` file imgforge reads (a `SHA256SUMS` of a few hundred images).
pub const MAX_SHA256_FILE_BYTES: u64 = 64 << 10;

/// What `img_sha256` asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted {
    /// Not given: an http(s) image is checked against its `.sha256` when the server has one.
    Sidecar,
    /// 64 hex digits (lower-cased): the image must hash to this.
    Digest(String),
    /// `none`: no check, no `.sha256` fetched.
    Nothing,
}

/// Reads `OSP_IMG_SHA256` from Ganeti's environment. Pure.
pub fn wanted(env: &BTreeMap<String, String>) -> Result<Wanted, ParamError> {
    let Some(value) = env.get("OSP_IMG_SHA256").map(|v| v.trim()).filter(|v| !v.is_empty()) else {
        return Ok(Wanted::Sidecar);
    };
    if value.eq_ignore_ascii_case("none") {
        return Ok(Wanted::Nothing);
    }
    crate::job::write::check_sha256_arg(value).map(Wanted::Digest).map_err(|reason| ParamError {
        param: "img_sha256".into(),
        reason: format!(
            "{}: give the image's SHA-256 (64 hex digits), or none",
            imgforge_protocol::printable::printable(&reason)
        ),
    })
}

/// The URL of the checksum file beside the image at `url`: `.sha256` appended to its path,
/// before any query or fragment. Pure.
pub fn sidecar_url(url: &str) -> String {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    format!("{}.sha256{}", &url[..end], &url[end..])
}

/// The image's file name as a `.sha256` file lists it: the last segment of the URL's path.
pub fn file_name(url: &str) -> &str {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    let path = &url[..end];
    let path = path.find("://").map_or(path, |i| &path[i + 3..]);
    path.rsplit('/').next().unwrap_or("")
}

/// Parses a `.sha256` file for the image `name`, in `sha256sum`'s output format: lines of
/// 64 hex digits, two spaces (or a space and `*`, binary mode) and a file name; or one line of
/// the digest alone. With names, the line naming `name` (or `./name`) is the one taken. Any
/// other line, a second digest for `name`, bytes that are not UTF-8 or a control character in
/// a name refuse the file, saying which line. Pure.
pub fn parse_sha256_file(data: &[u8], name: &str) -> Result<String, String> {
    if data.len() as u64 > MAX_SHA256_FILE_BYTES {
        return Err(format!("larger than {MAX_SHA256_FILE_BYTES} bytes"));
    }
    let text = std::str::from_utf8(data).map_err(|_| "not UTF-8 text".to_owned())?;
    let mut bare = None;
    let mut named: Vec<(usize, String, &str)> = Vec::new();
    let mut lines = 0;
    for (i, line) in text.split('\n').enumerate() {
        let n = i + 1;
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        lines += 1;
        let bad = || format!("line {n} is not `DIGEST  NAME` (64 hex digits, two spaces, a file name)");
        let digest = line.get(..64).filter(|d| d.bytes().all(|b| b.is_ascii_hexdigit())).ok_or_else(bad)?;
        let rest = &line[64..];
        if rest.is_empty() {
            bare = Some(digest.to_ascii_lowercase());
            continue;
        }
        let listed = rest.strip_prefix("  ").or_else(|| rest.strip_prefix(" *")).ok_or_else(bad)?;
        if listed.is_empty() || listed.chars().any(char::is_control) {
            return Err(bad());
        }
        named.push((n, digest.to_ascii_lowercase(), listed));
    }
    match (bare, named.is_empty()) {
        (None, true) => Err("holds no digest".into()),
        (Some(d), true) if lines == 1 => Ok(d),
        (Some(_), _) => Err("a line with a digest alone must be the file's only line".into()),
        (None, false) => {
            let matching: Vec<_> =
                named.iter().filter(|(_, _, l)| *l == name || l.strip_prefix("./") == Some(name)).collect();
            match matching.as_slice() {
                [] => Err(format!(
                    "lists no digest for {:?} (it lists {})",
                    imgforge_protocol::printable::printable(name),
                    named.iter().map(|(_, _, l)| format!("{l:?}")).take(5).collect::<Vec<_>>().join(", ")
                )),
                [(_, d, _), rest @ ..] => match rest.iter().find(|(_, other, _)| other != d) {
                    None => Ok(d.clone()),
                    Some((n, _, _)) => Err(format!("line {n} gives another digest for the same file")),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const B: &str = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752";

    #[test]
    fn sha256_file_table() {
        let upper = A.to_ascii_uppercase();
        let good: &[(String, &str)] = &[
            (format!("{A}\n"), A),
            (A.to_string(), A),
            (format!("{upper}\n"), A),
            (format!("{A}  debian.img\n"), A),
            (format!("{A} *debian.img\n"), A),
            (format!("{A}  ./debian.img\r\n"), A),
            (format!("{B}  other.img\n{A}  debian.img\n\n"), A),
            (format!("{A}  debian.img\n{A}  debian.img\n"), A),
            (format!("{A}  debian.img with spaces.img\n{B}  debian.img\n"), B),
        ];
        for (text, want) in good {
            assert_eq!(parse_sha256_file(text.as_bytes(), "debian.img").as_deref(), Ok(*want), "{text:?}");
        }
        let bad: &[(String, &str)] = &[
            (String::new(), "holds no digest"),
            ("\n\n".into(), "holds no digest"),
            (format!("{}\n", &A[..63]), "line 1 is not"),
            (format!("{A}0\n"), "line 1 is not"),
            (format!("{A} debian.img\n"), "line 1 is not"),
            (format!("{A}\tdebian.img\n"), "line 1 is not"),
            (format!("{A}  \n"), "line 1 is not"),
            (format!("{B}  other.img\n{A}  debian.img\x1b[2J\n"), "line 2 is not"),
            (format!("{}  debian.img\n", A.replace('f', "g")), "line 1 is not"),
            (format!("<html>{A}</html>\n"), "line 1 is not"),
            (format!("{A}\n{B}\n"), "only line"),
            (format!("{A}\n{B}  debian.img\n"), "only line"),
            (format!("{B}  other.img\n"), "lists no digest for \"debian.img\""),
            (format!("{A}  debian.img\n{B}  debian.img\n"), "line 2 gives another digest"),
            ("é".repeat(40), "line 1 is not"),
        ];
        for (text, want) in bad {
            let e = parse_sha256_file(text.as_bytes(), "debian.img").unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        assert!(parse_sha256_file(b"\xff\xfe", "x").unwrap_err().contains("UTF-8"));
        let big = format!("{A}  debian.img\n").repeat(2000);
        assert!(parse_sha256_file(big.as_bytes(), "debian.img").unwrap_err().contains("larger than"));
    }

    #[test]
    fn sidecar_urls_and_names() {
        for (url, sidecar, name) in [
            ("http://h/i/debian.img", "http://h/i/debian.img.sha256", "debian.img"),
            ("https://h/debian.img?sig=x", "https://h/debian.img.sha256?sig=x", "debian.img"),
            ("https://h/a/b.qcow2#frag", "https://h/a/b.qcow2.sha256#frag", "b.qcow2"),
            ("http://h", "http://h.sha256", "h"),
        ] {
            assert_eq!(sidecar_url(url), sidecar, "{url}");
            assert_eq!(file_name(url), name, "{url}");
        }
    }

    #[test]
    fn img_sha256_table() {
        let env = |v: &str| BTreeMap::from([("OSP_IMG_SHA256".to_string(), v.to_string())]);
        assert_eq!(wanted(&BTreeMap::new()), Ok(Wanted::Sidecar));
        assert_eq!(wanted(&env("")), Ok(Wanted::Sidecar));
        assert_eq!(wanted(&env("none")), Ok(Wanted::Nothing));
        assert_eq!(wanted(&env("NONE")), Ok(Wanted::Nothing));
        assert_eq!(wanted(&env(&A.to_ascii_uppercase())), Ok(Wanted::Digest(A.into())));
        assert_eq!(wanted(&env(&format!(" {A}\n"))), Ok(Wanted::Digest(A.into())));
        for bad in [&A[1..], "sha256:0", "yes", &format!("{A}  debian.img"), "\u{1b}[2J"] {
            let e = wanted(&env(bad)).unwrap_err();
            assert_eq!(e.param, "img_sha256");
            assert!(!e.to_string().contains('\u{1b}'), "{e}");
        }
    }
}
