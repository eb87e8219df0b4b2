//! A mixed, bounded, self-checking load for soak runs.
//!
//! Usage: `echoport-churn ADDR SECONDS [STEADY] [CHURNERS]`
//!
//! `STEADY` connections (default 50) each ping-pong messages of varying size for the whole
//! run, checking every byte; `CHURNERS` threads (default 4) open a connection, echo one
//! message, and close it (every fourth by reset), over and over. Prints one line of totals
//! and exits 1 if any byte differed or any connection failed unexpectedly.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: echoport-churn ADDR SECONDS [STEADY] [CHURNERS]");
        std::process::exit(2);
    }
    let addr: SocketAddr = args[0].parse().expect("ADDR");
    let secs: f64 = args[1].parse().expect("SECONDS");
    let steady: usize = args.get(2).map_or(50, |s| s.parse().expect("STEADY"));
    let churners: usize = args.get(3).map_or(4, |s| s.parse().expect("CHURNERS"));
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let echoes = Arc::new(AtomicU64::new(0));
    let cycles = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));

    let mut handles = Vec::new();
    for c in 0..steady {
        let (echoes, errors) = (echoes.clone(), errors.clone());
        handles.push(thread::spawn(move || {
            let run = || -> std::io::Result<()> {
                let mut s = TcpStream::connect(addr)?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut round = 0usize;
                let mut got = vec![0u8; 70_000];
                while Instant::now() < until {
                    let len = 1 + (c * 7919 + round * 104_729) % 65_536;
                    let msg: Vec<u8> = (0..len).map(|i| (i + c + round) as u8).collect();
                    s.write_all(&msg)?;
                    s.read_exact(&mut got[..len])?;
                    if got[..len] != msg[..] {
                        return Err(std::io::Error::other(format!(
                            "connection {c} round {round}: echo differs"
                        )));
                    }
                    echoes.fetch_add(1, Ordering::Relaxed);
                    round += 1;
                    thread::sleep(Duration::from_millis(5));
                }
                Ok(())
            };
            if let Err(e) = run() {
                eprintln!("steady connection {c}: {e}");
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in 0..churners {
        let (cycles, errors) = (cycles.clone(), errors.clone());
        handles.push(thread::spawn(move || {
            let mut n = 0u64;
            while Instant::now() < until {
                let once = || -> std::io::Result<()> {
                    let mut s = TcpStream::connect(addr)?;
                    s.set_read_timeout(Some(Duration::from_secs(10)))?;
                    let msg = format!("churn {t} {n}");
                    s.write_all(msg.as_bytes())?;
                    let mut got = vec![0u8; msg.len()];
                    s.read_exact(&mut got)?;
                    if got != msg.as_bytes() {
                        return Err(std::io::Error::other("churn echo differs"));
                    }
                    if n.is_multiple_of(4) {
                        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
                    }
                    Ok(())
                };
                if let Err(e) = once() {
                    eprintln!("churner {t} cycle {n}: {e}");
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
                cycles.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    let (e, c, err) = (
        echoes.load(Ordering::Relaxed),
        cycles.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
    );
    println!("churn: echoes={e} connect_cycles={c} errors={err}");
    std::process::exit(if err == 0 && e > 0 && c > 0 { 0 } else { 1 });
}
