//! The top-level error of `vblkcache::run`.

use crate::config::ConfigError;
use crate::control::ControlError;
use crate::device::DeviceError;
use crate::engine::EngineError;
use std::path::PathBuf;

/// Everything that can stop the daemon or a client command. Messages are one
/// line and name the option or path involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{option}: {path} exists and is not a socket; refusing to remove it")]
    NotASocket { option: &'static str, path: PathBuf },
    #[error("{option}: {path} is in use (something is listening on it)")]
    SocketInUse { option: &'static str, path: PathBuf },
    #[error("{option}: {path} is a socket and probing it failed ({source}); cannot tell whether something listens, refusing to remove it")]
    SocketUnknown {
        option: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--source: {path} is a {format} image, not a raw disk: vblkcache serves raw images (convert it with `qemu-img convert -O raw`), or pass --force-raw if the guest's own data starts this way")]
    SourceFormat { path: PathBuf, format: &'static str },
    #[error("--source: {0} is in use by another vblkcache (two daemons writing one image would corrupt it)")]
    SourceInUse(PathBuf),
    #[error("--source: {path}: cannot lock it: {source}")]
    SourceLock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {path} is a block device in use (mounted, part of a RAID or device-mapper target, or claimed by another program such as another vblkcache); refusing to open it")]
    DeviceBusy { what: &'static str, path: PathBuf },
    #[error("{what}: {path} is read-only (a read-only block device or filesystem); a source can only be served read-only from it (--readonly), and a cache device must be writable")]
    ReadOnlyDevice { what: &'static str, path: PathBuf },
    #[error("--direct: {path}: the filesystem refuses O_DIRECT (tmpfs does); run without --direct or put the file elsewhere")]
    DirectUnsupported { path: PathBuf },
    #[error("{what}: {source}")]
    Open {
        what: &'static str,
        #[source]
        source: DeviceError,
    },
    #[error("{0}")]
    Engine(#[from] EngineError),
    #[error("socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("vhost-user: {0}")]
    Vhost(String),
    #[error("{what}: {source}")]
    Setup {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Check(#[from] crate::check::CheckError),
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    #[error("shutdown: {0}")]
    Shutdown(#[source] EngineError),
}

impl Error {
    /// True for errors in what the user asked for (exit code 2), as opposed
    /// to runtime I/O failures (exit code 1). Engine geometry errors (for
    /// example a cache device too small for `--cache-blocks`) are config
    /// errors even though they are only found when the devices are opened.
    pub fn is_config_error(&self) -> bool {
        match self {
            Error::Config(_)
            | Error::NotASocket { .. }
            | Error::SocketInUse { .. }
            | Error::SocketUnknown { .. }
            | Error::DirectUnsupported { .. }
            | Error::SourceInUse(_)
            | Error::DeviceBusy { .. }
            | Error::ReadOnlyDevice { .. }
            | Error::SourceFormat { .. }
            | Error::Check(crate::check::CheckError::InUse(_)) => true,
            Error::Engine(e) => e.is_config_error(),
            _ => false,
        }
    }

    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        if self.is_config_error() {
            2
        } else {
            1
        }
    }
}
