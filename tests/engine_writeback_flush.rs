//! Writeback flushes the source itself: a guest FLUSH that arrives while a
//! writeback pass waits for the source's flush neither waits for it nor
//! commits the written-back blocks clean, and a crash at that moment loses
//! nothing that FLUSH covered.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;
use vblkcache::device::{BlockDevice, DeviceError, FaultDevice, MemDevice, VolatileCacheDevice};
use vblkcache::engine::{Engine, EngineConfig, GeometryRequest, WriteMode};

const BS: usize = 4096;
const WAIT: Duration = Duration::from_secs(10);

/// A source with a volatile write cache whose flushes wait at a gate until
/// the test opens it; after `off` every operation fails (the power is cut).
struct GatedSource {
    dev: VolatileCacheDevice<MemDevice>,
    gate: Mutex<Gate>,
    cond: Condvar,
    off: AtomicBool,
}

#[derive(Default)]
struct Gate {
    /// Flushes that reached the gate.
    entered: u32,
    open: bool,
}

impl GatedSource {
    fn new(size: usize) -> Self {
        GatedSource {
            dev: VolatileCacheDevice::new(MemDevice::new(size as u64)),
            gate: Mutex::new(Gate {
                open: true,
                ..Gate::default()
            }),
            cond: Condvar::new(),
            off: AtomicBool::new(false),
        }
    }
    fn close(&self) {
        self.gate.lock().unwrap().open = false;
    }
    fn open(&self) {
        self.gate.lock().unwrap().open = true;
        self.cond.notify_all();
    }
    /// Waits until a flush is held at the closed gate.
    fn wait_entered(&self) -> bool {
        let g = self.gate.lock().unwrap();
        let (g, _) = self
            .cond
            .wait_timeout_while(g, WAIT, |g| g.entered == 0)
            .unwrap();
        g.entered > 0
    }
    fn powered(&self) -> Result<(), DeviceError> {
        if self.off.load(SeqCst) {
            Err(DeviceError::PoweredOff)
        } else {
            Ok(())
        }
    }
}

impl BlockDevice for GatedSource {
    fn size(&self) -> u64 {
        self.dev.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.powered()?;
        self.dev.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.powered()?;
        self.dev.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        {
            let mut g = self.gate.lock().unwrap();
            if !g.open {
                g.entered += 1;
                self.cond.notify_all();
                while !g.open {
                    g = self.cond.wait(g).unwrap();
                }
            }
        }
        self.powered()?;
        self.dev.flush()
    }
}

fn cfg(mode: Option<WriteMode>) -> EngineConfig {
    EngineConfig {
        geometry: GeometryRequest {
            block_size: Some(BS as u32),
            cache_blocks: Some(64),
            assoc: Some(8),
        },
        mode,
        ..EngineConfig::default()
    }
}

/// Writes block 3 (committed dirty by a FLUSH first if `committed`), starts
/// `flush_all` and holds its source flush; a guest FLUSH must complete
/// meanwhile. Then the power is cut with every unflushed write lost, and the
/// reopened cache must still return the block.
fn guest_flush_during_writeback_flush(committed: bool) {
    let src = Arc::new(GatedSource::new(64 * BS));
    let cache = Arc::new(VolatileCacheDevice::new(MemDevice::new(4 << 20)));
    let e = Engine::open(src.clone(), cache.clone(), cfg(Some(WriteMode::Writeback))).unwrap();
    e.flush().unwrap();
    src.dev.flush().unwrap();
    cache.flush().unwrap();

    let data = vec![0xA5u8; BS];
    e.write(3 * BS as u64, &data).unwrap();
    if committed {
        e.flush().unwrap();
    }
    src.close();
    std::thread::scope(|s| {
        let wb = s.spawn(|| e.flush_all(&mut |_| {}));
        assert!(src.wait_entered(), "flush_all never flushed the source");
        // The block was written to the source (not durably) and is clean in
        // RAM now. A guest FLUSH must not wait for the held source flush.
        let (tx, rx) = mpsc::channel();
        let eng = &e;
        s.spawn(move || {
            let r = eng.flush();
            let _ = tx.send(r.is_ok());
        });
        let ok = rx.recv_timeout(WAIT);
        // Power cut while the source flush is still held: the source loses
        // the written-back block, the cache keeps what was flushed.
        src.off.store(true, SeqCst);
        cache.cut_power_after(0);
        src.open();
        assert_eq!(
            ok,
            Ok(true),
            "a guest FLUSH waited for (or failed with) the writeback's source flush"
        );
        assert!(
            wb.join().unwrap().is_err(),
            "flush_all succeeded without power"
        );
    });
    e.halt();
    drop(e);
    src.dev.power_cut(|_, _| false).unwrap();
    cache.power_cut(|_, _| false).unwrap();
    src.off.store(false, SeqCst);

    let mut on_source = vec![0u8; BS];
    src.dev.read_at(&mut on_source, 3 * BS as u64).unwrap();
    assert_ne!(
        on_source, data,
        "the test needs the source write to be lost"
    );
    let e = Engine::open(src.clone(), cache.clone(), cfg(None)).unwrap();
    let mut back = vec![0u8; BS];
    e.read(3 * BS as u64, &mut back).unwrap();
    assert!(
        back == data,
        "a write completed before a completed FLUSH was lost after the crash"
    );
    // And the recovered dirty block reaches the source.
    e.flush_all(&mut |_| {}).unwrap();
    src.dev.read_at(&mut on_source, 3 * BS as u64).unwrap();
    assert!(on_source == data);
}

#[test]
fn guest_flush_during_writeback_of_uncommitted_block() {
    guest_flush_during_writeback_flush(false);
}

#[test]
fn guest_flush_during_writeback_of_committed_block() {
    guest_flush_during_writeback_flush(true);
}

/// A source flush that fails leaves the written-back blocks dirty, so the
/// next writeback writes them again.
#[test]
fn failed_source_flush_keeps_blocks_dirty() {
    let src = Arc::new(FaultDevice::new(MemDevice::new((64 * BS) as u64)));
    let cache = Arc::new(MemDevice::new(4 << 20));
    let e = Engine::open(src.clone(), cache.clone(), cfg(Some(WriteMode::Writeback))).unwrap();
    e.write(0, &vec![7u8; 2 * BS]).unwrap();
    e.flush().unwrap();
    assert_eq!(e.dirty_blocks(), 2);
    src.plan().fail_flushes.store(true, SeqCst);
    assert!(e.flush_all(&mut |_| {}).is_err());
    assert_eq!(
        e.dirty_blocks(),
        2,
        "blocks marked clean without a source flush"
    );
    src.heal();
    e.flush_all(&mut |_| {}).unwrap();
    assert_eq!(e.dirty_blocks(), 0);
    let mut back = vec![0u8; 2 * BS];
    src.inner().read_at(&mut back, 0).unwrap();
    assert!(back == vec![7u8; 2 * BS]);
}
