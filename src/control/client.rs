//! The control client behind `vblkcache status|flush|set-mode|reset-stats`.
//!
//! It sends one request, reads reply lines until the final one, and renders
//! them for a human (or, for `status --json`, as the raw JSON object).

use super::protocol::{self, Line, Reply, Request};
use super::{ClientCommand, ControlError};
use serde_json::{Map, Value};
use std::io::{self, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long quick commands (status, reset-stats) wait for the server. Flush
/// and set-mode may write back the whole cache, so they wait without limit.
const QUICK_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

fn io_err(path: &Path, source: io::Error) -> ControlError {
    ControlError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// See [`super::run_client`].
pub fn run(path: &Path, cmd: ClientCommand, out: &mut dyn Write) -> Result<(), ControlError> {
    let (request, timeout) = match &cmd {
        ClientCommand::Status { .. } => (Request::Status, Some(QUICK_REPLY_TIMEOUT)),
        ClientCommand::ResetStats => (Request::ResetStats, Some(QUICK_REPLY_TIMEOUT)),
        ClientCommand::Flush => (Request::Flush, None),
        ClientCommand::SetMode(m) => (Request::SetMode { mode: m.clone() }, None),
    };
    let stream = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.display().to_string(),
        source,
    })?;
    stream
        .set_read_timeout(timeout)
        .map_err(|e| io_err(path, e))?;
    let mut line = request.to_line();
    line.push('\n');
    (&stream)
        .write_all(line.as_bytes())
        .map_err(|e| io_err(path, e))?;
    let mut reader = BufReader::new(&stream);
    let mut last_done = 0u64;
    let mut shown = None;
    loop {
        let read =
            protocol::read_line(&mut reader, protocol::MAX_REPLY_LINE).map_err(|e| {
                match (e.kind(), timeout) {
                    (io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut, Some(t)) => {
                        ControlError::Timeout {
                            path: path.display().to_string(),
                            secs: t.as_secs(),
                        }
                    }
                    _ => io_err(path, e),
                }
            })?;
        let reply = match read {
            Line::Eof => {
                return Err(ControlError::Protocol(
                    "the server closed the connection without a final reply".into(),
                ))
            }
            Line::TooLong => {
                return Err(ControlError::Protocol(format!(
                    "reply line longer than {} bytes",
                    protocol::MAX_REPLY_LINE
                )))
            }
            Line::Data(l) => Reply::parse(&l).ok_or_else(|| {
                ControlError::Protocol(format!(
                    "unexpected reply: {}",
                    String::from_utf8_lossy(&l)
                        .chars()
                        .take(200)
                        .collect::<String>()
                ))
            })?,
        };
        let o = ControlError::Output;
        match (reply, &cmd) {
            (Reply::Error(msg), _) => return Err(ControlError::Remote(msg)),
            (Reply::Progress { done, total }, ClientCommand::Flush) => {
                last_done = done;
                // One line per tenth of the way, not per update.
                let step = percent(done, total) / 10;
                if shown != Some(step) {
                    shown = Some(step);
                    writeln!(out, "{}", progress_line(done, total)).map_err(o)?;
                }
            }
            (Reply::Done, ClientCommand::Flush) => {
                writeln!(out, "flush complete: {last_done} blocks written back").map_err(o)?;
                return Ok(());
            }
            (Reply::Status(status), ClientCommand::Status { json }) => {
                let text = if *json {
                    status.to_string()
                } else {
                    format_status(&status)
                };
                writeln!(out, "{text}").map_err(o)?;
                return Ok(());
            }
            (Reply::ModeSet(mode), ClientCommand::SetMode(_)) => {
                writeln!(out, "write mode is now {mode}").map_err(o)?;
                return Ok(());
            }
            (Reply::Done, ClientCommand::ResetStats) => {
                writeln!(out, "statistics reset").map_err(o)?;
                return Ok(());
            }
            (other, _) => {
                return Err(ControlError::Protocol(format!(
                    "reply {} does not answer {}",
                    other.to_line(),
                    request.to_line()
                )))
            }
        }
    }
}

/// Rounded down, so 100% is shown only when the flush is really done.
fn percent(done: u64, total: u64) -> u128 {
    match total {
        0 => 100,
        t => u128::from(done.min(t)) * 100 / u128::from(t),
    }
}

fn progress_line(done: u64, total: u64) -> String {
    format!(
        "flushing: {done}/{total} blocks ({}%)",
        percent(done, total)
    )
}

/// Top-level fields shown first, in this order; other scalar fields follow,
/// then every nested object as an indented section.
const LEADING: [&str; 10] = [
    "mode",
    "source",
    "source_identity",
    "cache_device",
    "source_size",
    "cache_device_size",
    "valid_blocks",
    "dirty_blocks",
    "hit_ratio",
    "uptime_secs",
];

/// Renders a status object as an aligned two-column table. It does not assume
/// a fixed set of fields: anything the engine adds is printed by its JSON name
/// (serde_json keeps object keys sorted, so sections list fields
/// alphabetically).
pub fn format_status(status: &Value) -> String {
    let Some(obj) = status.as_object() else {
        return status.to_string();
    };
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut sections: Vec<(&str, &Map<String, Value>)> = Vec::new();
    let add = |key: &str, v: &Value, rows: &mut Vec<(String, String)>| {
        rows.push((label(key).to_string(), format_value(key, v)));
    };
    for key in LEADING {
        if let Some(v) = obj.get(key) {
            add(key, v, &mut rows);
        }
    }
    for (key, v) in obj {
        if LEADING.contains(&key.as_str()) {
            continue;
        }
        match v {
            Value::Object(m) => sections.push((key, m)),
            _ => add(key, v, &mut rows),
        }
    }
    let mut lines: Vec<(String, String)> = rows;
    for (name, m) in sections {
        lines.push((format!("{name}:"), String::new()));
        for (key, v) in m {
            lines.push((format!("  {}", label(key)), format_value(key, v)));
        }
    }
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut s = String::new();
    for (k, v) in lines {
        if v.is_empty() {
            s.push_str(&k);
        } else {
            s.push_str(&format!("{k:<width$}  {v}"));
        }
        s.push('\n');
    }
    s.pop();
    s
}

/// The row label of a field: its JSON name (so table and `--json` output use
/// the same words), except where the value is rendered in another unit.
fn label(key: &str) -> &str {
    match key {
        "uptime_secs" => "uptime",
        k => k,
    }
}

fn format_value(key: &str, v: &Value) -> String {
    match (key, v) {
        ("hit_ratio", Value::Number(n)) => match n.as_f64() {
            Some(r) => format!("{:.2} %", r * 100.0),
            None => n.to_string(),
        },
        ("uptime_secs", Value::Number(n)) => match n.as_f64() {
            Some(secs) => format_duration(secs),
            None => n.to_string(),
        },
        (k, Value::Number(n)) if k.ends_with("_size") || k.starts_with("bytes_") => {
            match n.as_u64() {
                Some(b) => format!("{b} ({})", human_bytes(b)),
                None => n.to_string(),
            }
        }
        (_, Value::String(s)) => s.clone(),
        (_, Value::Object(m)) => m
            .iter()
            .map(|(k, v)| format!("{k}={}", format_value(k, v)))
            .collect::<Vec<_>>()
            .join(" "),
        (_, other) => other.to_string(),
    }
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn format_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return format!("{secs} s");
    }
    let total = secs as u64;
    let (d, h, m, s) = (
        total / 86_400,
        total / 3600 % 24,
        total / 60 % 60,
        total % 60,
    );
    if d > 0 {
        format!("{d}d {h:02}h {m:02}m {s:02}s")
    } else {
        format!("{h}h {m:02}m {s:02}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn progress_percent_rounds_down() {
        assert_eq!(progress_line(0, 0), "flushing: 0/0 blocks (100%)");
        assert_eq!(progress_line(999, 1000), "flushing: 999/1000 blocks (99%)");
        assert_eq!(
            progress_line(u64::MAX, u64::MAX),
            format!("flushing: {0}/{0} blocks (100%)", u64::MAX)
        );
    }

    #[test]
    fn values_are_humanised() {
        assert_eq!(format_value("hit_ratio", &json!(0.875)), "87.50 %");
        assert_eq!(format_value("uptime_secs", &json!(3723.9)), "1h 02m 03s");
        assert_eq!(
            format_value("uptime_secs", &json!(90_061)),
            "1d 01h 01m 01s"
        );
        assert_eq!(
            format_value("source_size", &json!(1u64 << 30)),
            "1073741824 (1.0 GiB)"
        );
        assert_eq!(format_value("bytes_read", &json!(512)), "512 (512 B)");
        assert_eq!(format_value("mode", &json!("writeback")), "writeback");
        assert_eq!(format_value("reads", &json!(7)), "7");
    }

    #[test]
    fn table_is_aligned_and_lists_everything() {
        let status = json!({
            "mode": "writethrough",
            "hit_ratio": 0.5,
            "zeta": true,
            "stats": {"reads": 1, "writes": 22},
        });
        let t = format_status(&status);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            ["mode", "writethrough"]
        );
        assert!(lines[1].starts_with("hit_ratio ") && lines[1].ends_with("50.00 %"));
        assert!(lines.contains(&"stats:"));
        // Values start in the same column on every row.
        let starts: Vec<usize> = lines
            .iter()
            .filter(|l| !l.ends_with(':'))
            .map(|l| l.rfind("  ").map(|i| i + 2).unwrap_or(0))
            .collect();
        assert!(starts.windows(2).all(|w| w[0] == w[1]), "{t}");
        assert!(t.contains("zeta"));
        assert!(t.contains("  writes"));
    }
}
