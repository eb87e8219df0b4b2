//! The load generator past its descriptor limit: with more connections than the process may
//! open (RLIMIT_NOFILE, lowered here to 1,024 for the bench process alone), the io_uring
//! client holds them as direct descriptors and every echo still comes back exact; what
//! cannot work that way (the ticked loop's receive stamps, the epoll backend) is refused
//! before any connection is made, naming what to change.

mod bench_common;
mod common;

use std::process::{Command, Output, Stdio};

use bench_common::*;
use common::Server;

const LIMIT: u32 = 1024;
const CONNS: usize = 3000;

/// `echoport bench ADDR --json ARGS` with its descriptor limit lowered to [`LIMIT`] (soft and
/// hard: it cannot raise it back).
fn bench_limited(addr: std::net::SocketAddr, args: &[&str]) -> Output {
    let mut script = format!("ulimit -n {LIMIT} && exec {BIN} bench {addr} --json");
    for a in args {
        script.push(' ');
        script.push_str(a);
    }
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .output()
        .expect("run echoport bench under sh")
}

#[test]
fn more_connections_than_descriptors_are_held_as_direct_descriptors_and_all_echo() {
    let server = Server::start(&[]);
    let conns = CONNS.to_string();
    for load in [&["-r", "3000"][..], &["--pipeline", "1"][..]] {
        let mut args = vec![
            "-c",
            &conns,
            "-d",
            "1500ms",
            "--warmup",
            "1s",
            "--threads",
            "2",
        ];
        args.extend_from_slice(load);
        let out = bench_limited(server.addr(), &args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(0), "{load:?}: {err}");
        let d = doc(&out);
        let r = &d["runs"][0];
        assert!(
            d["backend"]
                .as_str()
                .unwrap()
                .contains("direct-fds (adopted)"),
            "{}",
            d["backend"]
        );
        assert_eq!(
            at(r, "connections.established").as_u64(),
            Some(CONNS as u64),
            "{load:?}: {r:#}"
        );
        assert_eq!(at(r, "connections.failed").as_u64(), Some(0), "{r:#}");
        assert_eq!(at(r, "errors.total").as_u64(), Some(0), "{r:#}");
        let messages = num(r, "messages") as u64;
        assert!(messages > 1000, "{load:?}: {r:#}");
        assert_eq!(
            num(r, "sent") as u64 + num(r, "sent_late") as u64,
            messages,
            "{load:?}: every measured message came back"
        );
        if load[0] == "-r" {
            assert!(
                err.contains("held as io_uring direct descriptors"),
                "the switch from the ticked loop is said: {err}"
            );
        }
    }
    let stopped = server.stop();
    stopped.assert_clean();
    assert!(
        stopped.log.contains(&format!("accepted={}", 2 * CONNS)),
        "the server saw every connection of both runs: {}",
        stopped.log
    );
}

#[test]
fn what_needs_plain_descriptors_is_refused_before_connecting_and_says_what_to_change() {
    let server = Server::start(&[]);
    let conns = CONNS.to_string();
    let cases: [(&[&str], &str); 3] = [
        (&["-r", "1000", "--tick", "100us"], "use --tick 0"),
        (&["--backend", "epoll"], "use the io_uring backend"),
        (&["--udp"], "split the flows"),
    ];
    for (extra, hint) in cases {
        let mut args = vec!["-c", &conns, "-d", "1s"];
        args.extend_from_slice(extra);
        let out = bench_limited(server.addr(), &args);
        let err = stderr(&out);
        assert_ne!(out.status.code(), Some(0), "{extra:?} must fail: {err}");
        assert!(err.contains(hint), "{extra:?}: {err}");
        assert!(
            err.contains("RLIMIT_NOFILE"),
            "{extra:?} names the limit: {err}"
        );
    }
    let stopped = server.stop();
    assert!(
        stopped.log.contains("accepted=0 "),
        "nothing was connected: {}",
        stopped.log
    );
}
