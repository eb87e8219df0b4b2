//! The shipped deployment files say what works: the container's command and health probe and
//! the Kubernetes manifest's args and readiness probe are run against a real server (with
//! the wildcard addresses moved to loopback), and every echoport flag docs/DEPLOY.md names
//! exists. (Building the image needs a container runtime, applying the manifest a cluster:
//! neither is done here.)

mod deploy_support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use deploy_support::{BIN, metrics_addr, scrape};
use rustix::process::{Pid, Signal, kill_process};
use serde_json::Value;

fn dist(path: &str) -> String {
    let p = format!("{}/../../{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// The JSON array that follows `key` on some line (`CMD [...]`, `args: [...]`).
fn array_after(text: &str, line_start: &str, key: &str) -> Vec<String> {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(line_start) && l.contains(key))
        .unwrap_or_else(|| panic!("no line starting {line_start:?} with {key:?}"));
    let json = &line[line.find(key).unwrap() + key.len()..];
    let v: Vec<Value> = serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("{line}: {e}"));
    v.into_iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// `echoport ARGS` with the wildcard addresses moved to loopback port 0, until its
/// addresses are known. Returns the child, the echo address and the metrics address.
fn start(args: &[String]) -> (Child, SocketAddr, SocketAddr) {
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            if a.starts_with("0.0.0.0:") {
                "127.0.0.1:0".into()
            } else {
                a.clone()
            }
        })
        .collect();
    let mut child = Command::new(BIN)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut log = String::new();
    let addr = loop {
        let l = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("`echoport {}` did not listen:\n{log}", args.join(" ")));
        log.push_str(&l);
        log.push('\n');
        if let Some(rest) = l.split("listening on ").nth(1) {
            let a: String = rest
                .chars()
                .take_while(|c| c.is_ascii_hexdigit() || ".:[]".contains(*c))
                .collect();
            break a.parse::<SocketAddr>().unwrap();
        }
    };
    (child, addr, metrics_addr(&log))
}

fn stop(mut child: Child) {
    kill_process(Pid::from_child(&child), Signal::TERM).unwrap();
    let st = child.wait().unwrap();
    assert!(st.success(), "exit {st}");
}

/// A probe command, run against `addr` (the image's path to the binary is the test's).
fn probe(cmd: &[String], addr: SocketAddr) {
    assert!(cmd[0].ends_with("/echoport"), "{cmd:?}");
    let args: Vec<String> = cmd[1..]
        .iter()
        .map(|a| {
            if a == "127.0.0.1:7007" {
                addr.to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    let out = Command::new(BIN)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "probe {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_container_command_serves_and_its_health_check_passes() {
    let file = dist("dist/Containerfile");
    let cmd = array_after(&file, "CMD ", "CMD ");
    assert_eq!(cmd[0], "serve");
    assert!(
        cmd.contains(&"0.0.0.0:7007".to_string()),
        "{cmd:?}: 0.0.0.0 inside the container"
    );
    let health = array_after(&file, "HEALTHCHECK", "CMD ");
    let (child, addr, maddr) = start(&cmd);
    probe(&health, addr);
    assert_eq!(scrape(maddr).status, 200);
    stop(child);
}

#[test]
fn the_kubernetes_args_serve_and_the_readiness_probe_passes() {
    let file = dist("dist/k8s/echoport.yaml");
    let args = array_after(&file, "args:", "args:");
    let ready = array_after(&file, "command:", "command:");
    let (child, addr, maddr) = start(&args);
    probe(&ready, addr);
    let a = scrape(maddr);
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["content-type"], "text/plain; version=0.0.4");
    stop(child);
    let grace = |key: &str| -> u64 {
        let l = file.lines().find(|l| l.contains(key)).unwrap();
        l.split(':').nth(1).unwrap().trim().parse().unwrap()
    };
    let shutdown: u64 = args[args.iter().position(|a| a == "--shutdown-timeout").unwrap() + 1]
        .parse()
        .unwrap();
    assert!(
        grace("terminationGracePeriodSeconds") > shutdown + 2 + grace("seconds:"),
        "the grace period must cover the preStop pause and the drain"
    );
}

#[test]
fn the_deploy_guide_names_only_flags_that_exist() {
    let doc = dist("docs/DEPLOY.md");
    let mut checked = 0;
    for cmd in ["serve", "client", "bench"] {
        let out = Command::new(BIN).args([cmd, "--help"]).output().unwrap();
        let help = String::from_utf8(out.stdout).unwrap();
        let phrase = format!("echoport {cmd}");
        for line in doc.lines().filter(|l| l.contains(&phrase)) {
            let rest = &line[line.find(&phrase).unwrap()..];
            for word in rest.split(|c: char| c.is_whitespace() || c == '`' || c == ',' || c == ')')
            {
                if let Some(flag) = word.strip_prefix("--").filter(|f| !f.is_empty()) {
                    let flag = flag.split('=').next().unwrap();
                    assert!(
                        help.contains(&format!("--{flag}")),
                        "docs/DEPLOY.md: `echoport {cmd} --{flag}` does not exist"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 5, "only {checked} flags found in docs/DEPLOY.md");
}
