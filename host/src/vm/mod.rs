//! Runs the helper VM: qemu confined and unprivileged, serial 0 = console log, serial 1 =
//! report, QMP for a graceful stop; soft then hard timeout; KVM with TCG fallback.

pub mod accel;
pub mod blockdev_qemu;
pub mod cmdline;
pub mod console;
pub mod dynamic_user;
pub mod kvm_probe;
pub mod privilege;
pub mod qmp;

use crate::helper_image::HelperImage;
use accel::{Accel, KvmPlan, KvmVerdict};
use cmdline::{DiskFormat, QemuConfig};
use imgforge_protocol::helper_vm;
use imgforge_protocol::printable::printable;
use imgforge_protocol::report::{LineSplitter, ReportLine, Verdict, VerdictBuilder};
use privilege::Unprivileged;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::{mpsc, watch};

/// Kernel command line of the helper: no ACPI (the helper ends with a reset), no probing of
/// hardware qemu does not give it, no self-tests, expedited RCU — each one measured to shorten
/// the boot under TCG and harmless under KVM.
pub const KERNEL_CMDLINE: &str = "console=ttyS0 panic=-1 quiet loglevel=4 acpi=off i8042.noaux i8042.nokbd i8042.nopnp \
8250.nr_uarts=2 tsc=reliable no_timer_check cryptomgr.notests rcupdate.rcu_expedited=1 mitigations=off audit=0 nowatchdog \
random.trust_cpu=on nokaslr";
/// How long a KVM guest may stay silent on serial 0 before KVM is judged broken.
pub const KVM_SIGN_OF_LIFE: Duration = Duration::from_secs(10);
/// How many console lines are kept for error messages.
const CONSOLE_TAIL_LINES: usize = 40;
/// How much of qemu's stderr is kept.
const STDERR_LIMIT_BYTES: u64 = 16 * 1024;
/// The QMP socket's name in its private directory.
const QMP_SOCKET: &str = "qmp.sock";

/// Everything needed to run the helper VM once.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// qemu-system-x86_64.
    pub qemu: PathBuf,
    /// Kernel and initramfs.
    pub image: HelperImage,
    /// The disk to customize.
    pub disk: PathBuf,
    /// Its format.
    pub disk_format: DiskFormat,
    /// A qcow2 overlay over `disk` to receive the writes (the disk is then only read).
    pub overlay: Option<PathBuf>,
    /// The guest's other disks, in order, each written only into its overlay.
    pub extra_disks: Vec<ExtraDisk>,
    /// More overlays over `disk` (with `overlay`), each a virtio disk of its own with this
    /// serial number: the variants of a multi-variant run.
    pub more_overlays: Vec<(PathBuf, String)>,
    /// The parameter floppy image.
    pub floppy: PathBuf,
    /// The payload disk image, if any.
    pub payload: Option<PathBuf>,
    /// A raw file the helper may write its boot's digest cache to
    /// (`imgforge_protocol::digest_cache`), if any.
    pub export: Option<PathBuf>,
    /// A raw file the host writes the digests of other boots to while the VM runs, read-only
    /// to the helper (`imgforge_protocol::digest_cache::IMPORT_SERIAL`), if any.
    pub import: Option<PathBuf>,
    /// The raw bulk disk (large payload files), if any.
    pub bulk: Option<PathBuf>,
    /// Guest memory.
    pub memory_mib: u32,
    /// Guest vCPUs.
    pub vcpus: u32,
    /// Accelerator choice.
    pub accel: Accel,
    /// Soft timeout: then qemu is asked to quit.
    pub soft_timeout: Duration,
    /// After the soft timeout, how long until SIGKILL.
    pub hard_grace: Duration,
    /// User to run qemu as (None: as this process).
    pub user: Option<Unprivileged>,
    /// Cache directory (where the KVM verdict is remembered).
    pub cache: PathBuf,
    /// Modules the helper loads while it reads the floppy (see [`preload_modules`]).
    pub preload: Vec<&'static str>,
}

/// One of the guest's other disks (`-a` given several times).
#[derive(Debug, Clone)]
pub struct ExtraDisk {
    /// The disk.
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// The qcow2 overlay over it that receives the writes.
    pub overlay: PathBuf,
}

/// The kernel modules the tasks will need, from what the host found on the disk (its partition
/// table and superblocks, parsed in Rust) and whether a payload disk comes along. The helper
/// loads them on a thread of their own from before it reads the floppy, while the CPU would
/// otherwise wait for the floppy and the first tasks' reads. A hint only: the tasks load what
/// they need.
pub fn preload_modules(disk_filesystems: &[&str], payload: bool) -> Vec<&'static str> {
    // In the order the tasks need them (the preload runs alongside): the payload disk is
    // mounted first, then the root (the disk's filesystems come largest partition first).
    let mut out: Vec<&'static str> = if payload { vec!["squashfs"] } else { Vec::new() };
    for kind in disk_filesystems {
        let module = match *kind {
            "ext2" | "ext3" | "ext4" => "ext4",
            "xfs" => "xfs",
            "vfat" => "vfat",
            "LVM2_member" => "dm_mod",
            _ => continue,
        };
        if !out.contains(&module) {
            out.push(module);
        }
    }
    out
}

/// `cmdline` with the preload hint for the helper appended.
fn with_preload(cmdline: String, preload: &[&str]) -> String {
    if preload.is_empty() {
        return cmdline;
    }
    format!("{cmdline} {}", helper_vm::preload_param(preload))
}

/// Something that happened while the VM ran.
#[derive(Debug, Clone)]
pub enum VmEvent {
    /// qemu started with this accelerator and CPU model.
    Started {
        /// The accelerator.
        accel: Accel,
        /// qemu's `-cpu`.
        cpu: String,
    },
    /// What the KVM probe found or tried (shown with `-v`).
    KvmProbe(String),
    /// KVM did not work; trying TCG.
    Fallback(String),
    /// A line on the console (serial 0).
    Console(String),
    /// A line on the report port (serial 1).
    Report(ReportLine),
    /// A line that claims to be a `CHECK` result but does not parse (on either port): the
    /// line, made printable. `verify` fails on it.
    MalformedCheck(String),
}

/// How a finished helper run went.
#[derive(Debug, Clone)]
pub struct VmOutcome {
    /// Success, or the failing task.
    pub verdict: Verdict,
    /// The accelerator that ran it.
    pub accel: Accel,
    /// Wall time of the successful attempt.
    pub elapsed: Duration,
}

/// Why the helper VM did not produce a verdict.
#[derive(Debug, Error)]
pub enum VmError {
    /// qemu is not installed.
    #[error("{0} was not found: install qemu-system-x86 (the README's setup command does)")]
    QemuNotFound(PathBuf),
    /// A file for the VM could not be opened.
    #[error("cannot open {path} for the helper VM: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The I/O error opening it.
        source: std::io::Error,
    },
    /// Pipes, sockets or the process could not be set up.
    #[error("cannot start the helper VM: {0}")]
    Setup(String),
    /// The soft timeout passed.
    #[error("the helper VM timed out after {secs} s{}; raise --timeout if the image needs longer", running.as_ref().map(|t| format!(" while running task {t}")).unwrap_or_default())]
    Timeout {
        /// The timeout.
        secs: u64,
        /// The task that was running.
        running: Option<String>,
    },
    /// qemu exited with an error before the guest reported.
    #[error("qemu failed ({status}): {stderr}")]
    QemuFailed {
        /// Exit status.
        status: String,
        /// Its error output.
        stderr: String,
    },
    /// qemu died from a signal imgforge did not send (killed from outside, or a crash).
    #[error("qemu was killed by signal {signal} from outside imgforge, or crashed{}", if stderr.is_empty() { String::new() } else { format!(": {stderr}") })]
    Killed {
        /// The signal.
        signal: i32,
        /// Its error output.
        stderr: String,
    },
    /// `--accel kvm`, and KVM does not work on this host.
    #[error("KVM does not work on this host ({0}); use --accel auto or tcg")]
    KvmUnusable(String),
    /// imgforge was asked to stop.
    #[error("interrupted by {0}; the helper VM was stopped")]
    Interrupted(&'static str),
    /// KVM ran but the guest never printed anything.
    #[error("the KVM guest showed no sign of life within {} s", KVM_SIGN_OF_LIFE.as_secs())]
    NoSignOfLife,
    /// qemu paused the VM on a failed read or write of the disk or its overlay: most likely the
    /// filesystem of the work files (TMPDIR) is full, the overlay holding every block the guest
    /// writes.
    #[error("the helper VM stopped on a disk read or write error{}: the filesystem of TMPDIR (which holds the overlay, as large as what the guest writes) is probably full: free space there or point TMPDIR at a larger one", running.as_ref().map(|t| format!(" while running task {t}")).unwrap_or_default())]
    DiskError {
        /// The task that was running.
        running: Option<String>,
    },
    /// The VM stopped without a verdict.
    #[error("the helper VM stopped without reporting success or failure{}; last console lines:\n{tail}", running.as_ref().map(|t| format!(" (task {t} was running)")).unwrap_or_default())]
    NoReport {
        /// The task that was running.
        running: Option<String>,
        /// The end of the console log.
        tail: String,
    },
}

/// Receives interrupt notifications (`Some(signal name)` once one arrives).
pub type Interrupt = watch::Receiver<Option<&'static str>>;

/// Runs the helper VM to a verdict: under KVM where it works (probed once per host boot, with
/// the CPU model the probe found), else under TCG.
pub async fn run(
    spec: &VmSpec,
    events: &mpsc::UnboundedSender<VmEvent>,
    interrupt: &Interrupt,
) -> Result<VmOutcome, VmError> {
    if let Some(cpu) = kvm_cpu(spec, events, interrupt).await? {
        let auto = spec.accel == Accel::Auto;
        match attempt(spec, Accel::Kvm, &cpu, auto, events, interrupt.clone()).await {
            // The probe's guest printed, this one did not: KVM is not to be trusted after all.
            Err(e @ VmError::NoSignOfLife) if auto => {
                accel::remember(&spec.cache, &spec.qemu, &KvmVerdict::Broken { reason: e.to_string() });
                let _ = events.send(VmEvent::Fallback(format!("KVM did not work ({e}); using TCG")));
            }
            // qemu failed under KVM although the probe's guest ran: the disk may be at fault as
            // well as KVM, so the verdict stays as it is, and TCG tells which (a disk qemu
            // refuses fails there too, with the same message).
            Err(e @ (VmError::QemuFailed { .. } | VmError::Killed { .. })) if auto => {
                let _ = events.send(VmEvent::Fallback(format!("qemu failed under KVM ({e}); trying TCG")));
            }
            other => return other,
        }
    }
    attempt(spec, Accel::Tcg, accel::TCG_CPU, false, events, interrupt.clone()).await
}

/// The CPU model to run the helper under KVM with, or None for TCG.
async fn kvm_cpu(
    spec: &VmSpec,
    events: &mpsc::UnboundedSender<VmEvent>,
    interrupt: &Interrupt,
) -> Result<Option<String>, VmError> {
    let required = match accel::plan(spec.accel, accel::kvm_device_usable(), accel::remembered(&spec.cache, &spec.qemu))
    {
        KvmPlan::Skip => return Ok(None),
        KvmPlan::Use(cpu) => return Ok(Some(cpu)),
        KvmPlan::Probe { required } => required,
    };
    let mut note = |line: String| {
        let _ = events.send(VmEvent::KvmProbe(line));
    };
    let verdict = kvm_probe::probe(&spec.qemu, &spec.image.kernel, spec.user.as_ref(), interrupt, &mut note).await?;
    accel::remember(&spec.cache, &spec.qemu, &verdict);
    match verdict {
        KvmVerdict::Works { cpu } => {
            note(format!("KVM probe: a guest runs under KVM with -cpu {cpu}"));
            Ok(Some(cpu))
        }
        KvmVerdict::Broken { reason } if required => Err(VmError::KvmUnusable(reason)),
        KvmVerdict::Broken { reason } => {
            let _ = events.send(VmEvent::Fallback(format!("KVM did not work ({reason}); using TCG")));
            Ok(None)
        }
    }
}

/// Resolves with the signal's name once an interrupt arrives (never, if none can).
pub(crate) async fn interrupted(mut interrupt: Interrupt) -> &'static str {
    loop {
        if let Some(signal) = *interrupt.borrow_and_update() {
            return signal;
        }
        if interrupt.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

fn open(path: &Path, options: &std::fs::OpenOptions) -> Result<File, VmError> {
    options.open(path).map_err(|source| VmError::Open { path: path.to_owned(), source })
}

/// Opens a disk read-only (and read-write when `writable`), with O_DIRECT where supported
/// (`cache.direct=on`); tmpfs and some others refuse O_DIRECT, then the page cache is used.
fn open_disk(path: &Path, writable: bool) -> Result<(File, Option<File>, bool), VmError> {
    let options = |write: bool, direct: bool| {
        let mut o = std::fs::OpenOptions::new();
        o.read(true).write(write).custom_flags(if direct { libc::O_DIRECT } else { 0 });
        o
    };
    let open_pair = |direct: bool| -> std::io::Result<(File, Option<File>)> {
        let ro = options(false, direct).open(path)?;
        let rw = if writable { Some(options(true, direct).open(path)?) } else { None };
        Ok((ro, rw))
    };
    match open_pair(true) {
        Ok((ro, rw)) => Ok((ro, rw, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let (ro, rw) = open_pair(false).map_err(|source| VmError::Open { path: path.to_owned(), source })?;
            Ok((ro, rw, false))
        }
        Err(source) => Err(VmError::Open { path: path.to_owned(), source }),
    }
}

/// What the reader threads learn from the guest while it runs.
#[derive(Default)]
struct Shared {
    console_tail: Mutex<VecDeque<String>>,
    verdict: Mutex<VerdictBuilder>,
    alive: AtomicBool,
}

/// A disk opened read-only, read-write, and whether with O_DIRECT.
type OpenedDisk = (File, Option<File>, bool);

/// The descriptors qemu inherits for one attempt.
struct QemuFds {
    kernel: File,
    initrd: File,
    disk_ro: File,
    disk_rw: Option<File>,
    disk_direct: bool,
    /// The overlay read-only, read-write, and whether opened with O_DIRECT.
    overlay: Option<(File, Option<File>, bool)>,
    /// The other disks, each with its overlay.
    extra_disks: Vec<ExtraDiskFiles>,
    /// Each more overlay opened as `overlay` is, with its disk's serial number.
    more_overlays: Vec<(OpenedDisk, String)>,
    floppy: File,
    payload: Option<File>,
    export: Option<(File, File)>,
    import: Option<File>,
    bulk: Option<File>,
    console_w: std::io::PipeWriter,
    report_w: std::io::PipeWriter,
    qmp_listener: UnixListener,
}

/// One of the other disks as qemu inherits it.
struct ExtraDiskFiles {
    /// The disk, read-only.
    disk: File,
    /// Whether it was opened with O_DIRECT.
    direct: bool,
    /// Its overlay, read-only.
    overlay_ro: File,
    /// Its overlay, read-write.
    overlay_rw: File,
    /// Whether those were opened with O_DIRECT.
    overlay_direct: bool,
}

/// This process's side of one attempt: the read ends of the serial ports, and the directory of
/// the QMP socket.
struct HostEnds {
    console_r: std::io::PipeReader,
    report_r: std::io::PipeReader,
    qmp_dir: tempfile::TempDir,
}

/// One run of the helper VM; `watch_life`: give up when the console stays silent for the
/// sign-of-life window.
async fn attempt(
    spec: &VmSpec,
    accel: Accel,
    cpu: &str,
    watch_life: bool,
    events: &mpsc::UnboundedSender<VmEvent>,
    interrupt: Interrupt,
) -> Result<VmOutcome, VmError> {
    let started = Instant::now();
    let (fds, HostEnds { console_r, report_r, qmp_dir }) = open_descriptors(spec)?;
    let config = qemu_config(spec, accel, cpu, &fds);
    let mut child = spawn_qemu(spec, accel, &config)?;
    // qemu holds its own copies now; ours would keep the pipes from reaching EOF.
    drop(fds);
    let _ = events.send(VmEvent::Started { accel, cpu: cpu.to_owned() });

    let shared = Arc::new(Shared::default());
    let console_thread = spawn_console_reader(console_r, shared.clone(), events.clone());
    let report_thread = spawn_report_reader(report_r, shared.clone(), events.clone());
    let stderr_task = spawn_stderr_reader(child.stderr.take().expect("stderr is piped"));
    let qmp_path = qmp_dir.path().join(QMP_SOCKET);
    let status = wait_for_exit(&mut child, spec, &qmp_path, &shared, watch_life, interrupt).await?;
    let _ = tokio::task::spawn_blocking(move || {
        let _ = console_thread.join();
        let _ = report_thread.join();
    })
    .await;
    let stderr = stderr_task.await.unwrap_or_default();
    outcome(status, stderr, &shared, accel, started)
}

/// Opens everything qemu inherits: the helper image, the disk (and overlay), the floppy, the
/// payload, the serial pipes and the QMP socket.
fn open_descriptors(spec: &VmSpec) -> Result<(QemuFds, HostEnds), VmError> {
    let ro = std::fs::OpenOptions::new().read(true).clone();
    let kernel = open(&spec.image.kernel, &ro)?;
    let initrd = open(&spec.image.initrd, &ro)?;
    let (disk_ro, disk_rw, disk_direct) = match &spec.overlay {
        // The disk is only the overlay's read-only base: it cannot be written at all.
        Some(_) => {
            let (ro, _, direct) = open_disk(&spec.disk, false)?;
            (ro, None, direct)
        }
        None => {
            let (ro, rw, direct) = open_disk(&spec.disk, true)?;
            (ro, rw, direct)
        }
    };
    let overlay = spec.overlay.as_ref().map(|p| open_disk(p, true)).transpose()?;
    let extra_disks = spec
        .extra_disks
        .iter()
        .map(|d| {
            let (disk, _, direct) = open_disk(&d.path, false)?;
            let (overlay_ro, overlay_rw, overlay_direct) = open_disk(&d.overlay, true)?;
            let overlay_rw = overlay_rw.expect("opened read-write");
            Ok(ExtraDiskFiles { disk, direct, overlay_ro, overlay_rw, overlay_direct })
        })
        .collect::<Result<Vec<_>, VmError>>()?;
    let more_overlays = spec
        .more_overlays
        .iter()
        .map(|(p, serial)| open_disk(p, true).map(|fds| (fds, serial.clone())))
        .collect::<Result<Vec<_>, _>>()?;
    let floppy = open(&spec.floppy, &ro)?;
    let payload = spec.payload.as_ref().map(|p| open(p, &ro)).transpose()?;
    let rw = std::fs::OpenOptions::new().read(true).write(true).clone();
    // qemu opens a drive read-only first, then read-write: its fdset holds both.
    let export = spec.export.as_ref().map(|p| Ok::<_, VmError>((open(p, &ro)?, open(p, &rw)?))).transpose()?;
    let import = spec.import.as_ref().map(|p| open(p, &ro)).transpose()?;
    let bulk = spec.bulk.as_ref().map(|p| open(p, &ro)).transpose()?;
    let (console_r, console_w) = std::io::pipe().map_err(|e| VmError::Setup(format!("pipe: {e}")))?;
    let (report_r, report_w) = std::io::pipe().map_err(|e| VmError::Setup(format!("pipe: {e}")))?;
    // QMP lives in a private 0700 directory; qemu gets the listening socket, not the path.
    let qmp_dir = crate::workdir::private_tempdir("qmp").map_err(|e| VmError::Setup(format!("QMP directory: {e}")))?;
    let qmp_path = qmp_dir.path().join(QMP_SOCKET);
    let qmp_listener =
        UnixListener::bind(&qmp_path).map_err(|e| VmError::Setup(format!("QMP socket {}: {e}", qmp_path.display())))?;
    let fds = QemuFds {
        kernel,
        initrd,
        disk_ro,
        disk_rw,
        disk_direct,
        overlay,
        extra_disks,
        more_overlays,
        floppy,
        payload,
        export,
        import,
        bulk,
        console_w,
        report_w,
        qmp_listener,
    };
    Ok((fds, HostEnds { console_r, report_r, qmp_dir }))
}

/// qemu's configuration for one attempt, every file given as one of `fds`.
fn qemu_config(spec: &VmSpec, accel: Accel, cpu: &str, fds: &QemuFds) -> QemuConfig {
    QemuConfig {
        accel,
        cpu: cpu.to_owned(),
        memory_mib: spec.memory_mib,
        vcpus: spec.vcpus,
        // A tuning knob for measuring boot options; the default is what ships.
        kernel_cmdline: with_preload(
            std::env::var("IMGFORGE_KERNEL_CMDLINE").unwrap_or_else(|_| KERNEL_CMDLINE.to_owned()),
            &spec.preload,
        ),
        kernel_fd: fds.kernel.as_raw_fd(),
        initrd_fd: fds.initrd.as_raw_fd(),
        disk_ro_fd: fds.disk_ro.as_raw_fd(),
        disk_rw_fd: fds.disk_rw.as_ref().map(|f| f.as_raw_fd()),
        overlay: fds.overlay.as_ref().map(|(ro, rw, direct)| cmdline::OverlayFds {
            ro_fd: ro.as_raw_fd(),
            rw_fd: rw.as_ref().expect("opened read-write").as_raw_fd(),
            direct: *direct,
        }),
        extra_disks: spec
            .extra_disks
            .iter()
            .zip(&fds.extra_disks)
            .map(|(d, f)| cmdline::ExtraDiskFds {
                ro_fd: f.disk.as_raw_fd(),
                format: d.format,
                direct: f.direct,
                is_device: crate::stream::destination::is_block_device(&d.path),
                overlay: cmdline::OverlayFds {
                    ro_fd: f.overlay_ro.as_raw_fd(),
                    rw_fd: f.overlay_rw.as_raw_fd(),
                    direct: f.overlay_direct,
                },
            })
            .collect(),
        more_overlays: fds
            .more_overlays
            .iter()
            .map(|((ro, rw, direct), serial)| {
                let fds = cmdline::OverlayFds {
                    ro_fd: ro.as_raw_fd(),
                    rw_fd: rw.as_ref().expect("opened read-write").as_raw_fd(),
                    direct: *direct,
                };
                (fds, serial.clone())
            })
            .collect(),
        disk_format: spec.disk_format,
        disk_direct: fds.disk_direct,
        disk_is_device: crate::stream::destination::is_block_device(&spec.disk),
        floppy_fd: fds.floppy.as_raw_fd(),
        payload_fd: fds.payload.as_ref().map(|p| p.as_raw_fd()),
        export_fds: fds.export.as_ref().map(|(ro, rw)| (ro.as_raw_fd(), rw.as_raw_fd())),
        import_fd: fds.import.as_ref().map(|p| p.as_raw_fd()),
        bulk_fd: fds.bulk.as_ref().map(|p| p.as_raw_fd()),
        console_fd: fds.console_w.as_raw_fd(),
        report_fd: fds.report_w.as_raw_fd(),
        qmp_fd: fds.qmp_listener.as_raw_fd(),
    }
}

/// Every descriptor `config` names, which the child keeps across exec.
fn inherited_fds(config: &QemuConfig) -> Vec<RawFd> {
    let mut inherited: Vec<RawFd> = vec![
        config.kernel_fd,
        config.initrd_fd,
        config.disk_ro_fd,
        config.floppy_fd,
        config.console_fd,
        config.report_fd,
        config.qmp_fd,
    ];
    inherited.extend(config.payload_fd);
    inherited.extend(config.export_fds.iter().flat_map(|(ro, rw)| [*ro, *rw]));
    inherited.extend(config.import_fd);
    inherited.extend(config.bulk_fd);
    inherited.extend(config.disk_rw_fd);
    inherited.extend(config.overlay.iter().flat_map(|o| [o.ro_fd, o.rw_fd]));
    inherited.extend(config.extra_disks.iter().flat_map(|d| [d.ro_fd, d.overlay.ro_fd, d.overlay.rw_fd]));
    inherited.extend(config.more_overlays.iter().flat_map(|(o, _)| [o.ro_fd, o.rw_fd]));
    inherited
}

/// Starts qemu confined: as the unprivileged user, with only the descriptors `config` names.
fn spawn_qemu(spec: &VmSpec, accel: Accel, config: &QemuConfig) -> Result<tokio::process::Child, VmError> {
    let args = cmdline::args(config);
    tracing::debug!(qemu = %spec.qemu.display(), args = %args.join(" "), "starting the helper VM");
    spawn_confined(&spec.qemu, &args, inherited_fds(config), spec.user.as_ref(), accel == Accel::Kvm)
}

/// Starts `qemu` with `args` as `user` (when imgforge runs as root), keeping only `inherited`
/// descriptors, with no input or output but a piped stderr, killed with imgforge; `kvm`: with
/// the group that may open /dev/kvm.
pub(crate) fn spawn_confined(
    qemu: &Path,
    args: &[String],
    inherited: Vec<RawFd>,
    user: Option<&Unprivileged>,
    kvm: bool,
) -> Result<tokio::process::Child, VmError> {
    let kvm_groups = if kvm { privilege::kvm_device_groups() } else { Vec::new() };
    let mut command = tokio::process::Command::new(qemu);
    command
        .env_clear()
        .envs(privilege::confined_environment())
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: only async-signal-safe syscalls run between fork and exec.
    unsafe {
        command.pre_exec(privilege::child_setup(inherited, user.cloned(), kvm_groups));
    }
    command.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => VmError::QemuNotFound(qemu.to_owned()),
        _ => VmError::Setup(format!("cannot start {}: {e}", qemu.display())),
    })
}

/// Keeps the start of qemu's stderr, up to [`STDERR_LIMIT_BYTES`].
pub(crate) fn spawn_stderr_reader(mut stderr: tokio::process::ChildStderr) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut buf = Vec::new();
        let _ = (&mut stderr).take(STDERR_LIMIT_BYTES).read_to_end(&mut buf).await;
        // Keep draining so qemu never blocks on a full pipe.
        let _ = tokio::io::copy(&mut stderr, &mut tokio::io::sink()).await;
        String::from_utf8_lossy(&buf).trim().to_string()
    })
}

/// Waits for qemu to exit. At the soft timeout or an interrupt it stops qemu and fails; with
/// `watch_life`, it kills a qemu whose console stayed silent through the sign-of-life window.
async fn wait_for_exit(
    child: &mut tokio::process::Child,
    spec: &VmSpec,
    qmp_path: &Path,
    shared: &Shared,
    watch_life: bool,
    interrupt: Interrupt,
) -> Result<std::process::ExitStatus, VmError> {
    let soft = tokio::time::sleep(spec.soft_timeout);
    tokio::pin!(soft);
    let life = tokio::time::sleep(KVM_SIGN_OF_LIFE);
    tokio::pin!(life);
    let mut probing = watch_life;
    let interrupted = interrupted(interrupt);
    tokio::pin!(interrupted);
    let mut disk_poll = tokio::time::interval(DISK_ERROR_POLL);
    disk_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            status = child.wait() => return status.map_err(|e| VmError::Setup(format!("waiting for qemu: {e}"))),
            _ = &mut soft => {
                stop(child, qmp_path, spec.hard_grace).await;
                let running = running_task(shared);
                return Err(VmError::Timeout { secs: spec.soft_timeout.as_secs(), running });
            }
            _ = &mut life, if probing => {
                if shared.alive.load(Ordering::SeqCst) {
                    probing = false;
                } else {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    return Err(VmError::NoSignOfLife);
                }
            }
            signal = &mut interrupted => {
                stop(child, qmp_path, spec.hard_grace.min(Duration::from_secs(3))).await;
                return Err(VmError::Interrupted(signal));
            }
            _ = disk_poll.tick() => {
                if paused_on_disk_error(qmp_path).await {
                    stop(child, qmp_path, spec.hard_grace.min(Duration::from_secs(3))).await;
                    return Err(VmError::DiskError { running: running_task(shared) });
                }
            }
        }
    }
}

/// How often the helper VM is asked whether a disk error paused it.
const DISK_ERROR_POLL: Duration = Duration::from_secs(3);
/// How long that question may take (qemu answers at once when it runs).
const DISK_ERROR_REPLY: Duration = Duration::from_secs(1);

/// Whether qemu paused the VM on a disk error (the disk's error policy is `stop`): nothing
/// else would end that pause but the soft timeout.
async fn paused_on_disk_error(qmp_path: &Path) -> bool {
    let path = qmp_path.to_owned();
    let status = tokio::task::spawn_blocking(move || {
        qmp::Qmp::connect(&path, DISK_ERROR_REPLY).and_then(|mut q| q.execute("query-status", None))
    })
    .await;
    matches!(status, Ok(Ok(v)) if is_disk_error_pause(&v))
}

/// True for a `query-status` reply of a VM paused on an I/O error (pure).
fn is_disk_error_pause(status: &serde_json::Value) -> bool {
    status["status"] == "io-error"
}

/// The attempt's result, from how qemu exited and what the guest reported.
fn outcome(
    status: std::process::ExitStatus,
    stderr: String,
    shared: &Shared,
    accel: Accel,
    started: Instant,
) -> Result<VmOutcome, VmError> {
    if let Some(signal) = status.signal() {
        return Err(VmError::Killed { signal, stderr });
    }
    if !status.success() {
        return Err(VmError::QemuFailed { status: status.to_string(), stderr });
    }
    let verdict = shared.verdict.lock().expect("verdict lock").verdict();
    match verdict {
        Verdict::Incomplete { running } => {
            let tail = shared.console_tail.lock().expect("tail lock").iter().cloned().collect::<Vec<_>>().join("\n");
            Err(VmError::NoReport { running, tail })
        }
        verdict => Ok(VmOutcome { verdict, accel, elapsed: started.elapsed() }),
    }
}

fn running_task(shared: &Shared) -> Option<String> {
    match shared.verdict.lock().expect("verdict lock").verdict() {
        Verdict::Incomplete { running } => running,
        _ => None,
    }
}

/// Graceful stop: QMP `quit` (SIGTERM if QMP does not answer), SIGKILL after `grace`.
async fn stop(child: &mut tokio::process::Child, qmp_path: &Path, grace: Duration) {
    let path = qmp_path.to_owned();
    let quit =
        tokio::time::timeout(Duration::from_secs(3), tokio::task::spawn_blocking(move || qmp::quit(&path))).await;
    if !matches!(quit, Ok(Ok(Ok(())))) {
        if let Some(pid) = child.id() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

fn spawn_console_reader(
    pipe: std::io::PipeReader,
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<VmEvent>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            match console::read_line_capped(&mut reader, &mut buf, console::MAX_LINE_BYTES) {
                Ok(false) | Err(_) => break,
                Ok(true) => {}
            }
            shared.alive.store(true, Ordering::SeqCst);
            let raw = String::from_utf8_lossy(&buf);
            let raw = raw.trim_end_matches(['\r', '\n']);
            // The helper drops a task's CHECK line that does not parse from the report: its
            // console log of the task's output is where the host still sees it.
            if let Some((_, output)) = console::task_output(raw) {
                if console::malformed_check(output).is_some() {
                    let _ = events.send(VmEvent::MalformedCheck(printable(output).into_owned()));
                }
            }
            let line = printable(raw).into_owned();
            {
                let mut tail = shared.console_tail.lock().expect("tail lock");
                if tail.len() == CONSOLE_TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line.clone());
            }
            let _ = events.send(VmEvent::Console(line));
        }
    })
}

fn spawn_report_reader(
    mut pipe: std::io::PipeReader,
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<VmEvent>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut splitter = LineSplitter::default();
        let mut buf = [0u8; 4096];
        loop {
            let n = match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            for line in splitter.push(&buf[..n]) {
                match ReportLine::parse(&line).map(ReportLine::printable) {
                    Ok(parsed) => {
                        shared.verdict.lock().expect("verdict lock").observe(&parsed);
                        let _ = events.send(VmEvent::Report(parsed));
                    }
                    Err(_) if console::malformed_check(&line).is_some() => {
                        let _ = events.send(VmEvent::MalformedCheck(printable(&line).into_owned()));
                    }
                    Err(e) => {
                        tracing::debug!("unparsed report line: {e}");
                        shared.verdict.lock().expect("verdict lock").observe_unparsed(&line, &e);
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `bytes` to a serial reader thread (`spawn` = the console's or the report's) and
    /// returns the events it sent.
    fn events_of(
        bytes: Vec<u8>,
        spawn: fn(std::io::PipeReader, Arc<Shared>, mpsc::UnboundedSender<VmEvent>) -> std::thread::JoinHandle<()>,
    ) -> Vec<VmEvent> {
        let (r, mut w) = std::io::pipe().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let reader = spawn(r, Arc::new(Shared::default()), tx);
        std::io::Write::write_all(&mut w, &bytes).unwrap();
        drop(w);
        reader.join().unwrap();
        let mut events = Vec::new();
        while let Ok(e) = rx.try_recv() {
            events.push(e);
        }
        events
    }

    /// Only a pause on an I/O error reads as a disk error.
    #[test]
    fn disk_error_pauses() {
        assert!(is_disk_error_pause(&serde_json::json!({"running": false, "status": "io-error"})));
        for other in ["running", "paused", "shutdown", "internal-error"] {
            assert!(!is_disk_error_pause(&serde_json::json!({"running": false, "status": other})), "{other}");
        }
        assert!(!is_disk_error_pause(&serde_json::json!({})));
    }

    /// A guest printing a 3 MiB console line: the host keeps 64 KiB of it and a mark.
    #[test]
    fn console_lines_are_capped() {
        let mut bytes = vec![b'x'; 3 << 20];
        bytes.extend_from_slice(b"\nafter\n");
        let events = events_of(bytes, spawn_console_reader);
        let lines: Vec<&String> =
            events.iter().filter_map(|e| if let VmEvent::Console(l) = e { Some(l) } else { None }).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), console::MAX_LINE_BYTES + console::TRUNCATED_MARK.len());
        assert!(lines[0].ends_with(console::TRUNCATED_MARK));
        assert_eq!(lines[1], "after");
    }

    /// A task's CHECK line that does not parse (the helper drops it from the report; its
    /// console log keeps it) and one on the report port both become a malformed check, the
    /// line escaped; well-formed ones and other lines do not.
    #[test]
    fn unparseable_check_lines_are_reported() {
        let console =
            b"[70-CheckPackages] CHECK ok package-x \"1.0\"\n[70-CheckPackages] CHECK ok bad/name \"\x1b[2J\"\n\
[07-CheckFilesystems] e2fsck 1.47\nCHECK garbage\n";
        let malformed = |events: Vec<VmEvent>| -> Vec<String> {
            events.into_iter().filter_map(|e| if let VmEvent::MalformedCheck(l) = e { Some(l) } else { None }).collect()
        };
        assert_eq!(malformed(events_of(console.to_vec(), spawn_console_reader)), ["CHECK ok bad/name \"\\u{1b}[2J\""]);
        let report = b"TASK-START 70-CheckPackages\nCHECK fail package-y \"no\"\nCHECK ok x\nSUCCESS\n";
        let events = events_of(report.to_vec(), spawn_report_reader);
        assert!(events.iter().any(|e| matches!(e, VmEvent::Report(ReportLine::Check { ok: false, .. }))));
        assert_eq!(malformed(events), ["CHECK ok x"]);
    }

    #[test]
    fn preload_hint() {
        assert_eq!(preload_modules(&["vfat", "ext4", "xfs", "ext3", "swap"], false), ["vfat", "ext4", "xfs"]);
        assert_eq!(preload_modules(&["LVM2_member"], true), ["squashfs", "dm_mod"]);
        assert!(preload_modules(&[], false).is_empty());
        assert_eq!(with_preload("quiet".into(), &["xfs", "ext4"]), "quiet imgforge.preload=xfs,ext4");
        assert_eq!(with_preload("quiet".into(), &[]), "quiet");
    }
}
