//! The tree manifest: one line per path of a guest's tree, sorted by path bytes, naming its
//! type, permission bits, owner and content (a file's SHA-256, a symlink's target). Two images
//! whose manifests are equal hold the same files, whatever their filesystems' layout, times
//! and inode numbers: it is what "reproducible" means for a customized image. The helper
//! computes it in the VM after a variant's operations; a test computes it from its own mounts.
//!
//! Line format: `PATH\tTYPE\tMODE\tUID:GID\tCONTENT\n`, PATH escaped by
//! [`crate::change::escape_path`] (so it holds no tab or newline), TYPE a
//! [`FileType`] word, MODE four octal digits, CONTENT the SHA-256 of a file's bytes in
//! lowercase hex, an escaped symlink target, `random` for a random seed file, or `-`.

use crate::change::{escape_path_into, FileType};

/// Files whose content is random by design: a seed written fresh into every image
/// (45-RandomSeed), so that clones do not share their first randomness. Their content is listed
/// as `random`, not as a digest that would differ between two builds of the same image.
pub const RANDOM_CONTENT_PATHS: [&str; 5] = [
    "/var/lib/systemd/random-seed",
    "/var/lib/urandom/random-seed",
    "/var/lib/random-seed",
    "/var/lib/misc/random-seed",
    "/etc/random-seed",
];

/// What the manifest says of a path's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestContent {
    /// A regular file's bytes: their SHA-256, lowercase hex.
    Sha256(String),
    /// A symlink's target, as its bytes.
    LinkTarget(Vec<u8>),
    /// A random seed file ([`RANDOM_CONTENT_PATHS`]).
    Random,
    /// Nothing (directories, devices, fifos, sockets).
    None,
}

/// The content a path of type `ty` is listed with when `path` is a random seed file, or
/// `content` otherwise (pure).
pub fn content_for(path: &[u8], ty: FileType, content: ManifestContent) -> ManifestContent {
    if is_random_content(path, ty) {
        ManifestContent::Random
    } else {
        content
    }
}

/// One manifest line, with its newline (pure).
pub fn manifest_line(path: &[u8], ty: FileType, mode: u32, uid: u32, gid: u32, content: &ManifestContent) -> String {
    let mut line = String::with_capacity(path.len() + 96);
    manifest_line_into(&mut line, path, ty, mode, uid, gid, content);
    line
}

/// [`manifest_line`], appended to `out` (pure; no allocation where `out` has room).
pub fn manifest_line_into(
    out: &mut String,
    path: &[u8],
    ty: FileType,
    mode: u32,
    uid: u32,
    gid: u32,
    content: &ManifestContent,
) {
    escape_path_into(out, path);
    out.push('\t');
    out.push_str(ty.as_str());
    out.push('\t');
    for shift in [9, 6, 3, 0] {
        out.push(char::from(b'0' + ((mode >> shift) & 7) as u8));
    }
    out.push('\t');
    push_decimal(out, uid);
    out.push(':');
    push_decimal(out, gid);
    out.push('\t');
    match content {
        ManifestContent::Sha256(hex) => out.push_str(hex),
        ManifestContent::LinkTarget(target) => escape_path_into(out, target),
        ManifestContent::Random => out.push_str("random"),
        ManifestContent::None => out.push('-'),
    }
    out.push('\n');
}

fn push_decimal(out: &mut String, mut n: u32) {
    let mut digits = [0u8; 10];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend(digits[at..].iter().map(|&d| char::from(d)));
}

/// Whether a path of type `ty` is a random seed file, listed as `random` (pure).
pub fn is_random_content(path: &[u8], ty: FileType) -> bool {
    ty == FileType::File && RANDOM_CONTENT_PATHS.iter().any(|p| p.as_bytes() == path)
}

/// Whether `text` is a SHA-256 digest as the report carries it: 64 lowercase hex digits (pure).
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Path, type, mode, uid, gid, content, and the line.
    type Case<'a> = (&'a [u8], FileType, u32, u32, u32, ManifestContent, &'a str);

    #[test]
    fn lines() {
        let sha = "a".repeat(64);
        let cases: &[Case] = &[
            (b"/", FileType::Directory, 0o755, 0, 0, ManifestContent::None, "/\tdirectory\t0755\t0:0\t-\n"),
            (
                b"/etc/hostname",
                FileType::File,
                0o100644,
                0,
                0,
                ManifestContent::Sha256(sha.clone()),
                &format!("/etc/hostname\tfile\t0644\t0:0\t{sha}\n"),
            ),
            (
                b"/bin",
                FileType::Symlink,
                0o777,
                0,
                0,
                ManifestContent::LinkTarget(b"usr/bin".to_vec()),
                "/bin\tsymlink\t0777\t0:0\tusr/bin\n",
            ),
            (
                b"/x\tSUCCESS\n",
                FileType::Symlink,
                0o777,
                1000,
                100,
                ManifestContent::LinkTarget(b"a\nb\xff".to_vec()),
                "/x\\tSUCCESS\\n\tsymlink\t0777\t1000:100\ta\\nb\\xff\n",
            ),
            (
                b"/usr/bin/su",
                FileType::File,
                0o4755,
                0,
                0,
                ManifestContent::Random,
                "/usr/bin/su\tfile\t4755\t0:0\trandom\n",
            ),
        ];
        for (path, ty, mode, uid, gid, content, want) in cases {
            assert_eq!(manifest_line(path, *ty, *mode, *uid, *gid, content), *want);
        }
    }

    #[test]
    fn random_seed_files_are_listed_as_random() {
        let sha = ManifestContent::Sha256("b".repeat(64));
        assert_eq!(content_for(b"/var/lib/systemd/random-seed", FileType::File, sha.clone()), ManifestContent::Random);
        assert_eq!(content_for(b"/var/lib/systemd/random-seed2", FileType::File, sha.clone()), sha);
        // A directory of that name is no seed.
        assert_eq!(content_for(b"/etc/random-seed", FileType::Directory, ManifestContent::None), ManifestContent::None);
        assert!(is_sha256_hex(&"0".repeat(64)));
        assert!(!is_sha256_hex(&"A".repeat(64)) && !is_sha256_hex("abc"));
    }
}
