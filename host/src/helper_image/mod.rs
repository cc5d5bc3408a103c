//! The helper VM's kernel and initramfs: built from Debian packages, cached by content.
//!
//! Inputs: the `linux-image-*-amd64` package (kernel + modules), host programs from Debian
//! packages (`helper-image/files.list`, with their libraries), the static `imgforge-helper`
//! and the task scripts embedded in this binary. The same inputs give byte-identical outputs;
//! the cache remembers the inputs' identity (size, mtime, inode) and rebuilds when any changed.

pub mod cpio;
pub mod kernel;
pub mod tools;

use cpio::{Archive, Entry};
use imgforge_protocol::helper_vm::{MODULE_MAP, TASKS_DIR};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Bumped whenever the way the image is assembled changes.
const RECIPE_VERSION: u32 = 2;
/// Kernel modules to load at boot.
const MODULES_LIST: &str = include_str!("../../../helper-image/modules.list");
/// Host programs to include.
const FILES_LIST: &str = include_str!("../../../helper-image/files.list");
/// The static helper, built by `build.rs`.
const HELPER_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/imgforge-helper"));
/// Digest of the helper binary and the task scripts.
const HELPER_DIGEST: &str = env!("IMGFORGE_HELPER_DIGEST");
include!(concat!(env!("OUT_DIR"), "/tasks.rs"));

/// The helper has no udev: LVM must create its device nodes itself and not wait for udev.
const LVM_CONF: &str =
    "activation {\n    udev_sync = 0\n    udev_rules = 0\n}\ndevices {\n    obtain_device_list_from_udev = 0\n}\n";

/// Why the helper image could not be built or found.
#[derive(Debug, Error)]
pub enum BuildError {
    /// File-system trouble on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error on that path.
        source: std::io::Error,
    },
    /// An external tool failed.
    #[error("{tool} failed: {reason}")]
    Tool {
        /// The command.
        tool: String,
        /// The tool's error, or what its output lacked.
        reason: String,
    },
    /// A program of files.list is not installed.
    #[error("{0} is not installed: install the Debian packages named in helper-image/files.list (the README's setup command does)")]
    MissingTool(PathBuf),
    /// A module of modules.list cannot be found.
    #[error("helper kernel modules: {0}")]
    Modules(String),
}

impl BuildError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_owned(), source }
    }
}

/// A built helper image in the cache.
#[derive(Debug, Clone)]
pub struct HelperImage {
    /// The kernel qemu boots.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// Content key (sha256 of the outputs).
    pub key: String,
    /// The kernel package it was built from.
    pub package: PathBuf,
}

/// Identity of an input file, cheap to check on every run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Fingerprint {
    path: PathBuf,
    len: u64,
    mtime_ns: i128,
    ino: u64,
}

impl Fingerprint {
    fn of(path: &Path) -> Option<Self> {
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            path: path.to_owned(),
            len: m.len(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ino: m.ino(),
        })
    }
}

/// What `current.json` records about the image in use.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    key: String,
    package: PathBuf,
    recipe_digest: String,
    helper_digest: String,
    kernel_release: String,
    inputs: Vec<Fingerprint>,
}

fn recipe_digest() -> String {
    let mut h = Sha256::new();
    h.update(RECIPE_VERSION.to_le_bytes());
    h.update(MODULES_LIST);
    h.update(FILES_LIST);
    hex::encode(h.finalize())
}

/// The recipe the helper image is built by, as `--version` names it: the recipe version and
/// the start of the digest of everything that goes into the image besides the host's programs
/// and kernel (helper binary, task scripts, lists, assembly code), the digest the cache checks.
pub fn recipe_id() -> String {
    format!("{RECIPE_VERSION} sha256:{}", &HELPER_DIGEST[..12])
}

/// The cache directory: `$IMGFORGE_CACHE_DIR`, else `/var/cache/imgforge` for root, else
/// `$XDG_CACHE_HOME/imgforge` or `~/.cache/imgforge`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("IMGFORGE_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/cache/imgforge");
    }
    match (std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME")) {
        (Some(x), _) => PathBuf::from(x).join("imgforge"),
        (None, Some(h)) => PathBuf::from(h).join(".cache/imgforge"),
        (None, None) => std::env::temp_dir().join("imgforge-cache"),
    }
}

fn images_dir(cache: &Path) -> PathBuf {
    cache.join("helper-image")
}

/// Holds an exclusive lock on the cache while building or checking.
struct CacheLock {
    _file: std::fs::File,
}

impl CacheLock {
    fn acquire(dir: &Path) -> Result<Self, BuildError> {
        std::fs::create_dir_all(dir).map_err(|e| BuildError::io(dir, e))?;
        let path = dir.join(".lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| BuildError::io(&path, e))?;
        use std::os::fd::AsRawFd;
        // SAFETY: valid fd; flock blocks until the other builder is done.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(BuildError::io(&path, std::io::Error::last_os_error()));
        }
        Ok(Self { _file: f })
    }
}

fn image_paths(cache: &Path, key: &str, package: &Path) -> HelperImage {
    let dir = images_dir(cache).join(key);
    HelperImage {
        kernel: dir.join("kernel"),
        initrd: dir.join("initrd.cpio"),
        key: key.to_owned(),
        package: package.to_owned(),
    }
}

fn current(cache: &Path) -> Option<HelperImage> {
    let text = std::fs::read_to_string(images_dir(cache).join("current.json")).ok()?;
    let manifest: Manifest = serde_json::from_str(&text).ok()?;
    if manifest.recipe_digest != recipe_digest() || manifest.helper_digest != HELPER_DIGEST {
        return None;
    }
    if manifest.inputs.iter().any(|f| Fingerprint::of(&f.path).as_ref() != Some(f)) {
        return None;
    }
    let image = image_paths(cache, &manifest.key, &manifest.package);
    (image.kernel.is_file() && image.initrd.is_file()).then_some(image)
}

/// The current helper image, built first if missing or stale.
pub fn ensure(cache: &Path) -> Result<HelperImage, BuildError> {
    if let Some(image) = current(cache) {
        return Ok(image);
    }
    let _lock = CacheLock::acquire(&images_dir(cache))?;
    // Another run may have built it while we waited for the lock.
    if let Some(image) = current(cache) {
        return Ok(image);
    }
    build_locked(cache)
}

/// Rebuilds the helper image even if the cache looks current.
pub fn rebuild(cache: &Path) -> Result<HelperImage, BuildError> {
    let _lock = CacheLock::acquire(&images_dir(cache))?;
    build_locked(cache)
}

fn build_locked(cache: &Path) -> Result<HelperImage, BuildError> {
    let started = std::time::Instant::now();
    let deb = kernel::find_or_download_deb(cache)?;
    tracing::info!(deb = %deb.display(), "building the helper image");
    let images = images_dir(cache);
    let work =
        tempfile::Builder::new().prefix(".build-").tempdir_in(&images).map_err(|e| BuildError::io(&images, e))?;
    let tree = kernel::extract(&deb, &work.path().join("kernel"))?;

    let mut inputs = vec![deb.clone()];
    let archive = assemble(&tree, &mut inputs)?;
    let initrd = archive.to_bytes();
    let vmlinuz = std::fs::read(&tree.vmlinuz).map_err(|e| BuildError::io(&tree.vmlinuz, e))?;
    let vmlinuz = kernel::vmlinux_from_bzimage(&vmlinuz).unwrap_or_else(|| {
        tracing::warn!("cannot extract an ELF vmlinux from {}: booting the bzImage (slower)", tree.vmlinuz.display());
        vmlinuz
    });

    let mut h = Sha256::new();
    h.update(&vmlinuz);
    h.update(&initrd);
    let key = hex::encode(&h.finalize()[..16]);
    let image = image_paths(cache, &key, &deb);
    let out_dir = images.join(&key);
    if !out_dir.is_dir() {
        let staging = work.path().join("out");
        std::fs::create_dir(&staging).map_err(|e| BuildError::io(&staging, e))?;
        for (name, bytes) in [("kernel", &vmlinuz), ("initrd.cpio", &initrd)] {
            let p = staging.join(name);
            std::fs::write(&p, bytes).map_err(|e| BuildError::io(&p, e))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).map_err(|e| BuildError::io(&p, e))?;
        }
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| BuildError::io(&staging, e))?;
        std::fs::rename(&staging, &out_dir).map_err(|e| BuildError::io(&out_dir, e))?;
    }
    let manifest = Manifest {
        key: key.clone(),
        package: deb.clone(),
        recipe_digest: recipe_digest(),
        helper_digest: HELPER_DIGEST.to_owned(),
        kernel_release: tree.release.clone(),
        inputs: inputs.iter().filter_map(|p| Fingerprint::of(p)).collect(),
    };
    // Older images are never used again (qemu keeps open what it already opened).
    if let Ok(entries) = std::fs::read_dir(&images) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir() && name != key && !name.starts_with('.') {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let current = images.join("current.json");
    let tmp = images.join(".current.json.new");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&manifest).expect("manifest serializes"))
        .map_err(|e| BuildError::io(&tmp, e))?;
    std::fs::rename(&tmp, &current).map_err(|e| BuildError::io(&current, e))?;
    tracing::info!(key, kernel = %tree.release, initrd_bytes = initrd.len(), secs = started.elapsed().as_secs_f32(), "helper image ready");
    Ok(image)
}

/// Lays out the initramfs; records every host file read in `inputs`.
fn assemble(tree: &kernel::KernelTree, inputs: &mut Vec<PathBuf>) -> Result<Archive, BuildError> {
    let mut a = Archive::default();
    for dir in [
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "mnt/guest",
        "mnt/payload",
        "root",
        "etc",
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
    ] {
        a.insert(dir, Entry::Dir(0o755));
    }
    a.insert("tmp", Entry::Dir(0o1777));
    // The kernel opens /dev/console for PID 1 before devtmpfs is mounted.
    a.insert("dev/console", Entry::CharDev { mode: 0o600, major: 5, minor: 1 });
    a.insert("dev/null", Entry::CharDev { mode: 0o666, major: 1, minor: 3 });
    a.insert("etc/mtab", Entry::Symlink("/proc/self/mounts".into()));
    a.insert("etc/passwd", Entry::File { mode: 0o644, data: b"root:x:0:0:root:/root:/bin/sh\n".to_vec() });
    a.insert("etc/group", Entry::File { mode: 0o644, data: b"root:x:0:\n".to_vec() });
    a.insert("etc/lvm/lvm.conf", Entry::File { mode: 0o644, data: LVM_CONF.as_bytes().to_vec() });

    let programs: Vec<PathBuf> = tools::parse_list(FILES_LIST).into_iter().map(PathBuf::from).collect();
    if let Some(busybox) = programs.iter().find(|p| p.file_name().is_some_and(|n| n == "busybox")) {
        let list = duct::cmd!(busybox, "--list-full").read().map_err(|e| BuildError::Tool {
            tool: format!("{} --list-full", busybox.display()),
            reason: e.to_string(),
        })?;
        let mut applets: Vec<&str> = list.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        applets.sort();
        for applet in applets {
            a.insert(applet, Entry::Symlink(busybox.display().to_string()));
        }
    }
    for file in tools::closure(&programs)? {
        let data = std::fs::read(&file).map_err(|e| BuildError::io(&file, e))?;
        let mode = std::fs::metadata(&file).map_err(|e| BuildError::io(&file, e))?.permissions().mode() & 0o777;
        a.insert(&file.display().to_string(), Entry::File { mode, data });
        inputs.push(file);
    }

    a.insert("init", Entry::File { mode: 0o755, data: HELPER_BINARY.to_vec() });
    a.insert("usr/bin/imgforge-helper", Entry::Symlink("/init".into()));
    for (name, mode, data) in TASKS {
        a.insert(&format!("{TASKS_DIR}/{name}"), Entry::File { mode: *mode, data: data.to_vec() });
    }

    add_modules(&mut a, tree)?;
    Ok(a)
}

/// The kernel modules of `modules.list` with their dependencies (signatures stripped, tracing
/// sections hidden) and the map the helper loads them by.
fn add_modules(a: &mut Archive, tree: &kernel::KernelTree) -> Result<(), BuildError> {
    let read = |p: PathBuf| std::fs::read_to_string(&p).map_err(|e| BuildError::io(&p, e));
    let dep = read(tree.modules_dir.join("modules.dep"))?;
    let builtin = read(tree.modules_dir.join("modules.builtin"))?;
    let mut map = String::new();
    for line in tools::parse_list(MODULES_LIST) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let name = words[0];
        let boot = words.contains(&"boot");
        let mut wanted: Vec<&str> = words.iter().filter_map(|w| w.strip_prefix('+')).collect();
        wanted.push(name);
        let order = kernel::load_order(&dep, &builtin, &wanted).map_err(BuildError::Modules)?;
        let mut paths = Vec::new();
        for rel in &order {
            let dest = format!("lib/modules/{}/{rel}", tree.release);
            if !a.contains(&dest) {
                let src = tree.modules_dir.join(rel);
                let data = std::fs::read(&src).map_err(|e| BuildError::io(&src, e))?;
                let mut data = kernel::strip_module_signature(&data).to_vec();
                kernel::hide_module_sections(&mut data);
                a.insert(&dest, Entry::File { mode: 0o644, data });
            }
            paths.push(format!("/{dest}"));
        }
        map.push_str(&format!("{name}{} {}\n", if boot { " boot" } else { "" }, paths.join(" ")));
    }
    a.insert(MODULE_MAP, Entry::File { mode: 0o644, data: map.into_bytes() });
    Ok(())
}
