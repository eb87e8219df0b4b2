//! systemd: sockets passed in by socket activation (through `systemd-socket-activate`, which
//! passes descriptors exactly as PID 1 does) are served as if bound by `--listen`, shared by
//! the threads; readiness (`READY=1`) and the drain (`STOPPING=1`) reach a notify socket
//! the test listens on (a path, and an abstract `@name`); the shipped units pass
//! `systemd-analyze verify`.

mod deploy_support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deploy_support::{BIN, find, require};
use rustix::process::{Pid, Signal, kill_process};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A notify socket the test listens on: a path in the temp dir, or an abstract name.
struct NotifySocket {
    sock: UnixDatagram,
    /// What NOTIFY_SOCKET says.
    env: String,
    path: Option<PathBuf>,
}

impl NotifySocket {
    fn at_path(tag: &str) -> NotifySocket {
        let path =
            std::env::temp_dir().join(format!("echoport-notify-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        NotifySocket {
            sock,
            env: path.to_str().unwrap().to_string(),
            path: Some(path),
        }
    }

    fn abstract_name(tag: &str) -> NotifySocket {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("echoport-notify-{tag}-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        NotifySocket {
            sock,
            env: format!("@{name}"),
            path: None,
        }
    }

    /// The next message, within 20 s.
    fn recv(&self, waiting_for: &str) -> String {
        self.sock
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = self
            .sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notify message ({waiting_for}) within 20 s: {e}"));
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `systemd-socket-activate` running `echoport serve`, its stderr collected.
struct Activated {
    child: Option<Child>,
    log: Arc<Mutex<String>>,
}

impl Activated {
    /// `activate_args` for systemd-socket-activate, `serve_args` for `echoport serve`.
    fn start(activate_args: &[String], notify: &NotifySocket, serve_args: &[&str]) -> Activated {
        let activate = require("systemd-socket-activate", "systemd");
        let (child, log) = echoport_testkit::child::spawn_logged(
            Command::new(activate)
                .args(activate_args)
                .arg(format!("--setenv=NOTIFY_SOCKET={}", notify.env))
                .arg(BIN)
                .args(["serve", "--shutdown-timeout", "5"])
                .args(serve_args),
        );
        Activated {
            child: Some(child),
            log,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the activator listens (it says so on stderr).
    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log().contains("Listening on") {
            assert!(
                Instant::now() < deadline,
                "systemd-socket-activate did not listen:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM (the activator exec'd echoport, so the pid is the server's), then the exit.
    fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        kill_process(Pid::from_child(&child), Signal::TERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!("the server did not stop within 20 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn echo_on(s: &mut TcpStream, msg: &[u8]) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, msg);
}

#[test]
fn passed_tcp_sockets_are_shared_by_the_threads_with_ready_and_stopping() {
    let port = free_port();
    let notify = NotifySocket::at_path("tcp");
    let mut srv = Activated::start(
        &[
            format!("--listen=127.0.0.1:{port}"),
            "--fdname=echoport".into(),
        ],
        &notify,
        &["--threads", "2", "--backend", "io-uring"],
    );
    srv.wait_listening();
    // The first connection starts the server (as a .socket unit does).
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut first = TcpStream::connect(addr).unwrap();
    first.write_all(b"wake up").unwrap();
    let ready = notify.recv("READY=1");
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(
        ready.contains(&format!("STATUS=Serving TCP on 127.0.0.1:{port}")),
        "{ready}"
    );
    let mut got = [0u8; 7];
    first
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    first.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"wake up");
    // Many connections at once, so that both threads' duplicates take some.
    let mut conns: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(addr).unwrap()).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        echo_on(c, format!("connection {i}").as_bytes());
    }
    let log = srv.log();
    for want in [
        "TCP socket passed in by systemd",
        "fd 3 (echoport)",
        "listener=shared",
        &format!("listening on 127.0.0.1:{port}"),
    ] {
        assert!(log.contains(want), "no {want:?} in:\n{log}");
    }
    drop(conns);
    first.shutdown(Shutdown::Write).unwrap();
    let status = srv.stop();
    let stopping = notify.recv("STOPPING=1");
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    assert!(status.success(), "exit {status}:\n{}", srv.log());
    let log = srv.log();
    let stopped = log
        .lines()
        .find(|l| l.contains(" stopped "))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(stopped.contains("accepted=41 "), "{stopped}");
    // Both threads served the one passed socket (a duplicate each); which of them takes a
    // connection is the kernel's choice (docs/ARCHITECTURE.md, shared listeners).
    let per_thread = stopped.split("accepted_per_thread=").nth(1).unwrap();
    assert_eq!(per_thread.split(',').count(), 2, "{stopped}");
    assert!(!log.contains("deadline passed"), "{log}");
}

#[test]
fn passed_udp_sockets_are_echoed_and_an_abstract_notify_socket_works() {
    let port = {
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        u.local_addr().unwrap().port()
    };
    let notify = NotifySocket::abstract_name("udp");
    let mut srv = Activated::start(
        &["--datagram".into(), format!("--listen=127.0.0.1:{port}")],
        &notify,
        &["--threads", "1"],
    );
    srv.wait_listening();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    client.send_to(b"first datagram", to).unwrap();
    let ready = notify.recv("READY=1");
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(
        ready.contains(&format!("UDP on 127.0.0.1:{port}")),
        "{ready}"
    );
    let mut buf = [0u8; 64];
    let (n, _) = client
        .recv_from(&mut buf)
        .expect("the datagram that started the server, echoed");
    assert_eq!(&buf[..n], b"first datagram");
    for i in 0..5u8 {
        client.send_to(&[i; 100], to).unwrap();
        let (n, _) = client
            .recv_from(&mut buf[..])
            .map(|(n, a)| (n.min(64), a))
            .unwrap();
        assert!(buf[..n].iter().all(|&b| b == i));
    }
    let status = srv.stop();
    assert!(notify.recv("STOPPING=1").contains("STOPPING=1"));
    assert!(status.success(), "exit {status}:\n{}", srv.log());
    let log = srv.log();
    assert!(log.contains("UDP socket passed in by systemd"), "{log}");
    assert!(log.contains("udp_echoed=6 "), "{log}");
}

#[test]
fn listen_flags_do_not_mix_with_passed_sockets() {
    for (flags, want) in [
        (
            &["--listen", "127.0.0.1:0"][..],
            "--listen: systemd passed 1 socket(s) in",
        ),
        (
            &["--listener", "reuseport"][..],
            "--listener reuseport: a socket passed in by systemd",
        ),
    ] {
        let port = free_port();
        let notify = NotifySocket::at_path("mix");
        let mut srv = Activated::start(&[format!("--listen=127.0.0.1:{port}")], &notify, flags);
        srv.wait_listening();
        let _c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut child = srv.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "still running:\n{}", srv.log());
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(1), "{}", srv.log());
        std::thread::sleep(Duration::from_millis(100));
        let log = srv.log();
        let err: Vec<&str> = log
            .lines()
            .filter(|l| l.starts_with("echoport: error:"))
            .collect();
        assert_eq!(err.len(), 1, "{log}");
        assert!(err[0].contains(want), "{}", err[0]);
    }
}

/// The shipped units are valid (with ExecStart pointed at the binary under test, since
/// `systemd-analyze verify` checks that the command exists).
#[test]
fn the_shipped_units_verify() {
    let dist = concat!(env!("CARGO_MANIFEST_DIR"), "/../../dist/systemd");
    let service = std::fs::read_to_string(format!("{dist}/echoport.service")).unwrap();
    let socket = std::fs::read_to_string(format!("{dist}/echoport.socket")).unwrap();
    for want in [
        "Type=notify",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=",
        "MemoryDenyWriteExecute=yes",
        "io_uring_setup io_uring_enter io_uring_register",
        "LimitNOFILE=",
    ] {
        assert!(service.contains(want), "echoport.service lacks {want}");
    }
    for want in [
        "ListenStream=127.0.0.1:7",
        "ListenStream=[::1]:7",
        "Accept=no",
    ] {
        assert!(socket.contains(want), "echoport.socket lacks {want}");
    }
    // The drain must fit in the stop timeout: --shutdown-timeout + 2 s < TimeoutStopSec.
    let num = |text: &str, key: &str| -> f64 {
        let at = text.find(key).unwrap_or_else(|| panic!("no {key}")) + key.len();
        text[at..]
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .find(|s| !s.is_empty())
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(
        num(&service, "--shutdown-timeout ") + 2.0 < num(&service, "TimeoutStopSec="),
        "TimeoutStopSec too short for the drain"
    );

    let Some(analyze) = find("systemd-analyze") else {
        eprintln!(
            "systemd-analyze is missing: the units' syntax was NOT verified (only their contents)"
        );
        return;
    };
    let dir = std::env::temp_dir().join(format!("echoport-units-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("echoport.service"),
        service.replace("/usr/local/bin/echoport", BIN),
    )
    .unwrap();
    std::fs::write(dir.join("echoport.socket"), &socket).unwrap();
    let out = Command::new(analyze)
        .current_dir(&dir)
        .args(["verify", "./echoport.socket", "./echoport.service"])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify: {}\n{err}",
        out.status
    );
}
