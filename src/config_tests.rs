//! Tests of the command line and config file parsing.

use super::*;
use clap::Parser;
use std::time::Duration;

fn parse(extra: &[&str]) -> Result<ServeConfig, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let cache = dir.path().join("cache.img");
    std::fs::write(&src, vec![0u8; 4096]).unwrap();
    std::fs::write(&cache, vec![0u8; 4096]).unwrap();
    let sock = dir.path().join("s.sock");
    let mut argv = vec![
        "vblkcache".to_string(),
        "serve".into(),
        "--source".into(),
        src.display().to_string(),
        "--cache".into(),
        cache.display().to_string(),
        "--socket".into(),
        sock.display().to_string(),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    let args = Args::try_parse_from(argv).unwrap();
    match Config::try_from(args)? {
        Config::Serve(s) => Ok(*s),
        Config::Client { .. } | Config::Check { .. } => panic!("not serve"),
    }
}

#[test]
fn defaults() {
    let c = parse(&[]).unwrap();
    assert_eq!(c.queues, 1);
    assert_eq!(c.queue_threads, 1);
    assert_eq!(c.queue_size, 256);
    assert_eq!(c.io_threads, 32);
    assert!(c.io_uring && !c.buffered);
    assert_eq!(c.poll, Duration::ZERO);
    assert_eq!(c.socket_mode, 0o600);
    assert_eq!(c.engine.geometry.block_size, None);
    assert_eq!(c.engine.mode, None);
    assert_eq!(c.serial, "vblkcache");
    assert!(!c.readonly && !c.direct && !c.engine.format);
    assert!(!c.pin_guest_memory, "pinning guest memory is opt-in");
    assert_eq!(c.bounce_min, Some(crate::virtio::DEFAULT_BOUNCE_MIN));
    assert!(!c.unordered, "completions are in order unless asked");
    assert_eq!(
        c.engine.readahead,
        4 << 20,
        "readahead up to 4 MiB by default"
    );
    let wb = c.engine.writeback;
    assert_eq!((wb.high_watermark_pct, wb.low_watermark_pct), (50, 25));
    assert_eq!(
        wb.idle_drain_after,
        Some(crate::engine::DEFAULT_IDLE_DRAIN_AFTER)
    );
}

#[test]
fn writeback_options() {
    let c = parse(&[
        "--writeback-high",
        "80",
        "--writeback-low",
        "0",
        "--writeback-idle",
        "500ms",
    ])
    .unwrap();
    let wb = c.engine.writeback;
    assert_eq!((wb.high_watermark_pct, wb.low_watermark_pct), (80, 0));
    assert_eq!(wb.idle_drain_after, Some(Duration::from_millis(500)));
    let off = parse(&["--writeback-idle", "off"]).unwrap();
    assert_eq!(off.engine.writeback.idle_drain_after, None);
}

#[test]
fn each_bad_value_names_its_option() {
    let cases: &[(&[&str], &str)] = &[
        (&["--mode", "fast"], "--mode"),
        (&["--block-size", "3K"], "--block-size"),
        (&["--block-size", "8G"], "--block-size"),
        (&["--assoc", "3"], "--assoc"),
        (&["--cache-blocks", "0"], "--cache-blocks"),
        (&["--cache-blocks", "100", "--assoc", "8"], "--assoc"),
        (&["--queues", "0"], "--queues"),
        (&["--writeback-high", "0"], "--writeback-high"),
        (&["--writeback-high", "101"], "--writeback-high"),
        (&["--writeback-low", "50"], "--writeback-low"),
        (
            &["--writeback-high", "30", "--writeback-low", "40"],
            "--writeback-low",
        ),
        (&["--writeback-idle", "0"], "--writeback-idle"),
        (&["--writeback-idle", "soon"], "--writeback-idle"),
        (&["--queues", "17"], "--queues"),
        (&["--queue-size", "100"], "--queue-size"),
        (&["--queue-size", "2048"], "--queue-size"),
        (&["--io-threads", "257"], "--io-threads"),
        (&["--serial", "123456789012345678901"], "--serial"),
        (&["--socket-mode", "0800"], "--socket-mode"),
        (&["--socket-mode", "rw"], "--socket-mode"),
        (&["--control", "/nonexistent-dir/x.sock"], "--control"),
        (&["--poll", "11ms"], "--poll"),
        (&["--poll", "fast"], "--poll"),
        (&["--bounce-min", "4K"], "--bounce-min"),
        (&["--bounce-min", "4M"], "--bounce-min"),
        (&["--bounce-min", "big"], "--bounce-min"),
        (&["--readahead", "65M"], "--readahead"),
        (&["--readahead", "lots"], "--readahead"),
        (
            &["--queues", "2", "--queue-threads", "3"],
            "--queue-threads",
        ),
        (
            &["--queues", "2", "--queue-threads", "1", "--poll", "1us"],
            "--queue-threads",
        ),
    ];
    for (extra, option) in cases {
        let e = parse(extra).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(option), "{extra:?}: {msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }
}

#[test]
fn good_values_are_mapped() {
    let c = parse(&[
        "--mode",
        "writethrough",
        "--block-size",
        "128K",
        "--cache-blocks",
        "64",
        "--assoc",
        "8",
        "--queues",
        "4",
        "--queue-size",
        "1024",
        "--socket-mode",
        "660",
        "--serial",
        "12345678901234567890",
        "--readonly",
        "--poll",
        "32us",
        "--pin-guest-memory",
    ])
    .unwrap();
    assert_eq!(c.poll, Duration::from_micros(32));
    assert!(c.pin_guest_memory);
    assert_eq!(c.engine.mode, Some(WriteMode::Writethrough));
    assert_eq!(c.engine.geometry.block_size, Some(128 * 1024));
    assert_eq!(c.engine.geometry.cache_blocks, Some(64));
    assert_eq!(c.engine.geometry.assoc, Some(8));
    assert_eq!(c.queues, 4);
    assert_eq!(c.queue_threads, 4, "one thread per queue with --poll");
    assert_eq!(c.io_threads, 128);
    assert_eq!(c.socket_mode, 0o660);
    assert!(c.readonly);
    let c = parse(&["--queues", "4", "--queue-threads", "1"]).unwrap();
    assert_eq!(c.queue_threads, 1);
    assert_eq!(parse(&["--bounce-min", "off"]).unwrap().bounce_min, None);
    assert_eq!(parse(&["--readahead", "off"]).unwrap().engine.readahead, 0);
    assert_eq!(parse(&["--readahead", "0"]).unwrap().engine.readahead, 0);
    assert_eq!(
        parse(&["--readahead", "4M"]).unwrap().engine.readahead,
        4 << 20
    );
    let c = parse(&["--bounce-min", "256K"]).unwrap();
    assert_eq!(c.bounce_min, Some(256 << 10));
    let c = parse(&["--queues", "2", "--queue-threads", "2", "--poll", "1us"]).unwrap();
    assert_eq!(c.queue_threads, 2);
}

#[test]
fn missing_source_is_rejected() {
    let args = Args::try_parse_from([
        "vblkcache",
        "serve",
        "--source",
        "/nonexistent/src",
        "--cache",
        "/nonexistent/cache",
        "--socket",
        "/tmp/x.sock",
    ])
    .unwrap();
    let e = Config::try_from(args).unwrap_err();
    assert!(
        e.to_string().starts_with("--source: /nonexistent/src"),
        "{e}"
    );
}

#[test]
fn queue_threads_default_comes_from_the_backend_rule() {
    let c = parse(&["--queues", "2", "--poll", "1us"]).unwrap();
    assert_eq!(c.queue_threads, 2);
    let c = parse(&["--queues", "4"]).unwrap();
    assert_eq!(
        c.queue_threads,
        default_queue_threads(4, false, host_cpus())
    );
}

#[test]
fn durations() {
    assert_eq!(parse_duration("5ms"), Some(Duration::from_millis(5)));
    assert_eq!(parse_duration("500us"), Some(Duration::from_micros(500)));
    assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
    assert_eq!(parse_duration("0"), Some(Duration::ZERO));
    for bad in [
        "",
        "5",
        "ms",
        "5 m",
        "-1ms",
        "99999999999999999999s",
        "18446744073709551615s",
    ] {
        assert_eq!(parse_duration(bad), None, "{bad}");
    }
}
