//! A hashed timing wheel of connection tokens: one entry per connection, not per operation.
//!
//! The wheel does not know why a connection is waiting. Each connection sits in exactly one
//! slot; when its slot comes round, the worker asks the connection when it really expires
//! (activity since it was filed pushes that later) and either acts or files it again. A
//! receive or a send therefore costs no timer work at all.

use crate::token::Token;

/// Slots in the wheel; deadlines further out than this many ticks go round more than once.
const SLOTS: usize = 256;

/// The wheel.
pub struct Wheel {
    /// The tokens filed for each tick, modulo `SLOTS`.
    slots: Vec<Vec<Token>>,
    /// The next tick not yet processed.
    cursor: u64,
    /// Tokens filed.
    len: usize,
    /// The earliest tick at which a filed token comes up (a lower bound).
    next_due: Option<u64>,
}

impl Default for Wheel {
    fn default() -> Self {
        Wheel::new(0)
    }
}

impl Wheel {
    /// An empty wheel whose first unprocessed tick is `now`.
    pub fn new(now: u64) -> Wheel {
        Wheel {
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            cursor: now,
            len: 0,
            next_due: None,
        }
    }

    /// Entries filed.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is filed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Files `token` to come up at tick `at` (or at the next tick if `at` is already past).
    /// Deadlines beyond one turn come up early and are simply filed again.
    pub fn insert(&mut self, token: Token, at: u64) {
        let at = at.max(self.cursor);
        self.slots[(at % SLOTS as u64) as usize].push(token);
        self.len += 1;
        // A deadline beyond one turn comes up when its slot does, within the turn.
        let up = at.min(self.cursor + SLOTS as u64 - 1);
        self.next_due = Some(self.next_due.map_or(up, |d| d.min(up)));
    }

    /// Takes every token filed in the slots of ticks up to and including `now`, appending them
    /// to `out`.
    pub fn expire(&mut self, now: u64, out: &mut Vec<Token>) {
        // After a long pause, one full turn visits every slot.
        let end = now.min(self.cursor + SLOTS as u64 - 1);
        while self.cursor <= end {
            let slot = &mut self.slots[(self.cursor % SLOTS as u64) as usize];
            self.len -= slot.len();
            out.append(slot);
            self.cursor += 1;
        }
        self.cursor = self.cursor.max(now + 1);
        if self.next_due.is_some_and(|d| d < self.cursor) {
            self.next_due = (0..SLOTS as u64)
                .map(|k| self.cursor + k)
                .find(|t| !self.slots[(t % SLOTS as u64) as usize].is_empty());
        }
    }

    /// The first tick at which something filed comes up, so a waiting loop need not wake
    /// every tick; `None` when nothing is filed.
    pub fn next_due(&self) -> Option<u64> {
        self.next_due.filter(|_| self.len > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(id: u32) -> Token {
        Token::new(id, 0)
    }

    #[test]
    fn tokens_come_up_at_their_tick_not_before() {
        let mut w = Wheel::new(0);
        w.insert(t(1), 3);
        w.insert(t(2), 5);
        assert_eq!(w.next_due(), Some(3));
        let mut out = Vec::new();
        w.expire(2, &mut out);
        assert!(out.is_empty());
        w.expire(4, &mut out);
        assert_eq!(out, vec![t(1)]);
        assert_eq!(w.next_due(), Some(5));
        w.expire(10, &mut out);
        assert_eq!(out, vec![t(1), t(2)]);
        assert!(w.is_empty());
        assert_eq!(w.next_due(), None);
    }

    #[test]
    fn past_deadlines_fire_next_and_far_ones_come_up_early_at_worst() {
        let mut w = Wheel::new(100);
        w.insert(t(1), 50);
        w.insert(t(2), 100 + 1000);
        let mut out = Vec::new();
        w.expire(100, &mut out);
        assert_eq!(out, vec![t(1)]);
        out.clear();
        // A far deadline surfaces within one turn; the caller re-files it.
        w.expire(100 + SLOTS as u64, &mut out);
        assert_eq!(out, vec![t(2)]);
    }

    #[test]
    fn a_long_pause_visits_each_slot_once() {
        let mut w = Wheel::new(0);
        for i in 0..10 {
            w.insert(t(i), i as u64 * 7);
        }
        let mut out = Vec::new();
        w.expire(1_000_000, &mut out);
        assert_eq!(out.len(), 10);
        assert!(w.is_empty());
    }
}
