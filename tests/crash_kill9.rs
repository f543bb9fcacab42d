//! Crash consistency of the real daemon: random writes, FLUSHes and
//! sequential reads (which start the daemon's readahead) through libblkio,
//! SIGKILL at a random moment while requests are in flight, restart on the
//! same files, and check every sector of the disk. Each read must return
//! the last completed write of every sector (no write in flight overlaps
//! it).
//!
//! The contract checked: after a crash, a sector holds either what it held at
//! the last completed FLUSH or the data of a write to it issued after that
//! flush's snapshot (in flight or completed later). Never another sector's
//! data, never zeros, never anything older. Every sector written by a test
//! write encodes (write id, sector number), so its content names the write
//! that produced it; the source starts with write id 0 everywhere.
//!
//! Between the kill and the restart, `vblkcache check` must find the cache
//! consistent, and after the restart `status` must report the unclean start
//! with the journal the checker saw. The daemon keeps its crash state in
//! /dev/shm, so the restart must also keep every write completed before the
//! kill (a sector never reads older than its last completed write).
//!
//! `CRASH_ITERATIONS` sets the total number of kills (default 20); see
//! scripts/crash-soak.sh.

mod common;

use blkio::{Blkioq, Completion, ReqFlags};
use common::{check_json, decode_sector, fill_sector, status_json, Client, Daemon, Files, REGION};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SECTOR: usize = 512;
const DISK: usize = 16 << 20;
const SECTORS: usize = DISK / SECTOR;
const CACHE: u64 = 8 << 20;
/// Writes in flight at once (non-overlapping).
const DEPTH: usize = 8;
/// Largest write, in sectors (256 KiB): DEPTH slots fit in REGION.
const MAX_SECTORS: usize = 512;
const FLUSH_TAG: usize = usize::MAX;

/// What a slot has in flight: a write (an [`Issued`]) or a read of
/// `len` sectors from `start`.
#[derive(Clone, Copy, Debug)]
enum InFlight {
    Write(Issued),
    Read { start: usize, len: usize },
}

impl InFlight {
    fn range(&self) -> std::ops::Range<usize> {
        match *self {
            InFlight::Write(w) => w.start..w.start + w.len,
            InFlight::Read { start, len } => start..start + len,
        }
    }
}

/// True if a request in flight in `slots` touches a sector of `r`.
fn overlaps_in_flight(slots: &[Option<InFlight>], r: std::ops::Range<usize>) -> bool {
    slots
        .iter()
        .flatten()
        .any(|f| r.start < f.range().end && f.range().start < r.end)
}

/// Sectors of one sequential read (64 KiB).
const READ_SECTORS: usize = 128;

/// One issued write.
#[derive(Clone, Copy, Debug)]
struct Issued {
    id: u64,
    start: usize,
    len: usize,
}

/// What the client knows about the disk.
struct Oracle {
    /// Write id per sector as of the last completed FLUSH.
    durable: Vec<u64>,
    /// Write id per sector after the writes that completed.
    current: Vec<u64>,
    /// Writes issued since the last restart.
    issued: Vec<Issued>,
    next_id: u64,
}

impl Oracle {
    /// Every write id a sector may hold after a crash now.
    fn allowed(&self) -> HashMap<usize, Vec<u64>> {
        let mut m: HashMap<usize, Vec<u64>> = HashMap::new();
        for w in &self.issued {
            for s in w.start..w.start + w.len {
                if w.id > self.durable[s] {
                    m.entry(s).or_default().push(w.id);
                }
            }
        }
        m
    }
}

/// Per-run settings.
struct Run {
    block_size: &'static str,
    seed: u64,
}

struct Totals {
    kills: usize,
    commits_replayed: u64,
    dirty_recovered: u64,
    writes: u64,
    flushes: u64,
    in_flight_at_kill: u64,
    /// Sequential reads completed (and checked) before the kills.
    reads: u64,
    /// Blocks the killed daemons had read ahead (from the control socket
    /// just before each kill).
    readahead_blocks: u64,
    /// Requests served by the io_uring hit path in the daemons that were
    /// killed (read from the control socket just before each kill).
    direct_requests: u64,
}

/// Reads the whole disk and checks each sector against the oracle; returns
/// the write id each sector holds.
fn verify(client: &mut Client, oracle: &Oracle, what: &str, log: &str) -> Vec<u64> {
    let allowed = oracle.allowed();
    let mut q = client.queue(0);
    let mut ids = vec![0u64; SECTORS];
    let mut bad = Vec::new();
    for chunk in (0..DISK).step_by(REGION) {
        let data = q.read(chunk as u64, REGION);
        for (i, s) in data.chunks_exact(SECTOR).enumerate() {
            let sector = chunk / SECTOR + i;
            let ok_ids = |id: u64| {
                id == oracle.durable[sector]
                    || allowed.get(&sector).is_some_and(|v| v.contains(&id))
            };
            match decode_sector(s) {
                Ok((id, sec)) if sec == sector as u64 && ok_ids(id) => ids[sector] = id,
                got => bad.push((
                    sector,
                    format!(
                        "sector {sector}: got {got:?}, flushed id {}, later writes {:?}",
                        oracle.durable[sector],
                        allowed.get(&sector)
                    ),
                )),
            }
        }
    }
    if let Some(&(first, _)) = bad.first() {
        let covering: Vec<&Issued> = oracle
            .issued
            .iter()
            .filter(|w| (w.start..w.start + w.len).contains(&first))
            .collect();
        let msgs: Vec<&String> = bad.iter().take(8).map(|(_, m)| m).collect();
        panic!(
            "{what}: {} sectors violate the crash contract, first: {msgs:#?}\nissued writes covering sector {first}: {covering:?}\ndaemon log:\n{log}",
            bad.len()
        );
    }
    client.queues.insert(0, q.q);
    ids
}

/// Runs writes, flushes and sequential reads until the daemon dies.
/// Returns (writes completed, flushes completed, reads completed, requests
/// in flight when it died).
fn workload(
    q: &mut Blkioq,
    region: *mut u8,
    oracle: &mut Oracle,
    rng: &mut impl Rng,
    killed: &AtomicBool,
) -> (u64, u64, u64, u64) {
    let mut slots: Vec<Option<InFlight>> = vec![None; DEPTH];
    // Where the next sequential read starts.
    let mut next_read = rng.gen_range(0..SECTORS / READ_SECTORS) * READ_SECTORS;
    let mut flush_snapshot: Option<Vec<u64>> = None;
    let (mut writes, mut flushes, mut reads) = (0u64, 0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "the daemon was never killed");
        // Fill free slots with new writes that do not overlap any in flight.
        for slot in 0..DEPTH {
            if slots[slot].is_some() || killed.load(Ordering::SeqCst) {
                continue;
            }
            let base = slot * MAX_SECTORS * SECTOR;
            if rng.gen_bool(0.3) {
                // A read on from the last one, unless a write in flight
                // overlaps it (its result would not be known).
                if next_read + READ_SECTORS > SECTORS {
                    next_read = 0;
                }
                if overlaps_in_flight(&slots, next_read..next_read + READ_SECTORS) {
                    continue;
                }
                // SAFETY: slot `slot` covers [base, base + MAX_SECTORS*SECTOR)
                // of the REGION-byte mapping, no request in flight uses it,
                // and READ_SECTORS <= MAX_SECTORS.
                let ptr = unsafe { region.add(base) };
                q.read(
                    (next_read * SECTOR) as u64,
                    ptr,
                    READ_SECTORS * SECTOR,
                    slot,
                    ReqFlags::empty(),
                );
                slots[slot] = Some(InFlight::Read {
                    start: next_read,
                    len: READ_SECTORS,
                });
                next_read += READ_SECTORS;
                continue;
            }
            let len = if rng.gen_bool(0.2) {
                rng.gen_range(1..=MAX_SECTORS)
            } else {
                rng.gen_range(1..=16)
            };
            let start = if rng.gen_bool(0.3) {
                // Aligned to 4K, so whole cache blocks are written too.
                rng.gen_range(0..=(SECTORS - len) / 8) * 8
            } else {
                rng.gen_range(0..=SECTORS - len)
            };
            if overlaps_in_flight(&slots, start..start + len) {
                continue;
            }
            let w = Issued {
                id: oracle.next_id,
                start,
                len,
            };
            oracle.next_id += 1;
            // SAFETY: slot `slot` covers [base, base + MAX_SECTORS*SECTOR) of
            // the REGION-byte mapping, and no request in flight uses it.
            let buf = unsafe { std::slice::from_raw_parts_mut(region.add(base), len * SECTOR) };
            for (i, s) in buf.chunks_exact_mut(SECTOR).enumerate() {
                fill_sector(s, w.id, (start + i) as u64);
            }
            oracle.issued.push(w);
            // SAFETY: as above; the pointer stays valid while the request runs.
            let ptr = unsafe { region.add(base) };
            q.write(
                (start * SECTOR) as u64,
                ptr,
                len * SECTOR,
                slot,
                ReqFlags::empty(),
            );
            slots[slot] = Some(InFlight::Write(w));
        }
        if flush_snapshot.is_none() && rng.gen_range(0..4) == 0 && !killed.load(Ordering::SeqCst) {
            // The flush covers the writes completed so far.
            flush_snapshot = Some(oracle.current.clone());
            q.flush(FLUSH_TAG, ReqFlags::empty());
        }
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..DEPTH + 1).map(|_| MaybeUninit::uninit()).collect();
        let mut timeout = Duration::from_millis(20);
        let got = match q.do_io(&mut comps, 1, Some(&mut timeout), None) {
            Ok(n) => n,
            Err(_) if killed.load(Ordering::SeqCst) => {
                let in_flight =
                    slots.iter().flatten().count() + usize::from(flush_snapshot.is_some());
                return (writes, flushes, reads, in_flight as u64);
            }
            Err(e) if e.errno() == blkio::Errno::TIME => 0,
            Err(e) => panic!("do_io: {e:?}"),
        };
        for c in comps.iter().take(got) {
            // SAFETY: do_io initialised the first `got` entries.
            let c = unsafe { c.assume_init_read() };
            if c.ret != 0 {
                assert!(killed.load(Ordering::SeqCst), "request failed: {}", c.ret);
                continue;
            }
            if c.user_data == FLUSH_TAG {
                oracle.durable = flush_snapshot.take().unwrap();
                flushes += 1;
            } else {
                match slots[c.user_data].take().unwrap() {
                    InFlight::Write(w) => {
                        for s in w.start..w.start + w.len {
                            oracle.current[s] = w.id;
                        }
                        writes += 1;
                    }
                    InFlight::Read { start, len } => {
                        let base = c.user_data * MAX_SECTORS * SECTOR;
                        // SAFETY: the read into this slot has completed and
                        // nothing else uses the slot until it is refilled.
                        let data =
                            unsafe { std::slice::from_raw_parts(region.add(base), len * SECTOR) };
                        for (i, got) in data.chunks_exact(SECTOR).enumerate() {
                            let s = start + i;
                            let want = (oracle.current[s], s as u64);
                            assert!(
                                decode_sector(got).as_ref() == Ok(&want),
                                "read of sector {s} before the kill: got {:?}, want {want:?}",
                                decode_sector(got)
                            );
                        }
                        reads += 1;
                    }
                }
            }
        }
    }
}

fn iterations() -> usize {
    std::env::var("CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// Kills the daemon `kills` times; the mode of each iteration comes from `mode_of`.
fn crash_loop(run: &Run, kills: usize, mode_of: impl Fn(usize) -> &'static str) -> Totals {
    let files = Files::new(SECTOR, CACHE, run.seed);
    let mut initial = vec![0u8; DISK];
    for (i, s) in initial.chunks_exact_mut(SECTOR).enumerate() {
        fill_sector(s, 0, i as u64);
    }
    std::fs::write(&files.source, &initial).unwrap();
    drop(initial);
    let control = files.dir.path().join("ctl.sock");
    let control_s = control.display().to_string();
    let mut oracle = Oracle {
        durable: vec![0; SECTORS],
        current: vec![0; SECTORS],
        issued: Vec::new(),
        next_id: 1,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(run.seed);
    let mut totals = Totals {
        kills: 0,
        commits_replayed: 0,
        dirty_recovered: 0,
        writes: 0,
        flushes: 0,
        in_flight_at_kill: 0,
        reads: 0,
        readahead_blocks: 0,
        direct_requests: 0,
    };
    let mut last_check: Option<serde_json::Value> = None;
    for it in 0..=kills {
        let mode = mode_of(it);
        let mut args = vec![
            "--mode",
            mode,
            "--block-size",
            run.block_size,
            "--control",
            &control_s,
        ];
        // Every third daemon busy-polls its queue when it is killed.
        if it % 3 == 2 {
            args.extend(["--poll", "50us"]);
        }
        let daemon = Daemon::start(&files, &args);
        let mut client = Client::connect(&files.socket, 1);
        let what = format!(
            "iteration {it} (mode {mode}, block size {})",
            run.block_size
        );
        let ids = verify(&mut client, &oracle, &what, &daemon.log_text());
        if let Some(check) = last_check.take() {
            let st = status_json(&control);
            let start = &st["start"];
            assert_eq!(start["clean"], false, "{what}: status after a kill: {st}");
            assert_eq!(
                start["commits_replayed"], check["journal"]["commits"],
                "{what}: the daemon replayed a different journal than check saw: {st} vs {check}"
            );
            // The daemon keeps its mapping in a crash-state file (in
            // /dev/shm by default), so after a kill on the same boot it
            // recovers more than the journal that `check` reads: every write
            // it had completed, not only those before the last FLUSH.
            let from_file = start["crash_state_recovered"].as_u64();
            assert!(from_file.is_some(), "{what}: crash state not used: {st}");
            assert_eq!(start["dirty_recovered"].as_u64(), from_file, "{what}: {st}");
            let lost: Vec<usize> = (0..SECTORS)
                .filter(|&s| ids[s] < oracle.current[s])
                .collect();
            assert!(
                lost.is_empty(),
                "{what}: {} sectors lost a write completed before the kill, first {:?} \
                 (completed id {}, read id {})",
                lost.len(),
                lost.first(),
                oracle.current[lost[0]],
                ids[lost[0]]
            );
            assert!(start["load_ms"].is_u64() && start["clean_dropped"].is_u64());
            totals.commits_replayed += start["commits_replayed"].as_u64().unwrap();
            totals.dirty_recovered += start["dirty_recovered"].as_u64().unwrap();
            assert!(
                daemon.log_text().contains("not shut down cleanly"),
                "{what}: recovery not logged"
            );
        }
        // The recovered content is the new baseline once flushed.
        let mut q0 = client.queue(0);
        q0.flush();
        client.queues.insert(0, q0.q);
        oracle.current = ids.clone();
        oracle.durable = ids;
        oracle.issued.clear();
        if it == kills {
            drop(client);
            let log = daemon.log_text();
            assert!(daemon.stop().success(), "{log}");
            break;
        }

        let killed = Arc::new(AtomicBool::new(false));
        let delay = Duration::from_millis(rng.gen_range(30..400));
        let pid = daemon.pid();
        let killer = {
            let killed = Arc::clone(&killed);
            let control = control.clone();
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                let st = status_json(&control);
                let direct = st["stats"]["direct_requests"].as_u64().unwrap_or(0);
                let ahead = st["stats"]["readahead_blocks"].as_u64().unwrap_or(0);
                // SAFETY: kill() has no memory effects; the pid is our child,
                // not reaped until the main thread waits for it.
                let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
                killed.store(true, Ordering::SeqCst);
                (rc, direct, ahead)
            })
        };
        let region = client.regions[0].addr as *mut u8;
        let (w, f, r, in_flight) = workload(
            &mut client.queues[0],
            region,
            &mut oracle,
            &mut rng,
            &killed,
        );
        let (rc, direct, ahead) = killer.join().unwrap();
        assert_eq!(rc, 0);
        totals.direct_requests += direct;
        totals.readahead_blocks += ahead;
        totals.reads += r;
        let status = daemon.signal_and_wait(libc::SIGKILL);
        assert!(!status.success());
        drop(client);
        totals.kills += 1;
        totals.writes += w;
        totals.flushes += f;
        totals.in_flight_at_kill += in_flight;

        let (code, check) = check_json(&files.cache);
        assert_eq!(code, 0, "{what}: check after the kill: {check:#}");
        assert_eq!(check["consistent"], true);
        assert_eq!(check["superblock"]["clean"], false);
        last_check = Some(check);
    }
    totals
}

fn report(name: &str, t: &Totals, started: Instant) {
    eprintln!(
        "{name}: {} kills in {:.1}s: {} writes, {} flushes and {} reads completed, {} requests in flight at kills, {} commits replayed, {} dirty blocks recovered, {} requests served by io_uring and {} blocks read ahead in the killed daemons",
        t.kills,
        started.elapsed().as_secs_f64(),
        t.writes,
        t.flushes,
        t.reads,
        t.in_flight_at_kill,
        t.commits_replayed,
        t.dirty_recovered,
        t.direct_requests,
        t.readahead_blocks
    );
}

#[test]
fn kill9_writeback_4k_blocks_and_other_modes() {
    let started = Instant::now();
    let kills = iterations().div_ceil(2).max(3);
    let t = crash_loop(
        &Run {
            block_size: "4K",
            seed: 11,
        },
        kills,
        // The last two iterations run write-through and write-around (with
        // the dirty blocks left by the write-back iterations).
        move |it| match kills.saturating_sub(it) {
            1 => "writearound",
            2 => "writethrough",
            _ => "writeback",
        },
    );
    report("4K", &t, started);
    assert!(t.writes > 0 && t.flushes > 0 && t.reads > 0);
    assert!(
        t.readahead_blocks > 0,
        "the killed daemons read nothing ahead"
    );
    assert!(
        t.commits_replayed > 0,
        "no kill ever left a journal to replay"
    );
    assert!(t.dirty_recovered > 0, "no kill ever left dirty blocks");
    assert!(
        t.direct_requests > 0,
        "no request of the killed daemons took the io_uring path"
    );
}

#[test]
fn kill9_writeback_64k_blocks() {
    let started = Instant::now();
    let kills = (iterations() / 2).max(1);
    let t = crash_loop(
        &Run {
            block_size: "64K",
            seed: 23,
        },
        kills,
        |_| "writeback",
    );
    report("64K", &t, started);
    assert!(t.writes > 0 && t.flushes > 0 && t.reads > 0);
    assert!(
        t.readahead_blocks > 0,
        "the killed daemons read nothing ahead"
    );
}

/// Deterministic form of the violation the kill loop finds: a dirty block
/// loaded from the cache device (after a crash or a clean shutdown) is
/// written back and its frame reused for another block without a commit
/// saying the frame is no longer dirty; a crash then maps the old block to
/// the new block's data.
#[test]
fn loaded_dirty_frame_is_not_reused_before_a_commit() {
    use vblkcache::device::{BlockDevice, MemDevice};
    use vblkcache::engine::{Engine, EngineConfig, GeometryRequest, WriteMode};
    const BS: usize = 4096;
    let src_data: Vec<u8> = (0..(4 << 20)).map(|i| (i % 251) as u8).collect();
    let src = Arc::new(MemDevice::from_bytes(&src_data));
    let cache = Arc::new(MemDevice::new(16 << 20));
    let cfg = EngineConfig {
        // One set of 64 frames: every frame competes for every block.
        geometry: GeometryRequest {
            block_size: Some(BS as u32),
            cache_blocks: Some(64),
            assoc: Some(64),
        },
        mode: Some(WriteMode::Writeback),
        ..EngineConfig::default()
    };
    let e = Engine::open(src.clone(), cache.clone(), cfg.clone()).unwrap();
    e.write(0, &vec![0xAA; BS]).unwrap();
    e.flush().unwrap();
    e.shutdown(false).unwrap();
    drop(e);

    // Clean restart: block 0 is loaded dirty. Write it back, then make the
    // engine reuse every frame for other blocks, without a FLUSH.
    let e = Engine::open(src.clone(), cache.clone(), cfg.clone()).unwrap();
    assert_eq!(e.status().dirty_blocks, 1);
    e.flush_all(&mut |_| {}).unwrap();
    for b in 1..=128u64 {
        e.write(b * BS as u64, &vec![b as u8; BS]).unwrap();
    }
    drop(e); // crash: no shutdown

    let e = Engine::open(src.clone(), cache.clone(), cfg).unwrap();
    let mut got = vec![0u8; BS];
    e.read(0, &mut got).unwrap();
    let held: Vec<u8> = got.iter().take(4).copied().collect();
    assert!(
        got.iter().all(|&b| b == 0xAA),
        "block 0 was flushed as 0xAA but reads {held:02x?}... after the crash"
    );
    let _ = src.size();
    e.shutdown(false).unwrap();
}
