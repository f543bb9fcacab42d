//! Binding the control socket's file safely.
//!
//! Invariants this file keeps:
//! - A path that exists and is not a socket (a regular file, a directory, a
//!   symlink) is never removed or replaced; binding fails and names it.
//! - An existing socket is removed only when connecting to it is refused, i.e.
//!   no server listens on it any more (a stale file from a crash).
//! - The socket never exists at its final path with a mode wider than the one
//!   asked for: it is bound inside a fresh private (0700) directory next to
//!   the final path, chmod-ed there, and then hard-linked into place. `link`
//!   fails if the final path has appeared meanwhile, so a file that raced in is
//!   not clobbered either. No process-wide umask is touched.

use super::ControlError;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Longest path that fits `sockaddr_un.sun_path` with its terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// Identity of the socket file we created, so that removing it on shutdown
/// never deletes a file someone else put at the same path later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

fn io_err(path: &Path, source: io::Error) -> ControlError {
    ControlError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Removes a stale socket at `path`, or explains why the path cannot be used.
fn clear_path(path: &Path) -> Result<(), ControlError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path, e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ControlError::NotASocket {
            path: path.display().to_string(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ControlError::InUse {
            path: path.display().to_string(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::info!("removing stale control socket {}", path.display());
            match fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_err(path, e)),
            }
        }
        Err(e) => Err(io_err(path, e)),
    }
}

/// A private directory next to the final path, removed (with the temporary
/// socket name inside) when dropped.
struct PrivateDir {
    dir: PathBuf,
    sock: PathBuf,
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.sock);
        let _ = fs::remove_dir(&self.dir);
    }
}

fn private_dir(path: &Path) -> Result<PrivateDir, ControlError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // A leftover directory of a crashed process with the same pid is skipped.
    let mut attempts = 0;
    loop {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = parent.join(format!(".vbc{}.{}", std::process::id(), seq));
        let sock = dir.join("s");
        let needed = sock.as_os_str().len();
        if needed > MAX_SOCKET_PATH {
            return Err(ControlError::PathTooLong {
                path: path.display().to_string(),
                needed,
                max: MAX_SOCKET_PATH,
            });
        }
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(PrivateDir { dir, sock }),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 16 => attempts += 1,
            Err(e) => return Err(io_err(&dir, e)),
        }
    }
}

/// Binds a listening socket at `path` with file mode `mode` (permission bits
/// only), following the invariants in the module doc.
pub fn bind(path: &Path, mode: u32) -> Result<(UnixListener, FileId), ControlError> {
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(ControlError::PathTooLong {
            path: path.display().to_string(),
            needed: path.as_os_str().len(),
            max: MAX_SOCKET_PATH,
        });
    }
    clear_path(path)?;
    let tmp = private_dir(path)?;
    let listener = UnixListener::bind(&tmp.sock).map_err(|e| io_err(path, e))?;
    fs::set_permissions(&tmp.sock, fs::Permissions::from_mode(mode & 0o777))
        .map_err(|e| io_err(path, e))?;
    fs::hard_link(&tmp.sock, path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            // Someone created the path between our check and the link.
            ControlError::InUse {
                path: path.display().to_string(),
            }
        } else {
            io_err(path, e)
        }
    })?;
    let meta = fs::symlink_metadata(path).map_err(|e| io_err(path, e))?;
    drop(tmp);
    Ok((
        listener,
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}

/// Removes `path` if it is still the socket file identified by `id`.
pub fn remove_if_ours(path: &Path, id: FileId) {
    match fs::symlink_metadata(path) {
        Ok(m) if m.dev() == id.dev && m.ino() == id.ino => {
            if let Err(e) = fs::remove_file(path) {
                log::warn!("cannot remove control socket {}: {e}", path.display());
            }
        }
        Ok(_) => log::warn!(
            "control socket {} was replaced by another file; leaving it",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("cannot inspect control socket {}: {e}", path.display()),
    }
}
