//! The command line: help texts, start-up errors, and `echoport client`'s verdicts against
//! servers that misbehave on purpose (small fake servers written here).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::Duration;

use common::{run_bin, Server};

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
