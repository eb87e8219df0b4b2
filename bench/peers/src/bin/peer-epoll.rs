//! A plain single-threaded epoll echo loop, level-triggered and non-blocking: the readiness
//! floor. Reads up to 64 KiB when readable and writes it back; whatever does not fit in the
//! socket is kept and written when the socket is writable, and reading stops meanwhile.
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;

use rustix::event::epoll;

struct Conn {
    sock: TcpStream,
    out: Vec<u8>,
}

fn main() {
    let listener = TcpListener::bind(echoport_peers::addr()).unwrap();
    listener.set_nonblocking(true).unwrap();
    eprintln!("listening on {}", listener.local_addr().unwrap());
    let ep = epoll::create(epoll::CreateFlags::CLOEXEC).unwrap();
    epoll::add(&ep, listener.as_fd(), epoll::EventData::new_u64(u64::MAX), epoll::EventFlags::IN).unwrap();
    let mut conns: HashMap<u64, Conn> = HashMap::new();
    let mut next = 0u64;
    let mut buf = vec![0u8; 65536];
    let mut events = Vec::with_capacity(1024);
    loop {
        events.clear();
        let _ = epoll::wait(&ep, rustix::buffer::spare_capacity(&mut events), None);
        for ev in events.iter() {
            let (flags, data) = (ev.flags, ev.data);
            let key = data.u64();
            if key == u64::MAX {
                while let Ok((sock, _)) = listener.accept() {
                    sock.set_nonblocking(true).unwrap();
                    let _ = sock.set_nodelay(true);
                    epoll::add(&ep, sock.as_fd(), epoll::EventData::new_u64(next), epoll::EventFlags::IN).unwrap();
                    conns.insert(next, Conn { sock, out: Vec::new() });
                    next += 1;
                }
                continue;
            }
            let Some(c) = conns.get_mut(&key) else { continue };
            let mut close = false;
            if flags.contains(epoll::EventFlags::OUT) {
                match c.sock.write(&c.out) {
                    Ok(n) => {
                        c.out.drain(..n);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => close = true,
                }
                if !close && c.out.is_empty() {
                    epoll::modify(&ep, c.sock.as_fd(), epoll::EventData::new_u64(key), epoll::EventFlags::IN).unwrap();
                }
            } else {
                match c.sock.read(&mut buf) {
                    Ok(0) => close = true,
                    Ok(n) => match c.sock.write(&buf[..n]) {
                        Ok(w) if w == n => {}
                        Ok(w) => {
                            c.out.extend_from_slice(&buf[w..n]);
                            epoll::modify(&ep, c.sock.as_fd(), epoll::EventData::new_u64(key), epoll::EventFlags::OUT).unwrap();
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            c.out.extend_from_slice(&buf[..n]);
                            epoll::modify(&ep, c.sock.as_fd(), epoll::EventData::new_u64(key), epoll::EventFlags::OUT).unwrap();
                        }
                        Err(_) => close = true,
                    },
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => close = true,
                }
            }
            if close {
                if let Some(c) = conns.remove(&key) {
                    let _ = epoll::delete(&ep, c.sock.as_fd());
                }
            }
        }
    }
}
