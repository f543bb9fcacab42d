//! The io_uring hit path ([`super::super::uring`]) through the real queue
//! path, with a file as the cache device, buffered and with O_DIRECT.

use super::*;
use crate::device::{FileDevice, LatencyDevice, LatencyProfile, OpenOptions};
use crate::virtio::filemap::FileMap;
use std::sync::mpsc;

/// A guest with one queue whose cache is a 4 MiB file; the source holds
/// `pattern(9)` at sector 64. `None` if the filesystem refuses O_DIRECT.
pub(super) fn file_guest(direct: bool) -> Option<(Guest, tempfile::TempDir)> {
    file_guest_in(tempfile::tempdir().unwrap(), direct)
}

/// As `file_guest`, with the cache file in `dir`.
fn file_guest_in(dir: tempfile::TempDir, direct: bool) -> Option<(Guest, tempfile::TempDir)> {
    file_guest_polled(dir, direct, Duration::ZERO)
}

/// A new 4 MiB cache file `cache.img` in `dir`, opened with or without
/// O_DIRECT.
pub(super) fn cache_file(
    dir: &tempfile::TempDir,
    direct: bool,
) -> Result<FileDevice, crate::device::DeviceError> {
    let path = dir.path().join("cache.img");
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

/// As `file_guest_in`, with the queue busy-polled for `poll` after a pass.
pub(super) fn file_guest_polled(
    dir: tempfile::TempDir,
    direct: bool,
    poll: Duration,
) -> Option<(Guest, tempfile::TempDir)> {
    let cache = match cache_file(&dir, direct) {
        Ok(d) => d,
        Err(e) if direct => {
            eprintln!("skipping the O_DIRECT case: {e}");
            return None;
        }
        Err(e) => panic!("{e}"),
    };
    let source = MemDevice::new(DISK);
    source.write_at(&pattern(9), 64 * 512).unwrap();
    let g = Guest::polled(1, limits(), Arc::new(source), Arc::new(cache), poll);
    Some((g, dir))
}

pub(super) fn direct_requests(g: &Guest) -> u64 {
    g.engine.stats().direct_requests
}

/// Publishes a request of type `t` at `sector` whose data is `segs`, using
/// slot 0 and descriptors from 0.
pub(super) fn publish(g: &Guest, t: u32, sector: u64, segs: &[(u64, u32)]) -> Slot {
    let s = Guest::slot(0, 0);
    g.reset_status(&s);
    g.header(s.hdr, t, sector);
    let flags = if t == VIRTIO_BLK_T_IN { W } else { 0 };
    let mut descs = vec![(s.hdr, 16, 0)];
    descs.extend(segs.iter().map(|&(a, l)| (a, l, flags)));
    descs.push((s.status, 1, W));
    let head = g.chain(0, 0, &descs);
    g.publish(0, head);
    s
}

#[test]
fn hits_are_read_and_written_in_place() {
    for direct in [false, true] {
        let Some((mut g, _dir)) = file_guest(direct) else {
            continue;
        };
        let first = pattern(1);
        g.engine.write(8 * 512, &first).unwrap();

        // A read hit: served by io_uring into the guest buffer.
        let (head, r) = g.publish_good_read(0, 8);
        g.run(0);
        assert_eq!(g.take_used(0), vec![(u32::from(head), 4097)]);
        assert_eq!(g.status(r.status), OK);
        assert!(g.read_data(&r, 4096) == first, "direct={direct}");
        assert_eq!(direct_requests(&g), 1, "direct={direct}");

        // A write hit in write-back mode, from two 2 KiB guest buffers.
        let second = pattern(2);
        let s = Guest::slot(0, 0);
        g.mem.write_slice(&second, GuestAddress(s.data)).unwrap();
        publish(
            &g,
            VIRTIO_BLK_T_OUT,
            8,
            &[(s.data, 2048), (s.data + 2048, 2048)],
        );
        g.run(0);
        assert_eq!(g.take_used(0), vec![(0, 1)]);
        assert_eq!(g.status(s.status), OK);
        assert_eq!(direct_requests(&g), 2, "direct={direct}");
        let mut back = vec![0u8; 4096];
        g.engine.read(8 * 512, &mut back).unwrap();
        assert!(back == second, "direct={direct}: the write did not land");

        // A miss is declined by the ring and served by the pool.
        let (head, r) = g.publish_good_read(0, 64);
        g.run(0);
        assert_eq!(g.take_used(0), vec![(u32::from(head), 4097)]);
        assert!(g.read_data(&r, 4096) == pattern(9), "direct={direct}");
        assert_eq!(direct_requests(&g), 2, "direct={direct}");
    }
}

#[test]
fn a_read_across_several_cached_blocks_is_one_request() {
    let Some((mut g, _dir)) = file_guest(false) else {
        unreachable!("buffered files always open")
    };
    let want: Vec<u8> = (0..4).flat_map(|i| pattern(20 + i)).collect();
    g.engine.write(32 * 512, &want).unwrap();
    let s = Guest::slot(0, 0);
    g.mem
        .write_slice(&vec![0u8; want.len()], GuestAddress(s.data))
        .unwrap();
    // Segment boundaries that do not match block boundaries.
    publish(
        &g,
        VIRTIO_BLK_T_IN,
        32,
        &[(s.data, 6144), (s.data + 6144, 10240)],
    );
    g.run(0);
    assert_eq!(g.take_used(0), vec![(0, 16385)]);
    assert_eq!(g.status(s.status), OK);
    assert!(g.read_data(&s, want.len()) == want);
    assert_eq!(direct_requests(&g), 1);
}

#[test]
fn unaligned_buffers_go_to_the_pool_with_o_direct() {
    let Some((mut g, _dir)) = file_guest(true) else {
        return;
    };
    let want = pattern(4);
    g.engine.write(8 * 512, &want).unwrap();
    let s = Guest::slot(0, 0);
    // 8 bytes off a 512-byte boundary: O_DIRECT cannot use it in place.
    publish(&g, VIRTIO_BLK_T_IN, 8, &[(s.data + 8, 4096)]);
    g.run(0);
    assert_eq!(g.take_used(0), vec![(0, 4097)]);
    assert_eq!(g.status(s.status), OK);
    let mut got = vec![0u8; 4096];
    g.mem
        .read_slice(&mut got, GuestAddress(s.data + 8))
        .unwrap();
    assert_eq!(
        direct_requests(&g),
        0,
        "an unaligned buffer was used in place"
    );
    assert!(got == want, "{:?} {:?}", &got[..16], &want[..16]);
}

#[test]
fn republished_heads_on_the_ring_are_bounded_and_complete() {
    // As inflight_requests_per_queue_are_bounded_by_the_ring_size, but the
    // requests are io_uring hits: the queue thread must reap its own
    // completions while it waits, or it would wait forever.
    let Some((g, dir)) = file_guest(false) else {
        unreachable!("buffered files always open")
    };
    republish_full_rings(g, dir);
}

#[test]
fn republished_heads_with_a_cache_in_memory_complete() {
    // The same with the synchronous (tmpfs) path: its completions wait in
    // the ring's ready list, which the in-flight bound must post too (this
    // hung before; found in review).
    let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
        eprintln!("skipping: no /dev/shm");
        return;
    };
    let (g, dir) = file_guest_in(dir, false).unwrap();
    republish_full_rings(g, dir);
}

/// Publishes the same cached 4 KiB read head two full rings' worth of times
/// and checks that every copy completes (a watchdog aborts on a hang).
fn republish_full_rings(mut g: Guest, _dir: tempfile::TempDir) {
    let want = pattern(6);
    g.engine.write(0, &want).unwrap();
    let (head, s) = read_chain(&g);
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(Duration::from_secs(60)).is_err() {
            eprintln!("queue processing hung with io_uring requests in flight");
            std::process::abort();
        }
    });
    for _ in 0..2 {
        for _ in 0..QSIZE {
            g.publish(0, head);
        }
        g.backend.process_queue(0, &g.vrings[0]).unwrap();
    }
    assert!(g.backend.drain(Duration::from_secs(10)));
    done_tx.send(()).unwrap();
    watchdog.join().unwrap();
    assert_reads_served(&mut g, head, &s, &want, 2 * QSIZE, "two rings");
    assert_eq!(direct_requests(&g), 2 * u64::from(QSIZE));
}

#[test]
fn a_cache_in_memory_is_served_on_the_queue_thread() {
    // tmpfs: no O_DIRECT, and io_uring would punt its reads to kernel
    // workers; the ring does them synchronously instead.
    let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
        eprintln!("skipping: no /dev/shm");
        return;
    };
    let probe = dir.path().join("probe");
    std::fs::File::create(&probe).unwrap();
    let memory = FileDevice::open(
        &probe,
        OpenOptions {
            direct: false,
            read_only: true,
            exclusive: false,
        },
    )
    .unwrap()
    .is_memory();
    assert!(memory, "/dev/shm is not recognised as memory-backed");
    let (mut g, _dir) = file_guest_in(dir, false).unwrap();
    let first = pattern(7);
    g.engine.write(8 * 512, &first).unwrap();
    let (head, r) = g.publish_good_read(0, 8);
    // No run(): completions of inline requests are posted by process_queue
    // itself, with nothing left in flight.
    g.backend.process_queue(0, &g.vrings[0]).unwrap();
    assert_eq!(g.take_used(0), vec![(u32::from(head), 4097)]);
    assert!(g.read_data(&r, 4096) == first);
    assert_eq!(direct_requests(&g), 1);
    assert!(
        g.backend.lock_ring(0).is_some_and(|r| r.mapped()),
        "the memory-backed cache file is not mapped"
    );
    // A write hit (write-back) from two guest buffers is copied into the
    // mapping and reads back through the engine's own (pread) path.
    let second = pattern(8);
    let s = Guest::slot(0, 0);
    g.mem.write_slice(&second, GuestAddress(s.data)).unwrap();
    publish(
        &g,
        VIRTIO_BLK_T_OUT,
        8,
        &[(s.data, 1024), (s.data + 1024, 3072)],
    );
    g.backend.process_queue(0, &g.vrings[0]).unwrap();
    assert_eq!(g.take_used(0), vec![(0, 1)]);
    assert_eq!(g.status(s.status), OK);
    assert_eq!(direct_requests(&g), 2);
    let mut back = vec![0u8; 4096];
    g.engine.read(8 * 512, &mut back).unwrap();
    assert!(back == second, "the mapped write did not land");
}

/// A cache file copied onto tmpfs sparsely has holes where blocks were all
/// zeros. Mapped as is, a hit on such a block would fault in a page, and on
/// a full tmpfs that fault is SIGBUS, which ends the daemon. The backend
/// allocates every hole under a valid frame before it maps the file (and
/// nothing else), and the block still reads back.
#[test]
fn holes_under_cached_blocks_are_filled_before_the_cache_is_mapped() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
        eprintln!("skipping: no /dev/shm");
        return;
    };
    let path = dir.path().join("cache.img");
    let (mut g, dir) = file_guest_in(dir, false).unwrap();
    g.engine.write(8 * 512, &[0u8; 4096]).unwrap();
    g.engine.write(64 * 512, &pattern(3)).unwrap();
    let frames = g.engine.valid_frame_ranges();
    let blocks: u64 = frames.iter().map(|&(_, l)| l).sum();
    assert_eq!(blocks, 2 * 4096, "{frames:?}");
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    // What a sparse copy makes of the all-zero block: a hole.
    let zero_frame = {
        let io = g.engine.begin_direct_read(8 * 512, 4096).unwrap();
        io.extents()[0].dev_offset
    };
    // SAFETY: punching a hole in a file this test owns.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            zero_frame as libc::off_t,
            4096,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    let allocated = || file.metadata().unwrap().blocks() * 512;
    let before = allocated();
    // A new connection's backend (the same engine) maps the file.
    let cfg = test_config(1, QSIZE, limits(), Duration::ZERO);
    let pool = IoPool::new(1, 16).unwrap();
    let backend = BlkBackend::new(Arc::clone(&g.engine), cfg, pool.handle());
    assert!(backend.lock_ring(0).is_some_and(|r| r.mapped()));
    assert_eq!(
        allocated(),
        before + 4096,
        "the hole was not filled (or more was)"
    );
    // Both blocks read back through the mapping of the first backend. (This
    // part would pass without the fill too: this tmpfs is not full.)
    for (sector, want) in [(8, vec![0u8; 4096]), (64, pattern(3))] {
        let (head, r) = g.publish_good_read(0, sector);
        g.backend.process_queue(0, &g.vrings[0]).unwrap();
        assert_eq!(g.take_used(0), vec![(u32::from(head), 4097)]);
        assert!(g.read_data(&r, 4096) == want, "sector {sector}");
    }
    drop(backend);
    drop(dir);
}

/// A request over three cache ranges, one inside the mapping of a
/// memory-backed cache and two past its end: the second (block 2, in the
/// first frame) is a memory copy, the first and third fall back to
/// `preadv`/`pwritev`, and the request is served on the queue thread all the
/// same (no failure, no retry through the pool).
#[test]
fn a_request_partly_outside_the_mapping_is_served_by_both_paths() {
    let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
        eprintln!("skipping: no /dev/shm");
        return;
    };
    let (mut g, _dir) = file_guest_in(dir, false).unwrap();
    // Blocks 2, 1, 3 cached in that order take three frames in a row, so a
    // read of blocks 1..=3 needs three ranges, out of device order.
    let blocks: Vec<Vec<u8>> = (0..3u8).map(|i| pattern(30 + i)).collect();
    for b in [1usize, 0, 2] {
        g.engine.write(4096 * (b as u64 + 1), &blocks[b]).unwrap();
    }
    let frames = g.engine.valid_frame_ranges();
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0].1, 3 * 4096, "{frames:?}");
    // Only the first of the three frames is mapped.
    let fd = g.engine.cache_raw_access().unwrap().fd;
    let end = usize::try_from(frames[0].0 + 4096).unwrap();
    let map = FileMap::first(fd, end).unwrap();
    g.backend.lock_ring(0).unwrap().set_map(Some(Arc::new(map)));
    let before = g.engine.stats();
    let backend = g.backend.clone();
    let copies = || backend.lock_ring(0).unwrap().mapped_copies();
    assert_eq!(copies(), 0);
    let s = Guest::slot(0, 0);
    let s = publish(&g, VIRTIO_BLK_T_IN, 8, &[(s.data, 3 * 4096)]);
    g.backend.process_queue(0, &g.vrings[0]).unwrap();
    assert_eq!(g.take_used(0), vec![(0, 3 * 4096 + 1)]);
    assert_eq!(g.status(s.status), OK);
    assert!(g.read_data(&s, 3 * 4096) == blocks.concat(), "read data");
    assert_eq!(copies(), 1, "one range through the mapping");
    // A write hit of the three blocks, read back through the engine.
    let second: Vec<u8> = (0..3u8).flat_map(|i| pattern(40 + i)).collect();
    g.mem.write_slice(&second, GuestAddress(s.data)).unwrap();
    let s = publish(&g, VIRTIO_BLK_T_OUT, 8, &[(s.data, 3 * 4096)]);
    g.backend.process_queue(0, &g.vrings[0]).unwrap();
    assert_eq!(g.take_used(0), vec![(0, 1)]);
    assert_eq!(g.status(s.status), OK);
    let mut back = vec![0u8; 3 * 4096];
    g.engine.read(8 * 512, &mut back).unwrap();
    assert!(back == second, "written data");
    assert_eq!(copies(), 2, "one range through the mapping");
    let after = g.engine.stats();
    assert_eq!(after.direct_requests - before.direct_requests, 2);
    assert_eq!(after.direct_ops - before.direct_ops, 6, "three ranges each");
    assert_eq!(after.errors, before.errors, "no request failed over");
}

/// Coverage: a write hit from ONE guest buffer goes through opcode::Write
/// (the other write tests use two buffers, which is WRITEV). On tmpfs the
/// ring is bypassed (a copy through the mapping), so this covers
/// opcode::Write only when the temp dir is a disk filesystem.
#[test]
fn a_one_buffer_write_hit_goes_through_the_ring() {
    for direct in [false, true] {
        let Some((mut g, _dir)) = file_guest(direct) else {
            continue;
        };
        g.engine.write(8 * 512, &pattern(1)).unwrap();
        let want = pattern(3);
        let s = Guest::slot(0, 0);
        g.mem.write_slice(&want, GuestAddress(s.data)).unwrap();
        publish(&g, VIRTIO_BLK_T_OUT, 8, &[(s.data, 4096)]);
        g.run(0);
        assert_eq!(g.take_used(0), vec![(0, 1)], "direct={direct}");
        assert_eq!(g.status(s.status), OK, "direct={direct}");
        assert_eq!(direct_requests(&g), 1, "direct={direct}: not a ring hit");
        let mut back = vec![0u8; 4096];
        g.engine.read(8 * 512, &mut back).unwrap();
        assert!(back == want, "direct={direct}: the write did not land");
    }
}

/// Three queues on two worker threads (`queue_threads` 2): thread 0 serves
/// queues 0 and 2, thread 1 queue 1. The library names a thread's events by
/// the queue's place among that thread's queues: kick `i` and io_uring
/// completion `ring_event(i)`. Each must reach its own queue (its ring, its
/// in-flight count, its used ring), and leave the thread's other queue alone.
#[test]
fn queues_sharing_a_thread_are_told_apart_by_their_events() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_file(&dir, false).unwrap();
    // Misses take 300 ms, so one stays in flight long enough to be seen.
    let slow = LatencyProfile {
        read: Duration::from_millis(300),
        ..LatencyProfile::default()
    };
    let source = LatencyDevice::new(MemDevice::new(DISK), slow);
    let mut cfg = test_config(3, QSIZE, limits(), Duration::ZERO);
    cfg.queue_threads = 2;
    let mut g = Guest::configured(cfg, Arc::new(source), Arc::new(cache));
    assert_eq!(g.backend.queues_per_thread(), vec![0b101, 0b010]);
    let threads: [Vec<Vring>; 2] = [
        vec![g.vrings[0].clone(), g.vrings[2].clone()],
        vec![g.vrings[1].clone()],
    ];
    let inflight =
        |g: &Guest| -> Vec<usize> { g.backend.inner.inflight.iter().map(|f| f.count()).collect() };

    // A miss kicked on thread 0's second queue is queue 2's, and only its.
    let (head, _) = g.publish_good_read(2, 200);
    g.backend
        .handle_event(1, EventSet::IN, &threads[0], 0)
        .unwrap();
    assert_eq!(inflight(&g), vec![0, 0, 1]);
    let mut used = Vec::new();
    assert!(wait_until(Duration::from_secs(10), || {
        used.extend(g.take_used(2));
        !used.is_empty()
    }));
    assert_eq!(used, vec![(u32::from(head), 4097)]);
    assert_eq!(inflight(&g), vec![0, 0, 0]);

    // Hits published without a kick: the queue's completion event alone
    // serves it (a worker looks at the available ring after reaping); the
    // other queue's completion event on the same thread does not.
    // (thread, place among its queues, the other queue's place, queue)
    for (thread, local, other, q) in [
        (0usize, 1usize, Some(0usize), 2usize),
        (1, 0, None, 1),
        (0, 0, Some(1), 0),
    ] {
        let vrings = &threads[thread];
        let data = pattern(20 + q as u8);
        g.engine.write(8 * 512 * (q as u64 + 1), &data).unwrap();
        let (head, s) = g.publish_good_read(q, 8 * (q as u64 + 1));
        let backend = g.backend.clone();
        let event = |local: usize| u16::try_from(backend.ring_event(local)).unwrap();
        if let Some(o) = other {
            g.backend
                .handle_event(event(o), EventSet::IN, vrings, thread)
                .unwrap();
            assert!(
                g.take_used(q).is_empty(),
                "queue {q} served by another queue's event"
            );
            assert_eq!(
                inflight(&g),
                vec![0, 0, 0],
                "queue {q} popped by another queue's event"
            );
        }
        let mut used = Vec::new();
        assert!(
            wait_until(Duration::from_secs(10), || {
                g.backend
                    .handle_event(event(local), EventSet::IN, vrings, thread)
                    .unwrap();
                used.extend(g.take_used(q));
                !used.is_empty()
            }),
            "queue {q} was not served"
        );
        assert_eq!(used, vec![(u32::from(head), 4097)], "queue {q}");
        assert!(g.read_data(&s, 4096) == data, "queue {q}: data");
        for other in (0..3).filter(|&o| o != q) {
            assert!(
                g.take_used(other).is_empty(),
                "queue {other} after {q}'s event"
            );
        }
    }
    assert_eq!(
        g.engine.stats().direct_requests,
        3,
        "hits went through the rings"
    );
}

/// Two queues on one worker. While the worker waits for queue 0's
/// requests (its back-pressure wait in `serve`), it posts the io_uring
/// completions of queue 1 (`reap_siblings`): their frames stay pinned until
/// then, and queue 0's requests in the pool may be waiting for those pins.
#[test]
fn a_worker_waiting_on_one_queue_posts_its_other_queues_completions() {
    let dir = tempfile::tempdir().unwrap();
    // O_DIRECT: a hit stays on the ring for the device's latency.
    let cache = match cache_file(&dir, true) {
        Ok(d) if !d.is_memory() => d,
        // tmpfs (which takes O_DIRECT since Linux 6.6) serves hits inline.
        Ok(_) => {
            eprintln!("skipping: the temporary directory is memory-backed");
            return;
        }
        Err(e) => {
            eprintln!("skipping: {e}");
            return;
        }
    };
    // Misses take 300 ms: queue 0's pool requests keep the worker waiting.
    let slow = LatencyProfile {
        read: Duration::from_millis(300),
        ..LatencyProfile::default()
    };
    let source = LatencyDevice::new(MemDevice::new(DISK), slow);
    let mut cfg = test_config(2, QSIZE, limits(), Duration::ZERO);
    cfg.queue_threads = 1;
    let mut g = Guest::configured(cfg, Arc::new(source), Arc::new(cache));
    // A 48 KiB hit.
    const LEN: u32 = 48 << 10;
    let data: Vec<u8> = (0..12u8).flat_map(pattern).collect();
    g.engine.write(8 * 512, &data).unwrap();
    let vrings = vec![g.vrings[0].clone(), g.vrings[1].clone()];
    {
        let s = Guest::slot(1, 0);
        g.reset_status(&s);
        g.header(s.hdr, VIRTIO_BLK_T_IN, 8);
        let head = g.chain(1, 0, &[(s.hdr, 16, 0), (s.data, LEN, W), (s.status, 1, W)]);
        g.publish(1, head);
        // Queue 1's kick: its hit goes to its ring, and is still there after
        // the pass however fast the disk is (the disk here is sometimes fast
        // enough to finish it within the pass).
        g.backend.lock_ring(1).unwrap().set_unreaped(true);
        g.backend.handle_event(1, EventSet::IN, &vrings, 0).unwrap();
        g.backend.lock_ring(1).unwrap().set_unreaped(false);
        assert!(
            g.backend.lock_ring(1).unwrap().busy(),
            "the hit did not go to the ring"
        );
        assert!(g.take_used(1).is_empty());
        // Queue 0: a ring's worth of misses in flight (one chain published
        // QSIZE times), then one more published: the worker must wait.
        let miss = Guest::slot(0, 0);
        g.reset_status(&miss);
        g.header(miss.hdr, VIRTIO_BLK_T_IN, 400);
        let h0 = g.chain(
            0,
            0,
            &[(miss.hdr, 16, 0), (miss.data, 4096, W), (miss.status, 1, W)],
        );
        for _ in 0..QSIZE {
            g.publish(0, h0);
        }
        g.backend.handle_event(0, EventSet::IN, &vrings, 0).unwrap();
        assert_eq!(g.backend.inner.inflight[0].count(), usize::from(QSIZE));
        assert!(
            g.take_used(1).is_empty(),
            "queue 1 posted by queue 0's pass"
        );
        g.publish(0, h0);
        let (backend, worker_vrings) = (g.backend.clone(), vrings.clone());
        let worker = std::thread::spawn(move || {
            backend
                .handle_event(0, EventSet::IN, &worker_vrings, 0)
                .unwrap();
        });
        // No event of queue 1 is delivered: only the waiting worker can
        // post its completion.
        let mut used = Vec::new();
        assert!(
            wait_until(Duration::from_secs(5), || {
                used.extend(g.take_used(1));
                !used.is_empty()
            }),
            "queue 1's completion was not posted while the worker waited"
        );
        assert_eq!(used, vec![(u32::from(head), LEN + 1)]);
        assert!(g.read_data(&s, LEN as usize) == data);
        worker.join().unwrap();
        assert!(g.backend.drain(Duration::from_secs(30)), "drain");
        assert_eq!(g.take_used(0).len(), usize::from(QSIZE) + 1);
    }
}

/// A guest with `queues` queues over a disk-file cache (`direct`: with
/// O_DIRECT) whose backend registers guest memory if `pin`; `None` (after
/// saying why) if the filesystem refuses O_DIRECT or is memory-backed
/// (hits are then copies and register nothing).
fn pinnable_guest(queues: u16, direct: bool, pin: bool) -> Option<(Guest, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let cache = match cache_file(&dir, direct) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipping the O_DIRECT case: {e}");
            return None;
        }
    };
    let mut cfg = test_config(queues, QSIZE, limits(), Duration::ZERO);
    cfg.pin_guest_memory = pin;
    let g = Guest::configured(cfg, Arc::new(MemDevice::new(DISK)), Arc::new(cache));
    if g.backend.lock_ring(0).is_some_and(|r| r.mapped()) {
        eprintln!("skipping: the temp dir is memory-backed (hits are copies)");
        return None;
    }
    Some((g, dir))
}

/// With `pin_guest_memory`, hits use guest memory registered with the ring
/// (READ_FIXED / WRITE_FIXED, and READV_FIXED / WRITEV_FIXED for several
/// buffers where the kernel has them, Linux 6.15) and land the same bytes.
/// Without it, nothing is registered (the control case).
#[test]
fn pinned_guest_memory_serves_one_buffer_hits_as_fixed_buffers() {
    for direct in [false, true] {
        for pin in [false, true] {
            let Some((mut g, _dir)) = pinnable_guest(1, direct, pin) else {
                continue;
            };
            let case = format!("direct={direct} pin={pin}");
            let first = pattern(1);
            g.engine.write(8 * 512, &first).unwrap();
            g.engine.write(16 * 512, &first).unwrap();
            let (head, r) = g.publish_good_read(0, 8);
            g.run(0);
            assert_eq!(g.take_used(0), vec![(u32::from(head), 4097)], "{case}");
            assert!(g.read_data(&r, 4096) == first, "{case}");

            let second = pattern(2);
            let s = Guest::slot(0, 0);
            g.mem.write_slice(&second, GuestAddress(s.data)).unwrap();
            publish(&g, VIRTIO_BLK_T_OUT, 8, &[(s.data, 4096)]);
            g.run(0);
            assert_eq!(g.take_used(0), vec![(0, 1)], "{case}");
            let third = pattern(3);
            g.mem.write_slice(&third, GuestAddress(s.data)).unwrap();
            publish(
                &g,
                VIRTIO_BLK_T_OUT,
                16,
                &[(s.data, 2048), (s.data + 2048, 2048)],
            );
            g.run(0);
            assert_eq!(g.take_used(0), vec![(0, 1)], "{case}");
            // A read hit into two buffers.
            g.mem
                .write_slice(&[0u8; 4096], GuestAddress(s.data))
                .unwrap();
            publish(
                &g,
                VIRTIO_BLK_T_IN,
                8,
                &[(s.data, 1024), (s.data + 1024, 3072)],
            );
            g.run(0);
            assert_eq!(g.take_used(0), vec![(0, 4097)], "{case}");
            assert!(g.read_data(&s, 4096) == second, "{case}: two-buffer read");
            assert_eq!(direct_requests(&g), 4, "{case}: not all ring hits");
            let mut back = vec![0u8; 4096];
            g.engine.read(8 * 512, &mut back).unwrap();
            assert!(back == second, "{case}: the write did not land");
            g.engine.read(16 * 512, &mut back).unwrap();
            assert!(back == third, "{case}: the two-buffer write did not land");
            let (fixed, vectored) = g
                .backend
                .lock_ring(0)
                .map(|r| (r.fixed_ops(), r.vectored_fixed()))
                .unwrap();
            let want = match (pin, vectored) {
                (false, _) => 0,
                (true, false) => 2,
                (true, true) => 4,
            };
            assert_eq!(fixed, want, "{case} vectored={vectored}");
            if !pin {
                continue;
            }
            // Guest memory was registered once, when it was set up
            // (SET_MEM_TABLE), not by the hits. A new memory table (here:
            // the same regions in a new generation) is registered at once,
            // and the next hit uses it without registering again.
            let registered = |g: &Guest| g.backend.lock_ring(0).unwrap().fixed_registered();
            let generations = |g: &Guest| g.backend.lock_ring(0).unwrap().fixed_generations();
            assert!(registered(&g), "{case}");
            assert_eq!(generations(&g), 1, "{case}: registered by a hit");
            g.backend
                .update_memory(GuestMemoryAtomic::new(g.mem.clone()))
                .unwrap();
            assert!(registered(&g), "{case}");
            assert_eq!(
                generations(&g),
                2,
                "{case}: not registered at SET_MEM_TABLE"
            );
            g.mem
                .write_slice(&[0u8; 4096], GuestAddress(s.data))
                .unwrap();
            publish(&g, VIRTIO_BLK_T_IN, 16, &[(s.data, 4096)]);
            g.run(0);
            assert_eq!(g.take_used(0), vec![(0, 4097)], "{case}");
            assert!(
                g.read_data(&s, 4096) == third,
                "{case}: read after re-registering"
            );
            assert_eq!(generations(&g), 2, "{case}: registered again by the hit");
            let ring = g.backend.lock_ring(0).unwrap();
            assert_eq!(ring.fixed_ops(), want + 1, "{case}");
            drop(ring);
            assert_eq!(direct_requests(&g), 5, "{case}: not all ring hits");
            assert_eq!(
                g.engine.stats().errors,
                0,
                "{case}: a ring operation failed"
            );
        }
    }
}

/// With two queues, the second ring shares the first one's registration of
/// guest memory (Linux 6.12+: pinned and charged to memlock once) and its
/// hits use it.
#[test]
fn queues_share_one_registration_of_guest_memory() {
    let Some((mut g, _dir)) = pinnable_guest(2, false, true) else {
        return;
    };
    let ring = |g: &Guest, q: usize| {
        let r = g.backend.lock_ring(q).unwrap();
        (
            r.fixed_registered(),
            r.fixed_generations(),
            r.fixed_shared(),
        )
    };
    assert_eq!(ring(&g, 0), (true, 1, 0), "queue 0 registers");
    // IORING_REGISTER_CLONE_BUFFERS is in Linux 6.12.
    let shares = crate::virtio::fixed::tests::kernel_at_least(6, 12);
    assert_eq!(ring(&g, 1), (true, 1, u64::from(shares)), "queue 1");
    let want = pattern(4);
    g.engine.write(8 * 512, &want).unwrap();
    let (head, r) = g.publish_good_read(1, 8);
    g.run(1);
    assert_eq!(g.take_used(1), vec![(u32::from(head), 4097)]);
    assert!(g.read_data(&r, 4096) == want);
    assert_eq!(g.backend.lock_ring(1).unwrap().fixed_ops(), 1);
    assert_eq!(g.engine.stats().errors, 0, "a ring operation failed");
}

/// A pass that queues more operations than the ring's submit batch hands
/// them to the kernel a batch at a time, not all at the end of the pass,
/// and every request still completes with the right data.
#[test]
fn a_large_pass_is_submitted_in_batches() {
    for (batch, want_submits) in [(4, 4), (usize::MAX, 1)] {
        let Some((mut g, _dir)) = file_guest(false) else {
            unreachable!("buffered files always open")
        };
        assert!(
            !g.backend.lock_ring(0).unwrap().mapped(),
            "the cache file must not be memory-backed here"
        );
        let want = pattern(6);
        g.engine.write(0, &want).unwrap();
        g.backend.lock_ring(0).unwrap().set_submit_batch(batch);
        let (head, s) = publish_ring_of_reads(&g);
        g.run(0);
        assert_reads_served(&mut g, head, &s, &want, QSIZE, &format!("batch {batch}"));
        assert_eq!(direct_requests(&g), u64::from(QSIZE), "batch {batch}");
        let submits = g.backend.lock_ring(0).unwrap().submits();
        assert_eq!(submits, want_submits, "batch {batch}");
    }
}

/// A pass posts the completions it already has every `post_batch` popped
/// requests, signalling the driver each time, instead of once at its end:
/// the driver can answer while the pass goes on. With a memory-backed cache
/// (tmpfs) every hit is done when it starts, so the count is exact.
#[test]
fn a_pass_posts_what_is_done_every_post_batch() {
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    for (batch, want_signals) in [(4, 4), (usize::MAX, 1)] {
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
            eprintln!("skipping: no /dev/shm");
            return;
        };
        let (mut g, _dir) = file_guest_in(dir, false).unwrap();
        assert!(g.backend.lock_ring(0).unwrap().mapped(), "tmpfs cache");
        let want = pattern(8);
        g.engine.write(0, &want).unwrap();
        g.backend.lock_ring(0).unwrap().set_post_batch(batch);
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        g.vrings[0].set_call(Some(eventfd_file(&call)));
        let (head, s) = publish_ring_of_reads(&g);
        g.backend.process_queue(0, &g.vrings[0]).unwrap();
        // The eventfd's counter is the number of signals.
        assert_eq!(call.read().unwrap(), want_signals, "batch {batch}");
        assert_reads_served(&mut g, head, &s, &want, QSIZE, &format!("batch {batch}"));
    }
}

/// Writes a 4 KiB read of sector 0 into slot 0 of queue 0 (descriptors
/// 0..3), not yet published; `assert_reads_served` checks its completions.
fn read_chain(g: &Guest) -> (u16, Slot) {
    let s = Guest::slot(0, 0);
    g.header(s.hdr, VIRTIO_BLK_T_IN, 0);
    let head = g.chain(0, 0, &[(s.hdr, 16, 0), (s.data, 4096, W), (s.status, 1, W)]);
    (head, s)
}

/// Publishes the read of [`read_chain`] a ring's worth of times.
fn publish_ring_of_reads(g: &Guest) -> (u16, Slot) {
    let (head, s) = read_chain(g);
    for _ in 0..QSIZE {
        g.publish(0, head);
    }
    (head, s)
}

/// Checks that exactly `n` used entries arrived on queue 0, each `head`
/// with 4096 bytes of data and the status byte, and that slot `s` holds
/// `want`.
fn assert_reads_served(g: &mut Guest, head: u16, s: &Slot, want: &[u8], n: u16, ctx: &str) {
    let used = g.take_used(0);
    assert_eq!(used.len(), usize::from(n), "{ctx}");
    assert!(
        used.iter()
            .all(|&(id, len)| id == u32::from(head) && len == 4097),
        "{ctx}"
    );
    assert!(g.read_data(s, 4096) == want, "{ctx}");
}

/// With at least `kickless_depth` operations in flight on the ring, a pass
/// ends with the driver's kicks left off (EVENT_IDX: `avail_event` is not
/// written), and the completion that comes next runs a pass that serves
/// what the driver published meanwhile, without a kick. Once nothing is in
/// flight, the pass re-arms kicks. With the depth out of reach, every pass
/// re-arms, as before.
#[test]
fn a_deep_ring_leaves_kicks_off_until_its_next_completion() {
    const UNWRITTEN: u16 = 0xabcd;
    for depth in [1, usize::MAX] {
        let Some((mut g, _dir)) = file_guest(false) else {
            unreachable!("buffered files always open")
        };
        g.backend.set_event_idx(true);
        g.vrings[0].set_queue_event_idx(true);
        let want = pattern(5);
        g.engine.write(0, &want).unwrap();
        let avail_event = GuestAddress(used_ring(0) + 4 + 8 * u64::from(QSIZE));
        g.mem.write_obj(UNWRITTEN, avail_event).unwrap();
        let ring_fd = {
            let mut r = g.backend.lock_ring(0).unwrap();
            r.set_kickless_depth(depth);
            // A slow operation in flight, as on a deep queue.
            r.hold_for(Duration::from_millis(300));
            r.event_fd()
        };
        let (head, s) = read_chain(&g);
        g.publish(0, head);
        g.backend.process_queue(0, &g.vrings[0]).unwrap();
        let after_first: u16 = g.mem.read_obj(avail_event).unwrap();
        let want_first = if depth == 1 { UNWRITTEN } else { 1 };
        assert_eq!(
            after_first, want_first,
            "depth {depth}: avail_event after the first pass"
        );
        // The driver publishes a second read; with kicks off it does not
        // kick. The worker runs on its ring's completion events only, as
        // its epoll loop would.
        g.publish(0, head);
        let turn = || {
            let mut p = libc::pollfd {
                fd: ring_fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the duration of the call.
            if unsafe { libc::poll(&mut p, 1, 100) } == 1 {
                let mut counter = 0u64;
                // SAFETY: reads 8 bytes into `counter` (clears the eventfd).
                unsafe { libc::read(ring_fd, (&mut counter as *mut u64).cast(), 8) };
                g.backend.process_ring(0, &g.vrings[0]).unwrap();
            }
        };
        let served = wait_until(Duration::from_secs(5), || {
            turn();
            g.mem
                .read_obj::<u16>(GuestAddress(used_ring(0) + 2))
                .unwrap()
                == 2
        });
        assert!(
            served,
            "depth {depth}: the read published while kicks were off was not served"
        );
        // The held operation completes later; that event ends the last pass.
        let idle = wait_until(Duration::from_secs(5), || {
            turn();
            !g.backend.lock_ring(0).unwrap().busy()
        });
        assert!(idle, "depth {depth}: the held operation never completed");
        assert_reads_served(&mut g, head, &s, &want, 2, &format!("depth {depth}"));
        let after_last: u16 = g.mem.read_obj(avail_event).unwrap();
        assert_eq!(
            after_last, 2,
            "depth {depth}: kicks not re-armed once the ring was idle"
        );
    }
}
