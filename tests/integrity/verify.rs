//! Verification against the model: reading the whole disk through the
//! daemon (after a clean stop, a kill or with the crash state off), and
//! comparing the source file after a full writeback.

use crate::common::REGION;
use crate::model::{decode, Model, NONE, READING, SECTOR};
use blkio::{Blkioq, Completion, ReqFlags};
use std::mem::MaybeUninit;
use std::path::Path;

/// Reads the whole disk through queue `q`; checks every sector against the
/// model. `after_kill`: pending writes are allowed too; with `durable`
/// semantics (crash state off) anything from the last FLUSH on. The sectors
/// read become the new baseline.
pub(crate) fn verify_all(
    q: &mut Blkioq,
    buf: *mut u8,
    m: &mut Model,
    what: &str,
    after_kill: bool,
    durable_only: bool,
) -> Vec<String> {
    let sectors = m.cur.len();
    let mut bad = Vec::new();
    let mut nbad = 0usize;
    let mut read_ids = vec![0u64; sectors];
    let chunk = REGION / SECTOR;
    let mut s0 = 0;
    while s0 < sectors {
        let n = chunk.min(sectors - s0);
        q.read((s0 * SECTOR) as u64, buf, n * SECTOR, 0, ReqFlags::empty());
        let mut c = [MaybeUninit::<Completion>::uninit()];
        let got = q.do_io(&mut c, 1, None, None).unwrap();
        assert_eq!(got, 1);
        // SAFETY: slot/region memory of a live blkio mapping, used by one request at a time; the pid is our unreaped child.
        let c = unsafe { c[0].assume_init_read() };
        assert_eq!(c.ret, 0, "{what}: verify read at sector {s0} failed");
        // SAFETY: slot/region memory of a live blkio mapping, used by one request at a time; the pid is our unreaped child.
        let data = unsafe { std::slice::from_raw_parts(buf, n * SECTOR) };
        for (i, s) in data.chunks_exact(SECTOR).enumerate() {
            let sec = s0 + i;
            let cur = m.cur[sec];
            let mut ok = None;
            if m.content_ok(s, cur, sec) {
                ok = Some(cur);
            } else if m.resolve(s, sec) {
                ok = Some(m.cur[sec]);
            } else if after_kill {
                let p = m.pending[sec];
                if p != NONE && p != READING && m.content_ok(s, p, sec) {
                    ok = Some(p);
                }
                if ok.is_none() && durable_only {
                    let d = m.durable[sec];
                    if m.content_ok(s, d, sec) {
                        ok = Some(d);
                    } else {
                        // Any op covering the sector issued after the durable one.
                        let cand: Vec<u64> = m
                            .issued
                            .iter()
                            .filter(|(id, st, l, _)| *id >= d && (*st..*st + *l).contains(&sec))
                            .map(|x| x.0)
                            .collect();
                        ok = cand.into_iter().rev().find(|&id| m.content_ok(s, id, sec));
                    }
                }
            }
            match ok {
                Some(id) => read_ids[sec] = id,
                None => {
                    nbad += 1;
                    if bad.len() < 12 {
                        let covering: Vec<_> = m
                            .issued
                            .iter()
                            .filter(|(_, st, l, _)| (*st..*st + *l).contains(&sec))
                            .rev()
                            .take(4)
                            .collect();
                        bad.push(format!(
                            "{what}: sector {sec} (byte {}) expected op {cur}{} (pending {}, durable {}) got {:?}; last ops covering it {covering:?}",
                            sec * SECTOR,
                            if m.zero_ops.contains(&cur) { " (zeros)" } else { "" },
                            m.pending[sec] as i64,
                            m.durable[sec],
                            decode(s, sec)
                        ));
                    }
                }
            }
        }
        s0 += n;
    }
    if nbad > 0 {
        bad.push(format!("{what}: {nbad} bad sectors in total"));
    }
    m.cur = read_ids.clone();
    m.durable = read_ids;
    m.pending.fill(NONE);
    m.issued.clear();
    m.cands.clear();
    bad
}

/// Compares the source file with the model (after a full writeback).
pub(crate) fn check_source_file(path: &Path, m: &Model, what: &str) -> Vec<String> {
    let data = std::fs::read(path).unwrap();
    let mut bad = Vec::new();
    let mut n = 0;
    for (sec, s) in data.chunks_exact(SECTOR).enumerate() {
        if !m.content_ok(s, m.cur[sec], sec) {
            n += 1;
            if bad.len() < 8 {
                bad.push(format!(
                    "{what}: source file sector {sec} expected op {} got {:?}",
                    m.cur[sec],
                    decode(s, sec)
                ));
            }
        }
    }
    if n > 0 {
        bad.push(format!("{what}: {n} source sectors differ"));
    }
    bad
}
