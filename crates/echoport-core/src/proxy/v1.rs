//! PROXY protocol version 1: one line of US-ASCII text,
//! `PROXY TCP4|TCP6 SRC DST SPORT DPORT\r\n` or `PROXY UNKNOWN ...\r\n`, at most 107 bytes.
//!
//! Parsed strictly, as the specification asks: exactly one space between fields, IPv4 as
//! four decimal numbers without leading zeros, IPv6 in RFC 4291 text (no zone, no brackets),
//! ports decimal 0-65535 without leading zeros, the family of both addresses matching the
//! protocol, and the line ended by CRLF (never a lone CR or LF). After `UNKNOWN` the rest of
//! the line is ignored, as the specification says.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{Command, Family, Header, Parsed, ProxyError, Transport, starts_with_part};

/// The longest v1 line, CRLF included (`PROXY UNKNOWN` with two full IPv6 addresses).
pub const V1_MAX_LEN: usize = 107;

/// The shortest v1 line: `PROXY UNKNOWN\r\n`.
const V1_MIN_LEN: usize = 15;

type R<T> = Result<T, ProxyError>;

/// Parses a buffer that starts with `P`.
pub(super) fn parse(buf: &[u8]) -> R<Parsed> {
    let incomplete = Parsed::Incomplete {
        need_at_least: (buf.len() + 1).max(V1_MIN_LEN),
    };
    match starts_with_part(buf, b"PROXY") {
        None => return Err(ProxyError::NotProxy),
        Some(false) => return Ok(incomplete),
        Some(true) => {}
    }
    match buf.get(5) {
        None => return Ok(incomplete),
        Some(b' ') => {}
        Some(_) => return Err(ProxyError::Malformed("PROXY is not followed by one space")),
    }
    match line_end(buf)? {
        Some(end) => Ok(Parsed::Done {
            header_len: end + 2,
            header: fields(&buf[6..end])?,
        }),
        None => Ok(incomplete),
    }
}

/// Where the CRLF starts, if it is there yet; an error for a lone CR or LF, or for no CRLF
/// within [`V1_MAX_LEN`] bytes.
fn line_end(buf: &[u8]) -> R<Option<usize>> {
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    for (i, &b) in window.iter().enumerate() {
        match (b, window.get(i + 1)) {
            (b'\r', Some(b'\n')) => return Ok(Some(i)),
            (b'\r', Some(_)) => return Err(ProxyError::Malformed("a CR not followed by LF")),
            (b'\n', _) => return Err(ProxyError::Malformed("a LF not preceded by CR")),
            _ => {}
        }
    }
    if buf.len() >= V1_MAX_LEN {
        return Err(ProxyError::TooLong);
    }
    Ok(None)
}

/// The fields after `PROXY `, the CRLF already cut off.
fn fields(line: &[u8]) -> R<Header> {
    let mut f = line.split(|&b| b == b' ');
    let family = match f.next() {
        Some(b"TCP4") => Family::Inet,
        Some(b"TCP6") => Family::Inet6,
        Some(b"UNKNOWN") => return Ok(Header::unspecified(1, Command::Proxy)),
        _ => {
            return Err(ProxyError::Malformed(
                "protocol is not TCP4, TCP6 or UNKNOWN",
            ));
        }
    };
    let mut next = |what| f.next().ok_or(ProxyError::Malformed(what));
    let src = address(next("no source address")?, family)?;
    let dst = address(next("no destination address")?, family)?;
    let sport = port(next("no source port")?)?;
    let dport = port(next("no destination port")?)?;
    if f.next().is_some() {
        return Err(ProxyError::Malformed(
            "more than four fields after the protocol",
        ));
    }
    Ok(Header {
        version: 1,
        command: Command::Proxy,
        family,
        transport: Transport::Stream,
        source: Some(SocketAddr::new(src, sport)),
        destination: Some(SocketAddr::new(dst, dport)),
    })
}

fn address(field: &[u8], family: Family) -> R<IpAddr> {
    let text =
        std::str::from_utf8(field).map_err(|_| ProxyError::Malformed("non-ASCII address"))?;
    let v4 = text.parse::<Ipv4Addr>();
    let v6 = text.parse::<Ipv6Addr>();
    match (family, v4, v6) {
        (Family::Inet, Ok(a), _) => Ok(IpAddr::V4(a)),
        (Family::Inet6, _, Ok(a)) => Ok(IpAddr::V6(a)),
        (Family::Inet, _, Ok(_)) => Err(ProxyError::Malformed("an IPv6 address after TCP4")),
        (Family::Inet6, Ok(_), _) => Err(ProxyError::Malformed("an IPv4 address after TCP6")),
        _ => Err(ProxyError::Malformed("an address that is not one")),
    }
}

/// A port: 1-5 decimal digits, no leading zero (but `0` itself), at most 65535.
fn port(field: &[u8]) -> R<u16> {
    let bad = ProxyError::Malformed("a port that is not decimal 0-65535 without leading zeros");
    if field.is_empty() || field.len() > 5 || (field.len() > 1 && field[0] == b'0') {
        return Err(bad);
    }
    let mut n: u32 = 0;
    for &b in field {
        if !b.is_ascii_digit() {
            return Err(bad);
        }
        n = n * 10 + u32::from(b - b'0');
    }
    u16::try_from(n).map_err(|_| bad)
}

/// The v1 line for a connection from `src` to `dst`. Both of one family give `TCP4` or
/// `TCP6`; mixed families give `TCP6` with the IPv4 one written IPv4-mapped.
pub fn encode_v1(src: SocketAddr, dst: SocketAddr) -> String {
    let (src, dst) = super::one_family(src, dst);
    let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {proto} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;

    fn done(line: &str) -> Header {
        match parse(line.as_bytes()) {
            Ok(Parsed::Done { header_len, header }) => {
                assert_eq!(header_len, line.len(), "{line:?}");
                header
            }
            other => panic!("{line:?}: {other:?}"),
        }
    }

    fn err(line: &[u8]) -> ProxyError {
        match parse(line) {
            Err(e) => e,
            ok => panic!("{:?} was accepted: {ok:?}", String::from_utf8_lossy(line)),
        }
    }

    fn sa(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn tcp4_and_tcp6_lines_give_their_addresses() {
        let h = done("PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n");
        assert_eq!(h.version, 1);
        assert_eq!(h.command, Command::Proxy);
        assert_eq!(h.family, Family::Inet);
        assert_eq!(h.transport, Transport::Stream);
        assert_eq!(h.source, sa("192.168.0.1:56324"));
        assert_eq!(h.destination, sa("192.168.0.11:443"));
        let h = done("PROXY TCP6 2001:DB8::1 ::ffff:192.0.2.1 0 65535\r\n");
        assert_eq!(h.family, Family::Inet6);
        assert_eq!(h.source, sa("[2001:db8::1]:0"));
        assert_eq!(h.destination, sa("[::ffff:192.0.2.1]:65535"));
        let h = done("PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n");
        assert_eq!(h.source, sa("0.0.0.0:0"));
    }

    #[test]
    fn unknown_ignores_the_rest_of_its_line() {
        for line in [
            "PROXY UNKNOWN\r\n",
            "PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n",
            "PROXY UNKNOWN whatever the sender put here, even  two spaces\r\n",
        ] {
            let h = done(line);
            assert_eq!(h, Header::unspecified(1, Command::Proxy), "{line:?}");
        }
    }

    #[test]
    fn the_longest_line_fits_and_one_byte_more_does_not() {
        let full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let line = format!("PROXY UNKNOWN {full} {full} 65535 65535\r\n");
        assert_eq!(line.len(), V1_MAX_LEN);
        done(&line);
        let tcp6 = format!("PROXY TCP6 {full} {full} 65535 65535\r\n");
        assert_eq!(tcp6.len(), 104);
        done(&tcp6);
        let longer = format!("PROXY UNKNOWN {full} {full} 65535 655350\r\n");
        assert_eq!(err(longer.as_bytes()), ProxyError::TooLong);
        // No CRLF in the first 107 bytes, however the rest goes.
        let junk = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        assert_eq!(err(&junk[..V1_MAX_LEN]), ProxyError::TooLong);
        assert_eq!(err(&junk), ProxyError::TooLong);
        assert!(matches!(
            parse(&junk[..V1_MAX_LEN - 1]),
            Ok(Parsed::Incomplete { .. })
        ));
    }

    #[test]
    fn not_proxy_and_not_yet() {
        assert_eq!(err(b"GET / HTTP/1.1\r\n"), ProxyError::NotProxy);
        assert_eq!(err(b"PRX"), ProxyError::NotProxy);
        assert_eq!(err(b"proxy TCP4"), ProxyError::NotProxy);
        for part in [
            "P",
            "PRO",
            "PROXY",
            "PROXY ",
            "PROXY TCP4 1.2.3.4",
            "PROXY UNKNOWN\r",
        ] {
            match parse(part.as_bytes()) {
                Ok(Parsed::Incomplete { need_at_least }) => {
                    assert!(need_at_least > part.len() && need_at_least >= V1_MIN_LEN)
                }
                other => panic!("{part:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn every_malformed_line_is_refused_with_a_reason() {
        let cases: &[&[u8]] = &[
            b"PROXY\r\n",
            b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY \r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY UNKNOWNX\r\n",
            b"PROXY UNKNOWN\n",
            b"PROXY UNKNOWN \n\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n",
            b"PROXY TCP4\r\n",
            b"PROXY TCP4 \r\n",
            b"PROXY TCP4 1.2.3.4\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
            b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
            b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.08 1 2\r\n",
            b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 256.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.-4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 00\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1a 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 0x10 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 123456 2\r\n",
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP6 ::1 1.2.3.4 1 2\r\n",
            b"PROXY TCP6 [::1] ::1 1 2\r\n",
            b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
            b"PROXY TCP6 1::2::3 ::1 1 2\r\n",
            b"PROXY TCP6 ::: ::1 1 2\r\n",
            b"PROXY TCP6 12345:: ::1 1 2\r\n",
            b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n",
            b"PROXY TCP6 ::ffff:01.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.\xc4\xb4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4\x00 5.6.7.8 1 2\r\n",
            b"PROXY TCP4\t1.2.3.4 5.6.7.8 1 2\r\n",
        ];
        for &line in cases {
            let e = err(line);
            assert!(
                matches!(e, ProxyError::Malformed(_)),
                "{:?}: {e:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn data_after_the_line_is_not_looked_at() {
        let buf = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n\r\nGET garbage \xff\n";
        match parse(buf) {
            Ok(Parsed::Done { header_len, .. }) => assert_eq!(header_len, 32),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn encoding_picks_the_protocol_from_the_addresses() {
        let v4 = "192.0.2.1:1234".parse().unwrap();
        let v6 = "[2001:db8::2]:80".parse().unwrap();
        assert_eq!(
            encode_v1(v4, "198.51.100.2:80".parse().unwrap()),
            "PROXY TCP4 192.0.2.1 198.51.100.2 1234 80\r\n"
        );
        assert_eq!(
            encode_v1(v6, v6),
            "PROXY TCP6 2001:db8::2 2001:db8::2 80 80\r\n"
        );
        assert_eq!(
            encode_v1(v4, v6),
            "PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 1234 80\r\n"
        );
    }
}
