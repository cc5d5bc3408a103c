//! What makes one installed guest distinct from another made from the same image: its machine
//! id and its SSH host keys (`--reset-machine-id`, `--regenerate-ssh-host-keys`; snf-image's
//! ChangeMachineId and DeleteSSHKeys).
//!
//! The machine id gets a fresh random value on the disk rather than being emptied for systemd
//! to fill at boot (virt-sysprep's way): whoever reads two instances' disks — an operator, a
//! backup, a licence server — must see two ids, and a guest without systemd never fills it.

use crate::confinement::GuestCommand;
use crate::guest::GuestRoot;

/// systemd's machine id.
const MACHINE_ID: &str = "/etc/machine-id";
/// D-Bus's copy of it (often a symlink to [`MACHINE_ID`], then left alone).
const DBUS_MACHINE_ID: &str = "/var/lib/dbus/machine-id";
/// Where OpenSSH keeps its host keys, under names starting with [`HOST_KEY_PREFIX`].
const SSH_DIR: &str = "/etc/ssh";
const HOST_KEY_PREFIX: &str = "ssh_host_";
/// The guest programs that make host keys useful and new ones possible.
const SSHD: [&str; 2] = ["/usr/sbin/sshd", "/usr/bin/sshd"];
const SSH_KEYGEN: [&str; 2] = ["/usr/bin/ssh-keygen", "/bin/ssh-keygen"];

/// A machine id as systemd writes one: 128 random bits as a version 4 UUID (version and
/// variant bits set), 32 lowercase hex digits and a newline.
pub fn machine_id_text(mut bytes: [u8; 16]) -> String {
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let mut text = imgforge_protocol::bytes::hex(&bytes);
    text.push('\n');
    text
}

/// sshd's configuration, and the directory of files its Debian and Fedora versions include.
const SSHD_CONFIG: &str = "/etc/ssh/sshd_config";
const SSHD_CONFIG_DIR: &str = "/etc/ssh/sshd_config.d";

/// The host keys an sshd configuration names at other places than the default
/// `/etc/ssh/ssh_host_*` (`HostKey PATH`, keyword in any case, `=` allowed): absolute paths
/// without `%` tokens, in order, once each.
pub fn extra_host_keys(config: &str) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for line in config.lines().map(str::trim) {
        let Some((keyword, rest)) = line.split_once(|c: char| c.is_whitespace() || c == '=') else { continue };
        if !keyword.eq_ignore_ascii_case("hostkey") {
            continue;
        }
        let value = rest.trim_start_matches(|c: char| c.is_whitespace() || c == '=').trim();
        let value = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value);
        let default = value.starts_with(&format!("{SSH_DIR}/{HOST_KEY_PREFIX}"));
        if value.starts_with('/') && !value.contains('%') && !default && !keys.iter().any(|k| k == value) {
            keys.push(value.to_owned());
        }
    }
    keys
}

/// The `ssh-keygen -t` type of a host key, from its public half's first word, else its name.
pub fn key_type(public: Option<&str>, path: &str) -> Option<&'static str> {
    let word = public.and_then(|p| p.split_whitespace().next()).unwrap_or_default();
    match word {
        "ssh-rsa" => return Some("rsa"),
        "ssh-ed25519" => return Some("ed25519"),
        w if w.starts_with("ecdsa-sha2-") => return Some("ecdsa"),
        _ => {}
    }
    let name = path.rsplit('/').next().unwrap_or(path);
    ["ed25519", "ecdsa", "rsa"].into_iter().find(|t| name.contains(t))
}

/// Whether the entry of a stat is a regular file.
fn is_regular(st: &libc::stat) -> bool {
    crate::copy::kind(st) == libc::S_IFREG
}

/// `--reset-machine-id`: a fresh id in `/etc/machine-id` and, when it is a regular file, in
/// `/var/lib/dbus/machine-id` (the same id, as D-Bus expects). Only regular files are written,
/// owner and mode kept; a symlink is left alone (it leads to the file written, or the guest
/// made it so), a missing `/etc/machine-id` stays missing (systemd makes one at boot).
pub fn reset_machine_id(guest: &GuestRoot) -> Result<(), String> {
    let mut bytes = [0u8; 16];
    crate::guest::fill_random(&mut bytes).map_err(|e| format!("cannot read random bytes: {e}"))?;
    let id = machine_id_text(bytes);
    for path in [MACHINE_ID, DBUS_MACHINE_ID] {
        match guest.lstat(path).map_err(|e| format!("cannot look at {path}: {e}"))? {
            Some(st) if is_regular(&st) => {
                guest.replace(path, id.as_bytes()).map_err(|e| format!("cannot write {path}: {e}"))?;
                println!("{path}: new machine id written");
            }
            Some(_) => println!("{path}: not a regular file (a symlink?), left alone"),
            None => println!("{path}: not present, left so"),
        }
    }
    Ok(())
}

/// `--regenerate-ssh-host-keys`: removes `/etc/ssh/ssh_host_*` (files and symlinks; never
/// followed), then, when the guest has `sshd` and `ssh-keygen`, has the guest's own
/// `ssh-keygen -A` make a new key of each default type, confined in the guest. No service is
/// started or configured, so no `policy-rc.d` guard is needed (snf-image's
/// `dpkg-reconfigure` needs one). Keys at other paths `HostKey` names in the guest's sshd
/// configuration are removed too, and remade with their type. Without sshd and ssh-keygen the
/// keys stay removed: an sshd installed later, or the guest's first boot, makes its own.
pub fn regenerate_ssh_host_keys(guest: &GuestRoot) -> Result<(), String> {
    let names = if guest.is_dir(SSH_DIR) {
        guest.list_dir(SSH_DIR).map_err(|e| format!("cannot list {SSH_DIR}: {e}"))?
    } else {
        Vec::new()
    };
    let mut names: Vec<String> = names.into_iter().filter(|n| n.starts_with(HOST_KEY_PREFIX)).collect();
    names.sort();
    for name in names {
        remove_key_file(guest, &format!("{SSH_DIR}/{name}"))?;
    }
    // Keys at other places sshd_config names (snf-image removes those too), with their types
    // read before they go.
    let mut extra = Vec::new();
    for path in extra_host_keys(&sshd_configuration(guest)) {
        let public = guest.read_to_string(&format!("{path}.pub")).ok();
        let kind = key_type(public.as_deref(), &path);
        remove_key_file(guest, &path)?;
        remove_key_file(guest, &format!("{path}.pub"))?;
        extra.push((path, kind));
    }
    let sshd = SSHD.iter().find(|p| guest.is_executable(p));
    let keygen = SSH_KEYGEN.iter().find(|p| guest.is_executable(p));
    let (Some(_), Some(keygen)) = (sshd, keygen) else {
        println!("the guest has no sshd and ssh-keygen: host keys left removed, for its first boot to make");
        return Ok(());
    };
    let keygen: &str = keygen;
    guest.mkdir_all(SSH_DIR, 0o755).map_err(|e| format!("cannot create {SSH_DIR}: {e}"))?;
    keygen_in_guest(guest, &[keygen, "-A"])?;
    for (path, kind) in extra {
        match kind {
            Some(kind) => keygen_in_guest(guest, &[keygen, "-q", "-N", "", "-t", kind, "-f", &path])?,
            None => println!("WARNING: {path}: key type unknown, left removed"),
        }
    }
    Ok(())
}

/// Removes a key file or a symlink in its place (never followed); a directory is left alone.
fn remove_key_file(guest: &GuestRoot, path: &str) -> Result<(), String> {
    match guest.lstat(path).map_err(|e| format!("cannot look at {path}: {e}"))? {
        Some(st) if crate::copy::kind(&st) == libc::S_IFDIR => println!("{path}: a directory, left alone"),
        Some(_) => {
            guest.remove_all(path).map_err(|e| format!("cannot remove {path}: {e}"))?;
            println!("removed {path}");
        }
        None => {}
    }
    Ok(())
}

/// The text of sshd_config and of the `*.conf` files of sshd_config.d, in that order.
fn sshd_configuration(guest: &GuestRoot) -> String {
    let mut text = guest.read_to_string(SSHD_CONFIG).unwrap_or_default();
    let mut names: Vec<String> = guest.list_dir(SSHD_CONFIG_DIR).unwrap_or_default();
    names.retain(|n| n.ends_with(".conf"));
    names.sort();
    for name in names {
        text.push('\n');
        text.push_str(&guest.read_to_string(&format!("{SSHD_CONFIG_DIR}/{name}")).unwrap_or_default());
    }
    text
}

/// Runs the guest's ssh-keygen confined in the guest; its output goes to the task log.
fn keygen_in_guest(guest: &GuestRoot, argv: &[&str]) -> Result<(), String> {
    let (status, output) = GuestCommand::new(guest, argv).combined_output()?;
    print!("{output}");
    if status.success() {
        return Ok(());
    }
    let last = output.lines().last().unwrap_or_default();
    Err(format!("the guest's {} failed ({status}): {last}", argv.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn machine_ids_are_v4_uuids_in_systemd_form() {
        assert_eq!(machine_id_text([0; 16]), "00000000000040008000000000000000\n");
        assert_eq!(machine_id_text([0xff; 16]), "ffffffffffff4fffbfffffffffffffff\n");
        let text = machine_id_text([0xab; 16]);
        assert_eq!(text.len(), 33);
        assert!(text.trim_end().bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    }

    #[test]
    fn extra_host_keys_as_sshd_reads_them() {
        let config = "# HostKey /etc/commented\n\
            HostKey /etc/ssh/ssh_host_rsa_key\n\
            hostkey /srv/keys/host_ed25519\n\
            HostKey=/srv/keys/eq_rsa\n\
            HOSTKEY = \"/srv/keys/quoted ecdsa\"\n\
            HostKey relative_key\n\
            HostKey /srv/%h/key\n\
            HostKeyAlgorithms ssh-ed25519\n\
            HostKey /srv/keys/host_ed25519\n";
        assert_eq!(extra_host_keys(config), ["/srv/keys/host_ed25519", "/srv/keys/eq_rsa", "/srv/keys/quoted ecdsa"]);
        assert!(extra_host_keys("").is_empty());
    }

    #[test]
    fn key_types_from_the_public_half_then_the_name() {
        assert_eq!(key_type(Some("ssh-rsa AAAA c"), "/k/ed25519"), Some("rsa"));
        assert_eq!(key_type(Some("ecdsa-sha2-nistp384 AAAA"), "/k/x"), Some("ecdsa"));
        assert_eq!(key_type(Some("ssh-ed25519 AAAA"), "/k/x"), Some("ed25519"));
        assert_eq!(key_type(None, "/srv/host_ecdsa_key"), Some("ecdsa"));
        assert_eq!(key_type(Some("garbage"), "/srv/my_rsa"), Some("rsa"));
        assert_eq!(key_type(None, "/srv/rsa/key"), None, "only the file's name counts");
        assert_eq!(key_type(Some("ssh-dss AAAA"), "/srv/key"), None);
    }

    fn guest() -> (tempfile::TempDir, GuestRoot) {
        let dir = tempfile::tempdir().unwrap();
        for d in ["etc/ssh", "var/lib/dbus"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let g = GuestRoot::open(dir.path()).unwrap();
        (dir, g)
    }

    #[test]
    fn machine_id_replaced_in_regular_files_only() {
        let (dir, g) = guest();
        let old = "0123456789abcdef0123456789abcdef\n";
        std::fs::write(dir.path().join("etc/machine-id"), old).unwrap();
        std::fs::set_permissions(dir.path().join("etc/machine-id"), PermissionsExt::from_mode(0o444)).unwrap();
        std::os::unix::fs::symlink("/etc/machine-id", dir.path().join("var/lib/dbus/machine-id")).unwrap();
        reset_machine_id(&g).unwrap();
        let new = std::fs::read_to_string(dir.path().join("etc/machine-id")).unwrap();
        assert_ne!(new, old);
        assert_eq!(new.len(), 33);
        let meta = std::fs::metadata(dir.path().join("etc/machine-id")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o444, "the mode is kept");
        let link = std::fs::read_link(dir.path().join("var/lib/dbus/machine-id")).unwrap();
        assert_eq!(link.to_str(), Some("/etc/machine-id"), "a symlink is left alone");

        // D-Bus's own regular file gets the same id; a missing /etc/machine-id stays missing.
        std::fs::remove_file(dir.path().join("var/lib/dbus/machine-id")).unwrap();
        std::fs::write(dir.path().join("var/lib/dbus/machine-id"), old).unwrap();
        reset_machine_id(&g).unwrap();
        let etc = std::fs::read_to_string(dir.path().join("etc/machine-id")).unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("var/lib/dbus/machine-id")).unwrap(), etc);
        assert_ne!(etc, new, "each run a fresh id");
        std::fs::remove_file(dir.path().join("etc/machine-id")).unwrap();
        reset_machine_id(&g).unwrap();
        assert!(!dir.path().join("etc/machine-id").exists());
    }

    /// Keys and links named ssh_host_* go, nothing they lead to does; other files stay. This
    /// guest has no sshd, so nothing is regenerated.
    #[test]
    fn host_keys_removed_without_following_links() {
        let (dir, g) = guest();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("victim"), "keep").unwrap();
        let ssh = dir.path().join("etc/ssh");
        std::fs::write(ssh.join("ssh_host_ed25519_key"), "private").unwrap();
        std::fs::write(ssh.join("ssh_host_ed25519_key.pub"), "public").unwrap();
        std::os::unix::fs::symlink(outside.path().join("victim"), ssh.join("ssh_host_rsa_key")).unwrap();
        std::fs::write(ssh.join("sshd_config"), "Port 22\nHostKey /srv/host_rsa\n").unwrap();
        std::fs::create_dir_all(ssh.join("sshd_config.d")).unwrap();
        std::fs::write(ssh.join("sshd_config.d/x.conf"), "HostKey /etc/evil/host_ed25519\n").unwrap();
        std::fs::create_dir_all(dir.path().join("srv")).unwrap();
        std::fs::write(dir.path().join("srv/host_rsa"), "private").unwrap();
        std::fs::write(dir.path().join("srv/host_rsa.pub"), "ssh-rsa AAAA").unwrap();
        std::fs::write(dir.path().join("srv/other"), "stays").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("etc/evil")).unwrap();
        std::fs::write(outside.path().join("host_ed25519"), "keep").unwrap();
        regenerate_ssh_host_keys(&g).unwrap();
        let mut left: Vec<String> =
            std::fs::read_dir(&ssh).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["sshd_config", "sshd_config.d"]);
        let srv: Vec<_> = std::fs::read_dir(dir.path().join("srv")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(srv, ["other"], "a HostKey of sshd_config goes too");
        assert_eq!(std::fs::read_to_string(outside.path().join("host_ed25519")).unwrap(), "keep");
        assert_eq!(std::fs::read_to_string(outside.path().join("victim")).unwrap(), "keep");

        // A guest without /etc/ssh at all has nothing to remove.
        std::fs::remove_dir_all(&ssh).unwrap();
        regenerate_ssh_host_keys(&g).unwrap();
    }
}
