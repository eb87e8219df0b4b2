//! The command line: help texts, start-up errors, and `echoport client`'s verdicts against
//! servers that misbehave on purpose (small fake servers written here).

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::Duration;

use common::{Server, run_bin};

const T: Duration = Duration::from_secs(30);

fn help(args: &[&str]) -> String {
    let (st, out, err) = run_bin(args, b"", T);
    assert!(
        st.success(),
        "`echoport {}` failed: {st}\n{err}",
        args.join(" ")
    );
    out
}

/// Whether a `--help` line introduces an option (`--flag ...` or `-f, --flag ...`), as
/// opposed to a list of possible values (`- name: ...`).
fn is_option_line(l: &str) -> bool {
    let t = l.trim_start();
    let b = t.as_bytes();
    t.starts_with("--")
        || (b.len() > 5
            && b[0] == b'-'
            && b[1].is_ascii_alphanumeric()
            && t[2..].starts_with(", --"))
}

/// The long flags named in the option lines of a `--help` text.
fn option_flags(help: &str) -> Vec<String> {
    help.lines()
        .filter(|l| is_option_line(l))
        .flat_map(|l| long_flags(l.split("  ").find(|p| !p.trim().is_empty()).unwrap_or("")))
        .collect()
}

/// Every `--word` in a text.
fn long_flags(text: &str) -> Vec<String> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(at) = text[i..].find("--").map(|k| k + i) {
        let mut end = at + 2;
        while end < b.len()
            && (b[end].is_ascii_lowercase() || b[end].is_ascii_digit() || b[end] == b'-')
        {
            end += 1;
        }
        let word = &text[at..end];
        let starts_word = at == 0 || !(b[at - 1].is_ascii_alphanumeric() || b[at - 1] == b'-');
        if starts_word && end > at + 2 && b[at + 2].is_ascii_lowercase() {
            out.push(word.trim_end_matches('-').to_string());
        }
        i = end.max(at + 2);
    }
    out
}

#[test]
fn help_explains_every_flag() {
    let top = help(&["--help"]);
    for word in ["serve", "client", "bench", "--log"] {
        assert!(top.contains(word), "`echoport --help` lacks {word}:\n{top}");
    }
    for cmd in ["serve", "client"] {
        let text = help(&[cmd, "--help"]);
        let lines: Vec<&str> = text.lines().collect();
        let mut n = 0;
        for (i, l) in lines.iter().enumerate() {
            if !is_option_line(l) {
                continue;
            }
            n += 1;
            // The explanation follows on the same line (short help) or on the next ones.
            let inline = l
                .trim()
                .split_once("  ")
                .map_or("", |(_, rest)| rest.trim());
            let next = lines.get(i + 1).copied().unwrap_or("");
            assert!(
                inline.len() > 10 || next.trim().len() > 10,
                "`echoport {cmd} --help`: {} has no explanation:\n{text}",
                l.trim()
            );
        }
        assert!(n >= 3, "`echoport {cmd} --help` lists no options:\n{text}");
    }
    let serve = help(&["serve", "--help"]);
    for flag in [
        "--listen",
        "--threads",
        "--cpus",
        "--backend",
        "--shutdown-timeout",
        "--max-pending",
        "--max-connections",
        "--buf-size",
        "--buffers",
        "--no-fast-path",
    ] {
        assert!(
            option_flags(&serve).iter().any(|f| f == flag),
            "`echoport serve --help` lacks {flag}:\n{serve}"
        );
    }
    for text in ["io-uring", "epoll", "127.0.0.1:7007"] {
        assert!(
            serve.contains(text),
            "`echoport serve --help` lacks {text}:\n{serve}"
        );
    }
    let client = help(&["client", "--help"]);
    for text in [
        "ADDR",
        "--message",
        "--count",
        "--timeout",
        "127.0.0.1:7007",
        "Exit status",
    ] {
        assert!(
            client.contains(text),
            "`echoport client --help` lacks {text}:\n{client}"
        );
    }
}

/// The README documents every flag of `serve` and `client`, and names no flag that does not
/// exist (cargo's own excepted).
#[test]
fn readme_documents_the_flags_that_exist() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md at the workspace root");
    let mut real: Vec<String> = vec![];
    for cmd in [
        &["--help"][..],
        &["serve", "--help"],
        &["client", "--help"],
        &["bench", "--help"],
    ] {
        real.extend(option_flags(&help(cmd)));
    }
    for cmd in ["serve", "client"] {
        for flag in option_flags(&help(&[cmd, "--help"])) {
            if flag == "--help" || flag == "--version" {
                continue;
            }
            assert!(
                long_flags(&readme).contains(&flag),
                "README.md does not document `echoport {cmd} {flag}`"
            );
        }
    }
    let cargo_flags = [
        "--release",
        "--workspace",
        "--all",
        "--check",
        "--all-targets",
    ];
    for flag in long_flags(&readme) {
        assert!(
            real.contains(&flag) || cargo_flags.contains(&flag.as_str()),
            "README.md names {flag}, which no `--help` lists"
        );
    }
}

/// Runs `echoport ARGS`, expecting exit code 1 and exactly one line on stderr containing
/// every one of `words`.
fn expect_one_line_error(args: &[&str], words: &[&str]) -> String {
    let (st, out, err) = run_bin(args, b"", T);
    assert_eq!(
        st.code(),
        Some(1),
        "`echoport {}` should exit 1; stdout:\n{out}\nstderr:\n{err}",
        args.join(" ")
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "`echoport {}`: expected a one-line error, got:\n{err}",
        args.join(" ")
    );
    for w in words {
        assert!(
            lines[0].contains(w),
            "the error should mention {w:?}: {}",
            lines[0]
        );
    }
    lines[0].to_string()
}

#[test]
fn port_in_use_is_a_one_line_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    expect_one_line_error(
        &["serve", "--listen", &addr],
        &["echoport: error:", "cannot listen on", &addr, "in use"],
    );
    // Also when it is the second of two addresses: the first must not stay bound.
    expect_one_line_error(
        &["serve", "--listen", "127.0.0.1:0", "--listen", &addr],
        &["cannot listen on", &addr],
    );
}

#[test]
fn bad_addresses_are_one_line_errors() {
    // Only malformed ones: a well-formed host name would go to the resolver (no network
    // traffic beyond loopback in tests).
    for bad in ["nonsense", "127.0.0.1", "127.0.0.1:99999", "127.0.0.1:port"] {
        expect_one_line_error(&["serve", "--listen", bad], &["echoport: error:", bad]);
    }
}

#[test]
fn serves_ipv4_and_ipv6_loopback_together() {
    let server = Server::start(&["--listen", "127.0.0.1:0", "--listen", "[::1]:0"]);
    let log = server.wait_log("second `listening on` line", |l| {
        l.matches("listening on").count() >= 2
    });
    let addrs: Vec<std::net::SocketAddr> = log
        .lines()
        .filter_map(|l| l.split("listening on ").nth(1))
        .map(|a| a.trim().parse().unwrap())
        .collect();
    assert_eq!(addrs.len(), 2, "two listening lines expected:\n{log}");
    assert!(addrs[0].is_ipv4() && addrs[1].is_ipv6(), "{addrs:?}");
    for a in addrs {
        let mut s = TcpStream::connect(a).unwrap();
        s.write_all(b"over both families").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"over both families", "echo over {a}");
    }
    server.stop().assert_clean();
}

#[test]
fn client_refused_connection_is_a_one_line_error() {
    // A port that was just free: bind, note it, release it.
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    expect_one_line_error(
        &["client", &addr, "--message", "hi"],
        &["echoport: error:", "cannot connect", &addr],
    );
    expect_one_line_error(&["client", "nonsense", "--message", "hi"], &["bad address"]);
}

/// A one-connection fake server: reads what the client sends and answers via `respond`
/// (given all bytes received so far); returns when `respond` says to stop.
fn fake_server(
    respond: impl Fn(&[u8], &mut TcpStream) -> bool + Send + 'static,
) -> (String, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(k) => seen.extend_from_slice(&buf[..k]),
            }
            if !respond(&seen, &mut s) {
                return;
            }
        }
    });
    (addr, h)
}

#[test]
fn client_fails_when_the_echo_differs() {
    let (addr, h) = fake_server(|seen, s| {
        if seen.ends_with(b"\n") {
            let mut bad = seen.to_vec();
            bad[1] ^= 0x20; // "hello" comes back as "hEllo"
            s.write_all(&bad).unwrap();
            return false;
        }
        true
    });
    let line = expect_one_line_error(
        &["client", &addr, "--message", "hello"],
        &["differs", "byte 1"],
    );
    assert!(line.contains("hEllo"), "{line}");
    h.join().unwrap();
}

#[test]
fn client_fails_when_the_connection_ends_early() {
    let (addr, h) = fake_server(|seen, s| {
        if seen.ends_with(b"\n") {
            s.write_all(&seen[..3]).unwrap(); // part of the echo, then close
            return false;
        }
        true
    });
    expect_one_line_error(
        &["client", &addr, "--message", "hello"],
        &["closed the connection", "3 of 6 bytes"],
    );
    h.join().unwrap();
}

#[test]
fn client_fails_on_bytes_after_the_last_echo() {
    let (addr, h) = fake_server(|seen, s| {
        if seen.ends_with(b"\n") {
            let mut more = seen.to_vec();
            more.extend_from_slice(b"surprise");
            s.write_all(&more).unwrap();
            return false;
        }
        true
    });
    expect_one_line_error(
        &["client", &addr, "--message", "hello"],
        &["unexpected", "surprise"],
    );
    h.join().unwrap();
}

#[test]
fn client_fails_when_no_echo_comes() {
    let (addr, h) = fake_server(|_, _| true); // reads, never answers
    expect_one_line_error(
        &["client", &addr, "--message", "hello", "--timeout", "0.3"],
        &["no echo within the timeout"],
    );
    h.join().unwrap();
}

/// Every size and count that cannot work is refused before anything starts: exit status 1,
/// one line naming the flag and its valid range.
#[test]
fn bad_sizes_and_counts_are_one_line_errors_naming_the_flag() {
    for (flag, value, range) in [
        ("--buffers", "0", "1 to 32768"),
        ("--buffers", "65536", "1 to 32768"),
        ("--buf-size", "0", "64 to 16777216"),
        ("--buf-size", "1", "64 to 16777216"),
        ("--max-pending", "0", "1 to 4294967295"),
        ("--cq-entries", "1", "256 to 65536"),
        ("--cq-entries", "255", "256 to 65536"),
        ("--threads", "0", "1 to 1024"),
        ("--max-connections", "0", "must be 1 to"),
        ("--max-connections-per-ip", "0", "must be 1 to"),
        ("--shutdown-timeout", "-1", "0 or more"),
        ("--shutdown-timeout", "NaN", "0 or more"),
        ("--idle-timeout", "-5", "0 or more"),
        ("--udp-rate", "0", "positive"),
    ] {
        // `--flag=VALUE`, so that clap takes "-1" as a value, not a flag.
        expect_one_line_error(
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                &format!("{flag}={value}"),
            ],
            &["echoport: error:", &format!("{flag} {value}"), range],
        );
    }
    expect_one_line_error(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--buffers",
            "32768",
            "--buf-size",
            "1048576",
        ],
        &["--buffers 32768 x --buf-size 1048576", "at most 4294967296"],
    );
}

/// The start-up line prints the values in effect, says what it rounded, and the rounded
/// values serve.
#[test]
fn the_start_up_line_prints_the_values_in_effect_and_what_was_rounded() {
    for backend in common::BACKENDS {
        let server = Server::on(
            backend,
            &[
                "--buffers",
                "3",
                "--cq-entries",
                "300",
                "--buf-size",
                "4096",
            ],
        );
        let log = server.wait_log("start-up line", |l| l.contains("echoport serving"));
        let line = log
            .lines()
            .find(|l| l.contains("echoport serving"))
            .unwrap();
        for want in [
            "buffers=4 ",
            "cq_entries=512 ",
            "buf_size=4096 ",
            "max_pending=65536 ",
            "shutdown_timeout=5s ",
            "idle_timeout=300s ",
            "write_timeout=30s ",
            "--buffers 3 rounded up to 4 (a power of two)",
            "--cq-entries 300 rounded up to 512 (a power of two)",
            "max_connections=",
            "max_connections_from=",
            "nofile=",
        ] {
            assert!(line.contains(want), "{backend}: no {want:?} in: {line}");
        }
        assert_eq!(common::ping_pong(server.addr(), 8, 20, 3000), 8 * 20 * 3000);
        server.stop().assert_clean();
    }
    let server = Server::start(&[]);
    let log = server.wait_log("start-up line", |l| l.contains("echoport serving"));
    assert!(!log.contains("adjusted="), "nothing was rounded:\n{log}");
}

/// The soft descriptor limit is raised to the hard limit at start-up, and the connection
/// capacity derived from it is logged (under `prlimit --nofile=256:4096`).
#[test]
fn the_descriptor_limit_is_raised_and_the_capacity_logged() {
    for (backend, capacity, from) in [
        (
            "epoll",
            "max_connections=4032 ",
            "descriptor limit 4096 less 64 in reserve",
        ),
        // Each ring's direct-descriptor table holds the descriptor limit, and one thread
        // adds rings as they fill: the machine (fs.file-max or memory) bounds the capacity,
        // not the descriptor limit.
        ("io-uring", "ring_table=4096 ", "rings_per_thread="),
    ] {
        let server = Server::start_wrapped(
            &["prlimit", "--nofile=256:4096", "--"],
            &["--backend", backend, "--threads", "1"],
        );
        let log = server.wait_log("start-up line", |l| l.contains("echoport serving"));
        let line = log
            .lines()
            .find(|l| l.contains("echoport serving"))
            .unwrap();
        for want in ["nofile=4096 ", capacity, from] {
            assert!(line.contains(want), "{backend}: no {want:?} in: {line}");
        }
        if backend == "io-uring" {
            let max: u64 = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("max_connections="))
                .and_then(|v| v.parse().ok())
                .unwrap();
            assert!(max > 4096, "one thread holds more than one table: {line}");
            assert!(
                line.contains("max_connections_from=fs.file-max")
                    || line.contains("max_connections_from=memory"),
                "the machine's bound: {line}"
            );
        }
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).unwrap();
        let open = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        assert!(
            open.split_whitespace().filter(|w| *w == "4096").count() == 2,
            "{backend}: soft limit not raised: {open}"
        );
        server.stop().assert_clean();
    }
}

/// `--shutdown-timeout` too large for the clock (or `inf`) waits forever for the last
/// connection instead of panicking at stop; the connection sees the drain (its echo, then
/// end of stream) and the server exits cleanly once it closes.
fn a_huge_shutdown_timeout_waits_forever(backend: &str) {
    for timeout in ["1e12", "1e300", "inf"] {
        let mut server = Server::on(backend, &["--shutdown-timeout", timeout]);
        let mut c = server.connect();
        common::ping(&mut c, b"before the stop");
        server.signal(rustix::process::Signal::TERM);
        server.wait_log("the stop", |l| l.contains("stopping"));
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
        assert!(
            rest.is_empty(),
            "{backend} {timeout}: {rest:?} after the echo"
        );
        std::thread::sleep(Duration::from_millis(1500));
        server.assert_running();
        let t0 = std::time::Instant::now();
        drop(c);
        let stopped = server.finish(t0, Duration::from_secs(10));
        stopped.assert_clean();
        let line = stopped
            .log
            .lines()
            .find(|l| l.contains("echoport serving"))
            .unwrap()
            .to_string();
        let want = if timeout == "1e12" {
            "shutdown_timeout=1000000000000s"
        } else {
            "shutdown_timeout=forever"
        };
        assert!(line.contains(want), "{backend} {timeout}: {line}");
    }
}

every_backend! { a_huge_shutdown_timeout_waits_forever }
