//! The engine as a control target, through its public API only.

use super::ControlTarget;
use crate::engine::{Engine, FlushProgress, WriteMode};
use serde_json::Value;

impl ControlTarget for Engine {
    fn status(&self) -> Value {
        // `Status` has only string keys, so serialisation cannot fail today;
        // should it ever, the client still gets an object naming the problem.
        serde_json::to_value(Engine::status(self)).unwrap_or_else(|e| {
            let mut m = serde_json::Map::new();
            m.insert(
                "status_error".into(),
                Value::String(format!("cannot serialise the engine status: {e}")),
            );
            Value::Object(m)
        })
    }

    fn flush_all(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<(), String> {
        Engine::flush_all(self, &mut |p: FlushProgress| progress(p.done, p.total))
            .map_err(|e| e.to_string())
    }

    fn set_mode(&self, mode: &str) -> Result<(), String> {
        let mode = mode.parse::<WriteMode>().map_err(|e| e.to_string())?;
        Engine::set_mode(self, mode).map_err(|e| e.to_string())
    }

    fn reset_stats(&self) {
        Engine::reset_stats(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{BlockDevice, MemDevice};
    use crate::engine::EngineConfig;
    use std::sync::Arc;

    fn engine() -> Engine {
        let source: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(8 << 20));
        let cache: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(8 << 20));
        Engine::open(source, cache, EngineConfig::default()).unwrap()
    }

    #[test]
    fn status_is_an_object_with_named_fields() {
        let e = engine();
        let s = ControlTarget::status(&e);
        let obj = s.as_object().unwrap();
        for key in ["mode", "geometry", "source_size", "hit_ratio", "stats"] {
            assert!(obj.contains_key(key), "missing {key} in {s}");
        }
        assert_eq!(obj["source_size"], serde_json::json!(8u64 << 20));
    }

    #[test]
    fn set_mode_parses_names_and_rejects_unknown() {
        let e = engine();
        ControlTarget::set_mode(&e, "writethrough").unwrap();
        assert_eq!(e.mode(), WriteMode::Writethrough);
        let err = ControlTarget::set_mode(&e, "fastest").unwrap_err();
        assert!(err.contains("fastest"), "{err}");
        assert_eq!(e.mode(), WriteMode::Writethrough);
    }

    #[test]
    fn flush_cleans_and_reports_progress_through_the_callback() {
        let e = engine();
        ControlTarget::set_mode(&e, "writeback").unwrap();
        e.write(0, &vec![0xa5; 64 * 1024]).unwrap();
        let mut last = None;
        ControlTarget::flush_all(&e, &mut |d, t| last = Some((d, t))).unwrap();
        if let Some((done, total)) = last {
            assert_eq!(done, total, "the last progress report must be complete");
        }
        assert_eq!(
            ControlTarget::status(&e)["dirty_blocks"],
            serde_json::json!(0)
        );
        let mut back = vec![0; 64 * 1024];
        e.read(0, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0xa5));
    }
}
