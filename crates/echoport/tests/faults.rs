//! The server behind a fault-injecting proxy: latency and jitter, 1-byte slicing, a bandwidth
//! limit, a reset mid-stream, a slow close, truncation. Bytes come back exact or the error is
//! clean, and the server leaks no connection.

#[macro_use]
mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use common::Server;
use echoport_testkit::proxy::{Faults, Proxy};

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
        .collect()
}

/// Sends `data` while reading concurrently; returns what came back before end of stream or
/// an error, and whether it ended in a clean end of stream.
fn round_trip(addr: SocketAddr, data: Vec<u8>, half_close: bool) -> (Vec<u8>, bool) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let _ = w.write_all(&data);
        if half_close {
            let _ = w.shutdown(Shutdown::Write);
        }
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let clean = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::TimedOut || e.kind() == ErrorKind::WouldBlock => {
                panic!("no progress for 20 s after {} bytes", got.len())
            }
            Err(_) => break false,
        }
    };
    writer.join().unwrap();
    (got, clean)
}

fn through(
    backend: &str,
    faults: Faults,
    len: usize,
    half_close: bool,
) -> (Vec<u8>, Vec<u8>, bool) {
    let server = Server::on(backend, &["--threads", "1"]);
    let proxy = Proxy::start(server.addr(), faults).unwrap();
    let data = pattern(len, len as u8);
    let (got, clean) = round_trip(proxy.addr(), data.clone(), half_close);
    drop(proxy);
    thread::sleep(Duration::from_millis(200));
    let stats = server.stop();
    assert_eq!(
        stats.stat("accepted"),
        stats.stat("closed"),
        "a connection leaked: {}",
        stats.log
    );
    (data, got, clean)
}

fn latency_jitter_and_one_byte_slices_keep_every_byte(backend: &str) {
    let faults = Faults {
        latency: Duration::from_micros(200),
        jitter: Duration::from_micros(300),
        slice: Some(1),
        ..Faults::default()
    };
    let (sent, got, clean) = through(backend, faults, 3000, true);
    assert!(clean, "stream did not end cleanly");
    assert_eq!(got, sent);
}

fn a_bandwidth_limit_slows_but_does_not_corrupt(backend: &str) {
    let faults = Faults {
        bandwidth: Some(400_000),
        ..Faults::default()
    };
    let (sent, got, clean) = through(backend, faults, 200_000, true);
    assert!(clean);
    assert_eq!(got, sent);
}

fn a_reset_mid_stream_ends_cleanly_with_an_exact_prefix(backend: &str) {
    let faults = Faults {
        reset_after: Some(100_000),
        slice: Some(4096),
        ..Faults::default()
    };
    let (sent, got, clean) = through(backend, faults, 1 << 20, false);
    assert!(!clean || got.len() < sent.len(), "the reset was not seen");
    assert!(
        sent.starts_with(&got),
        "bytes before the reset were corrupted"
    );
    assert!(got.len() <= 100_000, "more came back than passed the proxy");
}

fn a_slow_close_still_gets_the_whole_echo_then_end_of_stream(backend: &str) {
    let faults = Faults {
        slow_close: Some(Duration::from_millis(300)),
        ..Faults::default()
    };
    let (sent, got, clean) = through(backend, faults, 50_000, true);
    assert!(clean);
    assert_eq!(got, sent);
}

fn truncation_by_the_network_leaves_an_exact_prefix(backend: &str) {
    let faults = Faults {
        truncate_after: Some(12_345),
        ..Faults::default()
    };
    let (sent, got, clean) = through(backend, faults, 100_000, true);
    assert!(clean, "the proxy ends the stream cleanly");
    assert_eq!(got, sent[..12_345]);
}

every_backend! {
    latency_jitter_and_one_byte_slices_keep_every_byte,
    a_bandwidth_limit_slows_but_does_not_corrupt,
    a_reset_mid_stream_ends_cleanly_with_an_exact_prefix,
    a_slow_close_still_gets_the_whole_echo_then_end_of_stream,
    truncation_by_the_network_leaves_an_exact_prefix,
}
