//! Hostile metadata must cost bounded work: tiny crafted images (built here) that once made the
//! host allocate gigabytes are refused under an address-space cap, with exit 2 and a message.

use imgforge_tests::run::binary;
use std::path::Path;
use std::process::{Command, Output};

/// Address space the host may use on these inputs: far above what `inspect` needs (about
/// 100 MiB of mappings), far below what the crafted inputs once made it allocate.
const ADDRESS_SPACE_CAP_BYTES: u64 = 512 << 20;

/// `imgforge ARGS` under `prlimit --as` (an allocation past the cap aborts the process, which
/// the exit status shows as a signal).
fn imgforge_capped(args: &[&str]) -> Output {
    let out = Command::new("prlimit")
        .arg(format!("--as={ADDRESS_SPACE_CAP_BYTES}"))
        .arg("--")
        .arg(binary())
        .args(args)
        .output()
        .expect("prlimit (util-linux) runs");
    eprintln!(
        "imgforge {args:?} (capped) -> {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr).lines().take(20).collect::<Vec<_>>().join("\n")
    );
    out
}

fn refused_cleanly(out: &Output, image: &Path) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "not refused as bad input (a signal means it ran out of memory): {stderr}");
    assert!(stderr.contains(&image.display().to_string()), "the message does not name the image: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// An 88-byte xz: a stream header, zeros, and a footer whose backward size says the index is
/// 16 GiB long. The index must be bounded by the file before anything is allocated for it.
#[test]
fn an_xz_footer_claiming_a_16_gib_index_is_refused_without_allocating_it() {
    let dir = tempfile::tempdir().unwrap();
    let flags = [0u8, 4];
    let mut header = b"\xfd7zXZ\0".to_vec();
    header.extend_from_slice(&flags);
    header.extend_from_slice(&crc32(&flags).to_le_bytes());
    let mut tail = u32::MAX.to_le_bytes().to_vec();
    tail.extend_from_slice(&flags);
    let mut footer = crc32(&tail).to_le_bytes().to_vec();
    footer.extend_from_slice(&tail);
    footer.extend_from_slice(b"YZ");
    let mut file = header;
    file.resize(88 - footer.len(), 0);
    file.extend_from_slice(&footer);
    assert_eq!(file.len(), 88);
    let image = dir.path().join("index-bomb.xz");
    std::fs::write(&image, &file).unwrap();
    refused_cleanly(&imgforge_capped(&["inspect", image.to_str().unwrap()]), &image);
    let target = dir.path().join("out.raw");
    let out = imgforge_capped(&["write", "--image", image.to_str().unwrap(), "--target", target.to_str().unwrap()]);
    refused_cleanly(&out, &image);
    assert!(!target.exists(), "an output appeared for a refused image");
}

/// A zstd frame that decodes to 1 MiB of zeros in 41 bytes: eight RLE blocks of 128 KiB.
fn zstd_mebibyte_of_zeros() -> Vec<u8> {
    const RLE_BLOCK: u32 = 1 << 1;
    const BLOCK_BYTES: u32 = 128 << 10;
    // Single segment, 4-byte content size: the window is the whole content.
    let mut frame = vec![0x28, 0xb5, 0x2f, 0xfd, 0xa0];
    frame.extend_from_slice(&(1u32 << 20).to_le_bytes());
    for i in 0..8 {
        let header = (BLOCK_BYTES << 3) | RLE_BLOCK | u32::from(i == 7);
        frame.extend_from_slice(&header.to_le_bytes()[..3]);
        frame.push(0);
    }
    frame
}

/// A 52 KB squashfs whose inode table is 1200 metadata blocks of 43 bytes, each decoding to
/// 1 MiB (a metadata block holds at most 8 KiB by the format): once 1.2 GB of memory.
#[test]
fn a_squashfs_with_mebibyte_metadata_blocks_is_refused_in_bounded_memory() {
    const NOT_SET: u64 = u64::MAX;
    const SUPERBLOCK_BYTES: u64 = 96;
    const ZSTD: u16 = 6;
    let frame = zstd_mebibyte_of_zeros();
    let blocks = 1200u64;
    let table_end = SUPERBLOCK_BYTES + blocks * (2 + frame.len() as u64);
    let mut sb = Vec::new();
    sb.extend_from_slice(b"hsqs");
    sb.extend_from_slice(&1u32.to_le_bytes()); // inodes
    sb.extend_from_slice(&0u32.to_le_bytes()); // mtime
    sb.extend_from_slice(&(128u32 << 10).to_le_bytes()); // block size
    sb.extend_from_slice(&0u32.to_le_bytes()); // fragments
    sb.extend_from_slice(&ZSTD.to_le_bytes());
    sb.extend_from_slice(&17u16.to_le_bytes()); // block log
    sb.extend_from_slice(&0u16.to_le_bytes()); // flags
    sb.extend_from_slice(&1u16.to_le_bytes()); // ids
    sb.extend_from_slice(&4u16.to_le_bytes());
    sb.extend_from_slice(&0u16.to_le_bytes());
    for field in [0, table_end, table_end, NOT_SET, SUPERBLOCK_BYTES, table_end, NOT_SET, NOT_SET] {
        // root inode, bytes used, id table, xattrs, inode table, directory table, fragments, export
        sb.extend_from_slice(&field.to_le_bytes());
    }
    assert_eq!(sb.len() as u64, SUPERBLOCK_BYTES);
    let mut file = sb;
    for _ in 0..blocks {
        file.extend_from_slice(&(frame.len() as u16).to_le_bytes());
        file.extend_from_slice(&frame);
    }
    assert_eq!(file.len() as u64, table_end);
    assert!(file.len() < 53_000);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("metadata-bomb.sqfs");
    std::fs::write(&image, &file).unwrap();
    refused_cleanly(&imgforge_capped(&["inspect", image.to_str().unwrap()]), &image);
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for b in bytes {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A helper VM (a stand-in qemu) printing one 400 MiB console line: the host keeps 64 KiB of
/// it, so the run ends with a verdict instead of running out of memory.
#[test]
fn a_400_mib_console_line_costs_bounded_memory() {
    let bin = tempfile::tempdir().unwrap();
    let qemu = imgforge_tests::stand_in::serial_qemu(
        bin.path(),
        "qemu-long-line",
        r#"{ head -c 400M /dev/zero | tr '\0' x; echo; echo after; } >&"$c"
printf 'SUCCESS\n' >&"$r"
"#,
    );
    let img = imgforge_tests::fixtures::disk(imgforge_tests::fixtures::Shape::DosExt4).unwrap();
    let out = imgforge_capped(&[
        "verify",
        "--accel",
        "tcg",
        "--json",
        "--qemu",
        qemu.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // No checks were reported: a bad verdict, exit 1, reached in bounded memory.
    assert_eq!(out.status.code(), Some(1), "{stderr}");
}

/// A gzip disk whose MBR puts a partition at 2 TiB, followed by 1500 gzip members of 64 MiB of
/// zeros each (100 MB that decode to 94 GiB): reaching the partition means decoding them all.
/// SIGTERM must stop `inspect` within seconds (it once went on to the end, the signal caught
/// and never looked at).
#[test]
fn inspect_stops_on_sigterm_in_a_decompression_bomb() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut disk = vec![0u8; 1 << 20];
    disk[446 + 4] = 0x83;
    disk[446 + 8..446 + 12].copy_from_slice(&0xffff_0000u32.to_le_bytes());
    disk[446 + 12..446 + 16].copy_from_slice(&1u32.to_le_bytes());
    disk[510..512].copy_from_slice(&[0x55, 0xaa]);
    std::fs::write(d.join("disk"), &disk).unwrap();
    let ok = Command::new("sh")
        .arg("-c")
        .arg("gzip -1c disk > head.gz && head -c 64M /dev/zero | gzip -1c > zeros.gz")
        .current_dir(d)
        .status()
        .unwrap();
    assert!(ok.success());
    let zeros = std::fs::read(d.join("zeros.gz")).unwrap();
    let image = d.join("bomb.img.gz");
    let mut out = std::fs::File::create(&image).unwrap();
    out.write_all(&std::fs::read(d.join("head.gz")).unwrap()).unwrap();
    for _ in 0..1500 {
        out.write_all(&zeros).unwrap();
    }
    drop(out);
    let mut child = Command::new(binary())
        .args(["inspect", image.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(child.try_wait().unwrap().is_none(), "inspect ended before it was interrupted");
    // SAFETY: kill(2) on the child this test started and has not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > std::time::Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("inspect still ran 10 s after SIGTERM");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted") && stderr.contains("bomb.img.gz"), "{stderr}");
}
