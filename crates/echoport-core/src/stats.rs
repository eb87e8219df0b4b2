//! Counters a worker keeps about what it served, merged across workers at the end.

use std::fmt;

/// What one worker (or all of them, summed) has done.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections closed (for any reason).
    pub closed: u64,
    /// Connections closed because of an error (reset, broken pipe, ...).
    pub errors: u64,
    /// Connections refused at accept (server stopping or at its limit).
    pub refused: u64,
    /// Bytes received and echoed back.
    pub bytes_echoed: u64,
    /// Sends that sent fewer bytes than asked.
    pub short_sends: u64,
    /// Sends that gathered several queued buffers into one operation.
    pub gathered_sends: u64,
    /// Receives that found no free buffer and parked their connection.
    pub parked: u64,
    /// Times a connection's receive was paused because its pending echo hit the limit.
    pub paused: u64,
    /// Times accepting was paused because descriptors ran out.
    pub accept_backoffs: u64,
    /// Completions the kernel held back because the completion queue was full.
    pub cq_overflows: u64,
    /// Connections closed by the idle or the write timeout.
    pub timeouts: u64,
    /// Small receives copied onto the end of the connection's last queued buffer (so the
    /// buffer they arrived in went straight back to the pool).
    pub compacted: u64,
    /// Buffer hand-overs the pool refused (double or foreign releases): 0 unless a bug.
    pub buffer_misuses: u64,
    /// PROXY v1 headers accepted (`UNKNOWN` included).
    pub proxy_v1: u64,
    /// PROXY v2 headers with the `PROXY` command accepted.
    pub proxy_v2: u64,
    /// PROXY v2 `LOCAL` headers accepted (a balancer's health checks).
    pub proxy_local: u64,
    /// Accepted PROXY headers that named no client (v1 `UNKNOWN`, v2 unspecified or UNIX):
    /// served as the real peer.
    pub proxy_unknown: u64,
    /// Connections from a peer outside `--proxy-from`: closed at accept (also in `refused`).
    pub proxy_untrusted: u64,
    /// Connections that began with neither PROXY signature.
    pub proxy_not_proxy: u64,
    /// Connections whose PROXY header was malformed or of an unsupported version.
    pub proxy_malformed: u64,
    /// Connections whose PROXY header was longer than the protocol allows.
    pub proxy_too_long: u64,
    /// Connections whose PROXY header was not complete by `--proxy-timeout` after accept.
    pub proxy_timeouts: u64,
    /// Connections that ended (end of stream or an error) before their PROXY header was complete.
    pub proxy_truncated: u64,
}

impl Stats {
    /// Adds another worker's counters to these.
    pub fn merge(&mut self, o: &Stats) {
        self.accepted += o.accepted;
        self.closed += o.closed;
        self.errors += o.errors;
        self.refused += o.refused;
        self.bytes_echoed += o.bytes_echoed;
        self.short_sends += o.short_sends;
        self.gathered_sends += o.gathered_sends;
        self.parked += o.parked;
        self.paused += o.paused;
        self.accept_backoffs += o.accept_backoffs;
        self.cq_overflows += o.cq_overflows;
        self.timeouts += o.timeouts;
        self.compacted += o.compacted;
        self.buffer_misuses += o.buffer_misuses;
        self.proxy_v1 += o.proxy_v1;
        self.proxy_v2 += o.proxy_v2;
        self.proxy_local += o.proxy_local;
        self.proxy_unknown += o.proxy_unknown;
        self.proxy_untrusted += o.proxy_untrusted;
        self.proxy_not_proxy += o.proxy_not_proxy;
        self.proxy_malformed += o.proxy_malformed;
        self.proxy_too_long += o.proxy_too_long;
        self.proxy_timeouts += o.proxy_timeouts;
        self.proxy_truncated += o.proxy_truncated;
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "accepted={} closed={} errors={} refused={} bytes_echoed={} short_sends={} \
             gathered_sends={} parked={} paused={} accept_backoffs={} cq_overflows={} \
             timeouts={} compacted={} buffer_misuses={}",
            self.accepted,
            self.closed,
            self.errors,
            self.refused,
            self.bytes_echoed,
            self.short_sends,
            self.gathered_sends,
            self.parked,
            self.paused,
            self.accept_backoffs,
            self.cq_overflows,
            self.timeouts,
            self.compacted,
            self.buffer_misuses
        )?;
        write!(
            f,
            " proxy_v1={} proxy_v2={} proxy_local={} proxy_unknown={} proxy_untrusted={} \
             proxy_not_proxy={} proxy_malformed={} proxy_too_long={} proxy_timeouts={} \
             proxy_truncated={}",
            self.proxy_v1,
            self.proxy_v2,
            self.proxy_local,
            self.proxy_unknown,
            self.proxy_untrusted,
            self.proxy_not_proxy,
            self.proxy_malformed,
            self.proxy_too_long,
            self.proxy_timeouts,
            self.proxy_truncated
        )
    }
}
