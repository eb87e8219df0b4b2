//! Logging to stderr: today's human text, or one JSON object a line (`--log-format json`)
//! for log collectors. The JSON lines carry the same events and fields as the text, fields
//! as numbers and booleans where they are, with `timestamp`, `level` and `message` first.

use std::fmt;

use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// How log lines look (see `--log-format`).
#[derive(clap::ValueEnum, Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable text: time, level, message, key=value fields.
    #[default]
    Text,
    /// One JSON object a line: {"timestamp", "level", "message", fields...}.
    Json,
}

/// Installs the global subscriber: `filter` (else RUST_LOG, else info), to stderr.
pub fn init(filter: Option<&str>, format: LogFormat) {
    let filter = match filter {
        Some(f) => EnvFilter::new(f),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.with_ansi(false).event_format(Json).init(),
    }
}

/// Prints a fatal error (the last line of a failed run) in the chosen format.
pub fn print_error(format: LogFormat, e: &anyhow::Error) {
    match format {
        LogFormat::Text => eprintln!("echoport: error: {e:#}"),
        LogFormat::Json => {
            let mut line = String::new();
            let _ = write_object(&mut line, "ERROR", &format!("echoport: error: {e:#}"), &[]);
            eprintln!("{line}");
        }
    }
}

fn now() -> String {
    let mut s = String::new();
    let _ = SystemTime.format_time(&mut Writer::new(&mut s));
    s
}

/// The JSON event format.
struct Json;

impl<S, N> FormatEvent<S, N> for Json
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let level = event.metadata().level().as_str();
        write_object(&mut writer, level, &fields.message, &fields.rest)?;
        writeln!(writer)
    }
}

/// Writes `{"timestamp":..,"level":..,"message":..,fields...}` in that order (serde_json's
/// map would sort the keys).
fn write_object(
    w: &mut impl fmt::Write,
    level: &str,
    message: &str,
    rest: &[(&'static str, Value)],
) -> fmt::Result {
    let q = |s: &str| Value::String(s.to_string());
    write!(
        w,
        "{{\"timestamp\":{},\"level\":{},\"message\":{}",
        q(&now()),
        q(level),
        q(message)
    )?;
    for (k, v) in rest {
        write!(w, ",{}:{v}", q(k))?;
    }
    w.write_char('}')
}

/// Collects an event's fields as JSON values, in the order they were recorded.
#[derive(Default)]
struct Fields {
    message: String,
    rest: Vec<(&'static str, Value)>,
}

impl Fields {
    fn put(&mut self, field: &Field, v: Value) {
        match (field.name(), v) {
            ("message", Value::String(m)) => self.message = m,
            (name, v) => self.rest.push((name, v)),
        }
    }
}

impl Visit for Fields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let v = serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number);
        self.put(field, v);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `%x` fields and the message arrive here already formatted for display.
        self.put(field, format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Captures what the subscriber writes.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn fields_keep_their_types() {
        let buf = Buf::default();
        let out = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .event_format(Json)
            .finish();
        tracing::subscriber::with_default(sub, || {
            let addr = "127.0.0.1:7";
            tracing::info!(n = 3u64, neg = -2i64, ok = true, r = 0.5, name = %"a b", "listening on {addr}");
            tracing::warn!(quote = "say \"hi\"\nnow", "two\nlines");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        let a = &lines[0];
        assert_eq!(a["level"], "INFO");
        assert_eq!(a["message"], "listening on 127.0.0.1:7");
        assert_eq!((a["n"].as_u64(), a["neg"].as_i64()), (Some(3), Some(-2)));
        assert_eq!(
            (a["ok"].as_bool(), a["r"].as_f64()),
            (Some(true), Some(0.5))
        );
        assert_eq!(a["name"], "a b");
        assert!(a["timestamp"].as_str().unwrap().ends_with('Z'), "{a}");
        assert!(text.starts_with("{\"timestamp\":\""), "{text}");
        assert!(
            text.contains("\",\"level\":\"INFO\",\"message\":\"listening"),
            "{text}"
        );
        assert_eq!(lines[1]["message"], "two\nlines");
        assert_eq!(lines[1]["quote"], "say \"hi\"\nnow");
    }
}
