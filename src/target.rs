//! Which network addresses a webhook may reach.
//!
//! Pure classification of IP addresses, shared by config validation (literal
//! IPs in URLs are refused up front) and by the delivery resolver (every
//! address actually dialled is checked, so DNS cannot smuggle one in).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why `ip` is not a public unicast address, or `None` when it is.
pub fn blocked_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => v6_reason(v6),
    }
}

fn v4_reason(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match () {
        _ if ip.is_loopback() => "a loopback address",
        _ if ip.is_unspecified() || a == 0 => "an unspecified address",
        _ if ip.is_private() => "a private address",
        _ if ip.is_link_local() => "a link-local address",
        _ if a == 100 && (64..128).contains(&b) => "a carrier-grade NAT address",
        _ if ip.is_multicast() => "a multicast address",
        _ if ip.is_broadcast() => "a broadcast address",
        _ if ip.is_documentation() => "a documentation address",
        _ if a == 198 && (b == 18 || b == 19) => "a benchmarking address",
        _ if a == 192 && b == 0 && c == 0 => "an IETF protocol address",
        _ if a >= 240 => "a reserved address",
        _ => return None,
    })
}

fn v6_reason(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return v4_reason(v4);
    }
    let s = ip.segments();
    // NAT64 (64:ff9b::/96 and the local-use 64:ff9b:1::/48) embeds an IPv4 target.
    if s[0] == 0x64 && s[1] == 0xff9b && (s[2] == 1 || s[2..6] == [0, 0, 0, 0]) {
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        return v4_reason(v4).or(Some("a NAT64 address"));
    }
    Some(match () {
        _ if ip.is_loopback() => "a loopback address",
        _ if ip.is_unspecified() => "an unspecified address",
        _ if s[0] & 0xfe00 == 0xfc00 => "a unique-local address",
        _ if s[0] & 0xffc0 == 0xfe80 => "a link-local address",
        _ if s[0] & 0xffc0 == 0xfec0 => "a site-local address",
        _ if ip.is_multicast() => "a multicast address",
        _ if s[0] == 0x2001 && s[1] == 0x0db8 => "a documentation address",
        _ if s[0..6] == [0, 0, 0, 0, 0, 0] => "an IPv4-compatible address",
        _ if s[0] == 0x0100 && s[1..4] == [0, 0, 0] => "a discard-only address",
        _ if s[0] == 0x2002 => "a 6to4 address",
        _ if s[0] == 0x2001 && s[1] < 0x0200 => "an IETF protocol address",
        _ => return None,
    })
}

/// An address range in CIDR form, for `[delivery] allowed_cidrs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    len: u8,
}

impl Cidr {
    /// Parses `10.1.0.0/16` or `fd00::/8`; host bits must be zero.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, len) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not in CIDR form like \"10.1.0.0/16\""))?;
        let net: IpAddr = addr.parse().map_err(|_| format!("{addr:?} is not an IP address"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("prefix length must be 0 to {max}"))?;
        let cidr = Cidr { net, len };
        if cidr.masked(net) != Some(bits(net)) {
            return Err(format!("{text:?} has host bits set"));
        }
        Ok(cidr)
    }

    /// `ip` with the host bits cleared, if it is of this range's family.
    fn masked(&self, ip: IpAddr) -> Option<u128> {
        let (width, value) = match (self.net, ip) {
            (IpAddr::V4(_), IpAddr::V4(v)) => (32, u32::from(v) as u128),
            (IpAddr::V6(_), IpAddr::V6(v)) => (128, u128::from(v)),
            _ => return None,
        };
        let host_bits = width - self.len as u32;
        Some(if host_bits >= 128 { 0 } else { value >> host_bits << host_bits })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.masked(ip) == Some(bits(self.net))
    }
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v) => u32::from(v) as u128,
        IpAddr::V6(v) => u128::from(v),
    }
}

/// Why a connection to `ip` is refused under this policy, if it is.
pub fn refused(ip: IpAddr, allow_private: bool, allowed: &[Cidr]) -> Option<&'static str> {
    if allow_private || allowed.iter().any(|c| c.contains(ip)) {
        return None;
    }
    blocked_reason(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Option<&'static str> {
        blocked_reason(s.parse().unwrap())
    }

    #[test]
    fn blocks_every_non_public_family() {
        for (ip, why) in [
            ("127.0.0.1", "a loopback address"),
            ("0.0.0.0", "an unspecified address"),
            ("10.1.2.3", "a private address"),
            ("172.16.0.1", "a private address"),
            ("192.168.1.1", "a private address"),
            ("169.254.169.254", "a link-local address"),
            ("100.64.0.1", "a carrier-grade NAT address"),
            ("224.0.0.1", "a multicast address"),
            ("255.255.255.255", "a broadcast address"),
            ("192.0.2.1", "a documentation address"),
            ("240.0.0.1", "a reserved address"),
            ("::1", "a loopback address"),
            ("::", "an unspecified address"),
            ("fd00::1", "a unique-local address"),
            ("fe80::1", "a link-local address"),
            ("ff02::1", "a multicast address"),
            ("2001:db8::1", "a documentation address"),
            ("::ffff:127.0.0.1", "a loopback address"),
            ("::ffff:10.0.0.1", "a private address"),
            ("64:ff9b::7f00:1", "a loopback address"),
            ("64:ff9b::808:808", "a NAT64 address"),
        ] {
            assert_eq!(r(ip), Some(why), "{ip}");
        }
    }

    #[test]
    fn allowed_cidrs_open_exactly_their_range() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.0.9".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(!c.contains("fd00::1".parse().unwrap()));
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("127.0.0.1".parse().unwrap()));
        assert!(Cidr::parse("10.1.0.1/16").is_err(), "host bits");
        assert!(Cidr::parse("10.1.0.0").is_err());
        assert!(Cidr::parse("10.1.0.0/33").is_err());
        let allowed = [c];
        assert_eq!(refused("10.1.2.3".parse().unwrap(), false, &allowed), None);
        assert_eq!(refused("10.9.2.3".parse().unwrap(), false, &allowed), Some("a private address"));
        assert_eq!(refused("10.9.2.3".parse().unwrap(), true, &[]), None);
    }

    #[test]
    fn allows_public_unicast() {
        for ip in ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700::1111", "2a00:1450:4001::1"] {
            assert_eq!(r(ip), None, "{ip}");
        }
    }
}
