//! Reading a virtqueue's state: popping chains, what is pending, whether the
//! queue is live, and kicking a queue from the device side.

use super::{Chain, GuestMem, GuestMemAtomic, Vring};
use crate::virtio::inflight::InFlight;
use crate::virtio::order::{Token, UsedOrder};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use vhost_user_backend::{VringState, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;

/// Signals the queue's kick eventfd, as the driver would, so that the
/// worker's epoll loop serves it again after the events already pending;
/// false if the queue has no kick eventfd.
pub(super) fn self_kick(vring: &Vring) -> bool {
    let state = vring.get_ref();
    let Some(kick) = state.get_kick() else {
        return false;
    };
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a local array to a descriptor the vring
    // keeps open while its state is borrowed; an eventfd adds them to its
    // counter, and any failure only means no extra wake-up.
    let n = unsafe { libc::write(kick.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    if n != 8 {
        log::warn!(
            "cannot signal a queue's kick eventfd: {}",
            io::Error::last_os_error()
        );
    }
    true
}

/// What [`pop`] found.
pub(super) enum Popped {
    /// A chain, counted in flight, with the memory map it was read through
    /// and the token its completion gives back (see `virtio::order`).
    Chain(Chain, Arc<GuestMem>, Token),
    /// Nothing published (or the queue is not live).
    Empty,
    /// Chains are published but cannot be popped: the available index is
    /// more than a ring ahead of the device's, or the ring entry cannot be
    /// read. Only a faulty or hostile driver does this; nothing more can be
    /// served until it mends the ring.
    Refused,
}

/// Pops the next available chain, counting it as in flight.
///
/// The memory snapshot is taken after the available index was seen to
/// move: the driver maps a buffer (ADD_MEM_REGION, acknowledged) before it
/// publishes a request using it, so a snapshot taken earlier could miss
/// that region and fail a valid request.
///
/// The chain's available position is recorded in `order` (see
/// `virtio::order`), under the vring's lock like the pop itself.
pub(super) fn pop(
    vring: &Vring,
    inflight: &InFlight,
    order: &Mutex<UsedOrder>,
    atomic: &GuestMemAtomic,
) -> Popped {
    let mut state = vring.get_mut();
    let pending = pending(&state, atomic);
    if pending == 0 {
        return Popped::Empty;
    }
    // Checked here so that a hostile index costs no error line per pass in
    // virtio-queue (which refuses it too).
    if pending > state.get_queue().size() {
        return Popped::Refused;
    }
    let mem = atomic.memory().into_inner();
    let pos = state.get_queue().next_avail();
    let Some(chain) = state.get_queue_mut().pop_descriptor_chain(Arc::clone(&mem)) else {
        return Popped::Refused;
    };
    let token = order
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take(pos, chain.head_index());
    match token {
        Some(token) => {
            inflight.begin();
            Popped::Chain(chain, mem, token)
        }
        None => Popped::Refused,
    }
}

/// True if the driver has published chains the device has not popped on
/// a live queue.
pub(super) fn avail_pending(vring: &Vring, mem: &GuestMemAtomic) -> bool {
    pending(&vring.get_ref(), mem) != 0
}

/// True while the front-end lets the device use the ring: the queue is
/// ready (GET_VRING_BASE clears it) and enabled (SET_VRING_ENABLE).
pub(super) fn is_live(state: &VringState<GuestMemAtomic>) -> bool {
    state.is_enabled() && state.get_queue().ready()
}

/// [`is_live`], taking the vring's lock.
pub(super) fn live(vring: &Vring) -> bool {
    is_live(&vring.get_ref())
}

/// How far the driver's available index is ahead of what the device
/// popped, read through the current memory map; 0 if the queue is not live
/// or the index cannot be read. More than the queue size only from a faulty
/// or hostile driver (see [`Popped::Refused`]).
pub(super) fn pending(state: &VringState<GuestMemAtomic>, mem: &GuestMemAtomic) -> u16 {
    let queue = state.get_queue();
    let m = mem.memory();
    match queue.avail_idx(&*m, Ordering::Acquire) {
        Ok(idx) if is_live(state) => idx.0.wrapping_sub(queue.next_avail()),
        _ => 0,
    }
}
