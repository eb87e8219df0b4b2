//! HdrHistogram's own formats, so runs can be combined without loss and read by its tools:
//!
//! - a histogram as text: the V2 compressed (deflate) encoding in base64, the form the Java
//!   and Rust libraries and `HistogramLogProcessor` read (it begins `HISTF`);
//! - the interval log (`.hlog`): a header (`#[StartTime: ...]`, `#[BaseTime: ...]`, the
//!   legend) and one line per interval, `[Tag=T,]start,length,max,histogram`, times in
//!   seconds after BaseTime and the max in milliseconds (values are recorded in nanoseconds,
//!   the Java writer's default unit ratio).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use base64::Engine as _;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2DeflateSerializer};

use super::parse::rfc3339_utc;

/// The one encoding written here, named in the JSON next to each histogram.
pub const ENCODING: &str = "HdrHistogram V2 compressed (deflate), base64";

/// Interval_Max is the max in milliseconds: nanoseconds divided by this.
const MAX_DIVISOR: f64 = 1e6;

/// A histogram as base64 text of its V2 compressed encoding.
pub fn encode(h: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    V2DeflateSerializer::new()
        .serialize(h, &mut bytes)
        .expect("serializing to memory does not fail");
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The histogram [`encode`] (or any HdrHistogram V2 writer) made.
pub fn decode(text: &str) -> Result<Histogram<u64>, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| format!("not base64: {e}"))?;
    Deserializer::new()
        .deserialize(&mut &bytes[..])
        .map_err(|e| format!("not an HdrHistogram V2 encoding: {e:?}"))
}

/// An interval log being written (flushed after every interval, so a run cut short still
/// leaves what it measured).
pub struct Hlog {
    out: BufWriter<File>,
    base_unix_s: f64,
}

impl Hlog {
    /// Creates `path` and writes the header: `comment`, the format version, StartTime and
    /// BaseTime (both `base_unix_s`, the start of the first measured window) and the legend.
    pub fn create(path: &Path, comment: &str, base_unix_s: f64) -> io::Result<Hlog> {
        let mut out = BufWriter::new(File::create(path)?);
        for line in comment.lines() {
            writeln!(out, "#{line}")?;
        }
        writeln!(out, "#[Histogram log format version 1.3]")?;
        writeln!(
            out,
            "#[StartTime: {base_unix_s:.3} (seconds since epoch), {}]",
            rfc3339_utc(base_unix_s)
        )?;
        writeln!(out, "#[BaseTime: {base_unix_s:.3} (seconds since epoch)]")?;
        writeln!(
            out,
            "#[Values in nanoseconds; Interval_Max in milliseconds (divisor {MAX_DIVISOR:.0})]"
        )?;
        writeln!(
            out,
            "\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\""
        )?;
        out.flush()?;
        Ok(Hlog { out, base_unix_s })
    }

    /// One interval starting `start_unix_s` (absolute), `length_s` long.
    pub fn interval(
        &mut self,
        tag: Option<&str>,
        start_unix_s: f64,
        length_s: f64,
        h: &Histogram<u64>,
    ) -> io::Result<()> {
        if let Some(t) = tag {
            write!(self.out, "Tag={t},")?;
        }
        writeln!(
            self.out,
            "{:.3},{:.3},{:.3},{}",
            (start_unix_s - self.base_unix_s).max(0.0),
            length_s,
            h.max() as f64 / MAX_DIVISOR,
            encode(h)
        )?;
        self.out.flush()
    }
}

/// Whether `t` can be an interval log tag (no comma, space or line break).
pub fn valid_tag(t: &str) -> bool {
    !t.is_empty() && !t.contains([',', ' ', '\r', '\n', '\t'])
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};

    fn sample() -> Histogram<u64> {
        let mut h = Histogram::new_with_bounds(1, 3_600_000_000_000, 3).unwrap();
        for v in [1u64, 999, 12_345, 12_345, 7_000_000, 3_599_999_999_999] {
            h.record(v).unwrap();
        }
        h
    }

    #[test]
    fn a_histogram_survives_the_text_encoding_exactly() {
        let h = sample();
        let text = encode(&h);
        assert!(text.starts_with("HISTF"), "V2 compressed cookie: {text}");
        let back = decode(&text).unwrap();
        assert_eq!(back, h);
        assert_eq!(back.len(), 6);
        assert_eq!(back.value_at_quantile(0.5), h.value_at_quantile(0.5));
        assert!(decode("not base64!").is_err());
        assert!(decode("aGVsbG8=").is_err(), "base64 of something else");
    }

    #[test]
    fn the_interval_log_reads_back_with_the_libraries_parser() {
        let path = std::env::temp_dir().join(format!("echoport-hdr-{}.hlog", std::process::id()));
        let base = 1_764_583_200.25;
        let mut log = Hlog::create(&path, "echoport test", base).unwrap();
        log.interval(Some("a"), base, 1.0, &sample()).unwrap();
        log.interval(None, base + 1.0, 0.5, &sample()).unwrap();
        drop(log);
        let text = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let entries: Vec<_> = IntervalLogIterator::new(&text)
            .collect::<Result<Vec<_>, _>>()
            .unwrap_or_else(|e| panic!("{e:?}:\n{}", String::from_utf8_lossy(&text)));
        assert!(matches!(entries[0], LogEntry::StartTime(d) if d.as_millis() == 1_764_583_200_250));
        assert!(matches!(entries[1], LogEntry::BaseTime(d) if d.as_millis() == 1_764_583_200_250));
        let ivs: Vec<_> = entries
            .iter()
            .filter_map(|e| match e {
                LogEntry::Interval(i) => Some(i),
                _ => None,
            })
            .collect();
        assert_eq!(ivs.len(), 2);
        assert_eq!(ivs[0].tag().map(|t| t.as_str()), Some("a"));
        assert_eq!(ivs[1].start_timestamp().as_millis(), 1000);
        assert_eq!(ivs[1].duration().as_millis(), 500);
        assert!(
            (ivs[0].max() / 3_600_000.0 - 1.0).abs() < 0.002,
            "{}",
            ivs[0].max()
        );
        assert_eq!(decode(ivs[1].encoded_histogram()).unwrap(), sample());
    }
}
