//! `serve --metrics`: the counters scraped after a known `echoport bench` equal the bench's
//! totals, a scrape loop during the run works (and changes nothing), the content type is
//! exact, UDP counters are published, and slow, oversized or malformed scrapers (hundreds of
//! them) neither hold the endpoint nor cost the server CPU.

#[macro_use]
mod common;
mod deploy_support;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Server, run_bin};
use deploy_support::{Samples, bench, metrics_addr, num, request, scrape, scrape_until};

const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

fn start(backend: &str, extra: &[&str]) -> (Server, std::net::SocketAddr) {
    let mut args = vec!["--threads", "2", "--metrics", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let server = Server::on(backend, &args);
    let log = server.wait_log("metrics line", |l| l.contains("metrics on http://"));
    (server, metrics_addr(&log))
}

/// What one scrape during the run saw.
struct Seen {
    bytes: u64,
    admitted: u64,
}

/// 200 scrapes, 15 ms apart: on one keep-alive connection, opening a fresh one every tenth
/// request. Every answer must be 200 with the exact content type and a well-formed body.
fn scrape_loop(addr: std::net::SocketAddr, running: Arc<AtomicBool>) -> Vec<Seen> {
    let mut seen = Vec::new();
    let mut conn = TcpStream::connect(addr).unwrap();
    for i in 0..200 {
        if i % 10 == 9 {
            conn = TcpStream::connect(addr).unwrap();
        }
        let a = request(&mut conn, "GET", "/metrics", "");
        assert_eq!(a.status, 200, "scrape {i}: {a:?}");
        assert_eq!(a.headers["content-type"], CONTENT_TYPE, "scrape {i}");
        assert_eq!(a.headers["connection"], "keep-alive", "scrape {i}");
        let s = Samples::parse(&a.body);
        seen.push(Seen {
            bytes: s.sum("echoport_bytes_echoed_total"),
            admitted: s.sum("echoport_connections_admitted"),
        });
        if !running.load(Ordering::Relaxed) && i >= 100 {
            break;
        }
        std::thread::sleep(Duration::from_millis(15));
    }
    seen
}

/// The scrape after a bench of 20 connections that echoed `bytes`: every total equal.
fn check_after_the_run(s: &Samples, bytes: u64, backend: &str) {
    assert_eq!(
        s.sum("echoport_bytes_echoed_total"),
        bytes,
        "bytes echoed vs the bench's"
    );
    assert_eq!(s.sum("echoport_connections_accepted_total"), 20);
    assert_eq!(s.sum("echoport_connections_closed_total"), 20);
    assert_eq!(s.sum("echoport_connections"), 0);
    assert_eq!(s.sum("echoport_connections_admitted"), 0);
    for zero in [
        "echoport_connection_errors_total",
        "echoport_connections_refused_total",
        "echoport_connection_timeouts_total",
        "echoport_cq_overflows_total",
    ] {
        assert_eq!(s.sum(zero), 0, "{zero}");
    }
    let per_worker: u64 = (0..2)
        .map(|w| {
            s.get(&format!(
                "echoport_connections_accepted_total{{worker=\"{w}\"}}"
            ))
            .unwrap()
        })
        .sum();
    assert_eq!(per_worker, 20, "per-worker samples");
    let kind = if backend == "epoll" {
        "epoll"
    } else {
        "io_uring"
    };
    let info = format!(
        "echoport_build_info{{version=\"{}\",backend=\"{kind}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(
        s.get(&info),
        Some(1),
        "{:?}",
        s.0.keys()
            .filter(|k| k.contains("build"))
            .collect::<Vec<_>>()
    );
}

fn counters_equal_the_bench_totals(backend: &str) {
    let (server, maddr) = start(backend, &[]);
    let running = Arc::new(AtomicBool::new(true));
    let scraper = {
        let running = running.clone();
        std::thread::spawn(move || scrape_loop(maddr, running))
    };
    let (code, doc) = bench(
        server.addr(),
        &["-c", "20", "-d", "2s", "--warmup", "0", "--threads", "1"],
        Duration::from_secs(60),
    );
    running.store(false, Ordering::Relaxed);
    let seen = scraper.join().expect("the scrape loop failed");
    assert_eq!(code, Some(0), "bench failed: {doc:#}");
    let bytes = num(&doc, "runs.0.bytes");
    assert_eq!(num(&doc, "runs.0.connections.established"), 20);
    assert!(bytes > 0);

    assert!(seen.len() >= 100, "only {} scrapes", seen.len());
    for w in seen.windows(2) {
        assert!(w[1].bytes >= w[0].bytes, "a counter went backwards");
    }
    assert!(
        seen.iter()
            .any(|s| s.admitted == 20 && s.bytes > 0 && s.bytes < bytes),
        "no scrape saw the run in progress (20 connections, some bytes echoed)"
    );
    // Published within a tick or two of the last change, even with the server idle.
    let s = scrape_until(maddr, |s| {
        s.sum("echoport_connections_closed_total") == 20
            && s.sum("echoport_bytes_echoed_total") == bytes
    });
    check_after_the_run(&s, bytes, backend);
    let stopped = server.stop();
    stopped.assert_clean();
    assert_eq!(
        stopped.stat("bytes_echoed"),
        bytes,
        "the stopped line agrees"
    );
}

every_backend! { counters_equal_the_bench_totals }

#[test]
fn udp_counters_are_published_per_socket() {
    let (server, maddr) = start("epoll", &["--udp"]);
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    for i in 0..10u8 {
        udp.send_to(&[i; 32], server.addr()).unwrap();
        let (n, _) = udp.recv_from(&mut buf).expect("a UDP echo");
        assert_eq!(&buf[..n], &[i; 32]);
    }
    let key = format!(
        "echoport_udp_datagrams_echoed_total{{addr=\"{}\"}}",
        server.addr()
    );
    let s = scrape_until(maddr, |s| s.get(&key) == Some(10));
    assert_eq!(s.get(&key), Some(10), "{:?}", s.0);
    assert_eq!(s.sum("echoport_udp_datagrams_dropped_total"), 0);
    let drop_key = format!(
        "echoport_udp_datagrams_dropped_total{{addr=\"{}\",reason=\"rate_limited\"}}",
        server.addr()
    );
    assert_eq!(s.get(&drop_key), Some(0), "every reason has a sample");
    server.stop().assert_clean();
}

/// 200 slowloris connections (a request head that never ends), 20 oversized heads and 20
/// malformed ones beside 30 good scrapes: every good scrape is answered at once, each bad
/// one gets its status or is closed within the request timeout, and the server spends
/// little CPU on it all.
#[test]
fn slow_and_bad_scrapers_cannot_hold_the_endpoint() {
    let (server, maddr) = start("epoll", &[]);
    let cpu0 = server.cpu_ticks();
    let t0 = Instant::now();
    let mut slow: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = TcpStream::connect(maddr).unwrap();
            s.write_all(b"GET /metr").unwrap();
            s
        })
        .collect();
    let mut bad = Vec::new();
    for i in 0..40 {
        let mut s = TcpStream::connect(maddr).unwrap();
        let (req, want) = if i % 2 == 0 {
            (
                format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(10_000)),
                431,
            )
        } else {
            ("BREW /metrics HTCPCP/1.0\r\n\r\n".to_string(), 400)
        };
        let _ = s.write_all(req.as_bytes());
        bad.push((s, want));
        // The good ones arrive in the middle of it all and must not wait.
        if i % 4 == 0 {
            for _ in 0..3 {
                let t = Instant::now();
                let a = scrape(maddr);
                assert_eq!(a.status, 200);
                assert_eq!(a.headers["content-type"], CONTENT_TYPE);
                assert!(
                    t.elapsed() < Duration::from_secs(1),
                    "a good scrape waited {:?}",
                    t.elapsed()
                );
            }
        }
    }
    for (mut s, want) in bad {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let text = String::from_utf8_lossy(&got);
        // A connection evicted to make room for newer ones is closed without an answer.
        assert!(
            text.is_empty() || text.starts_with(&format!("HTTP/1.1 {want} ")),
            "expected {want}: {text:?}"
        );
    }
    let mut other = TcpStream::connect(maddr).unwrap();
    assert_eq!(request(&mut other, "GET", "/other", "").status, 404);
    assert_eq!(request(&mut other, "HEAD", "/metrics", "").status, 200);
    assert_eq!(
        request(&mut other, "POST", "/metrics", "Content-Length: 0\r\n").status,
        405
    );
    // Every slowloris connection is closed by the server within the request timeout (2 s).
    for s in &mut slow {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 16];
        let r = s.read(&mut b);
        assert!(
            matches!(r, Ok(0)) || r.is_err(),
            "a slowloris connection got {r:?}"
        );
    }
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    let cpu = server.cpu_ticks() - cpu0;
    assert!(
        cpu < 100,
        "the server used {cpu} ticks of CPU on 270 scrape connections"
    );
    server.stop().assert_clean();
}

#[test]
fn metrics_stay_on_loopback_unless_told_otherwise() {
    let (st, _, err) = run_bin(
        &["serve", "--listen", "127.0.0.1:0", "--metrics", "0.0.0.0:0"],
        b"",
        Duration::from_secs(30),
    );
    assert_eq!(st.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--metrics 0.0.0.0:0") && err.contains("--metrics-public"),
        "{err}"
    );
    let (st, _, err) = run_bin(
        &["serve", "--listen", "127.0.0.1:0", "--metrics-public"],
        b"",
        Duration::from_secs(30),
    );
    assert_eq!(
        st.code(),
        Some(2),
        "--metrics-public without --metrics: {err}"
    );
    assert!(err.contains("--metrics"), "{err}");
}
