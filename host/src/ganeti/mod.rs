//! The Ganeti OS interface (API 20): `imgforge ganeti install-os` writes the OS definition,
//! whose scripts are thin shims that exec `imgforge ganeti ACTION`; all the logic is here.
//! Parameters are snf-image's (`OSP_*`), so a Ganeti site can switch by changing the OS name.

pub mod cloud_init;
pub mod config;
pub mod nics;
pub mod params;

use crate::job::{self, VmSettings};
use crate::ops::Plan;
use crate::progress::{Event, JsonLines, Progress, Silent};
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
    let files = [
        ("ganeti_api_version", format!("{API_VERSION}\n")),
        ("variants.list", "default\n".to_string()),
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
        excluded_tasks: params::excluded_helper_tasks(properties),
        show_console: true,
        trace_tasks: false,
        qemu: PathBuf::from("qemu-system-x86_64"),
    }
}

/// Builds the operations of a create (or rename) from the parameters.
fn plan(
    params: &Params,
    config: &Config,
    hostname: &str,
    nics: Vec<imgforge_protocol::rules::Nic>,
    work: &Path,
) -> Result<Plan, GanetiError> {
    let mut plan = Plan::default();
    // snf-image's CLOUD_INIT: hostname, passwords, keys and host key deletion go to cloud-init.
    let cloud_init = cloud_init::enabled(params);
    if !params.excludes("AssignHostname") && !cloud_init {
        plan.add("hostname", Some(hostname))?;
    }
    let network_configured = !nics.is_empty() && !params.excludes("ConfigureNetwork");
    if network_configured {
        let network_manager = cloud_init::network_manager(params);
        plan.operations.push(imgforge_protocol::rules::Operation::Network { nics, network_manager });
    }
    let mut passwords = Vec::new();
    if !params.excludes("ChangePassword") {
        for user in params.users() {
            let field = match (&params.passwd, &params.passwd_hash) {
                (Some(pw), _) => Some(params.hash_password(pw)?),
                (None, Some(hash)) => Some(hash.clone()),
                (None, None) => None,
            };
            if let Some(hash) = field {
                passwords.push(imgforge_protocol::rules::UserPassword { user, hash });
            }
        }
    }
    if cloud_init {
        let seed = cloud_init::seed(params, hostname, passwords, network_configured);
        plan.operations.push(Operation::CloudInit { seed });
        if let Some(data) = &params.cloud_userdata {
            let local = stage(work, "cloud-userdata", cloud_init::USER_DATA_PATH, data)?;
            plan.add("upload", Some(&format!("{}:{}", local.display(), cloud_init::USER_DATA_PATH)))?;
            plan.add("chmod", Some(&format!("600:{}", cloud_init::USER_DATA_PATH)))?;
        }
    } else {
        for imgforge_protocol::rules::UserPassword { user, hash } in passwords {
            plan.operations.push(imgforge_protocol::rules::Operation::Password { user, shadow_field: hash });
        }
    }
    // snf-image's ChangeMachineId and DeleteSSHKeys, on by default, before the personality
    // (which may carry host keys of the user's own).
    if !params.excludes("ChangeMachineId") {
        plan.add("reset-machine-id", None)?;
    }
    if !params.excludes("DeleteSSHKeys") && !cloud_init {
        plan.add("regenerate-ssh-host-keys", None)?;
    }
    plan.root_partition = params.root_partition();
    // Under CLOUD_INIT the keys are the seed's public-keys, as snf-image gives them.
    for key in params.auth_keys.iter().filter(|_| !cloud_init) {
        plan.add("ssh-inject", Some(&format!("root:string:{key}")))?;
    }
    if !params.excludes("EnforcePersonality") {
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
    }
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

/// `create`: deploy `img_id` onto `DISK_0_PATH` and customize it.
pub async fn create(interrupt: &Interrupt) -> Result<(), GanetiError> {
    let env = environment();
    let config = load_config()?;
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
    let work = crate::workdir::private_tempdir("ganeti").map_err(GanetiError::WorkDir)?;
    let nics = nics::nics(&env, &config.nics)?;
    let mut plan = plan(&params, &config, &name, nics, work.path())?;
    // As snf-image: the image always grows into the instance's disk.
    plan.grow_to_disk = true;
    let vm_settings = settings(&config, &params.properties);
    let (progress, monitor) = progress(&config)?;
    let request = crate::job::write::WriteRequest {
        http: Default::default(),
        confinement: settings(&config, &params.properties).confinement(),
        image: crate::source::Location::parse(&image),
        target: disk.clone(),
        // Ganeti's disk (a device, or a file for the file template) exists: written in place.
        force: true,
        size: None,
        sha256: None,
        backing_file: None,
    };
    let line = format!("imgforge: deploying {} onto {} for {name}", request.image, disk.display());
    crate::stdio::err_line(&imgforge_protocol::printable::printable(&line));
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
        job::customize_written(&written, &request, plan, &vm_settings, progress.as_ref(), interrupt).await
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

/// `rename`: set the new hostname in the image (snf-image does nothing here).
pub async fn rename(interrupt: &Interrupt) -> Result<(), GanetiError> {
    let env = environment();
    let config = load_config()?;
    let disk = PathBuf::from(require(&env, "DISK_0_PATH")?);
    let name = require(&env, "INSTANCE_NAME")?;
    if env.get("OSP_IMG_ID").is_some_and(|id| id.trim() == "null") {
        crate::stdio::err_line("imgforge: img_id=null: the disk holds no image of imgforge's, left as it is");
        return Ok(());
    }
    let (properties, warnings) = match env.get("OSP_IMG_PROPERTIES").filter(|t| !t.trim().is_empty()) {
        Some(text) => params::parse_properties(text)?,
        None => (BTreeMap::new(), Vec::new()),
    };
    warn_all(&warnings);
    if params::excluded(&properties, "AssignHostname") {
        crate::stdio::err_line("imgforge: img_properties exclude AssignHostname: the image keeps its hostname");
        return Ok(());
    }
    let mut plan = Plan::default();
    plan.add("hostname", Some(&name))?;
    Ok(job::customize(&disk, DISK_FORMAT, plan, false, &settings(&config, &properties), &Silent, interrupt).await?)
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
pub fn verify() -> Result<(), GanetiError> {
    let env = environment();
    let config = load_config()?;
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
        plan(&params, &Config::default(), "inst1", Vec::new(), work.path()).unwrap().operations
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
        let seed_of = |ops: &[Operation]| {
            ops.iter()
                .find_map(|o| match o {
                    Operation::CloudInit { seed } => Some(seed.clone()),
                    _ => None,
                })
                .expect("no cloud-init seed")
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
