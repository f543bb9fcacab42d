//! Flush propagation: one FLUSH causes the device flushes and metadata writes
//! the crash contract needs, and no more.

use std::sync::Arc;
use vblkcache::device::{BlockDevice, CountingDevice, IoCounts, MemDevice};
use vblkcache::engine::{Engine, EngineConfig, GeometryRequest, WriteMode};

struct Rig {
    src: Arc<CountingDevice<MemDevice>>,
    cache: Arc<CountingDevice<MemDevice>>,
    e: Engine,
}

fn rig(mode: WriteMode) -> Rig {
    let src = Arc::new(CountingDevice::new(MemDevice::new(4 << 20)));
    let cache = Arc::new(CountingDevice::new(MemDevice::new(8 << 20)));
    let cfg = EngineConfig {
        geometry: GeometryRequest {
            block_size: Some(4096),
            cache_blocks: Some(256),
            assoc: Some(16),
        },
        mode: Some(mode),
        ..EngineConfig::default()
    };
    let e = Engine::open(src.clone(), cache.clone(), cfg).unwrap();
    e.flush().unwrap();
    Rig { src, cache, e }
}

/// Device operations caused by `f` on (source, cache).
fn delta(r: &Rig, f: impl FnOnce(&Engine)) -> (IoCounts, IoCounts) {
    let (s0, c0) = (r.src.counts(), r.cache.counts());
    f(&r.e);
    let (s1, c1) = (r.src.counts(), r.cache.counts());
    let d = |a: IoCounts, b: IoCounts| IoCounts {
        reads: b.reads - a.reads,
        writes: b.writes - a.writes,
        flushes: b.flushes - a.flushes,
        discards: b.discards - a.discards,
        write_zeroes: b.write_zeroes - a.write_zeroes,
        bytes_read: b.bytes_read - a.bytes_read,
        bytes_written: b.bytes_written - a.bytes_written,
    };
    (d(s0, s1), d(c0, c1))
}

#[test]
fn idle_flush_does_no_io() {
    for mode in WriteMode::ALL {
        let r = rig(mode);
        let (s, c) = delta(&r, |e| e.flush().unwrap());
        assert_eq!(
            (s.flushes, s.writes, c.flushes, c.writes),
            (0, 0, 0, 0),
            "{mode}"
        );
    }
}

#[test]
fn writeback_new_dirty_block_flushes_data_then_commits() {
    let r = rig(WriteMode::Writeback);
    r.e.write(0, &[1u8; 4096]).unwrap();
    let (s, c) = delta(&r, |e| e.flush().unwrap());
    // Cache: flush the data, write one journal block, flush it. Source: untouched.
    assert_eq!((c.flushes, c.writes), (2, 1), "{c:?}");
    assert_eq!((s.flushes, s.writes), (0, 0), "{s:?}");
    // A second FLUSH with nothing new does nothing.
    let (s, c) = delta(&r, |e| e.flush().unwrap());
    assert_eq!((s.flushes, c.flushes, c.writes), (0, 0, 0));
}

#[test]
fn writeback_rewrite_of_committed_dirty_block_needs_no_metadata() {
    let r = rig(WriteMode::Writeback);
    r.e.write(0, &[1u8; 4096]).unwrap();
    r.e.flush().unwrap();
    r.e.write(512, &[2u8; 512]).unwrap();
    let (s, c) = delta(&r, |e| e.flush().unwrap());
    // The mapping did not change: only the data needs flushing.
    assert_eq!((c.flushes, c.writes), (1, 0), "{c:?}");
    assert_eq!(s.flushes, 0);
}

#[test]
fn writethrough_flushes_the_source_and_no_metadata() {
    let r = rig(WriteMode::Writethrough);
    let mut b = vec![0u8; 4096];
    r.e.read(0, &mut b).unwrap(); // cache block 0
    r.e.flush().unwrap();
    r.e.write(0, &[3u8; 4096]).unwrap(); // source + cached frame
    let (s, c) = delta(&r, |e| e.flush().unwrap());
    assert_eq!(s.flushes, 1, "{s:?}");
    // The cached copy was updated, so the cache device is flushed too; no journal write.
    assert_eq!((c.flushes, c.writes), (1, 0), "{c:?}");
    r.e.write(1 << 20, &[3u8; 4096]).unwrap(); // not cached: source only
    let (s, c) = delta(&r, |e| e.flush().unwrap());
    assert_eq!((s.flushes, c.flushes, c.writes), (1, 0, 0), "{s:?} {c:?}");
}

#[test]
fn writeback_then_clean_commit_flushes_source_before_journal() {
    let r = rig(WriteMode::Writeback);
    r.e.write(0, &[1u8; 8192]).unwrap();
    r.e.flush().unwrap();
    let (s, c) = delta(&r, |e| e.flush_all(&mut |_| {}).unwrap());
    // Writeback reads the 2 frames (neighbours on the cache device: one
    // read), writes the source once (coalesced run), flushes it, then
    // commits "clean" with one journal write and a flush.
    assert_eq!((s.writes, s.flushes), (1, 1), "{s:?}");
    assert_eq!((c.reads, c.writes, c.flushes), (1, 1, 1), "{c:?}");
}

/// A write served directly (the daemon's io_uring path) that completes after
/// a FLUSH started must still be flushed by the next FLUSH: the engine may
/// only consider the cache written once the caller reports completion.
#[test]
fn direct_write_completing_after_a_flush_is_flushed_by_the_next() {
    let r = rig(WriteMode::Writeback);
    r.e.write(0, &[1u8; 4096]).unwrap();
    r.e.flush().unwrap();
    let io =
        r.e.begin_direct_write(0, 4096)
            .expect("a cached idle block");
    // A FLUSH from another queue while the write is in flight.
    r.e.flush().unwrap();
    // The caller's own I/O lands on the cache device, then completes.
    for ext in io.extents() {
        r.cache
            .write_at(&vec![2u8; ext.len as usize], ext.dev_offset)
            .unwrap();
    }
    io.completed();
    let (_, c) = delta(&r, |e| e.flush().unwrap());
    assert!(
        c.flushes >= 1,
        "the completed direct write was not flushed: {c:?}"
    );
    let mut back = [0u8; 4096];
    r.e.read(0, &mut back).unwrap();
    assert_eq!(back, [2u8; 4096]);
}

/// The vectors of a direct request come back emptied for the next one, on
/// completion and when a request is declined, and the pins are released.
#[test]
fn direct_request_vectors_are_given_back_and_pins_released() {
    let r = rig(WriteMode::Writeback);
    r.e.write(0, &[1u8; 16384]).unwrap();
    let mut bufs = vblkcache::engine::DirectBufs::default();
    let io =
        r.e.begin_direct_read_in(0, 16384, &mut bufs)
            .expect("four cached blocks");
    assert_eq!(io.extents().iter().map(|x| x.len).sum::<u64>(), 16384);
    let mut bufs = io.completed();
    assert!(bufs.is_empty());
    let (pins, extents) = bufs.capacity();
    assert!(pins >= 4 && extents >= 1, "{bufs:?}");
    // A miss (block 100 is not cached) is declined, the vectors come back
    // and nothing stays pinned.
    assert!(r
        .e
        .begin_direct_read_in(0, 100 * 4096 + 4096, &mut bufs)
        .is_none());
    assert!(bufs.is_empty() && bufs.capacity().0 >= 4, "{bufs:?}");
    // Released pins let the direct write and flush_all proceed.
    let w =
        r.e.begin_direct_write_in(0, 4096, &mut bufs)
            .expect("an idle cached block");
    let mut bufs = w.completed();
    // A write the caller does not start is declined: the vectors come back
    // with their capacity, nothing is counted, and its pins are released.
    let served = r.e.stats().direct_requests;
    let w =
        r.e.begin_direct_write_in(0, 16384, &mut bufs)
            .expect("four idle cached blocks");
    let bufs = w.declined();
    assert!(bufs.is_empty() && bufs.capacity().0 >= 4, "{bufs:?}");
    assert_eq!(r.e.stats().direct_requests, served);
    r.e.flush_all(&mut |_| {}).unwrap();
    assert_eq!(r.e.dirty_blocks(), 0);
    drop(bufs);
}
