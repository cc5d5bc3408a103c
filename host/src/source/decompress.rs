//! Compressed raw images decoded in Rust: gzip (flate2's Rust backend), xz (lzma-rust2), zstd
//! (ruzstd). Their uncompressed sizes come from the formats' own records, parsed here too: the
//! xz index at the end of the file, the zstd frame header. No C decoder sees image data.

use crate::source::Format;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Memory one xz block may use while decoding (LZMA2 dictionaries of `xz -9` need 64 MiB).
const XZ_MEM_LIMIT_KIB: u32 = 1 << 20;

/// An xz stream header's length (magic, flags, CRC32).
const XZ_HEADER_BYTES: u64 = 12;
/// An xz stream footer's length (CRC32, backward size, flags, magic).
const XZ_FOOTER_BYTES: u64 = 12;
/// The fewest bytes an xz index record takes (two one-byte varints).
const XZ_MIN_RECORD_BYTES: u64 = 2;

/// A reader of `inner`'s decompressed bytes.
pub fn decompressor<'a, R: Read + Send + 'a>(format: Format, inner: R) -> Box<dyn Read + Send + 'a> {
    let buffered = BufReader::with_capacity(1 << 20, inner);
    match format {
        Format::Gzip => Box::new(flate2::read::MultiGzDecoder::new(buffered)),
        Format::Xz => Box::new(lzma_rust2::XzReader::new_mem_limit(buffered, true, XZ_MEM_LIMIT_KIB)),
        Format::Zstd => match ruzstd::decoding::StreamingDecoder::new(buffered) {
            Ok(d) => Box::new(MultiFrame(Some(d))),
            Err(e) => Box::new(FailingReader(Some(std::io::Error::other(format!("zstd: {e}"))))),
        },
        _ => Box::new(buffered),
    }
}

/// Every zstd frame of the file, one after the other (as `zstd -d` reads concatenated frames).
struct MultiFrame<R: std::io::BufRead>(Option<ruzstd::decoding::StreamingDecoder<R, ruzstd::decoding::FrameDecoder>>);

impl<R: std::io::BufRead> Read for MultiFrame<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let Some(d) = self.0.as_mut() else { return Ok(0) };
            let n = d.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            // This frame is done: another may follow.
            let (mut source, decoder) = self.0.take().expect("present").into_parts();
            if source.fill_buf()?.is_empty() {
                return Ok(0);
            }
            let next = ruzstd::decoding::StreamingDecoder::new_with_decoder(source, decoder)
                .map_err(|e| std::io::Error::other(format!("zstd: {e}")))?;
            self.0 = Some(next);
        }
    }
}

struct FailingReader(Option<std::io::Error>);

impl Read for FailingReader {
    fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
        Err(self.0.take().unwrap_or_else(|| std::io::Error::other("decoder failed")))
    }
}

/// The uncompressed size of a compressed file, when its format records it.
pub fn uncompressed_size(format: Format, path: &Path) -> Option<u64> {
    let file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    match format {
        Format::Xz => {
            let mut footer = [0u8; 12];
            file.read_exact_at(&mut footer, len.checked_sub(XZ_FOOTER_BYTES)?).ok()?;
            let index_len = xz_index_len(&footer)?;
            // The footer's backward size is image data: it must fit in the file (behind a
            // stream header) before anything is allocated for it.
            if index_len > len.checked_sub(XZ_HEADER_BYTES + XZ_FOOTER_BYTES)? {
                return None;
            }
            let mut index = vec![0u8; usize::try_from(index_len).ok()?];
            file.read_exact_at(&mut index, len.checked_sub(XZ_FOOTER_BYTES + index_len)?).ok()?;
            let (uncompressed, blocks) = xz_index_sizes(&index)?;
            // One stream exactly (header, blocks, index, footer): else the size is unknown.
            (XZ_HEADER_BYTES.checked_add(blocks)?.checked_add(index_len)?.checked_add(XZ_FOOTER_BYTES)? == len)
                .then_some(uncompressed)
        }
        Format::Zstd => {
            let mut header = [0u8; 18];
            let n = file.read_at(&mut header, 0).ok()?;
            zstd_content_size(&header[..n])
        }
        _ => None,
    }
}

/// The xz index length from the stream footer (pure).
pub fn xz_index_len(footer: &[u8; 12]) -> Option<u64> {
    if &footer[10..] != b"YZ" {
        return None;
    }
    let backward = u32::from_le_bytes(footer[4..8].try_into().ok()?);
    Some((u64::from(backward) + 1) * 4)
}

fn varint(b: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for i in 0..9 {
        let byte = *b.get(*pos)?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// (uncompressed bytes, bytes of the blocks as stored) from an xz index (pure).
pub fn xz_index_sizes(index: &[u8]) -> Option<(u64, u64)> {
    if index.first() != Some(&0) {
        return None;
    }
    let mut pos = 1;
    let records = varint(index, &mut pos)?;
    // A count the index cannot hold is a lie: refuse it before looping over it.
    if records > (index.len() as u64) / XZ_MIN_RECORD_BYTES {
        return None;
    }
    let (mut uncompressed, mut stored) = (0u64, 0u64);
    for _ in 0..records {
        let unpadded = varint(index, &mut pos)?;
        uncompressed = uncompressed.checked_add(varint(index, &mut pos)?)?;
        stored = stored.checked_add(unpadded.checked_add(3)? & !3)?;
        if pos > index.len() {
            return None;
        }
    }
    Some((uncompressed, stored))
}

/// The content size a zstd frame header declares, if it declares one (pure).
pub fn zstd_content_size(h: &[u8]) -> Option<u64> {
    if h.get(..4)? != [0x28, 0xb5, 0x2f, 0xfd] {
        return None;
    }
    let fhd = *h.get(4)?;
    let single_segment = fhd & 0x20 != 0;
    let dict_len = [0usize, 1, 2, 4][usize::from(fhd & 3)];
    let fcs_len = match fhd >> 6 {
        0 if single_segment => 1,
        0 => return None,
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let at = 5 + usize::from(!single_segment) + dict_len;
    let field = h.get(at..at + fcs_len)?;
    let mut bytes = [0u8; 8];
    bytes[..fcs_len].copy_from_slice(field);
    let value = u64::from_le_bytes(bytes);
    Some(if fcs_len == 2 { value + 256 } else { value })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sh(script: &str) {
        let ok = Command::new("sh").arg("-c").arg(script).status().expect("sh");
        assert!(ok.success(), "{script}");
    }

    fn decoded(format: Format, path: &Path) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        decompressor(format, std::fs::File::open(path)?).read_to_end(&mut out)?;
        Ok(out)
    }

    /// Files made by the real xz, zstd and gzip tools (several streams and frames, a cut one):
    /// decoded byte for byte, sizes read from their indexes and headers, truncation an error.
    #[test]
    fn real_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i / 3 % 251) as u8 ^ (i >> 17) as u8).collect();
        std::fs::write(dir.path().join("raw"), &data).unwrap();
        sh(&format!(
            "cd {d} && xz -kc raw > one.xz && (xz -c raw; xz -c raw) > two.xz && zstd -qc raw > one.zst && \
             (zstd -qc raw; zstd -qc raw) > two.zst && gzip -c raw > one.gz && head -c $(($(stat -c %s one.xz) / 2)) one.xz > cut.xz && \
             head -c $(($(stat -c %s one.zst) / 2)) one.zst > cut.zst && head -c -20 one.xz > nofooter.xz"
        ));
        let twice = [data.clone(), data.clone()].concat();
        for (name, format, want, size) in [
            ("one.xz", Format::Xz, &data, Some(data.len() as u64)),
            ("two.xz", Format::Xz, &twice, None),
            ("one.zst", Format::Zstd, &data, Some(data.len() as u64)),
            ("two.zst", Format::Zstd, &twice, Some(data.len() as u64)),
            ("one.gz", Format::Gzip, &data, None),
        ] {
            let path = dir.path().join(name);
            assert!(decoded(format, &path).unwrap() == *want, "{name} decodes wrong");
            assert_eq!(uncompressed_size(format, &path), size, "{name}");
        }
        assert!(decoded(Format::Xz, &dir.path().join("cut.xz")).is_err());
        assert!(decoded(Format::Xz, &dir.path().join("nofooter.xz")).is_err());
        assert!(decoded(Format::Zstd, &dir.path().join("cut.zst")).is_err());
    }

    #[test]
    fn headers() {
        let mut footer = [0u8; 12];
        footer[4..8].copy_from_slice(&3u32.to_le_bytes());
        footer[10..].copy_from_slice(b"YZ");
        assert_eq!(xz_index_len(&footer), Some(16));
        assert_eq!(xz_index_len(&[0u8; 12]), None);
        // One record: 100 bytes stored (unpadded 98), 1000 uncompressed.
        assert_eq!(xz_index_sizes(&[0, 1, 98, 0xe8, 0x07, 0, 0, 0]), Some((1000, 100)));
        assert_eq!(xz_index_sizes(&[0, 2, 98]), None);
        assert_eq!(xz_index_sizes(&[1, 0]), None);
        assert_eq!(zstd_content_size(&[0x28, 0xb5, 0x2f, 0xfd, 0x20, 42]), Some(42));
        assert_eq!(zstd_content_size(&[0x28, 0xb5, 0x2f, 0xfd, 0xa0, 0x10, 0, 0, 0]), Some(16));
        assert_eq!(zstd_content_size(&[0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x58]), None);
        assert_eq!(zstd_content_size(&[0x28, 0xb5, 0x2f, 0xfd, 0x40, 0x58, 1, 0]), Some(257));
        assert_eq!(zstd_content_size(b"not zstd"), None);
    }

    proptest::proptest! {
        #[test]
        /// What the parsers accept is consistent: stored xz blocks are padded to 4 bytes, an
        /// index holds no more records than its bytes can, a zstd size needs the magic, an
        /// index length is a multiple of 4.
        fn parsers_accept_consistent_values(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            if let Some((_, stored)) = xz_index_sizes(&bytes) {
                proptest::prop_assert_eq!(stored % 4, 0);
                let mut pos = 1;
                let records = varint(&bytes, &mut pos).unwrap_or(0);
                proptest::prop_assert!(records <= bytes.len() as u64 / XZ_MIN_RECORD_BYTES);
            }
            if zstd_content_size(&bytes).is_some() {
                proptest::prop_assert!(bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]));
            }
            let mut f = [0u8; 12];
            let n = bytes.len().min(12);
            f[..n].copy_from_slice(&bytes[..n]);
            if let Some(len) = xz_index_len(&f) {
                proptest::prop_assert!(len % 4 == 0 && len >= 4 && &f[10..] == b"YZ");
            }
        }
    }
}
