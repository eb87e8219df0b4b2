//! Lists of local source addresses (`127.0.0.2-127.0.0.9,::1`), for clients that spread
//! their connections over several source IPs (the load generator's `--source`, the
//! testkit's clients). Pure parsing; one definition for every client.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

/// Most addresses one IPv4 range may name.
pub const MAX_RANGE: u32 = 65_536;

/// Why a source list was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceError {
    /// A part that is not an address (the text of that part).
    BadAddress(String),
    /// A range whose first address is past its last, or longer than [`MAX_RANGE`].
    BadRange(String),
    /// The list names no address at all.
    Empty,
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceError::BadAddress(a) => write!(f, "bad source address {a:?}"),
            SourceError::BadRange(r) => write!(
                f,
                "bad source range {r:?} (first to last, at most 65,536 addresses)"
            ),
            SourceError::Empty => f.write_str("the source list names no address"),
        }
    }
}

impl std::error::Error for SourceError {}

/// Parses "127.0.0.2", "127.0.0.2-127.0.0.9" (IPv4 ranges), "::1", or a comma list of them.
pub fn parse_sources(spec: &str) -> Result<Vec<IpAddr>, SourceError> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let (a, b) = (u32::from(v4(a)?), u32::from(v4(b)?));
            if a > b || b - a >= MAX_RANGE {
                return Err(SourceError::BadRange(part.to_string()));
            }
            out.extend((a..=b).map(|v| IpAddr::V4(Ipv4Addr::from(v))));
        } else {
            let ip = part.parse();
            out.push(ip.map_err(|_| SourceError::BadAddress(part.to_string()))?);
        }
    }
    if out.is_empty() {
        return Err(SourceError::Empty);
    }
    Ok(out)
}

fn v4(s: &str) -> Result<Ipv4Addr, SourceError> {
    let s = s.trim();
    s.parse()
        .map_err(|_| SourceError::BadAddress(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_lists_and_refusals() {
        let v = parse_sources("127.0.0.2-127.0.0.4, 127.0.0.9,::1").unwrap();
        assert_eq!(v.len(), 5);
        assert_eq!(v[2], "127.0.0.4".parse::<IpAddr>().unwrap());
        assert_eq!(v[4], "::1".parse::<IpAddr>().unwrap());
        assert!(matches!(
            parse_sources("127.0.0.4-127.0.0.2"),
            Err(SourceError::BadRange(_))
        ));
        assert_eq!(
            parse_sources("10.0.0.0-10.1.0.0").unwrap_err().to_string(),
            "bad source range \"10.0.0.0-10.1.0.0\" (first to last, at most 65,536 addresses)"
        );
        assert_eq!(
            parse_sources("10.0.0.0-10.0.255.255").unwrap().len(),
            65_536
        );
        assert_eq!(
            parse_sources("127.0.0.1-x"),
            Err(SourceError::BadAddress("x".into()))
        );
        assert_eq!(parse_sources(","), Err(SourceError::Empty));
        assert_eq!(parse_sources(""), Err(SourceError::Empty));
    }
}
