//! The 45-RandomSeed task: a fresh random seed in the guest on every customization, as
//! virt-customize writes one, so that clones of one image do not start from the image's seed
//! (systemd credits a seed file it finds to the kernel's pool at boot).
//!
//! The bytes come from this helper VM's own `getrandom`, which blocks until the kernel's CRNG
//! is initialized (seeded from the CPU's RDRAND — `random.trust_cpu=on` on the helper's
//! command line, emulated by qemu's TCG from the host's getrandom — and jitter entropy). They
//! are not carried from the host in the rules: that document lies in a file on the host for
//! the whole run, and random bytes meant to be secret should exist in one place only.

use crate::guest::GuestRoot;
use crate::task_env::TaskEnv;
use std::path::Path;

/// Seed files written when present as regular files, whatever the guest's distribution
/// (systemd's, Debian's initscripts', Fedora's, SUSE's and CirrOS's places).
const KNOWN_SEEDS: [&str; 5] = [
    "/var/lib/systemd/random-seed",
    "/var/lib/urandom/random-seed",
    "/var/lib/random-seed",
    "/var/lib/misc/random-seed",
    "/etc/random-seed",
];

/// Seed files created when missing, if their directory exists (systemd's, and Debian's
/// pre-systemd `urandom` script's).
const CREATED_SEEDS: [&str; 2] = ["/var/lib/systemd/random-seed", "/var/lib/urandom/random-seed"];

/// Bytes in a new seed file: systemd's and virt-customize's size.
const NEW_SEED_BYTES: usize = 512;

/// How many bytes replace an existing seed of `len` bytes: its size, but at least a new
/// file's and at most 8 KiB (a seed can be 8 bytes early in an install; a huge one is not a
/// seed).
pub fn seed_size(len: u64) -> usize {
    len.clamp(NEW_SEED_BYTES as u64, 8192) as usize
}

/// The task: writes every seed file [`KNOWN_SEEDS`] and [`CREATED_SEEDS`] name; says so when
/// the guest has no place for one.
pub fn run(env: &TaskEnv) -> Result<(), String> {
    let target = env.require("IMGFORGE_TARGET")?;
    let guest = GuestRoot::open(Path::new(target)).map_err(|e| format!("cannot open the guest root {target}: {e}"))?;
    let written = set_random_seed(&guest)?;
    if written.is_empty() {
        println!("WARNING: the guest has no random seed file nor a directory for one: none written");
    }
    for path in written {
        println!("random seed written to {path}");
    }
    Ok(())
}

/// Writes the seeds; returns the paths written.
fn set_random_seed(guest: &GuestRoot) -> Result<Vec<&'static str>, String> {
    let mut written = Vec::new();
    for path in KNOWN_SEEDS {
        let fail = |what: &str, e: std::io::Error| format!("cannot {what} {path}: {e}");
        let entry = guest.lstat(path).map_err(|e| fail("look at", e))?;
        let size = match &entry {
            Some(st) if crate::copy::kind(st) == libc::S_IFREG => seed_size(st.st_size as u64),
            // A symlink, FIFO or device there is the guest's choice: never written through.
            Some(_) => continue,
            None if CREATED_SEEDS.contains(&path) && dir_of(guest, path) => NEW_SEED_BYTES,
            None => continue,
        };
        let mut seed = vec![0u8; size];
        crate::guest::fill_random(&mut seed).map_err(|e| format!("cannot read random bytes: {e}"))?;
        if entry.is_some() {
            guest.replace(path, &seed).map_err(|e| fail("write", e))?;
        } else {
            guest.create_new(path, 0o600, &seed).map_err(|e| fail("create", e))?;
        }
        written.push(path);
    }
    Ok(written)
}

/// Whether the directory `path` would be created in exists (in-root symlinks followed).
fn dir_of(guest: &GuestRoot, path: &str) -> bool {
    Path::new(path).parent().and_then(Path::to_str).is_some_and(|dir| guest.is_dir(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn sizes_as_virt_customize() {
        for (len, want) in [(0, 512), (8, 512), (512, 512), (600, 600), (8192, 8192), (1 << 40, 8192)] {
            assert_eq!(seed_size(len), want, "{len}");
        }
    }

    #[test]
    fn seeds_created_where_their_directory_is_and_replaced_where_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("var/lib/systemd")).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/random-seed"), [7u8; 16]).unwrap();
        std::fs::set_permissions(root.join("etc/random-seed"), PermissionsExt::from_mode(0o640)).unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("victim"), "keep").unwrap();
        std::fs::create_dir_all(root.join("var/lib/misc")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("victim"), root.join("var/lib/misc/random-seed")).unwrap();
        let g = GuestRoot::open(root).unwrap();

        let written = set_random_seed(&g).unwrap();
        assert_eq!(written, ["/var/lib/systemd/random-seed", "/etc/random-seed"]);
        let first = std::fs::read(root.join("var/lib/systemd/random-seed")).unwrap();
        let meta = std::fs::metadata(root.join("var/lib/systemd/random-seed")).unwrap();
        assert_eq!((first.len(), meta.mode() & 0o7777), (512, 0o600));
        let etc = std::fs::metadata(root.join("etc/random-seed")).unwrap();
        assert_eq!((etc.len(), etc.mode() & 0o7777), (512, 0o640), "an existing seed keeps its mode");
        assert_eq!(std::fs::read_to_string(outside.path().join("victim")).unwrap(), "keep");
        assert!(!root.join("var/lib/urandom").exists(), "no directory is made");

        set_random_seed(&g).unwrap();
        assert_ne!(std::fs::read(root.join("var/lib/systemd/random-seed")).unwrap(), first, "fresh bytes each run");
    }
}
