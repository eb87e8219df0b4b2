//! Accepting: the listeners' accept completions, the back-off when descriptors run out, and
//! admission of each accepted socket within the server's budgets.

use crate::backend::Backend;
use crate::op::{ListenerId, Op, OpError, Socket};
use crate::token::Token;

use super::{ACCEPT_ERRORS_BEFORE_BACKOFF, BACKOFF_MAX, BACKOFF_MIN, Worker};

/// What to raise when accepts fail for want of a resource.
fn accept_hint(e: &OpError) -> &'static str {
    match e {
        OpError::TooManyFiles => {
            "out of descriptors: the process's limit (ulimit -n), fs.file-max, or (io_uring) \
             every ring's direct-descriptor table; see the start-up line's max_connections"
        }
        OpError::NoBuffers => "out of receive buffers: raise --buffers",
        _ => "",
    }
}

impl<B: Backend> Worker<B> {
    pub(super) fn on_accept(
        &mut self,
        id: ListenerId,
        result: Result<Socket, OpError>,
        more: bool,
    ) {
        let Some(l) = self.listeners.iter_mut().find(|l| l.id == id) else {
            return;
        };
        if !more {
            l.armed = false;
        }
        match result {
            Ok(sock) => {
                l.backoff = BACKOFF_MIN;
                l.errors_in_row = 0;
                if std::mem::take(&mut l.warned) {
                    tracing::info!("accepting again");
                }
                self.admit(sock);
            }
            Err(OpError::Canceled) => {}
            Err(e) => {
                l.errors_in_row += 1;
                let exhausted = matches!(e, OpError::TooManyFiles | OpError::NoBuffers);
                if exhausted || l.errors_in_row >= ACCEPT_ERRORS_BEFORE_BACKOFF {
                    let pause = l.backoff;
                    l.retry_at = Some(self.clock + pause);
                    l.backoff = (l.backoff * 2).min(BACKOFF_MAX);
                    self.stats.accept_backoffs += 1;
                    if !std::mem::replace(&mut l.warned, true) {
                        tracing::warn!(error = %e, pause_ms = pause.as_millis() as u64, hint = accept_hint(&e),
                            "accept failed; pausing accepts (said once until an accept succeeds)");
                    } else {
                        tracing::debug!(error = %e, pause_ms = pause.as_millis() as u64, "accept failed; pausing accepts");
                    }
                } else {
                    tracing::debug!(error = %e, "accept failed; retrying");
                }
            }
        }
    }

    /// Admits an accepted socket within the budgets, or closes it at once.
    fn admit(&mut self, sock: Socket) {
        if self.gate.is_some() {
            return self.admit_proxied(sock);
        }
        let adm = self.cfg.admission.clone();
        let ip = if adm.limits_per_ip() {
            self.backend.peer_ip(sock)
        } else {
            None
        };
        let admitted = if self.stopping.is_none() {
            adm.try_admit(ip)
        } else {
            None
        };
        let Some(admitted) = admitted else {
            return self.refuse(sock);
        };
        let token = self.insert_conn(sock);
        if let Some(ip) = admitted.ip {
            if self.conns.get_mut(token).is_some() {
                self.peers.insert(token, ip);
            } else {
                adm.release_ip(ip);
            }
        }
    }

    /// Closes a socket at accept, counted as refused.
    pub(super) fn refuse(&mut self, sock: Socket) {
        self.stats.refused += 1;
        let adm = &self.cfg.admission;
        if self.stopping.is_none() && adm.live() >= adm.max() && adm.first_refusal() {
            tracing::warn!(
                max_connections = adm.max(),
                bound = adm.bound(),
                "connection limit reached: new connections are closed at once until some \
                 close (said once until a tenth of the places are free again)"
            );
        }
        self.backend.push(Op::Close {
            token: Token::NONE,
            sock,
        });
    }

    /// Posts an accept on every open listener that has none and is not backing off.
    pub(super) fn arm_listeners(&mut self) {
        for l in &mut self.listeners {
            if l.open && !l.armed && l.retry_at.is_none() {
                l.armed = true;
                self.backend.push(Op::Accept { listener: l.id });
            }
        }
    }
}
