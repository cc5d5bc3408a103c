//! snf-image's `CLOUD_INIT`: a NoCloud seed (`/var/lib/cloud/seed/nocloud-net`) and
//! `cloud.cfg.d` snippets with snf-image's names, which cloud-init applies at first boot
//! instead of files edited now; the ones holding secrets are emptied or removed by per-once
//! scripts after that boot, as snf-image's are.

use crate::guest::GuestRoot;
use imgforge_protocol::rules::CloudInitSeed;
use std::io::Write;

/// Where cloud-init's configuration snippets go; the image must have it (cloud-init installed).
pub const CFG_DIR: &str = "/etc/cloud/cloud.cfg.d";
/// The NoCloud seed directory snf-image uses.
pub const SEED_DIR: &str = "/var/lib/cloud/seed/nocloud-net";
/// cloud-init's run-once scripts.
pub const PER_ONCE: &str = "/var/lib/cloud/scripts/per-once";
/// The seed's user-data, which `cloud_userdata` fills (uploaded after this is written).
pub const USER_DATA: &str = "/var/lib/cloud/seed/nocloud-net/user-data";

/// A YAML scalar that reads back as `s` whatever it holds (a JSON string is YAML).
fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// snf-image's snippet name for a task: `98_snf-image-<Task>.cfg`.
fn snippet(task: &str) -> String {
    format!("{CFG_DIR}/98_snf-image-{task}.cfg")
}

/// The files to write (path, contents, mode), pure.
pub fn render(seed: &CloudInitSeed) -> Vec<(String, String, u32)> {
    let mut files = vec![(snippet("InitializeDatasource"), "datasource_list: [ NoCloud ]\n".to_owned(), 0o644)];
    let mut meta = format!("instance-id: {}\n", quoted(&seed.instance_id));
    if let Some(h) = &seed.hostname {
        meta.push_str(&format!("local-hostname: {}\n", quoted(h)));
    }
    if !seed.public_keys.is_empty() {
        meta.push_str("public-keys:\n");
        for k in &seed.public_keys {
            meta.push_str(&format!("  - {}\n", quoted(k.trim())));
        }
    }
    files.push((format!("{SEED_DIR}/meta-data"), meta, 0o600));
    files.push((USER_DATA.to_owned(), String::new(), 0o600));
    files.push((
        format!("{PER_ONCE}/clear_user_data.sh"),
        format!("#!/bin/sh\ncat /dev/null > \"{USER_DATA}\"\n"),
        0o755,
    ));
    if !seed.passwords.is_empty() {
        // cloud-init takes a crypt(3) hash in chpasswd's list as a hash (chpasswd -e).
        let mut cfg = "ssh_pwauth: True\nchpasswd:\n  expire: false\n  list: |\n".to_owned();
        for p in &seed.passwords {
            cfg.push_str(&format!("    {}:{}\n", p.user, p.hash));
        }
        let path = snippet("ChangePassword");
        files.push((
            format!("{PER_ONCE}/rm_98_snf-image-ChangePassword.cfg.sh"),
            format!("#!/bin/sh\nrm -f {path}\n"),
            0o755,
        ));
        files.push((path, cfg, 0o600));
    }
    if seed.delete_ssh_keys {
        files.push((snippet("DeleteSSHKeys"), "ssh_deletekeys: true\n".into(), 0o644));
    }
    if seed.network_disabled {
        files.push((snippet("ConfigureNetwork"), "network: {config: disabled}\n".into(), 0o644));
    }
    files
}

/// Writes the seed and snippets into the guest.
pub fn apply(guest: &GuestRoot, seed: &CloudInitSeed) -> Result<usize, String> {
    if !guest.is_dir(CFG_DIR) {
        return Err(format!(
            "CLOUD_INIT is set but the image has no {CFG_DIR}: install cloud-init in the image, or unset CLOUD_INIT"
        ));
    }
    for dir in [SEED_DIR, PER_ONCE] {
        guest.mkdir_all(dir, 0o755).map_err(|e| format!("cannot create {dir}: {e}"))?;
    }
    let files = render(seed);
    for (path, text, mode) in &files {
        let fail = |e: std::io::Error| format!("cannot write {path}: {e}");
        let mut f = guest.open_write(path, *mode, true).map_err(fail)?;
        // An existing file keeps its mode through open: set it before the contents go in.
        guest.chmod(path, *mode).map_err(fail)?;
        f.write_all(text.as_bytes()).map_err(fail)?;
    }
    Ok(files.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgforge_protocol::rules::UserPassword;

    #[test]
    fn seed_and_snippets() {
        let seed = CloudInitSeed {
            instance_id: "inst1.example.com".into(),
            hostname: Some("inst1.example.com".into()),
            passwords: vec![UserPassword { user: "root".into(), hash: "$6$salt$hash".into() }],
            public_keys: vec!["ssh-ed25519 AAAA a: b # c".into()],
            delete_ssh_keys: true,
            network_disabled: true,
        };
        let files = render(&seed);
        let get = |p: &str| files.iter().find(|(path, _, _)| path == p).unwrap_or_else(|| panic!("{p}: {files:?}"));
        let meta = get("/var/lib/cloud/seed/nocloud-net/meta-data");
        assert_eq!(
            meta.1,
            "instance-id: \"inst1.example.com\"\nlocal-hostname: \"inst1.example.com\"\npublic-keys:\n  - \"ssh-ed25519 AAAA a: b # c\"\n"
        );
        assert_eq!(meta.2, 0o600);
        assert_eq!(
            get("/etc/cloud/cloud.cfg.d/98_snf-image-InitializeDatasource.cfg").1,
            "datasource_list: [ NoCloud ]\n"
        );
        let pw = get("/etc/cloud/cloud.cfg.d/98_snf-image-ChangePassword.cfg");
        assert!(pw.1.contains("ssh_pwauth: True\n") && pw.1.contains("    root:$6$salt$hash\n") && pw.2 == 0o600);
        assert!(get("/var/lib/cloud/scripts/per-once/rm_98_snf-image-ChangePassword.cfg.sh")
            .1
            .contains("rm -f /etc/cloud/cloud.cfg.d/98_snf-image-ChangePassword.cfg"));
        assert_eq!(get("/etc/cloud/cloud.cfg.d/98_snf-image-DeleteSSHKeys.cfg").1, "ssh_deletekeys: true\n");
        assert_eq!(get("/etc/cloud/cloud.cfg.d/98_snf-image-ConfigureNetwork.cfg").1, "network: {config: disabled}\n");
        assert_eq!(get(USER_DATA).2, 0o600);
        // Only what was asked.
        let bare = render(&CloudInitSeed { instance_id: "i".into(), ..Default::default() });
        assert_eq!(bare.len(), 4, "{bare:?}");
        assert!(bare.iter().all(|(p, _, _)| !p.contains("ChangePassword") && !p.contains("DeleteSSHKeys")));
        // A hostile instance name stays one YAML value.
        let odd = render(&CloudInitSeed { instance_id: "a\nlocal-hostname: evil".into(), ..Default::default() });
        assert!(odd[1].1.lines().count() == 1, "{:?}", odd[1].1);
    }
}
