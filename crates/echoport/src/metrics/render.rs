//! The Prometheus text exposition format (version 0.0.4) of the server's live counters.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use echoport_core::live::LiveStats;
use echoport_core::stats::Stats;
use echoport_core::udp::UdpStats;
use echoport_core::worker::Admission;

/// Everything a scrape reads.
pub struct Source {
    /// The workers' and UDP sockets' published counters.
    pub live: Arc<LiveStats>,
    /// The connection budget (its live count is exact, not per tick).
    pub admission: Arc<Admission>,
    /// Set once a graceful stop began.
    pub stop: Arc<AtomicBool>,
    /// The backend's short name ("io_uring", "epoll", "io_uring+epoll", "iocp").
    pub backend: String,
    /// The UDP sockets' addresses, in the order of their live blocks.
    pub udp_addrs: Vec<SocketAddr>,
    /// When the server started.
    pub started: SystemTime,
}

/// Every counter of a worker's [`Stats`]: (metric name, help, value).
fn counters(s: &Stats) -> [(&'static str, &'static str, u64); 14] {
    // Exhaustive, so a new counter cannot be forgotten here.
    let Stats {
        accepted,
        closed,
        errors,
        refused,
        bytes_echoed,
        short_sends,
        gathered_sends,
        parked,
        paused,
        accept_backoffs,
        cq_overflows,
        timeouts,
        compacted,
        buffer_misuses,
        // Labelled families of their own: `proxy_counters`.
        proxy_v1: _,
        proxy_v2: _,
        proxy_local: _,
        proxy_unknown: _,
        proxy_untrusted: _,
        proxy_not_proxy: _,
        proxy_malformed: _,
        proxy_too_long: _,
        proxy_timeouts: _,
        proxy_truncated: _,
    } = *s;
    [
        (
            "echoport_connections_accepted_total",
            "Connections accepted.",
            accepted,
        ),
        (
            "echoport_connections_closed_total",
            "Connections closed, for any reason.",
            closed,
        ),
        (
            "echoport_connection_errors_total",
            "Connections closed by an error (reset, broken pipe, ...).",
            errors,
        ),
        (
            "echoport_connections_refused_total",
            "Connections refused at accept (server stopping, over --max-connections or --max-connections-per-ip, or a peer not in --proxy-from), or once a PROXY header named a client over --max-connections-per-ip.",
            refused,
        ),
        (
            "echoport_bytes_echoed_total",
            "Bytes received and echoed back.",
            bytes_echoed,
        ),
        (
            "echoport_short_sends_total",
            "Sends that sent fewer bytes than asked.",
            short_sends,
        ),
        (
            "echoport_gathered_sends_total",
            "Sends that gathered several queued buffers.",
            gathered_sends,
        ),
        (
            "echoport_receives_parked_total",
            "Receives that found no free buffer and parked their connection.",
            parked,
        ),
        (
            "echoport_receives_paused_total",
            "Times a connection's receive paused at its byte or buffer budget.",
            paused,
        ),
        (
            "echoport_accept_backoffs_total",
            "Times accepting paused because descriptors ran out.",
            accept_backoffs,
        ),
        (
            "echoport_cq_overflows_total",
            "Completions the kernel held back because the completion queue was full.",
            cq_overflows,
        ),
        (
            "echoport_connection_timeouts_total",
            "Connections closed by --idle-timeout or --write-timeout.",
            timeouts,
        ),
        (
            "echoport_receives_compacted_total",
            "Small receives copied onto the connection's last queued buffer.",
            compacted,
        ),
        (
            "echoport_buffer_misuses_total",
            "Buffer hand-overs the pool refused (0 unless echoport has a bug).",
            buffer_misuses,
        ),
    ]
}

/// Up to two labels of a sample (an empty name: none).
type Labels = [(&'static str, &'static str); 2];

/// The PROXY protocol counters, as labelled samples: (family, labels, value).
fn proxy_counters(s: &Stats) -> [(usize, Labels, u64); 10] {
    const HEADERS: usize = 0;
    const REFUSED: usize = 1;
    const UNKNOWN: usize = 2;
    let none = ("", "");
    let why = |r| [("reason", r), none];
    [
        (
            HEADERS,
            [("version", "1"), ("command", "proxy")],
            s.proxy_v1,
        ),
        (
            HEADERS,
            [("version", "2"), ("command", "proxy")],
            s.proxy_v2,
        ),
        (
            HEADERS,
            [("version", "2"), ("command", "local")],
            s.proxy_local,
        ),
        (UNKNOWN, [none, none], s.proxy_unknown),
        (REFUSED, why("untrusted"), s.proxy_untrusted),
        (REFUSED, why("not_proxy"), s.proxy_not_proxy),
        (REFUSED, why("malformed"), s.proxy_malformed),
        (REFUSED, why("too_long"), s.proxy_too_long),
        (REFUSED, why("timeout"), s.proxy_timeouts),
        (REFUSED, why("truncated"), s.proxy_truncated),
    ]
}

/// The PROXY families: (name, help), indexed as `proxy_counters` says.
const PROXY_FAMILIES: [(&str, &str); 3] = [
    (
        "echoport_proxy_headers_total",
        "PROXY protocol headers accepted (serve --proxy-protocol), by version and command (local: a balancer's health check).",
    ),
    (
        "echoport_proxy_refused_total",
        "Connections closed by the PROXY header gate, by reason (untrusted: peer not in --proxy-from, closed at accept; not_proxy; malformed; too_long; timeout: no header by --proxy-timeout; truncated: ended mid-header).",
    ),
    (
        "echoport_proxy_unknown_source_total",
        "Accepted PROXY headers that named no client (v1 UNKNOWN, v2 unspecified or UNIX), served as the real peer.",
    ),
];

fn render_proxy(out: &mut String, workers: &[(Stats, u64)]) {
    for (k, (name, help)) in PROXY_FAMILIES.iter().enumerate() {
        family(out, name, help, "counter");
        for (i, (s, _)) in workers.iter().enumerate() {
            let worker = i.to_string();
            for (f, labels, v) in proxy_counters(s) {
                if f != k {
                    continue;
                }
                let mut all = vec![("worker", worker.as_str())];
                all.extend(labels.iter().filter(|(l, _)| !l.is_empty()).copied());
                sample(out, name, &all, v);
            }
        }
    }
}

/// Every counter of a UDP socket: (reason label, value); `echoed` is its own metric.
fn udp_drops(s: &UdpStats) -> (u64, [(&'static str, u64); 4]) {
    let UdpStats {
        echoed,
        refused,
        rate_limited,
        truncated,
        dropped,
    } = *s;
    (
        echoed,
        [
            ("refused_source", refused),
            ("rate_limited", rate_limited),
            ("truncated", truncated),
            ("would_block", dropped),
        ],
    )
}

/// The whole exposition.
pub fn render(src: &Source) -> String {
    let mut out = String::with_capacity(8192);
    let workers: Vec<(Stats, u64)> = (0..src.live.workers())
        .map(|i| src.live.worker(i))
        .collect();
    let names = counters(&Stats::default());
    for (k, (name, help, _)) in names.iter().enumerate() {
        family(&mut out, name, help, "counter");
        for (i, (s, _)) in workers.iter().enumerate() {
            sample(
                &mut out,
                name,
                &[("worker", &i.to_string())],
                counters(s)[k].2,
            );
        }
    }
    render_proxy(&mut out, &workers);
    let conns = "echoport_connections";
    family(
        &mut out,
        conns,
        "Live connections (per worker, as of its last 100 ms tick).",
        "gauge",
    );
    for (i, (_, live)) in workers.iter().enumerate() {
        sample(&mut out, conns, &[("worker", &i.to_string())], *live);
    }
    gauge(
        &mut out,
        "echoport_connections_admitted",
        "Connections admitted and not yet closed, server-wide (exact).",
        src.admission.live() as u64,
    );
    gauge(
        &mut out,
        "echoport_connections_max",
        "The connection budget (--max-connections, or what the backend holds).",
        src.admission.max() as u64,
    );
    gauge(
        &mut out,
        "echoport_draining",
        "1 once a graceful stop began: no new connections, finishing echoes.",
        src.stop.load(Ordering::Relaxed) as u64,
    );
    let start = src
        .started
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    gauge(
        &mut out,
        "echoport_start_time_seconds",
        "When the server started, in seconds since the Unix epoch.",
        start,
    );
    render_udp(&mut out, src);
    family(
        &mut out,
        "echoport_build_info",
        "The version and backend of this server (value always 1).",
        "gauge",
    );
    sample(
        &mut out,
        "echoport_build_info",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("backend", &src.backend),
        ],
        1,
    );
    out
}

fn render_udp(out: &mut String, src: &Source) {
    if src.udp_addrs.is_empty() {
        return;
    }
    let stats: Vec<UdpStats> = (0..src.live.udp_sockets())
        .map(|i| src.live.udp(i))
        .collect();
    let echoed = "echoport_udp_datagrams_echoed_total";
    family(out, echoed, "UDP datagrams echoed.", "counter");
    for (addr, s) in src.udp_addrs.iter().zip(&stats) {
        sample(out, echoed, &[("addr", &addr.to_string())], udp_drops(s).0);
    }
    let dropped = "echoport_udp_datagrams_dropped_total";
    family(
        out,
        dropped,
        "UDP datagrams not echoed, by reason (refused_source: a reflection guard; rate_limited; truncated; would_block: the reply would have blocked).",
        "counter",
    );
    for (addr, s) in src.udp_addrs.iter().zip(&stats) {
        for (reason, v) in udp_drops(s).1 {
            sample(
                out,
                dropped,
                &[("addr", &addr.to_string()), ("reason", reason)],
                v,
            );
        }
    }
}

fn family(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn gauge(out: &mut String, name: &str, help: &str, v: u64) {
    family(out, name, help, "gauge");
    sample(out, name, &[], v);
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], v: u64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, val)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape(val));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {v}");
}

/// A label value with `\`, `"` and newlines escaped, as the format requires.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sample_has_its_family_and_labels_are_escaped() {
        let live = LiveStats::new(2, 1);
        live.worker_slot(1).publish(
            &Stats {
                accepted: 7,
                bytes_echoed: 640,
                proxy_local: 4,
                proxy_timeouts: 5,
                ..Stats::default()
            },
            3,
        );
        let src = Source {
            live,
            admission: Admission::new(100),
            stop: Arc::new(AtomicBool::new(false)),
            backend: "a\"b".into(),
            udp_addrs: vec!["127.0.0.1:7".parse().unwrap()],
            started: SystemTime::UNIX_EPOCH,
        };
        let text = render(&src);
        for want in [
            "echoport_connections_accepted_total{worker=\"1\"} 7\n",
            "echoport_bytes_echoed_total{worker=\"0\"} 0\n",
            "echoport_bytes_echoed_total{worker=\"1\"} 640\n",
            "echoport_proxy_headers_total{worker=\"1\",version=\"2\",command=\"local\"} 4\n",
            "echoport_proxy_refused_total{worker=\"1\",reason=\"timeout\"} 5\n",
            "echoport_proxy_unknown_source_total{worker=\"0\"} 0\n",
            "echoport_connections{worker=\"1\"} 3\n",
            "echoport_connections_max 100\n",
            "echoport_udp_datagrams_dropped_total{addr=\"127.0.0.1:7\",reason=\"rate_limited\"} 0\n",
            "echoport_build_info{version=\"",
            "backend=\"a\\\"b\"} 1\n",
        ] {
            assert!(text.contains(want), "no {want:?} in:\n{text}");
        }
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                assert!(
                    typed.insert(rest.split(' ').next().unwrap().to_string()),
                    "{line}"
                );
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(typed.contains(name), "{name} sampled before its TYPE line");
                let value = line.rsplit(' ').next().unwrap();
                assert!(value.parse::<u64>().is_ok(), "{line}");
            }
        }
    }
}
