//! Loads kernel modules: the boot set at start, the rest on demand (`imgforge-helper modprobe`),
//! each with its dependencies first, as the helper image build resolved them.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::ExitCode;

/// `NAME [boot] PATH...` a line: a module, whether it loads at boot, and the files to load
/// for it, dependencies first (written by the helper image build).
pub const MODULE_MAP: &str = "/lib/modules/imgforge.modules";

/// One module of the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Loaded before the rules are read.
    pub boot: bool,
    /// Files to load, in order.
    pub paths: Vec<String>,
}

/// Parses the module map (pure).
pub fn parse_map(text: &str) -> Vec<(String, Entry)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let name = words.next()?.to_owned();
            let mut boot = false;
            let mut paths = Vec::new();
            for w in words {
                if w == "boot" {
                    boot = true;
                } else {
                    paths.push(w.to_owned());
                }
            }
            Some((name, Entry { boot, paths }))
        })
        .collect()
}

fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Loads the boot set; returns warnings for modules that failed.
pub fn load_boot_set() -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(MODULE_MAP) else {
        return vec![format!("module map {MODULE_MAP} is missing")];
    };
    parse_map(&text)
        .into_iter()
        .filter(|(_, e)| e.boot)
        .flat_map(|(_, e)| e.paths)
        .filter_map(|p| load(Path::new(&p)).err())
        .collect()
}

/// `imgforge-helper modprobe NAME...`: loads modules and their dependencies.
pub fn modprobe_main(names: &[String]) -> ExitCode {
    let map: HashMap<String, Entry> = match std::fs::read_to_string(MODULE_MAP) {
        Ok(t) => parse_map(&t).into_iter().map(|(n, e)| (normalize(&n), e)).collect(),
        Err(e) => {
            eprintln!("imgforge-helper modprobe: cannot read {MODULE_MAP}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    for name in names {
        match map.get(&normalize(name)) {
            // Built into the kernel (or already part of the boot set): nothing to load.
            None => {}
            Some(e) => {
                for path in &e.paths {
                    if let Err(err) = load(Path::new(path)) {
                        eprintln!("imgforge-helper modprobe: {err}");
                        failed = true;
                    }
                }
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_lines() {
        let map = parse_map("# c\nvirtio_blk boot /a.ko /b.ko\next4 /c.ko /d.ko\n\nbuiltin\n");
        assert_eq!(map.len(), 3);
        assert_eq!(map[0], ("virtio_blk".into(), Entry { boot: true, paths: vec!["/a.ko".into(), "/b.ko".into()] }));
        assert_eq!(map[1].1, Entry { boot: false, paths: vec!["/c.ko".into(), "/d.ko".into()] });
        assert_eq!(map[2].1.paths, Vec::<String>::new());
    }
}
