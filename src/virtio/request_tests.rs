//! Parser and executor tests over a mock split queue in real guest memory.

use super::execute::{execute, status_of, write_status};
use super::request::{BlkError, ByteRange, Request, RequestKind, Segment};
use super::DeviceLimits;
use crate::device::{BlockDevice, MemDevice};
use crate::engine::{Engine, EngineConfig};
use std::sync::Arc;
use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

const MEM_SIZE: usize = 0x40_0000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x11_0000;
const STATUS: u64 = 0x30_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;

fn mem() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn limits() -> DeviceLimits {
    // A 1 MiB disk.
    DeviceLimits::new(1 << 20, 4096, false)
}

fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn header(m: &Mem, req_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    m.write_slice(&h, GuestAddress(HDR)).unwrap();
}

fn segment(m: &Mem, at: u64, sector: u64, sectors: u32, flags: u32) {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&sectors.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    m.write_slice(&s, GuestAddress(at)).unwrap();
}

fn parse_with(
    m: &Mem,
    descs: &[RawDescriptor],
    l: &DeviceLimits,
) -> Result<Request, super::ParseError> {
    let vq = MockSplitQueue::new(m, 16);
    let chain = vq.build_desc_chain(descs).unwrap();
    Request::parse(chain, l)
}

fn parse(m: &Mem, descs: &[RawDescriptor]) -> Result<Request, super::ParseError> {
    parse_with(m, descs, &limits())
}

fn rw(
    m: &Mem,
    t: u32,
    sector: u64,
    len: u32,
    data_flags: u16,
) -> Result<Request, super::ParseError> {
    header(m, t, sector);
    parse(
        m,
        &[d(HDR, 16, 0), d(DATA, len, data_flags), d(STATUS, 1, W)],
    )
}

#[test]
fn valid_read_and_write() {
    let m = mem();
    let r = rw(&m, VIRTIO_BLK_T_IN, 2, 4096, W).unwrap();
    assert_eq!(r.kind, RequestKind::Read { offset: 1024 });
    assert_eq!(
        r.data,
        vec![Segment {
            addr: GuestAddress(DATA),
            len: 4096
        }]
    );
    assert_eq!(r.data_len, 4096);
    assert_eq!(r.status_addr, GuestAddress(STATUS));
    let w = rw(&m, VIRTIO_BLK_T_OUT, 0, 512, 0).unwrap();
    assert_eq!(w.kind, RequestKind::Write { offset: 0 });
    // The very last sector is fine.
    assert!(rw(&m, VIRTIO_BLK_T_IN, 2047, 512, W).is_ok());
}

/// VIRTIO_F_VERSION_1 framing: the header is the first 16 bytes of the
/// chain, the status its last byte, the data what lies between, however the
/// driver cut them into descriptors.
#[test]
fn any_descriptor_layout() {
    let m = mem();
    let seg = |addr: u64, len: u32| Segment {
        addr: GuestAddress(addr),
        len,
    };
    // Header and data in one readable descriptor.
    header(&m, VIRTIO_BLK_T_OUT, 8);
    let r = parse(&m, &[d(HDR, 16 + 4096, 0), d(STATUS, 1, W)]).unwrap();
    assert_eq!(r.kind, RequestKind::Write { offset: 4096 });
    assert_eq!(r.data, vec![seg(HDR + 16, 4096)]);
    assert_eq!(r.status_addr, GuestAddress(STATUS));
    // Data and status in one writable descriptor.
    header(&m, VIRTIO_BLK_T_IN, 8);
    let r = parse(&m, &[d(HDR, 16, 0), d(DATA, 4097, W)]).unwrap();
    assert_eq!(r.kind, RequestKind::Read { offset: 4096 });
    assert_eq!(r.data, vec![seg(DATA, 4096)]);
    assert_eq!(r.data_len, 4096);
    assert_eq!(r.status_addr, GuestAddress(DATA + 4096));
    // The header in two pieces (and an empty descriptor between them), data
    // in two, the status alone.
    header(&m, VIRTIO_BLK_T_IN, 1);
    let r = parse(
        &m,
        &[
            d(HDR, 10, 0),
            d(DATA, 0, 0),
            d(HDR + 10, 6, 0),
            d(DATA, 512, W),
            d(DATA + 4096, 512, W),
            d(STATUS, 1, W),
        ],
    )
    .unwrap();
    assert_eq!(r.kind, RequestKind::Read { offset: 512 });
    assert_eq!(r.data, vec![seg(DATA, 512), seg(DATA + 4096, 512)]);
    // A FLUSH with data in a descriptor of its own is refused, and so is one
    // whose header descriptor goes on past the header; bytes before the
    // status byte in its descriptor are ignored (see
    // `status_missing_short_or_read_only`).
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    let (e, status) = err(parse(&m, &[d(HDR, 16, 0), d(DATA, 8, W), d(STATUS, 4, W)]));
    assert!(matches!(e, BlkError::UnexpectedData(_)), "{e}");
    assert_eq!(status, Some(GuestAddress(STATUS + 3)));
    let (e, _) = err(parse(&m, &[d(HDR, 24, 0), d(STATUS, 1, W)]));
    assert!(matches!(e, BlkError::UnexpectedData(_)), "{e}");
    // Fewer than 16 readable bytes before the writable part.
    header(&m, VIRTIO_BLK_T_IN, 0);
    let (e, _) = err(parse(
        &m,
        &[d(HDR, 10, 0), d(HDR + 10, 4, 0), d(DATA, 513, W)],
    ));
    assert!(matches!(e, BlkError::HeaderLength(14)), "{e}");
}

fn err(r: Result<Request, super::ParseError>) -> (BlkError, Option<GuestAddress>) {
    let e = r.unwrap_err();
    (e.error, e.status_addr)
}

#[test]
fn sector_past_end_and_overflow() {
    let m = mem();
    let (e, st) = err(rw(&m, VIRTIO_BLK_T_IN, 2047, 1024, W));
    assert!(matches!(e, BlkError::OutOfRange { .. }), "{e}");
    assert_eq!(st, Some(GuestAddress(STATUS)));
    assert_eq!(e.status(), VIRTIO_BLK_S_IOERR as u8);
    // sector * 512 overflows u64.
    let (e, _) = err(rw(&m, VIRTIO_BLK_T_IN, u64::MAX / 256, 512, W));
    assert!(matches!(e, BlkError::OutOfRange { .. }), "{e}");
    // sector * 512 fits but + len overflows, on a disk as large as possible.
    let mut huge = limits();
    huge.capacity_sectors = u64::MAX / 512;
    header(&m, VIRTIO_BLK_T_IN, u64::MAX / 512);
    let (e, _) = err(parse_with(
        &m,
        &[d(HDR, 16, 0), d(DATA, 4096, W), d(STATUS, 1, W)],
        &huge,
    ));
    assert!(matches!(e, BlkError::OutOfRange { .. }), "{e}");
}

#[test]
fn zero_length_and_unaligned_data() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let (e, _) = err(parse(&m, &[d(HDR, 16, 0), d(STATUS, 1, W)]));
    assert!(matches!(e, BlkError::NoData), "{e}");
    let (e, _) = err(rw(&m, VIRTIO_BLK_T_IN, 0, 0, W));
    assert!(matches!(e, BlkError::NoData), "{e}");
    let (e, _) = err(rw(&m, VIRTIO_BLK_T_OUT, 0, 1000, 0));
    assert!(matches!(e, BlkError::UnalignedLength(1000)), "{e}");
}

#[test]
fn data_outside_guest_memory() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    // Entirely outside, and straddling the end of memory.
    for (addr, len) in [(0x1000_0000u64, 512u32), (MEM_SIZE as u64 - 512, 1024)] {
        let (e, _) = err(parse(
            &m,
            &[d(HDR, 16, 0), d(addr, len, W), d(STATUS, 1, W)],
        ));
        assert!(matches!(e, BlkError::OutsideGuestMemory { .. }), "{e}");
    }
    // Address + length wraps around.
    let (e, _) = err(parse(
        &m,
        &[d(HDR, 16, 0), d(u64::MAX - 100, 512, W), d(STATUS, 1, W)],
    ));
    assert!(matches!(e, BlkError::OutsideGuestMemory { .. }), "{e}");
    // A status byte outside memory cannot be reported at all.
    let (e, st) = err(parse(
        &m,
        &[d(HDR, 16, 0), d(DATA, 512, W), d(0x1000_0000, 1, W)],
    ));
    assert!(matches!(e, BlkError::OutsideGuestMemory { .. }), "{e}");
    assert_eq!(st, None);
    // Header outside memory.
    let (e, st) = err(parse(
        &m,
        &[d(0x1000_0000, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)],
    ));
    assert!(matches!(e, BlkError::OutsideGuestMemory { .. }), "{e}");
    assert_eq!(st, Some(GuestAddress(STATUS)));
}

#[test]
fn wrong_directions() {
    let m = mem();
    let (e, _) = err(rw(&m, VIRTIO_BLK_T_IN, 0, 512, 0));
    assert!(matches!(e, BlkError::WrongDirection(_)), "{e}");
    let (e, _) = err(rw(&m, VIRTIO_BLK_T_OUT, 0, 512, W));
    assert!(matches!(e, BlkError::WrongDirection(_)), "{e}");
    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    let (e, _) = err(parse(&m, &[d(HDR, 16, 0), d(DATA, 20, 0), d(STATUS, 1, W)]));
    assert!(matches!(e, BlkError::WrongDirection(_)), "{e}");
    header(&m, VIRTIO_BLK_T_IN, 0);
    let (e, _) = err(parse(
        &m,
        &[d(HDR, 16, W), d(DATA, 512, W), d(STATUS, 1, W)],
    ));
    assert!(matches!(e, BlkError::HeaderWritable), "{e}");
    let (e, _) = err(parse(&m, &[d(HDR, 8, 0), d(DATA, 512, W), d(STATUS, 1, W)]));
    assert!(matches!(e, BlkError::HeaderLength(8)), "{e}");
}

#[test]
fn status_missing_short_or_read_only() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    let (e, st) = err(parse(&m, &[d(HDR, 16, 0)]));
    assert!(matches!(e, BlkError::MissingStatus), "{e}");
    assert_eq!(st, None);
    let (e, st) = err(parse(&m, &[d(HDR, 16, 0), d(STATUS, 0, W)]));
    assert!(matches!(e, BlkError::StatusTooShort), "{e}");
    assert_eq!(st, None);
    let (e, _) = err(parse(&m, &[d(HDR, 16, 0), d(STATUS, 1, 0)]));
    assert!(matches!(e, BlkError::StatusReadOnly), "{e}");
    // A longer status buffer reports in its last byte.
    let r = parse(&m, &[d(HDR, 16, 0), d(STATUS, 4, W)]).unwrap();
    assert_eq!(r.kind, RequestKind::Flush);
    assert_eq!(r.status_addr, GuestAddress(STATUS + 3));
}

#[test]
fn writes_to_a_read_only_disk_fail() {
    let m = mem();
    let mut ro = limits();
    ro.read_only = true;
    for t in [
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
    ] {
        header(&m, t, 0);
        segment(&m, DATA, 0, 8, 0);
        let (e, _) = err(parse_with(
            &m,
            &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)],
            &ro,
        ));
        assert!(matches!(e, BlkError::ReadOnly), "{t}: {e}");
        assert_eq!(e.status(), VIRTIO_BLK_S_IOERR as u8);
    }
    // Reads and flushes still work.
    header(&m, VIRTIO_BLK_T_IN, 0);
    assert!(parse_with(&m, &[d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)], &ro).is_ok());
}

#[test]
fn discard_and_write_zeroes_segments() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_DISCARD, 0);
    segment(&m, DATA, 8, 16, 0);
    let r = parse(&m, &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)]).unwrap();
    assert_eq!(
        r.kind,
        RequestKind::Discard {
            ranges: vec![ByteRange {
                offset: 4096,
                len: 8192
            }]
        }
    );
    // Unmap is only allowed on write-zeroes.
    segment(&m, DATA, 8, 16, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    let (e, _) = err(parse(&m, &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)]));
    assert!(matches!(e, BlkError::SegmentFlags(1)), "{e}");
    assert_eq!(e.status(), VIRTIO_BLK_S_UNSUPP as u8, "discard with unmap");
    header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let r = parse(&m, &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)]).unwrap();
    assert!(matches!(
        r.kind,
        RequestKind::WriteZeroes { unmap: true, .. }
    ));
    // Reserved flag bits.
    segment(&m, DATA, 8, 16, 4);
    let (e, _) = err(parse(&m, &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)]));
    assert!(matches!(e, BlkError::SegmentFlags(4)), "{e}");
    assert_eq!(e.status(), VIRTIO_BLK_S_UNSUPP as u8, "unknown flag");
    // Too many segments (max_discard_seg is 1), and a partial one.
    header(&m, VIRTIO_BLK_T_DISCARD, 0);
    segment(&m, DATA, 0, 8, 0);
    segment(&m, DATA + 16, 8, 8, 0);
    for len in [32, 8] {
        let (e, _) = err(parse(
            &m,
            &[d(HDR, 16, 0), d(DATA, len, 0), d(STATUS, 1, W)],
        ));
        assert!(matches!(e, BlkError::SegmentCount { .. }), "{e}");
    }
    // Past the end of the disk, and larger than max_discard_sectors.
    segment(&m, DATA, 2040, 16, 0);
    let (e, _) = err(parse(&m, &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)]));
    assert!(matches!(e, BlkError::OutOfRange { .. }), "{e}");
    segment(&m, DATA, 0, u32::MAX, 0);
    let (e, _) = err(parse(&m, &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)]));
    assert!(matches!(e, BlkError::SegmentTooLarge { .. }), "{e}");
    // Unaligned to the logical block size.
    let mut l4k = limits();
    l4k.logical_block_sectors = 8;
    segment(&m, DATA, 3, 8, 0);
    let (e, _) = err(parse_with(
        &m,
        &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)],
        &l4k,
    ));
    assert!(matches!(e, BlkError::SegmentUnaligned { .. }), "{e}");
    segment(&m, DATA, 8, 8, 0);
    assert!(parse_with(&m, &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)], &l4k).is_ok());
}

#[test]
fn unknown_type_is_unsupp_and_others_ioerr() {
    let m = mem();
    header(&m, 99, 0);
    let e = parse(&m, &[d(HDR, 16, 0), d(STATUS, 1, W)]).unwrap_err();
    assert!(matches!(e.error, BlkError::Unsupported(99)));
    assert_eq!(e.status(), VIRTIO_BLK_S_UNSUPP as u8);
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    let e = parse(&m, &[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)]).unwrap_err();
    assert!(matches!(e.error, BlkError::UnexpectedData(_)));
    assert_eq!(e.status(), VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn chain_and_data_limits() {
    let m = mem();
    let mut small = limits();
    small.seg_max = 2;
    header(&m, VIRTIO_BLK_T_IN, 0);
    let ok = [
        d(HDR, 16, 0),
        d(DATA, 512, W),
        d(DATA + 512, 512, W),
        d(STATUS, 1, W),
    ];
    assert!(parse_with(&m, &ok, &small).is_ok());
    let long = [
        d(HDR, 16, 0),
        d(DATA, 512, W),
        d(DATA + 512, 512, W),
        d(DATA + 1024, 512, W),
        d(STATUS, 1, W),
    ];
    let (e, _) = err(parse_with(&m, &long, &small));
    assert!(matches!(e, BlkError::ChainTooLong { max: 4 }), "{e}");
    // Total data above size_max * seg_max.
    small.size_max = 512;
    let big = [
        d(HDR, 16, 0),
        d(DATA, 512, W),
        d(DATA + 512, 1024, W),
        d(STATUS, 1, W),
    ];
    let (e, _) = err(parse_with(&m, &big, &small));
    assert!(
        matches!(
            e,
            BlkError::TooLarge {
                len: 1536,
                max: 1024
            }
        ),
        "{e}"
    );
}

#[test]
fn get_id_accepts_long_buffers() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    let r = parse(&m, &[d(HDR, 16, 0), d(DATA, 64, W), d(STATUS, 1, W)]).unwrap();
    assert_eq!(r.kind, RequestKind::GetId);
    let engine = engine(1 << 20);
    let mut serial = [0u8; 20];
    serial[..4].copy_from_slice(b"abcd");
    m.write_slice(&[0xffu8; 64], GuestAddress(DATA)).unwrap();
    let n = execute(&r, &m, &engine, &serial, &mut Vec::new()).unwrap();
    assert_eq!(n, 20);
    let mut got = [0u8; 64];
    m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(&got[..20], &serial);
    assert!(got[20..].iter().all(|b| *b == 0xff), "wrote past 20 bytes");
}

fn engine(size: u64) -> Engine {
    let source: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(size));
    let cache: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20));
    Engine::open(source, cache, EngineConfig::with_block_size(4096, None)).unwrap()
}

#[test]
fn execute_scatters_and_gathers_across_segments() {
    let m = mem();
    let engine = engine(1 << 20);
    let pattern: Vec<u8> = (0..6144u32).map(|i| (i * 7 % 251) as u8).collect();
    // Write 6 KiB from three uneven segments at sector 3.
    m.write_slice(&pattern[..1000], GuestAddress(DATA)).unwrap();
    m.write_slice(&pattern[1000..1512], GuestAddress(DATA + 0x2000))
        .unwrap();
    m.write_slice(&pattern[1512..], GuestAddress(DATA + 0x4000))
        .unwrap();
    header(&m, VIRTIO_BLK_T_OUT, 3);
    let w = parse(
        &m,
        &[
            d(HDR, 16, 0),
            d(DATA, 1000, 0),
            d(DATA + 0x2000, 512, 0),
            d(DATA + 0x4000, 4632, 0),
            d(STATUS, 1, W),
        ],
    )
    .unwrap();
    let res = execute(&w, &m, &engine, &[0; 20], &mut Vec::new());
    assert_eq!(status_of(&res), VIRTIO_BLK_S_OK as u8);
    write_status(&m, w.status_addr, status_of(&res)).unwrap();
    assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    // Read it back through a different split.
    header(&m, VIRTIO_BLK_T_IN, 3);
    let out = 0x20_0000u64;
    let r = parse(
        &m,
        &[
            d(HDR, 16, 0),
            d(out, 4096, W),
            d(out + 4096, 2048, W),
            d(STATUS, 1, W),
        ],
    )
    .unwrap();
    assert_eq!(
        execute(&r, &m, &engine, &[0; 20], &mut Vec::new()).unwrap(),
        6144
    );
    let mut back = vec![0u8; 6144];
    m.read_slice(&mut back, GuestAddress(out)).unwrap();
    assert_eq!(back, pattern);
    let mut direct = vec![0u8; 6144];
    engine.read(3 * 512, &mut direct).unwrap();
    assert_eq!(direct, pattern);
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    fn arb_desc() -> impl Strategy<Value = (u64, u32, bool)> {
        (
            prop_oneof![0x10_0000u64..0x40_1000, any::<u64>()],
            prop_oneof![0u32..8192, any::<u32>()],
            any::<bool>(),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// Random well-formed read/write chains are accepted with exactly
        /// the offset and segments they were built with; the same chain with
        /// its last link pointed back into itself is refused whole.
        #[test]
        fn random_valid_chains_parse_exactly(
            write in any::<bool>(),
            sizes in proptest::collection::vec(1u32..=8, 1..6),
            sector_frac in 0.0f64..1.0,
            back in 0u16..4,
        ) {
            let m = mem();
            let l = limits();
            let total: u64 = sizes.iter().map(|s| u64::from(*s) * 512).sum();
            let max_sector = l.capacity_sectors - total / 512;
            let sector = (max_sector as f64 * sector_frac) as u64;
            let t = if write { VIRTIO_BLK_T_OUT } else { VIRTIO_BLK_T_IN };
            header(&m, t, sector);
            let flags = if write { 0 } else { W };
            let mut raw = vec![d(HDR, 16, 0)];
            let mut segs = Vec::new();
            let mut at = DATA;
            for s in &sizes {
                raw.push(d(at, s * 512, flags));
                segs.push(Segment { addr: GuestAddress(at), len: s * 512 });
                at += 0x2000;
            }
            raw.push(d(STATUS, 1, W));
            let r = parse(&m, &raw).unwrap();
            let offset = sector * 512;
            let kind = if write { RequestKind::Write { offset } } else { RequestKind::Read { offset } };
            prop_assert_eq!(r.kind, kind);
            prop_assert_eq!(r.data, segs);
            prop_assert_eq!(r.data_len, total);
            // Now link the status descriptor back to an earlier one.
            let n = raw.len() as u16;
            let linked: Vec<RawDescriptor> = raw
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    let x = SplitDescriptor::from(*x);
                    let i = i as u16;
                    let next = if i + 1 == n { back.min(n - 1) } else { i + 1 };
                    dn(x.addr().0, x.len(), x.flags() | NEXT, next)
                })
                .collect();
            let e = parse_raw(&m, &linked).unwrap_err();
            prop_assert!(matches!(e.error, BlkError::BrokenChain), "{}", e.error);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Random chains never panic, and an accepted request satisfies the
        /// documented invariants.
        #[test]
        fn random_chains(
            t in prop_oneof![0u32..16, any::<u32>()],
            sector in prop_oneof![0u64..4096, any::<u64>()],
            descs in proptest::collection::vec(arb_desc(), 1..8),
            seg in any::<[u8; 16]>(),
        ) {
            let m = mem();
            header(&m, t, sector);
            m.write_slice(&seg, GuestAddress(DATA)).unwrap();
            let mut raw = vec![d(HDR, 16, 0)];
            raw.extend(descs.iter().map(|(a, l, w)| d(*a, *l, if *w { W } else { 0 })));
            let l = limits();
            if let Ok(r) = parse(&m, &raw) {
                prop_assert!(r.data_len <= l.max_data_len());
                prop_assert_eq!(r.data_len, r.data.iter().map(|s| u64::from(s.len)).sum::<u64>());
                for s in &r.data {
                    prop_assert!(s.addr.0 + u64::from(s.len) <= MEM_SIZE as u64);
                }
                if let RequestKind::Read { offset } | RequestKind::Write { offset } = r.kind {
                    prop_assert!(offset + r.data_len <= l.capacity_sectors * 512);
                }
                prop_assert!(r.status_addr.0 < MEM_SIZE as u64);
            }
        }
    }
}

/// Parses the first chain of descriptors written as given (flags and `next`
/// untouched) at the start of a 16-entry queue's table.
fn parse_raw(m: &Mem, descs: &[RawDescriptor]) -> Result<Request, super::ParseError> {
    let vq = MockSplitQueue::new(m, 16);
    let chain = vq.build_multiple_desc_chains(descs).unwrap();
    Request::parse(chain, &limits())
}

fn dn(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

const NEXT: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
const IND: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;

#[test]
fn broken_chains_are_refused_whole() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    // Sanity: the same three descriptors, properly terminated, parse.
    let good = [
        dn(HDR, 16, NEXT, 1),
        dn(DATA, 512, W | NEXT, 2),
        dn(STATUS, 1, W, 0),
    ];
    assert!(parse_raw(&m, &good).is_ok());
    // A loop: the chain is longer than the queue. The iterator stops after
    // 16 descriptors; without the check the parser would see a chain ending
    // in a writable descriptor and serve a guess.
    let looped = [
        dn(HDR, 16, NEXT, 1),
        dn(DATA, 512, W | NEXT, 2),
        dn(STATUS, 1, W | NEXT, 1),
    ];
    let (e, st) = err(parse_raw(&m, &looped));
    assert!(matches!(e, BlkError::BrokenChain), "{e}");
    assert_eq!(st, None);
    assert_eq!(e.status(), VIRTIO_BLK_S_IOERR as u8);
    // `next` points outside the queue.
    let outside = [
        dn(HDR, 16, NEXT, 1),
        dn(DATA, 512, W | NEXT, 2),
        dn(STATUS, 1, W | NEXT, 200),
    ];
    let (e, st) = err(parse_raw(&m, &outside));
    assert!(matches!(e, BlkError::BrokenChain), "{e}");
    assert_eq!(st, None);
}

#[test]
fn nested_indirect_tables_are_refused() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let table = 0x20_0000u64;
    let inner = 0x20_1000u64;
    let put = |at: u64, i: u64, d: RawDescriptor| {
        m.write_obj(d, GuestAddress(at + 16 * i)).unwrap();
    };
    // A valid indirect chain parses.
    put(table, 0, dn(HDR, 16, NEXT, 1));
    put(table, 1, dn(DATA, 512, W | NEXT, 2));
    put(table, 2, dn(STATUS, 1, W, 0));
    let r = parse_raw(&m, &[dn(table, 48, IND, 0)]).unwrap();
    assert_eq!(r.kind, RequestKind::Read { offset: 0 });
    // The status moves into a second-level table: refused.
    put(inner, 0, dn(STATUS, 1, W, 0));
    put(table, 2, dn(inner, 16, IND, 0));
    let (e, st) = err(parse_raw(&m, &[dn(table, 48, IND, 0)]));
    assert!(matches!(e, BlkError::BrokenChain), "{e}");
    assert_eq!(st, None);
    // A second-level table as the very first entry: nothing is yielded.
    put(table, 0, dn(inner, 16, IND, 0));
    let (e, st) = err(parse_raw(&m, &[dn(table, 48, IND, 0)]));
    assert!(matches!(e, BlkError::MissingHeader), "{e}");
    assert_eq!(st, None);
    // A table length that is not a multiple of 16.
    put(table, 0, dn(HDR, 16, NEXT, 1));
    put(table, 2, dn(STATUS, 1, W, 0));
    let (e, _) = err(parse_raw(&m, &[dn(table, 47, IND, 0)]));
    assert!(matches!(e, BlkError::MissingHeader), "{e}");
}

#[test]
fn chain_longer_than_seg_max_reads_at_most_the_limit() {
    // 300 descriptors in an indirect table: refused as too long, and the
    // parser stops reading after seg_max + 2 + 1 descriptors.
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let table = 0x20_0000u64;
    let n: u16 = 300;
    for i in 0..n {
        let d = match i {
            0 => dn(HDR, 16, NEXT, 1),
            _ if i == n - 1 => dn(STATUS, 1, W, 0),
            _ => dn(DATA, 512, W | NEXT, i + 1),
        };
        m.write_obj(d, GuestAddress(table + 16 * u64::from(i)))
            .unwrap();
    }
    let (e, st) = err(parse_raw(&m, &[dn(table, 16 * u32::from(n), IND, 0)]));
    assert!(matches!(e, BlkError::ChainTooLong { max: 256 }), "{e}");
    assert_eq!(st, None);
}

#[test]
fn arithmetic_at_the_u64_edges() {
    let m = mem();
    // The largest disk whose byte size fits in u64.
    let mut huge = limits();
    huge.capacity_sectors = u64::MAX / 512;
    let last = u64::MAX / 512 - 1;
    let read = |sector: u64, len: u32, l: &DeviceLimits| {
        header(&m, VIRTIO_BLK_T_IN, sector);
        parse_with(&m, &[d(HDR, 16, 0), d(DATA, len, W), d(STATUS, 1, W)], l)
    };
    // Ends exactly at the last byte of that disk: accepted.
    let r = read(last, 512, &huge).unwrap();
    assert_eq!(r.kind, RequestKind::Read { offset: last * 512 });
    // One sector further: past the end; two: offset + len overflows.
    for (sector, len) in [(last, 1024), (last + 1, 512), (u64::MAX, 512)] {
        let (e, _) = err(read(sector, len, &huge));
        assert!(matches!(e, BlkError::OutOfRange { .. }), "{sector}: {e}");
    }
    // A capacity whose byte size overflows (a bad limits value) fails closed.
    let mut absurd = limits();
    absurd.capacity_sectors = u64::MAX;
    let (e, _) = err(read(0, 512, &absurd));
    assert!(matches!(e, BlkError::OutOfRange { .. }), "{e}");
    // Discard segments at the edge.
    header(&m, VIRTIO_BLK_T_DISCARD, 0);
    for (sector, ok) in [(last - 7, true), (last - 6, false), (u64::MAX - 7, false)] {
        segment(&m, DATA, sector, 8, 0);
        let r = parse_with(&m, &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)], &huge);
        assert_eq!(r.is_ok(), ok, "discard at {sector}: {r:?}");
    }
    // A chain of more than 4 GiB is cut short by virtio-queue and refused
    // as broken; a single (almost) 4 GiB descriptor is refused before any allocation.
    header(&m, VIRTIO_BLK_T_IN, 0);
    let (e, _) = err(parse(
        &m,
        &[
            d(HDR, 16, 0),
            d(DATA, u32::MAX, W),
            d(DATA, u32::MAX, W),
            d(STATUS, 1, W),
        ],
    ));
    assert!(matches!(e, BlkError::BrokenChain), "{e}");
    let (e, _) = err(parse(
        &m,
        &[d(HDR, 16, 0), d(DATA, u32::MAX - 32, W), d(STATUS, 1, W)],
    ));
    assert!(matches!(e, BlkError::OutsideGuestMemory { .. }), "{e}");
}
