//! Large cache hits staged in huge-page pieces (`bounce`), through the real
//! queue path with a file as the cache device.

use super::uring_tests::{cache_file, direct_requests, publish};
use super::*;
use std::os::fd::AsRawFd;

/// Guest memory used for the large requests' data, clear of the rings and
/// slots (which end below 3 MiB).
const DATA: u64 = 4 << 20;

/// `n` bytes that differ in every 4 KiB block, so a misplaced piece shows.
fn big_pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31) ^ ((i >> 12) as u8).wrapping_add(seed))
        .collect()
}

/// A one-queue guest whose cache is a file (with or without O_DIRECT) and
/// whose ring stages hits of `bounce_min` bytes and more. `None` where the
/// case cannot run here.
fn staging_guest(direct: bool, bounce_min: Option<usize>) -> Option<(Guest, tempfile::TempDir)> {
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    staging_guest_in(direct, bounce_min, mem)
}

/// As `staging_guest`, with `mem` as guest memory.
fn staging_guest_in(
    direct: bool,
    bounce_min: Option<usize>,
    mem: GuestMem,
) -> Option<(Guest, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let cache = match cache_file(&dir, direct) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipping the O_DIRECT case: {e}");
            return None;
        }
    };
    let mut cfg = test_config(1, QSIZE, limits(), Duration::ZERO);
    cfg.bounce_min = bounce_min;
    let g = Guest::configured_in(cfg, Arc::new(MemDevice::new(DISK)), Arc::new(cache), mem);
    if g.backend.lock_ring(0).is_some_and(|r| r.mapped()) {
        eprintln!("skipping: the temp dir is memory-backed (hits are copies)");
        return None;
    }
    Some((g, dir))
}

/// The (guest address, length) segments of a request of `len` bytes split
/// into pieces of `seg` bytes laid out backwards in guest memory, so that
/// consecutive pieces of the request are not adjacent in the guest.
fn scattered(len: u64, seg: u64) -> Vec<(u64, u32)> {
    let n = len / seg;
    (0..n)
        .map(|i| (DATA + (n - 1 - i) * 2 * seg, seg as u32))
        .collect()
}

fn gather(g: &Guest, segs: &[(u64, u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(addr, len) in segs {
        let mut v = vec![0u8; len as usize];
        g.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        out.extend(v);
    }
    out
}

/// A 256 KiB read and a 128 KiB write-back write hit, each in scattered
/// guest buffers, land the same bytes with staging as without; with
/// staging both went through a piece, and a 4 KiB hit did not.
#[test]
fn large_hits_through_staging_buffers_land_the_same_bytes() {
    for direct in [false, true] {
        for bounce in [None, Some(64 << 10)] {
            let Some((mut g, _dir)) = staging_guest(direct, bounce) else {
                continue;
            };
            let case = format!("direct={direct} bounce={bounce:?}");
            let first = big_pattern(256 << 10, 1);
            g.engine.write(0, &first).unwrap();
            let segs = scattered(256 << 10, 64 << 10);
            for &(addr, len) in &segs {
                g.mem
                    .write_slice(&vec![0u8; len as usize], GuestAddress(addr))
                    .unwrap();
            }
            publish(&g, VIRTIO_BLK_T_IN, 0, &segs);
            g.run(0);
            assert_eq!(g.take_used(0), vec![(0, (256 << 10) + 1)], "{case}");
            assert!(gather(&g, &segs) == first, "{case}: the large read");

            // A write-back write hit of 128 KiB over blocks already cached.
            let second = big_pattern(128 << 10, 2);
            let wsegs = scattered(128 << 10, 32 << 10);
            let mut at = 0;
            for &(addr, len) in &wsegs {
                let piece = &second[at..at + len as usize];
                g.mem.write_slice(piece, GuestAddress(addr)).unwrap();
                at += len as usize;
            }
            publish(&g, VIRTIO_BLK_T_OUT, 64, &wsegs);
            g.run(0);
            assert_eq!(g.take_used(0), vec![(0, 1)], "{case}");
            let mut back = vec![0u8; 128 << 10];
            g.engine.read(64 * 512, &mut back).unwrap();
            assert!(back == second, "{case}: the large write did not land");

            // A 4 KiB hit uses guest memory in place.
            let (head, r) = g.publish_good_read(0, 8);
            g.run(0);
            assert_eq!(g.take_used(0), vec![(u32::from(head), 4097)], "{case}");
            assert!(g.read_data(&r, 4096) == first[4096..8192], "{case}");

            assert_eq!(direct_requests(&g), 3, "{case}: not all ring hits");
            let staged = g.engine.stats().staged_requests;
            let want = if bounce.is_some() { 2 } else { 0 };
            assert_eq!(staged, want, "{case}: staged requests");

            // The pieces go back to the pool: many more staged reads use
            // the pages already there (one per piece size so far).
            for _ in 0..40 {
                publish(&g, VIRTIO_BLK_T_IN, 0, &segs);
                g.run(0);
                assert_eq!(g.take_used(0), vec![(0, (256 << 10) + 1)], "{case}");
            }
            let mut now = first.clone();
            now[64 * 512..64 * 512 + second.len()].copy_from_slice(&second);
            assert!(gather(&g, &segs) == now, "{case}: the repeated reads");
            let pages = g.backend.lock_ring(0).unwrap().bounce_pages();
            let want = if bounce.is_some() { (42, 2) } else { (0, 0) };
            assert_eq!((g.engine.stats().staged_requests, pages), want, "{case}");
            assert_eq!(g.engine.stats().errors, 0, "{case}: an operation failed");
        }
    }
}

/// Guest RAM on hugetlbfs is contiguous in huge pages already, so a large
/// hit uses it in place rather than paying for a copy. Needs 4 free huge
/// pages (`vm.nr_hugepages`); skipped where there are none, since touching
/// an unbacked hugetlbfs mapping kills the process.
#[test]
fn large_hits_stay_in_place_when_guest_ram_is_on_hugetlbfs() {
    let want = (MEM_SIZE as u64).div_ceil(2 << 20);
    if crate::virtio::free_huge_pages() < want {
        eprintln!("skipping: fewer than {want} free 2 MiB huge pages (vm.nr_hugepages)");
        return;
    }
    // SAFETY: a valid C string and flags; the result is checked.
    let fd =
        unsafe { libc::memfd_create(c"vbc-guest".as_ptr(), libc::MFD_HUGETLB | libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(MEM_SIZE as u64).unwrap();
    // Take the huge pages now: touching a page that another process took
    // meanwhile would kill the test binary with SIGBUS.
    // SAFETY: `file` is an open descriptor; the range is its length.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, MEM_SIZE as libc::off_t) };
    if r != 0 {
        eprintln!(
            "skipping: cannot allocate huge pages: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    let region = (
        GuestAddress(0),
        MEM_SIZE,
        Some(vm_memory::FileOffset::new(file, 0)),
    );
    let mem = GuestMem::from_ranges_with_files([region]).unwrap();
    let Some((mut g, _dir)) = staging_guest_in(true, Some(64 << 10), mem) else {
        return;
    };
    let first = big_pattern(256 << 10, 3);
    g.engine.write(0, &first).unwrap();
    let segs = scattered(256 << 10, 64 << 10);
    publish(&g, VIRTIO_BLK_T_IN, 0, &segs);
    g.run(0);
    assert_eq!(g.take_used(0), vec![(0, (256 << 10) + 1)]);
    assert!(gather(&g, &segs) == first, "the large read");
    assert_eq!(direct_requests(&g), 1, "not a ring hit");
    assert_eq!(g.engine.stats().staged_requests, 0, "staged");
}
