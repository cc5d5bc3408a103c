//! liveimg in, liveimg out: customized in the helper, repacked with the source's compressor.

use imgforge_tests::fixtures::sh;
use imgforge_tests::readback::Mount;
use imgforge_tests::rpm;
use imgforge_tests::run::{code, imgforge, s};
use std::path::Path;
use std::process::Command;

fn squashfs_settings(p: &Path) -> (String, String) {
    let out = sh(Command::new("unsquashfs").arg("-s").arg(p)).unwrap();
    let line = |key: &str| out.lines().find(|l| l.starts_with(key)).unwrap_or_default().to_string();
    (line("Compression"), line("Block size"))
}

#[test]
fn liveimg_to_liveimg_keeps_compressor_and_carries_the_package() {
    // xz repacks the same way, only slower: the benchmark covers it.
    {
        let comp = "zstd";
        let live = rpm::liveimg(comp).unwrap();
        let before = sh(Command::new("sha256sum").arg(&live)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out_img = dir.path().join(format!("site-{comp}.squashfs.img"));
        let out = imgforge(&[
            "deploy",
            "--accel",
            "tcg",
            "--image",
            &s(&live),
            "--target-format",
            "liveimg",
            "--target",
            &s(&out_img),
            "--install-rpm",
            &s(&rpm::package("libdemo").unwrap()),
            "--hostname",
            "site1",
        ]);
        assert_eq!(code(&out), 0, "{comp}");
        assert_eq!(squashfs_settings(&out_img), squashfs_settings(&live), "{comp}: compressor or block size changed");
        assert_eq!(sh(Command::new("sha256sum").arg(&live)).unwrap(), before, "{comp}: the source changed");
        let rootfs = dir.path().join("rootfs.img");
        sh(Command::new("sh").arg("-c").arg(format!(
            "unsquashfs -cat '{}' LiveOS/rootfs.img > '{}'",
            out_img.display(),
            rootfs.display()
        )))
        .unwrap();
        let size = std::fs::metadata(&rootfs).unwrap().len();
        let m = Mount::at(&rootfs, 0, size).unwrap();
        assert_eq!(m.read("/etc/hostname").unwrap(), "site1\n");
        assert!(
            Command::new("chroot").arg(m.path()).args(["rpm", "-q", "libdemo"]).status().unwrap().success(),
            "{comp}: package missing"
        );
        drop(m);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}

#[test]
fn liveimg_output_needs_a_liveimg_source() {
    let dir = tempfile::tempdir().unwrap();
    let raw = imgforge_tests::fixtures::synthetic_raw(dir.path()).unwrap();
    let target = dir.path().join("out.squashfs");
    let out = imgforge(&[
        "deploy",
        "--accel",
        "tcg",
        "--image",
        &s(&raw),
        "--target-format",
        "liveimg",
        "--target",
        &s(&target),
        "--hostname",
        "x",
    ]);
    assert_eq!(code(&out), 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a liveimg source"));
    assert!(!target.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "temporary files left");
}
