//! Helpers of the PROXY protocol tests: headers good and bad, and clients that send them.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use echoport_core::proxy::{
    ProxyError, V2_SIGNATURE, encode_v1, encode_v2, encode_v2_local, parse,
};

/// A v1 or v2 header naming `src`, as a balancer in front of `server` writes it.
pub fn header(v2: bool, src: SocketAddr, server: SocketAddr) -> Vec<u8> {
    if v2 {
        let mut h = Vec::new();
        encode_v2(src, server, &mut h);
        h
    } else {
        encode_v1(src, server).into_bytes()
    }
}

/// The v2 LOCAL header (a balancer's health check).
pub fn local() -> Vec<u8> {
    let mut h = Vec::new();
    encode_v2_local(&mut h);
    h
}

/// A v2 header from its version/command and family bytes and a body.
pub fn v2_raw(ver_cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    h.push(ver_cmd);
    h.push(fam);
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.extend_from_slice(body);
    h
}

const IPV4_BODY: [u8; 12] = [192, 0, 2, 1, 198, 51, 100, 2, 0x04, 0xd2, 0x00, 0x50];

/// Complete headers that are wrong (malformed or of an unsupported version), each checked
/// against the parser so that the list cannot drift from what the server counts.
pub fn malformed() -> Vec<Vec<u8>> {
    let v1: &[&[u8]] = &[
        b"PROXY\r\n",
        b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY UNKNOWNX\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
        b"PROXY TCP4 1.2.3.4 5.6.7.8\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
        b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 256.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 0x10 2\r\n",
        b"PROXY TCP4 ::1 ::1 1 2\r\n",
        b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
        b"PROXY TCP6 [::1] ::1 1 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
        b"PROXY TCP6 1::2::3 ::1 1 2\r\n",
        b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n",
        b"PROXY TCP4\t1.2.3.4 5.6.7.8 1 2\r\n",
    ];
    let mut all: Vec<Vec<u8>> = v1.iter().map(|l| l.to_vec()).collect();
    // v2: every version but 2, unassigned commands, families and transports.
    all.extend([0x11u8, 0x31, 0xf1].map(|vc| v2_raw(vc, 0x11, &IPV4_BODY)));
    all.extend([0x22u8, 0x2f].map(|vc| v2_raw(vc, 0x11, &IPV4_BODY)));
    all.extend([0x41u8, 0xf1, 0x13, 0x1f].map(|fam| v2_raw(0x21, fam, &IPV4_BODY)));
    // Address blocks too short for their family.
    all.push(v2_raw(0x21, 0x11, &IPV4_BODY[..11]));
    all.push(v2_raw(0x21, 0x21, &[1; 35]));
    all.push(v2_raw(0x21, 0x31, &[b'/'; 215]));
    // TLVs that do not fit their block.
    for tail in [&[0x04][..], &[0x04, 0, 1], &[0x01, 0, 3, 1, 2]] {
        let mut body = IPV4_BODY.to_vec();
        body.extend_from_slice(tail);
        all.push(v2_raw(0x21, 0x11, &body));
    }
    for h in &all {
        assert!(
            matches!(
                parse(h),
                Err(ProxyError::Malformed(_) | ProxyError::Unsupported)
            ),
            "not a malformed sample: {:?} -> {:?}",
            String::from_utf8_lossy(h),
            parse(h)
        );
    }
    all
}

/// Headers the protocol forbids for their length.
pub fn too_long() -> Vec<Vec<u8>> {
    let mut line = b"PROXY TCP4 ".to_vec();
    line.resize(300, b'1');
    let mut big = v2_raw(0x21, 0x11, &IPV4_BODY);
    big[14..16].copy_from_slice(&5000u16.to_be_bytes());
    for h in [&line, &big] {
        assert_eq!(parse(h), Err(ProxyError::TooLong));
    }
    vec![line, big]
}

/// Reads until the server closes; returns the bytes it sent first (there should be none).
/// `Err` when it stays open past `limit`.
pub fn closed_within(s: &mut TcpStream, limit: Duration) -> Result<Vec<u8>, String> {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(got),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("still open after {limit:?}: {e}")),
        }
    }
}

/// One proxied echo: `header` and `first` in one write (or the header cut in two with a
/// pause, when `split`), then `second`; each echo must be exact and nothing else may come,
/// the header least of all. Returns the bytes echoed.
pub fn proxied_echo(
    server: SocketAddr,
    header: &[u8],
    first: &[u8],
    second: &[u8],
    split: bool,
) -> Result<u64, String> {
    let mut s = TcpStream::connect(server).map_err(|e| format!("connect: {e}"))?;
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    if split {
        s.write_all(&header[..7])
            .map_err(|e| format!("write: {e}"))?;
        std::thread::sleep(Duration::from_millis(30));
        out.extend_from_slice(&header[7..]);
    } else {
        out.extend_from_slice(header);
    }
    out.extend_from_slice(first);
    s.write_all(&out).map_err(|e| format!("write: {e}"))?;
    for (i, msg) in [first, second].into_iter().enumerate() {
        if i == 1 {
            s.write_all(msg).map_err(|e| format!("write: {e}"))?;
        }
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got)
            .map_err(|e| format!("echo {i} ({} bytes): {e}", msg.len()))?;
        if got != msg {
            return Err(format!("echo {i} differs from what was sent"));
        }
    }
    s.shutdown(Shutdown::Write).unwrap();
    let rest = closed_within(&mut s, Duration::from_secs(5))?;
    if !rest.is_empty() {
        return Err(format!(
            "{} bytes more than was sent: {rest:02x?}",
            rest.len()
        ));
    }
    Ok((first.len() + second.len()) as u64)
}

/// Connections held open on a header that never completes: `dribble` ones write the next
/// byte of `header` every `every`; the others wrote `header[..3]` once. Tracks when the
/// server closes each one.
pub struct Held {
    conns: Vec<(TcpStream, bool, usize, Option<Duration>)>,
    header: Vec<u8>,
    t0: Instant,
}

impl Held {
    pub fn open(server: SocketAddr, dribblers: usize, silent: usize, header: Vec<u8>) -> Held {
        let t0 = Instant::now();
        let conns = (0..dribblers + silent)
            .map(|i| {
                let mut s = TcpStream::connect(server).expect("connecting a held connection");
                let dribble = i < dribblers;
                let sent = if dribble { 1 } else { 3 };
                s.write_all(&header[..sent]).unwrap();
                s.set_nonblocking(true).unwrap();
                (s, dribble, sent, None)
            })
            .collect();
        Held { conns, header, t0 }
    }

    /// Dribbles and watches until every connection is closed or `limit` has passed since
    /// they were opened. Returns the close times (None: still open), or why a connection
    /// failed (it was echoed something).
    pub fn run(
        mut self,
        every: Duration,
        limit: Duration,
    ) -> Result<Vec<Option<Duration>>, String> {
        let mut next_write = Instant::now() + every;
        while self.t0.elapsed() < limit && self.conns.iter().any(|c| c.3.is_none()) {
            let write = Instant::now() >= next_write;
            if write {
                next_write += every;
            }
            for (s, dribble, sent, closed) in &mut self.conns {
                if closed.is_some() {
                    continue;
                }
                match s.read(&mut [0u8; 64]) {
                    Ok(0) => *closed = Some(self.t0.elapsed()),
                    Ok(n) => return Err(format!("a held connection was sent {n} bytes")),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => *closed = Some(self.t0.elapsed()),
                }
                let due = closed.is_none() && write && *dribble && *sent < self.header.len() - 1;
                if due && s.write_all(&self.header[*sent..*sent + 1]).is_ok() {
                    *sent += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(self.conns.iter().map(|c| c.3).collect())
    }
}
