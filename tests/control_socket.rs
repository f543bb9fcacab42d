//! The control server over a real Unix socket, with a fake target that
//! records what it was asked to do.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vblkcache::control::{
    run_client, ClientCommand, ControlError, ControlServer, ControlTarget, ServerLimits,
};

const MODES: [&str; 4] = ["writeback", "writethrough", "writearound", "passthrough"];

#[derive(Default)]
struct FakeTarget {
    mode: Mutex<String>,
    resets: AtomicU64,
    flushes: AtomicU64,
    /// Blocks the next flush pretends to write back.
    dirty: AtomicU64,
}

impl FakeTarget {
    fn new(dirty: u64) -> Arc<FakeTarget> {
        Arc::new(FakeTarget {
            mode: Mutex::new("writeback".into()),
            dirty: AtomicU64::new(dirty),
            ..Default::default()
        })
    }
}

impl ControlTarget for FakeTarget {
    fn status(&self) -> Value {
        json!({
            "mode": *self.mode.lock().unwrap(),
            "geometry": {"block_size": 65536, "cache_blocks": 1024, "assoc": 256, "run": 16},
            "source_size": 1u64 << 30,
            "cache_device_size": 64u64 << 20,
            "valid_blocks": 10,
            "dirty_blocks": self.dirty.load(Ordering::SeqCst),
            "hit_ratio": 0.25,
            "uptime_secs": 3725.5,
            "start": {"formatted": true, "clean": false, "entries_loaded": 0, "dirty_loaded": 0, "load_ms": 3},
            "stats": {"reads": 12, "writes": 34, "read_hits": 3, "resets": self.resets.load(Ordering::SeqCst)},
        })
    }

    fn flush_all(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<(), String> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        let total = self.dirty.swap(0, Ordering::SeqCst);
        for done in 0..=total {
            progress(done, total);
        }
        Ok(())
    }

    fn set_mode(&self, mode: &str) -> Result<(), String> {
        if !MODES.contains(&mode) {
            return Err(format!("unknown write mode '{mode}'"));
        }
        *self.mode.lock().unwrap() = mode.to_string();
        Ok(())
    }

    fn reset_stats(&self) {
        self.resets.fetch_add(1, Ordering::SeqCst);
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    target: Arc<FakeTarget>,
    server: Option<ControlServer>,
}

fn limits() -> ServerLimits {
    ServerLimits {
        max_connections: 4,
        idle_timeout: Duration::from_secs(5),
        write_timeout: Duration::from_secs(2),
        shutdown_grace: Duration::from_millis(500),
    }
}

fn start_with(limits: ServerLimits) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    let target = FakeTarget::new(4);
    let server = ControlServer::spawn_with_limits(&path, 0o600, target.clone(), limits).unwrap();
    Fixture {
        _dir: dir,
        path,
        target,
        server: Some(server),
    }
}

fn start() -> Fixture {
    start_with(limits())
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

/// A raw protocol connection.
struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Conn {
    fn open(path: &Path) -> Conn {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        Conn {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    fn recv(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).unwrap();
        assert!(n > 0, "connection closed while a reply was expected");
        assert!(line.ends_with('\n'));
        serde_json::from_str(&line).unwrap()
    }

    fn ask(&mut self, line: &str) -> Value {
        self.send_raw(format!("{line}\n").as_bytes());
        self.recv()
    }

    /// True when the server has closed the connection (EOF or reset).
    fn closed(&mut self) -> bool {
        let mut buf = [0u8; 16];
        match self.reader.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

fn error_of(reply: &Value) -> String {
    assert_eq!(reply["ok"], json!(false), "{reply}");
    reply["error"].as_str().unwrap().to_string()
}

#[test]
fn status_returns_the_target_object() {
    let f = start();
    let reply = Conn::open(&f.path).ask(r#"{"cmd":"status"}"#);
    assert_eq!(reply["ok"], json!(true));
    assert_eq!(reply["status"], f.target.status());
}

#[test]
fn flush_streams_progress_then_ok() {
    let f = start();
    let mut c = Conn::open(&f.path);
    c.send_raw(b"{\"cmd\":\"flush\"}\n");
    let mut seen = Vec::new();
    loop {
        let r = c.recv();
        if let Some(p) = r.get("progress") {
            seen.push((p["done"].as_u64().unwrap(), p["total"].as_u64().unwrap()));
        } else {
            assert_eq!(r, json!({"ok": true}));
            break;
        }
    }
    assert_eq!(seen, vec![(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]);
    assert_eq!(f.target.flushes.load(Ordering::SeqCst), 1);
}

#[test]
fn set_mode_good_and_bad() {
    let f = start();
    let mut c = Conn::open(&f.path);
    let r = c.ask(r#"{"cmd":"set-mode","mode":"writethrough"}"#);
    assert_eq!(r, json!({"ok": true, "mode": "writethrough"}));
    assert_eq!(*f.target.mode.lock().unwrap(), "writethrough");

    let e = error_of(&c.ask(r#"{"cmd":"set-mode","mode":"turbo"}"#));
    assert!(e.contains("turbo"), "{e}");
    assert_eq!(*f.target.mode.lock().unwrap(), "writethrough");

    let e = error_of(&c.ask(r#"{"cmd":"set-mode"}"#));
    assert!(e.contains("mode"), "{e}");
}

#[test]
fn reset_stats_reaches_the_target() {
    let f = start();
    let mut c = Conn::open(&f.path);
    assert_eq!(c.ask(r#"{"cmd":"reset-stats"}"#), json!({"ok": true}));
    assert_eq!(c.ask(r#"{"cmd":"reset-stats"}"#), json!({"ok": true}));
    assert_eq!(f.target.resets.load(Ordering::SeqCst), 2);
}

#[test]
fn bad_lines_get_errors_and_the_connection_keeps_working() {
    let f = start();
    let mut c = Conn::open(&f.path);
    let cases: [(&[u8], &str); 5] = [
        (b"{\"cmd\":\"status\"\n", "not valid JSON"),
        (b"{\"cmd\":\"explode\"}\n", "explode"),
        (b"{\"mode\":\"writeback\"}\n", "\"cmd\""),
        (b"{\"cmd\":\"st\xc3\x28tus\"}\n", "UTF-8"),
        (b"[1,2]\n", "JSON object"),
    ];
    for (line, needle) in cases {
        c.send_raw(line);
        let e = error_of(&c.recv());
        assert!(e.contains(needle), "{e} should mention {needle}");
        // The same connection still answers a good request.
        assert_eq!(c.ask(r#"{"cmd":"status"}"#)["ok"], json!(true));
    }
    // Blank lines are skipped without a reply.
    c.send_raw(b"\n  \n");
    assert_eq!(c.ask(r#"{"cmd":"reset-stats"}"#), json!({"ok": true}));
}

#[test]
fn oversize_line_is_refused_and_closes_only_that_connection() {
    let f = start();
    let mut c = Conn::open(&f.path);
    let mut big = vec![b' '; 70 * 1024];
    big.push(b'\n');
    c.send_raw(&big);
    let e = error_of(&c.recv());
    assert!(e.contains("65536"), "{e}");
    assert!(c.closed());
    assert_eq!(
        Conn::open(&f.path).ask(r#"{"cmd":"status"}"#)["ok"],
        json!(true)
    );
}

#[test]
fn a_stuck_client_does_not_block_another() {
    let f = start();
    // One client sends half a line and then nothing.
    let mut stuck = Conn::open(&f.path);
    stuck.send_raw(b"{\"cmd\":");
    let mut other = Conn::open(&f.path);
    let started = Instant::now();
    assert_eq!(other.ask(r#"{"cmd":"status"}"#)["ok"], json!(true));
    assert!(started.elapsed() < Duration::from_secs(2));
    // The stuck client can still finish its request.
    stuck.send_raw(b"\"reset-stats\"}\n");
    assert_eq!(stuck.recv(), json!({"ok": true}));
}

#[test]
fn idle_connections_time_out_and_the_limit_is_enforced() {
    let f = start_with(ServerLimits {
        max_connections: 1,
        idle_timeout: Duration::from_millis(300),
        ..limits()
    });
    let mut first = Conn::open(&f.path);
    assert_eq!(first.ask(r#"{"cmd":"status"}"#)["ok"], json!(true));
    let mut second = Conn::open(&f.path);
    let e = error_of(&second.recv());
    assert!(e.contains("too many") && e.contains('1'), "{e}");
    // After the idle timeout the first connection is closed and its slot freed.
    assert!(first.closed());
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let mut c = Conn::open(&f.path);
        let r = c.ask(r#"{"cmd":"status"}"#);
        if r["ok"] == json!(true) {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed: {r}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn socket_has_the_requested_mode() {
    let f = start();
    let meta = std::fs::symlink_metadata(&f.path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("group.sock");
    let s = ControlServer::spawn(&path, 0o660, FakeTarget::new(0)).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    s.shutdown();
    assert_eq!(mode, 0o660);
    // No temporary files are left next to the socket.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn a_regular_file_at_the_path_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    std::fs::write(&path, b"precious").unwrap();
    let err = ControlServer::spawn(&path, 0o600, FakeTarget::new(0))
        .err()
        .unwrap();
    assert!(
        matches!(&err, ControlError::NotASocket { path: p } if p.contains("ctl.sock")),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[test]
fn stale_socket_is_replaced_but_a_live_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "the stale socket file should remain");
    let s = ControlServer::spawn(&path, 0o600, FakeTarget::new(0)).unwrap();
    assert_eq!(
        Conn::open(&path).ask(r#"{"cmd":"status"}"#)["ok"],
        json!(true)
    );

    let err = ControlServer::spawn(&path, 0o600, FakeTarget::new(0))
        .err()
        .unwrap();
    assert!(matches!(err, ControlError::InUse { .. }), "{err}");
    // The first server is unharmed.
    assert_eq!(
        Conn::open(&path).ask(r#"{"cmd":"status"}"#)["ok"],
        json!(true)
    );
    s.shutdown();
}

#[test]
fn shutdown_is_prompt_and_removes_the_socket() {
    let mut f = start();
    let mut idle = Conn::open(&f.path);
    assert_eq!(idle.ask(r#"{"cmd":"status"}"#)["ok"], json!(true));
    let started = Instant::now();
    f.server.take().unwrap().shutdown();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(!f.path.exists());
    assert!(idle.closed());
    let err = run_client(
        &f.path,
        ClientCommand::Status { json: false },
        &mut Vec::new(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, ControlError::Connect { path, .. } if path.contains("ctl.sock")),
        "{err}"
    );
    assert!(err.to_string().contains(&f.path.display().to_string()));
}

#[test]
fn client_prints_a_status_table() {
    let f = start();
    let mut out = Vec::new();
    run_client(&f.path, ClientCommand::Status { json: false }, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    for needle in [
        "mode",
        "writeback",
        "block_size",
        "source_size",
        "1.0 GiB",
        "valid_blocks",
        "dirty_blocks",
        "hit_ratio",
        "25.00 %",
        "uptime",
        "1h 02m 05s",
        "start:",
        "entries_loaded",
        "stats:",
        "reads",
        "read_hits",
        "writes",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }

    let mut out = Vec::new();
    run_client(&f.path, ClientCommand::Status { json: true }, &mut out).unwrap();
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v, f.target.status());
}

/// A long flush prints a line per tenth of the way, not one per update
/// (a script capturing the output gets a dozen lines, not thousands).
#[test]
fn client_flush_progress_is_one_line_per_tenth() {
    let f = start();
    f.target.dirty.store(1000, Ordering::SeqCst);
    let mut out = Vec::new();
    run_client(&f.path, ClientCommand::Flush, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 12, "{text}");
    assert_eq!(lines[0], "flushing: 0/1000 blocks (0%)");
    assert_eq!(lines[1], "flushing: 100/1000 blocks (10%)");
    assert_eq!(lines[10], "flushing: 1000/1000 blocks (100%)");
    assert_eq!(lines[11], "flush complete: 1000 blocks written back");
}

#[test]
fn client_flush_set_mode_and_errors() {
    let f = start();
    let mut out = Vec::new();
    run_client(&f.path, ClientCommand::Flush, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "{text}");
    assert!(lines[0].contains("0/4"), "{text}");
    assert_eq!(lines[5], "flush complete: 4 blocks written back");

    let mut out = Vec::new();
    run_client(
        &f.path,
        ClientCommand::SetMode("writearound".into()),
        &mut out,
    )
    .unwrap();
    assert!(String::from_utf8(out).unwrap().contains("writearound"));
    assert_eq!(*f.target.mode.lock().unwrap(), "writearound");

    let err = run_client(
        &f.path,
        ClientCommand::SetMode("warp".into()),
        &mut Vec::new(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, ControlError::Remote(m) if m.contains("warp")),
        "{err}"
    );

    let mut out = Vec::new();
    run_client(&f.path, ClientCommand::ResetStats, &mut out).unwrap();
    assert_eq!(f.target.resets.load(Ordering::SeqCst), 1);
}

#[test]
fn overlong_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x".repeat(120));
    let err = ControlServer::spawn(&path, 0o600, FakeTarget::new(0))
        .err()
        .unwrap();
    assert!(
        matches!(err, ControlError::PathTooLong { max: 107, .. }),
        "{err}"
    );
    assert!(!path.exists());
}

/// A target whose flush runs until released, to test shutdown during a flush.
struct SlowFlush {
    started: AtomicBool,
    release: AtomicBool,
}

impl ControlTarget for SlowFlush {
    fn status(&self) -> Value {
        json!({})
    }
    fn flush_all(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<(), String> {
        // Mark the start before the first progress line reaches the client.
        self.started.store(true, Ordering::SeqCst);
        progress(0, 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.release.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        progress(1, 1);
        Ok(())
    }
    fn set_mode(&self, _: &str) -> Result<(), String> {
        Ok(())
    }
    fn reset_stats(&self) {}
}

#[test]
fn shutdown_during_a_flush_waits_only_for_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    let target = Arc::new(SlowFlush {
        started: AtomicBool::new(false),
        release: AtomicBool::new(false),
    });
    let server = ControlServer::spawn_with_limits(&path, 0o600, target.clone(), limits()).unwrap();
    let mut c = Conn::open(&path);
    c.send_raw(b"{\"cmd\":\"flush\"}\n");
    assert_eq!(c.recv(), json!({"progress": {"done": 0, "total": 1}}));
    assert!(target.started.load(Ordering::SeqCst));
    let t = Instant::now();
    server.shutdown();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(!path.exists());
    target.release.store(true, Ordering::SeqCst);
}

#[test]
fn client_reports_replies_it_cannot_understand() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        for reply in [&b"not json at all\n"[..], b"{\"ok\":true}\n", b""] {
            let (mut s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            s.write_all(reply).unwrap();
        }
    });
    let status = || {
        run_client(
            &path,
            ClientCommand::Status { json: false },
            &mut Vec::new(),
        )
    };
    let e = status().unwrap_err();
    assert!(
        matches!(&e, ControlError::Protocol(m) if m.contains("not json at all")),
        "{e}"
    );
    // `{"ok":true}` is a valid reply, but not an answer to status.
    let e = status().unwrap_err();
    assert!(
        matches!(&e, ControlError::Protocol(m) if m.contains("does not answer")),
        "{e}"
    );
    let e = status().unwrap_err();
    assert!(
        matches!(&e, ControlError::Protocol(m) if m.contains("closed")),
        "{e}"
    );
    server.join().unwrap();
}
