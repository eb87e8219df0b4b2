//! The ticked open loop's receive path: each connection's echoes are read here, once per tick,
//! with the kernel's arrival time (`SO_TIMESTAMPNS`), instead of by the backend's receive.
//!
//! The loop sleeps between ticks and is not woken by echoes; reaping them a tick later would
//! add up to a tick to every latency. The kernel stamps each segment as it arrives, so an
//! echo's latency runs from its tick (the time it was scheduled to go out) to its arrival,
//! whenever the loop reads it. Reads take one message at a time (the stamp is that of the
//! last segment read); segments TCP merged while they waited carry the later arrival, so a
//! latency is never understated (see [`echoport_io::rxstamp`]).

use echoport_core::{Backend, OpError, Token};

use super::conn::{Meters, check_echo};
use super::{Failure, Worker, classify};

/// The ready set and the read buffer of the stamped receive path.
pub(super) struct Stamped {
    #[cfg(target_os = "linux")]
    set: echoport_io::rxstamp::ReadySet,
    ready: Vec<u64>,
    buf: Vec<u8>,
    /// Reads that came without a stamp (timed when read instead: pessimistic).
    pub(super) unstamped: u64,
}

impl Stamped {
    /// The receive path, or why this platform or process cannot have it.
    pub(super) fn new() -> std::io::Result<Stamped> {
        Ok(Stamped {
            #[cfg(target_os = "linux")]
            set: echoport_io::rxstamp::ReadySet::new()?,
            ready: Vec::with_capacity(1024),
            buf: vec![0; 64 * 1024],
            unstamped: 0,
        })
    }
}

fn key(t: Token) -> u64 {
    ((t.generation as u64) << 32) | t.id as u64
}

fn token(key: u64) -> Token {
    Token::new(key as u32, (key >> 32) as u32)
}

impl<B: Backend> Worker<B> {
    /// Takes over the receiving of a new connection's stream; false when it cannot (the
    /// backend's receive is used instead).
    #[cfg(target_os = "linux")]
    pub(super) fn watch(&mut self, token: Token, fd: i32) -> bool {
        let Some(st) = self.stamped.as_mut() else {
            return false;
        };
        let ok = echoport_io::rxstamp::enable(fd).and_then(|()| st.set.add(fd, key(token)));
        if let Err(e) = &ok {
            tracing::warn!(error = %e, "kernel receive stamps refused; this connection's echoes are timed when reaped");
        }
        ok.is_ok()
    }

    /// Stops reading a connection that is closing (before its descriptor is closed).
    pub(super) fn unwatch(&mut self, fd: Option<i32>) {
        #[cfg(target_os = "linux")]
        if let (Some(st), Some(fd)) = (self.stamped.as_ref(), fd) {
            st.set.remove(fd);
        }
        #[cfg(not(target_os = "linux"))]
        let _ = fd;
    }

    /// Reads every echo that arrived since the last tick, timed by its arrival. `now` is
    /// the loop's clock (ns since the start), read just before.
    pub(super) fn reap_stamped(&mut self, now: u64) {
        let Some(st) = self.stamped.as_mut() else {
            return;
        };
        #[cfg(target_os = "linux")]
        {
            // Stamps are CLOCK_REALTIME; the loop runs on the monotonic clock since its start.
            let offset = echoport_io::rxstamp::realtime_ns().saturating_sub(now);
            st.ready.clear();
            if let Err(e) = st.set.poll(&mut st.ready) {
                tracing::warn!(error = %e, "polling the receive set failed");
                return;
            }
            let ready = std::mem::take(&mut st.ready);
            let mut buf = std::mem::take(&mut st.buf);
            for &k in &ready {
                self.read_conn(token(k), &mut buf, now, offset);
            }
            if let Some(st) = self.stamped.as_mut() {
                st.ready = ready;
                st.buf = buf;
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (st, now);
    }

    /// Reads a ready connection one message at a time while its messages keep arriving.
    #[cfg(target_os = "linux")]
    fn read_conn(&mut self, token: Token, buf: &mut [u8], now: u64, offset: u64) {
        use echoport_io::rxstamp::{Rx, recv};
        loop {
            let Some(c) = self.conns.get_mut(token) else {
                return;
            };
            let Some(fd) = c.rx_fd.filter(|_| !c.closing) else {
                return;
            };
            // The rest of the oldest message in flight; anything when nothing is owed (the
            // bytes are an excess echo, counted as such).
            let want = c
                .queue
                .front()
                .filter(|_| c.owed() > 0)
                .map_or(buf.len(), |m| (m.len - c.recv_off) as usize)
                .min(buf.len());
            let more_owed = c.owed() > want as u64;
            let scheduled = c.queue.front().map_or(0, |m| m.t);
            match recv(fd, &mut buf[..want]) {
                Ok(Rx::Data { len, stamp_ns }) => {
                    if stamp_ns.is_none() {
                        if let Some(st) = self.stamped.as_mut() {
                            st.unstamped += 1;
                        }
                    }
                    // Never later than now; a read without a stamp, or with one before the
                    // message was even scheduled (the wall clock was stepped), is timed
                    // now: pessimistic, never flattering.
                    let at = stamp_ns
                        .map(|s| s.saturating_sub(offset).min(now))
                        .filter(|&at| at >= scheduled)
                        .unwrap_or(now);
                    let Worker {
                        conns,
                        tally,
                        intervals,
                        plan,
                        done_all,
                        bytes_all,
                        ..
                    } = self;
                    let c = conns.get_mut(token).expect("looked up above");
                    let mut m = Meters {
                        tally,
                        intervals,
                        plan,
                        done_all,
                        bytes_all,
                    };
                    let got = check_echo(c, &buf[..len], at, &mut m);
                    c.last_progress = now;
                    self.after_echo(token, got, now);
                    if len < want || !more_owed {
                        break;
                    }
                }
                Ok(Rx::Eof) => {
                    self.fail(token, Failure::Lost);
                    break;
                }
                Ok(Rx::WouldBlock) => break,
                Err(e) => {
                    let code = e.raw_os_error().unwrap_or(libc::EIO);
                    self.fail(token, classify(OpError::Os(code)));
                    break;
                }
            }
        }
        self.maybe_close(token);
    }
}
