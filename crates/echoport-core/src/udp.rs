//! Guards for UDP echo (RFC 862): which datagrams may be answered at all, and how often.
//!
//! UDP echo is a classic reflection and loop weapon: a forged source address turns the
//! server into an amplifier aimed at a victim, and two echo-like services pointed at each
//! other ping-pong forever (CVE-1999-0103, CVE-2024-2169). The BSDs' answer, kept here:
//! never answer well-known service ports, privileged ports, our own ports, or broadcast,
//! multicast and unspecified sources (also when hidden inside an IPv6 address, see
//! [`source`]); never answer a truncated datagram with a part of it; and cap the rate per
//! source and in total, dropping (never queueing) what exceeds it.
//!
//! The rates are one [`UdpBudget`] for the whole process, shared by every UDP socket: a
//! server on k addresses reflects no more than one on a single address, and a source gets
//! one allowance however many of our addresses it writes to. Each socket's thread has its
//! own [`UdpGuard`] (its counters) over the shared budget. Pure logic, no I/O: the caller
//! receives, asks [`UdpGuard::check`], and sends or drops.

pub mod source;
pub mod table;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

pub use source::{Embedded, SERVICE_PORTS, embedded_ipv4, refuse_ip, refuse_source};
use table::{Bucket, SourceTable};

/// Why a datagram was not echoed.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Source port 0 (cannot be a real reply address).
    PortZero,
    /// A well-known service port that answers datagrams itself.
    ServicePort(u16),
    /// A privileged port (below 1024).
    PrivilegedPort(u16),
    /// One of our own ports: another echo server, or a loop.
    OwnPort,
    /// A broadcast source address (or an IPv6 address standing for one).
    Broadcast,
    /// A multicast source address (or an IPv6 address standing for one).
    Multicast,
    /// The unspecified address, 0.0.0.0/8 or `::` (or an IPv6 address standing for one).
    Unspecified,
    /// A deprecated IPv4-compatible IPv6 address (`::a.b.c.d`, RFC 4291 2.5.5.1).
    Ipv4Compatible,
    /// The datagram did not fit the receive buffer; echoing a part would change it.
    Truncated,
    /// Over this source's rate.
    SourceRate,
    /// Over the server's total rate.
    GlobalRate,
    /// Too many distinct sources are live at once to track a new one.
    TooManySources,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::PortZero => f.write_str("source port 0"),
            Refusal::ServicePort(p) => write!(f, "source is service port {p}"),
            Refusal::PrivilegedPort(p) => write!(f, "source port {p} is privileged"),
            Refusal::OwnPort => f.write_str("source port is one of ours"),
            Refusal::Broadcast => f.write_str("broadcast source"),
            Refusal::Multicast => f.write_str("multicast source"),
            Refusal::Unspecified => f.write_str("unspecified source"),
            Refusal::Ipv4Compatible => f.write_str("deprecated IPv4-compatible source"),
            Refusal::Truncated => f.write_str("truncated datagram"),
            Refusal::SourceRate => f.write_str("over the per-source rate"),
            Refusal::GlobalRate => f.write_str("over the global rate"),
            Refusal::TooManySources => f.write_str("too many sources tracked"),
        }
    }
}

/// Rates for a [`UdpBudget`], each for the whole process (all its UDP sockets together).
#[derive(Copy, Clone, Debug)]
pub struct UdpLimits {
    /// Replies per second to one source address, whichever of our addresses it writes to.
    pub per_source_rate: f64,
    /// Replies one source may get in a burst.
    pub per_source_burst: f64,
    /// Replies per second in total (a burst of one second's worth).
    pub global_rate: f64,
    /// Sources tracked at once (memory bound; rounded up to a power of two).
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

/// The list of a UDP echo service's counters (see [`crate::counters`]): calls `$m!` with
/// the tokens after `$m`, then the struct header and one entry a counter
/// (`/// doc` `field as key: drop reason;`). The key is the stopped line's; the reason is
/// the `reason` label of `echoport_udp_datagrams_dropped_total` (`None`: not a drop).
#[macro_export]
macro_rules! udp_counters {
    ($m:ident $($pre:tt)*) => {
        $m! {
            $($pre)*
            /// Counters of a UDP echo service.
            pub struct UdpStats: Option<&'static str>;
            /// Datagrams echoed.
            echoed as udp_echoed: None;
            /// Datagrams refused for their source.
            refused as udp_refused: Some("refused_source");
            /// Datagrams dropped by a rate limit.
            rate_limited as udp_rate_limited: Some("rate_limited");
            /// Datagrams dropped because they were truncated.
            truncated as udp_truncated: Some("truncated");
            /// Replies dropped because the socket would have blocked.
            dropped as udp_dropped: Some("would_block");
        }
    };
}

udp_counters!(counter_struct);

/// The rates of one process: the global bucket and the per-source table, shared by every
/// UDP socket behind one lock (UDP is not the hot path; the lock is held for a lookup).
pub struct UdpBudget {
    limits: UdpLimits,
    epoch: Instant,
    state: Mutex<Shared>,
}

struct Shared {
    global: Bucket,
    sources: SourceTable,
}

impl UdpBudget {
    /// A budget with full buckets at `now`; its source table is allocated here, once.
    pub fn new(limits: UdpLimits, now: Instant) -> UdpBudget {
        UdpBudget {
            limits,
            epoch: now,
            state: Mutex::new(Shared {
                global: Bucket::full(limits.global_rate.max(1.0), 0),
                sources: SourceTable::new(
                    limits.max_sources,
                    limits.per_source_rate,
                    limits.per_source_burst,
                ),
            }),
        }
    }

    /// Sources it can track at once (fixed).
    pub fn capacity(&self) -> usize {
        self.lock().sources.capacity()
    }

    /// Takes one reply from `ip`'s allowance and from the total, or says which is spent.
    /// A datagram over the total takes nothing from its source.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        let at = now.saturating_duration_since(self.epoch).as_micros() as u64;
        let l = self.limits;
        let mut state = self.lock();
        let Shared { global, sources } = &mut *state;
        let source = sources.bucket(ip, at).ok_or(Refusal::TooManySources)?;
        if source.tokens < 1.0 {
            return Err(Refusal::SourceRate);
        }
        global.refill(l.global_rate, l.global_rate.max(1.0), at);
        if !global.take() {
            return Err(Refusal::GlobalRate);
        }
        source.take();
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        // The state is a few numbers, consistent after every step: a panic elsewhere
        // cannot leave it half-changed.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Decides, datagram by datagram, whether one socket echoes; counts what it decided.
pub struct UdpGuard {
    own_ports: Vec<u16>,
    budget: Arc<UdpBudget>,
    /// What was decided so far.
    pub stats: UdpStats,
}

impl UdpGuard {
    /// A guard for one socket of a process that serves UDP on `own_ports`, drawing on the
    /// process's `budget`.
    pub fn new(own_ports: &[u16], budget: Arc<UdpBudget>) -> UdpGuard {
        UdpGuard {
            own_ports: own_ports.to_vec(),
            budget,
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

    fn decide(&self, src: SocketAddr, truncated: bool, now: Instant) -> Result<(), Refusal> {
        if let Some(r) = refuse_source(src, &self.own_ports) {
            return Err(r);
        }
        if truncated {
            return Err(Refusal::Truncated);
        }
        self.budget.admit(src.ip(), now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn guard(limits: UdpLimits, now: Instant) -> UdpGuard {
        UdpGuard::new(&[7007], Arc::new(UdpBudget::new(limits, now)))
    }

    #[test]
    fn dangerous_sources_are_refused_and_counted() {
        let now = Instant::now();
        let mut g = guard(UdpLimits::default(), now);
        for src in [
            "127.0.0.1:7",
            "[::ffff:224.0.0.1]:5000",
            "[2002:ffff:ffff::1]:5000",
        ] {
            assert!(g.check(a(src), false, now).is_err(), "{src}");
        }
        assert_eq!(g.stats.refused, 3);
        assert_eq!(g.check(a("127.0.0.1:5000"), false, now), Ok(()));
    }

    #[test]
    fn truncated_datagrams_are_dropped_not_cut() {
        let now = Instant::now();
        let mut g = guard(UdpLimits::default(), now);
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
        let mut g = guard(limits, t0);
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
        let mut g = guard(limits, t0);
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
    fn every_socket_of_a_process_draws_on_one_global_budget() {
        let t0 = Instant::now();
        let limits = UdpLimits {
            per_source_rate: 1e6,
            per_source_burst: 1e6,
            global_rate: 100.0,
            max_sources: 1024,
        };
        let budget = Arc::new(UdpBudget::new(limits, t0));
        let ports = [7007, 7008];
        let mut guards = [
            UdpGuard::new(&ports, budget.clone()),
            UdpGuard::new(&ports, budget.clone()),
        ];
        let mut ok = 0;
        for i in 0..1000 {
            let src = a(&format!("127.0.{}.{}:5000", i / 200, i % 200 + 1));
            ok += usize::from(guards[i % 2].check(src, false, t0).is_ok());
        }
        assert_eq!(ok, 100, "one burst of the global rate, not one a socket");
        let later = t0 + Duration::from_millis(500);
        let ok = (0..1000)
            .filter(|&i| {
                let src = a(&format!("127.0.{}.{}:6000", i / 200, i % 200 + 1));
                guards[i % 2].check(src, false, later).is_ok()
            })
            .count();
        assert_eq!(ok, 50, "half a second at 100/s, shared");
        let limited: u64 = guards.iter().map(|g| g.stats.rate_limited).sum();
        assert_eq!(limited, 2000 - 150);
    }

    #[test]
    fn a_source_has_one_allowance_across_our_addresses() {
        let t0 = Instant::now();
        let limits = UdpLimits {
            per_source_rate: 10.0,
            per_source_burst: 20.0,
            global_rate: 1e6,
            max_sources: 1024,
        };
        let budget = Arc::new(UdpBudget::new(limits, t0));
        let mut v4 = UdpGuard::new(&[7007, 7008], budget.clone());
        let mut mapped = UdpGuard::new(&[7007, 7008], budget.clone());
        let mut ok = 0;
        for _ in 0..50 {
            ok += usize::from(v4.check(a("192.0.2.7:5000"), false, t0).is_ok());
            ok += usize::from(
                mapped
                    .check(a("[::ffff:192.0.2.7]:5001"), false, t0)
                    .is_ok(),
            );
        }
        assert_eq!(
            ok, 20,
            "one burst for the source, whichever socket and port"
        );
    }

    #[test]
    fn tracked_sources_are_bounded() {
        let t0 = Instant::now();
        let limits = UdpLimits {
            max_sources: 4,
            ..UdpLimits::default()
        };
        let budget = Arc::new(UdpBudget::new(limits, t0));
        let mut g = UdpGuard::new(&[7007], budget.clone());
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
        assert_eq!(budget.capacity(), 4);
    }

    #[test]
    fn a_million_spoofed_sources_faster_than_they_go_idle_cost_constant_time() {
        // The attack the table must survive: new sources faster than old ones go idle
        // (10 ns apart, each live for 10 ms), so the table is full of live sources and
        // every newcomer would have meant a scan of all of them.
        let t0 = Instant::now();
        let limits = UdpLimits {
            global_rate: 1e9,
            ..UdpLimits::default()
        };
        let mut g = guard(limits, t0);
        let started = Instant::now();
        let mut ok = 0u64;
        for i in 0..1_000_000u32 {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 | i);
            let now = t0 + Duration::from_nanos(10 * u64::from(i));
            ok += u64::from(g.check(SocketAddr::from((ip, 5000)), false, now).is_ok());
        }
        let took = started.elapsed();
        assert!(took < Duration::from_secs(20), "took {took:?}");
        assert_eq!(g.budget.capacity(), 65_536, "memory stays what it was");
        // Each slot admits one source, which stays live to the end: a reply each.
        assert!(
            (65_536..=66_000).contains(&ok),
            "{ok} replies, {:?}",
            g.stats
        );
        assert_eq!(g.stats.rate_limited, 1_000_000 - ok);
    }
}
