//! End-to-end tests: the real `vblkcache` binary on temp files, driven by
//! libblkio's virtio-blk-vhost-user driver. Every check compares data with a
//! reference copy, so the tests hold for any correct cache engine.

mod common;

use common::{is_socket, status_json, Client, Daemon, Files, BIN};
use rand::{Rng, SeedableRng};
use std::process::Command;

const MIB: usize = 1 << 20;

fn random_bytes(rng: &mut impl Rng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

/// A random sector-aligned (offset, len) inside a disk of `size` bytes.
fn random_range(rng: &mut impl Rng, size: usize, max_len: usize) -> (usize, usize) {
    let len = rng.gen_range(1..=max_len / 512) * 512;
    let off = rng.gen_range(0..=(size - len) / 512) * 512;
    (off, len)
}

#[test]
fn random_io_with_io_uring_matches_reference() {
    // The cache file is on a filesystem with O_DIRECT (or the page cache):
    // both allow the io_uring path, so every one of the 8 hot reads uses it.
    assert_eq!(random_io_scenario("on", &[]), 8);
}

#[test]
fn random_io_without_io_uring_matches_reference() {
    assert_eq!(random_io_scenario("off", &[]), 0);
}

#[test]
fn random_io_with_busy_polling_matches_reference() {
    // Queues polled after each pass: requests are taken without kicks and
    // completions reaped without the eventfd, with the same results.
    assert_eq!(random_io_scenario("on", &["--poll", "200us"]), 8);
}

#[test]
fn random_io_with_pinned_guest_memory_matches_reference() {
    // libblkio's memory is shared memory the kernel pins: hits use it as
    // io_uring fixed buffers, with the same results.
    assert_eq!(random_io_scenario("on", &["--pin-guest-memory"]), 8);
}

/// Random reads, writes (single and batched), flushes, write-zeroes and a
/// discard against a reference copy, then 8 reads of freshly written
/// (cached) blocks; returns how many requests took the io_uring path during
/// those 8 reads. `extra` goes to `vblkcache serve`.
fn random_io_scenario(io_uring: &str, extra: &[&str]) -> u64 {
    let files = Files::new(64 * MIB, 32 << 20, 1);
    let control = files.dir.path().join("ctl.sock");
    let ctl = control.display().to_string();
    let mut args = vec![
        "--mode",
        "writeback",
        "--block-size",
        "64K",
        "--io-uring",
        io_uring,
        "--control",
        &ctl,
    ];
    args.extend_from_slice(extra);
    let daemon = Daemon::start(&files, &args);
    let mut client = Client::connect(&files.socket, 1);
    assert_eq!(client.capacity(), 64 * MIB as u64);
    let mut q = client.queue(0);
    let mut reference = files.initial.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);

    for round in 0..150 {
        match rng.gen_range(0..10) {
            0..=3 => {
                let (off, len) = random_range(&mut rng, reference.len(), 256 * 1024);
                let data = random_bytes(&mut rng, len);
                q.write(off as u64, &data);
                reference[off..off + len].copy_from_slice(&data);
            }
            4 => {
                // Several writes in flight at once, to disjoint ranges.
                let base = rng.gen_range(0..(reference.len() - 8 * 65536) / 65536) * 65536;
                let writes: Vec<(u64, Vec<u8>)> = (0..8)
                    .map(|i| {
                        let len = rng.gen_range(1..=128) * 512;
                        ((base + i * 65536) as u64, random_bytes(&mut rng, len))
                    })
                    .collect();
                q.write_batch(&writes);
                for (off, data) in &writes {
                    let off = *off as usize;
                    reference[off..off + data.len()].copy_from_slice(data);
                }
            }
            5 => q.flush(),
            _ => {
                let (off, len) = random_range(&mut rng, reference.len(), 256 * 1024);
                assert!(
                    q.read(off as u64, len) == reference[off..off + len],
                    "round {round}: read {len} at {off} differs"
                );
            }
        }
    }

    // Write-zeroes reads back as zeros.
    let (zo, zl) = (3 * MIB + 4096, 300 * 1024);
    q.write_zeroes(zo as u64, zl as u64);
    reference[zo..zo + zl].fill(0);
    assert!(q.read(zo as u64, zl) == reference[zo..zo + zl]);

    // After a discard each sector holds either its old data or zeros, and
    // nothing outside the range changes.
    let (dofs, dlen) = (8 * MIB, 256 * 1024);
    q.discard(dofs as u64, dlen as u64);
    let got = q.read((dofs - 4096) as u64, dlen + 8192);
    let want = &reference[dofs - 4096..dofs + dlen + 4096];
    assert_eq!(got[..4096], want[..4096]);
    assert_eq!(got[got.len() - 4096..], want[want.len() - 4096..]);
    for (g, w) in got[4096..4096 + dlen]
        .chunks(512)
        .zip(want[4096..4096 + dlen].chunks(512))
    {
        assert!(
            g == w || g.iter().all(|b| *b == 0),
            "discarded sector is garbage"
        );
    }
    let discarded = got[4096..4096 + dlen].to_vec();
    reference[dofs..dofs + dlen].copy_from_slice(&discarded);

    // Requests past the end fail instead of touching anything.
    assert!(q.try_read(64 * MIB as u64 - 512, 1024).is_err());

    // Full comparison.
    for off in (0..reference.len()).step_by(4 * MIB) {
        assert!(
            q.read(off as u64, 4 * MIB) == reference[off..off + 4 * MIB],
            "at {off}"
        );
    }
    // Cached blocks read again: with io_uring each read is one direct
    // request (4 whole blocks, pinned and read in place).
    let hot = random_bytes(&mut rng, 256 * 1024);
    q.write(MIB as u64, &hot);
    let before = status_json(&control)["stats"]["direct_requests"]
        .as_u64()
        .unwrap();
    for _ in 0..8 {
        assert!(q.read(MIB as u64, hot.len()) == hot);
    }
    let after = status_json(&control)["stats"]["direct_requests"]
        .as_u64()
        .unwrap();
    drop(q);
    drop(client);
    // With --pin-guest-memory, libblkio's memory is registered once per
    // memory table it sets (it adds its regions one by one: two here), not
    // again by the hundreds of requests above.
    let registrations = daemon
        .log_text()
        .matches("guest memory registered with io_uring")
        .count();
    let want = if extra.contains(&"--pin-guest-memory") {
        1..=4
    } else {
        0..=0
    };
    assert!(
        want.contains(&registrations),
        "{registrations} registrations\n{}",
        daemon.log_text()
    );
    assert!(daemon.stop().success());
    assert!(!files.socket.exists(), "socket left behind");
    after - before
}

#[test]
fn readonly_is_advertised_and_reads_work() {
    let files = Files::new(16 * MIB, 16 << 20, 2);
    let daemon = Daemon::start(&files, &["--readonly"]);
    // libblkio refuses a read-only device unless asked for read-only, which
    // shows the RO feature is offered (the daemon's own rejection of writes
    // is covered by the parser unit tests).
    let err = Client::try_connect(&files.socket, 1, false)
        .err()
        .expect("RO not advertised");
    assert!(err.message().contains("read-only"), "{}", err.message());
    let mut client = Client::try_connect(&files.socket, 1, true).unwrap();
    let mut q = client.queue(0);
    assert!(q.read(4096, 65536) == files.initial[4096..4096 + 65536]);
    assert_ne!(
        q.try_write(0, &[1u8; 512]),
        0,
        "write on a read-only disk succeeded"
    );
    drop(q);
    drop(client);
    assert!(daemon.stop().success());
    assert!(std::fs::read(&files.source).unwrap() == files.initial);
}

#[test]
fn two_queues_concurrently() {
    queues_concurrently(2, &["--queues", "2", "--queue-threads", "2"], 2);
}

/// Three queues on two threads: thread 0 serves queues 0 and 2 (kicks and
/// io_uring completions of both on one epoll loop), thread 1 queue 1.
#[test]
fn three_queues_on_two_threads() {
    queues_concurrently(3, &["--queues", "3", "--queue-threads", "2"], 2);
}

/// Each of `n` queues, from its own thread, writes and reads back random
/// ranges of its own slice of the disk; then queue 0 reads the whole disk.
/// The daemon serves them with `workers` queue threads.
fn queues_concurrently(n: usize, args: &[&str], workers: usize) {
    let slice = 6 * MIB;
    let files = Files::new(n * slice, 16 << 20, 3);
    let daemon = Daemon::start(&files, args);
    let mut client = Client::connect(&files.socket, n as i32);
    let queues = client.split();
    assert_eq!(queues.len(), n);
    assert_eq!(
        threads_named_settled(daemon.pid(), "vring_worker", workers),
        workers
    );
    let handles: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(i, mut q)| {
            let mut reference = files.initial[i * slice..(i + 1) * slice].to_vec();
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(100 + i as u64);
                for _ in 0..60 {
                    let (off, len) = random_range(&mut rng, slice, 128 * 1024);
                    let disk = (i * slice + off) as u64;
                    if rng.gen_bool(0.5) {
                        let data = random_bytes(&mut rng, len);
                        q.write(disk, &data);
                        reference[off..off + len].copy_from_slice(&data);
                    } else {
                        assert!(q.read(disk, len) == reference[off..off + len]);
                    }
                }
                (q, reference)
            })
        })
        .collect();
    let mut results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    // Queue 0 sees what every queue wrote.
    let whole: Vec<u8> = results
        .iter()
        .flat_map(|(_, r)| r.iter().copied())
        .collect();
    let (mut q0, _) = results.remove(0);
    for off in (0..whole.len()).step_by(2 * MIB) {
        assert!(
            q0.read(off as u64, 2 * MIB) == whole[off..off + 2 * MIB],
            "at {off}"
        );
    }
    drop(q0);
    drop(results);
    drop(client);
    assert!(daemon.stop().success());
}

#[test]
fn next_client_after_disconnect() {
    let files = Files::new(16 * MIB, 16 << 20, 4);
    let daemon = Daemon::start(&files, &[]);
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 253) as u8).collect();
    for round in 0..3u64 {
        let mut client = Client::connect(&files.socket, 1);
        let mut q = client.queue(0);
        if round > 0 {
            let got = q.try_read((round - 1) * 65536, 65536);
            assert!(
                got.as_ref() == Ok(&data),
                "round {round}: {:?} {}",
                got.err(),
                daemon.log_text()
            );
        }
        q.write(round * 65536, &data);
        drop(q);
        drop(client);
    }
    assert!(daemon.stop().success());
}

#[test]
fn data_survives_restart_and_dirty_data_survives_sigterm() {
    let files = Files::new(16 * MIB, 16 << 20, 5);
    let mut reference = files.initial.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let d = Daemon::start(&files, &["--mode", "writeback"]);
    {
        let mut client = Client::connect(&files.socket, 1);
        let mut q = client.queue(0);
        for i in 0..20 {
            let (off, len) = random_range(&mut rng, reference.len(), 128 * 1024);
            let data = random_bytes(&mut rng, len);
            q.write(off as u64, &data);
            reference[off..off + len].copy_from_slice(&data);
            if i == 10 {
                q.flush();
            }
        }
        // No flush after the last writes: they may be dirty in the cache.
    }
    // SIGTERM while no front-end is connected.
    assert!(d.stop().success());
    assert!(!files.socket.exists());

    let d = Daemon::start(&files, &[]);
    {
        let mut client = Client::connect(&files.socket, 1);
        let mut q = client.queue(0);
        for off in (0..reference.len()).step_by(4 * MIB) {
            assert!(
                q.read(off as u64, 4 * MIB) == reference[off..off + 4 * MIB],
                "at {off}"
            );
        }
        // Dirty again, then stop with a front-end still connected, writing
        // everything back to the source.
        let data = random_bytes(&mut rng, 64 * 1024);
        q.write(5 * MIB as u64, &data);
        reference[5 * MIB..5 * MIB + data.len()].copy_from_slice(&data);
        let d2 = d;
        // Restart with --writeback-on-exit below needs this daemon gone.
        assert!(d2.signal_and_wait(libc::SIGINT).success());
    }
    let d = Daemon::start(&files, &["--writeback-on-exit"]);
    assert!(d.stop().success());
    let source = std::fs::read(&files.source).unwrap();
    assert!(
        source == reference,
        "source does not hold the written data after --writeback-on-exit"
    );
}

fn run_bad(args: &[String]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_command_lines_exit_2_and_create_nothing() {
    let files = Files::new(MIB, 4 << 20, 6);
    let cache_before = std::fs::read(&files.cache).unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--queues", "0"], "--queues"),
        (&["--queues", "abc"], "--queues"),
        (&["--queue-size", "100"], "--queue-size"),
        (
            &["--queues", "2", "--queue-threads", "3"],
            "--queue-threads",
        ),
        (
            &["--queues", "2", "--queue-threads", "1", "--poll", "32us"],
            "--queue-threads",
        ),
        (&["--block-size", "3K"], "--block-size"),
        (&["--block-size", "lots"], "--block-size"),
        (&["--mode", "fast"], "--mode"),
        (&["--assoc", "3"], "--assoc"),
        (&["--serial", "this-serial-is-too-long"], "--serial"),
        (&["--socket-mode", "999"], "--socket-mode"),
        (&["--no-such-flag"], "--no-such-flag"),
    ];
    for (extra, name) in cases {
        let (code, err) = run_bad(&files.serve_args(extra));
        assert_eq!(code, 2, "{extra:?}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{extra:?}: not one line: {err}"
        );
        assert!(
            err.contains(name),
            "{extra:?}: message does not name {name}: {err}"
        );
        assert!(!files.socket.exists(), "{extra:?} created the socket");
    }
    let mut missing = files.serve_args(&[]);
    missing[2] = files.dir.path().join("nope.img").display().to_string();
    let (code, err) = run_bad(&missing);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--source"), "{err}");
    let (code, err) = run_bad(&[
        "set-mode".into(),
        "fast".into(),
        "--control".into(),
        "/x".into(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--mode") || err.contains("mode"), "{err}");
    assert!(!files.socket.exists());
    assert!(
        std::fs::read(&files.cache).unwrap() == cache_before,
        "cache was modified"
    );
}

#[test]
fn regular_file_at_socket_path_is_kept_and_stale_socket_replaced() {
    let files = Files::new(MIB, 4 << 20, 7);
    std::fs::write(&files.socket, b"not a socket").unwrap();
    let (code, err) = run_bad(&files.serve_args(&[]));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--socket") && err.contains("not a socket"),
        "{err}"
    );
    assert_eq!(std::fs::read(&files.socket).unwrap(), b"not a socket");

    // A stale socket (nobody listening) is replaced.
    std::fs::remove_file(&files.socket).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&files.socket).unwrap());
    assert!(is_socket(&files.socket));
    let d = Daemon::start(&files, &[]);
    {
        let mut client = Client::connect(&files.socket, 1);
        let mut q = client.queue(0);
        assert!(q.read(0, 4096) == files.initial[..4096]);
    }
    // A second daemon on a live socket refuses and leaves it alone.
    let (code, err) = run_bad(&files.serve_args(&[]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("in use"), "{err}");
    assert!(is_socket(&files.socket));
    assert!(d.stop().success());
}

#[test]
fn direct_on_tmpfs_fails_clearly() {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        return;
    }
    let dir = tempfile::tempdir_in(shm).unwrap();
    let src = dir.path().join("s.img");
    let cache = dir.path().join("c.img");
    std::fs::write(&src, vec![0u8; MIB]).unwrap();
    std::fs::write(&cache, vec![0u8; 4 * MIB]).unwrap();
    // Only meaningful where the filesystem refuses O_DIRECT.
    let probe = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags_direct()
        .open(&src);
    if probe.is_ok() {
        return;
    }
    let sock = dir.path().join("d.sock");
    let args: Vec<String> = [
        "serve",
        "--source",
        src.to_str().unwrap(),
        "--cache",
        cache.to_str().unwrap(),
        "--socket",
        sock.to_str().unwrap(),
        "--direct",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (code, err) = run_bad(&args);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--direct") && err.contains("O_DIRECT"),
        "{err}"
    );
    assert!(!sock.exists());
}

trait DirectExt {
    fn custom_flags_direct(&mut self) -> &mut Self;
}

impl DirectExt for std::fs::OpenOptions {
    fn custom_flags_direct(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_DIRECT)
    }
}

/// How many threads of process `pid` are named `name`.
/// The number of threads of `pid` called `name`, once it is `want` or 5 s
/// have passed: a new thread names itself after it starts, so a count taken
/// at once can miss one that is still starting.
fn threads_named_settled(pid: i32, name: &str, want: usize) -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let n = threads_named(pid, name);
        if n == want || std::time::Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn threads_named(pid: i32, name: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

/// `--writeback-idle`: dirty blocks below the low watermark reach the source
/// once no request comes, with the front-end still connected; with `off`
/// they stay in the cache.
#[test]
fn an_idle_daemon_writes_dirty_blocks_back_to_the_source() {
    for idle in ["1s", "off"] {
        let files = Files::new(16 * MIB, 16 << 20, 11);
        let control = files.dir.path().join("ctl.sock");
        let ctl = control.display().to_string();
        let mut reference = files.initial.clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let d = Daemon::start(
            &files,
            &[
                "--mode",
                "writeback",
                "--writeback-idle",
                idle,
                "--control",
                &ctl,
            ],
        );
        let mut client = Client::connect(&files.socket, 1);
        let mut q = client.queue(0);
        for _ in 0..20 {
            let (off, len) = random_range(&mut rng, reference.len(), 128 * 1024);
            let data = random_bytes(&mut rng, len);
            q.write(off as u64, &data);
            reference[off..off + len].copy_from_slice(&data);
        }
        q.flush();
        let dirty = |c: &std::path::Path| status_json(c)["dirty_blocks"].as_u64().unwrap();
        let first = dirty(&control);
        assert!(first > 0, "{idle}: no dirty block after the writes");
        let t0 = std::time::Instant::now();
        while dirty(&control) > 0 && t0.elapsed() < std::time::Duration::from_secs(6) {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let source = std::fs::read(&files.source).unwrap();
        if idle == "off" {
            assert_eq!(
                dirty(&control),
                first,
                "off: dirty blocks were written back"
            );
            assert!(
                source != reference,
                "off: the source already holds the writes"
            );
        } else {
            assert_eq!(
                dirty(&control),
                0,
                "{idle}: dirty blocks left after 6 s idle"
            );
            assert!(
                source == reference,
                "{idle}: the source does not hold the writes"
            );
        }
        drop(q);
        drop(client);
        assert!(d.stop().success());
    }
}

/// Large hits are staged in huge pages by the real daemon with its seccomp
/// filter on (it reads the THP setting before the filter forbids opening
/// files): every 1 MiB write and read hit below is counted in
/// `staged_requests`, and none with `--bounce-min off`. Every read returns
/// what was written either way.
#[test]
fn large_hits_are_staged_in_huge_pages_under_the_sandbox() {
    // The daemon's own test of whether staging can pay off here.
    if vblkcache::virtio::staging_threshold(Some(MIB)).is_none() {
        eprintln!("skipping: no transparent huge pages");
        return;
    }
    for (extra, staged) in [(&[][..], true), (&["--bounce-min", "off"][..], false)] {
        let files = Files::new(16 * MIB, 32 << 20, 3);
        let cache = std::fs::File::open(&files.cache).unwrap();
        if vblkcache::device::fs_type(&cache) == Some(0x0102_1994) {
            eprintln!("skipping: the temp dir is on tmpfs (hits are memory copies)");
            return;
        }
        let control = files.dir.path().join("ctl.sock");
        let ctl = control.display().to_string();
        let mut args = vec![
            "--mode",
            "writeback",
            "--block-size",
            "64K",
            "--control",
            &ctl,
        ];
        args.extend_from_slice(extra);
        let daemon = Daemon::start(&files, &args);
        let mut client = Client::connect(&files.socket, 1);
        let mut q = client.queue(0);
        // Fill the cache from the source first, so that the writes and
        // reads that follow are hits.
        assert!(q.read(0, 4 * MIB) == files.initial[..4 * MIB]);
        let stat = |name: &str| status_json(&control)["stats"][name].as_u64().unwrap();
        let (direct, before) = (stat("direct_requests"), stat("staged_requests"));
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for i in 0..8u64 {
            let data = random_bytes(&mut rng, MIB);
            let at = (i % 4) * MIB as u64;
            q.write(at, &data);
            assert!(q.read(at, MIB) == data, "read {i} differs");
        }
        let (direct, staged_now) = (
            stat("direct_requests") - direct,
            stat("staged_requests") - before,
        );
        drop(q);
        drop(client);
        let log = daemon.log_text();
        assert!(daemon.stop().success(), "{log}");
        assert_eq!(direct, 16, "not all were io_uring hits\n{log}");
        let want = if staged { 16 } else { 0 };
        assert_eq!(staged_now, want, "staged requests\n{log}");
    }
}

/// The daemon reads ahead of a guest reading in order by default, and not
/// with `--readahead off`; what the guest reads is the source's data
/// either way. The source is slowed (2 ms) as a real slow source would be.
#[test]
fn a_guest_reading_in_order_is_read_ahead_by_default() {
    for readahead in [None, Some("off")] {
        let files = Files::new(8 * MIB, 16 << 20, 21);
        let control = files.dir.path().join("ctl.sock");
        let ctl = control.display().to_string();
        let mut args = vec!["--source-latency", "2ms", "--control", &ctl];
        if let Some(r) = readahead {
            args.extend(["--readahead", r]);
        }
        let d = Daemon::start(&files, &args);
        let mut client = Client::connect(&files.socket, 1);
        let mut q = client.queue(0);
        // 4 MiB in 16 KiB reads: four reads per 64 KiB block.
        for off in (0..4 * MIB).step_by(16 * 1024) {
            let got = q.read(off as u64, 16 * 1024);
            assert!(
                got == files.initial[off..off + 16 * 1024],
                "{readahead:?}: wrong data at {off}"
            );
        }
        let stats = status_json(&control)["stats"].clone();
        let n = |k: &str| stats[k].as_u64().unwrap_or(u64::MAX);
        match readahead {
            None => {
                assert!(n("readahead_blocks") > 0, "nothing read ahead: {stats}");
                // Two misses start the stream; the first block fetched in
                // each window fetches the next, so there is no miss at a
                // window's end.
                assert!(
                    n("read_misses") <= 3,
                    "{} misses of 64 blocks",
                    n("read_misses")
                );
            }
            Some(_) => {
                assert_eq!(n("readahead_blocks"), 0, "read ahead although off");
                assert_eq!(n("read_misses"), 64, "every block misses without readahead");
            }
        }
        drop(q);
        drop(client);
        assert!(d.stop().success());
    }
}
