//! `imgforge inspect`: tables and filesystems from headers, for every kind of image.

use imgforge_tests::fixtures::{self, sh, Shape};
use imgforge_tests::run::{code, imgforge};
use std::process::Command;

fn inspect(path: &std::path::Path) -> serde_json::Value {
    let out = imgforge(&["inspect", "--json", path.to_str().unwrap()]);
    assert_eq!(code(&out), 0);
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn disks_liveimgs_and_converted_images() {
    let gpt = inspect(&fixtures::disk(Shape::GptXfsBoot).unwrap());
    assert_eq!(gpt["format"], "raw");
    assert_eq!(gpt["partition_table"]["type"], "gpt");
    let kinds: Vec<&str> = gpt["filesystems"].as_array().unwrap().iter().map(|f| f["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ext4", "xfs"]);
    assert_eq!(gpt["filesystems"][1]["uuid"], fixtures::ROOT_UUID);

    let lvm = inspect(&fixtures::disk(Shape::LvmExt4).unwrap());
    assert_eq!(lvm["partition_table"]["partitions"][0]["type_id"], "8e");
    assert_eq!(lvm["filesystems"][0]["type"], "LVM2_member");

    let live = inspect(&fixtures::liveimg("zstd").unwrap());
    assert_eq!(live["format"], "liveimg");
    assert_eq!(live["liveimg"]["compressor"], "zstd");
    assert_eq!(live["liveimg"]["rootfs"], "LiveOS/rootfs.img");
    assert_eq!(live["filesystems"][0]["type"], "ext4");

    let dir = tempfile::tempdir().unwrap();
    let dos = fixtures::disk(Shape::DosExt4).unwrap();
    let qcow2 = dir.path().join("d.qcow2");
    sh(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&dos).arg(&qcow2)).unwrap();
    let zst = dir.path().join("d.raw.zst");
    sh(Command::new("sh").arg("-c").arg(format!("zstd -q -c {} > {}", dos.display(), zst.display()))).unwrap();
    for (path, format) in [(qcow2, "qcow2"), (zst, "zstd")] {
        let r = inspect(&path);
        assert_eq!(r["format"], format);
        assert_eq!(r["virtual_size"], 1u64 << 30);
        assert_eq!(r["filesystems"][0]["type"], "ext4", "{format}");
        assert_eq!(r["filesystems"][0]["label"], "root", "{format}");
    }
}

#[test]
fn bad_images_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    for (path, want) in
        [(dir.path().to_path_buf(), "directory"), (empty, "empty"), (dir.path().join("missing"), "missing")]
    {
        let out = imgforge(&["inspect", path.to_str().unwrap()]);
        assert_eq!(code(&out), 2);
        assert!(String::from_utf8_lossy(&out.stderr).contains(want));
    }
}
