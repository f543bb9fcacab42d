//! A bounded pool of I/O threads.
//!
//! The engine API is blocking, so requests are executed on these threads and
//! complete in whatever order the engine finishes them: a slow cache miss
//! occupies one thread and never holds back the requests behind it. The job
//! queue is bounded; when it is full the submitting queue worker waits, which
//! is the back-pressure a driver that floods the ring gets.

use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// A unit of work. It receives the thread's reusable bounce buffer.
pub type Job = Box<dyn FnOnce(&mut Vec<u8>) + Send + 'static>;

/// Pool errors.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot spawn I/O thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// The threads. Dropping the pool without [`IoPool::shutdown`] detaches them;
/// they exit once every handle is gone.
pub struct IoPool {
    tx: SyncSender<Job>,
    threads: Vec<JoinHandle<()>>,
}

/// A cloneable way to submit jobs.
#[derive(Clone)]
pub struct IoPoolHandle {
    tx: SyncSender<Job>,
}

impl IoPool {
    /// Starts `threads` threads (at least one) with room for `capacity`
    /// queued jobs.
    pub fn new(threads: usize, capacity: usize) -> Result<IoPool, PoolError> {
        let (tx, rx) = mpsc::sync_channel::<Job>(capacity.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let rx = Arc::clone(&rx);
            let h = std::thread::Builder::new()
                .name(format!("vblk-io-{i}"))
                .spawn(move || run(&rx))
                .map_err(PoolError::Spawn)?;
            handles.push(h);
        }
        Ok(IoPool {
            tx,
            threads: handles,
        })
    }

    pub fn handle(&self) -> IoPoolHandle {
        IoPoolHandle {
            tx: self.tx.clone(),
        }
    }

    /// Lets queued jobs finish and joins the threads. Handles still alive
    /// elsewhere keep the threads running until they are dropped.
    pub fn shutdown(self) {
        drop(self.tx);
        for t in self.threads {
            if t.join().is_err() {
                log::error!("an I/O thread panicked");
            }
        }
    }
}

impl IoPoolHandle {
    /// Queues `job`, waiting while the queue is full. Gives the job back if
    /// the pool has shut down.
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        self.tx.send(job).map_err(|e| e.0)
    }
}

fn run(rx: &Mutex<Receiver<Job>>) {
    let mut buf = Vec::new();
    loop {
        // Hold the lock only while taking one job.
        let job = {
            let guard = match rx.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            guard.recv()
        };
        match job {
            Ok(job) => job(&mut buf),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn slow_job_does_not_block_later_ones() {
        let pool = IoPool::new(4, 16).unwrap();
        let h = pool.handle();
        let (done_tx, done_rx) = mpsc::channel();
        let slow_tx = done_tx.clone();
        h.submit(Box::new(move |_| {
            std::thread::sleep(Duration::from_millis(300));
            slow_tx.send("slow").unwrap();
        }))
        .unwrap_or_else(|_| panic!("submit"));
        h.submit(Box::new(move |_| done_tx.send("fast").unwrap()))
            .unwrap_or_else(|_| panic!("submit"));
        assert_eq!(done_rx.recv().unwrap(), "fast");
        assert_eq!(done_rx.recv().unwrap(), "slow");
        drop(h);
        pool.shutdown();
    }

    #[test]
    fn shutdown_runs_queued_jobs() {
        let pool = IoPool::new(2, 64).unwrap();
        let n = Arc::new(AtomicUsize::new(0));
        for _ in 0..50 {
            let n = Arc::clone(&n);
            pool.handle()
                .submit(Box::new(move |_| {
                    n.fetch_add(1, Ordering::SeqCst);
                }))
                .unwrap_or_else(|_| panic!("submit"));
        }
        pool.shutdown();
        assert_eq!(n.load(Ordering::SeqCst), 50);
    }
}
