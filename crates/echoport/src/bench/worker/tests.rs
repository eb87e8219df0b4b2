//! The load generator's state machine against the core's fake backend ([`FakeIo`], which
//! panics on a second send or receive in flight, a close with anything pending, and a double
//! release). Time is passed in (`now`, ns since the start): nothing here sleeps.

use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use echoport_core::testing::FakeIo;
use echoport_core::{BufId, Completion, Op, OpError, Received, Token};

use super::{Incoming, Plan, ThreadLoad, Worker};
use crate::bench::params::SizeRange;

const MS: u64 = 1_000_000;

fn plan(pipeline: u32, size: u32) -> Plan {
    Plan {
        load: ThreadLoad::Closed { pipeline },
        size: SizeRange {
            min: size,
            max: size,
        },
        warmup_ns: 0,
        end_ns: None,
        count: None,
        timeout_ns: 100 * MS,
        tick_ns: MS,
        spin_ns: 0,
        keep_samples: false,
        messages_per_conn: None,
        reconnect: false,
    }
}

/// A connected loopback stream for the fake to adopt (it never touches it).
fn stream() -> TcpStream {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    TcpStream::connect(l.local_addr().unwrap()).unwrap()
}

/// A worker with one connection adopted at time 0; returns it and the connection's token.
fn worker(p: Plan) -> (Worker<FakeIo>, Token) {
    let mut w = Worker::new(FakeIo::new(), p, Instant::now(), None);
    let inc = Incoming {
        gid: 0,
        stream: stream(),
        next_seq: 0,
        started_ns: 0,
        in_hand: None,
    };
    w.add_conn(inc, 0);
    let token = w.active[0];
    (w, token)
}

/// Delivers a completion as the fake's wait would, then lets the worker post what follows.
fn deliver(w: &mut Worker<FakeIo>, c: Completion, now: u64) {
    w.io.note_delivered(&c);
    w.dispatch(c, now);
    w.flush(now);
}

/// The sends posted since the last look: (buffer, offset, length).
fn sends(w: &mut Worker<FakeIo>) -> Vec<(BufId, u32, u32)> {
    w.io.take_ops()
        .into_iter()
        .filter_map(|op| match op {
            Op::Send { buf, off, len, .. } => Some((buf, off, len)),
            _ => None,
        })
        .collect()
}

/// Echoes `bytes` back on `token`, in a fresh buffer, at `now`.
fn echo(w: &mut Worker<FakeIo>, token: Token, bytes: &[u8], now: u64) {
    let buf = w.io.lend(bytes);
    let len = bytes.len() as u32;
    let result = Ok(Received::Data { buf, len });
    deliver(
        w,
        Completion::Recv {
            token,
            result,
            more: true,
        },
        now,
    );
}

/// The send in flight on `token` completes with `n` bytes sent.
fn send_done(w: &mut Worker<FakeIo>, token: Token, n: u32, now: u64) {
    deliver(
        w,
        Completion::Send {
            token,
            result: Ok(n),
        },
        now,
    );
}

/// The receive posted on `token` ends, cancelled.
fn recv_canceled(w: &mut Worker<FakeIo>, token: Token, now: u64) {
    let result = Err(OpError::Canceled);
    deliver(
        w,
        Completion::Recv {
            token,
            result,
            more: false,
        },
        now,
    );
}

/// Posts the worker's first send (at time 0) and completes it in full at 1 ms; its bytes.
fn first_send_done(w: &mut Worker<FakeIo>, token: Token) -> Vec<u8> {
    w.flush(0);
    let s = sends(w);
    assert_eq!(s.len(), 1, "one send posted");
    let bytes = sent_bytes(w, s[0]);
    send_done(w, token, s[0].2, MS);
    bytes
}

fn sent_bytes(w: &Worker<FakeIo>, (buf, off, len): (BufId, u32, u32)) -> Vec<u8> {
    w.io.contents[&buf][off as usize..(off + len) as usize].to_vec()
}

#[test]
fn closed_loop_sends_its_pipeline_in_one_send_and_issues_again_per_echo() {
    let (mut w, token) = worker(plan(2, 10));
    w.flush(0);
    let s = sends(&mut w);
    assert_eq!(s.len(), 1, "both messages in one send");
    assert_eq!(s[0].2, 20);
    let bytes = sent_bytes(&w, s[0]);
    send_done(&mut w, token, 20, MS);
    echo(&mut w, token, &bytes[..15], 2 * MS);
    assert_eq!(w.done_all, 1, "the first message is back, the second half");
    let third = sends(&mut w);
    assert_eq!(
        third.len(),
        1,
        "the echo issued a new message, sent at once"
    );
    assert_eq!(third[0].2, 10);
    assert_ne!(
        sent_bytes(&w, third[0]),
        bytes[..10],
        "a new message, new content"
    );
    echo(&mut w, token, &bytes[15..], 3 * MS);
    assert_eq!(w.done_all, 2);
    assert_eq!(w.tally.errors.total(), 0, "{:?}", w.tally.errors);
    assert_eq!(w.tally.msgs, 2, "both echoes measured");
    assert_eq!(w.tally.hist.len(), 2, "both echoes timed");
    assert!(
        sends(&mut w).is_empty(),
        "the fourth waits: a send is in flight"
    );
    send_done(&mut w, token, 10, 4 * MS);
    let fourth = sends(&mut w);
    assert_eq!(fourth.len(), 1, "sent once the first completed");
    assert_eq!(fourth[0].2, 10);
}

#[test]
fn a_short_send_is_resumed_from_where_it_stopped() {
    let (mut w, token) = worker(plan(1, 40));
    w.flush(0);
    let first = sends(&mut w);
    assert_eq!(first.len(), 1);
    let (buf, off, len) = first[0];
    assert_eq!((off, len), (0, 40));
    send_done(&mut w, token, 15, MS);
    assert_eq!(
        sends(&mut w),
        vec![(buf, 15, 25)],
        "the rest of the same buffer"
    );
    assert!(
        w.io.released.is_empty(),
        "the buffer stays out until all is sent"
    );
    send_done(&mut w, token, 25, 2 * MS);
    assert_eq!(w.io.released, vec![buf], "released once, when fully sent");
}

#[test]
fn a_changed_byte_is_a_mismatch_and_more_bytes_than_sent_an_extra_echo() {
    let (mut w, token) = worker(plan(1, 16));
    let mut bytes = first_send_done(&mut w, token);
    bytes[7] ^= 1;
    echo(&mut w, token, &bytes, 2 * MS);
    assert_eq!(w.tally.errors.mismatch, 1);
    let s = sends(&mut w);
    let next = sent_bytes(&w, s[0]);
    send_done(&mut w, token, 16, 3 * MS);
    let mut more = next.clone();
    more.extend_from_slice(b"xyz");
    echo(&mut w, token, &more, 4 * MS);
    assert_eq!(w.tally.errors.extra_echo, 1);
    assert_eq!(w.tally.errors.extra_bytes, 3);
    let ops = w.io.take_ops();
    assert!(
        ops.iter().any(|op| matches!(op, Op::CancelRecv { .. })),
        "the connection is being closed: {ops:?}"
    );
}

#[test]
fn the_drain_closes_a_connection_only_once_its_echoes_are_back_and_nothing_is_pending() {
    let (mut w, token) = worker(plan(1, 8));
    let bytes = first_send_done(&mut w, token);
    w.begin_drain(MS, 50 * MS);
    assert!(w.io.closed.is_empty(), "an echo is still owed");
    echo(&mut w, token, &bytes, 2 * MS);
    assert!(sends(&mut w).is_empty(), "no new message while draining");
    assert!(w.io.closed.is_empty(), "the receive is still posted");
    recv_canceled(&mut w, token, 3 * MS);
    assert_eq!(w.io.closed, vec![token]);
    assert!(w.conns.is_empty());
    assert_eq!(w.tally.errors.total(), 0, "{:?}", w.tally.errors);
}

#[test]
fn a_connection_that_stops_echoing_times_out_at_the_injected_time() {
    let (mut w, token) = worker(plan(1, 8));
    first_send_done(&mut w, token);
    w.scan_timeouts(50 * MS);
    assert_eq!(w.tally.errors.timeout, 0, "within the timeout");
    w.scan_timeouts(102 * MS);
    assert_eq!(w.tally.errors.timeout, 1);
    assert_eq!(w.tally.errors.short_echo, 1);
    assert_eq!(w.tally.errors.missing_bytes, 8);
    recv_canceled(&mut w, token, 103 * MS);
    assert_eq!(
        w.io.closed,
        vec![token],
        "closed once the receive is cancelled"
    );
}

#[test]
fn a_reset_counts_a_lost_connection_and_its_owed_bytes() {
    let (mut w, token) = worker(plan(2, 8));
    w.flush(0);
    let _ = sends(&mut w);
    let result = Err(OpError::Os(libc::ECONNRESET));
    deliver(&mut w, Completion::Send { token, result }, MS);
    assert_eq!(w.tally.errors.connection_lost, 1);
    assert_eq!(w.tally.errors.missing_bytes, 16);
    recv_canceled(&mut w, token, 2 * MS);
    assert_eq!(w.io.closed, vec![token]);
}

#[test]
fn a_message_issued_in_the_window_but_sent_after_it_is_counted_late_not_lost() {
    let mut p = plan(2, 10);
    p.end_ns = Some(10 * MS);
    let (mut w, token) = worker(p);
    w.flush(0);
    let s = sends(&mut w);
    let bytes = sent_bytes(&w, s[0]);
    assert_eq!(
        (w.tally.sent, w.tally.sent_late),
        (2, 0),
        "both in the window"
    );
    echo(&mut w, token, &bytes[..10], 2 * MS);
    assert!(
        sends(&mut w).is_empty(),
        "the third message waits for the send in flight"
    );
    // The first send completes only after the window closed: the third goes out late.
    send_done(&mut w, token, 20, 11 * MS);
    assert_eq!(sends(&mut w).len(), 1, "the waiting message is sent");
    assert_eq!(
        (w.tally.sent, w.tally.sent_late),
        (2, 1),
        "issued at 2 ms, sent at 11 ms: late, and still measured"
    );
}
