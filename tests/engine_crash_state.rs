//! The crash state (`engine::crashstate`): the live mapping kept in a shared
//! file, so that a daemon killed without a clean shutdown keeps every
//! write-back write it had completed. A "crash" here is an engine dropped
//! without `shutdown`, over memory devices that keep every write (what a
//! killed process leaves in the kernel); a crash in the middle of an
//! operation is a copy of the crash-state file taken while a gate holds the
//! operation.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use vblkcache::device::{FaultDevice, GateDevice, GateOp, MemDevice};
use vblkcache::engine::{Engine, EngineConfig, GeometryRequest, WriteMode, WritebackConfig};

const BS: usize = 4096;
const BLOCKS: u64 = 256;
const WAIT: Duration = Duration::from_secs(10);

fn cfg(dir: Option<&Path>) -> EngineConfig {
    EngineConfig {
        geometry: GeometryRequest {
            block_size: Some(BS as u32),
            cache_blocks: Some(BLOCKS),
            assoc: Some(8),
        },
        mode: Some(WriteMode::Writeback),
        // No background writeback: dirty blocks stay in the cache only.
        writeback: WritebackConfig {
            high_watermark_pct: 100,
            low_watermark_pct: 25,
            max_run_bytes: 4 << 20,
            max_inflight_runs: 16,
            idle_drain_after: None,
        },
        crash_state_dir: dir.map(Path::to_path_buf),
        ..EngineConfig::default()
    }
}

fn pattern(block: u64, round: u8) -> Vec<u8> {
    (0..BS)
        .map(|i| (i as u64 * 7 + block * 13 + u64::from(round)) as u8)
        .collect()
}

fn read_block(e: &Engine, block: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    e.read(block * BS as u64, &mut b).unwrap();
    b
}

fn crash_file(dir: &Path) -> PathBuf {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|d| d.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "frames"))
        .collect();
    assert_eq!(files.len(), 1, "one crash-state file in {dir:?}: {files:?}");
    files[0].clone()
}

/// Writes 40 blocks, FLUSHes, writes 20 more and overwrites 10 of the
/// first, then crashes. Returns what each block must read back.
fn write_then_crash(
    src: &Arc<MemDevice>,
    cache: &Arc<MemDevice>,
    dir: Option<&Path>,
) -> Vec<Vec<u8>> {
    let e = Engine::open(src.clone(), cache.clone(), cfg(dir)).unwrap();
    let mut want: Vec<Vec<u8>> = (0..100).map(|_| vec![0u8; BS]).collect();
    for b in 0..40 {
        want[b as usize] = pattern(b, 1);
        e.write(b * BS as u64, &want[b as usize]).unwrap();
    }
    e.flush().unwrap();
    for b in (40..60).chain(5..15) {
        want[b as usize] = pattern(b, 2);
        e.write(b * BS as u64, &want[b as usize]).unwrap();
    }
    // Half a block into a cached dirty block, and into a new one.
    for b in [20u64, 70] {
        want[b as usize][..BS / 2].copy_from_slice(&pattern(b, 3)[..BS / 2]);
        e.write(b * BS as u64, &pattern(b, 3)[..BS / 2]).unwrap();
    }
    drop(e);
    want
}

#[test]
fn writes_completed_before_a_crash_survive_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = Arc::new(MemDevice::new(100 * BS as u64));
    let cache = Arc::new(MemDevice::new(4 << 20));
    let want = write_then_crash(&src, &cache, Some(dir.path()));
    let e = Engine::open(src.clone(), cache.clone(), cfg(Some(dir.path()))).unwrap();
    let start = e.status().start;
    assert!(!start.clean);
    assert_eq!(start.crash_state_recovered, Some(61));
    for b in 0..100 {
        assert!(
            read_block(&e, b) == want[b as usize],
            "block {b} after the crash"
        );
    }
    // The recovered state is durable: crash again at once, without the
    // file this time, and the journal alone has it all.
    drop(e);
    std::fs::remove_file(crash_file(dir.path())).unwrap();
    let e = Engine::open(src.clone(), cache.clone(), cfg(Some(dir.path()))).unwrap();
    assert_eq!(e.status().start.crash_state_recovered, None);
    for b in 0..100 {
        assert!(
            read_block(&e, b) == want[b as usize],
            "block {b} after the second crash"
        );
    }
    // A clean shutdown removes the file.
    e.shutdown(false).unwrap();
    drop(e);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// The control: without the crash state the same crash loses writes
/// completed after the FLUSH (what the crash state is for), and keeps the
/// ones before it.
#[test]
fn without_the_crash_state_writes_after_the_last_flush_are_lost() {
    let src = Arc::new(MemDevice::new(100 * BS as u64));
    let cache = Arc::new(MemDevice::new(4 << 20));
    let want = write_then_crash(&src, &cache, None);
    let e = Engine::open(src.clone(), cache.clone(), cfg(None)).unwrap();
    assert_eq!(e.status().start.crash_state_recovered, None);
    let lost = (0..100)
        .filter(|&b| read_block(&e, b) != want[b as usize])
        .count();
    assert!(lost >= 20, "{lost} blocks differ");
    for b in (0..5).chain(15..20).chain(21..40) {
        assert!(read_block(&e, b) == want[b as usize], "flushed block {b}");
    }
}

/// A damaged, foreign or stale file is not used; recovery goes by the
/// journal, and the flushed writes are all there.
#[test]
fn an_unusable_crash_state_falls_back_to_the_journal() {
    for damage in ["checksum", "boot", "run"] {
        let dir = tempfile::tempdir().unwrap();
        let src = Arc::new(MemDevice::new(100 * BS as u64));
        let cache = Arc::new(MemDevice::new(4 << 20));
        let want = write_then_crash(&src, &cache, Some(dir.path()));
        let path = crash_file(dir.path());
        let mut raw = std::fs::read(&path).unwrap();
        match damage {
            "checksum" => raw[41] ^= 1,
            "boot" => {
                // Another boot id with a valid checksum.
                raw[64] = if raw[64] == b'0' { b'1' } else { b'0' };
                let crc = crc32c::crc32c(&raw[..508]);
                raw[508..512].copy_from_slice(&crc.to_le_bytes());
            }
            _ => {
                raw[32] ^= 1;
                let crc = crc32c::crc32c(&raw[..508]);
                raw[508..512].copy_from_slice(&crc.to_le_bytes());
            }
        }
        std::fs::write(&path, &raw).unwrap();
        let e = Engine::open(src.clone(), cache.clone(), cfg(Some(dir.path()))).unwrap();
        assert_eq!(e.status().start.crash_state_recovered, None, "{damage}");
        for b in (0..5).chain(15..20).chain(21..40) {
            assert!(read_block(&e, b) == want[b as usize], "{damage}: block {b}");
        }
    }
}

/// A crash while a write brings a new block into the cache: the frame's
/// data is not the block's yet (here the write never reaches the cache), so
/// the block must read as before the write, not as the frame's old bytes.
#[test]
fn a_new_block_still_being_written_at_the_crash_is_not_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let old: Vec<u8> = (0..100 * BS).map(|i| (i / 3) as u8).collect();
    let src = Arc::new(MemDevice::from_bytes(&old));
    let mem = Arc::new(MemDevice::new(4 << 20));
    let gate = Arc::new(GateDevice::new(mem.clone()));
    let e = Arc::new(Engine::open(src.clone(), gate.clone(), cfg(Some(dir.path()))).unwrap());
    e.write(0, &pattern(0, 1)).unwrap();
    gate.close(GateOp::Write);
    let w = {
        let e = e.clone();
        std::thread::spawn(move || e.write(9 * BS as u64, &pattern(9, 1)))
    };
    assert!(gate.wait_held(GateOp::Write, 1, WAIT));
    // The process dies here: what the file holds now is what it leaves.
    let snapshot = std::fs::read(crash_file(dir.path())).unwrap();
    gate.power_off();
    gate.open_all();
    assert!(w.join().unwrap().is_err());
    drop(e);
    std::fs::write(crash_file(dir.path()), &snapshot).unwrap();
    let e = Engine::open(src.clone(), mem.clone(), cfg(Some(dir.path()))).unwrap();
    assert_eq!(e.status().start.crash_state_recovered, Some(1));
    assert!(read_block(&e, 0) == pattern(0, 1));
    assert!(
        read_block(&e, 9) == old[9 * BS..10 * BS],
        "block 9 is not what it was"
    );
}

/// A crash while the source is being zeroed for a write-zeroes of a dirty
/// block, after a FLUSH from another request committed meanwhile: the block
/// must read as its dirty data (the write-zeroes never completed), not as
/// the older data the source had. Before the fix the dirty frame was freed
/// before the source was zeroed, the FLUSH committed it free, and recovery
/// served the stale source data. No crash state here: the journal alone.
#[test]
fn a_crash_during_write_zeroes_keeps_the_dirty_block() {
    let old: Vec<u8> = (0..100 * BS).map(|i| (i / 5) as u8).collect();
    let src_mem = Arc::new(MemDevice::from_bytes(&old));
    let src = Arc::new(GateDevice::new(src_mem.clone()));
    let cache = Arc::new(MemDevice::new(4 << 20));
    let e = Arc::new(Engine::open(src.clone(), cache.clone(), cfg(None)).unwrap());
    let dirty = pattern(3, 9);
    e.write(3 * BS as u64, &dirty).unwrap();
    e.flush().unwrap();
    src.close(GateOp::WriteZeroes);
    let z = {
        let e = e.clone();
        std::thread::spawn(move || e.write_zeroes(3 * BS as u64, BS as u64))
    };
    assert!(src.wait_held(GateOp::WriteZeroes, 1, WAIT));
    // Another request's FLUSH commits while the zeroing is held.
    e.write(7 * BS as u64, &pattern(7, 1)).unwrap();
    e.flush().unwrap();
    // The power goes: the zeroing never reaches the source.
    src.power_off();
    src.open_all();
    assert!(z.join().unwrap().is_err());
    drop(e);
    let e = Engine::open(src_mem.clone(), cache.clone(), cfg(None)).unwrap();
    let got = read_block(&e, 3);
    assert!(
        got != old[3 * BS..4 * BS],
        "block 3 went back to the source's stale data"
    );
    assert!(got == dirty, "block 3 is neither its data nor zeros");
    assert!(read_block(&e, 7) == pattern(7, 1));
}

/// The file in place holds the run's whole mapping. That it does at every
/// moment comes from the order in `Engine::open`: the file is published
/// only after the loaded entries are in it (crashstate's unit test checks
/// that nothing is in place before `publish`). Before, it was put in place
/// empty and filled afterwards: a kill in between left a file that named
/// the run and mapped nothing, and the next start dropped every dirty block,
/// FLUSHed ones included (found by a review, with a test that emptied the
/// file's entries by hand).
#[test]
fn the_file_in_place_holds_the_loaded_mapping() {
    let dir = tempfile::tempdir().unwrap();
    let src = Arc::new(MemDevice::new(100 * BS as u64));
    let cache = Arc::new(MemDevice::new(4 << 20));
    let e = Engine::open(src.clone(), cache.clone(), cfg(Some(dir.path()))).unwrap();
    for b in 0..10 {
        e.write(b * BS as u64, &pattern(b, 4)).unwrap();
    }
    e.shutdown(false).unwrap();
    drop(e);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    let e = Engine::open(src.clone(), cache.clone(), cfg(Some(dir.path()))).unwrap();
    assert_eq!(e.status().start.dirty_loaded, 10);
    let raw = std::fs::read(crash_file(dir.path())).unwrap();
    let dirty = raw[4096..]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .filter(|v| v >> 62 == 0b11) // VALID and DIRTY
        .count();
    assert_eq!(dirty, 10, "entries of the published file");
    drop(e);
}

/// A failed flush of the cache device removes the crash state: the device
/// may have lost data that the file maps, so a restart must go by the
/// journal (which stops at the last good commit).
#[test]
fn a_failed_cache_flush_drops_the_crash_state() {
    let dir = tempfile::tempdir().unwrap();
    let src = Arc::new(MemDevice::new(100 * BS as u64));
    let mem = Arc::new(MemDevice::new(4 << 20));
    let cache = Arc::new(FaultDevice::new(mem.clone()));
    let e = Engine::open(src.clone(), cache.clone(), cfg(Some(dir.path()))).unwrap();
    e.write(0, &pattern(0, 1)).unwrap();
    e.flush().unwrap();
    let path = crash_file(dir.path());
    e.write(BS as u64, &pattern(1, 1)).unwrap();
    cache
        .plan()
        .fail_flushes
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(e.flush().is_err());
    assert!(
        !path.exists(),
        "the crash state outlived a failed cache flush"
    );
    drop(e);
    let e = Engine::open(src.clone(), mem.clone(), cfg(Some(dir.path()))).unwrap();
    assert_eq!(e.status().start.crash_state_recovered, None);
    assert!(read_block(&e, 0) == pattern(0, 1), "the FLUSHed block");
}
