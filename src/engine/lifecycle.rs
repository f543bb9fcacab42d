//! The end of an engine's life: shutdown (drain, optional writeback, the
//! clean-shutdown mark), halt, and what a drop without shutdown still does.

use super::{meta, Engine, EngineError};
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

impl Engine {
    /// Stops serving, waits for requests and background stores in flight,
    /// optionally writes back every dirty block, and persists the mapping with
    /// a clean-shutdown mark (also when the writeback failed: the blocks it
    /// left dirty are saved dirty; not after a failed flush, see `durable`).
    /// Later requests fail with `ShutDown`. Calling it
    /// again does nothing.
    pub fn shutdown(&self, writeback: bool) -> Result<(), EngineError> {
        if self.shut.swap(true, SeqCst) {
            return Ok(());
        }
        let c = &self.core;
        c.closed.store(true, SeqCst);
        while c.inflight.total() > 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
        // Readahead first: its last fetches hand their blocks to the store
        // queue, which is waited for next.
        c.close_readahead();
        c.readahead.wait_idle();
        c.store.wait_idle();
        self.stop_workers();
        let r = if writeback {
            c.flush_all(&mut |_| {})
        } else {
            Ok(())
        };
        // No pass runs any more: end the kept writer threads.
        c.wb_pool.stop();
        // Blocks a failed writeback left dirty are persisted dirty: the
        // mapping is saved whether or not the writeback succeeded.
        let saved = self.persist();
        match r {
            Err(e) => {
                if let Err(p) = saved {
                    log::error!("cache metadata not saved: {p}");
                }
                Err(e)
            }
            Ok(()) => saved,
        }
    }

    /// Stops the background threads and waits for them, persisting nothing:
    /// the cache device is left as a crash would leave it. For crash tests.
    pub fn halt(&self) {
        if self.shut.swap(true, SeqCst) {
            return;
        }
        self.core.closed.store(true, SeqCst);
        self.stop_workers();
        self.core.wb_pool.stop();
    }

    /// Tells the writeback and store threads to stop and joins them.
    fn stop_workers(&self) {
        let c = &self.core;
        {
            let mut s = c.wb_signal.lock().unwrap_or_else(|p| p.into_inner());
            s.stop = true;
            c.wb_cond.notify_all();
        }
        c.close_readahead();
        c.store.close();
        for t in self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = t.join();
        }
    }

    /// Writes the table and a clean superblock.
    fn persist(&self) -> Result<(), EngineError> {
        let c = &self.core;
        let meta_err = |e| EngineError::Meta {
            device: c.cache.name(),
            source: e,
        };
        // Data first: the table written next points at it. After a failed
        // flush nothing is persisted (`durable`): the next start recovers
        // from the last good commit.
        c.flush_cache()?;
        c.cache_written.store(false, SeqCst);
        // Frames written back whose pass has not flushed the source yet are
        // persisted clean below: the source must hold their data first.
        let written_back = (0..c.frames.frames()).any(|f| c.frames.get(f).srcpend());
        // A source whose flush failed may have lost writes that clean
        // entries stand for: then nothing is persisted either.
        if c.source_written.swap(false, SeqCst) | written_back | c.source_flush.failed() {
            c.flush_source()?;
        }
        let mut j = c.journal.lock().unwrap_or_else(|p| p.into_inner());
        let j = &mut *j;
        // The full table goes to the inactive copy; the superblock switches.
        let entries: Vec<u64> = (0..c.frames.frames())
            .map(|f| c.frames.get(f).persistent())
            .collect();
        // `j` changes only once everything is written, so that it always
        // describes what the durable superblock may point at.
        let mut sb = j.sb.clone();
        sb.table_copy ^= 1;
        meta::save_table(&*c.cache, &c.layout, sb.table_copy, &entries).map_err(meta_err)?;
        c.flush_cache()?;
        sb.clean = true;
        sb.mode = c.mode();
        // Read after the last source write and flush: the next start
        // compares it to tell whether something else wrote the source since.
        sb.source_id = c.source.identity();
        sb.commit_seq = j.seq + 1;
        sb.journal_pos = 0;
        // Both slots get the clean superblock (one after the other, each
        // flushed), so either copy alone still says "clean".
        let mut slot = j.slot;
        for _ in 0..2 {
            sb.seq += 1;
            slot = 1 - slot;
            c.write_superblock(&sb, slot)?;
        }
        j.seq = sb.commit_seq;
        j.sb = sb;
        j.slot = slot;
        // The cache is clean on its device now: no crash state is needed.
        if let Some(f) = c.frames.crash_file() {
            f.remove();
        }
        log::info!(
            "cache metadata saved: {} blocks in use, {} dirty",
            c.valid.load(SeqCst),
            c.dirty.load(SeqCst)
        );
        Ok(())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Without an explicit shutdown the threads are still told to stop;
        // the metadata is not written (the next start sees an unclean cache).
        let c = &self.core;
        c.closed.store(true, SeqCst);
        if let Ok(mut s) = c.wb_signal.lock() {
            s.stop = true;
            c.wb_cond.notify_all();
        }
        c.close_readahead();
        c.store.close();
    }
}
