//! The wire format of the control socket: one JSON object per line in each
//! direction.
//!
//! Requests are parsed into [`Request`] before anything is executed, so a bad
//! line never reaches the target. Replies are built and parsed here too, so the
//! server and the client cannot disagree on their shape.
//!
//! Lines are read with [`read_line`], which never holds more than the limit
//! plus one byte of a line in memory: a peer that sends an endless line costs
//! a bounded buffer, not the daemon's memory.

use serde::Deserialize;
use serde_json::{json, Value};
use std::io::{self, BufRead, Read};

/// Longest request line the server accepts, without its newline.
pub const MAX_REQUEST_LINE: usize = 64 * 1024;

/// Longest reply line the client accepts, without its newline. A status
/// object is a few KiB; the margin leaves room for future fields.
pub const MAX_REPLY_LINE: usize = 1024 * 1024;

/// A control request, as sent on the wire (`{"cmd":"set-mode","mode":"..."}`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Report the target's status object.
    Status,
    /// Write back every dirty block, streaming progress.
    Flush,
    /// Switch the write mode; the target validates the name.
    SetMode { mode: String },
    /// Zero the statistics counters.
    ResetStats,
}

impl Request {
    /// Every command name the server knows, with the fields it takes besides
    /// `cmd`. Unknown fields are rejected rather than ignored, so a typo such
    /// as `"mdoe"` is reported instead of silently doing something else.
    pub const COMMANDS: [(&'static str, &'static [&'static str]); 4] = [
        ("status", &[]),
        ("flush", &[]),
        ("set-mode", &["mode"]),
        ("reset-stats", &[]),
    ];

    /// The request as one line of JSON, without the newline.
    pub fn to_line(&self) -> String {
        let v = match self {
            Request::Status => json!({"cmd": "status"}),
            Request::Flush => json!({"cmd": "flush"}),
            Request::SetMode { mode } => json!({"cmd": "set-mode", "mode": mode}),
            Request::ResetStats => json!({"cmd": "reset-stats"}),
        };
        v.to_string()
    }
}

/// Why a request line was rejected. Each message names what is wrong and is
/// sent back to the client as the error reply.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("request is not valid UTF-8 (invalid byte at offset {valid_up_to})")]
    NotUtf8 { valid_up_to: usize },
    #[error("request is not valid JSON: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error("request must be a JSON object, got {found}")]
    NotAnObject { found: &'static str },
    #[error("request has no \"cmd\" field")]
    MissingCmd,
    #[error("request field \"cmd\" must be a string, got {found}")]
    CmdNotString { found: &'static str },
    #[error("unknown command \"{0}\" (expected status, flush, set-mode or reset-stats)")]
    UnknownCommand(String),
    #[error("unknown field \"{field}\" in \"{cmd}\" request")]
    UnknownField { cmd: String, field: String },
    #[error("invalid \"{cmd}\" request: {source}")]
    BadFields {
        cmd: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("request line is longer than {limit} bytes")]
    TooLong { limit: usize },
}

/// The JSON type name of `v`, for error messages.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses one request line (without its newline). Pure: no I/O, no target.
///
/// The checks run in the order a human would fix them: encoding, JSON syntax,
/// shape, command name, then the command's own fields (missing, mistyped or
/// unknown fields are all rejected).
pub fn parse_request(line: &[u8]) -> Result<Request, RequestError> {
    let text = std::str::from_utf8(line).map_err(|e| RequestError::NotUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    let value: Value = serde_json::from_str(text).map_err(RequestError::Malformed)?;
    let obj = value.as_object().ok_or(RequestError::NotAnObject {
        found: type_name(&value),
    })?;
    let cmd = match obj.get("cmd") {
        None => return Err(RequestError::MissingCmd),
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(RequestError::CmdNotString {
                found: type_name(other),
            })
        }
    };
    let Some((_, fields)) = Request::COMMANDS.iter().find(|(name, _)| *name == cmd) else {
        return Err(RequestError::UnknownCommand(cmd));
    };
    // Serde's deny_unknown_fields does not cover unit variants of an
    // internally tagged enum, so the check is done here for every command.
    if let Some(field) = obj
        .keys()
        .find(|k| *k != "cmd" && !fields.contains(&k.as_str()))
    {
        return Err(RequestError::UnknownField {
            cmd,
            field: field.clone(),
        });
    }
    Request::deserialize(value).map_err(|source| RequestError::BadFields { cmd, source })
}

/// One reply line from the server.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `{"ok":true,"status":{...}}`: the answer to `status`.
    Status(Value),
    /// `{"progress":{"done":N,"total":M}}`: an intermediate `flush` line.
    Progress { done: u64, total: u64 },
    /// `{"ok":true,"mode":"..."}`: the answer to `set-mode`.
    ModeSet(String),
    /// `{"ok":true}`: the end of `flush` and the answer to `reset-stats`.
    Done,
    /// `{"ok":false,"error":"..."}`: the request failed; the message is one line.
    Error(String),
}

impl Reply {
    /// An error reply; line breaks in `msg` become spaces so it stays one line
    /// for humans as well as for the framing.
    pub fn error(msg: impl std::fmt::Display) -> Reply {
        Reply::Error(msg.to_string().replace(['\n', '\r'], " "))
    }

    /// The reply as one line of JSON, without the newline.
    pub fn to_line(&self) -> String {
        let v = match self {
            Reply::Status(s) => json!({"ok": true, "status": s}),
            Reply::Progress { done, total } => {
                json!({"progress": {"done": done, "total": total}})
            }
            Reply::ModeSet(m) => json!({"ok": true, "mode": m}),
            Reply::Done => json!({"ok": true}),
            Reply::Error(e) => json!({"ok": false, "error": e}),
        };
        v.to_string()
    }

    /// Parses a reply line; `None` when it has none of the known shapes.
    pub fn parse(line: &[u8]) -> Option<Reply> {
        let v: Value = serde_json::from_slice(line).ok()?;
        let obj = v.as_object()?;
        if let Some(p) = obj.get("progress") {
            let done = p.get("done")?.as_u64()?;
            let total = p.get("total")?.as_u64()?;
            return Some(Reply::Progress { done, total });
        }
        match obj.get("ok")?.as_bool()? {
            false => Some(Reply::Error(obj.get("error")?.as_str()?.to_string())),
            true => {
                if let Some(s) = obj.get("status") {
                    Some(Reply::Status(s.clone()))
                } else if let Some(m) = obj.get("mode") {
                    Some(Reply::ModeSet(m.as_str()?.to_string()))
                } else {
                    Some(Reply::Done)
                }
            }
        }
    }
}

/// The outcome of reading one line.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A complete line, newline stripped. The last line of the stream may lack
    /// its newline.
    Data(Vec<u8>),
    /// The line exceeded the limit; the rest of it is still unread.
    TooLong,
    /// End of stream before any byte of a new line.
    Eof,
}

/// Reads one `\n`-terminated line of at most `limit` bytes (plus newline).
///
/// At most `limit + 1` bytes are read for a line, so memory stays bounded
/// whatever the peer sends. I/O errors (including read timeouts) are returned
/// as they are.
pub fn read_line<R: BufRead>(reader: &mut R, limit: usize) -> io::Result<Line> {
    let mut buf = Vec::new();
    let cap = u64::try_from(limit)
        .ok()
        .and_then(|l| l.checked_add(1))
        .unwrap_or(u64::MAX);
    let n = reader.by_ref().take(cap).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(Line::Eof);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        return Ok(Line::Data(buf));
    }
    if buf.len() > limit {
        return Ok(Line::TooLong);
    }
    Ok(Line::Data(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(line: &str) -> RequestError {
        parse_request(line.as_bytes()).unwrap_err()
    }

    #[test]
    fn parses_every_command() {
        assert_eq!(
            parse_request(br#"{"cmd":"status"}"#).unwrap(),
            Request::Status
        );
        assert_eq!(
            parse_request(br#" {"cmd" : "flush"} "#).unwrap(),
            Request::Flush
        );
        assert_eq!(
            parse_request(br#"{"mode":"writethrough","cmd":"set-mode"}"#).unwrap(),
            Request::SetMode {
                mode: "writethrough".into()
            }
        );
        assert_eq!(
            parse_request(br#"{"cmd":"reset-stats"}"#).unwrap(),
            Request::ResetStats
        );
    }

    #[test]
    fn request_lines_round_trip() {
        for req in [
            Request::Status,
            Request::Flush,
            Request::SetMode {
                mode: "passthrough".into(),
            },
            Request::ResetStats,
        ] {
            let line = req.to_line();
            assert!(!line.contains('\n'));
            assert_eq!(parse_request(line.as_bytes()).unwrap(), req);
        }
    }

    #[test]
    fn non_utf8_names_the_offset() {
        let e = parse_request(b"{\"cmd\":\"st\xffatus\"}").unwrap_err();
        assert!(
            matches!(e, RequestError::NotUtf8 { valid_up_to: 10 }),
            "{e:?}"
        );
        assert!(e.to_string().contains("UTF-8"));
    }

    #[test]
    fn malformed_json() {
        for line in [r#"{"cmd":"status""#, "status", "", r#"{"cmd":}"#] {
            let e = err(line);
            assert!(matches!(e, RequestError::Malformed(_)), "{line}: {e:?}");
            assert!(e.to_string().starts_with("request is not valid JSON"));
        }
    }

    #[test]
    fn not_an_object() {
        let e = err(r#"["status"]"#);
        assert!(
            matches!(e, RequestError::NotAnObject { found: "an array" }),
            "{e:?}"
        );
        let e = err("42");
        assert!(
            matches!(e, RequestError::NotAnObject { found: "a number" }),
            "{e:?}"
        );
    }

    #[test]
    fn missing_or_mistyped_cmd() {
        assert!(matches!(err(r#"{"mode":"x"}"#), RequestError::MissingCmd));
        let e = err(r#"{"cmd":7}"#);
        assert!(
            matches!(e, RequestError::CmdNotString { found: "a number" }),
            "{e:?}"
        );
        assert!(e.to_string().contains("\"cmd\""));
    }

    #[test]
    fn unknown_command_is_named() {
        let e = err(r#"{"cmd":"explode"}"#);
        assert!(
            matches!(&e, RequestError::UnknownCommand(c) if c == "explode"),
            "{e:?}"
        );
        assert!(e.to_string().contains("explode"));
    }

    #[test]
    fn set_mode_field_errors() {
        let e = err(r#"{"cmd":"set-mode"}"#);
        assert!(matches!(&e, RequestError::BadFields { cmd, .. } if cmd == "set-mode"));
        assert!(e.to_string().contains("missing field `mode`"), "{e}");

        let e = err(r#"{"cmd":"set-mode","mode":3}"#);
        assert!(matches!(&e, RequestError::BadFields { .. }));
        assert!(e.to_string().contains("invalid type"), "{e}");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let e = err(r#"{"cmd":"status","verbose":true}"#);
        assert!(
            matches!(&e, RequestError::UnknownField { cmd, field } if cmd == "status" && field == "verbose"),
            "{e:?}"
        );
        assert!(e.to_string().contains("verbose"), "{e}");
        let e = err(r#"{"cmd":"set-mode","mode":"writeback","force":1}"#);
        assert!(matches!(&e, RequestError::UnknownField { field, .. } if field == "force"));
        // A typo of the one field set-mode takes is reported as such.
        let e = err(r#"{"cmd":"set-mode","mdoe":"writeback"}"#);
        assert!(matches!(&e, RequestError::UnknownField { field, .. } if field == "mdoe"));
    }

    #[test]
    fn replies_round_trip() {
        let replies = [
            Reply::Status(json!({"mode": "writeback", "stats": {"reads": 3}})),
            Reply::Progress { done: 5, total: 9 },
            Reply::ModeSet("writearound".into()),
            Reply::Done,
            Reply::Error("bad thing".into()),
        ];
        for r in replies {
            let line = r.to_line();
            assert!(!line.contains('\n'));
            assert_eq!(Reply::parse(line.as_bytes()), Some(r));
        }
        assert_eq!(Reply::error("two\nlines"), Reply::Error("two lines".into()));
        assert_eq!(Reply::parse(b"{\"hello\":1}"), None);
        assert_eq!(Reply::parse(b"{\"ok\":false}"), None);
    }

    #[test]
    fn read_line_is_bounded() {
        let mut r = io::Cursor::new(b"abc\r\n\nxyz".to_vec());
        assert_eq!(read_line(&mut r, 8).unwrap(), Line::Data(b"abc".to_vec()));
        assert_eq!(read_line(&mut r, 8).unwrap(), Line::Data(Vec::new()));
        assert_eq!(read_line(&mut r, 8).unwrap(), Line::Data(b"xyz".to_vec()));
        assert_eq!(read_line(&mut r, 8).unwrap(), Line::Eof);

        // Exactly at the limit is fine; one byte more is not.
        let mut r = io::Cursor::new(b"12345678\n123456789\n".to_vec());
        assert_eq!(
            read_line(&mut r, 8).unwrap(),
            Line::Data(b"12345678".to_vec())
        );
        assert_eq!(read_line(&mut r, 8).unwrap(), Line::TooLong);
        // Only limit + 1 bytes were consumed by the long line.
        assert_eq!(r.position(), 9 + 9);
    }
}
