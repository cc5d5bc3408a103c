//! Loads kernel modules: the boot set at start, the rest on demand (`imgforge-helper modprobe`),
//! each with its dependencies first, as the helper image build resolved them.

use imgforge_protocol::helper_vm::MODULE_MAP;
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::ExitCode;

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

/// The preload thread: it yields the failures and the guest uptime (ms) when it was done.
pub type Preload = std::thread::JoinHandle<(Vec<String>, u64)>;

/// Loads `names` on a thread of their own, so that their relocation runs while the main thread
/// waits for the floppy and for the first tasks' reads. The tasks load on demand anyway: a
/// wrong hint costs time, never correctness.
pub fn spawn_preload(names: Vec<String>) -> Preload {
    std::thread::spawn(move || {
        let failures = load_modules(&names);
        (failures, crate::reporter::uptime_ms())
    })
}

/// Loads the named modules with their dependencies; returns the failures.
pub fn load_modules(names: &[String]) -> Vec<String> {
    match std::fs::read_to_string(MODULE_MAP) {
        Ok(t) => load_named(&t, names),
        Err(e) => vec![format!("cannot read {MODULE_MAP}: {e}")],
    }
}

/// Loads the named modules of the map `text` with their dependencies; returns the failures.
fn load_named(text: &str, names: &[String]) -> Vec<String> {
    let map: HashMap<String, Entry> = parse_map(text).into_iter().map(|(n, e)| (normalize(&n), e)).collect();
    names
        .iter()
        // Not in the map: built into the kernel (or part of the boot set), nothing to load.
        .filter_map(|name| map.get(&normalize(name)))
        .flat_map(|e| e.paths.iter())
        .filter_map(|path| load(Path::new(path)).err())
        .collect()
}

/// `imgforge-helper modprobe NAME...`: loads modules and their dependencies.
pub fn modprobe_main(names: &[String]) -> ExitCode {
    let failures = load_modules(names);
    for err in &failures {
        eprintln!("imgforge-helper modprobe: {err}");
    }
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// How long a module another thread is loading may take to become live.
const COMING_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Whether the module of file `path` is loaded and initialized (its `initstate` reads `live`),
/// waiting while another thread (the preload) is still loading it. Loading it again would only
/// fail with EEXIST, after the kernel read and laid out the whole file (25 ms for xfs under
/// TCG).
fn is_live(path: &Path) -> bool {
    let Some(stem) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.split('.').next()) else {
        return false;
    };
    let state = Path::new("/sys/module").join(normalize(stem)).join("initstate");
    let started = std::time::Instant::now();
    loop {
        match std::fs::read_to_string(&state).as_deref().map(str::trim) {
            Ok("live") => return true,
            Ok("coming") if started.elapsed() < COMING_WAIT => std::thread::sleep(std::time::Duration::from_millis(2)),
            _ => return false,
        }
    }
}

fn load(path: &Path) -> Result<(), String> {
    if is_live(path) {
        return Ok(());
    }
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
