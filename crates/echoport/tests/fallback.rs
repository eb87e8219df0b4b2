//! Where io_uring is really refused: the server runs under a seccomp filter that makes the
//! io_uring system calls fail (installed in the child between fork and exec, as a container
//! runtime would), with each error code seen in the wild.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, ping_pong};
use echoport_io::sys::seccomp::Filter;

/// The errors container profiles, kernels and sandboxes answer `io_uring_setup` with, and
/// how the OS spells them.
const REFUSALS: [(i32, &str); 4] = [
    (libc::EPERM, "Operation not permitted"),
    (libc::ENOSYS, "Function not implemented"),
    (libc::EOPNOTSUPP, "Operation not supported"),
    (libc::EINVAL, "Invalid argument"),
];

#[test]
fn auto_falls_back_to_epoll_says_why_and_echoes() {
    for (errno, words) in REFUSALS {
        let server = Server::start_configured(&["--threads", "2"], |cmd| {
            Filter::refuse_io_uring(errno).apply_to(cmd);
        });
        let log = server.log();
        let warning = log
            .lines()
            .find(|l| l.contains("falling back to epoll"))
            .unwrap_or_else(|| panic!("no fallback warning for {words}: {log}"));
        assert!(
            warning.contains("WARN")
                && warning.contains("io_uring_setup")
                && warning.contains(words),
            "{warning}"
        );
        let line = log
            .lines()
            .find(|l| l.contains("echoport serving"))
            .expect("start-up line");
        assert!(line.contains("backend=epoll"), "{line}");
        assert!(
            line.contains("why_not_io_uring=") && line.contains(words),
            "the start-up line does not say why: {line}"
        );
        let echoed = ping_pong(server.addr(), 20, 10, 1500);
        let stopped = server.stop();
        assert_eq!(stopped.stat("bytes_echoed"), echoed, "{words}");
    }
}

#[test]
fn forcing_io_uring_under_the_filter_fails_with_a_clear_message() {
    for (errno, words) in REFUSALS {
        let mut cmd = Command::new(common::BIN);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--backend", "io-uring"]);
        Filter::refuse_io_uring(errno).apply_to(&mut cmd);
        let t = Instant::now();
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .expect("run echoport serve");
        assert!(t.elapsed() < Duration::from_secs(10));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("echoport: error: --backend io-uring: io_uring is not usable here")
                && stderr.contains(words)
                && stderr.contains("--backend epoll"),
            "unclear message for {words}: {stderr}"
        );
        assert!(!stderr.contains("listening on"), "{stderr}");
    }
}

#[test]
fn an_explicit_epoll_needs_no_io_uring_at_all() {
    let server = Server::start_configured(&["--backend", "epoll", "--threads", "1"], |cmd| {
        Filter::refuse_io_uring(libc::EPERM).apply_to(cmd);
    });
    let log = server.log();
    assert!(
        !log.contains("io_uring"),
        "epoll was asked for, yet io_uring was tried: {log}"
    );
    let echoed = ping_pong(server.addr(), 5, 5, 100);
    assert_eq!(server.stop().stat("bytes_echoed"), echoed);
}
