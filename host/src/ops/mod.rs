//! The customization operations (OPS) of the command line, checked and turned into rules.
//!
//! Options arrive as `(name, value)` pairs in command-line order (see `cli`), possibly expanded
//! from `--commands-from-file`; everything that can be checked on the host is checked here,
//! before any VM boots.

pub mod commands_file;
pub mod copy_in;
pub mod deb;
pub mod entropy;
pub mod md5_crypt;
pub mod password;
pub mod repo;

use crate::ops::password::{PasswordCrypto, PasswordSelector};
use clap::Args;
use imgforge_protocol::perl_edit::Program;
use imgforge_protocol::rules::{Operation, Principal, RepoFormat};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use thiserror::Error;

/// The customization operations, applied in the order given: the one definition of the
/// operation options (names, arguments, help), which the rest reads through [`operation_options`].
#[derive(Debug, Args)]
#[command(next_help_heading = "Customization operations (applied in the order given)")]
pub struct OpsArgs {
    /// Set the host name.
    #[arg(long, value_name = "NAME")]
    hostname: Vec<String>,
    /// Set root's password: password:PW, file:PATH, random, disabled, locked:SELECTOR.
    #[arg(long, value_name = "SELECTOR")]
    root_password: Vec<String>,
    /// Set USER's password (same selectors).
    #[arg(long, value_name = "USER:SELECTOR")]
    password: Vec<String>,
    /// The hash --root-password and --password write, wherever it stands: sha512 (default),
    /// sha256 or md5 (weak: for old guests).
    #[arg(long, value_name = "md5|sha256|sha512")]
    password_crypto: Vec<String>,
    /// Append SSH public keys to USER's ~/.ssh/authorized_keys (default: your ~/.ssh/*.pub).
    #[arg(long, value_name = "USER[:file:PATH|:string:KEY]")]
    ssh_inject: Vec<String>,
    /// Copy a host file into the guest (owner and mode kept).
    #[arg(long, value_name = "LOCAL:GUESTPATH")]
    upload: Vec<String>,
    /// Create a directory and its parents.
    #[arg(long, value_name = "GUESTDIR")]
    mkdir: Vec<String>,
    /// Replace a file's contents.
    #[arg(long, value_name = "GUESTFILE:CONTENT")]
    write: Vec<String>,
    /// Append a line to a file.
    #[arg(long, value_name = "GUESTFILE:LINE")]
    append_line: Vec<String>,
    /// Delete a file or directory (recursively).
    #[arg(long, value_name = "GUESTPATH")]
    delete: Vec<String>,
    /// Change permissions (octal).
    #[arg(long, value_name = "MODE:GUESTPATH")]
    chmod: Vec<String>,
    /// Change owner and group (numeric ids, as virt-customize; a final symlink is followed).
    #[arg(long, value_name = "UID:GID:PATH")]
    chown: Vec<String>,
    /// Copy a file or directory tree inside the guest, as cp -a (modes, owners, times, symlinks kept).
    #[arg(long, value_name = "SOURCE:DEST")]
    copy: Vec<String>,
    /// Move a file or directory inside the guest, as mv.
    #[arg(long, value_name = "SOURCE:DEST")]
    r#move: Vec<String>,
    /// Create symbolic links LINK... pointing at TARGET, as ln -sf.
    #[arg(long, value_name = "TARGET:LINK[:LINK..]")]
    link: Vec<String>,
    /// Create an empty file, or update an existing file's times.
    #[arg(long, value_name = "FILE")]
    touch: Vec<String>,
    /// Truncate an existing file to zero length.
    #[arg(long, value_name = "FILE")]
    truncate: Vec<String>,
    /// Truncate every regular file under a directory to zero length.
    #[arg(long, value_name = "PATH")]
    truncate_recursive: Vec<String>,
    /// Overwrite a regular file with patterns, then delete it.
    #[arg(long, value_name = "FILE")]
    scrub: Vec<String>,
    /// Edit FILE line by line with a Perl expression: s/REGEX/REPLACEMENT/[gimsx], tr/A/B/,
    /// $_ = "..." (an empty string deletes the line), optionally `if /REGEX/`; nothing else.
    #[arg(long, value_name = "FILE:EXPR")]
    edit: Vec<String>,
    /// Copy a host file or directory tree into the existing guest directory REMOTEDIR, as
    /// virt-customize (tar: modes, numeric owners, times and symlinks kept).
    #[arg(long, value_name = "LOCALPATH:REMOTEDIR")]
    copy_in: Vec<String>,
    /// Run a host script in the guest (chroot, /bin/sh).
    #[arg(long, value_name = "SCRIPT")]
    run: Vec<String>,
    /// Run a command in the guest (chroot, /bin/sh -c).
    #[arg(long, value_name = "CMD")]
    run_command: Vec<String>,
    /// Set the timezone (e.g. Europe/Athens).
    #[arg(long, value_name = "TZ")]
    timezone: Vec<String>,
    /// Install a script to run once at first boot.
    #[arg(long, value_name = "SCRIPT")]
    firstboot: Vec<String>,
    /// Install a command to run once at first boot.
    #[arg(long, value_name = "CMD")]
    firstboot_command: Vec<String>,
    /// Install packages at the guest's first boot with its apt-get, dnf or yum (and its network).
    #[arg(long, value_name = "PKG[,PKG...]")]
    firstboot_install: Vec<String>,
    /// Install RPM files in one transaction with the guest's rpm.
    #[arg(long, value_name = "PATH.rpm")]
    install_rpm: Vec<String>,
    /// Install .deb files with the guest's apt-get (dependencies resolved among them, --repo
    /// and the installed packages).
    #[arg(long, value_name = "PATH.deb")]
    install_deb: Vec<String>,
    /// Install packages from --repo with the guest's apt-get, dnf or yum.
    #[arg(long, value_name = "PKG[,PKG...]")]
    install: Vec<String>,
    /// Remove packages with the guest's apt-get, dnf, yum, dpkg or rpm (no repository needed).
    #[arg(long, value_name = "PKG[,PKG...]")]
    uninstall: Vec<String>,
    /// Upgrade the guest's packages from --repo (the helper VM has no network).
    #[arg(long)]
    update: bool,
    /// Local repository for --install and --update: yum/dnf (repodata/), apt (Packages at its
    /// top, or dists/), or a directory of .deb files.
    #[arg(long, value_name = "DIR")]
    repo: Vec<String>,
    /// Check package signatures of --repo (off by default: the packages are your own).
    #[arg(long)]
    gpgcheck: bool,
    /// Read operations from a file (virt-customize syntax).
    #[arg(long, value_name = "FILE")]
    commands_from_file: Vec<String>,
    /// Accepted, as virt-customize: an SELinux guest is relabelled after every customization
    /// (the guest's setfiles, or /.autorelabel for its next boot) unless --no-selinux-relabel.
    #[arg(long)]
    selinux_relabel: bool,
    /// Leave an SELinux guest's labels as they are (no setfiles run, no /.autorelabel).
    #[arg(long)]
    no_selinux_relabel: bool,
    /// Write a fresh random /etc/machine-id (and /var/lib/dbus/machine-id when it is a regular
    /// file), so that clones of one image differ.
    #[arg(long)]
    reset_machine_id: bool,
    /// Remove the SSH host keys (/etc/ssh/ssh_host_*) and make new ones with the guest's own
    /// ssh-keygen -A when it has sshd; otherwise they stay removed for its first boot to make.
    #[arg(long)]
    regenerate_ssh_host_keys: bool,
}

/// One operation option, as [`OpsArgs`] defines it.
#[derive(Debug)]
pub struct OperationOption {
    /// Its clap argument id (`root_password`).
    pub id: String,
    /// Its name without `--` (`root-password`).
    pub name: String,
    /// False for a flag.
    pub takes_value: bool,
}

/// Every operation option, in [`OpsArgs`] order.
pub fn operation_options() -> &'static [OperationOption] {
    static OPTIONS: LazyLock<Vec<OperationOption>> = LazyLock::new(|| {
        OpsArgs::augment_args(clap::Command::new("ops"))
            .get_arguments()
            .map(|arg| OperationOption {
                id: arg.get_id().to_string(),
                name: arg.get_long().expect("every operation option is a long option").to_owned(),
                takes_value: arg.get_action().takes_values(),
            })
            .collect()
    });
    &OPTIONS
}

/// How deep `--commands-from-file` may nest.
const MAX_COMMANDS_FILE_DEPTH: usize = 8;

/// An operation option that cannot be carried out.
#[derive(Debug, Error)]
pub enum OpsError {
    /// A bad argument.
    #[error("--{option}{}: {reason}", if shown.is_empty() { String::new() } else { format!(" {shown}") })]
    Invalid {
        /// Option name without `--`.
        option: String,
        /// The argument as safe to show (passwords redacted).
        shown: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// An unknown option in a commands file.
    #[error("{file}: line {line}: unknown command {name:?} (use the option names of `imgforge customize --help`, without dashes)")]
    UnknownCommand {
        /// The commands file.
        file: PathBuf,
        /// Its line.
        line: usize,
        /// The name found.
        name: String,
    },
    /// A commands file that cannot be read or parsed.
    #[error("--commands-from-file {file}: {reason}")]
    CommandsFile {
        /// The file.
        file: PathBuf,
        /// The read or syntax error, the nesting limit, or a numbered line's invalid option.
        reason: String,
    },
}

/// A host file to carry on the payload disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadFile {
    /// Its path on the payload disk.
    pub name: String,
    /// Where it is on the host.
    pub source: PathBuf,
    /// For a node of a `--copy-in` tree, what it is and its metadata, stored as they are;
    /// `None` for a file whose bytes alone matter (stored root-owned, 0644).
    pub tree: Option<TreeNode>,
}

/// A `--copy-in` tree node as the payload disk stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeNode {
    /// Directory, file or symlink.
    pub kind: TreeNodeKind,
    /// Permission bits (with set-id and sticky bits).
    pub mode: u16,
    /// Numeric owner.
    pub uid: u32,
    /// Numeric group.
    pub gid: u32,
    /// Modification time, whole seconds.
    pub mtime: u32,
}

/// What a [`TreeNode`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeNodeKind {
    /// A directory (its entries follow it).
    Dir,
    /// A regular file (its bytes read from the source).
    File,
    /// A symlink with this target.
    Symlink(PathBuf),
}

/// Everything the operations need: the ordered rules operations, the payload, the flags.
#[derive(Debug, Default)]
pub struct Plan {
    /// Operations in command-line order.
    pub operations: Vec<Operation>,
    /// Files for the payload disk.
    pub payload: Vec<PayloadFile>,
    /// `--selinux-relabel` was given (it changes nothing: relabelling is the default).
    pub selinux_relabel: bool,
    /// `--no-selinux-relabel`: an SELinux guest is not relabelled.
    pub no_selinux_relabel: bool,
    /// `(user, clear text)` of `random` passwords, to tell the user.
    pub random_passwords: Vec<(String, String)>,
    /// RPM files (payload paths), installed in one transaction after the operations.
    pub rpms: Vec<String>,
    /// `.deb` files (payload paths), installed with apt-get after the operations.
    pub debs: Vec<String>,
    /// Packages for apt-get, dnf or yum from `repo`.
    pub install: Vec<String>,
    /// Packages to remove.
    pub uninstall: Vec<String>,
    /// `--update`.
    pub update: bool,
    /// The repository's directory on the payload disk.
    pub repo: Option<String>,
    /// Its layout.
    pub repo_format: RepoFormat,
    /// Whether apt can check its signatures (for `--gpgcheck`).
    repo_signed: bool,
    /// The `--repo` directory as given, for messages.
    repo_shown: String,
    /// The index written for a `--repo` directory of `.deb` files, kept until the run ends.
    repo_index: Option<tempfile::TempDir>,
    /// `--gpgcheck`.
    pub gpgcheck: bool,
    /// The root filesystem's helper device, when auto-detection is not wanted.
    pub root_partition: Option<String>,
    /// The hash passwords are written with (`--password-crypto`; set it before adding them).
    pub password_crypto: PasswordCrypto,
    /// Grow the guest into its disk (`customize --grow`, `deploy` onto a larger target, Ganeti).
    pub grow_to_disk: bool,
    /// `customize -n`/`--dry-run`: run everything, list what changed, keep none of it.
    pub dry_run: bool,
    /// A swap partition to add at the end of the disk (Ganeti's `SWAP` property).
    pub swap: Option<imgforge_protocol::rules::SwapPartition>,
    /// Where salts and random passwords come from (a recipe's seed, or the system).
    pub entropy: entropy::Entropy,
    /// A whole disk of the guest to make swap (Ganeti's `SWAP=<disk letter>`).
    pub swap_disk: Option<imgforge_protocol::rules::SwapDisk>,
    /// The task variables an image's `overwrite_task_<Name>` runs with (Ganeti's
    /// `ALLOW_MOUNTED_TASK_OVERWRITING`); `None`: such files are ignored.
    pub task_overwriting: Option<Vec<(String, String)>>,
}

/// The first bytes of every RPM file (the lead).
const RPM_MAGIC: &[u8] = b"\xed\xab\xee\xdb";

fn check_rpm(path: &str) -> Result<(), String> {
    use std::io::Read;
    host_file(path)?;
    let mut magic = [0u8; 4];
    let ok = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && magic == RPM_MAGIC;
    if ok {
        Ok(())
    } else {
        Err(format!("{path} is not an RPM package (no RPM lead)"))
    }
}

/// The most bytes of an `--install-deb` file read to check it: its control member comes right
/// after the first, tiny one, and the data member after it need not be read.
const MAX_DEB_BYTES: u64 = 32 << 20;

/// Parses a `PKG[,PKG...]` list (`--install`, `--uninstall`, `--firstboot-install`): comma
/// separated, blanks around names ignored, as virt-customize splits it.
pub fn parse_package_list(list: &str) -> Result<Vec<String>, String> {
    let names: Vec<String> = list.split(',').map(str::trim).filter(|n| !n.is_empty()).map(str::to_owned).collect();
    if names.is_empty() {
        return Err("no package named".into());
    }
    for name in &names {
        check_package_name(name)?;
    }
    Ok(names)
}

fn check_package_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+-:~*".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a package name"))
    }
}

/// Every regular file under `dir`, relative to it, sorted.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| format!("cannot list {}: {e}", d.display()))? {
            let e = e.map_err(|e| e.to_string())?;
            let ft = e.file_type().map_err(|e| e.to_string())?;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push(e.path().strip_prefix(dir).expect("under dir").to_owned());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Validates a host name (RFC 1123: dot-separated labels of letters, digits and inner dashes).
pub fn check_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err("a host name has 1 to 253 characters".into());
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("label {label:?} must have 1 to 63 characters"));
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(format!("label {label:?} may hold only letters, digits and '-' (RFC 1123)"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} may not start or end with '-'"));
        }
    }
    Ok(())
}

/// Validates a guest path: absolute, no `.`/`..` components, no NUL.
pub fn check_guest_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("guest path {path:?} must be absolute (start with '/')"));
    }
    if path.contains('\0') {
        return Err("guest path contains a NUL byte".into());
    }
    if path.split('/').any(|c| c == ".." || c == ".") {
        return Err(format!("guest path {path:?} may not contain '.' or '..' components"));
    }
    Ok(())
}

fn check_timezone(zone: &str) -> Result<(), String> {
    let ok = !zone.is_empty()
        && !zone.starts_with('/')
        && zone.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        && zone.bytes().all(|b| b.is_ascii_alphanumeric() || b"/_+-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("{zone:?} is not a timezone name such as Europe/Athens or UTC"))
    }
}

/// Parses an octal permission string (`0644`, `755`).
pub fn parse_mode(text: &str) -> Result<u32, String> {
    let mode =
        crate::plain_number::parse_octal(text).ok_or_else(|| format!("{text:?} is not an octal mode such as 0644"))?;
    if mode > 0o7777 {
        return Err(format!("mode {text} is out of range (at most 7777)"));
    }
    Ok(mode)
}

/// Parses `--chown UID:GID:PATH`: numeric ids only (as virt-customize; names would mean the
/// host's users, not the guest's), the path the rest after the second colon.
pub fn parse_chown(value: &str) -> Result<Operation, String> {
    let mut parts = value.splitn(3, ':');
    let (Some(uid), Some(gid), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("expected UID:GID:PATH".into());
    };
    let id = |text: &str, what: &str| {
        crate::plain_number::parse::<u32>(text)
            .ok_or_else(|| format!("{what} {text:?} is not a number (virt-customize takes numeric ids only)"))
    };
    let user = Principal::Id(id(uid, "UID")?);
    let group = Principal::Id(id(gid, "GID")?);
    check_guest_path(path)?;
    Ok(Operation::Chown { user, group, path: path.to_owned() })
}

/// A guest path that names something below the root (`/` itself refused).
fn check_below_root(path: &str) -> Result<(), String> {
    check_guest_path(path)?;
    if path.trim_end_matches('/').is_empty() {
        return Err("refusing to operate on the guest's root directory".into());
    }
    Ok(())
}

/// Parses `--copy` and `--move`'s `SOURCE:DEST` (split at the first colon, as virt-customize).
fn parse_source_dest(value: &str) -> Result<(String, String), String> {
    let (source, dest) = split_pair(value, "SOURCE:DEST")?;
    check_below_root(source)?;
    check_guest_path(dest)?;
    Ok((source.to_owned(), dest.to_owned()))
}

/// Parses `--edit FILE:EXPR` (split at the first colon, as virt-customize): the expression
/// must be one imgforge runs without Perl, or it is refused here, before any VM boots.
pub fn parse_edit(value: &str) -> Result<Operation, String> {
    let (path, expr) = split_pair(value, "FILE:EXPR")?;
    check_below_root(path)?;
    Program::parse(expr).map_err(|e| e.to_string())?;
    Ok(Operation::Edit { path: path.to_owned(), expr: expr.to_owned() })
}

/// Parses `--link TARGET:LINK[:LINK..]`: the target verbatim (it may be relative), then links.
pub fn parse_link(value: &str) -> Result<Operation, String> {
    let mut parts = value.split(':');
    let target = parts.next().unwrap_or_default();
    let links: Vec<String> = parts.map(str::to_owned).collect();
    if target.is_empty() || links.is_empty() {
        return Err("expected TARGET:LINK[:LINK..]".into());
    }
    if target.contains('\0') {
        return Err("the target contains a NUL byte".into());
    }
    for link in &links {
        check_below_root(link)?;
    }
    Ok(Operation::Link { target: target.to_owned(), links })
}

fn split_pair<'a>(value: &'a str, what: &str) -> Result<(&'a str, &'a str), String> {
    value.split_once(':').ok_or_else(|| format!("expected {what}"))
}

/// Public keys for `--ssh-inject USER` alone: the invoking user's `~/.ssh/*.pub`.
fn default_public_keys() -> Result<Vec<String>, String> {
    let home =
        std::env::var_os("HOME").ok_or("HOME is not set, so ~/.ssh/*.pub cannot be found; use USER:file:PATH")?;
    let dir = Path::new(&home).join(".ssh");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("cannot list {}: {e}; use USER:file:PATH or USER:string:KEY", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pub"))
        .collect();
    files.sort();
    let mut keys = Vec::new();
    for f in files {
        keys.extend(read_keys(&f)?);
    }
    if keys.is_empty() {
        return Err(format!("no public keys in {}/*.pub; use USER:file:PATH or USER:string:KEY", dir.display()));
    }
    Ok(keys)
}

fn read_keys(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let keys: Vec<String> =
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect();
    if keys.is_empty() {
        return Err(format!("{} holds no public key", path.display()));
    }
    Ok(keys)
}

fn check_key(key: &str) -> Result<(), String> {
    if key.contains('\n') || key.trim().is_empty() {
        return Err("a public key is one non-empty line".into());
    }
    Ok(())
}

/// A readable regular host file, with its metadata.
fn host_file(path: &str) -> Result<std::fs::Metadata, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot use host file {path}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("host file {path} is not a regular file"));
    }
    std::fs::File::open(path).map_err(|e| format!("cannot read host file {path}: {e}"))?;
    Ok(meta)
}

/// The operation of an operation option that takes no argument (any argument ignored, as for
/// the other flags).
fn flag_operation(option: &str) -> Option<Operation> {
    match option {
        "reset-machine-id" => Some(Operation::ResetMachineId),
        "regenerate-ssh-host-keys" => Some(Operation::RegenerateSshHostKeys),
        _ => None,
    }
}

/// An option's argument as safe to show in an error: passwords redacted, long text cut.
fn shown(option: &str, value: Option<&str>) -> String {
    let secret = matches!(option, "root-password" | "password");
    match (secret, value) {
        (true, Some(v)) => v
            .split_once(':')
            .map(|(u, _)| if option == "password" { format!("{u}:…") } else { "…".into() })
            .unwrap_or_else(|| "…".into()),
        (_, Some(v)) => v.chars().take(120).collect(),
        (_, None) => String::new(),
    }
}

impl Plan {
    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.operations.is_empty()
            && !self.selinux_relabel
            && self.rpms.is_empty()
            && self.debs.is_empty()
            && self.install.is_empty()
            && self.uninstall.is_empty()
            && !self.update
    }

    /// Checks what only the whole command line can tell (after every option was added).
    pub fn finish(&self) -> Result<(), OpsError> {
        if !self.install.is_empty() && self.repo.is_none() {
            return Err(OpsError::Invalid {
                option: "install".into(),
                shown: self.install.join(","),
                reason: "needs --repo DIR: imgforge installs from a local repository only (no network)".into(),
            });
        }
        if self.update && self.repo.is_none() {
            return Err(OpsError::Invalid {
                option: "update".into(),
                shown: String::new(),
                reason: "needs --repo DIR: the helper VM has no network, so imgforge upgrades packages only \
                         from a local repository (an apt or yum/dnf repository, or a directory of .deb files)"
                    .into(),
            });
        }
        if self.gpgcheck && self.repo_format.is_apt() && self.repo.is_some() && !self.repo_signed {
            let reason = if self.repo_index.is_some() {
                "is a directory of .deb files, whose index imgforge writes unsigned: drop --gpgcheck, or give a \
                 signed apt repository"
            } else {
                "has no InRelease or Release.gpg, so apt cannot check it: sign it, or drop --gpgcheck"
            };
            return Err(OpsError::Invalid {
                option: "repo".into(),
                shown: self.repo_shown.clone(),
                reason: reason.into(),
            });
        }
        Ok(())
    }

    /// Stages the host file `source` for the payload disk: its path there.
    pub fn payload_file(&mut self, source: &str) -> String {
        self.payload_file_in("files", source)
    }

    fn payload_file_in(&mut self, dir: &str, source: &str) -> String {
        let base =
            Path::new(source).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
        let name = format!("{dir}/{:04}-{base}", self.payload.len() + 1);
        self.payload.push(PayloadFile { name: name.clone(), source: PathBuf::from(source), tree: None });
        name
    }

    /// Adds one option occurrence (name without `--`).
    pub fn add(&mut self, option: &str, value: Option<&str>) -> Result<(), OpsError> {
        self.add_nested(option, value, 0)
    }

    fn add_nested(&mut self, option: &str, value: Option<&str>, depth: usize) -> Result<(), OpsError> {
        let invalid =
            |reason: String| OpsError::Invalid { option: option.to_owned(), shown: shown(option, value), reason };
        if self.set_flag(option) {
            return Ok(());
        }
        if let Some(op) = flag_operation(option) {
            self.operations.push(op);
            return Ok(());
        }
        let value = value.ok_or_else(|| invalid("this option needs an argument".into()))?;
        match option {
            "commands-from-file" => self.add_commands_file(Path::new(value), depth),
            "password-crypto" => {
                self.password_crypto = PasswordCrypto::parse(value).map_err(|e| invalid(e.to_string()))?;
                Ok(())
            }
            "ssh-inject" => self.add_ssh_keys(value).map_err(invalid),
            "install-rpm" => self.add_rpm(value).map_err(invalid),
            "install-deb" => self.add_deb(value).map_err(invalid),
            "install" => {
                let names = parse_package_list(value).map_err(invalid)?;
                self.install.extend(names);
                Ok(())
            }
            "uninstall" => {
                let names = parse_package_list(value).map_err(invalid)?;
                self.uninstall.extend(names);
                Ok(())
            }
            "repo" => self.add_repo(value).map_err(invalid),
            _ => {
                let op = self.operation(option, value).map_err(invalid)?;
                self.operations.push(op);
                Ok(())
            }
        }
    }

    /// Sets the flag `option` names (any argument ignored); false if it names none.
    fn set_flag(&mut self, option: &str) -> bool {
        let flag = match option {
            "selinux-relabel" => &mut self.selinux_relabel,
            "no-selinux-relabel" => &mut self.no_selinux_relabel,
            "gpgcheck" => &mut self.gpgcheck,
            "update" => &mut self.update,
            _ => return false,
        };
        *flag = true;
        true
    }

    /// The operation of an option that adds exactly one.
    fn operation(&mut self, option: &str, value: &str) -> Result<Operation, String> {
        Ok(match option {
            "hostname" => {
                check_hostname(value)?;
                Operation::Hostname { name: value.to_owned() }
            }
            "root-password" => self.password("root", value)?,
            "password" => {
                let (user, selector) = split_pair(value, "USER:SELECTOR")?;
                self.password(user, selector)?
            }
            "upload" => self.upload(value)?,
            "copy" => {
                let (source, dest) = parse_source_dest(value)?;
                Operation::Copy { source, dest }
            }
            "move" => {
                let (source, dest) = parse_source_dest(value)?;
                Operation::Move { source, dest }
            }
            "link" => parse_link(value)?,
            "edit" => parse_edit(value)?,
            "copy-in" => self.copy_in(value)?,
            "touch" | "truncate" | "scrub" => {
                check_below_root(value)?;
                let path = value.to_owned();
                match option {
                    "touch" => Operation::Touch { path },
                    "truncate" => Operation::Truncate { path },
                    _ => Operation::Scrub { path },
                }
            }
            "truncate-recursive" => {
                check_guest_path(value)?;
                Operation::TruncateRecursive { path: value.to_owned() }
            }
            "mkdir" | "delete" => {
                check_guest_path(value)?;
                if value.trim_end_matches('/').is_empty() {
                    return Err("refusing to operate on the guest's root directory".into());
                }
                let path = value.to_owned();
                if option == "mkdir" {
                    Operation::Mkdir { path }
                } else {
                    Operation::Delete { path }
                }
            }
            "write" | "append-line" => {
                let (path, text) = split_pair(value, "GUESTFILE:CONTENT")?;
                check_guest_path(path)?;
                if option == "write" {
                    Operation::Write { path: path.to_owned(), content: text.to_owned() }
                } else {
                    Operation::AppendLine { path: path.to_owned(), line: text.to_owned() }
                }
            }
            "chmod" => {
                let (mode, path) = split_pair(value, "MODE:GUESTPATH")?;
                let mode = parse_mode(mode)?;
                check_guest_path(path)?;
                Operation::Chmod { mode, path: path.to_owned() }
            }
            "chown" => parse_chown(value)?,
            "run" | "firstboot" => {
                host_file(value)?;
                let name = Path::new(value).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let payload_path = self.payload_file(value);
                if option == "run" {
                    Operation::Run { payload_path, name }
                } else {
                    Operation::Firstboot { payload_path, name }
                }
            }
            "run-command" | "firstboot-command" => {
                if value.trim().is_empty() {
                    return Err("the command is empty".into());
                }
                if option == "run-command" {
                    Operation::RunCommand { command: value.to_owned() }
                } else {
                    Operation::FirstbootCommand { command: value.to_owned() }
                }
            }
            "firstboot-install" => Operation::FirstbootInstall { packages: parse_package_list(value)? },
            "timezone" => {
                check_timezone(value)?;
                Operation::Timezone { zone: value.to_owned() }
            }
            _ => return Err("unknown operation".into()),
        })
    }

    /// `user`'s password from a selector; a random one is remembered to tell the user.
    fn password(&mut self, user: &str, selector: &str) -> Result<Operation, String> {
        if user.is_empty() || user.contains(['\n', ':']) {
            return Err(format!("{user:?} is not a user name"));
        }
        let selector = PasswordSelector::parse(selector).map_err(|e| e.to_string())?;
        let field =
            selector.to_shadow_field_with(self.password_crypto, &mut self.entropy).map_err(|e| e.to_string())?;
        if let Some(pw) = field.random_password {
            self.random_passwords.push((user.to_owned(), pw));
        }
        Ok(Operation::Password { user: user.to_owned(), shadow_field: field.field })
    }

    /// `LOCAL:GUESTPATH`: the host file goes on the payload disk, with its owner and mode.
    fn upload(&mut self, value: &str) -> Result<Operation, String> {
        let (local, guest) = split_pair(value, "LOCAL:GUESTPATH")?;
        let meta = host_file(local)?;
        check_guest_path(guest)?;
        let file_name = Path::new(local).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let payload_path = self.payload_file(local);
        Ok(Operation::Upload {
            payload_path,
            guest_path: guest.to_owned(),
            file_name,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
        })
    }

    /// `LOCALPATH:REMOTEDIR`: the host tree goes on the payload disk with its metadata.
    fn copy_in(&mut self, value: &str) -> Result<Operation, String> {
        let (local, remote_dir) = split_pair(value, "LOCALPATH:REMOTEDIR")?;
        check_guest_path(remote_dir)?;
        let prefix = format!("copy-in/{:04}", self.payload.len() + 1);
        let entries = copy_in::tree_entries(Path::new(local), &prefix)?;
        let payload_path = entries.first().map(|e| e.name.clone()).ok_or("nothing to copy")?;
        let name = Path::new(&payload_path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        self.payload.extend(entries);
        Ok(Operation::CopyIn { payload_path, remote_dir: remote_dir.to_owned(), name })
    }

    /// `--ssh-inject`: one operation per key.
    fn add_ssh_keys(&mut self, value: &str) -> Result<(), String> {
        let (user, keys) = match value.split_once(':') {
            None => (value, default_public_keys()?),
            Some((user, rest)) => match rest.split_once(':') {
                Some(("file", path)) => (user, read_keys(Path::new(path))?),
                Some(("string", key)) => (user, vec![key.to_owned()]),
                _ => return Err("expected USER, USER:file:PATH or USER:string:KEY".into()),
            },
        };
        if user.is_empty() {
            return Err("the user name is empty".into());
        }
        for key in keys {
            check_key(&key)?;
            self.operations.push(Operation::SshInject { user: user.to_owned(), key });
        }
        Ok(())
    }

    /// `--install-rpm`: the file goes on the payload disk, for the one rpm transaction.
    fn add_rpm(&mut self, path: &str) -> Result<(), String> {
        check_rpm(path)?;
        let payload_path = self.payload_file_in("rpms", path);
        self.rpms.push(payload_path);
        Ok(())
    }

    /// `--install-deb`: the file goes on the payload disk under a name ending in `.deb` (how
    /// apt-get tells a file from a package name).
    fn add_deb(&mut self, path: &str) -> Result<(), String> {
        use std::io::Read;
        host_file(path)?;
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_DEB_BYTES).read_to_end(&mut bytes))
            .map_err(|e| format!("cannot read host file {path}: {e}"))?;
        deb::read_control(&bytes).map_err(|e| format!("{path}: {e}"))?;
        let base = Path::new(path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // apt-get reads the name as a path: nothing in it but what a package file name holds.
        let safe: String =
            base.chars().map(|c| if c.is_ascii_alphanumeric() || "._+-~".contains(c) { c } else { '_' }).collect();
        let stem = safe.strip_suffix(".deb").unwrap_or(&safe);
        let name = format!("debs/{:04}-{stem}.deb", self.payload.len() + 1);
        self.payload.push(PayloadFile { name: name.clone(), source: PathBuf::from(path), tree: None });
        self.debs.push(name);
        Ok(())
    }

    /// `--repo DIR`: the repository's files (and the index imgforge writes for a directory of
    /// `.deb` files) go on the payload disk.
    fn add_repo(&mut self, value: &str) -> Result<(), String> {
        if self.repo.is_some() {
            return Err("only one --repo may be given".into());
        }
        let found = repo::classify(Path::new(value), value)?;
        self.payload.extend(found.files);
        self.repo = Some(repo::PAYLOAD_DIR.into());
        self.repo_format = found.format;
        self.repo_signed = found.signed;
        self.repo_index = found.generated;
        self.repo_shown = value.to_owned();
        Ok(())
    }

    fn add_commands_file(&mut self, file: &Path, depth: usize) -> Result<(), OpsError> {
        let fail = |reason: String| OpsError::CommandsFile { file: file.to_owned(), reason };
        if depth >= MAX_COMMANDS_FILE_DEPTH {
            return Err(fail(format!("commands files nest more than {MAX_COMMANDS_FILE_DEPTH} deep")));
        }
        let text = std::fs::read_to_string(file).map_err(|e| fail(format!("cannot read it: {e}")))?;
        let commands = commands_file::parse(&text).map_err(|e| fail(e.to_string()))?;
        for c in commands {
            if !operation_options().iter().any(|o| o.name == c.name) {
                return Err(OpsError::UnknownCommand { file: file.to_owned(), line: c.line, name: c.name });
            }
            self.add_nested(&c.name, c.arg.as_deref(), depth + 1).map_err(|e| match e {
                OpsError::Invalid { .. } => fail(format!("line {}: {e}", c.line)),
                other => other,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        for ok in ["a", "web-1", "web1.example.com", "0abc", &"a".repeat(63)] {
            check_hostname(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", "-a", "a-", "a..b", "a_b", "a b", "é", &"a".repeat(64), &format!("{}.", "a")] {
            assert!(check_hostname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn guest_paths() {
        for ok in ["/", "/etc/motd", "/a/b/"] {
            check_guest_path(ok).unwrap();
        }
        for bad in ["etc/motd", "", "/etc/../x", "/./x", "/a/..", "/a\0b"] {
            assert!(check_guest_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0644"), Ok(0o644));
        assert_eq!(parse_mode("4755"), Ok(0o4755));
        for bad in ["", "8", "rwx", "17777", "-1", "+644", " 644"] {
            assert!(parse_mode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn chown_takes_numeric_ids_as_virt_customize() {
        let chown = |user, group, path: &str| Operation::Chown {
            user: Principal::Id(user),
            group: Principal::Id(group),
            path: path.into(),
        };
        assert_eq!(parse_chown("1000:100:/home/a"), Ok(chown(1000, 100, "/home/a")));
        assert_eq!(parse_chown("0:0:/a:b"), Ok(chown(0, 0, "/a:b")), "the path keeps its colons");
        assert_eq!(parse_chown("4294967295:0:/x"), Ok(chown(u32::MAX, 0, "/x")));
        for bad in [
            "",
            "0",
            "0:0",
            "root:0:/x",
            "0:wheel:/x",
            "-1:0:/x",
            "+1:0:/x",
            " 1:0:/x",
            "0:0:x",
            "0:0:",
            "4294967296:0:/x",
            "0:0:/a/../b",
        ] {
            assert!(parse_chown(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn file_operations_parse_as_virt_customize() {
        let op = |option: &str, value: &str| {
            let mut plan = Plan::default();
            plan.add(option, Some(value)).map(|()| plan.operations.remove(0)).map_err(|e| e.to_string())
        };
        assert_eq!(op("copy", "/a:/b:c"), Ok(Operation::Copy { source: "/a".into(), dest: "/b:c".into() }));
        assert_eq!(op("move", "/a/:/b/"), Ok(Operation::Move { source: "/a/".into(), dest: "/b/".into() }));
        assert_eq!(
            op("link", "../usr/bin/vim:/usr/local/bin/vi:/usr/local/bin/ex"),
            Ok(Operation::Link {
                target: "../usr/bin/vim".into(),
                links: vec!["/usr/local/bin/vi".into(), "/usr/local/bin/ex".into()]
            })
        );
        assert_eq!(op("touch", "/etc/t"), Ok(Operation::Touch { path: "/etc/t".into() }));
        assert_eq!(op("truncate", "/var/log/x"), Ok(Operation::Truncate { path: "/var/log/x".into() }));
        assert_eq!(op("truncate-recursive", "/var/log"), Ok(Operation::TruncateRecursive { path: "/var/log".into() }));
        assert_eq!(op("scrub", "/root/secret"), Ok(Operation::Scrub { path: "/root/secret".into() }));
        let refused: &[(&str, &str, &str)] = &[
            ("copy", "/a", "SOURCE:DEST"),
            ("copy", "a:/b", "absolute"),
            ("copy", "/a:b", "absolute"),
            ("copy", "/:/b", "root directory"),
            ("move", "/a/../etc:/b", "'..'"),
            ("move", "//:/b", "root directory"),
            ("link", "/target", "TARGET:LINK"),
            ("link", ":/l", "TARGET:LINK"),
            ("link", "/t:rel", "absolute"),
            ("link", "/t:/l:", "absolute"),
            ("touch", "rel", "absolute"),
            ("truncate", "/", "root directory"),
            ("scrub", "/x/./y", "'.'"),
            ("truncate-recursive", "var", "absolute"),
        ];
        for (option, value, want) in refused {
            let err = op(option, value).unwrap_err();
            assert!(err.starts_with(&format!("--{option} {value}:")) && err.contains(want), "{option} {value}: {err}");
        }
    }

    #[test]
    fn edit_parses_as_virt_customize() {
        let edit = |path: &str, expr: &str| Operation::Edit { path: path.into(), expr: expr.into() };
        assert_eq!(parse_edit("/etc/hosts:s/a:b/c/"), Ok(edit("/etc/hosts", "s/a:b/c/")), "split at the first colon");
        assert_eq!(parse_edit("/etc/passwd:$_ = '' if /^apache:/"), Ok(edit("/etc/passwd", "$_ = '' if /^apache:/")));
        // (argument, what the error says, whether it is about the expression)
        let refused: &[(&str, &str, bool)] = &[
            ("/etc/hosts", "FILE:EXPR", false),
            ("etc/hosts:s/a/b/", "absolute", false),
            ("/:s/a/b/", "root directory", false),
            ("/etc/hosts:s/a/b/e", "e flag", true),
            ("/etc/hosts:print", "\"print\"", true),
            ("/etc/hosts:s/(?<=a)b/c/", "look-behind", true),
            ("/etc/hosts:", "empty", true),
        ];
        for (value, want, expression) in refused {
            let err = Plan::default().add("edit", Some(value)).unwrap_err().to_string();
            assert!(err.starts_with(&format!("--edit {value}:")) && err.contains(want), "{value}: {err}");
            assert_eq!(err.contains("s/REGEX/REPLACEMENT/"), *expression, "the supported forms are listed: {err}");
        }
    }

    #[test]
    fn clone_hygiene_flags_are_operations_in_order() {
        let mut plan = Plan::default();
        plan.add("write", Some("/etc/machine-id:0")).unwrap();
        plan.add("reset-machine-id", None).unwrap();
        plan.add("regenerate-ssh-host-keys", None).unwrap();
        // Like every flag, an argument (a commands file's stray one) is ignored.
        plan.add("reset-machine-id", Some("")).unwrap();
        assert_eq!(
            plan.operations,
            [
                Operation::Write { path: "/etc/machine-id".into(), content: "0".into() },
                Operation::ResetMachineId,
                Operation::RegenerateSshHostKeys,
                Operation::ResetMachineId,
            ]
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("cmds");
        std::fs::write(&f, "regenerate-ssh-host-keys\nhostname h\nreset-machine-id\n").unwrap();
        let mut plan = Plan::default();
        plan.add("commands-from-file", Some(f.to_str().unwrap())).unwrap();
        assert_eq!(
            plan.operations,
            [Operation::RegenerateSshHostKeys, Operation::Hostname { name: "h".into() }, Operation::ResetMachineId]
        );
        for option in ["reset-machine-id", "regenerate-ssh-host-keys"] {
            let mut plan = Plan::default();
            plan.add(option, None).unwrap();
            assert_eq!(plan.operations[0].describe(), format!("--{option}"));
        }
    }

    #[test]
    fn copy_in_parses_as_virt_customize() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("conf")).unwrap();
        std::fs::write(dir.path().join("conf/a"), "a").unwrap();
        let mut plan = Plan::default();
        plan.add("upload", Some(&format!("{}:/x", dir.path().join("conf/a").display()))).unwrap();
        plan.add("copy-in", Some(&format!("{}:/etc", dir.path().join("conf").display()))).unwrap();
        assert_eq!(
            plan.operations[1],
            Operation::CopyIn {
                payload_path: "copy-in/0002/conf".into(),
                remote_dir: "/etc".into(),
                name: "conf".into()
            }
        );
        assert_eq!(plan.payload.len(), 3);
        assert!(plan.payload[1..].iter().all(|p| p.tree.is_some() && p.name.starts_with("copy-in/0002/conf")));
        let refused: &[(String, &str)] = &[
            (dir.path().display().to_string(), "LOCALPATH:REMOTEDIR"),
            (format!("{}:etc", dir.path().display()), "absolute"),
            (format!("{}/missing:/etc", dir.path().display()), "missing"),
            ("..:/etc".to_owned(), "final name"),
        ];
        for (value, want) in refused {
            let err = Plan::default().add("copy-in", Some(value)).unwrap_err().to_string();
            assert!(err.starts_with("--copy-in ") && err.contains(want), "{value}: {err}");
        }
    }

    #[test]
    fn order_is_kept_and_values_parsed() {
        let mut plan = Plan::default();
        plan.add("write", Some("/etc/a:first")).unwrap();
        plan.add("hostname", Some("h1")).unwrap();
        plan.add("write", Some("/etc/a:second:with colon")).unwrap();
        plan.add("chmod", Some("0600:/etc/a")).unwrap();
        plan.add("selinux-relabel", None).unwrap();
        assert!(plan.selinux_relabel);
        assert_eq!(
            plan.operations,
            vec![
                Operation::Write { path: "/etc/a".into(), content: "first".into() },
                Operation::Hostname { name: "h1".into() },
                Operation::Write { path: "/etc/a".into(), content: "second:with colon".into() },
                Operation::Chmod { mode: 0o600, path: "/etc/a".into() },
            ]
        );
    }

    #[test]
    fn errors_name_the_option_and_hide_passwords() {
        let mut plan = Plan::default();
        let cases: &[(&str, &str, &str)] = &[
            ("hostname", "bad_name", "--hostname bad_name"),
            ("write", "relative:x", "must be absolute"),
            ("upload", "/nonexistent/file:/x", "/nonexistent/file"),
            ("chmod", "9:/x", "octal"),
            ("ssh-inject", "root:nope:x", "USER:file:PATH"),
            ("timezone", "../../etc/passwd", "timezone name"),
            ("delete", "/", "root directory"),
            ("run", "/nonexistent/script", "/nonexistent/script"),
        ];
        for (option, value, want) in cases {
            let err = plan.add(option, Some(value)).unwrap_err().to_string();
            assert!(err.contains(want), "{option} {value}: {err}");
        }
        let err = plan.add("password", Some("alice:passwd:topsecret")).unwrap_err().to_string();
        assert!(err.contains("alice") && !err.contains("topsecret"), "{err}");
        let err = plan.add("root-password", Some("plain-secret")).unwrap_err().to_string();
        assert!(!err.contains("plain-secret"), "{err}");
        let not_rpm = tempfile::NamedTempFile::new().unwrap();
        let err = plan.add("install-rpm", Some(not_rpm.path().to_str().unwrap())).unwrap_err().to_string();
        assert!(err.contains("not an RPM"), "{err}");
        let err = plan.add("repo", Some("/nonexistent/repo")).unwrap_err().to_string();
        assert!(err.contains("not a directory"), "{err}");
        let empty = tempfile::tempdir().unwrap();
        let err = plan.add("repo", Some(empty.path().to_str().unwrap())).unwrap_err().to_string();
        assert!(err.contains("repomd.xml") && err.contains("dists/") && err.contains(".deb"), "{err}");
        let err = plan.add("install", Some("ok,-bad")).unwrap_err().to_string();
        assert!(err.contains("-bad"), "{err}");
        let mut only_install = Plan::default();
        only_install.add("install", Some("demo")).unwrap();
        assert!(only_install.finish().unwrap_err().to_string().contains("--repo"));
    }

    /// `--install`, `--uninstall` and `--firstboot-install` split `PKG,PKG..` as virt-customize
    /// does; `--update` is a flag that needs a repository, as `--install` does.
    #[test]
    fn package_options_parse_as_virt_customize() {
        let list = |text: &str| parse_package_list(text);
        let v = |names: &[&str]| Ok(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>());
        assert_eq!(list("vim"), v(&["vim"]));
        assert_eq!(list("vim,nano"), v(&["vim", "nano"]));
        assert_eq!(list(" vim , nano ,"), v(&["vim", "nano"]));
        assert_eq!(list("libc6:amd64,g++,lib*"), v(&["libc6:amd64", "g++", "lib*"]));
        assert_eq!(list("pkg=1.0~rc1"), Err("\"pkg=1.0~rc1\" is not a package name".into()));
        for bad in ["", ",", " , ", "-y", "a b", "a;b", "$(x)", "a'b", "./x.deb", "a/b"] {
            assert!(list(bad).is_err(), "{bad:?}");
        }
        let mut plan = Plan::default();
        plan.add("install", Some("a,b")).unwrap();
        plan.add("install", Some("c")).unwrap();
        plan.add("uninstall", Some("d,e")).unwrap();
        plan.add("firstboot-install", Some("f,g")).unwrap();
        plan.add("update", None).unwrap();
        assert_eq!((plan.install.join(","), plan.uninstall.join(",")), ("a,b,c".into(), "d,e".into()));
        assert_eq!(plan.operations, [Operation::FirstbootInstall { packages: vec!["f".into(), "g".into()] }]);
        assert!(plan.update && !plan.is_empty());
        let err = plan.finish().unwrap_err().to_string();
        assert!(err.contains("--install a,b,c") && err.contains("--repo"), "{err}");
        let mut update = Plan::default();
        update.add("update", None).unwrap();
        let err = update.finish().unwrap_err().to_string();
        assert!(err.starts_with("--update") && err.contains("no network") && err.contains("--repo DIR"), "{err}");
        let mut uninstall = Plan::default();
        uninstall.add("uninstall", Some("nano")).unwrap();
        uninstall.finish().expect("--uninstall needs no repository");
        for option in ["install", "uninstall", "firstboot-install"] {
            let err = Plan::default().add(option, Some("ok,-bad")).unwrap_err().to_string();
            assert!(err.starts_with(&format!("--{option} ok,-bad:")) && err.contains("\"-bad\""), "{err}");
        }
    }

    /// `--install-deb` takes Debian packages only, `--repo` with `--gpgcheck` only what apt can
    /// check.
    #[test]
    fn deb_files_and_apt_repositories() {
        let dir = tempfile::tempdir().unwrap();
        let rpm = dir.path().join("x.rpm");
        std::fs::write(&rpm, b"\xed\xab\xee\xdbrest").unwrap();
        let err = Plan::default().add("install-deb", Some(rpm.to_str().unwrap())).unwrap_err().to_string();
        assert!(err.contains("not a Debian package"), "{err}");
        let err = Plan::default().add("install-deb", Some("/nonexistent/a.deb")).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/a.deb"), "{err}");
        let flat = dir.path().join("flat");
        std::fs::create_dir(&flat).unwrap();
        std::fs::write(flat.join("Packages"), "").unwrap();
        let mut plan = Plan::default();
        plan.add("repo", Some(flat.to_str().unwrap())).unwrap();
        plan.add("install", Some("a")).unwrap();
        assert_eq!((plan.repo.as_deref(), &plan.repo_format), (Some("repo"), &RepoFormat::AptFlat));
        plan.finish().unwrap();
        plan.add("gpgcheck", None).unwrap();
        let err = plan.finish().unwrap_err().to_string();
        assert!(err.contains("--repo") && err.contains("Release.gpg"), "{err}");
        std::fs::write(flat.join("InRelease"), "").unwrap();
        let mut signed = Plan::default();
        signed.add("gpgcheck", None).unwrap();
        signed.add("repo", Some(flat.to_str().unwrap())).unwrap();
        signed.finish().unwrap();
        let err = signed.add("repo", Some(flat.to_str().unwrap())).unwrap_err().to_string();
        assert!(err.contains("only one --repo"), "{err}");
    }

    #[test]
    fn commands_file_expands_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("cmds");
        std::fs::write(&f, "# c\nhostname fromfile\nwrite /x:y\n").unwrap();
        let mut plan = Plan::default();
        plan.add("mkdir", Some("/first")).unwrap();
        plan.add("commands-from-file", Some(f.to_str().unwrap())).unwrap();
        plan.add("delete", Some("/last")).unwrap();
        assert_eq!(plan.operations.len(), 4);
        assert_eq!(plan.operations[1], Operation::Hostname { name: "fromfile".into() });

        std::fs::write(&f, "hostname ok\nfrobnicate x\n").unwrap();
        let err = Plan::default().add("commands-from-file", Some(f.to_str().unwrap())).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("frobnicate"), "{err}");

        std::fs::write(&f, format!("commands-from-file {}\n", f.display())).unwrap();
        let err = Plan::default().add("commands-from-file", Some(f.to_str().unwrap())).unwrap_err().to_string();
        assert!(err.contains("nest"), "{err}");
    }

    #[test]
    fn operation_options_come_from_ops_args() {
        let flags: Vec<&str> = operation_options().iter().filter(|o| !o.takes_value).map(|o| o.name.as_str()).collect();
        assert_eq!(
            flags,
            [
                "update",
                "gpgcheck",
                "selinux-relabel",
                "no-selinux-relabel",
                "reset-machine-id",
                "regenerate-ssh-host-keys"
            ]
        );
        assert_eq!(operation_options().len(), 39);
        for option in operation_options() {
            assert_eq!(option.id, option.name.replace('-', "_"));
            if let Err(OpsError::Invalid { reason, .. }) = Plan::default().add(&option.name, Some("")) {
                assert_ne!(reason, "unknown operation", "--{} is not implemented", option.name);
            }
        }
    }

    #[test]
    fn uploads_go_to_the_payload() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut plan = Plan::default();
        plan.add("upload", Some(&format!("{}:/opt/", f.path().display()))).unwrap();
        assert_eq!(plan.payload.len(), 1);
        assert!(
            matches!(&plan.operations[0], Operation::Upload { payload_path, .. } if payload_path == &plan.payload[0].name)
        );
    }
}
