//! The rules document: everything the helper needs to customize one image.
//!
//! The host builds it from the command line (or Ganeti's environment), writes it as JSON to the
//! parameter floppy, and the helper reads it back. Secrets are already reduced to what goes into
//! the guest (`/etc/shadow` fields): clear text never enters this document.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Version of the rules document; the helper refuses any other.
pub const RULES_VERSION: u32 = 1;

/// Why a rules document could not be read.
#[derive(Debug, Error)]
pub enum RulesError {
    /// Not JSON, or not the shape of [`Rules`].
    #[error("rules document is malformed: {0}")]
    Malformed(#[from] serde_json::Error),
    /// Written by a host speaking another version of this protocol.
    #[error(
        "rules document has version {found}, this helper understands version {RULES_VERSION}: rebuild the helper image"
    )]
    Version {
        /// The version found in the document.
        found: u32,
    },
    /// A variant with a name that is not `[A-Za-z0-9._-]+`, or variants of its own.
    #[error("rules document has a malformed variant {name:?}: names are [A-Za-z0-9._-]+ and variants do not nest")]
    Variant {
        /// The variant's name.
        name: String,
    },
    /// A digest share that is not one of 1 to [`crate::digest_cache::MAX_PARTS`] shares.
    #[error(
        "rules document has the digest share {part} of {parts}: a share is below their number, at most {}",
        crate::digest_cache::MAX_PARTS
    )]
    DigestShare {
        /// The share.
        part: u32,
        /// How many there are.
        parts: u32,
    },
}

/// One customization run's instructions for the helper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    /// Always [`RULES_VERSION`].
    pub version: u32,
    /// The user's operations, applied in this order.
    #[serde(default)]
    pub operations: Vec<Operation>,
    /// Relabel an SELinux guest after the customization (its setfiles, or `/.autorelabel` for
    /// its next boot); nothing for a guest without SELinux.
    #[serde(default)]
    pub selinux_relabel: bool,
    /// Tasks not to run, by short name (`MountRoot`) — snf-image's `EXCLUDE_TASK_<Name>`.
    #[serde(default)]
    pub excluded_tasks: Vec<String>,
    /// The guest's root filesystem, as a helper device path (`/dev/vda2`), when auto-detection
    /// should not be used.
    #[serde(default)]
    pub root_partition: Option<String>,
    /// RPM files on the payload disk, installed in one transaction with the guest's rpm.
    #[serde(default)]
    pub rpms: Vec<String>,
    /// `.deb` files on the payload disk, installed with the guest's apt-get (dependencies
    /// among them, the installed packages and `repo` resolved).
    #[serde(default)]
    pub debs: Vec<String>,
    /// Packages to install with the guest's package manager (apt-get, dnf or yum) from `repo`.
    #[serde(default)]
    pub install: Vec<String>,
    /// Packages to remove with the guest's package manager (no repository needed).
    #[serde(default)]
    pub uninstall: Vec<String>,
    /// Upgrade the guest's installed packages from `repo`.
    #[serde(default)]
    pub update: bool,
    /// A package repository on the payload disk (its directory).
    #[serde(default)]
    pub repo: Option<String>,
    /// What kind of repository `repo` is.
    #[serde(default)]
    pub repo_format: RepoFormat,
    /// Check package signatures for `repo` (off: the packages are the user's own).
    #[serde(default)]
    pub gpgcheck: bool,
    /// Verify instead of customize: check the filesystems read-only and report each of
    /// `required_packages` as installed or not (`CHECK` report lines).
    #[serde(default)]
    pub verify: bool,
    /// Packages that `verify` requires.
    #[serde(default)]
    pub required_packages: Vec<String>,
    /// Grow the root filesystem to fill its device (a liveimg's bare filesystem written onto a
    /// larger target).
    #[serde(default)]
    pub grow_filesystem: bool,
    /// Grow the guest into a disk larger than its image, as snf-image does: the GPT backup
    /// header to the disk's end, the last partition to the disk's end when it holds the root
    /// filesystem (or the LVM volume group of the root volume), then that filesystem (tasks
    /// FixPartitionTable, FilesystemResizeUnmounted, FilesystemResizeMounted).
    #[serde(default)]
    pub grow_to_disk: bool,
    /// Echo every task's output line by line (otherwise only failing tasks' output is shown).
    #[serde(default)]
    pub verbose: bool,
    /// A dry run (`customize -n`): record the guest's tree before the operations and report
    /// what they added, removed and changed (`CHANGE` report lines); the host then drops the
    /// overlay.
    #[serde(default)]
    pub dry_run: bool,
    /// snf-image's `SWAP=<N>:<MB>`: a swap partition at the end of the disk, made by
    /// FixPartitionTable, which grows the last partition only up to it.
    #[serde(default)]
    pub swap: Option<SwapPartition>,
    /// How many disks the host attached besides the first (`customize -a D1 -a D2`, a Ganeti
    /// instance's other disks): the helper finds each by its serial
    /// ([`crate::helper_vm::disk_serial`]) and looks for the guest's filesystems on all of them.
    #[serde(default)]
    pub extra_disks: u32,
    /// snf-image's `SWAP=<disk letter>`: a whole disk of the guest made swap (task AddSwap).
    #[serde(default)]
    pub swap_disk: Option<SwapDisk>,
    /// snf-image's `ALLOW_MOUNTED_TASK_OVERWRITING`: the task variables an image's
    /// `/root/snf-image/helper/overwrite_task_<Name>` runs with, in place of the operations of
    /// [`Operation::Task`] `<Name>`; `None`: such files are ignored.
    #[serde(default)]
    pub task_overwriting: Option<Vec<(String, String)>>,
    /// Several variants of one base customized in one boot, each on its own disk (an overlay
    /// of the base) with its own rules; empty for the usual one-disk run. When present, the
    /// top-level operations are unused: each variant's rules say what to do with its disk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<VariantRules>,
    /// `SOURCE_DATE_EPOCH`: in a variant of a multi-variant run, every path its operations
    /// added or changed gets this modification and access time (seconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_date_epoch: Option<i64>,
    /// Payload files kept off the squashfs, on the raw bulk disk
    /// ([`crate::helper_vm::BULK_SERIAL`]): their bytes reach the guest by DMA (O_DIRECT reads
    /// and writes), not through the helper CPU's copies, which TCG emulates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bulk: Vec<BulkFile>,
    /// In a multi-variant run that reads the base's files cold beside other boots: the share of
    /// them this boot reads first, before it takes the other boots' digests from its import
    /// disk ([`crate::digest_cache::IMPORT_SERIAL`]) or, failing them, reads the rest itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest_share: Option<crate::digest_cache::Share>,
}

/// Where one payload file lies on the bulk disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkFile {
    /// The payload path the operations name it by (as if it were on the payload disk).
    pub payload_path: String,
    /// Its first byte on the bulk disk: a multiple of [`BULK_ALIGN_BYTES`].
    pub offset: u64,
    /// Its length in bytes (the disk is padded after it to the next multiple of
    /// [`BULK_ALIGN_BYTES`]).
    pub length: u64,
}

/// Alignment of every file on the bulk disk: O_DIRECT reads need offsets, lengths and buffers
/// aligned to the logical block size, and 4 KiB covers every virtio disk's.
pub const BULK_ALIGN_BYTES: u64 = 4096;

/// A whole disk to make swap (snf-image's `SWAP=<disk letter>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwapDisk {
    /// Its index among the disks the host attached, in their order (1: the second; never 0,
    /// the disk the image is on).
    pub disk: u32,
    /// The UUID its swap signature carries (and the fstab entry names).
    pub uuid: String,
}

/// One variant of a multi-variant run: its disk and what to do with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantRules {
    /// Its name (`[A-Za-z0-9._-]+`), by which the helper reports on it.
    pub name: String,
    /// The virtio serial number of its disk.
    pub serial: String,
    /// Its rules (of the same version; no variants of their own).
    pub rules: Rules,
}

/// Whether `name` may name a variant: 1 to 128 of `[A-Za-z0-9._-]`, not `.` or `..` (pure).
pub fn is_variant_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// A swap partition to add (snf-image's `SWAP=<partition id>:<size>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwapPartition {
    /// Its partition number (`N` of `/dev/vdaN`).
    pub number: u32,
    /// Its size in MiB (snf-image's "MB").
    pub mib: u64,
    /// The UUID its swap signature carries (and the fstab entry names).
    pub uuid: String,
}

impl Rules {
    /// An empty rules document of the current version.
    pub fn new() -> Self {
        Self {
            version: RULES_VERSION,
            operations: Vec::new(),
            selinux_relabel: false,
            excluded_tasks: Vec::new(),
            root_partition: None,
            grow_filesystem: false,
            grow_to_disk: false,
            verify: false,
            required_packages: Vec::new(),
            rpms: Vec::new(),
            debs: Vec::new(),
            install: Vec::new(),
            uninstall: Vec::new(),
            update: false,
            repo: None,
            repo_format: RepoFormat::Rpm,
            gpgcheck: false,
            verbose: false,
            dry_run: false,
            swap: None,
            extra_disks: 0,
            swap_disk: None,
            task_overwriting: None,
            variants: Vec::new(),
            source_date_epoch: None,
            bulk: Vec::new(),
            digest_share: None,
        }
    }

    /// Serializes for the floppy.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("rules always serialize")
    }

    /// Parses a document read from the floppy, checking its version first.
    pub fn from_json(text: &str) -> Result<Self, RulesError> {
        #[derive(Deserialize)]
        struct VersionOnly {
            version: u32,
        }
        let v: VersionOnly = serde_json::from_str(text)?;
        if v.version != RULES_VERSION {
            return Err(RulesError::Version { found: v.version });
        }
        let rules: Rules = serde_json::from_str(text)?;
        if let Some(crate::digest_cache::Share { part, parts }) = rules.digest_share {
            if parts == 0 || parts > crate::digest_cache::MAX_PARTS || part >= parts {
                return Err(RulesError::DigestShare { part, parts });
            }
        }
        for variant in &rules.variants {
            if variant.rules.version != RULES_VERSION {
                return Err(RulesError::Version { found: variant.rules.version });
            }
            if !variant.rules.variants.is_empty() || !is_variant_name(&variant.name) {
                return Err(RulesError::Variant { name: variant.name.clone() });
            }
        }
        Ok(rules)
    }

    /// Whether the run starts programs of the guest (chrooted commands and scripts, package
    /// installs), so that the helper warms the guest's shell and C library ahead of them.
    pub fn runs_guest_programs(&self) -> bool {
        fn runs(op: &Operation) -> bool {
            match op {
                Operation::Task { operations, .. } => operations.iter().any(runs),
                _ => matches!(
                    op,
                    Operation::Run { .. }
                        | Operation::RunTask { .. }
                        | Operation::RunCommand { .. }
                        | Operation::RegenerateSshHostKeys
                ),
            }
        }
        self.changes_packages()
            || self.operations.iter().any(runs)
            // An overwritten task runs the image's own program.
            || (self.task_overwriting.is_some() && self.operations.iter().any(|op| matches!(op, Operation::Task { .. })))
    }
}

impl Rules {
    /// Whether the 60-InstallPackages task has anything to do.
    pub fn changes_packages(&self) -> bool {
        !self.rpms.is_empty()
            || !self.debs.is_empty()
            || !self.install.is_empty()
            || !self.uninstall.is_empty()
            || self.update
    }
}

/// The layout of the `--repo` directory, as the host found it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum RepoFormat {
    /// A yum/dnf repository (`repodata/repomd.xml`).
    #[default]
    Rpm,
    /// A flat apt repository: `Packages` (compressed or not) at its top, perhaps a `Release`;
    /// `deb URI ./` (the host writes these for a plain directory of `.deb` files).
    AptFlat,
    /// An apt repository with `dists/SUITE/Release` and a pool: `deb URI SUITE COMPONENT...`.
    AptDists {
        /// Every suite of `dists/`, with its components.
        suites: Vec<AptSuite>,
    },
}

impl RepoFormat {
    /// Whether apt reads this repository (dnf or yum otherwise).
    pub fn is_apt(&self) -> bool {
        !matches!(self, RepoFormat::Rpm)
    }
}

/// One suite of an apt repository's `dists/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AptSuite {
    /// The directory name under `dists/` (may hold `/`, as `bookworm/updates`).
    pub suite: String,
    /// The components its `Release` lists (`main`, `contrib`).
    pub components: Vec<String>,
}

/// Whether `word` can stand as a suite or component in an apt sources line: no space, bracket,
/// `#` or control character (which would change the line's meaning), no `..` component.
pub fn is_apt_source_word(word: &str) -> bool {
    !word.is_empty()
        && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._+~/".contains(&b))
        && !word.split('/').any(|c| c.is_empty() || c == "." || c == "..")
}

impl Default for Rules {
    fn default() -> Self {
        Self::new()
    }
}

/// One customization step, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Operation {
    /// Set the hostname (`/etc/hostname`, `/etc/hosts`).
    Hostname {
        /// The new host name (validated on the host).
        name: String,
    },
    /// Set a user's password field in `/etc/shadow`.
    Password {
        /// Guest user name.
        user: String,
        /// The exact second field of the user's `/etc/shadow` line (a crypt hash, `*`, or
        /// `!`-prefixed when locked).
        shadow_field: String,
    },
    /// Append a public key to the user's `~/.ssh/authorized_keys`.
    SshInject {
        /// Guest user name.
        user: String,
        /// One authorized_keys line.
        key: String,
    },
    /// Copy a file from the payload disk into the guest.
    Upload {
        /// Path of the file on the payload disk, relative to its root.
        payload_path: String,
        /// Absolute destination in the guest; an existing directory receives the file under
        /// `file_name`.
        guest_path: String,
        /// The file's name on the host, used when `guest_path` is a directory.
        file_name: String,
        /// Permission bits of the host file.
        mode: u32,
        /// Owner of the host file (virt-customize keeps it).
        uid: u32,
        /// Group of the host file.
        gid: u32,
    },
    /// Create a directory and its parents.
    Mkdir {
        /// Absolute guest path.
        path: String,
    },
    /// Replace a file's contents.
    Write {
        /// Absolute guest path.
        path: String,
        /// New contents.
        content: String,
    },
    /// Append a line to a file, adding a newline first if the file does not end in one.
    AppendLine {
        /// Absolute guest path.
        path: String,
        /// The line, without its newline.
        line: String,
    },
    /// Delete a file or directory recursively.
    Delete {
        /// Absolute guest path.
        path: String,
    },
    /// Change permission bits.
    Chmod {
        /// Permission bits.
        mode: u32,
        /// Absolute guest path.
        path: String,
    },
    /// Run a script from the payload disk in the guest root with `/bin/sh`.
    Run {
        /// Path of the script on the payload disk.
        payload_path: String,
        /// The script's name on the host, for messages.
        name: String,
    },
    /// Run an executable from the payload disk as snf-image runs a configuration task (its
    /// `CUSTOM_TASK`): written into the guest's `/tmp`, executed (its `#!` line honoured)
    /// chrooted into the guest and confined, with `env` added to the clean environment.
    RunTask {
        /// Path of the executable on the payload disk.
        payload_path: String,
        /// The task's name, for messages (`RunCustomTask`).
        name: String,
        /// The task's variables (`SNF_IMAGE_TARGET`, `SNF_IMAGE_PROPERTY_*`, ...).
        env: Vec<(String, String)>,
    },
    /// Run a command in the guest root with `/bin/sh -c`.
    RunCommand {
        /// The command line.
        command: String,
    },
    /// Set the timezone (`/etc/localtime`, `/etc/timezone`).
    Timezone {
        /// A zoneinfo name such as `Europe/Athens`.
        zone: String,
    },
    /// Install a script that runs once at the guest's first boot.
    Firstboot {
        /// Path of the script on the payload disk.
        payload_path: String,
        /// The script's name on the host.
        name: String,
    },
    /// Install a command that runs once at the guest's first boot.
    FirstbootCommand {
        /// The command line.
        command: String,
    },
    /// Install packages at the guest's first boot with its own package manager and
    /// repositories (the guest has a network then; the helper has none).
    FirstbootInstall {
        /// Package names (checked on the host: no shell metacharacter but `*`).
        packages: Vec<String>,
    },
    /// Change a path's owner and group (following a final symlink, as guestfs `chown` does).
    Chown {
        /// The new owner.
        user: Principal,
        /// The new group.
        group: Principal,
        /// Absolute guest path.
        path: String,
    },
    /// Copy a file or tree inside the guest as `cp -a` does (modes, owners, times kept;
    /// symlinks copied as symlinks); an existing directory `dest` receives it under its name.
    Copy {
        /// Absolute guest path (a final symlink is copied, not followed).
        source: String,
        /// Absolute guest path.
        dest: String,
    },
    /// Move a file or tree inside the guest as `mv` does.
    Move {
        /// Absolute guest path (a final symlink is moved, not followed).
        source: String,
        /// Absolute guest path; an existing directory receives `source` under its name.
        dest: String,
    },
    /// Make each of `links` a symlink to `target`, as `ln -sf` does.
    Link {
        /// The link's target, stored verbatim.
        target: String,
        /// Absolute guest paths.
        links: Vec<String>,
    },
    /// Create an empty regular file or update an existing one's times.
    Touch {
        /// Absolute guest path.
        path: String,
    },
    /// Truncate an existing file to zero length.
    Truncate {
        /// Absolute guest path.
        path: String,
    },
    /// Truncate every regular file under a directory to zero length (symlinks not followed).
    TruncateRecursive {
        /// Absolute guest path.
        path: String,
    },
    /// Overwrite a regular file with patterns, then delete it.
    Scrub {
        /// Absolute guest path.
        path: String,
    },
    /// Edit an existing regular file line by line with a Perl expression of the forms
    /// [`crate::perl_edit::Program`] runs (checked on the host, parsed again by the helper).
    Edit {
        /// Absolute guest path (in-root symlinks followed, as virt-edit edits the real file).
        path: String,
        /// The Perl expression as given.
        expr: String,
    },
    /// Copy a host file or tree from the payload disk into an existing guest directory, with
    /// the modes, numeric owners, times and symlinks it has there (as virt-customize's tar).
    CopyIn {
        /// Path of the tree's top on the payload disk.
        payload_path: String,
        /// Absolute guest path of an existing directory.
        remote_dir: String,
        /// The top's name in `remote_dir`.
        name: String,
    },
    /// Give the guest a fresh random `/etc/machine-id` (and `/var/lib/dbus/machine-id` when it
    /// is a regular file), so that clones of one image do not share it.
    ResetMachineId,
    /// Remove the SSH host keys (`/etc/ssh/ssh_host_*`) and, when the guest has `sshd` and
    /// `ssh-keygen`, make new ones with the guest's own `ssh-keygen -A`.
    RegenerateSshHostKeys,
    /// Configure the guest's network interfaces (Ganeti's NICs), for the network stack the
    /// guest uses.
    Network {
        /// The interfaces, in Ganeti's order.
        nics: Vec<Nic>,
        /// NetworkManager keyfiles whatever the guest's own stack (snf-image's `NM_NETWORKING`).
        #[serde(default)]
        network_manager: bool,
    },
    /// snf-image's `CLOUD_INIT`: a NoCloud seed and `cloud.cfg.d` snippets that cloud-init
    /// applies at first boot, instead of the guest's files edited now.
    CloudInit {
        /// What goes into the seed and the snippets.
        seed: CloudInitSeed,
    },
    /// Set `local-hostname` in the guest's NoCloud seed (a rename under snf-image's
    /// `CLOUD_INIT`: cloud-init, which owns the hostname, applies it at the next boot).
    CloudInitHostname {
        /// The new host name (validated on the host).
        name: String,
    },
    /// One of snf-image's configuration tasks (`AssignHostname`, ...): its operations, which an
    /// image's `overwrite_task_<name>` replaces when [`Rules::task_overwriting`] is set.
    Task {
        /// snf-image's task name.
        name: String,
        /// What imgforge does for the task (none when it has nothing to do).
        operations: Vec<Operation>,
    },
}

/// A user or group as the rules name it: a number, or a name the helper looks up in the
/// guest's own `/etc/passwd` or `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Principal {
    /// A numeric id, used as is.
    Id(u32),
    /// A name to resolve in the guest.
    Name(String),
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Id(id) => write!(f, "{id}"),
            Principal::Name(name) => f.write_str(name),
        }
    }
}

/// One network interface to configure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    /// MAC address (how the guest's interface is recognized).
    pub mac: String,
    /// Static IPv4 `address/prefix`.
    pub ipv4: Option<String>,
    /// IPv4 gateway for a static address.
    pub gateway4: Option<String>,
    /// IPv4 by DHCP (when `ipv4` is absent); neither: no IPv4 configured, as snf-image.
    #[serde(default)]
    pub dhcp4: bool,
    /// How IPv6 is configured.
    #[serde(default)]
    pub ipv6: Ipv6Mode,
}

/// IPv6 on a NIC, as snf-image decides it from the network's gateway6 and tags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ipv6Mode {
    /// Not configured (the network has no IPv6 gateway).
    #[default]
    None,
    /// Stateless autoconfiguration (router advertisements), EUI-64 addresses.
    Slaac,
    /// SLAAC for the address, stateless DHCPv6 for the rest (snf-image's `slaac_dhcp`).
    SlaacDhcp,
    /// Stateful DHCPv6.
    Dhcp,
}

/// A user's password for cloud-init's `chpasswd`, as a crypt(3) hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserPassword {
    /// The user.
    pub user: String,
    /// The crypt(3) hash.
    pub hash: String,
}

/// What snf-image's tasks give cloud-init when `CLOUD_INIT` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudInitSeed {
    /// The seed's `instance-id` (the instance name, as snf-image).
    pub instance_id: String,
    /// The seed's `local-hostname` (AssignHostname).
    pub hostname: Option<String>,
    /// `chpasswd` entries, with `ssh_pwauth: True` (ChangePassword).
    pub passwords: Vec<UserPassword>,
    /// The seed's `public-keys` (ChangePassword with auth_keys).
    pub public_keys: Vec<String>,
    /// `ssh_deletekeys: true` (DeleteSSHKeys).
    pub delete_ssh_keys: bool,
    /// `network: {config: disabled}`: the network is configured in the guest's own files.
    pub network_disabled: bool,
    /// A swap file cloud-init makes at first boot (AddSwap under `CLOUD_INIT`).
    #[serde(default)]
    pub swap: Option<CloudInitSwap>,
}

/// cloud-init's `swap` module settings, as snf-image's AddSwap writes them under `CLOUD_INIT`
/// (`size: auto`, bounded by `maxsize`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudInitSwap {
    /// The swap file's path in the guest (`/swap-<random>.img`).
    pub filename: String,
    /// Its largest size in bytes (`SWAP`'s MB).
    pub max_bytes: u64,
}

impl Operation {
    /// The command-line option this operation came from, for messages.
    pub fn option_name(&self) -> &'static str {
        match self {
            Operation::Hostname { .. } => "--hostname",
            Operation::Password { user, .. } if user == "root" => "--root-password",
            Operation::Password { .. } => "--password",
            Operation::SshInject { .. } => "--ssh-inject",
            Operation::Upload { .. } => "--upload",
            Operation::Mkdir { .. } => "--mkdir",
            Operation::Write { .. } => "--write",
            Operation::AppendLine { .. } => "--append-line",
            Operation::Delete { .. } => "--delete",
            Operation::Chmod { .. } => "--chmod",
            Operation::Run { .. } => "--run",
            Operation::RunTask { .. } => "a configuration task (Ganeti)",
            Operation::RunCommand { .. } => "--run-command",
            Operation::Timezone { .. } => "--timezone",
            Operation::Firstboot { .. } => "--firstboot",
            Operation::FirstbootCommand { .. } => "--firstboot-command",
            Operation::FirstbootInstall { .. } => "--firstboot-install",
            Operation::Chown { .. } => "--chown",
            Operation::Copy { .. } => "--copy",
            Operation::Move { .. } => "--move",
            Operation::Link { .. } => "--link",
            Operation::Touch { .. } => "--touch",
            Operation::Truncate { .. } => "--truncate",
            Operation::TruncateRecursive { .. } => "--truncate-recursive",
            Operation::Scrub { .. } => "--scrub",
            Operation::Edit { .. } => "--edit",
            Operation::CopyIn { .. } => "--copy-in",
            Operation::ResetMachineId => "--reset-machine-id",
            Operation::RegenerateSshHostKeys => "--regenerate-ssh-host-keys",
            Operation::Network { .. } => "network (Ganeti NICs)",
            Operation::CloudInit { .. } => "cloud-init seed (Ganeti CLOUD_INIT)",
            Operation::CloudInitHostname { .. } => "cloud-init hostname (Ganeti rename)",
            Operation::Task { .. } => "a configuration task (Ganeti)",
        }
    }

    /// A short description that never contains secrets, for logs and errors.
    pub fn describe(&self) -> String {
        match self {
            Operation::Hostname { name } => format!("--hostname {name}"),
            Operation::Password { user, .. } => format!("{} for {user}", self.option_name()),
            Operation::SshInject { user, .. } => format!("--ssh-inject {user}"),
            Operation::Upload { file_name, guest_path, .. } => format!("--upload {file_name}:{guest_path}"),
            Operation::Mkdir { path } => format!("--mkdir {path}"),
            Operation::Write { path, .. } => format!("--write {path}"),
            Operation::AppendLine { path, .. } => format!("--append-line {path}"),
            Operation::Delete { path } => format!("--delete {path}"),
            Operation::Chmod { mode, path } => format!("--chmod {mode:o}:{path}"),
            Operation::Run { name, .. } => format!("--run {name}"),
            Operation::RunTask { name, .. } => format!("task {name}"),
            Operation::RunCommand { command } => format!("--run-command '{command}'"),
            Operation::Timezone { zone } => format!("--timezone {zone}"),
            Operation::Firstboot { name, .. } => format!("--firstboot {name}"),
            Operation::FirstbootCommand { command } => format!("--firstboot-command '{command}'"),
            Operation::FirstbootInstall { packages } => format!("--firstboot-install {}", packages.join(",")),
            Operation::Chown { user, group, path } => format!("--chown {user}:{group}:{path}"),
            Operation::Copy { source, dest } | Operation::Move { source, dest } => {
                format!("{} {source}:{dest}", self.option_name())
            }
            Operation::Link { target, links } => format!("--link {target}:{}", links.join(":")),
            Operation::CopyIn { name, remote_dir, .. } => format!("--copy-in {name}:{remote_dir}"),
            Operation::Touch { path }
            | Operation::Truncate { path }
            | Operation::TruncateRecursive { path }
            | Operation::Scrub { path } => format!("{} {path}", self.option_name()),
            // The expression may hold what the file should not show in logs (a password line).
            Operation::Edit { path, .. } => format!("--edit {path}"),
            Operation::ResetMachineId | Operation::RegenerateSshHostKeys => self.option_name().to_owned(),
            Operation::Network { nics, .. } => format!("network configuration of {} NIC(s)", nics.len()),
            Operation::CloudInit { .. } => self.option_name().to_owned(),
            Operation::CloudInitHostname { name } => format!("cloud-init local-hostname {name}"),
            Operation::Task { name, operations } => format!("task {name} ({} operation(s))", operations.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// snf-image's tasks travel as groups, and the image's programs count as guest programs
    /// only when overwriting is allowed.
    #[test]
    fn task_groups_round_trip_and_run_guest_programs() {
        let mut r = Rules::new();
        r.operations = vec![Operation::Task {
            name: "AssignHostname".into(),
            operations: vec![Operation::Hostname { name: "h".into() }],
        }];
        assert!(!r.runs_guest_programs());
        r.task_overwriting = Some(vec![("SNF_IMAGE_TARGET".into(), "/".into())]);
        assert!(r.runs_guest_programs());
        assert_eq!(Rules::from_json(&r.to_json()).unwrap(), r);
        r.task_overwriting = None;
        r.operations =
            vec![Operation::Task { name: "DeleteSSHKeys".into(), operations: vec![Operation::RegenerateSshHostKeys] }];
        assert!(r.runs_guest_programs());
        assert_eq!(r.operations[0].describe(), "task DeleteSSHKeys (1 operation(s))");
    }

    fn sample() -> Rules {
        let mut r = Rules::new();
        r.operations = vec![
            Operation::Hostname { name: "web1".into() },
            Operation::Password { user: "root".into(), shadow_field: "$6$salt$hash".into() },
            Operation::Write { path: "/etc/motd".into(), content: "hi\n\"quoted\"".into() },
            Operation::Chmod { mode: 0o600, path: "/etc/motd".into() },
            Operation::RunCommand { command: "echo 'a b' > /x".into() },
            Operation::Chown { user: Principal::Id(1000), group: Principal::Name("adm".into()), path: "/x".into() },
            Operation::Copy { source: "/a".into(), dest: "/b".into() },
            Operation::Move { source: "/a".into(), dest: "/b".into() },
            Operation::Link { target: "../a".into(), links: vec!["/l1".into(), "/l2".into()] },
            Operation::Touch { path: "/t".into() },
            Operation::Truncate { path: "/t".into() },
            Operation::TruncateRecursive { path: "/var/log".into() },
            Operation::Scrub { path: "/s".into() },
            Operation::Edit { path: "/etc/e".into(), expr: "s/a\\/b/\"$1\"/g".into() },
            Operation::ResetMachineId,
            Operation::RegenerateSshHostKeys,
            Operation::CopyIn {
                payload_path: "copy-in/0001/conf".into(),
                remote_dir: "/etc".into(),
                name: "conf".into(),
            },
        ];
        r.operations.push(Operation::FirstbootInstall { packages: vec!["vim".into(), "lib*".into()] });
        r.debs = vec!["debs/0001-a.deb".into()];
        r.uninstall = vec!["nano".into()];
        r.update = true;
        r.repo = Some("repo".into());
        r.repo_format = RepoFormat::AptDists {
            suites: vec![AptSuite { suite: "bookworm".into(), components: vec!["main".into(), "contrib".into()] }],
        };
        r.selinux_relabel = true;
        r.grow_to_disk = true;
        r.excluded_tasks = vec!["SELinuxRelabel".into()];
        r
    }

    #[test]
    fn round_trip() {
        let r = sample();
        assert_eq!(Rules::from_json(&r.to_json()).unwrap(), r);
    }

    #[test]
    fn other_version_refused() {
        let text = sample().to_json().replace("\"version\": 1", "\"version\": 2");
        assert!(matches!(Rules::from_json(&text), Err(RulesError::Version { found: 2 })));
    }

    #[test]
    fn malformed_refused() {
        for text in ["", "{", "[]", "{\"version\":1,\"operations\":[{\"op\":\"nope\"}]}", "{\"version\":1,\"extra\":1}"]
        {
            assert!(matches!(Rules::from_json(text), Err(RulesError::Malformed(_))), "{text:?}");
        }
    }

    #[test]
    fn rules_without_a_repo_format_read_as_rpm() {
        let text = "{\"version\":1,\"install\":[\"demo\"],\"repo\":\"repo\"}";
        assert_eq!(Rules::from_json(text).unwrap().repo_format, RepoFormat::Rpm);
    }

    #[test]
    fn apt_source_words() {
        for ok in ["bookworm", "bookworm-updates", "bookworm/updates", "main", "non-free-firmware", "1.0~rc+x"] {
            assert!(is_apt_source_word(ok), "{ok}");
        }
        for bad in ["", "a b", "[trusted=yes]", "main#x", "a\nb", "../x", "/abs", "a//b", "a/", "a/./b"] {
            assert!(!is_apt_source_word(bad), "{bad:?}");
        }
    }

    #[test]
    fn describe_hides_secrets() {
        let op = Operation::Password { user: "root".into(), shadow_field: "$6$secret".into() };
        assert!(!op.describe().contains("secret"));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_text_is_a_typed_error_or_rules(text in ".{0,400}") {
            let _ = Rules::from_json(&text);
        }

        #[test]
        fn written_rules_read_back(name in "[a-z]{1,20}", content in ".{0,200}", mode in 0u32..0o7777) {
            let mut r = Rules::new();
            r.operations = vec![
                Operation::Hostname { name },
                Operation::Write { path: "/x".into(), content },
                Operation::Chmod { mode, path: "/x".into() },
            ];
            prop_assert_eq!(Rules::from_json(&r.to_json()).unwrap(), r);
        }
    }
}

#[cfg(test)]
mod variant_tests {
    use super::*;

    fn with_variant(name: &str, version: u32) -> Rules {
        let mut inner = Rules::new();
        inner.version = version;
        inner.operations = vec![Operation::Hostname { name: "web1".into() }];
        let mut rules = Rules::new();
        rules.variants = vec![VariantRules { name: name.into(), serial: "imgforge-v1".into(), rules: inner }];
        rules
    }

    #[test]
    fn digest_shares_round_trip_and_are_checked() {
        let mut rules = Rules::new();
        assert!(!rules.to_json().contains("digest_share"), "no share: no key");
        rules.digest_share = Some(crate::digest_cache::Share { part: 1, parts: 2 });
        assert_eq!(Rules::from_json(&rules.to_json()).unwrap(), rules);
        for (part, parts) in [(2, 2), (0, 0), (0, crate::digest_cache::MAX_PARTS + 1)] {
            rules.digest_share = Some(crate::digest_cache::Share { part, parts });
            assert!(
                matches!(Rules::from_json(&rules.to_json()), Err(RulesError::DigestShare { .. })),
                "{part} of {parts}"
            );
        }
    }

    #[test]
    fn variants_round_trip_and_are_checked() {
        let rules = with_variant("ath-web.1", RULES_VERSION);
        assert_eq!(Rules::from_json(&rules.to_json()).unwrap(), rules);
        // A document without variants is written as before: no `variants` key.
        assert!(!Rules::new().to_json().contains("variants"));
        let err = Rules::from_json(&with_variant("ath", 9).to_json()).unwrap_err();
        assert!(matches!(err, RulesError::Version { found: 9 }), "{err}");
        for bad in ["", "..", "a/b", "a b", "x\n"] {
            let err = Rules::from_json(&with_variant(bad, RULES_VERSION).to_json()).unwrap_err();
            assert!(matches!(err, RulesError::Variant { .. }), "{bad:?}: {err}");
        }
        let mut nested = with_variant("outer", RULES_VERSION);
        nested.variants[0].rules.variants = with_variant("inner", RULES_VERSION).variants;
        assert!(matches!(Rules::from_json(&nested.to_json()).unwrap_err(), RulesError::Variant { .. }));
    }
}
