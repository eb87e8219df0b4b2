//! The ticked open loop (`--tick`): the client wakes once per tick, sends every message due
//! by then together, and reads the echoes that came meanwhile with the kernel's arrival
//! stamps, so its latencies are those of the echoes, not of its own sleep: against a
//! server that delays each echo by a known amount, the percentiles sit at that delay, not at
//! the tick. Every byte is still checked (faults are caught on this path too).

mod bench_common;
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use bench_common::*;
use serde_json::Value;

/// Accepts on an ephemeral loopback port and runs `handle` on each connection in a thread.
fn test_server(handle: fn(TcpStream)) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            s.set_nodelay(true).unwrap();
            thread::spawn(move || handle(s));
        }
    });
    addr
}

const DELAY: Duration = Duration::from_millis(8);

/// Echoes each read DELAY after it came in.
fn delays(mut s: TcpStream) {
    let mut buf = [0u8; 16384];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            return;
        }
        thread::sleep(DELAY);
        if s.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// Echoes faithfully but flips one byte of the 100th read.
fn flips_a_byte(mut s: TcpStream) {
    let mut buf = [0u8; 16384];
    let mut reads = 0;
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            return;
        }
        reads += 1;
        if reads == 100 {
            buf[n / 2] ^= 0x20;
        }
        if s.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// Echoes every read twice, in one write (so the copy follows the echo at once).
fn doubles(mut s: TcpStream) {
    let mut buf = [0u8; 16384];
    while let Ok(n) = s.read(&mut buf) {
        let twice = [&buf[..n], &buf[..n]].concat();
        if n == 0 || s.write_all(&twice).is_err() {
            return;
        }
    }
}

/// Runs `args` up to three times until the client's own loop was never more than 50 ms
/// late (a shared machine), and returns that run, or else the least disturbed of the three:
/// what the tests judge holds however late the loop was, this only spares them the worst.
fn least_disturbed(addr: SocketAddr, args: &[&str]) -> (std::process::Output, Value) {
    let mut best: Option<(f64, std::process::Output, Value)> = None;
    for _ in 0..3 {
        let out = bench(addr, args);
        let d = doc(&out);
        let late = num(&d, "runs.0.client_max_late_us");
        if best.as_ref().is_none_or(|(l, _, _)| late < *l) {
            best = Some((late, out, d));
        }
        if late <= 50_000.0 {
            break;
        }
    }
    let (_, out, d) = best.expect("three attempts");
    (out, d)
}

/// The schedule was kept, judged by counts: every message intended inside the window was
/// issued (`sent`, or `sent_late` when the loop only got to it after the window closed; a
/// message a connection at most lost to the window's edges) and came back; and the load
/// offered inside the window falls short of the intended rate only by what the loop's
/// measured lateness explains (a message intended before `window - max_send_lag` left
/// before the window's end), never above it.
fn assert_on_schedule(r: &Value, rate: f64, window_s: f64, conns: f64) {
    let issued = num(r, "sent") + num(r, "sent_late");
    let intended = rate * window_s;
    assert!(
        issued <= intended + conns && issued >= intended - conns,
        "{issued} issued, {intended} intended: {r:#}"
    );
    assert_eq!(
        num(r, "messages"),
        issued,
        "every message issued came back: {r:#}"
    );
    let lag_s = num(r, "max_send_lag_us") / 1e6;
    let ratio = num(r, "rate_ratio");
    assert!(
        ratio <= 1.05 && ratio >= 0.99 * (window_s - lag_s) / window_s - 0.01,
        "rate ratio {ratio} with sends up to {lag_s} s late: {r:#}"
    );
}

/// The tick of the arrival test: long beside the server's delay, so that an echo timed when
/// reaped (never under a tick) and one timed by its stamp (near DELAY) are far apart even
/// when a busy machine adds milliseconds of wake-up to both.
const TICK_MS: f64 = 50.0;

#[test]
fn a_ticked_run_times_echoes_by_their_arrival_not_by_its_own_wake_up() {
    // One connection at 40 msgs/s in 50 ms ticks: two messages go out together at each
    // tick and come back 8 ms later; the client sleeps until the next tick, 42 ms after
    // that. Timed when reaped, every echo would read 50 ms or more; timed by the kernel's
    // stamp, they read the server's 8 ms (plus the loopback and the test server's own
    // wake-up).
    let addr = test_server(delays);
    let (out, d) = least_disturbed(
        addr,
        &[
            "-c", "1", "-r", "40", "-d", "2s", "--warmup", "0", "--tick", "50ms",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(num(&d, "params.tick_s"), TICK_MS / 1000.0);
    let r = &d["runs"][0];
    assert_eq!(num(r, "errors.total"), 0.0, "{r:#}");
    assert_on_schedule(r, 40.0, 2.0, 1.0);
    let lat = &r["latency_us"];
    let delay_us = DELAY.as_micros() as f64;
    // Never less than the delay the server put in: a stamp is never before the arrival.
    assert!(num(lat, "min") >= delay_us, "{lat:#}");
    // Short of the tick. Timed when reaped, no echo could read under 50 ms: the loop reads
    // it at a tick after the one that sent it (the echo takes 8 ms; the loop wakes only at
    // ticks, and never early). Stamped, most read near 8 ms; a busy machine delays the test
    // server's and the client's wake-ups by milliseconds (seen: p50 16 ms beside six CPU
    // burners), so the check is a count with room for that: at least half of all echoes
    // more than 10 ms short of the tick, where a reap-timed run has none.
    let h = latency(&d, 0);
    let short = h.count_between(1, ((TICK_MS - 10.0) * 1e6) as u64);
    assert!(
        short * 2 >= h.len(),
        "{short} of {} echoes under {} ms, a tick is {TICK_MS} ms: {lat:#}",
        h.len(),
        TICK_MS - 10.0
    );
    // The schedule is the tick's: messages leave at their tick, late only as far as the
    // loop itself was (a busy machine), plus a tick when the connection's previous send
    // was still in flight.
    let late = num(r, "client_max_late_us");
    assert!(
        num(r, "max_send_lag_us") <= late + TICK_MS * 1000.0 + 1_000.0,
        "{r:#}"
    );
}

#[test]
fn a_ticked_run_checks_every_byte() {
    let addr = test_server(flips_a_byte);
    let out = bench(
        addr,
        &[
            "-c", "2", "-r", "2000", "-d", "1s", "--warmup", "0", "--tick", "1ms",
        ],
    );
    let d = doc(&out);
    assert_eq!(out.status.code(), Some(1), "a mismatch must fail the run");
    let e = &d["runs"][0]["errors"];
    assert!(num(e, "mismatch") >= 1.0, "{e:#}");

    // 20 messages a second a connection: the copy of an echo comes back 50 ms before the
    // connection's next message leaves, so it is bytes never sent (an extra echo). On a busy
    // machine the client may send that next message before it reads the copy, which then
    // stands where the next echo should and is, rightly, a mismatch: either way it is caught.
    let addr = test_server(doubles);
    let out = bench(
        addr,
        &[
            "-c", "2", "-r", "40", "-d", "1s", "--warmup", "0", "--tick", "1ms",
        ],
    );
    let d = doc(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "an extra echo must fail the run"
    );
    let e = &d["runs"][0]["errors"];
    assert!(
        num(e, "extra_echo") + num(e, "mismatch") >= 1.0,
        "the doubled echo went unnoticed: {e:#}"
    );
}

#[test]
fn a_ticked_run_against_the_server_is_exact_at_a_high_rate() {
    // 20,000 msgs/s over 20 connections in 100 us ticks: all echoed, all exact, on schedule
    // (as counts: on a busy machine the loop falls behind, and catches up).
    let server = common::Server::start(&["--threads", "1"]);
    let (out, d) = least_disturbed(
        server.addr(),
        &[
            "-c", "20", "-r", "20k", "-d", "2s", "--warmup", "200ms", "--tick", "100us",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let r = &d["runs"][0];
    assert_eq!(num(r, "errors.total"), 0.0, "{r:#}");
    assert_on_schedule(r, 20_000.0, 2.0, 20.0);
    assert!(num(r, "latency_us.min") > 0.0, "{r:#}");
}
