//! The backend keeps serving after malformed requests.
//!
//! These tests drive the real queue-processing path
//! ([`BlkBackend::process_queue`], the I/O pool, used-ring completion) over
//! split queues laid out in guest memory by hand, the way a driver would. Each
//! malformed chain is published together with a good read on the same queue;
//! both must come back on the used ring with the expected length and status
//! byte, and another queue must still serve afterwards.

use super::*;
use crate::device::{BlockDevice, LatencyDevice, LatencyProfile, MemDevice};
use crate::engine::EngineConfig;
use crate::virtio::pool::IoPool;
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

#[path = "flush_tests.rs"]
mod flush_tests;

const QSIZE: u16 = 16;
const MEM_SIZE: usize = 8 << 20;
const DISK: u64 = 1 << 20;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const W: u16 = VRING_DESC_F_WRITE as u16;
const IND: u16 = VRING_DESC_F_INDIRECT as u16;
/// Status bytes are set to this before a request so "not written" shows.
const UNTOUCHED: u8 = 0xee;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// One descriptor as the driver writes it: address, length, flags. `NEXT`
/// and the next index are filled in by [`Guest::chain`].
type D = (u64, u32, u16);

/// A guest with `n` queues of [`QSIZE`] entries. Queue q's rings live at
/// `q * 0x1000`; its request buffers in 64 KiB slots from
/// `0x10_0000 + q * 0x10_0000`.
struct Guest {
    mem: GuestMem,
    backend: BlkBackend,
    vrings: Vec<Vring>,
    engine: Arc<Engine>,
    used_seen: Vec<u16>,
    _pool: IoPool,
}

/// Where one request's pieces live: header, status byte, data, and a spare
/// area for discard segments or an indirect table.
#[derive(Clone, Copy)]
struct Slot {
    hdr: u64,
    status: u64,
    data: u64,
    extra: u64,
}

fn desc_table(q: usize) -> u64 {
    q as u64 * 0x1000
}
fn avail_ring(q: usize) -> u64 {
    desc_table(q) + 16 * u64::from(QSIZE)
}
fn used_ring(q: usize) -> u64 {
    // flags + idx + ring + used_event, rounded up to 4.
    (avail_ring(q) + 6 + 2 * u64::from(QSIZE)).next_multiple_of(4)
}

impl Guest {
    fn new(queues: u16, limits: DeviceLimits) -> Guest {
        Guest::with_read_latency(queues, limits, Duration::ZERO)
    }

    /// As `new`, with every read of either device taking `lat`.
    fn with_read_latency(queues: u16, limits: DeviceLimits, lat: Duration) -> Guest {
        let slow = LatencyProfile {
            read: lat,
            ..LatencyProfile::default()
        };
        let source: Arc<dyn BlockDevice> = Arc::new(LatencyDevice::new(MemDevice::new(DISK), slow));
        let cache: Arc<dyn BlockDevice> =
            Arc::new(LatencyDevice::new(MemDevice::new(1 << 20), slow));
        Guest::with_devices(queues, limits, source, cache)
    }

    /// A guest whose engine uses these devices (a file cache gets the
    /// io_uring path).
    fn with_devices(
        queues: u16,
        limits: DeviceLimits,
        source: Arc<dyn BlockDevice>,
        cache: Arc<dyn BlockDevice>,
    ) -> Guest {
        Guest::polled(queues, limits, source, cache, Duration::ZERO)
    }

    /// As `with_devices`, with queues busy-polled for `poll` after each pass.
    fn polled(
        queues: u16,
        limits: DeviceLimits,
        source: Arc<dyn BlockDevice>,
        cache: Arc<dyn BlockDevice>,
        poll: Duration,
    ) -> Guest {
        let cfg = test_config(queues, QSIZE, limits, poll);
        Guest::configured(cfg, source, cache)
    }

    /// A guest whose backend has configuration `cfg`.
    fn configured(
        cfg: BlkBackendConfig,
        source: Arc<dyn BlockDevice>,
        cache: Arc<dyn BlockDevice>,
    ) -> Guest {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        Guest::configured_in(cfg, source, cache, mem)
    }

    /// As [`Guest::configured`], with `mem` (`MEM_SIZE` bytes from 0) as
    /// guest memory.
    fn configured_in(
        cfg: BlkBackendConfig,
        source: Arc<dyn BlockDevice>,
        cache: Arc<dyn BlockDevice>,
        mem: GuestMem,
    ) -> Guest {
        let queues = cfg.num_queues;
        let (backend, engine, pool) = test_backend_with(cfg, source, cache);
        let atomic = GuestMemoryAtomic::new(mem.clone());
        backend.update_memory(atomic.clone()).unwrap();
        let vrings = (0..usize::from(queues))
            .map(|q| {
                let v = Vring::new(atomic.clone(), QSIZE).unwrap();
                v.set_queue_size(QSIZE);
                v.set_queue_info(desc_table(q), avail_ring(q), used_ring(q))
                    .unwrap();
                v.set_queue_ready(true);
                v.set_enabled(true);
                v
            })
            .collect();
        Guest {
            mem,
            backend,
            vrings,
            engine,
            used_seen: vec![0; usize::from(queues)],
            _pool: pool,
        }
    }

    fn slot(q: usize, k: u64) -> Slot {
        let base = 0x10_0000 + q as u64 * 0x10_0000 + k * 0x1_0000;
        Slot {
            hdr: base,
            status: base + 0x100,
            data: base + 0x1000,
            extra: base + 0x8000,
        }
    }

    fn header(&self, at: u64, req_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn segment(&self, at: u64, sector: u64, sectors: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        self.mem.write_slice(&s, GuestAddress(at)).unwrap();
    }

    /// Writes a raw descriptor at `table[idx]`.
    fn put(&self, table: u64, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = Descriptor::new(addr, len, flags, next);
        self.mem
            .write_obj(d, GuestAddress(table + 16 * u64::from(idx)))
            .unwrap();
    }

    /// Writes `descs` linked by NEXT into queue q's table from index
    /// `first`; returns the head index.
    fn chain(&self, q: usize, first: u16, descs: &[D]) -> u16 {
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let idx = first + i as u16;
            let last = i + 1 == descs.len();
            let flags = if last { *flags } else { *flags | NEXT };
            self.put(desc_table(q), idx, *addr, *len, flags, idx + 1);
        }
        first
    }

    /// Makes `head` available to the device.
    fn publish(&self, q: usize, head: u16) {
        publish_in(&self.mem, q, head);
    }

    /// Lets the backend process queue q and waits for every request.
    fn run(&self, q: usize) {
        self.backend.process_queue(q, &self.vrings[q]).unwrap();
        assert!(self.backend.drain(Duration::from_secs(10)), "drain");
    }

    /// The used entries (id, len) added since the last call.
    fn take_used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(used_ring(q) + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen[q] != idx {
            let at = used_ring(q) + 4 + 8 * u64::from(self.used_seen[q] % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id, len));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        out
    }

    fn status(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    fn reset_status(&self, s: &Slot) {
        self.mem
            .write_obj(UNTOUCHED, GuestAddress(s.status))
            .unwrap();
    }

    /// Publishes a 4 KiB read of disk sector `sector` in slot 1 of queue q,
    /// using descriptors 8..11.
    fn publish_good_read(&self, q: usize, sector: u64) -> (u16, Slot) {
        let s = Guest::slot(q, 1);
        self.reset_status(&s);
        self.mem
            .write_slice(&[0u8; 4096], GuestAddress(s.data))
            .unwrap();
        self.header(s.hdr, VIRTIO_BLK_T_IN, sector);
        let head = self.chain(q, 8, &[(s.hdr, 16, 0), (s.data, 4096, W), (s.status, 1, W)]);
        self.publish(q, head);
        (head, s)
    }

    fn read_data(&self, s: &Slot, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(s.data)).unwrap();
        v
    }
}

/// Checks `done` every millisecond for up to `limit`; true once it holds.
fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits up to `limit` for queue 0's used index to reach `n`.
fn wait_used(g: &Guest, n: u16, limit: Duration) -> bool {
    wait_until(limit, || {
        let idx: u16 = g.mem.read_obj(GuestAddress(used_ring(0) + 2)).unwrap();
        idx >= n
    })
}

/// A write-back engine with 4 KiB blocks on these devices, and a backend of
/// `queues` queues (io_uring on, where the cache device allows it) with its
/// I/O pool. Shared with the backend's own unit tests.
pub(super) fn test_backend(
    queues: u16,
    queue_size: u16,
    limits: DeviceLimits,
    source: Arc<dyn BlockDevice>,
    cache: Arc<dyn BlockDevice>,
    poll: Duration,
) -> (BlkBackend, Arc<Engine>, IoPool) {
    test_backend_with(test_config(queues, queue_size, limits, poll), source, cache)
}

/// The backend configuration of [`test_backend`]: one thread per queue.
fn test_config(
    queues: u16,
    queue_size: u16,
    limits: DeviceLimits,
    poll: Duration,
) -> BlkBackendConfig {
    BlkBackendConfig {
        num_queues: queues,
        queue_size,
        limits,
        serial: "test".into(),
        io_uring: true,
        poll,
        queue_threads: queues,
        pin_guest_memory: false,
        bounce_min: None,
        unordered: false,
        drain_timeout: DRAIN_TIMEOUT,
    }
}

/// As [`test_backend`], with the backend configured by `cfg`.
fn test_backend_with(
    cfg: BlkBackendConfig,
    source: Arc<dyn BlockDevice>,
    cache: Arc<dyn BlockDevice>,
) -> (BlkBackend, Arc<Engine>, IoPool) {
    let ecfg = EngineConfig::with_block_size(4096, Some(WriteMode::Writeback));
    let engine = Arc::new(Engine::open(source, cache, ecfg).unwrap());
    let pool = IoPool::new(2, 64).unwrap();
    let backend = BlkBackend::new(Arc::clone(&engine), cfg, pool.handle());
    (backend, engine, pool)
}

fn limits() -> DeviceLimits {
    let mut l = DeviceLimits::new(DISK, 4096, false);
    // 4 KiB logical blocks, so that discard alignment can be violated.
    l.logical_block_sectors = 8;
    l
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// What a malformed case must produce.
struct Expect {
    /// Used length of the malformed request (data written + status byte).
    used_len: u32,
    /// Its status byte, or `UNTOUCHED` when no valid status descriptor exists.
    status: u8,
}

/// A malformed case: writes its chain into queue q (slot 0, descriptors
/// from 0) and returns its head.
type Case = (&'static str, fn(&Guest, usize, &Slot) -> u16, Expect);

fn simple(g: &Guest, q: usize, descs: &[D]) -> u16 {
    g.chain(q, 0, descs)
}

const fn ioerr() -> Expect {
    Expect {
        used_len: 1,
        status: IOERR,
    }
}

const fn unreported() -> Expect {
    Expect {
        used_len: 0,
        status: UNTOUCHED,
    }
}

fn cases() -> Vec<Case> {
    vec![
        (
            "read past the end of the disk",
            |g, q, s| {
                g.header(s.hdr, VIRTIO_BLK_T_IN, DISK / 512 - 1);
                simple(g, q, &[(s.hdr, 16, 0), (s.data, 1024, W), (s.status, 1, W)])
            },
            ioerr(),
        ),
        (
            "sector * 512 + length overflows u64",
            |g, q, s| {
                g.header(s.hdr, VIRTIO_BLK_T_OUT, u64::MAX / 512);
                simple(g, q, &[(s.hdr, 16, 0), (s.data, 4096, 0), (s.status, 1, W)])
            },
            ioerr(),
        ),
        (
            "sector * 512 overflows u64",
            |g, q, s| {
                g.header(s.hdr, VIRTIO_BLK_T_IN, u64::MAX);
                simple(g, q, &[(s.hdr, 16, 0), (s.data, 512, W), (s.status, 1, W)])
            },
            ioerr(),
        ),
        (
            "zero-length data descriptor",
            |g, q, s| {
                g.header(s.hdr, VIRTIO_BLK_T_IN, 0);
                simple(g, q, &[(s.hdr, 16, 0), (s.data, 0, W), (s.status, 1, W)])
            },
            ioerr(),
        ),
        (
            "read without any data descriptor",
            |g, q, s| {
                g.header(s.hdr, VIRTIO_BLK_T_IN, 0);
                simple(g, q, &[(s.hdr, 16, 0), (s.status, 1, W)])
            },
            ioerr(),
        ),
        (
            "data descriptor outside guest memory",
            |g, q, s| {
                g.header(s.hdr, VIRTIO_BLK_T_IN, 0);
                simple(
                    g,
                    q,
                    &[(s.hdr, 16, 0), (1 << 40, 4096, W), (s.status, 1, W)],
                )
            },
            ioerr(),
        ),
        (
            "data descriptor straddling the end of guest memory",
            |g, q, s| {
                g.header(s.hdr, VIRTIO_BLK_T_OUT, 0);
                let addr = MEM_SIZE as u64 - 512;
                simple(g, q, &[(s.hdr, 16, 0), (addr, 4096, 0), (s.status, 1, W)])
            },
            ioerr(),
        ),
        (
            "read into a device-readable buffer",
            |g, q, s| {
                g.header(s.hdr, VIRTIO_BLK_T_IN, 0);
                simple(g, q, &[(s.hdr, 16, 0), (s.data, 4096, 0), (s.status, 1, W)])
            },
            ioerr(),
        ),
        (
            "write from a device-writable buffer",
            |g, q, s| {
                g.header(s.hdr, VIRTIO_BLK_T_OUT, 0);
                simple(g, q, &[(s.hdr, 16, 0), (s.data, 4096, W), (s.status, 1, W)])
            },
            ioerr(),
        ),
        (
            "device-writable header",
            |g, q, s| {
                g.header(s.hdr, VIRTIO_BLK_T_IN, 0);
                simple(g, q, &[(s.hdr, 16, W), (s.data, 4096, W), (s.status, 1, W)])
            },
            ioerr(),
        ),
        (
            "status descriptor missing",
            |g, q, s| {
                g.header(s.hdr, VIRTIO_BLK_T_FLUSH, 0);
                simple(g, q, &[(s.hdr, 16, 0)])
            },
            unreported(),
        ),
        (
            "status descriptor of zero bytes",
            |g, q, s| {
                g.header(s.hdr, VIRTIO_BLK_T_FLUSH, 0);
                simple(g, q, &[(s.hdr, 16, 0), (s.status, 0, W)])
            },
            unreported(),
        ),
        (
            "status descriptor device-readable",
            |g, q, s| {
                g.header(s.hdr, VIRTIO_BLK_T_FLUSH, 0);
                simple(g, q, &[(s.hdr, 16, 0), (s.status, 1, 0)])
            },
            unreported(),
        ),
        (
            "discard with an unaligned sector",
            |g, q, s| {
                g.header(s.hdr, VIRTIO_BLK_T_DISCARD, 0);
                g.segment(s.extra, 3, 8, 0);
                simple(g, q, &[(s.hdr, 16, 0), (s.extra, 16, 0), (s.status, 1, W)])
            },
            ioerr(),
        ),
        (
            "discard with too many segments",
            |g, q, s| {
                g.header(s.hdr, VIRTIO_BLK_T_DISCARD, 0);
                g.segment(s.extra, 0, 8, 0);
                g.segment(s.extra + 16, 8, 8, 0);
                simple(g, q, &[(s.hdr, 16, 0), (s.extra, 32, 0), (s.status, 1, W)])
            },
            ioerr(),
        ),
        (
            "discard larger than max_discard_sectors",
            |g, q, s| {
                g.header(s.hdr, VIRTIO_BLK_T_DISCARD, 0);
                g.segment(s.extra, 0, u32::MAX - 7, 0);
                simple(g, q, &[(s.hdr, 16, 0), (s.extra, 16, 0), (s.status, 1, W)])
            },
            ioerr(),
        ),
        (
            "write-zeroes past the end of the disk",
            |g, q, s| {
                g.header(s.hdr, VIRTIO_BLK_T_WRITE_ZEROES, 0);
                g.segment(s.extra, DISK / 512 - 8, 16, 0);
                simple(g, q, &[(s.hdr, 16, 0), (s.extra, 16, 0), (s.status, 1, W)])
            },
            ioerr(),
        ),
        (
            "write-zeroes segment with reserved flags",
            |g, q, s| {
                g.header(s.hdr, VIRTIO_BLK_T_WRITE_ZEROES, 0);
                g.segment(s.extra, 0, 8, 0x8000_0000);
                simple(g, q, &[(s.hdr, 16, 0), (s.extra, 16, 0), (s.status, 1, W)])
            },
            Expect {
                used_len: 1,
                status: UNSUPP,
            },
        ),
        (
            "unknown request type",
            |g, q, s| {
                g.header(s.hdr, 0x7fff_ffff, 0);
                simple(g, q, &[(s.hdr, 16, 0), (s.data, 512, W), (s.status, 1, W)])
            },
            Expect {
                used_len: 1,
                status: UNSUPP,
            },
        ),
        (
            "chain longer than the queue (a loop)",
            |g, q, s| {
                g.header(s.hdr, VIRTIO_BLK_T_IN, 0);
                let t = desc_table(q);
                g.put(t, 0, s.hdr, 16, NEXT, 1);
                g.put(t, 1, s.data, 512, W | NEXT, 2);
                g.put(t, 2, s.status, 1, W | NEXT, 1);
                0
            },
            unreported(),
        ),
        (
            "next index outside the queue",
            |g, q, s| {
                g.header(s.hdr, VIRTIO_BLK_T_IN, 0);
                let t = desc_table(q);
                g.put(t, 0, s.hdr, 16, NEXT, 1);
                g.put(t, 1, s.data, 512, W | NEXT, 2);
                g.put(t, 2, s.status, 1, W | NEXT, QSIZE + 3);
                0
            },
            unreported(),
        ),
        (
            "indirect table inside an indirect table",
            |g, q, s| {
                g.header(s.hdr, VIRTIO_BLK_T_IN, 0);
                let inner = s.extra + 0x1000;
                g.put(inner, 0, s.status, 1, W, 0);
                g.put(s.extra, 0, s.hdr, 16, NEXT, 1);
                g.put(s.extra, 1, s.data, 512, W | NEXT, 2);
                g.put(s.extra, 2, inner, 16, IND, 0);
                g.put(desc_table(q), 0, s.extra, 48, IND, 0);
                0
            },
            unreported(),
        ),
        (
            "indirect table whose first entry is indirect",
            |g, q, s| {
                g.header(s.hdr, VIRTIO_BLK_T_FLUSH, 0);
                let inner = s.extra + 0x1000;
                g.put(inner, 0, s.hdr, 16, NEXT, 1);
                g.put(inner, 1, s.status, 1, W, 0);
                g.put(s.extra, 0, inner, 32, IND, 0);
                g.put(desc_table(q), 0, s.extra, 16, IND, 0);
                0
            },
            unreported(),
        ),
        (
            "indirect table of a length that is not a multiple of 16",
            |g, q, s| {
                g.header(s.hdr, VIRTIO_BLK_T_FLUSH, 0);
                g.put(s.extra, 0, s.hdr, 16, NEXT, 1);
                g.put(s.extra, 1, s.status, 1, W, 0);
                g.put(desc_table(q), 0, s.extra, 31, IND, 0);
                0
            },
            unreported(),
        ),
        (
            "more data descriptors than seg_max",
            |g, q, s| {
                // A 300-entry indirect table: header, 298 x 512 B, status.
                g.header(s.hdr, VIRTIO_BLK_T_IN, 0);
                let n: u16 = 300;
                g.put(s.extra, 0, s.hdr, 16, NEXT, 1);
                for i in 1..n - 1 {
                    g.put(s.extra, i, s.data, 512, W | NEXT, i + 1);
                }
                g.put(s.extra, n - 1, s.status, 1, W, 0);
                g.put(desc_table(q), 0, s.extra, 16 * u32::from(n), IND, 0);
                0
            },
            unreported(),
        ),
    ]
}

#[test]
fn malformed_requests_get_their_status_and_the_queue_keeps_serving() {
    let mut g = Guest::new(2, limits());
    let want = pattern(1);
    g.engine.write(8 * 512, &want).unwrap();
    for (name, build, expect) in cases() {
        let bad = Guest::slot(0, 0);
        g.reset_status(&bad);
        let head = build(&g, 0, &bad);
        g.publish(0, head);
        let (good_head, good) = g.publish_good_read(0, 8);
        g.run(0);
        let mut used = g.take_used(0);
        used.sort();
        assert_eq!(
            used,
            vec![
                (u32::from(head), expect.used_len),
                (u32::from(good_head), 4097)
            ],
            "{name}: used ring"
        );
        assert_eq!(g.status(bad.status), expect.status, "{name}: status byte");
        assert_eq!(g.status(good.status), OK, "{name}: following read");
        assert!(g.read_data(&good, 4096) == want, "{name}: read data");
    }
    // The other queue serves too: a write then a read back.
    let data = pattern(9);
    let s = Guest::slot(1, 0);
    g.mem.write_slice(&data, GuestAddress(s.data)).unwrap();
    g.header(s.hdr, VIRTIO_BLK_T_OUT, 64);
    g.reset_status(&s);
    let head = g.chain(1, 0, &[(s.hdr, 16, 0), (s.data, 4096, 0), (s.status, 1, W)]);
    g.publish(1, head);
    g.run(1);
    assert_eq!(g.take_used(1), vec![(0, 1)]);
    assert_eq!(g.status(s.status), OK);
    let (_, r) = g.publish_good_read(1, 64);
    g.run(1);
    assert_eq!(g.take_used(1), vec![(8, 4097)]);
    assert!(g.read_data(&r, 4096) == data);
}

#[test]
fn a_valid_indirect_request_is_served() {
    // The positive control for the indirect cases above.
    let mut g = Guest::new(1, limits());
    let want = pattern(5);
    g.engine.write(16 * 512, &want).unwrap();
    let s = Guest::slot(0, 0);
    g.reset_status(&s);
    g.header(s.hdr, VIRTIO_BLK_T_IN, 16);
    g.put(s.extra, 0, s.hdr, 16, NEXT, 1);
    g.put(s.extra, 1, s.data, 2048, W | NEXT, 2);
    g.put(s.extra, 2, s.data + 2048, 2048, W | NEXT, 3);
    g.put(s.extra, 3, s.status, 1, W, 0);
    g.put(desc_table(0), 0, s.extra, 64, IND, 0);
    g.publish(0, 0);
    g.run(0);
    assert_eq!(g.take_used(0), vec![(0, 4097)]);
    assert_eq!(g.status(s.status), OK);
    assert!(g.read_data(&s, 4096) == want);
}

#[test]
fn write_to_a_read_only_disk_fails_and_reads_continue() {
    let mut ro = limits();
    ro.read_only = true;
    let mut g = Guest::new(1, ro);
    let before = pattern(3);
    g.engine.write(8 * 512, &before).unwrap();
    for t in [
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
    ] {
        let s = Guest::slot(0, 0);
        g.reset_status(&s);
        g.header(s.hdr, t, 8);
        g.segment(s.extra, 8, 8, 0);
        let data = if t == VIRTIO_BLK_T_OUT {
            (s.data, 4096, 0)
        } else {
            (s.extra, 16, 0)
        };
        let head = g.chain(0, 0, &[(s.hdr, 16, 0), data, (s.status, 1, W)]);
        g.publish(0, head);
        let (good_head, good) = g.publish_good_read(0, 8);
        g.run(0);
        let mut used = g.take_used(0);
        used.sort();
        assert_eq!(used, vec![(0, 1), (u32::from(good_head), 4097)], "type {t}");
        assert_eq!(g.status(s.status), IOERR, "type {t}");
        assert_eq!(g.status(good.status), OK, "type {t}");
        assert!(g.read_data(&good, 4096) == before, "type {t}: data changed");
    }
}

#[test]
fn inflight_requests_per_queue_are_bounded_by_the_ring_size() {
    // A driver may publish a head again while it is still in flight, so the
    // ring alone does not bound the work one queue can queue up. With slow
    // reads, a second full ring of copies of the same head can only be popped
    // as earlier ones complete: when process_queue returns, at least a ring's
    // worth of requests must already be on the used ring.
    let mut g = Guest::with_read_latency(1, limits(), Duration::from_millis(20));
    let s = Guest::slot(0, 0);
    g.header(s.hdr, VIRTIO_BLK_T_IN, 0);
    let head = g.chain(0, 0, &[(s.hdr, 16, 0), (s.data, 512, W), (s.status, 1, W)]);
    for _ in 0..QSIZE {
        g.publish(0, head);
    }
    g.backend.process_queue(0, &g.vrings[0]).unwrap();
    for _ in 0..QSIZE {
        g.publish(0, head);
    }
    g.backend.process_queue(0, &g.vrings[0]).unwrap();
    let early = g.take_used(0).len();
    assert!(
        early >= usize::from(QSIZE),
        "only {early} completions before the second ring was popped"
    );
    assert!(g.backend.drain(Duration::from_secs(10)));
    assert_eq!(early + g.take_used(0).len(), 2 * usize::from(QSIZE));
    assert_eq!(g.status(s.status), OK);
}

#[test]
fn inflight_bound_waits_for_a_completion() {
    let f = Arc::new(InFlight::default());
    for _ in 0..4 {
        f.begin();
    }
    assert!(!f.wait_below(4, Duration::from_millis(20)), "did not wait");
    assert!(f.wait_below(5, Duration::from_millis(20)));
    let ender = Arc::clone(&f);
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        ender.end(1);
    });
    let start = Instant::now();
    assert!(f.wait_below(4, Duration::from_secs(5)));
    assert!(start.elapsed() >= Duration::from_millis(40));
    t.join().unwrap();
}

#[path = "uring_tests.rs"]
mod uring_tests;

#[path = "poll_tests.rs"]
mod poll_tests;

#[path = "bounce_tests.rs"]
mod bounce_tests;

/// A driver that moves the available index more than a ring ahead of the
/// device's publishes chains nobody can pop. Before, each pass re-armed
/// kicks, saw "more pending" and tried again: a worker spinning at 100 %
/// for good (and, with `--poll`, a poll session that never idled). Now the
/// pass ends, the error is counted, and once the driver mends its index
/// the queue serves again. With and without busy polling.
#[test]
fn an_available_index_past_the_ring_ends_the_pass() {
    for poll in [Duration::ZERO, Duration::from_micros(200)] {
        let source: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(DISK));
        let cache: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20));
        let mut g = Guest::polled(1, limits(), source, cache, poll);
        g.backend.set_event_idx(true);
        let idx_addr = GuestAddress(avail_ring(0) + 2);
        g.mem.write_obj(QSIZE + 1, idx_addr).unwrap();
        let (backend, vring) = (g.backend.clone(), g.vrings[0].clone());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = backend.process_queue(0, &vring);
            let _ = tx.send(r.is_ok());
        });
        let finished = rx.recv_timeout(Duration::from_secs(10));
        assert_eq!(finished, Ok(true), "poll {poll:?}: the pass did not end");
        assert!(g.backend.inner.queue_errors.load(Ordering::Relaxed) >= 1);
        assert!(g.take_used(0).is_empty());
        // The driver mends its index: requests are served again.
        g.mem.write_obj(0u16, idx_addr).unwrap();
        let want = pattern(4);
        g.engine.write(8 * 512, &want).unwrap();
        let (head, s) = g.publish_good_read(0, 8);
        g.run(0);
        assert_eq!(
            g.take_used(0),
            vec![(u32::from(head), 4097)],
            "poll {poll:?}"
        );
        assert!(g.read_data(&s, 4096) == want);
    }
}

/// A new descriptor of `fd` as a `File`, the form the vring's kick and call
/// setters take; `fd` stays usable to signal or read the counter.
fn eventfd_file(fd: &vmm_sys_util::eventfd::EventFd) -> std::fs::File {
    let dup = std::os::fd::IntoRawFd::into_raw_fd(fd.try_clone().unwrap());
    // SAFETY: `dup` is a new descriptor that nothing else owns or closes.
    unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(dup) }
}

/// Makes `head` available on queue `q` of `mem`, as a driver does: the ring
/// entry first, then the index (so another thread may publish this way
/// while the device pops).
fn publish_in(mem: &GuestMem, q: usize, head: u16) {
    let idx_addr = GuestAddress(avail_ring(q) + 2);
    let idx: u16 = mem.read_obj(idx_addr).unwrap();
    let entry = avail_ring(q) + 4 + 2 * u64::from(idx % QSIZE);
    mem.write_obj(head, GuestAddress(entry)).unwrap();
    std::sync::atomic::fence(Ordering::Release);
    mem.write_obj(idx.wrapping_add(1), idx_addr).unwrap();
}

/// A worker shared by several queues pops at most a ring's worth of chains
/// from one queue per pass, even while the driver keeps publishing, then
/// yields: it signals the queue's own kick eventfd so that its epoll loop
/// comes back to the queue after the other queues' pending events.
///
/// A publisher thread republishes each chain as soon as it is used; the
/// chains are malformed (a short header), so each completes within the pass
/// and the driver can always publish more. Without the yield the pass would
/// run for as long as the publisher keeps up and never signal the kick.
#[test]
fn a_shared_worker_yields_after_a_ring_of_chains() {
    use std::sync::atomic::AtomicBool;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let source: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(DISK));
    let cache: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20));
    let mut cfg = test_config(2, QSIZE, limits(), Duration::ZERO);
    cfg.queue_threads = 1;
    let g = Guest::configured(cfg, source, cache);
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    g.vrings[0].set_kick(Some(eventfd_file(&kick)));
    let s = Guest::slot(0, 0);
    // An 8-byte header: the request is refused as malformed at once.
    let head = g.chain(0, 0, &[(s.hdr, 8, 0), (s.status, 1, W)]);
    for _ in 0..QSIZE {
        g.publish(0, head);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (mem, stop2) = (g.mem.clone(), Arc::clone(&stop));
    let publisher = std::thread::spawn(move || {
        let avail_idx = GuestAddress(avail_ring(0) + 2);
        let used_idx = GuestAddress(used_ring(0) + 2);
        // Bounded, so that a worker that never yields still ends its pass.
        let mut published = 0u32;
        while !stop2.load(Ordering::Relaxed) && published < 1_000_000 {
            let used: u16 = mem.read_obj(used_idx).unwrap();
            let idx: u16 = mem.read_obj(avail_idx).unwrap();
            // Keep a ring's worth published ahead of the device.
            if idx.wrapping_sub(used) < QSIZE {
                publish_in(&mem, 0, head);
                published += 1;
            } else {
                std::hint::spin_loop();
            }
        }
    });
    let vrings = vec![g.vrings[0].clone(), g.vrings[1].clone()];
    let mut yielded = false;
    // A pass yields only if the publisher runs alongside it; on a busy
    // machine that may take many passes.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        g.backend.handle_event(0, EventSet::IN, &vrings, 0).unwrap();
        if kick.read().is_ok() {
            yielded = true;
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    publisher.join().unwrap();
    assert!(yielded, "the shared worker never yielded its queue");
    assert_eq!(g.backend.inner.inflight[0].count(), 0);
}

/// A request still in flight when its queue is stopped (a source that hangs
/// past the drain timeout of GET_VRING_BASE) completes after the queue has
/// started again. Its late completion must not be posted, nor taken for the
/// new request that reuses its ring position, and it must leave the
/// in-flight count. Before the window's epoch, it put its own head on the
/// restarted used ring while the new request was still running.
#[test]
fn a_request_outliving_the_drain_timeout_is_not_posted_after_a_restart() {
    use crate::device::{GateDevice, GateOp};
    let source = Arc::new(GateDevice::new(MemDevice::new(DISK)));
    let cache = Arc::new(GateDevice::new(MemDevice::new(1 << 20)));
    let mut cfg = test_config(1, QSIZE, limits(), Duration::ZERO);
    cfg.drain_timeout = Duration::from_millis(200);
    let mut g = Guest::configured(cfg, source.clone(), cache.clone());
    let want = pattern(7);
    g.engine.write(8 * 512, &want).unwrap();

    // A miss, held at the source.
    source.close(GateOp::Read);
    let (stale, _) = g.publish_good_read(0, 64);
    g.backend.process_queue(0, &g.vrings[0]).unwrap();
    assert!(source.wait_held(GateOp::Read, 1, Duration::from_secs(5)));

    // GET_VRING_BASE gives up on it after the drain timeout.
    g.vrings[0].set_queue_ready(false);
    g.backend.stop_vring(0).unwrap();
    assert_eq!(g.backend.inner.inflight[0].count(), 1);

    // The driver resets the queue and starts it again from index 0.
    for at in [avail_ring(0) + 2, used_ring(0) + 2] {
        g.mem.write_obj(0u16, GuestAddress(at)).unwrap();
    }
    g.used_seen[0] = 0;
    g.vrings[0].set_queue_next_avail(0);
    g.vrings[0].set_queue_next_used(0);
    g.vrings[0].set_queue_ready(true);

    // A hit at the same position 0, held at the cache.
    cache.close(GateOp::Read);
    let s = Guest::slot(0, 2);
    g.reset_status(&s);
    g.header(s.hdr, VIRTIO_BLK_T_IN, 8);
    let new = g.chain(
        0,
        12,
        &[(s.hdr, 16, 0), (s.data, 4096, W), (s.status, 1, W)],
    );
    g.publish(0, new);
    g.backend.process_queue(0, &g.vrings[0]).unwrap();
    assert!(cache.wait_held(GateOp::Read, 1, Duration::from_secs(5)));

    // The old request completes: nothing is posted, and it leaves the count.
    source.open(GateOp::Read);
    assert!(
        wait_until(Duration::from_secs(5), || g.backend.inner.inflight[0]
            .count()
            == 1),
        "the late completion did not leave the in-flight count"
    );
    assert_eq!(
        g.take_used(0),
        vec![],
        "the completion of request {stale}, from before the restart, posted request {new} before it was done"
    );

    cache.open(GateOp::Read);
    assert!(g.backend.drain(Duration::from_secs(5)), "drain");
    assert_eq!(g.take_used(0), vec![(u32::from(new), 4097)]);
    assert_eq!(g.status(s.status), OK);
    assert!(g.read_data(&s, 4096) == want);
}

/// The first pass after a queue is stopped (GET_VRING_BASE) and started
/// again signals the driver once even with nothing new to post, so that a
/// driver that missed a notification around the pause sees its used ring;
/// later passes with nothing to post do not signal.
#[test]
fn the_first_pass_after_a_restart_signals_the_driver_once() {
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let g = Guest::new(1, limits());
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    g.vrings[0].set_call(Some(eventfd_file(&call)));
    // A pass with nothing published: no signal.
    g.backend.process_queue(0, &g.vrings[0]).unwrap();
    assert!(
        call.read().is_err(),
        "a pass with nothing to post signalled"
    );
    // Stop and start again where it was (a VM pause and resume).
    g.vrings[0].set_queue_ready(false);
    g.backend.stop_vring(0).unwrap();
    g.vrings[0].set_queue_ready(true);
    g.backend.process_queue(0, &g.vrings[0]).unwrap();
    assert_eq!(call.read().ok(), Some(1), "no signal after the restart");
    g.backend.process_queue(0, &g.vrings[0]).unwrap();
    assert!(call.read().is_err(), "a second pass signalled again");
}
