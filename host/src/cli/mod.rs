//! The command line: parsing, dispatch, exit statuses (the CLI contract: shared/docs/cli.md).

pub mod argv;
pub mod exit;
pub mod machine_readable;
mod man_pages;
mod package_files;

use crate::cli::exit::{ExitStatus, Failure};
use crate::job::{self, DeployTarget, VmSettings, HELPER_MEMORY_MIB, HELPER_SOFT_TIMEOUT_SECS, HELPER_VCPUS};
use crate::ops::{operation_options, OpsArgs, Plan};
use crate::progress::{Event, Progress};
use crate::vm::accel::Accel;
use crate::vm::blockdev_qemu::Confinement;
use crate::vm::privilege::DEFAULT_HELPER_USER;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

mod render;
use render::ProgressMode;

/// imgforge: customize operating-system images offline, in an unprivileged helper VM.
#[derive(Debug, Parser)]
#[command(name = "imgforge", version, about, max_term_width = 100)]
pub struct Cli {
    /// More logging on stderr, including the helper VM's console (-vv: debug and traced tasks).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// No progress and no informational messages; errors are still printed (virt-customize's -q).
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Trace: the helper VM's console, with every command of its tasks as it runs (set -x).
    #[arg(short = 'x', global = true)]
    pub trace: bool,
    /// Colour log lines even when stderr is not a terminal (virt-customize's --colors).
    #[arg(long, visible_alias = "colours", global = true)]
    pub colors: bool,
    #[command(subcommand)]
    command: Command,
}

/// What `--version` prints after the name: the version, the commit it was built from (`unknown`
/// outside a git checkout) and the helper image recipe it builds.
pub fn version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| {
        format!(
            "{} (commit {}, helper image recipe {})",
            env!("CARGO_PKG_VERSION"),
            env!("IMGFORGE_GIT_COMMIT"),
            crate::helper_image::recipe_id()
        )
    })
}

/// The documented command line (what `--help`, the man pages and the completions describe).
pub fn command() -> clap::Command {
    Cli::command().version(version())
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Stream an image onto a block device or file, then customize it.
    Deploy(DeployArgs),
    /// Stream an image onto a block device or file (no customization).
    Write(WriteArgs),
    /// Customize a disk image or block device in place.
    Customize(CustomizeArgs),
    /// Describe an image: format, size, partitions, filesystems (never boots or mounts).
    Inspect(InspectArgs),
    /// Check an image: filesystems clean, required packages present (or, with --provenance,
    /// that it is the image a build's provenance statement names).
    Verify(VerifyArgs),
    /// Build the variants of a recipe (a base image, operations, a matrix of variables), each
    /// with a provenance statement beside it.
    Build(BuildArgs),
    /// Manage the helper VM's kernel and initramfs.
    #[command(subcommand)]
    HelperImage(HelperImageCommand),
    /// Ganeti OS interface.
    #[command(subcommand)]
    Ganeti(GanetiCommand),
}

#[derive(Debug, Subcommand)]
enum HelperImageCommand {
    /// Build the helper kernel and initramfs into the cache (when missing or stale).
    Build {
        /// Rebuild even if the cached image is current.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum GanetiCommand {
    /// Write the Ganeti OS definition to DIR/imgforge.
    InstallOs {
        /// Ganeti's OS directory.
        #[arg(long, default_value = "/srv/ganeti/os")]
        os_dir: PathBuf,
        /// The imgforge the OS scripts run (default: this program). The package writes its
        /// definition with /usr/bin/imgforge from the binary it is built from.
        #[arg(long, value_name = "PATH")]
        imgforge_path: Option<PathBuf>,
    },
    /// OS script: deploy img_id onto DISK_0_PATH and customize it (Ganeti's environment).
    Create {
        /// What Ganeti asks to check or pass (`verify parameters`); all is checked anyway.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<String>,
    },
    /// OS script: a raw disk stream on stdin onto DISK_0_PATH.
    Import {
        /// What Ganeti asks to check or pass (`verify parameters`); all is checked anyway.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<String>,
    },
    /// OS script: DISK_0_PATH to stdout.
    Export {
        /// What Ganeti asks to check or pass (`verify parameters`); all is checked anyway.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<String>,
    },
    /// OS script: set the new INSTANCE_NAME as the image's hostname.
    Rename {
        /// What Ganeti asks to check or pass (`verify parameters`); all is checked anyway.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<String>,
    },
    /// OS script: check the OSP_* parameters before any disk is touched.
    Verify {
        /// What Ganeti asks to check or pass (`verify parameters`); all is checked anyway.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<String>,
    },
}

/// How the helper VM runs.
#[derive(Debug, Args)]
#[command(next_help_heading = "Helper VM")]
struct VmArgs {
    /// Accelerator: auto uses KVM where it works and falls back to TCG by itself.
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    accel: Accel,
    /// Helper VM soft timeout in seconds (then a graceful stop, then SIGKILL).
    #[arg(long, value_name = "SECS", default_value_t = HELPER_SOFT_TIMEOUT_SECS, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    timeout: u64,
    /// Helper VM memory in MiB (128 to 65536).
    #[arg(short = 'm', long, visible_alias = "memsize", value_name = "MIB", default_value_t = HELPER_MEMORY_MIB, value_parser = parse_memory_mib)]
    memory: u32,
    /// Helper VM vCPUs (1 to 255).
    #[arg(long, value_name = "N", default_value_t = HELPER_VCPUS, value_parser = clap::value_parser!(u32).range(1..=255))]
    smp: u32,
    /// Accepted, and always so: the helper VM never has a network.
    #[arg(long, overrides_with = "network")]
    no_network: bool,
    /// Refused: the helper VM has no network (see --install-rpm, --install-deb, --repo DIR,
    /// --copy-in, --upload).
    #[arg(long, overrides_with = "no_network")]
    network: bool,
    /// Unprivileged user qemu runs as (when imgforge runs as root). `dynamic` (the default):
    /// each qemu gets a uid and gid of its own, from 1879048192..=1879113727, that no user
    /// database entry names and no other process uses. A named USER is shared with every other
    /// process of that user, which can then read and write the job's qemu (guest memory, disks,
    /// the report): give a dedicated user, never `nobody`.
    #[arg(long, value_name = "USER", default_value = DEFAULT_HELPER_USER)]
    helper_user: String,
    /// qemu binary.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64", hide = true)]
    qemu: PathBuf,
    /// Skip a helper task by name, e.g. SELinuxRelabel (snf-image's EXCLUDE_TASK_<Name>).
    #[arg(long, value_name = "NAME")]
    exclude_task: Vec<String>,
    /// Run no task at all: boot the helper, read the rules, stop (a bare-boot baseline).
    #[arg(long)]
    exclude_all_tasks: bool,
}

#[derive(Debug, Args)]
struct CustomizeArgs {
    /// A disk image (raw or qcow2) or block device to customize in place; given several times
    /// for a guest on several disks (the root filesystem on any of them, the others mounted by
    /// the guest's fstab; every disk changes only if every operation succeeded).
    #[arg(short = 'a', long = "add", value_name = "DISK")]
    disk: Vec<PathBuf>,
    /// Without -a: print "imgforge" and then what this build supports, one word a line, and
    /// exit (guestfs-tools' shape). FORMAT: stream:stdout (default), stream:stderr, file:NAME.
    #[arg(long, value_name = "FORMAT", num_args = 0..=1, require_equals = true, default_missing_value = "stream:stdout")]
    machine_readable: Option<String>,
    /// The format of the -a disks that follow, as given: raw is used as raw whatever its first
    /// bytes look like; auto (the default) reads it from the header again. After the last -a
    /// it is refused, as virt-customize does, except with one -a and no --format before it
    /// (imgforge's older form: it then applies to that disk).
    #[arg(long, value_enum)]
    format: Vec<DiskFormatArg>,
    /// Progress output: auto (a bar on a terminal), bar, json (lines on stdout), none.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    progress: ProgressMode,
    /// Grow the guest into a disk larger than its image (enlarged with qemu-img resize or
    /// truncate): the GPT backup header to the disk's end, the last partition to the disk's end
    /// when it holds the root filesystem (or its LVM volume group), then that filesystem
    /// (ext2/3/4, XFS). deploy does this by itself onto a larger target.
    #[arg(long)]
    grow: bool,
    /// Dry run: run every operation into a throwaway overlay, print each file added, removed or
    /// changed (with type, mode, owner; `file-change` events with --progress json), and leave
    /// the disk untouched.
    #[arg(short = 'n', long, overrides_with = "dry_run")]
    dry_run: bool,
    #[command(flatten)]
    ops: OpsArgs,
    #[command(flatten)]
    vm: VmArgs,
}

/// `customize --format`: virt-customize's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DiskFormatArg {
    /// From the disk's header.
    Auto,
    /// Raw, whatever the header says.
    Raw,
    /// qcow2 (refused if the header is not qcow2's).
    Qcow2,
}

impl DiskFormatArg {
    fn known(self) -> job::KnownFormat {
        match self {
            Self::Auto => job::KnownFormat::FromHeader,
            Self::Raw => job::KnownFormat::Given(crate::vm::cmdline::DiskFormat::Raw),
            Self::Qcow2 => job::KnownFormat::Given(crate::vm::cmdline::DiskFormat::Qcow2),
        }
    }
}

#[derive(Debug, Args)]
struct DeployArgs {
    #[command(flatten)]
    write: WriteArgs,
    /// Write a customized liveimg instead of a raw disk or filesystem (the source must be one).
    #[arg(long, value_enum, default_value_t = DeployTarget::Raw)]
    target_format: DeployTarget,
    #[command(flatten)]
    ops: OpsArgs,
    #[command(flatten)]
    vm: VmArgs,
}

#[derive(Debug, Clone, Args)]
struct WriteArgs {
    /// Source image: path or http(s) URL (raw, qcow2 & other qemu-img formats, gzip/xz/zstd
    /// raw, liveimg), detected from content.
    #[arg(long, value_name = "SRC")]
    image: String,
    /// Target block device or file (a new file appears only when complete).
    #[arg(long, value_name = "DEST")]
    target: PathBuf,
    /// Write into an existing regular file in place (never truncated or shrunk).
    #[arg(long)]
    force: bool,
    /// Size of a new target file, to make room for growth (e.g. 10G, 512M).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    size: Option<u64>,
    /// Expected SHA-256 of the source as given; checked before the target is committed.
    #[arg(long, value_name = "HEX", value_parser = crate::job::write::check_sha256_arg)]
    sha256: Option<String>,
    /// Allow a qcow2 source to read this backing file (refused otherwise).
    #[arg(long, value_name = "PATH")]
    backing_file: Option<PathBuf>,
    /// Progress output: auto (a bar on a terminal), bar, json (lines on stdout), none.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto, id = "write_progress")]
    progress: ProgressMode,
    /// An http(s) source must connect within SECS.
    #[arg(long, value_name = "SECS", default_value_t = crate::source::http::CONNECT_TIMEOUT_SECS, value_parser = clap::value_parser!(u64).range(1..=3600))]
    http_connect_timeout: u64,
    /// An http(s) source may send nothing for at most SECS (headers or body).
    #[arg(long, value_name = "SECS", default_value_t = crate::source::http::IDLE_TIMEOUT_SECS, value_parser = clap::value_parser!(u64).range(1..=3600))]
    http_idle_timeout: u64,
}

/// Helper VM memory bounds: below 128 MiB the helper kernel does not boot.
const MEMORY_MIB: std::ops::RangeInclusive<u32> = 128..=65_536;

/// Parses `-m`/`--memsize`/`--memory` (whole MiB), naming all three spellings when refused.
fn parse_memory_mib(text: &str) -> Result<u32, String> {
    text.parse::<u32>().ok().filter(|n| MEMORY_MIB.contains(n)).ok_or_else(|| {
        format!("-m/--memsize/--memory takes whole MiB from {} to {}", MEMORY_MIB.start(), MEMORY_MIB.end())
    })
}

/// Parses `10G`, `512M`, `4096` (bytes; K/M/G/T are powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, ""),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{text:?} is not a size such as 10G, 512M or 4096"))?;
    let shift = match unit.trim_end_matches(['B', 'b', 'i']) {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (use K, M, G or T)")),
    };
    n.checked_mul(1 << shift).filter(|n| *n > 0).ok_or_else(|| format!("{text:?} is not a usable size"))
}

#[derive(Debug, Args)]
struct InspectArgs {
    /// The image.
    image: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    /// The image (disk image, liveimg or compressed raw).
    image: PathBuf,
    /// A package that must be installed (repeatable).
    #[arg(long, value_name = "NAME")]
    require_package: Vec<String>,
    /// Only check that IMAGE is the subject of this provenance statement (`imgforge build`'s
    /// OUTPUT.provenance.json): its SHA-256 and the statement's shape; no helper VM.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["require_package", "json"])]
    provenance: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    vm: VmArgs,
}

/// Helper VMs `build --jobs` may run side by side.
const MAX_BUILD_JOBS: u64 = 64;

#[derive(Debug, Args)]
struct BuildArgs {
    /// The recipe (TOML; see README.md, "Recipes", and docs/recipe-v1.schema.json).
    recipe: PathBuf,
    /// Helper VMs side by side (each customizing its share of the variants).
    #[arg(short = 'j', long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=MAX_BUILD_JOBS))]
    jobs: u64,
    /// Seed for salts and random passwords (over the recipe's `seed`): the same seed and
    /// variant name give the same choices. A secret like the passwords it stands for.
    #[arg(long, value_name = "S")]
    seed: Option<String>,
    /// Where the outputs and their provenance go (created if missing; nothing is overwritten).
    #[arg(long, value_name = "DIR", default_value = ".")]
    out_dir: PathBuf,
    /// Progress output: auto (a bar on a terminal), bar, json (lines on stdout), none.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    progress: ProgressMode,
    #[command(flatten)]
    vm: VmArgs,
}

/// The operation options of `matches`, in command-line order.
fn ordered_ops(matches: &ArgMatches) -> Result<Plan, Failure> {
    let mut occurrences: Vec<(usize, &str, Option<String>)> = Vec::new();
    for option in operation_options() {
        if !option.takes_value {
            if matches.get_flag(&option.id) {
                // A flag that is an operation (--reset-machine-id) runs where it stands.
                let index = matches.index_of(&option.id).unwrap_or(0);
                occurrences.push((index, &option.name, None));
            }
        } else if let (Some(indices), Some(values)) = (matches.indices_of(&option.id), matches.get_raw(&option.id)) {
            for (index, value) in indices.zip(values) {
                occurrences.push((index, &option.name, Some(value.to_string_lossy().into_owned())));
            }
        }
    }
    occurrences.sort_by_key(|(i, _, _)| *i);
    let mut plan = Plan::default();
    // virt-customize's --password-crypto holds for every password, wherever it stands: the
    // last one given is set first, and only a commands file's own applies to what follows it.
    if let Some((_, option, value)) = occurrences.iter().rev().find(|(_, o, _)| *o == "password-crypto") {
        plan.add(option, value.as_deref())?;
    }
    for (_, option, value) in occurrences {
        if option != "password-crypto" {
            plan.add(option, value.as_deref())?;
        }
    }
    plan.finish()?;
    Ok(plan)
}

/// What the user asked of the helper VM; `--network` is refused here, naming what works offline.
fn vm_settings(vm: &VmArgs, verbose: u8, trace: bool) -> Result<VmSettings, Failure> {
    if vm.network {
        return Err(Failure::bad_input(
            "--network: the helper VM has no network, by design; give what the guest needs from the host \
             instead: --install-rpm FILE.rpm, --install-deb FILE.deb, --install PKG or --update with --repo DIR \
             (a local apt or yum/dnf repository, or a directory of .deb files), --firstboot-install PKG (at \
             the guest's first boot, with its network), \
             --copy-in LOCALPATH:REMOTEDIR or --upload FILE:DEST",
        ));
    }
    Ok(VmSettings {
        accel: vm.accel,
        timeout: Duration::from_secs(vm.timeout),
        hard_grace: Duration::from_secs(job::HELPER_HARD_GRACE_SECS),
        memory_mib: vm.memory,
        vcpus: vm.smp,
        helper_user: vm.helper_user.clone(),
        excluded_tasks: if vm.exclude_all_tasks { vec!["*".into()] } else { vm.exclude_task.clone() },
        show_console: verbose > 0 || trace,
        trace_tasks: verbose > 1 || trace,
        qemu: vm.qemu.clone(),
    })
}

/// The progress display: `-q` shows none, whatever `--progress` says (JSON lines are output,
/// not progress for a person, and stay).
/// What `customize` works on: the guest's disks, each with the `--format` that stood before
/// it, or (`--machine-readable` without `-a`) nothing but the capability lines.
#[derive(Debug, PartialEq)]
enum CustomizeDisk {
    Disks(Vec<(PathBuf, DiskFormatArg)>),
    Capabilities(machine_readable::Output),
}

/// Checks `-a`, `--format` and `--machine-readable` together; `sub` gives where each `-a` and
/// `--format` stood.
fn customize_disk(args: &CustomizeArgs, sub: &ArgMatches) -> Result<CustomizeDisk, Failure> {
    let output =
        args.machine_readable.as_deref().map(machine_readable::parse).transpose().map_err(Failure::bad_input)?;
    let at = |id: &str| sub.indices_of(id).map(Iterator::collect::<Vec<usize>>).unwrap_or_default();
    let disks: Vec<(usize, PathBuf)> = at("disk").into_iter().zip(args.disk.iter().cloned()).collect();
    let formats: Vec<(usize, DiskFormatArg)> = at("format").into_iter().zip(args.format.iter().copied()).collect();
    match (disks.is_empty(), output) {
        (true, Some(output)) => Ok(CustomizeDisk::Capabilities(output)),
        (true, None) => Err(Failure::bad_input("customize needs the disk to customize: -a DISK")),
        (false, Some(_)) => Err(Failure::bad_input(
            "--machine-readable with -a: imgforge's machine-friendly output is --progress json; --machine-readable alone lists the capabilities",
        )),
        (false, None) => disk_formats(&disks, &formats).map(CustomizeDisk::Disks).map_err(Failure::bad_input),
    }
}

/// Each `-a` with the last `--format` before it (auto without one), as virt-customize reads
/// them from their places on the command line; a `--format` after the last `-a` is refused as
/// virt-customize refuses it, but with a single `-a` and no `--format` before it, where it can
/// only mean that disk (imgforge's older form) (pure).
fn disk_formats(
    disks: &[(usize, PathBuf)],
    formats: &[(usize, DiskFormatArg)],
) -> Result<Vec<(PathBuf, DiskFormatArg)>, String> {
    let last_disk = disks.iter().map(|(i, _)| *i).max().unwrap_or(0);
    let trailing = formats.iter().rfind(|(i, _)| *i > last_disk);
    let format_before = |at: usize| formats.iter().rfind(|(i, _)| *i < at).map(|(_, f)| *f);
    match (disks, trailing) {
        ([(at, disk)], Some((_, format))) if format_before(*at).is_none() => Ok(vec![(disk.clone(), *format)]),
        (_, Some(_)) => Err("--format must appear before the -a it applies to (it sets the format of the -a \
             options that follow it, as in virt-customize)"
            .into()),
        (disks, None) => Ok(disks
            .iter()
            .map(|(at, disk)| (disk.clone(), format_before(*at).unwrap_or(DiskFormatArg::Auto)))
            .collect()),
    }
}

fn progress_mode(mode: ProgressMode, quiet: bool) -> ProgressMode {
    match mode {
        ProgressMode::Json => ProgressMode::Json,
        _ if quiet => ProgressMode::None,
        other => other,
    }
}

/// The most the HTTP client may log, whatever RUST_LOG asks: its trace level shows credentials.
const HTTP_CLIENT_LOG_CAPS: [&str; 2] = ["ureq=debug", "ureq_proto=debug"];

fn init_tracing(verbose: u8, quiet: bool, colors: bool) {
    let default = match verbose {
        0 if quiet => "error",
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // The HTTP client's trace level logs the URL whole and the request's bytes (query tokens,
    // the basic-auth header): its debug level redacts them, and is as far as it may go.
    for quiet in HTTP_CLIENT_LOG_CAPS {
        if let Ok(directive) = quiet.parse() {
            filter = filter.add_directive(directive);
        }
    }
    // Colours only for a person at a terminal: CI logs and Ganeti's OS logs get plain text.
    let ansi = colors || std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| crate::stdio::LossyStderr)
        .log_internal_errors(false)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
}

/// Turns SIGINT/SIGTERM/SIGHUP into a watch value, so running work can stop and clean up.
fn interrupt_channel() -> crate::vm::Interrupt {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = tokio::sync::watch::channel(None);
    // Installed here, before any work starts, not in the task: a signal that came before the
    // task first ran killed imgforge outright (SIGTERM's default), cleaning nothing up.
    // A signal ignored at start stays ignored: `nohup` (SIGHUP), a script's `&` (SIGINT).
    let listen = |kind: SignalKind| {
        // SAFETY: plain data, filled in by sigaction below.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: only reads the current disposition.
        let ignored = unsafe { libc::sigaction(kind.as_raw_value(), std::ptr::null(), &mut old) } == 0
            && old.sa_sigaction == libc::SIG_IGN;
        if ignored {
            Ok(None)
        } else {
            signal(kind).map(Some)
        }
    };
    async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
        match s {
            Some(s) => drop(s.recv().await),
            None => std::future::pending().await,
        }
    }
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) =
        (listen(SignalKind::interrupt()), listen(SignalKind::terminate()), listen(SignalKind::hangup()))
    else {
        return rx;
    };
    tokio::spawn(async move {
        let name = tokio::select! {
            () = recv(&mut int) => "SIGINT",
            () = recv(&mut term) => "SIGTERM",
            () = recv(&mut hup) => "SIGHUP",
        };
        let _ = tx.send(Some(name));
    });
    rx
}

async fn dispatch(cli: Cli, matches: ArgMatches) -> Result<(), Failure> {
    let interrupt = interrupt_channel();
    // SIGKILL runs no destructor: what an imgforge killed so left behind goes now.
    crate::workdir::sweep_logged(&std::env::temp_dir(), crate::workdir::Reach::WorkDirectories);
    let (verbose, quiet, trace) = (cli.verbose, cli.quiet, cli.trace);
    match cli.command {
        Command::Customize(args) => {
            let sub = matches.subcommand_matches("customize").expect("customize matches");
            let disks = match customize_disk(&args, sub)? {
                CustomizeDisk::Disks(disks) => disks,
                CustomizeDisk::Capabilities(output) => {
                    return machine_readable::print(&output)
                        .map_err(|e| Failure::new(ExitStatus::Environment, format!("--machine-readable: {e}")));
                }
            };
            let settings = vm_settings(&args.vm, verbose, trace)?;
            let mut plan = ordered_ops(sub)?;
            plan.dry_run = args.dry_run;
            plan.grow_to_disk = args.grow;
            let progress = render::renderer(progress_mode(args.progress, quiet));
            let disks: Vec<job::GuestDisk> =
                disks.into_iter().map(|(path, format)| job::GuestDisk::new(path, format.known())).collect();
            let result = job::customize(&disks, plan, false, &settings, progress.as_ref(), &interrupt).await;
            finish(progress.as_ref(), result.map_err(Failure::from))
        }
        Command::Write(args) => {
            let progress = render::renderer(progress_mode(args.progress, quiet));
            let result =
                job::write(&write_request(&args, Confinement::default()), progress.clone(), &interrupt).await.map(drop);
            finish(progress.as_ref(), result.map_err(Failure::from))
        }
        Command::Deploy(args) => {
            let sub = matches.subcommand_matches("deploy").expect("deploy matches");
            let settings = vm_settings(&args.vm, verbose, trace)?;
            let plan = ordered_ops(sub)?;
            let progress = render::renderer(progress_mode(args.write.progress, quiet));
            let request = write_request(&args.write, settings.confinement());
            let result = match args.target_format {
                DeployTarget::Liveimg => {
                    job::deploy_liveimg(&request, plan, &settings, progress.clone(), &interrupt).await
                }
                DeployTarget::Raw => job::deploy(&request, plan, &settings, progress.clone(), &interrupt).await,
            };
            finish(progress.as_ref(), result.map_err(Failure::from))
        }
        Command::HelperImage(HelperImageCommand::Build { force }) => {
            until_interrupted(&interrupt, build_helper_image(force)).await
        }
        Command::Inspect(args) => until_interrupted(&interrupt, inspect(args, &interrupt)).await,
        Command::Verify(args) => {
            if let Some(statement) = &args.provenance {
                return verify_provenance(statement, &args.image, &interrupt).await;
            }
            let settings = vm_settings(&args.vm, verbose, trace)?;
            verify(args, &settings, &interrupt).await
        }
        Command::Build(args) => {
            let settings = vm_settings(&args.vm, verbose, trace)?;
            let progress = render::renderer(progress_mode(args.progress, quiet));
            let request = crate::recipe::build::BuildRequest {
                recipe: args.recipe.clone(),
                out_dir: args.out_dir.clone(),
                jobs: args.jobs as usize,
                seed: args.seed.clone(),
                env_source_date_epoch: std::env::var("SOURCE_DATE_EPOCH").ok(),
                imgforge_version: format!("imgforge {}", version()),
            };
            let result = crate::recipe::build::build(&request, &settings, progress.clone(), &interrupt).await;
            if let (Ok(built), false) = (&result, quiet) {
                for b in built {
                    progress.note(&format!("{}: {} ({})", b.name, b.output.display(), b.provenance.display()));
                }
            }
            finish(progress.as_ref(), result.map(drop).map_err(Failure::from))
        }
        Command::Ganeti(action) => ganeti(action, &interrupt).await,
    }
}

/// Runs `work` (blocking reads and writes with nothing to roll back: `inspect`, `helper-image
/// build`, Ganeti's `export`) until it ends or a signal comes; a signal ends the command with
/// the interrupted status, and the process exits without waiting for a read or write blocked
/// on a pipe or a hung qemu (its children die with it: parent-death signal).
async fn until_interrupted(
    interrupt: &crate::vm::Interrupt,
    work: impl std::future::Future<Output = Result<(), Failure>>,
) -> Result<(), Failure> {
    let mut work = std::pin::pin!(work);
    tokio::select! {
        result = &mut work => result,
        signal = crate::vm::interrupted(interrupt.clone()) => {
            // Work that watches the interrupt itself (inspect) ends within a moment with its
            // own message, which names its input; blocked work does not.
            match tokio::time::timeout(std::time::Duration::from_secs(1), &mut work).await {
                Ok(result) => result,
                Err(_) => Err(Failure::new(ExitStatus::Interrupted, format!("interrupted by {signal}"))),
            }
        }
    }
}

/// `helper-image build`: prints where the image is and what it was built from.
async fn build_helper_image(force: bool) -> Result<(), Failure> {
    let cache = crate::helper_image::cache_dir();
    let build = if force { crate::helper_image::rebuild } else { crate::helper_image::ensure };
    let image = tokio::task::spawn_blocking(move || build(&cache))
        .await
        .map_err(|e| Failure::environment(format!("helper image build panicked: {e}")))??;
    crate::stdio::out_line(&format!(
        "helper image {}\n  kernel {}\n  initrd {}\n  package {}",
        image.key,
        image.kernel.display(),
        image.initrd.display(),
        image.package.display()
    ));
    Ok(())
}

/// `inspect`: the report as a table, or JSON.
async fn inspect(args: InspectArgs, interrupt: &crate::vm::Interrupt) -> Result<(), Failure> {
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (interrupt, flag) = (interrupt.clone(), cancel.clone());
        tokio::spawn(async move {
            crate::vm::interrupted(interrupt).await;
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
        })
    };
    let report = tokio::task::spawn_blocking(move || {
        crate::inspect::inspect(&args.image, &Confinement::default(), &cancel).map(|r| (r, args.json))
    })
    .await
    .map_err(|e| Failure::environment(format!("inspect panicked: {e}")))?;
    watcher.abort();
    let (report, json) = report?;
    if json {
        crate::stdio::out_line(&serde_json::to_string_pretty(&report).expect("report serializes"));
    } else {
        // Labels, partition names and paths come from the image.
        crate::stdio::out(&imgforge_protocol::printable::printable(&crate::inspect::render(&report)));
    }
    Ok(())
}

/// `verify`: the report as a table, or JSON; a bad image exits 1.
async fn verify(args: VerifyArgs, settings: &VmSettings, interrupt: &crate::vm::Interrupt) -> Result<(), Failure> {
    let report = crate::job::verify::run(&args.image, &args.require_package, settings, interrupt).await?;
    if args.json {
        crate::stdio::out_line(&serde_json::to_string_pretty(&report).expect("report serializes"));
    } else {
        crate::stdio::out(&report.render());
    }
    if report.ok {
        Ok(())
    } else {
        Err(Failure::new(ExitStatus::CustomizationFailed, crate::job::verify::summary(&report)))
    }
}

/// `verify --provenance`: exit 0 when IMAGE is the statement's subject, 1 when it is not.
async fn verify_provenance(
    statement: &std::path::Path,
    image: &std::path::Path,
    interrupt: &crate::vm::Interrupt,
) -> Result<(), Failure> {
    use crate::recipe::build::VerifyProvenanceError as E;
    // Off the runtime and cancellable: hashing a large image takes a while, and a signal must
    // stop it.
    let (s, i) = (statement.to_owned(), image.to_owned());
    let result = crate::job::cancellable("verify --provenance", interrupt, move |cancel| {
        Ok::<_, crate::job::JobError>(crate::recipe::build::verify_provenance(&s, &i, cancel))
    })
    .await?;
    match result {
        Ok(name) => {
            crate::stdio::out_line(&format!(
                "OK {}: matches the subject {name} of {}",
                image.display(),
                statement.display()
            ));
            Ok(())
        }
        Err(e @ E::Read { .. }) => Err(Failure::bad_input(e.to_string())),
        Err(e @ E::Interrupted) => Err(Failure::new(ExitStatus::Interrupted, e.to_string())),
        Err(E::Check(e)) => Err(Failure::new(
            ExitStatus::CustomizationFailed,
            format!("FAIL {} against {}: {e}", image.display(), statement.display()),
        )),
    }
}

/// The Ganeti OS interface's actions.
async fn ganeti(action: GanetiCommand, interrupt: &crate::vm::Interrupt) -> Result<(), Failure> {
    match action {
        GanetiCommand::InstallOs { os_dir, imgforge_path } => {
            let exe = match imgforge_path {
                Some(path) if path.is_absolute() => path,
                Some(path) => {
                    return Err(Failure::bad_input(format!(
                        "--imgforge-path {}: give an absolute path (Ganeti runs the scripts from anywhere)",
                        path.display()
                    )))
                }
                None => std::env::current_exe()
                    .map_err(|e| Failure::environment(format!("cannot find this program's path: {e}")))?,
            };
            let dir = crate::ganeti::install_os(&os_dir, &exe)?;
            crate::stdio::out_line(&format!("Ganeti OS definition written to {}", dir.display()));
            Ok(())
        }
        GanetiCommand::Create { .. } => Ok(crate::ganeti::create(interrupt).await?),
        GanetiCommand::Rename { .. } => Ok(crate::ganeti::rename(interrupt).await?),
        GanetiCommand::Import { .. } => Ok(crate::ganeti::import(interrupt).await?),
        GanetiCommand::Export { .. } => {
            until_interrupted(interrupt, async {
                Ok(tokio::task::spawn_blocking(crate::ganeti::export)
                    .await
                    .map_err(|e| Failure::environment(e.to_string()))??)
            })
            .await
        }
        GanetiCommand::Verify { .. } => Ok(crate::ganeti::verify(interrupt).await?),
    }
}

/// The write request of `write`/`deploy`'s arguments; qemu formats are read by `confinement`
/// (deploy's helper VM settings, or the defaults for `write`).
fn write_request(args: &WriteArgs, confinement: Confinement) -> crate::job::write::WriteRequest {
    crate::job::write::WriteRequest {
        confinement,
        image: crate::source::Location::parse(&args.image),
        target: args.target.clone(),
        force: args.force,
        size: args.size,
        sha256: args.sha256.clone(),
        sha256_before_write: false,
        backing_file: args.backing_file.clone(),
        http: crate::source::http::HttpTimeouts {
            connect: Duration::from_secs(args.http_connect_timeout),
            idle: Duration::from_secs(args.http_idle_timeout),
        },
        // The operator's own URL: any address, as curl would.
        reach: crate::source::reach::Reach::Any,
    }
}

/// The job's last event: `image-done`, or `image-error` with the failure's message.
fn finish(progress: &dyn Progress, result: Result<(), Failure>) -> Result<(), Failure> {
    match &result {
        Ok(()) => progress.emit(Event::ImageDone),
        Err(f) => progress.emit(Event::error(&f.message)),
    }
    result
}

/// How long blocking work still running at exit may take to finish (after an interrupt).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Runs the command line; returns the process exit code.
pub fn main() -> std::process::ExitCode {
    let matches = command().subcommand(package_files::command()).get_matches();
    crate::cli::argv::scrub();
    if let Some(("generate", sub)) = matches.subcommand() {
        return match package_files::run(sub) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(f) => {
                crate::stdio::err_line(&format!("imgforge: {}", f.message));
                std::process::ExitCode::from(f.status as u8)
            }
        };
    }
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    init_tracing(cli.verbose, cli.quiet, cli.colors);
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            crate::stdio::err_line(&format!("imgforge: cannot start the async runtime: {e}"));
            return std::process::ExitCode::from(ExitStatus::Environment as u8);
        }
    };
    let result = runtime.block_on(dispatch(cli, matches));
    // Work left behind by an interrupt (blocked on a pipe or a hung peer) must not hold up exit.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(f) => {
            // Messages name images, parameters and what qemu said: all may carry a hostile
            // image's or tenant's bytes, which a terminal must not obey.
            crate::stdio::err_line(&format!("imgforge: {}", imgforge_protocol::printable::printable(&f.message)));
            std::process::ExitCode::from(f.status as u8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgforge_protocol::rules::Operation;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
        command().subcommand(package_files::command()).debug_assert();
    }

    #[test]
    fn version_names_the_commit_and_the_helper_image_recipe() {
        let v = version();
        assert!(v.starts_with(env!("CARGO_PKG_VERSION")), "{v}");
        assert!(v.contains(&format!("commit {}", env!("IMGFORGE_GIT_COMMIT"))), "{v}");
        assert!(v.contains(&format!("helper image recipe {}", crate::helper_image::recipe_id())), "{v}");
        let err = command().try_get_matches_from(["imgforge", "--version"]).unwrap_err();
        assert!(err.to_string().contains(v), "{err}");
    }

    #[test]
    fn every_operation_option_exists() {
        let cmd = Cli::command();
        for sub in ["customize", "deploy"] {
            let sub = cmd.find_subcommand(sub).unwrap();
            for option in operation_options() {
                let option = &option.name;
                assert!(sub.get_arguments().any(|a| a.get_long() == Some(option)), "--{option} missing");
            }
        }
    }

    #[test]
    fn operations_keep_command_line_order() {
        let matches = Cli::command()
            .try_get_matches_from([
                "imgforge",
                "customize",
                "-a",
                "d.img",
                "--write",
                "/f:1",
                "--hostname",
                "h",
                "--write",
                "/f:2",
                "--mkdir",
                "/d",
                "--selinux-relabel",
                "--regenerate-ssh-host-keys",
                "--write",
                "/etc/machine-id:old",
                "--reset-machine-id",
            ])
            .unwrap();
        let plan = ordered_ops(matches.subcommand_matches("customize").unwrap()).unwrap();
        assert_eq!(
            plan.operations,
            vec![
                Operation::Write { path: "/f".into(), content: "1".into() },
                Operation::Hostname { name: "h".into() },
                Operation::Write { path: "/f".into(), content: "2".into() },
                Operation::Mkdir { path: "/d".into() },
                Operation::RegenerateSshHostKeys,
                Operation::Write { path: "/etc/machine-id".into(), content: "old".into() },
                Operation::ResetMachineId,
            ]
        );
        assert!(plan.selinux_relabel);
    }

    /// `build`'s options, and `verify --provenance` standing alone.
    #[test]
    fn build_and_provenance_options_table() {
        let cli =
            Cli::try_parse_from(["imgforge", "build", "r.toml", "-j", "3", "--seed", "s", "--out-dir", "o"]).unwrap();
        let Command::Build(b) = &cli.command else { panic!("not build") };
        assert_eq!((b.jobs, b.seed.as_deref(), b.out_dir.as_path()), (3, Some("s"), std::path::Path::new("o")));
        let cli = Cli::try_parse_from(["imgforge", "build", "r.toml"]).unwrap();
        let Command::Build(b) = &cli.command else { panic!("not build") };
        assert_eq!((b.jobs, b.seed.as_deref(), b.out_dir.as_path()), (1, None, std::path::Path::new(".")));
        let cli = Cli::try_parse_from(["imgforge", "verify", "--provenance", "p.json", "i.img"]).unwrap();
        let Command::Verify(v) = &cli.command else { panic!("not verify") };
        assert_eq!(v.provenance.as_deref(), Some(std::path::Path::new("p.json")));
        for args in [
            &["imgforge", "build"][..],
            &["imgforge", "build", "r.toml", "--jobs", "0"],
            &["imgforge", "build", "r.toml", "--jobs", "65"],
            &["imgforge", "build", "r.toml", "--hostname", "h"],
            &["imgforge", "verify", "--provenance", "p.json", "i.img", "--require-package", "x"],
            &["imgforge", "verify", "--provenance", "p.json", "i.img", "--json"],
        ] {
            let err = Cli::command().try_get_matches_from(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn sizes() {
        for (text, want) in
            [("4096", 4096), ("10G", 10 << 30), ("512M", 512 << 20), ("1T", 1 << 40), ("2GiB", 2 << 30), ("8k", 8192)]
        {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
        for bad in ["", "G", "10X", "-1", "0", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for args in [
            &["imgforge", "customize", "-a", "d", "--accel", "xen"][..],
            &["imgforge", "customize", "-a", "d", "--timeout", "0"],
            &["imgforge", "customize", "-a", "d", "--timeout", "soon"],
            &["imgforge", "customize", "-a", "d", "--memory", "1"],
            &["imgforge", "customize", "-a", "d", "--memsize", "127"],
            &["imgforge", "customize", "-a", "d", "-m", "65537"],
            &["imgforge", "customize", "-a", "d", "--smp", "0"],
            &["imgforge", "customize", "-a", "d", "--smp", "256"],
            &["imgforge", "customize", "-a", "d", "--smp", "two"],
            &["imgforge", "customize", "-a", "d", "--format", "vmdk"],
            &["imgforge", "customize", "-a", "d", "--no-network=yes"],
            &["imgforge", "customize", "-a", "d", "-q=1"],
        ] {
            let err = Cli::command().try_get_matches_from(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    /// `imgforge customize -a d.img ARGS`, parsed.
    fn customize(args: &[&str]) -> Cli {
        Cli::try_parse_from(["imgforge", "customize", "-a", "d.img"].iter().chain(args)).unwrap()
    }

    impl Cli {
        fn customize_args(&self) -> &CustomizeArgs {
            let Command::Customize(c) = &self.command else { panic!("not customize") };
            c
        }
    }

    /// `imgforge customize ARGS`: what `customize_disk` makes of them.
    fn disks_of(args: &[&str]) -> Result<CustomizeDisk, Failure> {
        let matches = Cli::command().try_get_matches_from(["imgforge", "customize"].iter().chain(args)).unwrap();
        let cli = Cli::from_arg_matches(&matches).unwrap();
        customize_disk(cli.customize_args(), matches.subcommand_matches("customize").unwrap())
    }

    /// `-a` once or several times, each with the `--format` before it, `--machine-readable`
    /// alone (guestfs-tools' forms), and what is refused.
    #[test]
    fn disks_and_machine_readable_table() {
        use machine_readable::Output;
        use DiskFormatArg::{Auto, Qcow2, Raw};
        let disks = |list: &[(&str, DiskFormatArg)]| {
            CustomizeDisk::Disks(list.iter().map(|(p, f)| (PathBuf::from(p), *f)).collect())
        };
        let ok: Vec<(&[&str], CustomizeDisk)> = vec![
            (&["-a", "d.img"], disks(&[("d.img", Auto)])),
            (&["--add", "d.img", "--hostname", "h"], disks(&[("d.img", Auto)])),
            (&["-a", "a.img", "-a", "b.img"], disks(&[("a.img", Auto), ("b.img", Auto)])),
            (&["--format", "raw", "-a", "a.img", "-a", "b.img"], disks(&[("a.img", Raw), ("b.img", Raw)])),
            (
                &["--format", "raw", "-a", "a.img", "--format", "auto", "-a", "b.img"],
                disks(&[("a.img", Raw), ("b.img", Auto)]),
            ),
            (
                &["-a", "a.img", "--format=qcow2", "--hostname", "h", "-a", "b.qcow2", "--add", "c.img"],
                disks(&[("a.img", Auto), ("b.qcow2", Qcow2), ("c.img", Qcow2)]),
            ),
            (&["--format", "raw", "--format", "qcow2", "-a", "a.img"], disks(&[("a.img", Qcow2)])),
            // imgforge's older form: one disk, its --format after it.
            (&["-a", "d.img", "--format", "raw"], disks(&[("d.img", Raw)])),
            (&["--machine-readable"], CustomizeDisk::Capabilities(Output::Stdout)),
            (&["--machine-readable=stream:stdout"], CustomizeDisk::Capabilities(Output::Stdout)),
            (&["--machine-readable=stream:stderr"], CustomizeDisk::Capabilities(Output::Stderr)),
            (&["--machine-readable=file:/tmp/c"], CustomizeDisk::Capabilities(Output::File("/tmp/c".into()))),
        ];
        for (args, want) in ok {
            assert_eq!(disks_of(args).unwrap(), want, "{args:?}");
        }
        let refused: [(&[&str], &str); 6] = [
            (&[], "needs the disk"),
            (&["-a", "a.img", "-a", "b.img", "--format", "raw"], "--format must appear before the -a"),
            (&["--format", "raw", "-a", "a.img", "--format", "qcow2"], "--format must appear before the -a"),
            (&["-a", "a.img", "--machine-readable"], "--progress json"),
            (&["-a", "a.img", "-a", "b.img", "--machine-readable"], "--progress json"),
            (&["--machine-readable=stdout"], "stream:stderr or file:NAME"),
        ];
        for (args, want) in refused {
            let e = disks_of(args).unwrap_err();
            assert_eq!(e.status, ExitStatus::BadInput, "{args:?}");
            assert!(e.message.contains(want), "{args:?}: {}", e.message);
        }
        // --machine-readable takes its format only with '=': a following word is not it.
        assert!(Cli::try_parse_from(["imgforge", "customize", "--machine-readable", "stream:stderr"]).is_err());
    }

    #[test]
    fn global_options_parse_as_virt_customize() {
        let cli = customize(&[]);
        let c = cli.customize_args();
        assert!(!cli.quiet && !cli.trace && !cli.colors);
        assert_eq!((c.vm.memory, c.vm.smp, c.format.as_slice()), (HELPER_MEMORY_MIB, 1, &[][..]));
        let cli = customize(&["-q", "-x", "--colours", "-m", "384", "--smp", "2", "--format", "raw"]);
        let c = cli.customize_args();
        assert!(cli.quiet && cli.trace && cli.colors);
        assert_eq!((c.vm.memory, c.vm.smp, c.format.as_slice()), (384, 2, &[DiskFormatArg::Raw][..]));
        let cli = customize(&["--quiet", "--colors", "--memsize", "128", "--smp", "255", "--format", "qcow2"]);
        let c = cli.customize_args();
        assert!(cli.quiet && cli.colors);
        assert_eq!((c.vm.memory, c.vm.smp, c.format.as_slice()), (128, 255, &[DiskFormatArg::Qcow2][..]));
        assert_eq!(customize(&["--memory", "65536"]).customize_args().vm.memory, 65_536);
        // The last of --network/--no-network holds, as in virt-customize.
        assert!(!customize(&["--no-network"]).customize_args().vm.network);
        assert!(customize(&["--no-network", "--network"]).customize_args().vm.network);
        assert!(!customize(&["--network", "--no-network"]).customize_args().vm.network);
        // Global options may stand before the subcommand too.
        let cli = Cli::try_parse_from(["imgforge", "-q", "-x", "customize", "-a", "d"]).unwrap();
        assert!(cli.quiet && cli.trace);
    }

    #[test]
    fn dry_run_parses_as_virt_customize() {
        let accepted: &[(&[&str], bool)] = &[
            (&[], false),
            (&["-n"], true),
            (&["--dry-run"], true),
            (&["--write", "/f:x", "-n"], true),
            (&["-qn"], true),
            (&["-n", "-n"], true),
            (&["--dry-run", "--progress", "json"], true),
        ];
        for (args, want) in accepted {
            assert_eq!(customize(args).customize_args().dry_run, *want, "{args:?}");
        }
        for args in [
            &["imgforge", "customize", "-a", "d", "--dry-run=yes"][..],
            &["imgforge", "customize", "-a", "d", "-n1"],
            &["imgforge", "customize", "-a", "d", "--dryrun"],
            // A dry run is customize's: deploy writes the image whatever follows.
            &["imgforge", "deploy", "--image", "i", "--target", "t", "-n"],
            &["imgforge", "deploy", "--image", "i", "--target", "t", "--dry-run"],
        ] {
            let err = Cli::command().try_get_matches_from(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn format_is_taken_as_given() {
        use crate::vm::cmdline::DiskFormat;
        assert!(matches!(DiskFormatArg::Auto.known(), job::KnownFormat::FromHeader));
        assert!(matches!(DiskFormatArg::Raw.known(), job::KnownFormat::Given(DiskFormat::Raw)));
        assert!(matches!(DiskFormatArg::Qcow2.known(), job::KnownFormat::Given(DiskFormat::Qcow2)));
    }

    #[test]
    fn settings_follow_the_global_options() {
        let settings = |args: &[&str], trace| vm_settings(&customize(args).customize_args().vm, 0, trace);
        let s = settings(&["-m", "384", "--smp", "2"], false).unwrap();
        assert_eq!((s.memory_mib, s.vcpus, s.show_console, s.trace_tasks), (384, 2, false, false));
        let s = settings(&[], true).unwrap();
        assert!(s.show_console && s.trace_tasks, "-x shows the console with every command traced");
        let err = settings(&["--network"], false).unwrap_err();
        assert_eq!(err.status, ExitStatus::BadInput);
        for named in ["--network", "--install-rpm", "--install-deb", "--repo DIR", "--copy-in", "--upload"] {
            assert!(err.message.contains(named), "{named}: {}", err.message);
        }
        assert_eq!(progress_mode(ProgressMode::Bar, true), ProgressMode::None);
        assert_eq!(progress_mode(ProgressMode::Auto, true), ProgressMode::None);
        assert_eq!(progress_mode(ProgressMode::Json, true), ProgressMode::Json);
        assert_eq!(progress_mode(ProgressMode::Bar, false), ProgressMode::Bar);
    }

    #[test]
    fn password_crypto_holds_wherever_it_stands() {
        let plan = |args: &[&str]| {
            let matches =
                Cli::command().try_get_matches_from(["imgforge", "customize", "-a", "d"].iter().chain(args)).unwrap();
            ordered_ops(matches.subcommand_matches("customize").unwrap())
        };
        let field = |args: &[&str]| match &plan(args).unwrap().operations[0] {
            Operation::Password { shadow_field, .. } => shadow_field.clone(),
            other => panic!("{other:?}"),
        };
        assert!(field(&["--root-password", "password:x"]).starts_with("$6$"));
        assert!(field(&["--root-password", "password:x", "--password-crypto", "sha256"]).starts_with("$5$"));
        assert!(field(&["--password-crypto", "sha256", "--root-password", "password:x"]).starts_with("$5$"));
        assert!(field(&[
            "--password-crypto",
            "sha256",
            "--password-crypto",
            "sha512",
            "--root-password",
            "password:x"
        ])
        .starts_with("$6$"));
        assert!(field(&["--password-crypto", "md5", "--root-password", "password:x"]).starts_with("$1$"));
        let bad = plan(&["--password-crypto", "blowfish", "--root-password", "password:x"]).unwrap_err();
        assert_eq!(bad.status, ExitStatus::BadInput);
        assert!(bad.message.contains("--password-crypto blowfish") && bad.message.contains("md5"), "{}", bad.message);
    }

    /// In the test process: runs this test binary again for test `name` alone, with
    /// `IMGFORGE_TEST_SIGNAL_CHILD` set, checks it passed, and says true (the test is done). In
    /// that child: false (the test goes on). For signal handlers, which stay installed for the
    /// whole process once installed.
    fn ran_in_a_child(name: &str) -> bool {
        if std::env::var_os("IMGFORGE_TEST_SIGNAL_CHILD").is_some() {
            return false;
        }
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--nocapture", "--test-threads", "1"])
            .env("IMGFORGE_TEST_SIGNAL_CHILD", "1")
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "child: {status}");
                return true;
            }
            if started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!("the child did not end");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A signal imgforge was started with ignored stays ignored: `nohup imgforge write ...`
    /// (SIGHUP ignored) or `imgforge write ... &` from a script (SIGINT ignored) ask to survive
    /// the terminal closing or the script's Ctrl-C (handlers installed over SIG_IGN made
    /// closing the terminal interrupt the write, an existing target's start zeroed).
    #[test]
    fn a_signal_ignored_at_start_does_not_interrupt() {
        if ran_in_a_child("cli::tests::a_signal_ignored_at_start_does_not_interrupt") {
            return;
        }
        // SAFETY: setting a disposition in a child process of its own (this test alone).
        unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        runtime.block_on(async {
            let interrupt = interrupt_channel();
            // SAFETY: a signal to this process, ignored by its disposition before the above.
            unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
            let got = tokio::time::timeout(Duration::from_millis(500), crate::vm::interrupted(interrupt)).await;
            assert!(got.is_err(), "a SIGHUP ignored at start (nohup) interrupted the work: {got:?}");
        });
    }

    /// A SIGTERM sent right after the handlers were installed, before the task that listens
    /// first ran, is an interrupt, not a kill (the handlers were installed by that task).
    #[test]
    fn a_signal_before_the_listening_task_ran_is_an_interrupt() {
        if ran_in_a_child("cli::tests::a_signal_before_the_listening_task_ran_is_an_interrupt") {
            return;
        }
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let interrupt = interrupt_channel();
            // SAFETY: a signal to this process (the child), whose handler was just installed.
            unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
            let got = tokio::time::timeout(Duration::from_secs(5), crate::vm::interrupted(interrupt)).await;
            assert_eq!(got, Ok("SIGTERM"));
        });
    }
}
