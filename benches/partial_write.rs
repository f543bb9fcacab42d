//! Cost of the partial-write policy ("fill from the source"): write misses
//! that cover a whole cache block versus 4 KiB write misses into 64 KiB
//! blocks, which first read the block from a source with injected latency.
//!
//! cargo bench --bench partial_write

use std::sync::Arc;
use std::time::{Duration, Instant};
use vblkcache::device::{LatencyDevice, LatencyProfile, MemDevice};
use vblkcache::engine::{Engine, EngineConfig, GeometryRequest, WriteMode};

const BS: u64 = 64 * 1024;

fn run(write_len: u64, n: u64, latency: Duration) -> (f64, u64, u64) {
    let src = Arc::new(LatencyDevice::new(
        MemDevice::new(4096 * BS),
        LatencyProfile::uniform(latency),
    ));
    let cache = Arc::new(MemDevice::new(4096 * BS + (16 << 20)));
    let cfg = EngineConfig {
        geometry: GeometryRequest {
            block_size: Some(BS as u32),
            cache_blocks: Some(2048),
            assoc: Some(64),
        },
        mode: Some(WriteMode::Writeback),
        ..EngineConfig::default()
    };
    let e = Engine::open(src, cache, cfg).expect("open");
    let data = vec![7u8; write_len as usize];
    let t = Instant::now();
    for i in 0..n {
        // Each write goes to a block not cached yet.
        e.write(i * 7 % 2048 * BS, &data).expect("write");
    }
    let mean_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    let s = e.stats();
    (mean_us, s.partial_fills, s.write_misses)
}

fn main() {
    println!("| source latency | write | mean latency µs | write misses | partial fills |");
    println!("|---|---|---:|---:|---:|");
    for lat in [
        Duration::ZERO,
        Duration::from_millis(1),
        Duration::from_millis(5),
    ] {
        for (name, len) in [("64K (whole block)", BS), ("4K (partial)", 4096)] {
            let n = if lat.is_zero() { 2000 } else { 200 };
            let (us, fills, misses) = run(len, n, lat);
            println!("| {lat:?} | {name} | {us:.1} | {misses} | {fills} |");
        }
    }
}
