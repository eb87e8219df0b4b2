//! Accepts when a worker may own several rings ("table mode", `rings.rs`): a batch of
//! one-shot accepts into direct descriptors, each posted only for a slot that is free.
//!
//! A multishot accept takes every connection the listen queue holds whenever the loop enters
//! its ring, and a table that fills meanwhile makes the kernel drop the connection it just
//! accepted (`ENFILE` after the handshake: the client sees its connection close). So here
//! every posted accept is promised a slot of its ring (`Tables::pending`) and a ring gets no
//! more accepts than it has free slots; when the ring taking accepts is full they go to the
//! roomiest ring, or a new one. To the state machine this looks like one multishot accept:
//! connections come with `more` set until the listener closes or every accept has failed.

use echoport_core::{Completion, ListenerId, OpError, OpKind, Post, Socket, Token};
use io_uring::{opcode, types};

use super::{FIXED, Uring};
use crate::sys::op_error;

/// One-shot accepts kept posted per listener.
const BATCH: u32 = 32;

impl Uring {
    /// True when accepts go through this file (several rings may hold connections).
    pub(super) fn table_mode(&self) -> bool {
        self.fast && self.direct_accept && self.tables.max_rings > 1
    }

    /// The ring the next accept (or adopted stream) goes on: the one taking them while it
    /// has a free slot, else the roomiest, else a new ring; `None` when every table is full.
    pub(super) fn ring_with_room(&mut self) -> Option<usize> {
        let cur = self.tables.accepting as usize;
        if self.tables.free_slots(cur) > 0 {
            return Some(cur);
        }
        let r = self.tables.roomiest().or_else(|| self.new_ring())?;
        self.tables.accepting = r as u16;
        Some(r)
    }

    /// Posts one-shot accepts on listener `i` up to the batch, each on a ring with a slot
    /// for it. When none is posted and none can be, the accept fails with "too many files"
    /// (the state machine backs off and tries again), and the limit is logged once.
    pub(super) fn fill_accepts(&mut self, i: usize) {
        let Some(fd) = self.listeners[i]
            .fd
            .as_ref()
            .map(std::os::fd::AsRawFd::as_raw_fd)
        else {
            return;
        };
        while self.listeners[i].posted < BATCH {
            let Some(r) = self.ring_with_room() else {
                break;
            };
            let e = opcode::Accept::new(types::Fd(fd), std::ptr::null_mut(), std::ptr::null_mut())
                // (No SOCK_CLOEXEC: the kernel refuses it with a direct descriptor, which no
                // exec can inherit anyway.)
                .file_index(Some(types::DestinationSlot::auto_target()))
                .build()
                .user_data(Token::new(i as u32, 0).pack(OpKind::Accept));
            self.tables.pending[r] += 1;
            self.listeners[i].posted += 1;
            self.enqueue_on(r, e);
        }
        if self.listeners[i].posted == 0 {
            self.tables.log_full(None);
            self.listeners[i].armed = false;
            self.synthetic.push(Completion::Accept {
                listener: ListenerId(i as u32),
                result: Err(OpError::TooManyFiles),
                more: false,
            });
        }
    }

    /// One of listener `i`'s one-shot accepts on ring `ring` finished.
    pub(super) fn complete_table_accept(
        &mut self,
        ring: usize,
        i: usize,
        res: i32,
        out: &mut Vec<Completion>,
    ) {
        self.tables.pending[ring] = self.tables.pending[ring].saturating_sub(1);
        let sock = (res >= 0).then_some(Socket(FIXED | (ring as u64) << 32 | res as u64));
        if sock.is_some() {
            self.tables.used[ring] += 1;
        }
        let l = &mut self.listeners[i];
        l.posted = l.posted.saturating_sub(1);
        let last = l.posted == 0;
        if last {
            l.armed = false;
        }
        if l.closing {
            if last {
                l.fd = None;
            }
            if let Some(s) = sock {
                self.post_close(Token::NONE, s);
            }
            return;
        }
        if sock.is_some() {
            // Still posted (and more to come): the batch is topped up below.
            self.listeners[i].armed = true;
        }
        let listener = ListenerId(i as u32);
        match sock {
            Some(s) => {
                out.push(Completion::Accept {
                    listener,
                    result: Ok(s),
                    more: true,
                });
                self.fill_accepts(i);
            }
            None => {
                // Errors end the accept once none is left posted (the state machine then
                // backs off and posts it again); the connections still come meanwhile.
                out.push(Completion::Accept {
                    listener,
                    result: Err(op_error(-res)),
                    more: !last,
                });
            }
        }
    }

    /// Stops listener `i`'s accepts: cancels every one posted, on every ring.
    pub(super) fn cancel_table_accepts(&mut self, i: usize) {
        let ud = Token::new(i as u32, 0).pack(OpKind::Accept);
        for r in 0..self.tables.rings() {
            if self.tables.pending[r] > 0 {
                let e = opcode::AsyncCancel2::new(types::CancelBuilder::user_data(ud).all())
                    .build()
                    .user_data(Token::NONE.pack(OpKind::Cancel));
                self.enqueue_on(r, e);
            }
        }
    }
}
