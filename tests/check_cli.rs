//! `vblkcache check` through the binary: exit codes, JSON fields, repair,
//! and the lock that keeps it (and a second daemon) off a cache in use.

mod common;

use common::{Client, Daemon, Files, BIN};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};

fn check(cache: &Path, extra: &[&str]) -> Output {
    Command::new(BIN)
        .arg("check")
        .args(extra)
        .arg("--cache")
        .arg(cache)
        .output()
        .unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"))
}

fn flip(path: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x20;
    f.write_all_at(&b, offset).unwrap();
}

#[test]
fn check_of_a_daemon_cache_lock_json_repair_and_exit_codes() {
    let files = Files::new(8 << 20, 8 << 20, 5);
    let daemon = Daemon::start(&files, &["--block-size", "4K", "--mode", "writeback"]);
    let mut client = Client::connect(&files.socket, 1);
    let mut q = client.queue(0);
    q.write(0, &vec![0x5A; 64 << 10]);
    q.flush();

    // In use: check and a second daemon refuse.
    let out = check(&files.cache, &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is in use by another vblkcache"), "{err}");
    let other = files.dir.path().join("other.sock");
    let out = Command::new(BIN)
        .args(files.serve_args(&[]).iter().take(5))
        .arg("--socket")
        .arg(&other)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another vblkcache"));
    assert!(!other.exists());
    // Nor may a second daemon serve the same source through another cache.
    let other_cache = files.dir.path().join("other.cache");
    std::fs::write(&other_cache, vec![0u8; 8 << 20]).unwrap();
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--source")
        .arg(&files.source)
        .arg("--cache")
        .arg(&other_cache)
        .arg("--socket")
        .arg(&other)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--source") && err.contains("in use by another vblkcache"),
        "{err}"
    );
    assert!(!other.exists());
    assert!(
        std::fs::read(&other_cache).unwrap().iter().all(|&b| b == 0),
        "other cache formatted"
    );

    drop(q);
    drop(client);
    assert!(daemon.stop().success());

    // Clean shutdown: consistent, both output forms.
    let out = check(&files.cache, &["--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v = json(&out);
    assert_eq!(v["consistent"], true);
    assert_eq!(v["superblock"]["clean"], true);
    assert_eq!(v["superblock"]["block_size"], 4096);
    assert_eq!(v["table"]["stored"]["dirty"], 16);
    assert_eq!(v["problems"].as_array().unwrap().len(), 0);
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&files.source).unwrap());
    let source = format!("the regular file with inode {ino}");
    assert_eq!(v["superblock"]["source"], source.as_str());
    let human = check(&files.cache, &[]);
    assert_eq!(human.status.code(), Some(0));
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.trim_end().ends_with("consistent")
            && text.contains("16 dirty")
            && text.contains(&format!("belongs to {source}")),
        "{text}"
    );

    // A corrupted superblock slot: exit 1, not repairable (the valid copy may be older).
    let slot = v["superblock"]["slot"].as_u64().unwrap();
    flip(&files.cache, slot * 4096 + 30);
    let out = check(&files.cache, &["--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let bad = json(&out);
    assert_eq!(bad["consistent"], false);
    assert_eq!(bad["problems"][0]["area"], "superblock");
    assert_eq!(bad["problems"][0]["repairable"], false);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not consistent"));
    let out = check(&files.cache, &["--json", "--repair"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(json(&out)["repairs"].as_array().unwrap().len(), 0);
    // Put the slot back for the next case.
    flip(&files.cache, slot * 4096 + 30);
    assert_eq!(check(&files.cache, &[]).status.code(), Some(0));

    // A corrupted table page cannot be repaired; the daemon refuses it too.
    let table = v["superblock"]["table_offset"].as_u64().unwrap();
    flip(&files.cache, table + 100);
    let out = check(&files.cache, &["--json", "--repair"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let bad = json(&out);
    assert_eq!(bad["problems"][0]["area"], "table");
    assert_eq!(bad["repairs"].as_array().unwrap().len(), 0);
}

#[test]
fn check_argument_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = check(&dir.path().join("missing.img"), &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cache"));
    let out = Command::new(BIN).arg("check").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // A blank file is not a cache: exit 1 with the reason.
    let blank = dir.path().join("blank.img");
    std::fs::File::create(&blank)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let out = check(&blank, &["--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(json(&out)["problems"][0]["what"]
        .as_str()
        .unwrap()
        .contains("no vblkcache superblock"));
}

/// A qcow2 image passed as the source (made by the real qemu-img) is refused
/// before anything is touched: served raw, the guest would see and could
/// overwrite the image's metadata. `--force-raw` serves it anyway.
#[test]
fn an_image_format_source_is_refused_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let cache = dir.path().join("cache");
    std::fs::write(&cache, vec![0u8; 8 << 20]).unwrap();
    let sock = dir.path().join("vhost.sock");
    let serve = |extra: &[&str]| {
        Command::new(BIN)
            .arg("serve")
            .arg("--source")
            .arg(&img)
            .arg("--cache")
            .arg(&cache)
            .arg("--socket")
            .arg(&sock)
            .args(extra)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let out = serve(&[]).wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is a qcow2 image") && err.contains("--force-raw"),
        "{err}"
    );
    assert!(std::fs::read(&cache).unwrap().iter().all(|&b| b == 0));
    assert!(!sock.exists());
    // Forced, it starts (and formats the cache); stopped at once.
    let mut child = serve(&["--force-raw"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !sock.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(sock.exists(), "the forced daemon did not start");
    // SAFETY: kill only sends a signal to the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}
