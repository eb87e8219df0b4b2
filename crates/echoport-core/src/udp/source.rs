//! Which source addresses a UDP echo must never answer, whatever the rates: service and
//! privileged ports, our own ports, and addresses that are not one host (broadcast,
//! multicast, unspecified), also when an IPv6 address carries such an IPv4 address inside
//! it (IPv4-mapped, SIIT-translated, NAT64, 6to4, Teredo) or is the deprecated
//! IPv4-compatible form. Pure functions of the address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::Refusal;

/// Ports of services that answer datagrams themselves (echo, discard, daytime, qotd,
/// chargen, time, DNS, NTP): answering them could start an endless loop.
pub const SERVICE_PORTS: [u16; 8] = [7, 9, 13, 17, 19, 37, 53, 123];

/// How an IPv6 address carries IPv4 addresses, and which.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Embedded {
    /// No IPv4 address inside.
    Nothing,
    /// `::ffff:a.b.c.d` (RFC 4291 2.5.5.2): the IPv4 address itself, on a dual-stack socket.
    Mapped(Ipv4Addr),
    /// `::ffff:0:a.b.c.d` (SIIT, RFC 2765): translated to and from this IPv4 address.
    Translated(Ipv4Addr),
    /// `::a.b.c.d` (RFC 4291 2.5.5.1, deprecated); `::` and `::1` are not this form.
    Compatible(Ipv4Addr),
    /// NAT64 `64:ff9b::/96` (RFC 6052) or the local-use `64:ff9b:1::/48` (RFC 8215): a
    /// reply goes to the last 32 bits. The local-use prefix is read as a /96, the length
    /// translators use by default (a shorter one puts the IPv4 elsewhere; not detected).
    Nat64(Ipv4Addr),
    /// 6to4 `2002::/16` (RFC 3056): the site's IPv4 address in bits 16..48.
    SixToFour(Ipv4Addr),
    /// Teredo `2001::/32` (RFC 4380): the server in bits 32..64, the client's (NAT's)
    /// address in the last 32 bits, inverted.
    Teredo {
        /// The Teredo server.
        server: Ipv4Addr,
        /// The client's public IPv4 address, de-obfuscated.
        client: Ipv4Addr,
    },
}

/// The IPv4 addresses `v6` stands for, where it is one of the forms that embed them.
pub fn embedded_ipv4(v6: Ipv6Addr) -> Embedded {
    let s = v6.segments();
    let o = v6.octets();
    let last = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Embedded::Mapped(last),
        [0, 0, 0, 0, 0xffff, 0, _, _] => Embedded::Translated(last),
        [0, 0, 0, 0, 0, 0, 0, 0 | 1] => Embedded::Nothing,
        [0, 0, 0, 0, 0, 0, _, _] => Embedded::Compatible(last),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] | [0x64, 0xff9b, 1, ..] => Embedded::Nat64(last),
        [0x2002, ..] => Embedded::SixToFour(Ipv4Addr::new(o[2], o[3], o[4], o[5])),
        [0x2001, 0, ..] => Embedded::Teredo {
            server: Ipv4Addr::new(o[4], o[5], o[6], o[7]),
            client: Ipv4Addr::from(!u32::from(last)),
        },
        _ => Embedded::Nothing,
    }
}

/// The source-address checks alone (no rates): `None` if a reply may be sent.
/// `own_ports` are the ports this process serves UDP on: a datagram from any of them is
/// another echo server or ourselves, and answering it could start a loop.
pub fn refuse_source(src: SocketAddr, own_ports: &[u16]) -> Option<Refusal> {
    refuse_port(src.port(), own_ports).or_else(|| refuse_ip(src.ip()))
}

fn refuse_port(port: u16, own_ports: &[u16]) -> Option<Refusal> {
    if port == 0 {
        Some(Refusal::PortZero)
    } else if SERVICE_PORTS.contains(&port) {
        Some(Refusal::ServicePort(port))
    } else if port < 1024 {
        Some(Refusal::PrivilegedPort(port))
    } else if own_ports.contains(&port) {
        Some(Refusal::OwnPort)
    } else {
        None
    }
}

/// Whether an address cannot be one host's: `None` if it may be answered.
pub fn refuse_ip(ip: IpAddr) -> Option<Refusal> {
    match ip {
        IpAddr::V4(v4) => refuse_v4(v4),
        IpAddr::V6(v6) => refuse_v6(v6),
    }
}

fn refuse_v4(v4: Ipv4Addr) -> Option<Refusal> {
    if v4.is_broadcast() {
        Some(Refusal::Broadcast)
    } else if v4.is_multicast() {
        Some(Refusal::Multicast)
    } else if v4.octets()[0] == 0 {
        // 0.0.0.0/8, "this network" (RFC 1122 3.2.1.3): never a source one can answer.
        Some(Refusal::Unspecified)
    } else {
        None
    }
}

fn refuse_v6(v6: Ipv6Addr) -> Option<Refusal> {
    if v6.is_multicast() {
        return Some(Refusal::Multicast);
    }
    if v6.is_unspecified() {
        return Some(Refusal::Unspecified);
    }
    match embedded_ipv4(v6) {
        Embedded::Nothing => None,
        Embedded::Compatible(_) => Some(Refusal::Ipv4Compatible),
        Embedded::Mapped(v4)
        | Embedded::Translated(v4)
        | Embedded::Nat64(v4)
        | Embedded::SixToFour(v4) => refuse_v4(v4),
        Embedded::Teredo { server, client } => refuse_v4(server).or_else(|| refuse_v4(client)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ip6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    fn refused(s: &str) -> Option<Refusal> {
        refuse_ip(s.parse().unwrap())
    }

    const OWN: &[u16] = &[7007, 7008];

    #[test]
    fn ports_that_could_loop_are_refused() {
        assert_eq!(
            refuse_source(a("127.0.0.1:0"), OWN),
            Some(Refusal::PortZero)
        );
        for p in SERVICE_PORTS {
            assert_eq!(
                refuse_source(a(&format!("127.0.0.1:{p}")), OWN),
                Some(Refusal::ServicePort(p))
            );
        }
        assert_eq!(
            refuse_source(a("127.0.0.1:1000"), OWN),
            Some(Refusal::PrivilegedPort(1000))
        );
        for p in OWN {
            assert_eq!(
                refuse_source(a(&format!("127.0.0.2:{p}")), OWN),
                Some(Refusal::OwnPort),
                "every port we serve is ours, not only the socket's own"
            );
        }
        assert_eq!(refuse_source(a("127.0.0.1:1024"), OWN), None);
        assert_eq!(refuse_source(a("[::1]:5000"), OWN), None);
    }

    #[test]
    fn addresses_that_are_not_one_host_are_refused() {
        assert_eq!(refused("255.255.255.255"), Some(Refusal::Broadcast));
        assert_eq!(refused("224.0.0.1"), Some(Refusal::Multicast));
        assert_eq!(refused("239.255.255.250"), Some(Refusal::Multicast));
        assert_eq!(refused("0.0.0.0"), Some(Refusal::Unspecified));
        assert_eq!(refused("0.1.2.3"), Some(Refusal::Unspecified));
        assert_eq!(refused("ff02::1"), Some(Refusal::Multicast));
        assert_eq!(refused("::"), Some(Refusal::Unspecified));
        for ok in [
            "127.0.0.1",
            "10.1.2.3",
            "192.0.2.1",
            "::1",
            "2001:db8::1",
            "fe80::1",
        ] {
            assert_eq!(refused(ok), None, "{ok}");
        }
    }

    #[test]
    fn ipv4_mapped_and_translated_are_judged_by_their_ipv4() {
        assert_eq!(
            embedded_ipv4(ip6("::ffff:192.0.2.1")),
            Embedded::Mapped(Ipv4Addr::new(192, 0, 2, 1))
        );
        assert_eq!(refused("::ffff:224.0.0.1"), Some(Refusal::Multicast));
        assert_eq!(refused("::ffff:255.255.255.255"), Some(Refusal::Broadcast));
        assert_eq!(refused("::ffff:0.0.0.0"), Some(Refusal::Unspecified));
        assert_eq!(refused("::ffff:127.0.0.1"), None);
        assert_eq!(
            embedded_ipv4(ip6("::ffff:0:192.0.2.1")),
            Embedded::Translated(Ipv4Addr::new(192, 0, 2, 1))
        );
        assert_eq!(
            refused("::ffff:0:255.255.255.255"),
            Some(Refusal::Broadcast)
        );
        assert_eq!(refused("::ffff:0:192.0.2.1"), None);
    }

    #[test]
    fn ipv4_compatible_is_refused_but_loopback_and_unspecified_are_not_that_form() {
        assert_eq!(
            embedded_ipv4(ip6("::192.0.2.1")),
            Embedded::Compatible(Ipv4Addr::new(192, 0, 2, 1))
        );
        assert_eq!(refused("::192.0.2.1"), Some(Refusal::Ipv4Compatible));
        assert_eq!(refused("::0.0.0.2"), Some(Refusal::Ipv4Compatible));
        assert_eq!(refused("::255.255.255.255"), Some(Refusal::Ipv4Compatible));
        assert_eq!(embedded_ipv4(ip6("::1")), Embedded::Nothing);
        assert_eq!(embedded_ipv4(ip6("::")), Embedded::Nothing);
        assert_eq!(refused("::1"), None);
        assert_eq!(refused("::"), Some(Refusal::Unspecified));
    }

    #[test]
    fn nat64_is_judged_by_the_ipv4_it_translates_to() {
        assert_eq!(
            embedded_ipv4(ip6("64:ff9b::192.0.2.33")),
            Embedded::Nat64(Ipv4Addr::new(192, 0, 2, 33))
        );
        assert_eq!(refused("64:ff9b::192.0.2.33"), None);
        assert_eq!(
            refused("64:ff9b::255.255.255.255"),
            Some(Refusal::Broadcast)
        );
        assert_eq!(refused("64:ff9b::224.0.0.251"), Some(Refusal::Multicast));
        assert_eq!(refused("64:ff9b::0.0.0.0"), Some(Refusal::Unspecified));
        // The local-use prefix, read as a /96.
        assert_eq!(
            embedded_ipv4(ip6("64:ff9b:1:abcd::198.51.100.7")),
            Embedded::Nat64(Ipv4Addr::new(198, 51, 100, 7))
        );
        assert_eq!(refused("64:ff9b:1::198.51.100.7"), None);
        assert_eq!(refused("64:ff9b:1::ffff:ffff"), Some(Refusal::Broadcast));
        assert_eq!(refused("64:ff9b:1:2:3:4:e000:1"), Some(Refusal::Multicast));
        // Not the well-known prefix: bits 32..96 must be zero.
        assert_eq!(
            embedded_ipv4(ip6("64:ff9b:0:1::ffff:ffff")),
            Embedded::Nothing
        );
    }

    #[test]
    fn six_to_four_is_judged_by_the_site_ipv4() {
        assert_eq!(
            embedded_ipv4(ip6("2002:c000:0221::1")),
            Embedded::SixToFour(Ipv4Addr::new(192, 0, 2, 33))
        );
        assert_eq!(refused("2002:c000:0221::1"), None);
        assert_eq!(refused("2002:ffff:ffff::1"), Some(Refusal::Broadcast));
        assert_eq!(refused("2002:e000:0001:5::9"), Some(Refusal::Multicast));
        assert_eq!(refused("2002::1"), Some(Refusal::Unspecified));
        assert_eq!(
            refused("2002:0a0b:0c0d::ffff:ffff"),
            None,
            "only bits 16..48"
        );
    }

    #[test]
    fn teredo_is_judged_by_its_server_and_its_client() {
        // RFC 4380 §4's example: server 65.54.227.120, client 192.0.2.45 (obfuscated).
        let example = ip6("2001:0:4136:e378:8000:63bf:3fff:fdd2");
        assert_eq!(
            embedded_ipv4(example),
            Embedded::Teredo {
                server: Ipv4Addr::new(65, 54, 227, 120),
                client: Ipv4Addr::new(192, 0, 2, 45),
            }
        );
        assert_eq!(refuse_ip(IpAddr::V6(example)), None);
        // Client 255.255.255.255 is 0.0.0.0 obfuscated; client 224.0.0.1 is 1fff:fffe.
        assert_eq!(
            refused("2001:0:4136:e378:8000:63bf:0:0"),
            Some(Refusal::Broadcast)
        );
        assert_eq!(
            refused("2001:0:4136:e378:8000:63bf:1fff:fffe"),
            Some(Refusal::Multicast)
        );
        assert_eq!(
            refused("2001:0:4136:e378:8000:63bf:ffff:ffff"),
            Some(Refusal::Unspecified)
        );
        // A bad server is as telling as a bad client.
        assert_eq!(
            refused("2001:0:e000:0001:8000:63bf:3fff:fdd2"),
            Some(Refusal::Multicast)
        );
        assert_eq!(
            refused("2001:0:0:0:8000:63bf:3fff:fdd2"),
            Some(Refusal::Unspecified)
        );
        // 2001:db8::/32 (documentation) is not Teredo.
        assert_eq!(embedded_ipv4(ip6("2001:db8::ffff:ffff")), Embedded::Nothing);
    }
}
