//! Command-line arguments (clap derive). These are raw user input: every value
//! is checked in [`crate::config`] before anything is opened or created.

use crate::size::clap_size;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// vblkcache: a vhost-user-blk daemon serving a VM disk from an SSD cache in
/// front of a slow source image.
#[derive(Debug, Parser)]
#[command(name = "vblkcache", version, about)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
// Parsed once per process; boxing would only complicate the match arms.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Serve the cached disk on a vhost-user-blk socket until SIGINT/SIGTERM.
    Serve(ServeArgs),
    /// Print the status of a running daemon.
    Status {
        /// Print JSON instead of a table [default: table].
        #[arg(long)]
        json: bool,
        /// Control socket of the daemon.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
    },
    /// Write every dirty cache block back to the source.
    Flush {
        /// Control socket of the daemon.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
    },
    /// Switch the write mode (writeback, writethrough, writearound, passthrough).
    SetMode {
        /// The new mode.
        mode: String,
        /// Control socket of the daemon.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
    },
    /// Verify a cache device offline (superblocks, journal, mapping table).
    /// Exit status 0 when consistent, 1 when not.
    Check {
        /// Cache device (regular file or block device); must not be in use.
        #[arg(long, value_name = "DEV")]
        cache: PathBuf,
        /// Print JSON instead of a summary [default: summary].
        #[arg(long)]
        json: bool,
        /// Fix what can be fixed without losing dirty data (a corrupted
        /// superblock slot is rewritten from the valid one) [default: off].
        #[arg(long)]
        repair: bool,
    },
    /// Zero the statistics counters.
    ResetStats {
        /// Control socket of the daemon.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
    },
}

/// Arguments of `vblkcache serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Source image (regular file or block device); its size is the disk size.
    #[arg(long, value_name = "IMG")]
    pub source: PathBuf,
    /// Cache device (regular file or block device).
    #[arg(long, value_name = "DEV")]
    pub cache: PathBuf,
    /// Path of the vhost-user socket to create.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Write mode: writeback, writethrough, writearound or passthrough
    /// [default: the mode stored in the cache, writeback for a new cache].
    #[arg(long, value_name = "MODE")]
    pub mode: Option<String>,
    /// Cache block size, a power of two from 4K to 1M (K/M suffixes accepted)
    /// [default: the size stored in the cache, 64K for a new cache].
    #[arg(long, value_name = "SIZE", value_parser = clap_size)]
    pub block_size: Option<u64>,
    /// Number of cache blocks [default: as many as fit on the cache device].
    #[arg(long, value_name = "N")]
    pub cache_blocks: Option<u64>,
    /// Associativity (blocks per set), a power of two [default: 64, or the
    /// largest power of two dividing the number of cache blocks].
    #[arg(long, value_name = "N")]
    pub assoc: Option<u32>,
    /// Number of virtqueues offered to the front-end (1 to 16).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub queues: u16,
    /// Threads serving the virtqueues, at most --queues; queue q goes to
    /// thread q mod N (0 = one per queue, but at most half of the CPUs; one
    /// per queue with --poll). Fewer threads than queues is what
    /// qemu-storage-daemon does; with --poll, N must equal --queues.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub queue_threads: u16,
    /// Virtqueue size, a power of two from 2 to 1024.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub queue_size: u16,
    /// Threads executing the requests io_uring does not serve, mostly cache
    /// misses waiting on the source (0 = 32 per queue, at most 256).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub io_threads: u16,
    /// Export the disk read-only [default: read-write].
    #[arg(long)]
    pub readonly: bool,
    /// Serial number reported to the guest (at most 20 bytes).
    #[arg(long, value_name = "ID", default_value = "vblkcache")]
    pub serial: String,
    /// Control socket for `vblkcache status|flush|set-mode|reset-stats` [default: none].
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Open the source and cache with O_DIRECT (bypass the host page cache)
    /// and fail if the filesystem refuses it [default: O_DIRECT where the
    /// filesystem allows it, the page cache elsewhere (tmpfs)].
    #[arg(long, conflicts_with = "buffered")]
    pub direct: bool,
    /// Open the source and cache through the host page cache, without O_DIRECT.
    #[arg(long)]
    pub buffered: bool,
    /// Serve cache hits from the queue threads with io_uring, straight
    /// between the cache device and guest memory.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = ["on", "off"])]
    pub io_uring: String,
    /// After serving a queue, keep polling it (and its io_uring) for new
    /// requests and completions for this long before sleeping again, e.g.
    /// 32us; each request found restarts the interval. Saves wake-ups and
    /// guest kicks at the price of a busy CPU per queue (0 = off, at most
    /// 10ms).
    #[arg(long, value_name = "DURATION", default_value = "0")]
    pub poll: String,
    /// Register guest memory with each queue's io_uring, so that cache hits
    /// skip pinning guest pages per request. All of the guest's RAM is
    /// faulted in and locked while it is connected (needs RLIMIT_MEMLOCK of
    /// the guest's RAM, times the queues before Linux 6.12, or
    /// CAP_IPC_LOCK); not with virtio-balloon, virtio-mem or swappable guest
    /// RAM [default: off].
    #[arg(long)]
    pub pin_guest_memory: bool,
    /// Cache hits of at least this size (up to 2M) are read into, or
    /// written from, the daemon's own huge-page buffers and copied from or
    /// to guest memory, instead of using guest memory in place. Guest pages
    /// are scattered 4 KiB pages, so a large request in place reaches the
    /// cache device as many segments and is split; from a huge page it is
    /// one segment (32K at least, or off).
    #[arg(long, value_name = "SIZE|off", default_value = "32K")]
    pub bounce_min: String,
    /// When a read miss follows an earlier one at the next block (a guest
    /// reading in order, as a boot does), fetch the blocks after it from
    /// the source in the background: a window that doubles, from 4 blocks
    /// up to this size, while the reads go on in order (0 or off: no
    /// readahead; at most 64M).
    #[arg(long, value_name = "SIZE|off", default_value = "4M")]
    pub readahead: String,
    /// Put requests on the used ring as they complete, instead of in the
    /// order the guest issued them. Requests behind a slow one (a FLUSH, a
    /// miss) are answered at once, but if the daemon is killed and restarted
    /// under a running guest (QEMU `reconnect-ms`), the guest may hang on a
    /// request that is never answered, or see one run twice [default: in
    /// order, so that such a restart resumes exactly].
    #[arg(long)]
    pub unordered_completion: bool,
    /// Format the cache device even if it holds data that is not a vblkcache
    /// cache [default: refuse].
    #[arg(long)]
    pub format: bool,
    /// With --format: format even a cache that holds dirty blocks, which are
    /// lost [default: --format refuses such a cache].
    #[arg(long)]
    pub discard_dirty: bool,
    /// Accept a source file other than the one the cache was last used with,
    /// when it is the same image moved or copied: the cache's clean entries
    /// are dropped and its dirty blocks kept [default: refuse while the
    /// cache holds dirty blocks].
    #[arg(long)]
    pub source_moved: bool,
    /// Serve the source as a raw disk even if it starts like a qcow2, QED,
    /// VMDK, VHDX or VDI image [default: refuse such a source: the guest would
    /// see, and could overwrite, the image's metadata].
    #[arg(long)]
    pub force_raw: bool,
    /// Directory, on a tmpfs, for the crash state: the live cache mapping
    /// kept in a shared file, so that a restart after a crash of the daemon
    /// keeps every write it had completed (on the same boot; after a reboot
    /// the journal alone decides). `off` keeps the mapping in private memory:
    /// a crash then loses the write-back writes completed since the guest's
    /// last flush [default: /dev/shm, off if it is missing].
    #[arg(long, value_name = "DIR|off")]
    pub crash_state_dir: Option<String>,
    /// File mode of the sockets, in octal.
    #[arg(long, value_name = "MODE", default_value = "0600")]
    pub socket_mode: String,
    /// Write-back: background writeback starts when this percentage of the
    /// cache blocks is dirty, and above it a miss on a set of dirty blocks
    /// goes to the source around the cache (1 to 100).
    #[arg(long, value_name = "PCT", default_value_t = 50)]
    pub writeback_high: u8,
    /// Write-back: background writeback stops when dirty blocks fall to
    /// this percentage (0 to 99, below --writeback-high).
    #[arg(long, value_name = "PCT", default_value_t = 25)]
    pub writeback_low: u8,
    /// Write-back: once no request has come for this long, write every
    /// dirty block back (below --writeback-low too), stopping at the next
    /// request; e.g. 10s, 500ms, or off.
    #[arg(long, value_name = "DURATION|off", default_value = "10s")]
    pub writeback_idle: String,
    /// On shutdown, write every dirty block back to the source [default: keep
    /// dirty blocks in the cache].
    #[arg(long)]
    pub writeback_on_exit: bool,
    /// Add this latency to every source request, e.g. `5ms` or `500us`, to
    /// emulate a slow HDD or remote source in tests and benchmarks [default: 0].
    #[arg(long, value_name = "DURATION")]
    pub source_latency: Option<String>,
    /// Seccomp filter on the serving threads: on or off (on where the kernel
    /// supports it).
    #[arg(long, value_name = "on|off", default_value = "on")]
    pub seccomp: String,
    /// After opening the devices and sockets, switch to this user (name or uid).
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// After opening the devices and sockets, switch to this group (name or
    /// gid) [default: the primary group of --user].
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
    /// Group owner of the sockets, e.g. the VMM's group; the group gets
    /// read-write access unless --socket-mode already gives it some.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
}
