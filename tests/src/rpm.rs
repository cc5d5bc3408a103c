//! RPM fixtures: a Debian guest carrying rpm and dnf (no RPM distribution can be downloaded
//! here), demo packages built with rpmbuild, and a local repository made with createrepo_c.

use crate::fixtures::{dir, lock, sh};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What the demo packages leave in the guest.
pub const POST_MARK: &str = "/var/lib/demo-post-mark";

fn spec(name: &str, body: &str) -> String {
    format!(
        "Name: {name}\nVersion: 1.0\nRelease: 1\nSummary: imgforge fixture {name}\nLicense: MIT\nBuildArch: noarch\n{body}\n%description\nimgforge test fixture.\n"
    )
}

/// The specs: a base package providing what Debian's files give (so rpm accepts scriptlets),
/// a library, an application that requires it and leaves a %post mark, and one whose
/// dependency nothing provides.
fn specs() -> Vec<(&'static str, String)> {
    vec![
        ("imgforge-base-provides", spec("imgforge-base-provides", "Provides: /bin/sh, /bin/bash, /usr/bin/sh, /usr/bin/bash\n%files\n")),
        (
            "libdemo",
            spec("libdemo", "Provides: libdemo-api = 1.0\n%install\nmkdir -p %{buildroot}/usr/share/libdemo\necho libdemo 1.0 > %{buildroot}/usr/share/libdemo/version\n%files\n/usr/share/libdemo/version\n"),
        ),
        (
            "demo",
            spec(
                "demo",
                "Requires: libdemo-api\n%install\nmkdir -p %{buildroot}/usr/bin\nprintf '#!/bin/sh\\necho demo\\n' > %{buildroot}/usr/bin/demo\nchmod 755 %{buildroot}/usr/bin/demo\n%post\necho \"demo post ran\" > /var/lib/demo-post-mark\n%files\n/usr/bin/demo\n",
            ),
        ),
        ("broken", spec("broken", "Requires: no-such-capability-imgforge\n%files\n")),
    ]
}

/// Builds the fixture RPMs (cached); returns the directory holding `NAME-1.0-1.noarch.rpm`.
pub fn packages() -> Result<PathBuf> {
    let out = dir().join("rpms");
    if out.join(".complete").exists() {
        return Ok(out);
    }
    let _l = lock("rpms")?;
    if out.join(".complete").exists() {
        return Ok(out);
    }
    let top = tempfile::Builder::new().prefix("rpmbuild-").tempdir_in(dir())?;
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    for (name, text) in specs() {
        let spec_path = top.path().join(format!("{name}.spec"));
        std::fs::write(&spec_path, text)?;
        sh(Command::new("rpmbuild")
            .args(["--quiet", "-bb", "--define"])
            .arg(format!("_topdir {}", top.path().display()))
            .args([
                "--define",
                "__os_install_post %{nil}",
                "--define",
                "_build_id_links none",
                "--define",
                "_binary_payload w9.gzdio",
            ])
            .arg(&spec_path))
        .with_context(|| format!("rpmbuild {name} (apt-get install rpm)"))?;
        let rpm = top.path().join(format!("RPMS/noarch/{name}-1.0-1.noarch.rpm"));
        std::fs::copy(&rpm, out.join(rpm.file_name().unwrap()))?;
    }
    std::fs::write(out.join(".complete"), "")?;
    Ok(out)
}

/// One fixture RPM by package name.
pub fn package(name: &str) -> Result<PathBuf> {
    Ok(packages()?.join(format!("{name}-1.0-1.noarch.rpm")))
}

/// A yum/dnf repository (createrepo_c) holding libdemo and demo.
pub fn repo() -> Result<PathBuf> {
    let path = dir().join("repo");
    if path.join("repodata/repomd.xml").exists() {
        return Ok(path);
    }
    let _l = lock("repo")?;
    if path.join("repodata/repomd.xml").exists() {
        return Ok(path);
    }
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path)?;
    for name in ["libdemo", "demo"] {
        std::fs::copy(package(name)?, path.join(format!("{name}-1.0-1.noarch.rpm")))?;
    }
    sh(Command::new("createrepo_c").arg("--quiet").arg(&path))
        .context("createrepo_c (apt-get install createrepo-c)")?;
    Ok(path)
}

fn chroot(root: &Path, args: &[&str]) -> Result<String> {
    sh(Command::new("chroot").arg(root).args(args).env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The fixture root with rpm and dnf, rpm's database where RPM distributions keep it, and the
/// base capabilities registered.
pub fn rootfs() -> Result<PathBuf> {
    let done = dir().join("rpm-rootfs");
    if done.join(".complete").exists() {
        return Ok(done);
    }
    let base = crate::fixtures::rootfs()?;
    let base_provides = package("imgforge-base-provides")?;
    let _l = lock("rpm-rootfs")?;
    if done.join(".complete").exists() {
        return Ok(done);
    }
    let tmp = dir().join("rpm-rootfs.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_dir_all(&done);
    sh(Command::new("cp").arg("-a").arg(&base).arg(&tmp))?;
    std::fs::remove_file(tmp.join(".complete"))?;
    std::fs::copy("/etc/resolv.conf", tmp.join("etc/resolv.conf"))?;
    sh(Command::new("mount").args(["-t", "proc", "proc"]).arg(tmp.join("proc")))?;
    let installed = (|| -> Result<()> {
        chroot(&tmp, &["apt-get", "update", "-q"])?;
        chroot(&tmp, &["apt-get", "install", "-y", "-q", "--no-install-recommends", "rpm", "dnf"])?;
        chroot(&tmp, &["apt-get", "clean"])?;
        std::fs::create_dir_all(tmp.join("etc/rpm"))?;
        std::fs::write(tmp.join("etc/rpm/macros.dbpath"), "%_dbpath /var/lib/rpm\n")?;
        chroot(&tmp, &["rpm", "--initdb"])?;
        std::fs::copy(&base_provides, tmp.join("tmp/base.rpm"))?;
        chroot(&tmp, &["rpm", "-i", "/tmp/base.rpm"])?;
        std::fs::remove_file(tmp.join("tmp/base.rpm"))?;
        Ok(())
    })();
    let _ = Command::new("umount").arg(tmp.join("proc")).status();
    installed?;
    std::fs::write(tmp.join(".complete"), "")?;
    std::fs::rename(&tmp, &done)?;
    Ok(done)
}

/// An ext4 image of the RPM root (for liveimgs).
pub fn rootfs_ext4() -> Result<PathBuf> {
    crate::fixtures::fs_image_of("rpm-rootfs.ext4", rootfs)
}

/// A liveimg of the RPM root, compressed with `comp`.
pub fn liveimg(comp: &str) -> Result<PathBuf> {
    crate::fixtures::liveimg_cached(&format!("rpm-live-{comp}.squashfs.img"), comp, rootfs_ext4)
}
