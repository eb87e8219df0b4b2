//! Counters published while the server runs, for a reader on another thread (the metrics
//! endpoint): one cache-line-padded block of atomics per worker (and per UDP socket), each
//! written only by its owner with relaxed stores, at most once per timer tick, and read with
//! relaxed loads whenever someone asks. Nothing here is on a hot path beyond those stores.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::stats::Stats;
use crate::udp::UdpStats;

/// One writer's block, padded to two cache lines (the adjacent-line prefetcher pairs them)
/// so that two workers' stores never share a line.
#[repr(align(128))]
struct Block<const N: usize> {
    counters: [AtomicU64; N],
    /// Live connections (workers only).
    gauge: AtomicU64,
}

impl<const N: usize> Default for Block<N> {
    fn default() -> Self {
        Block {
            counters: std::array::from_fn(|_| AtomicU64::new(0)),
            gauge: AtomicU64::new(0),
        }
    }
}

impl<const N: usize> Block<N> {
    fn store(&self, values: [u64; N], gauge: u64) {
        for (a, v) in self.counters.iter().zip(values) {
            a.store(v, Relaxed);
        }
        self.gauge.store(gauge, Relaxed);
    }

    fn load(&self) -> ([u64; N], u64) {
        (
            std::array::from_fn(|i| self.counters[i].load(Relaxed)),
            self.gauge.load(Relaxed),
        )
    }
}

/// The published counters of every worker and every UDP socket of one server.
pub struct LiveStats {
    workers: Box<[Block<{ Stats::LEN }>]>,
    udp: Box<[Block<{ UdpStats::LEN }>]>,
}

impl std::fmt::Debug for LiveStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveStats")
            .field("workers", &self.workers.len())
            .field("udp", &self.udp.len())
            .finish()
    }
}

impl LiveStats {
    /// Blocks for `workers` workers and `udp` UDP sockets, all zero.
    pub fn new(workers: usize, udp: usize) -> Arc<LiveStats> {
        Arc::new(LiveStats {
            workers: (0..workers).map(|_| Block::default()).collect(),
            udp: (0..udp).map(|_| Block::default()).collect(),
        })
    }

    /// Workers with a block.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// UDP sockets with a block.
    pub fn udp_sockets(&self) -> usize {
        self.udp.len()
    }

    /// Worker `i`'s handle for publishing (give it to that worker only).
    pub fn worker_slot(self: &Arc<Self>, i: usize) -> LiveSlot {
        assert!(i < self.workers.len(), "no block for worker {i}");
        LiveSlot {
            live: self.clone(),
            index: i,
        }
    }

    /// UDP socket `i`'s handle for publishing (give it to that socket's loop only).
    pub fn udp_slot(self: &Arc<Self>, i: usize) -> LiveUdpSlot {
        assert!(i < self.udp.len(), "no block for UDP socket {i}");
        LiveUdpSlot {
            live: self.clone(),
            index: i,
        }
    }

    /// What worker `i` last published: its counters and its live connections.
    pub fn worker(&self, i: usize) -> (Stats, u64) {
        let (c, gauge) = self.workers[i].load();
        (Stats::from_array(c), gauge)
    }

    /// What UDP socket `i` last published.
    pub fn udp(&self, i: usize) -> UdpStats {
        UdpStats::from_array(self.udp[i].load().0)
    }
}

/// One worker's place in a [`LiveStats`].
#[derive(Clone, Debug)]
pub struct LiveSlot {
    live: Arc<LiveStats>,
    index: usize,
}

impl LiveSlot {
    /// Publishes the worker's counters and live connections (relaxed stores).
    pub fn publish(&self, s: &Stats, connections: usize) {
        self.live.workers[self.index].store(s.to_array(), connections as u64);
    }
}

/// One UDP socket's place in a [`LiveStats`].
#[derive(Clone, Debug)]
pub struct LiveUdpSlot {
    live: Arc<LiveStats>,
    index: usize,
}

impl LiveUdpSlot {
    /// Publishes the socket's counters (relaxed stores).
    pub fn publish(&self, s: &UdpStats) {
        self.live.udp[self.index].store(s.to_array(), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_published_is_what_is_read() {
        let live = LiveStats::new(2, 1);
        let s = Stats::from_array(std::array::from_fn(|i| i as u64 + 1));
        live.worker_slot(1).publish(&s, 42);
        assert_eq!(live.worker(1), (s, 42));
        assert_eq!(live.worker(0), (Stats::default(), 0));
        let u = UdpStats::from_array(std::array::from_fn(|i| i as u64 + 1));
        live.udp_slot(0).publish(&u);
        assert_eq!(live.udp(0), u);
    }

    #[test]
    fn blocks_do_not_share_cache_lines() {
        assert!(std::mem::align_of::<Block<{ Stats::LEN }>>() >= 128);
        let live = LiveStats::new(2, 0);
        let a = &live.workers[0] as *const _ as usize;
        let b = &live.workers[1] as *const _ as usize;
        assert!(b - a >= 128, "{a:x} {b:x}");
    }
}
