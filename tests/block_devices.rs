//! Block devices as source and cache (loop devices here): served with
//! O_DIRECT like any disk, kept warm across restarts, and told apart from
//! another disk of the same size by their identity.
//!
//! Needs root (losetup); where loop devices cannot be attached the tests say
//! SKIP on stderr and check nothing.

mod common;

use common::{is_listening, status_json, Client, Daemon, Files, LoopDevice, BIN};
use std::fs::File;
use std::path::{Path, PathBuf};

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

/// The pattern of write `n` at `offset`.
fn pattern(n: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| n ^ (i as u8).wrapping_mul(31)).collect()
}

/// The exit code of `child`, killing it (and answering `None`) if it still
/// runs after `limit`: a daemon that should have refused to start serves.
fn exit_within(mut child: Child, limit: Duration) -> Option<i32> {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Reads the whole disk, a MiB at a time, and compares.
fn check_all(q: &mut common::QueueIo, expect: &[u8], when: &str) {
    for off in (0..expect.len()).step_by(MIB) {
        assert!(
            q.read(off as u64, MIB) == expect[off..off + MIB],
            "{when}: wrong data in the MiB at {off}"
        );
    }
}

#[test]
fn loop_devices_as_source_and_cache() {
    source_and_cache_on(512);
}

/// 4 KiB logical sectors (4Kn disks): the guest still sees 512-byte sectors,
/// so its writes smaller than 4 KiB are read-modify-writes on both devices.
#[test]
fn loop_devices_with_4k_sectors_as_source_and_cache() {
    source_and_cache_on(4096);
}

fn source_and_cache_on(sector: u32) {
    let mut files = Files::new(16 * MIB, 16 << 20, 11);
    let (src_img, cache_img) = (files.source.clone(), files.cache.clone());
    let Some(src) = LoopDevice::attach(&src_img, sector) else {
        return;
    };
    let Some(cache) = LoopDevice::attach(&cache_img, sector) else {
        return;
    };
    for dev in [&src.0, &cache.0] {
        let ss = Command::new("blockdev")
            .arg("--getss")
            .arg(dev)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&ss.stdout).trim(),
            sector.to_string(),
            "logical sector size of {}",
            dev.display()
        );
    }
    files.source = src.0.clone();
    files.cache = cache.0.clone();
    let args = ["--block-size", "4K", "--mode", "writeback"];
    let ctl = files.dir.path().join("ctl.sock");
    let ctl_s = ctl.display().to_string();
    let daemon = Daemon::start(&files, &[&args[..], &["--control", &ctl_s]].concat());
    let log = daemon.log_text();
    // A device node is on devtmpfs, which is not where the data lives.
    assert!(!log.contains("memory filesystem"), "{log}");
    // The status names both devices, and the source as the cache knows it.
    // The control socket is bound after the vhost-user one.
    let end = Instant::now() + Duration::from_secs(10);
    while !is_listening(&ctl) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = status_json(&ctl);
    assert_eq!(st["source"], files.source.display().to_string().as_str());
    assert_eq!(
        st["cache_device"],
        files.cache.display().to_string().as_str()
    );
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&src_img).unwrap());
    assert_eq!(
        st["source_identity"],
        format!("the block device loop:ino={ino}+0+0").as_str()
    );
    let mut expect = files.initial.clone();
    {
        let mut client = Client::connect(&files.socket, 1);
        let mut q = client.queue(0);
        for (i, off) in [0usize, 3 * MIB + 512, 9 * MIB, 15 * MIB]
            .into_iter()
            .enumerate()
        {
            let data = pattern(i as u8 + 1, 256 << 10);
            q.write(off as u64, &data);
            expect[off..off + data.len()].copy_from_slice(&data);
        }
        // Single sectors in flight together, several in each 4 KiB: on 4Kn
        // devices each is a read-modify-write of a sector the others share.
        let base = 11 * MIB;
        for parity in [0, 1] {
            let batch: Vec<(u64, Vec<u8>)> = (0..128)
                .filter(|s| s % 2 == parity)
                .map(|s| ((base + s * 512) as u64, pattern(0x40 + s as u8, 512)))
                .collect();
            q.write_batch(&batch);
            for (off, data) in &batch {
                let o = *off as usize;
                expect[o..o + 512].copy_from_slice(data);
            }
        }
        // BLKZEROOUT on the devices (write-zeroes is exact); a discard
        // leaves each sector old or zero, and what it leaves must last.
        let (zo, zl) = (5 * MIB + 4096, 192 << 10);
        q.write_zeroes(zo as u64, zl as u64);
        expect[zo..zo + zl].fill(0);
        let (dofs, dlen) = (7 * MIB, 128 << 10);
        q.discard(dofs as u64, dlen as u64);
        let got = q.read(dofs as u64, dlen);
        for (g, w) in got.chunks(512).zip(expect[dofs..dofs + dlen].chunks(512)) {
            assert!(
                g == w || g.iter().all(|&b| b == 0),
                "discarded sector is garbage"
            );
        }
        expect[dofs..dofs + dlen].copy_from_slice(&got);
        q.flush();
        check_all(&mut q, &expect, "misses");
        check_all(&mut q, &expect, "hits");
    }
    assert!(daemon.stop().success());
    // Warm across a restart on the same devices.
    let daemon = Daemon::start(&files, &args);
    let log = daemon.log_text();
    assert!(log.contains("loaded") && !log.contains("dropped"), "{log}");
    {
        let mut client = Client::connect(&files.socket, 1);
        let mut q = client.queue(0);
        check_all(&mut q, &expect, "after restart");
    }
    assert!(daemon.stop().success());

    // A copy of the source on another loop device: same size and bytes, but
    // not the disk the dirty blocks belong to.
    let copy_img = files.dir.path().join("copy.img");
    std::fs::copy(&src_img, &copy_img).unwrap();
    // Two loop devices were attached above: a third must attach too.
    let copy = LoopDevice::attach(&copy_img, sector).expect("a third loop device");
    let err = refused(
        &serve_on(&files, Some(&copy.0), None, &args),
        files.dir.path(),
        "dirty blocks of another source than",
    );
    assert!(
        err.contains("they belong to the block device loop:") && err.contains("--source-moved"),
        "{err}"
    );
    // Refused before anything was written: the original still serves.
    let daemon = Daemon::start(&files, &["--block-size", "4K", "--writeback-on-exit"]);
    {
        let mut client = Client::connect(&files.socket, 1);
        let mut q = client.queue(0);
        check_all(&mut q, &expect, "after the refused start");
    }
    assert!(daemon.stop().success());
    // Written back to the loop device, so into the file behind it.
    drop(src);
    assert!(
        std::fs::read(&src_img).unwrap() == expect,
        "source after writeback"
    );
}

/// A filesystem mounted from a device, unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    fn new(dev: &Path, at: &Path) -> Option<Mount> {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount").arg(dev).arg(at).output().unwrap();
        if !out.status.success() {
            eprintln!(
                "SKIP: mount: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Mount(at.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// `serve` arguments for `files` plus `extra`, with the source and/or the
/// cache replaced.
fn serve_on(
    files: &Files,
    source: Option<&Path>,
    cache: Option<&Path>,
    extra: &[&str],
) -> Vec<String> {
    let mut args = files.serve_args(extra);
    for (option, path) in [("--source", source), ("--cache", cache)] {
        if let Some(path) = path {
            let at = args.iter().position(|a| a == option).unwrap() + 1;
            args[at] = path.display().to_string();
        }
    }
    args
}

/// Runs `vblkcache ARGS` (at most 20 s: a daemon that should have refused
/// to start serves), requires exit code 2 and `needle` in its stderr, and
/// returns the stderr.
fn refused(args: &[String], dir: &Path, needle: &str) -> String {
    let log = dir.join("run.log");
    let child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let code = exit_within(child, Duration::from_secs(20));
    let err = std::fs::read_to_string(&log).unwrap();
    assert_eq!(code, Some(2), "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: no {needle:?} in {err}");
    err
}

/// A mounted filesystem is never taken as cache (not even with --format) or
/// as source, and a device the daemon uses cannot be mounted meanwhile.
#[test]
fn a_mounted_block_device_is_refused() {
    let mut files = Files::new(4 * MIB, 16 << 20, 3);
    let dir = &files.dir.path().to_path_buf();
    let img = dir.join("fs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let Some(dev) = LoopDevice::attach(&img, 512) else {
        return;
    };
    let mkfs = Command::new("mkfs.ext4")
        .arg("-q")
        .arg(&dev.0)
        .status()
        .unwrap();
    assert!(mkfs.success());
    let mnt = dir.join("mnt");
    let Some(mount) = Mount::new(&dev.0, &mnt) else {
        return;
    };
    std::fs::write(mnt.join("keep.txt"), b"precious").unwrap();
    let devs = dev.0.display().to_string();

    refused(
        &serve_on(&files, None, Some(&dev.0), &["--format"]),
        dir,
        &format!("--cache: {devs} is a block device in use (mounted"),
    );
    refused(
        &serve_on(&files, Some(&dev.0), None, &[]),
        dir,
        &format!("--source: {devs} is a block device in use"),
    );
    let check = ["check", "--repair", "--cache", &devs].map(String::from);
    refused(&check, dir, "in use");
    assert!(!files.socket.exists());

    // The filesystem is whole.
    assert_eq!(std::fs::read(mnt.join("keep.txt")).unwrap(), b"precious");
    drop(mount);
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(&dev.0)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );

    // Served (read-only, so the filesystem stays whole), it cannot be
    // mounted; once the daemon is gone, it can.
    files.source = dev.0.clone();
    let daemon = Daemon::start(&files, &["--readonly"]);
    let out = Command::new("mount")
        .arg(&dev.0)
        .arg(&mnt)
        .output()
        .unwrap();
    let _ = Command::new("umount").arg(&mnt).status();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("busy"),
        "mount of a device the daemon uses: {err}"
    );
    assert!(daemon.stop().success());
    let mount = Mount::new(&dev.0, &mnt).expect("mount after the daemon stopped");
    assert_eq!(std::fs::read(mnt.join("keep.txt")).unwrap(), b"precious");
    drop(mount);

    // Another node of the same device is the same device.
    let node = dir.join("node");
    let rdev = std::os::unix::fs::MetadataExt::rdev(&std::fs::metadata(&dev.0).unwrap());
    let made = Command::new("mknod")
        .arg(&node)
        .arg("b")
        .arg(libc::major(rdev).to_string())
        .arg(libc::minor(rdev).to_string())
        .status()
        .unwrap();
    if made.success() {
        refused(
            &serve_on(&files, None, Some(&node), &[]),
            dir,
            "--source and --cache are the same file",
        );
    } else {
        eprintln!("SKIP: mknod failed: a second node of a device not checked");
    }
}

/// A read-only block device (the kernel opens it for writing and fails the
/// writes later) is refused as a read-write source and as cache, and served
/// with --readonly.
#[test]
fn a_read_only_block_device_is_served_only_read_only() {
    let mut files = Files::new(4 * MIB, 16 << 20, 8);
    let dir = files.dir.path().to_path_buf();
    let Some(ro) = LoopDevice::attach_read_only(&files.source) else {
        return;
    };
    let devs = ro.0.display().to_string();
    refused(
        &serve_on(&files, Some(&ro.0), None, &[]),
        &dir,
        &format!("--source: {devs} is read-only"),
    );
    refused(
        &serve_on(&files, None, Some(&ro.0), &[]),
        &dir,
        &format!("--cache: {devs} is read-only"),
    );

    files.source = ro.0.clone();
    let daemon = Daemon::start(&files, &["--readonly"]);
    {
        let mut client = Client::try_connect(&files.socket, 1, true).unwrap();
        let mut q = client.queue(0);
        check_all(&mut q, &files.initial, "read-only source");
    }
    assert!(daemon.stop().success());
}
