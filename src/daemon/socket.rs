//! The listening socket: stale-file handling, creation with a given mode and
//! group, and removal at exit (only if the file is still ours).
//!
//! Invariants:
//! - a path that exists and is not a socket (regular file, directory,
//!   symlink, even one pointing at a socket) is never removed or replaced;
//! - an existing socket is removed only when connecting to it is *refused*
//!   (nothing listens: a stale file from a dead daemon). Any other failure
//!   (permission denied, ...) means we cannot tell, so the path is refused;
//! - the socket never exists with a wider mode than asked for: it is created
//!   with that mode (through the umask) and then only handed to the socket
//!   group; `bind` fails on any existing path, so nothing is clobbered. It is
//!   bound at its final path (not linked there from a temporary name) so
//!   that /proc/net/unix and tools like `ss` show the real path.

use super::Error;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// What a failed connect to an existing socket file says about it.
fn stale_verdict(option: &'static str, path: &Path, e: io::Error) -> Result<(), Error> {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Ok(()),
        _ => Err(Error::SocketUnknown {
            option,
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// Makes `path` free for a new socket.
///
/// - nothing there: fine;
/// - a file that is not a socket (symlinks included): error, never removed;
/// - a socket something listens on: error;
/// - a socket whose connect is refused: stale, removed;
/// - a socket we cannot probe (e.g. permission denied): error.
pub fn clear_stale(option: &'static str, path: &Path) -> Result<(), Error> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Error::Socket {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(Error::NotASocket {
            option,
            path: path.to_path_buf(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => {
            return Err(Error::SocketInUse {
                option,
                path: path.to_path_buf(),
            })
        }
        Err(e) => stale_verdict(option, path, e)?,
    }
    log::info!("removing stale socket {}", path.display());
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Socket {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Gives the socket at `path` (bound by someone else, e.g. the control
/// server) to group `gid`. `lchown` never follows a symlink, so a file
/// swapped in at the path cannot redirect it.
pub fn set_group(path: &Path, gid: Option<u32>) -> Result<(), Error> {
    match gid {
        Some(g) => std::os::unix::fs::lchown(path, None, Some(g)).map_err(|source| Error::Socket {
            path: path.to_path_buf(),
            source,
        }),
        None => Ok(()),
    }
}

/// A bound socket file that is removed on drop if it is still the same
/// inode (another process may have replaced it).
pub struct BoundSocket {
    pub listener: UnixListener,
    path: PathBuf,
    ino: u64,
}

/// Held while the process umask is changed for a bind.
static UMASK_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl BoundSocket {
    /// Binds `path` with permission bits `mode` and, if given, group `gid`,
    /// following the invariants in the module doc.
    pub fn bind(path: &Path, mode: u32, gid: Option<u32>) -> Result<BoundSocket, Error> {
        let err = |source| Error::Socket {
            path: path.to_path_buf(),
            source,
        };
        // bind() creates the file with 0777 & !umask, so this umask gives
        // exactly `mode`, with no window where it is wider. umask is
        // process-wide: at this point the only other threads are the signal
        // thread and the engine's workers, none of which create files.
        // Serialise umask users in this process (tests bind sockets from
        // several threads at once; the mask is per process, not per thread).
        let _umask = UMASK_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: umask only swaps the process file-creation mask.
        let old = unsafe { libc::umask((0o777 & !mode) as libc::mode_t) };
        // bind() never follows or replaces an existing path (EADDRINUSE).
        let bound = UnixListener::bind(path);
        // SAFETY: as above; restores the previous mask.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(err)?;
        let meta = std::fs::symlink_metadata(path).map_err(err)?;
        let ino = meta.ino();
        let ours = BoundSocket {
            listener,
            path: path.to_path_buf(),
            ino,
        };
        // Until here the file had our primary group and `mode`, which is
        // never wider than what is asked for. lchown never follows a
        // symlink, so a file swapped in meanwhile cannot redirect it.
        if let Some(g) = gid {
            std::os::unix::fs::lchown(path, None, Some(g)).map_err(err)?;
        }
        let meta = std::fs::symlink_metadata(path).map_err(err)?;
        if meta.ino() != ino || meta.permissions().mode() & 0o777 != mode & 0o777 {
            return Err(err(io::Error::other(
                "the socket file changed while it was being set up",
            )));
        }
        Ok(ours)
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.ino() == self.ino && m.file_type().is_socket() {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_file_is_never_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sock");
        std::fs::write(&p, b"precious").unwrap();
        let e = clear_stale("--socket", &p).unwrap_err();
        assert!(matches!(e, Error::NotASocket { .. }));
        assert!(e.to_string().contains("--socket"));
        assert_eq!(std::fs::read(&p).unwrap(), b"precious");
    }

    #[test]
    fn live_socket_is_kept_and_stale_one_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sock");
        // std's listener does not unlink on drop, which leaves a stale file.
        let live = UnixListener::bind(&p).unwrap();
        assert!(matches!(
            clear_stale("--socket", &p),
            Err(Error::SocketInUse { .. })
        ));
        assert!(p.exists());
        drop(live);
        assert!(p.exists());
        clear_stale("--socket", &p).unwrap();
        assert!(!p.exists());
    }

    #[test]
    fn bind_uses_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sock");
        let _s = BoundSocket::bind(&p, 0o640, None).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
    }

    #[test]
    fn drop_removes_only_our_socket() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sock");
        let s = BoundSocket::bind(&p, 0o600, None).unwrap();
        drop(s);
        assert!(!p.exists());
    }

    #[test]
    fn symlinks_are_never_followed_or_removed() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        let _live = UnixListener::bind(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        // A symlink to a socket is not a socket.
        let e = clear_stale("--socket", &link).unwrap_err();
        assert!(matches!(e, Error::NotASocket { .. }), "{e}");
        // Binding over it fails and leaves both the link and its target.
        assert!(BoundSocket::bind(&link, 0o600, None).is_err());
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(std::fs::symlink_metadata(&real)
            .unwrap()
            .file_type()
            .is_socket());
        // A dangling symlink is refused too.
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nothing"), &dangling).unwrap();
        assert!(matches!(
            clear_stale("--socket", &dangling),
            Err(Error::NotASocket { .. })
        ));
        assert!(!dir.path().join("nothing").exists());
    }

    #[test]
    fn only_a_refused_connect_counts_as_stale() {
        let p = Path::new("/x/sock");
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert!(stale_verdict("--socket", p, refused).is_ok());
        for kind in [
            io::ErrorKind::PermissionDenied,
            io::ErrorKind::TimedOut,
            io::ErrorKind::Other,
        ] {
            let e = stale_verdict("--socket", p, io::Error::from(kind)).unwrap_err();
            assert!(matches!(e, Error::SocketUnknown { .. }), "{kind:?}");
            assert!(e.to_string().contains("--socket"), "{e}");
        }
    }

    #[test]
    fn bind_never_clobbers_and_leaves_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sock");
        std::fs::write(&p, b"precious").unwrap();
        let e = BoundSocket::bind(&p, 0o600, None).err().unwrap();
        assert!(
            matches!(&e, Error::Socket { source, .. } if source.kind() == io::ErrorKind::AddrInUse),
            "{e}"
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"precious");
        let q = dir.path().join("sock2");
        let s = BoundSocket::bind(&q, 0o600, None).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        // The socket works.
        let _c = UnixStream::connect(&q).unwrap();
        assert!(s.listener.accept().is_ok());
    }

    #[test]
    fn mode_is_exact_and_group_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sock");
        // The group we are in (as root any group would do).
        // SAFETY: getegid has no preconditions.
        let gid = unsafe { libc::getegid() };
        let s = BoundSocket::bind(&p, 0o660, Some(gid)).unwrap();
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o660);
        assert_eq!(m.gid(), gid);
        drop(s);
        assert!(!p.exists());
        if gid == 0 {
            // As root, a group we are not in must work too.
            let s = BoundSocket::bind(&p, 0o600, Some(4242)).unwrap();
            let m = std::fs::symlink_metadata(&p).unwrap();
            assert_eq!((m.gid(), m.permissions().mode() & 0o777), (4242, 0o600));
            drop(s);
        }
    }
}
