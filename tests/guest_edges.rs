//! Hostile-guest edge cases driven through the public backend API
//! (`VhostUserBackend::handle_event`, the I/O pool, the used ring), with
//! guest memory laid out by hand: buffers straddling or running out of
//! memory regions, discard flags, zero-length ranges, GET_ID into short
//! buffers, head indexes outside the queue, indirect tables, a memory table
//! replaced under requests in flight, descriptors shared by header, data and
//! status, and a used ring at the end of memory.

use std::sync::Arc;
use std::time::{Duration, Instant};
use vblkcache::device::{
    BlockDevice, DeviceError, FileDevice, LatencyDevice, LatencyProfile, MemDevice, OpenOptions,
};
use vblkcache::engine::{Engine, EngineConfig, WriteMode};
use vblkcache::virtio::backend::{GuestMem, Vring};
use vblkcache::virtio::pool::IoPool;
use vblkcache::virtio::{BlkBackend, BlkBackendConfig, DeviceLimits};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;

const QSIZE: u16 = 16;
const DISK: u64 = 1 << 20;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const W: u16 = VRING_DESC_F_WRITE as u16;
const IND: u16 = VRING_DESC_F_INDIRECT as u16;
const UNTOUCHED: u8 = 0xee;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

const DESC: u64 = 0x0;
const AVAIL: u64 = DESC + 16 * QSIZE as u64;
const USED: u64 = 0x200;

type D = (u64, u32, u16);

struct Guest {
    mem: GuestMem,
    backend: BlkBackend,
    vring: Vring,
    engine: Arc<Engine>,
    used_seen: u16,
    _pool: IoPool,
    _dir: Option<tempfile::TempDir>,
}

fn pattern(seed: u8, n: usize) -> Vec<u8> {
    (0..n as u32)
        .map(|i| {
            (i as u8)
                .wrapping_mul(31)
                .wrapping_add(seed)
                .wrapping_add((i >> 8) as u8)
        })
        .collect()
}

fn limits() -> DeviceLimits {
    DeviceLimits::new(DISK, 4096, false)
}

fn cfg(limits: DeviceLimits) -> BlkBackendConfig {
    BlkBackendConfig {
        num_queues: 1,
        queue_size: QSIZE,
        limits,
        serial: "review-serial-0123456789".into(),
        io_uring: true,
        poll: Duration::ZERO,
        queue_threads: 1,
        pin_guest_memory: false,
        // The daemon's default: large hits are staged.
        bounce_min: Some(vblkcache::virtio::DEFAULT_BOUNCE_MIN),
        unordered: false,
        drain_timeout: Duration::from_secs(60),
    }
}

/// A source whose reads take 200 ms: a miss stays in flight that long.
fn slow_source() -> Arc<dyn BlockDevice> {
    let slow = LatencyProfile {
        read: Duration::from_millis(200),
        ..LatencyProfile::default()
    };
    Arc::new(LatencyDevice::new(MemDevice::new(DISK), slow))
}

/// A 4 MiB cache file in `dir`, opened with or without O_DIRECT.
fn cache_file(dir: &std::path::Path, direct: bool) -> Result<FileDevice, DeviceError> {
    let path = dir.join("cache.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    FileDevice::open(
        &path,
        OpenOptions {
            direct,
            read_only: false,
            exclusive: false,
        },
    )
}

impl Guest {
    fn build(
        regions: &[(u64, usize)],
        limits: DeviceLimits,
        source: Arc<dyn BlockDevice>,
        cache: Arc<dyn BlockDevice>,
        dir: Option<tempfile::TempDir>,
    ) -> Guest {
        let ranges: Vec<(GuestAddress, usize)> =
            regions.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
        let mem = GuestMem::from_ranges(&ranges).unwrap();
        let ecfg = EngineConfig::with_block_size(4096, Some(WriteMode::Writeback));
        let engine = Arc::new(Engine::open(source, cache, ecfg).unwrap());
        let pool = IoPool::new(2, 64).unwrap();
        let backend = BlkBackend::new(Arc::clone(&engine), cfg(limits), pool.handle());
        let atomic = GuestMemoryAtomic::new(mem.clone());
        backend.update_memory(atomic.clone()).unwrap();
        let vring = Vring::new(atomic, QSIZE).unwrap();
        vring.set_queue_size(QSIZE);
        vring.set_queue_info(DESC, AVAIL, USED).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        Guest {
            mem,
            backend,
            vring,
            engine,
            used_seen: 0,
            _pool: pool,
            _dir: dir,
        }
    }

    /// Memory-only devices: every request goes through the I/O pool.
    fn mem_only(regions: &[(u64, usize)]) -> Guest {
        Guest::build(
            regions,
            limits(),
            Arc::new(MemDevice::new(DISK)),
            Arc::new(MemDevice::new(1 << 20)),
            None,
        )
    }

    /// A cache file on a disk filesystem: hits go through io_uring.
    fn file_cache(regions: &[(u64, usize)], direct: bool) -> Option<Guest> {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let cache = match cache_file(dir.path(), direct) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("skipping: {e}");
                return None;
            }
        };
        Some(Guest::build(
            regions,
            limits(),
            Arc::new(MemDevice::new(DISK)),
            Arc::new(cache),
            Some(dir),
        ))
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

    fn put(&self, table: u64, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = Descriptor::new(addr, len, flags, next);
        self.mem
            .write_obj(d, GuestAddress(table + 16 * u64::from(idx)))
            .unwrap();
    }

    fn chain(&self, first: u16, descs: &[D]) -> u16 {
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let idx = first + i as u16;
            let last = i + 1 == descs.len();
            let flags = if last { *flags } else { *flags | NEXT };
            self.put(DESC, idx, *addr, *len, flags, idx + 1);
        }
        first
    }

    fn publish(&self, head: u16) {
        let idx_addr = GuestAddress(AVAIL + 2);
        let idx: u16 = self.mem.read_obj(idx_addr).unwrap();
        let entry = AVAIL + 4 + 2 * u64::from(idx % QSIZE);
        self.mem.write_obj(head, GuestAddress(entry)).unwrap();
        self.mem.write_obj(idx.wrapping_add(1), idx_addr).unwrap();
    }

    /// One kick, as the worker's epoll loop would deliver it, then a drain.
    fn run(&self) -> bool {
        self.backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0)
            .unwrap();
        self.backend.drain(Duration::from_secs(5))
    }

    fn take_used(&mut self) -> Vec<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = USED + 4 + 8 * u64::from(self.used_seen % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    fn byte(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    fn set(&self, at: u64, v: u8) {
        self.mem.write_obj(v, GuestAddress(at)).unwrap();
    }

    fn bytes(&self, at: u64, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }

    /// A good 4 KiB read of `sector` with descriptors 8..11, buffers at 0x8000.
    fn good_read(&self, sector: u64) -> (u16, u64, u64) {
        let (hdr, data, status) = (0x8000, 0x9000, 0x8100);
        self.set(status, UNTOUCHED);
        self.mem
            .write_slice(&[0u8; 4096], GuestAddress(data))
            .unwrap();
        self.header(hdr, VIRTIO_BLK_T_IN, sector);
        let head = self.chain(8, &[(hdr, 16, 0), (data, 4096, W), (status, 1, W)]);
        self.publish(head);
        (head, data, status)
    }
}

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

const R1: u64 = 0x10_0000;

/// Two adjacent regions (separate host mappings) [0, 1M) and [1M, 2M).
fn two_regions() -> Vec<(u64, usize)> {
    vec![(0, R1 as usize), (R1, R1 as usize)]
}

/// A write and a read whose single data descriptor straddles the boundary
/// of two guest memory regions, through the path `g` uses.
fn straddle_roundtrip(mut g: Guest, name: &str) {
    let want = pattern(7, 4096);
    // Write from a buffer straddling the boundary.
    let (hdr, status) = (0x4000, 0x4100);
    let wbuf = R1 - 2048;
    g.mem.write_slice(&want, GuestAddress(wbuf)).unwrap();
    g.set(status, UNTOUCHED);
    g.header(hdr, VIRTIO_BLK_T_OUT, 16);
    let head = g.chain(0, &[(hdr, 16, 0), (wbuf, 4096, 0), (status, 1, W)]);
    g.publish(head);
    assert!(g.run(), "{name}: drain");
    assert_eq!(
        g.take_used(),
        vec![(u32::from(head), 1)],
        "{name}: write used"
    );
    assert_eq!(g.byte(status), OK, "{name}: write status");
    let mut got = vec![0u8; 4096];
    g.engine.read(16 * 512, &mut got).unwrap();
    assert!(got == want, "{name}: disk holds what the guest wrote");
    // Read into a buffer straddling the boundary, with guard bytes around.
    let rbuf = R1 - 512;
    g.mem
        .write_slice(&[0x5a; 8192], GuestAddress(rbuf - 2048))
        .unwrap();
    g.set(status, UNTOUCHED);
    g.header(hdr, VIRTIO_BLK_T_IN, 16);
    let head = g.chain(0, &[(hdr, 16, 0), (rbuf, 4096, W), (status, 1, W)]);
    g.publish(head);
    let before = g.engine.stats().direct_requests;
    assert!(g.run(), "{name}: drain");
    assert_eq!(
        g.take_used(),
        vec![(u32::from(head), 4097)],
        "{name}: read used"
    );
    assert_eq!(g.byte(status), OK, "{name}: read status");
    assert!(
        g.bytes(rbuf, 4096) == want,
        "{name}: data read across regions"
    );
    assert!(
        g.bytes(rbuf - 2048, 2048).iter().all(|&b| b == 0x5a),
        "{name}: guard before"
    );
    assert!(
        g.bytes(rbuf + 4096, 2048).iter().all(|&b| b == 0x5a),
        "{name}: guard after"
    );
    eprintln!(
        "{name}: direct requests for the read: {}",
        g.engine.stats().direct_requests - before
    );
}

#[test]
fn straddling_two_regions_through_the_pool() {
    straddle_roundtrip(Guest::mem_only(&two_regions()), "pool");
}

#[test]
fn straddling_two_regions_through_io_uring() {
    if let Some(g) = Guest::file_cache(&two_regions(), false) {
        straddle_roundtrip(g, "io_uring buffered");
    }
}

#[test]
fn straddling_two_regions_through_io_uring_o_direct() {
    if let Some(g) = Guest::file_cache(&two_regions(), true) {
        straddle_roundtrip(g, "io_uring O_DIRECT");
    }
}

/// A data descriptor that starts in one region and runs into a hole
/// between regions: IOERR, nothing written, queue keeps serving.
#[test]
fn a_buffer_running_into_a_hole_between_regions_fails() {
    // [0, 1M) and [1M + 64K, 2M): a 64 KiB hole.
    let mut g = Guest::mem_only(&[(0, R1 as usize), (R1 + 0x1_0000, 0xf_0000)]);
    let want = pattern(3, 4096);
    g.engine.write(8 * 512, &want).unwrap();
    for t in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
        let (hdr, status) = (0x4000, 0x4100);
        g.set(status, UNTOUCHED);
        g.header(hdr, t, 8);
        let f = if t == VIRTIO_BLK_T_IN { W } else { 0 };
        let head = g.chain(0, &[(hdr, 16, 0), (R1 - 2048, 4096, f), (status, 1, W)]);
        g.publish(head);
        let (gh, gdata, gstatus) = g.good_read(8);
        assert!(g.run());
        let mut used = g.take_used();
        used.sort();
        assert_eq!(
            used,
            vec![(u32::from(head), 1), (u32::from(gh), 4097)],
            "type {t}"
        );
        assert_eq!(g.byte(status), IOERR, "type {t}");
        assert_eq!(g.byte(gstatus), OK);
        assert!(g.bytes(gdata, 4096) == want);
    }
    let mut got = vec![0u8; 4096];
    g.engine.read(8 * 512, &mut got).unwrap();
    assert!(got == want, "disk unchanged");
}

/// Discard and write-zeroes segments with flags: virtio 1.1+ §5.2.6.2 says
/// the device MUST answer UNSUPP for a discard with the unmap flag set and
/// for any unknown flag.
#[test]
fn discard_with_unmap_or_unknown_flags_is_unsupp() {
    let mut g = Guest::mem_only(&two_regions());
    let mut seen = Vec::new();
    for (t, flags) in [
        (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
        (VIRTIO_BLK_T_DISCARD, 0x8000_0000),
        (VIRTIO_BLK_T_WRITE_ZEROES, 0x2),
    ] {
        let (hdr, seg, status) = (0x4000, 0x4200, 0x4100);
        g.set(status, UNTOUCHED);
        g.header(hdr, t, 0);
        g.segment(seg, 8, 8, flags);
        let head = g.chain(0, &[(hdr, 16, 0), (seg, 16, 0), (status, 1, W)]);
        g.publish(head);
        assert!(g.run());
        assert_eq!(g.take_used(), vec![(u32::from(head), 1)]);
        seen.push((t, flags, g.byte(status)));
    }
    eprintln!("(type, flags, status): {seen:?}");
    for (t, flags, st) in seen {
        assert_eq!(
            st, UNSUPP,
            "type {t} flags {flags:#x}: status {st}, spec says UNSUPP"
        );
    }
}

/// Zero-sector discard / write-zeroes segments, including one at the very
/// end of the disk: they must complete (with some status) and the queue
/// must keep serving.
#[test]
fn zero_sector_ranges_complete_and_the_queue_keeps_serving() {
    let mut g = Guest::mem_only(&two_regions());
    let want = pattern(5, 4096);
    g.engine.write(8 * 512, &want).unwrap();
    let cap = DISK / 512;
    for (t, sector) in [
        (VIRTIO_BLK_T_DISCARD, 0),
        (VIRTIO_BLK_T_DISCARD, cap),
        (VIRTIO_BLK_T_WRITE_ZEROES, cap),
        (VIRTIO_BLK_T_WRITE_ZEROES, 3),
        (VIRTIO_BLK_T_DISCARD, cap + 1),
    ] {
        let (hdr, seg, status) = (0x4000, 0x4200, 0x4100);
        g.set(status, UNTOUCHED);
        g.header(hdr, t, 0);
        g.segment(seg, sector, 0, 0);
        let head = g.chain(0, &[(hdr, 16, 0), (seg, 16, 0), (status, 1, W)]);
        g.publish(head);
        let (gh, gdata, gstatus) = g.good_read(8);
        assert!(g.run(), "type {t} sector {sector}: drain");
        let mut used = g.take_used();
        used.sort();
        eprintln!("type {t} sector {sector}: status {}", g.byte(status));
        assert_eq!(used, vec![(u32::from(head), 1), (u32::from(gh), 4097)]);
        assert_eq!(g.byte(gstatus), OK);
        assert!(g.bytes(gdata, 4096) == want);
        if sector > cap {
            assert_eq!(g.byte(status), IOERR, "sector {sector} past the end");
        }
    }
}

/// GET_ID into buffers shorter than 20 bytes, split over descriptors and
/// over the region boundary: exactly the buffer is written.
#[test]
fn get_id_into_short_and_split_buffers() {
    let mut g = Guest::mem_only(&two_regions());
    let (hdr, status) = (0x4000, 0x4100);
    // 5 bytes, then 3 + 4 bytes in two descriptors straddling regions.
    for segs in [vec![(0x6000u64, 5u32)], vec![(R1 - 3, 3), (R1 + 0x100, 4)]] {
        for &(a, l) in &segs {
            g.mem
                .write_slice(&vec![0xcc; l as usize + 8], GuestAddress(a))
                .unwrap();
        }
        g.set(status, UNTOUCHED);
        g.header(hdr, VIRTIO_BLK_T_GET_ID, 0);
        let mut descs = vec![(hdr, 16, 0)];
        descs.extend(segs.iter().map(|&(a, l)| (a, l, W)));
        descs.push((status, 1, W));
        let head = g.chain(0, &descs);
        g.publish(head);
        assert!(g.run());
        let total: u32 = segs.iter().map(|s| s.1).sum();
        assert_eq!(g.take_used(), vec![(u32::from(head), total + 1)]);
        assert_eq!(g.byte(status), OK);
        let mut got = Vec::new();
        for &(a, l) in &segs {
            got.extend(g.bytes(a, l as usize));
            assert!(
                g.bytes(a + u64::from(l), 8).iter().all(|&b| b == 0xcc),
                "wrote past {a:#x}+{l}"
            );
        }
        assert_eq!(&got[..], &b"review-serial-012345"[..total as usize]);
    }
}

/// A head index outside the queue published in the available ring: it is
/// dropped (nothing can be put on the used ring for it), but nothing stays
/// counted in flight and the queue keeps serving.
#[test]
fn a_head_index_outside_the_queue_does_not_wedge_it() {
    let mut g = Guest::mem_only(&two_regions());
    let want = pattern(2, 4096);
    g.engine.write(8 * 512, &want).unwrap();
    for bad in [QSIZE, 0xffff] {
        g.publish(bad);
        let (gh, gdata, gstatus) = g.good_read(8);
        assert!(g.run(), "head {bad}: something stays in flight");
        assert_eq!(g.take_used(), vec![(u32::from(gh), 4097)], "head {bad}");
        assert_eq!(g.byte(gstatus), OK);
        assert!(g.bytes(gdata, 4096) == want);
    }
}

/// Indirect descriptor variants: a zero-length table after a header, an
/// indirect descriptor that also has NEXT set (the rest of the direct chain
/// must be ignored or refused, never served from both), and an indirect
/// table whose length is not a multiple of 16.
#[test]
fn indirect_variants_never_wedge_the_queue() {
    let mut g = Guest::mem_only(&two_regions());
    let want = pattern(4, 4096);
    g.engine.write(8 * 512, &want).unwrap();
    let (hdr, data, status, table) = (0x4000u64, 0x5000u64, 0x4100u64, 0x7000u64);
    type Build = fn(&Guest, u64, u64, u64, u64) -> u16;
    let cases: Vec<(&str, Build)> = vec![
        (
            "zero-length indirect table after the header",
            |g, hdr, _d, _s, table| {
                g.put(DESC, 0, hdr, 16, NEXT, 1);
                g.put(DESC, 1, table, 0, IND, 0);
                0
            },
        ),
        (
            "zero-length indirect table as head",
            |g, _h, _d, _s, table| {
                g.put(DESC, 0, table, 0, IND, 0);
                0
            },
        ),
        (
            "indirect with NEXT, direct status after it",
            |g, hdr, data, status, table| {
                g.put(table, 0, hdr, 16, NEXT, 1);
                g.put(table, 1, data, 4096, W, 0);
                g.put(DESC, 0, table, 32, IND | NEXT, 1);
                g.put(DESC, 1, status, 1, W, 0);
                0
            },
        ),
        ("indirect table of 8 bytes", |g, hdr, _d, _s, table| {
            g.put(table, 0, hdr, 16, 0, 0);
            g.put(DESC, 0, table, 8, IND, 0);
            0
        }),
        (
            "indirect table outside guest memory",
            |g, _h, _d, _s, _t| {
                g.put(DESC, 0, 0x4000_0000, 48, IND, 0);
                0
            },
        ),
        (
            "indirect table straddling the end of guest memory",
            |g, _h, _d, _s, _t| {
                g.put(DESC, 0, 2 * R1 - 16, 48, IND, 0);
                0
            },
        ),
    ];
    for (name, build) in cases {
        g.set(status, UNTOUCHED);
        g.header(hdr, VIRTIO_BLK_T_IN, 8);
        let head = build(&g, hdr, data, status, table);
        g.publish(head);
        let (gh, gdata, gstatus) = g.good_read(8);
        assert!(g.run(), "{name}: drain");
        let mut used = g.take_used();
        used.sort();
        eprintln!("{name}: used {used:?}, status byte {:#x}", g.byte(status));
        assert_eq!(used.len(), 2, "{name}");
        assert!(used.contains(&(u32::from(gh), 4097)), "{name}");
        assert_eq!(g.byte(gstatus), OK, "{name}");
        assert!(g.bytes(gdata, 4096) == want, "{name}");
    }
}

/// The memory table is replaced (the region holding the request's buffers
/// removed) while requests are in flight, on the pool (slow miss) and on
/// io_uring (hit): they complete into the mapping they were read through,
/// nothing crashes, and the queue serves again with the new table.
#[test]
fn memory_table_replaced_while_requests_are_in_flight() {
    // Pool: a 200 ms source read.
    let source = slow_source();
    let want = pattern(8, 4096);
    source.write_at(&want, 32 * 512).unwrap();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cache = cache_file(dir.path(), false).unwrap();
    let mut g = Guest::build(&two_regions(), limits(), source, Arc::new(cache), Some(dir));
    // Block 8 cached (a hit for io_uring), block 32 not (a slow miss).
    let hit = pattern(9, 4096);
    g.engine.write(8 * 4096, &hit).unwrap();
    let (hdr1, st1, data1) = (R1 + 0x1000, R1 + 0x1100, R1 + 0x2000);
    let (hdr2, st2, data2) = (R1 + 0x3000, R1 + 0x3100, R1 + 0x4000);
    g.set(st1, UNTOUCHED);
    g.set(st2, UNTOUCHED);
    g.header(hdr1, VIRTIO_BLK_T_IN, 32);
    g.header(hdr2, VIRTIO_BLK_T_IN, 64);
    let h1 = g.chain(0, &[(hdr1, 16, 0), (data1, 4096, W), (st1, 1, W)]);
    let h2 = g.chain(3, &[(hdr2, 16, 0), (data2, 4096, W), (st2, 1, W)]);
    g.publish(h1);
    g.publish(h2);
    g.backend
        .handle_event(0, EventSet::IN, std::slice::from_ref(&g.vring), 0)
        .unwrap();
    // New table: only the first region (the rings), a fresh mapping.
    let low = GuestMem::from_ranges(&[(GuestAddress(0), R1 as usize)]).unwrap();
    low.write_slice(&g.bytes(0, 0x1000), GuestAddress(0))
        .unwrap();
    let atomic = GuestMemoryAtomic::new(low.clone());
    g.backend.update_memory(atomic.clone()).unwrap();
    assert!(g.backend.drain(Duration::from_secs(5)), "drain");
    // Completions went to the old mapping's used ring (g.mem).
    let mut used = g.take_used();
    used.sort();
    assert_eq!(used, vec![(u32::from(h1), 4097), (u32::from(h2), 4097)]);
    assert_eq!(g.byte(st1), OK);
    assert!(g.bytes(data1, 4096) == want);
    assert!(g.bytes(data2, 4096) == hit);
    drop(low);
}

/// VIRTIO_F_VERSION_1 implies any descriptor layout (virtio 1.x §2.7.4,
/// "Message Framing": the device MUST NOT make assumptions about the
/// arrangement of descriptors). A header sharing a descriptor with the
/// data, or the status byte sharing one with the data, is a valid request.
#[test]
fn requests_with_merged_descriptors_are_served() {
    let mut g = Guest::mem_only(&two_regions());
    let want = pattern(6, 4096);
    g.engine.write(8 * 512, &want).unwrap();
    let mut results = Vec::new();
    // Read: data and status in one writable descriptor of 4097 bytes.
    let (hdr, buf) = (0x4000u64, 0x5000u64);
    g.mem.write_slice(&[0u8; 4097], GuestAddress(buf)).unwrap();
    g.set(buf + 4096, UNTOUCHED);
    g.header(hdr, VIRTIO_BLK_T_IN, 8);
    let head = g.chain(0, &[(hdr, 16, 0), (buf, 4097, W)]);
    g.publish(head);
    assert!(g.run());
    results.push((
        "read: data+status in one descriptor",
        g.take_used(),
        g.byte(buf + 4096),
        g.bytes(buf, 4096) == want,
    ));
    // Write: header and data in one readable descriptor of 16 + 4096 bytes.
    let out = pattern(11, 4096);
    let (st,) = (0x4100u64,);
    g.header(0x6000, VIRTIO_BLK_T_OUT, 24);
    g.mem.write_slice(&out, GuestAddress(0x6010)).unwrap();
    g.set(st, UNTOUCHED);
    let head = g.chain(0, &[(0x6000, 16 + 4096, 0), (st, 1, W)]);
    g.publish(head);
    assert!(g.run());
    let mut disk = vec![0u8; 4096];
    g.engine.read(24 * 512, &mut disk).unwrap();
    results.push((
        "write: header+data in one descriptor",
        g.take_used(),
        g.byte(st),
        disk == out,
    ));
    for r in &results {
        eprintln!("{}: used {:?} status {:#x} data ok {}", r.0, r.1, r.2, r.3);
    }
    for (name, _, status, data_ok) in results {
        assert_eq!(status, OK, "{name}");
        assert!(data_ok, "{name}");
    }
}

/// EVENT_IDX with a used ring whose trailing `avail_event` field lies just
/// past the end of guest memory (the ring entries themselves are inside).
/// Re-arming kicks fails, and the pass ends with that error, but a hit it
/// served synchronously (cache on tmpfs) is still posted: nothing else would
/// signal it before the connection closes.
#[test]
fn a_failed_rearm_still_posts_an_inline_hit() {
    // Control first (used ring well inside memory), then the edge layout.
    for edge in [false, true] {
        rearm_case(edge);
    }
}

fn rearm_case(edge: bool) {
    let dir = match tempfile::tempdir_in("/dev/shm") {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipping: {e}");
            return;
        }
    };
    let cache = cache_file(dir.path(), false).unwrap();
    let g = Guest::build(
        &two_regions(),
        limits(),
        Arc::new(MemDevice::new(DISK)),
        Arc::new(cache),
        Some(dir),
    );
    let used = if edge {
        2 * R1 - (4 + 8 * u64::from(QSIZE))
    } else {
        0x200
    };
    g.vring.set_queue_info(DESC, AVAIL, used).unwrap();
    g.vring.set_queue_event_idx(true);
    g.backend.set_event_idx(true);
    let want = pattern(12, 4096);
    g.engine.write(8 * 4096, &want).unwrap();
    let (hdr, data, status) = (0x4000, 0x5000, 0x4100);
    g.set(status, UNTOUCHED);
    g.header(hdr, VIRTIO_BLK_T_IN, 64);
    let head = g.chain(0, &[(hdr, 16, 0), (data, 4096, W), (status, 1, W)]);
    g.publish(head);
    g.backend
        .handle_event(0, EventSet::IN, std::slice::from_ref(&g.vring), 0)
        .unwrap();
    let used_idx = || g.mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap();
    let posted = wait_until(Duration::from_secs(2), || used_idx() == 1);
    eprintln!(
        "edge {edge}: after the kick: used idx {} status {:#x} (posted within 2 s: {posted})",
        used_idx(),
        g.byte(status)
    );
    assert!(g.backend.drain(Duration::from_secs(5)));
    eprintln!(
        "edge {edge}: after drain: used idx {} status {:#x}",
        used_idx(),
        g.byte(status)
    );
    assert!(
        posted,
        "edge {edge}: the served hit was not posted to the used ring"
    );
}

/// A stop (`quiesce`, what SIGTERM does before it closes the connection)
/// completes and posts every request the backend took, while the front-end
/// is still there, and takes no more: the used index then covers every
/// request taken, which is where a reconnecting front-end restarts.
#[test]
fn quiesce_completes_what_was_taken_and_takes_no_more() {
    let source = slow_source();
    let want = pattern(3, 4096);
    source.write_at(&want, 16 * 512).unwrap();
    let mut g = Guest::build(
        &two_regions(),
        limits(),
        source,
        Arc::new(MemDevice::new(1 << 20)),
        None,
    );
    let (head, data, status) = g.good_read(16);
    g.backend
        .handle_event(0, EventSet::IN, std::slice::from_ref(&g.vring), 0)
        .unwrap();
    assert!(g.take_used().is_empty(), "the slow miss is still in flight");
    let t = Instant::now();
    assert!(g.backend.quiesce(Duration::from_secs(5)));
    assert!(
        t.elapsed() >= Duration::from_millis(100),
        "returned before the miss"
    );
    assert_eq!(g.take_used(), vec![(u32::from(head), 4097)]);
    assert_eq!(g.byte(status), OK);
    assert!(g.bytes(data, 4096) == want);
    // A request published after the stop is left for the next daemon.
    let (_, _, status2) = g.good_read(24);
    g.backend
        .handle_event(0, EventSet::IN, std::slice::from_ref(&g.vring), 0)
        .unwrap();
    assert!(g.backend.quiesce(Duration::from_secs(5)));
    assert!(
        g.take_used().is_empty(),
        "a request was taken after the stop"
    );
    assert_eq!(g.byte(status2), UNTOUCHED);
}
