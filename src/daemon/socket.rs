//! The listening socket: stale-file handling, creation with a given mode, and
//! removal at exit (only if the file is still ours).

use super::Error;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Makes `path` free for a new socket.
///
/// - nothing there: fine;
/// - a file that is not a socket: error, never removed;
/// - a socket something listens on: error;
/// - a socket nobody listens on (connecting fails): stale, removed.
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
    if UnixStream::connect(path).is_ok() {
        return Err(Error::SocketInUse {
            option,
            path: path.to_path_buf(),
        });
    }
    log::info!("removing stale socket {}", path.display());
    std::fs::remove_file(path).map_err(|source| Error::Socket {
        path: path.to_path_buf(),
        source,
    })
}

/// A bound socket file that is removed on drop if it is still the same
/// inode (another process may have replaced it).
pub struct BoundSocket {
    pub listener: UnixListener,
    path: PathBuf,
    ino: u64,
}

impl BoundSocket {
    /// Binds `path` with permission bits `mode`. The umask is narrowed for
    /// the bind so the socket never exists with wider permissions.
    pub fn bind(path: &Path, mode: u32) -> Result<BoundSocket, Error> {
        let err = |source| Error::Socket {
            path: path.to_path_buf(),
            source,
        };
        // SAFETY: umask only swaps the process file-creation mask; it has no
        // memory-safety preconditions.
        let old = unsafe { libc::umask((0o777 & !mode) as libc::mode_t) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above; restores the previous mask.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
        let ino = std::fs::symlink_metadata(path).map_err(err)?.ino();
        Ok(BoundSocket {
            listener,
            path: path.to_path_buf(),
            ino,
        })
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
        let _s = BoundSocket::bind(&p, 0o640).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
    }

    #[test]
    fn drop_removes_only_our_socket() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sock");
        let s = BoundSocket::bind(&p, 0o600).unwrap();
        drop(s);
        assert!(!p.exists());
    }
}
