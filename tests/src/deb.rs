//! Debian test packages built by the test itself with `dpkg-deb --build` (a few hundred bytes
//! each, not cached), and read-back of dpkg's database from a mounted guest.

use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The file `imgforge-test-hello` installs.
pub const HELLO_FILE: &str = "/usr/share/imgforge-test/hello";
/// The file `imgforge-test-lib` (hello's dependency) installs.
pub const LIB_FILE: &str = "/usr/share/imgforge-test/lib";

/// Builds `NAME_VERSION_all.deb` in `dir`, shipping `/usr/share/imgforge-test/FILE` (holding
/// `NAME VERSION`), depending on `depends` when given.
pub fn build(dir: &Path, name: &str, version: &str, file: &str, depends: Option<&str>) -> Result<PathBuf> {
    let tree = tempfile::tempdir()?;
    std::fs::create_dir_all(tree.path().join("DEBIAN"))?;
    std::fs::create_dir_all(tree.path().join("usr/share/imgforge-test"))?;
    std::fs::write(tree.path().join("usr/share/imgforge-test").join(file), format!("{name} {version}\n"))?;
    let mut control = format!(
        "Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: imgforge tests <tests@example.invalid>\n"
    );
    if let Some(dep) = depends {
        control += &format!("Depends: {dep}\n");
    }
    control += "Description: imgforge test package\n";
    std::fs::write(tree.path().join("DEBIAN/control"), control)?;
    std::fs::create_dir_all(dir)?;
    let deb = dir.join(format!("{name}_{version}_all.deb"));
    let out = Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(tree.path())
        .arg(&deb)
        .output()
        .context("dpkg-deb (apt-get install dpkg)")?;
    ensure!(out.status.success(), "dpkg-deb failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(deb)
}

/// A directory of `.deb` files (no index): `imgforge-test-hello`, which depends on
/// `imgforge-test-lib`, and that library.
pub fn hello_and_lib(dir: &Path) -> Result<PathBuf> {
    build(dir, "imgforge-test-hello", "1.0", "hello", Some("imgforge-test-lib"))?;
    build(dir, "imgforge-test-lib", "1.0", "lib", None)?;
    Ok(dir.to_owned())
}

/// The `Status:` dpkg's database (`/var/lib/dpkg/status` under `root`) gives `package`, if any.
pub fn dpkg_status(root: &Path, package: &str) -> Result<Option<String>> {
    let text = std::fs::read_to_string(root.join("var/lib/dpkg/status")).context("reading /var/lib/dpkg/status")?;
    Ok(text.split("\n\n").find_map(|paragraph| {
        let mut lines = paragraph.lines();
        let named = lines.clone().any(|l| l == format!("Package: {package}"));
        named.then(|| lines.find_map(|l| l.strip_prefix("Status: ")).unwrap_or_default().to_owned())
    }))
}

/// Whether dpkg's database says `package` is installed.
pub fn installed(root: &Path, package: &str) -> Result<bool> {
    Ok(dpkg_status(root, package)?.as_deref() == Some("install ok installed"))
}
