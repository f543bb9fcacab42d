//! Mapping-table pages.
//!
//! Page layout: `crc32c u32 | page index u32 | count u32 | reserved u32 |
//! count entries u64`, little endian, the CRC covering bytes 4..4096. An entry
//! is `VALID | DIRTY | source block` (see `frames`), or 0 for a free frame.

use super::layout::META_PAGE;
use super::MetaError;
use crate::engine::frames::{BLOCK_MASK, DIRTY, VALID};
use crate::engine::geometry::Geometry;

const HEADER: usize = 16;
/// Entries in one 4 KiB table page.
pub const ENTRIES_PER_PAGE: u64 = (META_PAGE - HEADER as u64) / 8;

/// Encodes page `index` holding `entries` (at most ENTRIES_PER_PAGE).
pub fn encode_page(index: u64, entries: &[u64]) -> [u8; META_PAGE as usize] {
    let mut p = [0u8; META_PAGE as usize];
    p[4..8].copy_from_slice(&(index as u32).to_le_bytes());
    p[8..12].copy_from_slice(&(entries.len() as u32).to_le_bytes());
    for (i, e) in entries.iter().enumerate().take(ENTRIES_PER_PAGE as usize) {
        let o = HEADER + i * 8;
        p[o..o + 8].copy_from_slice(&e.to_le_bytes());
    }
    let crc = crc32c::crc32c(&p[4..]);
    p[0..4].copy_from_slice(&crc.to_le_bytes());
    p
}

fn le32(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(a)
}

/// Decodes page `index`, expecting `want` entries, appending them to `out`.
pub fn decode_page(p: &[u8], index: u64, want: usize, out: &mut Vec<u64>) -> Result<(), String> {
    if p.len() != META_PAGE as usize {
        return Err(format!("page is {} bytes, expected {}", p.len(), META_PAGE));
    }
    let crc = le32(p, 0);
    let actual = crc32c::crc32c(&p[4..]);
    if crc != actual {
        return Err(format!(
            "checksum mismatch (stored {crc:#010x}, computed {actual:#010x})"
        ));
    }
    let idx = le32(p, 4);
    if u64::from(idx) != index & 0xffff_ffff {
        return Err(format!("page holds index {idx}, expected {index}"));
    }
    let count = le32(p, 8) as usize;
    if count != want {
        return Err(format!("page holds {count} entries, expected {want}"));
    }
    for i in 0..count {
        let o = HEADER + i * 8;
        let mut a = [0u8; 8];
        a.copy_from_slice(&p[o..o + 8]);
        out.push(u64::from_le_bytes(a));
    }
    Ok(())
}

/// What can be wrong with one table entry on its own (duplicates need the
/// whole table).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryProblem {
    #[error("invalid entry bits {0:#018x}")]
    Bits(u64),
    #[error("maps source block {block}, past the end of the source ({source_blocks} blocks)")]
    PastSource { block: u64, source_blocks: u64 },
    #[error("maps source block {block} of set {want}, but the frame is in set {have}")]
    WrongSet { block: u64, want: u64, have: u64 },
}

/// Checks entry `e` of `frame` on its own; 0 (a free frame) is fine.
pub fn entry_problem(e: u64, frame: u64, source_blocks: u64, g: &Geometry) -> Option<EntryProblem> {
    if e == 0 {
        return None;
    }
    if e & VALID == 0 || e & !(VALID | DIRTY | BLOCK_MASK) != 0 {
        return Some(EntryProblem::Bits(e));
    }
    let block = e & BLOCK_MASK;
    if block >= source_blocks {
        return Some(EntryProblem::PastSource {
            block,
            source_blocks,
        });
    }
    let (want, have) = (g.set_of(block), g.set_of_frame(frame));
    (want != have).then_some(EntryProblem::WrongSet { block, want, have })
}

/// Checks decoded entries: only known bits, blocks inside the source, each in
/// the set its block maps to, and no block mapped twice.
pub fn validate_entries(
    entries: &[u64],
    source_blocks: u64,
    g: &Geometry,
) -> Result<(), MetaError> {
    let assoc = g.assoc;
    for (f, &e) in entries.iter().enumerate() {
        let frame = f as u64;
        if let Some(p) = entry_problem(e, frame, source_blocks, g) {
            return Err(MetaError::BadEntry {
                frame,
                what: p.to_string(),
            });
        }
    }
    // Every entry is in its own set, so a block mapped twice is mapped twice
    // within one set: check each set on its own (no table-wide hash set).
    let mut blocks: Vec<(u64, u64)> = Vec::with_capacity(assoc as usize);
    for (s, set) in entries.chunks(assoc as usize).enumerate() {
        blocks.clear();
        let first = s as u64 * u64::from(assoc);
        blocks.extend(
            set.iter()
                .enumerate()
                .filter(|(_, &e)| e != 0)
                .map(|(w, &e)| (e & BLOCK_MASK, first + w as u64)),
        );
        blocks.sort_unstable();
        if let Some(w) = blocks.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(MetaError::BadEntry {
                frame: w[1].1,
                what: format!("maps source block {}, which another frame maps too", w[1].0),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_roundtrip_and_corruption() {
        let entries: Vec<u64> = (0..100).map(|i| VALID | i).collect();
        let p = encode_page(7, &entries);
        let mut out = Vec::new();
        decode_page(&p, 7, 100, &mut out).unwrap();
        assert_eq!(out, entries);
        assert!(decode_page(&p, 8, 100, &mut Vec::new())
            .unwrap_err()
            .contains("index"));
        for byte in [0usize, 5, 20, 4095] {
            let mut q = p;
            q[byte] ^= 0x40;
            assert!(decode_page(&q, 7, 100, &mut Vec::new())
                .unwrap_err()
                .contains("checksum"));
        }
    }

    #[test]
    fn validation_catches_bad_entries() {
        let g = Geometry::resolve(
            &crate::engine::geometry::GeometryRequest {
                block_size: Some(4096),
                cache_blocks: Some(8),
                assoc: Some(4),
            },
            8,
        )
        .unwrap();
        assert_eq!((g.sets(), g.run, g.span), (2, 4, 1));
        let mut e = vec![0u64; 8];
        let b = 3u64;
        let f = g.set_of(b) * 4;
        e[f as usize] = VALID | b;
        assert!(validate_entries(&e, 100, &g).is_ok());
        let mut dup = e.clone();
        dup[f as usize + 1] = VALID | b;
        assert!(validate_entries(&dup, 100, &g)
            .unwrap_err()
            .to_string()
            .contains("another frame"));
        assert!(validate_entries(&e, 3, &g)
            .unwrap_err()
            .to_string()
            .contains("past the end"));
        let mut junk = e.clone();
        junk[f as usize] |= 1 << 50;
        assert!(validate_entries(&junk, 100, &g)
            .unwrap_err()
            .to_string()
            .contains("bits"));
    }
}
