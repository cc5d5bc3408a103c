//! Network configuration for the stack the guest uses: netplan, NetworkManager (also when
//! snf-image's `NM_NETWORKING` asks for it), ifcfg files on Red Hat-family guests, ifupdown, or
//! systemd-networkd (the fallback, with the directories it needs). Interfaces are matched by
//! MAC address, never by a name the guest's kernel may give differently. IPv6 follows snf-image:
//! SLAAC with EUI-64 addresses (no privacy extensions: Ganeti derives the address from the MAC),
//! optionally with stateless DHCPv6, or stateful DHCPv6.

use crate::guest::GuestRoot;
use imgforge_protocol::rules::{Ipv6Mode, Nic};

/// The guest's network stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    /// `/etc/netplan`.
    Netplan,
    /// `/etc/NetworkManager` keyfiles.
    NetworkManager,
    /// `/etc/sysconfig/network-scripts/ifcfg-*` (Red Hat family).
    Ifcfg,
    /// `/etc/network/interfaces` (ifupdown).
    Ifupdown,
    /// systemd-networkd (also the fallback).
    Networkd,
}

/// Picks the stack from what exists in the guest (pure over a predicate); `network_manager`
/// (snf-image's `NM_NETWORKING`) picks NetworkManager whatever the guest has.
pub fn detect(exists: impl Fn(&str) -> bool, network_manager: bool) -> Stack {
    if network_manager {
        Stack::NetworkManager
    } else if exists("/etc/netplan") {
        Stack::Netplan
    } else if exists("/etc/redhat-release") && exists("/etc/sysconfig/network-scripts") {
        Stack::Ifcfg
    } else if exists("/etc/NetworkManager/NetworkManager.conf") {
        Stack::NetworkManager
    } else if exists("/etc/network/interfaces") || exists("/sbin/ifup") || exists("/usr/sbin/ifup") {
        Stack::Ifupdown
    } else {
        Stack::Networkd
    }
}

/// The dotted netmask of a prefix length (`24` → `255.255.255.0`), for ifcfg's NETMASK.
fn netmask(prefix: u8) -> String {
    let bits = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix.min(32))) };
    std::net::Ipv4Addr::from(bits).to_string()
}

/// `address/prefix` split for ifcfg.
fn split_cidr(cidr: &str) -> (&str, u8) {
    let (ip, len) = cidr.split_once('/').unwrap_or((cidr, "32"));
    (ip, len.parse().unwrap_or(32))
}

/// A `.link` file naming the MAC's interface `name`, for stacks that configure by name.
fn link_file(i: usize, nic: &Nic, name: &str) -> (String, String, u32) {
    (
        format!("/etc/systemd/network/10-imgforge-nic{i}.link"),
        format!("[Match]\nMACAddress={}\n\n[Link]\nName={name}\n", nic.mac),
        0o644,
    )
}

/// Files to write (path, contents, mode) for `nics` on `stack` (pure); `uuids` name the
/// NetworkManager connections, one a NIC.
pub fn render(stack: Stack, nics: &[Nic], uuids: &[String]) -> Vec<(String, String, u32)> {
    let mut files = Vec::new();
    for (i, nic) in nics.iter().enumerate() {
        let name = format!("eth{i}");
        let v6 = nic.ipv6 != Ipv6Mode::None;
        match stack {
            Stack::Networkd => {
                let mut net = format!("[Match]\nMACAddress={}\n\n[Network]\n", nic.mac);
                if let Some(addr) = &nic.ipv4 {
                    net.push_str(&format!("Address={addr}\n"));
                    if let Some(gw) = &nic.gateway4 {
                        net.push_str(&format!("Gateway={gw}\n"));
                    }
                }
                match (nic.dhcp4, nic.ipv6 == Ipv6Mode::Dhcp) {
                    (true, true) => net.push_str("DHCP=yes\n"),
                    (true, false) => net.push_str("DHCP=ipv4\n"),
                    (false, true) => net.push_str("DHCP=ipv6\n"),
                    (false, false) => {}
                }
                if v6 {
                    // Router advertisements; their O flag starts stateless DHCPv6 (slaac_dhcp).
                    net.push_str("IPv6AcceptRA=yes\nIPv6PrivacyExtensions=no\n");
                }
                files.push((format!("/etc/systemd/network/50-imgforge-nic{i}.network"), net, 0o644));
            }
            Stack::Netplan => {
                let mut y = format!(
                    "network:\n  version: 2\n  ethernets:\n    nic{i}:\n      match:\n        macaddress: \"{}\"\n",
                    nic.mac
                );
                if let Some(addr) = &nic.ipv4 {
                    y.push_str(&format!("      addresses: [\"{addr}\"]\n"));
                    if let Some(gw) = &nic.gateway4 {
                        y.push_str(&format!("      routes:\n        - to: default\n          via: \"{gw}\"\n"));
                    }
                }
                if nic.dhcp4 {
                    y.push_str("      dhcp4: true\n");
                }
                if nic.ipv6 == Ipv6Mode::Dhcp {
                    y.push_str("      dhcp6: true\n");
                }
                if v6 {
                    y.push_str("      accept-ra: true\n      ipv6-privacy: false\n");
                }
                files.push((format!("/etc/netplan/50-imgforge-nic{i}.yaml"), y, 0o600));
            }
            Stack::NetworkManager => {
                let ipv4 = match (&nic.ipv4, nic.dhcp4) {
                    (Some(addr), _) => format!(
                        "method=manual\naddress1={addr}{}\n",
                        nic.gateway4.as_ref().map(|g| format!(",{g}")).unwrap_or_default()
                    ),
                    (None, true) => "method=auto\n".into(),
                    (None, false) => "method=disabled\n".into(),
                };
                let ipv6 = if v6 { "method=auto" } else { "method=disabled" };
                let uuid = uuids.get(i).map(|u| format!("uuid={u}\n")).unwrap_or_default();
                let text = format!(
                    "[connection]\nid=imgforge-nic{i}\n{uuid}type=ethernet\nautoconnect=true\n\n[ethernet]\nmac-address={}\n\n[ipv4]\n{ipv4}\n[ipv6]\naddr-gen-mode=eui64\nip6-privacy=0\n{ipv6}\n",
                    nic.mac
                );
                files.push((
                    format!("/etc/NetworkManager/system-connections/imgforge-nic{i}.nmconnection"),
                    text,
                    0o600,
                ));
            }
            Stack::Ifcfg => {
                // ifcfg's DEVICE is a name: the .link file gives the MAC's interface that name.
                files.push(link_file(i, nic, &name));
                let mut text = format!("DEVICE={name}\nONBOOT=yes\nHWADDR={}\nNM_CONTROLLED=yes\n", nic.mac);
                match (&nic.ipv4, nic.dhcp4) {
                    (Some(addr), _) => {
                        let (ip, prefix) = split_cidr(addr);
                        text.push_str(&format!("BOOTPROTO=static\nIPADDR={ip}\nNETMASK={}\n", netmask(prefix)));
                    }
                    (None, true) => text.push_str("BOOTPROTO=dhcp\n"),
                    (None, false) => text.push_str("BOOTPROTO=none\nIPV4_FAILURE_FATAL=no\n"),
                }
                text.push_str(match nic.ipv6 {
                    Ipv6Mode::Dhcp => "IPV6INIT=yes\nDHCPV6C=yes\n",
                    Ipv6Mode::Slaac => "IPV6INIT=yes\nIPV6_AUTOCONF=yes\n",
                    Ipv6Mode::SlaacDhcp => "IPV6INIT=yes\nIPV6_AUTOCONF=yes\nDHCPV6C=yes\nDHCPV6C_OPTIONS=\"-S\"\n",
                    Ipv6Mode::None => "IPV6_FAILURE_FATAL=no\n",
                });
                files.push((format!("/etc/sysconfig/network-scripts/ifcfg-{name}"), text, 0o644));
            }
            Stack::Ifupdown => {
                // ifupdown names interfaces: a .link file gives the MAC's interface that name.
                files.push(link_file(i, nic, &name));
                let mut stanza = String::new();
                if let Some(addr) = &nic.ipv4 {
                    stanza.push_str(&format!("iface {name} inet static\n    address {addr}\n"));
                    if let Some(gw) = &nic.gateway4 {
                        stanza.push_str(&format!("    gateway {gw}\n"));
                    }
                } else if nic.dhcp4 {
                    stanza.push_str(&format!("iface {name} inet dhcp\n"));
                }
                stanza.push_str(&match nic.ipv6 {
                    Ipv6Mode::None => String::new(),
                    Ipv6Mode::Slaac => format!("iface {name} inet6 auto\n    privext 0\n"),
                    Ipv6Mode::SlaacDhcp => format!("iface {name} inet6 auto\n    privext 0\n    dhcp 1\n"),
                    Ipv6Mode::Dhcp => format!("iface {name} inet6 dhcp\n"),
                });
                // `auto` for an interface with no stanza would make `ifup -a` fail.
                let text = if stanza.is_empty() {
                    format!("# {name} ({}): Ganeti gave no address or method, left unconfigured\n", nic.mac)
                } else {
                    format!("auto {name}\nallow-hotplug {name}\n{stanza}")
                };
                files.push((format!("/etc/network/interfaces.d/imgforge-nic{i}"), text, 0o644));
            }
        }
    }
    files
}

/// `/etc/sysconfig/network` with snf-image's entries for `nics`: `NETWORKING=yes`,
/// `NETWORKING_IPV6=yes` when a NIC has IPv6, and the last static gateway as `GATEWAY` and
/// `GATEWAYDEV`; the lines they replace dropped, the rest kept (pure).
pub fn sysconfig_network(existing: &str, nics: &[Nic]) -> String {
    let ipv6 = nics.iter().any(|n| n.ipv6 != Ipv6Mode::None);
    let gateway = nics
        .iter()
        .enumerate()
        .filter(|(_, n)| n.ipv4.is_some())
        .filter_map(|(i, n)| n.gateway4.as_ref().map(|g| (i, g)))
        .next_back();
    let mut replaced = vec!["NETWORKING="];
    let mut entries = vec!["NETWORKING=yes".to_owned()];
    if ipv6 {
        replaced.push("NETWORKING_IPV6=");
        entries.push("NETWORKING_IPV6=yes".into());
    }
    if let Some((i, gw)) = gateway {
        replaced.extend(["GATEWAY=", "GATEWAYDEV="]);
        entries.extend([format!("GATEWAY={gw}"), format!("GATEWAYDEV=eth{i}")]);
    }
    let mut out: String =
        existing.lines().filter(|l| !replaced.iter().any(|r| l.starts_with(r))).map(|l| format!("{l}\n")).collect();
    for e in entries {
        out.push_str(&e);
        out.push('\n');
    }
    out
}

/// A random version-4 UUID, for a NetworkManager connection.
fn random_uuid() -> Result<String, String> {
    let mut b = [0u8; 16];
    crate::guest::fill_random(&mut b).map_err(|e| format!("cannot read random bytes: {e}"))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..]))
}

/// Writes the configuration into the guest; `network_manager` is snf-image's `NM_NETWORKING`.
pub fn apply(guest: &GuestRoot, nics: &[Nic], network_manager: bool) -> Result<Stack, String> {
    let stack = detect(|p| guest.exists(p), network_manager);
    let uuids = nics.iter().map(|_| random_uuid()).collect::<Result<Vec<_>, _>>()?;
    for (path, text, mode) in render(stack, nics, &uuids) {
        let dir = &path[..path.rfind('/').unwrap_or(0)];
        guest.mkdir_all(dir, 0o755).map_err(|e| format!("cannot create {dir}: {e}"))?;
        guest.write(&path, text.as_bytes()).map_err(|e| format!("cannot write {path}: {e}"))?;
        guest.chmod(&path, mode).map_err(|e| format!("cannot chmod {path}: {e}"))?;
    }
    if stack == Stack::Ifcfg {
        let path = "/etc/sysconfig/network";
        let existing = if guest.exists(path) {
            guest.read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?
        } else {
            String::new()
        };
        guest
            .write(path, sysconfig_network(&existing, nics).as_bytes())
            .map_err(|e| format!("cannot write {path}: {e}"))?;
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

    fn nic(mac: &str, ipv4: Option<&str>, gateway4: Option<&str>, dhcp4: bool, ipv6: Ipv6Mode) -> Nic {
        Nic { mac: mac.into(), ipv4: ipv4.map(Into::into), gateway4: gateway4.map(Into::into), dhcp4, ipv6 }
    }

    /// Static IPv4 with SLAAC, DHCP with stateless DHCPv6, stateful DHCPv6 only, nothing.
    fn nics() -> Vec<Nic> {
        vec![
            nic("aa:00:00:00:00:01", Some("192.0.2.10/24"), Some("192.0.2.1"), false, Ipv6Mode::Slaac),
            nic("aa:00:00:00:00:02", None, None, true, Ipv6Mode::SlaacDhcp),
            nic("aa:00:00:00:00:03", None, None, false, Ipv6Mode::Dhcp),
            nic("aa:00:00:00:00:04", None, None, false, Ipv6Mode::None),
        ]
    }

    fn uuids() -> Vec<String> {
        (0..4).map(|i| format!("00000000-0000-4000-8000-00000000000{i}")).collect()
    }

    #[test]
    fn stacks() {
        let d = |files: &[&str], nm: bool| detect(|p| files.contains(&p), nm);
        assert_eq!(d(&["/etc/netplan", "/etc/network/interfaces"], false), Stack::Netplan);
        assert_eq!(d(&["/etc/NetworkManager/NetworkManager.conf"], false), Stack::NetworkManager);
        assert_eq!(d(&["/usr/sbin/ifup"], false), Stack::Ifupdown);
        assert_eq!(d(&[], false), Stack::Networkd);
        let redhat =
            ["/etc/redhat-release", "/etc/sysconfig/network-scripts", "/etc/NetworkManager/NetworkManager.conf"];
        assert_eq!(d(&redhat, false), Stack::Ifcfg);
        assert_eq!(d(&redhat[..1], false), Stack::Networkd, "no network-scripts: no ifcfg");
        assert_eq!(d(&redhat[1..], false), Stack::NetworkManager, "not Red Hat: no ifcfg");
        // NM_NETWORKING wins over every stack.
        for files in [&redhat[..], &["/etc/netplan"], &["/usr/sbin/ifup"], &[]] {
            assert_eq!(d(files, true), Stack::NetworkManager, "{files:?}");
        }
    }

    fn text<'a>(files: &'a [(String, String, u32)], suffix: &str) -> &'a str {
        &files.iter().find(|(p, _, _)| p.ends_with(suffix)).unwrap_or_else(|| panic!("{suffix}: {files:?}")).1
    }

    #[test]
    fn networkd() {
        let n = render(Stack::Networkd, &nics(), &[]);
        let t = text(&n, "nic0.network");
        assert!(t.contains("MACAddress=aa:00:00:00:00:01") && t.contains("Address=192.0.2.10/24"));
        assert!(t.contains("Gateway=192.0.2.1") && t.contains("IPv6AcceptRA=yes") && !t.contains("DHCP="), "{t}");
        assert!(text(&n, "nic1.network").contains("DHCP=ipv4\nIPv6AcceptRA=yes"));
        assert!(text(&n, "nic2.network").contains("DHCP=ipv6\nIPv6AcceptRA=yes"));
        let t = text(&n, "nic3.network");
        assert!(!t.contains("DHCP") && !t.contains("IPv6AcceptRA") && !t.contains("\nAddress="), "{t}");
    }

    #[test]
    fn ifupdown() {
        let i = render(Stack::Ifupdown, &nics(), &[]);
        assert_eq!(
            text(&i, "imgforge-nic0"),
            "auto eth0\nallow-hotplug eth0\niface eth0 inet static\n    address 192.0.2.10/24\n    gateway 192.0.2.1\niface eth0 inet6 auto\n    privext 0\n"
        );
        assert_eq!(
            text(&i, "imgforge-nic1"),
            "auto eth1\nallow-hotplug eth1\niface eth1 inet dhcp\niface eth1 inet6 auto\n    privext 0\n    dhcp 1\n"
        );
        assert_eq!(text(&i, "imgforge-nic2"), "auto eth2\nallow-hotplug eth2\niface eth2 inet6 dhcp\n");
        assert!(text(&i, "imgforge-nic3").starts_with('#'));
        assert!(text(&i, "10-imgforge-nic3.link").contains("MACAddress=aa:00:00:00:00:04\n\n[Link]\nName=eth3"));
    }

    #[test]
    fn network_manager() {
        let m = render(Stack::NetworkManager, &nics(), &uuids());
        assert!(m.iter().all(|(p, _, mode)| p.ends_with(".nmconnection") && *mode == 0o600));
        let t = text(&m, "nic0.nmconnection");
        for want in [
            "uuid=00000000-0000-4000-8000-000000000000\n",
            "mac-address=aa:00:00:00:00:01\n",
            "[ipv4]\nmethod=manual\naddress1=192.0.2.10/24,192.0.2.1\n",
            "[ipv6]\naddr-gen-mode=eui64\nip6-privacy=0\nmethod=auto\n",
        ] {
            assert!(t.contains(want), "{want:?} not in {t}");
        }
        assert!(text(&m, "nic1.nmconnection").contains("[ipv4]\nmethod=auto\n"));
        assert!(text(&m, "nic2.nmconnection").contains("[ipv4]\nmethod=disabled\n"));
        assert!(text(&m, "nic3.nmconnection").ends_with("ip6-privacy=0\nmethod=disabled\n"));
    }

    #[test]
    fn ifcfg() {
        let f = render(Stack::Ifcfg, &nics(), &[]);
        assert_eq!(
            text(&f, "ifcfg-eth0"),
            "DEVICE=eth0\nONBOOT=yes\nHWADDR=aa:00:00:00:00:01\nNM_CONTROLLED=yes\nBOOTPROTO=static\nIPADDR=192.0.2.10\nNETMASK=255.255.255.0\nIPV6INIT=yes\nIPV6_AUTOCONF=yes\n"
        );
        assert!(text(&f, "ifcfg-eth1")
            .contains("BOOTPROTO=dhcp\nIPV6INIT=yes\nIPV6_AUTOCONF=yes\nDHCPV6C=yes\nDHCPV6C_OPTIONS=\"-S\"\n"));
        assert!(text(&f, "ifcfg-eth2").contains("IPV4_FAILURE_FATAL=no\nIPV6INIT=yes\nDHCPV6C=yes\n"));
        assert!(text(&f, "ifcfg-eth3").ends_with("IPV6_FAILURE_FATAL=no\n"));
        assert!(text(&f, "10-imgforge-nic0.link").contains("Name=eth0"));
        for (prefix, mask) in [(0, "0.0.0.0"), (8, "255.0.0.0"), (22, "255.255.252.0"), (32, "255.255.255.255")] {
            assert_eq!(netmask(prefix), mask);
        }
        let net = sysconfig_network("NETWORKING=no\nHOSTNAME=x\nGATEWAY=10.0.0.1\nNOZEROCONF=yes\n", &nics());
        assert_eq!(
            net,
            "HOSTNAME=x\nNOZEROCONF=yes\nNETWORKING=yes\nNETWORKING_IPV6=yes\nGATEWAY=192.0.2.1\nGATEWAYDEV=eth0\n"
        );
        let v4 = [nic("aa:00:00:00:00:01", None, None, true, Ipv6Mode::None)];
        assert_eq!(sysconfig_network("GATEWAY=10.0.0.1\n", &v4), "GATEWAY=10.0.0.1\nNETWORKING=yes\n");
    }

    #[test]
    fn netplan() {
        let y = render(Stack::Netplan, &nics(), &[]);
        let t = text(&y, "nic0.yaml");
        assert!(t.contains("via: \"192.0.2.1\"") && t.contains("accept-ra: true") && !t.contains("dhcp"), "{t}");
        assert!(text(&y, "nic1.yaml").contains("dhcp4: true\n      accept-ra: true"));
        assert!(text(&y, "nic2.yaml").contains("dhcp6: true\n      accept-ra: true"));
        assert!(!text(&y, "nic3.yaml").contains("dhcp") && y.iter().all(|f| f.2 == 0o600));
    }
}
