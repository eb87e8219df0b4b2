//! Connection churn: which connections take new messages, closing one that has had its
//! `--messages-per-conn` echoes, replacing one the server closed (`--reconnect`), and asking
//! the connector for the replacement.

use echoport_core::{Backend, Token};

use super::{Msg, Phase, ThreadLoad, Worker};
use crate::bench::connector::Request;

impl<B: Backend> Worker<B> {
    /// Queues `m` on connection `token`; a connection that has had its share stops taking
    /// new messages.
    pub(super) fn enqueue(&mut self, token: Token, m: Msg) {
        let per_conn = self.plan.messages_per_conn;
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        c.queue.push_back(m);
        c.issued += 1;
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(token);
        }
        if per_conn.is_some_and(|k| c.issued >= k) {
            self.remove_target(token);
        }
    }

    /// Open loop: `token` takes new messages, in turn with the others.
    pub(super) fn add_target(&mut self, token: Token) {
        if !matches!(self.plan.load, ThreadLoad::Open { .. }) {
            return;
        }
        if let Some(c) = self.conns.get_mut(token) {
            if c.target_pos.is_none() {
                c.target_pos = Some(self.targets.len());
                self.targets.push(token);
            }
        }
    }

    pub(super) fn remove_target(&mut self, token: Token) {
        let Some(pos) = self.conns.get_mut(token).and_then(|c| c.target_pos.take()) else {
            return;
        };
        self.targets.swap_remove(pos);
        if let Some(&moved) = self.targets.get(pos) {
            if let Some(m) = self.conns.get_mut(moved) {
                m.target_pos = Some(pos);
            }
        }
    }

    /// Open loop: messages left unsent by a connection the server closed go out first, on
    /// the connections there are (their latency still counts from their intended time).
    pub(super) fn hand_out_orphans(&mut self) {
        while !self.targets.is_empty() {
            let Some(m) = self.orphans.pop_front() else {
                return;
            };
            let token = self.targets[self.rr % self.targets.len()];
            self.rr = self.rr.wrapping_add(1);
            self.enqueue(token, m);
        }
    }

    /// After an echo: a connection that has had its share and owes nothing is closed, and
    /// a new one asked for in its place.
    pub(super) fn maybe_recycle(&mut self, token: Token) {
        let Some(k) = self.plan.messages_per_conn else {
            return;
        };
        let spent = self
            .conns
            .get_mut(token)
            .is_some_and(|c| !c.closing && c.echoed >= k && c.idle());
        if spent && self.phase == Phase::Run {
            self.tally.churn.closes += 1;
            self.replace(token);
        }
    }

    /// The server closed the connection (`--reconnect`): not an error. Echoes it still owed
    /// are counted as abandoned; messages it had not sent yet go to the next connection
    /// (open loop) or are made again there (closed loop); a new connection is asked for.
    /// Once the run is draining nothing replaces it, and all it held is abandoned.
    pub(super) fn server_closed(&mut self, token: Token) {
        let run = self.phase == Phase::Run;
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        let started = c.send_idx + usize::from(c.send_off > 0);
        let cut = if run {
            started.min(c.queue.len())
        } else {
            c.queue.len()
        };
        let unsent: Vec<Msg> = c.queue.drain(cut..).collect();
        let churn = &mut self.tally.churn;
        churn.reconnects += 1;
        churn.abandoned_msgs += c.queue.len() as u64;
        churn.abandoned_bytes += c.owed();
        if matches!(self.plan.load, ThreadLoad::Open { .. }) {
            self.orphans.extend(unsent);
        } else {
            let measured = unsent.iter().filter(|m| m.measured).count() as u64;
            self.issued_measured -= measured;
        }
        self.replace(token);
    }

    /// The run stops creating messages: orphans no connection took are abandoned.
    pub(super) fn drop_orphans(&mut self) {
        self.tally.churn.abandoned_msgs += self.orphans.len() as u64;
        self.orphans.clear();
    }

    /// Closes `token` and asks the connector for a connection in its place.
    fn replace(&mut self, token: Token) {
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        let req = Request {
            gid: c.gid,
            next_seq: c.next_seq,
        };
        self.begin_close(token);
        if self.phase != Phase::Run {
            return;
        }
        if let Some(tx) = &self.requests {
            if tx.send(req).is_ok() {
                self.pending += 1;
            }
        }
    }
}
