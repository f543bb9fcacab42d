//! Deterministic interleavings of the engine's concurrency protocol, forced
//! with a source device whose writes wait at a gate.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vblkcache::device::{BlockDevice, DeviceError, MemDevice};
use vblkcache::engine::{Engine, EngineConfig, GeometryRequest, WriteMode};

/// Source whose writes announce themselves and then wait for a release.
struct GatedSource {
    inner: MemDevice,
    entered: Mutex<Sender<()>>,
    release: Mutex<Receiver<()>>,
}

impl BlockDevice for GatedSource {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        let _ = self.entered.lock().unwrap().send(());
        let _ = self.release.lock().unwrap().recv();
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
}

fn gated(size: u64) -> (Arc<GatedSource>, Receiver<()>, Sender<()>) {
    let (etx, erx) = channel();
    let (rtx, rrx) = channel();
    let src = Arc::new(GatedSource {
        inner: MemDevice::from_bytes(&vec![1u8; size as usize]),
        entered: Mutex::new(etx),
        release: Mutex::new(rrx),
    });
    (src, erx, rtx)
}

fn engine(source: Arc<GatedSource>, mode: WriteMode) -> Arc<Engine> {
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
        let (src, entered, release) = gated(1 << 20);
        let e = engine(src, mode);
        let writer = {
            let e = e.clone();
            std::thread::spawn(move || e.write(0, &[9u8; 512]).unwrap())
        };
        entered.recv().unwrap();
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
        release.send(()).unwrap();
        writer.join().unwrap();
        assert_eq!(reader.join().unwrap(), [1u8; 512]);
        let mut b = [0u8; 512];
        e.read(0, &mut b).unwrap();
        assert_eq!(
            b, [9u8; 512],
            "stale block cached during an uncached write ({mode})"
        );
        drop(release);
    }
}

/// Two writethrough writes to one cached block must leave cache and source
/// equal: the second waits for the first to update both.
#[test]
fn writethrough_updates_are_exclusive() {
    let (src, entered, release) = gated(1 << 20);
    let e = engine(src.clone(), WriteMode::Writethrough);
    let mut b = [0u8; 4096];
    e.read(0, &mut b).unwrap(); // cache block 0
    std::thread::sleep(Duration::from_millis(20)); // let the store finish
    let w1 = {
        let e = e.clone();
        std::thread::spawn(move || e.write(0, &[2u8; 4096]).unwrap())
    };
    entered.recv().unwrap();
    let w2 = {
        let e = e.clone();
        std::thread::spawn(move || e.write(0, &[3u8; 4096]).unwrap())
    };
    std::thread::sleep(Duration::from_millis(50));
    release.send(()).unwrap();
    entered.recv().unwrap();
    release.send(()).unwrap();
    w1.join().unwrap();
    w2.join().unwrap();
    e.read(0, &mut b).unwrap();
    let mut s = [0u8; 4096];
    src.inner.read_at(&mut s, 0).unwrap();
    assert_eq!(
        b, s,
        "cache and source disagree after concurrent writethrough writes"
    );
}
