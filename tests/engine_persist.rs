//! Persistence round trip, corruption detection and configuration errors.

use std::sync::Arc;
use vblkcache::device::{BlockDevice, MemDevice};
use vblkcache::engine::geometry::GeometryError;
use vblkcache::engine::{Engine, EngineConfig, EngineError, GeometryRequest, WriteMode};

fn cfg(bs: u32, blocks: Option<u64>, assoc: Option<u32>, mode: Option<WriteMode>) -> EngineConfig {
    EngineConfig {
        geometry: GeometryRequest {
            block_size: Some(bs),
            cache_blocks: blocks,
            assoc,
        },
        mode,
        ..EngineConfig::default()
    }
}

fn devices() -> (Arc<MemDevice>, Arc<MemDevice>) {
    let data: Vec<u8> = (0..(4u64 << 20)).map(|i| (i % 241) as u8).collect();
    (
        Arc::new(MemDevice::from_bytes(&data)),
        Arc::new(MemDevice::new(16 << 20)),
    )
}

fn open(src: &Arc<MemDevice>, cache: &Arc<MemDevice>, cfg: EngineConfig) -> Engine {
    Engine::open(src.clone(), cache.clone(), cfg).unwrap()
}

/// Opens with the default configuration (geometry from the superblock);
/// the error if refused.
fn reopen(src: &Arc<MemDevice>, cache: &Arc<MemDevice>) -> Result<Engine, EngineError> {
    Engine::open(src.clone(), cache.clone(), EngineConfig::default())
}

fn reopen_err(src: &Arc<MemDevice>, cache: &Arc<MemDevice>) -> EngineError {
    match reopen(src, cache) {
        Ok(_) => panic!("the open was expected to fail"),
        Err(e) => e,
    }
}

/// Fresh devices with a cache of 512 4K blocks in sets of 8 in `mode`
/// holding `data` at offset 0, shut down cleanly (dirty blocks kept).
fn closed_cache(mode: Option<WriteMode>, data: &[u8]) -> (Arc<MemDevice>, Arc<MemDevice>) {
    let (src, cache) = devices();
    let e = open(&src, &cache, cfg(4096, Some(512), Some(8), mode));
    e.write(0, data).unwrap();
    e.shutdown(false).unwrap();
    (src, cache)
}

#[test]
fn warm_cache_survives_clean_restart() {
    let (src, cache) = devices();
    // Fully associative, so nothing read here is evicted by a set conflict.
    let e = Engine::open(
        src.clone(),
        cache.clone(),
        cfg(4096, Some(512), Some(512), Some(WriteMode::Writeback)),
    )
    .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    e.read(0, &mut buf).unwrap(); // 256 blocks fetched
    e.write(2 << 20, &vec![0xAB; 64 * 1024]).unwrap(); // 16 dirty blocks
    let before = e.status();
    assert_eq!(before.dirty_blocks, 16);
    e.shutdown(false).unwrap();
    // Dirty data is only in the cache.
    let mut s = vec![0u8; 4096];
    src.read_at(&mut s, 2 << 20).unwrap();
    assert_ne!(s, vec![0xAB; 4096]);
    drop(e);

    // Reopen without giving a geometry: it comes from the superblock.
    let e = reopen(&src, &cache).unwrap();
    let st = e.status();
    assert_eq!(st.geometry, before.geometry);
    assert_eq!(st.mode, WriteMode::Writeback);
    assert!(st.start.clean && !st.start.formatted);
    assert_eq!(st.start.entries_loaded, before.valid_blocks);
    assert_eq!(st.start.dirty_loaded, 16);
    assert_eq!(st.dirty_blocks, 16);
    let mut again = vec![0u8; 1 << 20];
    e.read(0, &mut again).unwrap();
    assert_eq!(again, buf);
    let stats = e.stats();
    assert_eq!(stats.read_misses, 0, "warm blocks must hit after restart");
    assert_eq!(stats.read_hits, 256);
    let mut d = vec![0u8; 64 * 1024];
    e.read(2 << 20, &mut d).unwrap();
    assert!(d.iter().all(|&b| b == 0xAB));
    e.shutdown(true).unwrap();
    src.read_at(&mut s, 2 << 20).unwrap();
    assert_eq!(
        s,
        vec![0xAB; 4096],
        "shutdown with writeback writes dirty data to the source"
    );
}

#[test]
fn conflicting_geometry_is_refused_and_nothing_changes() {
    let (src, cache) = closed_cache(None, &[7u8; 4096]);
    let image = cache.to_vec();
    for (c, param) in [
        (cfg(8192, None, None, None), "block-size"),
        (cfg(4096, Some(256), None, None), "cache-blocks"),
        (cfg(4096, None, Some(16), None), "assoc"),
    ] {
        let err = Engine::open(src.clone(), cache.clone(), c).err().unwrap();
        assert!(
            matches!(err, EngineError::GeometryConflict { .. }) && err.is_config_error(),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains(param), "{msg}");
        assert!(
            cache.to_vec() == image,
            "a refused open changed the cache device"
        );
    }
    // A different source size means another source.
    let other = Arc::new(MemDevice::new(2 << 20));
    let err = Engine::open(other, cache.clone(), EngineConfig::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("belongs to a source of"), "{err}");
}

#[test]
fn geometry_errors_have_clear_messages() {
    let (src, cache) = devices();
    let cases: Vec<(EngineConfig, &str)> = vec![
        (
            cfg(3000, None, None, None),
            "block size 3000 is not a power of two",
        ),
        (
            cfg(2 << 20, None, None, None),
            "between 4096 (4K) and 1048576 (1M)",
        ),
        (
            cfg(4096, Some(64), Some(3), None),
            "associativity 3 is not a power of two",
        ),
        (
            cfg(4096, Some(64), Some(128), None),
            "associativity 128 is larger than the number of cache blocks (64)",
        ),
        (
            cfg(4096, Some(100), Some(8), None),
            "100 is not a multiple of the associativity 8",
        ),
        (cfg(4096, Some(0), None, None), "at least 1"),
        (
            cfg(65536, Some(1024), None, None),
            "but the device has 16777216 bytes",
        ),
    ];
    for (c, want) in cases {
        let err = Engine::open(src.clone(), cache.clone(), c).err().unwrap();
        assert!(err.is_config_error(), "{err}");
        assert!(err.to_string().contains(want), "'{err}' lacks '{want}'");
        assert!(
            cache.to_vec().iter().all(|&b| b == 0),
            "a refused open wrote to the cache"
        );
    }
    let tiny = Arc::new(MemDevice::new(64 << 10));
    let err = Engine::open(src, tiny, cfg(65536, None, None, None))
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            EngineError::Geometry(GeometryError::CacheTooSmall { .. })
        ),
        "{err}"
    );
}

#[test]
fn foreign_cache_device_needs_format() {
    let (src, _) = devices();
    let cache = Arc::new(MemDevice::from_bytes(&vec![0x55u8; 16 << 20]));
    let err = reopen_err(&src, &cache);
    assert!(matches!(err, EngineError::ForeignCache { .. }), "{err}");
    assert!(err.to_string().contains("--format"));
    assert!(cache.to_vec().iter().all(|&b| b == 0x55));
    // Data only deep inside the device (the first MiB is zeros) is found too.
    let mut img = vec![0u8; 16 << 20];
    img[(12 << 20)..(13 << 20)].fill(7);
    let deep = Arc::new(MemDevice::from_bytes(&img));
    let err = Engine::open(src.clone(), deep.clone(), EngineConfig::default())
        .err()
        .unwrap();
    assert!(matches!(err, EngineError::ForeignCache { .. }), "{err}");
    assert!(deep.to_vec() == img);
    let e = Engine::open(
        src,
        cache,
        EngineConfig {
            format: true,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    assert!(e.status().start.formatted);
}

/// `--format` refuses a cache that holds dirty blocks (after a clean
/// shutdown, and after a crash, where only the journal records them), names
/// the way out, and changes nothing; with `discard_dirty` it formats.
#[test]
fn format_refuses_a_cache_with_dirty_blocks() {
    let fmt = |discard_dirty: bool| EngineConfig {
        format: true,
        discard_dirty,
        ..EngineConfig::default()
    };
    for crash in [false, true] {
        let (src, cache) = devices();
        let e = open(
            &src,
            &cache,
            cfg(4096, Some(512), Some(8), Some(WriteMode::Writeback)),
        );
        e.write(0, &[0x3c; 8192]).unwrap();
        e.flush().unwrap();
        if crash {
            e.halt();
        } else {
            e.shutdown(false).unwrap();
        }
        drop(e);
        let before = cache.to_vec();
        let err = Engine::open(src.clone(), cache.clone(), fmt(false))
            .err()
            .unwrap();
        assert!(
            matches!(err, EngineError::FormatDirty { dirty: 2, .. }),
            "crash {crash}: {err}"
        );
        assert!(err.to_string().contains("--discard-dirty"), "{err}");
        assert!(
            cache.to_vec() == before,
            "crash {crash}: the cache was changed"
        );
        let e = Engine::open(src.clone(), cache.clone(), fmt(true)).unwrap();
        assert!(e.status().start.formatted && e.dirty_blocks() == 0);
        e.shutdown(false).unwrap();
    }
    // A cache without dirty blocks needs no second flag.
    let (src, cache) = closed_cache(Some(WriteMode::Writethrough), &[1u8; 4096]);
    let e = Engine::open(src, cache, fmt(false)).unwrap();
    assert!(e.status().start.formatted);
}

#[test]
fn corrupted_metadata_is_detected() {
    let (src, cache) = closed_cache(None, &[1u8; 8192]);
    let good = cache.to_vec();
    // Both superblock slots corrupted: refused, naming both.
    let mut img = good.clone();
    img[100] ^= 1;
    img[4096 + 100] ^= 1;
    cache.write_at(&img, 0).unwrap();
    let err = reopen_err(&src, &cache);
    assert!(
        err.to_string()
            .contains("both superblock copies are corrupted"),
        "{err}"
    );
    // One slot corrupted: the other copy is used.
    // One slot damaged: refused too, since the valid copy may be the older one.
    for slot in 0..2 {
        let mut img = good.clone();
        img[slot * 4096 + 200] ^= 1;
        cache.write_at(&img, 0).unwrap();
        let err = Engine::open(src.clone(), cache.clone(), EngineConfig::default())
            .err()
            .unwrap();
        assert!(
            err.to_string().contains(&format!("superblock slot {slot}")),
            "{err}"
        );
        assert!(err.to_string().contains("may be older"), "{err}");
    }
    // Bytes of the slot past the first sector are unused.
    let mut img = good.clone();
    img[3000] ^= 1;
    cache.write_at(&img, 0).unwrap();
    let e = reopen(&src, &cache).unwrap();
    assert_eq!(e.dirty_blocks(), 2);
    e.shutdown(false).unwrap();
    // Table page corrupted: refused with the page named.
    let mut img = good.clone();
    let (sb, _) = superblock(&MemDevice::from_bytes(&good));
    let table = sb.layout.table_copy_offset(sb.table_copy) as usize;
    img[table + 40] ^= 0x10;
    cache.write_at(&img, 0).unwrap();
    let err = reopen_err(&src, &cache);
    assert!(err.to_string().contains("mapping table page 0"), "{err}");
    assert!(err.to_string().contains("checksum"), "{err}");
}

#[test]
fn unclean_writeback_cache_recovers_flushed_dirty_blocks() {
    let (src, cache) = devices();
    let e = open(
        &src,
        &cache,
        cfg(4096, Some(512), Some(8), Some(WriteMode::Writeback)),
    );
    e.write(0, &[1u8; 8192]).unwrap();
    e.flush().unwrap();
    let mut b = vec![0u8; 8192];
    e.read(1 << 20, &mut b).unwrap(); // a clean block, dropped by recovery
    drop(e); // no shutdown: like a crash
    let e = reopen(&src, &cache).unwrap();
    let st = e.status().start;
    assert!(!st.clean);
    assert_eq!(st.dirty_recovered, 2);
    assert_eq!(st.commits_replayed, 1);
    assert_eq!(e.dirty_blocks(), 2);
    e.read(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 1));
    // Write-through caches hold no unique data: an unclean one starts cold.
    let (src, cache) = devices();
    let e = open(
        &src,
        &cache,
        cfg(4096, Some(512), Some(8), Some(WriteMode::Writethrough)),
    );
    e.read(0, &mut b).unwrap();
    drop(e);
    let e = Engine::open(src, cache, EngineConfig::default()).unwrap();
    assert!(!e.status().start.clean);
    assert_eq!(e.valid_blocks(), 0);
}

#[test]
fn passthrough_refuses_dirty_cache() {
    let (src, cache) = closed_cache(Some(WriteMode::Writeback), &[1u8; 8192]);
    let err = Engine::open(
        src.clone(),
        cache.clone(),
        EngineConfig {
            mode: Some(WriteMode::Passthrough),
            ..EngineConfig::default()
        },
    )
    .err()
    .unwrap();
    assert!(
        matches!(err, EngineError::PassthroughDirty { dirty: 2 }),
        "{err}"
    );
}

/// Rewrites the clean cache image on `cache` in format version 1: the same
/// entries, each moved to a free frame of the set version 1 maps its block
/// to, with its data at that frame's version 1 place; the data area is
/// otherwise zeros, so a read from a version 2 place would return zeros.
fn rewrite_as_version1(cache: &MemDevice) {
    use vblkcache::engine::meta::{self, Layout, BLOCK_MASK, ENTRIES_PER_PAGE, VALID};
    let (mut sb, slot) = superblock(cache);
    assert!(sb.clean);
    let l2 = sb.layout;
    let g1 = l2.geometry.version1();
    let l1 = Layout::new(&g1);
    assert_eq!(l1.data_offset, l2.data_offset);
    let table = l2.table_copy_offset(sb.table_copy);
    let mut entries = Vec::new();
    for p in 0..l2.table_pages() {
        let mut page = vec![0u8; 4096];
        cache.read_at(&mut page, table + p * 4096).unwrap();
        let want = ENTRIES_PER_PAGE.min(l2.geometry.cache_blocks - p * ENTRIES_PER_PAGE) as usize;
        meta::decode_page(&page, p, want, &mut entries).unwrap();
    }
    let bs = u64::from(l2.geometry.block_size);
    let assoc = u64::from(l2.geometry.assoc);
    let mut new = vec![0u64; entries.len()];
    let mut data = vec![0u8; (l2.geometry.cache_blocks * bs) as usize];
    let mut moved = 0;
    for (f, &e) in entries.iter().enumerate() {
        if e & VALID == 0 {
            continue;
        }
        let set = g1.set_of(e & BLOCK_MASK);
        let f1 = (set * assoc..(set + 1) * assoc)
            .find(|&x| new[x as usize] == 0)
            .expect("a free frame in the version 1 set");
        new[f1 as usize] = e;
        let at = (l1.frame_offset(f1) - l1.data_offset) as usize;
        cache
            .read_at(&mut data[at..at + bs as usize], l2.frame_offset(f as u64))
            .unwrap();
        moved += 1;
    }
    assert!(moved > 0);
    cache.write_at(&data, l1.data_offset).unwrap();
    for (p, chunk) in new.chunks(ENTRIES_PER_PAGE as usize).enumerate() {
        let page = meta::encode_page(p as u64, chunk);
        cache.write_at(&page, table + p as u64 * 4096).unwrap();
    }
    sb.layout = l1;
    cache
        .write_at(&sb.encode(), slot as u64 * meta::META_PAGE)
        .unwrap();
}

/// The valid superblock on `dev` and its slot.
fn superblock(dev: &MemDevice) -> (vblkcache::engine::meta::Superblock, usize) {
    match vblkcache::engine::meta::read_superblock(dev).unwrap() {
        vblkcache::engine::meta::Found::Superblock(sb, slot) => (sb, slot),
        _ => panic!("no superblock"),
    }
}

fn format_version(cache: &MemDevice) -> u32 {
    superblock(cache).0.layout.geometry.format_version()
}

#[test]
fn version_1_cache_keeps_its_dirty_data_and_format() {
    let (src, cache) = devices();
    let e = open(
        &src,
        &cache,
        cfg(4096, Some(512), Some(8), Some(WriteMode::Writeback)),
    );
    let regions: [(u64, u8, usize); 3] = [
        (0, 0xa1, 32768),
        (1 << 20, 0xb2, 16384),
        (3 << 20, 0xc3, 8192),
    ];
    for &(at, byte, len) in &regions {
        e.write(at, &vec![byte; len]).unwrap();
    }
    // Blocks of runs that share a set may have been written back to make
    // room; the rest stay dirty.
    let dirty = e.dirty_blocks();
    assert!(dirty >= 8, "{dirty} dirty blocks");
    e.shutdown(false).unwrap();
    assert_eq!(format_version(&cache), 2);
    rewrite_as_version1(&cache);
    assert_eq!(format_version(&cache), 1);

    let e = reopen(&src, &cache).unwrap();
    assert_eq!(e.dirty_blocks(), dirty);
    for &(at, byte, len) in &regions {
        let mut b = vec![0u8; len];
        e.read(at, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == byte), "dirty data at {at} lost");
    }
    // New writes and a clean restart keep the format.
    e.write(2 << 20, &[0xd4; 4096]).unwrap();
    e.shutdown(false).unwrap();
    assert_eq!(format_version(&cache), 1);
    let e = reopen(&src, &cache).unwrap();
    assert!(e.dirty_blocks() > dirty);
    e.flush_all(&mut |_| {}).unwrap();
    assert_eq!(e.dirty_blocks(), 0);
    e.shutdown(false).unwrap();
    let mut b = vec![0u8; 4096];
    for &(at, byte, _) in regions.iter().chain(&[(2 << 20, 0xd4, 4096)]) {
        src.read_at(&mut b, at).unwrap();
        assert!(
            b.iter().all(|&x| x == byte),
            "source at {at} not written back"
        );
    }
}
