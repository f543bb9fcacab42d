//! The vhost-user face of the backend: features, configuration space,
//! memory table, queue layout and the worker threads' events.

use super::*;

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.inner.cfg.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.inner.cfg.queue_size)
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_MQ)
            | (1 << VIRTIO_BLK_F_CONFIG_WCE)
            | (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.inner.cfg.limits.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let image = config_space::build(
            &self.inner.cfg.limits,
            self.inner.cfg.num_queues,
            self.wce(),
        );
        config_space::read(&image, offset, size)
    }

    /// A guest write of `wce`: 0 turns a writeback cache into writethrough
    /// for as long as this connection lasts; 1 turns it back. The operator's
    /// mode is never overridden otherwise: wce=1 with writethrough,
    /// writearound or passthrough set by the operator keeps that mode (and
    /// wce reads 0), wce=0 with them changes nothing (they already complete
    /// writes on the source).
    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let wce = config_space::parse_write(offset, buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut guest_wt = self
            .inner
            .guest_wt
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let current = self.inner.engine.mode();
        if *guest_wt && current != WriteMode::Writethrough {
            // The operator has set a mode since: it stays.
            *guest_wt = false;
        }
        let target = match (wce, current) {
            (true, WriteMode::Writethrough) if *guest_wt => WriteMode::Writeback,
            (false, WriteMode::Writeback) => WriteMode::Writethrough,
            (_, m) => m,
        };
        if wce && target != WriteMode::Writeback {
            log::info!("guest set wce=1: the write mode stays {current} (set by the operator)");
        }
        if target != current {
            log::info!(
                "guest set wce={}: switching {current} -> {target}",
                u8::from(wce)
            );
            self.inner
                .engine
                .set_mode(target)
                .map_err(io::Error::other)?;
            *guest_wt = target == WriteMode::Writethrough;
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemAtomic) -> io::Result<()> {
        let current = mem.memory().into_inner();
        *self.inner.mem.lock().unwrap_or_else(|p| p.into_inner()) = mem;
        if self.inner.cfg.pin_guest_memory {
            // Register the new memory now (memory that left the guest must
            // not stay pinned, and the queue workers must not stall on the
            // registration at their next hit). `pop` hands out this same
            // generation until the next update.
            // The first ring that registers it shares its registration
            // with the others (pinned and charged to memlock once).
            let mut from = None;
            for q in 0..self.inner.rings.len() {
                if let Some(mut r) = self.lock_ring(q) {
                    let mine = r.reregister_fixed(&current, from.as_ref());
                    if from.is_none() {
                        from = mine;
                    }
                }
            }
        }
        Ok(())
    }

    /// Queue `q` goes to thread `q % threads` (see [`queue_of`]).
    fn queues_per_thread(&self) -> Vec<u64> {
        thread_masks(self.inner.cfg.num_queues, self.inner.cfg.threads())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                log::error!("cannot create a worker exit event: {e}");
                None
            }
        }
    }

    /// GET_VRING_BASE: the queue is already marked not ready. Waits until
    /// its worker has left it (a poll session ends at once; see
    /// [`BlkBackend::process`]), then until its requests are done, so that
    /// nothing writes into the ring after this returns.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let Some(f) = usize::try_from(queue_index)
            .ok()
            .and_then(|q| self.inner.inflight.get(q))
        else {
            return Ok(());
        };
        let timeout = self.inner.cfg.drain_timeout;
        if !f.wait_unserved(timeout) {
            log::error!("queue {queue_index}: its worker still serves it after {timeout:?}");
        }
        if !f.wait_idle(timeout) {
            log::error!(
                "queue {queue_index}: {} request(s) still in flight after {timeout:?}; \
                 their completions will be dropped",
                f.count()
            );
        }
        // The front-end sets where the queue starts again (SET_VRING_BASE).
        if let Some(o) = usize::try_from(queue_index)
            .ok()
            .and_then(|q| self.inner.order.get(q))
        {
            let dropped = o.lock().unwrap_or_else(|p| p.into_inner()).reset();
            f.end(dropped);
        }
        if let Some(r) = usize::try_from(queue_index)
            .ok()
            .and_then(|q| self.inner.restarted.get(q))
        {
            r.store(true, Ordering::Release);
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // Event `i` below `vrings.len()` is the kick of the thread's i-th
        // queue; `ring_event(i)` is that queue's io_uring completion eventfd.
        if !evset.contains(EventSet::IN) {
            return Ok(());
        }
        let event = usize::from(device_event);
        let base = self.ring_event(0);
        let (local, kick) = if event < vrings.len() {
            (event, true)
        } else if let Some(i) = u64::from(device_event).checked_sub(base) {
            (usize::try_from(i).unwrap_or(usize::MAX), false)
        } else {
            return Ok(());
        };
        let Some(vring) = vrings.get(local) else {
            return Ok(());
        };
        let q = queue_of(thread_id, local, self.inner.cfg.threads());
        let result = if kick {
            self.process_queue(q, vring)
        } else {
            self.process_ring(q, vring)
        };
        // An error returned here would end the queue's worker thread for
        // good (the library leaves its loop): log it and keep serving; the
        // next kick or completion tries again. A guest can cause one per
        // kick (a ring outside its memory), so log the 1st, 2nd, 4th, ...
        if let Err(e) = result {
            self.inner.queue_error(q, e);
        }
        Ok(())
    }
}
