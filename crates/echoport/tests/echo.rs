//! The end-to-end suite: a real `echoport serve` on loopback, checked byte for byte, run
//! once on io_uring and once on epoll (`io_uring::*` and `epoll::*` tests, one definition).

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::{connect, message, ping_pong, stat, stream_through, Be, Server};

on_every_backend!(
    every_size_comes_back_intact,
    many_clients_on_two_threads,
    half_close_echoes_everything_then_closes,
    graceful_stop_echoes_what_was_received_then_says_eof,
    a_client_that_never_reads_does_not_stall_the_others,
    an_exhausted_buffer_pool_parks_and_recovers,
    resets_hurt_no_other_connection,
    descriptor_exhaustion_backs_off_instead_of_spinning,
);

fn every_size_comes_back_intact(be: Be) {
    let server = Server::start(be, &["--threads", "1"]);
    let mut s = connect(server.addr);
    let mut total = 0u64;
    for (r, size) in [1, 7, 1000, 8191, 8192, 8193, 65_536, 100_000]
        .into_iter()
        .enumerate()
    {
        let msg = message(0, r, size);
        s.write_all(&msg).unwrap();
        let mut got = vec![0; size];
        s.read_exact(&mut got).unwrap();
        assert!(got == msg, "{size}-byte echo differs");
        total += size as u64;
    }
    drop(s);
    let data = message(1, 1, 3_000_000);
    assert!(
        stream_through(server.addr, data.clone()) == data,
        "3 MB stream differs"
    );
    total += data.len() as u64;
    let stats = server.stop();
    assert_eq!(stat(&stats, "bytes_echoed"), total, "{stats}");
    assert_eq!(stat(&stats, "errors"), 0, "{stats}");
}

fn many_clients_on_two_threads(be: Be) {
    let server = Server::start(be, &["--threads", "2"]);
    ping_pong(server.addr, 100, 20, 3000);
    let stats = server.stop();
    assert_eq!(stat(&stats, "bytes_echoed"), 100 * 20 * 3000, "{stats}");
    assert_eq!(stat(&stats, "accepted"), 100, "{stats}");
    assert_eq!(stat(&stats, "closed"), 100, "{stats}");
}

fn half_close_echoes_everything_then_closes(be: Be) {
    let server = Server::start(be, &["--threads", "1"]);
    // Several at once, so tails of different connections interleave.
    let handles: Vec<_> = (0..8)
        .map(|c| {
            let addr = server.addr;
            thread::spawn(move || {
                let data = message(c, 0, 200_000 + c * 777);
                let got = stream_through(addr, data.clone());
                assert_eq!(got.len(), data.len(), "connection {c} lost its tail");
                assert!(got == data, "connection {c}: echo differs");
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a half-closing client failed");
    }
    let stats = server.stop();
    assert_eq!(stat(&stats, "errors"), 0, "{stats}");
}

fn graceful_stop_echoes_what_was_received_then_says_eof(be: Be) {
    let server = Server::start(be, &["--threads", "1", "--shutdown-timeout", "5"]);
    let addr = server.addr;
    let s = connect(addr);
    // Write far more than the server holds (64 KiB) without reading: at the stop, the server
    // holds received bytes it has not echoed yet.
    let data = message(3, 3, 2_000_000);
    let mut w = s.try_clone().unwrap();
    let sent = data.clone();
    let writer = thread::spawn(move || {
        let _ = w.write_all(&sent); // cut short when we hang up at the end
    });
    thread::sleep(Duration::from_millis(300));
    let mut server = server;
    server.terminate();
    let mut got = Vec::new();
    (&s).read_to_end(&mut got)
        .expect("the echo ends with end of stream, not an error");
    assert!(
        got.len() >= 64 * 1024,
        "only {} bytes came back before end of stream",
        got.len()
    );
    assert!(
        got[..] == data[..got.len()],
        "the echo is not a prefix of what was sent"
    );
    assert!(
        TcpStream::connect(addr).is_err(),
        "a stopping server still accepts"
    );
    s.shutdown(Shutdown::Both).unwrap();
    writer.join().unwrap();
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
}

fn a_client_that_never_reads_does_not_stall_the_others(be: Be) {
    let server = Server::start(be, &["--threads", "1"]);
    let hog = connect(server.addr);
    let mut w = hog.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let junk = message(9, 9, 1 << 20);
        for _ in 0..64 {
            if w.write_all(&junk).is_err() {
                break;
            }
        }
    });
    thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    ping_pong(server.addr, 20, 20, 1000);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the others were slowed to {:?}",
        t.elapsed()
    );
    hog.shutdown(Shutdown::Both).unwrap();
    writer.join().unwrap();
    drop(hog);
    let stats = server.stop();
    assert!(
        stat(&stats, "paused") > 0,
        "the hog never hit the limit, so nothing was tested: {stats}"
    );
}

fn an_exhausted_buffer_pool_parks_and_recovers(be: Be) {
    let server = Server::start(
        be,
        &["--threads", "1", "--buffers", "2", "--buf-size", "1024"],
    );
    ping_pong(server.addr, 50, 10, 3000);
    let stats = server.stop();
    assert_eq!(stat(&stats, "bytes_echoed"), 50 * 10 * 3000, "{stats}");
    assert!(
        stat(&stats, "parked") > 0,
        "the pool never ran dry, so nothing was tested: {stats}"
    );
}

fn resets_hurt_no_other_connection(be: Be) {
    let server = Server::start(be, &["--threads", "1"]);
    let addr = server.addr;
    let steady = thread::spawn(move || ping_pong(addr, 10, 50, 2000));
    for c in 0..30 {
        let mut s = connect(addr);
        s.write_all(&message(c, 0, 50_000)).unwrap();
        if c % 2 == 0 {
            let mut some = [0u8; 100];
            s.read_exact(&mut some).unwrap();
        }
        // Close with RST while the echo is in flight.
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
    }
    steady.join().expect("a steady client failed");
    ping_pong(addr, 5, 5, 100);
    let stats = server.stop();
    assert_eq!(stat(&stats, "accepted"), 30 + 10 + 5, "{stats}");
    assert_eq!(stat(&stats, "closed"), 30 + 10 + 5, "{stats}");
}

fn descriptor_exhaustion_backs_off_instead_of_spinning(be: Be) {
    // Plain descriptors on io_uring too (its direct descriptors do not count against the
    // process limit), so both backends meet EMFILE on accept.
    let server = Server::start_with_fd_limit(be, 48, &["--threads", "1", "--no-fast-path"]);
    let held: Vec<TcpStream> = (0..80).map(|_| connect(server.addr)).collect();
    thread::sleep(Duration::from_millis(300));
    let before = server.cpu_time();
    thread::sleep(Duration::from_secs(1));
    let used = server.cpu_time() - before;
    assert!(
        used < Duration::from_millis(300),
        "the server burned {used:?} of CPU in 1 s with descriptors exhausted"
    );
    drop(held);
    // Accepting resumes after the back-off (at most a second).
    let t = Instant::now();
    ping_pong(server.addr, 4, 3, 100);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let stats = server.stop();
    assert!(stat(&stats, "accept_backoffs") > 0, "{stats}");
}
