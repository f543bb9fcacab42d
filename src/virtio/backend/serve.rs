//! The data path of a queue worker: serving a queue after a kick or a
//! completion, busy polling, posting io_uring completions, and handing
//! everything the ring declines (and every FLUSH) to the I/O pool.

use super::vring::{avail_pending, is_live, live, pop, self_kick, Popped};
use super::{BlkBackend, GuestMem, Inner, Vring};
use crate::virtio::execute::{execute, status_of, write_status};
use crate::virtio::flushq::Waiting;
use crate::virtio::order::Token;
use crate::virtio::pool::Job;
use crate::virtio::request::{BlkError, Request, RequestKind};
use crate::virtio::uring::{Done, QueueRing};
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};
use vhost_user_backend::VringT;
use virtio_queue::QueueT;

/// How often a queue worker held back by the in-flight bound checks whether
/// the connection is closing.
const INFLIGHT_POLL: Duration = Duration::from_secs(1);
/// Longest busy-polling session before the worker returns once to its
/// epoll loop (which then finds any kick or completion at once). Not needed
/// for shutdown (`close` stops the poll at once); a safety valve only.
const POLL_SLICE: Duration = Duration::from_secs(1);
/// The same, when the worker serves other queues too: their completions are
/// reaped between waits (see [`BlkBackend::reap_siblings`]).
const SHARED_INFLIGHT_POLL: Duration = Duration::from_millis(1);
/// How often (seconds) it logs that it is still waiting.
const INFLIGHT_WARN_SECS: u64 = 30;

impl BlkBackend {
    /// Serves queue `q` after a kick (see [`BlkBackend::process`]).
    pub(super) fn process_queue(&self, q: usize, vring: &Vring) -> io::Result<()> {
        self.process(q, vring, false)
    }

    /// Serves queue `q` if it is live (see [`is_live`]), then polls it for
    /// the configured interval, if any, when more is to be expected: chains
    /// were popped, or `posted` completions the driver may answer. (With
    /// EVENT_IDX the driver kicks once during a poll session; that kick finds
    /// nothing new and starts no idle session.)
    ///
    /// The worker is inside the queue ([`InFlight::enter`](crate::virtio::inflight::InFlight::enter)) throughout, so
    /// `stop_vring` returns only once it has left and wrote its last.
    fn process(&self, q: usize, vring: &Vring, posted: bool) -> io::Result<()> {
        let Some(inflight) = self.inner.inflight.get(q) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "queue index out of range",
            ));
        };
        let _inside = inflight.enter();
        if !live(vring) {
            return Ok(());
        }
        let popped = self.serve(q, vring, false)?;
        if self
            .inner
            .restarted
            .get(q)
            .is_some_and(|r| r.swap(false, Ordering::AcqRel))
        {
            // The first pass after a stop and restart (a VM pause and
            // resume, a snapshot): signal the driver once, whatever the
            // event index says. In one CI run a guest stayed waiting after
            // a resume while this daemon had nothing in flight and nothing
            // unpopped, which leaves a completion it was never told of; a
            // spurious notification costs the driver one look at its used
            // ring (virtio allows it), a lost one hangs it.
            if let Err(e) = vring.get_ref().signal_used_queue() {
                log::warn!("queue {q}: cannot signal the used ring after a restart: {e}");
            }
        }
        let interval = self.inner.cfg.poll;
        // Not on I/O in flight alone: its completions wake the worker, and a
        // slow (or hung) cache operation must not keep a core spinning.
        if interval.is_zero() || (popped == 0 && !posted) {
            return Ok(());
        }
        self.poll(q, vring, interval)
    }

    /// Busy-polls queue `q` until nothing has happened for `interval`:
    /// serves new chains as the driver publishes them and posts io_uring
    /// completions as they land, without kicks, eventfd wake-ups or epoll.
    ///
    /// While polling, driver notifications stay disabled (VRING_USED_F_NO_NOTIFY;
    /// with EVENT_IDX, `avail_event` is left behind, so the driver kicks at
    /// most once) and the ring's completion eventfd is muted. Both are
    /// re-armed before returning, followed by a last pass that serves
    /// whatever arrived meanwhile, so no request or completion is left
    /// without a wake-up. A poll session ends after [`POLL_SLICE`] at the
    /// latest, so the worker's epoll loop (exit events) gets its turn, and
    /// at once when the queue stops being live: then it writes nothing more
    /// into the ring (in-flight completions are posted from the eventfd).
    fn poll(&self, q: usize, vring: &Vring, interval: Duration) -> io::Result<()> {
        {
            let mut state = vring.get_mut();
            if !is_live(&state) {
                return Ok(());
            }
            state.disable_notification().map_err(io::Error::other)?;
        }
        if let Some(mut r) = self.lock_ring(q) {
            r.set_eventfd(false);
        }
        let atomic = self.memory();
        let start = Instant::now();
        let mut idle_since = start;
        let mut result = Ok(());
        let mut stopped = false;
        while !self.inner.closing.load(Ordering::Acquire) {
            if !live(vring) {
                stopped = true;
                break;
            }
            let mut progressed = false;
            if let Some(mut r) = self.lock_ring(q) {
                if r.busy() {
                    let done = r.reap();
                    drop(r);
                    progressed = !done.is_empty();
                    self.finish_ring(q, vring, done);
                }
            }
            if avail_pending(vring, &atomic) {
                match self.serve(q, vring, true) {
                    // Chains the driver published but `pop` refuses are no
                    // progress: the session idles out.
                    Ok(n) => progressed |= n > 0,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            let now = Instant::now();
            if progressed {
                idle_since = now;
            } else if now.duration_since(idle_since) >= interval {
                break;
            }
            if now.duration_since(start) >= POLL_SLICE {
                break;
            }
            std::hint::spin_loop();
        }
        if let Some(mut r) = self.lock_ring(q) {
            r.set_eventfd(true);
        }
        if !stopped {
            // `serve` re-arms kicks (clears NO_NOTIFY or moves `avail_event`).
            result = result.and(self.serve(q, vring, false).map(|_| ()));
        }
        // A completion that landed while the eventfd was being restored may
        // have signalled nothing (no full barrier orders the restore against
        // the kernel's check): while I/O is in flight, wake the worker once
        // so that it reaps.
        if let Some(r) = self.lock_ring(q) {
            if r.busy() {
                r.wake();
            }
        }
        result
    }

    /// Pops and dispatches every available chain of queue `q`. Unless
    /// `polling`, then re-enables notifications (either mode) on a live
    /// queue and re-checks so that no kick is lost, and posts the hits that
    /// are already done.
    /// Returns how many chains it popped.
    fn serve(&self, q: usize, vring: &Vring, polling: bool) -> io::Result<usize> {
        let Some(inflight) = self.inner.inflight.get(q) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "queue index out of range",
            ));
        };
        if self.inner.closing.load(Ordering::Acquire) {
            return Ok(0);
        }
        let event_idx = self.inner.event_idx.load(Ordering::Acquire);
        let shared = self.inner.cfg.threads() < self.inner.cfg.num_queues;
        let mut popped = 0usize;
        // On a worker shared with other queues, one pass pops at most a
        // ring's worth, then yields (see below), so that a queue the driver
        // keeps full does not starve the others.
        let mut yielded = false;
        // Set when the driver's available index is further ahead than the
        // ring holds: nothing can be popped until it mends it, and the
        // re-arm would keep saying "more" (see `Popped::Refused`).
        let mut refused = false;
        // Set when a ring's worth is in flight and nothing more is published.
        let mut full = false;
        // Set when the pass ends with kicks off on a deep ring.
        let mut kickless = false;
        // The handle, not a snapshot: `pop` loads the current memory map.
        let atomic = self.memory();
        let mut ring_guard = self.lock_ring(q);
        if let Some(r) = ring_guard.as_deref_mut() {
            if r.vring.is_none() {
                r.vring = Some(vring.clone());
            }
        }
        // Completions already there are posted every `post_batch` popped
        // requests, so that the driver can answer while the pass goes on
        // (see `uring::POST_BATCH`). Requests that went to the pool post
        // their own.
        let post_batch = ring_guard.as_deref().map_or(usize::MAX, |r| r.post_batch());
        // A ring whose notification fields cannot be written (a used ring
        // the driver placed at the very end of guest memory) ends the pass
        // with this error, but only after what is done has been posted.
        let mut notify_failed = None;
        loop {
            if event_idx && !polling {
                if let Err(e) = vring.disable_notification() {
                    notify_failed = Some(io::Error::other(e));
                    break;
                }
            }
            loop {
                // Back-pressure per queue: at most one ring's worth of
                // requests in flight, whatever the driver publishes.
                let limit = usize::from(vring.get_ref().get_queue().size()).max(1);
                if shared && popped >= limit && avail_pending(vring, &atomic) {
                    yielded = true;
                    break;
                }
                let mut since = None;
                let mut warned = 0u64;
                while inflight.count() >= limit {
                    if self.inner.closing.load(Ordering::Acquire) {
                        return Ok(popped);
                    }
                    // A driver that keeps to the ring's size has nothing more
                    // to pop: no reason to wait. End the pass (the re-arm
                    // below re-checks) rather than pop past the limit.
                    if !avail_pending(vring, &atomic) {
                        full = true;
                        break;
                    }
                    let since = *since.get_or_insert_with(Instant::now);
                    // The other queues of this worker are not served while
                    // it waits, but their completions must be posted: their
                    // pins may be what our pool requests wait for.
                    if shared {
                        self.reap_siblings(q);
                    }
                    match ring_guard.as_deref_mut().filter(|r| r.busy()) {
                        // Our own completions can only be reaped here.
                        Some(r) => {
                            let done = r.wait();
                            self.finish_ring(q, vring, done);
                        }
                        None => {
                            // The pool completes these; do not hold the ring
                            // (the drain takes it) while waiting for them.
                            drop(ring_guard);
                            let slice = if shared {
                                SHARED_INFLIGHT_POLL
                            } else {
                                INFLIGHT_POLL
                            };
                            if !inflight.wait_below(limit, slice) {
                                let secs = since.elapsed().as_secs();
                                if secs >= (warned + 1) * INFLIGHT_WARN_SECS {
                                    warned += 1;
                                    log::warn!(
                                        "queue {q}: {limit} requests in flight for {secs} s"
                                    );
                                }
                            }
                            ring_guard = self.lock_ring(q);
                        }
                    }
                }
                if full {
                    break;
                }
                let order = &self.inner.order[q];
                // From here on a request is known by its token, which its
                // completion hands back (see `order`).
                let (chain, mem, token) = match pop(vring, inflight, order, &atomic) {
                    Popped::Chain(chain, mem, token) => (chain, mem, token),
                    Popped::Empty => break,
                    Popped::Refused => {
                        refused = true;
                        break;
                    }
                };
                popped += 1;
                match Request::parse(chain, &self.inner.cfg.limits) {
                    Ok(req) => {
                        let declined = match ring_guard.as_deref_mut() {
                            Some(r) => r.try_start(&self.inner.engine, token, req, mem),
                            None => Err((req, mem)),
                        };
                        if let Err((req, mem)) = declined {
                            self.submit(q, vring, mem, token, req);
                        }
                    }
                    Err(e) => {
                        log::debug!("queue {q}: rejected request {token}: {e}");
                        let used = match e.status_addr {
                            Some(a) if write_status(&*mem, a, e.status()).is_ok() => 1,
                            _ => 0,
                        };
                        self.inner.complete(q, vring, &[(token, used)]);
                    }
                }
                if popped % post_batch == 0 {
                    if let Some(r) = ring_guard.as_deref_mut() {
                        let done = r.reap();
                        self.finish_ring(q, vring, done);
                    }
                }
            }
            if let Some(r) = ring_guard.as_deref_mut() {
                r.submit();
            }
            if yielded {
                // Kicks stay off: the worker comes back through its own kick
                // (or its ring's eventfd) once the other queues' ready events
                // have been handled.
                if !self_kick(vring) {
                    if let Some(r) = ring_guard.as_deref() {
                        r.wake();
                    }
                }
                break;
            }
            if refused {
                // No re-arm: it would report the same chains forever. The
                // driver's next kick tries again.
                self.inner.queue_error(
                    q,
                    "the driver's available index is more than a ring ahead; not serving it",
                );
                break;
            }
            if polling {
                break;
            }
            // A deep queue on the ring: post what is done, and if it is still
            // deep, end the pass with kicks off; the next completion runs the
            // next pass (see `uring::KICKLESS_DEPTH`). Checked after the
            // reap, and nothing is reaped after it, so that kicks stay off
            // only on operations still to come. Not on a shared worker: its
            // waits reap the other queues' rings (`reap_siblings`).
            if let Some(r) = ring_guard.as_deref_mut().filter(|r| !shared && r.deep()) {
                let done = r.reap();
                self.finish_ring(q, vring, done);
                if r.deep() {
                    kickless = true;
                    break;
                }
            }
            // Re-arm kicks (EVENT_IDX: `avail_event`; otherwise clear
            // NO_NOTIFY, which a poll cut short by a stop may have left set)
            // and re-check, on a live queue only: a stopped or disabled ring
            // is not written, and chains `pop` refuses must not keep this
            // loop going.
            let again = {
                let mut state = vring.get_mut();
                is_live(&state)
                    && state.enable_notification().unwrap_or_else(|e| {
                        notify_failed = Some(io::Error::other(e));
                        false
                    })
            };
            if !again {
                break;
            }
        }
        if polling || kickless {
            // The poll loop reaps; after a kickless end, the completions do.
            // (Neither sets `notify_failed`: a poll never touches the
            // notification fields, and a failed disable ends the loop
            // before a kickless end can be chosen.)
            return Ok(popped);
        }
        // Hits on a fast device may already be done: post them now, also
        // after a failed re-arm (nothing else would post them).
        if let Some(r) = ring_guard.as_deref_mut() {
            let done = r.reap();
            drop(ring_guard);
            self.finish_ring(q, vring, done);
        }
        notify_failed.map_or(Ok(popped), Err)
    }

    /// Posts the io_uring completions of the other queues served by the
    /// worker of queue `q` (called while that worker waits on `q`).
    /// Takes their ring locks while `q`'s may be held: only this worker
    /// takes two, always `q`'s first, and the drain runs after it stopped.
    fn reap_siblings(&self, q: usize) {
        let threads = usize::from(self.inner.cfg.threads());
        let queues = usize::from(self.inner.cfg.num_queues);
        for s in (q % threads..queues).step_by(threads).filter(|&s| s != q) {
            let Some(mut r) = self.lock_ring(s) else {
                continue;
            };
            // A ring gets its vring when first served, before any I/O.
            let Some(vring) = r.vring.clone().filter(|_| r.busy()) else {
                continue;
            };
            let done = r.reap();
            drop(r);
            self.finish_ring(s, &vring, done);
        }
    }

    /// Queue `q`'s io_uring, locked; `None` where its hits go to the pool.
    pub(super) fn lock_ring(&self, q: usize) -> Option<MutexGuard<'_, QueueRing>> {
        self.inner
            .rings
            .get(q)?
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Posts the served requests of one reap in one batch and sends the
    /// failed ones to the pool.
    pub(super) fn finish_ring(&self, q: usize, vring: &Vring, done: Vec<Done>) {
        if done.is_empty() {
            return;
        }
        let mut served = Vec::with_capacity(done.len());
        for d in done {
            match d {
                Done::Served { token, used_len } => served.push((token, used_len)),
                Done::Retry { token, req, mem } => self.submit(q, vring, mem, token, req),
            }
        }
        self.inner.complete(q, vring, &served);
    }

    /// Reaps the io_uring of the queue served by this worker, then looks
    /// at the available ring: a driver usually answers completions with new
    /// requests, and taking them on this wake-up saves it a kick and the
    /// worker a wake-up.
    pub(super) fn process_ring(&self, q: usize, vring: &Vring) -> io::Result<()> {
        let Some(mut r) = self.lock_ring(q) else {
            return Ok(());
        };
        let done = r.on_event();
        drop(r);
        let posted = !done.is_empty();
        self.finish_ring(q, vring, done);
        self.process(q, vring, posted)
    }

    fn submit(&self, q: usize, vring: &Vring, mem: Arc<GuestMem>, token: Token, req: Request) {
        if matches!(req.kind, RequestKind::Flush) {
            if let Some(fq) = self.inner.flushes.get(q) {
                let w = Waiting {
                    token,
                    status_addr: req.status_addr,
                    mem,
                    vring: vring.clone(),
                };
                if fq.push(w) {
                    self.run_job(Box::new(flush_runner(Arc::clone(&self.inner), q)));
                }
                return;
            }
        }
        let inner = Arc::clone(&self.inner);
        let vring = vring.clone();
        let job: Job = Box::new(move |buf| {
            let result = execute(&req, &*mem, &inner.engine, &inner.serial, buf);
            if let Err(e) = &result {
                log::warn!("queue {q}: request {token} failed: {e}");
            }
            let status = status_of(&result);
            let written = result.unwrap_or(0);
            let used = match write_status(&*mem, req.status_addr, status) {
                Ok(()) => written.saturating_add(1),
                Err(_) => written,
            };
            inner.complete(q, &vring, &[(token, used)]);
        });
        self.run_job(job);
    }

    /// Hands `job` to the I/O pool.
    fn run_job(&self, job: Job) {
        if let Err(job) = self.inner.pool.submit(job) {
            // The pool is gone (shutting down): run it here rather than lose it.
            let mut buf = Vec::new();
            job(&mut buf);
        }
    }
}

/// The runner of queue `q`'s FLUSHes (see `flushq`): takes every waiting
/// FLUSH, then flushes the engine once for all of them, then completes
/// them; again until none waits.
fn flush_runner(inner: Arc<Inner>, q: usize) -> impl FnOnce(&mut Vec<u8>) + Send + 'static {
    move |_buf| {
        let Some(fq) = inner.flushes.get(q) else {
            return;
        };
        while let Some(batch) = fq.take() {
            // Only now, after the take: the commit must start after every
            // FLUSH in `batch` was received.
            inner.flush_batches.fetch_add(1, Ordering::SeqCst);
            let result = inner
                .engine
                .flush_requests(batch.len() as u64)
                .map(|()| 0)
                .map_err(BlkError::from);
            if let Err(e) = &result {
                log::warn!("queue {q}: {} FLUSH request(s) failed: {e}", batch.len());
            }
            let status = status_of(&result);
            for w in batch {
                let used = u32::from(write_status(&*w.mem, w.status_addr, status).is_ok());
                inner.complete(q, &w.vring, &[(w.token, used)]);
            }
        }
    }
}
