//! Runs the task scripts in run-parts order, logging their output and reporting each.

use crate::init::{PAYLOAD_DIR, STATE_DIR, TARGET_DIR, TARGET_DISK};
use crate::reporter::Reporter;
use imgforge_protocol::report::ReportLine;
use imgforge_protocol::rules::Rules;
use imgforge_protocol::task::{run_parts_order, TaskName};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
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

/// Runs every planned task; stops at the first failure.
pub fn run_all(dir: &Path, rules: &Rules, reporter: &mut Reporter) -> Result<(), TaskFailure> {
    let tasks = plan(dir, rules).map_err(|message| TaskFailure { task: "helper".into(), message })?;
    for task in tasks {
        reporter.send(&ReportLine::TaskStart { task: task.to_string() });
        let started = Instant::now();
        let outcome = run_one(&dir.join(task.as_str()), &task, rules);
        for message in outcome.warnings {
            reporter.send(&ReportLine::Warning { task: task.to_string(), message });
        }
        for check in outcome.checks {
            reporter.send(&check);
        }
        if let Some(message) = outcome.failure {
            return Err(TaskFailure { task: task.to_string(), message });
        }
        reporter.send(&ReportLine::TaskEnd { task: task.to_string(), millis: started.elapsed().as_millis() as u64 });
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

fn error_file(task: &TaskName) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{}.error", task.as_str()))
}

fn run_one(path: &Path, task: &TaskName, rules: &Rules) -> Outcome {
    let fail = |message: String| Outcome { warnings: Vec::new(), checks: Vec::new(), failure: Some(message) };
    let (reader, writer) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => return fail(format!("cannot create a pipe for the task's output: {e}")),
    };
    let writer_err = match writer.try_clone() {
        Ok(w) => w,
        Err(e) => return fail(format!("cannot duplicate the task's output pipe: {e}")),
    };
    let error_path = error_file(task);
    let _ = std::fs::remove_file(&error_path);
    let mut command = Command::new(path);
    command
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", "/root")
        .env("LANG", "C")
        .env("IMGFORGE_TASK", task.as_str())
        .env("IMGFORGE_TARGET", TARGET_DIR)
        .env("IMGFORGE_DISK", TARGET_DISK)
        .env("IMGFORGE_PAYLOAD", PAYLOAD_DIR)
        .env("IMGFORGE_STATE", STATE_DIR)
        .env("IMGFORGE_RULES", Path::new(STATE_DIR).join("rules.json"))
        .env("IMGFORGE_ERROR_FILE", &error_path)
        .env("IMGFORGE_SELINUX_RELABEL", if rules.selinux_relabel { "yes" } else { "no" })
        .env("IMGFORGE_ROOT_PARTITION", rules.root_partition.as_deref().unwrap_or(""))
        .env("IMGFORGE_MODE", if rules.verify { "verify" } else { "customize" })
        .env("IMGFORGE_REQUIRED_PACKAGES", rules.required_packages.join(" "))
        .env("IMGFORGE_RPMS", rules.rpms.join(" "))
        .env("IMGFORGE_INSTALL", rules.install.join(" "))
        .env("IMGFORGE_REPO", rules.repo.as_deref().unwrap_or(""))
        .env("IMGFORGE_GPGCHECK", if rules.gpgcheck { "yes" } else { "no" })
        .env("IMGFORGE_GROW_FILESYSTEM", if rules.grow_filesystem { "yes" } else { "no" })
        .env("IMGFORGE_VERBOSE", if rules.verbose { "yes" } else { "no" })
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer_err);
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start {}: {e}", path.display())),
    };
    // The Command still holds the pipe's write ends; drop it so EOF can arrive.
    drop(command);

    let (tx, rx) = mpsc::channel();
    let label = task.to_string();
    std::thread::spawn(move || {
        let _ = tx.send(forward_output(reader, &label));
    });
    let status = child.wait();
    let output = rx.recv_timeout(OUTPUT_DRAIN_WAIT).unwrap_or_else(|_| Output {
        tail: VecDeque::new(),
        warnings: vec!["the task left a process holding its output open".into()],
        checks: Vec::new(),
    });

    let failure = match status {
        Ok(s) if s.success() => None,
        Ok(s) => Some(failure_message(&error_path, s, &output.tail)),
        Err(e) => Some(format!("cannot wait for the task: {e}")),
    };
    Outcome { warnings: output.warnings, checks: output.checks, failure }
}

fn forward_output(reader: std::io::PipeReader, label: &str) -> Output {
    let mut out = Output { tail: VecDeque::new(), warnings: Vec::new(), checks: Vec::new() };
    let stdout = std::io::stdout();
    for line in BufReader::new(reader).split(b'\n') {
        let Ok(line) = line else { break };
        let line = String::from_utf8_lossy(&line).trim_end_matches('\r').to_string();
        let _ = writeln!(stdout.lock(), "[{label}] {line}");
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
}
