//! Data-integrity scenarios for the real daemon under cache pressure, with
//! several queues, control-socket operations, clean restarts and kill -9.
//!
//! Every sector written by the test encodes (op id, sector) (the pattern of
//! crash_kill9.rs), so a wrong sector names the write that produced it. The
//! source starts with op id 0 everywhere. Queues share one model: a request
//! locks its sectors in the model while it is in flight (so the expected
//! content of a read is exact), but queues write and read neighbouring
//! sectors of the same cache blocks and sets concurrently, and successive
//! writes of a sector come from different queues.
//!
//! After a clean stop (SIGTERM) every sector must hold its last completed
//! write. After a kill (crash state on) every sector must hold its last
//! completed write or the data of a write in flight at the kill. With the
//! crash state off: the content at the last completed FLUSH or a later write.
//!
//! Environment: VBC_INTEGRITY_SECS scales phase durations (default 1.0), VBC_INTEGRITY_SEED.

mod common;

use blkio::{Blkioq, Completion, ReqFlags};
use common::{
    check_json, decode_sector, fill_sector, status_json, Client, Daemon, Files, LoopDevice, BIN,
    REGION,
};
use rand::{Rng, SeedableRng};
use std::collections::HashSet;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECTOR: usize = 512;
const SLOTS: usize = 8;
const SLOT_BYTES: usize = REGION / SLOTS;
const SLOT_SECTORS: usize = SLOT_BYTES / SECTOR;
const NONE: u64 = u64::MAX;
const READING: u64 = u64::MAX - 1;

/// Ok(id) if `s` is the well-formed pattern of (id, `sector`).
fn decode(s: &[u8], sector: usize) -> Result<u64, String> {
    let (id, sec) = decode_sector(s)?;
    if sec != sector as u64 {
        return Err(format!("data of op {id} for sector {sec}"));
    }
    Ok(id)
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Write,
    Zero,
    Discard,
}

struct Model {
    /// Op id per sector of the last completed write/zero/discard.
    cur: Vec<u64>,
    /// Op id in flight per sector (NONE, READING, or an op id).
    pending: Vec<u64>,
    /// Op id per sector as of the last completed FLUSH (when tracked).
    durable: Vec<u64>,
    zero_ops: HashSet<u64>,
    /// (id, start, len, kind) of every op issued since the last baseline.
    issued: Vec<(u64, usize, usize, Kind)>,
    next_id: u64,
    track_durable: bool,
    /// Overlapping writes allowed: writes in flight per sector, ids of the
    /// writes of the current overlap episode, and sectors whose content is
    /// one of several ops (until a read tells which).
    overlap: bool,
    infl: Vec<u16>,
    epi: Vec<Vec<u64>>,
    cands: std::collections::HashMap<usize, Vec<u64>>,
    ambiguous_resolved: u64,
}

impl Model {
    fn new(sectors: usize, track_durable: bool) -> Model {
        Model {
            cur: vec![0; sectors],
            pending: vec![NONE; sectors],
            durable: vec![0; sectors],
            zero_ops: HashSet::new(),
            issued: Vec::new(),
            next_id: 1,
            track_durable,
            overlap: false,
            infl: vec![0; sectors],
            epi: vec![Vec::new(); sectors],
            cands: std::collections::HashMap::new(),
            ambiguous_resolved: 0,
        }
    }

    /// Locks a write's range (or, with `overlap`, joins writes in flight).
    fn lock_write(&mut self, start: usize, len: usize, id: u64) -> bool {
        if !self.overlap {
            return self.try_lock(start, len, id);
        }
        if self.pending[start..start + len].contains(&READING) {
            return false;
        }
        for s in start..start + len {
            self.infl[s] += 1;
            self.epi[s].push(id);
            self.pending[s] = id;
        }
        true
    }

    fn complete_write(&mut self, start: usize, len: usize, id: u64) {
        if !self.overlap {
            self.cur[start..start + len].fill(id);
            self.pending[start..start + len].fill(NONE);
            return;
        }
        for s in start..start + len {
            self.infl[s] -= 1;
            if self.infl[s] == 0 {
                let ep = std::mem::take(&mut self.epi[s]);
                if ep.len() == 1 {
                    self.cur[s] = ep[0];
                    self.cands.remove(&s);
                } else {
                    self.cur[s] = *ep.last().unwrap();
                    self.cands.insert(s, ep);
                }
                self.pending[s] = NONE;
            }
        }
    }

    /// With overlapping writes: the op among the candidates that `data`
    /// is, which then is the sector's known content.
    fn resolve(&mut self, data: &[u8], sec: usize) -> bool {
        let Some(c) = self.cands.get(&sec) else {
            return false;
        };
        if let Some(&id) = c.iter().find(|&&id| self.content_ok(data, id, sec)) {
            self.cur[sec] = id;
            self.cands.remove(&sec);
            self.ambiguous_resolved += 1;
            return true;
        }
        false
    }

    fn content_ok(&self, s: &[u8], id: u64, sector: usize) -> bool {
        if self.zero_ops.contains(&id) {
            s.iter().all(|&b| b == 0)
        } else {
            let mut want = [0u8; SECTOR];
            fill_sector(&mut want, id, sector as u64);
            want[..] == *s
        }
    }

    fn try_lock(&mut self, start: usize, len: usize, tag: u64) -> bool {
        if self.pending[start..start + len].iter().any(|&p| p != NONE) {
            return false;
        }
        self.pending[start..start + len].fill(tag);
        true
    }
}

struct Shared {
    m: Mutex<Model>,
    killed: AtomicBool,
    stop: AtomicBool,
    errors: Mutex<Vec<String>>,
    nerr: AtomicU64,
    writes: AtomicU64,
    reads: AtomicU64,
    bytes_w: AtomicU64,
    bytes_r: AtomicU64,
    flushes: AtomicU64,
    zeroes: AtomicU64,
    discards: AtomicU64,
    failed_after_kill: AtomicU64,
}

impl Shared {
    fn error(&self, msg: String) {
        self.nerr.fetch_add(1, SeqCst);
        let mut e = self.errors.lock().unwrap();
        if e.len() < 20 {
            e.push(msg);
        }
    }
}

struct Qw {
    q: Blkioq,
    buf: *mut u8,
}
// SAFETY: the region stays mapped while the Client lives (longer than the
// worker threads); each Qw is the only user of its region.
unsafe impl Send for Qw {}

#[derive(Clone)]
enum Op {
    Write {
        id: u64,
        start: usize,
        len: usize,
    },
    Read {
        start: usize,
        len: usize,
        snap: Option<Vec<u64>>,
    },
    Zero {
        id: u64,
        start: usize,
        len: usize,
        discard: bool,
    },
    Flush {
        snap: Option<Vec<u64>>,
    },
}

#[derive(Clone)]
struct Scenario {
    name: &'static str,
    disk: usize,
    block_size: &'static str,
    cache_blocks: u32,
    assoc: u32,
    queues: usize,
    source_latency: Option<&'static str>,
    /// Seconds of I/O per daemon run.
    secs: f64,
    /// Daemon runs with I/O.
    runs: usize,
    /// Kill -9 at the end of each run (else SIGTERM).
    kill: bool,
    control: bool,
    crash_state: bool,
    tmpfs: bool,
    extra: &'static [&'static str],
    /// Percentages of ops: write, read, zero, discard (rest: flush).
    mix: [u32; 4],
    /// Largest request in sectors.
    max_len: usize,
    /// Check the source file against the model after `vblkcache flush`.
    check_source: bool,
    /// Half of the reads run without waiting for writes to their sectors.
    racy_reads: bool,
    /// Writes may overlap writes in flight.
    overlap_writes: bool,
    /// SIGTERM while I/O runs (instead of a quiesced stop); with `kill` unset.
    term_under_load: bool,
    /// Start each run after the first in a random mode.
    vary_mode: bool,
    /// With `kill`: SIGTERM first, then SIGKILL during the shutdown.
    term_then_kill: bool,
    /// After each kill, this many more daemons killed while starting up.
    kill_storm: usize,
    /// Source and cache on loop devices with logical sectors of this size.
    loop_sector: Option<u32>,
}

impl Scenario {
    fn base(name: &'static str) -> Scenario {
        Scenario {
            name,
            disk: 32 << 20,
            block_size: "4K",
            cache_blocks: 256,
            assoc: 8,
            queues: 2,
            source_latency: None,
            secs: 8.0,
            runs: 3,
            kill: false,
            control: false,
            crash_state: true,
            tmpfs: false,
            extra: &[],
            mix: [50, 35, 4, 4],
            max_len: SLOT_SECTORS,
            check_source: true,
            racy_reads: false,
            overlap_writes: false,
            term_under_load: false,
            kill_storm: 0,
            term_then_kill: false,
            vary_mode: false,
            loop_sector: None,
        }
    }
}

fn scale() -> f64 {
    std::env::var("VBC_INTEGRITY_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0)
}

fn seed() -> u64 {
    std::env::var("VBC_INTEGRITY_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

fn bs_bytes(s: &str) -> usize {
    let n: usize = s.trim_end_matches(['K', 'M']).parse().unwrap();
    if s.ends_with('M') {
        n << 20
    } else {
        n << 10
    }
}

/// Picks a range for a request.
fn pick_range(
    rng: &mut impl Rng,
    sectors: usize,
    bs_sectors: usize,
    max_len: usize,
) -> (usize, usize) {
    let max_len = max_len.min(sectors);
    let len = match rng.gen_range(0..100) {
        0..=49 => rng.gen_range(1..=16.min(max_len)),
        50..=79 => rng.gen_range(1..=(bs_sectors * 3).min(max_len)),
        _ => rng.gen_range(1..=max_len),
    };
    let hot = (8 << 20) / SECTOR;
    let start = match rng.gen_range(0..100) {
        // Hot area shared by all queues.
        0..=39 => rng.gen_range(0..=hot.min(sectors) - len.min(hot.min(sectors))),
        // Block aligned.
        40..=59 => (rng.gen_range(0..=sectors - len) / bs_sectors) * bs_sectors,
        // Touching the last sectors of the disk.
        60..=69 => sectors - len - rng.gen_range(0..=(sectors - len).min(3)),
        _ => rng.gen_range(0..=sectors - len),
    };
    let len = len.min(sectors - start);
    (start, len)
}

/// One queue's workload until stop or kill.
fn worker(mut qw: Qw, sh: Arc<Shared>, sc: Scenario, seed: u64, deadline: Instant) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let sectors = sc.disk / SECTOR;
    let bs_sectors = bs_bytes(sc.block_size) / SECTOR;
    let mut slots: Vec<Option<Op>> = vec![None; SLOTS];
    let flush_slot_busy = |slots: &Vec<Option<Op>>| {
        slots
            .iter()
            .flatten()
            .any(|o| matches!(o, Op::Flush { .. }))
    };
    let mut dead_since: Option<Instant> = None;
    loop {
        let stopping = sh.stop.load(SeqCst) || sh.killed.load(SeqCst) || Instant::now() >= deadline;
        if !stopping {
            for slot in 0..SLOTS {
                if slots[slot].is_some() {
                    continue;
                }
                let r = rng.gen_range(0..100u32);
                let [pw, pr, pz, pd] = sc.mix;
                // SAFETY: slot/region memory of a live blkio mapping, used by one request at a time; the pid is our unreaped child.
                let base = unsafe { qw.buf.add(slot * SLOT_BYTES) };
                if r >= pw + pr + pz + pd {
                    if flush_slot_busy(&slots) {
                        continue;
                    }
                    let snap = {
                        let m = sh.m.lock().unwrap();
                        m.track_durable.then(|| m.cur.clone())
                    };
                    qw.q.flush(slot, ReqFlags::empty());
                    slots[slot] = Some(Op::Flush { snap });
                    continue;
                }
                let (start, len) = pick_range(&mut rng, sectors, bs_sectors, sc.max_len);
                let mut m = sh.m.lock().unwrap();
                if r < pw {
                    let id = m.next_id;
                    if !m.lock_write(start, len, id) {
                        continue;
                    }
                    m.next_id += 1;
                    m.issued.push((id, start, len, Kind::Write));
                    drop(m);
                    // SAFETY: slot memory is ours while no request uses it.
                    let buf = unsafe { std::slice::from_raw_parts_mut(base, len * SECTOR) };
                    for (i, s) in buf.chunks_exact_mut(SECTOR).enumerate() {
                        fill_sector(s, id, (start + i) as u64);
                    }
                    qw.q.write(
                        (start * SECTOR) as u64,
                        base,
                        len * SECTOR,
                        slot,
                        ReqFlags::empty(),
                    );
                    slots[slot] = Some(Op::Write { id, start, len });
                } else if r < pw + pr {
                    // Racy reads do not wait for writes of their sectors.
                    let racy = sc.racy_reads && rng.gen_bool(0.5);
                    let snap = if racy {
                        Some(m.cur[start..start + len].to_vec())
                    } else {
                        if !m.try_lock(start, len, READING) {
                            continue;
                        }
                        None
                    };
                    drop(m);
                    // SAFETY: slot/region memory of a live blkio mapping, used by one request at a time; the pid is our unreaped child.
                    let buf = unsafe { std::slice::from_raw_parts_mut(base, len * SECTOR) };
                    buf.fill(0xEE);
                    qw.q.read(
                        (start * SECTOR) as u64,
                        base,
                        len * SECTOR,
                        slot,
                        ReqFlags::empty(),
                    );
                    slots[slot] = Some(Op::Read { start, len, snap });
                } else {
                    let discard = r >= pw + pr + pz;
                    let id = m.next_id;
                    if !m.lock_write(start, len, id) {
                        continue;
                    }
                    m.next_id += 1;
                    m.zero_ops.insert(id);
                    m.issued.push((
                        id,
                        start,
                        len,
                        if discard { Kind::Discard } else { Kind::Zero },
                    ));
                    drop(m);
                    let (o, l) = ((start * SECTOR) as u64, (len * SECTOR) as u64);
                    if discard {
                        qw.q.discard(o, l, slot, ReqFlags::empty());
                    } else {
                        qw.q.write_zeroes(o, l, slot, ReqFlags::empty());
                    }
                    slots[slot] = Some(Op::Zero {
                        id,
                        start,
                        len,
                        discard,
                    });
                }
            }
        }
        if slots.iter().all(|s| s.is_none()) {
            if stopping {
                return;
            }
            continue;
        }
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..SLOTS).map(|_| MaybeUninit::uninit()).collect();
        let mut timeout = Duration::from_millis(50);
        let got = match qw.q.do_io(&mut comps, 1, Some(&mut timeout), None) {
            Ok(n) => n,
            Err(e) if e.errno() == blkio::Errno::TIME => 0,
            Err(_) if sh.killed.load(SeqCst) => return,
            Err(e) => {
                sh.error(format!("do_io: {e:?}"));
                return;
            }
        };
        if got == 0 && sh.killed.load(SeqCst) {
            let t = *dead_since.get_or_insert_with(Instant::now);
            if t.elapsed() > Duration::from_millis(500) {
                return;
            }
        }
        if got == 0 && !sh.killed.load(SeqCst) && stopping {
            let t = *dead_since.get_or_insert_with(Instant::now);
            if t.elapsed() > Duration::from_secs(60) {
                sh.error(format!(
                    "{} requests never completed",
                    slots.iter().flatten().count()
                ));
                return;
            }
        }
        for c in comps.iter().take(got) {
            // SAFETY: do_io initialised the first `got` entries.
            let c = unsafe { c.assume_init_read() };
            let slot = c.user_data;
            let op = slots[slot].take().unwrap();
            // SAFETY: slot/region memory of a live blkio mapping, used by one request at a time; the pid is our unreaped child.
            let base = unsafe { qw.buf.add(slot * SLOT_BYTES) };
            if c.ret != 0 {
                if sh.killed.load(SeqCst) {
                    sh.failed_after_kill.fetch_add(1, SeqCst);
                    // Leave writes pending: they may have reached the disk.
                    if let Op::Read {
                        start,
                        len,
                        snap: None,
                    } = op
                    {
                        sh.m.lock().unwrap().pending[start..start + len].fill(NONE);
                    }
                    continue;
                }
                sh.error(format!("request failed with {}", c.ret));
                continue;
            }
            let mut m = sh.m.lock().unwrap();
            match op {
                Op::Write { id, start, len } | Op::Zero { id, start, len, .. } => {
                    m.complete_write(start, len, id);
                    match op {
                        Op::Write { .. } => {
                            sh.writes.fetch_add(1, SeqCst);
                            sh.bytes_w.fetch_add((len * SECTOR) as u64, SeqCst);
                        }
                        Op::Zero { discard: true, .. } => {
                            sh.discards.fetch_add(1, SeqCst);
                        }
                        _ => {
                            sh.zeroes.fetch_add(1, SeqCst);
                        }
                    }
                }
                Op::Read { start, len, snap } => {
                    // SAFETY: slot/region memory of a live blkio mapping, used by one request at a time; the pid is our unreaped child.
                    let buf = unsafe { std::slice::from_raw_parts(base, len * SECTOR) };
                    let mut bad = 0;
                    for (i, s) in buf.chunks_exact(SECTOR).enumerate() {
                        let sec = start + i;
                        let want = m.cur[sec];
                        let ok = if snap.is_none() && m.cands.contains_key(&sec) {
                            m.resolve(s, sec)
                        } else {
                            m.content_ok(s, want, sec)
                                || snap
                                    .as_ref()
                                    .is_some_and(|snap| racy_ok(&m, s, sec, snap[i]))
                        };
                        if !ok {
                            if bad < 3 {
                                sh.error(format!(
                                    "[{}] read {start}+{len}: sector {sec} expected op {want}{} got {:?}",
                                    sc.name,
                                    if m.zero_ops.contains(&want) { " (zeros)" } else { "" },
                                    decode(s, sec)
                                ));
                            }
                            bad += 1;
                        }
                    }
                    if snap.is_none() {
                        m.pending[start..start + len].fill(NONE);
                    }
                    sh.reads.fetch_add(1, SeqCst);
                    sh.bytes_r.fetch_add((len * SECTOR) as u64, SeqCst);
                }
                Op::Flush { snap } => {
                    if let Some(snap) = snap {
                        for (d, s) in m.durable.iter_mut().zip(snap.iter()) {
                            *d = (*d).max(*s);
                        }
                    }
                    sh.flushes.fetch_add(1, SeqCst);
                }
            }
        }
    }
}

/// A racy read of `sec` (issued when the sector held op `from`) may see
/// `from` or any op covering the sector issued after it.
fn racy_ok(m: &Model, s: &[u8], sec: usize, from: u64) -> bool {
    if m.content_ok(s, from, sec) {
        return true;
    }
    let i = m.issued.partition_point(|x| x.0 <= from);
    m.issued[i..]
        .iter()
        .any(|&(id, st, l, _)| (st..st + l).contains(&sec) && m.content_ok(s, id, sec))
}

fn control(ctl: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--control")
        .arg(ctl)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Control operations while I/O runs; returns a log of what it did.
fn controller(ctl: PathBuf, sh: Arc<Shared>, seed: u64, deadline: Instant) -> Vec<String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut log = Vec::new();
    let modes = ["writethrough", "writearound", "passthrough", "writeback"];
    while Instant::now() < deadline && !sh.killed.load(SeqCst) && !sh.stop.load(SeqCst) {
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..300)));
        if sh.killed.load(SeqCst) {
            break;
        }
        let (what, args): (String, Vec<&str>) = match rng.gen_range(0..10) {
            0..=3 => {
                let m = modes[rng.gen_range(0..modes.len())];
                (format!("set-mode {m}"), vec!["set-mode", m])
            }
            4..=5 => ("flush".into(), vec!["flush"]),
            6..=7 => ("status".into(), vec!["status", "--json"]),
            8 => ("set-mode writeback".into(), vec!["set-mode", "writeback"]),
            _ => ("reset-stats".into(), vec!["reset-stats"]),
        };
        let t = Instant::now();
        let (ok, out) = control(&ctl, &args);
        if !ok && !sh.killed.load(SeqCst) {
            log.push(format!("{what} FAILED: {}", out.trim()));
        } else {
            log.push(format!("{what} ok ({} ms)", t.elapsed().as_millis()));
        }
    }
    log
}

/// Reads the whole disk through queue `q`; checks every sector against the
/// model. `after_kill`: pending writes are allowed too; with `durable`
/// semantics (crash state off) anything from the last FLUSH on. The sectors
/// read become the new baseline.
fn verify_all(
    q: &mut Blkioq,
    buf: *mut u8,
    m: &mut Model,
    what: &str,
    after_kill: bool,
    durable_only: bool,
) -> Vec<String> {
    let sectors = m.cur.len();
    let mut bad = Vec::new();
    let mut nbad = 0usize;
    let mut read_ids = vec![0u64; sectors];
    let chunk = REGION / SECTOR;
    let mut s0 = 0;
    while s0 < sectors {
        let n = chunk.min(sectors - s0);
        q.read((s0 * SECTOR) as u64, buf, n * SECTOR, 0, ReqFlags::empty());
        let mut c = [MaybeUninit::<Completion>::uninit()];
        let got = q.do_io(&mut c, 1, None, None).unwrap();
        assert_eq!(got, 1);
        // SAFETY: slot/region memory of a live blkio mapping, used by one request at a time; the pid is our unreaped child.
        let c = unsafe { c[0].assume_init_read() };
        assert_eq!(c.ret, 0, "{what}: verify read at sector {s0} failed");
        // SAFETY: slot/region memory of a live blkio mapping, used by one request at a time; the pid is our unreaped child.
        let data = unsafe { std::slice::from_raw_parts(buf, n * SECTOR) };
        for (i, s) in data.chunks_exact(SECTOR).enumerate() {
            let sec = s0 + i;
            let cur = m.cur[sec];
            let mut ok = None;
            if m.content_ok(s, cur, sec) {
                ok = Some(cur);
            } else if m.resolve(s, sec) {
                ok = Some(m.cur[sec]);
            } else if after_kill {
                let p = m.pending[sec];
                if p != NONE && p != READING && m.content_ok(s, p, sec) {
                    ok = Some(p);
                }
                if ok.is_none() && durable_only {
                    let d = m.durable[sec];
                    if m.content_ok(s, d, sec) {
                        ok = Some(d);
                    } else {
                        // Any op covering the sector issued after the durable one.
                        let cand: Vec<u64> = m
                            .issued
                            .iter()
                            .filter(|(id, st, l, _)| *id >= d && (*st..*st + *l).contains(&sec))
                            .map(|x| x.0)
                            .collect();
                        ok = cand.into_iter().rev().find(|&id| m.content_ok(s, id, sec));
                    }
                }
            }
            match ok {
                Some(id) => read_ids[sec] = id,
                None => {
                    nbad += 1;
                    if bad.len() < 12 {
                        let covering: Vec<_> = m
                            .issued
                            .iter()
                            .filter(|(_, st, l, _)| (*st..*st + *l).contains(&sec))
                            .rev()
                            .take(4)
                            .collect();
                        bad.push(format!(
                            "{what}: sector {sec} (byte {}) expected op {cur}{} (pending {}, durable {}) got {:?}; last ops covering it {covering:?}",
                            sec * SECTOR,
                            if m.zero_ops.contains(&cur) { " (zeros)" } else { "" },
                            m.pending[sec] as i64,
                            m.durable[sec],
                            decode(s, sec)
                        ));
                    }
                }
            }
        }
        s0 += n;
    }
    if nbad > 0 {
        bad.push(format!("{what}: {nbad} bad sectors in total"));
    }
    m.cur = read_ids.clone();
    m.durable = read_ids;
    m.pending.fill(NONE);
    m.issued.clear();
    m.cands.clear();
    bad
}

fn make_files(sc: &Scenario, seed: u64) -> Files {
    let dir = if sc.tmpfs {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let source = dir.path().join("source.img");
    let cache = dir.path().join("cache.img");
    let socket = dir.path().join("vblk.sock");
    let mut initial = vec![0xA5u8; sc.disk];
    for (i, s) in initial.chunks_exact_mut(SECTOR).enumerate() {
        fill_sector(s, 0, i as u64);
    }
    std::fs::write(&source, &initial).unwrap();
    let bs = bs_bytes(sc.block_size) as u64;
    let f = std::fs::File::create(&cache).unwrap();
    f.set_len(sc.cache_blocks as u64 * bs + (16 << 20)).unwrap();
    let _ = seed;
    Files {
        dir,
        source,
        cache,
        socket,
        initial: Vec::new(),
    }
}

/// Compares the source file with the model (after a full writeback).
fn check_source_file(path: &Path, m: &Model, what: &str) -> Vec<String> {
    let data = std::fs::read(path).unwrap();
    let mut bad = Vec::new();
    let mut n = 0;
    for (sec, s) in data.chunks_exact(SECTOR).enumerate() {
        if !m.content_ok(s, m.cur[sec], sec) {
            n += 1;
            if bad.len() < 8 {
                bad.push(format!(
                    "{what}: source file sector {sec} expected op {} got {:?}",
                    m.cur[sec],
                    decode(s, sec)
                ));
            }
        }
    }
    if n > 0 {
        bad.push(format!("{what}: {n} source sectors differ"));
    }
    bad
}

fn run(sc: Scenario) {
    let started = Instant::now();
    let seed = seed();
    let mut files = make_files(&sc, seed);
    // The image file, also when the daemon gets a loop device over it.
    let source_file = files.source.clone();
    let source_len = std::fs::metadata(&source_file).unwrap().len();
    let _loops = match sc.loop_sector {
        None => None,
        Some(sector) => {
            let Some(src) = LoopDevice::attach(&files.source, sector) else {
                return;
            };
            let Some(cache) = LoopDevice::attach(&files.cache, sector) else {
                return;
            };
            files.source = src.0.clone();
            files.cache = cache.0.clone();
            Some((src, cache))
        }
    };
    let ctl = files.dir.path().join("ctl.sock");
    let ctl_s = ctl.display().to_string();
    let sectors = sc.disk / SECTOR;
    let cb = sc.cache_blocks.to_string();
    let assoc = sc.assoc.to_string();
    let queues = sc.queues.to_string();
    let mut model = Model::new(sectors, !sc.crash_state);
    model.overlap = sc.overlap_writes;
    let mut resolved = 0;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xabcdef);
    let mut failures: Vec<String> = Vec::new();
    let mut totals = [0u64; 8];
    let mut after_kill = false;
    let mut ctl_logs = Vec::new();
    let mut checks = 0;
    let mut kills = 0;
    let mut last_log = String::new();
    let mut term_pending = false;
    let mut storm_kills = 0;
    // A storm daemon killed after its recovery (which saved the recovered
    // mapping as the new table and then gave the superblock a new run id)
    // but before it put its own crash-state file in place leaves only the
    // old run's file, which the next start rightly rejects: nothing is lost,
    // the table holds what it recovered.
    let mut crash_state_may_be_stale = false;
    for it in 0..=sc.runs {
        let mode = if sc.vary_mode && it > 0 {
            ["writeback", "writethrough", "writearound", "writeback"][rng.gen_range(0..4)]
        } else {
            "writeback"
        };
        eprintln!("[{}] run {it}: mode {mode}", sc.name);
        let mut args: Vec<&str> = vec![
            "--mode",
            mode,
            "--block-size",
            sc.block_size,
            "--cache-blocks",
            &cb,
            "--assoc",
            &assoc,
            "--queues",
            &queues,
            "--control",
            &ctl_s,
        ];
        if let Some(l) = sc.source_latency {
            args.extend(["--source-latency", l]);
        }
        if !sc.crash_state {
            args.extend(["--crash-state-dir", "off"]);
        }
        args.extend(sc.extra.iter().copied());
        let daemon = Daemon::start(&files, &args);
        let mut client = Client::connect(&files.socket, sc.queues as i32);
        assert_eq!(client.capacity(), (sc.disk / SECTOR * SECTOR) as u64);
        let what = format!("[{}] run {it} start", sc.name);
        let buf0 = client.regions[0].addr as *mut u8;
        let pend = model
            .pending
            .iter()
            .filter(|&&p| p != NONE && p != READING)
            .count();
        let bad = verify_all(
            &mut client.queues[0],
            buf0,
            &mut model,
            &what,
            after_kill,
            !sc.crash_state,
        );
        if after_kill {
            eprintln!("{what}: {pend} sectors had a write in flight at the kill");
        }
        if std::env::var("VBC_INTEGRITY_SELFTEST").is_ok() && it == 1 {
            // The checker must catch a wrong expectation.
            model.cur[sectors / 2] += 1;
        }
        if term_pending {
            let st = status_json(&ctl);
            if st["start"]["clean"] != true {
                failures.push(format!(
                    "{what}: start after SIGTERM not clean: {}",
                    st["start"]
                ));
            }
        } else if after_kill {
            let st = status_json(&ctl);
            eprintln!(
                "{what}: after kill: start {} mode {} dirty {}",
                st["start"], st["mode"], st["dirty_blocks"]
            );
            let clean_ok = sc.term_then_kill && st["start"]["clean"] == true;
            if st["start"]["clean"] != false && !clean_ok {
                failures.push(format!(
                    "{what}: status start not unclean after kill: {}",
                    st["start"]
                ));
            }
            if sc.crash_state
                && !clean_ok
                && st["start"]["crash_state_recovered"].as_u64().is_none()
            {
                // Rejected for its run id after such a storm kill: expected.
                let stale_run = crash_state_may_be_stale
                    && daemon
                        .log_text()
                        .contains("but the cache was last opened by run");
                if stale_run {
                    eprintln!(
                        "{what}: crash state of the run before the storm rejected (expected)"
                    );
                } else {
                    failures.push(format!("{what}: crash state not used: {}", st["start"]));
                }
            }
        }
        if !bad.is_empty() {
            failures.extend(bad);
            failures.push(format!("previous daemon log tail:\n{last_log}"));
            failures.push(format!("daemon log:\n{}", daemon.log_text()));
            drop(client);
            drop(daemon);
            break;
        }
        if it == sc.runs {
            drop(client);
            let log = daemon.log_text();
            assert!(daemon.stop().success(), "{log}");
            let now = std::fs::metadata(&source_file).unwrap().len();
            if now != source_len {
                failures.push(format!(
                    "[{}] source file size changed from {source_len} to {now}",
                    sc.name
                ));
            }
            let data = std::fs::read(&source_file).unwrap();
            let tail = &data[sc.disk / SECTOR * SECTOR..];
            if tail.iter().any(|&b| b != 0xA5) {
                failures.push(format!(
                    "[{}] bytes past the last sector changed: {:02x?}",
                    sc.name,
                    &tail[..tail.len().min(16)]
                ));
            }
            break;
        }
        // I/O phase.
        let sh = Arc::new(Shared {
            m: Mutex::new(std::mem::replace(&mut model, Model::new(0, false))),
            killed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            errors: Mutex::new(Vec::new()),
            nerr: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            bytes_w: AtomicU64::new(0),
            bytes_r: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            zeroes: AtomicU64::new(0),
            discards: AtomicU64::new(0),
            failed_after_kill: AtomicU64::new(0),
        });
        let secs = sc.secs * scale();
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let regions: Vec<*mut u8> = client.regions.iter().map(|r| r.addr as *mut u8).collect();
        let qs: Vec<Blkioq> = client.queues.drain(..).collect();
        let mut handles = Vec::new();
        for (i, q) in qs.into_iter().enumerate() {
            let qw = Qw { q, buf: regions[i] };
            let (sh, sc) = (sh.clone(), sc.clone());
            let s = seed * 1000 + it as u64 * 16 + i as u64;
            handles.push(std::thread::spawn(move || {
                worker(qw, sh, sc, s, deadline);
            }));
        }
        let ctl_thread = sc.control.then(|| {
            let (sh, ctl) = (sh.clone(), ctl.clone());
            let s = seed * 7 + it as u64;
            std::thread::spawn(move || controller(ctl, sh, s, deadline))
        });
        let pid = daemon.pid();
        if sc.kill || sc.term_under_load {
            let at = Duration::from_secs_f64(secs * rng.gen_range(0.3..1.0));
            std::thread::sleep(at);
            let sig = if sc.kill && !sc.term_then_kill {
                libc::SIGKILL
            } else {
                libc::SIGTERM
            };
            // SAFETY: slot/region memory of a live blkio mapping, used by one request at a time; the pid is our unreaped child.
            let mut rc = unsafe { libc::kill(pid, sig) };
            if sc.term_then_kill {
                let d = Duration::from_micros(rng.gen_range(0..800_000));
                std::thread::sleep(d);
                // SAFETY: slot/region memory of a live blkio mapping, used by one request at a time; the pid is our unreaped child.
                rc |= unsafe { libc::kill(pid, libc::SIGKILL) };
                eprintln!(
                    "[{}] run {it}: SIGKILL {} ms after SIGTERM",
                    sc.name,
                    d.as_millis()
                );
            }
            assert_eq!(rc, 0);
            sh.killed.store(true, SeqCst);
        }
        for h in handles {
            h.join().unwrap();
        }
        if let Some(t) = ctl_thread {
            ctl_logs.extend(t.join().unwrap());
        }
        let io_errors = sh.errors.lock().unwrap().clone();
        let m = &sh;
        for (i, c) in [
            &m.writes,
            &m.reads,
            &m.bytes_w,
            &m.bytes_r,
            &m.flushes,
            &m.zeroes,
            &m.discards,
            &m.failed_after_kill,
        ]
        .iter()
        .enumerate()
        {
            totals[i] += c.load(SeqCst);
        }
        let sh = Arc::try_unwrap(sh).ok().expect("threads gone");
        model = sh.m.into_inner().unwrap();
        resolved += std::mem::take(&mut model.ambiguous_resolved);
        last_log = daemon.log_text();
        if !io_errors.is_empty() {
            failures.extend(io_errors);
            failures.push(format!("daemon log:\n{last_log}"));
            break;
        }
        if sc.term_under_load {
            // SIGTERM was sent: the daemon must drain and exit 0.
            let status = daemon.signal_and_wait(libc::SIGTERM);
            drop(client);
            if !status.success() {
                failures.push(format!(
                    "[{}] run {it}: exit after SIGTERM under load: {status}\n{last_log}",
                    sc.name
                ));
                break;
            }
            let (code, check) = check_json(&files.cache);
            checks += 1;
            if code != 0 || check["consistent"] != true || check["superblock"]["clean"] != true {
                failures.push(format!(
                    "[{}] run {it}: check after SIGTERM: code {code} {check:#}",
                    sc.name
                ));
                break;
            }
            // Writes in flight at the signal may or may not have run.
            after_kill = true;
            term_pending = true;
        } else if sc.kill {
            let status = daemon.signal_and_wait(libc::SIGKILL);
            assert!(sc.term_then_kill || !status.success());
            eprintln!("[{}] run {it}: daemon exit {status}", sc.name);
            drop(client);
            kills += 1;
            let (code, check) = check_json(&files.cache);
            checks += 1;
            if code != 0 || check["consistent"] != true {
                failures.push(format!(
                    "[{}] run {it}: check after kill: code {code} {check:#}",
                    sc.name
                ));
                break;
            }
            // Kill daemons during their start-up (recovery) too.
            crash_state_may_be_stale = false;
            for k in 0..sc.kill_storm {
                let _ = std::fs::remove_file(&files.socket);
                let mut child = Command::new(BIN)
                    .args(files.serve_args(&args))
                    .stdout(std::process::Stdio::null())
                    .stderr(
                        std::fs::File::create(files.dir.path().join(format!("storm-{it}-{k}.log")))
                            .unwrap(),
                    )
                    .spawn()
                    .unwrap();
                let us = match rng.gen_range(0..4) {
                    0 => rng.gen_range(0..3_000),
                    1 => rng.gen_range(3_000..15_000),
                    2 => rng.gen_range(15_000..60_000),
                    _ => rng.gen_range(60_000..200_000),
                };
                std::thread::sleep(Duration::from_micros(us));
                let _ = child.kill();
                let st = child.wait().unwrap();
                storm_kills += 1;
                let log =
                    std::fs::read_to_string(files.dir.path().join(format!("storm-{it}-{k}.log")))
                        .unwrap_or_default();
                // Only a daemon that got past its recovery can have written
                // the superblock; the last such one decides.
                if log.contains("not shut down cleanly") {
                    crash_state_may_be_stale = !log.contains("crash state kept in");
                }
                if st.code().is_some() && st.code() != Some(0) {
                    failures.push(format!(
                        "[{}] run {it}: storm daemon {k} exited {st}: {log}",
                        sc.name
                    ));
                }
                let (code, check) = check_json(&files.cache);
                checks += 1;
                if code != 0 || check["consistent"] != true {
                    failures.push(format!("[{}] run {it}: check after storm kill {k} ({us} us): code {code} {check:#}", sc.name));
                    break;
                }
            }
            if !failures.is_empty() {
                break;
            }
            after_kill = true;
        } else {
            // Quiesced: full verify through the live daemon, then writeback
            // and compare the source, then SIGTERM.
            let what = format!("[{}] run {it} end (live)", sc.name);
            drop(client);
            let mut client = Client::connect(&files.socket, 1);
            let buf0 = client.regions[0].addr as *mut u8;
            let bad = verify_all(&mut client.queues[0], buf0, &mut model, &what, false, false);
            if !bad.is_empty() {
                failures.extend(bad);
                failures.push(format!("daemon log:\n{}", daemon.log_text()));
                break;
            }
            if sc.check_source && it % 2 == 1 {
                // Put writeback in charge again, write every dirty block back.
                let (ok, out) = control(&ctl, &["set-mode", "writeback"]);
                assert!(ok, "{out}");
                let (ok, out) = control(&ctl, &["flush"]);
                assert!(ok, "{out}");
                let st = status_json(&ctl);
                let what = format!(
                    "[{}] run {it} after flush (dirty {})",
                    sc.name, st["dirty_blocks"]
                );
                let bad = check_source_file(&source_file, &model, &what);
                if !bad.is_empty() {
                    failures.extend(bad);
                    failures.push(format!("status: {st}"));
                    break;
                }
            }
            drop(client);
            let log = daemon.log_text();
            let st = daemon.stop();
            assert!(st.success(), "{log}");
            after_kill = false;
            term_pending = false;
        }
    }
    eprintln!(
        "[{}] {:.1}s: runs {} kills {} (+{} at start-up) checks {}: writes {} ({} MiB), reads {} ({} MiB), flushes {}, zeroes {}, discards {}, failed-after-kill {}",
        sc.name,
        started.elapsed().as_secs_f64(),
        sc.runs,
        kills,
        storm_kills,
        checks,
        totals[0],
        totals[2] >> 20,
        totals[1],
        totals[3] >> 20,
        totals[4],
        totals[5],
        totals[6],
        totals[7]
    );
    eprintln!(
        "[{}] overlapping-write sectors resolved by reads during I/O: {resolved}",
        sc.name
    );
    let failed_ctl: Vec<&String> = ctl_logs.iter().filter(|l| l.contains("FAILED")).collect();
    eprintln!(
        "[{}] control ops: {} ({} failed) {:?}",
        sc.name,
        ctl_logs.len(),
        failed_ctl.len(),
        failed_ctl.iter().take(5).collect::<Vec<_>>()
    );
    if !failures.is_empty() {
        panic!("{} failures:\n{}", sc.name, failures.join("\n"));
    }
}

// ---------------------------------------------------------------- scenarios

#[test]
fn pressure_4k_assoc8_two_queues_term() {
    run(Scenario::base("p4k-a8-q2"));
}

#[test]
fn pressure_4k_direct_mapped_latency() {
    run(Scenario {
        assoc: 1,
        cache_blocks: 128,
        source_latency: Some("1ms"),
        ..Scenario::base("p4k-a1-lat")
    });
}

#[test]
fn pressure_64k_full_assoc_four_queues() {
    run(Scenario {
        block_size: "64K",
        cache_blocks: 64,
        assoc: 64,
        queues: 4,
        ..Scenario::base("p64k-a64-q4")
    });
}

#[test]
fn pressure_1m_blocks() {
    run(Scenario {
        block_size: "1M",
        cache_blocks: 8,
        assoc: 2,
        disk: 48 << 20,
        ..Scenario::base("p1m-a2")
    });
}

#[test]
fn pressure_odd_size_disk() {
    run(Scenario {
        block_size: "64K",
        cache_blocks: 32,
        assoc: 4,
        disk: (20 << 20) + 12 * 1024 + 1536,
        ..Scenario::base("odd-size")
    });
}

#[test]
fn control_ops_during_io() {
    run(Scenario {
        control: true,
        runs: 3,
        secs: 12.0,
        ..Scenario::base("ctl-4k")
    });
}

#[test]
fn control_ops_during_io_64k_latency() {
    run(Scenario {
        control: true,
        block_size: "64K",
        cache_blocks: 48,
        assoc: 16,
        source_latency: Some("500us"),
        runs: 3,
        secs: 12.0,
        ..Scenario::base("ctl-64k-lat")
    });
}

#[test]
fn kill9_pressure_multi_queue() {
    run(Scenario {
        kill: true,
        runs: 8,
        secs: 4.0,
        ..Scenario::base("kill-4k-q2")
    });
}

#[test]
fn kill9_pressure_control_ops() {
    run(Scenario {
        kill: true,
        control: true,
        runs: 8,
        secs: 4.0,
        block_size: "64K",
        cache_blocks: 48,
        assoc: 16,
        queues: 3,
        ..Scenario::base("kill-ctl-64k-q3")
    });
}

#[test]
fn kill9_odd_size_1m_blocks() {
    run(Scenario {
        kill: true,
        runs: 8,
        secs: 3.0,
        block_size: "1M",
        cache_blocks: 8,
        assoc: 8,
        disk: (24 << 20) + 3 * 4096 + 512,
        ..Scenario::base("kill-1m-odd")
    });
}

#[test]
fn kill9_no_crash_state_flush_contract() {
    run(Scenario {
        kill: true,
        crash_state: false,
        runs: 8,
        secs: 3.0,
        mix: [50, 25, 4, 4],
        ..Scenario::base("kill-nocs-4k")
    });
}

#[test]
fn tmpfs_pressure_control() {
    run(Scenario {
        tmpfs: true,
        control: true,
        queues: 2,
        ..Scenario::base("tmpfs-ctl")
    });
}

#[test]
fn tmpfs_kill9() {
    run(Scenario {
        tmpfs: true,
        kill: true,
        runs: 8,
        secs: 3.0,
        block_size: "16K",
        cache_blocks: 128,
        assoc: 4,
        ..Scenario::base("tmpfs-kill")
    });
}

/// Source and cache on 4Kn block devices (loop devices with 4 KiB logical
/// sectors): the test's 512-byte sectors are read-modify-writes on both, and
/// the journal's 512-byte commits share 4 KiB device sectors.
#[test]
fn loop_devices_4k_sectors_kill9() {
    run(Scenario {
        loop_sector: Some(4096),
        kill: true,
        runs: 6,
        secs: 3.0,
        ..Scenario::base("loop-4k-kill")
    });
}

#[test]
fn loop_devices_pressure_control() {
    run(Scenario {
        loop_sector: Some(512),
        control: true,
        ..Scenario::base("loop-ctl")
    });
}

#[test]
fn sigterm_under_load() {
    run(Scenario {
        term_under_load: true,
        control: true,
        runs: 6,
        secs: 4.0,
        ..Scenario::base("term-load")
    });
}

#[test]
fn kill9_storm_during_recovery() {
    run(Scenario {
        kill: true,
        kill_storm: 6,
        runs: 5,
        secs: 3.0,
        cache_blocks: 4096,
        assoc: 64,
        disk: 64 << 20,
        ..Scenario::base("kill-storm")
    });
}

#[test]
fn kill9_slow_source_direct_mapped() {
    run(Scenario {
        kill: true,
        runs: 8,
        secs: 3.0,
        assoc: 1,
        cache_blocks: 128,
        source_latency: Some("2ms"),
        ..Scenario::base("kill-slow-a1")
    });
}

#[test]
fn variants_uring_off_poll_unordered() {
    for (name, extra) in [
        ("var-uring-off", &["--io-uring", "off"][..]),
        ("var-poll", &["--poll", "50us", "--queue-threads", "2"][..]),
        (
            "var-unordered-qt1",
            &["--unordered-completion", "--queue-threads", "1"][..],
        ),
        ("var-pin", &["--pin-guest-memory"][..]),
    ] {
        run(Scenario {
            extra: Box::leak(extra.to_vec().into_boxed_slice()),
            control: true,
            runs: 2,
            secs: 5.0,
            ..Scenario::base(name)
        });
    }
}

#[test]
fn racy_reads_with_mode_switches() {
    run(Scenario {
        racy_reads: true,
        control: true,
        queues: 3,
        runs: 3,
        secs: 10.0,
        ..Scenario::base("racy-ctl-4k")
    });
}

#[test]
fn racy_reads_64k_slow_source_mode_switches() {
    run(Scenario {
        racy_reads: true,
        control: true,
        block_size: "64K",
        cache_blocks: 32,
        assoc: 4,
        source_latency: Some("1ms"),
        runs: 3,
        secs: 10.0,
        ..Scenario::base("racy-ctl-64k-lat")
    });
}

#[test]
fn racy_reads_kill9() {
    run(Scenario {
        racy_reads: true,
        kill: true,
        control: true,
        runs: 8,
        secs: 3.0,
        ..Scenario::base("racy-kill")
    });
}

#[test]
fn overlapping_writes_pressure() {
    run(Scenario {
        overlap_writes: true,
        queues: 3,
        runs: 3,
        secs: 8.0,
        ..Scenario::base("overlap-4k")
    });
}

#[test]
fn overlapping_writes_64k_mode_switches() {
    run(Scenario {
        overlap_writes: true,
        control: true,
        block_size: "64K",
        cache_blocks: 32,
        assoc: 8,
        queues: 2,
        runs: 3,
        secs: 8.0,
        ..Scenario::base("overlap-64k-ctl")
    });
}

#[test]
fn kill9_during_sigterm_shutdown() {
    run(Scenario {
        kill: true,
        term_then_kill: true,
        runs: 8,
        secs: 3.0,
        cache_blocks: 1024,
        assoc: 16,
        source_latency: Some("1ms"),
        extra: &["--writeback-on-exit"],
        ..Scenario::base("term-kill-wboe")
    });
}

#[test]
fn kill9_during_sigterm_shutdown_no_writeback() {
    run(Scenario {
        kill: true,
        term_then_kill: true,
        runs: 8,
        secs: 3.0,
        cache_blocks: 4096,
        assoc: 64,
        disk: 64 << 20,
        ..Scenario::base("term-kill")
    });
}

#[test]
fn source_not_sector_multiple() {
    run(Scenario {
        block_size: "64K",
        cache_blocks: 32,
        assoc: 4,
        disk: (20 << 20) + 12 * 1024 + 1536 + 100,
        control: true,
        runs: 3,
        secs: 6.0,
        ..Scenario::base("odd-bytes-64k")
    });
}

#[test]
fn source_not_sector_multiple_kill9() {
    run(Scenario {
        block_size: "4K",
        cache_blocks: 64,
        assoc: 4,
        disk: (8 << 20) + 1536 + 100,
        kill: true,
        runs: 6,
        secs: 3.0,
        ..Scenario::base("odd-bytes-kill")
    });
}

#[test]
fn kill9_restart_in_other_modes() {
    run(Scenario {
        kill: true,
        vary_mode: true,
        racy_reads: true,
        control: true,
        runs: 10,
        secs: 3.0,
        block_size: "8K",
        cache_blocks: 192,
        assoc: 2,
        queues: 3,
        ..Scenario::base("kill-vary-mode")
    });
}
