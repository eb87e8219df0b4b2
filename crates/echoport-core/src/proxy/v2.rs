//! PROXY protocol version 2: a 16-byte binary prefix (signature, version and command,
//! family and transport, length), then the addresses and optional TLVs.
//!
//! Checked as each byte arrives, so a bad version, command or family fails at once rather
//! than after the whole header. The length is capped at [`V2_MAX_ADDR_LEN`]; the address
//! block must be long enough for its family; TLVs are skipped, but each must lie within the
//! header (CRC32c TLVs are not verified). `LOCAL` (a health check) ignores the whole block,
//! as the specification says; so does an unspecified family or transport.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{Command, Family, Header, Parsed, ProxyError, Transport, starts_with_part};

/// The 12 bytes every v2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The most bytes of addresses and TLVs accepted after the fixed 16 (the field allows
/// 65,535; real senders use a few hundred at most).
pub const V2_MAX_ADDR_LEN: usize = 4096;

const FIXED: usize = 16;

type R<T> = Result<T, ProxyError>;

/// Parses a buffer that starts with CR.
pub(super) fn parse(buf: &[u8]) -> R<Parsed> {
    let wait = Ok(Parsed::Incomplete {
        need_at_least: FIXED,
    });
    match starts_with_part(buf, &V2_SIGNATURE) {
        None => return Err(ProxyError::NotProxy),
        Some(false) => return wait,
        Some(true) => {}
    }
    let Some(&ver_cmd) = buf.get(12) else {
        return wait;
    };
    let command = command(ver_cmd)?;
    let Some(&fam) = buf.get(13) else {
        return wait;
    };
    let (family, transport) = family(fam)?;
    let (Some(&hi), Some(&lo)) = (buf.get(14), buf.get(15)) else {
        return wait;
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len > V2_MAX_ADDR_LEN {
        return Err(ProxyError::TooLong);
    }
    let total = FIXED + len;
    let Some(block) = buf.get(FIXED..total) else {
        return Ok(Parsed::Incomplete {
            need_at_least: total,
        });
    };
    let header = match command {
        Command::Local => Header::unspecified(2, Command::Local),
        Command::Proxy => addresses(family, transport, block)?,
    };
    Ok(Parsed::Done {
        header_len: total,
        header,
    })
}

fn command(ver_cmd: u8) -> R<Command> {
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::Unsupported);
    }
    match ver_cmd & 0x0f {
        0 => Ok(Command::Local),
        1 => Ok(Command::Proxy),
        _ => Err(ProxyError::Malformed(
            "v2 command is neither LOCAL nor PROXY",
        )),
    }
}

fn family(fam: u8) -> R<(Family, Transport)> {
    let family = match fam >> 4 {
        0 => Family::Unspecified,
        1 => Family::Inet,
        2 => Family::Inet6,
        3 => Family::Unix,
        _ => return Err(ProxyError::Malformed("v2 address family is not 0-3")),
    };
    let transport = match fam & 0x0f {
        0 => Transport::Unspecified,
        1 => Transport::Stream,
        2 => Transport::Datagram,
        _ => return Err(ProxyError::Malformed("v2 transport is not 0-2")),
    };
    Ok((family, transport))
}

/// The addresses of a `PROXY` header, and a check of the TLVs after them.
fn addresses(family: Family, transport: Transport, block: &[u8]) -> R<Header> {
    let mut h = Header::unspecified(2, Command::Proxy);
    h.family = family;
    h.transport = transport;
    if family == Family::Unspecified || transport == Transport::Unspecified {
        return Ok(h);
    }
    let need = match family {
        Family::Inet => 12,
        Family::Inet6 => 36,
        _ => 216,
    };
    let Some((addrs, tlvs)) = block.split_at_checked(need) else {
        return Err(ProxyError::Malformed(
            "v2 length too short for its address family",
        ));
    };
    check_tlvs(tlvs)?;
    let port = |at: usize| u16::from_be_bytes([addrs[at], addrs[at + 1]]);
    let (src, dst) = match family {
        Family::Inet => (
            SocketAddr::from((Ipv4Addr::from(word::<4>(addrs, 0)), port(8))),
            SocketAddr::from((Ipv4Addr::from(word::<4>(addrs, 4)), port(10))),
        ),
        Family::Inet6 => (
            SocketAddr::from((Ipv6Addr::from(word::<16>(addrs, 0)), port(32))),
            SocketAddr::from((Ipv6Addr::from(word::<16>(addrs, 16)), port(34))),
        ),
        _ => return Ok(h),
    };
    h.source = Some(src);
    h.destination = Some(dst);
    Ok(h)
}

/// `N` bytes of `b` from `at` (the caller checked the length).
fn word<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut w = [0u8; N];
    w.copy_from_slice(&b[at..at + N]);
    w
}

/// Each TLV is a type byte, a 16-bit length and that many bytes, all within the header.
fn check_tlvs(mut rest: &[u8]) -> R<()> {
    while !rest.is_empty() {
        let [_, hi, lo, ..] = *rest else {
            return Err(ProxyError::Malformed(
                "v2 TLV cut short in its type or length",
            ));
        };
        let end = 3 + usize::from(u16::from_be_bytes([hi, lo]));
        rest = rest
            .get(end..)
            .ok_or(ProxyError::Malformed("v2 TLV longer than the header"))?;
    }
    Ok(())
}

/// Appends the v2 `PROXY` header for a TCP connection from `src` to `dst` to `out`
/// (mixed families: both as IPv6, the IPv4 one IPv4-mapped).
pub fn encode_v2(src: SocketAddr, dst: SocketAddr, out: &mut Vec<u8>) {
    let (src, dst) = super::one_family(src, dst);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21);
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.extend_from_slice(&[0x11, 0, 12]);
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a.ip() {
                std::net::IpAddr::V6(v6) => v6.octets(),
                std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            };
            out.extend_from_slice(&[0x21, 0, 36]);
            out.extend_from_slice(&v6(s));
            out.extend_from_slice(&v6(d));
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
}

/// Appends a v2 `LOCAL` header (what a balancer's health check sends) to `out`.
pub fn encode_v2_local(out: &mut Vec<u8>) {
    out.extend_from_slice(&V2_SIGNATURE);
    out.extend_from_slice(&[0x20, 0x00, 0, 0]);
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;

    /// A v2 header: version/command, family/transport, then `body` (its length is filled in).
    fn v2(ver_cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(ver_cmd);
        h.push(fam);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    fn ipv4_body() -> Vec<u8> {
        vec![192, 0, 2, 1, 198, 51, 100, 2, 0x04, 0xd2, 0x00, 0x50]
    }

    fn done(buf: &[u8]) -> Header {
        match parse(buf) {
            Ok(Parsed::Done { header_len, header }) => {
                assert_eq!(header_len, buf.len());
                header
            }
            other => panic!("{buf:x?}: {other:?}"),
        }
    }

    fn err(buf: &[u8]) -> ProxyError {
        match parse(buf) {
            Err(e) => e,
            ok => panic!("{buf:x?} accepted: {ok:?}"),
        }
    }

    fn sa(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn tcp_and_udp_over_ipv4_and_ipv6() {
        let h = done(&v2(0x21, 0x11, &ipv4_body()));
        assert_eq!((h.version, h.command), (2, Command::Proxy));
        assert_eq!((h.family, h.transport), (Family::Inet, Transport::Stream));
        assert_eq!(h.source, sa("192.0.2.1:1234"));
        assert_eq!(h.destination, sa("198.51.100.2:80"));
        let h = done(&v2(0x21, 0x12, &ipv4_body()));
        assert_eq!(h.transport, Transport::Datagram);
        let mut body = Vec::new();
        body.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&[0xff, 0xff, 0, 0]);
        let h = done(&v2(0x21, 0x21, &body));
        assert_eq!(h.family, Family::Inet6);
        assert_eq!(h.source, sa("[2001:db8::1]:65535"));
        assert_eq!(h.destination, sa("[2001:db8::2]:0"));
        assert_eq!(done(&v2(0x21, 0x22, &body)).transport, Transport::Datagram);
    }

    #[test]
    fn local_unspec_and_unix_carry_no_addresses() {
        // LOCAL ignores its block, whatever is in it (but not its length).
        for body in [&[][..], &ipv4_body()[..], &[0xff; 7][..]] {
            for fam in [0x00, 0x11, 0x21, 0x31] {
                let h = done(&v2(0x20, fam, body));
                assert_eq!(h, Header::unspecified(2, Command::Local));
            }
        }
        for fam in [0x00, 0x01, 0x02, 0x10, 0x20, 0x30] {
            let h = done(&v2(0x21, fam, &[1, 2, 3]));
            assert_eq!((h.source, h.destination), (None, None), "{fam:#x}");
        }
        for fam in [0x31, 0x32] {
            let h = done(&v2(0x21, fam, &[b'/'; 216]));
            assert_eq!(h.family, Family::Unix);
            assert_eq!((h.source, h.destination), (None, None));
        }
        let mut out = Vec::new();
        encode_v2_local(&mut out);
        assert_eq!(done(&out).command, Command::Local);
    }

    #[test]
    fn tlvs_are_skipped_when_they_fit_exactly() {
        let mut body = ipv4_body();
        body.extend_from_slice(&[0x04, 0, 0]); // NOOP, empty
        body.extend_from_slice(&[0x01, 0, 2, b'h', b'2']); // ALPN
        body.extend_from_slice(&[0xe0, 0, 1, 7]); // custom
        assert_eq!(done(&v2(0x21, 0x11, &body)).source, sa("192.0.2.1:1234"));
        let mut unix = vec![0u8; 216];
        unix.extend_from_slice(&[0x05, 0, 1, 9]);
        done(&v2(0x21, 0x31, &unix));
    }

    #[test]
    fn bad_tlvs_are_refused() {
        for tail in [
            &[0x04][..],
            &[0x04, 0],
            &[0x04, 0, 1],
            &[0x01, 0, 3, 1, 2],
            &[0x04, 0, 0, 0x01],
        ] {
            let mut body = ipv4_body();
            body.extend_from_slice(tail);
            assert!(
                matches!(err(&v2(0x21, 0x11, &body)), ProxyError::Malformed(_)),
                "{tail:x?}"
            );
        }
    }

    #[test]
    fn a_changed_signature_byte_is_not_proxy() {
        let good = v2(0x21, 0x11, &ipv4_body());
        for i in 0..12 {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            assert_eq!(err(&bad), ProxyError::NotProxy, "byte {i}");
            assert_eq!(err(&bad[..=i]), ProxyError::NotProxy, "byte {i}, cut there");
        }
    }

    #[test]
    fn every_version_but_2_is_unsupported_and_every_unassigned_value_malformed() {
        for v in (0..16u8).filter(|&v| v != 2) {
            let h = v2(v << 4 | 1, 0x11, &ipv4_body());
            assert_eq!(err(&h), ProxyError::Unsupported, "version {v}");
            assert_eq!(err(&h[..13]), ProxyError::Unsupported, "known at byte 13");
        }
        for c in 2..16u8 {
            let h = v2(0x20 | c, 0x11, &ipv4_body());
            assert!(
                matches!(err(&h[..13]), ProxyError::Malformed(_)),
                "command {c}"
            );
        }
        for f in 4..16u8 {
            let h = v2(0x21, f << 4 | 1, &ipv4_body());
            assert!(
                matches!(err(&h[..14]), ProxyError::Malformed(_)),
                "family {f}"
            );
            let local = v2(0x20, f << 4, &[]);
            assert!(
                matches!(err(&local), ProxyError::Malformed(_)),
                "LOCAL, family {f}"
            );
        }
        for t in 3..16u8 {
            let h = v2(0x21, 0x10 | t, &ipv4_body());
            assert!(
                matches!(err(&h[..14]), ProxyError::Malformed(_)),
                "transport {t}"
            );
        }
    }

    #[test]
    fn a_length_too_short_for_the_family_is_malformed() {
        for (fam, need) in [
            (0x11u8, 12usize),
            (0x12, 12),
            (0x21, 36),
            (0x22, 36),
            (0x31, 216),
        ] {
            for short in [0, 1, need / 2, need - 1] {
                let h = v2(0x21, fam, &vec![1u8; short]);
                assert!(
                    matches!(err(&h), ProxyError::Malformed(_)),
                    "{fam:#x} with {short} bytes"
                );
            }
            done(&v2(0x21, fam, &vec![1u8; need]));
        }
    }

    #[test]
    fn a_length_over_the_cap_is_refused_before_it_arrives() {
        let mut h = v2(0x21, 0x11, &[]);
        h[14..16].copy_from_slice(&((V2_MAX_ADDR_LEN + 1) as u16).to_be_bytes());
        assert_eq!(err(&h), ProxyError::TooLong);
        h[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(err(&h), ProxyError::TooLong);
        // At the cap: wait for all of it, then accept.
        let mut body = ipv4_body();
        body.extend_from_slice(&[0xe0, 0x0f, 0xf1]);
        body.resize(V2_MAX_ADDR_LEN, 0);
        let full = v2(0x21, 0x11, &body);
        assert_eq!(
            parse(&full[..16]),
            Ok(Parsed::Incomplete {
                need_at_least: 16 + V2_MAX_ADDR_LEN
            })
        );
        assert_eq!(done(&full).source, sa("192.0.2.1:1234"));
    }

    #[test]
    fn data_after_the_header_is_not_looked_at() {
        let mut buf = v2(0x21, 0x11, &ipv4_body());
        let len = buf.len();
        buf.extend_from_slice(b"\r\n\r\n\0 anything");
        assert!(matches!(
            parse(&buf),
            Ok(Parsed::Done { header_len, .. }) if header_len == len
        ));
    }
}
