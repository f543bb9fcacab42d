//! The superblock: identity, geometry, write mode and shutdown state.
//!
//! Layout (little endian, in a 4 KiB slot; CRC32C of bytes 0..508 stored at 508,
//! the rest of the slot is zeros):
//! ```text
//!  0 magic "VBLKCACH"     8 version u32    12 flags u32
//! 16 seq u64             24 block_size u32 28 assoc u32
//! 32 cache_blocks u64    40 source_size u64
//! 48 mode u8  49 clean u8  50 run u16  52 table_copy u8  53 span u8 (0 in version 1)
//! 56 journal_offset u64  64 journal_len u64
//! 72 table_offset u64    80 data_offset u64
//! 88 uuid [u8;16]        104 commit_seq u64 (sequence of the first commit in the journal)
//! 112 journal_pos u64 (offset in the journal where replay starts)
//! 120 source identity recorded u8 (0: none, as in caches made before it;
//!     1: a regular file; 2: a block device)
//! 122 length u16 of the block device identifier (0: it has none)
//! 128 source inode u64   136 source mtime in ns u64 (a regular file, at
//!                            format, start and clean shutdown; see `open`)
//! 144 run id u64 (random, new at every start; 0 in caches made before it):
//!     names the daemon run whose crash state (`crashstate`) may be applied
//! 160 block device identifier, up to `MAX_BLOCK_ID` (240) printable ASCII
//!     bytes (see `device::DeviceIdentity`)
//! ```

use super::layout::{Layout, META_PAGE};
use crate::device::{valid_block_id, DeviceIdentity, MAX_BLOCK_ID};
use crate::engine::geometry::FrameOrder;
use crate::engine::mode::WriteMode;

pub const MAGIC: &[u8; 8] = b"VBLKCACH";
/// The format version new caches get: 2 maps neighbouring runs to
/// neighbouring sets and orders frames by row (see
/// [`crate::engine::geometry::FrameOrder`]); version 1 caches are still read
/// and written in their own format.
pub const FORMAT_VERSION: u32 = 2;
/// Every field and the CRC fit in the first 512-byte sector, so a superblock
/// write is atomic on any disk: a bad checksum is damage, never a torn write.
const CRC_AT: usize = 508;
/// Where a block device source's identifier starts.
const BLOCK_ID_AT: usize = 160;
const _: () = assert!(BLOCK_ID_AT + MAX_BLOCK_ID <= CRC_AT);
/// Largest sequence number accepted from disk.
pub const MAX_SEQ: u64 = 1 << 62;

/// The decoded superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub seq: u64,
    pub flags: u32,
    pub layout: Layout,
    pub source_size: u64,
    pub mode: WriteMode,
    /// True when the daemon shut down cleanly after writing the full table.
    pub clean: bool,
    pub uuid: [u8; 16],
    pub commit_seq: u64,
    pub journal_pos: u64,
    /// Which of the two table copies is current (0 or 1).
    pub table_copy: u8,
    /// The source this cache belongs to, as last seen (`None` for a memory
    /// source, and in caches made before it).
    pub source_id: Option<DeviceIdentity>,
    /// The run that last opened the cache (see `crashstate`); 0 for none.
    pub run_id: u64,
}

fn put64(p: &mut [u8], o: usize, v: u64) {
    p[o..o + 8].copy_from_slice(&v.to_le_bytes());
}
fn put32(p: &mut [u8], o: usize, v: u32) {
    p[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn get64(p: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&p[o..o + 8]);
    u64::from_le_bytes(a)
}
fn get32(p: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&p[o..o + 4]);
    u32::from_le_bytes(a)
}

impl Superblock {
    pub fn encode(&self) -> [u8; META_PAGE as usize] {
        let mut p = [0u8; META_PAGE as usize];
        let l = &self.layout;
        p[0..8].copy_from_slice(MAGIC);
        put32(&mut p, 8, l.geometry.format_version());
        put32(&mut p, 12, self.flags);
        put64(&mut p, 16, self.seq);
        put32(&mut p, 24, l.geometry.block_size);
        put32(&mut p, 28, l.geometry.assoc);
        put64(&mut p, 32, l.geometry.cache_blocks);
        put64(&mut p, 40, self.source_size);
        p[48] = self.mode.to_u8();
        p[49] = u8::from(self.clean);
        p[50..52].copy_from_slice(&(l.geometry.run as u16).to_le_bytes());
        p[52] = self.table_copy;
        p[53] = match l.geometry.order {
            FrameOrder::BySet => 0,
            FrameOrder::ByRow => l.geometry.span as u8,
        };
        put64(&mut p, 56, l.journal_offset);
        put64(&mut p, 64, l.journal_len);
        put64(&mut p, 72, l.table_offset);
        put64(&mut p, 80, l.data_offset);
        p[88..104].copy_from_slice(&self.uuid);
        put64(&mut p, 104, self.commit_seq);
        put64(&mut p, 112, self.journal_pos);
        match &self.source_id {
            None => {}
            Some(DeviceIdentity::File { ino, mtime_ns }) => {
                p[120] = 1;
                put64(&mut p, 128, *ino);
                put64(&mut p, 136, *mtime_ns);
            }
            Some(DeviceIdentity::Block { id }) => {
                p[120] = 2;
                // Identifiers come from `sysfs_id`, which bounds them; one
                // that is not valid is recorded as none rather than cut.
                if let Some(id) = id.as_deref().filter(|i| valid_block_id(i.as_bytes())) {
                    p[122..124].copy_from_slice(&(id.len() as u16).to_le_bytes());
                    p[BLOCK_ID_AT..BLOCK_ID_AT + id.len()].copy_from_slice(id.as_bytes());
                }
            }
        }
        put64(&mut p, 144, self.run_id);
        let crc = crc32c::crc32c(&p[..CRC_AT]);
        put32(&mut p, CRC_AT, crc);
        p
    }

    /// Decodes and validates a superblock page. The error says what is wrong.
    pub fn decode(p: &[u8]) -> Result<Superblock, String> {
        if p.len() < META_PAGE as usize {
            return Err(format!(
                "superblock is {} bytes, expected {}",
                p.len(),
                META_PAGE
            ));
        }
        if &p[0..8] != MAGIC {
            return Err(String::from("no vblkcache magic"));
        }
        let crc = get32(p, CRC_AT);
        let actual = crc32c::crc32c(&p[..CRC_AT]);
        if crc != actual {
            return Err(format!(
                "checksum mismatch (stored {crc:#010x}, computed {actual:#010x})"
            ));
        }
        let version = get32(p, 8);
        if !(1..=FORMAT_VERSION).contains(&version) {
            return Err(format!("format version {version} is not supported (this build reads versions 1 to {FORMAT_VERSION})"));
        }
        let mode = WriteMode::from_u8(p[48])
            .ok_or_else(|| format!("unknown write mode code {}", p[48]))?;
        let block_size = get32(p, 24);
        let assoc = get32(p, 28);
        let cache_blocks = get64(p, 32);
        let run = u32::from(u16::from_le_bytes([p[50], p[51]]));
        // Re-derive the layout from the geometry and check the stored offsets
        // agree, so a corrupted-but-checksummed field cannot point I/O elsewhere.
        let req = crate::engine::geometry::GeometryRequest {
            block_size: Some(block_size),
            cache_blocks: Some(cache_blocks),
            assoc: Some(assoc),
        };
        let mut g = crate::engine::geometry::Geometry::resolve(&req, cache_blocks)
            .map_err(|e| format!("bad geometry: {e}"))?;
        if version == 1 {
            g = g.version1();
        } else if u32::from(p[53]) != g.span {
            return Err(format!(
                "span {} does not match {} sets (expected {})",
                p[53],
                g.sets(),
                g.span
            ));
        }
        if g.run != run {
            return Err(format!(
                "run length {run} does not match associativity {assoc}"
            ));
        }
        let layout = Layout::new(&g);
        let stored = (get64(p, 56), get64(p, 64), get64(p, 72), get64(p, 80));
        if stored
            != (
                layout.journal_offset,
                layout.journal_len,
                layout.table_offset,
                layout.data_offset,
            )
        {
            return Err(String::from("region offsets do not match the geometry"));
        }
        // Sequence numbers grow by one per write and could never get near
        // this; refusing them keeps every `+ 1` on them from overflowing.
        let (seq, commit_seq) = (get64(p, 16), get64(p, 104));
        if seq > MAX_SEQ || commit_seq > MAX_SEQ {
            return Err(format!(
                "sequence number {} is out of range",
                seq.max(commit_seq)
            ));
        }
        if p[52] > 1 {
            return Err(format!("table copy {} is not 0 or 1", p[52]));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&p[88..104]);
        let source_id = match p[120] {
            0 => None,
            1 => Some(DeviceIdentity::File {
                ino: get64(p, 128),
                mtime_ns: get64(p, 136),
            }),
            2 => {
                let len = usize::from(u16::from_le_bytes([p[122], p[123]]));
                if len > MAX_BLOCK_ID {
                    return Err(format!(
                        "source block device identifier of {len} bytes (at most {MAX_BLOCK_ID})"
                    ));
                }
                let raw = &p[BLOCK_ID_AT..BLOCK_ID_AT + len];
                if len > 0 && !valid_block_id(raw) {
                    return Err(String::from(
                        "source block device identifier is not printable ASCII",
                    ));
                }
                Some(DeviceIdentity::Block {
                    id: (len > 0).then(|| raw.iter().map(|&b| char::from(b)).collect()),
                })
            }
            other => return Err(format!("unknown source identity marker {other}")),
        };
        Ok(Superblock {
            seq: get64(p, 16),
            flags: get32(p, 12),
            layout,
            source_size: get64(p, 40),
            mode,
            clean: p[49] != 0,
            uuid,
            commit_seq: get64(p, 104),
            table_copy: p[52],
            journal_pos: {
                let pos = get64(p, 112);
                if pos % META_PAGE != 0 || pos >= layout.journal_len {
                    return Err(format!("journal position {pos} is outside the journal"));
                }
                pos
            },
            source_id,
            run_id: get64(p, 144),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::geometry::Geometry;

    fn sample() -> Superblock {
        let g = Geometry {
            block_size: 65536,
            cache_blocks: 1024,
            assoc: 256,
            run: 16,
            span: 1,
            order: FrameOrder::ByRow,
        };
        Superblock {
            seq: 9,
            flags: 0,
            layout: Layout::new(&g),
            source_size: 1 << 30,
            mode: WriteMode::Writethrough,
            clean: true,
            uuid: [7; 16],
            commit_seq: 3,
            journal_pos: 8192,
            table_copy: 1,
            source_id: Some(DeviceIdentity::File {
                ino: 1234,
                mtime_ns: 1_700_000_000_123_456_789,
            }),
            run_id: 0x0123_4567_89ab_cdef,
        }
    }

    #[test]
    fn roundtrip() {
        let sb = sample();
        assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
        // Caches made before the source identity have zeros there.
        let old = Superblock {
            source_id: None,
            ..sample()
        };
        let page = old.encode();
        assert!(page[120..144].iter().all(|&b| b == 0));
        assert_eq!(Superblock::decode(&page).unwrap(), old);
    }

    #[test]
    fn block_device_identities_roundtrip() {
        for id in [
            None,
            Some(String::from("dm:LVM-abc/part1@2048")),
            Some("w".repeat(MAX_BLOCK_ID)),
        ] {
            let sb = Superblock {
                source_id: Some(DeviceIdentity::Block { id }),
                ..sample()
            };
            assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
        }
    }

    #[test]
    fn a_bad_block_device_identifier_is_refused() {
        let sb = Superblock {
            source_id: Some(DeviceIdentity::Block {
                id: Some(String::from("wwid:x")),
            }),
            ..sample()
        };
        let mut p = sb.encode();
        p[122..124].copy_from_slice(&(MAX_BLOCK_ID as u16 + 1).to_le_bytes());
        reseal(&mut p);
        let e = Superblock::decode(&p).unwrap_err();
        assert!(e.contains("identifier of 241 bytes"), "{e}");
        let mut p = sb.encode();
        p[BLOCK_ID_AT + 2] = b' ';
        reseal(&mut p);
        let e = Superblock::decode(&p).unwrap_err();
        assert!(e.contains("not printable"), "{e}");
        let mut p = sb.encode();
        p[120] = 3;
        reseal(&mut p);
        let e = Superblock::decode(&p).unwrap_err();
        assert!(e.contains("unknown source identity marker 3"), "{e}");
    }

    #[test]
    fn huge_sequence_is_refused() {
        for at in [16usize, 104] {
            let mut p = sample().encode();
            p[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
            let crc = crc32c::crc32c(&p[..CRC_AT]);
            p[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
            let e = Superblock::decode(&p).unwrap_err();
            assert!(e.contains("out of range"), "{e}");
        }
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let page = sample().encode();
        for i in (0..512).step_by(3) {
            let mut p = page;
            p[i] ^= 0x01;
            assert!(Superblock::decode(&p).is_err(), "flip at {i} not detected");
        }
    }

    fn reseal(p: &mut [u8; META_PAGE as usize]) {
        let crc = crc32c::crc32c(&p[..CRC_AT]);
        p[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn version_1_roundtrips_in_its_own_format() {
        let mut sb = sample();
        sb.layout = Layout::new(&sb.layout.geometry.version1());
        let p = sb.encode();
        assert_eq!((get32(&p, 8), p[53]), (1, 0));
        let back = Superblock::decode(&p).unwrap();
        assert_eq!(back, sb);
        assert_eq!(back.layout.geometry.order, FrameOrder::BySet);
        let v2 = sample().encode();
        assert_eq!((get32(&v2, 8), v2[53]), (2, 1));
    }

    #[test]
    fn unknown_version_and_wrong_span_are_refused() {
        let mut p = sample().encode();
        put32(&mut p, 8, 3);
        reseal(&mut p);
        let e = Superblock::decode(&p).unwrap_err();
        assert!(e.contains("format version 3"), "{e}");
        let mut p = sample().encode();
        p[53] = 8;
        reseal(&mut p);
        let e = Superblock::decode(&p).unwrap_err();
        assert!(e.contains("span 8"), "{e}");
    }
}
