//! Corruption matrix: flip bits all over the metadata of a cache device after
//! a clean and after a dirty (crashed) shutdown. Every case must either open
//! and serve exactly the flushed data, or refuse to open with a one-line
//! message — never serve wrong data.

use rand::{Rng, SeedableRng};
use std::sync::Arc;
use vblkcache::device::MemDevice;
use vblkcache::engine::meta::{self, Found};
use vblkcache::engine::{Engine, EngineConfig, GeometryRequest, WriteMode};

const BS: u64 = 4096;
const SOURCE_BLOCKS: u64 = 256;

struct Image {
    cache: Vec<u8>,
    source: Vec<u8>,
    reference: Vec<u8>,
}

fn build(dirty_shutdown: bool) -> Image {
    let size = SOURCE_BLOCKS * BS;
    let initial: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let src = Arc::new(MemDevice::from_bytes(&initial));
    let cache = Arc::new(MemDevice::new(2 << 20));
    let cfg = EngineConfig {
        geometry: GeometryRequest {
            block_size: Some(BS as u32),
            cache_blocks: Some(64),
            assoc: Some(8),
        },
        mode: Some(WriteMode::Writeback),
        ..EngineConfig::default()
    };
    let e = Engine::open(src.clone(), cache.clone(), cfg).unwrap();
    let mut reference = initial.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(if dirty_shutdown { 2 } else { 1 });
    for round in 0..6 {
        for _ in 0..8 {
            let b = rng.gen_range(0..SOURCE_BLOCKS);
            let data = vec![rng.gen::<u8>() | 1; BS as usize];
            e.write(b * BS, &data).unwrap();
            reference[(b * BS) as usize..((b + 1) * BS) as usize].copy_from_slice(&data);
        }
        let mut buf = vec![0u8; 4 * BS as usize];
        e.read(rng.gen_range(0..SOURCE_BLOCKS - 4) * BS, &mut buf)
            .unwrap();
        e.flush().unwrap();
        if round == 3 && !dirty_shutdown {
            e.flush_all(&mut |_| {}).unwrap();
        }
    }
    if dirty_shutdown {
        e.halt(); // crash right after the last FLUSH
    } else {
        e.shutdown(false).unwrap();
    }
    drop(e);
    Image {
        cache: cache.to_vec(),
        source: src.to_vec(),
        reference,
    }
}

/// Byte ranges holding metadata: superblock sectors, journal, both table copies.
fn regions(img: &[u8]) -> Vec<(&'static str, u64, u64)> {
    let dev = MemDevice::from_bytes(img);
    let Found::Superblock(sb, _) = meta::read_superblock(&dev).unwrap() else {
        panic!("no superblock")
    };
    let l = sb.layout;
    let table_len = l.table_pages() * 4096;
    vec![
        ("superblock slot 0", 0, 512),
        ("superblock slot 1", 4096, 512),
        ("journal", l.journal_offset, l.journal_len),
        ("table copy 0", l.table_copy_offset(0), table_len),
        ("table copy 1", l.table_copy_offset(1), table_len),
    ]
}

fn matrix(dirty_shutdown: bool) -> (u64, u64) {
    let img = build(dirty_shutdown);
    let (mut recovered, mut refused) = (0, 0);
    for (name, start, len) in regions(&img.cache) {
        let step = if name.starts_with("superblock") {
            29
        } else {
            211
        };
        let mut off = 0;
        while off < len {
            let at = (start + off) as usize;
            for bit in [0x01u8, 0x80] {
                let mut bad = img.cache.clone();
                bad[at] ^= bit;
                let cache = Arc::new(MemDevice::from_bytes(&bad));
                let src = Arc::new(MemDevice::from_bytes(&img.source));
                match Engine::open(src, cache.clone(), EngineConfig::default()) {
                    Ok(e) => {
                        let mut disk = vec![0u8; img.reference.len()];
                        e.read(0, &mut disk).unwrap();
                        assert!(
                            disk == img.reference,
                            "{name} byte {at} bit {bit:#x} ({}): opened but serves wrong data",
                            if dirty_shutdown { "dirty" } else { "clean" }
                        );
                        recovered += 1;
                    }
                    Err(err) => {
                        let msg = err.to_string();
                        assert!(
                            !msg.is_empty() && !msg.contains('\n'),
                            "{name} byte {at}: bad message {msg:?}"
                        );
                        assert!(msg.contains("cache device"), "{name} byte {at}: {msg}");
                        assert!(
                            cache.to_vec() == bad,
                            "{name} byte {at}: a refused open changed the device"
                        );
                        refused += 1;
                    }
                }
            }
            off += step;
        }
    }
    (recovered, refused)
}

#[test]
fn corruption_after_clean_shutdown() {
    let (ok, refused) = matrix(false);
    eprintln!("clean shutdown: {ok} cases recovered with correct data, {refused} refused");
    assert!(ok > 0 && refused > 0);
}

#[test]
fn corruption_after_crash() {
    let (ok, refused) = matrix(true);
    eprintln!("crash: {ok} cases recovered with correct data, {refused} refused");
    assert!(ok > 0 && refused > 0);
}
