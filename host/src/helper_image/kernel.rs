//! The helper kernel and its modules, taken from Debian's `linux-image-*-amd64` package.

use super::BuildError;
use imgforge_protocol::bytes::{le16, le32, le64};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// The kernel tree extracted from the package.
pub struct KernelTree {
    /// Kernel release (`6.1.0-56-amd64`).
    pub release: String,
    /// The compressed kernel (bzImage).
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` in the extracted tree.
    pub modules_dir: PathBuf,
}

/// Digest of this file, which chooses and downloads the kernel package (see build.rs).
const CODE_DIGEST: &str = env!("IMGFORGE_KERNEL_CODE_DIGEST");

/// Where downloaded kernel packages are kept under `cache`: keyed on the code that chose them.
pub fn debs_dir(cache: &Path) -> PathBuf {
    cache.join("debs").join(CODE_DIGEST)
}

/// Finds or downloads the kernel package into [`debs_dir`] (`$IMGFORGE_KERNEL_DEB` if set).
pub fn find_or_download_deb(cache: &Path) -> Result<PathBuf, BuildError> {
    if let Some(path) = std::env::var_os("IMGFORGE_KERNEL_DEB") {
        return Ok(PathBuf::from(path));
    }
    let debs_dir = &debs_dir(cache);
    remove_other_package_dirs(debs_dir);
    if let Some(deb) = newest_deb(debs_dir)? {
        return Ok(deb);
    }
    std::fs::create_dir_all(debs_dir).map_err(|e| BuildError::io(debs_dir, e))?;
    let depends = duct::cmd!("apt-cache", "depends", "--important", "linux-image-amd64")
        .stderr_capture()
        .read()
        .map_err(|e| BuildError::Tool { tool: "apt-cache depends linux-image-amd64".into(), reason: e.to_string() })?;
    let package = parse_kernel_dependency(&depends).ok_or_else(|| BuildError::Tool {
        tool: "apt-cache depends linux-image-amd64".into(),
        reason: "no linux-image-*-amd64 dependency found; run `apt-get update` first".into(),
    })?;
    tracing::info!(%package, "downloading the helper kernel package");
    duct::cmd!("apt-get", "download", "-q", &package)
        .dir(debs_dir)
        .stdout_null()
        .stderr_capture()
        .run()
        .map_err(|e| BuildError::Tool { tool: format!("apt-get download {package}"), reason: e.to_string() })?;
    newest_deb(debs_dir)?.ok_or_else(|| BuildError::Tool {
        tool: format!("apt-get download {package}"),
        reason: "no package file appeared".into(),
    })
}

/// How long a package chosen by other code is kept: another imgforge version sharing the
/// cache (an upgrade while a job runs) may still be reading it.
const OTHER_PACKAGES_KEPT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Packages chosen by other code (and loose ones from before packages were keyed) are not
/// used again: they go once they are [`OTHER_PACKAGES_KEPT`] old. Only what imgforge puts
/// there goes: directories named like a code digest and `.deb` files, never through a
/// symlinked `debs` directory (which may point at a shared one).
fn remove_other_package_dirs(keep: &Path) {
    let Some(parent) = keep.parent() else { return };
    if !std::fs::symlink_metadata(parent).is_ok_and(|m| m.is_dir()) {
        return;
    }
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let (path, name) = (e.path(), e.file_name());
        let Ok(kind) = e.file_type() else { continue };
        let name = name.to_string_lossy();
        let digest_named = name.len() == CODE_DIGEST.len() && name.bytes().all(|b| b.is_ascii_hexdigit());
        let recent = e
            .metadata()
            .and_then(|m| m.modified())
            .map_or(true, |t| t.elapsed().map_or(true, |age| age < OTHER_PACKAGES_KEPT));
        if path == keep || recent {
            continue;
        }
        let _ = if kind.is_dir() && digest_named {
            std::fs::remove_dir_all(&path)
        } else if (kind.is_file() && name.ends_with(".deb")) || (kind.is_symlink() && digest_named) {
            std::fs::remove_file(&path)
        } else {
            Ok(())
        };
    }
}

fn newest_deb(dir: &Path) -> Result<Option<PathBuf>, BuildError> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(None) };
    let mut debs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("linux-image-") && n.ends_with("_amd64.deb"))
        })
        .collect();
    debs.sort();
    Ok(debs.pop())
}

/// `Depends: linux-image-6.1.0-56-amd64` → that package name.
pub fn parse_kernel_dependency(apt_cache_output: &str) -> Option<String> {
    apt_cache_output.lines().find_map(|l| {
        let name = l.trim().strip_prefix("Depends:")?.trim();
        (name.starts_with("linux-image-") && !name.contains(' ')).then(|| name.to_owned())
    })
}

/// Extracts the kernel and its modules from `deb` into `into`, and runs depmod there.
pub fn extract(deb: &Path, into: &Path) -> Result<KernelTree, BuildError> {
    std::fs::create_dir_all(into).map_err(|e| BuildError::io(into, e))?;
    duct::cmd!("dpkg-deb", "--fsys-tarfile", deb)
        .pipe(duct::cmd!("tar", "-x", "-C", into, "./boot", "./lib/modules"))
        .stderr_capture()
        .run()
        .map_err(|e| BuildError::Tool {
            tool: format!("dpkg-deb --fsys-tarfile {}", deb.display()),
            reason: e.to_string(),
        })?;
    let modules_root = into.join("lib/modules");
    let release = std::fs::read_dir(&modules_root)
        .map_err(|e| BuildError::io(&modules_root, e))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .ok_or_else(|| BuildError::Tool {
            tool: deb.display().to_string(),
            reason: "the package holds no lib/modules/<release>".into(),
        })?;
    let vmlinuz = into.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        return Err(BuildError::Tool {
            tool: deb.display().to_string(),
            reason: format!("the package holds no boot/vmlinuz-{release}"),
        });
    }
    duct::cmd!("depmod", "-b", into, &release)
        .stderr_capture()
        .run()
        .map_err(|e| BuildError::Tool { tool: "depmod".into(), reason: e.to_string() })?;
    Ok(KernelTree { modules_dir: modules_root.join(&release), release, vmlinuz })
}

/// xz stream magic, where a bzImage's compressed payload starts (Debian builds with
/// CONFIG_KERNEL_XZ).
const XZ_MAGIC: &[u8] = b"\xfd7zXZ\x00";
const ELF_MAGIC: &[u8] = b"\x7fELF";

/// Extracts the uncompressed ELF `vmlinux` from a bzImage. qemu boots an ELF kernel through
/// its PVH entry point directly: no firmware real-mode setup, no in-guest decompression
/// (about 3 s less per helper boot under TCG). `None` if the payload is not xz or not ELF.
pub fn vmlinux_from_bzimage(bzimage: &[u8]) -> Option<Vec<u8>> {
    let start = bzimage.windows(XZ_MAGIC.len()).position(|w| w == XZ_MAGIC)?;
    // --single-stream: the bzImage carries trailing data after the xz stream.
    let elf = duct::cmd!("xz", "--decompress", "--stdout", "--single-stream")
        .stdin_bytes(bzimage[start..].to_vec())
        .stdout_capture()
        .stderr_null()
        .run()
        .ok()?
        .stdout;
    elf.starts_with(ELF_MAGIC).then_some(elf)
}

/// What a signed module ends with.
const MODULE_SIG_MAGIC: &[u8] = b"~Module signature appended~\n";
/// `struct module_signature`: 12 bytes before the magic, the signature's length last (BE).
const MODULE_SIG_INFO_BYTES: usize = 12;

/// Removes the appended signature of a kernel module. The helper kernel does not enforce
/// signatures, and verifying them (hashing megabytes under TCG) was most of the cost of
/// loading xfs or ext4. Unsigned input is returned unchanged.
pub fn strip_module_signature(module: &[u8]) -> &[u8] {
    let Some(body) = module.strip_suffix(MODULE_SIG_MAGIC) else { return module };
    if body.len() < MODULE_SIG_INFO_BYTES {
        return module;
    }
    let info = &body[body.len() - MODULE_SIG_INFO_BYTES..];
    let sig_len = u32::from_be_bytes(info[8..12].try_into().expect("4 bytes")) as usize;
    body.len().checked_sub(MODULE_SIG_INFO_BYTES + sig_len).map(|end| &module[..end]).unwrap_or(module)
}

/// Module sections the helper hides from the kernel's loader (renamed: `.BTF` becomes `_BTF`).
/// Each serves only tracing or debugging, which the helper never does, and each costs a share
/// of loading a module under TCG, most of it patching code one site at a time. Measured in the
/// helper for xfs.ko, loaded alone: 433 ms with all of them (BTF already hidden), 70 ms without.
/// - `.BTF`: BPF type information, parsed and validated type by type on every load;
/// - `_ftrace_events`, `_ftrace_eval_map`, `__tracepoints_ptrs`, `__bpf_raw_tp_map`: the trace
///   events and tracepoints, each event registered with a directory of control files in
///   tracefs (xfs has 579: 90 ms). The tracepoints stay compiled in and disabled; nothing can
///   enable them without their registration;
/// - `__mcount_loc`: the function entries ftrace patches into no-ops one by one (xfs has 2647:
///   200 ms). Each entry keeps its call of `__fentry__`, which is a bare return;
/// - `.static_call_sites`: the call sites patched to call their static call's target directly
///   (1308 in xfs, each a breakpoint-guarded text poke: about 80 ms with the next one). An
///   unpatched site calls the static call's trampoline, which the kernel keeps up to date;
/// - `.smp_locks`: the `lock` prefixes patched out when one CPU runs. They stay, and stay
///   correct;
/// - `.orc_unwind_ip`: the ORC unwind table's index, which the loader sorts (30263 entries in
///   xfs: 22 ms, 8 ms for ext4). Only stack traces use it: a kernel oops inside these modules
///   then shows their frames as guesses (`?`), still by name. A trade made for the helper, a
///   throwaway VM that reports failures by message.
///
/// Kept: everything that makes code correct (alternatives, jump labels, the bug table that
/// turns a WARN into a warning rather than an oops, return thunks).
pub const HIDDEN_MODULE_SECTIONS: &[&str] = &[
    ".BTF",
    "_ftrace_events",
    "_ftrace_eval_map",
    "__tracepoints_ptrs",
    "__bpf_raw_tp_map",
    "__mcount_loc",
    ".static_call_sites",
    ".smp_locks",
    ".orc_unwind_ip",
];

/// Hides the sections of `HIDDEN_MODULE_SECTIONS` in a module by renaming them in place (first
/// byte `_`, or `.` for names that start with `_`); the code and data stay where they were.
/// Returns how many sections were renamed; anything but a well-formed 64-bit little-endian ELF
/// file is left alone.
pub fn hide_module_sections(module: &mut [u8]) -> usize {
    let u16_at = |b: &[u8], o: usize| le16(b, o).map(usize::from);
    let u32_at = |b: &[u8], o: usize| le32(b, o).and_then(|v| usize::try_from(v).ok());
    let u64_at = |b: &[u8], o: usize| le64(b, o).and_then(|v| usize::try_from(v).ok());
    // ELFCLASS64, ELFDATA2LSB.
    if !module.starts_with(ELF_MAGIC) || module.get(4..6) != Some(&[2, 1]) {
        return 0;
    }
    let (Some(shoff), Some(shentsize), Some(shnum), Some(shstrndx)) =
        (u64_at(module, 0x28), u16_at(module, 0x3a), u16_at(module, 0x3c), u16_at(module, 0x3e))
    else {
        return 0;
    };
    let header = |i: usize| shoff.checked_add(i.checked_mul(shentsize)?);
    let Some(strtab) = header(shstrndx).and_then(|h| u64_at(module, h + 0x18)) else { return 0 };
    let mut renamed = 0;
    for i in 0..shnum {
        let Some(name_at) = header(i).and_then(|h| u32_at(module, h)).and_then(|n| strtab.checked_add(n)) else {
            return renamed;
        };
        for hidden in HIDDEN_MODULE_SECTIONS {
            let end = name_at + hidden.len();
            if module.get(name_at..end) == Some(hidden.as_bytes()) && module.get(end) == Some(&0) {
                module[name_at] = if module[name_at] == b'_' { b'.' } else { b'_' };
                renamed += 1;
            }
        }
    }
    renamed
}

fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    normalize(file.split(".ko").next().unwrap_or(file))
}

/// Orders the wanted modules and their dependencies so each comes after what it needs.
/// Modules built into the kernel are skipped; an unknown module is an error.
pub fn load_order(modules_dep: &str, modules_builtin: &str, wanted: &[&str]) -> Result<Vec<String>, String> {
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in modules_dep.lines() {
        let Some((path, rest)) = line.split_once(':') else { continue };
        deps.insert(module_name(path), (path.to_owned(), rest.split_whitespace().map(String::from).collect()));
    }
    let builtin: BTreeSet<String> = modules_builtin.lines().map(module_name).collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        name: &str,
        deps: &HashMap<String, (String, Vec<String>)>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(name.to_owned()) {
            return;
        }
        let Some((path, needs)) = deps.get(name) else { return };
        // modules.dep lists dependencies so that the last is loaded first.
        for dep in needs.iter().rev() {
            visit(&module_name(dep), deps, seen, order);
        }
        order.push(path.clone());
    }
    for want in wanted {
        let name = normalize(want);
        if builtin.contains(&name) {
            continue;
        }
        if !deps.contains_key(&name) {
            return Err(format!("kernel module {want} is neither in modules.dep nor built in"));
        }
        visit(&name, &deps, &mut seen, &mut order);
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_packages_go_and_nothing_else() {
        let cache = tempfile::tempdir().unwrap();
        let debs = cache.path().join("debs");
        let keep = debs_dir(cache.path());
        std::fs::create_dir_all(&keep).unwrap();
        std::fs::write(keep.join("linux-image-1_amd64.deb"), "current").unwrap();
        let stale = debs.join("0123456789abcdef");
        std::fs::create_dir_all(&stale).unwrap();
        std::fs::write(stale.join("linux-image-0_amd64.deb"), "old").unwrap();
        std::fs::write(debs.join("linux-image-loose_amd64.deb"), "loose").unwrap();
        std::fs::write(debs.join("notes.txt"), "an admin's").unwrap();
        // Another version's package, just downloaded: it may be being read right now.
        let fresh = debs.join("fedcba9876543210");
        std::fs::create_dir_all(&fresh).unwrap();
        let long_ago = std::time::SystemTime::now() - OTHER_PACKAGES_KEPT - std::time::Duration::from_secs(60);
        for old in [&stale, &debs.join("linux-image-loose_amd64.deb")] {
            std::fs::File::open(old).unwrap().set_modified(long_ago).unwrap();
        }
        remove_other_package_dirs(&keep);
        assert!(keep.join("linux-image-1_amd64.deb").exists());
        assert!(!stale.exists() && !debs.join("linux-image-loose_amd64.deb").exists());
        assert!(debs.join("notes.txt").exists() && fresh.exists());

        // `debs` a link to a shared directory: nothing in it is touched.
        let shared = tempfile::tempdir().unwrap();
        std::fs::write(shared.path().join("precious.deb"), "shared").unwrap();
        std::fs::create_dir(shared.path().join("fedcba9876543210")).unwrap();
        std::fs::File::open(shared.path().join("fedcba9876543210")).unwrap().set_modified(long_ago).unwrap();
        let linked = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(shared.path(), linked.path().join("debs")).unwrap();
        remove_other_package_dirs(&debs_dir(linked.path()));
        assert!(shared.path().join("precious.deb").exists());
        assert!(shared.path().join("fedcba9876543210").exists());
    }

    const DEP: &str = "kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko\n\
kernel/lib/crc16.ko:\n\
kernel/fs/mbcache.ko:\n\
kernel/fs/jbd2/jbd2.ko:\n\
kernel/arch/x86/crypto/crc32c-intel.ko:\n\
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n\
kernel/drivers/virtio/virtio_ring.ko:\n\
kernel/drivers/virtio/virtio.ko:\n";

    #[test]
    fn dependencies_first_each_once() {
        let order = load_order(
            DEP,
            "kernel/drivers/tty/serial/8250.ko\n",
            &["ext4", "virtio_blk", "crc32c-intel", "jbd2", "8250"],
        )
        .unwrap();
        assert_eq!(
            order,
            [
                "kernel/fs/jbd2/jbd2.ko",
                "kernel/fs/mbcache.ko",
                "kernel/lib/crc16.ko",
                "kernel/fs/ext4/ext4.ko",
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/block/virtio_blk.ko",
                "kernel/arch/x86/crypto/crc32c-intel.ko",
            ]
        );
    }

    #[test]
    fn signatures_are_stripped() {
        let mut signed = b"ELFBODY".to_vec();
        signed.extend_from_slice(b"SIG!");
        signed.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4]);
        signed.extend_from_slice(MODULE_SIG_MAGIC);
        assert_eq!(strip_module_signature(&signed), b"ELFBODY");
        assert_eq!(strip_module_signature(b"ELFBODY"), b"ELFBODY");
        let mut bogus = b"x".to_vec();
        bogus.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        bogus.extend_from_slice(MODULE_SIG_MAGIC);
        assert_eq!(strip_module_signature(&bogus), &bogus[..]);
    }

    #[test]
    fn tracing_sections_are_hidden() {
        // An ELF header and a three-entry section table: ".BTF", "_ftrace_events", then the names.
        let built = || {
            let mut m = vec![0u8; 0x200];
            m[..4].copy_from_slice(ELF_MAGIC);
            m[4..6].copy_from_slice(&[2, 1]);
            m[0x28..0x30].copy_from_slice(&0x100u64.to_le_bytes());
            m[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
            m[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
            m[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
            // Section 0 named at 1 (".BTF"), section 1 at 6 ("_ftrace_events"), section 2 the
            // names at 0x40.
            m[0x100..0x104].copy_from_slice(&1u32.to_le_bytes());
            m[0x140..0x144].copy_from_slice(&6u32.to_le_bytes());
            m[0x180 + 0x18..0x180 + 0x20].copy_from_slice(&0x40u64.to_le_bytes());
            m[0x41..0x46].copy_from_slice(b".BTF\0");
            m[0x46..0x55].copy_from_slice(b"_ftrace_events\0");
            m
        };
        let mut m = built();
        assert_eq!(hide_module_sections(&mut m), 2);
        assert_eq!(&m[0x41..0x46], b"_BTF\0");
        assert_eq!(&m[0x46..0x55], b".ftrace_events\0");
        assert_eq!(hide_module_sections(&mut m), 0, "only once");
        let mut prefix_only = built();
        prefix_only[0x45] = b'X'; // ".BTFX_ftrace_events": neither name is whole any more
        assert_eq!(hide_module_sections(&mut prefix_only), 1);
        let mut truncated = built()[..0x190].to_vec();
        assert_eq!(hide_module_sections(&mut truncated), 0);
        let mut not_elf = b"not an ELF file at all".to_vec();
        assert_eq!(hide_module_sections(&mut not_elf), 0);
    }

    #[test]
    fn unknown_module_is_an_error() {
        assert!(load_order(DEP, "", &["nosuch"]).unwrap_err().contains("nosuch"));
    }

    #[test]
    fn apt_cache_depends() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(parse_kernel_dependency(out).as_deref(), Some("linux-image-6.1.0-56-amd64"));
        assert_eq!(parse_kernel_dependency("linux-image-amd64\n"), None);
    }
}
