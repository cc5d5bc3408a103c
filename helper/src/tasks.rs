//! Runs the task scripts in run-parts order, logging their output and reporting each.

use crate::layout::SEARCH_PATH;
use crate::reporter::Reporter;
use crate::script;
use crate::task_env::{error_file, Place, TaskEnv};
use imgforge_protocol::line::{read_line_capped, MAX_LINE_BYTES};
use imgforge_protocol::report::ReportLine;
use imgforge_protocol::rules::Rules;
use imgforge_protocol::task::{run_parts_order, TaskName};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How many trailing output lines of a failed task go into its error message.
const ERROR_TAIL_LINES: usize = 15;
/// How long to wait for a finished task's output to drain (a daemon it left may hold the pipe).
const OUTPUT_DRAIN_WAIT: Duration = Duration::from_secs(2);
/// Prefix by which a task's output line becomes a report warning.
const WARNING_PREFIX: &str = "WARNING: ";

/// A task that failed, and why.
#[derive(Debug)]
pub struct TaskFailure {
    /// `NN-Name`.
    pub task: String,
    /// Its error message.
    pub message: String,
}

/// A task built into the helper: what `exec imgforge-helper NAME` would do.
pub type Builtin = fn(&TaskEnv) -> Result<(), String>;

/// The helper's built-in tasks: the one under the subcommand `name`, if any.
pub type Builtins = fn(&str) -> Option<Builtin>;

/// Lists the tasks to run: executables in `dir` in run-parts order, minus the excluded ones.
pub fn plan(dir: &Path, rules: &Rules) -> Result<Vec<TaskName>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot list the tasks in {}: {e}", dir.display()))?;
    let names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    Ok(run_parts_order(names)
        .into_iter()
        .filter(|t| !rules.excluded_tasks.iter().any(|x| x == "*" || x.eq_ignore_ascii_case(t.short())))
        .collect())
}

/// When a [`Hook`] is called: before a task starts, or after it succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Before the task starts.
    Before,
    /// After it succeeded.
    After,
}

/// Work done between tasks (a multi-variant run's tree records); its error fails the task.
pub type Hook<'a> = &'a mut dyn FnMut(When, &TaskName, &mut Reporter) -> Result<(), String>;

/// Runs every planned task, a script that only execs a built-in task as that built-in; stops at
/// the first failure.
pub fn run_all(dir: &Path, rules: &Rules, builtins: Builtins, reporter: &mut Reporter) -> Result<(), TaskFailure> {
    run_all_at(dir, rules, &Place::default(), builtins, reporter, &mut |_, _, _| Ok(()))
}

/// [`run_all`] at `place`, calling `hook` around each task.
pub fn run_all_at(
    dir: &Path,
    rules: &Rules,
    place: &Place,
    builtins: Builtins,
    reporter: &mut Reporter,
    hook: Hook<'_>,
) -> Result<(), TaskFailure> {
    let tasks = plan(dir, rules).map_err(|message| TaskFailure { task: "helper".into(), message })?;
    for task in tasks {
        hook(When::Before, &task, reporter).map_err(|message| TaskFailure { task: task.to_string(), message })?;
        reporter.send(&ReportLine::TaskStart { task: task.to_string() });
        let started = Instant::now();
        let outcome = run_one(&dir.join(task.as_str()), &task, &TaskEnv::at(&task, rules, place), builtins);
        for message in outcome.warnings {
            reporter.send(&ReportLine::Warning { task: task.to_string(), message });
        }
        // Only verify's own tasks print checks; in a customization such a line can only be a
        // guest program's output, which must not read as a verdict.
        for check in outcome.checks.into_iter().filter(|_| rules.verify) {
            reporter.send(&check);
        }
        if let Some(message) = outcome.failure {
            return Err(TaskFailure { task: task.to_string(), message });
        }
        reporter.send(&ReportLine::TaskEnd { task: task.to_string(), millis: started.elapsed().as_millis() as u64 });
        hook(When::After, &task, reporter).map_err(|message| TaskFailure { task: task.to_string(), message })?;
    }
    Ok(())
}

struct Outcome {
    warnings: Vec<String>,
    checks: Vec<ReportLine>,
    failure: Option<String>,
}

struct Output {
    tail: VecDeque<String>,
    warnings: Vec<String>,
    checks: Vec<ReportLine>,
}

fn run_one(path: &Path, task: &TaskName, env: &TaskEnv, builtins: Builtins) -> Outcome {
    let fail = |message: String| Outcome { warnings: Vec::new(), checks: Vec::new(), failure: Some(message) };
    let text = match std::fs::read(path) {
        Ok(t) => String::from_utf8_lossy(&t).into_owned(),
        Err(e) => return fail(format!("cannot read {}: {e}", path.display())),
    };
    let script = script::parse(&text);
    if let Some(unmet) = script.only_if.iter().find(|c| !c.holds(|name| env.get(name))) {
        println!("[{task}] nothing to do (only if {unmet})");
        return Outcome { warnings: Vec::new(), checks: Vec::new(), failure: None };
    }
    let error_path = error_file(task);
    let _ = std::fs::remove_file(&error_path);
    let (writer, capture) = match Capture::start(task) {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot capture the task's output: {e}")),
    };
    let result = match script.builtin.as_deref().and_then(builtins) {
        Some(run) => run_builtin(run, env, writer),
        None => run_script(path, env, writer),
    };
    let output = capture.finish();
    let failure = match result {
        Ok(()) => None,
        Err(Failed::Message(m)) => Some(m),
        Err(Failed::Exited(status)) => Some(failure_message(&error_path, status, &output.tail)),
    };
    Outcome { warnings: output.warnings, checks: output.checks, failure }
}

/// How a task failed: with its message, or with an exit status (its message is then in its
/// error file, or else its last output).
enum Failed {
    Message(String),
    Exited(std::process::ExitStatus),
}

/// A task's output on its way to the console, prefixed with the task's name and scanned for
/// warnings, checks and the last lines.
struct Capture(mpsc::Receiver<Output>);

impl Capture {
    /// The pipe's write end for the task, and the capture reading the other end.
    fn start(task: &TaskName) -> std::io::Result<(std::io::PipeWriter, Self)> {
        let (reader, writer) = std::io::pipe()?;
        let console = File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
        let (tx, rx) = mpsc::channel();
        let label = task.to_string();
        std::thread::spawn(move || {
            let _ = tx.send(forward_output(reader, console, &label));
        });
        Ok((writer, Self(rx)))
    }

    /// What the task wrote, once every write end is closed (or after a grace period).
    fn finish(self) -> Output {
        self.0.recv_timeout(OUTPUT_DRAIN_WAIT).unwrap_or_else(|_| Output {
            tail: VecDeque::new(),
            warnings: vec!["the task left a process holding its output open".into()],
            checks: Vec::new(),
        })
    }
}

/// Runs a built-in task in this process, its output (and that of what it starts) into `writer`.
fn run_builtin(run: Builtin, env: &TaskEnv, writer: std::io::PipeWriter) -> Result<(), Failed> {
    let redirect =
        Redirect::to(writer.into()).map_err(|e| Failed::Message(format!("cannot redirect the task's output: {e}")))?;
    let result = run(env);
    if let Err(message) = &result {
        eprintln!("ERROR: {message}");
    }
    drop(redirect);
    result.map_err(Failed::Message)
}

/// Runs a task script with the task's variables, its output into `writer`.
fn run_script(path: &Path, env: &TaskEnv, writer: std::io::PipeWriter) -> Result<(), Failed> {
    let writer_err =
        writer.try_clone().map_err(|e| Failed::Message(format!("cannot duplicate the task's output pipe: {e}")))?;
    let mut command = Command::new(path);
    command
        .env_clear()
        .env("PATH", SEARCH_PATH)
        .env("HOME", "/root")
        .env("LANG", "C")
        .envs(env.vars())
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer_err);
    let mut child = command.spawn().map_err(|e| Failed::Message(format!("cannot start {}: {e}", path.display())))?;
    // The Command still holds the pipe's write ends; drop it so EOF can arrive.
    drop(command);
    match child.wait() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(Failed::Exited(s)),
        Err(e) => Err(Failed::Message(format!("cannot wait for the task: {e}"))),
    }
}

/// The standard output and error of this process sent into a pipe while a built-in task runs,
/// so that its output, and that of the programs it starts, is logged and scanned exactly like a
/// script's; dropping it puts the console back.
struct Redirect {
    saved: [(i32, OwnedFd); 2],
}

impl Redirect {
    fn to(pipe: OwnedFd) -> std::io::Result<Self> {
        let saved = [
            (1, std::io::stdout().as_fd().try_clone_to_owned()?),
            (2, std::io::stderr().as_fd().try_clone_to_owned()?),
        ];
        for fd in [1, 2] {
            dup2(pipe.as_raw_fd(), fd)?;
        }
        Ok(Self { saved })
    }
}

impl Drop for Redirect {
    fn drop(&mut self) {
        let _ = std::io::stdout().flush();
        for (fd, saved) in &self.saved {
            let _ = dup2(saved.as_raw_fd(), *fd);
        }
    }
}

fn dup2(from: i32, to: i32) -> std::io::Result<()> {
    // SAFETY: dup2 on descriptors this process owns; `to` is 1 or 2, never a Rust-owned fd.
    if unsafe { libc::dup2(from, to) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Copies a task's output to the console line by line, each prefixed with `label`. Lines are
/// capped at [`MAX_LINE_BYTES`] (the rest dropped, with a mark): a guest program printing an
/// endless line must not run the helper VM out of memory.
fn forward_output(reader: impl std::io::Read, mut console: File, label: &str) -> Output {
    let mut out = Output { tail: VecDeque::new(), warnings: Vec::new(), checks: Vec::new() };
    let mut reader = BufReader::new(reader);
    let mut raw = Vec::new();
    while let Ok(true) = read_line_capped(&mut reader, &mut raw, MAX_LINE_BYTES) {
        let line = String::from_utf8_lossy(&raw).trim_end_matches('\r').to_string();
        let _ = writeln!(console, "[{label}] {line}");
        if let Some(w) = line.strip_prefix(WARNING_PREFIX) {
            out.warnings.push(w.to_string());
        }
        // Verify tasks print their results as report lines.
        if line.starts_with("CHECK ") {
            if let Ok(check @ ReportLine::Check { .. }) = ReportLine::parse(&line) {
                out.checks.push(check);
            }
        }
        if out.tail.len() == ERROR_TAIL_LINES {
            out.tail.pop_front();
        }
        out.tail.push_back(line);
    }
    out
}

/// The exit of a task done in Rust: on failure the message goes where the task runner reads
/// it (`IMGFORGE_ERROR_FILE`, what the host reports) and to the console.
pub fn finish(result: Result<(), String>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ERROR: {message}");
            if let Some(path) = std::env::var_os("IMGFORGE_ERROR_FILE") {
                let _ = std::fs::write(path, &message);
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn failure_message(error_path: &Path, status: std::process::ExitStatus, tail: &VecDeque<String>) -> String {
    if let Ok(text) = std::fs::read_to_string(error_path) {
        let text = text.trim();
        if !text.is_empty() {
            return text.to_string();
        }
    }
    let how = match status.code() {
        Some(code) => format!("exited with status {code}"),
        None => format!("was killed ({status})"),
    };
    if tail.is_empty() {
        how
    } else {
        format!("{how}; last output:\n{}", tail.iter().cloned().collect::<Vec<_>>().join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    #[test]
    fn plan_orders_skips_and_excludes() {
        let dir = tempfile::tempdir().unwrap();
        for (name, exec) in [
            ("50-Customize", true),
            ("10-MountRoot", true),
            ("90-Unmount", true),
            ("common.sh", true),
            ("20-NotExec", false),
            ("80-SELinuxRelabel", true),
        ] {
            let p = dir.path().join(name);
            std::fs::write(&p, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(if exec { 0o755 } else { 0o644 })).unwrap();
        }
        let mut rules = Rules::new();
        rules.excluded_tasks = vec!["selinuxrelabel".into()];
        let got: Vec<String> = plan(dir.path(), &rules).unwrap().iter().map(|t| t.to_string()).collect();
        assert_eq!(got, ["10-MountRoot", "50-Customize", "90-Unmount"]);
        rules.excluded_tasks = vec!["*".into()];
        assert!(plan(dir.path(), &rules).unwrap().is_empty());
    }

    fn script(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// A script whose `only-if` does not hold is not started; one that does runs with the
    /// task's variables, its warnings and last output collected.
    #[test]
    fn scripts_run_with_their_variables_unless_their_condition_fails() {
        let dir = tempfile::tempdir().unwrap();
        let task = TaskName::parse("60-InstallPackages").unwrap();
        let mut rules = Rules::new();
        let marker = dir.path().join("started");
        let text = format!(
            "#!/bin/sh\n# only-if: IMGFORGE_RPMS IMGFORGE_INSTALL\ntouch {}\necho \"WARNING: rpms $IMGFORGE_RPMS\"\necho last\nexit 3\n",
            marker.display()
        );
        let path = script(dir.path(), task.as_str(), &text);

        let skipped = run_one(&path, &task, &TaskEnv::new(&task, &rules), |_| None);
        assert!(skipped.failure.is_none() && skipped.warnings.is_empty());
        assert!(!marker.exists(), "the script was started");

        rules.rpms = vec!["a.rpm".into()];
        let ran = run_one(&path, &task, &TaskEnv::new(&task, &rules), |_| None);
        assert!(marker.exists());
        assert_eq!(ran.warnings, ["rpms a.rpm"]);
        let failure = ran.failure.expect("exit 3 is a failure");
        assert!(failure.contains("exited with status 3") && failure.ends_with("last"), "{failure}");
    }

    /// A task printing an endless line (3 MiB here, no newline until the end): what is kept of
    /// it is capped and marked, and the lines after it come through whole.
    #[test]
    fn an_endless_output_line_is_capped() {
        use imgforge_protocol::line::TRUNCATED_MARK;
        let mut output = vec![b'a'; 3 << 20];
        output.extend_from_slice(b"\nWARNING: after\n");
        let console = tempfile::tempfile().unwrap();
        let out = forward_output(&output[..], console.try_clone().unwrap(), "50-Endless");
        assert_eq!(out.tail.len(), 2);
        assert_eq!(out.tail[0].len(), MAX_LINE_BYTES + TRUNCATED_MARK.len());
        assert!(out.tail[0].ends_with(TRUNCATED_MARK));
        assert_eq!(out.warnings, ["after"]);
        let logged = console.metadata().unwrap().len();
        assert!(logged < 2 * MAX_LINE_BYTES as u64, "{logged} bytes logged of one line");
    }
}
