//! `bench --udp` against `serve --udp` (RFC 862) and against misbehaving UDP servers written
//! here: every datagram checked, latency percentiles, and loss, duplicates and reordering
//! counted from the sequence numbers the datagrams carry, exactly.
//!
//! The server answers a source address at most `--udp-rate` times a second (100 by default)
//! and `--udp-global-rate` in total, so every test says what rate it allows.

mod bench_common;
mod common;

use std::net::{SocketAddr, UdpSocket};
use std::thread;

use bench_common::*;
use common::Server;

fn udp_server(rate: &str) -> Server {
    Server::start(&[
        "--threads",
        "1",
        "--udp",
        "--udp-rate",
        rate,
        "--udp-global-rate",
        "1000000",
    ])
}

#[test]
fn open_and_closed_loops_over_udp_check_every_datagram() {
    let server = udp_server("1000000");
    let out = bench(
        server.addr(),
        &[
            "--udp", "-c", "4", "-r", "3000", "-d", "1s", "--warmup", "200ms", "-s", "8-1400",
        ],
    );
    let d = doc(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(d["params"]["transport"], "udp");
    let r = &d["runs"][0];
    // Nothing is lost on loopback but what a kernel drops for a full receive buffer (on a
    // busy machine, where the server or the client did not run for a while): every loss
    // must be one of those.
    let lost = num(r, "udp.lost");
    assert!(
        lost <= num(r, "udp.host_rcvbuf_errors") && lost < 2000.0,
        "{r:#}"
    );
    assert_eq!(num(r, "udp.sent"), 3000.0);
    assert_eq!(num(r, "udp.received"), 3000.0 - lost);
    assert_eq!(num(r, "messages"), 3000.0 - lost, "{r:#}");
    assert_eq!(num(r, "udp.duplicates") + num(r, "udp.reordered"), 0.0);
    assert_eq!(num(r, "errors.total"), 0.0);
    assert!(num(r, "latency_us.p50") > 0.0 && num(r, "latency_us.p99") >= num(r, "latency_us.p50"));
    assert_eq!(latency(&d, 0).len() as f64, 3000.0 - lost);
    let ratio = num(r, "rate_ratio");
    assert!((0.97..=1.03).contains(&ratio), "{r:#}");
    assert!(
        stderr(&out).contains("udp          3,000 sent, "),
        "{}",
        stderr(&out)
    );

    let out = bench(
        server.addr(),
        &[
            "--udp",
            "-c",
            "3",
            "--pipeline",
            "2",
            "-n",
            "5000",
            "--warmup",
            "0",
        ],
    );
    let d = doc(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let r = &d["runs"][0];
    // Closed loop: a lost datagram is replaced after the timeout, so exactly 5,000 are
    // measured back whatever is lost.
    assert_eq!(num(r, "messages"), 5000.0, "{r:#}");
    assert!(
        num(r, "udp.lost") <= num(r, "udp.host_rcvbuf_errors"),
        "{r:#}"
    );
    let stopped = server.stop();
    assert_eq!(stopped.stat("udp_rate_limited"), 0, "{}", stopped.log);
}

#[test]
fn loss_from_the_servers_rate_limit_is_counted_exactly() {
    // 300 replies a second to one source (a burst of 600): of 2,000 datagrams in a second,
    // about 900 come back. Every one the server did not answer is counted lost.
    let server = udp_server("300");
    let out = bench(
        server.addr(),
        &[
            "--udp",
            "-c",
            "2",
            "-r",
            "2000",
            "-d",
            "1s",
            "--warmup",
            "0",
            "--timeout",
            "300ms",
        ],
    );
    let d = doc(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "loss is reported, not a failure: {}",
        stderr(&out)
    );
    let r = &d["runs"][0];
    let lost = num(r, "udp.lost");
    assert_eq!(num(r, "udp.sent"), 2000.0);
    assert_eq!(lost + num(r, "udp.received"), 2000.0);
    assert_eq!(
        num(r, "messages"),
        num(r, "udp.received"),
        "the ones back are timed"
    );
    assert!((800.0..=1400.0).contains(&lost), "{r:#}");
    assert!((num(r, "udp.loss_ratio") - lost / 2000.0).abs() < 1e-6);
    let stopped = server.stop();
    let unanswered = stopped.stat("udp_rate_limited") + stopped.stat("udp_dropped");
    // Every datagram the server left unanswered is counted lost; any more were dropped by
    // a kernel for a full receive buffer (a busy machine), which the run reports too.
    let drops = num(r, "udp.host_rcvbuf_errors") as u64;
    assert!(
        unanswered <= lost as u64 && lost as u64 <= unanswered + drops,
        "bench lost {lost}, server left {unanswered} unanswered, kernel drops {drops}: {}",
        stopped.log
    );
}

/// A UDP echo server that misbehaves by arrival order (one flow, so arrival k is datagram
/// k): it answers datagrams in swapped pairs (k+1 before k), sends every 10th twice, drops
/// every 50th (k = 25 mod 50) and flips a byte of datagram 7.
fn misbehaving() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    // Room for a second of datagrams, so a busy machine does not drop any of its own.
    socket2::SockRef::from(&s)
        .set_recv_buffer_size(4 << 20)
        .unwrap();
    let addr = s.local_addr().unwrap();
    thread::spawn(move || {
        let mut buf = vec![0u8; 70_000];
        let mut held: Option<(Vec<u8>, SocketAddr, usize)> = None;
        let mut k = 0usize;
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let mut d = buf[..n].to_vec();
            if k == 7 {
                d[n - 1] ^= 0x40;
            }
            let reply = |d: &[u8], to, k: usize| {
                if k % 50 != 25 {
                    s.send_to(d, to).unwrap();
                    if k.is_multiple_of(10) {
                        s.send_to(d, to).unwrap();
                    }
                }
            };
            match held.take() {
                None => held = Some((d, from, k)),
                Some((h, hfrom, hk)) => {
                    reply(&d, from, k);
                    reply(&h, hfrom, hk);
                }
            }
            k += 1;
        }
    });
    addr
}

#[test]
fn duplicates_reordering_loss_and_corruption_are_told_apart() {
    let addr = misbehaving();
    let out = bench(
        addr,
        &[
            "--udp",
            "-c",
            "1",
            "-r",
            "1000",
            "-d",
            "1s",
            "--warmup",
            "0",
            "--timeout",
            "300ms",
        ],
    );
    let d = doc(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a corrupted datagram fails the run: {}",
        stderr(&out)
    );
    let r = &d["runs"][0];
    // 1,000 datagrams: 20 dropped (25, 75, ...), datagram 7 corrupted (not counted back).
    assert_eq!(num(r, "udp.sent"), 1000.0);
    assert_eq!(num(r, "errors.mismatch"), 1.0, "{r:#}");
    assert_eq!(num(r, "udp.lost"), 21.0, "{r:#}");
    assert_eq!(num(r, "udp.received"), 979.0);
    // Every even datagram comes back after its odd successor: 500 pairs, less the ones
    // whose even half was dropped (none: 25 mod 50 is odd) or corrupted (none: 7 is odd),
    // less those whose odd half never arrived first (the 20 dropped and datagram 7).
    assert_eq!(num(r, "udp.reordered"), 500.0 - 21.0, "{r:#}");
    // Every 10th (all even) twice.
    assert_eq!(num(r, "udp.duplicates"), 100.0, "{r:#}");
    assert_eq!(num(r, "udp.late"), 0.0);
    let err = stderr(&out);
    assert!(
        err.contains("100 duplicated") && err.contains("21 lost (2.100 %)"),
        "{err}"
    );
}

#[test]
fn udp_results_merge_exactly() {
    let server = udp_server("1000000");
    let out = bench(
        server.addr(),
        &[
            "--udp", "-c", "2", "-r", "1000", "-d", "500ms", "--warmup", "0",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let dir = Scratch::new("udp-merge");
    std::fs::write(dir.path("u.json"), &out.stdout).unwrap();
    let u = dir.arg("u.json");
    let m = merge(&[&u, &u, "--json"]);
    let md = doc(&m);
    assert_eq!(m.status.code(), Some(0), "{}", stderr(&m));
    assert_eq!(num(&md, "runs.0.udp.sent"), 1000.0);
    assert_eq!(num(&md, "runs.0.udp.received"), 1000.0);
    assert_eq!(num(&md, "runs.0.messages"), 1000.0);
}

#[test]
fn udp_refuses_what_it_cannot_do() {
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    for (args, want) in [
        (&["--udp", "-s", "4"][..], "from 8 bytes"),
        (&["--udp", "-s", "70000"][..], "65507"),
        (
            &["--udp", "--messages-per-conn", "5"][..],
            "--messages-per-conn is for TCP",
        ),
        (&["--udp", "--reconnect"][..], "--reconnect is for TCP"),
    ] {
        let out = bench(addr, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn nothing_listening_is_an_error_not_silence() {
    // A UDP port nothing listens on: the kernel answers with port unreachable.
    let addr = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = bench(
        addr,
        &[
            "--udp",
            "-c",
            "1",
            "-r",
            "200",
            "-d",
            "300ms",
            "--warmup",
            "0",
            "--timeout",
            "200ms",
        ],
    );
    let d = doc(&out);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(num(&d, "runs.0.udp.refused") >= 1.0, "{d:#}");
    assert!(
        stderr(&out).contains("refused (nothing listening?)"),
        "{}",
        stderr(&out)
    );
}
