//! The token buckets of UDP echo: [`Bucket`], and the per-source [`SourceTable`], a fixed
//! array of small sets that costs the same for the millionth new source as for the first.
//!
//! A source's slot is found by a keyed hash (so a sender cannot aim its sources at
//! another's set) and a look at the [`WAYS`] slots of its set. A new source takes an empty
//! slot, or one whose bucket has refilled to the burst: that source is idle, and forgetting
//! it loses nothing, since it would start from a full bucket again anyway. Only when all the
//! slots of its set belong to sources that are still live is a new source refused, so the
//! limit of a live source is never reset by a flood of others. Memory is allocated once.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;

/// Slots a source may land in (one set); a power of two.
pub const WAYS: usize = 4;

/// A token bucket: tokens now, and when (microseconds since the owner's epoch).
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct Bucket {
    /// Tokens left, one a reply.
    pub tokens: f64,
    at: u64,
}

impl Bucket {
    /// A full bucket at `now`.
    pub fn full(burst: f64, now: u64) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    /// Adds what `rate` (per second) earned since it was last refilled, up to `burst`.
    pub fn refill(&mut self, rate: f64, burst: f64, now: u64) {
        if now > self.at {
            let dt = (now - self.at) as f64 / 1e6;
            self.tokens = (self.tokens + dt * rate).min(burst);
            self.at = now;
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self) -> bool {
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Copy, Clone)]
struct Slot {
    /// The source as an IPv6 address (IPv4 as `::ffff:a.b.c.d`); 0 (`::`) marks a free
    /// slot, as the unspecified address is refused before it gets here.
    key: u128,
    bucket: Bucket,
}

const FREE: Slot = Slot {
    key: 0,
    bucket: Bucket { tokens: 0.0, at: 0 },
};

/// Per-source buckets in a fixed number of slots.
pub struct SourceTable {
    slots: Box<[Slot]>,
    sets: usize,
    hasher: RandomState,
    rate: f64,
    burst: f64,
    used: usize,
}

impl SourceTable {
    /// A table of at least `max_sources` slots (rounded up to a power of two, at least
    /// [`WAYS`]), each source refilling at `rate` a second up to `burst`.
    pub fn new(max_sources: usize, rate: f64, burst: f64) -> SourceTable {
        let n = max_sources.max(WAYS).next_power_of_two();
        SourceTable {
            slots: vec![FREE; n].into_boxed_slice(),
            sets: n / WAYS,
            hasher: RandomState::new(),
            rate,
            burst,
            used: 0,
        }
    }

    /// Sources it can track at once (fixed at creation).
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Slots that hold a source (live or idle).
    pub fn len(&self) -> usize {
        self.used
    }

    /// Whether no source was ever tracked.
    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// The bucket of `ip`, refilled to `now`, tracking `ip` if it is new; `None` if it is
    /// new and every slot of its set belongs to a live source.
    pub fn bucket(&mut self, ip: IpAddr, now: u64) -> Option<&mut Bucket> {
        let key = key_of(ip);
        let set = self.set_of(key);
        let i = match self.find(set, key) {
            Some(i) => i,
            None => self.admit(set, key, now)?,
        };
        let (rate, burst) = (self.rate, self.burst);
        let b = &mut self.slots[i].bucket;
        b.refill(rate, burst, now);
        Some(b)
    }

    fn set_of(&self, key: u128) -> usize {
        (self.hasher.hash_one(key) as usize & (self.sets - 1)) * WAYS
    }

    fn find(&self, set: usize, key: u128) -> Option<usize> {
        (set..set + WAYS).find(|&i| self.slots[i].key == key)
    }

    /// Puts a new source in a free slot of its set, or in an idle one's.
    fn admit(&mut self, set: usize, key: u128, now: u64) -> Option<usize> {
        let i = match (set..set + WAYS).find(|&i| self.slots[i].key == 0) {
            Some(free) => {
                self.used += 1;
                free
            }
            None => (set..set + WAYS).find(|&i| self.is_idle(i, now))?,
        };
        self.slots[i] = Slot {
            key,
            bucket: Bucket::full(self.burst, now),
        };
        Some(i)
    }

    fn is_idle(&self, i: usize, now: u64) -> bool {
        let mut b = self.slots[i].bucket;
        b.refill(self.rate, self.burst, now);
        b.tokens >= self.burst
    }
}

/// One key for a source however it arrived: IPv4 as its IPv4-mapped IPv6 form.
fn key_of(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Instant;

    fn v4(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i))
    }

    /// Takes a token from `ip`'s bucket: whether a reply would go out.
    fn hit(t: &mut SourceTable, ip: IpAddr, now: u64) -> Option<bool> {
        t.bucket(ip, now).map(|b| b.take())
    }

    #[test]
    fn capacity_is_rounded_to_whole_sets_and_fixed() {
        assert_eq!(SourceTable::new(0, 1.0, 1.0).capacity(), WAYS);
        assert_eq!(SourceTable::new(5, 1.0, 1.0).capacity(), 8);
        assert_eq!(SourceTable::new(65_536, 1.0, 1.0).capacity(), 65_536);
        // The README's "2 MiB" for the default 65,536 slots.
        assert_eq!(std::mem::size_of::<Slot>(), 32);
    }

    #[test]
    fn ipv4_and_its_mapped_form_are_one_source() {
        let mut t = SourceTable::new(16, 1.0, 2.0);
        let mapped = IpAddr::V6("::ffff:10.0.0.1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(hit(&mut t, v4(1), 0), Some(true));
        assert_eq!(hit(&mut t, mapped, 0), Some(true));
        assert_eq!(hit(&mut t, v4(1), 0), Some(false), "one bucket of 2");
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_full_set_of_live_sources_refuses_newcomers_and_keeps_their_limits() {
        // One set: four live sources fill it.
        let mut t = SourceTable::new(WAYS, 10.0, 3.0);
        for i in 1..=4 {
            for _ in 0..3 {
                assert_eq!(hit(&mut t, v4(i), 0), Some(true));
            }
        }
        for i in 100..10_100 {
            assert_eq!(hit(&mut t, v4(i), 1), None, "no idle slot to take");
        }
        for i in 1..=4 {
            assert_eq!(hit(&mut t, v4(i), 2), Some(false), "not reset by the flood");
        }
        // 0.3 s later the buckets are full again: those sources are idle and give way.
        assert_eq!(hit(&mut t, v4(100), 300_002), Some(true));
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn a_million_spoofed_sources_cost_constant_time_and_memory_and_live_ones_stay_limited() {
        // The defaults: 100/s, burst 200, 65,536 slots. A million sources one microsecond
        // apart (a million datagrams a second), and one live source sending every tenth.
        let mut t = SourceTable::new(65_536, 100.0, 200.0);
        let live = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        let started = Instant::now();
        let (mut live_ok, mut live_sent, mut refused) = (0u64, 0u64, 0u64);
        for i in 0..1_000_000u32 {
            let now = u64::from(i);
            if i % 10 == 0 {
                live_sent += 1;
                live_ok += u64::from(hit(&mut t, live, now) == Some(true));
            }
            if hit(&mut t, v4(i), now).is_none() {
                refused += 1;
            }
        }
        let took = started.elapsed();
        assert!(took.as_secs() < 20, "1,000,000 new sources took {took:?}");
        assert_eq!(t.capacity(), 65_536, "memory stays what it was");
        assert!(t.len() <= t.capacity());
        // In one second: the burst, plus one second at the rate (and a token of rounding).
        assert_eq!(live_sent, 100_000);
        assert!(
            (200..=301).contains(&live_ok),
            "the live source got {live_ok} replies"
        );
        // A spoofed source is live for 1/rate = 10 ms: ~10,000 at a time in 65,536 slots,
        // so a set is rarely all live and the flood is rarely refused as "too many".
        assert!(
            refused < 10_000,
            "{refused} of 1,000,000 refused as too many"
        );
    }

    #[test]
    fn a_flood_faster_than_sources_go_idle_fills_the_table_and_is_refused_in_constant_time() {
        // A million sources 10 ns apart: all still live when the last arrives, so the table
        // fills and stays full; the live source, tracked first, keeps its limit throughout.
        let mut t = SourceTable::new(65_536, 100.0, 200.0);
        let live = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        let started = Instant::now();
        let (mut live_ok, mut refused) = (0u64, 0u64);
        for i in 0..1_000_000u32 {
            let now = u64::from(i) / 100; // microseconds
            if i % 10 == 0 {
                live_ok += u64::from(hit(&mut t, live, now) == Some(true));
            }
            if hit(&mut t, v4(i), now).is_none() {
                refused += 1;
            }
        }
        let took = started.elapsed();
        assert!(took.as_secs() < 20, "1,000,000 new sources took {took:?}");
        assert_eq!(t.len(), t.capacity(), "every slot taken, none added");
        assert_eq!(t.capacity(), 65_536);
        assert_eq!(refused, 1_000_000 - 65_535, "all but the slots are refused");
        // 100,000 tries in 10 ms: the burst and one token.
        assert!(
            (200..=201).contains(&live_ok),
            "the live source got {live_ok}"
        );
    }
}
