//! UDP echo (RFC 862) and its guards against reflection and loops.

#[macro_use]
mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::Server;

fn client(bind: &str) -> UdpSocket {
    let s = UdpSocket::bind(bind).unwrap_or_else(|e| {
        panic!("binding a test client to {bind}: {e} (privileged ports need root)")
    });
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    s
}

fn echoed(s: &UdpSocket, to: SocketAddr, data: &[u8]) -> Option<Vec<u8>> {
    s.send_to(data, to).unwrap();
    let mut buf = vec![0u8; 70_000];
    match s.recv_from(&mut buf) {
        Ok((n, from)) => {
            assert_eq!(from, to, "reply from an unexpected address");
            Some(buf[..n].to_vec())
        }
        Err(_) => None,
    }
}

fn udp_is_off_by_default(backend: &str) {
    let server = Server::on(backend, &["--threads", "1"]);
    let c = client("127.0.0.1:0");
    assert_eq!(
        echoed(&c, server.addr(), b"anyone?"),
        None,
        "UDP answered without --udp"
    );
}

fn datagrams_come_back_whole_up_to_the_largest(backend: &str) {
    let server = Server::on(backend, &["--threads", "1", "--udp"]);
    let c = client("127.0.0.1:0");
    for len in [1usize, 100, 1472, 9000, 65_507] {
        let data: Vec<u8> = (0..len).map(|i| (i * 13 + len) as u8).collect();
        assert_eq!(
            echoed(&c, server.addr(), &data).as_deref(),
            Some(&data[..]),
            "{len}-byte datagram"
        );
    }
    let stats = server.stop();
    assert_eq!(stats.stat("udp_echoed"), 5, "{}", stats.log);
}

fn dangerous_sources_get_no_reply(backend: &str) {
    let server = Server::on(backend, &["--threads", "1", "--udp"]);
    let port = server.addr().port();
    let own = format!("127.0.0.2:{port}");
    let sources = [
        "127.0.0.1:7",
        "127.0.0.1:19",
        "127.0.0.1:53",
        "127.0.0.1:123",
        "127.0.0.1:1000",
        own.as_str(),
    ];
    for src in sources {
        let c = client(src);
        assert_eq!(
            echoed(&c, server.addr(), b"loop?"),
            None,
            "replied to {src}"
        );
    }
    let ok = client("127.0.0.1:0");
    assert!(
        echoed(&ok, server.addr(), b"fine").is_some(),
        "an ordinary source is answered"
    );
    let stats = server.stop();
    assert_eq!(
        stats.stat("udp_refused"),
        sources.len() as u64,
        "{}",
        stats.log
    );
}

fn a_blast_from_one_source_is_held_to_its_rate(backend: &str) {
    let server = Server::on(backend, &["--threads", "1", "--udp", "--udp-rate", "1000"]);
    let c = client("127.0.0.1:0");
    c.set_nonblocking(true).unwrap();
    let started = Instant::now();
    let mut sent = 0u32;
    let mut replies = 0u64;
    let mut buf = [0u8; 64];
    while sent < 100_000 && started.elapsed() < Duration::from_secs(5) {
        if c.send_to(&sent.to_le_bytes(), server.addr()).is_ok() {
            sent += 1;
        }
        while c.recv_from(&mut buf).is_ok() {
            replies += 1;
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    while c.recv_from(&mut buf).is_ok() {
        replies += 1;
    }
    // 1,000/s after a burst of 2,000, over all the time the server had: a busy machine lets
    // it work through its queue after the blast (during the drain, and until the stop), and
    // a reply then is as much within the limit as any other.
    let allowed = |secs: f64| 2000 + (secs * 1000.0) as u64 + 50;
    let elapsed = started.elapsed();
    assert!(
        replies <= allowed(elapsed.as_secs_f64()),
        "{replies} replies in {elapsed:?} from {sent} datagrams"
    );
    assert!(
        replies >= 1000,
        "too few replies ({replies}): the test did not exercise the limit"
    );
    let stats = server.stop();
    let lifetime = started.elapsed();
    assert!(stats.stat("udp_rate_limited") > 0, "{}", stats.log);
    assert!(
        stats.stat("udp_echoed") <= allowed(lifetime.as_secs_f64()),
        "{} echoed in {lifetime:?}\n{}",
        stats.stat("udp_echoed"),
        stats.log
    );
}

/// Every address the server says it echoes UDP on.
fn udp_addrs(server: &Server, expect: usize) -> Vec<SocketAddr> {
    let log = server.wait_log("UDP echo lines", |l| {
        l.matches("UDP echo on ").count() >= expect
    });
    log.lines()
        .filter_map(|l| l.split("UDP echo on ").nth(1))
        .filter_map(|a| a.split_whitespace().next())
        .map(|a| a.parse().expect("an address after 'UDP echo on'"))
        .collect()
}

/// Floods `to` from one socket, round robin, as fast as it goes for `length` (200,000
/// datagrams at most); returns the replies each address sent back.
fn flood_from_one_source(to: &[SocketAddr], length: Duration) -> Vec<u64> {
    let c = client("127.0.0.1:0");
    c.set_nonblocking(true).unwrap();
    let mut replies = vec![0u64; to.len()];
    let mut buf = [0u8; 64];
    let mut drain = |replies: &mut Vec<u64>| {
        while let Ok((_, from)) = c.recv_from(&mut buf) {
            let i = to.iter().position(|&a| a == from).expect("a reply from us");
            replies[i] += 1;
        }
    };
    let started = Instant::now();
    let mut sent = 0u32;
    while sent < 200_000 && started.elapsed() < length {
        if c.send_to(&sent.to_le_bytes(), to[sent as usize % to.len()])
            .is_ok()
        {
            sent += 1;
        }
        drain(&mut replies);
    }
    std::thread::sleep(Duration::from_millis(200));
    drain(&mut replies);
    replies
}

/// Two listen addresses (two ports), one UDP socket each; a flood from one source to both.
fn two_address_server(rates: &[&str]) -> (Server, Vec<SocketAddr>) {
    let mut args = vec!["--threads", "1", "--udp"];
    args.extend(["--listen", "127.0.0.1:0", "--listen", "127.0.0.1:0"]);
    args.extend_from_slice(rates);
    let server = Server::start(&args);
    let addrs = udp_addrs(&server, 2);
    assert_eq!(addrs.len(), 2, "{}", server.log());
    assert_ne!(addrs[0], addrs[1]);
    (server, addrs)
}

/// Checks the replies of a flood against `burst + rate * seconds` (and a little slack for
/// the stop), and that both sockets answered and the limit was reached.
fn assert_within_one_budget(
    server: Server,
    replies: &[u64],
    started: Instant,
    rate: f64,
    burst: f64,
) {
    // Counted up to the end of the stop: the server may drain its queue until then (on a
    // busy machine the stop itself can take a while).
    let stats = server.stop();
    let seconds = started.elapsed().as_secs_f64();
    let echoed = stats.stat("udp_echoed");
    let allowed = (burst + rate * seconds) as u64 + 50;
    assert!(
        echoed <= allowed,
        "{echoed} replies in {seconds:.2} s from two addresses, {allowed} allowed (one budget, \
         not one an address); replies per address {replies:?}\n{}",
        stats.log
    );
    assert!(
        replies.iter().all(|&r| r > 0),
        "both addresses answered: {replies:?}"
    );
    assert!(
        echoed >= burst as u64,
        "the flood did not reach the limit: {echoed}"
    );
    assert!(stats.stat("udp_rate_limited") > 0, "{}", stats.log);
    assert!(replies.iter().sum::<u64>() <= echoed);
}

// The UDP loop is the same beside every TCP backend, so these run on the default one.
#[test]
fn the_global_rate_is_one_budget_for_every_address() {
    let (server, addrs) =
        two_address_server(&["--udp-rate", "1000000", "--udp-global-rate", "500"]);
    let started = Instant::now();
    let replies = flood_from_one_source(&addrs, Duration::from_millis(1500));
    // --udp-global-rate 500: a burst of one second's worth.
    assert_within_one_budget(server, &replies, started, 500.0, 500.0);
}

#[test]
fn a_source_has_one_allowance_across_every_address() {
    let (server, addrs) =
        two_address_server(&["--udp-rate", "300", "--udp-global-rate", "1000000"]);
    let started = Instant::now();
    let replies = flood_from_one_source(&addrs, Duration::from_millis(1500));
    // --udp-rate 300: a burst of twice that.
    assert_within_one_budget(server, &replies, started, 300.0, 600.0);
}

every_backend! {
    udp_is_off_by_default,
    datagrams_come_back_whole_up_to_the_largest,
    dangerous_sources_get_no_reply,
    a_blast_from_one_source_is_held_to_its_rate,
}
