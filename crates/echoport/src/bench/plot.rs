//! SVG plots written as plain text: the latency percentile distribution of a run, and the
//! latency-versus-load curve of a sweep. No system library, no font metrics: fixed layout.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

use super::report::group;

const W: f64 = 820.0;
const H: f64 = 500.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A plot area mapping data to pixels.
struct Frame {
    svg: String,
}

impl Frame {
    fn new(title: &str) -> Frame {
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(svg, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="28" text-anchor="middle" font-size="15">{}</text>"#,
            W / 2.0,
            esc(title)
        );
        let _ = writeln!(
            svg,
            r##"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
            W - LEFT - RIGHT,
            H - TOP - BOTTOM
        );
        Frame { svg }
    }

    fn xtick(&mut self, x: f64, label: &str) {
        let _ = writeln!(
            self.svg,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            H - BOTTOM,
            H - BOTTOM + 18.0,
            esc(label)
        );
    }

    fn ytick(&mut self, y: f64, label: &str) {
        let _ = writeln!(
            self.svg,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            esc(label)
        );
    }

    fn axis_labels(&mut self, x: &str, y: &str) {
        let _ = writeln!(
            self.svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            (LEFT + W - RIGHT) / 2.0,
            H - 18.0,
            esc(x)
        );
        let _ = writeln!(
            self.svg,
            r#"<text transform="translate(20,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
            (TOP + H - BOTTOM) / 2.0,
            esc(y)
        );
    }

    fn line(&mut self, pts: &[(f64, f64)], color: &str, markers: bool) {
        if pts.is_empty() {
            return;
        }
        let d: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = writeln!(
            self.svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            d.join(" ")
        );
        if markers {
            for (x, y) in pts {
                let _ = writeln!(
                    self.svg,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{color}"/>"#
                );
            }
        }
    }

    fn legend(&mut self, i: usize, label: &str, color: &str) {
        let x = LEFT + 12.0;
        let y = TOP + 16.0 + i as f64 * 16.0;
        let _ = writeln!(
            self.svg,
            r#"<line x1="{x}" y1="{}" x2="{}" y2="{}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            y - 4.0,
            x + 18.0,
            y - 4.0,
            x + 24.0,
            y,
            esc(label)
        );
    }

    fn finish(mut self) -> String {
        self.svg.push_str("</svg>\n");
        self.svg
    }
}

/// A "nice" axis maximum and step (1, 2 or 5 times a power of ten) above `max`.
fn nice(max: f64) -> (f64, f64) {
    let max = if max > 0.0 { max } else { 1.0 };
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

fn fmt_us(v: f64) -> String {
    if v >= 1000.0 {
        group(v)
    } else if v >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Latency (µs, linear) against percentile (log scale of 1/(1-q)), like HdrHistogram's
/// plotter.
pub fn percentiles(h: &Histogram<u64>, title: &str) -> String {
    let us_at = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let mut f = Frame::new(title);
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    // Decades of 1/(1-q) shown: enough for the count (q can resolve 1 - 1/count), 2..6.
    let decades = ((h.len().max(1) as f64).log10().ceil() as i32).clamp(2, 6);
    let ymax_raw = h.max() as f64 / 1000.0;
    let (ymax, ystep) = nice(ymax_raw);
    let x_of = |q: f64| {
        let inv = if q >= 1.0 {
            10f64.powi(decades)
        } else {
            (1.0 / (1.0 - q)).min(10f64.powi(decades))
        };
        LEFT + inv.log10() / decades as f64 * pw
    };
    let y_of = |v: f64| TOP + ph - v / ymax * ph;
    let labels = ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%"];
    for (d, label) in labels.iter().enumerate().take(decades as usize + 1) {
        f.xtick(LEFT + d as f64 / decades as f64 * pw, label);
    }
    let mut v = 0.0;
    while v <= ymax + ystep / 2.0 {
        f.ytick(y_of(v), &fmt_us(v));
        v += ystep;
    }
    f.axis_labels("percentile", "latency (us)");
    let mut pts = Vec::new();
    if !h.is_empty() {
        for it in h.iter_quantiles(5) {
            let q = it.quantile_iterated_to();
            let val = h.highest_equivalent(it.value_iterated_to()) as f64 / 1000.0;
            pts.push((x_of(q), y_of(val.min(ymax))));
        }
    }
    f.line(&pts, COLORS[0], false);
    f.legend(
        0,
        &format!(
            "{} messages, p50 {} us, p99 {} us, p99.9 {} us, max {} us",
            group(h.len() as f64),
            fmt_us(us_at(0.5)),
            fmt_us(us_at(0.99)),
            fmt_us(us_at(0.999)),
            fmt_us(ymax_raw)
        ),
        COLORS[0],
    );
    f.finish()
}

/// Latency percentiles (µs, log scale) against achieved load: one point per (achieved
/// messages/s, latency histogram in ns), e.g. per sweep rate.
pub fn sweep(points: &[(f64, &Histogram<u64>)], title: &str) -> String {
    let mut f = Frame::new(title);
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let series: [(&str, f64); 5] = [
        ("p50", 0.5),
        ("p90", 0.9),
        ("p99", 0.99),
        ("p99.9", 0.999),
        ("max", 1.0),
    ];
    let runs: Vec<&(f64, &Histogram<u64>)> = points.iter().filter(|(_, h)| !h.is_empty()).collect();
    let xmax_raw = runs.iter().map(|(x, _)| *x).fold(0.0, f64::max);
    let (xmax, xstep) = nice(xmax_raw);
    let lat = |r: &&(f64, &Histogram<u64>), q: f64| {
        let h = r.1;
        if q >= 1.0 {
            h.max() as f64 / 1000.0
        } else {
            h.value_at_quantile(q) as f64 / 1000.0
        }
        .max(0.001)
    };
    let ylo_raw = runs.iter().map(|r| lat(r, 0.5)).fold(f64::MAX, f64::min);
    let yhi_raw = runs.iter().map(|r| lat(r, 1.0)).fold(0.0, f64::max);
    let (ylo, yhi) = if runs.is_empty() {
        (0.0, 3.0)
    } else {
        (
            ylo_raw.log10().floor(),
            yhi_raw.log10().ceil().max(ylo_raw.log10().floor() + 1.0),
        )
    };
    let x_of = |v: f64| LEFT + v / xmax * pw;
    let y_of = |v: f64| TOP + ph - (v.log10() - ylo) / (yhi - ylo) * ph;
    let mut x = 0.0;
    while x <= xmax + xstep / 2.0 {
        f.xtick(x_of(x), &group(x));
        x += xstep;
    }
    let mut d = ylo;
    while d <= yhi + 0.5 {
        f.ytick(y_of(10f64.powf(d)), &fmt_us(10f64.powf(d)));
        d += 1.0;
    }
    f.axis_labels("achieved load (messages/s)", "latency (us, log scale)");
    for (i, (name, q)) in series.iter().enumerate() {
        let pts: Vec<(f64, f64)> = runs.iter().map(|r| (x_of(r.0), y_of(lat(r, *q)))).collect();
        f.line(&pts, COLORS[i], true);
        f.legend(i, name, COLORS[i]);
    }
    f.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_axes() {
        assert_eq!(nice(87.0), (100.0, 20.0));
        assert_eq!(nice(1.0), (1.0, 0.2));
        assert_eq!(nice(4300.0), (5000.0, 1000.0));
    }

    #[test]
    fn percentile_plot_is_one_svg_with_a_curve() {
        let mut h = crate::bench::tally::new_histogram();
        for v in 1..=10_000u64 {
            h.record(v * 100).unwrap();
        }
        let svg = percentiles(&h, "test <run>");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert!(svg.contains("99.99%"));
        assert!(svg.contains("test &lt;run&gt;"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
    }
}
