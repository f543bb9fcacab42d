//! The cache remembers which source it belongs to: a regular file by its
//! inode and its modification time at the clean shutdown, a block device by
//! its stable identifier in sysfs (here: loop devices, named by their
//! backing file). A cache started on another source, or on its file after
//! something else wrote it, never serves its clean entries as that source's
//! data, and refuses another source outright while it holds dirty blocks of
//! the first.

mod common;

use common::LoopDevice;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vblkcache::device::{BlockDevice, DeviceIdentity, FileDevice, OpenOptions};
use vblkcache::engine::{Engine, EngineConfig, EngineError, GeometryRequest, WriteMode};

const BS: usize = 4096;
const BLOCKS: usize = 64;

fn cfg() -> EngineConfig {
    EngineConfig {
        geometry: GeometryRequest {
            block_size: Some(BS as u32),
            cache_blocks: Some(32),
            assoc: Some(8),
        },
        mode: Some(WriteMode::Writeback),
        ..EngineConfig::default()
    }
}

fn file(path: &Path) -> Arc<dyn BlockDevice> {
    Arc::new(
        FileDevice::open(
            path,
            OpenOptions {
                direct: false,
                read_only: false,
                exclusive: false,
            },
        )
        .unwrap(),
    )
}

fn image(path: &Path, fill: u8) {
    std::fs::write(path, vec![fill; BLOCKS * BS]).unwrap();
}

fn read(e: &Engine, block: usize) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    e.read((block * BS) as u64, &mut b).unwrap();
    b
}

struct Rig {
    _dir: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
    cache: PathBuf,
}

/// Files A (0xAA) and B (0xBB) of the same size and a blank cache.
fn files() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, cache) = (
        dir.path().join("a.img"),
        dir.path().join("b.img"),
        dir.path().join("cache"),
    );
    image(&a, 0xAA);
    image(&b, 0xBB);
    std::fs::write(&cache, vec![0u8; 2 << 20]).unwrap();
    Rig {
        _dir: dir,
        a,
        b,
        cache,
    }
}

/// Uses the cache on `source` (A's data): block 1 cached clean, block 2
/// dirty (0xD2), then a clean shutdown.
fn prime(source: &Path, cache: &Path) {
    let e = Engine::open(file(source), file(cache), cfg()).unwrap();
    assert_eq!(read(&e, 1), vec![0xAA; BS]);
    e.write((2 * BS) as u64, &[0xD2; BS]).unwrap();
    // Let the background store of block 1 finish: a second read is a hit.
    let hits = e.stats().read_hits;
    assert_eq!(read(&e, 1), vec![0xAA; BS]);
    assert_eq!(e.stats().read_hits, hits + 1);
    e.shutdown(false).unwrap();
}

/// The cache primed on source file A.
fn rig() -> Rig {
    let r = files();
    prime(&r.a, &r.cache);
    r
}

#[test]
fn the_same_untouched_file_keeps_its_clean_entries() {
    let r = rig();
    still_warm(&r.a, &r.cache);
}

/// Opens the cache primed by `prime` on `source`: it kept its clean entry
/// (block 1 is a hit) and its dirty block.
fn still_warm(source: &Path, cache: &Path) {
    let e = Engine::open(file(source), file(cache), cfg()).unwrap();
    assert_eq!(e.status().start.clean_dropped, 0);
    let hits = e.stats().read_hits;
    assert_eq!(read(&e, 1), vec![0xAA; BS]);
    assert_eq!(e.stats().read_hits, hits + 1, "block 1 is still cached");
    assert_eq!(read(&e, 2), vec![0xD2; BS]);
    e.shutdown(false).unwrap();
}

#[test]
fn another_file_is_refused_while_the_cache_holds_dirty_blocks() {
    let r = rig();
    let err = Engine::open(file(&r.b), file(&r.cache), cfg()).err();
    assert!(
        matches!(err, Some(EngineError::SourceChanged { dirty: 1, .. })),
        "{err:?}"
    );
    let msg = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg.contains("--source-moved") && msg.contains("--format"),
        "{msg}"
    );
    // Nothing was changed: the original source still opens with its cache.
    let e = Engine::open(file(&r.a), file(&r.cache), cfg()).unwrap();
    assert_eq!(read(&e, 2), vec![0xD2; BS]);
    e.shutdown(false).unwrap();
    assert_eq!(std::fs::read(&r.b).unwrap(), vec![0xBB; BLOCKS * BS]);
}

#[test]
fn a_moved_source_keeps_dirty_blocks_and_drops_clean_entries() {
    let r = rig();
    let mut c = cfg();
    c.source_moved = true;
    let e = Engine::open(file(&r.b), file(&r.cache), c).unwrap();
    assert_eq!(e.status().start.clean_dropped, 1);
    // Block 1 comes from B, not from A's cached copy; the dirty block stays.
    assert_eq!(read(&e, 1), vec![0xBB; BS]);
    assert_eq!(read(&e, 2), vec![0xD2; BS]);
    e.shutdown(false).unwrap();
    // B is now the cache's source: no flag needed any more.
    let e = Engine::open(file(&r.b), file(&r.cache), cfg()).unwrap();
    assert_eq!(read(&e, 2), vec![0xD2; BS]);
    e.shutdown(false).unwrap();
}

#[test]
fn a_source_written_while_the_daemon_was_stopped_is_not_served_stale() {
    let r = rig();
    // Another tool writes block 1 of A (the cache holds it clean).
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut f = std::fs::OpenOptions::new().write(true).open(&r.a).unwrap();
    f.seek(SeekFrom::Start(BS as u64)).unwrap();
    f.write_all(&[0x11; BS]).unwrap();
    drop(f);
    let e = Engine::open(file(&r.a), file(&r.cache), cfg()).unwrap();
    assert_eq!(e.status().start.clean_dropped, 1);
    assert_eq!(read(&e, 1), vec![0x11; BS], "stale cached data served");
    assert_eq!(read(&e, 2), vec![0xD2; BS], "the dirty block is kept");
    e.shutdown(false).unwrap();
}

#[test]
fn the_caches_own_writes_to_the_source_do_not_count_as_a_change() {
    let r = rig();
    let e = Engine::open(file(&r.a), file(&r.cache), cfg()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    // Writeback writes block 2 to A, which changes A's modification time.
    e.flush_all(&mut |_| {}).unwrap();
    e.shutdown(false).unwrap();
    let e = Engine::open(file(&r.a), file(&r.cache), cfg()).unwrap();
    assert_eq!(
        e.status().start.clean_dropped,
        0,
        "own writeback seen as a change"
    );
    let hits = e.stats().read_hits;
    assert_eq!(read(&e, 2), vec![0xD2; BS]);
    assert_eq!(e.stats().read_hits, hits + 1, "block 2 is still cached");
    e.shutdown(false).unwrap();
}

/// Loop devices over A and B, and the cache primed on A's loop device.
fn block_rig() -> Option<(Rig, LoopDevice, LoopDevice)> {
    let r = files();
    let la = LoopDevice::attach(&r.a, 512)?;
    let lb = LoopDevice::attach(&r.b, 512)?;
    prime(&la.0, &r.cache);
    Some((r, la, lb))
}

#[test]
fn another_block_device_of_the_same_size_is_refused_while_dirty() {
    let Some((r, la, lb)) = block_rig() else {
        return;
    };
    let err = Engine::open(file(&lb.0), file(&r.cache), cfg()).err();
    assert!(
        matches!(err, Some(EngineError::SourceChanged { dirty: 1, .. })),
        "{err:?}"
    );
    let msg = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg.contains("they belong to the block device loop:")
            && msg.contains(&format!("{} is the block device loop:", lb.0.display())),
        "{msg}"
    );
    // The image file behind A's loop device is a regular file, not the
    // block device the cache knows: refused as well.
    let err = Engine::open(file(&r.a), file(&r.cache), cfg()).err();
    let msg = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("is the regular file with inode"), "{msg}");
    // Nothing was changed: A's loop device still opens with its cache.
    let e = Engine::open(file(&la.0), file(&r.cache), cfg()).unwrap();
    assert_eq!(e.status().start.clean_dropped, 0);
    assert_eq!(read(&e, 2), vec![0xD2; BS]);
    e.shutdown(false).unwrap();
    drop(lb);
    assert_eq!(std::fs::read(&r.b).unwrap(), vec![0xBB; BLOCKS * BS]);
}

#[test]
fn a_block_device_under_another_name_is_the_same_source() {
    let Some((r, la, lb)) = block_rig() else {
        return;
    };
    // As after a reboot that numbered the disks differently: A's image on
    // another loop device (attached while the first still holds its number).
    let la2 = LoopDevice::attach(&r.a, 512).expect("a third loop device");
    assert_ne!(la2.0, la.0);
    drop(la);
    still_warm(&la2.0, &r.cache);
    drop(lb);
}

#[test]
fn a_block_device_taken_as_moved_keeps_dirty_blocks_only() {
    let Some((r, _la, lb)) = block_rig() else {
        return;
    };
    let mut c = cfg();
    c.source_moved = true;
    let e = Engine::open(file(&lb.0), file(&r.cache), c).unwrap();
    assert_eq!(e.status().start.clean_dropped, 1);
    assert_eq!(read(&e, 1), vec![0xBB; BS], "A's cached block served for B");
    assert_eq!(read(&e, 2), vec![0xD2; BS]);
    e.shutdown(false).unwrap();
    // B's loop device is now the cache's source.
    let e = Engine::open(file(&lb.0), file(&r.cache), cfg()).unwrap();
    assert_eq!(read(&e, 2), vec![0xD2; BS]);
    e.shutdown(false).unwrap();
}

fn block_id(dev: &Path) -> Option<String> {
    match file(dev).identity() {
        Some(DeviceIdentity::Block { id }) => id,
        other => panic!("{}: not a block device identity: {other:?}", dev.display()),
    }
}

#[test]
fn a_loop_device_over_a_block_device_is_named_by_that_device() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    image(&img, 0xAA);
    let Some(inner) = LoopDevice::attach(&img, 512) else {
        return;
    };
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&img).unwrap());
    let inner_id = block_id(&inner.0);
    assert_eq!(
        inner_id.as_deref(),
        Some(format!("loop:ino={ino}+0+0").as_str())
    );
    // Not by the inode of its node in /dev, which is new at every boot.
    let outer = LoopDevice::attach(&inner.0, 512).expect("a second loop device");
    assert_eq!(
        block_id(&outer.0),
        Some(format!("loop:{}+0+0", inner_id.unwrap_or_default()))
    );
}

#[test]
fn a_block_device_without_an_identifier_is_not_taken_for_the_recorded_one() {
    let Some((r, _la, lb)) = block_rig() else {
        return;
    };
    // B's backing file deleted: sysfs names it "... (deleted)", so B has no
    // identifier at all.
    std::fs::remove_file(&r.b).unwrap();
    assert_eq!(block_id(&lb.0), None);
    let err = Engine::open(file(&lb.0), file(&r.cache), cfg()).err();
    let msg = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg.contains("dirty blocks of another source")
            && msg.contains("is a block device without a stable identifier"),
        "{msg}"
    );
}
