//! Stand-in qemus: scripts given as `--qemu` that play a helper VM's serial ports, so a test
//! can make the "guest" say anything without booting one.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Writes `dir/name`, a bash stand-in qemu that finds the console and report descriptors
/// imgforge passes (`fd=N,opaque=console|report`) as `$c` and `$r`, then runs `body`.
pub fn serial_qemu(dir: &Path, name: &str, body: &str) -> PathBuf {
    // qemu runs as an unprivileged uid: the script and its directory must be open to it.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.join(name);
    let script = format!(
        r#"#!/bin/bash
for a in "$@"; do
  case "$a" in
    fd=*,opaque=console) c=${{a#fd=}}; c=${{c%%,*}} ;;
    fd=*,opaque=report) r=${{a#fd=}}; r=${{r%%,*}} ;;
  esac
done
{body}"#
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}
