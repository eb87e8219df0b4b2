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
        )
    }
}
