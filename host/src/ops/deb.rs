//! Debian packages read on the host, in Rust (no dpkg-deb, no shell): a `.deb`'s control data
//! (an ar archive whose `control.tar[.gz|.xz|.zst]` holds `./control`), and the `Packages` and
//! `Release` index of a directory of them, so that the guest's apt-get reads it as a flat
//! repository and resolves dependencies among the files itself.

use crate::source::decompress::decompressor;
use crate::source::Format;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;
use thiserror::Error;

/// An ar archive's first bytes.
const AR_MAGIC: &[u8] = b"!<arch>\n";
/// An ar member header's length.
const AR_HEADER_BYTES: usize = 60;
/// A tar block's length.
const TAR_BLOCK: usize = 512;
/// The most control data read from one package, decompressed (dpkg's own are a few KiB).
const MAX_CONTROL_BYTES: u64 = 16 << 20;

/// Why a file is not a Debian package imgforge can read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DebError {
    /// The bytes do not have a `.deb`'s structure.
    #[error("not a Debian package: {0}")]
    Format(String),
    /// The control member could not be decompressed.
    #[error("cannot read its control data: {0}")]
    Control(String),
}

/// A package's control fields, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    /// The paragraph's text, as the package has it (continuation lines kept), ending in `\n`.
    pub text: String,
    /// `Package:`.
    pub package: String,
}

/// Reads a `.deb`'s control paragraph from its bytes.
pub fn read_control(deb: &[u8]) -> Result<Control, DebError> {
    let format = |m: &str| DebError::Format(m.to_owned());
    let rest = deb.strip_prefix(AR_MAGIC).ok_or_else(|| format("no ar archive header (!<arch>)"))?;
    // Only the members up to the control data are read: the data member may be cut off.
    let members = ar_members(rest, |name| name.starts_with("control.tar"))?;
    match members.first() {
        Some((name, data)) if name == "debian-binary" && data.starts_with(b"2.") => {}
        _ => return Err(format("its first member is not debian-binary 2.x")),
    }
    let (name, data) = members
        .iter()
        .find(|(name, _)| name.starts_with("control.tar"))
        .ok_or_else(|| format("no control.tar member"))?;
    let compression = match name.as_str() {
        "control.tar" => Format::Raw,
        "control.tar.gz" => Format::Gzip,
        "control.tar.xz" => Format::Xz,
        "control.tar.zst" => Format::Zstd,
        other => return Err(DebError::Control(format!("{other} is compressed in a way imgforge does not read"))),
    };
    let mut tar = Vec::new();
    decompressor(compression, *data)
        .take(MAX_CONTROL_BYTES)
        .read_to_end(&mut tar)
        .map_err(|e| DebError::Control(format!("{name}: {e}")))?;
    let control = tar_file(&tar, "control").ok_or_else(|| DebError::Control(format!("{name} holds no ./control")))?;
    let text = String::from_utf8(control.to_vec()).map_err(|_| DebError::Control("control is not UTF-8".into()))?;
    parse_control(&text)
}

/// Checks a control paragraph and finds its package name.
pub fn parse_control(text: &str) -> Result<Control, DebError> {
    let bad = |m: String| DebError::Control(m);
    let text = text.trim_end_matches(['\n', ' ', '\t']);
    if text.is_empty() || text.contains("\n\n") || text.lines().any(|l| l.trim().is_empty()) {
        return Err(bad("control must be one paragraph".into()));
    }
    let mut package = None;
    for line in text.lines() {
        if line.starts_with([' ', '\t']) {
            continue;
        }
        let (field, value) = line.split_once(':').ok_or_else(|| bad(format!("line {line:?} is not Field: value")))?;
        if field.is_empty() || !field.bytes().all(|b| b.is_ascii_graphic()) || field.starts_with('#') {
            return Err(bad(format!("{field:?} is not a field name")));
        }
        if ["Filename", "Size", "MD5sum", "SHA1", "SHA256"].iter().any(|f| f.eq_ignore_ascii_case(field)) {
            return Err(bad(format!("control has {field}:, which only an index may hold")));
        }
        if field.eq_ignore_ascii_case("Package") {
            package = Some(value.trim().to_owned());
        }
    }
    let package = package.ok_or_else(|| bad("control has no Package: field".into()))?;
    let valid = package.len() >= 2
        && package.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
        && package.as_bytes()[0].is_ascii_alphanumeric();
    if !valid {
        return Err(bad(format!("{package:?} is not a Debian package name")));
    }
    Ok(Control { text: format!("{text}\n"), package })
}

/// The members of an ar archive (after its magic), name and data, up to the first one `last`
/// accepts.
fn ar_members(mut rest: &[u8], last: impl Fn(&str) -> bool) -> Result<Vec<(String, &[u8])>, DebError> {
    let mut members: Vec<(String, &[u8])> = Vec::new();
    while !rest.is_empty() && !members.last().is_some_and(|(name, _)| last(name)) {
        if rest.len() < AR_HEADER_BYTES || &rest[58..60] != b"`\n" {
            return Err(DebError::Format("a truncated or damaged ar member header".into()));
        }
        let name = String::from_utf8_lossy(&rest[..16]).trim_end().trim_end_matches('/').to_owned();
        let size: usize = std::str::from_utf8(&rest[48..58])
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| DebError::Format(format!("ar member {name:?} has no size")))?;
        let data = rest
            .get(AR_HEADER_BYTES..AR_HEADER_BYTES + size)
            .ok_or_else(|| DebError::Format(format!("ar member {name:?} is truncated")))?;
        members.push((name, data));
        // Members start on even offsets.
        let next = (AR_HEADER_BYTES + size + 1) & !1;
        rest = rest.get(next..).unwrap_or_default();
    }
    Ok(members)
}

/// A regular file's bytes in a tar archive, by its name without a leading `./`.
fn tar_file<'a>(tar: &'a [u8], want: &str) -> Option<&'a [u8]> {
    let mut at = 0;
    while let Some(header) = tar.get(at..at + TAR_BLOCK) {
        if header.iter().all(|&b| b == 0) {
            return None;
        }
        let field = |range: std::ops::Range<usize>| {
            let bytes = &header[range];
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            String::from_utf8_lossy(&bytes[..end]).into_owned()
        };
        let size = u64::from_str_radix(field(124..136).trim(), 8).ok()?;
        let size = usize::try_from(size).ok()?;
        let name = field(0..100);
        let kind = header[156];
        let data_at = at + TAR_BLOCK;
        if (kind == b'0' || kind == 0) && name.trim_start_matches("./") == want && field(345..500).is_empty() {
            return tar.get(data_at..data_at.checked_add(size)?);
        }
        at = data_at.checked_add(size.div_ceil(TAR_BLOCK) * TAR_BLOCK)?;
    }
    None
}

/// One package of a generated index: its control data and where the file lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// The package's control paragraph.
    pub control: Control,
    /// The file's path relative to the repository's top (`/`-separated).
    pub filename: String,
    /// Its length in bytes.
    pub size: u64,
    /// Its SHA-256, hex.
    pub sha256: String,
}

impl IndexEntry {
    /// Reads the package at `path`, to be named `filename` in the index.
    pub fn read(path: &Path, filename: &str) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let control = read_control(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self {
            control,
            filename: filename.to_owned(),
            size: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(&bytes)),
        })
    }
}

/// The `Packages` file of `entries`: each control paragraph with its `Filename`, `Size` and
/// `SHA256`, one blank line between paragraphs.
pub fn packages_index(entries: &[IndexEntry]) -> String {
    entries
        .iter()
        .map(|e| format!("{}Filename: ./{}\nSize: {}\nSHA256: {}\n", e.control.text, e.filename, e.size, e.sha256))
        .collect::<Vec<_>>()
        .join("\n")
}

/// An unsigned `Release` file naming `packages` (the `Packages` file's bytes) by its hash, so
/// that apt fetches it at once instead of probing for compressed variants.
pub fn release_file(packages: &[u8]) -> String {
    format!("SHA256:\n {} {} Packages\n", hex::encode(Sha256::digest(packages)), packages.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ar archive of `members`.
    fn ar(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = AR_MAGIC.to_vec();
        for (name, data) in members {
            out.extend(
                format!("{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n", format!("{name}/"), 0, 0, 0, "100644", data.len())
                    .bytes(),
            );
            out.extend_from_slice(data);
            if data.len() % 2 == 1 {
                out.push(b'\n');
            }
        }
        out
    }

    /// A tar archive of `files` (name, bytes).
    fn tar(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, data) in files {
            let mut h = [0u8; TAR_BLOCK];
            h[..name.len()].copy_from_slice(name.as_bytes());
            h[100..108].copy_from_slice(b"0000644\0");
            h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
            h[156] = b'0';
            out.extend_from_slice(&h);
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(TAR_BLOCK) * TAR_BLOCK, 0);
        }
        out.extend_from_slice(&[0u8; 2 * TAR_BLOCK]);
        out
    }

    const CONTROL: &str = "Package: imgforge-test-hello\nVersion: 1.0\nArchitecture: all\nDepends: imgforge-test-lib\nDescription: test\n more text\n";

    #[test]
    fn control_comes_out_of_each_compression() {
        let control_tar = tar(&[("./", b""), ("./md5sums", b"x"), ("./control", CONTROL.as_bytes())]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &control_tar).unwrap();
        let gz = gz.finish().unwrap();
        let zst = ruzstd::encoding::compress_to_vec(&control_tar[..], ruzstd::encoding::CompressionLevel::Fastest);
        for (member, data) in [("control.tar", control_tar.clone()), ("control.tar.gz", gz), ("control.tar.zst", zst)] {
            let deb = ar(&[("debian-binary", b"2.0\n"), (member, &data), ("data.tar", &tar(&[]))]);
            let control = read_control(&deb).unwrap_or_else(|e| panic!("{member}: {e}"));
            assert_eq!(control, Control { text: CONTROL.into(), package: "imgforge-test-hello".into() }, "{member}");
        }
    }

    /// What dpkg-deb builds (xz-compressed control by default, and each other compression).
    #[test]
    fn dpkg_deb_packages_read() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("DEBIAN")).unwrap();
        std::fs::write(
            tree.join("DEBIAN/control"),
            CONTROL.replace(
                "Description: test\n more text\n",
                "Maintainer: t <t@example.invalid>\nDescription: test\n more text\n",
            ),
        )
        .unwrap();
        for compression in ["xz", "gzip", "zstd", "none"] {
            let deb = dir.path().join(format!("{compression}.deb"));
            let status = std::process::Command::new("dpkg-deb")
                .args(["--root-owner-group", "-Z", compression, "--build"])
                .arg(&tree)
                .arg(&deb)
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(status.success());
            let entry = IndexEntry::read(&deb, "x.deb").unwrap();
            assert_eq!(entry.control.package, "imgforge-test-hello", "{compression}");
            assert!(entry.control.text.contains("Depends: imgforge-test-lib\n"), "{compression}");
        }
    }

    #[test]
    fn what_is_not_a_package_is_refused() {
        let control_tar = tar(&[("./control", CONTROL.as_bytes())]);
        let cases: &[(Vec<u8>, &str)] = &[
            (b"#!/bin/sh\n".to_vec(), "!<arch>"),
            (b"\xed\xab\xee\xdb rpm lead".to_vec(), "!<arch>"),
            (ar(&[("control.tar", &control_tar)]), "debian-binary"),
            (ar(&[("debian-binary", b"3.0\n"), ("control.tar", &control_tar)]), "debian-binary"),
            (ar(&[("debian-binary", b"2.0\n"), ("data.tar", &control_tar)]), "no control.tar"),
            (ar(&[("debian-binary", b"2.0\n"), ("control.tar.bz2", &control_tar)]), "does not read"),
            (ar(&[("debian-binary", b"2.0\n"), ("control.tar.gz", b"not gzip")]), "control.tar.gz"),
            (ar(&[("debian-binary", b"2.0\n"), ("control.tar", &tar(&[("./postinst", b"x")]))]), "no ./control"),
            (ar(&[("debian-binary", b"2.0\n")])[..70].to_vec(), "truncated"),
        ];
        for (bytes, want) in cases {
            let err = read_control(bytes).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn control_paragraphs() {
        assert_eq!(parse_control("Package: a0\nVersion: 1\n\n\n").unwrap().text, "Package: a0\nVersion: 1\n");
        let refused: &[(&str, &str)] = &[
            ("", "one paragraph"),
            ("Package: a0\n\nPackage: b0\n", "one paragraph"),
            ("Version: 1\n", "no Package"),
            ("Package: A_b\n", "not a Debian package name"),
            ("Package: -ab\n", "not a Debian package name"),
            ("Package: a\n", "not a Debian package name"),
            ("Package: ab\nno colon here\n", "Field: value"),
            ("Package: ab\nFilename: ../../etc/passwd\n", "Filename"),
            ("Package: ab\nsha256: 00\n", "sha256"),
        ];
        for (text, want) in refused {
            let err = parse_control(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn index_and_release() {
        let entry = |name: &str, file: &str| IndexEntry {
            control: parse_control(&format!("Package: {name}\nVersion: 1.0\n")).unwrap(),
            filename: file.into(),
            size: 10,
            sha256: "ab".repeat(32),
        };
        let index = packages_index(&[entry("aa", "aa_1.0_all.deb"), entry("bb", "sub/bb.deb")]);
        let sha = "ab".repeat(32);
        assert_eq!(
            index,
            format!(
                "Package: aa\nVersion: 1.0\nFilename: ./aa_1.0_all.deb\nSize: 10\nSHA256: {sha}\n\n\
                 Package: bb\nVersion: 1.0\nFilename: ./sub/bb.deb\nSize: 10\nSHA256: {sha}\n"
            )
        );
        assert_eq!(
            release_file(b""),
            "SHA256:\n e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855 0 Packages\n"
        );
    }
}
