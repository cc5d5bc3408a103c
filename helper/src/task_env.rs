//! The variables a task runs with: what the runner puts in a task script's environment, and
//! what a built-in task reads, whether the runner calls it in its own process or a script
//! starts it as a subcommand.

use crate::layout::{PAYLOAD_DIR, RULES_PATH, STATE_DIR, TARGET_DIR};
use imgforge_protocol::helper_vm::TARGET_DISK;
use imgforge_protocol::rules::Rules;
use imgforge_protocol::task::TaskName;
use std::path::{Path, PathBuf};

/// The variables a task runs with: the environment of a task script, and what a built-in task
/// reads.
#[derive(Debug, Clone, Default)]
pub struct TaskEnv(Vec<(String, String)>);

impl TaskEnv {
    /// The variables of `task` in a run of `rules`.
    pub fn new(task: &TaskName, rules: &Rules) -> Self {
        let yes_no = |b: bool| if b { "yes" } else { "no" }.to_owned();
        let vars = [
            ("IMGFORGE_TASK", task.as_str().to_owned()),
            ("IMGFORGE_TARGET", TARGET_DIR.to_owned()),
            ("IMGFORGE_DISK", TARGET_DISK.to_owned()),
            ("IMGFORGE_EXTRA_DISKS", rules.extra_disks.to_string()),
            ("IMGFORGE_PAYLOAD", PAYLOAD_DIR.to_owned()),
            ("IMGFORGE_STATE", STATE_DIR.to_owned()),
            ("IMGFORGE_RULES", RULES_PATH.to_owned()),
            ("IMGFORGE_ERROR_FILE", error_file(task).display().to_string()),
            ("IMGFORGE_SELINUX_RELABEL", yes_no(rules.selinux_relabel)),
            ("IMGFORGE_ROOT_PARTITION", rules.root_partition.clone().unwrap_or_default()),
            ("IMGFORGE_MODE", if rules.verify { "verify" } else { "customize" }.to_owned()),
            ("IMGFORGE_REQUIRED_PACKAGES", rules.required_packages.join(" ")),
            ("IMGFORGE_RPMS", rules.rpms.join(" ")),
            ("IMGFORGE_DEBS", rules.debs.join(" ")),
            ("IMGFORGE_INSTALL", rules.install.join(" ")),
            ("IMGFORGE_UNINSTALL", rules.uninstall.join(" ")),
            ("IMGFORGE_UPDATE", yes_no(rules.update)),
            ("IMGFORGE_PACKAGES", yes_no(rules.changes_packages())),
            ("IMGFORGE_REPO", rules.repo.clone().unwrap_or_default()),
            ("IMGFORGE_GPGCHECK", yes_no(rules.gpgcheck)),
            ("IMGFORGE_GROW_FILESYSTEM", yes_no(rules.grow_filesystem)),
            ("IMGFORGE_GROW_TO_DISK", yes_no(rules.grow_to_disk)),
            ("IMGFORGE_VERBOSE", yes_no(rules.verbose)),
            ("IMGFORGE_DRY_RUN", yes_no(rules.dry_run)),
            ("IMGFORGE_GUEST_PROGRAMS", yes_no(rules.runs_guest_programs())),
            (
                "IMGFORGE_SWAP_DISK",
                rules.swap_disk.as_ref().map(|s| format!("{}:{}", s.disk, s.uuid)).unwrap_or_default(),
            ),
            (
                "IMGFORGE_SWAP",
                rules.swap.as_ref().map(|s| format!("{}:{}:{}", s.number, s.mib, s.uuid)).unwrap_or_default(),
            ),
        ];
        Self(vars.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    }

    /// The variables of the current process (a task script called a subcommand).
    pub fn from_process() -> Self {
        Self(std::env::vars().filter(|(name, _)| name.starts_with("IMGFORGE_")).collect())
    }

    /// A variable's value.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    /// A variable's value, or the error that the subcommand was not run from a task.
    pub fn require(&self, name: &str) -> Result<&str, String> {
        self.get(name).ok_or_else(|| format!("{name} is not set: run this from a task"))
    }

    /// Every variable with its value, as a task script's environment gets them.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// Where `task` leaves its error message for the runner (`IMGFORGE_ERROR_FILE`).
pub fn error_file(task: &TaskName) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{}.error", task.as_str()))
}
