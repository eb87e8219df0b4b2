//! Reaping: one function per kind of completion, each turning a completion queue entry into
//! the backend-neutral [`Completion`] the state machine handles (an accept finished, a
//! receive delivered bytes, a send finished), and handing each buffer over in the pool.

use echoport_core::{
    BufId, Completion, ListenerId, Op, OpError, OpKind, Received, Socket, Submit, Token,
};
use io_uring::cqueue;

use super::{FIXED, NONE, RecvMode, Uring};
use crate::sys::op_error;

fn result(res: i32) -> Result<u32, OpError> {
    if res < 0 {
        Err(op_error(-res))
    } else {
        Ok(res as u32)
    }
}

impl Uring {
    /// Turns one completion queue entry of ring `ring` (0: this one; the extra rings count
    /// their own operations in flight) into zero or one [`Completion`].
    pub(super) fn complete(
        &mut self,
        ring: usize,
        ud: u64,
        res: i32,
        flags: u32,
        out: &mut Vec<Completion>,
    ) {
        let more = cqueue::more(flags);
        if !more && ring == 0 {
            self.inflight = self.inflight.saturating_sub(1);
        }
        let Some((kind, token)) = Token::unpack(ud) else {
            return;
        };
        match kind {
            OpKind::Accept => self.complete_accept(ring, token, res, more, out),
            OpKind::Recv => {
                let result = match self.recv_mode {
                    RecvMode::OneshotOwn => self.received_into_own(token, res),
                    _ => self.received_from_ring(ring, res, flags),
                };
                // An error or end of stream always ends the receive.
                let more = more && matches!(result, Ok(Received::Data { .. }));
                out.push(Completion::Recv {
                    token,
                    result,
                    more,
                });
            }
            OpKind::Send => self.complete_send(token, res, out),
            OpKind::Wake if token != Token::NONE => self.complete_table_wake(token.id, res),
            OpKind::Wake => self.complete_wake(res, out),
            OpKind::Cancel | OpKind::Close | OpKind::Shutdown => {
                if res < 0 && !matches!(-res, libc::ENOENT | libc::EALREADY | libc::ENOTCONN) {
                    tracing::debug!(?kind, error = %std::io::Error::from_raw_os_error(-res), "io_uring housekeeping op failed");
                }
            }
        }
    }

    /// An accept finished: a new socket (direct descriptor on the fast path), or an error.
    /// On a closing listener, the socket is closed at once. An accept moved to another ring
    /// (`rings.rs`) still hands over what it took, but its end is not the listener's.
    fn complete_accept(
        &mut self,
        ring: usize,
        token: Token,
        res: i32,
        more: bool,
        out: &mut Vec<Completion>,
    ) {
        let i = token.id as usize;
        let Some(l) = self.listeners.get_mut(i) else {
            return;
        };
        let current = l.ring as usize == ring;
        if !more && current {
            l.armed = false;
        }
        let closing = l.closing;
        let direct = self.direct_accept;
        if res >= 0 && direct {
            self.tables.used[ring] += 1;
        }
        let sock = result(res).map(|v| {
            Socket(if direct {
                FIXED | (ring as u64) << 32 | v as u64
            } else {
                v as u64
            })
        });
        if !current {
            if let Ok(s) = sock {
                let s = Ok(s);
                out.push(Completion::Accept {
                    listener: ListenerId(i as u32),
                    result: s,
                    more: true,
                });
            }
            return;
        }
        if !more && res == -libc::ENFILE && direct && !closing && self.accept_elsewhere(i) {
            // The table filled before the accept could move: it goes on with another ring.
            return;
        }
        if closing {
            if let Ok(s) = sock {
                self.push(Op::Close {
                    token: Token::NONE,
                    sock: s,
                });
            }
            if !more && current {
                self.listeners[i].fd = None;
            }
            return;
        }
        out.push(Completion::Accept {
            listener: ListenerId(i as u32),
            result: sock,
            more: more && res >= 0,
        });
    }

    /// A receive from the buffer ring: the buffer the kernel picked is lent to the state
    /// machine when bytes came; without bytes it goes straight back to the ring.
    fn received_from_ring(
        &mut self,
        ring: usize,
        res: i32,
        flags: u32,
    ) -> Result<Received, OpError> {
        let bid = cqueue::buffer_select(flags).map(u32::from);
        if bid.is_some() {
            self.tables.taken(ring);
        } else if res == -libc::ENOBUFS {
            self.tables.starved[ring] = true;
        }
        match (res, bid) {
            (n, Some(b)) if n > 0 => match self.pool.lend(b) {
                Ok(()) => Ok(Received::Data {
                    buf: BufId(b),
                    len: n as u32,
                }),
                Err(m) => {
                    // The kernel named a buffer the pool did not give it: never hand it on.
                    self.misuse(m);
                    Err(OpError::Os(libc::EFAULT))
                }
            },
            (n, b) => {
                if let Some(b) = b {
                    // Picked but unused: still the kernel's; publish it again.
                    self.publish_to(ring, b);
                }
                if n == 0 {
                    Ok(Received::Eof)
                } else {
                    Err(op_error(-n))
                }
            }
        }
    }

    /// A one-shot receive into the buffer posted with it (no fast path).
    fn received_into_own(&mut self, token: Token, res: i32) -> Result<Received, OpError> {
        let slot = self
            .recv_buf
            .get_mut(token.id as usize)
            .map(|b| std::mem::replace(b, NONE))
            .filter(|&b| b != NONE);
        let Some(b) = slot else {
            return if res > 0 {
                Err(OpError::Os(libc::EFAULT))
            } else {
                result(res).map(|_| Received::Eof)
            };
        };
        if res > 0 {
            if let Err(m) = self.pool.lend(b) {
                self.misuse(m);
                return Err(OpError::Os(libc::EFAULT));
            }
            return Ok(Received::Data {
                buf: BufId(b),
                len: res as u32,
            });
        }
        if let Err(m) = self.pool.unpost(b) {
            self.misuse(m);
        }
        result(res).map(|_| Received::Eof)
    }

    /// A send finished; a gathered send's header is free again.
    fn complete_send(&mut self, token: Token, res: i32, out: &mut Vec<Completion>) {
        if let Some(m) = self.send_msgs.remove(&token.id) {
            // The kernel is done with this gathered send's header and vector.
            self.msg_free.push(m);
        }
        out.push(Completion::Send {
            token,
            result: result(res),
        });
    }

    /// The waker's eventfd was read: drain it and post the next read. A read that failed is
    /// re-posted too, but it cannot fail repeatedly on a kernel with `FMODE_NOWAIT` eventfds
    /// (5.8+); log it so a loop would show.
    fn complete_wake(&mut self, res: i32, out: &mut Vec<Completion>) {
        if res < 0 {
            tracing::warn!(error = %std::io::Error::from_raw_os_error(-res), "waker read failed");
        }
        self.waker.drain();
        self.arm_waker();
        out.push(Completion::Wake);
    }

    /// An extra ring's eventfd fired: collect its completions this turn, read it again.
    fn complete_table_wake(&mut self, ring: u32, res: i32) {
        if res < 0 && res != -libc::ECANCELED {
            tracing::warn!(ring, error = %std::io::Error::from_raw_os_error(-res), "ring wake-up read failed");
        }
        let r = ring as usize;
        if let Some(t) = r.checked_sub(1).and_then(|i| self.tables.extra.get_mut(i)) {
            t.flagged = true;
            if res != -libc::ECANCELED {
                self.arm_table_wake(r);
            }
        }
    }
}
