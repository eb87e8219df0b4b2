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

/// The whole exposition.
pub fn render(src: &Source) -> String {
    let mut out = String::with_capacity(8192);
    let workers: Vec<(Stats, u64)> = (0..src.live.workers())
        .map(|i| src.live.worker(i))
        .collect();
    for (k, (_, metric)) in Stats::COUNTERS.iter().enumerate() {
        // Counters of one labelled metric are listed together: one family line for them.
        if k == 0 || Stats::COUNTERS[k - 1].1.name != metric.name {
            family(&mut out, metric.name, metric.help, "counter");
        }
        for (i, (s, _)) in workers.iter().enumerate() {
            let worker = i.to_string();
            let mut labels = vec![("worker", worker.as_str())];
            labels.extend_from_slice(metric.labels);
            sample(&mut out, metric.name, &labels, s.to_array()[k]);
        }
    }
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
        sample(out, echoed, &[("addr", &addr.to_string())], s.echoed);
    }
    let dropped = "echoport_udp_datagrams_dropped_total";
    family(
        out,
        dropped,
        "UDP datagrams not echoed, by reason (refused_source: a reflection guard; rate_limited; truncated; would_block: the reply would have blocked).",
        "counter",
    );
    for (addr, s) in src.udp_addrs.iter().zip(&stats) {
        let drops = UdpStats::COUNTERS.iter().zip(s.to_array());
        for (reason, v) in drops.filter_map(|((_, reason), v)| Some(((*reason)?, v))) {
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
