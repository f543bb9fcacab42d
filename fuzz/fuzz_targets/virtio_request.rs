//! Descriptor chain -> `Request::parse` -> `execute` against an in-memory
//! engine, over guest memory built from the input.
//!
//! Input layout:
//! - byte 0: options (bit 0 read-only disk, bit 1 4 KiB logical blocks);
//! - byte 1: head index published on the available ring;
//! - 256 bytes: the 16-entry descriptor table. Addresses are folded into
//!   guest memory (plus one page past its end) unless their top byte is
//!   0xff, and lengths into 128 KiB unless their top bit is set, so both
//!   in-range and extreme values are reached quickly;
//! - the rest: guest memory contents from 0x400 (headers, data, discard
//!   segments, indirect tables).
//!
//! Checked on every accepted request: the documented `Request` invariants.
//! Nothing may panic, whatever the chain.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};
use vblkcache::device::{BlockDevice, MemDevice};
use vblkcache::engine::{Engine, EngineConfig, WriteMode};
use vblkcache::virtio::execute::{execute, status_of, write_status};
use vblkcache::virtio::request::{Request, RequestKind};
use vblkcache::virtio::DeviceLimits;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const MEM_SIZE: usize = 64 << 10;
const QSIZE: u16 = 16;
const DESC: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
const CONTENT: usize = 0x400;
const DISK: u64 = 256 << 10;

fn engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        let source: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(DISK));
        let cache: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20));
        let cfg = EngineConfig::with_block_size(4096, Some(WriteMode::Writeback));
        Engine::open(source, cache, cfg).expect("engine")
    })
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    u32::from_le_bytes(a)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 + 256 {
        return;
    }
    let (opts, head) = (data[0], u16::from(data[1]));
    let table = &data[2..2 + 256];
    let content = &data[2 + 256..];

    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("mmap");
    for i in 0..usize::from(QSIZE) {
        let d = &table[i * 16..i * 16 + 16];
        let mut addr = le64(&d[0..8]);
        if addr >> 56 != 0xff {
            addr %= MEM_SIZE as u64 + 4096;
        }
        let mut len = le32(&d[8..12]);
        if len >> 31 == 0 {
            len %= 128 << 10;
        }
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..16].copy_from_slice(&d[12..16]);
        mem.write_slice(&raw, GuestAddress(DESC + 16 * i as u64))
            .expect("desc");
    }
    let n = content.len().min(MEM_SIZE - CONTENT);
    mem.write_slice(&content[..n], GuestAddress(CONTENT as u64))
        .expect("content");
    // Available ring: flags 0, idx 1, ring[0] = head. Written last so the
    // content cannot overwrite it.
    mem.write_obj(0u16, GuestAddress(AVAIL)).expect("avail");
    mem.write_obj(1u16, GuestAddress(AVAIL + 2)).expect("avail");
    mem.write_obj(head, GuestAddress(AVAIL + 4)).expect("avail");

    let mut q = Queue::new(QSIZE).expect("queue");
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);

    let mut limits = DeviceLimits::new(DISK, 4096, opts & 1 != 0);
    if opts & 2 != 0 {
        limits.logical_block_sectors = 8;
    }

    let chain = match q.iter(&mem) {
        Ok(mut it) => it.next(),
        Err(_) => None,
    };
    let Some(chain) = chain else {
        return;
    };
    let head_index = chain.head_index();
    match Request::parse(chain, &limits) {
        Ok(req) => {
            // The invariants documented on `Request`.
            assert!(req.data_len <= limits.max_data_len());
            assert_eq!(
                req.data_len,
                req.data.iter().map(|s| u64::from(s.len)).sum::<u64>()
            );
            for s in &req.data {
                assert!(s.len > 0);
                assert!(mem.check_range(s.addr, s.len as usize));
            }
            assert!(mem.check_range(req.status_addr, 1));
            match &req.kind {
                RequestKind::Read { offset } | RequestKind::Write { offset } => {
                    assert!(req.data_len > 0 && req.data_len % 512 == 0);
                    assert!(offset + req.data_len <= limits.capacity_sectors * 512);
                    if matches!(req.kind, RequestKind::Write { .. }) {
                        assert!(!limits.read_only);
                    }
                }
                RequestKind::Discard { ranges } | RequestKind::WriteZeroes { ranges, .. } => {
                    assert!(!limits.read_only);
                    assert!(ranges.len() <= 1);
                    for r in ranges {
                        assert!(r.offset + r.len <= DISK);
                        assert!(r.len <= u64::from(limits.max_discard_sectors) * 512);
                    }
                }
                RequestKind::Flush | RequestKind::GetId => {}
            }
            let mut buf = Vec::new();
            let res = execute(&req, &mem, engine(), &[7u8; 20], &mut buf);
            assert!(buf.len() <= vblkcache::virtio::execute::CHUNK);
            let written = res.as_ref().map(|n| *n).unwrap_or(0);
            let _ = write_status(&mem, req.status_addr, status_of(&res));
            let _ = q.add_used(&mem, head_index, written.saturating_add(1));
        }
        Err(e) => {
            if let Some(a) = e.status_addr {
                assert!(mem.check_range(a, 1));
                let _ = write_status(&mem, a, e.status());
            }
            let _ = q.add_used(&mem, head_index, 0);
        }
    }
});
