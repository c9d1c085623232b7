//! Which network addresses a webhook may reach.
//!
//! Pure classification of IP addresses, shared by config validation (literal
//! IPs in URLs are refused up front) and by the delivery resolver (every
//! address actually dialled is checked, so DNS cannot smuggle one in).
//!
//! The rule is an allow-list: a target must be globally routable unicast.
//!
//! - IPv4: any address outside the blocks of the IANA IPv4 Special-Purpose
//!   Address Registry that are not "Globally Reachable", and outside multicast
//!   (224.0.0.0/4) and reserved (240.0.0.0/4) space.
//! - IPv6: only global unicast, 2000::/3 (RFC 4291 §2.4, RFC 3587), minus the
//!   blocks of the IANA IPv6 Special-Purpose Address Registry that are not
//!   "Globally Reachable". Anything else, including space IANA has not
//!   allocated yet (4000::/3, 5f00::/16, ...), is refused.
//! - An IPv6 address that carries an IPv4 address at a fixed place is judged
//!   by that IPv4 address: IPv4-mapped ::ffff:0:0/96 (RFC 4291 §2.5.5.2),
//!   IPv4-translated ::ffff:0:0:0/96 (SIIT, RFC 6145 / RFC 7915), the NAT64
//!   well-known prefix 64:ff9b::/96 (RFC 6052, which forbids it for non-global
//!   IPv4 addresses) and 6to4 2002::/16 (RFC 3056, IPv4 in bits 16..48).
//!
//! Sources, taken 2026-12-04 (the IPv6 registry was last updated 2025-10-09):
//! - <https://www.iana.org/assignments/iana-ipv4-special-registry/>
//! - <https://www.iana.org/assignments/iana-ipv6-special-registry/>
//! - <https://www.iana.org/assignments/ipv6-address-space/> (2000::/3)
//! - RFC 6890 and RFC 8190 (what the registries' columns mean).
//!
//! Three choices go further than the registry's "Globally Reachable" column:
//! - 192.0.0.0/24 and 2001::/23 are refused whole, including the few
//!   globally reachable anycast and overlay entries inside them (PCP and TURN
//!   anycast, AMT, AS112, ORCHIDv2, DETs): none of them is a webhook receiver,
//!   and one rule per block is easier to check.
//! - Teredo, 2001::/32 (RFC 4380), is refused outright rather than judged by
//!   its embedded client address. The registry marks it "N/A" inside the
//!   not-globally-reachable 2001::/23; the client address is obfuscated and
//!   is that of the client's NAT, not of the host reached; and packets go
//!   through whichever Teredo relay is nearest, so the IPv4 address says
//!   little about where a connection ends up.
//! - The local-use NAT64 prefix 64:ff9b:1::/48 (RFC 8215) is refused, not
//!   judged by an embedded IPv4 address: it is not globally reachable, and
//!   where the IPv4 address sits depends on the prefix length the local
//!   operator chose (RFC 6052 §2.2).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;

use ipnet::IpNet;

/// IPv4 blocks refused: (block, reason, source). The first match names the reason.
const V4_REFUSED: &[(&str, &str, &str)] = &[
    ("0.0.0.0/8", "an unspecified address", "this network: RFC 791, RFC 1122"),
    ("10.0.0.0/8", "a private address", "RFC 1918"),
    ("100.64.0.0/10", "a carrier-grade NAT address", "RFC 6598"),
    ("127.0.0.0/8", "a loopback address", "RFC 1122"),
    ("169.254.0.0/16", "a link-local address", "RFC 3927"),
    ("172.16.0.0/12", "a private address", "RFC 1918"),
    ("192.0.0.0/24", "an IETF protocol address", "RFC 6890, with all its sub-entries"),
    ("192.0.2.0/24", "a documentation address", "TEST-NET-1, RFC 5737"),
    ("192.88.99.0/24", "a 6to4 relay anycast address", "deprecated, RFC 7526"),
    ("192.168.0.0/16", "a private address", "RFC 1918"),
    ("198.18.0.0/15", "a benchmarking address", "RFC 2544"),
    ("198.51.100.0/24", "a documentation address", "TEST-NET-2, RFC 5737"),
    ("203.0.113.0/24", "a documentation address", "TEST-NET-3, RFC 5737"),
    ("224.0.0.0/4", "a multicast address", "RFC 5771; not unicast"),
    ("255.255.255.255/32", "a broadcast address", "RFC 919, RFC 8190"),
    ("240.0.0.0/4", "a reserved address", "RFC 1112"),
];

/// All of IPv6 global unicast; nothing outside it is accepted.
const V6_GLOBAL_UNICAST: &str = "2000::/3";

/// IPv6 blocks refused: (block, reason, source). The first match names the
/// reason. Those outside 2000::/3 would be refused anyway; they are listed to
/// say why.
const V6_REFUSED: &[(&str, &str, &str)] = &[
    ("::/128", "an unspecified address", "RFC 4291"),
    ("::1/128", "a loopback address", "RFC 4291"),
    ("::/96", "a deprecated IPv4-compatible address", "RFC 4291 §2.5.5.1"),
    ("64:ff9b:1::/48", "a local-use NAT64 address", "RFC 8215"),
    ("100::/64", "a discard-only address", "RFC 6666"),
    ("2001::/32", "a Teredo address", "RFC 4380, RFC 8190; see the module notes"),
    ("2001::/23", "an IETF protocol address", "RFC 2928, with all its sub-entries"),
    ("2001:db8::/32", "a documentation address", "RFC 3849"),
    ("3fff::/20", "a documentation address", "RFC 9637"),
    ("5f00::/16", "an SRv6 segment identifier", "RFC 9602"),
    ("fc00::/7", "a unique-local address", "RFC 4193, RFC 8190"),
    ("fe80::/10", "a link-local address", "RFC 4291"),
    ("fec0::/10", "a site-local address", "deprecated, RFC 3879"),
    ("ff00::/8", "a multicast address", "RFC 4291"),
];

static V4_TABLE: LazyLock<Vec<(IpNet, &str)>> = LazyLock::new(|| table(V4_REFUSED));
static V6_TABLE: LazyLock<Vec<(IpNet, &str)>> = LazyLock::new(|| table(V6_REFUSED));
static GLOBAL_UNICAST: LazyLock<IpNet> =
    LazyLock::new(|| parse_cidr(V6_GLOBAL_UNICAST).expect(V6_GLOBAL_UNICAST));

fn table(rows: &[(&str, &'static str, &str)]) -> Vec<(IpNet, &'static str)> {
    rows.iter().map(|&(net, why, _)| (parse_cidr(net).expect(net), why)).collect()
}

fn first_match(table: &[(IpNet, &'static str)], ip: IpAddr) -> Option<&'static str> {
    table.iter().find(|(net, _)| net.contains(&ip)).map(|&(_, why)| why)
}

/// Why `ip` is not a globally routable unicast address, or `None` when it is.
pub fn blocked_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => v6_reason(v6),
    }
}

fn v4_reason(ip: Ipv4Addr) -> Option<&'static str> {
    first_match(&V4_TABLE, IpAddr::V4(ip))
}

fn v6_reason(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = embedded_v4(ip) {
        return v4_reason(v4);
    }
    if let Some(why) = first_match(&V6_TABLE, IpAddr::V6(ip)) {
        return Some(why);
    }
    if !GLOBAL_UNICAST.contains(&IpAddr::V6(ip)) {
        return Some("an unallocated address (outside 2000::/3)");
    }
    None
}

/// The IPv4 address an IPv6 address stands for, in the forms that put it at
/// a fixed place (see the module notes for the forms refused instead).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let o = ip.octets();
    let last_32_bits = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    match ip.segments() {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(last_32_bits), // IPv4-mapped
        [0, 0, 0, 0, 0xffff, 0, _, _] => Some(last_32_bits), // IPv4-translated (SIIT)
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(last_32_bits), // NAT64 well-known prefix
        [0x2002, ..] => Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])), // 6to4: bits 16..48
        _ => None,
    }
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
    fn the_tables_are_canonical_ranges() {
        assert_eq!(table(V4_REFUSED).len(), V4_REFUSED.len());
        assert_eq!(table(V6_REFUSED).len(), V6_REFUSED.len());
        assert_eq!(*GLOBAL_UNICAST, net("2000::/3"));
    }

    #[test]
    fn refuses_every_ipv4_special_purpose_block() {
        for (ip, why) in [
            ("0.0.0.0", "an unspecified address"),
            ("0.1.2.3", "an unspecified address"),
            ("10.1.2.3", "a private address"),
            ("100.64.0.1", "a carrier-grade NAT address"),
            ("100.127.255.255", "a carrier-grade NAT address"),
            ("127.0.0.1", "a loopback address"),
            ("127.255.0.9", "a loopback address"),
            ("169.254.169.254", "a link-local address"),
            ("172.16.0.1", "a private address"),
            ("172.31.255.255", "a private address"),
            ("192.0.0.9", "an IETF protocol address"),
            ("192.0.0.170", "an IETF protocol address"),
            ("192.0.2.1", "a documentation address"),
            ("192.88.99.1", "a 6to4 relay anycast address"),
            ("192.168.1.1", "a private address"),
            ("198.18.0.1", "a benchmarking address"),
            ("198.19.255.255", "a benchmarking address"),
            ("198.51.100.7", "a documentation address"),
            ("203.0.113.9", "a documentation address"),
            ("224.0.0.1", "a multicast address"),
            ("239.255.255.250", "a multicast address"),
            ("240.0.0.1", "a reserved address"),
            ("255.255.255.254", "a reserved address"),
            ("255.255.255.255", "a broadcast address"),
        ] {
            assert_eq!(r(ip), Some(why), "{ip}");
        }
    }

    #[test]
    fn refuses_all_ipv6_but_global_unicast_and_its_special_blocks() {
        for (ip, why) in [
            ("::", "an unspecified address"),
            ("::1", "a loopback address"),
            ("::7f00:1", "a deprecated IPv4-compatible address"),
            ("64:ff9b:1::a00:1", "a local-use NAT64 address"),
            ("64:ff9b:1:ffff::808:808", "a local-use NAT64 address"),
            ("100::1", "a discard-only address"),
            // Teredo, whose obfuscated client is 127.0.0.1 here and 8.8.8.8 below: refused either way.
            ("2001:0:4136:e378:8000:63bf:80ff:fffe", "a Teredo address"),
            ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", "a Teredo address"),
            ("2001:1::1", "an IETF protocol address"),
            ("2001:2::1", "an IETF protocol address"),
            ("2001:1ff::1", "an IETF protocol address"),
            ("2001:db8::1", "a documentation address"),
            ("3fff::1", "a documentation address"),
            ("3fff:fff:ffff::1", "a documentation address"),
            ("5f00::1", "an SRv6 segment identifier"),
            ("4000::1", "an unallocated address (outside 2000::/3)"),
            ("1fff:ffff::1", "an unallocated address (outside 2000::/3)"),
            ("e000::1", "an unallocated address (outside 2000::/3)"),
            ("fc00::1", "a unique-local address"),
            ("fd00::1", "a unique-local address"),
            ("fe80::1", "a link-local address"),
            ("febf::1", "a link-local address"),
            ("fec0::1", "a site-local address"),
            ("ff02::1", "a multicast address"),
            ("ff0e::1", "a multicast address"),
        ] {
            assert_eq!(r(ip), Some(why), "{ip}");
        }
    }

    #[test]
    fn embedded_ipv4_is_judged_by_the_ipv4_address() {
        for (ip, why) in [
            ("::ffff:127.0.0.1", Some("a loopback address")),
            ("::ffff:10.0.0.1", Some("a private address")),
            ("::ffff:8.8.8.8", None),
            // SIIT, ::ffff:0:0:0/96: 127.0.0.1 and 169.254.169.254.
            ("::ffff:0:7f00:1", Some("a loopback address")),
            ("::ffff:0:a9fe:a9fe", Some("a link-local address")),
            ("::ffff:0:808:808", None),
            // NAT64 well-known prefix: 127.0.0.1, 10.0.0.1, 8.8.8.8.
            ("64:ff9b::7f00:1", Some("a loopback address")),
            ("64:ff9b::a00:1", Some("a private address")),
            ("64:ff9b::808:808", None),
            // 6to4: 127.0.0.1, 169.254.169.254, 192.88.99.1, 8.8.8.8.
            ("2002:7f00:1::", Some("a loopback address")),
            ("2002:a9fe:a9fe:1::1", Some("a link-local address")),
            ("2002:c058:6301::", Some("a 6to4 relay anycast address")),
            ("2002:808:808::", None),
            ("2002:808:808:1:2:3:4:5", None),
        ] {
            assert_eq!(r(ip), why, "{ip}");
        }
        // Only those forms: an IPv4 address elsewhere says nothing.
        assert_eq!(embedded_v4("::ffff:1:7f00:1".parse().unwrap()), None);
        assert_eq!(embedded_v4("64:ff9b:0:0:1::7f00:1".parse().unwrap()), None);
        assert_eq!(embedded_v4("2003::7f00:1".parse().unwrap()), None);
        assert_eq!(embedded_v4("2002:102:304::506:708".parse().unwrap()), Some(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(embedded_v4("::ffff:0:102:304".parse().unwrap()), Some(Ipv4Addr::new(1, 2, 3, 4)));
    }

    #[test]
    fn allows_public_unicast() {
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "93.184.216.34",
            // Just outside refused blocks.
            "1.0.0.0",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.0",
            "192.0.3.0",
            "192.88.98.255",
            "192.88.100.0",
            "192.169.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "198.51.101.0",
            "203.0.114.0",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2a00:1450:4001::1",
            "2001:4860:4860::8888",
            "2001:200::1",
            "2620:4f:8000::1",
            "3fff:1000::1",
            "2c0f:ffff::1",
        ] {
            assert_eq!(r(ip), None, "{ip}");
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
        assert_eq!(
            refused(ip("::ffff:0:a01:9"), false, &allowed),
            Some("a private address"),
            "SIIT is not mapped"
        );
        assert_eq!(refused(ip("::ffff:10.1.0.9"), false, &[net("::ffff:0:0/96")]), None, "an IPv6 range");
        assert_eq!(refused(ip("127.0.0.1"), false, &[net("0.0.0.0/0")]), None);
        assert_eq!(refused(ip("10.9.2.3"), false, &[]), Some("a private address"));
        assert_eq!(refused(ip("10.9.2.3"), true, &[]), None);
        assert_eq!(refused(ip("3fff::1"), true, &[]), None);
        assert_eq!(refused(ip("8.8.8.8"), false, &[]), None);
    }
}
