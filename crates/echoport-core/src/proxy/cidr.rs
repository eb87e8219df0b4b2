//! [`Cidr`]: an IP network written `ADDR/LEN` (or a bare address, one host), as
//! `--proxy-from` names the peers allowed to send a PROXY header.
//!
//! IPv4 peers on a dual-stack socket arrive as IPv4-mapped IPv6 (`::ffff:a.b.c.d`); both
//! peers and networks in that form are read as the IPv4 they stand for, so `10.0.0.0/8`
//! matches `::ffff:10.1.2.3`. Otherwise the families do not cross: `::/0` is every IPv6
//! peer, not every peer, so that a list meant for IPv6 never lets IPv4 peers in by surprise.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IP network: an address and how many leading bits of it are the network.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a text is not a [`Cidr`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum CidrError {
    /// The part before `/` is not an IPv4 or IPv6 address.
    BadAddress,
    /// The prefix length is not a decimal number within the family's bits.
    BadPrefix {
        /// 32 or 128.
        max: u8,
    },
    /// Bits after the prefix are set (`10.0.0.1/8`): probably a typo.
    HostBitsSet {
        /// The network that was probably meant.
        network: Cidr,
    },
}

impl fmt::Display for CidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CidrError::BadAddress => f.write_str("not an IP address (ADDR or ADDR/LEN)"),
            CidrError::BadPrefix { max } => {
                write!(f, "the prefix length must be a number from 0 to {max}")
            }
            CidrError::HostBitsSet { network } => {
                write!(f, "bits after the prefix are set; the network is {network}")
            }
        }
    }
}

impl std::error::Error for CidrError {}

impl Cidr {
    /// The network of `addr`'s first `prefix` bits; the address must have no bits set
    /// after them. An IPv4-mapped network of at least 96 bits becomes the IPv4 network.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, CidrError> {
        let max = bits(addr);
        if prefix > max {
            return Err(CidrError::BadPrefix { max });
        }
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) if prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), prefix - 96),
                None => (addr, prefix),
            },
            a => (a, prefix),
        };
        let network = Cidr {
            addr: masked(addr, prefix),
            prefix,
        };
        if network.addr != addr {
            return Err(CidrError::HostBitsSet { network });
        }
        Ok(network)
    }

    /// The network's first address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// How many leading bits are the network.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Address `i` of the network, counted from its first and wrapping round its size (so
    /// any `i` names an address inside it): how a load generator steps through clients.
    pub fn nth(&self, i: u64) -> IpAddr {
        let host_bits = u32::from(bits(self.addr) - self.prefix);
        match self.addr {
            IpAddr::V4(v4) => {
                let size = 1u64 << host_bits;
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) + (i % size) as u32))
            }
            IpAddr::V6(v6) => {
                let step = match 1u128.checked_shl(host_bits) {
                    Some(size) if host_bits < 128 => u128::from(i) % size,
                    _ => u128::from(i),
                };
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) + step))
            }
        }
    }

    /// How many addresses the network holds (saturating at `u64::MAX`).
    pub fn size(&self) -> u64 {
        let host_bits = u32::from(bits(self.addr) - self.prefix);
        1u64.checked_shl(host_bits).unwrap_or(u64::MAX)
    }

    /// Whether `ip` is in this network (an IPv4-mapped `ip` as its IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        bits(ip) == bits(self.addr) && masked(ip, self.prefix) == self.addr
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| CidrError::BadAddress)?;
        let max = bits(addr);
        let prefix = match prefix {
            None => max,
            Some(p) => parse_prefix(p)
                .filter(|&n| n <= max)
                .ok_or(CidrError::BadPrefix { max })?,
        };
        Cidr::new(addr, prefix)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// 1-3 decimal digits, no sign, no leading zero (but `0`).
fn parse_prefix(p: &str) -> Option<u8> {
    let ok = !p.is_empty()
        && p.len() <= 3
        && p.bytes().all(|b| b.is_ascii_digit())
        && !(p.len() > 1 && p.starts_with('0'));
    ok.then(|| p.parse().ok()).flatten()
}

fn bits(a: IpAddr) -> u8 {
    if a.is_ipv4() { 32 } else { 128 }
}

fn masked(a: IpAddr, prefix: u8) -> IpAddr {
    match a {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_contain_what_they_should_and_nothing_else() {
        let n = c("10.0.0.0/8");
        assert!(n.contains(ip("10.0.0.0")));
        assert!(n.contains(ip("10.255.255.255")));
        assert!(!n.contains(ip("11.0.0.0")));
        assert!(!n.contains(ip("9.255.255.255")));
        let n = c("192.0.2.128/25");
        assert!(n.contains(ip("192.0.2.200")));
        assert!(!n.contains(ip("192.0.2.127")));
        let n = c("2001:db8::/32");
        assert!(n.contains(ip("2001:db8:ffff::1")));
        assert!(!n.contains(ip("2001:db9::1")));
        let host = c("127.0.0.1");
        assert_eq!(host.prefix(), 32);
        assert!(host.contains(ip("127.0.0.1")));
        assert!(!host.contains(ip("127.0.0.2")));
        assert_eq!(c("::1").prefix(), 128);
        assert!(c("::1").contains(ip("::1")));
    }

    #[test]
    fn nth_steps_through_the_network_and_wraps() {
        let n = c("192.0.2.0/30");
        let got: Vec<IpAddr> = (0..6).map(|i| n.nth(i)).collect();
        let want: Vec<IpAddr> = ["192.0.2.0", "192.0.2.1", "192.0.2.2", "192.0.2.3"]
            .iter()
            .chain(["192.0.2.0", "192.0.2.1"].iter())
            .map(|s| ip(s))
            .collect();
        assert_eq!(got, want);
        assert_eq!(n.size(), 4);
        assert_eq!(c("10.0.0.7").nth(99), ip("10.0.0.7"));
        assert_eq!(c("2001:db8::/120").nth(257), ip("2001:db8::1"));
        assert_eq!(c("::/0").nth(5), ip("::5"));
        assert_eq!(c("0.0.0.0/0").nth(u64::MAX), ip("255.255.255.255"));
        assert_eq!(c("::/0").size(), u64::MAX);
        for i in 0..1000 {
            assert!(c("198.51.100.0/26").contains(c("198.51.100.0/26").nth(i)));
        }
    }

    #[test]
    fn zero_prefixes_match_their_whole_family_only() {
        assert!(c("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(c("0.0.0.0/0").contains(ip("::ffff:203.0.113.9")));
        assert!(!c("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(c("::/0").contains(ip("2001:db8::1")));
        assert!(
            !c("::/0").contains(ip("203.0.113.9")),
            "no IPv4 by surprise"
        );
        assert!(!c("::/0").contains(ip("::ffff:203.0.113.9")));
    }

    #[test]
    fn ipv4_mapped_peers_and_networks_are_their_ipv4() {
        let n = c("10.0.0.0/8");
        assert!(n.contains(ip("::ffff:10.1.2.3")));
        assert!(!n.contains(ip("::ffff:11.1.2.3")));
        let mapped = c("::ffff:10.0.0.0/104");
        assert_eq!(mapped, n);
        assert_eq!(mapped.to_string(), "10.0.0.0/8");
        assert!(mapped.contains(ip("10.9.9.9")));
        assert_eq!(c("::ffff:127.0.0.1"), c("127.0.0.1/32"));
        // Not mapped: IPv4-compatible stays IPv6 and matches no IPv4 peer.
        assert!(!c("::10.0.0.0/104").contains(ip("10.1.2.3")));
    }

    #[test]
    fn bad_networks_are_refused_with_the_reason() {
        assert_eq!("".parse::<Cidr>(), Err(CidrError::BadAddress));
        assert_eq!("10.0.0/8".parse::<Cidr>(), Err(CidrError::BadAddress));
        assert_eq!("[::1]/128".parse::<Cidr>(), Err(CidrError::BadAddress));
        assert_eq!(
            "fe80::1%eth0/64".parse::<Cidr>(),
            Err(CidrError::BadAddress)
        );
        assert_eq!("localhost/8".parse::<Cidr>(), Err(CidrError::BadAddress));
        assert_eq!("/8".parse::<Cidr>(), Err(CidrError::BadAddress));
        for p in ["33", "", "-1", "+8", "08", "8 ", "1000", "x"] {
            assert_eq!(
                format!("10.0.0.0/{p}").parse::<Cidr>(),
                Err(CidrError::BadPrefix { max: 32 }),
                "{p:?}"
            );
        }
        assert_eq!(
            "::/129".parse::<Cidr>(),
            Err(CidrError::BadPrefix { max: 128 })
        );
        assert_eq!(
            "10.0.0.0/8/8".parse::<Cidr>(),
            Err(CidrError::BadPrefix { max: 32 })
        );
        let e = "10.0.0.1/8".parse::<Cidr>().unwrap_err();
        assert_eq!(
            e,
            CidrError::HostBitsSet {
                network: c("10.0.0.0/8")
            }
        );
        assert_eq!(
            e.to_string(),
            "bits after the prefix are set; the network is 10.0.0.0/8"
        );
        assert!("2001:db8::1/32".parse::<Cidr>().is_err());
        assert_eq!(c("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(c("2001:db8::/32").to_string(), "2001:db8::/32");
    }
}
