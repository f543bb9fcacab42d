//! Parsing a virtio-blk descriptor chain into a typed [`Request`].
//!
//! [`Request::parse`] is pure: it reads the header (and discard segments)
//! from guest memory but performs no I/O and writes nothing. Every guest value
//! is checked before it is used: descriptor directions, lengths, that each
//! buffer lies inside guest memory, that the chain is not longer than
//! `seg_max + 2`, that the data fits the advertised limits, and that
//! `sector * 512 + len` neither overflows nor passes the end of the disk. No
//! buffer is allocated from a guest-given length before that length was
//! checked against a limit.
//!
//! Errors carry their `VIRTIO_BLK_S_*` status through [`BlkError::status`],
//! the only place that mapping is made.

use super::DeviceLimits;
use crate::engine::EngineError;
use std::cell::RefCell;
use std::ops::Deref;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Bytes per virtio-blk sector (fixed by the spec, independent of blk_size).
pub const SECTOR_SIZE: u64 = 512;
/// Length of `struct virtio_blk_outhdr`.
pub const HEADER_LEN: u32 = 16;
/// Length of one `struct virtio_blk_discard_write_zeroes` segment.
pub const DISCARD_SEGMENT_LEN: u64 = 16;

/// Why a request failed. [`BlkError::status`] maps it to the status byte.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    #[error("descriptor chain has more than {max} descriptors")]
    ChainTooLong { max: u32 },
    #[error("descriptor chain is broken: it loops, is longer than the queue, points outside its table, nests indirect tables or exceeds 4 GiB")]
    BrokenChain,
    #[error("descriptor chain has no header")]
    MissingHeader,
    #[error("header descriptor is {0} bytes, expected 16")]
    HeaderLength(u32),
    #[error("header descriptor is device-writable")]
    HeaderWritable,
    #[error("descriptor chain has no status descriptor")]
    MissingStatus,
    #[error("status descriptor is device-readable")]
    StatusReadOnly,
    #[error("status descriptor is empty")]
    StatusTooShort,
    #[error("buffer of {len} bytes at guest address {addr:#x} is outside guest memory")]
    OutsideGuestMemory { addr: u64, len: u32 },
    #[error("data descriptor has the wrong direction for request type {0}")]
    WrongDirection(u32),
    #[error("request type {0} carries data but takes none")]
    UnexpectedData(u32),
    #[error("request has no data")]
    NoData,
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    #[error("data length {len} is larger than the limit of {max} bytes")]
    TooLarge { len: u64, max: u64 },
    #[error("sector {sector} + {len} bytes overflows or passes the end of the disk ({capacity} sectors)")]
    OutOfRange {
        sector: u64,
        len: u64,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("discard/write-zeroes data of {len} bytes is not 1..={max} segments of 16 bytes")]
    SegmentCount { len: u64, max: u32 },
    #[error("discard/write-zeroes segment of {sectors} sectors is larger than {max}")]
    SegmentTooLarge { sectors: u32, max: u32 },
    #[error("discard/write-zeroes segment has invalid flags {0:#x}")]
    SegmentFlags(u32),
    #[error("discard/write-zeroes segment at sector {sector} of {sectors} sectors is not aligned to {align} sectors")]
    SegmentUnaligned {
        sector: u64,
        sectors: u32,
        align: u32,
    },
    #[error("guest memory access failed: {0}")]
    GuestMemory(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl BlkError {
    /// The `VIRTIO_BLK_S_*` status reported to the driver. The virtio spec
    /// (5.2.6.2) wants UNSUPP for a discard with the unmap flag and for any
    /// unknown flag of a discard or write-zeroes segment.
    pub fn status(&self) -> u8 {
        match self {
            BlkError::Unsupported(_) | BlkError::SegmentFlags(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A chain that could not be parsed, with where to report it (when the chain
/// had a usable status descriptor).
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct ParseError {
    pub error: BlkError,
    /// Address of the status byte, if the chain had a valid one.
    pub status_addr: Option<GuestAddress>,
}

impl ParseError {
    /// The status byte to report.
    pub fn status(&self) -> u8 {
        self.error.status()
    }
}

/// A guest buffer, checked to lie inside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A byte range of the disk, checked to lie inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

/// What the driver asked for. Offsets and lengths are in bytes and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    Read { offset: u64 },
    Write { offset: u64 },
    Flush,
    GetId,
    Discard { ranges: Vec<ByteRange> },
    WriteZeroes { ranges: Vec<ByteRange>, unmap: bool },
}

/// A parsed request.
///
/// Invariants: every segment lies inside guest memory; `data_len` is the sum
/// of the segment lengths and at most `DeviceLimits::max_data_len()`; for
/// Read/Write, `offset + data_len <= capacity` and `data_len` is a positive
/// multiple of 512; `status_addr` is one writable byte in guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    pub data: Vec<Segment>,
    pub data_len: u64,
    pub status_addr: GuestAddress,
}

/// One descriptor as read from the chain.
#[derive(Clone, Copy)]
struct Desc {
    addr: GuestAddress,
    len: u32,
    writable: bool,
}

thread_local! {
    /// The descriptors of the chain being parsed, kept per thread so that
    /// parsing allocates nothing but the request's own segment list.
    static DESCS: RefCell<Vec<Desc>> = const { RefCell::new(Vec::new()) };
    /// Segment lists of finished requests ([`Request::recycle`]), for the
    /// next requests parsed on this thread.
    static SEGMENTS: RefCell<Vec<Vec<Segment>>> = const { RefCell::new(Vec::new()) };
}

/// How many spare segment lists a thread keeps.
const SPARE_SEGMENT_LISTS: usize = 256;

/// An empty segment list with room for `n`, reused if this thread has one.
fn segment_list(n: usize) -> Vec<Segment> {
    let spare = SEGMENTS.with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.pop()));
    let mut v = spare.unwrap_or_default();
    v.reserve(n);
    v
}

impl Request {
    /// Drops the request, keeping its segment list for the next request
    /// parsed on this thread (the hit path then allocates nothing).
    pub fn recycle(self) {
        let mut data = self.data;
        data.clear();
        SEGMENTS.with(|p| {
            if let Ok(mut p) = p.try_borrow_mut() {
                if p.len() < SPARE_SEGMENT_LISTS {
                    p.push(data);
                }
            }
        });
    }

    /// Parses `chain` against `limits`. Pure: reads guest memory only.
    pub fn parse<M, T>(
        chain: DescriptorChain<M>,
        limits: &DeviceLimits,
    ) -> Result<Request, ParseError>
    where
        M: Deref<Target = T>,
        T: GuestMemoryBackend + ?Sized,
    {
        DESCS.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut descs) => {
                descs.clear();
                Request::parse_with(chain, limits, &mut descs)
            }
            // Only if parse were re-entered on this thread.
            Err(_) => Request::parse_with(chain, limits, &mut Vec::new()),
        })
    }

    fn parse_with<M, T>(
        mut chain: DescriptorChain<M>,
        limits: &DeviceLimits,
        descs: &mut Vec<Desc>,
    ) -> Result<Request, ParseError>
    where
        M: Deref<Target = T>,
        T: GuestMemoryBackend + ?Sized,
    {
        let max_chain = limits.max_chain_len();
        // virtio-queue's iterator ends a chain silently when it meets an
        // error (a loop or a chain longer than the queue, a `next` index
        // outside the table, an unreadable table, an indirect table inside an
        // indirect table, more than 4 GiB in total). The only trace is that
        // the last descriptor it yielded still says "next": such a chain is
        // refused as a whole rather than served in its truncated form.
        let mut truncated = false;
        for d in chain.by_ref() {
            if descs.len() >= max_chain as usize {
                return Err(ParseError {
                    error: BlkError::ChainTooLong { max: max_chain },
                    status_addr: None,
                });
            }
            truncated = d.has_next();
            descs.push(Desc {
                addr: d.addr(),
                len: d.len(),
                writable: d.is_write_only(),
            });
        }
        if truncated {
            // The real status descriptor is unknown, so nothing is written.
            return Err(ParseError {
                error: BlkError::BrokenChain,
                status_addr: None,
            });
        }
        let mem: &T = chain.memory();
        let status_addr = status_of(descs, mem)?;
        let fail = |error: BlkError| ParseError {
            error,
            status_addr: Some(status_addr),
        };
        // VIRTIO_F_VERSION_1 allows any framing: the header is the chain's
        // first 16 bytes, the status its last byte, the data what lies in
        // between. Descriptors shared between two of them are cut in place.
        let (raw, start) = read_header(descs, mem).map_err(fail)?;
        // status_of checked the last descriptor: writable, at least 1 byte.
        let last = descs.len() - 1;
        // Data bytes in the status descriptor (a FLUSH may have them: they
        // are ignored, as a longer status buffer always was).
        let before_status = descs[last].len - 1;
        let end = if before_status > 0 {
            descs[last].len = before_status;
            descs.len()
        } else {
            last
        };
        let req_type = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let sector = u64::from_le_bytes([
            raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15],
        ]);

        let body = descs.get(start..end).unwrap_or(&[]);
        let (data, data_len) = check_data(body, mem, limits).map_err(fail)?;
        let dir_ok = |writable: bool| body.iter().all(|d| d.len == 0 || d.writable == writable);

        let kind = match req_type {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let write = req_type == VIRTIO_BLK_T_OUT;
                if write && limits.read_only {
                    return Err(fail(BlkError::ReadOnly));
                }
                if !dir_ok(!write) {
                    return Err(fail(BlkError::WrongDirection(req_type)));
                }
                if data_len == 0 {
                    return Err(fail(BlkError::NoData));
                }
                if data_len % SECTOR_SIZE != 0 {
                    return Err(fail(BlkError::UnalignedLength(data_len)));
                }
                let offset = check_range(sector, data_len, limits).map_err(fail)?;
                if write {
                    RequestKind::Write { offset }
                } else {
                    RequestKind::Read { offset }
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if data_len != u64::from(before_status) {
                    return Err(fail(BlkError::UnexpectedData(req_type)));
                }
                RequestKind::Flush
            }
            VIRTIO_BLK_T_GET_ID => {
                if !dir_ok(true) {
                    return Err(fail(BlkError::WrongDirection(req_type)));
                }
                if data_len == 0 {
                    return Err(fail(BlkError::NoData));
                }
                RequestKind::GetId
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if limits.read_only {
                    return Err(fail(BlkError::ReadOnly));
                }
                if !dir_ok(false) {
                    return Err(fail(BlkError::WrongDirection(req_type)));
                }
                let zeroes = req_type == VIRTIO_BLK_T_WRITE_ZEROES;
                let (ranges, unmap) =
                    parse_segments(&data, data_len, zeroes, mem, limits).map_err(fail)?;
                if zeroes {
                    RequestKind::WriteZeroes { ranges, unmap }
                } else {
                    RequestKind::Discard { ranges }
                }
            }
            other => return Err(fail(BlkError::Unsupported(other))),
        };
        Ok(Request {
            kind,
            data,
            data_len,
            status_addr,
        })
    }
}

/// Finds the status byte: the last byte of the last descriptor, which must be
/// device-writable, non-empty and inside guest memory.
fn status_of<T>(descs: &[Desc], mem: &T) -> Result<GuestAddress, ParseError>
where
    T: GuestMemoryBackend + ?Sized,
{
    let no_status = |error| ParseError {
        error,
        status_addr: None,
    };
    if descs.is_empty() {
        return Err(no_status(BlkError::MissingHeader));
    }
    if descs.len() < 2 {
        return Err(no_status(BlkError::MissingStatus));
    }
    let last = descs[descs.len() - 1];
    if !last.writable {
        return Err(no_status(BlkError::StatusReadOnly));
    }
    if last.len == 0 {
        return Err(no_status(BlkError::StatusTooShort));
    }
    let addr = last
        .addr
        .0
        .checked_add(u64::from(last.len) - 1)
        .map(GuestAddress)
        .filter(|a| mem.check_range(*a, 1))
        .ok_or_else(|| {
            no_status(BlkError::OutsideGuestMemory {
                addr: last.addr.0,
                len: last.len,
            })
        })?;
    Ok(addr)
}

/// Reads the 16-byte header from the front of the chain, across as many
/// device-readable descriptors as it takes. Returns it and the index of the
/// first data descriptor; a descriptor the header ends inside is cut to the
/// part after it, which is data. Zero-length descriptors are skipped.
fn read_header<T>(
    descs: &mut [Desc],
    mem: &T,
) -> Result<([u8; HEADER_LEN as usize], usize), BlkError>
where
    T: GuestMemoryBackend + ?Sized,
{
    let mut raw = [0u8; HEADER_LEN as usize];
    let mut got = 0usize;
    for (i, d) in descs.iter_mut().enumerate() {
        if got == raw.len() {
            return Ok((raw, i));
        }
        if d.len == 0 {
            continue;
        }
        if d.writable {
            return Err(if got == 0 {
                BlkError::HeaderWritable
            } else {
                BlkError::HeaderLength(got as u32)
            });
        }
        let outside = |d: &Desc| BlkError::OutsideGuestMemory {
            addr: d.addr.0,
            len: d.len,
        };
        // At most 16, so the casts below cannot truncate.
        let n = (raw.len() - got).min(d.len as usize);
        mem.read_slice(&mut raw[got..got + n], d.addr)
            .map_err(|_| outside(d))?;
        got += n;
        if n < d.len as usize {
            d.addr = d
                .addr
                .0
                .checked_add(n as u64)
                .map(GuestAddress)
                .ok_or_else(|| outside(d))?;
            d.len -= n as u32;
            return Ok((raw, i));
        }
    }
    Err(BlkError::HeaderLength(got as u32))
}

/// Checks the data descriptors: inside guest memory, total within limits.
/// Zero-length descriptors are dropped.
fn check_data<T>(
    body: &[Desc],
    mem: &T,
    limits: &DeviceLimits,
) -> Result<(Vec<Segment>, u64), BlkError>
where
    T: GuestMemoryBackend + ?Sized,
{
    let mut total: u64 = 0;
    let mut data = segment_list(body.len());
    for d in body.iter().filter(|d| d.len > 0) {
        let outside = BlkError::OutsideGuestMemory {
            addr: d.addr.0,
            len: d.len,
        };
        let len = usize::try_from(d.len).map_err(|_| BlkError::GuestMemory("length".into()))?;
        if d.addr.0.checked_add(u64::from(d.len)).is_none() || !mem.check_range(d.addr, len) {
            return Err(outside);
        }
        total = total
            .checked_add(u64::from(d.len))
            .ok_or(BlkError::TooLarge {
                len: u64::MAX,
                max: limits.max_data_len(),
            })?;
        data.push(Segment {
            addr: d.addr,
            len: d.len,
        });
    }
    if total > limits.max_data_len() {
        return Err(BlkError::TooLarge {
            len: total,
            max: limits.max_data_len(),
        });
    }
    Ok((data, total))
}

/// Converts `sector` and a byte length to a byte offset, checking that the
/// range neither overflows nor passes the end of the disk.
fn check_range(sector: u64, len: u64, limits: &DeviceLimits) -> Result<u64, BlkError> {
    let err = || BlkError::OutOfRange {
        sector,
        len,
        capacity: limits.capacity_sectors,
    };
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(err)?;
    let end = offset.checked_add(len).ok_or_else(err)?;
    let capacity = limits
        .capacity_sectors
        .checked_mul(SECTOR_SIZE)
        .ok_or_else(err)?;
    if end > capacity {
        return Err(err());
    }
    Ok(offset)
}

/// Reads and checks discard/write-zeroes segments. The segment count is
/// checked against `max_*_seg` before the (small) buffer is allocated.
fn parse_segments<T>(
    data: &[Segment],
    data_len: u64,
    zeroes: bool,
    mem: &T,
    limits: &DeviceLimits,
) -> Result<(Vec<ByteRange>, bool), BlkError>
where
    T: GuestMemoryBackend + ?Sized,
{
    let (max_seg, max_sectors) = if zeroes {
        (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
    } else {
        (limits.max_discard_seg, limits.max_discard_sectors)
    };
    let count = data_len / DISCARD_SEGMENT_LEN;
    if data_len == 0 || data_len % DISCARD_SEGMENT_LEN != 0 || count > u64::from(max_seg) {
        return Err(BlkError::SegmentCount {
            len: data_len,
            max: max_seg,
        });
    }
    // Bounded by max_seg * 16 bytes.
    let mut raw = vec![0u8; data_len as usize];
    let mut pos = 0usize;
    for s in data {
        let n = s.len as usize;
        let dst = raw
            .get_mut(pos..pos + n)
            .ok_or_else(|| BlkError::GuestMemory("segment length".into()))?;
        mem.read_slice(dst, s.addr)
            .map_err(|e| BlkError::GuestMemory(e.to_string()))?;
        pos += n;
    }
    let mut ranges = Vec::with_capacity(count as usize);
    let mut any_unmap = false;
    for seg in raw.chunks_exact(DISCARD_SEGMENT_LEN as usize) {
        let mut s8 = [0u8; 8];
        s8.copy_from_slice(&seg[0..8]);
        let sector = u64::from_le_bytes(s8);
        let mut s4 = [0u8; 4];
        s4.copy_from_slice(&seg[8..12]);
        let sectors = u32::from_le_bytes(s4);
        s4.copy_from_slice(&seg[12..16]);
        let flags = u32::from_le_bytes(s4);
        let allowed = if zeroes {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        if flags & !allowed != 0 {
            return Err(BlkError::SegmentFlags(flags));
        }
        any_unmap |= flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        if sectors > max_sectors {
            return Err(BlkError::SegmentTooLarge {
                sectors,
                max: max_sectors,
            });
        }
        let align = limits.logical_block_sectors.max(1);
        if sector % u64::from(align) != 0 || sectors % align != 0 {
            return Err(BlkError::SegmentUnaligned {
                sector,
                sectors,
                align,
            });
        }
        let len = u64::from(sectors) * SECTOR_SIZE;
        let offset = check_range(sector, len, limits)?;
        ranges.push(ByteRange { offset, len });
    }
    Ok((ranges, any_unmap))
}
