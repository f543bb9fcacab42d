//! One queue's load loop: keep `iodepth` requests in flight on one blkio
//! queue until the run ends, measuring each request from submission to
//! completion.
//!
//! Invariants: a slot's buffer is only touched by this thread while the slot
//! has no request in flight (the device owns it otherwise); a completion is
//! counted when it arrives inside the measured window `[ramp_end, end]`, so
//! IOPS over the window is `count / (end - ramp_end)`; after `end` nothing new
//! is submitted and the loop drains what is in flight before returning, so
//! the device never sees the connection close under live requests.

use crate::gen::{Offsets, Rng};
use crate::hist::Hist;
use crate::verify;
use blkio::{Blkioq, Completion, Errno, ReqFlags};
use std::collections::HashSet;
use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

/// What the queue does, fixed for the run.
pub struct WorkerCfg {
    pub bs: usize,
    pub iodepth: usize,
    /// Percentage of data requests that are reads (100 = read only).
    pub read_pct: u64,
    /// Reads draw from the first this many blocks only (0 = the region).
    pub read_blocks: u64,
    /// Issue a FLUSH after this many writes (0 = never).
    pub flush_every: u64,
    pub verify: bool,
    /// Stop after one sequential pass over the queue's stripe.
    pub once: bool,
    pub seed: u64,
    pub ramp_end: Instant,
    pub end: Instant,
    /// Give up when no completion arrives for this long.
    pub stall: Duration,
    /// Split each data buffer into segments of at most this many bytes
    /// (0 = one segment).
    pub max_seg: usize,
}

/// This queue's slice of the blkio memory region: `iodepth * bs` bytes.
pub struct QueueMem {
    base: *mut u8,
    len: usize,
}

// SAFETY: the pointer designates memory owned by the blkio memory region,
// which outlives the worker threads (main joins them before freeing it), and
// each QueueMem covers a range no other QueueMem overlaps, so moving it to
// the worker thread gives that thread exclusive use of the range.
unsafe impl Send for QueueMem {}

impl QueueMem {
    /// # Safety
    /// `base..base+len` must be valid, writable memory that nothing else
    /// accesses while the returned value is alive, except the device during
    /// requests this queue submits.
    pub unsafe fn new(base: *mut u8, len: usize) -> QueueMem {
        QueueMem { base, len }
    }
}

/// Per-queue results.
#[derive(Default)]
pub struct QueueStats {
    pub read: Hist,
    pub write: Hist,
    pub flush: Hist,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Data requests completed successfully over the whole run (ramp and
    /// drain included): the divisor for a server's CPU time per I/O, which
    /// is sampled around the whole run.
    pub total_ios: u64,
    pub verify_failures: u64,
    pub first_verify_failure: Option<String>,
    /// When the last request completed (set in `--once` mode).
    pub finished_at: Option<Instant>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Read,
    Write,
    Flush,
}

struct Slot {
    buf: *mut u8,
    /// Segments of `buf`; allocated once so pointers handed to blkio stay
    /// valid while the request is queued.
    iov: Vec<blkio::iovec>,
    op: Op,
    offset: u64,
    t0: Instant,
}

struct Gen {
    offsets: Offsets,
    rng: Rng,
    writes_since_flush: u64,
    in_flight_blocks: HashSet<u64>,
}

fn error_text(c: &Completion) -> String {
    let errno = Errno::from_raw_os_error(-c.ret);
    if c.error_msg.is_null() {
        return format!("{errno}");
    }
    // SAFETY: libblkio sets error_msg to null or to a static NUL-terminated
    // string (Completion::for_failed_req takes &'static CStr).
    let msg = unsafe { CStr::from_ptr(c.error_msg) };
    format!("{errno}: {}", msg.to_string_lossy())
}

impl Gen {
    /// The next request for a slot, or None when a `--once` pass is done.
    fn next(&mut self, cfg: &WorkerCfg) -> Option<(Op, u64)> {
        if cfg.flush_every > 0 && self.writes_since_flush >= cfg.flush_every {
            self.writes_since_flush = 0;
            return Some((Op::Flush, 0));
        }
        if cfg.once && self.offsets.issued() >= self.offsets.stripe_blocks() {
            return None;
        }
        let op = if cfg.read_pct >= 100 {
            Op::Read
        } else if cfg.read_pct == 0 || self.rng.below(100) >= cfg.read_pct {
            Op::Write
        } else {
            Op::Read
        };
        let mut offset = if op == Op::Read && cfg.read_blocks > 0 {
            self.rng.below(cfg.read_blocks) * cfg.bs as u64
        } else {
            self.offsets.next(&mut self.rng)
        };
        if cfg.verify {
            // Two requests on one block at once have no defined result;
            // redraw (a bounded number of times) to avoid false alarms.
            let mut tries = 0;
            while self.in_flight_blocks.contains(&offset) && tries < 64 {
                offset = self.offsets.next(&mut self.rng);
                tries += 1;
            }
            self.in_flight_blocks.insert(offset);
        }
        if op == Op::Write {
            self.writes_since_flush += 1;
        }
        Some((op, offset))
    }
}

fn submit(q: &mut Blkioq, slots: &mut [Slot], idx: usize, cfg: &WorkerCfg, seed: u64) {
    let s = &mut slots[idx];
    s.t0 = Instant::now();
    let flags = ReqFlags::empty();
    match s.op {
        Op::Flush => q.flush(idx, flags),
        Op::Read if s.iov.len() == 1 => q.read(s.offset, s.buf, cfg.bs, idx, flags),
        Op::Read => q.readv(s.offset, s.iov.as_ptr(), s.iov.len() as u32, idx, flags),
        Op::Write => {
            if cfg.verify {
                // SAFETY: the slot is idle (we are about to submit it), so
                // nothing else uses its bs-byte buffer inside QueueMem.
                let buf = unsafe { std::slice::from_raw_parts_mut(s.buf, cfg.bs) };
                verify::fill(buf, s.offset, seed);
            }
            if s.iov.len() == 1 {
                q.write(s.offset, s.buf, cfg.bs, idx, flags)
            } else {
                q.writev(s.offset, s.iov.as_ptr(), s.iov.len() as u32, idx, flags)
            }
        }
    }
}

/// Runs the queue until `cfg.end` (or the end of a `--once` pass), then
/// drains. Errors only on a stalled queue or a failing `do_io`; failed
/// requests are counted in the stats instead.
pub fn run(
    q: &mut Blkioq,
    mem: QueueMem,
    offsets: Offsets,
    cfg: &WorkerCfg,
) -> Result<QueueStats, String> {
    let mut stats = QueueStats::default();
    let mut gen = Gen {
        offsets,
        rng: Rng::new(cfg.seed),
        writes_since_flush: 0,
        in_flight_blocks: HashSet::new(),
    };
    let need = cfg
        .iodepth
        .checked_mul(cfg.bs)
        .ok_or("iodepth * bs overflows")?;
    if mem.len < need {
        return Err(format!("queue memory {} < iodepth * bs = {need}", mem.len));
    }
    // Non-verify writes carry pseudo-random bytes rather than zeroes.
    {
        // SAFETY: no request is in flight yet; QueueMem grants this thread
        // exclusive use of `len` bytes at `base`.
        let all = unsafe { std::slice::from_raw_parts_mut(mem.base, mem.len) };
        let mut r = Rng::new(cfg.seed ^ 0x5555);
        for w in all.chunks_exact_mut(8) {
            w.copy_from_slice(&r.next_u64().to_le_bytes());
        }
    }
    let seg = if cfg.max_seg == 0 {
        cfg.bs
    } else {
        cfg.max_seg
    };
    let now = Instant::now();
    let mut slots: Vec<Slot> = (0..cfg.iodepth)
        .map(|i| {
            // SAFETY: i * bs + bs <= need <= mem.len, so the pointer stays
            // inside this queue's memory.
            let buf = unsafe { mem.base.add(i * cfg.bs) };
            let iov = (0..cfg.bs)
                .step_by(seg)
                .map(|o| blkio::iovec {
                    // SAFETY: o < bs, inside this slot's buffer.
                    iov_base: unsafe { buf.add(o) }.cast(),
                    iov_len: seg.min(cfg.bs - o),
                })
                .collect();
            Slot {
                buf,
                iov,
                op: Op::Read,
                offset: 0,
                t0: now,
            }
        })
        .collect();
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..cfg.iodepth).map(|_| MaybeUninit::uninit()).collect();

    let mut in_flight = 0usize;
    for idx in 0..cfg.iodepth {
        if let Some((op, off)) = gen.next(cfg) {
            slots[idx].op = op;
            slots[idx].offset = off;
            let seed = gen.rng.next_u64();
            submit(q, &mut slots, idx, cfg, seed);
            in_flight += 1;
        }
    }
    let mut last_progress = Instant::now();
    while in_flight > 0 {
        let mut timeout = Duration::from_millis(500);
        let n = match q.do_io(&mut completions, 1, Some(&mut timeout), None) {
            Ok(n) => n,
            Err(e) if e.errno() == Errno::TIME => {
                if last_progress.elapsed() > cfg.stall {
                    return Err(format!(
                        "{in_flight} requests outstanding and no completion for {:?}",
                        cfg.stall
                    ));
                }
                continue;
            }
            Err(e) => return Err(format!("do_io failed: {e} ({})", e.errno())),
        };
        let now = Instant::now();
        last_progress = now;
        let in_window = now >= cfg.ramp_end && now <= cfg.end;
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first n entries it returned.
            let c = unsafe { c.assume_init_ref() };
            let idx = c.user_data;
            if idx >= slots.len() {
                return Err(format!("completion for unknown request {idx}"));
            }
            in_flight -= 1;
            let (op, offset, t0) = (slots[idx].op, slots[idx].offset, slots[idx].t0);
            if cfg.verify && op != Op::Flush {
                gen.in_flight_blocks.remove(&offset);
            }
            if c.ret < 0 {
                stats.errors += 1;
                if stats.first_error.is_none() {
                    stats.first_error = Some(format!(
                        "{op:?} at byte {offset} (len {}): {}",
                        cfg.bs,
                        error_text(c)
                    ));
                }
            } else {
                if cfg.verify && op == Op::Read {
                    // SAFETY: the read completed, so the device is done with
                    // this slot's buffer and the slot is idle.
                    let buf = unsafe { std::slice::from_raw_parts(slots[idx].buf, cfg.bs) };
                    if let Err(msg) = verify::check(buf, offset) {
                        stats.verify_failures += 1;
                        stats.first_verify_failure.get_or_insert(msg);
                    }
                }
                if op != Op::Flush {
                    stats.total_ios += 1;
                }
                if in_window {
                    let ns = u64::try_from(now.duration_since(t0).as_nanos()).unwrap_or(u64::MAX);
                    match op {
                        Op::Read => {
                            stats.read.record(ns);
                            stats.read_bytes += cfg.bs as u64;
                        }
                        Op::Write => {
                            stats.write.record(ns);
                            stats.write_bytes += cfg.bs as u64;
                        }
                        Op::Flush => stats.flush.record(ns),
                    }
                }
            }
            if now < cfg.end {
                if let Some((op, off)) = gen.next(cfg) {
                    slots[idx].op = op;
                    slots[idx].offset = off;
                    let seed = gen.rng.next_u64();
                    submit(q, &mut slots, idx, cfg, seed);
                    in_flight += 1;
                }
            }
        }
        if in_flight == 0 {
            stats.finished_at = Some(now);
        }
    }
    Ok(stats)
}
