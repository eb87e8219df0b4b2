//! Running helper processes from tests: wait with a deadline (and kill on it), and gather a
//! pipe's output on a thread of its own so a chatty child never blocks on a full pipe.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Waits for `child` at most `limit`; past it kills and reaps the child and panics naming
/// `what` (a test must not hang on a child that never ends).
pub fn wait_or_kill(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().expect("waiting for a child") {
            return st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reads `r` to its end on a new thread; the handle yields what was read.
pub fn collect(mut r: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

/// Appends `r`'s lines (each with its `\n`) to a shared log as they come, on a new thread,
/// so a test can look at a running child's stderr.
pub fn log_lines(r: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines().map_while(Result::ok) {
            let mut s = sink.lock().unwrap();
            s.push_str(&l);
            s.push('\n');
        }
    });
    log
}

/// Starts `cmd` with no stdin or stdout and its stderr gathered line by line into the
/// returned log ([`log_lines`]): how a test runs a daemon it watches.
pub fn spawn_logged(cmd: &mut std::process::Command) -> (Child, Arc<Mutex<String>>) {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
    let log = log_lines(child.stderr.take().expect("stderr is piped"));
    (child, log)
}
