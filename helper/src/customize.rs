//! `imgforge-helper customize`: applies the rules' operations to the mounted guest, in order.

use crate::accounts;
use crate::bulk::{BulkDisk, Written};
use crate::confinement::GuestCommand;
use crate::firstboot;
use crate::guest::GuestRoot;
use crate::task_env::TaskEnv;
use crate::task_overwrite;
use imgforge_protocol::perl_edit::Program;
use imgforge_protocol::rules::{Operation, Principal, Rules};
use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

/// Entry point of `guest-path PATH`: prints the helper path of an existing guest path, with
/// every symlink resolved inside the guest root.
pub fn guest_path_main(path: &str) -> ExitCode {
    let env = TaskEnv::from_process();
    let target = match env.require("IMGFORGE_TARGET") {
        Ok(t) => Path::new(t),
        Err(e) => {
            eprintln!("imgforge-helper guest-path: {e}");
            return ExitCode::from(2);
        }
    };
    match GuestRoot::open(target).and_then(|g| g.resolve(path)) {
        Ok(resolved) => {
            println!("{}", resolved.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("imgforge-helper guest-path: {path}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The 50-Customize task: applies the rules' operations in order.
pub fn run(env: &TaskEnv) -> Result<(), String> {
    let rules_path = env.require("IMGFORGE_RULES")?;
    let text = std::fs::read_to_string(rules_path).map_err(|e| format!("cannot read the rules {rules_path}: {e}"))?;
    let rules = Rules::from_json(&text).map_err(|e| e.to_string())?;
    let target = env.require("IMGFORGE_TARGET")?;
    let bulk = BulkDisk::open(&rules.bulk)?;
    let payload = &Payload { dir: Path::new(env.require("IMGFORGE_PAYLOAD")?), bulk: &bulk };
    let guest = GuestRoot::open(Path::new(target)).map_err(|e| format!("cannot open the guest root {target}: {e}"))?;
    if rules.task_overwriting.is_some() {
        println!(
            "ALLOW_MOUNTED_TASK_OVERWRITING: tasks the image's {}/overwrite_task_<Task> replace",
            task_overwrite::DIR
        );
    }
    for (i, op) in rules.operations.iter().enumerate() {
        println!("==> [{}/{}] {}", i + 1, rules.operations.len(), op.describe());
        match op {
            Operation::Task { name, operations } => {
                run_snf_task(&guest, payload, name, operations, rules.task_overwriting.as_deref())?
            }
            _ => apply(&guest, payload, op).map_err(|e| format!("{} failed: {e}", op.describe()))?,
        }
    }
    Ok(())
}

/// One of snf-image's configuration tasks: its operations, or the image's program in their
/// place (see [`task_overwrite::run_task`]).
fn run_snf_task(
    guest: &GuestRoot,
    payload: &Payload<'_>,
    name: &str,
    operations: &[Operation],
    env: Option<&[(String, String)]>,
) -> Result<(), String> {
    task_overwrite::run_task(guest, name, env, || {
        operations.iter().try_for_each(|op| {
            println!("    {}", op.describe());
            apply(guest, payload, op).map_err(|e| format!("task {name}: {} failed: {e}", op.describe()))
        })
    })
}

fn io_err<'a>(what: &'a str, path: &'a str) -> impl FnOnce(std::io::Error) -> String + 'a {
    move |e| format!("{what} {path}: {e}")
}

/// Where the operations' files come from: the payload disk's mount point and the bulk disk.
struct Payload<'a> {
    dir: &'a Path,
    bulk: &'a BulkDisk,
}

fn apply(guest: &GuestRoot, payload: &Payload<'_>, op: &Operation) -> Result<(), String> {
    match op {
        Operation::Hostname { name } => set_hostname(guest, name),
        Operation::Password { user, shadow_field } => {
            let shadow = guest.read_to_string("/etc/shadow").map_err(io_err("cannot read", "/etc/shadow"))?;
            let new = accounts::set_shadow_field(&shadow, user, shadow_field)
                .ok_or_else(|| format!("user {user:?} has no entry in the guest's /etc/shadow"))?;
            guest.replace("/etc/shadow", new.as_bytes()).map_err(io_err("cannot write", "/etc/shadow"))
        }
        Operation::SshInject { user, key } => ssh_inject(guest, user, key),
        Operation::Upload { payload_path, guest_path, file_name, mode, uid, gid } => {
            let dest = if guest.is_dir(guest_path) {
                format!("{}/{file_name}", guest_path.trim_end_matches('/'))
            } else {
                guest_path.clone()
            };
            upload(guest, payload, payload_path, &dest)?;
            guest.chown(&dest, *uid, *gid).map_err(io_err("cannot chown", &dest))?;
            guest.chmod(&dest, *mode).map_err(io_err("cannot chmod", &dest))
        }
        Operation::Mkdir { path } => guest.mkdir_all(path, 0o755).map_err(io_err("cannot create", path)),
        Operation::Write { path, content } => {
            guest.write(path, content.as_bytes()).map_err(io_err("cannot write", path))
        }
        Operation::AppendLine { path, line } => guest.append_line(path, line).map_err(io_err("cannot append to", path)),
        Operation::Delete { path } => guest.remove_all(path).map_err(io_err("cannot delete", path)),
        Operation::Chmod { mode, path } => guest.chmod(path, *mode).map_err(io_err("cannot chmod", path)),
        Operation::RunCommand { command } => run_in_guest(guest, &["/bin/sh", "-c", command]),
        Operation::Run { payload_path, name } => {
            let script = read_payload(payload.dir, payload_path)?;
            guest.mkdir_all("/tmp", 0o1777).map_err(io_err("cannot create", "/tmp"))?;
            let path = format!("/tmp/imgforge-run-{}", std::process::id());
            guest.write(&path, &script).map_err(io_err("cannot write", &path))?;
            let result = run_in_guest(guest, &["/bin/sh", &path]).map_err(|e| format!("script {name}: {e}"));
            let _ = guest.remove_all(&path);
            result
        }
        Operation::RunTask { payload_path, name, env } => {
            run_task(guest, &read_payload(payload.dir, payload_path)?, name, env)
        }
        Operation::Timezone { zone } => set_timezone(guest, zone),
        Operation::Firstboot { payload_path, name } => {
            let script = read_payload(payload.dir, payload_path)?;
            firstboot::install(guest, name, &script)
                .map(drop)
                .map_err(|e| format!("cannot install the firstboot script: {e}"))
        }
        Operation::Chown { user, group, path } => {
            let uid = user_id(guest, user)?;
            let gid = group_id(guest, group)?;
            guest.chown(path, uid, gid).map_err(io_err("cannot chown", path))
        }
        Operation::Copy { source, dest } => {
            guest.copy(source, dest).map_err(|e| format!("cannot copy {source} to {dest}: {e}"))
        }
        Operation::Move { source, dest } => {
            guest.rename(source, dest).map_err(|e| format!("cannot move {source} to {dest}: {e}"))
        }
        Operation::Link { target, links } => links
            .iter()
            .try_for_each(|link| guest.link(target, link).map_err(|e| format!("cannot link {link} to {target}: {e}"))),
        Operation::Touch { path } => guest.touch(path).map_err(io_err("cannot touch", path)),
        Operation::Truncate { path } => guest.truncate(path).map_err(io_err("cannot truncate", path)),
        Operation::TruncateRecursive { path } => {
            let count = guest.truncate_recursive(path).map_err(io_err("cannot truncate files under", path))?;
            println!("truncated {count} file(s) under {path}");
            Ok(())
        }
        Operation::CopyIn { payload_path, remote_dir, name } => guest
            .copy_in(&payload.dir.join(payload_path), remote_dir, name)
            .map_err(|e| format!("cannot copy {name} into {remote_dir}: {e}")),
        Operation::Scrub { path } => guest.scrub(path).map_err(io_err("cannot scrub", path)),
        Operation::Edit { path, expr } => {
            let program = Program::parse(expr).map_err(|e| e.to_string())?;
            crate::edit::edit_file(guest, path, &program)
        }
        Operation::ResetMachineId => crate::identity::reset_machine_id(guest),
        Operation::RegenerateSshHostKeys => crate::identity::regenerate_ssh_host_keys(guest),
        Operation::Network { nics, network_manager } => {
            let stack = crate::network::apply(guest, nics, *network_manager)?;
            println!("network: {} NIC(s) configured for {stack:?}", nics.len());
            Ok(())
        }
        Operation::Task { name, operations } => run_snf_task(guest, payload, name, operations, None),
        Operation::CloudInitHostname { name } => crate::cloud_init::set_hostname(guest, name),
        Operation::CloudInit { seed } => {
            let n = crate::cloud_init::apply(guest, seed)?;
            println!("cloud-init: NoCloud seed and {n} file(s) written");
            Ok(())
        }
        Operation::FirstbootInstall { packages } => {
            let tools = crate::package_manager::Tools::detect(guest);
            let script = crate::package_manager::firstboot_install_script(&tools, packages)?;
            firstboot::install(guest, "install", script.as_bytes())
                .map(drop)
                .map_err(|e| format!("cannot install the firstboot script: {e}"))
        }
        Operation::FirstbootCommand { command } => {
            let script = format!("#!/bin/sh\n{command}\n");
            firstboot::install(guest, "command", script.as_bytes())
                .map(drop)
                .map_err(|e| format!("cannot install the firstboot command: {e}"))
        }
    }
}

/// A user's id: a number as is, a name from the guest's own `/etc/passwd`.
fn user_id(guest: &GuestRoot, user: &Principal) -> Result<u32, String> {
    match user {
        Principal::Id(id) => Ok(*id),
        Principal::Name(name) => {
            let passwd = guest.read_to_string("/etc/passwd").map_err(io_err("cannot read", "/etc/passwd"))?;
            accounts::find_user(&passwd, name)
                .map(|entry| entry.uid)
                .ok_or_else(|| format!("user {name:?} does not exist in the guest's /etc/passwd"))
        }
    }
}

/// A group's id: a number as is, a name from the guest's own `/etc/group`.
fn group_id(guest: &GuestRoot, group: &Principal) -> Result<u32, String> {
    match group {
        Principal::Id(id) => Ok(*id),
        Principal::Name(name) => {
            let groups = guest.read_to_string("/etc/group").map_err(io_err("cannot read", "/etc/group"))?;
            accounts::find_group_id(&groups, name)
                .ok_or_else(|| format!("group {name:?} does not exist in the guest's /etc/group"))
        }
    }
}

/// Copies the payload file `payload_path` into the guest file `dest` (created 0644 or emptied,
/// keeping its mode), from the bulk disk when it is there, else streamed from the payload disk.
fn upload(guest: &GuestRoot, payload: &Payload<'_>, payload_path: &str, dest: &str) -> Result<(), String> {
    let out = guest.open_write(dest, 0o644, true).map_err(io_err("cannot write", dest))?;
    if let Some(file) = payload.bulk.get(payload_path) {
        let how = payload.bulk.copy_to(file, &out).map_err(io_err("cannot write", dest))?;
        let way = match how {
            Written::Direct => "direct I/O",
            Written::Buffered => "through the page cache: its filesystem has no direct I/O",
        };
        println!("{dest}: {} bytes from the bulk disk, {way}", file.length);
        return Ok(());
    }
    let path = payload.dir.join(payload_path);
    let mut source =
        std::fs::File::open(&path).map_err(|e| format!("cannot read {} from the payload disk: {e}", path.display()))?;
    std::io::copy(&mut source, &mut &out).map(drop).map_err(io_err("cannot write", dest))
}

fn read_payload(payload: &Path, rel: &str) -> Result<Vec<u8>, String> {
    let path = payload.join(rel);
    let mut data = Vec::new();
    std::fs::File::open(&path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(|e| format!("cannot read {} from the payload disk: {e}", path.display()))?;
    Ok(data)
}

fn set_hostname(guest: &GuestRoot, name: &str) -> Result<(), String> {
    guest.write("/etc/hostname", format!("{name}\n").as_bytes()).map_err(io_err("cannot write", "/etc/hostname"))?;
    let hosts = guest.read_to_string("/etc/hosts").unwrap_or_default();
    let short = name.split('.').next().unwrap_or(name);
    let names = if short == name { name.to_owned() } else { format!("{name} {short}") };
    let mut replaced = false;
    let mut lines: Vec<String> = hosts
        .lines()
        .map(|l| {
            if !replaced && l.split_whitespace().next() == Some("127.0.1.1") {
                replaced = true;
                format!("127.0.1.1\t{names}")
            } else {
                l.to_owned()
            }
        })
        .collect();
    if !replaced {
        lines.push(format!("127.0.1.1\t{names}"));
    }
    let text = lines.join("\n") + "\n";
    guest.write("/etc/hosts", text.as_bytes()).map_err(io_err("cannot write", "/etc/hosts"))
}

fn ssh_inject(guest: &GuestRoot, user: &str, key: &str) -> Result<(), String> {
    let passwd = guest.read_to_string("/etc/passwd").map_err(io_err("cannot read", "/etc/passwd"))?;
    let entry = accounts::find_user(&passwd, user)
        .ok_or_else(|| format!("user {user:?} does not exist in the guest's /etc/passwd"))?;
    let home = entry.home.trim_end_matches('/');
    let home = if home.is_empty() { "/" } else { home };
    if !home.starts_with('/') {
        return Err(format!("user {user:?} has a relative home directory {home:?}"));
    }
    let ssh_dir = format!("{}/.ssh", home.trim_end_matches('/'));
    let keys = format!("{ssh_dir}/authorized_keys");
    guest.mkdir_all(&ssh_dir, 0o700).map_err(io_err("cannot create", &ssh_dir))?;
    guest.chown(&ssh_dir, entry.uid, entry.gid).map_err(io_err("cannot chown", &ssh_dir))?;
    guest.chmod(&ssh_dir, 0o700).map_err(io_err("cannot chmod", &ssh_dir))?;
    guest.append_line(&keys, key.trim_end()).map_err(io_err("cannot append to", &keys))?;
    guest.chown(&keys, entry.uid, entry.gid).map_err(io_err("cannot chown", &keys))?;
    guest.chmod(&keys, 0o600).map_err(io_err("cannot chmod", &keys))
}

fn set_timezone(guest: &GuestRoot, zone: &str) -> Result<(), String> {
    let zoneinfo = format!("/usr/share/zoneinfo/{zone}");
    if !guest.exists(&zoneinfo) {
        return Err(format!("the guest has no {zoneinfo}: is tzdata installed and the zone name right?"));
    }
    guest.symlink(&zoneinfo, "/etc/localtime").map_err(io_err("cannot link", "/etc/localtime"))?;
    if guest.exists("/etc/timezone") || guest.exists("/etc/debian_version") {
        guest
            .write("/etc/timezone", format!("{zone}\n").as_bytes())
            .map_err(io_err("cannot write", "/etc/timezone"))?;
    }
    Ok(())
}

/// Runs `program` as snf-image runs a configuration task: executed itself (so its `#!` line
/// picks the interpreter), here chrooted into the guest and confined, with the task's variables.
fn run_task(guest: &GuestRoot, program: &[u8], name: &str, env: &[(String, String)]) -> Result<(), String> {
    guest.mkdir_all("/tmp", 0o1777).map_err(io_err("cannot create", "/tmp"))?;
    let path = format!("/tmp/imgforge-task-{}", std::process::id());
    guest.write(&path, program).map_err(io_err("cannot write", &path))?;
    let result = guest.chmod(&path, 0o700).map_err(io_err("cannot chmod", &path)).and_then(|()| {
        env.iter()
            .fold(GuestCommand::new(guest, &[&path]), |command, (k, v)| command.env(k, v))
            .status()
            .map_err(|e| format!("task {name}: {e}"))
    });
    let _ = guest.remove_all(&path);
    result
}

/// Runs a command chrooted into the guest and confined, its output going to the task log.
fn run_in_guest(guest: &GuestRoot, argv: &[&str]) -> Result<(), String> {
    GuestCommand::new(guest, argv).status()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_names_come_from_the_guest_and_unknown_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("etc/group"), "root:x:0:\nadm:x:4:alice\n").unwrap();
        let guest = GuestRoot::open(dir.path()).unwrap();
        assert_eq!(user_id(&guest, &Principal::Name("alice".into())), Ok(1000));
        assert_eq!(user_id(&guest, &Principal::Id(7)), Ok(7));
        assert_eq!(group_id(&guest, &Principal::Name("adm".into())), Ok(4));
        let err = user_id(&guest, &Principal::Name("mallory".into())).unwrap_err();
        assert!(err.contains("mallory") && err.contains("/etc/passwd"), "{err}");
        let err = group_id(&guest, &Principal::Name("alice".into())).unwrap_err();
        assert!(err.contains("alice") && err.contains("/etc/group"), "{err}");
    }
}
