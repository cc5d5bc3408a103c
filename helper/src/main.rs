//! imgforge-helper: PID 1 of the helper VM, and the subcommands its task scripts call.
//!
//! As PID 1 it mounts the pseudo filesystems, loads modules, reads the rules from the floppy,
//! runs the tasks in run-parts order, reports on the second serial port and powers off. Called
//! by another name or PID it runs a subcommand (`customize`), so that what is error-prone in
//! shell is done here.

// Product code never unwraps: a panic in PID 1 or mid-write is the worst error report.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod accounts;
mod apt;
mod bulk;
mod change_watch;
mod changes;
mod cloud_init;
mod confinement;
mod copy;
mod customize;
mod digest_exchange;
mod digest_queue;
mod edit;
mod firstboot;
mod floppy;
mod grow;
mod guest;
mod identity;
mod init;
mod kmod;
mod layout;
mod manifest;
mod mounts;
mod network;
mod package_manager;
mod packages;
mod prefetch;
mod pseudo_filesystems;
mod random_seed;
mod reporter;
mod script;
mod selinux;
mod snapshot;
mod swap;
mod task_env;
mod task_overwrite;
mod tasks;
mod variants;

use std::process::ExitCode;
use task_env::TaskEnv;

fn main() -> ExitCode {
    if std::process::id() == 1 {
        init::run(builtin)
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [name] = args.as_slice() {
        if let Some(run) = builtin(name) {
            return tasks::finish(run(&TaskEnv::from_process()));
        }
    }
    match args.first().map(String::as_str) {
        Some("guest-path") if args.len() == 2 => customize::guest_path_main(&args[1]),
        Some("modprobe") if args.len() >= 2 => kmod::modprobe_main(&args[1..]),
        Some("in-guest") if args.len() >= 2 => confinement::in_guest_main(&args[1..]),
        _ => {
            eprintln!("usage: imgforge-helper customize          run the rules' operations (the 50-Customize task)");
            eprintln!(
                "       imgforge-helper guest-path PATH    print where guest PATH is, resolved inside the guest root"
            );
            eprintln!("       imgforge-helper in-guest PROGRAM ARGS...  run a guest program chrooted and confined");
            eprintln!("       imgforge-helper dry-run-snapshot   record the guest's tree (the 20-DryRunSnapshot task)");
            eprintln!(
                "       imgforge-helper dry-run-changes    report what changed since (the 85-DryRunChanges task)"
            );
            eprintln!(
                "       imgforge-helper install-packages   install the rules' packages (the 60-InstallPackages task)"
            );
            eprintln!("       imgforge-helper mount-payload      mount the payload disk (the 05-MountPayload task)");
            eprintln!(
                "       imgforge-helper mount-root         mount the guest's filesystems (the 10-MountRoot task)"
            );
            eprintln!(
                "       imgforge-helper random-seed        write a fresh random seed in the guest (the 45-RandomSeed task)"
            );
            eprintln!(
                "       imgforge-helper selinux-relabel    relabel an SELinux guest (the 80-SELinuxRelabel task)"
            );
            eprintln!(
                "       imgforge-helper fix-partition-table  grow the last partition to the disk (08-FixPartitionTable)"
            );
            eprintln!(
                "       imgforge-helper filesystem-resize-unmounted  grow an ext2/3/4 root (09-FilesystemResizeUnmounted)"
            );
            eprintln!(
                "       imgforge-helper filesystem-resize-mounted  grow a mounted XFS root (16-FilesystemResizeMounted)"
            );
            eprintln!("       imgforge-helper unmount            unmount them again and sync (the 90-Unmount task)");
            eprintln!("As PID 1 of the helper VM it runs the tasks; see the imgforge documentation.");
            ExitCode::from(2)
        }
    }
}

/// The task built in under the subcommand `name`, if any. The table is here, where every module
/// is known, so that the runner is handed it and depends on none of the tasks it runs.
fn builtin(name: &str) -> Option<tasks::Builtin> {
    match name {
        "customize" => Some(customize::run),
        "dry-run-snapshot" => Some(changes::record_before),
        "dry-run-changes" => Some(changes::report_changes),
        "install-packages" => Some(packages::run),
        "selinux-relabel" => Some(selinux::relabel),
        "random-seed" => Some(random_seed::run),
        "mount-payload" => Some(mounts::mount_payload),
        "mount-root" => Some(mounts::mount_root),
        "unmount" => Some(mounts::unmount_all),
        "fix-partition-table" => Some(grow::fix_partition_table),
        "add-swap" => Some(swap::add_swap_disk),
        "filesystem-resize-unmounted" => Some(grow::filesystem_resize_unmounted),
        "filesystem-resize-mounted" => Some(grow::filesystem_resize_mounted),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every task script that only hands over to a built-in task names one the table has.
    #[test]
    fn task_scripts_name_builtins_the_table_has() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tasks");
        let mut handed_over = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            handed_over.extend(script::parse(&text).builtin);
        }
        assert!(!handed_over.is_empty(), "no task script in {} execs imgforge-helper", dir.display());
        for name in handed_over {
            assert!(builtin(&name).is_some(), "no built-in task {name}");
        }
    }
}
