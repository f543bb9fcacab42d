//! The vhost-user-blk backend (`VhostUserBackend` of vhost-user-backend 0.24).
//!
//! Each virtqueue is served by one epoll worker thread: one per queue by
//! default, or queue `q` by thread `q % queue_threads` when fewer threads
//! are configured (see [`queue_of`]). A worker pops descriptor chains,
//! parses them, and hands the requests to the shared
//! [`IoPool`](super::pool::IoPool); each request adds itself to the used
//! ring when it completes, under the vring lock, so requests finish out of
//! order and a slow cache miss blocks nobody else.
//!
//! In-flight accounting: a request is counted while the vring lock that
//! popped it is still held, and uncounted after its used entry is written.
//! A worker serving or polling a queue is counted as inside it. `stop_vring`
//! (GET_VRING_BASE) runs after the queue is marked not ready, which also
//! takes that lock; it waits until the worker has left (a worker that finds
//! the queue not ready or disabled leaves at once) and then until the count
//! reaches zero, so after it returns nothing of that queue touches its ring.

use super::config_space;
use super::execute::{execute, status_of, write_status};
use super::filemap::{fill_holes, FileMap};
use super::flushq::{FlushQueue, Waiting};
use super::inflight::InFlight;
use super::order::{Completed, Token, UsedOrder};
use super::pool::{IoPoolHandle, Job};
use super::request::{BlkError, Request, RequestKind};
use super::uring::{Done, QueueRing};
use super::DeviceLimits;
use crate::engine::{Engine, WriteMode};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

mod protocol;
mod threads;
mod vring;

pub use threads::{default_queue_threads, host_cpus};
use threads::{queue_of, ring_event_id, thread_masks};
use vring::{avail_pending, is_live, live, pop, self_kick, Popped};

/// Guest memory as mapped from the front-end's memory table.
pub type GuestMem = GuestMemoryMmap<()>;
/// The swappable handle the vhost-user handler updates on SET_MEM_TABLE.
pub type GuestMemAtomic = GuestMemoryAtomic<GuestMem>;
/// One virtqueue with its kick/call fds.
pub type Vring = VringRwLock<GuestMemAtomic>;
/// A descriptor chain holding its own reference to guest memory.
type Chain = virtio_queue::DescriptorChain<Arc<GuestMem>>;

/// How long `stop_vring` waits for in-flight requests before giving up.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
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

/// Device parameters of the backend.
#[derive(Debug, Clone)]
pub struct BlkBackendConfig {
    pub num_queues: u16,
    pub queue_size: u16,
    pub limits: DeviceLimits,
    /// At most 20 bytes; padded with zeros.
    pub serial: String,
    /// Serve cache hits with io_uring from the queue threads (when the cache
    /// device allows it); otherwise every request goes to the I/O pool.
    pub io_uring: bool,
    /// Keep polling a queue this long after serving it (zero: off).
    pub poll: Duration,
    /// Queue worker threads, 1..=`num_queues` (0: [`default_queue_threads`];
    /// larger values are clamped). Queue `q` is served by thread
    /// `q % queue_threads`. Fewer threads than queues means larger batches
    /// and fewer context switches on hosts with few cores; polling (`poll`)
    /// needs one thread per queue (see [`BlkBackendConfig::threads`]).
    pub queue_threads: u16,
    /// Register guest memory with each queue's io_uring as fixed buffers
    /// (see [`super::fixed`]).
    pub pin_guest_memory: bool,
    /// Stage cache hits of at least this many bytes in huge-page buffers
    /// (see `bounce`); `None`: guest memory in place for every request.
    pub bounce_min: Option<usize>,
    /// Post completions as they finish instead of in the order the requests
    /// were taken (see `order`): no waiting behind a slow request, but a
    /// restart of the daemon under a running guest is no longer exact.
    pub unordered: bool,
    /// How long stopping a queue (GET_VRING_BASE) waits for its requests
    /// before it answers anyway ([`DRAIN_TIMEOUT`] in the daemon). Requests
    /// still in flight then complete later without being posted (see
    /// `order`).
    pub drain_timeout: Duration,
}

struct Inner {
    engine: Arc<Engine>,
    cfg: BlkBackendConfig,
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    mem: Mutex<GuestMemAtomic>,
    event_idx: AtomicBool,
    pool: IoPoolHandle,
    inflight: Vec<InFlight>,
    /// Each queue's completion order (see `order`): the used ring is
    /// filled in the order requests were taken.
    order: Vec<Mutex<UsedOrder>>,
    /// Each queue was stopped (GET_VRING_BASE) and has not been served
    /// since: its first pass after the restart signals the driver once
    /// (see [`BlkBackend::process`]).
    restarted: Vec<AtomicBool>,
    /// One io_uring per queue (see `uring`); `None` where hits go to the pool.
    rings: Vec<Option<Mutex<QueueRing>>>,
    /// Set by `close`: the front-end is gone, workers stop taking requests.
    closing: AtomicBool,
    /// Errors of queue passes (logged sparsely, see `handle_event`).
    queue_errors: AtomicU64,
    /// Each queue's FLUSHes waiting for the next engine flush (`flushq`).
    flushes: Vec<FlushQueue>,
    /// Engine flushes run for guest FLUSHes (each serves one or more).
    flush_batches: AtomicU64,
    /// The guest turned its write cache off (wce=0) and so switched the
    /// engine from writeback to writethrough. Only for this connection:
    /// [`BlkBackend::end_guest_settings`] puts writeback back.
    guest_wt: Mutex<bool>,
}

/// The backend. Cheap to clone (the vhost-user library clones it per worker).
#[derive(Clone)]
pub struct BlkBackend {
    inner: Arc<Inner>,
}

impl BlkBackend {
    /// A backend for one front-end connection.
    /// Undoes what the guest of this connection changed in the engine: a
    /// write cache it turned off (writeback → writethrough) is turned back on,
    /// unless the operator has set another mode since. Called when the
    /// connection has ended, so the operator's mode is what the next guest
    /// gets and what a shutdown saves.
    pub fn end_guest_settings(&self) {
        let mut wt = self
            .inner
            .guest_wt
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if std::mem::take(&mut *wt) && self.inner.engine.mode() == WriteMode::Writethrough {
            match self.inner.engine.set_mode(WriteMode::Writeback) {
                Ok(()) => log::info!(
                    "the guest's write-cache setting ended with its connection: back to writeback"
                ),
                Err(e) => log::warn!("cannot put writeback back after the guest's wce=0: {e}"),
            }
        }
    }

    pub fn new(engine: Arc<Engine>, cfg: BlkBackendConfig, pool: IoPoolHandle) -> BlkBackend {
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = cfg.serial.len().min(serial.len());
        serial[..n].copy_from_slice(&cfg.serial.as_bytes()[..n]);
        let inflight = (0..cfg.num_queues).map(|_| InFlight::default()).collect();
        let order = (0..cfg.num_queues)
            .map(|_| Mutex::new(UsedOrder::new(cfg.queue_size, !cfg.unordered)))
            .collect();
        // One mapping of a memory-backed cache file for all queues (one
        // set of page tables), once no valid frame lies over a hole.
        let map = engine
            .cache_raw_access()
            .filter(|a| cfg.io_uring && a.memory)
            .and_then(|a| match fill_holes(a.fd, &engine.valid_frame_ranges()) {
                Ok(n) => {
                    if n > 0 {
                        log::info!("allocated {n} bytes of holes under cached blocks of the memory-backed cache file");
                    }
                    FileMap::new(a.fd)
                }
                Err(e) => {
                    log::warn!(
                        "not mapping the memory-backed cache file: {e}; hits use system calls"
                    );
                    None
                }
            })
            .map(Arc::new);
        let rings = (0..cfg.num_queues)
            .map(|q| make_ring(&engine, &cfg, q, map.clone()).map(Mutex::new))
            .collect();
        BlkBackend {
            inner: Arc::new(Inner {
                engine,
                serial,
                mem: Mutex::new(GuestMemoryAtomic::new(GuestMem::new())),
                event_idx: AtomicBool::new(false),
                pool,
                inflight,
                order,
                restarted: (0..cfg.num_queues)
                    .map(|_| AtomicBool::new(false))
                    .collect(),
                rings,
                closing: AtomicBool::new(false),
                queue_errors: AtomicU64::new(0),
                flushes: (0..cfg.num_queues).map(|_| FlushQueue::default()).collect(),
                flush_batches: AtomicU64::new(0),
                guest_wt: Mutex::new(false),
                cfg,
            }),
        }
    }

    /// The guest memory handle to give `VhostUserDaemon::new`.
    pub fn memory(&self) -> GuestMemAtomic {
        self.inner
            .mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The epoll event id of the io_uring completion eventfd of the queue
    /// at index `local` among its thread's queues (above the ids
    /// vhost-user-backend reserves for queues and its exit event).
    fn ring_event(&self, local: usize) -> u64 {
        ring_event_id(self.inner.cfg.num_queues, local)
    }

    /// Adds each queue's io_uring eventfd to the epoll loop of the thread
    /// that serves it (see [`queue_of`]).
    pub fn register_ring_events(
        &self,
        handlers: &[Arc<VringEpollHandler<BlkBackend>>],
    ) -> io::Result<()> {
        let threads = usize::from(self.inner.cfg.threads());
        for q in 0..usize::from(self.inner.cfg.num_queues) {
            let Some(h) = handlers.get(q % threads) else {
                continue;
            };
            let Some(ring) = self.lock_ring(q) else {
                continue;
            };
            let fd = ring.event_fd();
            drop(ring);
            // Edge-triggered: the worker never reads it (see `on_event`).
            h.register_listener(
                fd,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                self.ring_event(q / threads),
            )?;
        }
        Ok(())
    }

    /// Tells the queue workers the front-end is gone: they stop taking
    /// requests and stop waiting for in-flight ones, so they can see their
    /// exit event. Call before stopping them and then [`BlkBackend::drain`].
    pub fn close(&self) {
        self.inner.closing.store(true, Ordering::Release);
    }

    /// Stops taking requests and waits until every one taken is completed
    /// and posted, while the front-end is still connected (the queue workers
    /// keep reaping completions; the pool completes its own); false on
    /// timeout.
    pub fn quiesce(&self, timeout: Duration) -> bool {
        self.close();
        self.wait_idle(timeout)
    }

    /// Waits for every in-flight request of every queue; false on timeout.
    /// Call after the queue workers have stopped: io_uring completions are
    /// reaped here then.
    pub fn drain(&self, timeout: Duration) -> bool {
        for q in 0..self.inner.rings.len() {
            let Some(mut ring) = self.lock_ring(q) else {
                continue;
            };
            let done = ring.drain();
            let vring = ring.vring.clone();
            drop(ring);
            if let Some(vring) = vring {
                self.finish_ring(q, &vring, done);
            }
        }
        self.wait_idle(timeout)
    }

    /// Waits until no queue has a request in flight; false on timeout.
    fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        self.inner
            .inflight
            .iter()
            .all(|f| f.wait_idle(deadline.saturating_duration_since(Instant::now())))
    }

    fn wce(&self) -> bool {
        self.inner.engine.mode() == WriteMode::Writeback
    }

    /// Serves queue `q` after a kick (see [`BlkBackend::process`]).
    fn process_queue(&self, q: usize, vring: &Vring) -> io::Result<()> {
        self.process(q, vring, false)
    }

    /// Serves queue `q` if it is live (see [`is_live`]), then polls it for
    /// the configured interval, if any, when more is to be expected: chains
    /// were popped, or `posted` completions the driver may answer. (With
    /// EVENT_IDX the driver kicks once during a poll session; that kick finds
    /// nothing new and starts no idle session.)
    ///
    /// The worker is inside the queue ([`InFlight::enter`]) throughout, so
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
    fn lock_ring(&self, q: usize) -> Option<MutexGuard<'_, QueueRing>> {
        self.inner
            .rings
            .get(q)?
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Posts the served requests of one reap in one batch and sends the
    /// failed ones to the pool.
    fn finish_ring(&self, q: usize, vring: &Vring, done: Vec<Done>) {
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
    fn process_ring(&self, q: usize, vring: &Vring) -> io::Result<()> {
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

    /// Engine flushes run for guest FLUSHes so far (tests).
    #[cfg(test)]
    pub(crate) fn flush_batches(&self) -> u64 {
        self.inner.flush_batches.load(Ordering::SeqCst)
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

/// Sets up queue `q`'s io_uring if enabled and the cache device allows it.
/// `map`: the memory-backed cache file's mapping, if any.
fn make_ring(
    engine: &Engine,
    cfg: &BlkBackendConfig,
    q: u16,
    map: Option<Arc<FileMap>>,
) -> Option<QueueRing> {
    if !cfg.io_uring {
        return None;
    }
    let access = engine.cache_raw_access()?;
    match QueueRing::new(
        access,
        cfg.queue_size,
        map,
        cfg.pin_guest_memory,
        cfg.bounce_min,
    ) {
        Ok(r) => Some(r),
        Err(e) => {
            if q == 0 {
                log::warn!("cache hits go through the I/O threads: {e}");
            }
            None
        }
    }
}

impl Inner {
    /// Counts an error of queue `q` that a guest can repeat at will, and
    /// logs its 1st, 2nd, 4th, 8th, ... occurrence (all queues together).
    fn queue_error(&self, q: usize, what: impl std::fmt::Display) {
        let n = self.queue_errors.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            log::error!("queue {q}: {what} ({n} queue errors so far)");
        }
    }

    /// Marks each `(token, used_len)` completed, puts on the used ring every
    /// completed request whose turn it is (see `order`: in the order they
    /// were taken), signals the driver once if EVENT_IDX says so, and
    /// uncounts the requests posted.
    fn complete(&self, q: usize, vring: &Vring, done: &[(Token, u32)]) {
        // Nothing completed: nothing new can be posted.
        if done.is_empty() {
            return;
        }
        let Some(order) = self.order.get(q) else {
            return;
        };
        // Requests taken before the queue was reset leave the count here.
        let mut stale = 0;
        let posted = {
            let mut state = vring.get_mut();
            let mut o = order.lock().unwrap_or_else(|p| p.into_inner());
            for &(token, used_len) in done {
                if o.done(token, used_len) == Completed::Stale {
                    stale += 1;
                }
            }
            let n = o.post(|head, used_len| {
                if let Err(e) = state.add_used(head, used_len) {
                    log::error!("queue {q}: cannot add {head} to the used ring: {e}");
                }
            });
            drop(o);
            if n > 0 && state.needs_notification().unwrap_or(true) {
                if let Err(e) = state.signal_used_queue() {
                    log::error!("queue {q}: cannot signal the used ring: {e}");
                }
            }
            n
        };
        if posted + stale > 0 {
            if let Some(f) = self.inflight.get(q) {
                f.end(posted + stale);
            }
        }
    }
}

#[cfg(test)]
#[path = "backend_tests.rs"]
mod malformed_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemDevice;
    use crate::virtio::pool::IoPool;

    fn backend(read_only: bool) -> (BlkBackend, Arc<Engine>, IoPool) {
        super::malformed_tests::test_backend(
            3,
            128,
            DeviceLimits::new(1 << 20, 4096, read_only),
            Arc::new(MemDevice::new(1 << 20)),
            Arc::new(MemDevice::new(1 << 20)),
            Duration::ZERO,
        )
    }

    #[test]
    fn wce_follows_and_sets_the_mode() {
        let (b, engine, _pool) = backend(false);
        let wce = |b: &BlkBackend| b.get_config(config_space::WCE_OFFSET, 1)[0];
        assert_eq!(wce(&b), 1);
        b.set_config(config_space::WCE_OFFSET, &[0]).unwrap();
        assert_eq!(engine.mode(), WriteMode::Writethrough);
        assert_eq!(wce(&b), 0);
        b.set_config(config_space::WCE_OFFSET, &[1]).unwrap();
        assert_eq!(engine.mode(), WriteMode::Writeback);
        // Turned off by the guest, writeback comes back with the end of
        // its connection.
        b.set_config(config_space::WCE_OFFSET, &[0]).unwrap();
        assert_eq!(engine.mode(), WriteMode::Writethrough);
        b.end_guest_settings();
        assert_eq!(engine.mode(), WriteMode::Writeback);
        // wce=0 leaves writearound alone: it already completes on the source;
        // wce=1 does not override it, nor writethrough or passthrough set by
        // the operator.
        engine.set_mode(WriteMode::Writearound).unwrap();
        b.set_config(config_space::WCE_OFFSET, &[0]).unwrap();
        assert_eq!(engine.mode(), WriteMode::Writearound);
        for m in [
            WriteMode::Writearound,
            WriteMode::Writethrough,
            WriteMode::Passthrough,
        ] {
            engine.set_mode(m).unwrap();
            b.set_config(config_space::WCE_OFFSET, &[1]).unwrap();
            assert_eq!(engine.mode(), m, "wce=1 overrode the operator's {m}");
            assert_eq!(wce(&b), 0);
        }
        // The operator's change while the guest had turned writeback off wins.
        engine.set_mode(WriteMode::Writeback).unwrap();
        b.set_config(config_space::WCE_OFFSET, &[0]).unwrap();
        engine.set_mode(WriteMode::Writearound).unwrap();
        b.set_config(config_space::WCE_OFFSET, &[1]).unwrap();
        b.end_guest_settings();
        assert_eq!(engine.mode(), WriteMode::Writearound);
        // Nothing else is writable.
        assert!(b.set_config(0, &[0; 8]).is_err());
    }

    #[test]
    fn features_and_threads() {
        let (rw, _, _p1) = backend(false);
        let (ro, _, _p2) = backend(true);
        assert_eq!(rw.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(ro.features() & (1 << VIRTIO_BLK_F_RO), 0);
        for bit in [
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_CONFIG_WCE,
        ] {
            assert_ne!(rw.features() & (1 << bit), 0, "bit {bit}");
        }
        assert_ne!(
            rw.features() & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0
        );
        let needed = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::MQ;
        assert!(rw.protocol_features().contains(needed));
        assert_eq!(rw.queues_per_thread(), vec![1, 2, 4]);
        let cap = rw.get_config(0, 8);
        assert_eq!(u64::from_le_bytes(cap.try_into().unwrap()), 2048);
    }
}
