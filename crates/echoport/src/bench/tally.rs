//! What a run measured: the latency histogram, counts, and errors by kind, per thread and
//! merged.

use hdrhistogram::Histogram;

/// Longest latency the histogram holds (one hour, in nanoseconds); longer ones saturate.
const MAX_NS: u64 = 3_600_000_000_000;

echoport_core::counter_struct! {
    /// Errors by kind. Any of them makes the run fail.
    pub struct Errors: bool;
    /// Messages whose echo differed from what was sent in at least one byte.
    mismatch: true;
    /// Connections that ended (lost, timed out, or at the end of the run) with bytes sent
    /// that never came back.
    short_echo: true;
    /// Bytes sent that never came back, over those connections.
    missing_bytes: false;
    /// Connections that received more bytes than they had sent.
    extra_echo: true;
    /// Bytes received beyond those sent.
    extra_bytes: false;
    /// Connections the server closed or reset during the run.
    connection_lost: true;
    /// Connections owed echoes that saw no byte for the timeout (or still owed them when
    /// the run's end grace ran out).
    timeout: true;
    /// Connections ended by another I/O error.
    io_error: true;
    /// Connections that could not be opened.
    connect_failed: true;
    /// Connections still not opened when the run ended (connecting took longer than the
    /// run: a longer --warmup, or more --source addresses, which make connects cheaper).
    not_opened: true;
}

impl Errors {
    /// Error events (byte counts excluded: the kinds marked `false`).
    pub fn total(&self) -> u64 {
        let events = Self::COUNTERS.iter().zip(self.to_array());
        events
            .filter(|((_, event), _)| *event)
            .map(|(_, n)| n)
            .sum()
    }

    /// Counts by kind name (as [`Errors::kinds`] names them), e.g. read back from JSON.
    pub fn from_kinds(count: impl Fn(&str) -> u64) -> Errors {
        Errors::from_array(Self::COUNTERS.map(|(kind, _)| count(kind)))
    }

    /// (name, count) of every kind, in report order.
    pub fn kinds(&self) -> [(&'static str, u64); Errors::LEN] {
        let v = self.to_array();
        std::array::from_fn(|i| (Self::COUNTERS[i].0, v[i]))
    }
}

echoport_core::counter_struct! {
    /// Connection churn, by kind.
    pub struct Churn;
    /// Connections closed after their `--messages-per-conn` echoes (and replaced).
    closes;
    /// Connections the server closed that were replaced (`--reconnect`).
    reconnects;
    /// Messages sent on those that never came back.
    abandoned_msgs;
    /// Their bytes still owed.
    abandoned_bytes;
}

echoport_core::counter_struct! {
    /// UDP datagrams, counted from the sequence numbers they carry (measured ones only).
    pub struct UdpCounts;
    /// Datagrams sent.
    sent;
    /// Datagrams that came back (first copies).
    received;
    /// Copies of a datagram already back.
    duplicates;
    /// Datagrams that came back after one sent later on the same flow.
    reordered;
    /// Datagrams that came back after `--timeout` (counted back, not timed).
    late;
    /// Datagrams the client could not send (its socket buffer was full).
    send_blocked;
    /// Sends or receives refused (ICMP port unreachable: nothing listening).
    refused;
    /// Datagrams the kernel of this host dropped for a full socket receive buffer during
    /// the run, any socket's (`RcvbufErrors` of /proc/net/snmp): loss that may be the
    /// client's own, or a server's on the same host.
    host_rcvbuf_errors;
}

impl UdpCounts {
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
    /// Measured messages (intended inside the window) whose first byte the client only got
    /// to after the window closed: a loop that fell behind. `sent + sent_late` is every
    /// measured message issued.
    pub sent_late: u64,
    /// The longest a message's first byte waited past its intended time before it was
    /// handed to the kernel (open loop: how far the generator fell behind its schedule).
    pub max_send_lag_ns: u64,
    /// When the last measured message came back, in ns since the run's start.
    pub last_done_ns: u64,
    /// Errors.
    pub errors: Errors,
    /// Completions the kernel held back (io_uring CQ overflow) in the client.
    pub overflows: u64,
    /// The longest a worker's wait begun in the measured window overran its own deadline:
    /// how late the client itself was (descheduled, or busy), which every latency measured
    /// meanwhile includes.
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
            sent_late: 0,
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
        self.sent_late += o.sent_late;
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
