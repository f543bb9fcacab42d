//! Least recently used, with one 32-bit timestamp per frame.
//!
//! A hit stores the stripe clock into the frame's stamp (no list to splice,
//! so a hit costs one store); eviction scans the set for the oldest stamp.
//! Ages are compared as `clock - stamp` in wrapping arithmetic, which is exact
//! while no frame goes untouched for 2^32 accesses of its stripe; beyond that
//! an old frame may look young, which costs hit ratio, never correctness.

use super::Policy;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

pub struct Lru {
    stamps: Box<[AtomicU32]>,
}

impl Lru {
    pub fn new(frames: u64) -> Self {
        Lru {
            stamps: (0..frames).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    fn touch(&self, frame: u64, clock: &mut u32) {
        *clock = clock.wrapping_add(1);
        if let Some(s) = self.stamps.get(frame as usize) {
            s.store(*clock, Relaxed);
        }
    }
}

impl Policy for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }

    fn bytes_per_frame(&self) -> usize {
        std::mem::size_of::<AtomicU32>()
    }

    fn on_hit(&self, frame: u64, clock: &mut u32) {
        self.touch(frame, clock);
    }

    fn on_insert(&self, frame: u64, clock: &mut u32) {
        self.touch(frame, clock);
    }

    fn on_remove(&self, _frame: u64) {}

    fn victim(
        &self,
        first: u64,
        n: u32,
        clock: u32,
        eligible: &mut dyn FnMut(u64) -> bool,
    ) -> Option<u64> {
        let mut best: Option<(u32, u64)> = None;
        for f in first..first + u64::from(n) {
            if !eligible(f) {
                continue;
            }
            let stamp = self.stamps.get(f as usize).map_or(0, |s| s.load(Relaxed));
            let age = clock.wrapping_sub(stamp);
            if best.is_none_or(|(a, _)| age > a) {
                best = Some((age, f));
            }
        }
        best.map(|(_, f)| f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_eligible() {
        let lru = Lru::new(8);
        let mut clock = 0;
        for f in 0..4 {
            lru.on_insert(f, &mut clock);
        }
        lru.on_hit(0, &mut clock);
        // Order of use now: 1, 2, 3, 0.
        assert_eq!(lru.victim(0, 4, clock, &mut |_| true), Some(1));
        assert_eq!(lru.victim(0, 4, clock, &mut |f| f != 1), Some(2));
        assert_eq!(lru.victim(0, 4, clock, &mut |_| false), None);
    }

    #[test]
    fn survives_clock_wrap() {
        let lru = Lru::new(2);
        let mut clock = u32::MAX - 1;
        lru.on_insert(0, &mut clock); // stamp u32::MAX
        lru.on_insert(1, &mut clock); // stamp 0 after wrap
        assert_eq!(lru.victim(0, 2, clock, &mut |_| true), Some(0));
    }
}
