//! Reading results back without imgforge: partition tables with sfdisk, files through a
//! read-only loop mount made by the test.

use crate::fixtures::sh;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A partition of an image, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Partition {
    /// Offset from the start of the image.
    pub offset: u64,
    /// Length.
    pub size: u64,
}

/// The partitions of `image`, in table order (sfdisk --json).
pub fn partitions(image: &Path) -> Result<Vec<Partition>> {
    let json: serde_json::Value = serde_json::from_str(&sh(Command::new("sfdisk").arg("--json").arg(image))?)?;
    let table = &json["partitiontable"];
    let sector = table["sectorsize"].as_u64().unwrap_or(512);
    let parts = table["partitions"].as_array().context("no partitions in sfdisk output")?;
    Ok(parts
        .iter()
        .map(|p| Partition {
            offset: p["start"].as_u64().unwrap_or(0) * sector,
            size: p["size"].as_u64().unwrap_or(0) * sector,
        })
        .collect())
}

/// A read-only loop mount of one partition, unmounted on drop.
pub struct Mount {
    dir: tempfile::TempDir,
}

impl Mount {
    /// Mounts partition `index` (0-based) of `image` read-only, never replaying a journal.
    pub fn partition(image: &Path, index: usize) -> Result<Self> {
        let part =
            *partitions(image)?.get(index).with_context(|| format!("{} has no partition {index}", image.display()))?;
        Self::at(image, part.offset, part.size)
    }

    /// Mounts partition `index` (0-based) of `image` read-write: for tests that craft a hostile
    /// guest from a fixture copy (unmounted, hence written back, on drop).
    pub fn writable_partition(image: &Path, index: usize) -> Result<Self> {
        let part =
            *partitions(image)?.get(index).with_context(|| format!("{} has no partition {index}", image.display()))?;
        Self::loop_mount(image, part, "rw")
    }

    /// Mounts the filesystem at `offset` (of `size` bytes) in `image` read-only.
    pub fn at(image: &Path, offset: u64, size: u64) -> Result<Self> {
        Self::loop_mount(image, Partition { offset, size }, "ro")
    }

    /// Mounts the btrfs subvolume `subvol` of partition `index` (0-based) of `image`
    /// read-only, never replaying its log.
    pub fn btrfs_subvolume(image: &Path, index: usize, subvol: &str) -> Result<Self> {
        let part =
            *partitions(image)?.get(index).with_context(|| format!("{} has no partition {index}", image.display()))?;
        Self::loop_mount(image, part, &format!("ro,rescue=nologreplay,subvol={subvol}"))
    }

    fn loop_mount(image: &Path, part: Partition, mode: &str) -> Result<Self> {
        let offset = part.offset;
        let fstype = sh(Command::new("blkid")
            .args(["-p", "-o", "value", "-s", "TYPE", "-O", &part.offset.to_string()])
            .arg(image))?;
        let extra = match (mode, fstype.trim()) {
            ("rw", _) | (_, "btrfs") => "",
            (_, "xfs") => ",norecovery",
            (_, "ext4" | "ext3") => ",noload",
            _ => "",
        };
        let dir = tempfile::tempdir()?;
        sh(Command::new("mount")
            .args(["-o", &format!("{mode},loop,offset={},sizelimit={}{extra}", part.offset, part.size)])
            .arg(image)
            .arg(dir.path()))
        .with_context(|| format!("loop-mounting the filesystem at byte {offset} of {}", image.display()))?;
        Ok(Self { dir })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A guest path under the mount point.
    pub fn join(&self, guest_path: &str) -> PathBuf {
        self.dir.path().join(guest_path.trim_start_matches('/'))
    }

    /// Reads a guest file as text.
    pub fn read(&self, guest_path: &str) -> Result<String> {
        std::fs::read_to_string(self.join(guest_path)).with_context(|| format!("reading {guest_path} from the image"))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// The second field of `user`'s line in shadow text.
pub fn shadow_field(shadow: &str, user: &str) -> Result<String> {
    for line in shadow.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 1 && f[0] == user {
            return Ok(f[1].to_owned());
        }
    }
    bail!("no shadow entry for {user}")
}

/// Checks that `field` (an `/etc/shadow` password field) is `password` hashed as imgforge writes
/// it, the layout of glibc's crypt(3): `$6$<16-char salt>$<86-char hash>`, no `rounds=` for
/// the default rounds. Verified with sha-crypt.
pub fn check_sha512_crypt(password: &str, field: &str) -> Result<()> {
    use sha_crypt::PasswordVerifier;
    let parts: Vec<&str> = field.split('$').collect();
    let crypt_char = |c: char| c.is_ascii_alphanumeric() || c == '.' || c == '/';
    let layout = parts.len() == 4
        && parts[0].is_empty()
        && parts[1] == "6"
        && parts[2].len() == 16
        && parts[3].len() == 86
        && parts[2].chars().chain(parts[3].chars()).all(crypt_char);
    if !layout {
        bail!("{field:?} is not $6$<16-char salt>$<86-char hash>");
    }
    sha_crypt::ShaCrypt::default()
        .verify_password(password.as_bytes(), field)
        .map_err(|e| anyhow::anyhow!("the password does not verify against {field:?}: {e}"))
}

/// True if `password` matches the crypt(3) `hash` (any method the host's libcrypt knows:
/// SHA-512, SHA-256, yescrypt, ...), checked with Python's crypt module.
pub fn password_matches(password: &str, hash: &str) -> bool {
    let check = format!("import crypt,sys; sys.exit(0 if crypt.crypt({password:?}, {hash:?}) == {hash:?} else 1)");
    Command::new("python3").args(["-W", "ignore", "-c", &check]).status().is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// glibc's crypt(3) of `hunter2` with the salt `saltsaltsaltsalt` (Python's `crypt.crypt`).
    const GLIBC: &str =
        "$6$saltsaltsaltsalt$dJX0KuyM7nCXuBPN.nYtdrJDotQEB1rFBumzix6FHzliKxLBinGY49pMJNvCoNf9fHmNyZ1IgX/glbcKhuXoh.";

    #[test]
    fn sha512_crypt_layout_and_password() {
        check_sha512_crypt("hunter2", GLIBC).unwrap();
        assert!(check_sha512_crypt("hunter3", GLIBC).is_err());
        // The same hash with the default rounds spelled out, and SHA-256, are not our layout.
        let rounds = GLIBC.replacen("$6$", "$6$rounds=5000$", 1);
        assert!(check_sha512_crypt("hunter2", &rounds).is_err());
        assert!(
            check_sha512_crypt("hunter2", "$5$saltsaltsaltsalt$LTm0e1epoLCOhH8WjaKAzYHFbzuOTFXssEJnxJiG5YC").is_err()
        );
    }
}
