//! Whether KVM runs a guest on this host, and with which CPU model.
//!
//! The probe boots the helper kernel alone (no disk, no initramfs, confined like the helper VM)
//! under `-accel kvm` and waits for its first console output. It is kept apart from the helper
//! run so that only KVM itself is judged: a qemu that fails on an image never marks KVM broken.
//! KVM fails in three ways seen in the field: qemu cannot open or set it up (an error, exit 1),
//! qemu aborts at once because the host — itself a VM — refuses an MSR that `-cpu host`
//! implies (then the CPU model is narrowed and tried again), or the guest never runs (silence).

use super::accel::{self, KvmVerdict};
use super::privilege::Unprivileged;
use super::{cmdline, Interrupt, VmError, KVM_SIGN_OF_LIFE};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

/// How many CPU models are tried before KVM is judged broken.
const MAX_CPU_MODELS: usize = 4;
/// How long a qemu whose console closed may take to exit and finish its error output.
const EXIT_WAIT: Duration = Duration::from_secs(5);

/// What one probe run showed.
#[derive(Debug)]
enum Attempt {
    /// The guest printed.
    Printed,
    /// qemu ended before the guest printed: its status and error output in words, and whether
    /// it died of a signal.
    Failed {
        /// What happened.
        why: String,
        /// Died of a signal (an abort while setting up the vCPU, typically).
        crashed: bool,
    },
    /// Nothing within the sign-of-life window.
    Silent,
}

/// Finds out whether KVM works, trying narrower CPU models when qemu refuses `-cpu host`;
/// each step is reported through `note` (shown with `-v`).
pub async fn probe(
    qemu: &Path,
    kernel: &Path,
    user: Option<&Unprivileged>,
    interrupt: &Interrupt,
    note: &mut dyn FnMut(String),
) -> Result<KvmVerdict, VmError> {
    let mut cpu = accel::KVM_CPU.to_owned();
    for _ in 0..MAX_CPU_MODELS {
        match attempt(qemu, kernel, &cpu, user, interrupt.clone()).await? {
            Attempt::Printed => return Ok(KvmVerdict::Works { cpu }),
            Attempt::Silent => {
                return Ok(KvmVerdict::Broken { reason: VmError::NoSignOfLife.to_string() });
            }
            Attempt::Failed { why, crashed } => match accel::next_kvm_cpu(&cpu, &why, crashed) {
                Some(next) => {
                    note(format!("KVM probe: qemu refused -cpu {cpu} ({}); trying -cpu {next}", first_line(&why)));
                    cpu = next;
                }
                None => {
                    return Ok(KvmVerdict::Broken {
                        reason: format!("qemu -accel kvm -cpu {cpu}: {why}{}", access_hint(&why, user)),
                    })
                }
            },
        }
    }
    Ok(KvmVerdict::Broken { reason: format!("no CPU model worked under KVM (last tried: {cpu})") })
}

/// What to do when qemu, as the helper user, may not open /dev/kvm.
fn access_hint(why: &str, user: Option<&Unprivileged>) -> String {
    let (Some(user), true) = (user, why.contains("Permission denied")) else { return String::new() };
    match std::fs::metadata("/dev/kvm") {
        Ok(m) => format!(
            " (/dev/kvm has mode {:o}, owner {}, group {}; qemu runs as {}: give that group read-write access)",
            m.mode() & 0o777,
            m.uid(),
            m.gid(),
            user.name
        ),
        Err(_) => String::new(),
    }
}

fn first_line(text: &str) -> &str {
    text.lines().find(|l| !l.trim().is_empty()).unwrap_or(text).trim()
}

/// One run of the probe guest with `cpu`.
async fn attempt(
    qemu: &Path,
    kernel: &Path,
    cpu: &str,
    user: Option<&Unprivileged>,
    interrupt: Interrupt,
) -> Result<Attempt, VmError> {
    let kernel_file =
        std::fs::File::open(kernel).map_err(|source| VmError::Open { path: kernel.to_owned(), source })?;
    let (console_r, console_w) = std::io::pipe().map_err(|e| VmError::Setup(format!("pipe: {e}")))?;
    let args = cmdline::probe_args(cpu, kernel_file.as_raw_fd(), console_w.as_raw_fd());
    tracing::debug!(qemu = %qemu.display(), args = %args.join(" "), "probing KVM");
    let inherited = vec![kernel_file.as_raw_fd(), console_w.as_raw_fd()];
    let mut child = super::spawn_confined(qemu, &args, inherited, user, true)?;
    drop((console_w, kernel_file));

    // The first byte on the console, or EOF when qemu is gone.
    let (printed_tx, printed_rx) = tokio::sync::oneshot::channel::<bool>();
    std::thread::spawn(move || {
        let mut console_r = console_r;
        let mut byte = [0u8; 1];
        let printed = matches!(console_r.read(&mut byte), Ok(1));
        let _ = printed_tx.send(printed);
        // Drain, so that qemu never blocks on a full pipe before it is killed.
        let _ = std::io::copy(&mut console_r, &mut std::io::sink());
    });
    let stderr = child.stderr.take().ok_or_else(|| VmError::Setup("qemu's stderr is not piped".into()))?;
    let stderr_task = super::spawn_stderr_reader(stderr);

    let outcome = tokio::select! {
        printed = printed_rx => match printed {
            Ok(true) => Attempt::Printed,
            // The console closed without a byte: qemu is gone; its status says why.
            _ => {
                // The console closes when qemu exits: its status is at hand (bounded anyway).
                let status = match tokio::time::timeout(EXIT_WAIT, child.wait()).await {
                    Ok(status) => status.map_err(|e| VmError::Setup(format!("waiting for qemu: {e}")))?,
                    Err(_) => {
                        let _ = child.start_kill();
                        child.wait().await.map_err(|e| VmError::Setup(format!("waiting for qemu: {e}")))?
                    }
                };
                let stderr = tokio::time::timeout(EXIT_WAIT, stderr_task).await.ok().and_then(Result::ok).unwrap_or_default();
                return Ok(Attempt::Failed { why: describe_exit(status, &stderr), crashed: status.signal().is_some() });
            }
        },
        _ = tokio::time::sleep(KVM_SIGN_OF_LIFE) => Attempt::Silent,
        signal = super::interrupted(interrupt) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(VmError::Interrupted(signal));
        }
    };
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    Ok(outcome)
}

/// qemu's exit in words: its status and what it said.
fn describe_exit(status: std::process::ExitStatus, stderr: &str) -> String {
    let how = match (status.signal(), status.code()) {
        (Some(signal), _) => format!("qemu died of signal {signal}"),
        (None, Some(code)) => format!("qemu exited with status {code}"),
        (None, None) => format!("qemu ended ({status})"),
    };
    if stderr.is_empty() {
        how
    } else {
        format!("{how}: {stderr}")
    }
}
