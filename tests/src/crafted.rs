//! Hostile images built by the tests: small compressed files that decode to far more than they
//! announce (or than any small target holds), and what a disk's start looks like afterwards.

use crate::fixtures::sh;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The byte every crafted image decodes to: not zero, so no zero-skipping hides a write.
pub const FILL: u8 = 0xab;
/// What every crafted image decodes to in all.
pub const DECODED_BYTES: u64 = 64 << 20;
/// What a crafted image's first frame, member or stream announces.
pub const ANNOUNCED_BYTES: u32 = 4096;
/// The size of a zstd RLE block: the largest block zstd allows.
const RLE_BLOCK_BYTES: u32 = 128 << 10;

/// A zstd frame of RLE blocks of [`FILL`]; `declared`: the content size its header announces.
fn zstd_rle_frame(declared: Option<u32>, decoded: u32) -> Vec<u8> {
    let mut frame = vec![0x28, 0xb5, 0x2f, 0xfd];
    match declared {
        // Four-byte content size, a 2 MiB window (0x58: windowLog 21).
        Some(n) => {
            frame.extend([0x80, 0x58]);
            frame.extend(n.to_le_bytes());
        }
        None => frame.extend([0x00, 0x58]),
    }
    let blocks = decoded.div_ceil(RLE_BLOCK_BYTES);
    for i in 0..blocks {
        let size = (decoded - i * RLE_BLOCK_BYTES).min(RLE_BLOCK_BYTES);
        let last = u32::from(i + 1 == blocks);
        frame.extend(&(size << 3 | 1 << 1 | last).to_le_bytes()[..3]);
        frame.push(FILL);
    }
    frame
}

/// A 2 KB `.zst`: a first frame announcing 4 KiB, then a frame announcing nothing; 64 MiB in all.
pub fn zstd_frames(dir: &Path) -> PathBuf {
    let path = dir.join("frames.raw.zst");
    let rest = (DECODED_BYTES - u64::from(ANNOUNCED_BYTES)) as u32;
    let bytes = [zstd_rle_frame(Some(ANNOUNCED_BYTES), ANNOUNCED_BYTES), zstd_rle_frame(None, rest)].concat();
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A 2 KB `.zst` whose only frame announces 4 KiB and holds 64 MiB (a lying header).
pub fn zstd_liar(dir: &Path) -> PathBuf {
    let path = dir.join("liar.raw.zst");
    std::fs::write(&path, zstd_rle_frame(Some(ANNOUNCED_BYTES), DECODED_BYTES as u32)).unwrap();
    path
}

/// Compresses [`FILL`] bytes with `tool`: a member/stream of 4 KiB, then one of the rest.
fn concatenated(dir: &Path, tool: &str, ext: &str) -> PathBuf {
    let path = dir.join(format!("members.raw.{ext}"));
    let fill = |n: u64| format!("head -c {n} /dev/zero | tr '\\0' '\\{FILL:o}' | {tool} -c");
    let script = format!(
        "({}; {}) > '{}'",
        fill(u64::from(ANNOUNCED_BYTES)),
        fill(DECODED_BYTES - u64::from(ANNOUNCED_BYTES)),
        path.display()
    );
    sh(Command::new("sh").arg("-c").arg(script)).unwrap();
    path
}

/// Two gzip members, 64 MiB in all.
pub fn gzip_members(dir: &Path) -> PathBuf {
    concatenated(dir, "gzip -1", "gz")
}

/// Two xz streams, 64 MiB in all.
pub fn xz_streams(dir: &Path) -> PathBuf {
    concatenated(dir, "xz -0", "xz")
}

/// A regular file of `size` bytes of 0xff (a `--force` target or a Ganeti file disk).
pub fn filled_file(path: &Path, size: u64) -> PathBuf {
    std::fs::write(path, vec![0xffu8; size as usize]).unwrap();
    path.to_owned()
}

/// The first `len` bytes of a file or device (read back without imgforge).
pub fn head(path: &Path, len: usize) -> Vec<u8> {
    use std::io::Read;
    let mut out = vec![0u8; len];
    std::fs::File::open(path).unwrap().read_exact(&mut out).unwrap();
    out
}

/// A loop device (direct I/O) over a file of `size` bytes of 0xff, unmounted and detached on
/// drop.
pub struct Loop {
    /// `/dev/loopN`.
    pub dev: String,
}

impl Loop {
    /// Attaches a new loop device over `dir/name`, filled with 0xff.
    pub fn filled(dir: &Path, name: &str, size: u64) -> Self {
        let backing = filled_file(&dir.join(name), size);
        let dev = sh(Command::new("losetup").args(["--find", "--show", "--direct-io=on"]).arg(&backing))
            .unwrap()
            .trim()
            .to_owned();
        Self { dev }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        // A test may have mounted it: a mounted loop device does not detach.
        let _ = Command::new("umount").arg(&self.dev).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}
