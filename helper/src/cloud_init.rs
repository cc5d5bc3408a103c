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

/// One file of the seed: written whole, or (a part of a seed split by task) appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedFile {
    /// Guest path.
    pub path: String,
    /// What goes in.
    pub text: String,
    /// Its mode.
    pub mode: u32,
    /// Appended to the existing file rather than replacing it.
    pub append: bool,
}

fn whole(path: String, text: String, mode: u32) -> SeedFile {
    SeedFile { path, text, mode, append: false }
}

/// The files to write, pure. A seed with an `instance_id` starts the seed (snf-image's
/// InitializeDatasource); one without is a later task's part (AssignHostname, ChangePassword,
/// ...), whose `meta-data` lines are appended to the seed begun before, as snf-image's tasks
/// append theirs.
pub fn render(seed: &CloudInitSeed) -> Vec<SeedFile> {
    let starts = !seed.instance_id.is_empty();
    let mut files = Vec::new();
    let mut meta = String::new();
    if starts {
        files.push(whole(snippet("InitializeDatasource"), "datasource_list: [ NoCloud ]\n".to_owned(), 0o644));
        meta.push_str(&format!("instance-id: {}\n", quoted(&seed.instance_id)));
    }
    if let Some(h) = &seed.hostname {
        meta.push_str(&format!("local-hostname: {}\n", quoted(h)));
    }
    if !seed.public_keys.is_empty() {
        meta.push_str("public-keys:\n");
        for k in &seed.public_keys {
            meta.push_str(&format!("  - {}\n", quoted(k.trim())));
        }
    }
    if !meta.is_empty() {
        files.push(SeedFile { path: format!("{SEED_DIR}/meta-data"), text: meta, mode: 0o600, append: !starts });
    }
    if starts {
        files.push(whole(USER_DATA.to_owned(), String::new(), 0o600));
        files.push(whole(
            format!("{PER_ONCE}/clear_user_data.sh"),
            format!("#!/bin/sh\ncat /dev/null > \"{USER_DATA}\"\n"),
            0o755,
        ));
    }
    if let Some(swap) = &seed.swap {
        // snf-image's AddSwap under CLOUD_INIT: a swap file instead of the partition.
        // The host names the file `/swap-<number>.img`: plain YAML, as snf-image writes it; any
        // other name is quoted.
        let plain = swap.filename.bytes().all(|b| b.is_ascii_alphanumeric() || b"/-_.".contains(&b));
        let filename = if plain { swap.filename.clone() } else { quoted(&swap.filename) };
        let cfg = format!("swap:\n  filename: {filename}\n  size: auto\n  maxsize: {}\n", swap.max_bytes);
        files.push(whole(snippet("AddSwap"), cfg, 0o644));
    }
    if !seed.passwords.is_empty() {
        // cloud-init takes a crypt(3) hash in chpasswd's list as a hash (chpasswd -e).
        let mut cfg = "ssh_pwauth: True\nchpasswd:\n  expire: false\n  list: |\n".to_owned();
        for p in &seed.passwords {
            cfg.push_str(&format!("    {}:{}\n", p.user, p.hash));
        }
        let path = snippet("ChangePassword");
        files.push(whole(
            format!("{PER_ONCE}/rm_98_snf-image-ChangePassword.cfg.sh"),
            format!("#!/bin/sh\nrm -f {path}\n"),
            0o755,
        ));
        files.push(whole(path, cfg, 0o600));
    }
    if seed.delete_ssh_keys {
        files.push(whole(snippet("DeleteSSHKeys"), "ssh_deletekeys: true\n".into(), 0o644));
    }
    if seed.network_disabled {
        files.push(whole(snippet("ConfigureNetwork"), "network: {config: disabled}\n".into(), 0o644));
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
    for SeedFile { path, text, mode, append } in &files {
        let fail = |e: std::io::Error| format!("cannot write {path}: {e}");
        if *append {
            let mut old = guest.read_to_string(path).map_err(fail)?;
            old.push_str(text);
            guest.replace(path, old.as_bytes()).map_err(fail)?;
            continue;
        }
        let mut f = guest.open_write(path, *mode, true).map_err(fail)?;
        // An existing file keeps its mode through open: set it before the contents go in.
        guest.chmod(path, *mode).map_err(fail)?;
        f.write_all(text.as_bytes()).map_err(fail)?;
    }
    Ok(files.len())
}

/// `meta-data` with `local-hostname` set to `name` (replacing the line, or added after the
/// others), pure.
pub fn with_hostname(meta: &str, name: &str) -> String {
    let line = format!("local-hostname: {}", quoted(name));
    let mut out = String::new();
    let mut done = false;
    for l in meta.lines() {
        if l.starts_with("local-hostname:") {
            if !done {
                out.push_str(&line);
                out.push('\n');
                done = true;
            }
        } else {
            out.push_str(l);
            out.push('\n');
        }
    }
    if !done {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// A rename under `CLOUD_INIT`: the seed's `local-hostname` becomes `name`, which cloud-init
/// (its hostname modules run every boot) applies at the next boot; the `instance-id` stays,
/// so cloud-init does not take the instance for a new one.
pub fn set_hostname(guest: &GuestRoot, name: &str) -> Result<(), String> {
    let path = format!("{SEED_DIR}/meta-data");
    let meta = guest.read_to_string(&path).map_err(|e| {
        format!("cannot read the NoCloud seed's {path}: {e} (was the instance created with CLOUD_INIT?)")
    })?;
    guest.replace(&path, with_hostname(&meta, name).as_bytes()).map_err(|e| format!("cannot write {path}: {e}"))?;
    println!("cloud-init: local-hostname {name} in {path}");
    Ok(())
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
            swap: None,
        };
        let files = render(&seed);
        let get = |p: &str| {
            let f = files.iter().find(|f| f.path == p).unwrap_or_else(|| panic!("{p}: {files:?}"));
            (f.path.clone(), f.text.clone(), f.mode)
        };
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
        assert!(bare.iter().all(|f| !f.path.contains("ChangePassword") && !f.path.contains("DeleteSSHKeys")));
        // A hostile instance name stays one YAML value.
        let odd = render(&CloudInitSeed { instance_id: "a\nlocal-hostname: evil".into(), ..Default::default() });
        assert!(odd[1].text.lines().count() == 1, "{:?}", odd[1].text);
    }

    /// A seed split by task (overwritable tasks) writes the same files as the whole seed.
    #[test]
    fn parts_append_to_the_seed_begun_before() {
        let start = render(&CloudInitSeed { instance_id: "i".into(), ..Default::default() });
        assert!(start.iter().all(|f| !f.append));
        let host = render(&CloudInitSeed { hostname: Some("h".into()), ..Default::default() });
        assert_eq!(host.len(), 1);
        assert_eq!(
            (host[0].path.as_str(), host[0].text.as_str(), host[0].append),
            ("/var/lib/cloud/seed/nocloud-net/meta-data", "local-hostname: \"h\"\n", true)
        );
        assert!(render(&CloudInitSeed::default()).is_empty());
    }

    /// snf-image's AddSwap under CLOUD_INIT: cloud-init's swap module, `size: auto`.
    #[test]
    fn swap_file() {
        use imgforge_protocol::rules::CloudInitSwap;
        let swap = Some(CloudInitSwap { filename: "/swap-123.img".into(), max_bytes: 256 << 20 });
        let files = render(&CloudInitSeed { swap, ..Default::default() });
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].path, "/etc/cloud/cloud.cfg.d/98_snf-image-AddSwap.cfg");
        assert_eq!(files[0].text, "swap:\n  filename: /swap-123.img\n  size: auto\n  maxsize: 268435456\n");
        let odd = CloudInitSwap { filename: "/a: b\nc".into(), max_bytes: 1 };
        let files = render(&CloudInitSeed { swap: Some(odd), ..Default::default() });
        assert_eq!(files[0].text.lines().count(), 4, "{}", files[0].text);
    }

    #[test]
    fn rename_sets_local_hostname_only() {
        let meta = "instance-id: \"a\"\nlocal-hostname: \"a\"\npublic-keys:\n  - \"k\"\n";
        assert_eq!(
            with_hostname(meta, "b.example.com"),
            "instance-id: \"a\"\nlocal-hostname: \"b.example.com\"\npublic-keys:\n  - \"k\"\n"
        );
        assert_eq!(with_hostname("instance-id: \"a\"\n", "b"), "instance-id: \"a\"\nlocal-hostname: \"b\"\n");
        assert_eq!(with_hostname("instance-id: x", "a\nb").lines().count(), 2);
    }
}
