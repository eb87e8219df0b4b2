//! What a run measured: the latency histogram, counts, and errors by kind, per thread and
//! merged.

use hdrhistogram::Histogram;

/// Longest latency the histogram holds (one hour, in nanoseconds); longer ones saturate.
const MAX_NS: u64 = 3_600_000_000_000;

/// Errors by kind. Any of them makes the run fail.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Errors {
    /// Messages whose echo differed from what was sent in at least one byte.
    pub mismatch: u64,
    /// Connections that ended (lost, timed out, or at the end of the run) with bytes sent
    /// that never came back.
    pub short_echo: u64,
    /// Bytes sent that never came back, over those connections.
    pub missing_bytes: u64,
    /// Connections that received more bytes than they had sent.
    pub extra_echo: u64,
    /// Bytes received beyond those sent.
    pub extra_bytes: u64,
    /// Connections the server closed or reset during the run.
    pub connection_lost: u64,
    /// Connections owed echoes that saw no byte for the timeout (or still owed them when
    /// the run's end grace ran out).
    pub timeout: u64,
    /// Connections ended by another I/O error.
    pub io_error: u64,
    /// Connections that could not be opened.
    pub connect_failed: u64,
}

impl Errors {
    /// Adds another set of counts to these.
    pub fn merge(&mut self, o: &Errors) {
        self.mismatch += o.mismatch;
        self.short_echo += o.short_echo;
        self.missing_bytes += o.missing_bytes;
        self.extra_echo += o.extra_echo;
        self.extra_bytes += o.extra_bytes;
        self.connection_lost += o.connection_lost;
        self.timeout += o.timeout;
        self.io_error += o.io_error;
        self.connect_failed += o.connect_failed;
    }

    /// Error events (byte counts excluded).
    pub fn total(&self) -> u64 {
        self.mismatch
            + self.short_echo
            + self.extra_echo
            + self.connection_lost
            + self.timeout
            + self.io_error
            + self.connect_failed
    }

    /// Counts by kind name (as [`Errors::kinds`] names them), e.g. read back from JSON.
    pub fn from_kinds(count: impl Fn(&str) -> u64) -> Errors {
        Errors {
            mismatch: count("mismatch"),
            short_echo: count("short_echo"),
            missing_bytes: count("missing_bytes"),
            extra_echo: count("extra_echo"),
            extra_bytes: count("extra_bytes"),
            connection_lost: count("connection_lost"),
            timeout: count("timeout"),
            io_error: count("io_error"),
            connect_failed: count("connect_failed"),
        }
    }

    /// (name, count) of every kind, in report order.
    pub fn kinds(&self) -> [(&'static str, u64); 9] {
        [
            ("mismatch", self.mismatch),
            ("short_echo", self.short_echo),
            ("missing_bytes", self.missing_bytes),
            ("extra_echo", self.extra_echo),
            ("extra_bytes", self.extra_bytes),
            ("connection_lost", self.connection_lost),
            ("timeout", self.timeout),
            ("io_error", self.io_error),
            ("connect_failed", self.connect_failed),
        ]
    }
}

/// Connection churn, by kind.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Churn {
    /// Connections closed after their `--messages-per-conn` echoes (and replaced).
    pub closes: u64,
    /// Connections the server closed that were replaced (`--reconnect`).
    pub reconnects: u64,
    /// Messages sent on those that never came back.
    pub abandoned_msgs: u64,
    /// Their bytes still owed.
    pub abandoned_bytes: u64,
}

impl Churn {
    /// Adds another set of counts to these.
    pub fn merge(&mut self, o: &Churn) {
        self.closes += o.closes;
        self.reconnects += o.reconnects;
        self.abandoned_msgs += o.abandoned_msgs;
        self.abandoned_bytes += o.abandoned_bytes;
    }
}

/// UDP datagrams, counted from the sequence numbers they carry (measured ones only).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct UdpCounts {
    /// Datagrams sent.
    pub sent: u64,
    /// Datagrams that came back (first copies).
    pub received: u64,
    /// Copies of a datagram already back.
    pub duplicates: u64,
    /// Datagrams that came back after one sent later on the same flow.
    pub reordered: u64,
    /// Datagrams that came back after `--timeout` (counted back, not timed).
    pub late: u64,
    /// Datagrams the client could not send (its socket buffer was full).
    pub send_blocked: u64,
    /// Sends or receives refused (ICMP port unreachable: nothing listening).
    pub refused: u64,
    /// Datagrams the kernel of this host dropped for a full socket receive buffer during
    /// the run, any socket's (`RcvbufErrors` of /proc/net/snmp): loss that may be the
    /// client's own, or a server's on the same host.
    pub host_rcvbuf_errors: u64,
}

impl UdpCounts {
    /// Adds another set of counts to these.
    pub fn merge(&mut self, o: &UdpCounts) {
        self.sent += o.sent;
        self.received += o.received;
        self.duplicates += o.duplicates;
        self.reordered += o.reordered;
        self.late += o.late;
        self.send_blocked += o.send_blocked;
        self.refused += o.refused;
        self.host_rcvbuf_errors += o.host_rcvbuf_errors;
    }

    /// Sent and never back.
    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.received)
    }

    /// Lost over sent.
    pub fn loss_ratio(&self) -> f64 {
        if self.sent == 0 {
            0.0
        } else {
            self.lost() as f64 / self.sent as f64
        }
    }
}

/// One thread's (or, merged, the run's) measurements.
#[derive(Clone, Debug)]
pub struct Tally {
    /// Latency of every measured message, in nanoseconds.
    pub hist: Histogram<u64>,
    /// Measured messages echoed in full.
    pub msgs: u64,
    /// Their bytes (one direction).
    pub bytes: u64,
    /// Measured messages whose first byte was handed to the kernel before the end of the
    /// window: the load actually offered.
    pub sent: u64,
    /// The longest a message's first byte waited past its intended time before it was
    /// handed to the kernel (open loop: how far the generator fell behind its schedule).
    pub max_send_lag_ns: u64,
    /// When the last measured message came back, in ns since the run's start.
    pub last_done_ns: u64,
    /// Errors.
    pub errors: Errors,
    /// Completions the kernel held back (io_uring CQ overflow) in the client.
    pub overflows: u64,
    /// The longest a worker's wait overran its own deadline: how late the client itself
    /// was (descheduled, or busy), which every latency measured meanwhile includes.
    pub max_late_ns: u64,
    /// Every measured latency in order, ns (only when asked for: tests check the histograms
    /// against them).
    pub samples: Option<Vec<u64>>,
    /// From the start of a connect to its first echo, ns (connects begun in the window).
    pub first_echo: Histogram<u64>,
    /// Connection churn.
    pub churn: Churn,
    /// UDP datagrams (`--udp`).
    pub udp: UdpCounts,
}

/// An empty latency histogram: 1 ns to one hour, three significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_NS, 3).expect("valid histogram bounds")
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            hist: new_histogram(),
            msgs: 0,
            bytes: 0,
            sent: 0,
            max_send_lag_ns: 0,
            last_done_ns: 0,
            errors: Errors::default(),
            overflows: 0,
            max_late_ns: 0,
            samples: None,
            first_echo: new_histogram(),
            churn: Churn::default(),
            udp: UdpCounts::default(),
        }
    }
}

impl Tally {
    /// Adds another thread's measurements.
    pub fn merge(&mut self, o: &Tally) {
        self.hist
            .add(&o.hist)
            .expect("histograms of equal bounds add");
        self.msgs += o.msgs;
        self.bytes += o.bytes;
        self.sent += o.sent;
        self.max_send_lag_ns = self.max_send_lag_ns.max(o.max_send_lag_ns);
        self.last_done_ns = self.last_done_ns.max(o.last_done_ns);
        self.errors.merge(&o.errors);
        self.overflows += o.overflows;
        self.max_late_ns = self.max_late_ns.max(o.max_late_ns);
        self.first_echo
            .add(&o.first_echo)
            .expect("histograms of equal bounds add");
        self.churn.merge(&o.churn);
        self.udp.merge(&o.udp);
        if let Some(theirs) = &o.samples {
            self.samples.get_or_insert_with(Vec::new).extend(theirs);
        }
    }

    /// One measured echo of `len` bytes that took `latency_ns`, completed at `now`.
    pub fn record(&mut self, now: u64, latency_ns: u64, len: u64) {
        let v = latency_ns.max(1);
        self.hist.saturating_record(v);
        if let Some(s) = &mut self.samples {
            s.push(v);
        }
        self.msgs += 1;
        self.bytes += len;
        self.last_done_ns = now;
    }

    /// Latency at quantile `q` (0..=1), in microseconds.
    pub fn us_at(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
}
