//! The PROXY protocol (HAProxy's `proxy-protocol.txt`, versions 1 and 2): a load balancer
//! in front of the server prepends one header to a connection, naming the client it relays.
//!
//! This module owns the wire format only: [`parse`] reads a header from the first bytes of
//! a connection (pure, allocation-free, no I/O, it never looks past the header it reports),
//! [`encode_v1`] and [`encode_v2`] write one (for the load generator), and [`Cidr`] names
//! the peers allowed to send one (`--proxy-from`). What the server does with a header is the
//! connection state machine's business.
//!
//! The receiver must not guess: on a listener configured for the protocol every connection
//! starts with a header, and anything else is an error ([`ProxyError::NotProxy`]).

mod cidr;
mod v1;
mod v2;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::SocketAddr;

pub use cidr::{Cidr, CidrError};
pub use v1::{V1_MAX_LEN, encode_v1};
pub use v2::{V2_MAX_ADDR_LEN, V2_SIGNATURE, encode_v2, encode_v2_local};

/// The longest header [`parse`] accepts, either version: what a per-connection header
/// accumulator must be able to hold.
pub const MAX_HEADER_LEN: usize = 16 + V2_MAX_ADDR_LEN;

/// What the sender says the connection is.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// v2 `LOCAL`: the proxy's own connection (a health check). Use the real endpoints.
    Local,
    /// Relayed on behalf of a client (v1 always, v2 `PROXY`).
    Proxy,
}

/// The address family of the relayed connection.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Family {
    /// Unknown or unsupported (v1 `UNKNOWN`, v2 `AF_UNSPEC`, v2 `LOCAL`): no addresses.
    Unspecified,
    /// IPv4.
    Inet,
    /// IPv6.
    Inet6,
    /// A UNIX socket (v2 only); its paths are skipped, so no addresses.
    Unix,
}

/// The transport of the relayed connection.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Unknown or unsupported.
    Unspecified,
    /// TCP or a UNIX stream.
    Stream,
    /// UDP or a UNIX datagram socket (v2 only).
    Datagram,
}

/// A parsed header.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 1 (text) or 2 (binary).
    pub version: u8,
    /// Relayed or local.
    pub command: Command,
    /// The relayed connection's family.
    pub family: Family,
    /// The relayed connection's transport.
    pub transport: Transport,
    /// The client, when the header names one (IPv4 or IPv6 only).
    pub source: Option<SocketAddr>,
    /// The address the client connected to, when the header names one.
    pub destination: Option<SocketAddr>,
}

impl Header {
    /// A header that names no addresses (v1 `UNKNOWN`, v2 `LOCAL` or unspecified).
    fn unspecified(version: u8, command: Command) -> Header {
        Header {
            version,
            command,
            family: Family::Unspecified,
            transport: Transport::Unspecified,
            source: None,
            destination: None,
        }
    }
}

/// The outcome of [`parse`] when the bytes so far are not wrong.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The bytes so far begin a header; call again once the buffer holds at least
    /// `need_at_least` bytes (exact for v2 once its 16 fixed bytes are in; a lower bound
    /// for v1, whose line ends at its CRLF).
    Incomplete {
        /// Bytes, counted from the start of the connection, needed to go on.
        need_at_least: usize,
    },
    /// A complete header: the connection's own data starts at `header_len`.
    Done {
        /// Bytes of the header, CRLF or TLVs included.
        header_len: usize,
        /// What it says.
        header: Header,
    },
}

/// Why the first bytes of a connection are not an acceptable header.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ProxyError {
    /// They start with neither signature: the peer does not speak the protocol.
    NotProxy,
    /// A header, but not a valid one; the text says which part is wrong.
    Malformed(&'static str),
    /// Longer than accepted: a v1 line without CRLF within 107 bytes, or a v2 header
    /// announcing more than [`V2_MAX_ADDR_LEN`] bytes of addresses and TLVs.
    TooLong,
    /// A v2 signature with a version other than 2.
    Unsupported,
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::NotProxy => f.write_str("no PROXY protocol header"),
            ProxyError::Malformed(what) => write!(f, "malformed PROXY header: {what}"),
            ProxyError::TooLong => write!(
                f,
                "PROXY header too long (v1: {V1_MAX_LEN} bytes with CRLF, v2: {V2_MAX_ADDR_LEN} \
                 bytes after the fixed 16)"
            ),
            ProxyError::Unsupported => f.write_str("PROXY header of an unsupported version"),
        }
    }
}

impl std::error::Error for ProxyError {}

/// Reads a PROXY header (either version) from the first bytes of a connection.
///
/// `buf` holds everything received so far from the start of the connection, and may go on
/// past the header into the connection's own data, which is never looked at.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let Some(&first) = buf.first() else {
        return Ok(Parsed::Incomplete { need_at_least: 1 });
    };
    match first {
        b'P' => v1::parse(buf),
        b'\r' => v2::parse(buf),
        _ => Err(ProxyError::NotProxy),
    }
}

/// Whether `buf` agrees with `prefix` as far as both go: `Some(true)` if it holds all of
/// it, `Some(false)` if it is a shorter part of it, `None` if they differ.
fn starts_with_part(buf: &[u8], prefix: &[u8]) -> Option<bool> {
    let n = buf.len().min(prefix.len());
    (buf[..n] == prefix[..n]).then_some(n == prefix.len())
}

/// `src` and `dst` in one family: as they are if they agree, else both IPv6, the IPv4 one
/// IPv4-mapped (a header carries one family).
fn one_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port())),
        v6 => v6,
    };
    if src.is_ipv4() == dst.is_ipv4() {
        (src, dst)
    } else {
        (v6(src), v6(dst))
    }
}
