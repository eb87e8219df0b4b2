//! The queue of received bytes waiting for echo: segments (a lent buffer, an offset and a
//! length) kept in one store per worker, each connection holding only its head and tail.

use crate::op::BufId;

/// End of a segment list.
pub(super) const NIL: u32 = u32::MAX;

#[derive(Copy, Clone, Debug)]
pub(super) struct Seg {
    pub(super) buf: BufId,
    pub(super) off: u32,
    pub(super) len: u32,
    pub(super) next: u32,
}

/// Shared storage for the queued echo segments of all connections of one worker.
///
/// A connection keeps only the head and tail index of its queue, so an idle connection costs
/// no heap memory of its own.
#[derive(Default)]
pub struct Segments {
    pub(super) slots: Vec<Seg>,
    free: Vec<u32>,
}

impl Segments {
    /// Empty storage.
    pub fn new() -> Segments {
        Segments::default()
    }

    /// Segments currently queued across all connections.
    pub fn in_use(&self) -> usize {
        self.slots.len() - self.free.len()
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

#[derive(Copy, Clone, Debug, Default)]
pub(super) struct Queue {
    pub(super) head: u32,
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
