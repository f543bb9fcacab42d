//! Write policies.

use std::fmt;
use std::str::FromStr;

/// How writes are handled. Reads are cached in every mode but `Passthrough`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteMode {
    /// Writes go to the cache only and are copied to the source later.
    Writeback,
    /// Writes go to the source and, when the block is cached, to the cache.
    Writethrough,
    /// Writes go to the source and invalidate the cached block.
    Writearound,
    /// The cache takes no new data: reads and writes go to the source and
    /// writes invalidate cached blocks. Refuses to start with dirty blocks.
    Passthrough,
}

impl WriteMode {
    pub const ALL: [WriteMode; 4] = [
        WriteMode::Writeback,
        WriteMode::Writethrough,
        WriteMode::Writearound,
        WriteMode::Passthrough,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WriteMode::Writeback => "writeback",
            WriteMode::Writethrough => "writethrough",
            WriteMode::Writearound => "writearound",
            WriteMode::Passthrough => "passthrough",
        }
    }

    pub(crate) fn to_u8(self) -> u8 {
        match self {
            WriteMode::Writeback => 0,
            WriteMode::Writethrough => 1,
            WriteMode::Writearound => 2,
            WriteMode::Passthrough => 3,
        }
    }

    pub(crate) fn from_u8(v: u8) -> Option<Self> {
        WriteMode::ALL.get(v as usize).copied()
    }
}

impl fmt::Display for WriteMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error for an unknown write-mode name.
#[derive(Debug, thiserror::Error)]
#[error("unknown write mode '{0}' (expected writeback, writethrough, writearound or passthrough)")]
pub struct UnknownMode(pub String);

impl FromStr for WriteMode {
    type Err = UnknownMode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WriteMode::ALL
            .iter()
            .copied()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| UnknownMode(s.to_string()))
    }
}
