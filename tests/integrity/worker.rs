//! The I/O side of a daemon run: the state the queue workers, the
//! controller and the driver share (`Shared`), a queue with its memory
//! region (`Qw`), the requests in flight, range picking, and the per-queue
//! worker that issues writes, reads, zeroes, discards and flushes and
//! checks every read against the model.

use crate::common::fill_sector;
use crate::model::{decode, Kind, Model, NONE, READING, SECTOR, SLOTS, SLOT_BYTES};
use crate::scenario::{bs_bytes, Scenario};
use blkio::{Blkioq, Completion, ReqFlags};
use rand::{Rng, SeedableRng};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(crate) struct Shared {
    pub(crate) m: Mutex<Model>,
    pub(crate) killed: AtomicBool,
    pub(crate) stop: AtomicBool,
    pub(crate) errors: Mutex<Vec<String>>,
    pub(crate) nerr: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) reads: AtomicU64,
    pub(crate) bytes_w: AtomicU64,
    pub(crate) bytes_r: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) zeroes: AtomicU64,
    pub(crate) discards: AtomicU64,
    pub(crate) failed_after_kill: AtomicU64,
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

pub(crate) struct Qw {
    pub(crate) q: Blkioq,
    pub(crate) buf: *mut u8,
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
pub(crate) fn worker(mut qw: Qw, sh: Arc<Shared>, sc: Scenario, seed: u64, deadline: Instant) {
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
