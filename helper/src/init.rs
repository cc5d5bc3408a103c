//! The PID 1 flow: prepare the VM, run the tasks, report, power off. Never returns, never hangs.

use crate::layout::{PAYLOAD_DIR, RULES_PATH, SEARCH_PATH, STATE_DIR, TARGET_DIR};
use crate::reporter::{uptime_ms, Reporter};
use crate::{floppy, kmod, tasks};
use imgforge_protocol::helper_vm::{self, TARGET_DISK, TASKS_DIR};
use imgforge_protocol::report::ReportLine;
use imgforge_protocol::rules::Rules;
use std::path::Path;
use std::time::Duration;

/// How long to wait for a device node to appear after its driver loaded.
const DEVICE_WAIT: Duration = Duration::from_secs(15);

/// Runs the helper as PID 1, with the tasks built into it.
pub fn run(builtins: tasks::Builtins) -> ! {
    // The first console line: the host's sign of life that the accelerator works.
    eprintln!("imgforge-helper {} started", env!("CARGO_PKG_VERSION"));
    mount_pseudo_filesystems();
    // Built-in tasks run in this process and start programs (blkid, lvm, chrooted commands):
    // they get what a task script gets. The kernel starts PID 1 with no PATH and the console
    // as its input.
    std::env::set_var("PATH", SEARCH_PATH);
    std::env::set_var("LANG", "C");
    if let Ok(null) = std::fs::File::open("/dev/null") {
        // SAFETY: dup2 onto fd 0, which no Rust object owns.
        unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 0) };
    }
    let mut reporter = Reporter::open();
    install_panic_hook();
    reporter.send(&ReportLine::Phase { name: "init".into(), uptime_ms: uptime_ms() });

    match prepare(&mut reporter) {
        Ok((rules, preload)) => {
            let result = if rules.variants.is_empty() {
                tasks::run_all(Path::new(TASKS_DIR), &rules, builtins, &mut reporter)
            } else {
                crate::variants::run_all(Path::new(TASKS_DIR), &rules, builtins, &mut reporter)
            };
            // The tasks load what they need themselves, waiting for a module the preload is
            // still loading: the preload only ever saves time.
            let (warnings, done_ms) = preload.join().unwrap_or_default();
            for warning in warnings {
                reporter.send(&ReportLine::Warning { task: "helper".into(), message: warning });
            }
            reporter.send(&ReportLine::Phase { name: "preloaded".into(), uptime_ms: done_ms });
            match result {
                Err(failure) => {
                    if rules.dry_run {
                        crate::changes::report_after_failure(Path::new(TARGET_DIR), &mut reporter);
                    }
                    reporter.send(&ReportLine::Error { task: failure.task, message: failure.message })
                }
                Ok(()) => reporter.send(&ReportLine::Success),
            }
        }
        Err(message) => reporter.send(&ReportLine::Error { task: "helper".into(), message }),
    }
    reporter.send(&ReportLine::Phase { name: "poweroff".into(), uptime_ms: uptime_ms() });
    power_off()
}

fn prepare(reporter: &mut Reporter) -> Result<(Rules, kmod::Preload), String> {
    // The preload starts first: its relocations fill the CPU while the boot set's drivers wait
    // for their devices.
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let preload = kmod::spawn_preload(helper_vm::preload_names(&cmdline));
    for warning in kmod::load_boot_set() {
        reporter.send(&ReportLine::Warning { task: "helper".into(), message: warning });
    }
    reporter.send(&ReportLine::Phase { name: "modules".into(), uptime_ms: uptime_ms() });

    // Before any program of the guest can run (see confinement).
    crate::confinement::disable_user_namespaces()?;
    wait_for(Path::new(floppy::FLOPPY_DEVICE))?;
    reporter.send(&ReportLine::Phase { name: "floppy-ready".into(), uptime_ms: uptime_ms() });
    if let Err(e) = floppy::skip_spin_up(Path::new(floppy::FLOPPY_DEVICE)) {
        eprintln!("imgforge-helper: cannot shorten the floppy's spin-up wait: {e}");
    }
    let text = floppy::read_rules(Path::new(floppy::FLOPPY_DEVICE))?;

    let rules = Rules::from_json(&text).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(STATE_DIR).map_err(|e| format!("cannot create {STATE_DIR}: {e}"))?;
    std::fs::write(RULES_PATH, &text).map_err(|e| format!("cannot store the rules in {STATE_DIR}: {e}"))?;
    reporter.send(&ReportLine::Phase { name: "rules-read".into(), uptime_ms: uptime_ms() });
    wait_for(Path::new(TARGET_DISK))?;
    Ok((rules, preload))
}

fn wait_for(device: &Path) -> Result<(), String> {
    let start = std::time::Instant::now();
    while !device.exists() {
        if start.elapsed() > DEVICE_WAIT {
            return Err(format!(
                "{} did not appear within {} s: the helper kernel lacks its driver or qemu did not attach it",
                device.display(),
                DEVICE_WAIT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn mount(source: &str, target: &str, fstype: &str) {
    let _ = std::fs::create_dir_all(target);
    if let Err(e) = crate::mounts::mount(source, Path::new(target), fstype, false) {
        eprintln!("imgforge-helper: mounting {fstype} on {target}: {e}");
    }
}

fn mount_pseudo_filesystems() {
    mount("proc", "/proc", "proc");
    mount("sysfs", "/sys", "sysfs");
    mount("devtmpfs", "/dev", "devtmpfs");
    mount("tmpfs", "/run", "tmpfs");
    mount("tmpfs", "/tmp", "tmpfs");
    for dir in [TARGET_DIR, PAYLOAD_DIR] {
        let _ = std::fs::create_dir_all(dir);
    }
}

fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = format!("imgforge-helper panicked: {info}");
        eprintln!("{message}");
        Reporter::open().send(&ReportLine::Error { task: "helper".into(), message });
        power_off();
    }));
}

/// Syncs and ends the VM. qemu runs with `-no-reboot`, so a reset ends it at once, and
/// needs no ACPI (the helper kernel runs with `acpi=off`: faster boot); power-off is the
/// fallback for kernels that cannot reset.
pub fn power_off() -> ! {
    // SAFETY: sync and reboot take no pointers; as PID 1 we may call reboot.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
        libc::reboot(libc::RB_POWER_OFF);
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}
