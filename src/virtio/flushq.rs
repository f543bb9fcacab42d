//! Guest FLUSHes of one queue, served together.
//!
//! A guest that flushes after every write (a database with `O_DSYNC`) keeps
//! many FLUSHes in flight. Sent to the I/O pool one by one, each would wake
//! a pool thread that then mostly waits for the engine's group commit, at
//! the cost of two context switches per FLUSH. Instead, a queue keeps its
//! FLUSHes in one list; one pool job (the runner) takes the whole list, runs
//! one engine flush for all of it, completes every FLUSH in it, and takes
//! the list again until it finds it empty.
//!
//! Invariants:
//! - a FLUSH is completed only by an engine flush that the runner started
//!   *after* taking it from the list, so after the FLUSH was received: the
//!   engine's commit then covers every write completed before the FLUSH
//!   (the virtio-blk promise). Taking first, flushing second is what makes
//!   this hold; a FLUSH that arrives while a flush runs waits for the next;
//! - at most one runner per queue: `running` is set by the push that finds
//!   it clear (that caller starts the runner) and cleared only by the
//!   runner, under the same lock, when it finds the list empty, so no FLUSH
//!   is left in the list without a runner.

use super::backend::{GuestMem, Vring};
use super::order::Token;
use std::sync::{Arc, Mutex};
use vm_memory::GuestAddress;

/// A FLUSH waiting for the next engine flush.
pub(crate) struct Waiting {
    pub token: Token,
    pub status_addr: GuestAddress,
    pub mem: Arc<GuestMem>,
    pub vring: Vring,
}

#[derive(Default)]
struct State {
    waiting: Vec<Waiting>,
    running: bool,
}

/// The FLUSHes of one queue not yet served (see the module docs).
#[derive(Default)]
pub(crate) struct FlushQueue {
    state: Mutex<State>,
}

impl FlushQueue {
    /// Adds a FLUSH. Returns true if no runner is active: the caller must
    /// then start one (which calls [`FlushQueue::take`] until it says stop).
    pub fn push(&self, w: Waiting) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.waiting.push(w);
        !std::mem::replace(&mut s.running, true)
    }

    /// For the runner: every FLUSH waiting now, or `None` (and the runner
    /// is recorded as stopped) when there is none.
    pub fn take(&self) -> Option<Vec<Waiting>> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.waiting.is_empty() {
            s.running = false;
            return None;
        }
        Some(std::mem::take(&mut s.waiting))
    }
}
