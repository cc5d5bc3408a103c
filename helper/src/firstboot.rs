//! Scripts that run once at the guest's first boot (a systemd unit, as virt-customize does).

use crate::guest::GuestRoot;
use std::io;

/// Where firstboot scripts wait in the guest.
pub const SCRIPTS_DIR: &str = "/usr/lib/imgforge/firstboot/scripts";
/// The runner the unit starts.
pub const RUNNER: &str = "/usr/lib/imgforge/firstboot/run";
/// The systemd unit.
pub const UNIT: &str = "/etc/systemd/system/imgforge-firstboot.service";
/// The unit's enablement link.
pub const UNIT_WANTS_LINK: &str = "/etc/systemd/system/multi-user.target.wants/imgforge-firstboot.service";

const RUNNER_SCRIPT: &str = r#"#!/bin/sh
# Installed by imgforge: runs each firstboot script once, in order. Each moves to done/ before
# it runs (one that reboots the guest does not run again) and is run itself: its #! line picks
# its interpreter, one without runs under sh (as virt-customize's firstboot.sh runs them).
dir=/usr/lib/imgforge/firstboot
mkdir -p "$dir/done"
for script in "$dir"/scripts/*; do
    [ -f "$script" ] || continue
    ran="$dir/done/${script##*/}"
    mv "$script" "$ran" || continue
    echo "imgforge firstboot: running $script"
    "$ran"
    echo "imgforge firstboot: $script exited with status $?"
done
"#;

const UNIT_FILE: &str = "[Unit]
Description=imgforge firstboot scripts
After=network.target
ConditionDirectoryNotEmpty=/usr/lib/imgforge/firstboot/scripts

[Service]
Type=oneshot
ExecStart=/usr/lib/imgforge/firstboot/run
RemainAfterExit=yes
StandardOutput=journal+console
TimeoutSec=0

[Install]
WantedBy=multi-user.target
";

/// Installs `script` as the next firstboot script, named after `name`.
pub fn install(guest: &GuestRoot, name: &str, script: &[u8]) -> io::Result<String> {
    guest.mkdir_all(SCRIPTS_DIR, 0o755)?;
    guest.mkdir_all("/etc/systemd/system/multi-user.target.wants", 0o755)?;
    guest.write(RUNNER, RUNNER_SCRIPT.as_bytes())?;
    guest.chmod(RUNNER, 0o755)?;
    guest.write(UNIT, UNIT_FILE.as_bytes())?;
    if !guest.exists(UNIT_WANTS_LINK) {
        guest.symlink(UNIT, UNIT_WANTS_LINK)?;
    }
    // After the highest number waiting, not after how many wait: with a gap (0001, 0003), the
    // count would name the new script like one already there, and overwrite it.
    let count = guest
        .list_dir(SCRIPTS_DIR)?
        .iter()
        .filter_map(|name| name.split_once('-').and_then(|(n, _)| n.parse::<usize>().ok()))
        .max()
        .unwrap_or(0);
    let safe: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' })
        .collect();
    let path = format!("{SCRIPTS_DIR}/{:04}-{safe}", count + 1);
    guest.write(&path, script)?;
    guest.chmod(&path, 0o755)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A script waiting from an earlier customization is never overwritten: the new one is
    /// numbered after the highest there, not after how many there are (a gap would reuse a name).
    #[test]
    fn a_waiting_script_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let guest = GuestRoot::open(dir.path()).unwrap();
        let scripts = dir.path().join(SCRIPTS_DIR.trim_start_matches('/'));
        std::fs::create_dir_all(&scripts).unwrap();
        std::fs::write(scripts.join("0001-a"), "first\n").unwrap();
        std::fs::write(scripts.join("0003-b"), "third\n").unwrap();
        let path = install(&guest, "b", b"new\n").unwrap();
        assert_eq!(std::fs::read_to_string(scripts.join("0003-b")).unwrap(), "third\n", "overwritten: {path}");
        assert_eq!(path, format!("{SCRIPTS_DIR}/0004-b"));
        assert_eq!(std::fs::read_to_string(scripts.join("0004-b")).unwrap(), "new\n");
    }

    #[test]
    fn the_runner_runs_each_script_once_with_its_interpreter() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        let scripts = base.join("scripts");
        std::fs::create_dir(&scripts).unwrap();
        let out = base.join("out");
        std::fs::create_dir(&out).unwrap();
        let out = out.display();
        // bash syntax that sh (dash) refuses; a script without #!; one failing; one after it.
        let cases = [
            ("0001-bash", format!("#!/bin/bash\n[[ -n x ]] && echo bash > {out}/1\n")),
            ("0002-plain", format!("echo plain > {out}/2\n")),
            ("0003-fails", "#!/bin/sh\nexit 3\n".to_owned()),
            ("0004-after", format!("#!/bin/sh\necho after > {out}/4\n")),
        ];
        for (name, body) in &cases {
            let path = scripts.join(name);
            std::fs::write(&path, body).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        let runner = RUNNER_SCRIPT.replace("dir=/usr/lib/imgforge/firstboot", &format!("dir={}", base.display()));
        assert_ne!(runner, RUNNER_SCRIPT);
        let ran = std::process::Command::new("sh").arg("-c").arg(&runner).output().unwrap();
        let log = String::from_utf8_lossy(&ran.stdout);
        assert!(ran.status.success(), "{log}");
        for (n, want) in [(1, "bash\n"), (2, "plain\n"), (4, "after\n")] {
            assert_eq!(std::fs::read_to_string(format!("{out}/{n}")).unwrap(), want, "{log}");
        }
        assert!(log.contains("0003-fails exited with status 3"), "{log}");
        assert_eq!(std::fs::read_dir(&scripts).unwrap().count(), 0, "a script is left to run again");
        assert_eq!(std::fs::read_dir(base.join("done")).unwrap().count(), 4);
    }
}
