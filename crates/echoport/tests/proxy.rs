//! `serve --proxy-protocol` end to end, on io_uring and epoll: at the scale of an attack
//! (hundreds of garbage, malformed, over-long, truncated, dribbling and silent headers beside
//! dozens of good v1 and v2 clients whose echoes are checked byte for byte, the server's CPU
//! measured while the bad ones are held), per-IP limits applied to the header's client, the
//! LOCAL health check, peers outside --proxy-from refused at accept, the header deadline, and
//! the counters (stopped line and /metrics) equal to what was sent, `bench --proxy-protocol`
//! included.

#[macro_use]
mod common;
mod deploy_support;
mod proxy_support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use common::{Server, ping};
use deploy_support::{bench, metrics_addr, num, scrape_until};
use proxy_support::{Held, closed_within, header, local, malformed, proxied_echo, too_long};

/// Good clients, each making [`ROUNDS`] proxied connections.
const GOOD: usize = 40;
const ROUNDS: usize = 3;
/// Copies of each bad sample sent.
const COPIES: usize = 3;
const GARBAGE: usize = 60;
const TRUNCATED: usize = 60;
const DRIBBLERS: usize = 150;
const SILENT: usize = 60;
/// The header deadline the attack runs with.
const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// Server CPU allowed while only the held connections are there (a fraction of a core).
const HELD_CPU_LIMIT: f64 = 0.10;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Server CPU used over `over`, as a fraction of one core.
fn cpu_share(server: &Server, over: Duration) -> f64 {
    let before = server.cpu_ticks();
    thread::sleep(over);
    (server.cpu_ticks() - before) as f64 / 100.0 / over.as_secs_f64()
}

/// Good client `id`: [`ROUNDS`] connections, v1 and v2 in turn, the last one's header cut
/// in two. Returns (v1 headers, v2 headers, bytes echoed).
fn good_client(server: SocketAddr, id: usize) -> Result<(u64, u64, u64), String> {
    let mut seen = (0, 0, 0);
    for round in 0..ROUNDS {
        let v2 = (id + round) % 2 == 1;
        let src = if round == 1 {
            SocketAddr::new(format!("2001:db8::{:x}", id + 1).parse().unwrap(), 4000)
        } else {
            SocketAddr::new(format!("198.51.100.{}", id + 1).parse().unwrap(), 4000)
        };
        let h = header(v2, src, server);
        let first: Vec<u8> = (0..1000).map(|j| (id * 7 + round * 13 + j) as u8).collect();
        // The second message starts like a header: it must be echoed, not parsed.
        let mut second = h.clone();
        second.extend((0..1500).map(|j| (j * 3 + id) as u8));
        let n = proxied_echo(server, &h, &first, &second, round == ROUNDS - 1)
            .map_err(|e| format!("client {id} round {round}: {e}"))?;
        if v2 {
            seen.1 += 1;
        } else {
            seen.0 += 1;
        }
        seen.2 += n;
    }
    Ok(seen)
}

/// Opens one connection per bad header, writes it (and, for `fin`, shuts down writing),
/// then checks that each is closed with nothing echoed.
fn send_bad(server: SocketAddr, samples: &[Vec<u8>], fin: bool) -> Result<usize, String> {
    let mut conns = Vec::new();
    for h in samples {
        let mut s = TcpStream::connect(server).map_err(|e| format!("connect: {e}"))?;
        // A reset can cut a write short once the server has seen enough: fine.
        let _ = s.write_all(h);
        if fin {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        conns.push(s);
    }
    for (i, s) in conns.iter_mut().enumerate() {
        let got = closed_within(s, Duration::from_secs(5))?;
        if !got.is_empty() {
            return Err(format!("bad header {i} was echoed {} bytes", got.len()));
        }
    }
    Ok(conns.len())
}

/// The bad headers sent at once, by the counter each must raise.
struct Bad {
    malformed: Vec<Vec<u8>>,
    too_long: Vec<Vec<u8>>,
    garbage: Vec<Vec<u8>>,
    truncated: Vec<Vec<u8>>,
}

impl Bad {
    fn new(addr: SocketAddr) -> Bad {
        Bad {
            malformed: malformed()
                .into_iter()
                .flat_map(|h| vec![h; COPIES])
                .collect(),
            too_long: too_long().into_iter().flat_map(|h| vec![h; 30]).collect(),
            garbage: (0..GARBAGE)
                .map(|i| format!("GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes())
                .collect(),
            truncated: (0..TRUNCATED)
                .map(|i| header(i % 2 == 0, sa("192.0.2.9:9"), addr)[..10].to_vec())
                .collect(),
        }
    }

    fn total(&self) -> usize {
        self.malformed.len() + self.too_long.len() + self.garbage.len() + self.truncated.len()
    }

    /// Sends them all, one thread a kind (the truncated ones end with a FIN).
    fn send(&self, addr: SocketAddr) -> Vec<thread::JoinHandle<Result<usize, String>>> {
        [
            (self.malformed.clone(), false),
            (self.too_long.clone(), false),
            (self.garbage.clone(), false),
            (self.truncated.clone(), true),
        ]
        .map(|(samples, fin)| thread::spawn(move || send_bad(addr, &samples, fin)))
        .into()
    }
}

/// The held connections were closed by the header deadline, measured from accept, and cost
/// the server next to no CPU meanwhile.
fn check_held(closes: &[Option<Duration>], held_cpu: f64) {
    assert!(
        closes.iter().all(Option::is_some),
        "held connections still open 10 s after accept"
    );
    let latest = closes.iter().flatten().max().copied().unwrap();
    let earliest = closes.iter().flatten().min().copied().unwrap();
    eprintln!(
        "held connections closed between {earliest:?} and {latest:?}; server CPU while they \
         were held {:.1}% of a core",
        held_cpu * 100.0
    );
    assert!(
        earliest >= HEADER_TIMEOUT - Duration::from_millis(150),
        "a held connection closed before the header deadline: {earliest:?}"
    );
    assert!(
        latest <= HEADER_TIMEOUT + Duration::from_millis(1500),
        "the deadline (measured from accept) let one live until {latest:?}"
    );
    assert!(
        held_cpu <= HELD_CPU_LIMIT,
        "the server used {:.1}% of a core holding {} unfinished headers (limit {:.0}%)",
        held_cpu * 100.0,
        DRIBBLERS + SILENT,
        HELD_CPU_LIMIT * 100.0
    );
}

fn good_and_bad_headers_at_attack_scale(backend: &str) {
    attack(backend, &[]);
}

/// io_uring's one-shot path too: a receive posted per segment, no buffer ring.
#[test]
fn io_uring_one_shot_good_and_bad_headers_at_attack_scale() {
    attack("io-uring", &["--no-fast-path"]);
}

fn attack(backend: &str, extra: &[&str]) {
    let timeout = HEADER_TIMEOUT.as_secs().to_string();
    let mut args = vec![
        "--threads",
        "2",
        "--proxy-protocol",
        "--proxy-timeout",
        &timeout,
    ];
    args.extend_from_slice(extra);
    let server = Server::on(backend, &args);
    let addr = server.addr();
    let held = Held::open(
        addr,
        DRIBBLERS,
        SILENT,
        header(true, sa("192.0.2.1:1"), addr),
    );
    let held = thread::spawn(move || held.run(Duration::from_millis(300), Duration::from_secs(10)));
    thread::sleep(Duration::from_millis(300));
    let held_cpu = cpu_share(&server, Duration::from_secs(1));
    let bad = Bad::new(addr);
    let attackers = bad.send(addr);
    let good: Vec<_> = (0..GOOD)
        .map(|id| thread::spawn(move || good_client(addr, id)))
        .collect();
    let good: Vec<_> = good.into_iter().map(|h| h.join().unwrap()).collect();
    for a in attackers {
        a.join()
            .unwrap()
            .expect("a bad header was not closed cleanly");
    }
    let closes = held.join().unwrap().expect("a held connection");
    let failures: Vec<&String> = good.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} good clients failed: {failures:?}",
        failures.len()
    );
    let (v1, v2, bytes) = good
        .iter()
        .flatten()
        .fold((0, 0, 0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2));
    eprintln!(
        "{backend}: {} good echoes (v1 {v1}, v2 {v2}) beside {} held and {} bad connections",
        GOOD * ROUNDS,
        DRIBBLERS + SILENT,
        bad.total()
    );
    check_held(&closes, held_cpu);
    let stopped = server.stop();
    stopped.assert_clean();
    let s = |k: &str| stopped.stat(k);
    assert_eq!((s("proxy_v1"), s("proxy_v2")), (v1, v2), "{}", stopped.log);
    assert_eq!(s("bytes_echoed"), bytes, "exactly the payloads, no header");
    assert_eq!(s("proxy_malformed"), bad.malformed.len() as u64);
    assert_eq!(s("proxy_too_long"), bad.too_long.len() as u64);
    assert_eq!(s("proxy_not_proxy"), GARBAGE as u64);
    assert_eq!(s("proxy_truncated"), TRUNCATED as u64);
    assert_eq!(s("proxy_timeouts"), (DRIBBLERS + SILENT) as u64);
    let others = (s("timeouts"), s("proxy_untrusted"), s("refused"));
    assert_eq!(others, (0, 0, 0));
    assert_eq!(s("closed"), s("accepted"));
    assert_eq!(s("buffer_misuses"), 0);
}

fn per_ip_limits_use_the_headers_client(backend: &str) {
    let server = Server::on(
        backend,
        &["--proxy-protocol", "--max-connections-per-ip", "1"],
    );
    let addr = server.addr();
    let open = |src: &str| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&header(true, sa(src), addr)).unwrap();
        s
    };
    let mut a = open("192.0.2.1:1000");
    let mut b = open("192.0.2.2:1000");
    ping(&mut a, b"one client");
    ping(&mut b, b"another client through the same balancer");
    let mut again = open("192.0.2.1:1001");
    let _ = again.write_all(b"over its limit");
    assert_eq!(
        closed_within(&mut again, Duration::from_secs(5)),
        Ok(Vec::new()),
        "a second connection of 192.0.2.1 must be closed unechoed"
    );
    // Health checks are charged to the balancer (127.0.0.1) itself, which holds nothing yet.
    let mut check = TcpStream::connect(addr).unwrap();
    check.write_all(&local()).unwrap();
    ping(&mut check, b"LOCAL");
    drop(a);
    thread::sleep(Duration::from_millis(200));
    let mut back = open("192.0.2.1:1002");
    ping(&mut back, b"its place was given back when it closed");
    drop((b, check, back));
    let stopped = server.stop();
    stopped.assert_clean();
    assert_eq!(stopped.stat("refused"), 1, "{}", stopped.log);
    assert_eq!(stopped.stat("proxy_v2"), 4);
    assert_eq!(stopped.stat("proxy_local"), 1);
}

fn local_and_unknown_are_echoed(backend: &str) {
    let server = Server::on(backend, &["--proxy-protocol"]);
    let addr = server.addr();
    for (h, what) in [
        (local(), "LOCAL"),
        (b"PROXY UNKNOWN\r\n".to_vec(), "UNKNOWN"),
        (
            b"PROXY UNKNOWN ffff:: ffff:: 1 2\r\n".to_vec(),
            "UNKNOWN with addresses",
        ),
    ] {
        let mut s = TcpStream::connect(addr).unwrap();
        let mut bytes = h.clone();
        bytes.extend_from_slice(what.as_bytes());
        s.write_all(&bytes).unwrap();
        assert_eq!(
            common::read_n(&mut s, what.len()),
            what.as_bytes(),
            "{what}"
        );
        ping(&mut s, b"and more");
    }
    let stopped = server.stop();
    stopped.assert_clean();
    let s = |k: &str| stopped.stat(k);
    assert_eq!(
        (s("proxy_local"), s("proxy_v1"), s("proxy_unknown")),
        (1, 2, 2)
    );
    assert_eq!(s("bytes_echoed"), (5 + 7 + 22 + 3 * 8) as u64);
}

fn peers_outside_proxy_from_are_refused_at_accept(backend: &str) {
    let server = Server::on(backend, &["--proxy-protocol", "--proxy-from", "127.0.0.2"]);
    let addr = server.addr();
    assert!(
        server.log().contains("proxy_from=127.0.0.2/32"),
        "the start-up line shows the effective list:\n{}",
        server.log()
    );
    let mut refused = Vec::new();
    for i in 0..50 {
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = s.write_all(&header(i % 2 == 0, sa("192.0.2.1:1"), addr));
        let _ = s.write_all(b"forged");
        refused.push(s);
    }
    for s in &mut refused {
        assert_eq!(closed_within(s, Duration::from_secs(5)), Ok(Vec::new()));
    }
    // The trusted balancer's address gets in.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&sa("127.0.0.2:0").into()).unwrap();
    sock.connect(&addr.into()).unwrap();
    let mut ok: TcpStream = sock.into();
    ok.write_all(&header(false, sa("192.0.2.1:1"), addr))
        .unwrap();
    ping(&mut ok, b"trusted");
    drop(ok);
    let stopped = server.stop();
    stopped.assert_clean();
    let s = |k: &str| stopped.stat(k);
    assert_eq!(
        (s("proxy_untrusted"), s("refused"), s("accepted")),
        (50, 50, 1)
    );
    assert_eq!(s("bytes_echoed"), 7);
}

fn default_trust_is_loopback(backend: &str) {
    let server = Server::on(backend, &["--proxy-protocol"]);
    let log = server.log();
    assert!(
        log.contains("proxy_from=127.0.0.0/8,::1/128") && log.contains("proxy_timeout=5s"),
        "{log}"
    );
    server.stop().assert_clean();
}

/// `bench --proxy-protocol` against a server limited to one connection per client: every
/// connection names a new client, so all get in; churn writes a header on each new one;
/// the metrics equal the bench's totals and the bad connections sent.
fn bench_headers_and_metrics_agree(backend: &str) {
    let server = Server::on(
        backend,
        &[
            "--proxy-protocol",
            "--max-connections-per-ip",
            "1",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let log = server.wait_log("metrics line", |l| l.contains("metrics on http://"));
    let maddr = metrics_addr(&log);
    let addr = server.addr();
    let mut expect = [0u64; 2];
    let mut bytes = 0;
    for (i, version) in ["v1", "v2"].iter().enumerate() {
        let (code, doc) = bench(
            addr,
            &[
                "-c",
                "20",
                "-d",
                "1s",
                "--warmup",
                "0",
                "--threads",
                "1",
                "--messages-per-conn",
                "40",
                "--proxy-protocol",
                version,
                "--proxy-src",
                "198.51.100.0/24",
            ],
            Duration::from_secs(60),
        );
        assert_eq!(code, Some(0), "bench failed: {doc:#}");
        assert_eq!(num(&doc, "runs.0.connections.failed"), 0, "{doc:#}");
        let est = num(&doc, "runs.0.connections.established");
        assert!(est > 20, "churn opened more connections: {doc:#}");
        expect[i] = est;
        bytes += num(&doc, "runs.0.bytes");
    }
    send_bad(addr, &malformed()[..5], false).unwrap();
    send_bad(addr, &[b"hello".to_vec()], false).unwrap();
    let want = |s: &deploy_support::Samples| {
        s.sum("echoport_bytes_echoed_total") == bytes && s.sum("echoport_proxy_refused_total") == 6
    };
    let s = scrape_until(maddr, want);
    let get = |k: &str| s.sum(k);
    let key = |labels: &str| {
        (0..2)
            .map(|w| {
                let k = format!("echoport_proxy_headers_total{{worker=\"{w}\",{labels}}}");
                s.get(&k).unwrap_or(0)
            })
            .sum::<u64>()
    };
    assert_eq!(get("echoport_bytes_echoed_total"), bytes, "{:?}", s.0);
    assert_eq!(key("version=\"1\",command=\"proxy\""), expect[0]);
    assert_eq!(key("version=\"2\",command=\"proxy\""), expect[1]);
    assert_eq!(key("version=\"2\",command=\"local\""), 0);
    let reason = |r: &str| {
        s.0.iter()
            .filter(|(k, _)| k.starts_with("echoport_proxy_refused_total") && k.contains(r))
            .map(|(_, v)| v)
            .sum::<u64>()
    };
    assert_eq!((reason("\"malformed\""), reason("\"not_proxy\"")), (5, 1));
    assert_eq!(
        get("echoport_connections_refused_total"),
        0,
        "no client over its limit"
    );
    let stopped = server.stop();
    stopped.assert_clean();
    assert_eq!(stopped.stat("proxy_v1"), expect[0]);
    assert_eq!(stopped.stat("proxy_v2"), expect[1]);
}

every_backend! {
    good_and_bad_headers_at_attack_scale,
    per_ip_limits_use_the_headers_client,
    local_and_unknown_are_echoed,
    peers_outside_proxy_from_are_refused_at_accept,
    default_trust_is_loopback,
    bench_headers_and_metrics_agree,
}

#[test]
fn bad_proxy_flags_name_the_flag_and_the_valid_value() {
    for (args, want) in [
        (
            &["--proxy-protocol", "--proxy-from", "10.0.0.1/8"][..],
            "--proxy-from 10.0.0.1/8: bits after the prefix are set; the network is 10.0.0.0/8",
        ),
        (
            &["--proxy-protocol", "--proxy-timeout", "0"],
            "--proxy-timeout 0: must be more than 0",
        ),
        (&["--proxy-from", "::1"], "--proxy-protocol"),
    ] {
        let mut all = vec!["serve"];
        all.extend_from_slice(args);
        let (status, _, err) = common::run_bin(&all, b"", Duration::from_secs(20));
        assert!(!status.success(), "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let (status, out, err) = common::run_bin(
        &["bench", "--proxy-protocol", "v3"],
        b"",
        Duration::from_secs(20),
    );
    assert!(!status.success());
    assert!(err.contains("v1") && err.contains("v2"), "{out}{err}");
    let (_, help, _) = common::run_bin(&["serve", "--help"], b"", Duration::from_secs(20));
    for flag in ["--proxy-protocol", "--proxy-from", "--proxy-timeout"] {
        assert!(help.contains(flag), "serve --help says nothing of {flag}");
    }
}
