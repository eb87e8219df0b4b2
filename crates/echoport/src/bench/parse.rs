//! Parsers of the command line's values: sizes, times, rates, counts, source address lists.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{bail, Context};

use super::params::SizeRange;

/// Parses "64" or "64-512".
pub fn parse_size(s: &str) -> Result<SizeRange, String> {
    let one = |v: &str| -> Result<u32, String> {
        let v = v.trim();
        let n: u64 = parse_scaled(v, 1024.0)
            .filter(|n| n.fract() == 0.0 && *n >= 1.0 && *n <= (1u64 << 30) as f64)
            .ok_or_else(|| format!("bad size {v:?} (bytes from 1 to 1G, e.g. 64, 4k)"))?
            as u64;
        Ok(n as u32)
    };
    let (min, max) = match s.split_once('-') {
        Some((a, b)) => (one(a)?, one(b)?),
        None => {
            let v = one(s)?;
            (v, v)
        }
    };
    if min > max {
        return Err(format!("bad size range {s:?} (MIN above MAX)"));
    }
    Ok(SizeRange { min, max })
}

/// Parses "10", "10s", "1.5s", "500ms", "250us", "2m".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad = || format!("bad time {s:?} (e.g. 10, 10s, 500ms, 2m)");
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().map_err(|_| bad())?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad()),
    };
    let secs = v * scale;
    if !secs.is_finite() || !(0.0..=86400.0 * 365.0).contains(&secs) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses "2000", "150k", "1.5M" (per second).
pub fn parse_rate(s: &str) -> Result<f64, String> {
    parse_scaled(s.trim(), 1000.0)
        .filter(|v| v.is_finite() && *v > 0.0 && *v <= 1e9)
        .ok_or_else(|| format!("bad rate {s:?} (per second, e.g. 2000, 150k, 1.5M)"))
}

pub fn parse_count(s: &str) -> Result<u64, String> {
    parse_scaled(s.trim(), 1000.0)
        .filter(|v| v.fract() == 0.0 && *v >= 0.0 && *v < 1e15)
        .map(|v| v as u64)
        .ok_or_else(|| format!("bad count {s:?} (e.g. 100000, 100k)"))
}

/// A number with an optional k/M/G suffix of `base`.
fn parse_scaled(s: &str, base: f64) -> Option<f64> {
    let (num, mult) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], base),
        'm' | 'M' => (&s[..s.len() - 1], base * base),
        'g' | 'G' => (&s[..s.len() - 1], base * base * base),
        _ => (s, 1.0),
    };
    let v: f64 = num.parse().ok()?;
    Some(v * mult)
}

/// Parses "127.0.0.2", "127.0.0.2-127.0.0.9", "::1", or a comma list of them.
pub fn parse_sources(spec: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a
                .trim()
                .parse()
                .with_context(|| format!("bad source address {a:?}"))?;
            let b: Ipv4Addr = b
                .trim()
                .parse()
                .with_context(|| format!("bad source address {b:?}"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if a > b || b - a >= 65536 {
                bail!("bad source range {part:?} (first to last, at most 65,536 addresses)");
            }
            out.extend((a..=b).map(|v| IpAddr::V4(Ipv4Addr::from(v))));
        } else {
            out.push(
                part.parse()
                    .with_context(|| format!("bad source address {part:?}"))?,
            );
        }
    }
    if out.is_empty() {
        bail!("--source names no address");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64").unwrap(), SizeRange { min: 64, max: 64 });
        assert_eq!(
            parse_size("64-4k").unwrap(),
            SizeRange { min: 64, max: 4096 }
        );
        assert!(parse_size("0").is_err());
        assert!(parse_size("9-3").is_err());
        assert!(parse_size("x").is_err());
        let r = SizeRange { min: 10, max: 12 };
        let seen: std::collections::BTreeSet<u32> = (0..1000u64).map(|k| r.pick(k << 16)).collect();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![10, 11, 12]);
    }

    #[test]
    fn durations_and_rates() {
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert_eq!(parse_rate("150k").unwrap(), 150_000.0);
        assert_eq!(parse_rate("1.5M").unwrap(), 1_500_000.0);
        assert!(parse_rate("0").is_err());
        assert_eq!(parse_count("100k").unwrap(), 100_000);
    }

    #[test]
    fn source_lists() {
        let v = parse_sources("127.0.0.2-127.0.0.4, 127.0.0.9").unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v[2], "127.0.0.4".parse::<IpAddr>().unwrap());
        assert_eq!(v[3], "127.0.0.9".parse::<IpAddr>().unwrap());
        assert!(parse_sources("127.0.0.4-127.0.0.2").is_err());
        assert!(parse_sources(",").is_err());
    }
}
