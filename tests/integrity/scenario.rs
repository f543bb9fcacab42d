//! What a scenario is: the `Scenario` parameters and their defaults, the
//! environment knobs (duration scale and seed), block size parsing, and
//! the source and cache files a scenario starts from.

use crate::common::{fill_sector, Files};
use crate::model::{SECTOR, SLOT_SECTORS};

#[derive(Clone)]
pub(crate) struct Scenario {
    pub(crate) name: &'static str,
    pub(crate) disk: usize,
    pub(crate) block_size: &'static str,
    pub(crate) cache_blocks: u32,
    pub(crate) assoc: u32,
    pub(crate) queues: usize,
    pub(crate) source_latency: Option<&'static str>,
    /// Seconds of I/O per daemon run.
    pub(crate) secs: f64,
    /// Daemon runs with I/O.
    pub(crate) runs: usize,
    /// Kill -9 at the end of each run (else SIGTERM).
    pub(crate) kill: bool,
    pub(crate) control: bool,
    pub(crate) crash_state: bool,
    pub(crate) tmpfs: bool,
    pub(crate) extra: &'static [&'static str],
    /// Percentages of ops: write, read, zero, discard (rest: flush).
    pub(crate) mix: [u32; 4],
    /// Largest request in sectors.
    pub(crate) max_len: usize,
    /// Check the source file against the model after `vblkcache flush`.
    pub(crate) check_source: bool,
    /// Half of the reads run without waiting for writes to their sectors.
    pub(crate) racy_reads: bool,
    /// Writes may overlap writes in flight.
    pub(crate) overlap_writes: bool,
    /// SIGTERM while I/O runs (instead of a quiesced stop); with `kill` unset.
    pub(crate) term_under_load: bool,
    /// Start each run after the first in a random mode.
    pub(crate) vary_mode: bool,
    /// With `kill`: SIGTERM first, then SIGKILL during the shutdown.
    pub(crate) term_then_kill: bool,
    /// After each kill, this many more daemons killed while starting up.
    pub(crate) kill_storm: usize,
    /// Source and cache on loop devices with logical sectors of this size.
    pub(crate) loop_sector: Option<u32>,
}

impl Scenario {
    pub(crate) fn base(name: &'static str) -> Scenario {
        Scenario {
            name,
            disk: 32 << 20,
            block_size: "4K",
            cache_blocks: 256,
            assoc: 8,
            queues: 2,
            source_latency: None,
            secs: 8.0,
            runs: 3,
            kill: false,
            control: false,
            crash_state: true,
            tmpfs: false,
            extra: &[],
            mix: [50, 35, 4, 4],
            max_len: SLOT_SECTORS,
            check_source: true,
            racy_reads: false,
            overlap_writes: false,
            term_under_load: false,
            kill_storm: 0,
            term_then_kill: false,
            vary_mode: false,
            loop_sector: None,
        }
    }
}

pub(crate) fn scale() -> f64 {
    std::env::var("VBC_INTEGRITY_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0)
}

pub(crate) fn seed() -> u64 {
    std::env::var("VBC_INTEGRITY_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

pub(crate) fn bs_bytes(s: &str) -> usize {
    let n: usize = s.trim_end_matches(['K', 'M']).parse().unwrap();
    if s.ends_with('M') {
        n << 20
    } else {
        n << 10
    }
}

pub(crate) fn make_files(sc: &Scenario, seed: u64) -> Files {
    let dir = if sc.tmpfs {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let source = dir.path().join("source.img");
    let cache = dir.path().join("cache.img");
    let socket = dir.path().join("vblk.sock");
    let mut initial = vec![0xA5u8; sc.disk];
    for (i, s) in initial.chunks_exact_mut(SECTOR).enumerate() {
        fill_sector(s, 0, i as u64);
    }
    std::fs::write(&source, &initial).unwrap();
    let bs = bs_bytes(sc.block_size) as u64;
    let f = std::fs::File::create(&cache).unwrap();
    f.set_len(sc.cache_blocks as u64 * bs + (16 << 20)).unwrap();
    let _ = seed;
    Files {
        dir,
        source,
        cache,
        socket,
        initial: Vec::new(),
    }
}
