//! Replacement policies.
//!
//! The engine decides *which frames may* be evicted (only idle, unpinned
//! ones; invalid frames first, then clean, then dirty); a [`Policy`] decides
//! *which of those* goes first. Policies are called with the stripe lock of the
//! set held, so their per-frame state needs no further locking beyond relaxed
//! atomics. One file per policy.

mod lru;

pub use lru::Lru;

/// A replacement policy over sets of frames.
///
/// Frame numbers are global (`set * assoc + way`). `clock` is a per-stripe
/// counter that the policy may use as it likes (LRU uses it as a timestamp).
pub trait Policy: Send + Sync {
    /// The name shown in status output.
    fn name(&self) -> &'static str;
    /// RAM the policy keeps per cache frame, in bytes.
    fn bytes_per_frame(&self) -> usize;
    /// A cached block in `frame` was accessed.
    fn on_hit(&self, frame: u64, clock: &mut u32);
    /// A block was placed in `frame`.
    fn on_insert(&self, frame: u64, clock: &mut u32);
    /// The block in `frame` was removed (evicted or invalidated).
    fn on_remove(&self, frame: u64);
    /// Chooses the frame to evict first among `first..first + n` for which
    /// `eligible` is true, or `None` when none is.
    fn victim(
        &self,
        first: u64,
        n: u32,
        clock: u32,
        eligible: &mut dyn FnMut(u64) -> bool,
    ) -> Option<u64>;
}

/// Policy names accepted by [`by_name`].
pub const POLICIES: &[&str] = &["lru"];

/// Builds the policy called `name` for `frames` cache frames.
pub fn by_name(name: &str, frames: u64) -> Option<Box<dyn Policy>> {
    match name {
        "lru" => Some(Box::new(Lru::new(frames))),
        _ => None,
    }
}
