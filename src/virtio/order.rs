//! In-order completion: requests are put on the used ring in the order they
//! were taken from the available ring.
//!
//! Why: when the daemon dies (a crash, SIGKILL) and QEMU reconnects
//! (`reconnect-ms`), QEMU cannot ask the dead daemon where it was, so it
//! restarts the queue at the used ring's index: the new daemon takes the
//! available entries from there. That is right only if the completed
//! requests are exactly the first `used.idx` ones taken. With completions in
//! any order, a request taken earlier but still in flight at the crash was
//! never answered (the guest waits for it forever), and one taken later and
//! already answered was run again with descriptors the guest may have reused.
//! Posting in order makes the used index an exact boundary: everything
//! before it answered, everything from it on taken again. (vhost-user's
//! INFLIGHT_SHMFD would track this in QEMU's memory, but the vhost-user
//! backend library does not pass those messages on.)
//!
//! The cost is waiting: a request that completes before an earlier one is
//! held until that one completes. Hits on the io_uring path complete in
//! about the order they were submitted.
//!
//! Invariants (under the mutex, taken inside the vring's lock so that taking
//! and posting are each atomic with the ring update):
//! - `base` is the position of the oldest request taken and not posted;
//!   positions `base..base + outstanding` each hold `Taken` or `Done`, and
//!   at most one ring's worth is outstanding (the per-queue bound);
//! - a request is known by its position (its token) until it is posted,
//!   not by its head: a faulty driver may publish a head twice;
//! - a token also names the window's epoch, which a reset that leaves
//!   requests in flight ends: their late completions (a source that hung
//!   past the drain timeout of a stopping queue) are dropped, not taken for
//!   the new window's requests that reuse their positions.

use std::fmt;

/// Stands for a request taken from a queue until it is posted: the epoch
/// of the window it was taken in and its key there (its available position
/// when ordered, a free slot otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    epoch: u16,
    key: u16,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.key)
    }
}

/// What [`UsedOrder::done`] made of a completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Completed {
    /// Recorded; posted in its turn.
    Recorded,
    /// Of a request taken before the queue was reset: dropped, never
    /// posted. It still counted in flight until now.
    Stale,
    /// Of nothing in flight: ignored.
    Unknown,
}

/// A slot of the reorder window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Free,
    /// Taken with this head, not completed.
    Taken(u16),
    /// Completed: head and used length.
    Done(u16, u32),
}

/// The reorder window of one queue.
#[derive(Debug)]
pub(crate) struct UsedOrder {
    /// Next position to post; `None` until the first request after a
    /// (re)start of the queue.
    base: Option<u16>,
    slots: Vec<Slot>,
    /// Completed requests to post next, when not `ordered`.
    ready: Vec<(u16, u32)>,
    /// False with `--unordered-completion`: each completion is posted as
    /// it comes. The slots then only map tokens to heads, and a token is any
    /// free slot (positions would collide: a request may stay in flight
    /// while a ring's worth of later ones come and go).
    ordered: bool,
    /// Free slots, when not `ordered`.
    free: Vec<u16>,
    /// The current epoch: a reset that leaves requests in flight starts
    /// the next one.
    epoch: u16,
}

impl UsedOrder {
    /// A window for queues of at most `max_size` entries; `ordered` false
    /// posts completions as they come.
    pub(crate) fn new(max_size: u16, ordered: bool) -> UsedOrder {
        let n = usize::from(max_size.max(1)).next_power_of_two();
        UsedOrder {
            base: None,
            slots: vec![Slot::Free; n],
            ready: Vec::new(),
            ordered,
            epoch: 0,
            free: if ordered {
                Vec::new()
            } else {
                (0..n).rev().map(|i| i as u16).collect()
            },
        }
    }

    fn slot(&self, pos: u16) -> usize {
        usize::from(pos) & (self.slots.len() - 1)
    }

    /// Records the request with `head` taken at available position `pos`.
    /// Returns the token that stands for it until [`UsedOrder::done`] (its
    /// position: unlike heads, which a faulty driver may publish twice, the
    /// positions in flight are distinct), or `None` if the window is full,
    /// which the per-queue bound on requests in flight (one ring's worth)
    /// rules out; such a request is not answered.
    pub(crate) fn take(&mut self, pos: u16, head: u16) -> Option<Token> {
        let epoch = self.epoch;
        if !self.ordered {
            let Some(i) = self.free.pop() else {
                log::error!("request {head} at {pos}: no free completion slot");
                return None;
            };
            self.slots[usize::from(i)] = Slot::Taken(head);
            return Some(Token { epoch, key: i });
        }
        self.base.get_or_insert(pos);
        let s = self.slot(pos);
        if self.slots[s] != Slot::Free {
            log::error!("request {head} at {pos}: the completion window is full");
            return None;
        }
        self.slots[s] = Slot::Taken(head);
        Some(Token { epoch, key: pos })
    }

    /// Marks the request of `token` completed with `used_len` bytes.
    pub(crate) fn done(&mut self, token: Token, used_len: u32) -> Completed {
        if token.epoch != self.epoch {
            log::warn!("request {token} completed after its queue was reset: dropped");
            return Completed::Stale;
        }
        let s = self.slot(token.key);
        match self.slots[s] {
            Slot::Taken(head) if self.ordered => self.slots[s] = Slot::Done(head, used_len),
            Slot::Taken(head) => {
                self.slots[s] = Slot::Free;
                self.free.push(s as u16);
                self.ready.push((head, used_len));
            }
            other => {
                log::error!("completion of {token}, which is not in flight ({other:?})");
                return Completed::Unknown;
            }
        }
        Completed::Recorded
    }

    /// Hands `post` each completed request whose turn it is, as (head, used
    /// length), in order; they leave the window. Returns how many.
    pub(crate) fn post(&mut self, mut post: impl FnMut(u16, u32)) -> usize {
        if !self.ordered {
            let n = self.ready.len();
            for (head, len) in self.ready.drain(..) {
                post(head, len);
            }
            return n;
        }
        let Some(mut b) = self.base else {
            return 0;
        };
        let mut n = 0;
        loop {
            let s = self.slot(b);
            let Slot::Done(head, len) = self.slots[s] else {
                break;
            };
            post(head, len);
            self.slots[s] = Slot::Free;
            b = b.wrapping_add(1);
            n += 1;
        }
        self.base = Some(b);
        n
    }

    /// Forgets the position after the queue stopped, so the next request
    /// (from whatever index the front-end sets) starts the window.
    ///
    /// Requests still in flight (the drain timed out) are left to complete
    /// in the old epoch: their completions are dropped (see
    /// [`Completed::Stale`]) and uncounted then. Completed requests that
    /// waited for them are dropped now, unposted (taken again from the used
    /// index, like everything after it); returns how many, for the caller
    /// to uncount.
    pub(crate) fn reset(&mut self) -> usize {
        let taken = self
            .slots
            .iter()
            .filter(|s| matches!(s, Slot::Taken(_)))
            .count();
        let dropped = self
            .slots
            .iter()
            .filter(|s| matches!(s, Slot::Done(..)))
            .count()
            + self.ready.len();
        if taken + dropped > 0 {
            log::error!(
                "a stopped queue still had {taken} request(s) in flight and {dropped} \
                 completed behind them: the latter are dropped unposted, the former \
                 when they complete"
            );
            self.epoch = self.epoch.wrapping_add(1);
            self.slots.fill(Slot::Free);
            self.ready.clear();
            if !self.ordered {
                self.free = (0..self.slots.len()).rev().map(|i| i as u16).collect();
            }
        }
        self.base = None;
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(o: &mut UsedOrder) -> Vec<(u16, u32)> {
        let mut v = Vec::new();
        let n = o.post(|head, len| v.push((head, len)));
        assert_eq!(n, v.len());
        v
    }

    #[test]
    fn completions_are_posted_in_the_order_taken() {
        let mut o = UsedOrder::new(8, true);
        let t: Vec<Token> = [(65533u16, 4u16), (65534, 0), (65535, 7), (0, 2)]
            .iter()
            .map(|&(pos, head)| o.take(pos, head).unwrap())
            .collect();
        o.done(t[2], 30);
        o.done(t[3], 40);
        assert_eq!(post(&mut o), vec![]);
        o.done(t[0], 10);
        assert_eq!(post(&mut o), vec![(4, 10)]);
        o.done(t[1], 20);
        assert_eq!(post(&mut o), vec![(0, 20), (7, 30), (2, 40)]);
        // The window goes on from position 1.
        let t = o.take(1, 7).unwrap();
        o.done(t, 1);
        assert_eq!(post(&mut o), vec![(7, 1)]);
    }

    #[test]
    fn a_head_published_twice_is_served_twice_in_turn() {
        let mut o = UsedOrder::new(4, true);
        let a = o.take(10, 1).unwrap();
        let b = o.take(11, 1).unwrap();
        assert_ne!(a, b);
        o.done(b, 6);
        assert_eq!(post(&mut o), vec![]);
        o.done(a, 5);
        assert_eq!(post(&mut o), vec![(1, 5), (1, 6)]);
        // A completion of nothing in flight changes nothing.
        o.done(a, 1);
        assert_eq!(post(&mut o), vec![]);
        // A full window takes nothing more and keeps what it has.
        let t: Vec<Token> = (12..16).map(|pos| o.take(pos, pos - 12).unwrap()).collect();
        assert_eq!(o.take(16, 3), None);
        for &x in t.iter().rev() {
            o.done(x, 1);
        }
        assert_eq!(post(&mut o), vec![(0, 1), (1, 1), (2, 1), (3, 1)]);
    }

    #[test]
    fn unordered_posts_each_completion_as_it_comes() {
        let mut o = UsedOrder::new(4, false);
        let a = o.take(0, 2).unwrap();
        let b = o.take(1, 3).unwrap();
        o.done(b, 7);
        assert_eq!(post(&mut o), vec![(3, 7)]);
        o.done(a, 8);
        assert_eq!(post(&mut o), vec![(2, 8)]);
        assert_eq!(post(&mut o), vec![]);
        // A request may stay in flight while many later ones come and go
        // (their positions pass its own modulo the ring): no collision.
        let old = o.take(2, 0).unwrap();
        for pos in 3..40u16 {
            let t = o.take(pos, 1).unwrap();
            o.done(t, 1);
            assert_eq!(post(&mut o), vec![(1, 1)]);
        }
        o.done(old, 9);
        assert_eq!(post(&mut o), vec![(0, 9)]);
    }

    #[test]
    fn reset_starts_a_new_window() {
        let mut o = UsedOrder::new(4, true);
        let t = o.take(100, 0).unwrap();
        o.done(t, 1);
        assert_eq!(post(&mut o), vec![(0, 1)]);
        o.reset();
        let t = o.take(7, 3).unwrap();
        o.done(t, 2);
        assert_eq!(post(&mut o), vec![(3, 2)]);
    }

    /// A request still in flight when its queue is reset (the drain timed
    /// out) must not complete the new window's request that reuses its
    /// position, in either mode; requests completed behind it are dropped
    /// and counted for the caller.
    #[test]
    fn a_completion_from_before_a_reset_is_dropped() {
        for ordered in [true, false] {
            let mut o = UsedOrder::new(4, ordered);
            let stale = o.take(0, 5).unwrap();
            let behind = o.take(1, 6).unwrap();
            o.done(behind, 1);
            let early = post(&mut o);
            assert_eq!(o.reset(), usize::from(ordered), "ordered={ordered}");
            // The queue starts again at 0, as after a device reset.
            let new = o.take(0, 2).unwrap();
            assert_eq!(o.done(stale, 9), Completed::Stale, "ordered={ordered}");
            assert_eq!(post(&mut o), vec![], "ordered={ordered}");
            assert_eq!(o.done(new, 3), Completed::Recorded, "ordered={ordered}");
            assert_eq!(post(&mut o), vec![(2, 3)], "ordered={ordered}");
            if !ordered {
                // Unordered: the one behind was posted at once.
                assert_eq!(early, vec![(6, 1)]);
            }
        }
    }
}
