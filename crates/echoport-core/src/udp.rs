//! Guards for UDP echo (RFC 862): which datagrams may be answered at all, and how often.
//!
//! UDP echo is a classic reflection and loop weapon: a forged source address turns the
//! server into an amplifier aimed at a victim, and two echo-like services pointed at each
//! other ping-pong forever (CVE-1999-0103, CVE-2024-2169). The BSDs' answer, kept here:
//! never answer well-known service ports, privileged ports, our own port, or broadcast,
//! multicast and unspecified sources; never answer a truncated datagram with a part of it;
//! and cap the rate per source and in total, dropping (never queueing) what exceeds it.
//! Pure logic, no I/O: the caller receives, asks [`UdpGuard::check`], and sends or drops.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

/// Ports of services that answer datagrams themselves (echo, discard, daytime, qotd,
/// chargen, time, DNS, NTP): answering them could start an endless loop.
pub const SERVICE_PORTS: [u16; 8] = [7, 9, 13, 17, 19, 37, 53, 123];

/// Why a datagram was not echoed.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Source port 0 (cannot be a real reply address).
    PortZero,
    /// A well-known service port that answers datagrams itself.
    ServicePort(u16),
    /// A privileged port (below 1024).
    PrivilegedPort(u16),
    /// Our own port: another echo server, or a loop.
    OwnPort,
    /// A broadcast source address.
    Broadcast,
    /// A multicast source address.
    Multicast,
    /// The unspecified address (0.0.0.0 or ::).
    Unspecified,
    /// The datagram did not fit the receive buffer; echoing a part would change it.
    Truncated,
    /// Over this source's rate.
    SourceRate,
    /// Over the server's total rate.
    GlobalRate,
    /// Too many distinct sources are being tracked to admit a new one.
    TooManySources,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::PortZero => f.write_str("source port 0"),
            Refusal::ServicePort(p) => write!(f, "source is service port {p}"),
            Refusal::PrivilegedPort(p) => write!(f, "source port {p} is privileged"),
            Refusal::OwnPort => f.write_str("source port is our own"),
            Refusal::Broadcast => f.write_str("broadcast source"),
            Refusal::Multicast => f.write_str("multicast source"),
            Refusal::Unspecified => f.write_str("unspecified source"),
            Refusal::Truncated => f.write_str("truncated datagram"),
            Refusal::SourceRate => f.write_str("over the per-source rate"),
            Refusal::GlobalRate => f.write_str("over the global rate"),
            Refusal::TooManySources => f.write_str("too many sources tracked"),
        }
    }
}

/// The source-address checks alone (no rates): `None` if a reply may be sent.
pub fn refuse_source(src: SocketAddr, own_port: u16) -> Option<Refusal> {
    let port = src.port();
    if port == 0 {
        return Some(Refusal::PortZero);
    }
    if SERVICE_PORTS.contains(&port) {
        return Some(Refusal::ServicePort(port));
    }
    if port < 1024 {
        return Some(Refusal::PrivilegedPort(port));
    }
    if port == own_port {
        return Some(Refusal::OwnPort);
    }
    let ip = match src.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) if v4.is_broadcast() => Some(Refusal::Broadcast),
        ip if ip.is_multicast() => Some(Refusal::Multicast),
        ip if ip.is_unspecified() => Some(Refusal::Unspecified),
        _ => None,
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Copy, Clone, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(burst);
        self.at = now;
    }

    fn take(&mut self) -> bool {
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Rates for [`UdpGuard`].
#[derive(Copy, Clone, Debug)]
pub struct UdpLimits {
    /// Replies per second to one source address.
    pub per_source_rate: f64,
    /// Replies one source may get in a burst.
    pub per_source_burst: f64,
    /// Replies per second in total.
    pub global_rate: f64,
    /// Sources tracked at once (memory bound).
    pub max_sources: usize,
}

impl Default for UdpLimits {
    fn default() -> Self {
        UdpLimits {
            per_source_rate: 100.0,
            per_source_burst: 200.0,
            global_rate: 20_000.0,
            max_sources: 65_536,
        }
    }
}

/// Counters of a UDP echo service.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct UdpStats {
    /// Datagrams echoed.
    pub echoed: u64,
    /// Datagrams refused for their source.
    pub refused: u64,
    /// Datagrams dropped by a rate limit.
    pub rate_limited: u64,
    /// Datagrams dropped because they were truncated.
    pub truncated: u64,
    /// Replies dropped because the socket would have blocked.
    pub dropped: u64,
}

impl UdpStats {
    /// Adds another service's counters to these.
    pub fn merge(&mut self, o: &UdpStats) {
        self.echoed += o.echoed;
        self.refused += o.refused;
        self.rate_limited += o.rate_limited;
        self.truncated += o.truncated;
        self.dropped += o.dropped;
    }
}

impl fmt::Display for UdpStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "udp_echoed={} udp_refused={} udp_rate_limited={} udp_truncated={} udp_dropped={}",
            self.echoed, self.refused, self.rate_limited, self.truncated, self.dropped
        )
    }
}

/// Decides, datagram by datagram, whether to echo.
pub struct UdpGuard {
    own_port: u16,
    limits: UdpLimits,
    sources: HashMap<IpAddr, Bucket>,
    global: Bucket,
    /// What was decided so far.
    pub stats: UdpStats,
}

impl UdpGuard {
    /// A guard for a socket bound to `own_port`.
    pub fn new(own_port: u16, limits: UdpLimits, now: Instant) -> UdpGuard {
        UdpGuard {
            own_port,
            limits,
            sources: HashMap::new(),
            global: Bucket::full(limits.global_rate.max(1.0), now),
            stats: UdpStats::default(),
        }
    }

    /// Whether to echo a datagram from `src` (`truncated` if it did not fit the buffer).
    /// `Ok(())` means send it back now; the refusal is counted either way.
    pub fn check(&mut self, src: SocketAddr, truncated: bool, now: Instant) -> Result<(), Refusal> {
        let verdict = self.decide(src, truncated, now);
        match verdict {
            Ok(()) => {}
            Err(Refusal::Truncated) => self.stats.truncated += 1,
            Err(Refusal::SourceRate | Refusal::GlobalRate | Refusal::TooManySources) => {
                self.stats.rate_limited += 1
            }
            Err(_) => self.stats.refused += 1,
        }
        verdict
    }

    fn decide(&mut self, src: SocketAddr, truncated: bool, now: Instant) -> Result<(), Refusal> {
        if let Some(r) = refuse_source(src, self.own_port) {
            return Err(r);
        }
        if truncated {
            return Err(Refusal::Truncated);
        }
        let l = self.limits;
        if !self.sources.contains_key(&src.ip()) && self.sources.len() >= l.max_sources {
            // Forget sources whose buckets have refilled: they are idle.
            self.sources.retain(|_, b| {
                b.refill(l.per_source_rate, l.per_source_burst, now);
                b.tokens < l.per_source_burst
            });
            if self.sources.len() >= l.max_sources {
                return Err(Refusal::TooManySources);
            }
        }
        let bucket = self
            .sources
            .entry(src.ip())
            .or_insert_with(|| Bucket::full(l.per_source_burst, now));
        bucket.refill(l.per_source_rate, l.per_source_burst, now);
        if bucket.tokens < 1.0 {
            return Err(Refusal::SourceRate);
        }
        let global_burst = l.global_rate.max(1.0);
        self.global.refill(l.global_rate, global_burst, now);
        if !self.global.take() {
            return Err(Refusal::GlobalRate);
        }
        bucket.take();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn dangerous_sources_are_refused() {
        let own = 7007;
        assert_eq!(
            refuse_source(a("127.0.0.1:0"), own),
            Some(Refusal::PortZero)
        );
        for p in SERVICE_PORTS {
            assert_eq!(
                refuse_source(a(&format!("127.0.0.1:{p}")), own),
                Some(Refusal::ServicePort(p))
            );
        }
        assert_eq!(
            refuse_source(a("127.0.0.1:1000"), own),
            Some(Refusal::PrivilegedPort(1000))
        );
        assert_eq!(
            refuse_source(a("127.0.0.1:7007"), own),
            Some(Refusal::OwnPort)
        );
        assert_eq!(
            refuse_source(a("255.255.255.255:5000"), own),
            Some(Refusal::Broadcast)
        );
        assert_eq!(
            refuse_source(a("224.0.0.1:5000"), own),
            Some(Refusal::Multicast)
        );
        assert_eq!(
            refuse_source(a("[ff02::1]:5000"), own),
            Some(Refusal::Multicast)
        );
        assert_eq!(
            refuse_source(a("0.0.0.0:5000"), own),
            Some(Refusal::Unspecified)
        );
        assert_eq!(
            refuse_source(a("[::]:5000"), own),
            Some(Refusal::Unspecified)
        );
        assert_eq!(
            refuse_source(a("[::ffff:224.0.0.1]:5000"), own),
            Some(Refusal::Multicast)
        );
        assert_eq!(refuse_source(a("127.0.0.1:5000"), own), None);
        assert_eq!(refuse_source(a("[::1]:5000"), own), None);
    }

    #[test]
    fn truncated_datagrams_are_dropped_not_cut() {
        let now = Instant::now();
        let mut g = UdpGuard::new(7007, UdpLimits::default(), now);
        assert_eq!(
            g.check(a("127.0.0.1:5000"), true, now),
            Err(Refusal::Truncated)
        );
        assert_eq!(g.stats.truncated, 1);
    }

    #[test]
    fn one_source_is_held_to_its_rate_and_others_keep_theirs() {
        let t0 = Instant::now();
        let limits = UdpLimits {
            per_source_rate: 10.0,
            per_source_burst: 5.0,
            global_rate: 1000.0,
            max_sources: 16,
        };
        let mut g = UdpGuard::new(7007, limits, t0);
        let hog = a("127.0.0.2:5000");
        let ok = (0..100).filter(|_| g.check(hog, false, t0).is_ok()).count();
        assert_eq!(ok, 5, "the burst, then nothing");
        assert!(
            g.check(a("127.0.0.3:5000"), false, t0).is_ok(),
            "another source is unaffected"
        );
        let t1 = t0 + Duration::from_millis(500);
        let ok = (0..100).filter(|_| g.check(hog, false, t1).is_ok()).count();
        assert_eq!(ok, 5, "refills at 10/s, capped by the burst");
        assert_eq!(g.stats.rate_limited, 190);
    }

    #[test]
    fn the_global_rate_caps_many_sources_together() {
        let t0 = Instant::now();
        let limits = UdpLimits {
            per_source_rate: 1000.0,
            per_source_burst: 1000.0,
            global_rate: 50.0,
            max_sources: 1000,
        };
        let mut g = UdpGuard::new(7007, limits, t0);
        let ok = (0..500)
            .filter(|i| {
                g.check(
                    a(&format!("127.0.{}.{}:5000", i / 250, i % 250 + 1)),
                    false,
                    t0,
                )
                .is_ok()
            })
            .count();
        assert_eq!(ok, 50);
    }

    #[test]
    fn tracked_sources_are_bounded() {
        let t0 = Instant::now();
        let limits = UdpLimits {
            max_sources: 4,
            ..UdpLimits::default()
        };
        let mut g = UdpGuard::new(7007, limits, t0);
        for i in 1..=4 {
            assert!(g.check(a(&format!("127.0.0.{i}:5000")), false, t0).is_ok());
        }
        assert_eq!(
            g.check(a("127.0.0.9:5000"), false, t0),
            Err(Refusal::TooManySources)
        );
        // Once the others are idle (full buckets again), a new source gets in.
        let later = t0 + Duration::from_secs(60);
        assert!(g.check(a("127.0.0.9:5000"), false, later).is_ok());
        assert!(g.sources.len() <= 4);
    }
}
