//! A scripted, in-memory backend for testing the echo logic without a kernel.
//!
//! [`FakeIo`] records every posted [`Op`] and every released buffer and checks the contract a
//! real backend relies on: no two sends in flight on one connection, no close while an
//! operation is pending, no buffer released twice or released while unknown.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::{Backend, Submit, Waker};
use crate::conn::{Budget, Cx, Limits, Segments};
use crate::op::{BufId, Completion, ListenerId, Op, Socket};
use crate::stats::Stats;
use crate::token::Token;

/// Recording backend. Buffers are "received" with [`FakeIo::lend`]; completions are scripted
/// with [`FakeIo::complete`] and come out of [`Backend::wait`] in order.
pub struct FakeIo {
    /// Every operation posted, in order.
    pub ops: Vec<Op>,
    /// Every buffer released, in order.
    pub released: Vec<BufId>,
    /// Buffers currently lent out.
    pub lent: HashSet<BufId>,
    /// Contents of buffers by id.
    pub contents: HashMap<BufId, Vec<u8>>,
    /// Connections with a send in flight.
    pub sending: HashSet<Token>,
    /// What [`Submit::max_send_parts`] answers (0 counts as 1: single-buffer sends only).
    pub send_parts: usize,
    /// Connections with a receive posted (and not ended).
    pub receiving: HashSet<Token>,
    /// Connections closed.
    pub closed: Vec<Token>,
    /// Completions to hand out on the next waits.
    pub script: VecDeque<Completion>,
    /// What [`Submit::buf_size`] answers.
    pub buf_size: u32,
    /// What [`Submit::free_buffers`] answers.
    pub free: usize,
    /// What [`Submit::total_buffers`] answers.
    pub total: usize,
    /// Small receives appended onto another buffer ([`Submit::copy`]), in order.
    pub copies: Vec<(BufId, u32, BufId, u32)>,
    /// When set, the next [`Backend::wait`] fails with this OS error code.
    pub wait_error: Option<i32>,
    /// What [`Backend::peer_ip`] answers, by socket (unknown: `None`).
    pub peers: HashMap<Socket, std::net::IpAddr>,
    next_buf: u32,
    listeners: u32,
}

impl Default for FakeIo {
    fn default() -> Self {
        FakeIo {
            ops: Vec::new(),
            released: Vec::new(),
            lent: HashSet::new(),
            contents: HashMap::new(),
            sending: HashSet::new(),
            send_parts: 0,
            receiving: HashSet::new(),
            closed: Vec::new(),
            script: VecDeque::new(),
            buf_size: 4096,
            free: 1024,
            total: 1024,
            copies: Vec::new(),
            wait_error: None,
            peers: HashMap::new(),
            next_buf: 0,
            listeners: 0,
        }
    }
}

impl FakeIo {
    /// An empty fake.
    pub fn new() -> FakeIo {
        FakeIo::default()
    }

    /// Lends a fresh buffer holding `bytes`, as a receive completion would.
    pub fn lend(&mut self, bytes: &[u8]) -> BufId {
        let id = BufId(self.next_buf);
        self.next_buf += 1;
        self.lent.insert(id);
        self.contents.insert(id, bytes.to_vec());
        id
    }

    /// Queues a completion for the next wait (its effect on the in-flight bookkeeping is
    /// noted when [`Backend::wait`] delivers it, by [`FakeIo::note_delivered`]).
    pub fn complete(&mut self, c: Completion) {
        self.script.push_back(c);
    }

    /// Notes the effect of a completion on the in-flight bookkeeping (called when delivered).
    pub fn note_delivered(&mut self, c: &Completion) {
        match *c {
            Completion::Send { token, .. } => {
                self.sending.remove(&token);
            }
            Completion::Recv { token, more, .. } if !more => {
                self.receiving.remove(&token);
            }
            _ => {}
        }
    }

    /// A handler context over this fake, at time 0, its budget sized from the fake's pool
    /// (`buf_size`, `total`): what a scripted test hands a [`crate::conn::Conn`] handler.
    pub fn cx<'a>(
        &'a mut self,
        segs: &'a mut Segments,
        limits: &'a Limits,
        stats: &'a mut Stats,
    ) -> Cx<'a, FakeIo> {
        let budget = Budget::new(limits, self.buf_size, self.total);
        Cx {
            io: self,
            segs,
            limits,
            budget,
            stats,
            now: 0,
        }
    }

    /// Takes the operations posted since the last call.
    pub fn take_ops(&mut self) -> Vec<Op> {
        std::mem::take(&mut self.ops)
    }
}

impl Submit for FakeIo {
    fn push(&mut self, op: Op) {
        match op {
            Op::Send { token, .. } | Op::SendParts { token, .. } => {
                assert!(
                    self.sending.insert(token),
                    "two sends in flight on {token:?}"
                );
            }
            Op::Recv { token, .. } => {
                assert!(
                    self.receiving.insert(token),
                    "two receives posted on {token:?}"
                );
            }
            Op::Close { token, .. } if token != Token::NONE => {
                assert!(
                    !self.sending.contains(&token),
                    "close with a send in flight"
                );
                assert!(
                    !self.receiving.contains(&token),
                    "close with a receive posted"
                );
                assert!(!self.closed.contains(&token), "closed twice");
                self.closed.push(token);
            }
            _ => {}
        }
        self.ops.push(op);
    }

    fn release(&mut self, buf: BufId) {
        assert!(
            self.lent.remove(&buf),
            "buffer {buf:?} released twice or never lent"
        );
        self.released.push(buf);
    }

    fn max_send_parts(&self) -> usize {
        self.send_parts.max(1)
    }

    fn buf_size(&self) -> u32 {
        self.buf_size
    }

    fn copy(&mut self, dst: BufId, at: u32, src: BufId, len: u32) {
        assert!(self.lent.contains(&src), "copy from {src:?}, not lent");
        assert!(self.lent.contains(&dst), "copy into {dst:?}, not lent");
        assert_ne!(src, dst, "copy onto itself");
        assert!(at + len <= self.buf_size, "copy past the end of {dst:?}");
        let bytes = self.contents[&src][..len as usize].to_vec();
        let d = self.contents.get_mut(&dst).expect("known buffer");
        if d.len() < (at + len) as usize {
            d.resize((at + len) as usize, 0);
        }
        d[at as usize..(at + len) as usize].copy_from_slice(&bytes);
        self.copies.push((dst, at, src, len));
    }

    fn free_buffers(&self) -> usize {
        self.free
    }

    fn total_buffers(&self) -> usize {
        self.total
    }
}

struct NoWake;
impl Waker for NoWake {
    fn wake(&self) {}
}

impl Backend for FakeIo {
    fn add_listener(&mut self, _l: std::net::TcpListener) -> io::Result<ListenerId> {
        self.listeners += 1;
        Ok(ListenerId(self.listeners - 1))
    }

    fn adopt(&mut self, _s: std::net::TcpStream) -> io::Result<Socket> {
        Ok(Socket(0))
    }

    fn waker(&self) -> Arc<dyn Waker> {
        Arc::new(NoWake)
    }

    fn wait(&mut self, out: &mut Vec<Completion>, _t: Option<Duration>) -> io::Result<()> {
        if let Some(code) = self.wait_error.take() {
            return Err(io::Error::from_raw_os_error(code));
        }
        while let Some(c) = self.script.pop_front() {
            self.note_delivered(&c);
            out.push(c);
        }
        Ok(())
    }

    fn buf(&self, buf: BufId) -> &[u8] {
        &self.contents[&buf]
    }

    fn alloc_buf(&mut self) -> Option<BufId> {
        Some(self.lend(&[0; 64]))
    }

    fn buf_mut(&mut self, buf: BufId) -> &mut [u8] {
        self.contents.get_mut(&buf).expect("known buffer")
    }

    fn describe(&self) -> String {
        "fake".into()
    }

    fn buffer_misuses(&self) -> u64 {
        0
    }

    fn peer_ip(&self, sock: Socket) -> Option<std::net::IpAddr> {
        self.peers.get(&sock).copied()
    }
}

/// xorshift64*: a small, fast random source that a seed replays exactly, for the random
/// tests (completion orders, PROXY headers). Seed it with a nonzero value.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    #[allow(clippy::should_implement_trait)] // not an iterator: it never ends
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}
