//! The vhost-user-blk backend (`VhostUserBackend` of vhost-user-backend 0.24).
//!
//! Each virtqueue is served by one epoll worker thread: one per queue by
//! default, or queue `q` by thread `q % queue_threads` when fewer threads
//! are configured (see [`queue_of`]). A worker pops descriptor chains,
//! parses them, and hands the requests to the shared
//! [`IoPool`](super::pool::IoPool); each request adds itself to the used
//! ring when it completes, under the vring lock, so requests finish out of
//! order and a slow cache miss blocks nobody else.
//! The worker's data path is in `serve`; the vhost-user messages in
//! `protocol`; vring helpers in `vring`; the thread layout in `threads`.
//!
//! In-flight accounting: a request is counted while the vring lock that
//! popped it is still held, and uncounted after its used entry is written.
//! A worker serving or polling a queue is counted as inside it. `stop_vring`
//! (GET_VRING_BASE) runs after the queue is marked not ready, which also
//! takes that lock; it waits until the worker has left (a worker that finds
//! the queue not ready or disabled leaves at once) and then until the count
//! reaches zero, so after it returns nothing of that queue touches its ring.

use super::config_space;
use super::filemap::{fill_holes, FileMap};
use super::flushq::FlushQueue;
use super::inflight::InFlight;
use super::order::{Completed, Token, UsedOrder};
use super::pool::IoPoolHandle;
use super::uring::QueueRing;
use super::DeviceLimits;
use crate::engine::{Engine, WriteMode};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

mod protocol;
mod serve;
mod threads;
mod vring;

pub use threads::{default_queue_threads, host_cpus};
use threads::{queue_of, ring_event_id, thread_masks};

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

    /// Engine flushes run for guest FLUSHes so far (tests).
    #[cfg(test)]
    pub(crate) fn flush_batches(&self) -> u64 {
        self.inner.flush_batches.load(Ordering::SeqCst)
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
