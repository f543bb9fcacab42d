//! Data-integrity scenarios for the real daemon under cache pressure, with
//! several queues, control-socket operations, clean restarts and kill -9.
//!
//! Every sector written by the test encodes (op id, sector) (the pattern of
//! crash_kill9.rs), so a wrong sector names the write that produced it. The
//! source starts with op id 0 everywhere. Queues share one model: a request
//! locks its sectors in the model while it is in flight (so the expected
//! content of a read is exact), but queues write and read neighbouring
//! sectors of the same cache blocks and sets concurrently, and successive
//! writes of a sector come from different queues.
//!
//! After a clean stop (SIGTERM) every sector must hold its last completed
//! write. After a kill (crash state on) every sector must hold its last
//! completed write or the data of a write in flight at the kill. With the
//! crash state off: the content at the last completed FLUSH or a later write.
//!
//! Environment: VBC_INTEGRITY_SECS scales phase durations (default 1.0), VBC_INTEGRITY_SEED.

mod common;
#[path = "integrity/control.rs"]
mod control;
#[path = "integrity/model.rs"]
mod model;
#[path = "integrity/run.rs"]
mod run;
#[path = "integrity/scenario.rs"]
mod scenario;
#[path = "integrity/verify.rs"]
mod verify;
#[path = "integrity/worker.rs"]
mod worker;

use run::run;
use scenario::Scenario;

// ---------------------------------------------------------------- scenarios

#[test]
fn pressure_4k_assoc8_two_queues_term() {
    run(Scenario::base("p4k-a8-q2"));
}

#[test]
fn pressure_4k_direct_mapped_latency() {
    run(Scenario {
        assoc: 1,
        cache_blocks: 128,
        source_latency: Some("1ms"),
        ..Scenario::base("p4k-a1-lat")
    });
}

#[test]
fn pressure_64k_full_assoc_four_queues() {
    run(Scenario {
        block_size: "64K",
        cache_blocks: 64,
        assoc: 64,
        queues: 4,
        ..Scenario::base("p64k-a64-q4")
    });
}

#[test]
fn pressure_1m_blocks() {
    run(Scenario {
        block_size: "1M",
        cache_blocks: 8,
        assoc: 2,
        disk: 48 << 20,
        ..Scenario::base("p1m-a2")
    });
}

#[test]
fn pressure_odd_size_disk() {
    run(Scenario {
        block_size: "64K",
        cache_blocks: 32,
        assoc: 4,
        disk: (20 << 20) + 12 * 1024 + 1536,
        ..Scenario::base("odd-size")
    });
}

#[test]
fn control_ops_during_io() {
    run(Scenario {
        control: true,
        runs: 3,
        secs: 12.0,
        ..Scenario::base("ctl-4k")
    });
}

#[test]
fn control_ops_during_io_64k_latency() {
    run(Scenario {
        control: true,
        block_size: "64K",
        cache_blocks: 48,
        assoc: 16,
        source_latency: Some("500us"),
        runs: 3,
        secs: 12.0,
        ..Scenario::base("ctl-64k-lat")
    });
}

#[test]
fn kill9_pressure_multi_queue() {
    run(Scenario {
        kill: true,
        runs: 8,
        secs: 4.0,
        ..Scenario::base("kill-4k-q2")
    });
}

#[test]
fn kill9_pressure_control_ops() {
    run(Scenario {
        kill: true,
        control: true,
        runs: 8,
        secs: 4.0,
        block_size: "64K",
        cache_blocks: 48,
        assoc: 16,
        queues: 3,
        ..Scenario::base("kill-ctl-64k-q3")
    });
}

#[test]
fn kill9_odd_size_1m_blocks() {
    run(Scenario {
        kill: true,
        runs: 8,
        secs: 3.0,
        block_size: "1M",
        cache_blocks: 8,
        assoc: 8,
        disk: (24 << 20) + 3 * 4096 + 512,
        ..Scenario::base("kill-1m-odd")
    });
}

#[test]
fn kill9_no_crash_state_flush_contract() {
    run(Scenario {
        kill: true,
        crash_state: false,
        runs: 8,
        secs: 3.0,
        mix: [50, 25, 4, 4],
        ..Scenario::base("kill-nocs-4k")
    });
}

#[test]
fn tmpfs_pressure_control() {
    run(Scenario {
        tmpfs: true,
        control: true,
        queues: 2,
        ..Scenario::base("tmpfs-ctl")
    });
}

#[test]
fn tmpfs_kill9() {
    run(Scenario {
        tmpfs: true,
        kill: true,
        runs: 8,
        secs: 3.0,
        block_size: "16K",
        cache_blocks: 128,
        assoc: 4,
        ..Scenario::base("tmpfs-kill")
    });
}

/// Source and cache on 4Kn block devices (loop devices with 4 KiB logical
/// sectors): the test's 512-byte sectors are read-modify-writes on both, and
/// the journal's 512-byte commits share 4 KiB device sectors.
#[test]
fn loop_devices_4k_sectors_kill9() {
    run(Scenario {
        loop_sector: Some(4096),
        kill: true,
        runs: 6,
        secs: 3.0,
        ..Scenario::base("loop-4k-kill")
    });
}

#[test]
fn loop_devices_pressure_control() {
    run(Scenario {
        loop_sector: Some(512),
        control: true,
        ..Scenario::base("loop-ctl")
    });
}

#[test]
fn sigterm_under_load() {
    run(Scenario {
        term_under_load: true,
        control: true,
        runs: 6,
        secs: 4.0,
        ..Scenario::base("term-load")
    });
}

#[test]
fn kill9_storm_during_recovery() {
    run(Scenario {
        kill: true,
        kill_storm: 6,
        runs: 5,
        secs: 3.0,
        cache_blocks: 4096,
        assoc: 64,
        disk: 64 << 20,
        ..Scenario::base("kill-storm")
    });
}

#[test]
fn kill9_slow_source_direct_mapped() {
    run(Scenario {
        kill: true,
        runs: 8,
        secs: 3.0,
        assoc: 1,
        cache_blocks: 128,
        source_latency: Some("2ms"),
        ..Scenario::base("kill-slow-a1")
    });
}

#[test]
fn variants_uring_off_poll_unordered() {
    for (name, extra) in [
        ("var-uring-off", &["--io-uring", "off"][..]),
        ("var-poll", &["--poll", "50us", "--queue-threads", "2"][..]),
        (
            "var-unordered-qt1",
            &["--unordered-completion", "--queue-threads", "1"][..],
        ),
        ("var-pin", &["--pin-guest-memory"][..]),
    ] {
        run(Scenario {
            extra: Box::leak(extra.to_vec().into_boxed_slice()),
            control: true,
            runs: 2,
            secs: 5.0,
            ..Scenario::base(name)
        });
    }
}

#[test]
fn racy_reads_with_mode_switches() {
    run(Scenario {
        racy_reads: true,
        control: true,
        queues: 3,
        runs: 3,
        secs: 10.0,
        ..Scenario::base("racy-ctl-4k")
    });
}

#[test]
fn racy_reads_64k_slow_source_mode_switches() {
    run(Scenario {
        racy_reads: true,
        control: true,
        block_size: "64K",
        cache_blocks: 32,
        assoc: 4,
        source_latency: Some("1ms"),
        runs: 3,
        secs: 10.0,
        ..Scenario::base("racy-ctl-64k-lat")
    });
}

#[test]
fn racy_reads_kill9() {
    run(Scenario {
        racy_reads: true,
        kill: true,
        control: true,
        runs: 8,
        secs: 3.0,
        ..Scenario::base("racy-kill")
    });
}

#[test]
fn overlapping_writes_pressure() {
    run(Scenario {
        overlap_writes: true,
        queues: 3,
        runs: 3,
        secs: 8.0,
        ..Scenario::base("overlap-4k")
    });
}

#[test]
fn overlapping_writes_64k_mode_switches() {
    run(Scenario {
        overlap_writes: true,
        control: true,
        block_size: "64K",
        cache_blocks: 32,
        assoc: 8,
        queues: 2,
        runs: 3,
        secs: 8.0,
        ..Scenario::base("overlap-64k-ctl")
    });
}

#[test]
fn kill9_during_sigterm_shutdown() {
    run(Scenario {
        kill: true,
        term_then_kill: true,
        runs: 8,
        secs: 3.0,
        cache_blocks: 1024,
        assoc: 16,
        source_latency: Some("1ms"),
        extra: &["--writeback-on-exit"],
        ..Scenario::base("term-kill-wboe")
    });
}

#[test]
fn kill9_during_sigterm_shutdown_no_writeback() {
    run(Scenario {
        kill: true,
        term_then_kill: true,
        runs: 8,
        secs: 3.0,
        cache_blocks: 4096,
        assoc: 64,
        disk: 64 << 20,
        ..Scenario::base("term-kill")
    });
}

#[test]
fn source_not_sector_multiple() {
    run(Scenario {
        block_size: "64K",
        cache_blocks: 32,
        assoc: 4,
        disk: (20 << 20) + 12 * 1024 + 1536 + 100,
        control: true,
        runs: 3,
        secs: 6.0,
        ..Scenario::base("odd-bytes-64k")
    });
}

#[test]
fn source_not_sector_multiple_kill9() {
    run(Scenario {
        block_size: "4K",
        cache_blocks: 64,
        assoc: 4,
        disk: (8 << 20) + 1536 + 100,
        kill: true,
        runs: 6,
        secs: 3.0,
        ..Scenario::base("odd-bytes-kill")
    });
}

#[test]
fn kill9_restart_in_other_modes() {
    run(Scenario {
        kill: true,
        vary_mode: true,
        racy_reads: true,
        control: true,
        runs: 10,
        secs: 3.0,
        block_size: "8K",
        cache_blocks: 192,
        assoc: 2,
        queues: 3,
        ..Scenario::base("kill-vary-mode")
    });
}
