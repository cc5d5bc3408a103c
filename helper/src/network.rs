//! Network configuration for the stack the guest uses: netplan, NetworkManager, ifupdown or
//! systemd-networkd (the fallback, with the directories it needs). Interfaces are matched by
//! MAC address, never by a name the guest's kernel may give differently.

use crate::guest::GuestRoot;
use imgforge_protocol::rules::Nic;

/// The guest's network stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    /// `/etc/netplan`.
    Netplan,
    /// `/etc/NetworkManager`.
    NetworkManager,
    /// `/etc/network/interfaces` (ifupdown).
    Ifupdown,
    /// systemd-networkd (also the fallback).
    Networkd,
}

/// Picks the stack from what exists in the guest (pure over a predicate).
pub fn detect(exists: impl Fn(&str) -> bool) -> Stack {
    if exists("/etc/netplan") {
        Stack::Netplan
    } else if exists("/etc/NetworkManager/NetworkManager.conf") {
        Stack::NetworkManager
    } else if exists("/etc/network/interfaces") || exists("/sbin/ifup") || exists("/usr/sbin/ifup") {
        Stack::Ifupdown
    } else {
        Stack::Networkd
    }
}

/// Files to write (path, contents, mode) for `nics` on `stack` (pure).
pub fn render(stack: Stack, nics: &[Nic]) -> Vec<(String, String, u32)> {
    let mut files = Vec::new();
    for (i, nic) in nics.iter().enumerate() {
        let name = format!("eth{i}");
        match stack {
            Stack::Networkd => {
                let mut net = format!("[Match]\nMACAddress={}\n\n[Network]\n", nic.mac);
                match &nic.ipv4 {
                    Some(addr) => {
                        net.push_str(&format!("Address={addr}\n"));
                        if let Some(gw) = &nic.gateway4 {
                            net.push_str(&format!("Gateway={gw}\n"));
                        }
                    }
                    None => net.push_str("DHCP=yes\n"),
                }
                files.push((format!("/etc/systemd/network/50-imgforge-nic{i}.network"), net, 0o644));
            }
            Stack::Netplan => {
                let mut y = format!(
                    "network:\n  version: 2\n  ethernets:\n    nic{i}:\n      match:\n        macaddress: \"{}\"\n",
                    nic.mac
                );
                match &nic.ipv4 {
                    Some(addr) => {
                        y.push_str(&format!("      addresses: [\"{addr}\"]\n"));
                        if let Some(gw) = &nic.gateway4 {
                            y.push_str(&format!("      routes:\n        - to: default\n          via: \"{gw}\"\n"));
                        }
                    }
                    None => y.push_str("      dhcp4: true\n"),
                }
                files.push((format!("/etc/netplan/50-imgforge-nic{i}.yaml"), y, 0o600));
            }
            Stack::NetworkManager => {
                let ipv4 = match &nic.ipv4 {
                    Some(addr) => format!(
                        "method=manual\naddress1={addr}{}\n",
                        nic.gateway4.as_ref().map(|g| format!(",{g}")).unwrap_or_default()
                    ),
                    None => "method=auto\n".into(),
                };
                let text = format!("[connection]\nid=imgforge-nic{i}\ntype=ethernet\n\n[ethernet]\nmac-address={}\n\n[ipv4]\n{ipv4}\n[ipv6]\nmethod=auto\n", nic.mac);
                files.push((
                    format!("/etc/NetworkManager/system-connections/imgforge-nic{i}.nmconnection"),
                    text,
                    0o600,
                ));
            }
            Stack::Ifupdown => {
                // ifupdown names interfaces: a .link file gives the MAC's interface that name.
                files.push((
                    format!("/etc/systemd/network/10-imgforge-nic{i}.link"),
                    format!("[Match]\nMACAddress={}\n\n[Link]\nName={name}\n", nic.mac),
                    0o644,
                ));
                let stanza = match &nic.ipv4 {
                    Some(addr) => format!(
                        "auto {name}\niface {name} inet static\n    address {addr}\n{}",
                        nic.gateway4.as_ref().map(|g| format!("    gateway {g}\n")).unwrap_or_default()
                    ),
                    None => format!("auto {name}\niface {name} inet dhcp\n"),
                };
                files.push((format!("/etc/network/interfaces.d/imgforge-nic{i}"), stanza, 0o644));
            }
        }
    }
    files
}

/// Writes the configuration into the guest.
pub fn apply(guest: &GuestRoot, nics: &[Nic]) -> Result<Stack, String> {
    let stack = detect(|p| guest.exists(p));
    for (path, text, mode) in render(stack, nics) {
        let dir = &path[..path.rfind('/').unwrap_or(0)];
        guest.mkdir_all(dir, 0o755).map_err(|e| format!("cannot create {dir}: {e}"))?;
        guest.write(&path, text.as_bytes()).map_err(|e| format!("cannot write {path}: {e}"))?;
        guest.chmod(&path, mode).map_err(|e| format!("cannot chmod {path}: {e}"))?;
    }
    if stack == Stack::Ifupdown {
        let interfaces = guest.read_to_string("/etc/network/interfaces").unwrap_or_default();
        if !interfaces.lines().any(|l| l.trim_start().starts_with("source") && l.contains("interfaces.d")) {
            guest
                .append_line("/etc/network/interfaces", "source /etc/network/interfaces.d/*")
                .map_err(|e| format!("cannot update /etc/network/interfaces: {e}"))?;
        }
    }
    if stack == Stack::Networkd {
        // Enable networkd where systemd is installed but networkd is not yet wanted.
        let unit = "/lib/systemd/system/systemd-networkd.service";
        let wants = "/etc/systemd/system/multi-user.target.wants/systemd-networkd.service";
        if guest.exists(unit) && !guest.exists(wants) {
            guest.mkdir_all("/etc/systemd/system/multi-user.target.wants", 0o755).map_err(|e| e.to_string())?;
            guest.symlink(unit, wants).map_err(|e| format!("cannot enable systemd-networkd: {e}"))?;
        }
    }
    Ok(stack)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nics() -> Vec<Nic> {
        vec![
            Nic {
                mac: "aa:00:00:00:00:01".into(),
                ipv4: Some("192.0.2.10/24".into()),
                gateway4: Some("192.0.2.1".into()),
            },
            Nic { mac: "aa:00:00:00:00:02".into(), ipv4: None, gateway4: None },
        ]
    }

    #[test]
    fn stacks() {
        assert_eq!(detect(|p| p == "/etc/netplan" || p == "/etc/network/interfaces"), Stack::Netplan);
        assert_eq!(detect(|p| p == "/etc/NetworkManager/NetworkManager.conf"), Stack::NetworkManager);
        assert_eq!(detect(|p| p == "/usr/sbin/ifup"), Stack::Ifupdown);
        assert_eq!(detect(|_| false), Stack::Networkd);
    }

    #[test]
    fn renderings() {
        let n = render(Stack::Networkd, &nics());
        assert!(
            n[0].1.contains("MACAddress=aa:00:00:00:00:01")
                && n[0].1.contains("Address=192.0.2.10/24")
                && n[0].1.contains("Gateway=192.0.2.1")
        );
        assert!(n[1].1.contains("DHCP=yes"));
        let i = render(Stack::Ifupdown, &nics());
        assert!(i.iter().any(|(p, t, _)| p.ends_with("imgforge-nic0")
            && t.contains("iface eth0 inet static")
            && t.contains("gateway 192.0.2.1")));
        assert!(i.iter().any(|(p, t, _)| p.ends_with(".link") && t.contains("Name=eth1")));
        let m = render(Stack::NetworkManager, &nics());
        assert!(m[0].1.contains("address1=192.0.2.10/24,192.0.2.1") && m[0].2 == 0o600);
        let y = render(Stack::Netplan, &nics());
        assert!(y[1].1.contains("dhcp4: true") && y[0].1.contains("via: \"192.0.2.1\""));
    }
}
