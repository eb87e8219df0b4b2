//! The io_uring backend's drop path, the most delicate unsafe code of the backend: dropping a
//! ring with a receive, a send the peer never drains and the waker's read all still posted
//! must cancel them, wait for the kernel to let go, free the buffers and close the ring (its
//! registered descriptor given back), all well inside the drain's one-second bound.
//!
//! Also: rings give their registered descriptor back, and a plain descriptor is shut down
//! synchronously. Alone in its test binary: it counts the process's io_uring descriptors.
#![cfg(target_os = "linux")]

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use echoport_core::{Backend, Completion, Op, Submit, Token};
use echoport_io::pool::PoolConfig;
use echoport_io::uring::{Config, Uring};

/// The tests of this binary run one at a time: one of them counts the process's rings.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Descriptors of this process that are io_uring instances.
fn rings_open() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().contains("io_uring"))
        .count()
}

fn wait(b: &mut Uring, ms: u64) -> Vec<Completion> {
    let mut out = Vec::new();
    b.wait(&mut out, Some(Duration::from_millis(ms))).unwrap();
    out
}

#[test]
fn dropping_a_ring_with_operations_pending_cancels_drains_and_closes_it() {
    let _one = serial();
    let before = rings_open();
    let mut b = Uring::new(&Config {
        pool: PoolConfig {
            buf_size: 65536,
            buffers: 8,
            send_buffers: 4,
        },
        cq_entries: 256,
        sq_entries: 64,
        ..Default::default()
    })
    .expect("io_uring is required for this test (CI machines have it)");
    assert_eq!(rings_open(), before + 1, "the ring is open");
    // A connection whose peer never reads.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    socket2::SockRef::from(&peer)
        .set_recv_buffer_size(4096)
        .unwrap();
    let (mine, _) = l.accept().unwrap();
    let sock = b.adopt(mine).unwrap();
    let token = Token::new(1, 1);
    b.push(Op::Recv {
        token,
        sock,
        max: u32::MAX,
    });
    // Send until one send stays posted: the peer's window and our send buffer are full.
    let buf = b.alloc_buf().unwrap();
    let mut pending = false;
    for _ in 0..2000 {
        b.push(Op::Send {
            token,
            sock,
            buf,
            off: 0,
            len: 65536,
        });
        let done = wait(&mut b, 20)
            .iter()
            .any(|c| matches!(c, Completion::Send { .. }));
        if !done {
            pending = true;
            break;
        }
    }
    assert!(pending, "no send ever stayed posted: nothing was tested");
    (&peer).write_all(b"x").unwrap(); // data for the posted receive, delivered or not
    let t = Instant::now();
    drop(b);
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(900),
        "the drop took {took:?}: it gave up on the drain (and leaked) instead of finishing it"
    );
    assert_eq!(rings_open(), before, "the ring is closed after the drop");
}

#[test]
fn a_thread_can_open_and_drop_rings_without_running_out_of_registrations() {
    let _one = serial();
    // A thread may register at most 16 ring descriptors; a ring that kept its registration
    // after its drop (as the start-up probe's trial ring once did, for the life of the
    // process) would use one up for good.
    std::thread::spawn(|| {
        for i in 0..24 {
            let b = Uring::new(&Config {
                pool: PoolConfig {
                    buf_size: 4096,
                    buffers: 8,
                    send_buffers: 1,
                },
                cq_entries: 64,
                sq_entries: 16,
                ..Default::default()
            })
            .expect("io_uring is required for this test");
            assert!(
                b.describe().contains("registered-ring"),
                "ring {i} could not register its descriptor: an earlier one kept its slot"
            );
        }
    })
    .join()
    .unwrap();
}

#[test]
fn a_plain_descriptor_is_shut_down_at_once_not_behind_its_close() {
    let _one = serial();
    let mut b = Uring::new(&Config {
        fast_path: false,
        pool: PoolConfig {
            buf_size: 4096,
            buffers: 8,
            send_buffers: 1,
        },
        cq_entries: 64,
        sq_entries: 16,
        ..Default::default()
    })
    .expect("io_uring is required for this test");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (mine, _) = l.accept().unwrap();
    let sock = b.adopt(mine).unwrap();
    b.push(Op::Shutdown {
        token: Token::new(1, 1),
        sock,
    });
    // No wait, no submit: the peer already reads end of stream.
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut byte = [0u8; 1];
    use std::io::Read;
    assert_eq!(
        peer.read(&mut byte).expect("end of stream, not a timeout"),
        0,
        "the write side was shut down synchronously"
    );
    b.push(Op::Close {
        token: Token::new(1, 1),
        sock,
    });
    wait(&mut b, 10);
}
