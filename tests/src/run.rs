//! The imgforge binary under test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::SystemTime;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

fn newest_source(dir: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            let t = if p.is_dir() {
                newest_source(&p)
            } else {
                e.metadata().and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH)
            };
            newest = newest.max(t);
        }
    }
    newest
}

/// The `imgforge` binary: `$IMGFORGE_BIN`, else `target/debug/imgforge`. Refuses a binary
/// older than the sources, so a test never exercises stale code.
pub fn binary() -> PathBuf {
    let path = std::env::var_os("IMGFORGE_BIN").map(PathBuf::from).unwrap_or_else(|| {
        let target =
            std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace().join("target"));
        target.join("debug/imgforge")
    });
    let built = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}: build it first (cargo build --workspace)", path.display()));
    for dir in ["host", "helper", "protocol", "tasks", "helper-image"] {
        assert!(
            newest_source(&workspace().join(dir)) <= built,
            "{} is older than the sources in {dir}/: rebuild it (cargo build --workspace)",
            path.display()
        );
    }
    path
}

/// Runs imgforge with `args` (TCG: KVM hangs on these machines), capturing its output.
pub fn imgforge(args: &[&str]) -> Output {
    let out = Command::new(binary()).args(args).output().expect("cannot run imgforge");
    eprintln!(
        "imgforge {args:?} -> {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `imgforge customize -a DISK --accel tcg OPS...`, capturing its output.
pub fn customize_tcg(disk: &Path, ops: &[&str]) -> Output {
    let disk = s(disk);
    let mut args = vec!["customize", "-a", &disk, "--accel", "tcg"];
    args.extend_from_slice(ops);
    imgforge(&args)
}

/// The exit code (panics on death by signal).
pub fn code(out: &Output) -> i32 {
    out.status.code().expect("imgforge was killed by a signal")
}

/// Processes that hold `path` open (e.g. a leftover qemu).
pub fn holders(path: &Path) -> Vec<u32> {
    let want = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let mut pids = Vec::new();
    for proc_entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = proc_entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else { continue };
        if fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == want)) {
            pids.push(pid);
        }
    }
    pids
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> String {
    p.display().to_string()
}
