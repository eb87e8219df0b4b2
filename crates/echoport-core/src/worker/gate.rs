//! The PROXY protocol header gate (`serve --proxy-protocol`): the worker's part of a
//! connection's life between accept and its header.
//!
//! ```text
//! accept ──▶ peer outside --proxy-from? close before reading anything (counted)
//!        ──▶ take a place in the server-wide budget (not the peer's per-IP one: it is the
//!            balancer), file the header deadline (--proxy-timeout after accept)
//! receive ──▶ parse the bytes so far (in place when nothing is kept yet), give the buffer back
//!   incomplete ──▶ keep the bytes (at most MAX_HEADER_LEN), receive on
//!   done ──▶ charge the client the header names (or the peer, for LOCAL and UNKNOWN) per
//!            IP; echo what follows the header from its offset in the same buffer
//!   refused ──▶ close (counted by reason)
//! end of stream, error, deadline ──▶ close (counted)
//! ```
//!
//! `Conn` never sees the header: it is handed only what follows it. A connection waiting here
//! holds no receive buffer between receives, so a thousand slow headers cannot drain the
//! pool; what it keeps is its own copy of the header's first bytes, allocated only when the
//! header came cut short.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::op::{BufId, OpError, Received, Socket};
use crate::proxy::{self, Cidr, Command, Header, MAX_HEADER_LEN, Parsed, ProxyError};
use crate::token::Token;

use super::{Worker, ticks};

/// How a worker's listeners speak the PROXY protocol (every TCP connection starts with a v1
/// or v2 header).
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Peers allowed to send a header (the balancers); every other peer is closed at accept.
    pub from: Vec<Cidr>,
    /// How long after accept the header must be complete (not extended by bytes arriving).
    pub timeout: Duration,
}

/// One connection still waiting for its header.
struct Pending {
    /// The peer that connected (the balancer).
    peer: IpAddr,
    /// Tick by which the header must be complete.
    deadline: u32,
    /// The header's bytes so far, when it came in more than one receive (empty until then).
    acc: Vec<u8>,
}

/// The gate's state in one worker.
pub(super) struct Gate {
    cfg: ProxyConfig,
    /// `cfg.timeout` in ticks.
    pub(super) ticks: u32,
    pending: HashMap<Token, Pending>,
    /// When a refusal was last logged (at most one a second).
    last_log: Option<Instant>,
}

impl Gate {
    pub(super) fn new(cfg: ProxyConfig) -> Gate {
        Gate {
            ticks: ticks(Some(cfg.timeout)).unwrap_or(1),
            cfg,
            pending: HashMap::new(),
            last_log: None,
        }
    }

    /// The header deadline of `token`, while it waits for its header.
    pub(super) fn deadline(&self, token: Token) -> Option<u32> {
        self.pending.get(&token).map(|p| p.deadline)
    }

    /// Forgets a connection (closed, or past the gate).
    pub(super) fn forget(&mut self, token: Token) {
        self.pending.remove(&token);
    }

    /// Connections waiting for their header.
    pub(super) fn waiting(&self) -> usize {
        self.pending.len()
    }
}

impl<B: Backend> Worker<B> {
    /// True when `token` is still waiting for its header.
    pub(super) fn gated(&self, token: Token) -> bool {
        self.gate
            .as_ref()
            .is_some_and(|g| g.pending.contains_key(&token))
    }

    /// Admits an accepted socket on a PROXY listener: trusted peers only, charged to the
    /// server-wide budget alone until their header names the client.
    pub(super) fn admit_proxied(&mut self, sock: Socket) {
        let gate = self.gate.as_ref().expect("a PROXY listener");
        let peer = self.backend.peer_ip(sock);
        let trusted = peer.filter(|&ip| gate.cfg.from.iter().any(|c| c.contains(ip)));
        let Some(peer) = trusted else {
            self.stats.proxy_untrusted += 1;
            self.log_refusal(peer, &"peer not in --proxy-from");
            return self.refuse(sock);
        };
        if self.stopping.is_some() || !self.cfg.admission.try_acquire() {
            return self.refuse(sock);
        }
        // From accept: the turn's clock has moved past the wait that delivered it.
        let deadline = self.now.saturating_add(gate.ticks);
        let token = self.insert_conn(sock);
        if self.conns.get_mut(token).is_some() {
            let pending = Pending {
                peer,
                deadline,
                acc: Vec::new(),
            };
            if let Some(g) = &mut self.gate {
                g.pending.insert(token, pending);
            }
        }
    }

    /// A receive completed on a connection waiting for its header.
    pub(super) fn gated_recv(
        &mut self,
        token: Token,
        result: Result<Received, OpError>,
        more: bool,
    ) {
        match result {
            Ok(Received::Data { buf, len }) => return self.gate_data(token, buf, len, more),
            // No buffer or cancelled: nothing arrived; the connection parks or aborts as usual.
            Err(OpError::NoBuffers | OpError::Canceled) => {}
            Ok(Received::Eof) | Err(_) => {
                self.stats.proxy_truncated += 1;
                self.leave_gate(token, &"ended before its PROXY header was complete");
            }
        }
        self.with_conn(token, |c, cx| c.on_recv(cx, result, more));
    }

    /// Bytes for a connection waiting for its header: parse what has come so far.
    fn gate_data(&mut self, token: Token, buf: BufId, len: u32, more: bool) {
        let Some(gate) = self.gate.as_mut() else {
            return;
        };
        let p = gate.pending.get_mut(&token).expect("a gated connection");
        let bytes = &self.backend.buf(buf)[..len as usize];
        let before = p.acc.len();
        let verdict = if before == 0 {
            // The usual case: the whole header in the first segment, parsed where it lies.
            proxy::parse(bytes)
        } else {
            let room = MAX_HEADER_LEN - before;
            p.acc.extend_from_slice(&bytes[..bytes.len().min(room)]);
            proxy::parse(&p.acc)
        };
        match verdict {
            Ok(Parsed::Incomplete { .. }) => {
                if before == 0 {
                    p.acc
                        .extend_from_slice(&bytes[..bytes.len().min(MAX_HEADER_LEN)]);
                }
                // `parse` says a header never needs more than MAX_HEADER_LEN bytes.
                let full = p.acc.len() >= MAX_HEADER_LEN;
                self.backend.release(buf);
                if full {
                    return self.refuse_header(token, ProxyError::TooLong, more);
                }
                self.with_conn(token, |c, cx| c.on_recv_consumed(cx, more));
            }
            Ok(Parsed::Done { header_len, header }) => {
                let peer = p.peer;
                gate.forget(token);
                let off = (header_len - before) as u32;
                self.pass(token, peer, &header, (buf, off, len), more);
            }
            Err(e) => {
                self.backend.release(buf);
                self.refuse_header(token, e, more);
            }
        }
    }

    /// A complete header: charge the client it names per IP, then echo what follows it.
    fn pass(
        &mut self,
        token: Token,
        peer: IpAddr,
        header: &Header,
        (buf, off, len): (BufId, u32, u32),
        more: bool,
    ) {
        self.count_header(header);
        let source = header.source.filter(|_| header.command == Command::Proxy);
        // LOCAL (health checks) and UNKNOWN: the real endpoints, as the spec says.
        let client = source.map_or(peer, |s| s.ip().to_canonical());
        let adm = self.cfg.admission.clone();
        if adm.limits_per_ip() && !adm.try_acquire_ip(client) {
            self.stats.refused += 1;
            tracing::debug!(%client, %peer, "refused: --max-connections-per-ip reached");
            self.backend.release(buf);
            self.with_conn(token, |c, cx| c.on_recv_refused(cx, more));
            return;
        }
        // Kept for every proxied connection: its logs name the client, and close releases it.
        self.peers.insert(token, client);
        tracing::debug!(?token, %client, %peer, version = header.version, "PROXY header");
        if off < len {
            self.with_conn(token, |c, cx| c.on_recv_from(cx, buf, off, len - off, more));
        } else {
            self.backend.release(buf);
            self.with_conn(token, |c, cx| c.on_recv_consumed(cx, more));
        }
    }

    /// A header that cannot be accepted: close the connection, counted by reason.
    fn refuse_header(&mut self, token: Token, e: ProxyError, more: bool) {
        match e {
            ProxyError::NotProxy => self.stats.proxy_not_proxy += 1,
            ProxyError::Malformed(_) | ProxyError::Unsupported => self.stats.proxy_malformed += 1,
            ProxyError::TooLong => self.stats.proxy_too_long += 1,
        }
        self.leave_gate(token, &e);
        self.with_conn(token, |c, cx| c.on_recv_refused(cx, more));
    }

    /// The header deadline passed: close, counted.
    pub(super) fn header_timed_out(&mut self, token: Token) {
        self.stats.proxy_timeouts += 1;
        self.leave_gate(token, &"no complete PROXY header by --proxy-timeout");
        self.with_conn(token, |c, cx| c.abort(cx));
    }

    fn count_header(&mut self, h: &Header) {
        match (h.version, h.command) {
            (1, _) => self.stats.proxy_v1 += 1,
            (_, Command::Local) => self.stats.proxy_local += 1,
            _ => self.stats.proxy_v2 += 1,
        }
        if h.command == Command::Proxy && h.source.is_none() {
            self.stats.proxy_unknown += 1;
        }
    }

    /// Takes a connection out of the gate for good, logging why (rate-limited).
    fn leave_gate(&mut self, token: Token, why: &dyn std::fmt::Display) {
        let peer = self
            .gate
            .as_mut()
            .and_then(|g| g.pending.remove(&token))
            .map(|p| p.peer);
        self.log_refusal(peer, why);
    }

    /// A debug line for a refused connection, at most one a second (an attack must not turn
    /// into a log flood).
    fn log_refusal(&mut self, peer: Option<IpAddr>, why: &dyn std::fmt::Display) {
        let Some(gate) = self.gate.as_mut() else {
            return;
        };
        let now = self.clock;
        if !tracing::enabled!(tracing::Level::DEBUG)
            || gate
                .last_log
                .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        gate.last_log = Some(now);
        tracing::debug!(peer = ?peer, "PROXY: closed a connection: {why} (at most one such line a second)");
    }
}
