//! The echo state machine driven by scripted completions, without a kernel.
#![allow(unused_must_use)] // helpers return Status; tests assert it where it matters

use echoport_core::conn::{Conn, Cx, Limits, Phase, RecvState, Segments, Status};
use echoport_core::stats::Stats;
use echoport_core::testing::FakeIo;
use echoport_core::worker::{Config, Worker};
use echoport_core::{Backend, BufId, Completion, ListenerId, Op, OpError, Received, Socket, Token};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

const ECONNRESET: i32 = 104;
const T: Token = Token {
    id: 7,
    generation: 3,
};
const S: Socket = Socket(42);

struct M {
    io: FakeIo,
    segs: Segments,
    limits: Limits,
    stats: Stats,
    conn: Conn,
}

impl M {
    fn new(max_pending: u32) -> M {
        M::sized(max_pending, FakeIo::new().buf_size)
    }

    /// A machine over buffers of `buf_size` bytes (small ones keep small receives from
    /// being appended to the last queued buffer, to test the queue of segments itself).
    fn sized(max_pending: u32, buf_size: u32) -> M {
        let mut io = FakeIo::new();
        io.buf_size = buf_size;
        let mut m = M {
            io,
            segs: Segments::new(),
            limits: Limits { max_pending },
            stats: Stats::default(),
            conn: Conn::new(T, S),
        };
        assert_eq!(m.step(|c, cx| c.on_accepted(cx)), Status::Open);
        assert_eq!(
            m.ops(),
            vec![rx(max_pending)],
            "accept posts a receive, allowed the whole budget"
        );
        m
    }

    fn step(&mut self, f: impl FnOnce(&mut Conn, &mut Cx<'_, FakeIo>) -> Status) -> Status {
        let mut cx = self.io.cx(&mut self.segs, &self.limits, &mut self.stats);
        f(&mut self.conn, &mut cx)
    }

    fn ops(&mut self) -> Vec<Op> {
        self.io.take_ops()
    }

    /// Delivers a receive of `bytes` and returns the buffer it came in.
    fn recv(&mut self, bytes: &[u8], more: bool) -> (BufId, Status) {
        let buf = self.io.lend(bytes);
        let c = Completion::Recv {
            token: T,
            result: Ok(Received::Data {
                buf,
                len: bytes.len() as u32,
            }),
            more,
        };
        self.io.note_delivered(&c);
        let st = self.step(|c, cx| {
            c.on_recv(
                cx,
                Ok(Received::Data {
                    buf,
                    len: bytes.len() as u32,
                }),
                more,
            )
        });
        (buf, st)
    }

    fn recv_result(&mut self, result: Result<Received, OpError>, more: bool) -> Status {
        self.io.note_delivered(&Completion::Recv {
            token: T,
            result,
            more,
        });
        self.step(|c, cx| c.on_recv(cx, result, more))
    }

    fn sent(&mut self, result: Result<u32, OpError>) -> Status {
        self.io
            .note_delivered(&Completion::Send { token: T, result });
        self.step(|c, cx| c.on_sent(cx, result))
    }
}

/// The receive the machine posts, allowed `max` bytes.
fn rx(max: u32) -> Op {
    Op::Recv {
        token: T,
        sock: S,
        max,
    }
}

fn send(buf: BufId, off: u32, len: u32) -> Op {
    Op::Send {
        token: T,
        sock: S,
        buf,
        off,
        len,
    }
}

#[test]
fn received_bytes_are_sent_back_exactly_then_buffer_released() {
    let mut m = M::new(1 << 16);
    let (b, _) = m.recv(b"hello", true);
    assert_eq!(
        m.ops(),
        vec![send(b, 0, 5)],
        "echo exactly the bytes received"
    );
    assert_eq!(m.sent(Ok(5)), Status::Open);
    assert_eq!(m.io.released, vec![b]);
    assert!(
        m.ops().is_empty(),
        "multishot receive still posted: nothing to re-post"
    );
    assert_eq!(m.stats.bytes_echoed, 5);
}

#[test]
fn single_shot_receive_is_reposted_after_it_ends() {
    let mut m = M::new(1 << 16);
    let (b, _) = m.recv(b"abc", false);
    assert_eq!(m.ops(), vec![send(b, 0, 3), rx(15 * 4096)]);
}

#[test]
fn short_send_resends_the_remainder_from_the_right_offset() {
    let mut m = M::new(1 << 16);
    let (b, _) = m.recv(&[1; 100], true);
    m.ops();
    m.sent(Ok(40));
    assert_eq!(m.ops(), vec![send(b, 40, 60)]);
    assert!(m.io.released.is_empty(), "buffer still needed");
    m.sent(Ok(60));
    assert_eq!(m.io.released, vec![b]);
    assert_eq!(m.stats.short_sends, 1);
    assert_eq!(m.stats.bytes_echoed, 100);
}

#[test]
fn data_received_during_a_send_is_queued_in_order() {
    let mut m = M::sized(1 << 16, 4);
    let (a, _) = m.recv(b"one", true);
    let (b, _) = m.recv(b"two", true);
    assert_eq!(m.ops(), vec![send(a, 0, 3)], "one send in flight at a time");
    m.sent(Ok(3));
    assert_eq!(m.ops(), vec![send(b, 0, 3)]);
    m.sent(Ok(3));
    assert_eq!(m.io.released, vec![a, b]);
}

#[test]
fn end_of_stream_flushes_pending_echo_then_closes() {
    let mut m = M::new(1 << 16);
    let (b, _) = m.recv(b"tail", true);
    assert_eq!(
        m.recv_result(Ok(Received::Eof), false),
        Status::Open,
        "echo still pending"
    );
    assert_eq!(m.ops(), vec![send(b, 0, 4)]);
    assert_eq!(
        m.sent(Ok(2)),
        Status::Open,
        "short send during flush continues"
    );
    assert_eq!(m.ops(), vec![send(b, 2, 2)]);
    assert_eq!(m.sent(Ok(2)), Status::Closed);
    assert_eq!(m.ops(), vec![Op::Close { token: T, sock: S }]);
    assert_eq!(m.stats.bytes_echoed, 4);
}

#[test]
fn eof_with_nothing_pending_closes_at_once() {
    let mut m = M::new(1 << 16);
    assert_eq!(m.recv_result(Ok(Received::Eof), false), Status::Closed);
    assert_eq!(m.ops(), vec![Op::Close { token: T, sock: S }]);
}

#[test]
fn reset_while_sending_cancels_the_send_and_closes_after_its_completion() {
    let mut m = M::new(1 << 16);
    let (a, _) = m.recv(b"x", true);
    let (b, _) = m.recv(b"y", true);
    m.ops();
    assert_eq!(
        m.recv_result(Err(OpError::Os(ECONNRESET)), false),
        Status::Open
    );
    assert_eq!(
        m.ops(),
        vec![Op::CancelSend { token: T, sock: S }],
        "no close while a send is in flight"
    );
    assert_eq!(m.sent(Err(OpError::Canceled)), Status::Closed);
    assert_eq!(m.ops(), vec![Op::Close { token: T, sock: S }]);
    let mut released = m.io.released.clone();
    released.sort_by_key(|b| b.0);
    assert_eq!(
        released,
        vec![a, b],
        "every lent buffer returned exactly once"
    );
    assert_eq!(m.stats.errors, 1);
}

#[test]
fn send_error_cancels_the_multishot_receive_before_closing() {
    let mut m = M::new(1 << 16);
    m.recv(b"x", true);
    m.ops();
    assert_eq!(m.sent(Err(OpError::Os(32))), Status::Open);
    assert_eq!(m.ops(), vec![Op::CancelRecv { token: T, sock: S }]);
    // Data that raced the cancellation is dropped, not echoed.
    let (late, _) = m.recv(b"late", true);
    assert!(m.io.released.contains(&late));
    assert_eq!(m.recv_result(Err(OpError::Canceled), false), Status::Closed);
    assert_eq!(m.ops(), vec![Op::Close { token: T, sock: S }]);
}

#[test]
fn zero_byte_send_completion_is_an_error_not_a_loop() {
    let mut m = M::new(1 << 16);
    m.recv(b"x", true);
    m.ops();
    m.sent(Ok(0));
    assert_eq!(m.conn.phase(), Phase::Aborting);
    assert!(
        !m.ops().iter().any(|o| matches!(o, Op::Send { .. })),
        "no resend of zero progress"
    );
}

#[test]
fn backpressure_stops_receiving_until_the_echo_drains() {
    let mut m = M::sized(100, 64);
    let (a, _) = m.recv(&[0; 60], true);
    let (b, _) = m.recv(&[0; 60], true);
    assert_eq!(
        m.ops(),
        vec![send(a, 0, 60), Op::CancelRecv { token: T, sock: S }]
    );
    assert_eq!(m.stats.paused, 1);
    m.recv_result(Err(OpError::Canceled), false);
    assert!(m.ops().is_empty(), "still over the limit: no new receive");
    m.sent(Ok(60));
    assert_eq!(
        m.ops(),
        vec![send(b, 0, 60), rx(40)],
        "below the limit again"
    );
}

#[test]
fn no_buffers_parks_and_unpark_rearms() {
    let mut m = M::new(1 << 16);
    m.recv_result(Err(OpError::NoBuffers), false);
    assert_eq!(m.conn.recv_state(), RecvState::Parked);
    assert!(m.ops().is_empty(), "no blind re-arm (that would spin)");
    assert_eq!(m.step(|c, cx| c.unpark(cx)), Status::Open);
    assert_eq!(m.ops(), vec![rx(1 << 16)]);
    assert_eq!(m.stats.parked, 1);
}

#[test]
fn graceful_shutdown_echoes_what_was_received_then_shuts_down_and_lingers() {
    let mut m = M::sized(1 << 16, 8);
    let (a, _) = m.recv(b"abc", true);
    m.ops();
    assert_eq!(m.step(|c, cx| c.shutdown(cx)), Status::Open);
    assert_eq!(m.ops(), vec![Op::CancelRecv { token: T, sock: S }]);
    let (b, _) = m.recv(b"raced", true);
    m.recv_result(Err(OpError::Canceled), false);
    m.sent(Ok(3));
    assert_eq!(
        m.ops(),
        vec![send(b, 0, 5)],
        "bytes received before the cancel landed are echoed"
    );
    m.sent(Ok(5));
    assert_eq!(
        m.ops(),
        vec![Op::Shutdown { token: T, sock: S }, rx(u32::MAX)],
        "then FIN, and read until the peer closes"
    );
    let (c, _) = m.recv(b"ignored", true);
    assert!(m.ops().is_empty(), "lingering input is not echoed");
    assert!(m.io.released.contains(&c));
    assert_eq!(m.recv_result(Ok(Received::Eof), false), Status::Closed);
    let mut released = m.io.released.clone();
    released.sort_by_key(|b| b.0);
    assert_eq!(
        released,
        vec![a, b, c],
        "every buffer returned exactly once"
    );
}

#[test]
fn abort_cancels_the_receive_and_closes_only_after_it_ends() {
    let mut m = M::new(1 << 16);
    assert_eq!(m.step(|c, cx| c.abort(cx)), Status::Open);
    assert_eq!(m.ops(), vec![Op::CancelRecv { token: T, sock: S }]);
    assert_eq!(m.recv_result(Err(OpError::Canceled), false), Status::Closed);
    assert_eq!(m.ops(), vec![Op::Close { token: T, sock: S }]);
    assert_eq!(
        m.step(|c, cx| c.abort(cx)),
        Status::Closed,
        "aborting twice is harmless"
    );
    assert!(m.ops().is_empty());
}

#[test]
fn a_small_receive_is_appended_to_the_last_queued_buffer() {
    let mut m = M::new(1 << 16);
    let (a, _) = m.recv(b"one", true);
    let (b, _) = m.recv(b"two", true);
    assert_eq!(m.ops(), vec![send(a, 0, 3)], "one send in flight at a time");
    assert_eq!(
        m.io.copies,
        vec![(a, 3, b, 3)],
        "copied past the bytes queued"
    );
    assert_eq!(m.io.released, vec![b], "its own buffer went straight back");
    assert_eq!((m.conn.held(), m.stats.compacted), (1, 1));
    m.sent(Ok(3));
    assert_eq!(
        m.ops(),
        vec![send(a, 3, 3)],
        "the appended bytes follow in order"
    );
    assert_eq!(&m.io.contents[&a][3..6], b"two");
    m.sent(Ok(3));
    assert_eq!(m.io.released, vec![b, a]);
    assert_eq!(m.conn.held(), 0);
}

#[test]
fn a_receive_too_large_to_append_keeps_a_buffer_of_its_own() {
    let mut m = M::sized(1 << 16, 8);
    let (a, _) = m.recv(b"abc", true);
    // Five bytes would fit after "abc", but more than half a buffer is not copied.
    let (b, _) = m.recv(b"defgh", true);
    assert!(m.io.copies.is_empty());
    assert_eq!(m.conn.held(), 2);
    m.ops();
    m.sent(Ok(3));
    assert_eq!(m.ops(), vec![send(b, 0, 5)]);
    assert_eq!(m.io.released, vec![a]);
}

#[test]
fn buffers_are_budgeted_not_only_bytes() {
    // 64 bytes may be owed, in buffers of 16: at most 4 buffers. Receives of 9 bytes (more
    // than half a buffer, so never appended) fill 4 buffers with only 36 bytes owed.
    let mut m = M::sized(64, 16);
    for _ in 0..3 {
        m.recv(&[7; 9], true);
    }
    assert!(!m.ops().contains(&Op::CancelRecv { token: T, sock: S }));
    m.recv(&[7; 9], true);
    assert_eq!(m.conn.held(), 4);
    assert_eq!(m.conn.pending(), 36, "far below the byte limit");
    assert_eq!(
        m.ops(),
        vec![Op::CancelRecv { token: T, sock: S }],
        "but the buffer budget is spent: stop receiving"
    );
    assert_eq!(m.stats.paused, 1);
    m.recv_result(Err(OpError::Canceled), false);
    assert!(
        m.ops().is_empty(),
        "no new receive while the budget is spent"
    );
    m.sent(Ok(9));
    assert_eq!(
        m.ops()[1..],
        [rx(16)],
        "one buffer back: the next receive may fill one buffer"
    );
}

#[test]
fn under_pressure_only_a_connection_holding_nothing_receives() {
    let mut m = M::new(1 << 16);
    // The pool is low: 10 of 1,024 buffers free (the reserve is a quarter).
    m.io.free = 10;
    let (a, _) = m.recv(b"x", false);
    assert_eq!(
        m.ops(),
        vec![send(a, 0, 1)],
        "holding a buffer under pressure: no new receive"
    );
    m.sent(Ok(1));
    assert_eq!(
        m.ops(),
        vec![rx(4096)],
        "holding none: it may receive, one buffer's worth"
    );
    // Armed with a buffer taken: pressure pauses it.
    let (b, _) = m.recv(b"y", true);
    assert_eq!(
        m.ops(),
        vec![send(b, 0, 1), Op::CancelRecv { token: T, sock: S }]
    );
}

fn worker() -> Worker<FakeIo> {
    let mut io = FakeIo::new();
    let l = io
        .add_listener(std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .unwrap();
    Worker::new(
        io,
        &[l],
        Config::default(),
        Arc::new(AtomicBool::new(false)),
    )
}

#[test]
fn worker_drops_stale_completions_for_a_reused_slot() {
    let mut w = worker();
    w.turn(None).unwrap();
    let old = w.adopt(Socket(5));
    // The old connection ends; its slot is freed and reused by a new connection.
    push(
        &mut w,
        Completion::Recv {
            token: old,
            result: Ok(Received::Eof),
            more: false,
        },
    );
    w.turn(None).unwrap();
    assert_eq!(w.connections(), 0);
    let new = w.adopt(Socket(5));
    assert_eq!(new.id, old.id);
    assert_ne!(new.generation, old.generation);
    // A late receive for the old incarnation: its buffer goes back, nothing reaches the new one.
    let buf = io(&mut w).lend(b"ghost");
    push(
        &mut w,
        Completion::Recv {
            token: old,
            result: Ok(Received::Data { buf, len: 5 }),
            more: true,
        },
    );
    io(&mut w).take_ops();
    w.turn(None).unwrap();
    assert!(io(&mut w).released.contains(&buf), "stale buffer released");
    assert!(
        !io(&mut w)
            .take_ops()
            .iter()
            .any(|o| matches!(o, Op::Send { .. })),
        "nothing meant for the old connection is sent on the new one"
    );
    assert_eq!(w.connections(), 1);
}

#[test]
fn worker_backs_off_when_descriptors_run_out() {
    let mut w = worker();
    w.turn(None).unwrap();
    assert_eq!(
        io(&mut w).take_ops(),
        vec![Op::Accept {
            listener: ListenerId(0)
        }]
    );
    push(
        &mut w,
        Completion::Accept {
            listener: ListenerId(0),
            result: Err(OpError::TooManyFiles),
            more: false,
        },
    );
    w.turn(None).unwrap();
    w.turn(None).unwrap();
    assert!(
        io(&mut w).take_ops().is_empty(),
        "accept is not re-posted at once after EMFILE"
    );
    assert_eq!(w.stats().accept_backoffs, 1);
    // No sleeping: the next turn reads a clock past the pause.
    let later = std::time::Instant::now() + echoport_core::worker::BACKOFF_MIN * 2;
    w.turn_at(later, Some(std::time::Duration::ZERO)).unwrap();
    assert_eq!(
        io(&mut w).take_ops(),
        vec![Op::Accept {
            listener: ListenerId(0)
        }],
        "re-armed after the pause"
    );
}

#[test]
fn worker_refuses_connections_while_stopping() {
    let mut w = worker();
    w.turn(None).unwrap();
    w.begin_shutdown();
    push(
        &mut w,
        Completion::Accept {
            listener: ListenerId(0),
            result: Ok(Socket(9)),
            more: true,
        },
    );
    io(&mut w).take_ops();
    w.turn(None).unwrap();
    assert_eq!(
        io(&mut w).take_ops(),
        vec![Op::Close {
            token: Token::NONE,
            sock: Socket(9)
        }]
    );
    assert_eq!(w.stats().refused, 1);
    assert_eq!(w.connections(), 0);
}

/// Adopts a connection and delivers `NoBuffers` to its first receive, parking it.
fn parked_conn(w: &mut Worker<FakeIo>, sock: u64) -> Token {
    let t = w.adopt(Socket(sock));
    push(
        w,
        Completion::Recv {
            token: t,
            result: Err(OpError::NoBuffers),
            more: false,
        },
    );
    t
}

#[test]
fn parked_connections_wait_for_a_free_buffer_without_polling() {
    let mut w = worker();
    io(&mut w).free = 0;
    w.turn(Some(std::time::Duration::ZERO)).unwrap();
    let t = parked_conn(&mut w, 5);
    w.turn(Some(std::time::Duration::ZERO)).unwrap();
    io(&mut w).take_ops();
    assert_eq!(w.parked(), 1);
    for _ in 0..3 {
        w.turn(Some(std::time::Duration::ZERO)).unwrap();
    }
    assert!(io(&mut w).take_ops().is_empty(), "no buffer free: no retry");
    assert_eq!(
        w.next_timeout(std::time::Instant::now()),
        None,
        "and no timer: the worker sleeps until a completion comes"
    );
    io(&mut w).free = 1;
    w.turn(Some(std::time::Duration::ZERO)).unwrap();
    assert!(
        matches!(io(&mut w).take_ops()[..], [Op::Recv { token, .. }] if token == t),
        "a free buffer: the parked connection receives again"
    );
    assert_eq!(w.parked(), 0);
    assert_eq!(w.stats().parked, 1);
}

#[test]
fn a_parked_connection_holding_nothing_is_unparked_first() {
    let mut w = worker();
    w.turn(Some(std::time::Duration::ZERO)).unwrap();
    // One connection holds a buffer (its echo is stuck in a send), then parks.
    let heavy = w.adopt(Socket(5));
    let buf = io(&mut w).lend(b"stuck");
    push(
        &mut w,
        Completion::Recv {
            token: heavy,
            result: Ok(Received::Data { buf, len: 5 }),
            more: false,
        },
    );
    w.turn(Some(std::time::Duration::ZERO)).unwrap();
    io(&mut w).free = 0;
    push(
        &mut w,
        Completion::Recv {
            token: heavy,
            result: Err(OpError::NoBuffers),
            more: false,
        },
    );
    let light = parked_conn(&mut w, 6);
    w.turn(Some(std::time::Duration::ZERO)).unwrap();
    assert_eq!(w.parked(), 2);
    io(&mut w).take_ops();
    // One buffer comes free (and the pool stays low): only the one holding nothing.
    io(&mut w).free = 1;
    w.turn(Some(std::time::Duration::ZERO)).unwrap();
    let ops = io(&mut w).take_ops();
    assert!(
        matches!(ops[..], [Op::Recv { token, .. }] if token == light),
        "{ops:?}"
    );
    assert_eq!(w.parked(), 1, "the heavy one waits for the pool to recover");
    assert_eq!(
        w.next_timeout(std::time::Instant::now()),
        None,
        "nothing to retry while the pool is low"
    );
    io(&mut w).free = 1024;
    w.turn(Some(std::time::Duration::ZERO)).unwrap();
    assert!(
        matches!(io(&mut w).take_ops()[..], [Op::Recv { token, .. }] if token == heavy),
        "the pool recovered: the heavy one receives again"
    );
}

#[test]
fn a_worker_whose_backend_fails_gives_its_admission_places_back() {
    let admission = echoport_core::worker::Admission::new(10);
    let mut w = Worker::new(
        FakeIo::new(),
        &[],
        Config {
            admission: admission.clone(),
            ..Config::default()
        },
        Arc::new(AtomicBool::new(false)),
    );
    for fd in 0..3 {
        w.adopt(Socket(fd));
    }
    assert_eq!(admission.live(), 3);
    io(&mut w).wait_error = Some(22); // EINVAL: nothing a backend retries
    assert!(w.run().is_err(), "a fatal backend error ends the worker");
    assert_eq!(
        admission.live(),
        0,
        "the server's connection budget does not shrink by the dead worker's connections"
    );
}

#[test]
fn an_idle_connection_is_closed_by_its_timeout_without_the_test_sleeping() {
    let mut w = Worker::new(
        FakeIo::new(),
        &[],
        Config {
            idle_timeout: Some(std::time::Duration::from_secs(1)),
            ..Config::default()
        },
        Arc::new(AtomicBool::new(false)),
    );
    let t0 = std::time::Instant::now();
    let t = w.adopt(Socket(5));
    w.turn_at(t0, Some(std::time::Duration::ZERO)).unwrap();
    io(&mut w).take_ops();
    w.turn_at(
        t0 + std::time::Duration::from_millis(500),
        Some(std::time::Duration::ZERO),
    )
    .unwrap();
    assert!(io(&mut w).take_ops().is_empty(), "not idle long enough yet");
    w.turn_at(
        t0 + std::time::Duration::from_secs(2),
        Some(std::time::Duration::ZERO),
    )
    .unwrap();
    assert_eq!(
        io(&mut w).take_ops(),
        vec![Op::CancelRecv {
            token: t,
            sock: Socket(5)
        }],
        "silent past its idle timeout: its receive is cancelled"
    );
    push(
        &mut w,
        Completion::Recv {
            token: t,
            result: Err(OpError::Canceled),
            more: false,
        },
    );
    w.turn_at(
        t0 + std::time::Duration::from_secs(2),
        Some(std::time::Duration::ZERO),
    )
    .unwrap();
    assert_eq!(w.connections(), 0);
    assert_eq!(w.stats().timeouts, 1);
}

fn io(w: &mut Worker<FakeIo>) -> &mut FakeIo {
    w.backend_mut()
}

fn push(w: &mut Worker<FakeIo>, c: Completion) {
    w.backend_mut().complete(c);
}
