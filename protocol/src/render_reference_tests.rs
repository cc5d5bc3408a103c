//! The buffer-filling renderers against the `format!` ones they replaced.
use crate::change::{escape_each_char, escape_path, escape_path_into, FileType};
use crate::manifest::{manifest_line, manifest_line_into, ManifestContent};
use proptest::prelude::*;

/// escape_path as it was before its shortcut for printable ASCII: every character looked at.
fn old_escape_path(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    escape_each_char(&mut out, bytes);
    out
}

/// manifest_line as it was before the buffer-filling one.
fn old_manifest_line(path: &[u8], ty: FileType, mode: u32, uid: u32, gid: u32, content: &ManifestContent) -> String {
    let content = match content {
        ManifestContent::Sha256(hex) => hex.clone(),
        ManifestContent::LinkTarget(target) => old_escape_path(target),
        ManifestContent::Random => "random".to_owned(),
        ManifestContent::None => "-".to_owned(),
    };
    format!("{}\t{}\t{:04o}\t{uid}:{gid}\t{content}\n", old_escape_path(path), ty.as_str(), mode & 0o7777)
}

/// Every file type, as the `st_mode` type bits name them.
fn types() -> Vec<FileType> {
    [0o100000, 0o040000, 0o120000, 0o020000, 0o060000, 0o010000, 0o140000]
        .into_iter()
        .map(|bits| FileType::from_mode(bits).expect("a Linux file type"))
        .collect()
}

/// Bytes biased to the edges of the fast path: space, '~', DEL, backslash, controls, high bytes,
/// and pieces of UTF-8 (bidi overrides, C1 controls, line separators).
fn tricky_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        any::<u8>().prop_map(|b| vec![b]),
        prop::sample::select(vec![b' ', b'~', 0x7f, b'\\', b'\t', b'\n', b'\r', 0x1f, 0x00, 0x80, 0xff, b'/', b'a'])
            .prop_map(|b| vec![b]),
        prop::sample::select(vec!["\u{202e}", "\u{2066}", "\u{9b}", "\u{2028}", "\u{200f}", "é", "✓", "\u{feff}"])
            .prop_map(|s| s.as_bytes().to_vec()),
        // A UTF-8 sequence cut short.
        prop::sample::select(vec![vec![0xe2, 0x80], vec![0xc3], vec![0xf0, 0x9f, 0x98]]),
    ];
    prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

#[test]
fn escape_is_unchanged_for_every_byte_and_byte_pair() {
    for a in 0..=255u8 {
        assert_eq!(escape_path(&[a]), old_escape_path(&[a]), "{a:#x}");
        for b in 0..=255u8 {
            let p = [b'/', a, b];
            assert_eq!(escape_path(&p), old_escape_path(&p), "{a:#x} {b:#x}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn escape_is_unchanged(bytes in tricky_bytes(), prefix in ".{0,3}") {
        prop_assert_eq!(escape_path(&bytes), old_escape_path(&bytes));
        let mut out = prefix.clone();
        escape_path_into(&mut out, &bytes);
        prop_assert_eq!(out, format!("{prefix}{}", old_escape_path(&bytes)));
    }

    #[test]
    fn manifest_line_is_unchanged(
        path in tricky_bytes(),
        target in tricky_bytes(),
        ty in 0usize..7,
        mode in prop_oneof![any::<u32>(), 0u32..0o200000],
        uid in prop_oneof![any::<u32>(), 0u32..20, Just(u32::MAX)],
        gid in prop_oneof![any::<u32>(), 0u32..20, Just(u32::MAX)],
        which in 0usize..4,
        hex in "[0-9a-f]{64}",
    ) {
        let content = match which {
            0 => ManifestContent::None,
            1 => ManifestContent::Random,
            2 => ManifestContent::Sha256(hex),
            _ => ManifestContent::LinkTarget(target),
        };
        let ty = types()[ty];
        let want = old_manifest_line(&path, ty, mode, uid, gid, &content);
        prop_assert_eq!(manifest_line(&path, ty, mode, uid, gid, &content), want.clone());
        let mut out = String::from("x\n");
        manifest_line_into(&mut out, &path, ty, mode, uid, gid, &content);
        prop_assert_eq!(out, format!("x\n{want}"));
    }
}
