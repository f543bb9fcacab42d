//! The on-disk format of the cache device.
//!
//! ```text
//! offset 0       superblock slot A (4 KiB)
//! offset 4096    superblock slot B (4 KiB)
//! offset 8192    journal (reserved, `journal_len` bytes)
//! table_offset   mapping table, two copies: 4 KiB pages of 510 entries
//! data_offset    data area: cache_blocks frames of block_size bytes
//! ```
//!
//! Superblocks are written alternately to the two slots with an increasing
//! sequence number, so a torn superblock write leaves the other slot valid.
//! Every superblock and table page carries a CRC32C; a mismatch is reported,
//! never ignored.

pub mod journal;
mod layout;
mod superblock;
mod table;

/// Entry bits of the persistent table and journal records (for `check`).
pub use crate::engine::frames::{BLOCK_MASK, DIRTY, VALID};
pub use layout::{Layout, JOURNAL_LEN, META_PAGE};
pub use superblock::{Superblock, FORMAT_VERSION, MAGIC};
pub use table::{decode_page, encode_page, entry_problem, EntryProblem, ENTRIES_PER_PAGE};

use crate::device::{BlockDevice, DeviceError};

/// Metadata errors. Each says what is wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("cache device I/O: {0}")]
    Io(#[from] DeviceError),
    #[error("superblock slot {slot}: {what}")]
    BadSuperblock { slot: usize, what: String },
    #[error("both superblock copies are corrupted (slot A: {a}; slot B: {b})")]
    BothSuperblocksBad { a: String, b: String },
    #[error("mapping table page {page} at offset {offset}: {what}")]
    BadTablePage {
        page: u64,
        offset: u64,
        what: String,
    },
    #[error("mapping table entry {frame}: {what}")]
    BadEntry { frame: u64, what: String },
    #[error("journal damaged at offset {offset}: {what}; committed metadata would be lost, refusing to start (run `vblkcache check`; --format discards the cache and its dirty data)")]
    JournalCorrupt { offset: u64, what: String },
    #[error("journal record for frame {frame} is out of range ({frames} frames)")]
    JournalRecord { frame: u64, frames: u64 },
}

/// Checks decoded entries against a layout (see `table::validate_entries`).
pub fn validate_entries(entries: &[u64], source_blocks: u64, l: &Layout) -> Result<(), MetaError> {
    table::validate_entries(entries, source_blocks, &l.geometry)
}

/// What the superblock area holds.
pub enum Found {
    /// A valid superblock (the newer of the two slots), and its slot.
    Superblock(Superblock, usize),
    /// Both slots and the first MiB of the device are zeros: a blank device.
    Blank,
    /// Something that is not a vblkcache superblock (another filesystem, random data).
    Foreign,
}

/// Reads the superblock slots. Returns an error only when a vblkcache
/// superblock is there but every copy of it is corrupted.
pub fn read_superblock(dev: &dyn BlockDevice) -> Result<Found, MetaError> {
    let mut slots = [vec![0u8; META_PAGE as usize], vec![0u8; META_PAGE as usize]];
    let mut results = Vec::new();
    for (i, buf) in slots.iter_mut().enumerate() {
        if dev.size() < (i as u64 + 1) * META_PAGE {
            results.push(Err(String::from("device too small")));
            continue;
        }
        dev.read_at(buf, i as u64 * META_PAGE)?;
        results.push(Superblock::decode(buf));
    }
    let valid: Vec<(Superblock, usize)> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().ok().map(|sb| (sb.clone(), i)))
        .collect();
    // A slot that is neither blank nor valid is damage (superblock writes are
    // single-sector, so never torn). The valid slot might be the older one,
    // and trusting it could resurrect stale metadata: refuse.
    if !valid.is_empty() {
        for (i, r) in results.iter().enumerate() {
            if let Err(e) = r {
                if !slots[i].iter().all(|&b| b == 0) {
                    return Err(MetaError::BadSuperblock {
                        slot: i,
                        what: format!(
                            "{e}; the other copy may be older, so it is not used (see `vblkcache check`; --format discards the cache and its dirty data)"
                        ),
                    });
                }
            }
        }
    }
    if let Some(best) = valid.into_iter().max_by_key(|(sb, _)| sb.seq) {
        return Ok(Found::Superblock(best.0, best.1));
    }
    let has_magic = slots.iter().any(|s| s.starts_with(MAGIC));
    if has_magic {
        let msg = |r: &Result<Superblock, String>| match r {
            Ok(_) => String::from("ok"),
            Err(e) => e.clone(),
        };
        return Err(MetaError::BothSuperblocksBad {
            a: msg(&results[0]),
            b: msg(&results[1]),
        });
    }
    // Blank only if the first MiB and 256 samples spread over the rest of
    // the device are all zeros (reading a whole SSD would take minutes; a
    // filesystem, volume label or image leaves data near its start anyway).
    let size = dev.size();
    let probe = size.min(1 << 20);
    let mut buf = crate::device::AlignedBuf::new(probe as usize);
    dev.read_at(&mut buf, 0)?;
    if buf.iter().any(|&b| b != 0) {
        return Ok(Found::Foreign);
    }
    const SAMPLES: u64 = 256;
    const SAMPLE: u64 = 4096;
    if size > probe + SAMPLE {
        let mut s = crate::device::AlignedBuf::new(SAMPLE as usize);
        let span = size - probe - SAMPLE;
        for i in 0..SAMPLES {
            let at = (probe + span / SAMPLES * i) / SAMPLE * SAMPLE;
            dev.read_at(&mut s, at)?;
            if s.iter().any(|&b| b != 0) {
                return Ok(Found::Foreign);
            }
        }
    }
    Ok(Found::Blank)
}

/// Writes `sb` into `slot` (0 or 1) and flushes.
pub fn write_superblock(
    dev: &dyn BlockDevice,
    sb: &Superblock,
    slot: usize,
) -> Result<(), MetaError> {
    let page = sb.encode();
    let mut buf = crate::device::AlignedBuf::new(META_PAGE as usize);
    buf.copy_from_slice(&page);
    dev.write_at(&buf, (slot as u64 % 2) * META_PAGE)?;
    dev.flush()?;
    Ok(())
}

/// Loads the whole mapping table. Entries are validated against the layout:
/// out-of-range blocks and duplicate mappings are reported as errors.
pub fn load_table(
    dev: &dyn BlockDevice,
    layout: &Layout,
    copy: u8,
    source_blocks: u64,
) -> Result<Vec<u64>, MetaError> {
    let frames = layout.geometry.cache_blocks;
    let pages = layout.table_pages();
    let mut out = Vec::with_capacity(frames as usize);
    // Read in chunks of 256 pages (1 MiB).
    const CHUNK: u64 = 256;
    let mut buf = crate::device::AlignedBuf::new((CHUNK * META_PAGE) as usize);
    let mut page = 0;
    while page < pages {
        let n = CHUNK.min(pages - page);
        let bytes = (n * META_PAGE) as usize;
        dev.read_at(
            &mut buf[..bytes],
            layout.table_copy_offset(copy) + page * META_PAGE,
        )?;
        for i in 0..n {
            let p = page + i;
            let off = (i * META_PAGE) as usize;
            let want = (frames - p * ENTRIES_PER_PAGE).min(ENTRIES_PER_PAGE) as usize;
            decode_page(&buf[off..off + META_PAGE as usize], p, want, &mut out).map_err(
                |what| MetaError::BadTablePage {
                    page: p,
                    offset: layout.table_copy_offset(copy) + p * META_PAGE,
                    what,
                },
            )?;
        }
        page += n;
    }
    // A clean table is final and checked here; after a crash the caller
    // checks again once the journal has been replayed on top of it.
    validate_entries(&out, source_blocks, layout)?;
    Ok(out)
}

/// Writes the whole mapping table (entries in persistent form).
pub fn save_table(
    dev: &dyn BlockDevice,
    layout: &Layout,
    copy: u8,
    entries: &[u64],
) -> Result<(), MetaError> {
    const CHUNK: u64 = 256;
    let pages = layout.table_pages();
    let mut buf = crate::device::AlignedBuf::new((CHUNK * META_PAGE) as usize);
    let mut page = 0;
    while page < pages {
        let n = CHUNK.min(pages - page);
        for i in 0..n {
            let p = page + i;
            let start = (p * ENTRIES_PER_PAGE) as usize;
            let end = (start + ENTRIES_PER_PAGE as usize).min(entries.len());
            let off = (i * META_PAGE) as usize;
            let enc = encode_page(p, &entries[start.min(end)..end]);
            buf[off..off + META_PAGE as usize].copy_from_slice(&enc);
        }
        let bytes = (n * META_PAGE) as usize;
        dev.write_at(
            &buf[..bytes],
            layout.table_copy_offset(copy) + page * META_PAGE,
        )?;
        page += n;
    }
    Ok(())
}
