//! Deterministic interleavings of the engine's concurrency protocol, forced
//! with a source device whose writes wait at a gate.

use std::sync::Arc;
use std::time::Duration;
use vblkcache::device::{BlockDevice, GateDevice, GateOp, MemDevice};
use vblkcache::engine::{Engine, EngineConfig, GeometryRequest, WriteMode};

const WAIT: Duration = Duration::from_secs(10);

type Gated = GateDevice<MemDevice>;

/// A source of `size` bytes of 1s whose writes wait at a closed gate.
fn gated(size: u64) -> Arc<Gated> {
    let src = Arc::new(GateDevice::new(MemDevice::from_bytes(&vec![
        1u8;
        size as usize
    ])));
    src.close(GateOp::Write);
    src
}

/// Waits until the `n`th source write has reached the gate.
fn wait_write(src: &Gated, n: u64) {
    assert!(
        src.wait_arrived(GateOp::Write, n, WAIT),
        "source write {n} never came"
    );
}

fn engine(source: Arc<Gated>, mode: WriteMode) -> Arc<Engine> {
    let cfg = EngineConfig {
        geometry: GeometryRequest {
            block_size: Some(4096),
            cache_blocks: Some(16),
            assoc: Some(4),
        },
        mode: Some(mode),
        ..EngineConfig::default()
    };
    Arc::new(Engine::open(source, Arc::new(MemDevice::new(8 << 20)), cfg).unwrap())
}

/// A read miss of a block with an uncached write in flight must not cache
/// the block's old content (it would shadow the write once it completes).
#[test]
fn fill_waits_for_uncached_write() {
    for mode in [
        WriteMode::Writearound,
        WriteMode::Writethrough,
        WriteMode::Passthrough,
    ] {
        let src = gated(1 << 20);
        let e = engine(src.clone(), mode);
        let writer = {
            let e = e.clone();
            std::thread::spawn(move || e.write(0, &[9u8; 512]).unwrap())
        };
        wait_write(&src, 1);
        let reader = {
            let e = e.clone();
            std::thread::spawn(move || {
                let mut b = [0u8; 512];
                e.read(512, &mut b).unwrap();
                b
            })
        };
        // Give the reader time to reach the block (it must wait, or fetch).
        std::thread::sleep(Duration::from_millis(50));
        src.let_through(GateOp::Write, 1);
        writer.join().unwrap();
        assert_eq!(reader.join().unwrap(), [1u8; 512]);
        let mut b = [0u8; 512];
        e.read(0, &mut b).unwrap();
        assert_eq!(
            b, [9u8; 512],
            "stale block cached during an uncached write ({mode})"
        );
        src.open(GateOp::Write);
    }
}

/// Two writethrough writes to one cached block must leave cache and source
/// equal: the second waits for the first to update both.
#[test]
fn writethrough_updates_are_exclusive() {
    let src = gated(1 << 20);
    let e = engine(src.clone(), WriteMode::Writethrough);
    let mut b = [0u8; 4096];
    e.read(0, &mut b).unwrap(); // cache block 0
    std::thread::sleep(Duration::from_millis(20)); // let the store finish
    let w1 = {
        let e = e.clone();
        std::thread::spawn(move || e.write(0, &[2u8; 4096]).unwrap())
    };
    wait_write(&src, 1);
    let w2 = {
        let e = e.clone();
        std::thread::spawn(move || e.write(0, &[3u8; 4096]).unwrap())
    };
    std::thread::sleep(Duration::from_millis(50));
    src.let_through(GateOp::Write, 1);
    wait_write(&src, 2);
    src.let_through(GateOp::Write, 1);
    w1.join().unwrap();
    w2.join().unwrap();
    e.read(0, &mut b).unwrap();
    let mut s = [0u8; 4096];
    src.inner().read_at(&mut s, 0).unwrap();
    assert_eq!(
        b, s,
        "cache and source disagree after concurrent writethrough writes"
    );
}
