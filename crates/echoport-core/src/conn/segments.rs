//! The queue of received bytes waiting for echo: segments (a lent buffer, an offset and a
//! length) kept in one store per worker, each connection holding only its head and tail.

use crate::op::BufId;

/// End of a segment list.
pub(super) const NIL: u32 = u32::MAX;

/// One run of received bytes waiting for echo.
#[derive(Copy, Clone, Debug)]
pub(super) struct Seg {
    /// The buffer they are in (lent to the connection until their send completes).
    pub(super) buf: BufId,
    /// Where in the buffer they start.
    pub(super) off: u32,
    /// How many.
    pub(super) len: u32,
    /// The next segment of the same connection's queue ([`NIL`]: the last).
    pub(super) next: u32,
}

/// Shared storage for the queued echo segments of all connections of one worker.
///
/// A connection keeps only the head and tail index of its queue, so an idle connection costs
/// no heap memory of its own.
#[derive(Default)]
pub struct Segments {
    /// Every segment, queued or free, indexed by the lists' `u32`s.
    pub(super) slots: Vec<Seg>,
    /// Indices of the free slots, reused before `slots` grows.
    free: Vec<u32>,
}

impl Segments {
    /// Empty storage.
    pub fn new() -> Segments {
        Segments::default()
    }

    fn alloc(&mut self, seg: Seg) -> u32 {
        if let Some(i) = self.free.pop() {
            self.slots[i as usize] = seg;
            i
        } else {
            self.slots.push(seg);
            (self.slots.len() - 1) as u32
        }
    }
}

/// One connection's queue: the first and last of its segments in [`Segments`].
#[derive(Copy, Clone, Debug, Default)]
pub(super) struct Queue {
    /// The oldest segment ([`NIL`]: empty).
    pub(super) head: u32,
    /// The newest segment, where appends go ([`NIL`]: empty).
    tail: u32,
}

impl Queue {
    pub(super) const EMPTY: Queue = Queue {
        head: NIL,
        tail: NIL,
    };

    pub(super) fn is_empty(&self) -> bool {
        self.head == NIL
    }

    pub(super) fn push(&mut self, segs: &mut Segments, buf: BufId, off: u32, len: u32) {
        let i = segs.alloc(Seg {
            buf,
            off,
            len,
            next: NIL,
        });
        if self.tail == NIL {
            self.head = i;
        } else {
            segs.slots[self.tail as usize].next = i;
        }
        self.tail = i;
    }

    pub(super) fn front<'a>(&self, segs: &'a mut Segments) -> Option<&'a mut Seg> {
        (self.head != NIL).then(|| &mut segs.slots[self.head as usize])
    }

    pub(super) fn back<'a>(&self, segs: &'a mut Segments) -> Option<&'a mut Seg> {
        (self.tail != NIL).then(|| &mut segs.slots[self.tail as usize])
    }

    pub(super) fn pop(&mut self, segs: &mut Segments) -> Option<BufId> {
        if self.head == NIL {
            return None;
        }
        let i = self.head;
        let seg = segs.slots[i as usize];
        self.head = seg.next;
        if self.head == NIL {
            self.tail = NIL;
        }
        segs.free.push(i);
        Some(seg.buf)
    }
}
