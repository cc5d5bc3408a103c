//! Ganeti's NICs (`NIC_*`) as interfaces to configure, decided as snf-image's ConfigureNetwork
//! decides them: IPv4 static or DHCP from the address, subnet and the network's tags; IPv6
//! (SLAAC, SLAAC with stateless DHCPv6, or stateful DHCPv6) when the network has an IPv6
//! gateway; and `DEFAULT_NIC_CONFIG` for a lone NIC Ganeti knows nothing about. Pure functions.

use super::params::ParamError;
use imgforge_protocol::rules::{Ipv6Mode, Nic};
use std::collections::BTreeMap;

/// The site's network settings (`/etc/default/imgforge`), with snf-image's names and defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSettings {
    /// `DHCP_TAGS`: a network with one of these tags hands out IPv4 by DHCP.
    pub dhcp_tags: Vec<String>,
    /// `STATEFUL_DHCPV6_TAGS`: IPv6 by stateful DHCPv6.
    pub stateful_dhcpv6_tags: Vec<String>,
    /// `STATELESS_DHCPV6_TAGS`: IPv6 by SLAAC and stateless DHCPv6.
    pub stateless_dhcpv6_tags: Vec<String>,
    /// `DEFAULT_NIC_CONFIG`: a lone NIC with no address and no IPv6 gateway.
    pub default_nic: DefaultNic,
}

/// What `DEFAULT_NIC_CONFIG` asks for: IPv4 by DHCP or not, and an IPv6 method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DefaultNic {
    /// `dhcp` (alone or before `+`).
    pub dhcp4: bool,
    /// `dhcpv6`, `slaac` or `slaac_dhcp`.
    pub ipv6: Ipv6Mode,
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

impl Default for NicSettings {
    fn default() -> Self {
        Self {
            dhcp_tags: words("auto dhcp nfdhcpd"),
            stateful_dhcpv6_tags: words("dhcpv6 stateful_dhcpv6"),
            stateless_dhcpv6_tags: words("nfdhcpd stateless_dhcpv6"),
            default_nic: DefaultNic { dhcp4: true, ipv6: Ipv6Mode::None },
        }
    }
}

/// The values `DEFAULT_NIC_CONFIG` takes, as snf-image lists them.
const DEFAULT_NIC_VALUES: &str = "'' (none), dhcp, dhcpv6, slaac, slaac_dhcp, dhcp+dhcpv6, dhcp+slaac, dhcp+slaac_dhcp";

/// Parses `DEFAULT_NIC_CONFIG` (exactly snf-image's values; empty leaves the NIC alone).
pub fn parse_default_nic(value: &str) -> Result<DefaultNic, String> {
    let (dhcp4, v6) = match value.strip_prefix("dhcp+") {
        Some(rest) => (true, rest),
        None if value == "dhcp" => (true, ""),
        None => (false, value),
    };
    let ipv6 = match v6 {
        "" => Ipv6Mode::None,
        "dhcpv6" => Ipv6Mode::Dhcp,
        "slaac" => Ipv6Mode::Slaac,
        "slaac_dhcp" => Ipv6Mode::SlaacDhcp,
        _ => return Err(format!("DEFAULT_NIC_CONFIG={value:?} is not one of {DEFAULT_NIC_VALUES}")),
    };
    if dhcp4 && v6.is_empty() && value != "dhcp" {
        return Err(format!("DEFAULT_NIC_CONFIG={value:?} is not one of {DEFAULT_NIC_VALUES}"));
    }
    Ok(DefaultNic { dhcp4, ipv6 })
}

impl NicSettings {
    /// Takes `key=value` from the settings file if the key is one of these; `None` if not.
    pub fn set(&mut self, key: &str, value: &str) -> Option<Result<(), String>> {
        match key {
            "DHCP_TAGS" => self.dhcp_tags = words(value),
            "STATEFUL_DHCPV6_TAGS" => self.stateful_dhcpv6_tags = words(value),
            "STATELESS_DHCPV6_TAGS" => self.stateless_dhcpv6_tags = words(value),
            "DEFAULT_NIC_CONFIG" => match parse_default_nic(value) {
                Ok(d) => self.default_nic = d,
                Err(e) => return Some(Err(e)),
            },
            _ => return None,
        }
        Some(Ok(()))
    }
}

fn err(param: &str, reason: impl Into<String>) -> ParamError {
    ParamError { param: param.into(), reason: reason.into() }
}

/// The prefix length of `subnet` (`192.0.2.0/24`, `2001:db8::/64`), checked against the family.
fn prefix(param: &str, subnet: &str, v6: bool) -> Result<u8, ParamError> {
    let bad = || {
        let example = if v6 { "2001:db8::/64" } else { "192.0.2.0/24" };
        err(param, format!("{subnet:?} is not a subnet such as {example}"))
    };
    let (net, len) = subnet.split_once('/').ok_or_else(bad)?;
    let max = if v6 {
        net.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
        128
    } else {
        net.parse::<std::net::Ipv4Addr>().map_err(|_| bad())?;
        32
    };
    crate::plain_number::parse::<u8>(len).filter(|p| *p <= max).ok_or_else(bad)
}

/// Ganeti's NICs as interfaces to configure (`NIC_COUNT`, `NIC_<i>_MAC`, `_IP`,
/// `_NETWORK_SUBNET`, `_NETWORK_GATEWAY`, `_NETWORK_SUBNET6`, `_NETWORK_GATEWAY6`,
/// `_NETWORK_TAGS`), decided as snf-image decides them.
pub fn nics(env: &BTreeMap<String, String>, settings: &NicSettings) -> Result<Vec<Nic>, ParamError> {
    let count: usize = match env.get("NIC_COUNT").map(|v| v.trim()) {
        None | Some("") => return Ok(Vec::new()),
        Some(v) => crate::plain_number::parse(v).ok_or_else(|| err("NIC_COUNT", format!("{v:?} is not a number")))?,
    };
    let mut out = Vec::new();
    for i in 0..count.min(64) {
        let name = |k: &str| format!("NIC_{i}_{k}");
        let get = |k: &str| env.get(&name(k)).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        let mac = get("MAC").ok_or_else(|| err(&name("MAC"), "is missing"))?;
        let pairs = mac.split(':').collect::<Vec<_>>();
        if pairs.len() != 6 || !pairs.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit())) {
            return Err(err(&name("MAC"), format!("{mac:?} is not a MAC address")));
        }
        let tags = get("NETWORK_TAGS").unwrap_or_default();
        // As snf-image: tags compared exactly; for IPv6 the last matching tag decides, and a
        // tag in both lists means stateless.
        let mut dhcp = false;
        let mut dhcp6 = None;
        for tag in tags.split_whitespace() {
            dhcp |= settings.dhcp_tags.iter().any(|t| t == tag);
            if settings.stateful_dhcpv6_tags.iter().any(|t| t == tag) {
                dhcp6 = Some(Ipv6Mode::Dhcp);
            }
            if settings.stateless_dhcpv6_tags.iter().any(|t| t == tag) {
                dhcp6 = Some(Ipv6Mode::SlaacDhcp);
            }
        }
        let subnet = get("NETWORK_SUBNET");
        // Without a subnet there is no prefix: the card cannot be static.
        dhcp |= subnet.is_none();
        let (mut ipv4, mut gateway4, mut dhcp4) = (None, None, false);
        if let Some(ip) = get("IP") {
            ip.parse::<std::net::Ipv4Addr>().map_err(|_| err(&name("IP"), format!("{ip:?} is not an IPv4 address")))?;
            if dhcp {
                dhcp4 = true;
            } else {
                let len = prefix(&name("NETWORK_SUBNET"), subnet.as_deref().unwrap_or_default(), false)?;
                ipv4 = Some(format!("{ip}/{len}"));
                if let Some(gw) = get("NETWORK_GATEWAY") {
                    gw.parse::<std::net::Ipv4Addr>()
                        .map_err(|_| err(&name("NETWORK_GATEWAY"), format!("{gw:?} is not an IPv4 address")))?;
                    gateway4 = Some(gw);
                }
            }
        }
        if let Some(subnet6) = get("NETWORK_SUBNET6") {
            prefix(&name("NETWORK_SUBNET6"), &subnet6, true)?;
        }
        let mut ipv6 = Ipv6Mode::None;
        if let Some(gw6) = get("NETWORK_GATEWAY6") {
            gw6.parse::<std::net::Ipv6Addr>()
                .map_err(|_| err(&name("NETWORK_GATEWAY6"), format!("{gw6:?} is not an IPv6 address")))?;
            ipv6 = dhcp6.unwrap_or(Ipv6Mode::Slaac);
        }
        if count == 1 && get("IP").is_none() && ipv6 == Ipv6Mode::None {
            // Ganeti's default NIC: nothing known about it but what the site says.
            dhcp4 = settings.default_nic.dhcp4;
            ipv6 = settings.default_nic.ipv6;
        }
        out.push(Nic { mac: mac.to_ascii_lowercase(), ipv4, gateway4, dhcp4, ipv6 });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// One NIC among two (so no default-NIC rule) with the given extra variables.
    fn one(extra: &[(&str, &str)]) -> Result<Nic, ParamError> {
        let mut e = env(&[("NIC_COUNT", "2"), ("NIC_0_MAC", "AA:00:00:77:5e:a9"), ("NIC_1_MAC", "aa:00:00:00:00:01")]);
        e.extend(extra.iter().map(|(k, v)| (format!("NIC_0_{k}"), v.to_string())));
        nics(&e, &NicSettings::default()).map(|mut n| n.remove(0))
    }

    const V4: &[(&str, &str)] =
        &[("IP", "192.0.2.10"), ("NETWORK_SUBNET", "192.0.2.0/24"), ("NETWORK_GATEWAY", "192.0.2.1")];

    #[test]
    fn ipv4_static_dhcp_or_none() {
        let n = one(V4).unwrap();
        assert_eq!(
            (n.ipv4.as_deref(), n.gateway4.as_deref(), n.dhcp4, n.mac.as_str()),
            (Some("192.0.2.10/24"), Some("192.0.2.1"), false, "aa:00:00:77:5e:a9")
        );
        // Every one of snf-image's default DHCP tags, among others.
        for tags in ["dhcp", "auto", "nfdhcpd", "public dhcp", "x nfdhcpd y"] {
            let n = one(&[V4, &[("NETWORK_TAGS", tags)]].concat()).unwrap();
            assert!(n.dhcp4 && n.ipv4.is_none() && n.gateway4.is_none(), "{tags}: {n:?}");
        }
        // Tags are compared exactly, as snf-image's shell does.
        for tags in ["DHCP", "dhcp4", "nodhcp", "auto-dhcp"] {
            let n = one(&[V4, &[("NETWORK_TAGS", tags)]].concat()).unwrap();
            assert!(!n.dhcp4 && n.ipv4.is_some(), "{tags}: {n:?}");
        }
        let n = one(&[("IP", "198.51.100.7")]).unwrap();
        assert!(n.dhcp4 && n.ipv4.is_none(), "an address without a subnet is DHCP: {n:?}");
        let n = one(&[("NETWORK_SUBNET", "192.0.2.0/24"), ("NETWORK_GATEWAY", "192.0.2.1")]).unwrap();
        assert!(!n.dhcp4 && n.ipv4.is_none() && n.ipv6 == Ipv6Mode::None, "no address, no IPv4: {n:?}");
    }

    #[test]
    fn ipv6_from_gateway6_and_tags() {
        let v6 = [("NETWORK_SUBNET6", "2001:db8:1::/64"), ("NETWORK_GATEWAY6", "2001:db8:1::1")];
        let table: &[(&str, Ipv6Mode)] = &[
            ("", Ipv6Mode::Slaac),
            ("public", Ipv6Mode::Slaac),
            ("slaac", Ipv6Mode::Slaac),
            ("dhcpv6", Ipv6Mode::Dhcp),
            ("stateful_dhcpv6", Ipv6Mode::Dhcp),
            ("nfdhcpd", Ipv6Mode::SlaacDhcp),
            ("stateless_dhcpv6", Ipv6Mode::SlaacDhcp),
            // The last matching tag decides.
            ("dhcpv6 nfdhcpd", Ipv6Mode::SlaacDhcp),
            ("stateless_dhcpv6 dhcpv6", Ipv6Mode::Dhcp),
            ("DHCPV6", Ipv6Mode::Slaac),
        ];
        for (tags, want) in table {
            let n = one(&[&v6[..], V4, &[("NETWORK_TAGS", tags)]].concat()).unwrap();
            assert_eq!(n.ipv6, *want, "{tags:?}");
        }
        // nfdhcpd: DHCP for IPv4 and stateless DHCPv6.
        let n = one(&[&v6[..], V4, &[("NETWORK_TAGS", "nfdhcpd")]].concat()).unwrap();
        assert!(n.dhcp4 && n.ipv6 == Ipv6Mode::SlaacDhcp);
        // A subnet6 without a gateway6 is no IPv6, as snf-image.
        let n = one(&[("NETWORK_SUBNET6", "2001:db8:1::/64"), ("NETWORK_TAGS", "dhcpv6")]).unwrap();
        assert_eq!(n.ipv6, Ipv6Mode::None);
        // An IPv6-only NIC.
        let n = one(&v6).unwrap();
        assert!(n.ipv6 == Ipv6Mode::Slaac && !n.dhcp4 && n.ipv4.is_none());
    }

    #[test]
    fn the_default_nic() {
        let lone = env(&[("NIC_COUNT", "1"), ("NIC_0_MAC", "aa:00:00:00:00:01")]);
        let n = nics(&lone, &NicSettings::default()).unwrap();
        assert!(n[0].dhcp4 && n[0].ipv6 == Ipv6Mode::None, "DEFAULT_NIC_CONFIG=dhcp by default");
        let table: &[(&str, bool, Ipv6Mode)] = &[
            ("", false, Ipv6Mode::None),
            ("dhcp", true, Ipv6Mode::None),
            ("dhcpv6", false, Ipv6Mode::Dhcp),
            ("slaac", false, Ipv6Mode::Slaac),
            ("slaac_dhcp", false, Ipv6Mode::SlaacDhcp),
            ("dhcp+dhcpv6", true, Ipv6Mode::Dhcp),
            ("dhcp+slaac", true, Ipv6Mode::Slaac),
            ("dhcp+slaac_dhcp", true, Ipv6Mode::SlaacDhcp),
        ];
        for (value, dhcp4, ipv6) in table {
            let mut s = NicSettings::default();
            s.set("DEFAULT_NIC_CONFIG", value).unwrap().unwrap();
            let n = nics(&lone, &s).unwrap();
            assert_eq!((n[0].dhcp4, n[0].ipv6), (*dhcp4, *ipv6), "{value:?}");
        }
        for bad in ["DHCP", "dhcp+", "slaac+dhcp", "dhcp+dhcp", "static", "dhcp+slaac+dhcpv6"] {
            assert!(NicSettings::default().set("DEFAULT_NIC_CONFIG", bad).unwrap().is_err(), "{bad}");
        }
        // Two NICs: neither is the default one.
        let two = env(&[("NIC_COUNT", "2"), ("NIC_0_MAC", "aa:00:00:00:00:01"), ("NIC_1_MAC", "aa:00:00:00:00:02")]);
        assert!(nics(&two, &NicSettings::default()).unwrap().iter().all(|n| !n.dhcp4 && n.ipv6 == Ipv6Mode::None));
        // A lone NIC with an IPv6 gateway is not the default one either.
        let mut v6 = lone.clone();
        v6.insert("NIC_0_NETWORK_GATEWAY6".into(), "2001:db8::1".into());
        let n = nics(&v6, &NicSettings::default()).unwrap();
        assert!(!n[0].dhcp4 && n[0].ipv6 == Ipv6Mode::Slaac);
    }

    #[test]
    fn site_tags() {
        let mut s = NicSettings::default();
        assert!(s.set("DHCP_TAGS", "ours  theirs").unwrap().is_ok());
        assert!(s.set("STATEFUL_DHCPV6_TAGS", "v6full").unwrap().is_ok());
        assert!(s.set("STATELESS_DHCPV6_TAGS", "").unwrap().is_ok());
        assert!(s.set("IMAGE_DIR", "/x").is_none());
        let e = env(&[
            ("NIC_COUNT", "2"),
            ("NIC_0_MAC", "aa:00:00:00:00:01"),
            ("NIC_0_IP", "192.0.2.10"),
            ("NIC_0_NETWORK_SUBNET", "192.0.2.0/24"),
            ("NIC_0_NETWORK_GATEWAY6", "2001:db8::1"),
            ("NIC_0_NETWORK_TAGS", "theirs v6full"),
            ("NIC_1_MAC", "aa:00:00:00:00:02"),
            ("NIC_1_IP", "192.0.2.11"),
            ("NIC_1_NETWORK_SUBNET", "192.0.2.0/24"),
            ("NIC_1_NETWORK_GATEWAY6", "2001:db8::1"),
            ("NIC_1_NETWORK_TAGS", "nfdhcpd"),
        ]);
        let n = nics(&e, &s).unwrap();
        assert!(n[0].dhcp4 && n[0].ipv6 == Ipv6Mode::Dhcp, "{:?}", n[0]);
        assert!(!n[1].dhcp4 && n[1].ipv6 == Ipv6Mode::Slaac, "nfdhcpd is no tag of this site: {:?}", n[1]);
    }

    #[test]
    fn malformed() {
        let bad: &[(&[(&str, &str)], &str)] = &[
            (&[("MAC", "nope")], "NIC_0_MAC"),
            (&[("IP", "192.0.2.300"), ("NETWORK_SUBNET", "192.0.2.0/24")], "NIC_0_IP"),
            (&[("IP", "2001:db8::5"), ("NETWORK_SUBNET", "192.0.2.0/24")], "NIC_0_IP"),
            (&[("IP", "192.0.2.10"), ("NETWORK_SUBNET", "192.0.2.0")], "NIC_0_NETWORK_SUBNET"),
            (&[("IP", "192.0.2.10"), ("NETWORK_SUBNET", "192.0.2.0/+24")], "NIC_0_NETWORK_SUBNET"),
            (&[("IP", "192.0.2.10"), ("NETWORK_SUBNET", "192.0.2.0/33")], "NIC_0_NETWORK_SUBNET"),
            (
                &[("IP", "192.0.2.10"), ("NETWORK_SUBNET", "192.0.2.0/24"), ("NETWORK_GATEWAY", "gw")],
                "NIC_0_NETWORK_GATEWAY",
            ),
            (&[("NETWORK_GATEWAY6", "192.0.2.1")], "NIC_0_NETWORK_GATEWAY6"),
            (&[("NETWORK_SUBNET6", "2001:db8::/129")], "NIC_0_NETWORK_SUBNET6"),
            (&[("NETWORK_SUBNET6", "192.0.2.0/24")], "NIC_0_NETWORK_SUBNET6"),
        ];
        for (pairs, param) in bad {
            let e = one(pairs).unwrap_err();
            assert_eq!(e.param, *param, "{pairs:?}: {e}");
        }
        let e = nics(&env(&[("NIC_COUNT", "+2")]), &NicSettings::default()).unwrap_err();
        assert_eq!(e.param, "NIC_COUNT");
        assert!(nics(&BTreeMap::new(), &NicSettings::default()).unwrap().is_empty());
    }
}
