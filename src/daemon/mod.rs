//! The daemon: opens the devices and the engine, serves vhost-user-blk
//! front-ends one connection after another, and shuts down cleanly on
//! SIGINT/SIGTERM.
//!
//! Lifecycle. The listening socket is polled together with a wake eventfd,
//! so a signal that arrives while no front-end is connected ends the wait at
//! once. For each connection a fresh backend and `VhostUserDaemon` are made
//! (the library's daemon serves one connection); when the front-end goes
//! away, in-flight requests are drained and the next connection is accepted.
//! On a signal the current connection is shut down, in-flight requests are
//! drained, the engine is shut down (optionally writing back dirty blocks)
//! and the socket files are removed.

mod error;
mod socket;

pub use error::Error;

use crate::config::{Config, ServeConfig};
use crate::control::{self, ControlServer};
use crate::device::{BlockDevice, DeviceError, FileDevice, OpenOptions};
use crate::engine::Engine;
use crate::virtio::pool::IoPool;
use crate::virtio::{BlkBackend, BlkBackendConfig, DeviceLimits};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use socket::BoundSocket;
use std::fs::File;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How long to wait for in-flight requests when a connection ends.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stop waits for in-flight requests before it closes the
/// connection (see `Stop::request`).
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs what the configuration asks for: the daemon or one client command.
pub fn run(config: Config) -> Result<(), Error> {
    match config {
        Config::Serve(cfg) => serve(*cfg),
        Config::Client { control, command } => {
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            control::run_client(&control, command, &mut out)?;
            Ok(())
        }
        Config::Check {
            cache,
            json,
            repair,
        } => check(&cache, json, repair),
    }
}

/// `vblkcache check`: prints the report; an inconsistent device is an error
/// (exit status 1) after the report is printed.
fn check(path: &Path, json: bool, repair: bool) -> Result<(), Error> {
    let _lock = crate::check::lock_cache(path)?;
    let dev = open_device(
        "--cache",
        path,
        OpenOptions {
            direct: false,
            read_only: !repair,
            exclusive: true,
        },
    )?;
    let report = crate::check::check_device(&*dev, repair)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let printed = if json {
        serde_json::to_writer_pretty(&mut out, &report)
            .map_err(std::io::Error::other)
            .and_then(|()| writeln!(out))
    } else {
        crate::check::write_human(&report, &mut out)
    };
    printed.map_err(|source| Error::Setup {
        what: "writing the report",
        source,
    })?;
    if report.consistent {
        Ok(())
    } else {
        Err(crate::check::CheckError::Inconsistent {
            device: report.device,
            problems: report.problems.len(),
        }
        .into())
    }
}

/// State shared with the signal thread.
struct Stop {
    requested: AtomicBool,
    wake: EventFd,
    /// The front-end connection being served and its backend.
    connection: Mutex<Option<(ShutdownHandle, BlkBackend)>>,
}

impl Stop {
    /// Stops the daemon. A connected front-end first has every request the
    /// backend took completed while the connection is still up: a front-end
    /// that reconnects (QEMU's `reconnect-ms`) restarts the queues from the
    /// used index it saw, which must then cover every request taken, or the
    /// next daemon would serve some twice or never.
    fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        let backend = self.lock_connection().as_ref().map(|(_, b)| b.clone());
        if let Some(b) = backend {
            if !b.quiesce(QUIESCE_TIMEOUT) {
                log::error!(
                    "requests still in flight {QUIESCE_TIMEOUT:?} after the stop; closing the connection anyway"
                );
            }
        }
        if let Some((h, _)) = self.lock_connection().as_ref() {
            h.shutdown();
        }
    }

    fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    fn lock_connection(&self) -> std::sync::MutexGuard<'_, Option<(ShutdownHandle, BlkBackend)>> {
        self.connection.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How long an exclusive open waits for a block device to be released. A
/// daemon that was just killed keeps its claim for a few tens of ms after it
/// has exited, until the kernel has torn down its io_uring rings and dropped
/// the files they held; a mounted device stays busy and is refused after it.
const BUSY_WAIT: Duration = Duration::from_secs(5);

fn open_device(
    what: &'static str,
    path: &Path,
    opts: OpenOptions,
) -> Result<Arc<dyn BlockDevice>, Error> {
    let deadline = Instant::now() + BUSY_WAIT;
    let mut waited = false;
    loop {
        let err = match FileDevice::open(path, opts) {
            Ok(d) => return Ok(Arc::new(d)),
            Err(e) => e,
        };
        let errno = match &err {
            DeviceError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        };
        let path = path.to_path_buf();
        return Err(match errno {
            Some(libc::EBUSY) if opts.exclusive && Instant::now() < deadline => {
                if !waited {
                    log::info!(
                        "{what} {}: the block device is busy; waiting up to {BUSY_WAIT:?} for it \
                         to be released",
                        path.display()
                    );
                    waited = true;
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Some(libc::EINVAL) if opts.direct => Error::DirectUnsupported { path },
            Some(libc::EBUSY) if opts.exclusive => Error::DeviceBusy { what, path },
            Some(libc::EROFS) if !opts.read_only => Error::ReadOnlyDevice { what, path },
            _ => Error::Open { what, source: err },
        });
    }
}

/// Opens a device with O_DIRECT unless `--buffered`: the cache device is the
/// cache, so the host page cache would only hold second copies. Without
/// `--direct`, a filesystem that refuses O_DIRECT (tmpfs) gets the page
/// cache instead.
fn open_file(
    what: &'static str,
    path: &Path,
    cfg: &ServeConfig,
    read_only: bool,
) -> Result<Arc<dyn BlockDevice>, Error> {
    let opts = |direct| OpenOptions {
        direct,
        read_only,
        exclusive: true,
    };
    if cfg.buffered {
        return open_device(what, path, opts(false));
    }
    match open_device(what, path, opts(true)) {
        Err(Error::DirectUnsupported { .. }) if !cfg.direct => {
            log::info!(
                "{what} {}: the filesystem refuses O_DIRECT; using the page cache",
                path.display()
            );
            open_device(what, path, opts(false))
        }
        // tmpfs accepts O_DIRECT since Linux 6.6 but is memory either way;
        // only the alignment rules would remain.
        Ok(d) if !cfg.direct && d.raw_access().is_some_and(|a| a.memory) => {
            log::info!(
                "{what} {}: a memory filesystem; using the page cache",
                path.display()
            );
            drop(d);
            open_device(what, path, opts(false))
        }
        r => r,
    }
}

/// The image format whose header `head` (the first 512 bytes of a source)
/// starts with, if it is one QEMU users pass by mistake for a raw disk.
pub fn image_format(head: &[u8]) -> Option<&'static str> {
    let at = |o: usize, m: &[u8]| head.get(o..o + m.len()) == Some(m);
    if at(0, b"QFI\xfb") {
        Some("qcow2")
    } else if at(0, b"QED\0") {
        Some("QED")
    } else if at(0, b"KDMV") {
        Some("VMDK")
    } else if at(0, b"vhdxfile") {
        Some("VHDX")
    } else if at(0x40, &0xbeda_107f_u32.to_le_bytes()) {
        Some("VDI")
    } else {
        None
    }
}

/// Opens the source, refusing one that starts like an image format other
/// than raw unless `--force-raw`.
fn open_source(cfg: &ServeConfig) -> Result<Arc<dyn BlockDevice>, Error> {
    let source = open_source_file(cfg)?;
    if !cfg.force_raw {
        let mut head = crate::device::AlignedBuf::new(512);
        if source.size() >= 512 && source.read_at(&mut head, 0).is_ok() {
            if let Some(format) = image_format(&head) {
                return Err(Error::SourceFormat {
                    path: cfg.source.clone(),
                    format,
                });
            }
        }
    }
    Ok(source)
}

/// Opens the source file, read-only if the disk is exported read-only and
/// the file is not writable (or is on a read-only filesystem or device).
fn open_source_file(cfg: &ServeConfig) -> Result<Arc<dyn BlockDevice>, Error> {
    match open_file("--source", &cfg.source, cfg, false) {
        Err(Error::Open {
            source: DeviceError::Io { ref source, .. },
            ..
        }) if cfg.readonly && source.kind() == std::io::ErrorKind::PermissionDenied => {
            open_file("--source", &cfg.source, cfg, true)
        }
        Err(Error::ReadOnlyDevice { .. }) if cfg.readonly => {
            open_file("--source", &cfg.source, cfg, true)
        }
        other => other,
    }
}

/// Runs the daemon until SIGINT/SIGTERM.
pub fn serve(cfg: ServeConfig) -> Result<(), Error> {
    let setup = |what| move |source| Error::Setup { what, source };
    let stop = Arc::new(Stop {
        requested: AtomicBool::new(false),
        wake: EventFd::new(EFD_NONBLOCK).map_err(setup("eventfd"))?,
        connection: Mutex::new(None),
    });
    // Install the handlers first: a signal during startup must not kill the
    // process halfway through formatting the cache.
    let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(setup("signal handlers"))?;
    let signal_handle = signals.handle();
    let signal_stop = Arc::clone(&stop);
    let signal_thread = std::thread::Builder::new()
        .name("vblk-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                log::info!("signal {sig}: shutting down");
                signal_stop.request();
            }
        })
        .map_err(setup("signal thread"))?;

    let result = serve_inner(&cfg, &stop);
    signal_handle.close();
    if signal_thread.join().is_err() {
        log::error!("the signal thread panicked");
    }
    result
}

/// Takes an exclusive `flock` on the source for as long as the returned file
/// lives, so that a second daemon cannot serve (and write back into) the
/// same image through another cache. (QEMU's own image locks are `fcntl`
/// locks, which do not see this one.)
fn lock_source(path: &Path) -> Result<File, Error> {
    let lock_err = |source| Error::SourceLock {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(lock_err)?;
    if !crate::check::try_lock_exclusive(&file).map_err(lock_err)? {
        return Err(Error::SourceInUse(path.to_path_buf()));
    }
    Ok(file)
}

fn serve_inner(cfg: &ServeConfig, stop: &Arc<Stop>) -> Result<(), Error> {
    // Refuse an occupied socket path before touching the devices.
    socket::clear_stale("--socket", &cfg.socket)?;
    if let Some(c) = &cfg.control {
        socket::clear_stale("--control", c)?;
    }
    // Held until the daemon exits, so `vblkcache check` and a second daemon
    // cannot use the cache device or the source meanwhile. Taken before the
    // devices are opened: a second daemon is told at once that the source
    // is in use by a vblkcache, before its exclusive open would wait.
    let _cache_lock = crate::check::lock_cache(&cfg.cache)?;
    let _source_lock = lock_source(&cfg.source)?;
    let mut source = open_source(cfg)?;
    if !cfg.source_latency.is_zero() {
        log::warn!(
            "adding {:?} to every source request (--source-latency)",
            cfg.source_latency
        );
        source = Arc::new(crate::device::LatencyDevice::new(
            source,
            crate::device::LatencyProfile::uniform(cfg.source_latency),
        ));
    }
    let cache = open_file("--cache", &cfg.cache, cfg, false)?;
    let engine = Arc::new(Engine::open(source, cache, cfg.engine.clone())?);
    let status = engine.status();
    log::info!(
        "engine up: disk {} bytes, mode {}, {} cache blocks of {} bytes",
        engine.size(),
        status.mode,
        status.geometry.cache_blocks,
        status.geometry.block_size
    );

    let result = serve_engine(cfg, stop, &engine);
    let shut = engine.shutdown(cfg.writeback_on_exit);
    result?;
    shut.map_err(Error::Shutdown)
}

fn serve_engine(cfg: &ServeConfig, stop: &Arc<Stop>, engine: &Arc<Engine>) -> Result<(), Error> {
    let mode = cfg.sandbox.socket_mode(cfg.socket_mode);
    let bound = BoundSocket::bind(&cfg.socket, mode, cfg.sandbox.socket_group)?;
    let control = match &cfg.control {
        Some(path) => {
            let server = ControlServer::spawn(
                path,
                mode,
                Arc::clone(engine) as Arc<dyn control::ControlTarget>,
            )?;
            socket::set_group(path, cfg.sandbox.socket_group)?;
            Some(server)
        }
        None => None,
    };
    let depth = usize::from(cfg.queues) * usize::from(cfg.queue_size);
    let pool = IoPool::new(cfg.io_threads, depth).map_err(|e| Error::Setup {
        what: "I/O threads",
        source: std::io::Error::other(e),
    })?;
    let backend_cfg = BlkBackendConfig {
        num_queues: cfg.queues,
        queue_size: cfg.queue_size,
        limits: DeviceLimits::new(
            engine.size(),
            engine.status().geometry.block_size,
            cfg.readonly,
        ),
        serial: cfg.serial.clone(),
        io_uring: cfg.io_uring,
        poll: cfg.poll,
        pin_guest_memory: cfg.pin_guest_memory,
        // Before the sandbox: this reads sysfs.
        bounce_min: crate::virtio::staging_threshold(cfg.bounce_min),
        unordered: cfg.unordered,
        drain_timeout: crate::virtio::DRAIN_TIMEOUT,
        queue_threads: cfg.queue_threads,
    };
    // Everything that may need privileges is open: devices, sockets, threads.
    crate::sandbox::drop_privileges(cfg.sandbox.uid, cfg.sandbox.gid)?;
    if cfg.sandbox.seccomp {
        crate::sandbox::install_seccomp()?;
    }
    log::info!(
        "listening on {}: {} queue(s) served by {} thread(s)",
        cfg.socket.display(),
        cfg.queues,
        backend_cfg.threads()
    );

    let result = accept_loop(&bound, stop, engine, &backend_cfg, &pool);
    pool.shutdown();
    if let Some(c) = control {
        c.shutdown();
    }
    drop(bound);
    result
}

/// Waits until the listener has a connection (true) or a stop was
/// requested (false).
fn wait_for_connection(bound: &BoundSocket, stop: &Stop) -> Result<bool, Error> {
    loop {
        if stop.is_requested() {
            return Ok(false);
        }
        let mut fds = [
            libc::pollfd {
                fd: bound.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two initialised pollfd structs
        // and the length passed matches it.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Setup {
                what: "poll on the listening socket",
                source: e,
            });
        }
        if fds[1].revents != 0 || stop.is_requested() {
            return Ok(false);
        }
        if fds[0].revents != 0 {
            return Ok(true);
        }
    }
}

fn accept_loop(
    bound: &BoundSocket,
    stop: &Arc<Stop>,
    engine: &Arc<Engine>,
    backend_cfg: &BlkBackendConfig,
    pool: &IoPool,
) -> Result<(), Error> {
    let vhost_err = |e: vhost_user_backend::Error| Error::Vhost(e.to_string());
    while wait_for_connection(bound, stop)? {
        let backend = BlkBackend::new(Arc::clone(engine), backend_cfg.clone(), pool.handle());
        let mut daemon =
            VhostUserDaemon::new("vblk-vhost".into(), backend.clone(), backend.memory())
                .map_err(vhost_err)?;
        // A listener made from a duplicate fd has no path, so dropping it
        // does not unlink our socket.
        let fd = bound.listener.try_clone().map_err(|source| Error::Socket {
            path: "listener".into(),
            source,
        })?;
        let mut listener = vhost::vhost_user::Listener::from(fd);
        // The queue workers exist from `new`; watch the io_uring completions
        // before any request can be queued.
        backend
            .register_ring_events(&daemon.get_epoll_handlers())
            .map_err(|source| Error::Setup {
                what: "io_uring completion events",
                source,
            })?;
        if let Err(e) = daemon.start(&mut listener) {
            log::warn!("accepting a front-end failed: {}", vhost_err(e));
            // Do not spin if accept keeps failing (e.g. out of fds).
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        log::info!("front-end connected");
        *stop.lock_connection() = daemon.shutdown_handle().map(|h| (h, backend.clone()));
        // A signal between start and publishing the handle saw no connection.
        if stop.is_requested() {
            daemon.request_shutdown();
        }
        let ended = daemon.wait();
        *stop.lock_connection() = None;
        // Stop the queue workers (dropping the daemon joins them), then
        // complete what is still in flight: the rings are reaped by the
        // drain, pool jobs finish on their own.
        backend.close();
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        drop(daemon);
        if !backend.drain(DRAIN_TIMEOUT) {
            log::error!("requests still in flight {DRAIN_TIMEOUT:?} after the front-end left");
        }
        backend.end_guest_settings();
        match ended {
            Ok(()) => log::info!("front-end disconnected"),
            Err(e) => log::info!("front-end connection ended: {}", vhost_err(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::image_format;

    #[test]
    fn image_headers_are_recognised_and_raw_data_is_not() {
        let mut head = vec![0u8; 512];
        assert_eq!(image_format(&head), None);
        for (magic, name) in [
            (&b"QFI\xfb"[..], "qcow2"),
            (b"QED\0", "QED"),
            (b"KDMV", "VMDK"),
            (b"vhdxfile", "VHDX"),
        ] {
            head.fill(0);
            head[..magic.len()].copy_from_slice(magic);
            assert_eq!(image_format(&head), Some(name));
        }
        head.fill(0);
        head[0x40..0x44].copy_from_slice(&0xbeda_107f_u32.to_le_bytes());
        assert_eq!(image_format(&head), Some("VDI"));
        // An MBR, an ext4 superblock area, text: raw.
        head.fill(0);
        head[510] = 0x55;
        head[511] = 0xaa;
        assert_eq!(image_format(&head), None);
        assert_eq!(image_format(b"QFI"), None);
    }
}
