//! Ending connections: failures counted by kind, cancellation of what is pending, the close
//! once nothing is, and the end of the run (drain, grace, timeouts).

use echoport_core::{Backend, Op, Token};

use super::{Failure, Phase, Worker};

impl<B: Backend> Worker<B> {
    pub(super) fn begin_drain(&mut self, now: u64, deadline: u64) {
        if self.phase == Phase::Drain {
            self.drain_deadline = self.drain_deadline.min(deadline);
            return;
        }
        self.phase = Phase::Drain;
        self.drain_deadline = deadline;
        self.drop_orphans();
        if deadline <= now {
            return; // the loop ends everything at once
        }
        // Connections with nothing owed are done now.
        self.scratch.clear();
        self.scratch.extend_from_slice(&self.active);
        for i in 0..self.scratch.len() {
            let token = self.scratch[i];
            if self.conns.get_mut(token).is_some_and(|c| c.idle()) {
                self.begin_close(token);
            }
        }
    }

    /// The end grace ran out (or Ctrl-C): close everything; echoes still owed are errors
    /// unless interrupted.
    pub(super) fn end_all(&mut self) {
        self.scratch.clear();
        self.scratch.extend_from_slice(&self.active);
        for i in 0..self.scratch.len() {
            let token = self.scratch[i];
            let owed = self.conns.get_mut(token).is_some_and(|c| c.owed() > 0);
            if owed && !self.interrupted {
                self.fail(token, Failure::Timeout);
            } else {
                self.begin_close(token);
            }
        }
    }

    pub(super) fn scan_timeouts(&mut self, now: u64) {
        self.scratch.clear();
        self.scratch.extend_from_slice(&self.active);
        for i in 0..self.scratch.len() {
            let token = self.scratch[i];
            let stalled = self.conns.get_mut(token).is_some_and(|c| {
                c.owed() > 0 && now.saturating_sub(c.last_progress) > self.plan.timeout_ns
            });
            if stalled {
                self.fail(token, Failure::Timeout);
            }
        }
    }

    /// Counts a broken connection (and the echo it still owed) and closes it.
    pub(super) fn fail(&mut self, token: Token, why: Failure) {
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        if c.closing {
            return;
        }
        if matches!(why, Failure::Lost) && self.plan.reconnect {
            self.server_closed(token);
            return;
        }
        let e = &mut self.tally.errors;
        match why {
            Failure::Lost => e.connection_lost += 1,
            Failure::Timeout => e.timeout += 1,
            Failure::Io => e.io_error += 1,
        }
        let owed = c.owed();
        if owed > 0 {
            e.short_echo += 1;
            e.missing_bytes += owed;
        }
        self.begin_close(token);
    }

    pub(super) fn begin_close(&mut self, token: Token) {
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        if c.closing {
            return;
        }
        c.closing = true;
        let (pos, sock, rx_fd) = (c.active_pos, c.sock, c.rx_fd.take());
        let (recv_armed, sending) = (c.recv_armed, c.send.is_some());
        self.unwatch(rx_fd);
        self.remove_target(token);
        self.active.swap_remove(pos);
        if let Some(&moved) = self.active.get(pos) {
            if let Some(m) = self.conns.get_mut(moved) {
                m.active_pos = pos;
            }
        }
        if recv_armed {
            self.io.push(Op::CancelRecv { token, sock });
        }
        if sending {
            self.io.push(Op::CancelSend { token, sock });
        }
        self.maybe_close(token);
    }

    /// Closes a closing connection once nothing of it is pending in the backend.
    pub(super) fn maybe_close(&mut self, token: Token) {
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        if c.closing && !c.recv_armed && c.send.is_none() {
            let sock = c.sock;
            self.io.push(Op::Close { token, sock });
            self.conns.remove(token);
        }
    }
}
