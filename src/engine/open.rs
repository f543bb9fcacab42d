//! Opening the cache device: format a blank one, or load a persisted one and
//! check it matches what was asked for; and persisting it on shutdown.

use super::geometry::{
    max_span, Geometry, GeometryError, GeometryRequest, DEFAULT_ASSOC, DEFAULT_BLOCK_SIZE,
    MAX_SOURCE_BLOCKS,
};
use super::meta::{self, Found, Layout, Superblock, META_PAGE};
use super::mode::WriteMode;
use super::{EngineConfig, EngineError, StartInfo};
use crate::device::{AlignedBuf, BlockDevice, DeviceIdentity};
use std::time::Instant;

/// The state found on (or written to) the cache device at open.
pub(crate) struct Opened {
    pub sb: Superblock,
    pub slot: usize,
    /// Persisted entries (VALID | DIRTY | block), one per frame.
    pub entries: Vec<u64>,
    pub start: StartInfo,
}

fn conflict(
    param: &'static str,
    requested: u64,
    persisted: u64,
    dev: &dyn BlockDevice,
) -> EngineError {
    EngineError::GeometryConflict {
        param,
        requested,
        persisted,
        device: dev.name(),
    }
}

/// The number of sets to use of `sets` that fit: rounded down to a multiple
/// of the largest span (a power of two up to [`max_span`]) that leaves at
/// most 1/32 of them unused, so sequential reads stay sequential on the
/// cache device (see `Geometry::set_of`) at a bounded cost in capacity.
fn spread_sets(sets: u64) -> u64 {
    let mut span = u64::from(max_span(sets));
    while span > 1 && sets % span > sets / 32 {
        span /= 2;
    }
    sets - sets % span
}

/// Chooses the geometry for a new cache on a device of `dev_size` bytes.
pub(crate) fn new_geometry(
    req: &GeometryRequest,
    dev_size: u64,
) -> Result<Geometry, GeometryError> {
    Geometry::check_request(req)?;
    let bs = req.block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
    let blocks = match req.cache_blocks {
        Some(b) => b,
        None => {
            let fit = Layout::fit_blocks(dev_size, bs, 1);
            let assoc = match req.assoc {
                Some(a) => a,
                None => {
                    let mut a = DEFAULT_ASSOC;
                    while a > 1 && u64::from(a) > fit {
                        a /= 2;
                    }
                    a
                }
            };
            let n = spread_sets(fit / u64::from(assoc)) * u64::from(assoc);
            if n == 0 {
                let g = Geometry::resolve(
                    &GeometryRequest {
                        assoc: Some(assoc),
                        ..*req
                    },
                    u64::from(assoc),
                )?;
                let l = Layout::new(&g);
                return Err(GeometryError::CacheTooSmall {
                    blocks: u64::from(assoc),
                    block_size: bs,
                    needed: l.device_len(),
                    meta: l.meta_len(),
                    available: dev_size,
                });
            }
            return Geometry::resolve(
                &GeometryRequest {
                    assoc: Some(assoc),
                    ..*req
                },
                n,
            );
        }
    };
    let g = Geometry::resolve(req, blocks)?;
    let l = Layout::new(&g);
    if l.device_len() > dev_size {
        return Err(GeometryError::CacheTooSmall {
            blocks,
            block_size: bs,
            needed: l.device_len(),
            meta: l.meta_len(),
            available: dev_size,
        });
    }
    Ok(g)
}

/// Why the clean entries of a cache cannot be trusted for its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceChange {
    /// Another file (another inode) or block device (another identifier)
    /// than the cache was last used with, or a file where a block device was
    /// (or the reverse).
    Other,
    /// The same file, modified after the clean shutdown that recorded it.
    Modified,
}

/// Compares the source's identity with the one recorded on the cache. The
/// modification time only counts after a clean shutdown (which records it
/// last, after its writes): after a crash the clean entries are dropped
/// anyway. A block device is compared by identifier, and not at all when
/// neither side has one (it is then checked by size only); nothing is
/// compared when either side has no identity (memory, caches made before
/// identities were recorded).
fn source_changed(
    recorded: Option<&DeviceIdentity>,
    now: Option<&DeviceIdentity>,
    clean_shutdown: bool,
) -> Option<SourceChange> {
    use DeviceIdentity::{Block, File};
    match (recorded?, now?) {
        (
            File {
                ino: a,
                mtime_ns: ma,
            },
            File {
                ino: b,
                mtime_ns: mb,
            },
        ) => {
            if a != b {
                Some(SourceChange::Other)
            } else if clean_shutdown && ma != mb {
                Some(SourceChange::Modified)
            } else {
                None
            }
        }
        // Two identifiers must be equal, and a disk's identifier does not
        // come and go: one with and one without are different disks. Two
        // without (equal `None`s) leave nothing but the size to go by.
        (Block { id: a }, Block { id: b }) => (a != b).then_some(SourceChange::Other),
        (File { .. }, Block { .. }) | (Block { .. }, File { .. }) => Some(SourceChange::Other),
    }
}

pub(crate) fn open_cache(
    source: &dyn BlockDevice,
    cache: &dyn BlockDevice,
    cfg: &EngineConfig,
) -> Result<Opened, EngineError> {
    let t0 = Instant::now();
    Geometry::check_request(&cfg.geometry)?;
    let source_size = source.size();
    if source_size == 0 {
        return Err(EngineError::EmptySource {
            device: source.name(),
        });
    }
    if let Some(DeviceIdentity::Block { id: None }) = source.identity() {
        log::warn!(
            "source {} is a block device without a stable identifier in sysfs (dm or md uuid, \
             wwid, serial): the cache checks it by size only, and cannot tell it from another \
             disk of that size",
            source.name()
        );
    }
    let found = meta::read_superblock(cache).map_err(|e| EngineError::Meta {
        device: cache.name(),
        source: e,
    })?;
    if let (Found::Superblock(sb, _), true, false) = (&found, cfg.format, cfg.discard_dirty) {
        // --format on a cache whose dirty blocks the source does not have.
        match dirty_blocks(cache, sb) {
            Ok(0) => {}
            Ok(dirty) => {
                return Err(EngineError::FormatDirty {
                    device: cache.name(),
                    dirty,
                })
            }
            Err(e) => log::warn!(
                "formatting cache device {} whose metadata cannot be read ({e}): any dirty \
                 blocks it held are lost",
                cache.name()
            ),
        }
    }
    match found {
        Found::Superblock(sb, slot) if !cfg.format => load(source, cache, cfg, sb, slot, t0),
        Found::Foreign if !cfg.format => Err(EngineError::ForeignCache {
            device: cache.name(),
        }),
        _ => format(source, cache, cfg, t0),
    }
}

/// The dirty blocks of the cache `sb` describes: its table, with the
/// journal replayed after an unclean shutdown.
fn dirty_blocks(cache: &dyn BlockDevice, sb: &Superblock) -> Result<u64, meta::MetaError> {
    let l = sb.layout;
    let source_blocks = sb.source_size.div_ceil(u64::from(l.geometry.block_size));
    let mut entries = meta::load_table(cache, &l, sb.table_copy, source_blocks)?;
    if !sb.clean {
        super::commit::replay(cache, &l, sb, &mut entries)?;
    }
    Ok(dirty_entries(&entries))
}

/// How many of the persisted `entries` are dirty.
fn dirty_entries(entries: &[u64]) -> u64 {
    entries
        .iter()
        .filter(|&&e| e & super::frames::DIRTY != 0)
        .count() as u64
}

/// Empties every clean entry (its data may not be the source's) and
/// returns how many there were.
fn drop_clean_entries(entries: &mut [u64]) -> u64 {
    let mut dropped = 0;
    for e in entries.iter_mut() {
        if *e != 0 && *e & super::frames::DIRTY == 0 {
            *e = 0;
            dropped += 1;
        }
    }
    dropped
}

fn format(
    source: &dyn BlockDevice,
    cache: &dyn BlockDevice,
    cfg: &EngineConfig,
    t0: Instant,
) -> Result<Opened, EngineError> {
    let source_size = source.size();
    let g = new_geometry(&cfg.geometry, cache.size())?;
    if source_size.div_ceil(u64::from(g.block_size)) > MAX_SOURCE_BLOCKS {
        return Err(GeometryError::SourceTooLarge {
            source_size,
            block_size: g.block_size,
        }
        .into());
    }
    let layout = Layout::new(&g);
    let meta_err = |e| EngineError::Meta {
        device: cache.name(),
        source: e,
    };
    // Kill both superblock slots first so a half-formatted device is never
    // mistaken for the old cache, then write an empty table, then the new
    // superblock.
    let zero = AlignedBuf::new(2 * META_PAGE as usize);
    cache.write_at(&zero, 0).map_err(EngineError::Cache)?;
    cache.flush().map_err(EngineError::Cache)?;
    // A zeroed journal: sectors never written read as blank, so garbage is
    // never mistaken for (or hides) a commit.
    cache
        .write_zeroes(layout.journal_offset, layout.journal_len)
        .map_err(EngineError::Cache)?;
    let entries = vec![0u64; g.cache_blocks as usize];
    meta::save_table(cache, &layout, 0, &entries).map_err(meta_err)?;
    cache.flush().map_err(EngineError::Cache)?;
    let mut uuid = [0u8; 16];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    uuid.copy_from_slice(&(now ^ u128::from(std::process::id()) << 64).to_le_bytes());
    let sb = Superblock {
        seq: 1,
        flags: 0,
        layout,
        source_size,
        mode: cfg.mode.unwrap_or(WriteMode::Writeback),
        clean: false,
        uuid,
        commit_seq: 1,
        journal_pos: 0,
        table_copy: 0,
        source_id: source.identity(),
        run_id: super::crashstate::new_run_id(),
    };
    meta::write_superblock(cache, &sb, 0).map_err(meta_err)?;
    log::info!(
        "formatted cache device {} (format version {}): {} blocks of {} bytes, associativity {}, span {}",
        cache.name(),
        g.format_version(),
        g.cache_blocks,
        g.block_size,
        g.assoc,
        g.span
    );
    Ok(Opened {
        sb,
        slot: 0,
        entries,
        start: StartInfo {
            formatted: true,
            clean: true,
            entries_loaded: 0,
            dirty_loaded: 0,
            load_ms: t0.elapsed().as_millis() as u64,
            ..StartInfo::default()
        },
    })
}

fn load(
    source: &dyn BlockDevice,
    cache: &dyn BlockDevice,
    cfg: &EngineConfig,
    mut sb: Superblock,
    slot: usize,
    t0: Instant,
) -> Result<Opened, EngineError> {
    let source_size = source.size();
    let l = sb.layout;
    let req = &cfg.geometry;
    if let Some(bs) = req.block_size {
        if bs != l.geometry.block_size {
            return Err(conflict(
                "block-size",
                bs.into(),
                l.geometry.block_size.into(),
                cache,
            ));
        }
    }
    if let Some(n) = req.cache_blocks {
        if n != l.geometry.cache_blocks {
            return Err(conflict("cache-blocks", n, l.geometry.cache_blocks, cache));
        }
    }
    if let Some(a) = req.assoc {
        if a != l.geometry.assoc {
            return Err(conflict("assoc", a.into(), l.geometry.assoc.into(), cache));
        }
    }
    if sb.source_size != source_size {
        return Err(EngineError::SourceMismatch {
            device: cache.name(),
            recorded: sb.source_size,
            actual: source_size,
        });
    }
    if l.device_len() > cache.size() {
        return Err(EngineError::Meta {
            device: cache.name(),
            source: meta::MetaError::BadSuperblock {
                slot,
                what: format!(
                    "the cache needs {} bytes but the device has only {}",
                    l.device_len(),
                    cache.size()
                ),
            },
        });
    }
    let source_blocks = source_size.div_ceil(u64::from(l.geometry.block_size));
    let mut entries = meta::load_table(cache, &l, sb.table_copy, source_blocks).map_err(|e| {
        EngineError::Meta {
            device: cache.name(),
            source: e,
        }
    })?;
    let clean_shutdown = sb.clean;
    let mut replayed = super::commit::Replay::default();
    let mut clean_dropped = 0;
    let mut from_crash_state = false;
    if !clean_shutdown {
        // Crash recovery: replay the journal over the table, then keep only
        // dirty mappings (clean ones may be stale: the source has their data).
        let meta_err = |e| EngineError::Meta {
            device: cache.name(),
            source: e,
        };
        replayed = super::commit::replay(cache, &l, &sb, &mut entries).map_err(meta_err)?;
        clean_dropped = drop_clean_entries(&mut entries);
        if let Some(found) = crash_state(cfg, &sb, &entries) {
            // Frames written back since the last commit are recorded clean
            // below: the source must hold their data first.
            source.flush().map_err(EngineError::Source)?;
            from_crash_state = true;
            entries = found;
        }
        meta::validate_entries(&entries, source_blocks, &l).map_err(meta_err)?;
        // Make the recovered state the new baseline before serving: into the
        // other table copy, which the superblock written below switches to.
        sb.table_copy ^= 1;
        meta::save_table(cache, &l, sb.table_copy, &entries).map_err(meta_err)?;
        cache.flush().map_err(EngineError::Cache)?;
        log::warn!(
            "cache {} was not shut down cleanly: replayed {} commits, recovered {} dirty blocks, dropped {} clean entries",
            cache.name(),
            replayed.commits,
            entries.iter().filter(|&&e| e != 0).count(),
            clean_dropped
        );
    }
    let dirty = dirty_entries(&entries);
    let source_id = source.identity();
    if let Some(why) = source_changed(sb.source_id.as_ref(), source_id.as_ref(), clean_shutdown) {
        let shown = |id: &Option<DeviceIdentity>| {
            id.as_ref()
                .map_or_else(|| String::from("an unknown source"), |i| i.to_string())
        };
        if why == SourceChange::Other && dirty > 0 && !cfg.source_moved {
            return Err(EngineError::SourceChanged {
                device: cache.name(),
                path: source.name(),
                dirty,
                recorded: shown(&sb.source_id),
                now: shown(&source_id),
            });
        }
        // The source's data may differ from what clean entries hold.
        let dropped = drop_clean_entries(&mut entries);
        clean_dropped += dropped;
        log::warn!(
            "source {} {}: dropped {dropped} clean cache entries; {dirty} dirty blocks kept (they \
             will be written over it)",
            source.name(),
            match why {
                SourceChange::Other => format!(
                    "is not the source the cache was last used with ({}; --source-moved)",
                    shown(&sb.source_id)
                ),
                SourceChange::Modified => String::from("was modified since the cache last saw it"),
            }
        );
    }
    let mode = cfg.mode.unwrap_or(sb.mode);
    if mode == WriteMode::Passthrough && dirty > 0 {
        return Err(EngineError::PassthroughDirty { dirty });
    }
    let loaded = entries.iter().filter(|&&e| e != 0).count() as u64;
    // Mark the cache in use before serving, so a crash is detected next time;
    // the journal restarts empty with a sequence number never used before.
    sb.seq += 1;
    sb.clean = false;
    sb.mode = mode;
    sb.commit_seq = sb.commit_seq.max(replayed.next_seq) + 1;
    sb.journal_pos = 0;
    sb.source_id = source_id;
    sb.run_id = super::crashstate::new_run_id();
    let next = 1 - slot;
    meta::write_superblock(cache, &sb, next).map_err(|e| EngineError::Meta {
        device: cache.name(),
        source: e,
    })?;
    Ok(Opened {
        sb,
        slot: next,
        entries,
        start: StartInfo {
            formatted: false,
            clean: clean_shutdown,
            entries_loaded: loaded,
            dirty_loaded: dirty,
            commits_replayed: replayed.commits,
            dirty_recovered: if clean_shutdown { 0 } else { dirty },
            clean_dropped,
            crash_state_recovered: from_crash_state.then_some(dirty),
            load_ms: t0.elapsed().as_millis() as u64,
        },
    })
}

/// The dirty mapping left by the crashed run in its crash-state file, if
/// the daemon keeps one (`cfg.crash_state_dir`) and it can be used; `journal`
/// is the mapping replayed from the cache device. Says why a file is not
/// used: recovery then goes by the journal, as after a power cut.
fn crash_state(cfg: &EngineConfig, sb: &Superblock, journal: &[u64]) -> Option<Vec<u64>> {
    use super::crashstate;
    let dir = cfg.crash_state_dir.as_deref()?;
    let found = crashstate::boot_id().and_then(|boot| crashstate::recover(dir, sb, &boot, journal));
    match found {
        Ok(Some(entries)) => {
            let (had, now) = (dirty_entries(journal), dirty_entries(&entries));
            log::warn!(
                "recovering from the crash state in {}: {now} dirty blocks (the journal had {had}); \
                 writes completed before the crash are kept",
                dir.display()
            );
            Some(entries)
        }
        Ok(None) => None,
        Err(e) => {
            log::warn!("crash state not used, recovering from the journal only: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(ino: u64, mtime_ns: u64) -> Option<DeviceIdentity> {
        Some(DeviceIdentity::File { ino, mtime_ns })
    }

    fn block(id: Option<&str>) -> Option<DeviceIdentity> {
        Some(DeviceIdentity::Block {
            id: id.map(String::from),
        })
    }

    #[test]
    fn which_sources_count_as_changed() {
        use SourceChange::{Modified, Other};
        let cases = [
            // (recorded, now, clean shutdown, expected)
            (file(1, 5), file(1, 5), true, None),
            (file(1, 5), file(2, 5), false, Some(Other)),
            (file(1, 5), file(1, 6), true, Some(Modified)),
            (file(1, 5), file(1, 6), false, None),
            (block(Some("wwid:a")), block(Some("wwid:a")), true, None),
            (
                block(Some("wwid:a")),
                block(Some("wwid:b")),
                true,
                Some(Other),
            ),
            (
                block(Some("wwid:a")),
                block(Some("wwid:b")),
                false,
                Some(Other),
            ),
            (block(Some("wwid:a")), block(None), true, Some(Other)),
            (block(None), block(Some("wwid:a")), true, Some(Other)),
            (block(None), block(None), true, None),
            (file(1, 5), block(Some("wwid:a")), true, Some(Other)),
            (file(1, 5), block(None), false, Some(Other)),
            (block(None), file(1, 5), true, Some(Other)),
            (None, block(Some("wwid:a")), true, None),
            (file(1, 5), None, true, None),
        ];
        for (rec, now, clean, want) in cases {
            assert_eq!(
                source_changed(rec.as_ref(), now.as_ref(), clean),
                want,
                "{rec:?} -> {now:?} (clean {clean})"
            );
        }
    }
}
