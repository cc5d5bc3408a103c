//! Loads the kernel modules the helper image lists, in dependency order.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// The list of modules to load at boot, one path a line, dependencies first (written by the
/// helper image build).
pub const LOAD_LIST: &str = "/lib/modules/imgforge.load";

/// Loads each module in `list`; returns warnings for those that failed.
pub fn load_listed(list: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(list) else {
        return vec![format!("module list {} is missing", list.display())];
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|path| load(Path::new(path)).err())
        .collect()
}

fn load(path: &Path) -> Result<(), String> {
    let file = File::open(path).map_err(|e| format!("cannot open module {}: {e}", path.display()))?;
    let params = c"";
    // SAFETY: the fd is open for the duration of the call and params is NUL-terminated.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST) => Ok(()),
        _ => Err(format!("cannot load module {}: {err}", path.display())),
    }
}
