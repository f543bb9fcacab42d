//! Executing a parsed [`Request`] against the engine.
//!
//! Data moves through a bounce buffer of at most [`CHUNK`] bytes, so memory
//! per I/O thread is bounded whatever the guest asks for; consecutive guest
//! segments are coalesced into one engine call per chunk. Guest memory is
//! only touched through vm-memory's checked accessors.

use super::request::{BlkError, Request, RequestKind, Segment};
use crate::engine::Engine;
use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_OK};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

/// Largest engine call made for one piece of a request.
pub const CHUNK: usize = 1 << 20;

/// Runs `req`; returns how many bytes were written into guest data buffers
/// (not counting the status byte).
pub fn execute<T>(
    req: &Request,
    mem: &T,
    engine: &Engine,
    serial: &[u8; VIRTIO_BLK_ID_BYTES as usize],
    buf: &mut Vec<u8>,
) -> Result<u32, BlkError>
where
    T: GuestMemoryBackend + ?Sized,
{
    match &req.kind {
        RequestKind::Read { offset } => {
            let mut done = 0u64;
            while done < req.data_len {
                let n = chunk_len(req.data_len - done);
                let piece = bounce(buf, n);
                engine.read(offset + done, piece)?;
                scatter(mem, &req.data, done, piece)?;
                done += n as u64;
            }
            u32::try_from(req.data_len).map_err(|_| BlkError::GuestMemory("length".into()))
        }
        RequestKind::Write { offset } => {
            let mut done = 0u64;
            while done < req.data_len {
                let n = chunk_len(req.data_len - done);
                let piece = bounce(buf, n);
                gather(mem, &req.data, done, piece)?;
                engine.write(offset + done, piece)?;
                done += n as u64;
            }
            Ok(0)
        }
        RequestKind::Flush => {
            engine.flush()?;
            Ok(0)
        }
        RequestKind::GetId => {
            let n = usize::try_from(req.data_len)
                .unwrap_or(usize::MAX)
                .min(serial.len());
            scatter(mem, &req.data, 0, &serial[..n])?;
            // n <= 20
            Ok(n as u32)
        }
        RequestKind::Discard { ranges } => {
            for r in ranges {
                engine.discard(r.offset, r.len)?;
            }
            Ok(0)
        }
        RequestKind::WriteZeroes { ranges, .. } => {
            // Unmap is only a permission; zeroes must read back either way.
            for r in ranges {
                engine.write_zeroes(r.offset, r.len)?;
            }
            Ok(0)
        }
    }
}

/// Writes the status byte.
pub fn write_status<T>(mem: &T, addr: GuestAddress, status: u8) -> Result<(), BlkError>
where
    T: GuestMemoryBackend + ?Sized,
{
    mem.write_obj(status, addr)
        .map_err(|e| BlkError::GuestMemory(e.to_string()))
}

/// The status byte for an outcome.
pub fn status_of(result: &Result<u32, BlkError>) -> u8 {
    match result {
        Ok(_) => VIRTIO_BLK_S_OK as u8,
        Err(e) => e.status(),
    }
}

fn chunk_len(remaining: u64) -> usize {
    usize::try_from(remaining).map_or(CHUNK, |r| r.min(CHUNK))
}

fn bounce(buf: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if buf.len() < n {
        buf.resize(n, 0);
    }
    &mut buf[..n]
}

/// Calls `f(addr, range_in_piece)` for each part of the segment list that
/// covers bytes `[skip, skip + len)` of the request data.
pub(super) fn walk<F>(segs: &[Segment], skip: u64, len: usize, mut f: F) -> Result<(), BlkError>
where
    F: FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), BlkError>,
{
    let mut seg_start = 0u64;
    let mut pos = 0usize;
    for s in segs {
        if pos == len {
            break;
        }
        let seg_len = u64::from(s.len);
        let seg_end = seg_start + seg_len;
        let want = skip + pos as u64;
        if want < seg_end {
            let in_seg = want - seg_start;
            let n = (seg_len - in_seg).min((len - pos) as u64) as usize;
            // Segment ranges were checked against guest memory by the parser.
            let addr = s
                .addr
                .checked_add(in_seg)
                .ok_or_else(|| BlkError::GuestMemory("address overflow".into()))?;
            f(addr, pos..pos + n)?;
            pos += n;
        }
        seg_start = seg_end;
    }
    if pos != len {
        return Err(BlkError::GuestMemory(
            "request data shorter than expected".into(),
        ));
    }
    Ok(())
}

/// Copies `piece` into the guest segments at request offset `skip`.
fn scatter<T>(mem: &T, segs: &[Segment], skip: u64, piece: &[u8]) -> Result<(), BlkError>
where
    T: GuestMemoryBackend + ?Sized,
{
    walk(segs, skip, piece.len(), |addr, r| {
        mem.write_slice(&piece[r], addr)
            .map_err(|e| BlkError::GuestMemory(e.to_string()))
    })
}

/// Fills `piece` from the guest segments at request offset `skip`.
fn gather<T>(mem: &T, segs: &[Segment], skip: u64, piece: &mut [u8]) -> Result<(), BlkError>
where
    T: GuestMemoryBackend + ?Sized,
{
    let len = piece.len();
    walk(segs, skip, len, |addr, r| {
        mem.read_slice(&mut piece[r], addr)
            .map_err(|e| BlkError::GuestMemory(e.to_string()))
    })
}
