//! One UDP flow (a socket connected to the server) and what its datagrams tell: each carries
//! its content key in its first 8 bytes, and the key names the flow and the sequence number
//! ([`crate::bench::pattern::unkey`]), so loss, duplicates and reordering are counted
//! exactly, and every byte is checked.
//!
//! Per flow: the intended send time of every datagram not yet back (oldest first; those
//! older than the timeout are given up on), and one bit per sequence number for "came back",
//! so a copy is told from a first arrival for the whole run.

use std::collections::VecDeque;
use std::net::UdpSocket;

use crate::bench::params::SizeRange;
use crate::bench::pattern;
use crate::bench::tally::UdpCounts;

/// A pending entry whose datagram is back.
const DONE: u64 = u64::MAX;

/// What one received datagram was.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// A first arrival in time: its latency (ns), whether measured, its length.
    Timed {
        /// From its intended send time.
        latency_ns: u64,
        /// In the measured window.
        measured: bool,
        /// Bytes.
        len: u32,
    },
    /// A first arrival after it was given up on, or a copy.
    Untimed,
    /// Not a datagram of this flow, or not what was sent.
    Bad,
}

/// One flow.
pub struct Flow {
    /// Its socket, connected to the server, non-blocking.
    pub sock: UdpSocket,
    /// Its number (the content key's connection part).
    pub gid: u32,
    next_seq: u64,
    /// Sequence number of `pending[0]`.
    base: u64,
    /// Intended send times from `base` on ([`DONE`] once back).
    pending: VecDeque<u64>,
    /// Datagrams sent and neither back nor given up on.
    pub in_flight: u32,
    got: Vec<u64>,
    max_seen: Option<u64>,
    /// The first measured sequence number (measured ones are all after it).
    first_measured: Option<u64>,
    /// No send before this (the last one would have blocked), ns.
    pub retry_at: u64,
}

impl Flow {
    /// A flow over `sock`.
    pub fn new(sock: UdpSocket, gid: u32) -> Flow {
        Flow {
            sock,
            gid,
            next_seq: 0,
            base: 0,
            pending: VecDeque::new(),
            in_flight: 0,
            got: Vec::new(),
            max_seen: None,
            first_measured: None,
            retry_at: 0,
        }
    }

    /// The key of the next datagram.
    pub fn next_key(&self) -> u64 {
        pattern::key(self.gid, self.next_seq)
    }

    /// The next datagram (intended at `t`) went out.
    pub fn sent(&mut self, t: u64, measured: bool) {
        if measured && self.first_measured.is_none() {
            self.first_measured = Some(self.next_seq);
        }
        self.pending.push_back(t);
        self.next_seq += 1;
        self.in_flight += 1;
    }

    fn measured(&self, seq: u64) -> bool {
        self.first_measured.is_some_and(|f| seq >= f)
    }

    /// One datagram back at `now`.
    pub fn receive(
        &mut self,
        data: &[u8],
        now: u64,
        size: &SizeRange,
        c: &mut UdpCounts,
    ) -> Arrival {
        let Some(head) = data.get(..8) else {
            return Arrival::Bad;
        };
        let key = u64::from_le_bytes(head.try_into().expect("8 bytes"));
        let (gid, seq) = pattern::unkey(key);
        let fits = data.len() == size.pick(key) as usize && pattern::verify(key, 0, data);
        if gid != self.gid || seq >= self.next_seq || !fits {
            return Arrival::Bad;
        }
        let measured = self.measured(seq);
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if self.got.len() <= word {
            self.got.resize(word + 1, 0);
        }
        if self.got[word] & bit != 0 {
            c.duplicates += u64::from(measured);
            return Arrival::Untimed;
        }
        self.got[word] |= bit;
        c.received += u64::from(measured);
        match self.max_seen {
            Some(m) if seq < m => c.reordered += u64::from(measured),
            _ => self.max_seen = Some(seq),
        }
        let slot = seq
            .checked_sub(self.base)
            .and_then(|i| self.pending.get_mut(i as usize))
            .filter(|t| **t != DONE);
        let Some(t) = slot else {
            c.late += u64::from(measured);
            return Arrival::Untimed;
        };
        let latency_ns = now.saturating_sub(*t);
        *t = DONE;
        self.in_flight -= 1;
        Arrival::Timed {
            latency_ns,
            measured,
            len: data.len() as u32,
        }
    }

    /// Gives up on datagrams sent more than `timeout_ns` before `now`; how many.
    pub fn expire(&mut self, now: u64, timeout_ns: u64) -> u32 {
        let mut expired = 0;
        while let Some(&t) = self.pending.front() {
            if t != DONE && now.saturating_sub(t) <= timeout_ns {
                break;
            }
            if t != DONE {
                expired += 1;
                self.in_flight -= 1;
            }
            self.pending.pop_front();
            self.base += 1;
        }
        expired
    }

    /// When the oldest datagram still out is given up on.
    pub fn next_expiry(&self, timeout_ns: u64) -> Option<u64> {
        self.pending
            .iter()
            .find(|&&t| t != DONE)
            .map(|t| t + timeout_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datagram(gid: u32, seq: u64, len: usize) -> Vec<u8> {
        let mut d = vec![0; len];
        pattern::fill(pattern::key(gid, seq), 0, &mut d);
        d
    }

    #[test]
    fn loss_duplicates_reordering_and_late_arrivals_are_told_apart() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut f = Flow::new(sock, 3);
        let size = SizeRange { min: 16, max: 16 };
        let mut c = UdpCounts::default();
        for t in 0..6 {
            f.sent(t * 10, t >= 1); // datagram 0 is warm-up
        }
        let mut rx = |f: &mut Flow, seq, now| f.receive(&datagram(3, seq, 16), now, &size, &mut c);
        assert!(matches!(
            rx(&mut f, 0, 5),
            Arrival::Timed {
                measured: false,
                latency_ns: 5,
                ..
            }
        ));
        assert!(matches!(
            rx(&mut f, 2, 25),
            Arrival::Timed {
                measured: true,
                latency_ns: 5,
                ..
            }
        ));
        assert!(matches!(
            rx(&mut f, 1, 26),
            Arrival::Timed { latency_ns: 16, .. }
        ));
        assert_eq!(rx(&mut f, 1, 27), Arrival::Untimed, "a copy");
        assert_eq!(f.expire(1000, 100), 3, "3, 4 and 5 are given up on");
        assert_eq!(f.in_flight, 0);
        assert_eq!(rx(&mut f, 4, 1001), Arrival::Untimed, "late");
        assert_eq!(rx(&mut f, 9, 1002), Arrival::Bad, "never sent");
        assert_eq!(
            f.receive(&datagram(4, 1, 16), 1003, &size, &mut c),
            Arrival::Bad
        );
        let mut bent = datagram(3, 5, 16);
        bent[12] ^= 1;
        assert_eq!(f.receive(&bent, 1004, &size, &mut c), Arrival::Bad);
        assert_eq!(
            f.receive(&datagram(3, 5, 15), 1005, &size, &mut c),
            Arrival::Bad
        );
        // Measured: 1..=5 sent; 1, 2, 4 back (4 late); 1 copied; 1 after 2 (reordered).
        c.sent = 5;
        assert_eq!(
            (c.received, c.duplicates, c.reordered, c.late),
            (3, 1, 1, 1)
        );
        assert_eq!(c.lost(), 2);
    }
}
