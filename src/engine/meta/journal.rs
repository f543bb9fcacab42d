//! Journal blocks: the metadata changes of one commit.
//!
//! A commit is `count` consecutive 4 KiB blocks in the journal area, all
//! carrying the commit's sequence number. Block layout (little endian):
//! `magic u32 | crc32c u32 (of bytes 8..4096) | seq u64 | index u16 |
//! count u16 | records u32 | reserved u64 | records: (frame u64, value u64)*`.
//! A record sets the committed table value of `frame` (`VALID|DIRTY|block`,
//! or 0 for "not dirty").
//!
//! Commit sequence numbers only grow over the life of the cache, so blocks
//! left in the ring by earlier generations are recognised as stale.

use super::layout::META_PAGE;

pub const JOURNAL_MAGIC: u32 = 0x314a_4256; // "VBJ1"
const HEADER: usize = 32;
/// Records in one journal block.
pub const RECORDS_PER_BLOCK: usize = (META_PAGE as usize - HEADER) / 16;

/// One decoded journal block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalBlock {
    pub seq: u64,
    pub index: u16,
    pub count: u16,
    pub records: Vec<(u64, u64)>,
}

/// Encodes the records of commit `seq` into blocks.
pub fn encode_commit(seq: u64, records: &[(u64, u64)]) -> Vec<[u8; META_PAGE as usize]> {
    let chunks: Vec<&[(u64, u64)]> = if records.is_empty() {
        vec![&[]]
    } else {
        records.chunks(RECORDS_PER_BLOCK).collect()
    };
    let count = chunks.len() as u16;
    chunks
        .iter()
        .enumerate()
        .map(|(i, recs)| {
            let mut p = [0u8; META_PAGE as usize];
            p[0..4].copy_from_slice(&JOURNAL_MAGIC.to_le_bytes());
            p[8..16].copy_from_slice(&seq.to_le_bytes());
            p[16..18].copy_from_slice(&(i as u16).to_le_bytes());
            p[18..20].copy_from_slice(&count.to_le_bytes());
            p[20..24].copy_from_slice(&(recs.len() as u32).to_le_bytes());
            for (k, (f, v)) in recs.iter().enumerate() {
                let o = HEADER + k * 16;
                p[o..o + 8].copy_from_slice(&f.to_le_bytes());
                p[o + 8..o + 16].copy_from_slice(&v.to_le_bytes());
            }
            let crc = crc32c::crc32c(&p[8..]);
            p[4..8].copy_from_slice(&crc.to_le_bytes());
            p
        })
        .collect()
}

fn le<const N: usize>(p: &[u8], o: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&p[o..o + N]);
    a
}

/// Decodes a journal block; `Err` says why it is not a valid block.
pub fn decode_block(p: &[u8]) -> Result<JournalBlock, String> {
    if p.len() != META_PAGE as usize {
        return Err(format!("block is {} bytes", p.len()));
    }
    if u32::from_le_bytes(le(p, 0)) != JOURNAL_MAGIC {
        return Err(String::from("no journal magic"));
    }
    let crc = u32::from_le_bytes(le(p, 4));
    if crc != crc32c::crc32c(&p[8..]) {
        return Err(String::from("checksum mismatch"));
    }
    let seq = u64::from_le_bytes(le(p, 8));
    let index = u16::from_le_bytes(le(p, 16));
    let count = u16::from_le_bytes(le(p, 18));
    let n = u32::from_le_bytes(le(p, 20)) as usize;
    if n > RECORDS_PER_BLOCK || count == 0 || index >= count {
        return Err(format!(
            "bad header (records {n}, index {index}, count {count})"
        ));
    }
    let records = (0..n)
        .map(|k| {
            let o = HEADER + k * 16;
            (
                u64::from_le_bytes(le(p, o)),
                u64::from_le_bytes(le(p, o + 8)),
            )
        })
        .collect();
    Ok(JournalBlock {
        seq,
        index,
        count,
        records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_roundtrip_across_blocks() {
        let recs: Vec<(u64, u64)> = (0..600).map(|i| (i, i * 3)).collect();
        let blocks = encode_commit(42, &recs);
        assert_eq!(blocks.len(), 3);
        let mut all = Vec::new();
        for (i, b) in blocks.iter().enumerate() {
            let d = decode_block(b).unwrap();
            assert_eq!((d.seq, d.index as usize, d.count), (42, i, 3));
            all.extend(d.records);
        }
        assert_eq!(all, recs);
    }

    #[test]
    fn any_flip_is_detected() {
        let b = encode_commit(7, &[(1, 2), (3, 4)])[0];
        for i in (0..4096).step_by(13) {
            let mut c = b;
            c[i] ^= 0x80;
            assert!(decode_block(&c).is_err(), "flip at {i}");
        }
        assert!(decode_block(&[0u8; 4096]).is_err());
    }
}
