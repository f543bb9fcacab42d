//! The driver of a scenario: starts the daemon for each run, verifies the
//! disk at every start, runs the queue workers and the controller, stops
//! the daemon with SIGTERM or kills it (also during start-up), checks the
//! cache after each kill and reports the totals.

use crate::common::{check_json, status_json, Client, Daemon, LoopDevice, BIN};
use crate::control::{control, controller};
use crate::model::{Model, NONE, READING, SECTOR};
use crate::scenario::{make_files, scale, seed, Scenario};
use crate::verify::{check_source_file, verify_all};
use crate::worker::{worker, Qw, Shared};
use blkio::Blkioq;
use rand::{Rng, SeedableRng};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(crate) fn run(sc: Scenario) {
    let started = Instant::now();
    let seed = seed();
    let mut files = make_files(&sc, seed);
    // The image file, also when the daemon gets a loop device over it.
    let source_file = files.source.clone();
    let source_len = std::fs::metadata(&source_file).unwrap().len();
    let _loops = match sc.loop_sector {
        None => None,
        Some(sector) => {
            let Some(src) = LoopDevice::attach(&files.source, sector) else {
                return;
            };
            let Some(cache) = LoopDevice::attach(&files.cache, sector) else {
                return;
            };
            files.source = src.0.clone();
            files.cache = cache.0.clone();
            Some((src, cache))
        }
    };
    let ctl = files.dir.path().join("ctl.sock");
    let ctl_s = ctl.display().to_string();
    let sectors = sc.disk / SECTOR;
    let cb = sc.cache_blocks.to_string();
    let assoc = sc.assoc.to_string();
    let queues = sc.queues.to_string();
    let mut model = Model::new(sectors, !sc.crash_state);
    model.overlap = sc.overlap_writes;
    let mut resolved = 0;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xabcdef);
    let mut failures: Vec<String> = Vec::new();
    let mut totals = [0u64; 8];
    let mut after_kill = false;
    let mut ctl_logs = Vec::new();
    let mut checks = 0;
    let mut kills = 0;
    let mut last_log = String::new();
    let mut term_pending = false;
    let mut storm_kills = 0;
    // A storm daemon killed after its recovery (which saved the recovered
    // mapping as the new table and then gave the superblock a new run id)
    // but before it put its own crash-state file in place leaves only the
    // old run's file, which the next start rightly rejects: nothing is lost,
    // the table holds what it recovered.
    let mut crash_state_may_be_stale = false;
    for it in 0..=sc.runs {
        let mode = if sc.vary_mode && it > 0 {
            ["writeback", "writethrough", "writearound", "writeback"][rng.gen_range(0..4)]
        } else {
            "writeback"
        };
        eprintln!("[{}] run {it}: mode {mode}", sc.name);
        let mut args: Vec<&str> = vec![
            "--mode",
            mode,
            "--block-size",
            sc.block_size,
            "--cache-blocks",
            &cb,
            "--assoc",
            &assoc,
            "--queues",
            &queues,
            "--control",
            &ctl_s,
        ];
        if let Some(l) = sc.source_latency {
            args.extend(["--source-latency", l]);
        }
        if !sc.crash_state {
            args.extend(["--crash-state-dir", "off"]);
        }
        args.extend(sc.extra.iter().copied());
        let daemon = Daemon::start(&files, &args);
        let mut client = Client::connect(&files.socket, sc.queues as i32);
        assert_eq!(client.capacity(), (sc.disk / SECTOR * SECTOR) as u64);
        let what = format!("[{}] run {it} start", sc.name);
        let buf0 = client.regions[0].addr as *mut u8;
        let pend = model
            .pending
            .iter()
            .filter(|&&p| p != NONE && p != READING)
            .count();
        let bad = verify_all(
            &mut client.queues[0],
            buf0,
            &mut model,
            &what,
            after_kill,
            !sc.crash_state,
        );
        if after_kill {
            eprintln!("{what}: {pend} sectors had a write in flight at the kill");
        }
        if std::env::var("VBC_INTEGRITY_SELFTEST").is_ok() && it == 1 {
            // The checker must catch a wrong expectation.
            model.cur[sectors / 2] += 1;
        }
        if term_pending {
            let st = status_json(&ctl);
            if st["start"]["clean"] != true {
                failures.push(format!(
                    "{what}: start after SIGTERM not clean: {}",
                    st["start"]
                ));
            }
        } else if after_kill {
            let st = status_json(&ctl);
            eprintln!(
                "{what}: after kill: start {} mode {} dirty {}",
                st["start"], st["mode"], st["dirty_blocks"]
            );
            let clean_ok = sc.term_then_kill && st["start"]["clean"] == true;
            if st["start"]["clean"] != false && !clean_ok {
                failures.push(format!(
                    "{what}: status start not unclean after kill: {}",
                    st["start"]
                ));
            }
            if sc.crash_state
                && !clean_ok
                && st["start"]["crash_state_recovered"].as_u64().is_none()
            {
                // Rejected for its run id after such a storm kill: expected.
                let stale_run = crash_state_may_be_stale
                    && daemon
                        .log_text()
                        .contains("but the cache was last opened by run");
                if stale_run {
                    eprintln!(
                        "{what}: crash state of the run before the storm rejected (expected)"
                    );
                } else {
                    failures.push(format!("{what}: crash state not used: {}", st["start"]));
                }
            }
        }
        if !bad.is_empty() {
            failures.extend(bad);
            failures.push(format!("previous daemon log tail:\n{last_log}"));
            failures.push(format!("daemon log:\n{}", daemon.log_text()));
            drop(client);
            drop(daemon);
            break;
        }
        if it == sc.runs {
            drop(client);
            let log = daemon.log_text();
            assert!(daemon.stop().success(), "{log}");
            let now = std::fs::metadata(&source_file).unwrap().len();
            if now != source_len {
                failures.push(format!(
                    "[{}] source file size changed from {source_len} to {now}",
                    sc.name
                ));
            }
            let data = std::fs::read(&source_file).unwrap();
            let tail = &data[sc.disk / SECTOR * SECTOR..];
            if tail.iter().any(|&b| b != 0xA5) {
                failures.push(format!(
                    "[{}] bytes past the last sector changed: {:02x?}",
                    sc.name,
                    &tail[..tail.len().min(16)]
                ));
            }
            break;
        }
        // I/O phase.
        let sh = Arc::new(Shared {
            m: Mutex::new(std::mem::replace(&mut model, Model::new(0, false))),
            killed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            errors: Mutex::new(Vec::new()),
            nerr: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            bytes_w: AtomicU64::new(0),
            bytes_r: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            zeroes: AtomicU64::new(0),
            discards: AtomicU64::new(0),
            failed_after_kill: AtomicU64::new(0),
        });
        let secs = sc.secs * scale();
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let regions: Vec<*mut u8> = client.regions.iter().map(|r| r.addr as *mut u8).collect();
        let qs: Vec<Blkioq> = client.queues.drain(..).collect();
        let mut handles = Vec::new();
        for (i, q) in qs.into_iter().enumerate() {
            let qw = Qw { q, buf: regions[i] };
            let (sh, sc) = (sh.clone(), sc.clone());
            let s = seed * 1000 + it as u64 * 16 + i as u64;
            handles.push(std::thread::spawn(move || {
                worker(qw, sh, sc, s, deadline);
            }));
        }
        let ctl_thread = sc.control.then(|| {
            let (sh, ctl) = (sh.clone(), ctl.clone());
            let s = seed * 7 + it as u64;
            std::thread::spawn(move || controller(ctl, sh, s, deadline))
        });
        let pid = daemon.pid();
        if sc.kill || sc.term_under_load {
            let at = Duration::from_secs_f64(secs * rng.gen_range(0.3..1.0));
            std::thread::sleep(at);
            let sig = if sc.kill && !sc.term_then_kill {
                libc::SIGKILL
            } else {
                libc::SIGTERM
            };
            // SAFETY: slot/region memory of a live blkio mapping, used by one request at a time; the pid is our unreaped child.
            let mut rc = unsafe { libc::kill(pid, sig) };
            if sc.term_then_kill {
                let d = Duration::from_micros(rng.gen_range(0..800_000));
                std::thread::sleep(d);
                // SAFETY: slot/region memory of a live blkio mapping, used by one request at a time; the pid is our unreaped child.
                rc |= unsafe { libc::kill(pid, libc::SIGKILL) };
                eprintln!(
                    "[{}] run {it}: SIGKILL {} ms after SIGTERM",
                    sc.name,
                    d.as_millis()
                );
            }
            assert_eq!(rc, 0);
            sh.killed.store(true, SeqCst);
        }
        for h in handles {
            h.join().unwrap();
        }
        if let Some(t) = ctl_thread {
            ctl_logs.extend(t.join().unwrap());
        }
        let io_errors = sh.errors.lock().unwrap().clone();
        let m = &sh;
        for (i, c) in [
            &m.writes,
            &m.reads,
            &m.bytes_w,
            &m.bytes_r,
            &m.flushes,
            &m.zeroes,
            &m.discards,
            &m.failed_after_kill,
        ]
        .iter()
        .enumerate()
        {
            totals[i] += c.load(SeqCst);
        }
        let sh = Arc::try_unwrap(sh).ok().expect("threads gone");
        model = sh.m.into_inner().unwrap();
        resolved += std::mem::take(&mut model.ambiguous_resolved);
        last_log = daemon.log_text();
        if !io_errors.is_empty() {
            failures.extend(io_errors);
            failures.push(format!("daemon log:\n{last_log}"));
            break;
        }
        if sc.term_under_load {
            // SIGTERM was sent: the daemon must drain and exit 0.
            let status = daemon.signal_and_wait(libc::SIGTERM);
            drop(client);
            if !status.success() {
                failures.push(format!(
                    "[{}] run {it}: exit after SIGTERM under load: {status}\n{last_log}",
                    sc.name
                ));
                break;
            }
            let (code, check) = check_json(&files.cache);
            checks += 1;
            if code != 0 || check["consistent"] != true || check["superblock"]["clean"] != true {
                failures.push(format!(
                    "[{}] run {it}: check after SIGTERM: code {code} {check:#}",
                    sc.name
                ));
                break;
            }
            // Writes in flight at the signal may or may not have run.
            after_kill = true;
            term_pending = true;
        } else if sc.kill {
            let status = daemon.signal_and_wait(libc::SIGKILL);
            assert!(sc.term_then_kill || !status.success());
            eprintln!("[{}] run {it}: daemon exit {status}", sc.name);
            drop(client);
            kills += 1;
            let (code, check) = check_json(&files.cache);
            checks += 1;
            if code != 0 || check["consistent"] != true {
                failures.push(format!(
                    "[{}] run {it}: check after kill: code {code} {check:#}",
                    sc.name
                ));
                break;
            }
            // Kill daemons during their start-up (recovery) too.
            crash_state_may_be_stale = false;
            for k in 0..sc.kill_storm {
                let _ = std::fs::remove_file(&files.socket);
                let mut child = Command::new(BIN)
                    .args(files.serve_args(&args))
                    .stdout(std::process::Stdio::null())
                    .stderr(
                        std::fs::File::create(files.dir.path().join(format!("storm-{it}-{k}.log")))
                            .unwrap(),
                    )
                    .spawn()
                    .unwrap();
                let us = match rng.gen_range(0..4) {
                    0 => rng.gen_range(0..3_000),
                    1 => rng.gen_range(3_000..15_000),
                    2 => rng.gen_range(15_000..60_000),
                    _ => rng.gen_range(60_000..200_000),
                };
                std::thread::sleep(Duration::from_micros(us));
                let _ = child.kill();
                let st = child.wait().unwrap();
                storm_kills += 1;
                let log =
                    std::fs::read_to_string(files.dir.path().join(format!("storm-{it}-{k}.log")))
                        .unwrap_or_default();
                // Only a daemon that got past its recovery can have written
                // the superblock; the last such one decides.
                if log.contains("not shut down cleanly") {
                    crash_state_may_be_stale = !log.contains("crash state kept in");
                }
                if st.code().is_some() && st.code() != Some(0) {
                    failures.push(format!(
                        "[{}] run {it}: storm daemon {k} exited {st}: {log}",
                        sc.name
                    ));
                }
                let (code, check) = check_json(&files.cache);
                checks += 1;
                if code != 0 || check["consistent"] != true {
                    failures.push(format!("[{}] run {it}: check after storm kill {k} ({us} us): code {code} {check:#}", sc.name));
                    break;
                }
            }
            if !failures.is_empty() {
                break;
            }
            after_kill = true;
        } else {
            // Quiesced: full verify through the live daemon, then writeback
            // and compare the source, then SIGTERM.
            let what = format!("[{}] run {it} end (live)", sc.name);
            drop(client);
            let mut client = Client::connect(&files.socket, 1);
            let buf0 = client.regions[0].addr as *mut u8;
            let bad = verify_all(&mut client.queues[0], buf0, &mut model, &what, false, false);
            if !bad.is_empty() {
                failures.extend(bad);
                failures.push(format!("daemon log:\n{}", daemon.log_text()));
                break;
            }
            if sc.check_source && it % 2 == 1 {
                // Put writeback in charge again, write every dirty block back.
                let (ok, out) = control(&ctl, &["set-mode", "writeback"]);
                assert!(ok, "{out}");
                let (ok, out) = control(&ctl, &["flush"]);
                assert!(ok, "{out}");
                let st = status_json(&ctl);
                let what = format!(
                    "[{}] run {it} after flush (dirty {})",
                    sc.name, st["dirty_blocks"]
                );
                let bad = check_source_file(&source_file, &model, &what);
                if !bad.is_empty() {
                    failures.extend(bad);
                    failures.push(format!("status: {st}"));
                    break;
                }
            }
            drop(client);
            let log = daemon.log_text();
            let st = daemon.stop();
            assert!(st.success(), "{log}");
            after_kill = false;
            term_pending = false;
        }
    }
    eprintln!(
        "[{}] {:.1}s: runs {} kills {} (+{} at start-up) checks {}: writes {} ({} MiB), reads {} ({} MiB), flushes {}, zeroes {}, discards {}, failed-after-kill {}",
        sc.name,
        started.elapsed().as_secs_f64(),
        sc.runs,
        kills,
        storm_kills,
        checks,
        totals[0],
        totals[2] >> 20,
        totals[1],
        totals[3] >> 20,
        totals[4],
        totals[5],
        totals[6],
        totals[7]
    );
    eprintln!(
        "[{}] overlapping-write sectors resolved by reads during I/O: {resolved}",
        sc.name
    );
    let failed_ctl: Vec<&String> = ctl_logs.iter().filter(|l| l.contains("FAILED")).collect();
    eprintln!(
        "[{}] control ops: {} ({} failed) {:?}",
        sc.name,
        ctl_logs.len(),
        failed_ctl.len(),
        failed_ctl.iter().take(5).collect::<Vec<_>>()
    );
    if !failures.is_empty() {
        panic!("{} failures:\n{}", sc.name, failures.join("\n"));
    }
}
