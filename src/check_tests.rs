//! Unit tests of the checker on in-memory cache images made by the engine.

use super::*;
use crate::device::MemDevice;
use crate::engine::{Engine, EngineConfig, GeometryRequest, WriteMode};
use std::sync::Arc;

const SOURCE: u64 = 4 << 20;
const CACHE: u64 = 16 << 20;
const BS: u64 = 4096;

fn cfg() -> EngineConfig {
    EngineConfig {
        geometry: GeometryRequest {
            block_size: Some(BS as u32),
            cache_blocks: Some(512),
            assoc: Some(64),
        },
        mode: Some(WriteMode::Writeback),
        ..EngineConfig::default()
    }
}

fn source() -> Arc<MemDevice> {
    let data: Vec<u8> = (0..SOURCE).map(|i| (i % 251) as u8).collect();
    Arc::new(MemDevice::from_bytes(&data))
}

/// Writes `commits` rounds of 4 dirty blocks, each round followed by a
/// FLUSH; returns the engine (still running) and its devices.
fn engine_with_commits(commits: u64) -> (Engine, Arc<MemDevice>, Arc<MemDevice>) {
    let (src, cache) = (source(), Arc::new(MemDevice::new(CACHE)));
    let e = Engine::open(src.clone(), cache.clone(), cfg()).unwrap();
    for round in 0..commits {
        for k in 0..4u64 {
            let block = round * 16 + k * 3;
            e.write(block * BS, &vec![round as u8 + 1; BS as usize])
                .unwrap();
        }
        e.flush().unwrap();
    }
    (e, src, cache)
}

/// A cache image as a crash after `commits` FLUSHes leaves it.
fn crash_image(commits: u64) -> (MemDevice, Arc<MemDevice>) {
    let (e, src, cache) = engine_with_commits(commits);
    let image = MemDevice::from_bytes(&cache.to_vec());
    drop(e);
    (image, src)
}

fn clean_image() -> MemDevice {
    let (e, _src, cache) = engine_with_commits(3);
    e.shutdown(false).unwrap();
    MemDevice::from_bytes(&cache.to_vec())
}

/// Offset of the table copy the superblock says is current.
fn active_table(dev: &MemDevice) -> u64 {
    check_device(dev, false)
        .unwrap()
        .superblock
        .unwrap()
        .table_offset
}

fn layout(dev: &MemDevice) -> Layout {
    match crate::engine::meta::read_superblock(dev).unwrap() {
        crate::engine::meta::Found::Superblock(sb, _) => sb.layout,
        _ => panic!("no superblock"),
    }
}

fn flip(dev: &MemDevice, offset: u64) {
    let mut b = [0u8; 1];
    dev.read_at(&mut b, offset).unwrap();
    b[0] ^= 0x10;
    dev.write_at(&b, offset).unwrap();
}

fn areas(r: &Report) -> Vec<Area> {
    r.problems.iter().map(|p| p.area).collect()
}

#[test]
fn clean_cache_is_consistent() {
    let dev = clean_image();
    let r = check_device(&dev, false).unwrap();
    assert!(r.consistent, "{:?}", r.problems);
    let sb = r.superblock.as_ref().unwrap();
    assert!(sb.clean);
    assert!(r.slots.iter().all(|s| s.valid && s.clean == Some(true)));
    let j = r.journal.as_ref().unwrap();
    assert!(!j.replayed_on_start);
    assert_eq!(j.commits, 0, "a clean shutdown restarts the journal");
    let t = r.table.as_ref().unwrap();
    assert_eq!(t.stored.dirty, 12);
    assert_eq!(t.recovered, t.stored);
}

#[test]
fn crashed_cache_is_consistent_and_matches_recovery() {
    let (dev, src) = crash_image(3);
    let r = check_device(&dev, false).unwrap();
    assert!(r.consistent, "{:?}", r.problems);
    assert!(!r.superblock.as_ref().unwrap().clean);
    let j = r.journal.clone().unwrap();
    assert!(j.replayed_on_start);
    assert_eq!(j.commits, 3);
    assert_eq!(j.records, 12);
    assert_eq!(j.end, JournalEnd::End);
    assert_eq!(r.table.as_ref().unwrap().recovered.dirty, 12);
    // The engine's own recovery agrees with the checker.
    let dev = Arc::new(dev);
    let e = Engine::open(src, dev, EngineConfig::default()).unwrap();
    let st = e.status();
    assert!(!st.start.clean);
    assert_eq!(st.start.commits_replayed, j.commits);
    assert_eq!(st.start.dirty_recovered, 12);
    e.shutdown(false).unwrap();
}

#[test]
fn torn_journal_tail_is_not_a_problem() {
    let (dev, _src) = crash_image(3);
    let l = layout(&dev);
    // The last commit (third 4 KiB unit) lost one sector in the crash: a torn
    // write leaves the sector as it was before (here: zeros).
    dev.write_at(&[0u8; 512], l.journal_offset + 2 * META_PAGE + 512)
        .unwrap();
    let r = check_device(&dev, false).unwrap();
    assert!(r.consistent, "{:?}", r.problems);
    let j = r.journal.unwrap();
    assert_eq!((j.commits, j.end), (2, JournalEnd::TornTail));
    assert_eq!(r.table.unwrap().recovered.dirty, 8);
}

#[test]
fn damaged_last_commit_is_corruption_not_a_torn_write() {
    let (dev, _src) = crash_image(3);
    let l = layout(&dev);
    // A flipped bit cannot come from a torn write (sectors are atomic).
    flip(&dev, l.journal_offset + 2 * META_PAGE + 100);
    let r = check_device(&dev, false).unwrap();
    assert!(!r.consistent);
    assert_eq!(r.journal.as_ref().unwrap().end, JournalEnd::Corrupt);
    assert!(r.problems[0].what.contains("checksum"), "{:?}", r.problems);
}

#[test]
fn damaged_journal_block_before_newer_commits_is_corruption() {
    let (dev, _src) = crash_image(3);
    let l = layout(&dev);
    flip(&dev, l.journal_offset + META_PAGE + 100);
    let r = check_device(&dev, false).unwrap();
    assert!(!r.consistent);
    assert_eq!(r.journal.as_ref().unwrap().end, JournalEnd::Corrupt);
    assert_eq!(areas(&r), vec![Area::Journal]);
    assert!(
        r.problems[0].what.contains("journal damaged"),
        "{:?}",
        r.problems
    );
    // Repair cannot fix it without losing the third commit.
    let r = check_device(&dev, true).unwrap();
    assert!(!r.consistent && r.repairs.is_empty());
}

#[test]
fn corrupted_superblock_slot_is_reported_and_not_repaired() {
    let dev = clean_image();
    let before = check_device(&dev, false).unwrap();
    let used = before.superblock.as_ref().unwrap().slot;
    flip(&dev, used as u64 * META_PAGE + 20);
    let r = check_device(&dev, false).unwrap();
    assert!(!r.consistent);
    assert!(!r.slots[used].valid);
    assert_eq!(r.problems.len(), 1);
    // The valid copy may be the older one: no safe repair.
    assert!(!r.problems[0].repairable && r.problems[0].area == Area::Superblock);
    assert!(
        r.problems[0].what.contains("may be older"),
        "{:?}",
        r.problems
    );
    let fixed = check_device(&dev, true).unwrap();
    assert!(!fixed.consistent && fixed.repairs.is_empty());
    // --repair left the damaged slot as it was.
    let mut a = vec![0u8; META_PAGE as usize];
    dev.read_at(&mut a, used as u64 * META_PAGE).unwrap();
    assert!(crate::engine::meta::Superblock::decode(&a).is_err());
}

#[test]
fn both_slots_corrupted_or_blank_is_inconsistent() {
    let dev = clean_image();
    flip(&dev, 20);
    flip(&dev, META_PAGE + 20);
    let r = check_device(&dev, true).unwrap();
    assert!(!r.consistent && r.superblock.is_none() && r.repairs.is_empty());
    assert!(r.problems[0].what.contains("both"), "{:?}", r.problems);
    let blank = MemDevice::new(1 << 20);
    let r = check_device(&blank, false).unwrap();
    assert!(!r.consistent);
    assert!(r.problems[0].what.contains("no vblkcache superblock"));
}

#[test]
fn table_page_checksum_is_checked() {
    let dev = clean_image();
    flip(&dev, active_table(&dev) + 200);
    let r = check_device(&dev, true).unwrap();
    assert!(!r.consistent && r.repairs.is_empty());
    assert_eq!(areas(&r), vec![Area::Table]);
    assert!(r.problems[0].what.contains("checksum"), "{:?}", r.problems);
    assert_eq!(r.table.unwrap().bad_pages, 1);
}

/// Rewrites table page 0 with `f` applied to its entries (valid checksum).
fn edit_page0(dev: &MemDevice, l: &Layout, f: impl FnOnce(&mut Vec<u64>)) {
    let mut page = vec![0u8; META_PAGE as usize];
    let at = active_table(dev);
    dev.read_at(&mut page, at).unwrap();
    let want = l.geometry.cache_blocks.min(ENTRIES_PER_PAGE) as usize;
    let mut entries = Vec::new();
    meta::decode_page(&page, 0, want, &mut entries).unwrap();
    f(&mut entries);
    dev.write_at(&meta::encode_page(0, &entries), at).unwrap();
}

#[test]
fn bad_entries_are_each_reported() {
    let dev = clean_image();
    let l = layout(&dev);
    let g = l.geometry;
    let source_blocks = SOURCE / BS;
    // A block of set 0 and one of another set.
    let in_set0 = (0..source_blocks).find(|&b| g.set_of(b) == 0).unwrap();
    let other = (0..source_blocks).find(|&b| g.set_of(b) != 0).unwrap();
    edit_page0(&dev, &l, |e| {
        e[0] = VALID | (source_blocks + 5); // past the end
        e[1] = VALID | DIRTY | other; // wrong set
        e[2] = VALID | in_set0;
        e[3] = VALID | DIRTY | in_set0; // duplicate
        e[4] = DIRTY | 7; // not valid but not free
    });
    let r = check_device(&dev, false).unwrap();
    assert!(!r.consistent);
    let text: Vec<&str> = r.problems.iter().map(|p| p.what.as_str()).collect();
    assert!(text
        .iter()
        .any(|t| t.starts_with("entry 0:") && t.contains("past the end")));
    assert!(text
        .iter()
        .any(|t| t.starts_with("entry 1:") && t.contains("set")));
    assert!(text
        .iter()
        .any(|t| t.starts_with("entry 3:") && t.contains("frame 2 maps too")));
    assert!(text
        .iter()
        .any(|t| t.starts_with("entry 4:") && t.contains("bits")));
    assert!(r
        .problems
        .iter()
        .all(|p| p.area == Area::Table && !p.repairable));
}

#[test]
fn crash_recovery_view_catches_duplicates_the_journal_creates() {
    // The stored table is fine, but replaying the journal maps a block that
    // the table maps dirty in another frame: recovery would refuse to start.
    let (dev, _src) = crash_image(1);
    let l = layout(&dev);
    let g = l.geometry;
    let r0 = check_device(&dev, false).unwrap();
    assert!(r0.consistent, "{:?}", r0.problems);
    // Block 0 was written in the first round; find the set it lives in and
    // put a dirty copy in a frame of that set in the stored table.
    let set = g.set_of(0);
    let frame = set * u64::from(l.geometry.assoc) + u64::from(l.geometry.assoc) - 1;
    assert!(
        frame < ENTRIES_PER_PAGE,
        "test geometry keeps set {set} on page 0"
    );
    edit_page0(&dev, &l, |e| e[frame as usize] = VALID | DIRTY);
    let r = check_device(&dev, false).unwrap();
    assert!(!r.consistent);
    assert!(r
        .problems
        .iter()
        .any(|p| p.area == Area::Recovered && p.what.contains("maps source block 0")));
}

#[test]
fn report_serialises_with_named_fields() {
    let (dev, _src) = crash_image(2);
    let r = check_device(&dev, false).unwrap();
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(v["consistent"], true);
    assert_eq!(v["journal"]["commits"], 2);
    assert_eq!(v["journal"]["end"], "end");
    assert_eq!(v["superblock"]["clean"], false);
    let mut human = Vec::new();
    write_human(&r, &mut human).unwrap();
    let text = String::from_utf8(human).unwrap();
    assert!(text.contains("2 commits") && text.trim_end().ends_with("consistent"));
}
