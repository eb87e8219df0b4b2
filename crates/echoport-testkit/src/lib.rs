//! Utilities for echoport's tests and benchmark scripts: clients that do one hard thing each
//! (hold very many connections, ...). Nothing here ships in the `echoport` binary.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod proxy;

use std::net::{IpAddr, Ipv4Addr};

/// Parses "127.0.0.2", "127.0.0.2-127.0.0.9" or a comma list of either into addresses.
pub fn parse_sources(spec: &str) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a.trim().parse().map_err(|_| format!("bad address {a:?}"))?;
            let b: Ipv4Addr = b.trim().parse().map_err(|_| format!("bad address {b:?}"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if a > b || b - a > 65536 {
                return Err(format!("bad range {part:?}"));
            }
            out.extend((a..=b).map(|v| IpAddr::V4(Ipv4Addr::from(v))));
        } else {
            out.push(part.parse().map_err(|_| format!("bad address {part:?}"))?);
        }
    }
    if out.is_empty() {
        return Err("no source address".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_lists() {
        let v = parse_sources("127.0.0.2-127.0.0.4,::1").unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v[2], "127.0.0.4".parse::<IpAddr>().unwrap());
        assert!(parse_sources("127.0.0.4-127.0.0.2").is_err());
        assert!(parse_sources("").is_err());
    }
}
