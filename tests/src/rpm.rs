//! RPM fixtures: a Debian guest carrying rpm and dnf (no RPM distribution can be downloaded
//! here), demo packages built with rpmbuild, and a local repository made with createrepo_c.

use crate::fixtures::cache::Recipe;
use crate::fixtures::{recipe, sh, stage_tree};
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

/// This file: what builds the RPM fixtures, hence part of their keys.
const SOURCE: &str = include_str!("rpm.rs");

fn packages_recipe() -> Recipe {
    recipe("rpms", &[SOURCE], &[])
}

/// Builds the package `spec` in rpmbuild's `top` directory, its payload compressed as `payload`
/// (rpm's `_binary_payload`, e.g. `w9.gzdio`), without the post-install processing and build-id
/// links a plain data package does not need.
pub fn rpmbuild(top: &Path, spec: &Path, payload: &str) -> Result<()> {
    sh(Command::new("rpmbuild")
        .args(["--quiet", "-bb", "--define"])
        .arg(format!("_topdir {}", top.display()))
        .args(["--define", "__os_install_post %{nil}", "--define", "_build_id_links none", "--define"])
        .arg(format!("_binary_payload {payload}"))
        .arg(spec))?;
    Ok(())
}

/// Builds the fixture RPMs (cached); returns the directory holding `NAME-1.0-1.noarch.rpm`.
pub fn packages() -> Result<PathBuf> {
    packages_recipe().get_or_build(|out, top| {
        std::fs::create_dir_all(out)?;
        for (name, text) in specs() {
            let spec_path = top.join(format!("{name}.spec"));
            std::fs::write(&spec_path, text)?;
            rpmbuild(top, &spec_path, "w9.gzdio").with_context(|| format!("rpmbuild {name} (apt-get install rpm)"))?;
            let file = format!("{name}-1.0-1.noarch.rpm");
            std::fs::copy(top.join("RPMS/noarch").join(&file), out.join(&file))?;
        }
        Ok(())
    })
}

/// One fixture RPM by package name.
pub fn package(name: &str) -> Result<PathBuf> {
    Ok(packages()?.join(format!("{name}-1.0-1.noarch.rpm")))
}

/// A yum/dnf repository (createrepo_c) holding libdemo and demo.
pub fn repo() -> Result<PathBuf> {
    recipe("repo", &[SOURCE], &[packages_recipe().key()]).get_or_build(|path, _| {
        std::fs::create_dir_all(path)?;
        for name in ["libdemo", "demo"] {
            std::fs::copy(package(name)?, path.join(format!("{name}-1.0-1.noarch.rpm")))?;
        }
        sh(Command::new("createrepo_c").arg("--quiet").arg(path))
            .context("createrepo_c (apt-get install createrepo-c)")?;
        Ok(())
    })
}

fn chroot(root: &Path, args: &[&str]) -> Result<String> {
    sh(Command::new("chroot").arg(root).args(args).env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The recipe of the RPM root tree.
pub fn rootfs_recipe() -> Recipe {
    recipe("rpm-rootfs", &[SOURCE], &[crate::fixtures::rootfs_recipe().key(), packages_recipe().key()])
}

/// The fixture root with rpm and dnf, rpm's database where RPM distributions keep it, and the
/// base capabilities registered.
pub fn rootfs() -> Result<PathBuf> {
    rootfs_recipe().get_or_build(|tree, _| {
        stage_tree(&crate::fixtures::rootfs()?, tree)?;
        let base_provides = package("imgforge-base-provides")?;
        std::fs::copy("/etc/resolv.conf", tree.join("etc/resolv.conf"))?;
        sh(Command::new("mount").args(["-t", "proc", "proc"]).arg(tree.join("proc")))?;
        let installed = (|| -> Result<()> {
            chroot(tree, &["apt-get", "update", "-q"])?;
            chroot(tree, &["apt-get", "install", "-y", "-q", "--no-install-recommends", "rpm", "dnf"])?;
            chroot(tree, &["apt-get", "clean"])?;
            std::fs::create_dir_all(tree.join("etc/rpm"))?;
            std::fs::write(tree.join("etc/rpm/macros.dbpath"), "%_dbpath /var/lib/rpm\n")?;
            chroot(tree, &["rpm", "--initdb"])?;
            std::fs::copy(&base_provides, tree.join("tmp/base.rpm"))?;
            chroot(tree, &["rpm", "-i", "/tmp/base.rpm"])?;
            std::fs::remove_file(tree.join("tmp/base.rpm"))?;
            Ok(())
        })();
        let _ = Command::new("umount").arg(tree.join("proc")).status();
        installed
    })
}

/// An ext4 image of the RPM root (for liveimgs).
pub fn rootfs_ext4() -> Result<PathBuf> {
    crate::fixtures::fs_image_of("rpm-rootfs.ext4", &rootfs_recipe(), rootfs)
}

/// A liveimg of the RPM root, compressed with `comp`.
pub fn liveimg(comp: &str) -> Result<PathBuf> {
    crate::fixtures::liveimg_cached(
        &format!("rpm-live-{comp}.squashfs.img"),
        comp,
        "rpm-rootfs.ext4",
        &rootfs_recipe(),
        rootfs,
    )
}
