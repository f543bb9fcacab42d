//! The model of the disk the scenarios check against: sector size and
//! request slot constants, the decoding of a sector's (op id, sector)
//! pattern, and `Model`, which tracks per sector the last completed write,
//! the op in flight, the content as of the last FLUSH and, with overlapping
//! writes, the candidate ops a sector may hold.

use crate::common::{decode_sector, fill_sector, REGION};
use std::collections::HashSet;

pub(crate) const SECTOR: usize = 512;
pub(crate) const SLOTS: usize = 8;
pub(crate) const SLOT_BYTES: usize = REGION / SLOTS;
pub(crate) const SLOT_SECTORS: usize = SLOT_BYTES / SECTOR;
pub(crate) const NONE: u64 = u64::MAX;
pub(crate) const READING: u64 = u64::MAX - 1;

/// Ok(id) if `s` is the well-formed pattern of (id, `sector`).
pub(crate) fn decode(s: &[u8], sector: usize) -> Result<u64, String> {
    let (id, sec) = decode_sector(s)?;
    if sec != sector as u64 {
        return Err(format!("data of op {id} for sector {sec}"));
    }
    Ok(id)
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Kind {
    Write,
    Zero,
    Discard,
}

pub(crate) struct Model {
    /// Op id per sector of the last completed write/zero/discard.
    pub(crate) cur: Vec<u64>,
    /// Op id in flight per sector (NONE, READING, or an op id).
    pub(crate) pending: Vec<u64>,
    /// Op id per sector as of the last completed FLUSH (when tracked).
    pub(crate) durable: Vec<u64>,
    pub(crate) zero_ops: HashSet<u64>,
    /// (id, start, len, kind) of every op issued since the last baseline.
    pub(crate) issued: Vec<(u64, usize, usize, Kind)>,
    pub(crate) next_id: u64,
    pub(crate) track_durable: bool,
    /// Overlapping writes allowed: writes in flight per sector, ids of the
    /// writes of the current overlap episode, and sectors whose content is
    /// one of several ops (until a read tells which).
    pub(crate) overlap: bool,
    infl: Vec<u16>,
    epi: Vec<Vec<u64>>,
    pub(crate) cands: std::collections::HashMap<usize, Vec<u64>>,
    pub(crate) ambiguous_resolved: u64,
}

impl Model {
    pub(crate) fn new(sectors: usize, track_durable: bool) -> Model {
        Model {
            cur: vec![0; sectors],
            pending: vec![NONE; sectors],
            durable: vec![0; sectors],
            zero_ops: HashSet::new(),
            issued: Vec::new(),
            next_id: 1,
            track_durable,
            overlap: false,
            infl: vec![0; sectors],
            epi: vec![Vec::new(); sectors],
            cands: std::collections::HashMap::new(),
            ambiguous_resolved: 0,
        }
    }

    /// Locks a write's range (or, with `overlap`, joins writes in flight).
    pub(crate) fn lock_write(&mut self, start: usize, len: usize, id: u64) -> bool {
        if !self.overlap {
            return self.try_lock(start, len, id);
        }
        if self.pending[start..start + len].contains(&READING) {
            return false;
        }
        for s in start..start + len {
            self.infl[s] += 1;
            self.epi[s].push(id);
            self.pending[s] = id;
        }
        true
    }

    pub(crate) fn complete_write(&mut self, start: usize, len: usize, id: u64) {
        if !self.overlap {
            self.cur[start..start + len].fill(id);
            self.pending[start..start + len].fill(NONE);
            return;
        }
        for s in start..start + len {
            self.infl[s] -= 1;
            if self.infl[s] == 0 {
                let ep = std::mem::take(&mut self.epi[s]);
                if ep.len() == 1 {
                    self.cur[s] = ep[0];
                    self.cands.remove(&s);
                } else {
                    self.cur[s] = *ep.last().unwrap();
                    self.cands.insert(s, ep);
                }
                self.pending[s] = NONE;
            }
        }
    }

    /// With overlapping writes: the op among the candidates that `data`
    /// is, which then is the sector's known content.
    pub(crate) fn resolve(&mut self, data: &[u8], sec: usize) -> bool {
        let Some(c) = self.cands.get(&sec) else {
            return false;
        };
        if let Some(&id) = c.iter().find(|&&id| self.content_ok(data, id, sec)) {
            self.cur[sec] = id;
            self.cands.remove(&sec);
            self.ambiguous_resolved += 1;
            return true;
        }
        false
    }

    pub(crate) fn content_ok(&self, s: &[u8], id: u64, sector: usize) -> bool {
        if self.zero_ops.contains(&id) {
            s.iter().all(|&b| b == 0)
        } else {
            let mut want = [0u8; SECTOR];
            fill_sector(&mut want, id, sector as u64);
            want[..] == *s
        }
    }

    pub(crate) fn try_lock(&mut self, start: usize, len: usize, tag: u64) -> bool {
        if self.pending[start..start + len].iter().any(|&p| p != NONE) {
            return false;
        }
        self.pending[start..start + len].fill(tag);
        true
    }
}
