//! Leaving the ring: submission, completions, and turning a finished
//! request back into a used-ring entry or a retry through the pool.

#[cfg(test)]
use super::HELD;
use super::{copy_between, Done, Pending, QueueRing, Spare, SAFE_ALIGN, SUBMIT_RETRIES};
use crate::virtio::backend::GuestMem;
use crate::virtio::execute::write_status;
use crate::virtio::order::Token;
use crate::virtio::request::{Request, RequestKind};
use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_S_OK;

impl QueueRing {
    /// Submits queued operations: at the end of a pass, and every
    /// [`SUBMIT_BATCH`](super::SUBMIT_BATCH) operations during it.
    ///
    /// Retries transient failures: if nothing else is in flight, no
    /// completion would come to trigger another attempt, and the driver may
    /// be waiting for exactly these requests.
    pub fn submit(&mut self) {
        for attempt in 0..SUBMIT_RETRIES {
            if self.unsubmitted == 0 {
                return;
            }
            match self.ring.submit() {
                Ok(n) => {
                    self.submits += 1;
                    self.unsubmitted = self.unsubmitted.saturating_sub(n);
                }
                Err(e) if attempt + 1 == SUBMIT_RETRIES => {
                    log::error!("io_uring submit keeps failing: {e}");
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_micros(100)),
            }
        }
    }

    /// Waits until at least one operation completes (unless requests are
    /// already done), then reaps.
    pub fn wait(&mut self) -> Vec<Done> {
        if !self.ready.is_empty() || self.ops == 0 {
            return self.reap();
        }
        let r = self.ring.submit_and_wait(1);
        match r {
            Ok(n) => self.unsubmitted = self.unsubmitted.saturating_sub(n),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => log::warn!("io_uring wait: {e}"),
        }
        self.reap()
    }

    /// Reaps after a completion eventfd event. The eventfd is registered
    /// edge-triggered and never read: each signal is a new edge, and the
    /// ring itself says what is done (a system call saved per wake-up; its
    /// counter cannot reach its 2^64 - 1 limit in practice).
    pub fn on_event(&mut self) -> Vec<Done> {
        self.reap()
    }

    /// Takes every completed request.
    pub fn reap(&mut self) -> Vec<Done> {
        #[cfg(test)]
        {
            if self.unreaped {
                return Vec::new();
            }
        }
        let mut done = std::mem::take(&mut self.ready);
        if self.ops == 0 {
            return done;
        }
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for (user_data, res) in cqes.drain(..) {
            #[cfg(test)]
            {
                if user_data == HELD {
                    self.ops = self.ops.saturating_sub(1);
                    continue;
                }
            }
            let slot = (user_data >> 16) as usize;
            let op = (user_data & 0xffff) as usize;
            self.ops = self.ops.saturating_sub(1);
            let Some(Some(p)) = self.slots.get_mut(slot) else {
                log::error!("io_uring completion for unknown slot {slot}");
                continue;
            };
            let want = p.io.extents().get(op).map_or(0, |e| e.len);
            if u64::try_from(res).ok() != Some(want) {
                if res == -libc::EINVAL && self.align < SAFE_ALIGN {
                    log::info!(
                        "cache device refused {}-byte aligned direct I/O; using {SAFE_ALIGN}",
                        self.align
                    );
                    self.align = SAFE_ALIGN;
                } else {
                    log::warn!("direct cache I/O returned {res}, expected {want}; retrying through the pool");
                }
                p.failed = true;
            }
            p.remaining -= 1;
            if p.remaining > 0 {
                continue;
            }
            if let Some(p) = self.slots[slot].take() {
                self.free.push(slot);
                let d = self.finish(p);
                done.push(d);
            }
        }
        self.cqes = cqes;
        done
    }

    /// Waits for every operation in flight and returns their requests.
    pub fn drain(&mut self) -> Vec<Done> {
        let mut done = Vec::new();
        while self.busy() {
            done.extend(self.wait());
        }
        done
    }

    /// Releases a finished request's pins, keeps its vectors for the next
    /// request and turns it into a completion.
    pub(super) fn finish(&mut self, p: Pending) -> Done {
        let Pending {
            token,
            req,
            mem,
            io,
            iovecs,
            mut failed,
            bounce,
            ..
        } = p;
        let staged = bounce.is_some();
        if let Some(piece) = bounce {
            if !failed && matches!(req.kind, RequestKind::Read { .. }) {
                failed = !copy_between(&piece, &io, &iovecs, false);
            }
            if let Some(pool) = self.bounce.as_mut() {
                pool.give(piece);
            }
        }
        let direct = match (failed, staged) {
            (true, _) => io.failed(),
            (false, true) => io.completed_staged(),
            (false, false) => io.completed(),
        };
        self.spare.push(Spare {
            direct,
            iov: iovecs,
        });
        if failed {
            return Done::Retry { token, req, mem };
        }
        let done = served(token, &req, &mem);
        req.recycle();
        done
    }
}

/// The completion of a request served without error.
fn served(token: Token, req: &Request, mem: &GuestMem) -> Done {
    let data = match req.kind {
        RequestKind::Read { .. } => u32::try_from(req.data_len).unwrap_or(u32::MAX),
        _ => 0,
    };
    let used_len = match write_status(mem, req.status_addr, VIRTIO_BLK_S_OK as u8) {
        Ok(()) => data.saturating_add(1),
        Err(_) => data,
    };
    Done::Served { token, used_len }
}
