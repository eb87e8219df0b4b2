//! Counters a worker keeps about what it served, merged across workers at the end.
//!
//! Each counter is declared once, in [`stats_counters!`](crate::stats_counters): its field,
//! its doc, its key on the stopped line and its Prometheus metric. The struct, `merge`,
//! `Display`, the live atomics and the metrics endpoint all expand that one list.

/// A counter's Prometheus metric: its name, its `# HELP` text, and the labels that tell it
/// from the other counters of the same metric (listed next to each other).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Metric {
    /// The metric's name (`echoport_..._total`).
    pub name: &'static str,
    /// What the metric counts, for `# HELP` (the first counter of a metric gives it).
    pub help: &'static str,
    /// Labels of this counter's samples (beside `worker`).
    pub labels: &'static [(&'static str, &'static str)],
}

impl Metric {
    /// A metric named `name` described by `help`.
    pub const fn new(name: &'static str, help: &'static str) -> Metric {
        Metric::labelled(name, help, &[])
    }

    /// One labelled part of metric `name`.
    pub const fn labelled(
        name: &'static str,
        help: &'static str,
        labels: &'static [(&'static str, &'static str)],
    ) -> Metric {
        Metric { name, help, labels }
    }
}

/// `echoport_proxy_headers_total`'s help.
const PROXY_HEADERS: &str = "PROXY protocol headers accepted (serve --proxy-protocol), by version and command (local: a balancer's health check).";
/// `echoport_proxy_refused_total`'s help.
const PROXY_REFUSED: &str = "Connections closed by the PROXY header gate, by reason (untrusted: peer not in --proxy-from, closed at accept; not_proxy; malformed; too_long; timeout: no whole header by --proxy-timeout; truncated: ended mid-header).";

/// The list of a worker's counters (see [`crate::counters`]): calls `$m!` with the
/// tokens after `$m`, then the struct header and one entry a counter
/// (`/// doc` `field: Metric::new(name, help);`). The order is the stopped line's.
#[macro_export]
macro_rules! stats_counters {
    ($m:ident $($pre:tt)*) => {
        $m! {
            $($pre)*
            /// What one worker (or all of them, summed) has done.
            pub struct Stats: $crate::stats::Metric;
            /// Connections accepted.
            accepted: $crate::stats::Metric::new(
                "echoport_connections_accepted_total",
                "Connections accepted.",
            );
            /// Connections closed (for any reason).
            closed: $crate::stats::Metric::new(
                "echoport_connections_closed_total",
                "Connections closed, for any reason.",
            );
            /// Connections closed because of an error (reset, broken pipe, ...).
            errors: $crate::stats::Metric::new(
                "echoport_connection_errors_total",
                "Connections closed by an error (reset, broken pipe, ...).",
            );
            /// Connections refused at accept (server stopping, at a limit, or a peer outside
            /// `--proxy-from`), or once their PROXY header named a client over its per-IP limit.
            refused: $crate::stats::Metric::new(
                "echoport_connections_refused_total",
                "Connections refused at accept (server stopping, over --max-connections or --max-connections-per-ip, or a peer not in --proxy-from), or once a PROXY header named a client over --max-connections-per-ip.",
            );
            /// Bytes received and echoed back.
            bytes_echoed: $crate::stats::Metric::new(
                "echoport_bytes_echoed_total",
                "Bytes received and echoed back.",
            );
            /// Sends that sent fewer bytes than asked.
            short_sends: $crate::stats::Metric::new(
                "echoport_short_sends_total",
                "Sends that sent fewer bytes than asked.",
            );
            /// Sends that gathered several queued buffers into one operation (counted so
            /// tests can assert that the gathered path ran).
            gathered_sends: $crate::stats::Metric::new(
                "echoport_gathered_sends_total",
                "Sends that gathered several queued buffers.",
            );
            /// Receives that found no free buffer and parked their connection.
            parked: $crate::stats::Metric::new(
                "echoport_receives_parked_total",
                "Receives that found no free buffer and parked their connection.",
            );
            /// Times a connection's receive was paused because its pending echo hit the limit.
            paused: $crate::stats::Metric::new(
                "echoport_receives_paused_total",
                "Times a connection's receive paused at its byte or buffer budget.",
            );
            /// Times accepting was paused because descriptors ran out.
            accept_backoffs: $crate::stats::Metric::new(
                "echoport_accept_backoffs_total",
                "Times accepting paused because descriptors ran out.",
            );
            /// Completions the kernel held back because the completion queue was full.
            cq_overflows: $crate::stats::Metric::new(
                "echoport_cq_overflows_total",
                "Completions the kernel held back because the completion queue was full.",
            );
            /// Connections closed by the idle or the write timeout.
            timeouts: $crate::stats::Metric::new(
                "echoport_connection_timeouts_total",
                "Connections closed by --idle-timeout or --write-timeout.",
            );
            /// Small receives copied onto the end of the connection's last queued buffer (so
            /// the buffer they arrived in went straight back to the pool).
            compacted: $crate::stats::Metric::new(
                "echoport_receives_compacted_total",
                "Small receives copied onto the connection's last queued buffer.",
            );
            /// Buffer hand-overs the pool refused (double or foreign releases): 0 unless a bug.
            buffer_misuses: $crate::stats::Metric::new(
                "echoport_buffer_misuses_total",
                "Buffer hand-overs the pool refused (0 unless echoport has a bug).",
            );
            /// PROXY v1 headers accepted (`UNKNOWN` included).
            proxy_v1: $crate::stats::Metric::labelled(
                "echoport_proxy_headers_total",
                $crate::stats::PROXY_HEADERS,
                &[("version", "1"), ("command", "proxy")],
            );
            /// PROXY v2 headers with the `PROXY` command accepted.
            proxy_v2: $crate::stats::Metric::labelled(
                "echoport_proxy_headers_total",
                $crate::stats::PROXY_HEADERS,
                &[("version", "2"), ("command", "proxy")],
            );
            /// PROXY v2 `LOCAL` headers accepted (a balancer's health checks).
            proxy_local: $crate::stats::Metric::labelled(
                "echoport_proxy_headers_total",
                $crate::stats::PROXY_HEADERS,
                &[("version", "2"), ("command", "local")],
            );
            /// Accepted PROXY headers that named no client (v1 `UNKNOWN`, v2 unspecified or
            /// UNIX): served as the real peer.
            proxy_unknown: $crate::stats::Metric::new(
                "echoport_proxy_unknown_source_total",
                "Accepted PROXY headers that named no client (v1 UNKNOWN, v2 unspecified or UNIX), served as the real peer.",
            );
            /// Connections from a peer outside `--proxy-from`: closed at accept (also in `refused`).
            proxy_untrusted: $crate::stats::Metric::labelled(
                "echoport_proxy_refused_total",
                $crate::stats::PROXY_REFUSED,
                &[("reason", "untrusted")],
            );
            /// Connections that began with neither PROXY signature.
            proxy_not_proxy: $crate::stats::Metric::labelled(
                "echoport_proxy_refused_total",
                $crate::stats::PROXY_REFUSED,
                &[("reason", "not_proxy")],
            );
            /// Connections whose PROXY header was malformed or of an unsupported version.
            proxy_malformed: $crate::stats::Metric::labelled(
                "echoport_proxy_refused_total",
                $crate::stats::PROXY_REFUSED,
                &[("reason", "malformed")],
            );
            /// Connections whose PROXY header was longer than the protocol allows.
            proxy_too_long: $crate::stats::Metric::labelled(
                "echoport_proxy_refused_total",
                $crate::stats::PROXY_REFUSED,
                &[("reason", "too_long")],
            );
            /// Connections whose PROXY header was not whole by `--proxy-timeout` after accept.
            proxy_timeouts: $crate::stats::Metric::labelled(
                "echoport_proxy_refused_total",
                $crate::stats::PROXY_REFUSED,
                &[("reason", "timeout")],
            );
            /// Connections that ended (end of stream or an error) before their PROXY header was whole.
            proxy_truncated: $crate::stats::Metric::labelled(
                "echoport_proxy_refused_total",
                $crate::stats::PROXY_REFUSED,
                &[("reason", "truncated")],
            );
        }
    };
}

stats_counters!(counter_struct);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_the_stopped_line_and_merge_adds_every_counter() {
        let mut a = Stats::from_array(std::array::from_fn(|i| i as u64 + 1));
        assert_eq!(
            a.to_string(),
            "accepted=1 closed=2 errors=3 refused=4 bytes_echoed=5 short_sends=6 \
             gathered_sends=7 parked=8 paused=9 accept_backoffs=10 cq_overflows=11 \
             timeouts=12 compacted=13 buffer_misuses=14 proxy_v1=15 proxy_v2=16 proxy_local=17 \
             proxy_unknown=18 proxy_untrusted=19 proxy_not_proxy=20 proxy_malformed=21 \
             proxy_too_long=22 proxy_timeouts=23 proxy_truncated=24"
        );
        a.merge(&Stats::from_array([10; Stats::LEN]));
        assert_eq!(a.to_array(), std::array::from_fn(|i| i as u64 + 11));
        assert_eq!(a.buffer_misuses, 24);
    }
}
