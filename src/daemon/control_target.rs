//! The engine as a [`ControlTarget`] of the control socket.

use crate::control::ControlTarget;
use crate::engine::{Engine, WriteMode};
use std::sync::Arc;

/// Adapts the engine to the control-socket contract.
pub struct EngineControl(pub Arc<Engine>);

impl ControlTarget for EngineControl {
    fn status(&self) -> serde_json::Value {
        serde_json::to_value(self.0.status())
            .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
    }

    fn flush_all(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<(), String> {
        self.0
            .flush_all(&mut |p| progress(p.done, p.total))
            .map_err(|e| e.to_string())
    }

    fn set_mode(&self, mode: &str) -> Result<(), String> {
        let mode: WriteMode = mode
            .parse()
            .map_err(|e: crate::engine::mode::UnknownMode| e.to_string())?;
        self.0.set_mode(mode).map_err(|e| e.to_string())
    }

    fn reset_stats(&self) {
        self.0.reset_stats()
    }
}
