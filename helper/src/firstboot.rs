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
# Installed by imgforge: runs each firstboot script once, in order, then keeps it in done/.
dir=/usr/lib/imgforge/firstboot
mkdir -p "$dir/done"
for script in "$dir"/scripts/*; do
    [ -f "$script" ] || continue
    echo "imgforge firstboot: running $script"
    sh "$script"
    echo "imgforge firstboot: $script exited with status $?"
    mv "$script" "$dir/done/"
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
    let count = guest.list_dir(SCRIPTS_DIR)?.len();
    let safe: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' })
        .collect();
    let path = format!("{SCRIPTS_DIR}/{:04}-{safe}", count + 1);
    guest.write(&path, script)?;
    guest.chmod(&path, 0o755)?;
    Ok(path)
}
