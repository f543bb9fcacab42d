//! Crash state: the live frame table kept in a shared file (on a tmpfs such
//! as `/dev/shm`), so that a daemon killed without a clean shutdown loses none
//! of the writes it had completed when it is started again on the same boot.
//!
//! Why it is needed: in write-back mode a dirty mapping reaches the cache
//! device only at a commit (a guest FLUSH). A power cut may lose what came
//! after it, and the guest loses its memory with it, as with any disk with a
//! volatile write cache. A daemon crash is not that: QEMU reconnects
//! (`reconnect-ms`) and the guest keeps running. Its completed writes are
//! already in the kernel (written to the cache device, or the source); only
//! the mapping that finds them lived in the process. Losing it would show the
//! running guest older data. The entries of a `MAP_SHARED` file outlive the
//! process but not a reboot, which is exactly the case to cover: after a
//! reboot the device may have lost unflushed data, and the journal alone
//! decides.
//!
//! File `<dir>/vblkcache-<cache uuid>.frames`: a 4 KiB header, then one
//! `u64` per frame, the live [`Entry`] bits. Header (little endian):
//! ```text
//!  0 magic "VBCFRAME"   8 version u32      16 cache uuid [u8;16]
//! 32 run id u64        40 frames u64      48 block size u32   52 assoc u32
//! 56 source size u64   64 boot id [u8;36] (/proc/sys/kernel/random/boot_id)
//! 508 crc32c of bytes 0..508
//! ```
//!
//! Invariants:
//! - the file of a run is put in place only after the superblock naming its
//!   run id is on the cache device and the run's whole mapping is in the
//!   file; the superblock of a clean shutdown makes any file irrelevant (it
//!   is removed then), and so does a failed flush of the cache device (the
//!   file could map a frame to data the device lost; it is removed then);
//! - [`recover`] uses a file only for an unclean cache whose superblock names
//!   the file's run id, with the same uuid and geometry, on the boot that
//!   wrote it. A frame is then dirty exactly when its entry is valid, dirty
//!   and not `FRESH` (a new block still being written in). Clean entries are
//!   dropped, as after any crash: the source has their data.

use super::frames::{Entry, BLOCK_MASK, DIRTY, VALID};
use super::meta::Superblock;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

const MAGIC: &[u8; 8] = b"VBCFRAME";
const VERSION: u32 = 1;
const HEADER: usize = 4096;
const CRC_AT: usize = 508;
const BOOT_ID_LEN: usize = 36;

/// Errors of the crash-state file. A file that cannot be used is not an
/// error for the engine: it recovers from its journal, as after a power cut.
#[derive(Debug, thiserror::Error)]
pub enum CrashStateError {
    #[error("{path}: {what}: {source}")]
    Io {
        path: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Unusable { path: String, what: String },
}

/// What a crash-state file must match to be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub uuid: [u8; 16],
    pub run_id: u64,
    pub frames: u64,
    pub block_size: u32,
    pub assoc: u32,
    pub source_size: u64,
    pub boot_id: [u8; BOOT_ID_LEN],
}

impl Header {
    /// The header for a run of the cache described by `sb`, on this boot.
    pub fn for_run(sb: &Superblock, boot_id: [u8; BOOT_ID_LEN]) -> Header {
        Header {
            uuid: sb.uuid,
            run_id: sb.run_id,
            frames: sb.layout.geometry.cache_blocks,
            block_size: sb.layout.geometry.block_size,
            assoc: sb.layout.geometry.assoc,
            source_size: sb.source_size,
            boot_id,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut p = vec![0u8; HEADER];
        p[0..8].copy_from_slice(MAGIC);
        p[8..12].copy_from_slice(&VERSION.to_le_bytes());
        p[16..32].copy_from_slice(&self.uuid);
        p[32..40].copy_from_slice(&self.run_id.to_le_bytes());
        p[40..48].copy_from_slice(&self.frames.to_le_bytes());
        p[48..52].copy_from_slice(&self.block_size.to_le_bytes());
        p[52..56].copy_from_slice(&self.assoc.to_le_bytes());
        p[56..64].copy_from_slice(&self.source_size.to_le_bytes());
        p[64..64 + BOOT_ID_LEN].copy_from_slice(&self.boot_id);
        let crc = crc32c::crc32c(&p[..CRC_AT]);
        p[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        p
    }

    fn decode(p: &[u8]) -> Result<Header, String> {
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&p[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&p[o..o + 4]);
            u32::from_le_bytes(a)
        };
        if p.len() < HEADER || &p[0..8] != MAGIC {
            return Err("no crash-state magic".into());
        }
        let (stored, actual) = (u32_at(CRC_AT), crc32c::crc32c(&p[..CRC_AT]));
        if stored != actual {
            return Err(format!(
                "header checksum mismatch (stored {stored:#010x}, computed {actual:#010x})"
            ));
        }
        if u32_at(8) != VERSION {
            return Err(format!("unknown version {}", u32_at(8)));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&p[16..32]);
        let mut boot_id = [0u8; BOOT_ID_LEN];
        boot_id.copy_from_slice(&p[64..64 + BOOT_ID_LEN]);
        Ok(Header {
            uuid,
            run_id: u64_at(32),
            frames: u64_at(40),
            block_size: u32_at(48),
            assoc: u32_at(52),
            source_size: u64_at(56),
            boot_id,
        })
    }
}

/// This boot's identity, from `/proc/sys/kernel/random/boot_id`.
pub fn boot_id() -> Result<[u8; BOOT_ID_LEN], CrashStateError> {
    const PATH: &str = "/proc/sys/kernel/random/boot_id";
    let s = std::fs::read_to_string(PATH).map_err(|source| CrashStateError::Io {
        path: PATH.into(),
        what: "cannot read the boot id",
        source,
    })?;
    let t = s.trim().as_bytes();
    let mut id = [0u8; BOOT_ID_LEN];
    if t.len() != BOOT_ID_LEN {
        return Err(CrashStateError::Unusable {
            path: PATH.into(),
            what: format!("boot id {:?} is not {BOOT_ID_LEN} characters", s.trim()),
        });
    }
    id.copy_from_slice(t);
    Ok(id)
}

/// The crash-state file of the cache with this uuid in `dir`.
pub fn path_for(dir: &Path, uuid: &[u8; 16]) -> PathBuf {
    let hex: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    dir.join(format!("vblkcache-{hex}.frames"))
}

/// A mapped crash-state file: the live frame entries. Invariant: `ptr` maps
/// `HEADER + 8 * frames` bytes of the file at `path`, page aligned, until
/// drop; nothing but this process's frame table writes the entries.
pub struct CrashFile {
    ptr: *mut u8,
    len: usize,
    frames: usize,
    /// Where it is recovered from, once published.
    path: PathBuf,
    /// Where it is made.
    tmp: PathBuf,
}

// SAFETY: the mapping is plain shared memory valid until drop, whichever
// thread uses it; the entries are only accessed as `AtomicU64`s.
unsafe impl Send for CrashFile {}
// SAFETY: as for Send: shared access goes through atomics only.
unsafe impl Sync for CrashFile {}

impl CrashFile {
    /// Creates the file for `h` in `dir` under a temporary name, all entries
    /// free, and maps it. It is not in place (and so cannot be recovered)
    /// until [`CrashFile::publish`]: the caller first writes the run's
    /// mapping into it, so that no file in place ever names this run with
    /// less than the run's mapping (a kill before the publish leaves the
    /// previous run's file, which the new run id in the superblock rejects).
    pub fn create(dir: &Path, h: &Header) -> Result<CrashFile, CrashStateError> {
        let path = path_for(dir, &h.uuid);
        let tmp = path.with_extension("frames.new");
        let shown = tmp.display().to_string();
        let io = |what, source| CrashStateError::Io {
            path: shown.clone(),
            what,
            source,
        };
        let (frames, len) = usize::try_from(h.frames)
            .ok()
            .and_then(|n| Some((n, n.checked_mul(8)?.checked_add(HEADER)?)))
            .ok_or_else(|| CrashStateError::Unusable {
                path: shown.clone(),
                what: format!("{} frames do not fit in memory", h.frames),
            })?;
        let _ = std::fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io("cannot create the crash-state file", e))?;
        let made = (|| {
            f.set_len(len as u64)
                .map_err(|e| io("cannot size the crash-state file", e))?;
            f.write_all(&h.encode())
                .map_err(|e| io("cannot write the crash-state header", e))?;
            Self::map(&f, len, frames, path.clone(), tmp.clone())
                .map_err(|e| io("cannot map the crash-state file", e))
        })();
        if made.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        made
    }

    /// Puts the file in place (over any older file of the same cache), once
    /// it holds the run's mapping.
    pub fn publish(&self) -> Result<(), CrashStateError> {
        std::fs::rename(&self.tmp, &self.path).map_err(|source| CrashStateError::Io {
            path: self.path.display().to_string(),
            what: "cannot put the crash-state file in place",
            source,
        })
    }

    fn map(
        f: &File,
        len: usize,
        frames: usize,
        path: PathBuf,
        tmp: PathBuf,
    ) -> std::io::Result<CrashFile> {
        // SAFETY: a new shared mapping of `len` bytes of `f` (which has
        // them) at an address the kernel picks; nothing else is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(CrashFile {
            ptr: ptr.cast(),
            len,
            frames,
            path,
            tmp,
        })
    }

    /// The frame entries, one per frame.
    #[inline]
    pub fn entries(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is `HEADER + 8 * frames` bytes long and page
        // aligned, so `frames` u64-aligned atomics start at `HEADER`; it
        // lives as long as `self`, and is only used through atomics.
        unsafe { std::slice::from_raw_parts(self.ptr.add(HEADER).cast::<AtomicU64>(), self.frames) }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the file (after a clean shutdown made it irrelevant, or a
    /// failed flush made it unsafe). The mapping stays valid until drop.
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.tmp);
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!(
                    "cannot remove the crash-state file {}: {e} (harmless: the cache was saved cleanly)",
                    self.path.display()
                );
            }
        }
    }
}

impl Drop for CrashFile {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no reference
        // into it outlives `self`.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// The dirty mapping that a run of the cache described by `sb` left in its
/// crash-state file in `dir`, merged with `journal` (the entries replayed
/// from the cache device, `VALID|DIRTY|block` or 0 per frame).
///
/// `Ok(None)`: there is no file. `Err`: a file exists but does not belong to
/// this run, boot or cache, or contradicts the journal; the caller falls back
/// to the journal and says why.
pub fn recover(
    dir: &Path,
    sb: &Superblock,
    boot: &[u8; BOOT_ID_LEN],
    journal: &[u64],
) -> Result<Option<Vec<u64>>, CrashStateError> {
    let path = path_for(dir, &sb.uuid);
    let shown = path.display().to_string();
    let bad = |what: String| CrashStateError::Unusable {
        path: shown.clone(),
        what,
    };
    let f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CrashStateError::Io {
                path: shown,
                what: "cannot open the crash-state file",
                source,
            })
        }
    };
    let io = |what, source| CrashStateError::Io {
        path: shown.clone(),
        what,
        source,
    };
    let mut head = vec![0u8; HEADER];
    f.read_exact_at(&mut head, 0)
        .map_err(|e| io("cannot read the crash-state header", e))?;
    let h = Header::decode(&head).map_err(bad)?;
    if sb.run_id == 0 || h.run_id != sb.run_id {
        return Err(bad(format!(
            "written by run {:#x}, but the cache was last opened by run {:#x}",
            h.run_id, sb.run_id
        )));
    }
    if &h.boot_id != boot {
        return Err(bad("written before the host was restarted".into()));
    }
    if h != Header::for_run(sb, *boot) {
        return Err(bad(
            "its geometry or source size differs from the cache's".into()
        ));
    }
    let frames = journal.len();
    if h.frames != frames as u64 {
        return Err(bad(format!("{} frames, the cache has {frames}", h.frames)));
    }
    let mut raw = vec![0u8; frames * 8];
    f.read_exact_at(&mut raw, HEADER as u64)
        .map_err(|e| io("cannot read the crash-state entries", e))?;
    let mut out = Vec::with_capacity(frames);
    for (i, (c, &j)) in raw.chunks_exact(8).zip(journal).enumerate() {
        let mut a = [0u8; 8];
        a.copy_from_slice(c);
        let e = Entry(u64::from_le_bytes(a));
        let v = if e.valid() && e.dirty() && !e.fresh() {
            VALID | DIRTY | e.block()
        } else {
            0
        };
        // A frame the journal maps dirty is never given to another block
        // before a commit records it free (`frames`): the file may say it
        // is clean or free now, but not that it holds another block.
        if j & DIRTY != 0 && e.valid() && e.block() != j & BLOCK_MASK {
            return Err(bad(format!(
                "frame {i} holds block {} here but block {} in the journal",
                e.block(),
                j & BLOCK_MASK
            )));
        }
        out.push(v);
    }
    Ok(Some(out))
}

/// A random run id (never 0).
pub fn new_run_id() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let mut v = u64::from_le_bytes(b);
    if n != 8 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        v ^= t ^ (u64::from(std::process::id()) << 32);
    }
    v.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            uuid: [3; 16],
            run_id: 77,
            frames: 16,
            block_size: 4096,
            assoc: 4,
            source_size: 1 << 20,
            boot_id: *b"01234567-89ab-cdef-0123-456789abcdef",
        }
    }

    #[test]
    fn header_roundtrip_and_damage() {
        let h = header();
        let mut p = h.encode();
        assert_eq!(Header::decode(&p).unwrap(), h);
        p[40] ^= 1;
        assert!(Header::decode(&p).unwrap_err().contains("checksum"));
        p[0] = b'X';
        assert!(Header::decode(&p).unwrap_err().contains("magic"));
    }

    #[test]
    fn file_maps_entries_after_the_header_and_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let h = header();
        let a = CrashFile::create(dir.path(), &h).unwrap();
        // Not in place before the publish.
        assert!(!a.path().exists());
        a.publish().unwrap();
        assert_eq!(a.entries().len(), 16);
        a.entries()[3].store(0xdead_beef, std::sync::atomic::Ordering::Relaxed);
        let raw = std::fs::read(a.path()).unwrap();
        assert_eq!(raw.len(), HEADER + 16 * 8);
        assert_eq!(
            &raw[HEADER + 24..HEADER + 32],
            &0xdead_beef_u64.to_le_bytes()
        );
        // A new run's file replaces it (all free); the old mapping stays valid.
        let b = CrashFile::create(dir.path(), &Header { run_id: 78, ..h }).unwrap();
        assert_eq!(
            Header::decode(&std::fs::read(a.path()).unwrap())
                .unwrap()
                .run_id,
            77
        );
        b.publish().unwrap();
        assert_eq!(a.path(), b.path());
        let raw = std::fs::read(b.path()).unwrap();
        assert!(raw[HEADER..].iter().all(|&x| x == 0));
        assert_eq!(Header::decode(&raw).unwrap().run_id, 78);
        b.remove();
        assert!(!b.path().exists());
    }
}
