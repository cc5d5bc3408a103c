//! snf-image's `ALLOW_MOUNTED_TASK_OVERWRITING`: an image's own
//! `/root/snf-image/helper/overwrite_task_<Task>` replaces a configuration task. It runs as
//! snf-image runs it (`pre-exec` first; exit 0: the task is done, 101: the task's own work
//! runs, then the program again with `post-exec`; anything else: the task failed), but here
//! chrooted into the guest and confined, as `CUSTOM_TASK` runs.

use crate::confinement::GuestCommand;
use crate::guest::GuestRoot;

/// Where snf-image looks for the image's programs (searched below, as `find -L` does).
pub const DIR: &str = "/root/snf-image/helper";
/// The exit status of `pre-exec` that asks for the task's own work, then `post-exec`.
pub const RUN_ORIGINAL: i32 = 101;
/// How deep below [`DIR`] the search goes (`find -L` stops at loops; a hostile tree could
/// otherwise be endless).
const MAX_DEPTH: usize = 8;
/// How many entries the search looks at, at most.
const MAX_ENTRIES: usize = 10_000;

/// The program's file name for `task` (matched case-insensitively, as `find -iname`).
pub fn file_name(task: &str) -> String {
    format!("overwrite_task_{task}")
}

/// What an image holds for a task.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// No program for the task.
    None,
    /// One executable program, at this guest path.
    Program(String),
    /// What snf-image would not run, and why (for a warning).
    Ignored(String),
}

/// Looks for the image's program replacing `task` under [`DIR`], every path resolved inside
/// the guest root. As snf-image: exactly one regular file of that name (any case) that is
/// executable; several, or one not executable, are not run.
pub fn find(guest: &GuestRoot, task: &str) -> Found {
    let wanted = file_name(task);
    let mut hits = Vec::new();
    let mut stack = vec![(DIR.to_owned(), 0usize)];
    let mut seen = 0usize;
    while let Some((dir, depth)) = stack.pop() {
        let Ok(names) = guest.list_dir(&dir) else { continue };
        for name in names {
            seen += 1;
            if seen > MAX_ENTRIES {
                return Found::Ignored(format!("{DIR} holds more than {MAX_ENTRIES} entries: not searched further"));
            }
            let path = format!("{dir}/{name}");
            if guest.is_dir(&path) {
                if depth < MAX_DEPTH {
                    stack.push((path, depth + 1));
                }
            } else if name.eq_ignore_ascii_case(&wanted) {
                hits.push(path);
            }
        }
    }
    hits.sort();
    match hits.as_slice() {
        [] => Found::None,
        [one] if guest.is_executable(one) => Found::Program(one.clone()),
        [one] => Found::Ignored(format!("{one} is not an executable file: task {task} not overwritten")),
        many => Found::Ignored(format!("several files overwrite task {task} ({}): none run", many.join(", "))),
    }
}

/// Runs the image's `program` with `stage` (`pre-exec` or `post-exec`) as its argument,
/// chrooted and confined with the task's variables: its exit status.
pub fn run(guest: &GuestRoot, program: &str, stage: &str, env: &[(String, String)]) -> Result<i32, String> {
    env.iter()
        .fold(GuestCommand::new(guest, &[program, stage]), |command, (k, v)| command.env(k, v))
        .code()
        .map_err(|e| format!("{program} {stage}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn put(root: &std::path::Path, path: &str, mode: u32) {
        let p = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn finds_one_executable_file_any_case_any_depth() {
        let dir = tempfile::tempdir().unwrap();
        let guest = GuestRoot::open(dir.path()).unwrap();
        assert_eq!(find(&guest, "AssignHostname"), Found::None, "no directory");
        put(dir.path(), "/root/snf-image/helper/OVERWRITE_TASK_assignhostname", 0o755);
        assert_eq!(
            find(&guest, "AssignHostname"),
            Found::Program("/root/snf-image/helper/OVERWRITE_TASK_assignhostname".into())
        );
        assert_eq!(find(&guest, "ChangePassword"), Found::None);
        put(dir.path(), "/root/snf-image/helper/sub/overwrite_task_ChangePassword", 0o644);
        assert!(matches!(find(&guest, "ChangePassword"), Found::Ignored(w) if w.contains("not an executable")));
        put(dir.path(), "/root/snf-image/helper/sub/overwrite_task_AssignHostname", 0o755);
        assert!(matches!(find(&guest, "AssignHostname"), Found::Ignored(w) if w.contains("several")));
        // A symlink out of the root resolves inside it.
        std::fs::create_dir_all(dir.path().join("root/snf-image/helper/x")).unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("root/snf-image/helper/x/etc")).unwrap();
        assert_eq!(find(&guest, "DeleteSSHKeys"), Found::None);
    }
}
