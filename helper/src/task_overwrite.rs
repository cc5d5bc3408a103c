//! snf-image's `ALLOW_MOUNTED_TASK_OVERWRITING`: an image's own
//! `/root/snf-image/helper/overwrite_task_<Task>` replaces a configuration task. It runs as
//! snf-image runs it (`pre-exec` first; exit 0: the task is done, 101: the task's own work
//! runs, then the program again with `post-exec`; anything else: the task failed), but here
//! chrooted into the guest and confined, as `CUSTOM_TASK` runs.

use crate::confinement::GuestCommand;
use crate::guest::GuestRoot;
use crate::task_env::TaskEnv;
use imgforge_protocol::rules::Rules;
use std::path::Path;

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

/// Runs `builtin`, the work of snf-image's task `task`, or, when overwriting is allowed (`env`
/// set: the overwriting program's variables) and the image carries one executable
/// `overwrite_task_<task>`, that program in its place (with it when its `pre-exec` exits 101,
/// then its `post-exec`).
pub fn run_task(
    guest: &GuestRoot,
    task: &str,
    env: Option<&[(String, String)]>,
    builtin: impl FnOnce() -> Result<(), String>,
) -> Result<(), String> {
    let Some(env) = env else { return builtin() };
    let program = match find(guest, task) {
        Found::None => return builtin(),
        Found::Ignored(why) => {
            println!("WARNING: {why}");
            return builtin();
        }
        Found::Program(path) => path,
    };
    println!("WARNING: task {task} was overwritten by the image's {program}");
    match run(guest, &program, "pre-exec", env).map_err(|e| format!("task {task}: {e}"))? {
        0 => Ok(()),
        RUN_ORIGINAL => {
            println!("WARNING: running task {task} after {program} pre-exec exited 101, then {program} post-exec");
            builtin()?;
            match run(guest, &program, "post-exec", env).map_err(|e| format!("task {task}: {e}"))? {
                0 => Ok(()),
                code => Err(format!("task {task}: the image's {program} post-exec exited with status {code}")),
            }
        }
        code => Err(format!("task {task}: the image's {program} pre-exec exited with status {code}")),
    }
}

/// [`run_task`] for a task imgforge does as a helper task (FilesystemResizeMounted,
/// SELinuxAutorelabel): whether overwriting is allowed, and with which variables, is read from
/// the run's rules; the guest is the root mounted at `IMGFORGE_TARGET`.
pub fn run_helper_task(vars: &TaskEnv, task: &str, builtin: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    let rules_path = vars.require("IMGFORGE_RULES")?;
    let text = std::fs::read_to_string(rules_path).map_err(|e| format!("cannot read the rules {rules_path}: {e}"))?;
    let rules = Rules::from_json(&text).map_err(|e| e.to_string())?;
    let Some(env) = rules.task_overwriting.as_deref() else { return builtin() };
    let target = vars.require("IMGFORGE_TARGET")?;
    let guest = GuestRoot::open(Path::new(target)).map_err(|e| format!("cannot open the guest root {target}: {e}"))?;
    run_task(&guest, task, Some(env), builtin)
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
