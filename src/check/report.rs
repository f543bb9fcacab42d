//! What a check finds: the typed report, its problems, and the errors that
//! stop a check.

use crate::device::DeviceError;
use crate::engine::meta;
use crate::engine::WriteMode;
use serde::Serialize;
use std::path::PathBuf;

/// Errors that stop a check (as opposed to problems found on the device).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("cache device I/O: {0}")]
    Io(#[from] DeviceError),
    #[error("{0}")]
    Meta(#[from] meta::MetaError),
    #[error("cache device {0} is in use by another vblkcache")]
    InUse(PathBuf),
    #[error("cache device {path}: cannot lock it: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cache device {device} is not consistent ({problems} problems)")]
    Inconsistent { device: String, problems: usize },
}

/// Which part of the device a problem is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Area {
    Superblock,
    Journal,
    Table,
    /// The table as recovery would rebuild it after an unclean shutdown.
    Recovered,
}

/// One thing wrong with the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub area: Area,
    pub what: String,
    /// True when `--repair` can fix it without losing dirty data.
    pub repairable: bool,
}

/// One superblock slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotReport {
    pub valid: bool,
    pub seq: Option<u64>,
    pub clean: Option<bool>,
    pub error: Option<String>,
}

/// The superblock in use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SuperblockReport {
    pub slot: usize,
    pub seq: u64,
    pub clean: bool,
    pub mode: WriteMode,
    /// 1: frames set after set; 2: neighbouring runs in neighbouring sets,
    /// frames by row.
    pub format_version: u32,
    pub block_size: u32,
    pub cache_blocks: u64,
    pub assoc: u32,
    /// Neighbouring runs placed in neighbouring sets.
    pub span: u32,
    pub source_size: u64,
    /// The source the cache belongs to, as last seen
    /// ([`crate::device::DeviceIdentity`] printed); `None` when the cache
    /// has not recorded one.
    pub source: Option<String>,
    pub commit_seq: u64,
    pub journal_pos: u64,
    pub journal_offset: u64,
    pub journal_len: u64,
    pub table_offset: u64,
    pub data_offset: u64,
    pub device_len: u64,
}

/// How the journal walk ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JournalEnd {
    /// The next block is not a journal block of the next commit (stale or blank).
    End,
    /// The next commit was cut short by a crash (ignored by recovery).
    TornTail,
    /// The walk reached the end of the journal area.
    Full,
    /// A damaged block is followed by a newer commit.
    Corrupt,
}

/// The journal walk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JournalReport {
    /// False after a clean shutdown: the table is complete and the journal
    /// is not replayed (the walk is informational).
    pub replayed_on_start: bool,
    pub start_pos: u64,
    pub start_seq: u64,
    pub commits: u64,
    pub records: u64,
    /// Offset inside the journal where the walk stopped.
    pub end_pos: u64,
    pub next_seq: u64,
    pub end: JournalEnd,
}

/// Mapping counts of one view of the table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub valid: u64,
    pub dirty: u64,
}

/// The mapping table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableReport {
    pub pages: u64,
    pub bad_pages: u64,
    /// The table as stored.
    pub stored: Counts,
    /// What recovery keeps (equal to `stored` after a clean shutdown).
    pub recovered: Counts,
    /// Entry problems beyond the first [`MAX_LISTED`](super::MAX_LISTED) (counted, not listed).
    pub unlisted_problems: u64,
}

/// Everything the check found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub device: String,
    pub device_size: u64,
    pub consistent: bool,
    pub slots: Vec<SlotReport>,
    pub superblock: Option<SuperblockReport>,
    pub journal: Option<JournalReport>,
    pub table: Option<TableReport>,
    pub problems: Vec<Problem>,
    pub repairs: Vec<String>,
}

impl Report {
    pub(super) fn problem(&mut self, area: Area, what: String) {
        self.problems.push(Problem {
            area,
            what,
            repairable: false,
        });
    }
}
