//! The commit journal: the metadata changes of each commit.
//!
//! A commit is a run of 512-byte sectors, padded to a multiple of 4 KiB, all
//! carrying the commit's sequence number. Sector layout (little endian):
//! `magic u32 | crc32c u32 | seq u64 | index u16 | count u16 | records u16 |
//! reserved u16 | records: (frame u64, value u64) * 30`, the CRC covering the
//! magic and bytes 8..512. A record sets the committed table value of `frame`
//! (`VALID|DIRTY|block`, or 0 for "not dirty").
//!
//! Why sectors: a disk writes a sector entirely or not at all, so a commit cut
//! short by a crash shows sectors that are *stale* (an older sequence number,
//! or zeros) — never a sector with a bad checksum. A bad checksum is therefore
//! damage, and recovery refuses to start rather than silently falling back to
//! an older state. The journal area is zeroed when the cache is formatted, and
//! sequence numbers only grow over the life of the cache, so sectors left by
//! earlier generations are recognised as stale.

pub const SECTOR: usize = 512;
pub const JOURNAL_MAGIC: u32 = 0x314a_4256; // "VBJ1"
const HEADER: usize = 24;
/// Records in one journal sector.
pub const RECORDS_PER_SECTOR: usize = (SECTOR - HEADER) / 16;
/// Commits are written in units of this many bytes (O_DIRECT alignment).
pub const COMMIT_ALIGN: usize = 4096;

/// True for a value a record may carry: 0, or `VALID|DIRTY|block` bits only.
pub fn valid_value(v: u64) -> bool {
    use crate::engine::frames::{BLOCK_MASK, DIRTY, VALID};
    v == 0 || (v & VALID != 0 && v & !(VALID | DIRTY | BLOCK_MASK) == 0)
}

/// A valid journal sector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalSector {
    pub seq: u64,
    pub index: u16,
    pub count: u16,
    pub records: Vec<(u64, u64)>,
}

/// What a 512-byte sector holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sector {
    /// Never written since the cache was formatted.
    Zero,
    Valid(JournalSector),
    /// Neither zeros nor a valid sector: damage.
    Invalid(String),
}

fn crc(p: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&p[0..4]), &p[8..SECTOR])
}

/// Encodes the records of commit `seq`; the result is a multiple of 4 KiB.
pub fn encode_commit(seq: u64, records: &[(u64, u64)]) -> Vec<u8> {
    let used = records.len().div_ceil(RECORDS_PER_SECTOR).max(1);
    let sectors = (used * SECTOR).div_ceil(COMMIT_ALIGN) * COMMIT_ALIGN / SECTOR;
    let mut out = vec![0u8; sectors * SECTOR];
    let mut chunks = records.chunks(RECORDS_PER_SECTOR);
    for (i, p) in out.chunks_mut(SECTOR).enumerate() {
        let recs = chunks.next().unwrap_or(&[]);
        p[0..4].copy_from_slice(&JOURNAL_MAGIC.to_le_bytes());
        p[8..16].copy_from_slice(&seq.to_le_bytes());
        p[16..18].copy_from_slice(&(i as u16).to_le_bytes());
        p[18..20].copy_from_slice(&(sectors as u16).to_le_bytes());
        p[20..22].copy_from_slice(&(recs.len() as u16).to_le_bytes());
        for (k, (f, v)) in recs.iter().enumerate() {
            let o = HEADER + k * 16;
            p[o..o + 8].copy_from_slice(&f.to_le_bytes());
            p[o + 8..o + 16].copy_from_slice(&v.to_le_bytes());
        }
        let c = crc(p);
        p[4..8].copy_from_slice(&c.to_le_bytes());
    }
    out
}

fn le<const N: usize>(p: &[u8], o: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&p[o..o + N]);
    a
}

/// Classifies one sector.
pub fn decode_sector(p: &[u8]) -> Sector {
    if p.len() != SECTOR {
        return Sector::Invalid(format!("sector is {} bytes", p.len()));
    }
    if p.iter().all(|&b| b == 0) {
        return Sector::Zero;
    }
    if u32::from_le_bytes(le(p, 0)) != JOURNAL_MAGIC {
        return Sector::Invalid(String::from("no journal magic"));
    }
    if u32::from_le_bytes(le(p, 4)) != crc(p) {
        return Sector::Invalid(String::from("checksum mismatch"));
    }
    let seq = u64::from_le_bytes(le(p, 8));
    let index = u16::from_le_bytes(le(p, 16));
    let count = u16::from_le_bytes(le(p, 18));
    let n = usize::from(u16::from_le_bytes(le(p, 20)));
    if n > RECORDS_PER_SECTOR || count == 0 || index >= count {
        return Sector::Invalid(format!(
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
    Sector::Valid(JournalSector {
        seq,
        index,
        count,
        records,
    })
}

/// Why a journal scan stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanEnd {
    /// A blank or stale sector where the next commit would start.
    End,
    /// The next commit was cut short by a crash (it is ignored).
    TornTail,
    /// The scan reached the end of the journal area.
    Full,
    /// Damage: a sector with a bad checksum, an impossible header, or a newer
    /// commit after the stop point. `offset` is inside the journal area.
    Corrupt { offset: u64, what: String },
}

/// One complete commit found by a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundCommit {
    pub seq: u64,
    pub offset: u64,
    pub records: Vec<(u64, u64)>,
}

/// The result of scanning a journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    pub commits: Vec<FoundCommit>,
    pub end: ScanEnd,
    /// Offset (inside the journal) where the scan stopped.
    pub end_offset: u64,
    /// Sequence number after the last complete commit.
    pub next_seq: u64,
}

/// Scans `journal` (the whole journal area) from byte `start`, expecting the
/// commit with sequence number `seq` first.
pub fn scan(journal: &[u8], start: u64, seq: u64) -> Scan {
    let sectors: Vec<&[u8]> = journal.chunks_exact(SECTOR).collect();
    let n = sectors.len();
    let mut out = Scan {
        commits: Vec::new(),
        end: ScanEnd::Full,
        end_offset: start,
        next_seq: seq,
    };
    let corrupt = |i: usize, what: String| ScanEnd::Corrupt {
        offset: (i * SECTOR) as u64,
        what,
    };
    let mut i = (start as usize) / SECTOR;
    loop {
        out.end_offset = (i * SECTOR) as u64;
        if i >= n {
            out.end = ScanEnd::Full;
            break;
        }
        let head = match decode_sector(sectors[i]) {
            Sector::Zero => {
                out.end = ScanEnd::End;
                break;
            }
            Sector::Invalid(what) => {
                out.end = corrupt(i, what);
                return out;
            }
            Sector::Valid(s) if s.seq < out.next_seq => {
                out.end = ScanEnd::End;
                break;
            }
            Sector::Valid(s) if s.seq > out.next_seq || s.index != 0 => {
                out.end = corrupt(
                    i,
                    format!(
                        "sector of commit {} (index {}) where commit {} should start",
                        s.seq, s.index, out.next_seq
                    ),
                );
                return out;
            }
            Sector::Valid(s) => s,
        };
        let count = usize::from(head.count);
        if i + count > n {
            out.end = corrupt(
                i,
                format!("commit of {count} sectors runs past the journal"),
            );
            return out;
        }
        let mut records = Vec::new();
        let mut torn = false;
        for (k, p) in sectors[i..i + count].iter().enumerate() {
            match decode_sector(p) {
                Sector::Invalid(what) => {
                    out.end = corrupt(i + k, what);
                    return out;
                }
                Sector::Zero => torn = true,
                Sector::Valid(s) if s.seq != out.next_seq => torn = true,
                Sector::Valid(s) if usize::from(s.index) == k && s.count == head.count => {
                    records.extend(s.records)
                }
                Sector::Valid(s) => {
                    out.end = corrupt(
                        i + k,
                        format!(
                            "sector index {} count {} inside commit of {count} at position {k}",
                            s.index, s.count
                        ),
                    );
                    return out;
                }
            }
        }
        if torn {
            out.end = ScanEnd::TornTail;
            break;
        }
        out.commits.push(FoundCommit {
            seq: out.next_seq,
            offset: (i * SECTOR) as u64,
            records,
        });
        out.next_seq += 1;
        i += count;
    }
    // A newer commit after the stop point means the stop was not the crash.
    for (k, p) in sectors.iter().enumerate().skip(i) {
        if let Sector::Valid(s) = decode_sector(p) {
            if s.seq > out.next_seq {
                out.end = corrupt(
                    i,
                    format!(
                        "commit {} follows at journal offset {} although the replay stops here",
                        s.seq,
                        k * SECTOR
                    ),
                );
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(commits: &[(u64, Vec<(u64, u64)>)], len: usize) -> Vec<u8> {
        let mut j = vec![0u8; len];
        let mut pos = 0;
        for (seq, recs) in commits {
            let b = encode_commit(*seq, recs);
            j[pos..pos + b.len()].copy_from_slice(&b);
            pos += b.len();
        }
        j
    }

    #[test]
    fn commits_roundtrip_across_sectors() {
        let recs: Vec<(u64, u64)> = (0..100).map(|i| (i, i * 3)).collect();
        let j = journal(&[(5, recs.clone()), (6, vec![(1, 2)])], 64 << 10);
        let s = scan(&j, 0, 5);
        assert_eq!(s.commits.len(), 2);
        assert_eq!(s.commits[0].records, recs);
        assert_eq!(s.end, ScanEnd::End);
        assert_eq!(s.next_seq, 7);
        assert_eq!(s.end_offset, 8192);
    }

    #[test]
    fn torn_tail_is_not_corruption() {
        let mut j = journal(
            &[(5, vec![(1, 2)]), (6, (0..100).map(|i| (i, 0)).collect())],
            64 << 10,
        );
        // Commit 6 lost its third sector in the crash (still zeros).
        j[4096 + 2 * SECTOR..4096 + 3 * SECTOR].fill(0);
        let s = scan(&j, 0, 5);
        assert_eq!((s.commits.len(), s.end.clone()), (1, ScanEnd::TornTail));
        // A stale sector (older commit) in its place is torn as well.
        let old = encode_commit(2, &[(9, 9)]);
        j[4096 + 2 * SECTOR..4096 + 3 * SECTOR].copy_from_slice(&old[..SECTOR]);
        assert_eq!(scan(&j, 0, 5).end, ScanEnd::TornTail);
    }

    #[test]
    fn any_flip_in_a_commit_is_corruption() {
        let j = journal(&[(5, vec![(1, 2), (3, 4)]), (6, vec![(7, 8)])], 32 << 10);
        for byte in (0..8192).step_by(37) {
            let mut c = j.clone();
            c[byte] ^= 0x10;
            let s = scan(&c, 0, 5);
            assert!(
                matches!(s.end, ScanEnd::Corrupt { .. }),
                "flip at {byte}: {:?}",
                s.end
            );
        }
    }

    #[test]
    fn later_commit_after_stop_is_corruption() {
        let mut j = journal(
            &[(5, vec![(1, 2)]), (6, vec![(1, 0)]), (7, vec![(2, 2)])],
            32 << 10,
        );
        j[4096..8192].fill(0); // commit 6 vanished but 7 is there
        assert!(matches!(scan(&j, 0, 5).end, ScanEnd::Corrupt { .. }));
    }
}
