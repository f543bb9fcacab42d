//! The engine when the cache device or the source returns I/O errors, in
//! every write mode: never stale or garbage data with an OK status, never a
//! FLUSH reported OK for writes that a failed flush may have lost, and the
//! metadata left openable.
//!
//! Helpers: `Targeted` fails (or tears) operations on one byte range and logs
//! writes; `Lossy` models a device with a volatile write cache whose failed
//! flush loses the writes it should have made durable (the behaviour of a
//! Linux page cache after a failed fsync, or of a disk whose cache flush
//! failed): a later flush succeeds without rewriting them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;
use vblkcache::device::{
    BlockDevice, DeviceError, FaultDevice, GateDevice, GateOp, IoOp, MemDevice, VolatileCacheDevice,
};
use vblkcache::engine::meta::{self, Found, Layout};
use vblkcache::engine::{
    Engine, EngineConfig, EngineError, GeometryRequest, WriteMode, WritebackConfig,
};

const BS: usize = 4096;
const WAIT: Duration = Duration::from_secs(10);

const NO_BACKGROUND: WritebackConfig = WritebackConfig {
    high_watermark_pct: 100,
    low_watermark_pct: 25,
    max_run_bytes: 4 << 20,
    max_inflight_runs: 16,
    idle_drain_after: None,
};

fn cfg(mode: Option<WriteMode>, blocks: u64, assoc: u32) -> EngineConfig {
    EngineConfig {
        geometry: GeometryRequest {
            block_size: Some(BS as u32),
            cache_blocks: Some(blocks),
            assoc: Some(assoc),
        },
        mode,
        writeback: NO_BACKGROUND,
        ..EngineConfig::default()
    }
}

/// Opens an engine over `src` and `cache` with `cfg(mode, blocks, assoc)`.
fn open(
    src: Arc<dyn BlockDevice>,
    cache: Arc<dyn BlockDevice>,
    mode: Option<WriteMode>,
    blocks: u64,
    assoc: u32,
) -> Engine {
    Engine::open(src, cache, cfg(mode, blocks, assoc)).unwrap()
}

fn pattern(block: u64) -> Vec<u8> {
    (0..BS)
        .map(|i| (i as u64 * 7 + block * 13 + 1) as u8)
        .collect()
}

/// Source image of `blocks` blocks, block b holding `pattern(b)`.
fn source_bytes(blocks: u64) -> Vec<u8> {
    (0..blocks).flat_map(pattern).collect()
}

fn read_block(e: &Engine, b: u64) -> Result<Vec<u8>, vblkcache::engine::EngineError> {
    let mut buf = vec![0u8; BS];
    e.read(b * BS as u64, &mut buf).map(|_| buf)
}

fn dev_block(d: &dyn BlockDevice, b: u64) -> Vec<u8> {
    let mut buf = vec![0u8; BS];
    d.read_at(&mut buf, b * BS as u64).unwrap();
    buf
}

fn summary(v: &[u8]) -> String {
    format!("[{:#04x} {:#04x} .. {:#04x}]", v[0], v[1], v[v.len() - 1])
}

// ---------------------------------------------------------------------------
// Targeted: faults on one byte range, optional torn writes, a write log.

struct Targeted<D> {
    inner: D,
    lo: AtomicU64,
    hi: AtomicU64,
    fail_reads: AtomicBool,
    fail_writes: AtomicBool,
    fail_flushes: AtomicBool,
    /// With `fail_writes`: bytes of a failing write that still reach the device.
    tear: AtomicU64,
    log: Mutex<Vec<(u64, u64)>>,
}

impl<D: BlockDevice> Targeted<D> {
    fn new(inner: D) -> Self {
        Targeted {
            inner,
            lo: AtomicU64::new(0),
            hi: AtomicU64::new(0),
            fail_reads: AtomicBool::new(false),
            fail_writes: AtomicBool::new(false),
            fail_flushes: AtomicBool::new(false),
            tear: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
        }
    }
    fn range(&self, lo: u64, hi: u64) {
        self.lo.store(lo, SeqCst);
        self.hi.store(hi, SeqCst);
    }
    fn hits(&self, off: u64, len: u64) -> bool {
        off < self.hi.load(SeqCst) && off + len > self.lo.load(SeqCst)
    }
    fn heal(&self) {
        self.fail_reads.store(false, SeqCst);
        self.fail_writes.store(false, SeqCst);
        self.fail_flushes.store(false, SeqCst);
        self.tear.store(0, SeqCst);
    }
    fn take_log(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl<D: BlockDevice> BlockDevice for Targeted<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        if self.fail_reads.load(SeqCst) && self.hits(offset, buf.len() as u64) {
            return Err(DeviceError::Injected {
                op: IoOp::Read,
                offset,
            });
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.log.lock().unwrap().push((offset, buf.len() as u64));
        if self.fail_writes.load(SeqCst) && self.hits(offset, buf.len() as u64) {
            let tear = (self.tear.load(SeqCst) as usize).min(buf.len());
            if tear > 0 {
                self.inner.write_at(&buf[..tear], offset)?;
            }
            return Err(DeviceError::Injected {
                op: IoOp::Write,
                offset,
            });
        }
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        if self.fail_flushes.load(SeqCst) {
            return Err(DeviceError::Injected {
                op: IoOp::Flush,
                offset: 0,
            });
        }
        self.inner.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        if self.fail_writes.load(SeqCst) && self.hits(offset, len) {
            return Err(DeviceError::Injected {
                op: IoOp::WriteZeroes,
                offset,
            });
        }
        self.inner.write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        if self.fail_writes.load(SeqCst) && self.hits(offset, len) {
            return Err(DeviceError::Injected {
                op: IoOp::Discard,
                offset,
            });
        }
        self.inner.discard(offset, len)
    }
}

// ---------------------------------------------------------------------------
// Lossy: a volatile write cache whose failed flush loses its pending writes
// (they stay readable, as in a page cache, but never become durable).

struct Entry {
    off: u64,
    data: Vec<u8>,
    /// Made durable by a successful flush.
    flushed: bool,
    /// Lost by a failed flush: readable, never durable.
    lost: bool,
}

struct Lossy {
    durable: Arc<MemDevice>,
    overlay: Mutex<Vec<Entry>>,
    fail_next_flush: AtomicBool,
}

impl Lossy {
    fn new(durable: Arc<MemDevice>) -> Self {
        Lossy {
            durable,
            overlay: Mutex::new(Vec::new()),
            fail_next_flush: AtomicBool::new(false),
        }
    }
}

impl BlockDevice for Lossy {
    fn size(&self) -> u64 {
        self.durable.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        let ov = self.overlay.lock().unwrap();
        self.durable.read_at(buf, offset)?;
        let end = offset + buf.len() as u64;
        for e in ov.iter() {
            let eend = e.off + e.data.len() as u64;
            let (s, t) = (e.off.max(offset), eend.min(end));
            if s < t {
                buf[(s - offset) as usize..(t - offset) as usize]
                    .copy_from_slice(&e.data[(s - e.off) as usize..(t - e.off) as usize]);
            }
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        vblkcache::device::check_range(IoOp::Write, offset, buf.len() as u64, self.size())?;
        self.overlay.lock().unwrap().push(Entry {
            off: offset,
            data: buf.to_vec(),
            flushed: false,
            lost: false,
        });
        Ok(())
    }
    fn flush(&self) -> Result<(), DeviceError> {
        let mut ov = self.overlay.lock().unwrap();
        if self.fail_next_flush.swap(false, SeqCst) {
            for e in ov.iter_mut().filter(|e| !e.flushed) {
                e.lost = true;
            }
            return Err(DeviceError::Injected {
                op: IoOp::Flush,
                offset: 0,
            });
        }
        for e in ov.iter_mut().filter(|e| !e.flushed && !e.lost) {
            self.durable.write_at(&e.data, e.off)?;
            e.flushed = true;
        }
        Ok(())
    }
}

// ===========================================================================
// A read hit whose cache read fails.

#[test]
fn a_hit_whose_cache_read_fails_is_served_from_the_source_only_when_clean() {
    for mode in [
        WriteMode::Writeback,
        WriteMode::Writethrough,
        WriteMode::Writearound,
    ] {
        let src = Arc::new(MemDevice::from_bytes(&source_bytes(64)));
        let cache = Arc::new(FaultDevice::new(MemDevice::new(4 << 20)));
        let e = open(src.clone(), cache.clone(), Some(mode), 64, 8);
        assert_eq!(read_block(&e, 2).unwrap(), pattern(2));
        // Make sure it is a hit now (the store finished).
        let hits = e.stats().read_hits;
        assert_eq!(read_block(&e, 2).unwrap(), pattern(2));
        assert_eq!(
            e.stats().read_hits,
            hits + 1,
            "{mode}: second read is a hit"
        );
        cache.plan().fail_reads.store(true, SeqCst);
        // A clean block is also on the source.
        assert_eq!(
            read_block(&e, 2).ok(),
            Some(pattern(2)),
            "{mode}: a clean hit whose cache read fails"
        );
        // A dirty block must never be answered from the (stale) source.
        if mode == WriteMode::Writeback {
            cache.heal();
            e.write(4 * BS as u64, &[0xD1; BS]).unwrap();
            cache.plan().fail_reads.store(true, SeqCst);
            let r = read_block(&e, 4);
            assert!(r.is_err(), "a dirty hit whose cache read fails: {r:?}");
        }
        cache.heal();
        e.shutdown(false).unwrap();
    }
}

/// A clean block whose cache frame cannot be read is read from the source
/// (which holds the same data) and dropped from the cache, rather than
/// failing every read.
#[test]
fn a_clean_hit_whose_frame_cannot_be_read_is_served_from_the_source() {
    let src = Arc::new(MemDevice::from_bytes(&source_bytes(64)));
    let cache = Arc::new(Targeted::new(MemDevice::new(4 << 20)));
    let e = open(
        src.clone(),
        cache.clone(),
        Some(WriteMode::Writethrough),
        64,
        8,
    );
    assert_eq!(read_block(&e, 2).unwrap(), pattern(2));
    assert_eq!(read_block(&e, 2).unwrap(), pattern(2));
    // Fail every cache read of the data area from now on (a bad SSD region).
    let l = Layout::new(&e.geometry());
    cache.range(l.data_offset, u64::MAX);
    cache.fail_reads.store(true, SeqCst);
    let mut errors = 0;
    for _ in 0..3 {
        if read_block(&e, 2).is_err() {
            errors += 1;
        }
    }
    e.shutdown(false).unwrap();
    assert_eq!(
        errors, 0,
        "a clean cached block whose frame cannot be read fails every read \
         although the source holds its data ({errors} of 3 reads failed)"
    );
}

// ===========================================================================
// A read miss whose background store fails (and a torn store).

#[test]
fn a_failed_or_torn_store_never_serves_garbage() {
    for tear in [0u64, 1024] {
        let src = Arc::new(MemDevice::from_bytes(&source_bytes(64)));
        // Foreign bytes in the data area: a frame exposed unwritten shows 0xEE.
        let cache = Arc::new(Targeted::new(MemDevice::from_bytes(&vec![0xEEu8; 4 << 20])));
        let mut c = cfg(Some(WriteMode::Writeback), 64, 8);
        c.format = true;
        let e = Engine::open(src.clone(), cache.clone(), c).unwrap();
        let l = Layout::new(&e.geometry());
        cache.range(l.data_offset, u64::MAX);
        cache.tear.store(tear, SeqCst);
        cache.fail_writes.store(true, SeqCst);
        for b in 0..16 {
            assert_eq!(read_block(&e, b).unwrap(), pattern(b), "miss of {b}");
        }
        for b in 0..16 {
            assert_eq!(
                read_block(&e, b).unwrap(),
                pattern(b),
                "tear {tear}: reread {b}"
            );
        }
        cache.heal();
        for b in 0..16 {
            assert_eq!(
                read_block(&e, b).unwrap(),
                pattern(b),
                "tear {tear}: healed {b}"
            );
        }
        assert!(e.stats().errors > 0);
        e.shutdown(false).unwrap();
    }
}

// ===========================================================================
// Write-back writes whose cache write fails.

#[test]
fn a_failed_writeback_write_keeps_the_old_data() {
    let src = Arc::new(MemDevice::from_bytes(&source_bytes(64)));
    let cache = Arc::new(Targeted::new(MemDevice::from_bytes(&vec![0xEEu8; 4 << 20])));
    let mut c = cfg(Some(WriteMode::Writeback), 64, 8);
    c.format = true;
    let e = Engine::open(src.clone(), cache.clone(), c).unwrap();
    let l = Layout::new(&e.geometry());
    cache.range(l.data_offset, u64::MAX);
    // Hit on a dirty block.
    e.write(2 * BS as u64, &[0xA1; BS]).unwrap();
    e.flush().unwrap();
    cache.fail_writes.store(true, SeqCst);
    assert!(e.write(2 * BS as u64, &[0xB2; BS]).is_err());
    // Whole-block miss and partial-block miss.
    assert!(e.write(5 * BS as u64, &[0xC3; BS]).is_err());
    assert!(e.write(6 * BS as u64 + 512, &[0xC4; 512]).is_err());
    cache.heal();
    assert_eq!(read_block(&e, 2).unwrap(), vec![0xA1; BS], "old dirty data");
    assert_eq!(
        read_block(&e, 5).unwrap(),
        pattern(5),
        "failed miss -> source data"
    );
    assert_eq!(
        read_block(&e, 6).unwrap(),
        pattern(6),
        "failed partial miss"
    );
    e.flush().unwrap();
    e.flush_all(&mut |_| {}).unwrap();
    assert_eq!(dev_block(&*src, 2), vec![0xA1; BS]);
    assert_eq!(dev_block(&*src, 5), pattern(5));
    e.shutdown(false).unwrap();
}

// ===========================================================================
// Write-through: one of the two writes fails.

#[test]
fn writethrough_with_one_side_failing_serves_no_stale_data() {
    let src = Arc::new(FaultDevice::new(MemDevice::from_bytes(&source_bytes(64))));
    let cache = Arc::new(FaultDevice::new(MemDevice::new(4 << 20)));
    let e = open(
        src.clone(),
        cache.clone(),
        Some(WriteMode::Writethrough),
        64,
        8,
    );
    assert_eq!(read_block(&e, 2).unwrap(), pattern(2));
    assert_eq!(read_block(&e, 3).unwrap(), pattern(3));
    // Source OK, cache update fails: the stale frame must go.
    cache.plan().fail_writes.store(true, SeqCst);
    let r = e.write(2 * BS as u64, &[0x22; BS]);
    cache.heal();
    if r.is_ok() {
        assert_eq!(
            read_block(&e, 2).unwrap(),
            vec![0x22; BS],
            "stale cached data"
        );
    }
    assert_eq!(dev_block(src.inner(), 2), vec![0x22; BS]);
    // Source fails: nothing changed anywhere.
    src.plan().fail_writes.store(true, SeqCst);
    assert!(e.write(3 * BS as u64, &[0x33; BS]).is_err());
    src.heal();
    assert_eq!(read_block(&e, 3).unwrap(), pattern(3));
    assert_eq!(dev_block(src.inner(), 3), pattern(3));
    e.shutdown(false).unwrap();
}

/// A write-through write whose source write fails part-way (a short write:
/// the first sectors reached the source): the clean cached frame, which
/// holds the old data, is dropped, so what the engine serves is what the
/// source holds and does not change when the block would have been evicted.
#[test]
fn a_torn_writethrough_source_write_drops_the_clean_frame() {
    let src = Arc::new(Targeted::new(MemDevice::from_bytes(&source_bytes(64))));
    let cache = Arc::new(MemDevice::new(4 << 20));
    let e = open(
        src.clone(),
        cache.clone(),
        Some(WriteMode::Writethrough),
        64,
        8,
    );
    assert_eq!(read_block(&e, 2).unwrap(), pattern(2));
    src.range(2 * BS as u64, 3 * BS as u64);
    src.tear.store(2048, SeqCst);
    src.fail_writes.store(true, SeqCst);
    assert!(e.write(2 * BS as u64, &[0x22; BS]).is_err());
    src.heal();
    let served = read_block(&e, 2).unwrap();
    let on_source = dev_block(&src.inner, 2);
    e.shutdown(false).unwrap();
    assert!(
        served == on_source,
        "write-through: after a failed (short) source write, first half of the block: \
         the engine serves {} while the source holds {}",
        summary(&served[..2048]),
        summary(&on_source[..2048])
    );
}

// ===========================================================================
// Writeback to a failing source.

/// One block whose source write keeps failing (a bad sector on the source)
/// keeps its run dirty and makes `flush_all` fail, but every other dirty
/// block is written back.
#[test]
fn one_failing_source_block_does_not_stall_the_other_writebacks() {
    let src = Arc::new(Targeted::new(MemDevice::from_bytes(&source_bytes(256))));
    let cache = Arc::new(MemDevice::new(4 << 20));
    let mut c = cfg(Some(WriteMode::Writeback), 256, 256);
    c.writeback.max_run_bytes = 4 * BS as u64;
    let e = Engine::open(src.clone(), cache.clone(), c).unwrap();
    for b in 0..64u64 {
        e.write(b * BS as u64, &[b as u8 + 1; BS]).unwrap();
    }
    e.flush().unwrap();
    src.range(5 * BS as u64, 6 * BS as u64);
    src.fail_writes.store(true, SeqCst);
    assert!(
        e.flush_all(&mut |_| {}).is_err(),
        "flush_all reports the failure"
    );
    assert!(e.flush_all(&mut |_| {}).is_err());
    let dirty = e.dirty_blocks();
    assert!(dirty >= 1, "the failing block stays dirty");
    assert_eq!(read_block(&e, 5).unwrap(), vec![6u8; BS], "and readable");
    e.shutdown(false).unwrap();
    assert!(
        dirty <= 4,
        "one failing source block (run 4..8) left {dirty} of 64 blocks dirty after two flush_all"
    );
}

/// Engine::shutdown(writeback = true) with a source that fails returns the
/// error and still persists the mapping, like shutdown(false): a dirty block
/// written since the last FLUSH is there on the next start.
#[test]
fn shutdown_with_a_failing_writeback_still_saves_the_mapping() {
    let mut lost = Vec::new();
    for wb_on_exit in [false, true] {
        let src = Arc::new(FaultDevice::new(MemDevice::from_bytes(&source_bytes(64))));
        let cache = Arc::new(MemDevice::new(4 << 20));
        let e = open(
            src.clone(),
            cache.clone(),
            Some(WriteMode::Writeback),
            64,
            8,
        );
        e.write(3 * BS as u64, &[0x3C; BS]).unwrap();
        src.plan().fail_writes.store(true, SeqCst);
        let r = e.shutdown(wb_on_exit);
        assert_eq!(r.is_err(), wb_on_exit);
        drop(e);
        src.heal();
        let e = open(src.clone(), cache.clone(), None, 64, 8);
        let back = read_block(&e, 3).unwrap();
        if back != vec![0x3C; BS] {
            lost.push(wb_on_exit);
        }
        e.shutdown(false).unwrap();
    }
    assert!(
        lost.is_empty(),
        "after shutdown(writeback={lost:?}) failed on the source, a completed (unflushed) \
         write was gone after restart; shutdown(false) keeps it"
    );
}

// ===========================================================================
// Flush / journal / metadata failures.

/// A journal write that fails makes the FLUSH fail; once healed, a FLUSH
/// succeeds and a crash keeps the data.
#[test]
fn a_failed_journal_write_fails_the_flush_and_the_retry_is_durable() {
    let vol = Arc::new(VolatileCacheDevice::new(MemDevice::new(4 << 20)));
    let cache = Arc::new(Targeted::new(vol.clone()));
    let src = Arc::new(MemDevice::from_bytes(&source_bytes(64)));
    let e = open(
        src.clone(),
        cache.clone(),
        Some(WriteMode::Writeback),
        64,
        8,
    );
    e.flush().unwrap();
    vol.flush().unwrap();
    let l = Layout::new(&e.geometry());
    e.write(3 * BS as u64, &[0x3C; BS]).unwrap();
    cache.range(l.journal_offset, l.journal_offset + l.journal_len);
    cache.fail_writes.store(true, SeqCst);
    assert!(e.flush().is_err(), "FLUSH with a failed journal write");
    cache.heal();
    e.write(4 * BS as u64, &[0x4C; BS]).unwrap();
    e.flush().unwrap();
    e.halt();
    drop(e);
    vol.power_cut(|_, _| false).unwrap();
    let e = open(src.clone(), vol.clone(), None, 64, 8);
    assert_eq!(read_block(&e, 3).unwrap(), vec![0x3C; BS]);
    assert_eq!(read_block(&e, 4).unwrap(), vec![0x4C; BS]);
    e.shutdown(false).unwrap();
}

/// A cache-device flush that fails loses the unflushed frame data (see
/// `Lossy`), and a later flush of the device would succeed without bringing
/// it back. So every later FLUSH fails, nothing is persisted at shutdown, and
/// after a restart the block reads the source's data (no FLUSH covered the
/// write), never the zeros of a frame mapped without its data.
#[test]
fn after_a_failed_cache_flush_no_flush_succeeds_and_the_old_data_comes_back() {
    let durable = Arc::new(MemDevice::new(4 << 20));
    let cache = Arc::new(Lossy::new(durable.clone()));
    let src = Arc::new(MemDevice::from_bytes(&source_bytes(64)));
    let e = open(
        src.clone(),
        cache.clone(),
        Some(WriteMode::Writeback),
        64,
        8,
    );
    e.flush().unwrap();
    cache.flush().unwrap();
    e.write(3 * BS as u64, &[0xA5; BS]).unwrap();
    cache.fail_next_flush.store(true, SeqCst);
    assert!(e.flush().is_err(), "the FLUSH whose cache flush failed");
    // The device would now report a flush as done, but what the failed one
    // lost stays lost: no later FLUSH may say the write is durable.
    for _ in 0..2 {
        let again = e.flush();
        assert!(
            matches!(again, Err(EngineError::EarlierFlushFailed { .. })),
            "a FLUSH after a failed one: {again:?}"
        );
    }
    e.write(4 * BS as u64, &[0xB6; BS]).unwrap();
    assert!(e.flush().is_err(), "a later write does not mend it");
    let st = e.status();
    assert!(
        st.cache_flush_failed && !st.source_flush_failed,
        "status says which"
    );
    // Nor may a clean shutdown persist a table that maps the lost data.
    assert!(
        e.shutdown(false).is_err(),
        "shutdown persisted after a failed flush"
    );
    drop(e);
    let e = open(src.clone(), durable.clone(), None, 64, 8);
    let back = read_block(&e, 3);
    let back4 = read_block(&e, 4);
    e.shutdown(false).unwrap();
    // No FLUSH succeeded after the writes: the old data is what may come back.
    let (back, back4) = (back.unwrap(), back4.unwrap());
    assert!(
        back == pattern(3) && back4 == pattern(4),
        "after a failed flush and a restart, blocks 3 and 4 read {} and {} (the source has {} and {})",
        summary(&back),
        summary(&back4),
        summary(&pattern(3)),
        summary(&pattern(4))
    );
}

/// The same for the source in write-through mode: every FLUSH after the
/// failed one fails, and a clean shutdown does not persist the cached copy
/// of a block the source may not hold.
#[test]
fn after_a_failed_source_flush_no_flush_succeeds() {
    let durable = Arc::new(MemDevice::from_bytes(&source_bytes(64)));
    let src = Arc::new(Lossy::new(durable.clone()));
    let cache = Arc::new(MemDevice::new(4 << 20));
    let e = open(
        src.clone(),
        cache.clone(),
        Some(WriteMode::Writethrough),
        64,
        8,
    );
    e.write(2 * BS as u64, &[0x22; BS]).unwrap();
    src.fail_next_flush.store(true, SeqCst);
    assert!(e.flush().is_err());
    let second = e.flush();
    assert!(
        matches!(second, Err(EngineError::EarlierFlushFailed { .. })),
        "a FLUSH after the source's flush failed: {second:?}"
    );
    // A clean shutdown would persist the cached copy of block 2 as clean
    // although the source may not hold it: it must fail, and the next start
    // (unclean) keeps no clean entry.
    assert!(e.shutdown(false).is_err());
    drop(e);
    let on_source = dev_block(&*durable, 2);
    assert_eq!(on_source, pattern(2), "the model lost the write");
    let e = open(durable.clone(), cache.clone(), None, 64, 8);
    let back = read_block(&e, 2).unwrap();
    e.shutdown(false).unwrap();
    assert!(
        back == on_source,
        "after a failed source flush and a restart, block 2 reads {} while the source holds {}",
        summary(&back),
        summary(&on_source)
    );
}

/// A miss that needs a frame held by a writeback pass flushes the source
/// itself (`settle_set`). If that flush fails, the held frames' data may be
/// lost on the source: the pass's own later flush must fail too rather than
/// mark them clean, the guest's FLUSH fails, and after a crash every block a
/// completed FLUSH covered reads back.
#[test]
fn a_failed_settle_flush_keeps_the_pass_from_marking_blocks_clean() {
    let durable_src = Arc::new(MemDevice::from_bytes(&vec![0x11u8; 64 * BS]));
    let lossy = Arc::new(Lossy::new(durable_src.clone()));
    let src = Arc::new(GateDevice::new(lossy.clone()));
    let durable_cache = Arc::new(MemDevice::new(4 << 20));
    let cache = Arc::new(VolatileCacheDevice::new(durable_cache.clone()));
    let e = open(src.clone(), cache.clone(), Some(WriteMode::Writeback), 8, 8);
    let blocks = [0u64, 1, 2, 3, 10, 11, 12, 13];
    for b in blocks {
        e.write(b * BS as u64, &vec![b as u8 + 1; BS]).unwrap();
    }
    e.flush().unwrap();
    src.close_after(GateOp::Write, 1);
    let mut miss_result = None;
    std::thread::scope(|s| {
        // When this closure ends, also by a failed assertion, the gate
        // opens before the scope joins the threads held at it.
        let _open = src.open_on_drop();
        let wb = s.spawn(|| e.flush_all(&mut |_| {}));
        assert!(
            src.wait_held(GateOp::Write, 1, WAIT),
            "second run never held"
        );
        lossy.fail_next_flush.store(true, SeqCst);
        let (tx, rx) = mpsc::channel();
        let eng = &e;
        s.spawn(move || {
            let mut buf = vec![0u8; BS];
            let _ = tx.send(eng.read(30 * BS as u64, &mut buf).map(|_| buf));
        });
        miss_result = Some(rx.recv_timeout(WAIT).expect("miss hung").is_ok());
        src.open_all();
        let r = wb.join().unwrap();
        eprintln!("flush_all: {r:?}, miss ok: {miss_result:?}");
    });
    // The settle's failed flush may have lost the pass's first run: the
    // pass's later flush must not mark it clean, and no FLUSH may succeed.
    let fl = e.flush();
    assert!(fl.is_err(), "guest FLUSH after the pass: {fl:?}");
    let dirty = e.dirty_blocks();
    e.halt();
    drop(e);
    cache.power_cut(|_, _| false).unwrap();
    let e = open(durable_src.clone(), cache.clone(), None, 8, 8);
    let mut lost = Vec::new();
    for b in blocks {
        if read_block(&e, b).unwrap() != vec![b as u8 + 1; BS] {
            lost.push(b);
        }
    }
    e.shutdown(false).unwrap();
    assert!(
        lost.is_empty(),
        "blocks {lost:?} (committed by a completed FLUSH) lost after a crash; dirty before \
         the crash: {dirty}"
    );
}

/// A checkpoint whose superblock write fails: which superblock the device
/// holds is unknown, so no later flush writes metadata. In particular no
/// retry writes the table into the copy the durable superblock points at
/// (a power cut during that write would tear the only table recovery can
/// use), and the cache opens after a power cut.
#[test]
fn a_failed_checkpoint_superblock_write_never_touches_the_active_table() {
    let vol = Arc::new(VolatileCacheDevice::new(MemDevice::new(4 << 20)));
    let cache = Arc::new(Targeted::new(vol.clone()));
    let src = Arc::new(MemDevice::from_bytes(&source_bytes(512)));
    let e = open(
        src.clone(),
        cache.clone(),
        Some(WriteMode::Writeback),
        256,
        8,
    );
    // A committed dirty block, so the table differs from the formatted one.
    // (spread over the table page, so that a torn page write is visible).
    for b in 100..200u64 {
        e.write(b * BS as u64, &[0x99; BS]).unwrap();
    }
    e.flush().unwrap();
    let l = Layout::new(&e.geometry());
    // Fail superblock writes (both slots) from now on.
    cache.range(0, 2 * 4096);
    cache.fail_writes.store(true, SeqCst);
    // Commits until one needs a checkpoint (journal full): it fails.
    let mut failed = false;
    for i in 0..2000u64 {
        let b = i % 2;
        e.write(b * BS as u64, &[i as u8; BS]).unwrap();
        if e.flush().is_err() {
            failed = true;
            break;
        }
        e.discard(b * BS as u64, BS as u64).unwrap();
        if e.flush().is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "no checkpoint was attempted");
    cache.heal();
    let Found::Superblock(sb, _) = meta::read_superblock(&*cache).unwrap() else {
        panic!("no superblock")
    };
    let active = (
        l.table_copy_offset(sb.table_copy),
        l.table_copy_offset(sb.table_copy) + l.table_pages() * 4096,
    );
    // The retried checkpoint: hold its flush after the table write, so the
    // table write is still in the volatile cache when the power goes.
    cache.take_log();
    cache.fail_flushes.store(true, SeqCst);
    let r = e.flush();
    let log = cache.take_log();
    let into_active: Vec<_> = log
        .iter()
        .filter(|&&(o, n)| o < active.1 && o + n > active.0)
        .collect();
    e.halt();
    drop(e);
    // Power cut tearing that write: its first sector reaches the medium.
    vol.power_cut(|_, s| s == 0).unwrap();
    let reopened = Engine::open(src.clone(), vol.clone(), cfg(None, 256, 8));
    let reopen_msg = match &reopened {
        Ok(_) => String::from("opened fine"),
        Err(e) => e.to_string(),
    };
    if let Ok(e) = reopened {
        e.shutdown(false).unwrap();
    }
    assert!(
        into_active.is_empty(),
        "the retried checkpoint (flush result {r:?}) wrote {into_active:?} into table copy {} \
         that the durable superblock (seq {}) points at; after a power cut: {reopen_msg}",
        sb.table_copy,
        sb.seq
    );
}
