//! Named engine statistics, cheap enough to bump on every request.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::shard::{shard_index, SHARDS};

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// One thread's share of the counters, alone in its cache lines.
        #[derive(Default, Debug)]
        #[repr(align(128))]
        pub struct Shard { $( $(#[$doc])* pub $name: AtomicU64, )* }

        /// Live counters, sharded by thread: every request bumps several, and
        /// queue threads on different cores bumping the same atomics (or
        /// anything in their cache lines) would pass the lines back and forth
        /// on every request. Bump through [`Stats::here`]; read totals with
        /// [`Stats::snapshot`]. Each is a relaxed atomic: totals are exact,
        /// but a snapshot taken during I/O is not a single instant.
        #[derive(Debug)]
        pub struct Stats { shards: Box<[Shard]> }

        impl Default for Stats {
            fn default() -> Self {
                Stats { shards: (0..SHARDS).map(|_| Shard::default()).collect() }
            }
        }

        /// A copy of [`Stats`] with named fields, serialisable as-is.
        #[derive(Default, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        pub struct StatsSnapshot { $( $(#[$doc])* pub $name: u64, )* }

        impl Stats {
            /// The calling thread's shard, to add to. Its values are a part
            /// of the totals only.
            #[inline]
            pub fn here(&self) -> &Shard {
                &self.shards[shard_index() % self.shards.len()]
            }

            /// The totals over all shards.
            pub fn snapshot(&self) -> StatsSnapshot {
                let mut t = StatsSnapshot::default();
                for sh in self.shards.iter() {
                    $( t.$name = t.$name.wrapping_add(sh.$name.load(Relaxed)); )*
                }
                t
            }

            /// Requests of every kind counted so far (reads, writes,
            /// flushes, discards and write-zeroes): it changes when
            /// foreground I/O happens. Cheaper than a snapshot.
            pub fn requests(&self) -> u64 {
                self.shards.iter().fold(0u64, |t, sh| {
                    t.wrapping_add(sh.reads.load(Relaxed))
                        .wrapping_add(sh.writes.load(Relaxed))
                        .wrapping_add(sh.flushes.load(Relaxed))
                        .wrapping_add(sh.discards.load(Relaxed))
                })
            }

            /// Zeroes every counter.
            pub fn reset(&self) {
                for sh in self.shards.iter() {
                    $( sh.$name.store(0, Relaxed); )*
                }
            }
        }
    };
}

counters! {
    /// Read requests.
    reads,
    /// Write requests.
    writes,
    /// Cache blocks touched by reads and found in the cache.
    read_hits,
    /// Cache blocks touched by reads and not found.
    read_misses,
    /// Cache blocks touched by writes and found in the cache.
    write_hits,
    /// Cache blocks touched by writes and not found.
    write_misses,
    /// Blocks brought into the cache.
    promotions,
    /// Valid blocks evicted to make room.
    demotions,
    /// Dirty blocks that had to be written back before their frame was reused.
    dirty_evictions,
    /// Blocks written back to the source.
    writebacks,
    /// Source writes issued by writeback (each covers a run of blocks).
    writeback_runs,
    /// Cache reads planned for writeback runs when they are claimed (frames
    /// that follow each other on the cache device are read with one
    /// request); a run whose read fails counts its reads all the same.
    writeback_cache_reads,
    /// Source flushes issued by writeback itself: by a pass (every 64 MiB
    /// written back in the background, every 1 GiB by `flush`, and at its
    /// end) or by a miss that needed a frame whose
    /// writeback awaited one. Guest FLUSHes do not wait for these.
    writeback_source_flushes,
    /// Block-sized pieces served straight from/to the source, bypassing the
    /// cache: reads in passthrough, and misses on a set of dirty frames
    /// while dirty blocks are above the high watermark.
    bypassed,
    /// Partial-block write misses that read the rest of the block from the source.
    partial_fills,
    /// Flush requests.
    flushes,
    /// Discard and write-zeroes requests.
    discards,
    /// Blocks invalidated by writes in writearound/passthrough, discards or errors.
    invalidations,
    /// Requests that waited for a block that was being fetched or written back.
    waits,
    /// Bytes read by the guest.
    bytes_read,
    /// Bytes written by the guest.
    bytes_written,
    /// Hit requests whose cache I/O the caller did itself (the daemon's
    /// io_uring path), a subset of `reads` + `writes`.
    direct_requests,
    /// Cache I/O operations of those requests (one per contiguous range of
    /// the cache device).
    direct_ops,
    /// Those of `direct_requests` whose data the caller moved through a
    /// staging buffer of its own (the daemon's huge-page pieces for hits of
    /// `--bounce-min` bytes and more) instead of using guest memory in place.
    staged_requests,
    /// I/O errors returned to callers or met by background workers.
    errors,
    /// Blocks fetched from the source ahead of sequential read misses
    /// (`--readahead`; also counted in `promotions`).
    readahead_blocks,
    /// Readahead windows not fetched because the readahead queue was full.
    readahead_dropped,
}
