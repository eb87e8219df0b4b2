//! Drives the echo state machine with random completion sequences, as a kernel might deliver
//! them (any order among pending operations, short sends, end of stream, resets, buffer
//! exhaustion, cancellations, stop requests) and checks after every step that:
//! - nothing panics, and the fake backend's contract checks hold (at most one send in flight,
//!   no close while an operation is pending, no buffer released twice);
//! - the bytes sent back are always a prefix of the bytes received, in order (also when the
//!   backend gathers several buffers into one send, as io_uring and epoll do);
//! - a closed connection posts nothing more, and has returned every buffer it was lent.
//!
//! `ECHOPORT_FUZZ_CASES` sets the number of random sequences (default 3,000);
//! `ECHOPORT_FUZZ_SEED` replays one.

use echoport_core::conn::{Budget, Conn, Cx, Limits, Segments, Status};
use echoport_core::stats::Stats;
use echoport_core::testing::FakeIo;
use echoport_core::{BufId, Completion, Op, OpError, Received, Socket, Token};

const T: Token = Token {
    id: 1,
    generation: 1,
};

/// Gathered sends posted over all cases (they must happen for the test to mean anything).
static GATHERED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
const S: Socket = Socket(3);

// xorshift64*: small, fast, and reproducible from a seed.
use echoport_core::testing::Rng;

/// What the simulated kernel has pending for the connection.
#[derive(Default)]
struct Kernel {
    recv: Option<bool>, // Some(multishot) while a receive is posted
    recv_cancel: bool,
    /// Bytes the posted receive may still deliver before it ends by itself (its `max`).
    recv_left: u32,
    send: Option<Vec<(BufId, u32, u32)>>,
    send_cancel: bool,
    eof_sent: bool,
}

struct Run {
    io: FakeIo,
    segs: Segments,
    limits: Limits,
    stats: Stats,
    conn: Conn,
    k: Kernel,
    received: Vec<u8>,
    echoed: Vec<u8>,
    closed: bool,
    next_byte: u8,
}

impl Run {
    fn step(&mut self, f: impl FnOnce(&mut Conn, &mut Cx<'_, FakeIo>) -> Status) {
        assert!(!self.closed, "a handler ran after the close");
        let mut cx = self.io.cx(&mut self.segs, &self.limits, &mut self.stats);
        let st = f(&mut self.conn, &mut cx);
        for op in self.io.take_ops() {
            assert!(!self.closed, "operation {op:?} posted after the close");
            match op {
                Op::Recv { max, .. } => {
                    assert!(self.k.recv.is_none(), "second receive posted");
                    assert!(max > 0, "a receive allowed no bytes");
                    self.k.recv = Some(self.next_byte.is_multiple_of(2));
                    self.k.recv_cancel = false;
                    self.k.recv_left = max;
                }
                Op::Send { buf, off, len, .. } => {
                    assert!(self.k.send.is_none(), "second send in flight");
                    assert!(len > 0, "empty send");
                    self.k.send = Some(vec![(buf, off, len)]);
                    self.k.send_cancel = false;
                }
                Op::SendParts { parts, count, .. } => {
                    assert!(self.k.send.is_none(), "second send in flight");
                    assert!(
                        (2..=self.io.send_parts).contains(&(count as usize)),
                        "{count} parts gathered, the backend takes {}",
                        self.io.send_parts
                    );
                    GATHERED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let parts = &parts[..count as usize];
                    assert!(parts.iter().all(|p| p.len > 0), "empty part");
                    self.k.send = Some(parts.iter().map(|p| (p.buf, p.off, p.len)).collect());
                    self.k.send_cancel = false;
                }
                Op::CancelRecv { .. } => self.k.recv_cancel = true,
                Op::CancelSend { .. } => self.k.send_cancel = true,
                Op::Close { .. } => {
                    assert!(
                        self.k.recv.is_none() && self.k.send.is_none(),
                        "close with I/O pending"
                    );
                    self.closed = true;
                }
                Op::Shutdown { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            st == Status::Closed,
            self.closed,
            "status disagrees with the close"
        );
        assert!(
            self.received.starts_with(&self.echoed),
            "echo is not a prefix of what was received"
        );
        let budget = Budget::new(&self.limits, self.io.buf_size, self.io.total);
        assert!(
            self.conn.held() as usize == self.io.lent.len() || self.closed,
            "the machine counts {} buffers held, the backend lent {}",
            self.conn.held(),
            self.io.lent.len()
        );
        assert!(
            self.io.lent.len() as u32 <= 2 * budget.max_buffers + 1,
            "{} buffers held against a budget of {}",
            self.io.lent.len(),
            budget.max_buffers
        );
        if self.closed {
            assert!(
                self.io.lent.is_empty(),
                "closed with buffers still lent: {:?}",
                self.io.lent
            );
        }
    }

    fn deliver_recv(&mut self, result: Result<Received, OpError>, more: bool) {
        let multishot = self.k.recv.expect("receive posted");
        let mut more = more && multishot;
        if let Ok(Received::Data { len, .. }) = result {
            // The kernel ends the receive once it has delivered its allowance.
            self.k.recv_left = self.k.recv_left.saturating_sub(len);
            more &= self.k.recv_left > 0;
        }
        if !more {
            self.k.recv = None;
        }
        self.io.note_delivered(&Completion::Recv {
            token: T,
            result,
            more,
        });
        self.step(|c, cx| c.on_recv(cx, result, more));
    }

    fn deliver_send(&mut self, result: Result<u32, OpError>) {
        let parts = self.k.send.take().expect("send in flight");
        if let Ok(mut n) = result {
            // The kernel sends the parts in order, the last one it reaches maybe partly.
            for (buf, off, len) in parts {
                let take = n.min(len);
                let bytes = &self.io.contents[&buf][off as usize..(off + take) as usize];
                self.echoed.extend_from_slice(bytes);
                n -= take;
            }
            assert_eq!(n, 0, "the fake kernel sent more than was asked");
        }
        self.io
            .note_delivered(&Completion::Send { token: T, result });
        self.step(|c, cx| c.on_sent(cx, result));
    }
}

fn run_case(seed: u64) -> Stats {
    let mut rng = Rng(seed | 1);
    let mut r = Run {
        io: FakeIo::new(),
        segs: Segments::new(),
        limits: Limits {
            max_pending: 1 + rng.below(300) as u32,
        },
        stats: Stats::default(),
        conn: Conn::new(T, S),
        k: Kernel::default(),
        received: Vec::new(),
        echoed: Vec::new(),
        closed: false,
        next_byte: seed as u8,
    };
    // A quarter of the cases send one buffer at a time; the rest let the machine gather
    // up to 2, 3 or 4 queued buffers into one send.
    r.io.send_parts = 1 + rng.below(4);
    // Buffers as small as the largest receive (120 bytes, so most receives stay in buffers
    // of their own and get gathered) up to large ones (so most small receives are appended
    // onto the last queued buffer).
    r.io.buf_size = [120, 120, 120, 240, 4096][rng.below(5)];
    r.step(|c, cx| c.on_accepted(cx));
    for _ in 0..400 {
        if r.closed {
            break;
        }
        match rng.below(1000) {
            // Data arrives on the posted receive (unless it was cancelled, which may or may
            // not have taken effect yet: data can still race the cancellation).
            0..=399 if r.k.recv.is_some() && !r.k.eof_sent => {
                let len = 1 + rng.below(120);
                let bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        r.next_byte = r.next_byte.wrapping_add(1);
                        r.next_byte
                    })
                    .collect();
                r.received.extend_from_slice(&bytes);
                let buf = r.io.lend(&bytes);
                r.deliver_recv(
                    Ok(Received::Data {
                        buf,
                        len: len as u32,
                    }),
                    true,
                );
            }
            // The send completes: whole, short, zero, or failed.
            400..=699 if r.k.send.is_some() => {
                let len: u32 = r.k.send.as_ref().unwrap().iter().map(|p| p.2).sum();
                let result = match rng.below(100) {
                    0 | 1 => Err(OpError::Os(32)),
                    2 => Ok(0),
                    3..=49 if r.k.send_cancel => Err(OpError::Canceled),
                    3..=32 => Ok(1 + rng.below(len as usize) as u32),
                    _ => Ok(len),
                };
                r.deliver_send(result);
            }
            // A requested cancellation takes effect.
            700..=779 if r.k.recv.is_some() && r.k.recv_cancel => {
                r.deliver_recv(Err(OpError::Canceled), false)
            }
            // The receive ends: end of stream, a reset, or no buffer.
            780..=829 if r.k.recv.is_some() => {
                let result = match rng.below(10) {
                    0..=2 if !r.k.eof_sent => {
                        r.k.eof_sent = true;
                        Ok(Received::Eof)
                    }
                    3 => Err(OpError::Os(104)),
                    _ => Err(OpError::NoBuffers),
                };
                r.deliver_recv(result, false);
            }
            830..=989 => r.step(|c, cx| c.unpark(cx)),
            990..=994 => r.step(|c, cx| c.shutdown(cx)),
            995..=997 => r.step(|c, cx| c.abort(cx)),
            _ => {}
        }
    }
    // Wind down: stop it and let every pending operation finish, as the kernel would after a
    // cancellation; the connection must close and hand back every buffer.
    if !r.closed {
        r.step(|c, cx| c.abort(cx));
    }
    for _ in 0..100 {
        if r.closed {
            break;
        }
        if r.k.send.is_some() {
            r.deliver_send(Err(OpError::Canceled));
        } else if r.k.recv.is_some() {
            r.deliver_recv(Err(OpError::Canceled), false);
        } else {
            r.step(|c, cx| c.unpark(cx));
        }
    }
    assert!(
        r.closed,
        "seed {seed}: the connection never closed after abort"
    );
    r.stats
}

#[test]
fn random_completion_sequences_keep_the_invariants() {
    if let Ok(seed) = std::env::var("ECHOPORT_FUZZ_SEED") {
        let _ = run_case(seed.parse().expect("ECHOPORT_FUZZ_SEED is a number"));
        return;
    }
    let cases: u64 = std::env::var("ECHOPORT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let mut total = Stats::default();
    for seed in 1..=cases {
        match std::panic::catch_unwind(|| run_case(seed)) {
            Ok(s) => total.merge(&s),
            Err(_) => panic!("invariant broken; replay with ECHOPORT_FUZZ_SEED={seed}"),
        }
    }
    eprintln!("{cases} random sequences: {total}");
    // The sequences must actually reach the interesting paths.
    assert!(total.bytes_echoed > cases * 100, "{total}");
    assert!(total.short_sends > cases / 2, "{total}");
    assert!(total.parked > cases / 10, "{total}");
    assert!(total.paused > cases / 10, "{total}");
    assert!(total.errors > cases / 10, "{total}");
    assert!(total.compacted > cases, "{total}");
    let gathered = GATHERED.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        gathered > cases / 2,
        "only {gathered} gathered sends in {cases} sequences"
    );
}
