//! Measurements cut into intervals of fixed length (counted from the end of the warm-up), so
//! a stall shows where it happened instead of vanishing into the run's totals.
//!
//! Each worker thread records its measured echoes into the slice of the interval they
//! completed in and sends every finished slice to the main thread ([`Recorder`]); the main
//! thread merges the slices of all threads ([`Merger`]) and hands out an interval once every
//! thread has moved past it (or finished), in order.

use std::collections::BTreeMap;
use std::sync::mpsc::Sender;

use hdrhistogram::Histogram;

use super::tally::new_histogram;

/// What a worker sends.
pub enum Report {
    /// One thread's share of one interval.
    Slice {
        /// The thread.
        thread: usize,
        /// The interval's number (0: the first after the warm-up).
        idx: u64,
        /// The interval's measurements.
        part: Part,
    },
    /// The thread sends no more.
    Done {
        /// The thread.
        thread: usize,
    },
}

/// Measurements of one interval (one thread's, or merged).
#[derive(Clone, Debug)]
pub struct Part {
    /// Latencies of the echoes completed in it, ns.
    pub hist: Histogram<u64>,
    /// Their bytes (one direction).
    pub bytes: u64,
}

impl Default for Part {
    fn default() -> Self {
        Part {
            hist: new_histogram(),
            bytes: 0,
        }
    }
}

impl Part {
    /// Echoes counted.
    pub fn msgs(&self) -> u64 {
        self.hist.len()
    }
}

/// A worker's side: the current slice and where it ends.
pub struct Recorder {
    thread: usize,
    start_ns: u64,
    every_ns: u64,
    idx: u64,
    cur: Part,
    tx: Sender<Report>,
}

impl Recorder {
    /// Intervals of `every_ns` from `start_ns` (ns since the run's start) for thread `thread`.
    pub fn new(thread: usize, start_ns: u64, every_ns: u64, tx: Sender<Report>) -> Recorder {
        Recorder {
            thread,
            start_ns,
            every_ns: every_ns.max(1),
            idx: 0,
            cur: Part::default(),
            tx,
        }
    }

    /// When the current interval ends.
    pub fn next_at(&self) -> u64 {
        self.start_ns + (self.idx + 1) * self.every_ns
    }

    /// Sends every interval that ended by `now` (empty ones too: a stall is an interval with
    /// nothing in it).
    pub fn roll(&mut self, now: u64) {
        while now >= self.next_at() {
            self.send();
            self.idx += 1;
        }
    }

    /// One measured echo of `latency_ns` and `len` bytes, completed at `now`.
    pub fn record(&mut self, now: u64, latency_ns: u64, len: u64) {
        self.roll(now);
        self.cur.hist.saturating_record(latency_ns.max(1));
        self.cur.bytes += len;
    }

    fn send(&mut self) {
        let part = std::mem::take(&mut self.cur);
        let _ = self.tx.send(Report::Slice {
            thread: self.thread,
            idx: self.idx,
            part,
        });
    }

    /// Sends the current (partial) interval and says the thread is done.
    pub fn finish(mut self, now: u64) {
        self.roll(now);
        if now >= self.start_ns {
            self.send();
        }
        let _ = self.tx.send(Report::Done {
            thread: self.thread,
        });
    }
}

/// The main thread's side: slices merged per interval until every thread is past it.
pub struct Merger {
    /// Per thread: the highest interval it sent, and whether it is done.
    seen: Vec<(Option<u64>, bool)>,
    pending: BTreeMap<u64, Part>,
    /// Intervals handed out so far.
    next: u64,
}

impl Merger {
    /// For `threads` worker threads.
    pub fn new(threads: usize) -> Merger {
        Merger {
            seen: vec![(None, false); threads],
            pending: BTreeMap::new(),
            next: 0,
        }
    }

    /// Takes one report.
    pub fn take(&mut self, r: Report) {
        match r {
            Report::Slice { thread, idx, part } => {
                let e = self.pending.entry(idx).or_default();
                e.hist
                    .add(&part.hist)
                    .expect("histograms of equal bounds add");
                e.bytes += part.bytes;
                let s = &mut self.seen[thread].0;
                *s = Some(s.map_or(idx, |v| v.max(idx)));
            }
            Report::Done { thread } => self.seen[thread].1 = true,
        }
    }

    /// The intervals every running thread has sent, in order (each once).
    pub fn ready(&mut self) -> Vec<(u64, Part)> {
        let upto = self
            .seen
            .iter()
            .filter(|(_, done)| !done)
            .map(|(s, _)| s.map_or(-1, |v| v as i64))
            .min();
        let upto = match upto {
            Some(u) => u,
            None => self.pending.keys().next_back().map_or(-1, |&k| k as i64),
        };
        self.take_upto(upto)
    }

    /// Everything left, in order (the threads are gone).
    pub fn rest(&mut self) -> Vec<(u64, Part)> {
        let last = self.pending.keys().next_back().map_or(-1, |&k| k as i64);
        self.take_upto(last)
    }

    fn take_upto(&mut self, upto: i64) -> Vec<(u64, Part)> {
        let mut out = Vec::new();
        while (self.next as i64) <= upto {
            let part = self.pending.remove(&self.next).unwrap_or_default();
            out.push((self.next, part));
            self.next += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn slices_merge_in_order_once_every_thread_is_past_them() {
        let (tx, rx) = mpsc::channel();
        let mut a = Recorder::new(0, 1000, 100, tx.clone());
        let mut b = Recorder::new(1, 1000, 100, tx);
        let mut m = Merger::new(2);
        a.record(1010, 5, 64);
        a.record(1150, 7, 64); // rolls interval 0 of thread a
        b.record(1020, 9, 64);
        for r in rx.try_iter() {
            m.take(r);
        }
        assert!(m.ready().is_empty(), "thread b has not finished interval 0");
        b.roll(1100);
        a.roll(1400); // a: intervals 1..3 sent, 1 and 3 empty, 2 empty
        for r in rx.try_iter() {
            m.take(r);
        }
        let got = m.ready();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, 0);
        assert_eq!(got[0].1.msgs(), 2);
        assert_eq!(got[0].1.bytes, 128);
        assert_eq!(got[0].1.hist.max(), 9);
        b.finish(1250); // b: interval 1 rolled, partial interval 2 sent, done
        a.finish(1420); // a: partial interval 4 sent, done
        for r in rx.try_iter() {
            m.take(r);
        }
        let got = m.ready();
        let idx: Vec<u64> = got.iter().map(|(i, _)| *i).collect();
        assert_eq!(idx, vec![1, 2, 3, 4]);
        assert_eq!(got[0].1.msgs(), 1, "a's echo at 1150");
        assert!(got[1..].iter().all(|(_, p)| p.msgs() == 0));
        assert!(m.rest().is_empty());
    }
}
