//! Properties of [`parse`](super::parse) over both versions: round trips from the encoders,
//! every truncation, byte-at-a-time arrival, and random input.

use std::net::SocketAddr;

use super::*;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Address pairs worth a round trip: both families, mixed, the extremes of every field.
fn pairs() -> Vec<(SocketAddr, SocketAddr)> {
    [
        ("192.0.2.1:1234", "198.51.100.2:80"),
        ("0.0.0.0:0", "255.255.255.255:65535"),
        ("[2001:db8::1]:65535", "[2001:db8::2]:0"),
        ("[::]:1", "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:2"),
        ("[::ffff:192.0.2.1]:7", "[::1]:7"),
        ("192.0.2.1:40000", "[2001:db8::2]:443"),
        ("[fe80::1]:40000", "10.0.0.1:443"),
    ]
    .iter()
    .map(|(s, d)| (sa(s), sa(d)))
    .collect()
}

/// Valid headers of every shape, with what they must parse to.
fn samples() -> Vec<Vec<u8>> {
    let mut all = Vec::new();
    for (s, d) in pairs() {
        all.push(encode_v1(s, d).into_bytes());
        let mut v2 = Vec::new();
        encode_v2(s, d, &mut v2);
        all.push(v2);
    }
    all.push(b"PROXY UNKNOWN\r\n".to_vec());
    all.push(b"PROXY UNKNOWN ffff:: ffff:: 65535 65535\r\n".to_vec());
    let mut local = Vec::new();
    encode_v2_local(&mut local);
    all.push(local);
    let mut tlv = Vec::new();
    encode_v2(sa("192.0.2.1:1"), sa("192.0.2.2:2"), &mut tlv);
    tlv.extend_from_slice(&[0x01, 0, 2, b'h', b'2', 0x04, 0, 0]);
    tlv[15] += 8;
    all.push(tlv);
    all
}

fn expected(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    super::one_family(src, dst)
}

#[test]
fn what_the_encoders_write_parses_back_to_the_same_addresses() {
    for (src, dst) in pairs() {
        let v1 = encode_v1(src, dst);
        let mut v2 = Vec::new();
        encode_v2(src, dst, &mut v2);
        for (version, bytes) in [(1, v1.as_bytes()), (2, &v2[..])] {
            let mut with_data = bytes.to_vec();
            with_data.extend_from_slice(b"hello");
            let Ok(Parsed::Done { header_len, header }) = parse(&with_data) else {
                panic!("v{version} {src} {dst}: {:?}", parse(&with_data));
            };
            assert_eq!(header_len, bytes.len());
            assert_eq!(header.version, version);
            assert_eq!(header.command, Command::Proxy);
            assert_eq!(header.transport, Transport::Stream);
            let (s, d) = expected(src, dst);
            assert_eq!((header.source, header.destination), (Some(s), Some(d)));
            let family = if s.is_ipv4() {
                Family::Inet
            } else {
                Family::Inet6
            };
            assert_eq!(header.family, family);
        }
    }
}

#[test]
fn every_truncation_is_incomplete_and_asks_for_more() {
    for h in samples() {
        for n in 0..h.len() {
            match parse(&h[..n]) {
                Ok(Parsed::Incomplete { need_at_least }) => {
                    assert!(
                        need_at_least > n && need_at_least <= h.len(),
                        "{h:x?} cut at {n}: asks for {need_at_least}"
                    );
                    if h[0] == b'\r' && n >= 16 {
                        assert_eq!(need_at_least, h.len(), "v2 knows its length");
                    }
                }
                other => panic!("{h:x?} cut at {n}: {other:?}"),
            }
        }
        assert!(matches!(parse(&h), Ok(Parsed::Done { header_len, .. }) if header_len == h.len()));
    }
}

#[test]
fn a_header_arriving_one_byte_at_a_time_completes_on_its_last_byte() {
    for h in samples() {
        let mut acc = Vec::new();
        let mut stream = h.clone();
        stream.extend_from_slice(b"echo me");
        let mut done_at = None;
        for (i, &b) in stream.iter().enumerate() {
            acc.push(b);
            match parse(&acc) {
                Ok(Parsed::Incomplete { need_at_least }) => {
                    assert!(done_at.is_none());
                    assert!(need_at_least > acc.len());
                }
                Ok(Parsed::Done { header_len, .. }) => {
                    assert_eq!(header_len, h.len());
                    done_at.get_or_insert(i + 1);
                }
                Err(e) => panic!("{h:x?} after {} bytes: {e}", acc.len()),
            }
        }
        assert_eq!(done_at, Some(h.len()), "{h:x?}");
    }
}

// xorshift64*, seeded: the same buffers on every run unless `ECHOPORT_FUZZ_SEED` says.
use crate::testing::Rng;

/// A random buffer: noise, a signature and noise, or a valid header with a few bytes
/// changed, cut, or overwritten with the characters a v1 line is made of.
fn random_buffer(rng: &mut Rng, samples: &[Vec<u8>]) -> Vec<u8> {
    const V1_CHARS: &[u8] = b"PROXY TCP46UNKOWabcdef0123456789.:\r\n ";
    let mut b = match rng.below(4) {
        0 => (0..rng.below(200)).map(|_| rng.next() as u8).collect(),
        1 => {
            let mut b = if rng.below(2) == 0 {
                b"PROXY ".to_vec()
            } else {
                let mut v = V2_SIGNATURE.to_vec();
                v.push(0x20 | rng.below(3) as u8);
                v.push([0x00, 0x11, 0x12, 0x21, 0x22, 0x31][rng.below(6)]);
                v.extend_from_slice(&(rng.below(300) as u16).to_be_bytes());
                v
            };
            let n = rng.below(300);
            b.extend((0..n).map(|_| match rng.below(2) {
                0 => V1_CHARS[rng.below(V1_CHARS.len())],
                _ => rng.next() as u8,
            }));
            b
        }
        _ => samples[rng.below(samples.len())].clone(),
    };
    for _ in 0..rng.below(4) {
        if b.is_empty() {
            break;
        }
        let i = rng.below(b.len());
        b[i] = match rng.below(3) {
            0 => rng.next() as u8,
            1 => V1_CHARS[rng.below(V1_CHARS.len())],
            _ => b[i] ^ (1 << rng.below(8)),
        };
    }
    if rng.below(4) == 0 {
        let cut = rng.below(b.len() + 1);
        b.truncate(cut);
    }
    b
}

#[derive(Default, Debug)]
struct Seen {
    done: u64,
    incomplete: u64,
    not_proxy: u64,
    malformed: u64,
    too_long: u64,
    unsupported: u64,
}

#[test]
fn a_hundred_thousand_random_buffers_never_panic_and_never_look_past_the_header() {
    let seed = std::env::var("ECHOPORT_FUZZ_SEED")
        .map(|s| s.parse().expect("ECHOPORT_FUZZ_SEED is a number"))
        .unwrap_or(0x5eed_f00d_u64);
    eprintln!("proxy fuzz seed {seed} (ECHOPORT_FUZZ_SEED replays)");
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let samples = samples();
    let mut seen = Seen::default();
    for case in 0..100_000 {
        let buf = random_buffer(&mut rng, &samples);
        let verdict = parse(&buf);
        match verdict {
            Ok(Parsed::Done { header_len, header }) => {
                seen.done += 1;
                assert!(header_len <= buf.len() && header_len <= MAX_HEADER_LEN);
                // The same verdict from the header alone: nothing after it was read.
                assert_eq!(
                    parse(&buf[..header_len]),
                    verdict,
                    "case {case}, seed {seed}"
                );
                assert_eq!(header.source.is_some(), header.destination.is_some());
            }
            Ok(Parsed::Incomplete { need_at_least }) => {
                seen.incomplete += 1;
                assert!(need_at_least > buf.len(), "case {case}, seed {seed}");
                assert!(need_at_least <= MAX_HEADER_LEN);
            }
            Err(ProxyError::NotProxy) => seen.not_proxy += 1,
            Err(ProxyError::Malformed(_)) => seen.malformed += 1,
            Err(ProxyError::TooLong) => seen.too_long += 1,
            Err(ProxyError::Unsupported) => seen.unsupported += 1,
        }
    }
    eprintln!("{seen:?}");
    // Every outcome was reached, so the fuzzing exercised every path.
    let Seen {
        done,
        incomplete,
        not_proxy,
        malformed,
        too_long,
        unsupported,
    } = seen;
    for (what, n) in [
        ("done", done),
        ("incomplete", incomplete),
        ("not proxy", not_proxy),
        ("malformed", malformed),
        ("too long", too_long),
        ("unsupported", unsupported),
    ] {
        assert!(n > 100, "only {n} {what} in 100,000 cases: {seen:?}");
    }
}
