//! Helpers for driving the real `vblkcache` binary with libblkio.
#![allow(dead_code)]

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use rand::{Rng, SeedableRng};
use std::fs::File;
use std::mem::MaybeUninit;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_vblkcache");

/// A temp directory with a source image of random bytes and an empty cache.
pub struct Files {
    pub dir: tempfile::TempDir,
    pub source: PathBuf,
    pub cache: PathBuf,
    pub socket: PathBuf,
    /// What the source held when created.
    pub initial: Vec<u8>,
}

impl Files {
    pub fn new(source_size: usize, cache_size: u64, seed: u64) -> Files {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source.img");
        let cache = dir.path().join("cache.img");
        let socket = dir.path().join("vblk.sock");
        let mut initial = vec![0u8; source_size];
        rand::rngs::StdRng::seed_from_u64(seed).fill(&mut initial[..]);
        std::fs::write(&source, &initial).unwrap();
        let f = File::create(&cache).unwrap();
        f.set_len(cache_size).unwrap();
        Files {
            dir,
            source,
            cache,
            socket,
            initial,
        }
    }

    /// `serve` arguments for these files, plus `extra`. The crash state
    /// goes to the test's directory (not /dev/shm, where the files of killed
    /// daemons would stay) unless `extra` says where.
    pub fn serve_args(&self, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "serve".into(),
            "--source".into(),
            self.source.display().to_string(),
            "--cache".into(),
            self.cache.display().to_string(),
            "--socket".into(),
            self.socket.display().to_string(),
        ];
        if !extra.contains(&"--crash-state-dir") {
            v.push("--crash-state-dir".into());
            v.push(self.dir.path().display().to_string());
        }
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }
}

/// A running daemon; killed (SIGKILL) if dropped while still running.
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
}

fn wait_until<F: FnMut() -> bool>(timeout: Duration, mut f: F) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

pub fn is_socket(p: &Path) -> bool {
    std::fs::symlink_metadata(p)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

/// Identity of a file: inode numbers are reused, change times are not.
fn inode(p: &Path) -> Option<(u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.ino(), m.ctime(), m.ctime_nsec()))
}

impl Daemon {
    /// Starts `vblkcache serve` and waits (polling) for its socket. A stale
    /// socket file already at the path does not count: the daemon's own
    /// socket is a new inode.
    pub fn start(files: &Files, extra: &[&str]) -> Daemon {
        let old_ino = inode(&files.socket);
        let log = files.dir.path().join(format!(
            "daemon-{}.log",
            Instant::now().elapsed().as_nanos()
        ));
        let child = Command::new(BIN)
            .args(files.serve_args(extra))
            .env(
                "RUST_LOG",
                std::env::var("VBLK_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut d = Daemon {
            child: Some(child),
            log,
        };
        let up = wait_until(Duration::from_secs(20), || {
            if let Some(st) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited early ({st}): {}", d.log_text());
            }
            is_socket(&files.socket)
                && inode(&files.socket) != old_ino
                && is_listening(&files.socket)
        });
        assert!(up, "socket never appeared: {}", d.log_text());
        d
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Sends `sig` and waits for the exit status.
    pub fn signal_and_wait(mut self, sig: i32) -> ExitStatus {
        // SAFETY: kill() has no memory effects; the pid is our live child.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0);
        let mut child = self.child.take().unwrap();
        let mut status = None;
        let done = wait_until(Duration::from_secs(30), || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        assert!(
            done,
            "daemon did not exit after signal {sig}: {}",
            self.log_text()
        );
        status.unwrap()
    }

    pub fn stop(self) -> ExitStatus {
        self.signal_and_wait(libc::SIGTERM)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A libblkio virtio-blk-vhost-user client with one buffer region per queue.
pub struct Client {
    pub queues: Vec<Blkioq>,
    pub regions: Vec<MemoryRegion>,
    pub blkio: Blkio,
}

/// Bytes of buffer memory per queue.
pub const REGION: usize = 4 << 20;

impl Client {
    pub fn try_connect(socket: &Path, num_queues: i32, read_only: bool) -> blkio::Result<Client> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", socket.to_str().unwrap())?;
        b.set_bool("read-only", read_only)?;
        b.connect()?;
        b.set_i32("num-queues", num_queues)?;
        let out = b.start()?;
        let mut regions = Vec::new();
        for _ in 0..num_queues {
            let r = b.alloc_mem_region(REGION)?;
            b.map_mem_region(&r)?;
            regions.push(r);
        }
        Ok(Client {
            queues: out.queues,
            regions,
            blkio: b,
        })
    }

    pub fn connect(socket: &Path, num_queues: i32) -> Client {
        Self::try_connect(socket, num_queues, false).unwrap()
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").unwrap()
    }

    /// Splits the client into per-queue parts that can move to threads.
    pub fn split(&mut self) -> Vec<QueueIo> {
        self.queues
            .drain(..)
            .zip(self.regions.iter())
            .map(|(q, r)| QueueIo {
                q,
                buf: r.addr as *mut u8,
            })
            .collect()
    }

    pub fn queue(&mut self, i: usize) -> QueueIo {
        let q = self.queues.remove(i);
        QueueIo {
            q,
            buf: self.regions[i].addr as *mut u8,
        }
    }
}

/// One queue and its buffer region.
pub struct QueueIo {
    pub q: Blkioq,
    buf: *mut u8,
}

// SAFETY: the buffer region stays mapped as long as the Blkio (owned by the
// test) lives, and each QueueIo is the only user of its region.
unsafe impl Send for QueueIo {}

impl QueueIo {
    fn region(&mut self) -> &mut [u8] {
        // SAFETY: `buf` points at a REGION-byte shared mapping made by
        // alloc_mem_region, used only through this QueueIo.
        unsafe { std::slice::from_raw_parts_mut(self.buf, REGION) }
    }

    /// Waits for `n` completions; returns their (user_data, ret).
    pub fn wait(&mut self, n: usize) -> Vec<(usize, i32)> {
        let mut out = Vec::new();
        while out.len() < n {
            let mut c: Vec<MaybeUninit<Completion>> =
                (0..n).map(|_| MaybeUninit::uninit()).collect();
            let got = self.q.do_io(&mut c, 1, None, None).unwrap();
            for slot in c.iter().take(got) {
                // SAFETY: do_io initialised the first `got` entries.
                let comp = unsafe { slot.assume_init_read() };
                out.push((comp.user_data, comp.ret));
            }
        }
        out
    }

    fn one(&mut self) -> i32 {
        self.wait(1)[0].1
    }

    pub fn try_read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        assert!(len <= REGION);
        let buf = self.buf;
        self.q.read(offset, buf, len, 0, ReqFlags::empty());
        match self.one() {
            0 => Ok(self.region()[..len].to_vec()),
            e => Err(e),
        }
    }

    pub fn read(&mut self, offset: u64, len: usize) -> Vec<u8> {
        self.try_read(offset, len)
            .unwrap_or_else(|e| panic!("read {len} at {offset}: {e}"))
    }

    pub fn try_write(&mut self, offset: u64, data: &[u8]) -> i32 {
        assert!(data.len() <= REGION);
        self.region()[..data.len()].copy_from_slice(data);
        let buf = self.buf;
        self.q.write(offset, buf, data.len(), 0, ReqFlags::empty());
        self.one()
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        assert_eq!(
            self.try_write(offset, data),
            0,
            "write {} at {offset}",
            data.len()
        );
    }

    /// Submits several writes at once (non-overlapping buffers) and waits for
    /// all, so they complete in whatever order the daemon finishes them.
    pub fn write_batch(&mut self, writes: &[(u64, Vec<u8>)]) {
        let mut pos = 0usize;
        let mut placed = Vec::new();
        for (off, data) in writes {
            assert!(pos + data.len() <= REGION);
            self.region()[pos..pos + data.len()].copy_from_slice(data);
            placed.push((*off, pos, data.len()));
            pos += data.len();
        }
        for (i, (off, at, len)) in placed.iter().enumerate() {
            // SAFETY: `at + len <= REGION`, inside the mapped region.
            let ptr = unsafe { self.buf.add(*at) };
            self.q.write(*off, ptr, *len, i, ReqFlags::empty());
        }
        let done = self.wait(writes.len());
        assert!(
            done.iter().all(|(_, r)| *r == 0),
            "batch write failed: {done:?}"
        );
    }

    pub fn flush(&mut self) {
        self.q.flush(0, ReqFlags::empty());
        assert_eq!(self.one(), 0, "flush");
    }

    pub fn discard(&mut self, offset: u64, len: u64) {
        self.q.discard(offset, len, 0, ReqFlags::empty());
        assert_eq!(self.one(), 0, "discard");
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64) {
        self.q.write_zeroes(offset, len, 0, ReqFlags::empty());
        assert_eq!(self.one(), 0, "write_zeroes");
    }
}

/// True once a socket bound at `path` is in the listening state. The socket
/// file appears at bind(), a moment before listen(); a client that connects
/// in between is refused, so waiting for the file alone is racy.
pub fn is_listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let want = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Num RefCount Protocol Flags Type St Inode Path; flag 0x10000 = listening.
        f.len() >= 8 && f[3] == "00010000" && f[7..].join(" ") == want
    })
}

/// The JSON of `vblkcache status --json` from a running daemon's control
/// socket.
pub fn status_json(control: &Path) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(["status", "--json", "--control"])
        .arg(control)
        .output()
        .unwrap();
    assert!(out.status.success(), "status: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Fills one 512-byte sector with the pattern of (`id`, `sector`): a write
/// `id` of the crash and integrity tests names itself and its sector in
/// every sector it writes.
pub fn fill_sector(out: &mut [u8], id: u64, sector: u64) {
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        let v = match i {
            0 => id,
            1 => sector,
            _ => (id << 32 ^ sector).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64,
        };
        w.copy_from_slice(&v.to_le_bytes());
    }
}

/// Decodes a sector: Ok((id, sector)) when it is a well-formed pattern.
pub fn decode_sector(s: &[u8]) -> Result<(u64, u64), String> {
    let word = |i: usize| u64::from_le_bytes(s[i * 8..i * 8 + 8].try_into().unwrap());
    let (id, sector) = (word(0), word(1));
    let mut want = [0u8; 512];
    fill_sector(&mut want, id, sector);
    if want[..] != *s {
        let zeros = s.iter().all(|&b| b == 0);
        return Err(if zeros {
            String::from("all zeros")
        } else {
            format!("garbage (first words {id:#x} {sector:#x})")
        });
    }
    Ok((id, sector))
}

/// `vblkcache check --json` on `cache`: its exit code and its report.
pub fn check_json(cache: &Path) -> (i32, serde_json::Value) {
    let out = Command::new(BIN)
        .args(["check", "--json", "--cache"])
        .arg(cache)
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("check output is not JSON ({e}): {out:?}"));
    (out.status.code().unwrap_or(-1), v)
}

/// A loop device over a file (`losetup`), detached when dropped.
pub struct LoopDevice(pub PathBuf);

impl LoopDevice {
    /// Attaches `img` with logical sectors of `sector` bytes. `None`, with
    /// a line starting "SKIP" on stderr, where loop devices cannot be
    /// attached (not root, no loop driver): the caller then checks nothing.
    pub fn attach(img: &Path, sector: u32) -> Option<LoopDevice> {
        Self::attach_with(img, &["--sector-size", &sector.to_string()])
    }

    /// The same, read-only (`losetup --read-only`).
    pub fn attach_read_only(img: &Path) -> Option<LoopDevice> {
        Self::attach_with(img, &["--read-only"])
    }

    fn attach_with(img: &Path, args: &[&str]) -> Option<LoopDevice> {
        match Command::new("losetup")
            .args(["--find", "--show"])
            .args(args)
            .arg(img)
            .output()
        {
            Ok(o) if o.status.success() => Some(LoopDevice(PathBuf::from(
                String::from_utf8_lossy(&o.stdout).trim(),
            ))),
            Ok(o) => {
                eprintln!(
                    "SKIP: losetup: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIP: cannot run losetup: {e}");
                None
            }
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}
