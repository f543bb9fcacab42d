//! Offline verification of a cache device (`vblkcache check`).
//!
//! The checker reads the on-disk format (see [`crate::engine::meta`]) the
//! way a starting daemon would, but instead of stopping at the first problem
//! it collects every one into a typed [`Report`]:
//!
//! - **superblock**: both slots decoded; the newer valid one is used. A
//!   corrupted slot next to a valid one is a problem that `--repair` fixes by
//!   copying the valid slot (no data can be lost by that).
//! - **journal**: walked from the superblock's position and sequence number
//!   exactly as recovery replays it. A commit cut short by a crash (a *torn
//!   tail*) is not a problem: it is what a crash leaves, and recovery ignores
//!   it. A damaged block followed by a newer commit is corruption.
//! - **table**: page checksums and indexes, then every entry (unknown bits,
//!   blocks past the end of the recorded source, entries in the wrong set,
//!   blocks mapped twice) both as stored and, after an unclean shutdown, as
//!   recovery would rebuild it (journal applied, clean entries dropped).
//!
//! Nothing here changes the device except `repair`, and only where no dirty
//! data can be lost.

use crate::device::{AlignedBuf, BlockDevice};
use crate::engine::meta::{
    self, journal, Layout, Superblock, BLOCK_MASK, DIRTY, ENTRIES_PER_PAGE, MAGIC, META_PAGE, VALID,
};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// At most this many entry problems are listed one by one; the rest are counted.
pub const MAX_LISTED: usize = 64;

mod human;
mod report;

pub use human::write_human;
pub use report::{
    Area, CheckError, Counts, JournalEnd, JournalReport, Problem, Report, SlotReport,
    SuperblockReport, TableReport,
};

/// Checks the cache device; with `repair`, fixes what can be fixed without
/// losing dirty data (then `problems` lists only what is left).
pub fn check_device(dev: &dyn BlockDevice, repair: bool) -> Result<Report, CheckError> {
    let mut r = Report {
        device: dev.name(),
        device_size: dev.size(),
        consistent: false,
        slots: Vec::new(),
        superblock: None,
        journal: None,
        table: None,
        problems: Vec::new(),
        repairs: Vec::new(),
    };
    let Some((sb, slot)) = check_superblocks(dev, &mut r, repair)? else {
        r.consistent = false;
        return Ok(r);
    };
    let l = sb.layout;
    r.superblock = Some(SuperblockReport {
        slot,
        seq: sb.seq,
        clean: sb.clean,
        mode: sb.mode,
        format_version: l.geometry.format_version(),
        block_size: l.geometry.block_size,
        cache_blocks: l.geometry.cache_blocks,
        assoc: l.geometry.assoc,
        span: l.geometry.span,
        source_size: sb.source_size,
        source: sb.source_id.as_ref().map(|i| i.to_string()),
        commit_seq: sb.commit_seq,
        journal_pos: sb.journal_pos,
        journal_offset: l.journal_offset,
        journal_len: l.journal_len,
        table_offset: l.table_copy_offset(sb.table_copy),
        data_offset: l.data_offset,
        device_len: l.device_len(),
    });
    if l.device_len() > dev.size() {
        r.problem(
            Area::Superblock,
            format!(
                "the cache needs {} bytes but the device has only {}",
                l.device_len(),
                dev.size()
            ),
        );
        r.consistent = false;
        return Ok(r);
    }
    let source_blocks = sb.source_size.div_ceil(u64::from(l.geometry.block_size));
    let (mut entries, bad_pages) = read_table(dev, &l, sb.table_copy, &mut r)?;
    let stored = counts(&entries);
    let mut listed = 0usize;
    let mut unlisted = 0u64;
    for (frame, what) in entry_problems(&entries, source_blocks, &l) {
        push_limited(&mut r, Area::Table, frame, what, &mut listed, &mut unlisted);
    }
    let (jr, records) = walk_journal(dev, &l, &sb, &mut r)?;
    r.journal = Some(JournalReport {
        replayed_on_start: !sb.clean,
        ..jr
    });
    let recovered = if sb.clean {
        stored
    } else {
        for (f, v) in records {
            if let Some(slot) = entries.get_mut(f as usize) {
                *slot = v;
            }
        }
        for e in entries.iter_mut() {
            if *e & DIRTY == 0 {
                *e = 0;
            }
        }
        for (frame, what) in entry_problems(&entries, source_blocks, &l) {
            push_limited(
                &mut r,
                Area::Recovered,
                frame,
                what,
                &mut listed,
                &mut unlisted,
            );
        }
        counts(&entries)
    };
    r.table = Some(TableReport {
        pages: l.table_pages(),
        bad_pages,
        stored,
        recovered,
        unlisted_problems: unlisted,
    });
    r.consistent = r.problems.is_empty() && unlisted == 0;
    Ok(r)
}

fn push_limited(
    r: &mut Report,
    area: Area,
    frame: u64,
    what: String,
    listed: &mut usize,
    unlisted: &mut u64,
) {
    if *listed < MAX_LISTED {
        *listed += 1;
        r.problem(area, format!("entry {frame}: {what}"));
    } else {
        *unlisted += 1;
    }
}

fn counts(entries: &[u64]) -> Counts {
    Counts {
        valid: entries.iter().filter(|&&e| e & VALID != 0).count() as u64,
        dirty: entries
            .iter()
            .filter(|&&e| e & VALID != 0 && e & DIRTY != 0)
            .count() as u64,
    }
}

fn read_page(dev: &dyn BlockDevice, offset: u64) -> Result<AlignedBuf, CheckError> {
    let mut b = AlignedBuf::new(META_PAGE as usize);
    dev.read_at(&mut b, offset)?;
    Ok(b)
}

/// Decodes both slots; returns the superblock to use and its slot.
fn check_superblocks(
    dev: &dyn BlockDevice,
    r: &mut Report,
    repair: bool,
) -> Result<Option<(Superblock, usize)>, CheckError> {
    let mut decoded = Vec::new();
    let mut blank = [false; 2];
    let mut magic = false;
    for slot in 0..2u64 {
        if dev.size() < (slot + 1) * META_PAGE {
            decoded.push(Err(String::from("device too small")));
            continue;
        }
        let page = read_page(dev, slot * META_PAGE)?;
        magic |= page.starts_with(MAGIC);
        blank[slot as usize] = page.iter().all(|&b| b == 0);
        decoded.push(Superblock::decode(&page));
    }
    r.slots = decoded
        .iter()
        .map(|d| match d {
            Ok(sb) => SlotReport {
                valid: true,
                seq: Some(sb.seq),
                clean: Some(sb.clean),
                error: None,
            },
            Err(e) => SlotReport {
                valid: false,
                seq: None,
                clean: None,
                error: Some(e.clone()),
            },
        })
        .collect();
    let best = decoded
        .iter()
        .enumerate()
        .filter_map(|(i, d)| d.as_ref().ok().map(|sb| (sb.clone(), i)))
        .max_by_key(|(sb, _)| sb.seq);
    let Some((sb, slot)) = best else {
        let what = if magic {
            String::from("both superblock copies are corrupted")
        } else {
            String::from("no vblkcache superblock (blank device or not a vblkcache cache)")
        };
        r.problem(Area::Superblock, what);
        return Ok(None);
    };
    let other = 1 - slot;
    match &decoded[other] {
        // A freshly formatted cache has written only one slot.
        Err(_) if blank[other] => {}
        Err(e) => {
            // Superblock writes are single-sector, so this is damage, not a
            // torn write; the damaged copy may have been the newer one, so
            // rewriting it from the valid copy could lose dirty data.
            let _ = repair;
            r.problems.push(Problem {
                area: Area::Superblock,
                what: format!(
                    "slot {other}: {e}; slot {slot} is valid but may be older, so no safe repair exists"
                ),
                repairable: false,
            });
        }
        Ok(o) => {
            if o.uuid != sb.uuid || o.layout != sb.layout || o.source_size != sb.source_size {
                r.problem(
                    Area::Superblock,
                    String::from("the two slots describe different caches (uuid, geometry or source size differ)"),
                );
            }
        }
    }
    Ok(Some((sb, slot)))
}

/// Reads every table page; a bad page is reported and read as free entries.
fn read_table(
    dev: &dyn BlockDevice,
    l: &Layout,
    copy: u8,
    r: &mut Report,
) -> Result<(Vec<u64>, u64), CheckError> {
    let mut entries = Vec::with_capacity(l.geometry.cache_blocks as usize);
    let mut bad = 0;
    for p in 0..l.table_pages() {
        let offset = l.table_copy_offset(copy) + p * META_PAGE;
        let want = (l.geometry.cache_blocks - p * ENTRIES_PER_PAGE).min(ENTRIES_PER_PAGE) as usize;
        let page = read_page(dev, offset)?;
        let before = entries.len();
        if let Err(what) = meta::decode_page(&page, p, want, &mut entries) {
            entries.truncate(before);
            entries.resize(before + want, 0);
            bad += 1;
            r.problem(Area::Table, format!("page {p} at offset {offset}: {what}"));
        }
    }
    Ok((entries, bad))
}

/// Every problem of the entries: (frame, description).
fn entry_problems(entries: &[u64], source_blocks: u64, l: &Layout) -> Vec<(u64, String)> {
    let g = l.geometry;
    let mut out = Vec::new();
    let mut owner: HashMap<u64, u64> = HashMap::new();
    for (f, &e) in entries.iter().enumerate() {
        let frame = f as u64;
        if e == 0 {
            continue;
        }
        if let Some(p) = meta::entry_problem(e, frame, source_blocks, &g) {
            out.push((frame, p.to_string()));
            // A well-formed entry in the wrong set still takes part in the
            // duplicate check; a malformed one has no block to compare.
            if !matches!(p, meta::EntryProblem::WrongSet { .. }) {
                continue;
            }
        }
        let block = e & BLOCK_MASK;
        if let Some(first) = owner.insert(block, frame) {
            out.push((
                frame,
                format!("maps source block {block}, which frame {first} maps too"),
            ));
        }
    }
    out
}

/// Walks the journal as recovery replays it. Returns the report and the
/// records of every complete commit, in order.
fn walk_journal(
    dev: &dyn BlockDevice,
    l: &Layout,
    sb: &Superblock,
    r: &mut Report,
) -> Result<(JournalReport, Vec<(u64, u64)>), CheckError> {
    let mut area = crate::device::AlignedBuf::new(l.journal_len as usize);
    dev.read_at(&mut area, l.journal_offset)?;
    let scan = journal::scan(&area, sb.journal_pos, sb.commit_seq);
    let mut rep = JournalReport {
        replayed_on_start: !sb.clean,
        start_pos: sb.journal_pos,
        start_seq: sb.commit_seq,
        commits: scan.commits.len() as u64,
        records: 0,
        end_pos: scan.end_offset,
        next_seq: scan.next_seq,
        end: match scan.end {
            journal::ScanEnd::End => JournalEnd::End,
            journal::ScanEnd::TornTail => JournalEnd::TornTail,
            journal::ScanEnd::Full => JournalEnd::Full,
            journal::ScanEnd::Corrupt { .. } => JournalEnd::Corrupt,
        },
    };
    if let journal::ScanEnd::Corrupt { offset, what } = &scan.end {
        // After a clean shutdown the journal is not used: damage there loses nothing.
        if !sb.clean {
            r.problem(
                Area::Journal,
                format!(
                    "journal damaged at offset {} ({what}) after {} commits: committed metadata would be lost",
                    l.journal_offset + offset,
                    rep.commits
                ),
            );
        }
    }
    let mut records = Vec::new();
    for c in scan.commits {
        for &(f, v) in &c.records {
            if f >= l.geometry.cache_blocks {
                r.problem(
                    Area::Journal,
                    format!(
                        "commit {} records frame {f}, past the last frame ({})",
                        c.seq, l.geometry.cache_blocks
                    ),
                );
            } else if !journal::valid_value(v) {
                r.problem(
                    Area::Journal,
                    format!(
                        "commit {} records value {v:#018x} with unknown bits for frame {f}",
                        c.seq
                    ),
                );
            }
        }
        rep.records += c.records.len() as u64;
        records.extend(
            c.records
                .into_iter()
                .filter(|&(f, _)| f < l.geometry.cache_blocks),
        );
    }
    Ok((rep, records))
}

/// Takes an exclusive, non-blocking `flock` on `path` and returns the open
/// file that holds it (the lock lasts as long as the file stays open).
///
/// Both the daemon and `check` take it, so a check never reads metadata that
/// a running daemon is changing. It is advisory: only vblkcache honours it.
pub fn lock_cache(path: &Path) -> Result<File, CheckError> {
    let lock_err = |source| CheckError::Lock {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(lock_err)?;
    if !try_lock_exclusive(&file).map_err(lock_err)? {
        return Err(CheckError::InUse(path.to_path_buf()));
    }
    Ok(file)
}

/// Takes an exclusive `flock` on `file` without waiting: false when another
/// open file holds one. The lock lasts as long as the file stays open.
pub(crate) fn try_lock_exclusive(file: &File) -> std::io::Result<bool> {
    // SAFETY: flock only reads its scalar arguments; the fd belongs to
    // `file`, which is alive for the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

#[cfg(test)]
#[path = "check_tests.rs"]
mod tests;
