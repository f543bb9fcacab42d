//! Multi-threaded stress of the cache engine against a reference.
//!
//! Threads own disjoint bytes that share cache blocks and sets: in the first
//! half of the disk thread `t` owns every sector `s` with `s % T == t`, so
//! threads race on the same blocks; in the second half each thread owns a
//! contiguous region for multi-block requests. Another thread switches write
//! modes and flushes the whole cache meanwhile. Some reads are sequential
//! scans, which with readahead on fetch the next blocks in the background,
//! bytes of other threads included, while those threads write them. Every
//! read is checked against the owner's reference; at the end the source must
//! equal the reference.

use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vblkcache::device::{LatencyDevice, LatencyProfile, MemDevice};
use vblkcache::engine::{Engine, EngineConfig, GeometryRequest, WriteMode};

const T: u64 = 4;
const SECTOR: u64 = 512;

/// `readahead`: the largest readahead window in blocks (0: off).
fn stress(source_latency: Duration, ops_per_thread: usize, assoc: u32, seed: u64, readahead: u64) {
    let profile = LatencyProfile {
        jitter: source_latency,
        ..LatencyProfile::uniform(source_latency / 4)
    };
    let bs = 4096u64;
    let size = 1 << 20; // 1 MiB: 256 blocks over a 64-block cache
    let half = size / 2;
    let initial: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
    let mem = Arc::new(MemDevice::from_bytes(&initial));
    let source = Arc::new(LatencyDevice::new(mem.clone(), profile));
    let cache = Arc::new(MemDevice::new(8 << 20));
    let cfg = EngineConfig {
        geometry: GeometryRequest {
            block_size: Some(bs as u32),
            cache_blocks: Some(64),
            assoc: Some(assoc),
        },
        mode: Some(WriteMode::Writeback),
        readahead: readahead * bs,
        ..EngineConfig::default()
    };
    let engine = Arc::new(Engine::open(source, cache, cfg).unwrap());
    let stop = Arc::new(AtomicBool::new(false));

    let switcher = {
        let (engine, stop) = (engine.clone(), stop.clone());
        std::thread::spawn(move || {
            let modes = [
                WriteMode::Writethrough,
                WriteMode::Writeback,
                WriteMode::Writearound,
                WriteMode::Writeback,
            ];
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(15));
                engine.set_mode(modes[i % modes.len()]).unwrap();
                if i % 3 == 0 {
                    engine.flush_all(&mut |_| {}).unwrap();
                }
                i += 1;
            }
            engine.set_mode(WriteMode::Writeback).unwrap();
        })
    };

    let workers: Vec<_> = (0..T)
        .map(|t| {
            let engine = engine.clone();
            let mut reference = initial.clone();
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 100 + t);
                let region = half / T;
                let rstart = half + t * region;
                for i in 0..ops_per_thread {
                    let interleaved = rng.gen_bool(0.5);
                    let (off, len) = if interleaved {
                        let s = rng.gen_range(0..half / SECTOR / T) * T + t;
                        (s * SECTOR, SECTOR)
                    } else {
                        let off = rstart + rng.gen_range(0..region);
                        let len = rng.gen_range(1..=(rstart + region - off).min(3 * bs));
                        (off, len)
                    };
                    let (o, l) = (off as usize, len as usize);
                    match rng.gen_range(0..12) {
                        0..=3 => {
                            let fill = rng.gen::<u8>();
                            let data: Vec<u8> = (0..l).map(|k| fill ^ (k as u8)).collect();
                            engine.write(off, &data).unwrap();
                            reference[o..o + l].copy_from_slice(&data);
                        }
                        4..=7 => {
                            let mut buf = vec![0u8; l];
                            engine.read(off, &mut buf).unwrap();
                            assert!(
                                buf == reference[o..o + l],
                                "thread {t} op {i}: read {off}+{len} differs"
                            );
                        }
                        8 if !interleaved => {
                            engine.discard(off, len).unwrap();
                            reference[o..o + l].fill(0);
                        }
                        10 | 11 => {
                            // A scan of this thread's bytes over the next 8
                            // blocks: its own sectors in the first half,
                            // whole blocks of its region in the second.
                            let (mut at, step, len, end) = if interleaved {
                                (off, T * SECTOR, SECTOR, (off + 8 * bs).min(half))
                            } else {
                                let start = (off / bs * bs).max(rstart);
                                (start, bs, bs, (start + 8 * bs).min(rstart + region))
                            };
                            while at + len <= end {
                                let (a, n) = (at as usize, len as usize);
                                let mut buf = vec![0u8; n];
                                engine.read(at, &mut buf).unwrap();
                                assert!(
                                    buf == reference[a..a + n],
                                    "thread {t} op {i}: scan read {at}+{len} differs"
                                );
                                at += step;
                            }
                        }
                        _ => engine.flush().unwrap(),
                    }
                }
                reference
            })
        })
        .collect();

    let refs: Vec<Vec<u8>> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    stop.store(true, Ordering::SeqCst);
    switcher.join().unwrap();

    // Merge the owners' views into one reference.
    let mut reference = initial.clone();
    for s in 0..half / SECTOR {
        let t = (s % T) as usize;
        let r = (s * SECTOR) as usize..((s + 1) * SECTOR) as usize;
        reference[r.clone()].copy_from_slice(&refs[t][r]);
    }
    for t in 0..T {
        let region = half / T;
        let r = (half + t * region) as usize..(half + (t + 1) * region) as usize;
        reference[r.clone()].copy_from_slice(&refs[t as usize][r]);
    }
    let mut all = vec![0u8; size as usize];
    engine.read(0, &mut all).unwrap();
    assert!(all == reference, "final read differs");
    engine.flush_all(&mut |_| {}).unwrap();
    assert!(mem.to_vec() == reference, "source differs after flush_all");
    // After the background fetches and stores have finished.
    engine.shutdown(false).unwrap();
    let st = engine.stats();
    assert!(
        st.read_hits > 0 && st.read_misses > 0 && st.writebacks > 0,
        "{st:?}"
    );
    assert_eq!(
        st.readahead_blocks > 0,
        readahead > 0,
        "readahead {readahead}: {st:?}"
    );
}

#[test]
fn stress_no_latency_set_associative() {
    for seed in 0..3 {
        stress(Duration::ZERO, 3000, 4, seed, 0);
    }
}

#[test]
fn stress_no_latency_fully_associative() {
    stress(Duration::ZERO, 3000, 64, 7, 0);
}

#[test]
fn stress_slow_source_direct_mapped() {
    stress(Duration::from_micros(100), 1500, 4, 11, 0);
    stress(Duration::from_micros(100), 1500, 1, 12, 0);
}

/// Readahead on: windows fetched in the background race with the writes of
/// the threads whose bytes they hold, and with mode switches and flushes.
#[test]
fn stress_readahead_set_associative() {
    for seed in 20..23 {
        stress(Duration::ZERO, 3000, 4, seed, 8);
    }
}

#[test]
fn stress_readahead_slow_source() {
    stress(Duration::from_micros(100), 1500, 4, 24, 8);
    stress(Duration::from_micros(100), 1500, 64, 25, 16);
}
