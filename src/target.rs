//! Which network addresses a webhook may reach.
//!
//! Pure classification of IP addresses, shared by config validation (literal
//! IPs in URLs are refused up front) and by the delivery resolver (every
//! address actually dialled is checked, so DNS cannot smuggle one in).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

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

/// Parses an address range like `10.1.0.0/16` or `fd00::/8`, for
/// `[delivery] allowed_cidrs`. Host bits must be zero: `10.1.0.1/16` is
/// refused rather than silently read as `10.1.0.0/16`.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let net: IpNet =
        text.parse().map_err(|_| format!("{text:?} is not an address range like \"10.1.0.0/16\""))?;
    if net.trunc() != net {
        return Err(format!("{text:?} has host bits set; did you mean \"{}\"?", net.trunc()));
    }
    Ok(net)
}

/// Why a connection to `ip` is refused under this policy, if it is. An
/// IPv4-mapped address is in an IPv4 range it is the mapping of.
pub fn refused(ip: IpAddr, allow_private: bool, allowed: &[IpNet]) -> Option<&'static str> {
    let v4 = ip.to_canonical();
    if allow_private || allowed.iter().any(|net| net.contains(&ip) || net.contains(&v4)) {
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

    fn net(s: &str) -> IpNet {
        parse_cidr(s).unwrap()
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
    fn cidrs_must_be_ranges_without_host_bits() {
        assert_eq!(net("10.1.0.0/16").to_string(), "10.1.0.0/16");
        assert_eq!(net("fd00::/8").to_string(), "fd00::/8");
        let e = parse_cidr("10.1.0.1/16").unwrap_err();
        assert!(e.contains("host bits set; did you mean \"10.1.0.0/16\"?"), "{e}");
        assert!(parse_cidr("fd00::1/8").unwrap_err().contains("host bits"));
        for bad in ["10.1.0.0", "10.1.0.0/33", "fd00::/129", "10.1.0.0/", "example.com/8", ""] {
            let e = parse_cidr(bad).unwrap_err();
            assert!(e.contains("is not an address range like \"10.1.0.0/16\""), "{bad}: {e}");
        }
    }

    #[test]
    fn allowed_cidrs_open_exactly_their_range() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let allowed = [net("10.1.0.0/16"), net("fd00::/8")];
        assert_eq!(refused(ip("10.1.200.3"), false, &allowed), None);
        assert_eq!(refused(ip("::ffff:10.1.0.9"), false, &allowed), None, "mapped into an IPv4 range");
        assert_eq!(refused(ip("fd12::1"), false, &allowed), None);
        assert_eq!(refused(ip("10.2.0.1"), false, &allowed), Some("a private address"));
        assert_eq!(refused(ip("fe80::1"), false, &allowed), Some("a link-local address"));
        assert_eq!(refused(ip("::ffff:10.1.0.9"), false, &[net("::ffff:0:0/96")]), None, "an IPv6 range");
        assert_eq!(refused(ip("127.0.0.1"), false, &[net("0.0.0.0/0")]), None);
        assert_eq!(refused(ip("10.9.2.3"), false, &[]), Some("a private address"));
        assert_eq!(refused(ip("10.9.2.3"), true, &[]), None);
        assert_eq!(refused(ip("8.8.8.8"), false, &[]), None);
    }

    #[test]
    fn allows_public_unicast() {
        for ip in ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700::1111", "2a00:1450:4001::1"] {
            assert_eq!(r(ip), None, "{ip}");
        }
    }
}
