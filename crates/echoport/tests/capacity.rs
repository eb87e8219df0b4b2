//! Capacity past one direct-descriptor table: one io_uring worker adds rings as its tables
//! fill (forced small here with `--ring-table-size`), every connection echoes, the start-up
//! line states the capacity, and a limit reached is said once in the log, not per accept.

mod common;

use std::net::TcpStream;
use std::time::Duration;

use common::{Server, ping, read_n};

const TABLE: usize = 256;

fn start_line(server: &Server) -> String {
    let log = server.wait_log("start-up line", |l| l.contains("echoport serving"));
    log.lines()
        .find(|l| l.contains("echoport serving"))
        .unwrap()
        .to_string()
}

/// Opens `n` connections one after another, each echoing a message of its own at once.
fn open_echoed(server: &Server, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = server.connect();
            ping(&mut s, format!("open {i:06}\n").as_bytes());
            s
        })
        .collect()
}

/// Every connection echoes again: all writes first, then every read.
fn echo_all_again(conns: &mut [TcpStream]) {
    for (i, s) in conns.iter_mut().enumerate() {
        std::io::Write::write_all(s, format!("again {i:06}\n").as_bytes()).unwrap();
    }
    for (i, s) in conns.iter_mut().enumerate() {
        let want = format!("again {i:06}\n");
        assert_eq!(read_n(s, want.len()), want.as_bytes(), "connection {i}");
    }
}

#[test]
fn one_thread_holds_three_tables_of_connections_each_echoed() {
    let server = Server::start(&[
        "--backend",
        "io-uring",
        "--threads",
        "1",
        "--ring-table-size",
        &TABLE.to_string(),
    ]);
    let line = start_line(&server);
    for want in [
        "ring_table=256 ",
        "rings_per_thread=",
        "max_connections=",
        "max_connections_from=",
        "machine_limit=",
    ] {
        assert!(line.contains(want), "no {want:?} in: {line}");
    }
    let capacity: usize = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("max_connections="))
        .and_then(|v| v.parse().ok())
        .expect("max_connections=N");
    assert!(
        capacity >= 3 * TABLE,
        "one thread's capacity ({capacity}) is no longer one table of {TABLE}: {line}"
    );
    let fds_before = server.fd_count();
    let mut conns = open_echoed(&server, 3 * TABLE);
    echo_all_again(&mut conns);
    // Direct descriptors: 768 connections, and only the extra rings' two descriptors each.
    let fds_held = server.fd_count();
    assert!(
        fds_held < fds_before + 32,
        "descriptors grew from {fds_before} to {fds_held} for {} connections",
        conns.len()
    );
    drop(conns);
    let stopped = server.stop();
    stopped.assert_clean();
    assert_eq!(
        stopped.stat("accepted"),
        3 * TABLE as u64,
        "{}",
        stopped.log
    );
    assert_eq!(stopped.stat("errors"), 0, "{}", stopped.log);
    assert!(
        !stopped.log.contains("pausing accepts") && !stopped.log.contains("limit reached"),
        "no limit was reached:\n{}",
        stopped.log
    );
}

#[test]
fn the_connection_limit_is_said_once_however_many_are_refused() {
    const MAX: usize = 100;
    let server = Server::start(&[
        "--backend",
        "io-uring",
        "--threads",
        "1",
        "--ring-table-size",
        "64",
        "--max-connections",
        &MAX.to_string(),
    ]);
    let line = start_line(&server);
    assert!(
        line.contains("max_connections=100 ")
            && line.contains("max_connections_from=--max-connections"),
        "{line}"
    );
    let mut held = open_echoed(&server, MAX);
    // 300 more: each is accepted and closed at once (the client reads end of stream or a
    // reset, never an echo).
    for i in 0..300 {
        let mut s = server.connect();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = std::io::Write::write_all(&mut s, b"refused?\n");
        let mut buf = [0u8; 16];
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("refused connection {i} echoed {n} bytes"),
        }
    }
    echo_all_again(&mut held);
    // Below nine tenths of the limit the server admits again, and a new episode would be
    // said again: close 20, then 20 new connections echo.
    held.truncate(MAX - 20);
    std::thread::sleep(Duration::from_millis(200));
    held.extend(open_echoed(&server, 20));
    echo_all_again(&mut held);
    drop(held);
    let stopped = server.stop();
    stopped.assert_clean();
    let said = stopped
        .log
        .lines()
        .filter(|l| l.contains("connection limit reached"))
        .count();
    assert_eq!(said, 1, "the limit message, once:\n{}", stopped.log);
    assert!(
        stopped.log.contains("--max-connections"),
        "the message names the flag:\n{}",
        stopped.log
    );
    assert_eq!(stopped.stat("refused"), 300, "{}", stopped.log);
    assert!(
        !stopped.log.contains("pausing accepts"),
        "refusals are not accept failures:\n{}",
        stopped.log
    );
}
