//! Control-socket helpers: one `vblkcache` control command, and the
//! controller thread that switches modes, flushes, reads the status and
//! resets the statistics at random while I/O runs.

use crate::common::BIN;
use crate::worker::Shared;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) fn control(ctl: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--control")
        .arg(ctl)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Control operations while I/O runs; returns a log of what it did.
pub(crate) fn controller(
    ctl: PathBuf,
    sh: Arc<Shared>,
    seed: u64,
    deadline: Instant,
) -> Vec<String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut log = Vec::new();
    let modes = ["writethrough", "writearound", "passthrough", "writeback"];
    while Instant::now() < deadline && !sh.killed.load(SeqCst) && !sh.stop.load(SeqCst) {
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..300)));
        if sh.killed.load(SeqCst) {
            break;
        }
        let (what, args): (String, Vec<&str>) = match rng.gen_range(0..10) {
            0..=3 => {
                let m = modes[rng.gen_range(0..modes.len())];
                (format!("set-mode {m}"), vec!["set-mode", m])
            }
            4..=5 => ("flush".into(), vec!["flush"]),
            6..=7 => ("status".into(), vec!["status", "--json"]),
            8 => ("set-mode writeback".into(), vec!["set-mode", "writeback"]),
            _ => ("reset-stats".into(), vec!["reset-stats"]),
        };
        let t = Instant::now();
        let (ok, out) = control(&ctl, &args);
        if !ok && !sh.killed.load(SeqCst) {
            log.push(format!("{what} FAILED: {}", out.trim()));
        } else {
            log.push(format!("{what} ok ({} ms)", t.elapsed().as_millis()));
        }
    }
    log
}
