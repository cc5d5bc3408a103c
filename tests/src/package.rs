//! The Debian package of the binary under test, built by `scripts/package.sh` (the script a
//! person runs), from that binary: no second build.

use crate::fixtures::sh;
use crate::run::binary;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds `imgforge_<version>_amd64.deb` of the binary under test into `out`; returns its path.
/// With `lintian`, the build fails on any tag lintian prints.
pub fn build_deb(out: &Path, lintian: bool) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").join("scripts/package.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(script).arg("--binary").arg(binary()).arg("--out").arg(out);
    if lintian {
        cmd.arg("--lintian");
    }
    let stdout = sh(&mut cmd).unwrap_or_else(|e| panic!("scripts/package.sh: {e:#}"));
    let deb = PathBuf::from(stdout.lines().last().expect("package.sh prints the .deb's path"));
    assert!(deb.is_file() && deb.starts_with(out), "{}", deb.display());
    deb
}
