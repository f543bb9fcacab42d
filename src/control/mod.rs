//! The control socket: a line-delimited JSON protocol on a Unix socket.
//!
//! Requests (one JSON object per line): `{"cmd":"status"}`, `{"cmd":"flush"}`,
//! `{"cmd":"set-mode","mode":"writethrough"}`, `{"cmd":"reset-stats"}`.
//! Replies (one JSON object per line): `{"ok":true,"status":{...}}`; for flush
//! `{"progress":{"done":N,"total":M}}` lines then `{"ok":true}`; for set-mode
//! `{"ok":true,"mode":"..."}`; errors `{"ok":false,"error":"message"}`.
//!
//! A bad request gets an error reply and the connection stays usable; only a
//! line over [`protocol::MAX_REQUEST_LINE`] bytes closes it. The data path
//! never goes through this module.
//!
//! Files: [`protocol`] (wire format and bounded line reader), `socket_file`
//! (safe bind and removal), `server` (threads), `client` (the CLI side),
//! `engine_target` (the engine as a [`ControlTarget`]).

mod client;
mod engine_target;
pub mod protocol;
mod server;
mod socket_file;

pub use client::format_status;
pub use server::ServerLimits;
pub use socket_file::MAX_SOCKET_PATH;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

/// What the control socket can act on (implemented for the engine).
///
/// Methods are called from connection threads, possibly several at once.
pub trait ControlTarget: Send + Sync + 'static {
    /// Everything `status` reports, as a JSON object with named fields.
    fn status(&self) -> serde_json::Value;
    /// Writes back every dirty block; `progress(done, total)` is called as it goes.
    fn flush_all(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<(), String>;
    /// Switches the write mode by name.
    fn set_mode(&self, mode: &str) -> Result<(), String>;
    /// Zeroes the statistics counters.
    fn reset_stats(&self);
}

/// Control-socket errors.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("control server replied with an error: {0}")]
    Remote(String),
    #[error("control protocol: {0}")]
    Protocol(String),
    #[error("cannot connect to control socket {path} (is the daemon running?): {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket path {path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: String },
    #[error("control socket {path}: no reply within {secs} s")]
    Timeout { path: String, secs: u64 },
    #[error("cannot write the command output: {0}")]
    Output(#[source] std::io::Error),
    #[error("control server limit {field} must be greater than zero")]
    InvalidLimit { field: &'static str },
    #[error("control socket {path} is in use by a running server")]
    InUse { path: String },
    #[error(
        "control socket path {path} is too long: binding needs {needed} bytes, the limit is {max}"
    )]
    PathTooLong {
        path: String,
        needed: usize,
        max: usize,
    },
}

/// A command sent by the `vblkcache status|flush|set-mode|reset-stats` client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCommand {
    Status { json: bool },
    Flush,
    SetMode(String),
    ResetStats,
}

/// A running control server. Dropping it does not stop it; call `shutdown`.
pub struct ControlServer {
    inner: server::Server,
}

impl ControlServer {
    /// Binds `path` (file mode `socket_mode`, e.g. 0o600) and serves `target`
    /// on a background thread.
    ///
    /// Refuses a path that exists and is not a socket, or a socket some server
    /// still answers on; replaces a stale socket. The socket is never
    /// reachable with a wider mode than `socket_mode`.
    pub fn spawn(
        path: &Path,
        socket_mode: u32,
        target: Arc<dyn ControlTarget>,
    ) -> Result<ControlServer, ControlError> {
        Self::spawn_with_limits(path, socket_mode, target, ServerLimits::default())
    }

    /// [`ControlServer::spawn`] with explicit connection limits and timeouts.
    pub fn spawn_with_limits(
        path: &Path,
        socket_mode: u32,
        target: Arc<dyn ControlTarget>,
        limits: ServerLimits,
    ) -> Result<ControlServer, ControlError> {
        Ok(ControlServer {
            inner: server::Server::spawn(path, socket_mode, target, limits)?,
        })
    }

    /// Stops the server thread and removes the socket file.
    ///
    /// Open connections are closed; a handler still executing a command (a
    /// long flush) is waited for at most [`ServerLimits::shutdown_grace`] and
    /// then left to finish on its own.
    pub fn shutdown(self) {
        self.inner.shutdown()
    }
}

/// Runs one client command against the server at `path`, printing the result
/// (a table, or JSON with `--json`) to `out`.
pub fn run_client(
    path: &Path,
    cmd: ClientCommand,
    out: &mut dyn Write,
) -> Result<(), ControlError> {
    client::run(path, cmd, out)
}
