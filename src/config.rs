//! Validated configuration. `TryFrom<Args>` checks every value (and that the
//! input files exist) before anything is opened or created, so a bad command
//! line never leaves a socket, a formatted cache or a half-started daemon.

use crate::cli::{Args, Command, ServeArgs};
use crate::control::ClientCommand;
use crate::engine::{
    EngineConfig, Geometry, GeometryError, GeometryRequest, WriteMode, WritebackConfig,
};
use crate::sandbox::{SandboxConfig, SandboxError};
use crate::virtio::backend::{default_queue_threads, host_cpus};
use crate::virtio::{MAX_BOUNCE, MIN_BOUNCE};
use std::path::{Path, PathBuf};

/// Largest number of virtqueues (one worker thread each).
pub const MAX_QUEUES: u16 = 16;
/// Largest virtqueue size.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Serial numbers are reported in a 20-byte field (VIRTIO_BLK_ID_BYTES).
pub const MAX_SERIAL_BYTES: usize = 20;
/// I/O threads per queue when `--io-threads` is 0.
pub const DEFAULT_IO_THREADS_PER_QUEUE: usize = 32;
/// Upper bound on I/O threads.
pub const MAX_IO_THREADS: usize = 256;
/// Largest `--readahead` window.
pub const MAX_READAHEAD: u64 = 64 << 20;
/// Longest busy-polling interval `--poll` accepts: polling holds a CPU.
pub const MAX_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// A configuration error. Each message names the offending option.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--source-latency {0}: expected a duration like 5ms, 500us or 1s")]
    SourceLatency(String),
    #[error("--poll {0}: expected a duration of at most 10ms, like 32us or 0")]
    Poll(String),
    #[error("--bounce-min {0}: expected a size from 32K to 2M, like 64K, or off")]
    BounceMin(String),
    #[error("--readahead {0}: expected a size of at most 64M, like 1M, or 0 or off")]
    Readahead(String),
    #[error("--writeback-high {0}: expected a percentage from 1 to 100")]
    WritebackHigh(u8),
    #[error("--writeback-low {low}: expected a percentage below --writeback-high ({high})")]
    WritebackLow { low: u8, high: u8 },
    #[error("--writeback-idle {0}: expected a duration like 10s or 500ms, or off")]
    WritebackIdle(String),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("--mode: {0}")]
    Mode(String),
    #[error("--crash-state-dir {0}: not a directory (give a directory on a tmpfs, or off)")]
    CrashStateDir(PathBuf),
    #[error("--block-size: {0} is not a power of two between 4K and 1M")]
    BlockSize(u64),
    #[error("{option}: {source}")]
    Geometry {
        option: &'static str,
        #[source]
        source: GeometryError,
    },
    #[error("--queues: {0} is not between 1 and {MAX_QUEUES}")]
    Queues(u16),
    #[error("--queue-threads: {0} is more than --queues ({1})")]
    QueueThreads(u16, u16),
    #[error("--queue-threads {0}: --poll needs one thread per queue ({1})")]
    QueueThreadsPoll(u16, u16),
    #[error("--queue-size: {0} is not a power of two between 2 and {MAX_QUEUE_SIZE}")]
    QueueSize(u16),
    #[error("--io-threads: {0} is more than {MAX_IO_THREADS}")]
    IoThreads(u16),
    #[error("--serial: '{0}' is longer than {MAX_SERIAL_BYTES} bytes")]
    Serial(String),
    #[error("--socket-mode: '{0}' is not an octal file mode between 0 and 0777")]
    SocketMode(String),
    #[error("{option}: {path}: {reason}")]
    Path {
        option: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("--control: {0} is the same path as --socket")]
    ControlIsSocket(PathBuf),
    #[error("--source and --cache are the same file ({0})")]
    SameDevice(PathBuf),
}

/// Everything `vblkcache serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub source: PathBuf,
    pub cache: PathBuf,
    pub socket: PathBuf,
    /// Control socket; none by default.
    pub control: Option<PathBuf>,
    pub engine: EngineConfig,
    /// Virtqueues, 1..=16 (default 1).
    pub queues: u16,
    /// Threads serving the virtqueues, 1..=`queues` (default one per
    /// queue); queue q is served by thread q mod `queue_threads`.
    pub queue_threads: u16,
    /// Virtqueue size, a power of two in 2..=1024 (default 256).
    pub queue_size: u16,
    /// Request-executing threads, 1..=256 (default 32 per queue).
    /// Cache misses block one thread each while the source answers, so this
    /// bounds how many misses are fetched in parallel.
    pub io_threads: usize,
    pub readonly: bool,
    /// At most 20 bytes (default "vblkcache").
    pub serial: String,
    /// O_DIRECT on both devices, required (default: where possible).
    pub direct: bool,
    /// No O_DIRECT on either device (default off).
    pub buffered: bool,
    /// Serve hits with io_uring from the queue threads (default on).
    pub io_uring: bool,
    /// Busy-polling interval of each queue after it was served (default
    /// zero: sleep at once).
    pub poll: std::time::Duration,
    /// Register guest memory as io_uring fixed buffers (default off).
    pub pin_guest_memory: bool,
    /// Stage hits of at least this many bytes in huge-page buffers
    /// (default 32 KiB; `None`: off).
    pub bounce_min: Option<usize>,
    /// Post completions as they finish (default: in the order taken).
    pub unordered: bool,
    /// Permission bits of the sockets (default 0o600).
    pub socket_mode: u32,
    /// Write dirty blocks back to the source on shutdown (default off).
    pub writeback_on_exit: bool,
    /// Serve a source whose first bytes look like an image format header
    /// (qcow2, VMDK, ...) as raw anyway (default: refuse).
    pub force_raw: bool,
    /// Latency added to every source request (default none; for testing).
    pub source_latency: std::time::Duration,
    /// Seccomp, user/group switch and socket group.
    pub sandbox: SandboxConfig,
}

/// Parses `5ms`, `500us`, `2s`, `100ns` or `0`.
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let nanos = match unit {
        "" if n == 0 => 0,
        "ns" => n,
        "us" => n.checked_mul(1_000)?,
        "ms" => n.checked_mul(1_000_000)?,
        "s" => n.checked_mul(1_000_000_000)?,
        _ => return None,
    };
    Some(std::time::Duration::from_nanos(nanos))
}

/// What to run.
#[derive(Debug, Clone)]
pub enum Config {
    Serve(Box<ServeConfig>),
    Client {
        control: PathBuf,
        command: ClientCommand,
    },
    /// `vblkcache check`: verify a cache device offline.
    Check {
        cache: PathBuf,
        json: bool,
        repair: bool,
    },
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, Self::Error> {
        Ok(match args.command {
            Command::Serve(s) => Config::Serve(Box::new(ServeConfig::try_from(s)?)),
            Command::Status { json, control } => Config::Client {
                control,
                command: ClientCommand::Status { json },
            },
            Command::Flush { control } => Config::Client {
                control,
                command: ClientCommand::Flush,
            },
            Command::SetMode { mode, control } => {
                mode.parse::<WriteMode>()
                    .map_err(|e| ConfigError::Mode(e.to_string()))?;
                Config::Client {
                    control,
                    command: ClientCommand::SetMode(mode),
                }
            }
            Command::ResetStats { control } => Config::Client {
                control,
                command: ClientCommand::ResetStats,
            },
            Command::Check {
                cache,
                json,
                repair,
            } => {
                check_device_path("--cache", &cache)?;
                Config::Check {
                    cache,
                    json,
                    repair,
                }
            }
        })
    }
}

/// Parses an octal permission string such as `0600` or `660`.
fn parse_mode(s: &str) -> Option<u32> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    if digits.is_empty() || digits.len() > 4 {
        return None;
    }
    u32::from_str_radix(digits, 8).ok().filter(|m| *m <= 0o777)
}

/// The source and cache must exist and be regular files or block devices.
fn check_device_path(option: &'static str, path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::FileTypeExt;
    let err = |reason: String| ConfigError::Path {
        option,
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    let ft = meta.file_type();
    if !(ft.is_file() || ft.is_block_device()) {
        return Err(err("not a regular file or block device".into()));
    }
    Ok(())
}

/// The socket's directory must exist; the socket itself is checked (stale or
/// in use) when the daemon binds it, because that check connects to it.
fn check_socket_dir(option: &'static str, path: &Path) -> Result<(), ConfigError> {
    let err = |reason: &str| ConfigError::Path {
        option,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if path.as_os_str().is_empty() {
        return Err(err("empty path"));
    }
    // sun_path holds 108 bytes including the terminating NUL.
    if path.as_os_str().len() > 107 {
        return Err(err("too long for a Unix socket path (at most 107 bytes)"));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(err("parent directory does not exist"));
    }
    Ok(())
}

/// The same file, or two nodes of the same block device.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => {
            let block = x.file_type().is_block_device() && y.file_type().is_block_device();
            (x.dev() == y.dev() && x.ino() == y.ino()) || (block && x.rdev() == y.rdev())
        }
        _ => false,
    }
}

impl TryFrom<ServeArgs> for ServeConfig {
    type Error = ConfigError;

    fn try_from(a: ServeArgs) -> Result<Self, Self::Error> {
        let mode = match &a.mode {
            Some(m) => Some(
                m.parse::<WriteMode>()
                    .map_err(|e| ConfigError::Mode(e.to_string()))?,
            ),
            None => None,
        };
        let block_size = match a.block_size {
            Some(b) => Some(u32::try_from(b).map_err(|_| ConfigError::BlockSize(b))?),
            None => None,
        };
        let geometry = GeometryRequest {
            block_size,
            cache_blocks: a.cache_blocks,
            assoc: a.assoc,
        };
        Geometry::check_request(&geometry).map_err(|source| {
            let option = match source {
                GeometryError::BlockSize(_) => "--block-size",
                GeometryError::AssocNotPowerOfTwo(_)
                | GeometryError::AssocTooLarge { .. }
                | GeometryError::BlocksNotMultiple { .. } => "--assoc",
                _ => "--cache-blocks",
            };
            ConfigError::Geometry { option, source }
        })?;
        if a.queues == 0 || a.queues > MAX_QUEUES {
            return Err(ConfigError::Queues(a.queues));
        }
        let poll = parse_duration(&a.poll)
            .filter(|d| *d <= MAX_POLL)
            .ok_or_else(|| ConfigError::Poll(a.poll.clone()))?;
        let queue_threads = match a.queue_threads {
            0 => default_queue_threads(a.queues, !poll.is_zero(), host_cpus()),
            n if n > a.queues => return Err(ConfigError::QueueThreads(n, a.queues)),
            n if n < a.queues && !poll.is_zero() => {
                return Err(ConfigError::QueueThreadsPoll(n, a.queues))
            }
            n => n,
        };
        if !(1..=100).contains(&a.writeback_high) {
            return Err(ConfigError::WritebackHigh(a.writeback_high));
        }
        if a.writeback_low >= a.writeback_high {
            return Err(ConfigError::WritebackLow {
                low: a.writeback_low,
                high: a.writeback_high,
            });
        }
        let idle_drain_after = match a.writeback_idle.trim() {
            "off" => None,
            s => Some(
                parse_duration(s)
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| ConfigError::WritebackIdle(a.writeback_idle.clone()))?,
            ),
        };
        let writeback = WritebackConfig {
            high_watermark_pct: a.writeback_high,
            low_watermark_pct: a.writeback_low,
            idle_drain_after,
            ..WritebackConfig::default()
        };
        if !a.queue_size.is_power_of_two() || !(2..=MAX_QUEUE_SIZE).contains(&a.queue_size) {
            return Err(ConfigError::QueueSize(a.queue_size));
        }
        let io_threads = match usize::from(a.io_threads) {
            0 => (usize::from(a.queues) * DEFAULT_IO_THREADS_PER_QUEUE).min(MAX_IO_THREADS),
            n if n > MAX_IO_THREADS => return Err(ConfigError::IoThreads(a.io_threads)),
            n => n,
        };
        if a.serial.len() > MAX_SERIAL_BYTES {
            return Err(ConfigError::Serial(a.serial));
        }
        let bounce_min = match a.bounce_min.trim() {
            "off" => None,
            s => Some(
                crate::size::parse_size(s)
                    .ok()
                    .and_then(|n| usize::try_from(n).ok())
                    .filter(|n| (MIN_BOUNCE..=MAX_BOUNCE).contains(n))
                    .ok_or_else(|| ConfigError::BounceMin(a.bounce_min.clone()))?,
            ),
        };
        let readahead = match a.readahead.trim() {
            "off" => 0,
            s => crate::size::parse_size(s)
                .ok()
                .filter(|&n| n <= MAX_READAHEAD)
                .ok_or_else(|| ConfigError::Readahead(a.readahead.clone()))?,
        };
        let socket_mode = parse_mode(&a.socket_mode)
            .ok_or_else(|| ConfigError::SocketMode(a.socket_mode.clone()))?;
        check_device_path("--source", &a.source)?;
        check_device_path("--cache", &a.cache)?;
        if same_file(&a.source, &a.cache) {
            return Err(ConfigError::SameDevice(a.source));
        }
        check_socket_dir("--socket", &a.socket)?;
        if let Some(c) = &a.control {
            check_socket_dir("--control", c)?;
            if c == &a.socket {
                return Err(ConfigError::ControlIsSocket(c.clone()));
            }
        }
        let crash_state_dir = match a.crash_state_dir.as_deref() {
            Some("off") => None,
            Some(d) => {
                let d = PathBuf::from(d);
                if !d.is_dir() {
                    return Err(ConfigError::CrashStateDir(d));
                }
                Some(d)
            }
            None => Some(PathBuf::from("/dev/shm")).filter(|d| d.is_dir()),
        };
        Ok(ServeConfig {
            source: a.source,
            cache: a.cache,
            socket: a.socket,
            control: a.control,
            engine: EngineConfig {
                geometry,
                mode,
                format: a.format,
                discard_dirty: a.discard_dirty,
                source_moved: a.source_moved,
                crash_state_dir,
                writeback,
                readahead,
                ..EngineConfig::default()
            },
            queues: a.queues,
            queue_threads,
            queue_size: a.queue_size,
            io_threads,
            readonly: a.readonly,
            serial: a.serial,
            direct: a.direct,
            buffered: a.buffered,
            io_uring: a.io_uring == "on",
            poll,
            pin_guest_memory: a.pin_guest_memory,
            bounce_min,
            unordered: a.unordered_completion,
            socket_mode,
            writeback_on_exit: a.writeback_on_exit,
            force_raw: a.force_raw,
            source_latency: match &a.source_latency {
                None => std::time::Duration::ZERO,
                Some(s) => {
                    parse_duration(s).ok_or_else(|| ConfigError::SourceLatency(s.clone()))?
                }
            },
            sandbox: SandboxConfig::from_args(
                &a.seccomp,
                a.user.as_deref(),
                a.group.as_deref(),
                a.socket_group.as_deref(),
            )?,
        })
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
