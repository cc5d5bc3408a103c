//! Which addresses an http(s) fetch may connect to: any (URLs the operator gives), or public
//! ones only (URLs a Ganeti tenant gives as OS parameters: loopback, link-local — where cloud
//! metadata services answer —, private, unspecified, multicast and reserved addresses belong to
//! the node and its networks, not to the tenant). The check runs in the HTTP client's resolver,
//! on the very addresses it then connects to, for the first request and every redirect: a name
//! that resolves to 127.0.0.1, or re-resolves to it between two lookups, is refused too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};

/// The `/etc/default/imgforge` setting that lets tenants' URLs reach non-public addresses.
pub const ALLOW_SETTING: &str = "URL_ALLOW_PRIVATE_ADDRESSES";

/// The addresses a fetch may connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Any address: the operator's own URLs (the CLI).
    Any,
    /// Public addresses only, for a URL the OS parameter `param` gave.
    PublicOnly {
        /// The parameter named in a refusal (`img_id`, `config_url`).
        param: &'static str,
    },
}

/// What kind of non-public address `ip` is, or `None` for a public one. IPv6 addresses that
/// carry an IPv4 one (v4-mapped `::ffff:a.b.c.d`, v4-compatible `::a.b.c.d`, NAT64
/// `64:ff9b::a.b.c.d`) are judged by it. Pure.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    Some(match ip.octets() {
        [0, ..] => "an unspecified (0.0.0.0/8)",
        [127, ..] => "a loopback",
        [169, 254, ..] => "a link-local (cloud metadata)",
        [10, ..] | [192, 168, ..] | [172, 16..=31, ..] => "a private",
        [100, 64..=127, ..] => "a shared (carrier-grade NAT)",
        [224..=239, ..] => "a multicast",
        [240..=255, ..] => "a reserved or broadcast",
        _ => return None,
    })
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_unspecified() {
        return Some("an unspecified");
    }
    if ip.is_loopback() {
        return Some("a loopback");
    }
    let [.., a, b, c, d] = ip.octets();
    let embedded = Ipv4Addr::new(a, b, c, d);
    match s {
        [0, 0, 0, 0, 0, 0xffff, ..] | [0, 0, 0, 0, 0, 0, ..] | [0x64, 0xff9b, 0, 0, 0, 0, ..] => {
            return non_public_v4(embedded);
        }
        _ => {}
    }
    Some(match s[0] {
        0xfe80..=0xfebf => "a link-local",
        0xfec0..=0xfeff => "a site-local",
        0xfc00..=0xfdff => "a private (unique local)",
        0xff00..=0xffff => "a multicast",
        _ => return None,
    })
}

/// The refusal of `host`, which resolved to `ip` of `kind`, for a URL of `param`.
fn refusal(param: &str, host: &str, ip: IpAddr, kind: &str) -> String {
    let which = if host.trim_matches(['[', ']']) == ip.to_string() {
        format!("{ip} is {kind} address")
    } else {
        format!("{host} resolves to {ip}, {kind} address")
    };
    format!(
        "{which}, which a URL given as OS parameter {param} may not reach; \
         {ALLOW_SETTING}=yes in /etc/default/imgforge allows it"
    )
}

/// ureq's resolver, refusing a name when any of its addresses is not public; the refusal is
/// also kept in `refused`, for the client to report it as it is.
#[derive(Debug)]
pub struct PublicOnlyResolver {
    inner: DefaultResolver,
    param: &'static str,
    /// The last refusal.
    pub refused: Arc<Mutex<Option<String>>>,
}

impl PublicOnlyResolver {
    /// A resolver for a URL given as `param`.
    pub fn new(param: &'static str) -> Self {
        Self { inner: DefaultResolver::default(), param, refused: Arc::default() }
    }
}

impl Resolver for PublicOnlyResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let addrs = self.inner.resolve(uri, config, timeout)?;
        // Any one refused refuses the name: a name with a public and a private address is a
        // misconfiguration or an attack, and connecting to whichever answers would hide it.
        let found = addrs.iter().find_map(|a| non_public(a.ip()).map(|kind| (a.ip(), kind)));
        if let Some((ip, kind)) = found {
            let message = refusal(self.param, uri.host().unwrap_or_default(), ip, kind);
            *self.refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(message.clone());
            return Err(ureq::Error::Io(std::io::Error::new(std::io::ErrorKind::PermissionDenied, message)));
        }
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_table() {
        let public = [
            "1.1.1.1",
            "8.8.8.8",
            "172.15.255.255",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "169.253.0.1",
            "223.255.255.255",
            "2001:4860:4860::8888",
            "2a00:1450::1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "fbff::1",
        ];
        for ip in public {
            assert_eq!(non_public(ip.parse().unwrap()), None, "{ip}");
        }
        let refused = [
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("127.0.0.1", "loopback"),
            ("127.255.255.254", "loopback"),
            ("169.254.169.254", "link-local"),
            ("10.0.0.1", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("100.64.0.1", "shared"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.250", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("fec0::1", "site-local"),
            ("fc00::1", "unique local"),
            ("fd12:3456::1", "unique local"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "link-local"),
            ("::ffff:10.1.2.3", "private"),
            ("::ffff:0.0.0.0", "unspecified"),
            ("::127.0.0.1", "loopback"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
        ];
        for (ip, kind) in refused {
            let got = non_public(ip.parse().unwrap());
            assert!(got.is_some_and(|k| k.contains(kind)), "{ip}: {got:?}");
        }
    }

    #[test]
    fn refusals_name_the_address_and_the_setting() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let by_name = refusal("img_id", "images.example", ip, "a loopback");
        assert!(by_name.starts_with("images.example resolves to 127.0.0.1, a loopback address"), "{by_name}");
        assert!(by_name.contains("OS parameter img_id") && by_name.contains("URL_ALLOW_PRIVATE_ADDRESSES=yes"));
        let literal = refusal("config_url", "[::1]", "::1".parse().unwrap(), "a loopback");
        assert!(literal.starts_with("::1 is a loopback address"), "{literal}");
    }
}
