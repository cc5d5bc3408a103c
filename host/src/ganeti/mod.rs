//! The Ganeti OS interface (API 20): `imgforge ganeti install-os` writes the OS definition,
//! whose scripts are thin shims that exec `imgforge ganeti ACTION`; all the logic is here.
//! Parameters are snf-image's (`OSP_*`), so a Ganeti site can switch by changing the OS name.

pub mod checksum;
pub mod cloud_init;
pub mod config;
pub mod config_url;
pub mod fetch;
pub mod nics;
pub mod params;
pub mod task_properties;
pub mod variants;

use crate::job::{self, VmSettings};
use crate::ops::Plan;
use crate::progress::{Event, JsonLines, Progress, Silent};
use crate::source::reach::Reach;
use crate::vm::accel::Accel;
use crate::vm::Interrupt;
use config::Config;
use imgforge_protocol::rules::{Operation, Principal};
use params::{ImageFormat, ImageId, Params};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// Why a Ganeti OS action failed.
#[derive(Debug, Error)]
pub enum GanetiError {
    /// A variable Ganeti always passes is missing.
    #[error("{0} is not set: run this as Ganeti does")]
    Unset(&'static str),
    /// `/etc/default/imgforge` cannot be read.
    #[error("cannot read {path}: {source}")]
    ConfigRead {
        /// The settings file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `/etc/default/imgforge` has a bad line.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// An OS parameter (`OSP_*`, `NIC_*`) is malformed.
    #[error(transparent)]
    Param(#[from] params::ParamError),
    /// IMAGE_DIR is missing or unreadable.
    #[error("IMAGE_DIR {dir}: {source}")]
    ImageDir {
        /// The configured directory.
        dir: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A name given for a file in IMAGE_DIR resolves outside it.
    #[error("{param} {name}: {} leads outside IMAGE_DIR {}", candidate.display(), dir.display())]
    OutsideImageDir {
        /// The parameter.
        param: String,
        /// Its value.
        name: String,
        /// What it resolved to.
        candidate: PathBuf,
        /// IMAGE_DIR.
        dir: PathBuf,
    },
    /// No file of that name in IMAGE_DIR.
    #[error("{param} {name}: no such image in IMAGE_DIR {} (tried {tried})", dir.display())]
    NoSuchImage {
        /// The parameter.
        param: String,
        /// Its value.
        name: String,
        /// IMAGE_DIR.
        dir: PathBuf,
        /// The names tried.
        tried: String,
    },
    /// A file for the helper (a personality file) cannot be written.
    #[error("cannot stage {path}: {source}")]
    Stage {
        /// The guest path it is for.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// PROGRESS_MONITOR cannot be started.
    #[error("cannot start PROGRESS_MONITOR {command:?}: {source}")]
    Monitor {
        /// The command.
        command: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// No scratch directory.
    #[error("cannot create a temporary directory: {0}")]
    WorkDir(std::io::Error),
    /// The OS definition cannot be written.
    #[error("cannot write {}: {source}", path.display())]
    Install {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The instance's disk cannot be opened for export.
    #[error("cannot open {}: {source}", path.display())]
    OpenDisk {
        /// DISK_0_PATH.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Streaming the disk out failed.
    #[error("exporting {}: {source}", path.display())]
    Export {
        /// DISK_0_PATH.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An operation built from the parameters is refused.
    #[error(transparent)]
    Ops(#[from] crate::ops::OpsError),
    /// Writing the image onto the disk failed.
    #[error(transparent)]
    Write(#[from] crate::job::write::WriteError),
    /// The helper run failed.
    #[error(transparent)]
    Job(#[from] job::JobError),
    /// The OS variant's file is missing or bad.
    #[error(transparent)]
    Variant(#[from] variants::VariantError),
    /// `config_url` or an image's `.sha256` could not be fetched.
    #[error(transparent)]
    Fetch(#[from] fetch::FetchError),
    /// An image's `.sha256` file is not one.
    #[error("{url} (the checksum of img_id {image}): {reason}; fix it, or give img_sha256 (none: no check)")]
    Sha256File {
        /// The `.sha256` URL, redacted.
        url: String,
        /// The image URL, redacted.
        image: String,
        /// What is wrong.
        reason: String,
    },
}

/// The OS API version imgforge implements.
pub const API_VERSION: u32 = 20;
/// The scripts Ganeti calls.
pub const ACTIONS: &[&str] = &["create", "import", "export", "rename", "verify"];
/// Ganeti's disks are raw, always: their bytes are the tenant's, so a qcow2 header a tenant
/// wrote at sector 0 must not make imgforge open the disk as qcow2.
const DISK_FORMAT: job::KnownFormat = job::KnownFormat::Given(crate::vm::cmdline::DiskFormat::Raw);
/// Extensions tried after the exact `img_id`.
const IMAGE_EXTENSIONS: &[&str] = &["", ".raw", ".img", ".qcow2", ".diskdump"];

/// Writes `dir/imgforge/` (scripts, API version, variants, parameters).
pub fn install_os(os_dir: &Path, imgforge: &Path) -> Result<PathBuf, GanetiError> {
    let dir = os_dir.join("imgforge");
    let io = |what: &Path, source| GanetiError::Install { path: what.to_owned(), source };
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    for action in ACTIONS {
        let path = dir.join(action);
        let script = format!(
            "#!/bin/sh\n# Ganeti OS script, written by imgforge ganeti install-os.\nexec '{}' ganeti {action} \"$@\"\n",
            imgforge.display()
        );
        std::fs::write(&path, script).map_err(|e| io(&path, e))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).map_err(|e| io(&path, e))?;
    }
    let variants = variants::list(Path::new(&load_config()?.variants_dir));
    let files = [
        ("ganeti_api_version", format!("{API_VERSION}\n")),
        ("variants.list", variants.iter().map(|v| format!("{v}\n")).collect()),
        ("parameters.list", params::PARAMETERS.iter().map(|(n, d)| format!("{n} {d}\n")).collect()),
    ];
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| io(&path, e))?;
    }
    Ok(dir)
}

fn environment() -> BTreeMap<String, String> {
    std::env::vars().collect()
}

fn require(env: &BTreeMap<String, String>, key: &'static str) -> Result<String, GanetiError> {
    env.get(key).filter(|v| !v.is_empty()).cloned().ok_or(GanetiError::Unset(key))
}

/// Loads `/etc/default/imgforge` (or `$IMGFORGE_GANETI_CONFIG`), warning about unknown keys.
pub fn load_config() -> Result<Config, GanetiError> {
    let path = std::env::var("IMGFORGE_GANETI_CONFIG").unwrap_or_else(|_| config::CONFIG_PATH.into());
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
        Err(source) => return Err(GanetiError::ConfigRead { path, source }),
    };
    let (c, warnings) = config::parse(&path, &text)?;
    for w in warnings {
        crate::stdio::err_line(&format!("imgforge: warning: {w}"));
    }
    Ok(c)
}

/// Ganeti's environment and the settings, as the OS variant (`OS_VARIANT`) and `config_url`
/// make them: the variant's file over `/etc/default/imgforge`, its parameter defaults under
/// Ganeti's `OSP_*`, and with `fetch_config_url` the document's parameters over both.
async fn parameters(
    interrupt: &Interrupt,
    fetch_config_url: bool,
) -> Result<(BTreeMap<String, String>, Config), GanetiError> {
    let mut env = environment();
    let mut config = load_config()?;
    // Ganeti's OS parameters are the tenant's; a variant's CONFIG_URL default is the operator's.
    let tenant_url = config_url::url(&env).is_some();
    if let Some(name) = env.get("OS_VARIANT").filter(|v| !v.is_empty()).cloned() {
        let variant = variants::load(&name, &mut config)?;
        warn_all(&variant.warnings);
        variants::apply_defaults(&mut env, &variant);
    }
    let Some(url) = config_url::url(&env) else { return Ok((env, config)) };
    let bad = |reason| params::ParamError { param: "config_url".into(), reason };
    let place = match fetch::place(&url, true).map_err(bad)? {
        fetch::Place::File(path) if tenant_url => {
            fetch::Place::File(fetch::confine_file(&path, Path::new(&config.image_dir)).map_err(bad)?)
        }
        place => place,
    };
    if !fetch_config_url {
        return Ok((env, config));
    }
    crate::stdio::err_line(&imgforge_protocol::printable::printable(&format!(
        "imgforge: reading OS parameters from config_url {}",
        crate::source::http::redact(&url)
    )));
    let data = fetch_small("config_url", place, config_url::MAX_CONFIG_BYTES, false, &config, interrupt).await?;
    let warnings = config_url::apply(&mut env, &data.unwrap_or_default())?;
    warn_all(&warnings);
    Ok((env, config))
}

/// The addresses the URL of OS parameter `param` may reach, as `URL_ALLOW_PRIVATE_ADDRESSES` says.
fn reach(config: &Config, param: &'static str) -> Reach {
    if config.url_allow_private_addresses {
        Reach::Any
    } else {
        Reach::PublicOnly { param }
    }
}

/// [`fetch::fetch`] off the async runtime, stopped by an interrupt.
async fn fetch_small(
    param: &'static str,
    place: fetch::Place,
    max: u64,
    may_be_missing: bool,
    config: &Config,
    interrupt: &Interrupt,
) -> Result<Option<Vec<u8>>, GanetiError> {
    let timeouts = crate::source::http::HttpTimeouts::default();
    let reach = reach(config, param);
    let result = job::cancellable(param, interrupt, move |cancel| {
        Ok::<_, job::JobError>(fetch::fetch(param, &place, max, may_be_missing, timeouts, reach, cancel))
    })
    .await?;
    Ok(result?)
}

/// The SHA-256 the image must have, and where it came from: `img_sha256`, or the `.sha256`
/// beside an http(s) image when the server has one.
async fn expected_sha256(
    env: &BTreeMap<String, String>,
    image: &str,
    config: &Config,
    interrupt: &Interrupt,
) -> Result<Option<(String, String)>, GanetiError> {
    let url = match (checksum::wanted(env)?, crate::source::Location::parse(image)) {
        (checksum::Wanted::Digest(hex), _) => return Ok(Some((hex, "img_sha256".into()))),
        (checksum::Wanted::Sidecar, crate::source::Location::Url(url)) => url,
        _ => return Ok(None),
    };
    let sidecar = checksum::sidecar_url(&url);
    let shown = crate::source::http::redact(&sidecar);
    let place = fetch::Place::Http(sidecar);
    let Some(data) = fetch_small("img_id", place, checksum::MAX_SHA256_FILE_BYTES, true, config, interrupt).await?
    else {
        let line = format!("imgforge: no {shown} on the image's server: the image is not checked (give img_sha256)");
        crate::stdio::err_line(&imgforge_protocol::printable::printable(&line));
        return Ok(None);
    };
    let hex = checksum::parse_sha256_file(&data, checksum::file_name(&url)).map_err(|reason| {
        GanetiError::Sha256File { url: shown.clone(), image: crate::source::http::redact(&url), reason }
    })?;
    Ok(Some((hex, shown)))
}

/// Resolves `img_id`: a file inside IMAGE_DIR (refusing anything leading outside it), a URL as
/// is, or `None` for `null`.
pub fn resolve_image(config: &Config, id: &ImageId) -> Result<Option<String>, GanetiError> {
    match id {
        ImageId::Url(url) => Ok(Some(url.clone())),
        ImageId::Local(name) => resolve_in_image_dir(config, "img_id", name, IMAGE_EXTENSIONS).map(Some),
        ImageId::Null => Ok(None),
    }
}

/// Writes each warning on stderr, which Ganeti keeps as the OS log.
fn warn_all(warnings: &[String]) {
    for w in warnings {
        crate::stdio::err_line(&format!("imgforge: warning: {w}"));
    }
}

/// The parameters given that ask for a customization, which `img_id=null` does not do.
fn customization_asked(params: &Params) -> Vec<&'static str> {
    [
        ("img_passwd", params.passwd.is_some()),
        ("img_passwd_hash", params.passwd_hash.is_some()),
        ("img_personality", !params.personality.is_empty()),
        ("auth_keys", !params.auth_keys.is_empty()),
        ("install_rpms", !params.install_rpms.is_empty()),
        ("repo", params.repo.is_some()),
        ("install", !params.install.is_empty()),
        ("cloud_userdata", params.cloud_userdata.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, given)| given.then_some(name))
    .collect()
}

fn resolve_in_image_dir(config: &Config, param: &str, name: &str, extensions: &[&str]) -> Result<String, GanetiError> {
    params::check_image_name(param, name)?;
    let dir = std::fs::canonicalize(&config.image_dir)
        .map_err(|source| GanetiError::ImageDir { dir: config.image_dir.clone(), source })?;
    for ext in extensions {
        let candidate = dir.join(format!("{name}{ext}"));
        if let Ok(real) = std::fs::canonicalize(&candidate) {
            if !real.starts_with(&dir) {
                return Err(GanetiError::OutsideImageDir {
                    param: param.to_owned(),
                    name: name.to_owned(),
                    candidate,
                    dir,
                });
            }
            return Ok(real.display().to_string());
        }
    }
    Err(GanetiError::NoSuchImage {
        param: param.to_owned(),
        name: name.to_owned(),
        dir,
        tried: extensions.iter().map(|e| format!("{name}{e}")).collect::<Vec<_>>().join(", "),
    })
}

fn settings(config: &Config, properties: &BTreeMap<String, String>) -> VmSettings {
    VmSettings {
        accel: match config.accel.as_str() {
            "kvm" => Accel::Kvm,
            "tcg" => Accel::Tcg,
            _ => Accel::Auto,
        },
        timeout: Duration::from_secs(config.helper_soft_timeout),
        hard_grace: Duration::from_secs(config.helper_hard_timeout),
        memory_mib: config.helper_memory,
        vcpus: job::HELPER_VCPUS,
        helper_user: config.helper_user.clone(),
        excluded_tasks: task_properties::with_mounted_tasks(properties, params::excluded_helper_tasks(properties)),
        show_console: true,
        trace_tasks: false,
        qemu: PathBuf::from("qemu-system-x86_64"),
    }
}

/// snf-image's mounted, overwritable tasks imgforge does as operations, one at a time: their
/// operations, each task's grouped as [`Operation::Task`] when the image may overwrite it
/// (`ALLOW_MOUNTED_TASK_OVERWRITING`), so that the helper runs the image's program instead.
struct Tasks<'a> {
    plan: Plan,
    params: &'a Params,
    grouped: bool,
}

/// snf-image's mounted tasks that `EXCLUDE_TASK_<Name>` does not skip.
const NOT_EXCLUDABLE: &[&str] = &["InitializeDatasource", "InstallUnattend"];

impl Tasks<'_> {
    /// Adds task `name` (unless excluded), `add` putting its operations into the plan.
    fn task(&mut self, name: &str, add: impl FnOnce(&mut Plan) -> Result<(), GanetiError>) -> Result<(), GanetiError> {
        // snf-image's InitializeDatasource and InstallUnattend are not `excludable`: their
        // EXCLUDE_TASK_<Name> has no effect (the seed the other tasks add to is always begun).
        if !NOT_EXCLUDABLE.contains(&name) && self.params.excludes(name) {
            return Ok(());
        }
        let from = self.plan.operations.len();
        add(&mut self.plan)?;
        if self.grouped {
            let operations = self.plan.operations.split_off(from);
            self.plan.operations.push(Operation::Task { name: name.to_owned(), operations });
        }
        Ok(())
    }
}

/// Builds the operations of a create from the parameters, in snf-image's task order;
/// `swap_fstab` is AddSwap's fstab line for the swap partition FixPartitionTable makes.
fn plan(
    params: &Params,
    config: &Config,
    hostname: &str,
    nics: Vec<imgforge_protocol::rules::Nic>,
    swap_fstab: Option<&str>,
    work: &Path,
) -> Result<Plan, GanetiError> {
    use imgforge_protocol::rules::{CloudInitSeed, UserPassword};
    // snf-image's CLOUD_INIT: hostname, passwords, keys, host key deletion and swap go to
    // cloud-init, each task adding its part to the seed InitializeDatasource begins.
    let cloud_init = cloud_init::enabled(params);
    let part = |seed: CloudInitSeed| Operation::CloudInit { seed };
    let grouped = task_properties::task_overwriting(&params.properties);
    let mut t = Tasks { plan: Plan::default(), params, grouped };
    let network_configured = !nics.is_empty() && !params.excludes("ConfigureNetwork");
    t.task("InitializeDatasource", |plan| {
        if cloud_init {
            plan.operations.push(part(CloudInitSeed { instance_id: hostname.to_owned(), ..Default::default() }));
            if let Some(data) = &params.cloud_userdata {
                let local = stage(work, "cloud-userdata", cloud_init::USER_DATA_PATH, data)?;
                plan.add("upload", Some(&format!("{}:{}", local.display(), cloud_init::USER_DATA_PATH)))?;
                plan.add("chmod", Some(&format!("600:{}", cloud_init::USER_DATA_PATH)))?;
            }
        }
        Ok(())
    })?;
    if !cloud_init {
        // Windows only (nothing for imgforge to do), and not run under CLOUD_INIT.
        t.task("InstallUnattend", |_| Ok(()))?;
    }
    t.task("AddSwap", |plan| {
        match (cloud_init, task_properties::swap_file(&params.properties)) {
            (true, Some(swap)) => plan.operations.push(part(CloudInitSeed { swap: Some(swap), ..Default::default() })),
            // A partition's line, or (CLOUD_INIT or not, as snf-image) a whole swap disk's.
            _ => {
                if let Some(line) = swap_fstab {
                    plan.operations.push(Operation::AppendLine { path: "/etc/fstab".into(), line: line.to_owned() });
                }
            }
        }
        Ok(())
    })?;
    t.task("AssignHostname", |plan| {
        if cloud_init {
            plan.operations.push(part(CloudInitSeed { hostname: Some(hostname.to_owned()), ..Default::default() }));
            Ok(())
        } else {
            Ok(plan.add("hostname", Some(hostname))?)
        }
    })?;
    // ChangeMachineId and DeleteSSHKeys, on by default, before the personality (which may
    // carry host keys of the user's own).
    t.task("ChangeMachineId", |plan| Ok(plan.add("reset-machine-id", None)?))?;
    let mut passwords = Vec::new();
    if !params.excludes("ChangePassword") {
        for user in params.users() {
            let field = match (&params.passwd, &params.passwd_hash) {
                (Some(pw), _) => Some(params.hash_password(pw)?),
                (None, Some(hash)) => Some(hash.clone()),
                (None, None) => None,
            };
            if let Some(hash) = field {
                passwords.push(UserPassword { user, hash });
            }
        }
    }
    let add_keys = |plan: &mut Plan| -> Result<(), GanetiError> {
        if cloud_init {
            // Under CLOUD_INIT the keys are the seed's public-keys, as snf-image gives them.
            if !params.auth_keys.is_empty() || !passwords.is_empty() {
                let seed = CloudInitSeed {
                    passwords: passwords.clone(),
                    public_keys: params.auth_keys.clone(),
                    ..Default::default()
                };
                plan.operations.push(part(seed));
            }
        } else {
            for UserPassword { user, hash } in &passwords {
                plan.operations.push(Operation::Password { user: user.clone(), shadow_field: hash.clone() });
            }
            for key in &params.auth_keys {
                plan.add("ssh-inject", Some(&format!("root:string:{key}")))?;
            }
        }
        Ok(())
    };
    if params.excludes("ChangePassword") {
        // The keys are injected even so (imgforge has always done so).
        add_keys(&mut t.plan)?;
    } else {
        t.task("ChangePassword", add_keys)?;
    }
    t.task("ConfigureNetwork", |plan| {
        if network_configured {
            let network_manager = cloud_init::network_manager(params);
            plan.operations.push(Operation::Network { nics, network_manager });
            if cloud_init {
                plan.operations.push(part(CloudInitSeed { network_disabled: true, ..Default::default() }));
            }
        }
        Ok(())
    })?;
    t.task("DeleteSSHKeys", |plan| {
        if cloud_init {
            plan.operations.push(part(CloudInitSeed { delete_ssh_keys: true, ..Default::default() }));
            Ok(())
        } else {
            Ok(plan.add("regenerate-ssh-host-keys", None)?)
        }
    })?;
    if !cloud_init {
        // Windows only, and not run under CLOUD_INIT.
        t.task("DisableRemoteDesktopConnections", |_| Ok(()))?;
    }
    t.task("EnforcePersonality", |plan| {
        for (i, (file, data)) in params.personality.iter().enumerate() {
            let local = stage(work, &format!("personality-{i}"), &file.path, data)?;
            plan.add("upload", Some(&format!("{}:{}", local.display(), file.path)))?;
            // Owner and group are guest names: the helper looks them up in the guest's own
            // /etc/passwd and /etc/group, with no guest program involved.
            plan.operations.push(Operation::Chown {
                user: Principal::Name(file.owner.clone()),
                group: Principal::Name(file.group.clone()),
                path: file.path.clone(),
            });
            plan.add("chmod", Some(&format!("{:o}:{}", file.mode, file.path)))?;
        }
        Ok(())
    })?;
    let mut plan = t.plan;
    plan.root_partition = params.root_partition();
    for rpm in &params.install_rpms {
        let path = resolve_in_image_dir(config, "install_rpms", rpm, &[""])?;
        plan.add("install-rpm", Some(&path))?;
    }
    if let Some(repo) = &params.repo {
        let dir = resolve_in_image_dir(config, "repo", repo, &[""])?;
        plan.add("repo", Some(&dir))?;
        for pkg in &params.install {
            plan.add("install", Some(pkg))?;
        }
    }
    plan.finish()?;
    Ok(plan)
}

use std::os::unix::fs::OpenOptionsExt;

/// Writes `data` for the guest's `guest_path` into the private `work/name`, for an upload.
fn stage(work: &Path, name: &str, guest_path: &str, data: &[u8]) -> Result<PathBuf, GanetiError> {
    let local = work.join(name);
    let failed = |source| GanetiError::Stage { path: guest_path.to_owned(), source };
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&local).map_err(failed)?;
    f.write_all(data).map_err(failed)?;
    Ok(local)
}

/// snf-image's RunCustomTask: `CUSTOM_TASK`'s program, staged for the payload disk and run last
/// of the operations (after the personality, as snf-image runs it), chrooted into the guest and
/// confined, with snf-image's task variables.
fn add_custom_task(
    plan: &mut Plan,
    params: &Params,
    hostname: &str,
    env: &BTreeMap<String, String>,
    work: &Path,
) -> Result<(), GanetiError> {
    let name = task_properties::CUSTOM_TASK_NAME;
    let program = task_properties::custom_task(&params.properties)?;
    if params.excludes(name) {
        return Ok(());
    }
    let task_env = task_properties::task_env(&params.properties, hostname, params.passwd_hash.as_deref(), env);
    let mut operations = Vec::new();
    if let Some(program) = program {
        let local = stage(work, "custom-task", "CUSTOM_TASK", &program)?;
        let payload_path = plan.payload_file(&local.to_string_lossy());
        operations.push(Operation::RunTask { payload_path, name: name.into(), env: task_env.clone() });
    }
    if task_properties::task_overwriting(&params.properties) {
        // The image may overwrite any of snf-image's mounted tasks: they run with its variables.
        plan.operations.push(Operation::Task { name: name.into(), operations });
        plan.task_overwriting = Some(task_env);
    } else {
        plan.operations.extend(operations);
    }
    Ok(())
}

/// The progress sink: `PROGRESS_MONITOR` fed JSON on stdin, or nothing.
fn progress(config: &Config) -> Result<(std::sync::Arc<dyn Progress>, Option<std::process::Child>), GanetiError> {
    if config.progress_monitor.is_empty() {
        return Ok((std::sync::Arc::new(Silent), None));
    }
    let mut child = std::process::Command::new("/bin/sh")
        .args(["-c", &config.progress_monitor])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| GanetiError::Monitor { command: config.progress_monitor.clone(), source })?;
    let stdin = child.stdin.take().expect("piped");
    Ok((std::sync::Arc::new(JsonLines::new(stdin)), Some(child)))
}

/// Ganeti's `DISK_COUNT`: how many disks the instance has (1 when unset, as an older Ganeti
/// passes only `DISK_0_PATH`).
fn disk_count(env: &BTreeMap<String, String>) -> Result<usize, GanetiError> {
    match env.get("DISK_COUNT").map(|v| v.trim()) {
        None | Some("") => Ok(1),
        Some(v) => v.parse().map_err(|_| {
            params::ParamError { param: "DISK_COUNT".into(), reason: format!("{v:?} is not a number of disks") }.into()
        }),
    }
}

/// `create`: deploy `img_id` onto `DISK_0_PATH` and customize it.
pub async fn create(interrupt: &Interrupt) -> Result<(), GanetiError> {
    let (env, config) = parameters(interrupt, true).await?;
    let params = params::parse(&env)?;
    warn_all(&params.warnings);
    warn_all(&cloud_init::warnings(&params));
    let disk = PathBuf::from(require(&env, "DISK_0_PATH")?);
    let name = require(&env, "INSTANCE_NAME")?;
    let Some(image) = resolve_image(&config, &params.img_id)? else {
        // snf-image's null source: no image. Nothing is customized either, so the disk keeps
        // every byte (an empty disk for an install from elsewhere, or one adopted as is).
        let ignored = customization_asked(&params);
        if !ignored.is_empty() {
            warn_all(&[format!("img_id=null: {} ignored (nothing is customized)", ignored.join(", "))]);
        }
        let line = format!(
            "imgforge: img_id=null: nothing written to {} for {name}; the disk is left as it is",
            disk.display()
        );
        crate::stdio::err_line(&imgforge_protocol::printable::printable(&line));
        return Ok(());
    };
    let sha256 = expected_sha256(&env, &image, &config, interrupt).await?;
    let work = crate::workdir::private_tempdir("ganeti").map_err(GanetiError::WorkDir)?;
    let nics = nics::nics(&env, &config.nics)?;
    // snf-image's SWAP: FixPartitionTable makes the partition (whatever else is excluded, as
    // snf-image's does); AddSwap, a mounted task, adds its fstab entry. Under CLOUD_INIT,
    // AddSwap has cloud-init make a swap file instead, and no partition is made.
    let swap = if cloud_init::enabled(&params) { None } else { task_properties::swap_partition(&params.properties) };
    if swap.is_some() && params.excludes("FixPartitionTable") {
        let reason = "SWAP needs FixPartitionTable, which makes the partition, and img_properties exclude it";
        return Err(params::ParamError { param: "img_properties".into(), reason: reason.into() }.into());
    }
    // snf-image's SWAP=<letter>: AddSwap makes that disk of the instance swap, whole, and adds
    // its fstab entry; excluded (or with the mounted tasks), it does neither.
    let mut other_disks = Vec::new();
    let swap_disk = task_properties::swap_disk(&params.properties, disk_count(&env)?)
        .map_err(|reason| params::ParamError { param: "img_properties".into(), reason })?;
    let swap_disk = match swap_disk {
        Some(_) if params.excludes("AddSwap") || task_properties::mounted_tasks_excluded(&params.properties) => {
            crate::stdio::err_line("imgforge: img_properties: SWAP: AddSwap is excluded, no disk is made swap");
            None
        }
        Some((mut swap, fstab_line)) => {
            let var = format!("DISK_{}_PATH", swap.disk);
            let path = env.get(&var).filter(|v| !v.is_empty()).ok_or_else(|| params::ParamError {
                param: "img_properties".into(),
                reason: format!("SWAP names the instance's disk {}, but Ganeti did not set {var}", swap.disk),
            })?;
            other_disks.push(job::GuestDisk::new(PathBuf::from(path), DISK_FORMAT));
            // Before the image is written: a swap disk that is the image's disk (under another
            // name) would have its swap signature written over the image.
            job::check_distinct(&[job::GuestDisk::new(disk.clone(), DISK_FORMAT), other_disks[0].clone()]).map_err(
                |_| params::ParamError {
                    param: "img_properties".into(),
                    reason: format!(
                        "SWAP names the instance's disk {} ({var}), but that is its first disk, the image's, under another name: name another disk",
                        swap.disk
                    ),
                },
            )?;
            // The helper knows the disks it is given, in their order: this one is the second.
            swap.disk = other_disks.len() as u32;
            Some((swap, fstab_line))
        }
        None => None,
    };
    let mut plan = if task_properties::mounted_tasks_excluded(&params.properties) {
        // snf-image's EXCLUDE_MOUNTED_TASKS: only the tasks before the guest is mounted run.
        crate::stdio::err_line(
            "imgforge: img_properties: EXCLUDE_MOUNTED_TASKS: only FixPartitionTable and FilesystemResizeUnmounted run",
        );
        Plan::default()
    } else {
        // One SWAP property: a partition's line or a whole disk's, never both.
        let fstab = swap.as_ref().map(|(_, line)| line.as_str()).or(swap_disk.as_ref().map(|(_, line)| line.as_str()));
        let mut plan = plan(&params, &config, &name, nics, fstab, work.path())?;
        add_custom_task(&mut plan, &params, &name, &env, work.path())?;
        plan
    };
    plan.swap = swap.map(|(partition, _)| partition);
    plan.swap_disk = swap_disk.map(|(disk, _)| disk);
    // As snf-image: the image always grows into the instance's disk.
    plan.grow_to_disk = true;
    let vm_settings = settings(&config, &params.properties);
    let (progress, monitor) = progress(&config)?;
    let request = crate::job::write::WriteRequest {
        http: Default::default(),
        reach: reach(&config, "img_id"),
        confinement: settings(&config, &params.properties).confinement(),
        image: crate::source::Location::parse(&image),
        target: disk.clone(),
        // Ganeti's disk (a device, or a file for the file template) exists: written in place.
        force: true,
        size: None,
        // Checked before anything is written: a mismatch leaves the disk untouched.
        sha256: sha256.as_ref().map(|(hex, _)| hex.clone()),
        sha256_before_write: true,
        backing_file: None,
    };
    let line = format!("imgforge: deploying {} onto {} for {name}", request.image, disk.display());
    crate::stdio::err_line(&imgforge_protocol::printable::printable(&line));
    if let Some((hex, from)) = &sha256 {
        let line = format!("imgforge: the image must have SHA-256 {hex} ({from}), checked before the disk is written");
        crate::stdio::err_line(&imgforge_protocol::printable::printable(&line));
    }
    let result = async {
        let written = job::write(&request, progress.clone(), interrupt).await?;
        if written.bare_filesystem != (params.img_format == ImageFormat::Liveimg) {
            crate::stdio::err_line(&format!(
                "imgforge: warning: img_format is {:?} but the image is {}",
                params.img_format,
                written.format.name()
            ));
        }
        if params.excludes("ALL_TASKS") {
            return Ok(());
        }
        job::customize_written(&written, &request, &other_disks, plan, &vm_settings, progress.as_ref(), interrupt).await
    }
    .await;
    match &result {
        Ok(()) => progress.emit(Event::ImageDone),
        Err(e) => progress.emit(Event::error(&e.to_string())),
    }
    drop(progress);
    if let Some(mut m) = monitor {
        let _ = m.wait();
    }
    Ok(result?)
}

/// `rename`: set the new hostname in the image (snf-image does nothing here); under
/// `CLOUD_INIT`, in the NoCloud seed's `local-hostname`.
pub async fn rename(interrupt: &Interrupt) -> Result<(), GanetiError> {
    let (env, config) = parameters(interrupt, false).await?;
    let disk = PathBuf::from(require(&env, "DISK_0_PATH")?);
    let name = require(&env, "INSTANCE_NAME")?;
    if env.get("OSP_IMG_ID").is_some_and(|id| id.trim() == "null") {
        crate::stdio::err_line("imgforge: img_id=null: the disk holds no image of imgforge's, left as it is");
        return Ok(());
    }
    let (properties, warnings) = params::merged_properties(
        env.get("OSP_IMG_PROPERTIES").map(String::as_str),
        env.get("OSP_INST_PROPERTIES").map(String::as_str),
    )?;
    warn_all(&warnings);
    if params::excluded(&properties, "AssignHostname") {
        crate::stdio::err_line("imgforge: img_properties exclude AssignHostname: the image keeps its hostname");
        return Ok(());
    }
    let mut plan = Plan::default();
    // Checked as --hostname checks it.
    plan.add("hostname", Some(&name))?;
    if properties.get("CLOUD_INIT").is_some_and(|v| params::yes(v)) {
        // cloud-init owns the hostname (its seed's local-hostname, applied every boot): the
        // new name goes there, or cloud-init would put the old one back.
        plan.operations = vec![Operation::CloudInitHostname { name }];
    }
    Ok(job::customize(
        &[job::GuestDisk::new(disk, DISK_FORMAT)],
        plan,
        false,
        &settings(&config, &properties),
        &Silent,
        interrupt,
    )
    .await?)
}

/// `import`: a raw disk stream on stdin onto `DISK_0_PATH`; an interrupt (Ganeti aborting the
/// job) stops it.
pub async fn import(interrupt: &Interrupt) -> Result<(), GanetiError> {
    let env = environment();
    let disk = PathBuf::from(require(&env, "DISK_0_PATH")?);
    let dest = crate::stream::destination::Destination::open(
        &disk,
        None,
        None,
        &crate::stream::destination::DestinationOptions { force: true, size: None },
    )
    .map_err(crate::job::write::WriteError::from)?;
    job::cancellable("import", interrupt, move |cancel| {
        let report = |_: u64, _: Option<u64>| {};
        let opts = crate::stream::StreamOptions {
            source_name: "standard input".into(),
            expected_size: None,
            progress: &report,
            cancel,
        };
        let mut reader = crate::stream::Stream(std::io::stdin());
        crate::stream::copy(&mut reader, dest, &opts).map(drop).map_err(crate::job::write::WriteError::from)
    })
    .await?;
    Ok(())
}

/// `export`: `DISK_0_PATH` to stdout, its size announced on `EXP_SIZE_FD` when given.
pub fn export() -> Result<(), GanetiError> {
    use std::os::fd::FromRawFd;
    let env = environment();
    let disk = PathBuf::from(require(&env, "DISK_0_PATH")?);
    let mut file = std::fs::File::open(&disk).map_err(|source| GanetiError::OpenDisk { path: disk.clone(), source })?;
    let failed = |source| GanetiError::Export { path: disk.clone(), source };
    let size = std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0)).map_err(failed)?;
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0)).map_err(failed)?;
    if let Some(fd) = env.get("EXP_SIZE_FD").and_then(|v| crate::plain_number::parse::<i32>(v)) {
        // SAFETY: Ganeti passes this descriptor open for us to write the size into.
        let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
        let _ = writeln!(f, "{size}");
    }
    let mut out = std::io::stdout().lock();
    std::io::copy(&mut file, &mut out).map_err(failed)?;
    out.flush().map_err(failed)
}

/// `verify`: every parameter checked before any disk is touched.
pub async fn verify(interrupt: &Interrupt) -> Result<(), GanetiError> {
    let (env, config) = parameters(interrupt, false).await?;
    checksum::wanted(&env)?;
    if config_url::url(&env).is_some() && !env.contains_key("OSP_IMG_ID") {
        // As snf-image: the parameters come with config_url at create.
        return Ok(());
    }
    let params = params::parse(&env)?;
    warn_all(&params.warnings);
    warn_all(&cloud_init::warnings(&params));
    nics::nics(&env, &config.nics)?;
    resolve_image(&config, &params.img_id)?;
    for rpm in &params.install_rpms {
        resolve_in_image_dir(&config, "install_rpms", rpm, &[""])?;
    }
    if let Some(repo) = &params.repo {
        resolve_in_image_dir(&config, "repo", repo, &[""])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_for(properties: &str) -> Vec<Operation> {
        let env: BTreeMap<String, String> =
            [("OSP_IMG_ID", "debian"), ("OSP_IMG_PROPERTIES", properties)].map(|(k, v)| (k.into(), v.into())).into();
        let params = params::parse(&env).unwrap();
        let work = tempfile::tempdir().unwrap();
        plan(&params, &Config::default(), "inst1", Vec::new(), None, work.path()).unwrap().operations
    }

    /// As snf-image: ChangeMachineId and DeleteSSHKeys run by default, each excludable by its
    /// own property (any case), and by EXCLUDE_ALL_TASKS' own path (no customization at all).
    #[test]
    fn clone_hygiene_by_default_and_excludable_by_snf_image_names() {
        let both = [Operation::ResetMachineId, Operation::RegenerateSshHostKeys];
        let hygiene =
            |ops: Vec<Operation>| -> Vec<Operation> { ops.into_iter().filter(|o| both.contains(o)).collect() };
        assert_eq!(hygiene(plan_for("{}")), both);
        assert_eq!(hygiene(plan_for(r#"{"EXCLUDE_TASK_ChangeMachineId": "yes"}"#)), [Operation::RegenerateSshHostKeys]);
        assert_eq!(hygiene(plan_for(r#"{"exclude_task_deletesshkeys": "1"}"#)), [Operation::ResetMachineId]);
        assert_eq!(hygiene(plan_for(r#"{"EXCLUDE_TASK_DeleteSSHKeys": "no"}"#)), both, "'no' excludes nothing");
        let ops = plan_for("{}");
        assert_eq!(ops[0], Operation::Hostname { name: "inst1".into() });
    }

    /// CLOUD_INIT moves the hostname, passwords, keys and host-key deletion into the seed,
    /// each part still excludable by its snf-image task name.
    #[test]
    fn cloud_init_replaces_edited_files_with_the_seed() {
        // The parts each task adds, merged as the helper writes them.
        let seed_of = |ops: &[Operation]| {
            let mut seed = imgforge_protocol::rules::CloudInitSeed::default();
            for o in ops {
                if let Operation::CloudInit { seed: part } = o {
                    seed.instance_id.push_str(&part.instance_id);
                    seed.hostname = seed.hostname.clone().or(part.hostname.clone());
                    seed.delete_ssh_keys |= part.delete_ssh_keys;
                    seed.network_disabled |= part.network_disabled;
                }
            }
            assert!(matches!(&ops[0], Operation::CloudInit { seed } if !seed.instance_id.is_empty()), "{ops:?}");
            seed
        };
        let ops = plan_for(r#"{"cloud_init": "yes"}"#);
        assert!(!ops.iter().any(|o| matches!(o, Operation::Hostname { .. } | Operation::RegenerateSshHostKeys)));
        assert!(ops.contains(&Operation::ResetMachineId), "ChangeMachineId has no cloud-init form in snf-image");
        let seed = seed_of(&ops);
        assert_eq!((seed.instance_id.as_str(), seed.hostname.as_deref()), ("inst1", Some("inst1")));
        assert!(seed.delete_ssh_keys && !seed.network_disabled);
        let seed = seed_of(&plan_for(
            r#"{"CLOUD_INIT": "1", "EXCLUDE_TASK_AssignHostname": "yes", "EXCLUDE_TASK_DeleteSSHKeys": "yes"}"#,
        ));
        assert!(seed.hostname.is_none() && !seed.delete_ssh_keys);
        assert!(!plan_for(r#"{"CLOUD_INIT": "no"}"#).iter().any(|o| matches!(o, Operation::CloudInit { .. })));
    }

    /// ALLOW_MOUNTED_TASK_OVERWRITING groups the operations by snf-image task, in its order,
    /// every task not excluded present (empty ones too: the image may still overwrite them).
    #[test]
    fn overwritable_tasks_group_their_operations() {
        let names = |ops: &[Operation]| -> Vec<String> {
            ops.iter()
                .map(|o| match o {
                    Operation::Task { name, .. } => name.clone(),
                    other => panic!("not grouped: {other:?}"),
                })
                .collect()
        };
        let ops = plan_for(r#"{"allow_mounted_task_overwriting": "yes", "EXCLUDE_TASK_ChangeMachineId": "yes"}"#);
        assert_eq!(
            names(&ops),
            [
                "InitializeDatasource",
                "InstallUnattend",
                "AddSwap",
                "AssignHostname",
                "ChangePassword",
                "ConfigureNetwork",
                "DeleteSSHKeys",
                "DisableRemoteDesktopConnections",
                "EnforcePersonality"
            ]
        );
        assert!(
            matches!(&ops[3], Operation::Task { operations, .. } if operations == &[Operation::Hostname { name: "inst1".into() }])
        );
        let cloud = plan_for(
            r#"{"allow_mounted_task_overwriting": "1", "CLOUD_INIT": "yes", "EXCLUDE_TASK_InitializeDatasource": "yes"}"#,
        );
        assert!(
            matches!(&cloud[0], Operation::Task { name, operations } if name == "InitializeDatasource" && operations.len() == 1),
            "{cloud:?}"
        );
        assert!(!names(&cloud).iter().any(|n| n == "InstallUnattend" || n == "DisableRemoteDesktopConnections"));
        assert!(plan_for(r#"{"allow_mounted_task_overwriting": "no"}"#)
            .iter()
            .all(|o| !matches!(o, Operation::Task { .. })));
    }

    #[test]
    fn grow_tasks_excluded_by_snf_image_names() {
        let props = |json: &str| params::parse_properties(json).unwrap().0;
        let cases: [(&str, &[&str]); 6] = [
            ("{}", &[]),
            (r#"{"EXCLUDE_TASK_FixPartitionTable": "yes"}"#, &["FixPartitionTable"]),
            (r#"{"exclude_task_filesystemresizemounted": "1"}"#, &["FilesystemResizeMounted"]),
            (r#"{"EXCLUDE_FilesystemResize_TASKS": "yes"}"#, &["FilesystemResizeUnmounted", "FilesystemResizeMounted"]),
            (r#"{"EXCLUDE_FilesystemResize_TASKS": "no"}"#, &[]),
            (
                r#"{"EXCLUDE_FILESYSTEMRESIZE_TASKS": true, "EXCLUDE_TASK_FIXPARTITIONTABLE": "false"}"#,
                &["FilesystemResizeUnmounted", "FilesystemResizeMounted"],
            ),
        ];
        for (json, want) in cases {
            assert_eq!(params::excluded_helper_tasks(&props(json)), want, "{json}");
        }
    }
}
