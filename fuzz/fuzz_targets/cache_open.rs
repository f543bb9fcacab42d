//! `Engine::open` on a cache image built from the input.
//!
//! A cache is formatted once on a `MemDevice`, some blocks are written
//! dirty and committed, and two images are taken: one as after a crash
//! (journal to replay) and one after a clean shutdown. The input patches one
//! of them: byte 0 bit 0 chooses the image, bit 1 asks for the checksums of
//! the superblocks, table pages and journal sectors to be recomputed after
//! patching (otherwise nearly every patch dies at a CRC check). The rest is
//! a list of patches: 3 bytes offset (modulo the image size), 1 byte length
//! (at most 64), then that many bytes.
//!
//! Opening must never panic or hang; errors are fine. When it succeeds, a
//! read and a shutdown must not panic either.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};
use vblkcache::device::{BlockDevice, MemDevice};
use vblkcache::engine::meta::journal::{JOURNAL_MAGIC, SECTOR};
use vblkcache::engine::meta::{Layout, Superblock, META_PAGE};
use vblkcache::engine::{Engine, EngineConfig, GeometryRequest, WriteMode};

const DISK: u64 = 256 << 10;
const CACHE: u64 = 512 << 10;
const PAGE: usize = META_PAGE as usize;

struct Images {
    crashed: Vec<u8>,
    clean: Vec<u8>,
    layout: Layout,
}

fn source() -> Arc<dyn BlockDevice> {
    let bytes: Vec<u8> = (0..DISK).map(|i| (i % 251) as u8).collect();
    Arc::new(MemDevice::from_bytes(&bytes))
}

fn images() -> &'static Images {
    static I: OnceLock<Images> = OnceLock::new();
    I.get_or_init(|| {
        let cache = Arc::new(MemDevice::new(CACHE));
        let cfg = EngineConfig {
            geometry: GeometryRequest {
                block_size: Some(4096),
                cache_blocks: None,
                assoc: Some(4),
            },
            mode: Some(WriteMode::Writeback),
            ..EngineConfig::default()
        };
        let e = Engine::open(source(), Arc::clone(&cache) as Arc<dyn BlockDevice>, cfg)
            .expect("format");
        for i in 0..12u64 {
            e.write(i * 8192, &[i as u8 + 1; 4096]).expect("write");
        }
        e.flush().expect("flush");
        let crashed = cache.to_vec();
        e.shutdown(false).expect("shutdown");
        let clean = cache.to_vec();
        let layout = Superblock::decode(&clean[..PAGE])
            .or_else(|_| Superblock::decode(&clean[PAGE..2 * PAGE]))
            .expect("superblock")
            .layout;
        Images {
            crashed,
            clean,
            layout,
        }
    })
}

fn fix_crc(p: &mut [u8], at: usize, from: usize) {
    let crc = crc32c::crc32c(&p[from..]);
    p[at..at + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Recomputes every checksum where the base layout says metadata is: the
/// superblock sectors, both table copies and the journal sectors.
fn fix_all(img: &mut [u8], l: &Layout) {
    for slot in 0..2 {
        let p = &mut img[slot * PAGE..slot * PAGE + 512];
        let crc = crc32c::crc32c(&p[..508]);
        p[508..512].copy_from_slice(&crc.to_le_bytes());
    }
    for copy in 0..2u8 {
        let t = l.table_copy_offset(copy) as usize;
        for i in 0..l.table_pages() as usize {
            fix_crc(&mut img[t + i * PAGE..t + (i + 1) * PAGE], 0, 4);
        }
    }
    let j = l.journal_offset as usize;
    for i in 0..(l.journal_len as usize / SECTOR) {
        let p = &mut img[j + i * SECTOR..j + (i + 1) * SECTOR];
        if p[0..4] == JOURNAL_MAGIC.to_le_bytes() {
            let crc = crc32c::crc32c_append(crc32c::crc32c(&p[0..4]), &p[8..SECTOR]);
            p[4..8].copy_from_slice(&crc.to_le_bytes());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&opts, mut rest)) = data.split_first() else {
        return;
    };
    let base = images();
    let mut img = if opts & 1 == 0 {
        base.crashed.clone()
    } else {
        base.clean.clone()
    };
    while rest.len() >= 4 {
        let off = (usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]))
            % img.len();
        let n = usize::from(rest[3] % 65)
            .min(rest.len() - 4)
            .min(img.len() - off);
        img[off..off + n].copy_from_slice(&rest[4..4 + n]);
        rest = &rest[4 + n..];
    }
    if opts & 2 != 0 {
        fix_all(&mut img, &base.layout);
    }
    let cache: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(&img));
    let cfg = EngineConfig {
        store_workers: 1,
        ..EngineConfig::default()
    };
    if let Ok(e) = Engine::open(source(), cache, cfg) {
        let mut buf = [0u8; 4096];
        let _ = e.read(8192, &mut buf);
        let _ = e.shutdown(false);
    }
});
