//! The control socket: a line-delimited JSON protocol on a Unix socket.
//!
//! INTERFACE STUB: the signatures below are the contract between the daemon
//! and the control server; the implementation is being written.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

/// What the control socket can act on (implemented for the engine).
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
    _private: (),
}

impl ControlServer {
    /// Binds `path` (file mode `socket_mode`, e.g. 0o600) and serves `target`
    /// on a background thread.
    pub fn spawn(
        _path: &Path,
        _socket_mode: u32,
        _target: Arc<dyn ControlTarget>,
    ) -> Result<ControlServer, ControlError> {
        Err(ControlError::Protocol("not implemented yet".into()))
    }

    /// Stops the server thread and removes the socket file.
    pub fn shutdown(self) {}
}

/// Runs one client command against the server at `path`, printing the result
/// (a table, or JSON with `--json`) to `out`.
pub fn run_client(
    _path: &Path,
    _cmd: ClientCommand,
    _out: &mut dyn Write,
) -> Result<(), ControlError> {
    Err(ControlError::Protocol("not implemented yet".into()))
}
