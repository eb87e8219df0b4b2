//! Parsers of the command line's values: sizes, times, rates, counts, source address lists.

use std::net::IpAddr;
use std::time::Duration;

use echoport_core::sources::SourceError;

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

/// Parses `--source` (see [`echoport_core::sources::parse_sources`]).
pub fn parse_sources(spec: &str) -> anyhow::Result<Vec<IpAddr>> {
    echoport_core::sources::parse_sources(spec).map_err(|e| match e {
        SourceError::Empty => anyhow::anyhow!("--source names no address"),
        e => e.into(),
    })
}

/// Parses a wall-clock time: RFC 3339 (`2026-12-01T10:00:00Z`, `...T11:00:00.5+01:00`) or
/// seconds since the Unix epoch (`1764583200`, `1764583200.5`). Returns Unix seconds.
pub fn parse_time(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let bad = || {
        format!("bad time {s:?} (RFC 3339 like 2026-12-01T10:00:00Z or +01:00, or Unix seconds)")
    };
    if let Ok(v) = s.parse::<f64>() {
        return (v.is_finite() && v >= 0.0).then_some(v).ok_or_else(bad);
    }
    rfc3339(s).ok_or_else(bad)
}

fn rfc3339(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    if b.len() < 20 || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let p = s.get(r)?;
        p.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| p.parse().ok())?
    };
    let seps = [(4, b'-'), (7, b'-'), (13, b':'), (16, b':')];
    if seps.iter().any(|&(i, c)| b[i] != c) {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut frac = 0.0;
    if let Some(r) = rest.strip_prefix('.') {
        let n = r.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        frac = format!("0.{}", &r[..n]).parse().ok()?;
        rest = &r[n..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let oh: i64 = rest.get(1..3)?.parse().ok()?;
            let om: i64 = rest.get(4..6)?.parse().ok()?;
            if rest.len() != 6 || &rest[3..4] != ":" || oh > 23 || om > 59 {
                return None;
            }
            sign * (oh * 3600 + om * 60)
        }
    };
    let days = days_from_civil(y, mo, d);
    let t = days * 86400 + h * 3600 + mi * 60 + sec - offset;
    (t >= 0).then_some(t as f64 + frac)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (eras of 400 years, March-based
/// years so the leap day comes last).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Unix seconds as RFC 3339 in UTC, to the millisecond.
pub fn rfc3339_utc(unix_s: f64) -> String {
    let ms = (unix_s.max(0.0) * 1000.0).round() as i64;
    let (secs, ms) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, sod) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
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
    #[test]
    fn wall_clock_times() {
        assert_eq!(parse_time("0").unwrap(), 0.0);
        assert_eq!(parse_time("1764583200.5").unwrap(), 1_764_583_200.5);
        assert_eq!(parse_time("2026-12-01T10:00:00Z").unwrap(), 1_796_119_200.0);
        assert_eq!(parse_time("1970-01-01T00:00:00Z").unwrap(), 0.0);
        assert_eq!(
            parse_time("2000-02-29T12:00:00.25Z").unwrap(),
            951_825_600.25
        );
        assert_eq!(
            parse_time("2026-12-01T11:30:00+01:30").unwrap(),
            parse_time("2026-12-01T10:00:00Z").unwrap()
        );
        assert_eq!(
            parse_time("2026-12-01 05:00:00-05:00").unwrap(),
            parse_time("2026-12-01T10:00:00z").unwrap()
        );
        for bad in [
            "",
            "soon",
            "-5",
            "2026-13-01T10:00:00Z",
            "2026-12-01T10:00:00",
            "2026-12-01T10:00Z",
            "2026-12-01T10:00:00+1:00",
            "2026-12-01T10:00:00.Z",
        ] {
            assert!(parse_time(bad).is_err(), "{bad:?} accepted");
        }
        for t in [0.0, 951_825_600.25, 1_796_119_200.0, 4_102_444_800.999] {
            assert_eq!(
                parse_time(&rfc3339_utc(t)).unwrap(),
                t,
                "{}",
                rfc3339_utc(t)
            );
        }
        assert_eq!(rfc3339_utc(1_796_119_200.0), "2026-12-01T10:00:00.000Z");
    }
}
