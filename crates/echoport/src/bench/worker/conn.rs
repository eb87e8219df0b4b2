//! One connection's traffic: adopting it, filling and posting sends, and checking every
//! echoed byte as it comes back.

use std::collections::VecDeque;

use echoport_core::slab::Slab;
use echoport_core::{Backend, BufId, Completion, Op, OpError, Received, Token};

use super::{Conn, Failure, Incoming, Phase, Plan, ThreadLoad, Worker, classify};
use crate::bench::interval::Recorder;
use crate::bench::pattern;
use crate::bench::tally::Tally;

impl<B: Backend> Worker<B> {
    pub(super) fn add_conn(&mut self, inc: Incoming, now: u64) {
        if self.phase != Phase::Run {
            return; // dropping the stream closes it
        }
        #[cfg(target_os = "linux")]
        let fd = std::os::fd::AsRawFd::as_raw_fd(&inc.stream);
        let sock = match self.io.adopt(inc.stream) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot adopt a connection");
                self.tally.errors.io_error += 1;
                return;
            }
        };
        // Taken: the connector may open the next.
        drop(inc.in_hand);
        let pos = self.active.len();
        let token = self.conns.insert_with(|_| Conn {
            sock,
            gid: inc.gid,
            next_seq: inc.next_seq,
            queue: VecDeque::new(),
            send_idx: 0,
            send_off: 0,
            recv_off: 0,
            posted: 0,
            received: 0,
            send: None,
            recv_armed: true,
            rx_fd: None,
            closing: false,
            dirty: false,
            waiting_buf: false,
            active_pos: pos,
            target_pos: None,
            last_progress: now,
            issued: 0,
            echoed: 0,
            started_ns: inc.started_ns,
            first_echo_seen: false,
        });
        self.active.push(token);
        self.add_target(token);
        #[cfg(target_os = "linux")]
        if self.ticked && self.watch(token, fd) {
            let c = self.conns.get_mut(token).expect("just inserted");
            c.rx_fd = Some(fd);
            c.recv_armed = false;
        }
        if self.conns.get_mut(token).is_some_and(|c| c.recv_armed) {
            self.io.push(Op::Recv {
                token,
                sock,
                max: u32::MAX,
            });
        }
        if let ThreadLoad::Closed { pipeline } = self.plan.load {
            for _ in 0..pipeline {
                if !self.issue(token, now) {
                    break;
                }
            }
        }
    }

    pub(super) fn flush(&mut self, now: u64) {
        for i in 0..self.rearm.len() {
            let token = self.rearm[i];
            if let Some(c) = self.conns.get_mut(token) {
                if !c.closing && !c.recv_armed {
                    c.recv_armed = true;
                    let sock = c.sock;
                    self.io.push(Op::Recv {
                        token,
                        sock,
                        max: u32::MAX,
                    });
                }
            }
        }
        self.rearm.clear();
        let mut dirty = std::mem::take(&mut self.dirty);
        for &token in &dirty {
            let ready = match self.conns.get_mut(token) {
                Some(c) => {
                    c.dirty = false;
                    !c.closing && !c.waiting_buf && c.send.is_none() && c.send_idx < c.queue.len()
                }
                None => false,
            };
            if ready {
                self.start_send(token, now);
            }
        }
        dirty.clear();
        self.dirty = dirty;
    }

    /// Fills one buffer with the connection's unsent bytes and posts it.
    pub(super) fn start_send(&mut self, token: Token, now: u64) {
        let Some(buf) = self.io.alloc_buf() else {
            if let Some(c) = self.conns.get_mut(token) {
                c.waiting_buf = true;
                self.buf_wait.push_back(token);
            }
            return;
        };
        let Worker {
            io,
            conns,
            tally,
            plan,
            ..
        } = self;
        let c = conns.get_mut(token).expect("caller checked");
        let dst = io.buf_mut(buf);
        let cap = dst.len();
        let mut filled = 0;
        while filled < cap && c.send_idx < c.queue.len() {
            let m = c.queue[c.send_idx];
            if c.send_off == 0 && m.measured {
                if plan.end_ns.is_none_or(|e| now < e) {
                    tally.sent += 1;
                } else {
                    tally.sent_late += 1;
                }
                tally.max_send_lag_ns = tally.max_send_lag_ns.max(now.saturating_sub(m.t));
            }
            let n = ((m.len - c.send_off) as usize).min(cap - filled);
            pattern::fill(m.key, c.send_off, &mut dst[filled..filled + n]);
            filled += n;
            c.send_off += n as u32;
            if c.send_off == m.len {
                c.send_idx += 1;
                c.send_off = 0;
            }
        }
        if c.owed() == 0 {
            c.last_progress = now;
        }
        c.posted += filled as u64;
        c.send = Some((buf, 0, filled as u32));
        let sock = c.sock;
        io.push(Op::Send {
            token,
            sock,
            buf,
            off: 0,
            len: filled as u32,
        });
    }

    pub(super) fn dispatch(&mut self, c: Completion, now: u64) {
        match c {
            Completion::Recv {
                token,
                result,
                more,
            } => {
                let Some(conn) = self.conns.get_mut(token) else {
                    if let Ok(Received::Data { buf, .. }) = result {
                        self.io.release(buf);
                    }
                    return;
                };
                if !more {
                    conn.recv_armed = false;
                }
                let closing = conn.closing;
                match result {
                    Ok(Received::Data { buf, len }) => {
                        if !closing {
                            self.on_data(token, buf, len, now);
                        }
                        self.io.release(buf);
                        if !more {
                            self.rearm.push(token);
                        }
                    }
                    Ok(Received::Eof) => self.fail(token, Failure::Lost),
                    Err(OpError::NoBuffers) => self.rearm.push(token),
                    Err(OpError::Canceled) => {}
                    Err(e) => self.fail(token, classify(e)),
                }
                self.maybe_close(token);
            }
            Completion::Send { token, result } => {
                let Some(conn) = self.conns.get_mut(token) else {
                    return;
                };
                let Some((buf, off, len)) = conn.send.take() else {
                    return;
                };
                let closing = conn.closing;
                match result {
                    Ok(n) if n > 0 && n < len && !closing => {
                        conn.send = Some((buf, off + n, len - n));
                        let sock = conn.sock;
                        self.io.push(Op::Send {
                            token,
                            sock,
                            buf,
                            off: off + n,
                            len: len - n,
                        });
                    }
                    Ok(n) if n == len || closing => {
                        self.io.release(buf);
                        if !closing && conn.send_idx < conn.queue.len() && !conn.dirty {
                            conn.dirty = true;
                            self.dirty.push(token);
                        }
                        self.wake_buf_waiter();
                    }
                    Ok(_) => {
                        self.io.release(buf);
                        self.wake_buf_waiter();
                        self.fail(token, Failure::Lost);
                    }
                    Err(e) => {
                        self.io.release(buf);
                        self.wake_buf_waiter();
                        if !closing && e != OpError::Canceled {
                            self.fail(token, classify(e));
                        }
                    }
                }
                self.maybe_close(token);
            }
            Completion::Accept { .. } | Completion::Wake => {}
        }
    }

    pub(super) fn wake_buf_waiter(&mut self) {
        while let Some(token) = self.buf_wait.pop_front() {
            if let Some(c) = self.conns.get_mut(token) {
                c.waiting_buf = false;
                if !c.closing {
                    if !c.dirty {
                        c.dirty = true;
                        self.dirty.push(token);
                    }
                    return;
                }
            }
        }
    }

    /// Checks echoed bytes (a receive's buffer) against the messages in flight and completes
    /// the ones done.
    pub(super) fn on_data(&mut self, token: Token, buf: BufId, len: u32, now: u64) {
        let (io, conns, mut m) = self.echo_parts();
        let c = conns.get_mut(token).expect("caller checked");
        let data = &io.buf(buf)[..len as usize];
        let got = check_echo(c, data, now, &mut m);
        self.after_echo(token, got, now);
    }

    /// The backend, the connections and the meters, borrowed apart, for checking an echo
    /// against its connection while recording it.
    pub(super) fn echo_parts(&mut self) -> (&B, &mut Slab<Conn>, Meters<'_>) {
        let Worker {
            io,
            conns,
            tally,
            intervals,
            plan,
            done_all,
            bytes_all,
            ..
        } = self;
        let m = Meters {
            tally,
            intervals,
            plan,
            done_all,
            bytes_all,
        };
        (io, conns, m)
    }

    /// What follows a receive: an excess echo closes the connection; in the closed loop each
    /// echo makes a new message; at the end an idle connection closes.
    pub(super) fn after_echo(&mut self, token: Token, (done, extra): (u32, u64), now: u64) {
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        let idle = c.idle();
        if extra > 0 {
            self.tally.errors.extra_echo += 1;
            self.tally.errors.extra_bytes += extra;
            self.begin_close(token);
            return;
        }
        if matches!(self.plan.load, ThreadLoad::Closed { .. }) {
            for _ in 0..done {
                if !self.issue(token, now) {
                    break;
                }
            }
        }
        if self.phase == Phase::Drain && idle {
            self.begin_close(token);
        } else {
            self.maybe_recycle(token);
        }
    }
}

/// Where [`check_echo`] counts what it completes.
pub(super) struct Meters<'a> {
    pub tally: &'a mut Tally,
    pub intervals: &'a mut Option<Recorder>,
    pub plan: &'a Plan,
    pub done_all: &'a mut u64,
    pub bytes_all: &'a mut u64,
}

/// Checks `data`, echoed at `now`, against the connection's messages in flight, records
/// each message completed, and returns how many were, and how many bytes came back that
/// were never sent.
pub(super) fn check_echo(c: &mut Conn, data: &[u8], now: u64, m: &mut Meters) -> (u32, u64) {
    let room = c.owed();
    let (data, extra) = if (data.len() as u64) > room {
        (&data[..room as usize], data.len() as u64 - room)
    } else {
        (data, 0)
    };
    let mut done = 0u32;
    let mut p = 0;
    while p < data.len() {
        let msg = c
            .queue
            .front_mut()
            .expect("bytes owed means a message in flight");
        let n = ((msg.len - c.recv_off) as usize).min(data.len() - p);
        if !msg.bad && !pattern::verify(msg.key, c.recv_off, &data[p..p + n]) {
            msg.bad = true;
        }
        c.recv_off += n as u32;
        p += n;
        if c.recv_off == msg.len {
            let msg = c.queue.pop_front().expect("front exists");
            c.send_idx -= 1;
            c.recv_off = 0;
            done += 1;
            *m.done_all += 1;
            *m.bytes_all += msg.len as u64;
            if msg.bad {
                m.tally.errors.mismatch += 1;
            }
            if msg.measured {
                let latency = now.saturating_sub(msg.t);
                m.tally.record(now, latency, msg.len as u64);
                if let Some(r) = m.intervals {
                    r.record(now, latency, msg.len as u64);
                }
            }
        }
    }
    c.received += data.len() as u64;
    c.last_progress = now;
    c.echoed += done as u64;
    if done > 0 && !c.first_echo_seen {
        c.first_echo_seen = true;
        first_echo(m.tally, m.plan, c.started_ns, now);
    }
    (done, extra)
}

/// Times a connection's first echo from the start of its connect (begun in the window).
fn first_echo(tally: &mut Tally, plan: &Plan, started: u64, now: u64) {
    if plan.in_window(started) {
        tally
            .first_echo
            .saturating_record(now.saturating_sub(started).max(1));
    }
}
