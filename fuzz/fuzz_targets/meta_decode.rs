//! The on-disk metadata decoders from arbitrary bytes: superblock, table
//! page, journal sector and a whole-journal scan.
//!
//! Byte 0 chooses what else happens: bit 7 makes the input a full 4 KiB page
//! with its checksum recomputed, so the checks behind the CRC are reached
//! (a random page never passes a CRC32C); bits 0-1 choose the decoder for
//! that page. The rest of the input is also given raw, at its own length,
//! to every decoder. Decoders must never panic; a page that decodes must
//! encode back to the same value.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vblkcache::engine::meta::journal::{decode_sector, encode_commit, scan, Sector, SECTOR};
use vblkcache::engine::meta::{decode_page, encode_page, Superblock, ENTRIES_PER_PAGE};

const PAGE: usize = 4096;

fn put_crc(p: &mut [u8], at: usize, over: std::ops::Range<usize>) {
    let crc = crc32c::crc32c(&p[over]);
    p[at..at + 4].copy_from_slice(&crc.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    // Raw, at whatever length.
    let _ = Superblock::decode(body);
    let _ = decode_sector(body);
    // Scanning arbitrary bytes as a journal must never panic either.
    let start = u64::from(sel) * SECTOR as u64;
    let _ = scan(body, start, u64::from(sel));
    // The table loader asks for at most ENTRIES_PER_PAGE entries.
    let want = usize::from(sel) * 2 % (ENTRIES_PER_PAGE as usize + 1);
    let _ = decode_page(body, u64::from(sel), want, &mut Vec::new());

    if sel & 0x80 == 0 {
        return;
    }
    let mut p = [0u8; PAGE];
    let n = body.len().min(PAGE);
    p[..n].copy_from_slice(&body[..n]);
    match sel & 3 {
        0 => {
            // The superblock's CRC covers its first sector.
            put_crc(&mut p, 508, 0..508);
            if let Ok(sb) = Superblock::decode(&p) {
                assert_eq!(Superblock::decode(&sb.encode()).ok(), Some(sb));
            }
        }
        1 => {
            put_crc(&mut p, 0, 4..PAGE);
            // The index and count the page claims, as a loader would ask.
            let idx = u64::from(u32::from_le_bytes([p[4], p[5], p[6], p[7]]));
            let count = u32::from_le_bytes([p[8], p[9], p[10], p[11]]) as usize;
            let want = count.min(ENTRIES_PER_PAGE as usize);
            let mut out = Vec::new();
            if decode_page(&p, idx, want, &mut out).is_ok() {
                assert_eq!(out.len(), want);
                let again = encode_page(idx, &out);
                let mut back = Vec::new();
                assert!(decode_page(&again, idx, want, &mut back).is_ok());
                assert_eq!(back, out);
            }
        }
        _ => {
            // A journal sector: CRC over the magic and bytes 8..512.
            let s0 = &mut p[..SECTOR];
            let crc = crc32c::crc32c_append(crc32c::crc32c(&s0[0..4]), &s0[8..SECTOR]);
            s0[4..8].copy_from_slice(&crc.to_le_bytes());
            if let Sector::Valid(v) = decode_sector(&p[..SECTOR]) {
                assert!(v.index < v.count);
                if v.count as usize * SECTOR == 4096 && v.index == 0 {
                    let enc = encode_commit(v.seq, &v.records);
                    assert!(matches!(decode_sector(&enc[..SECTOR]), Sector::Valid(ref w) if w.records == v.records));
                }
            }
        }
    }
});
