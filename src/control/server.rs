//! The control server: an accept thread plus one short-lived handler thread
//! per connection.
//!
//! Why this shape: requests are rare and some (flush) take minutes, so a
//! thread per connection keeps one slow command from delaying `status` on
//! another connection. The number of live connections is capped and every
//! connection has read and write timeouts, so a stuck or malicious client
//! holds at most one slot for at most one timeout. The data path never goes
//! through this module.
//!
//! Shutdown is prompt: the accept thread sleeps in epoll on the listener and an
//! eventfd, and `shutdown` writes the eventfd. Open connections are shut down
//! at the socket level, which wakes handlers blocked in `read`.

use super::protocol::{self, Line, Reply, Request, RequestError};
use super::socket_file::{self, FileId};
use super::{ControlError, ControlTarget};
use std::collections::HashMap;
use std::io::{self, BufReader, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Limits of the control server. The defaults suit the daemon; tests shrink
/// the timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Connections served at once; more are answered with an error and
    /// closed. Default 8.
    pub max_connections: usize,
    /// A connection that sends nothing for this long is closed. Default 30 s.
    pub idle_timeout: Duration,
    /// A reply that cannot be written for this long closes the connection.
    /// Default 10 s.
    pub write_timeout: Duration,
    /// How long `shutdown` waits for handlers still executing a command (a
    /// flush) before returning without them. Default 2 s.
    pub shutdown_grace: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: 8,
            idle_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(2),
        }
    }
}

impl ServerLimits {
    /// Checks that every limit is usable: a zero timeout would be refused by
    /// the socket layer on every connection, and zero connections would turn
    /// every client away.
    pub fn validate(&self) -> Result<(), ControlError> {
        let bad = if self.max_connections == 0 {
            Some("max_connections")
        } else if self.idle_timeout.is_zero() {
            Some("idle_timeout")
        } else if self.write_timeout.is_zero() {
            Some("write_timeout")
        } else {
            None
        };
        match bad {
            Some(field) => Err(ControlError::InvalidLimit { field }),
            None => Ok(()),
        }
    }
}

const LISTENER_TOKEN: u64 = 1;
const WAKE_TOKEN: u64 = 2;

/// The open connections, so shutdown can wake their handlers.
#[derive(Default)]
struct Connections {
    next_id: u64,
    open: HashMap<u64, UnixStream>,
}

/// State shared by the accept thread, the handlers and the handle.
struct Shared {
    target: Arc<dyn ControlTarget>,
    limits: ServerLimits,
    stopping: AtomicBool,
    conns: Mutex<Connections>,
    /// Signalled whenever a connection closes.
    closed: Condvar,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, Connections> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Removes a connection from the table when its handler ends, however it ends.
struct Registration<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.shared.conns().open.remove(&self.id);
        self.shared.closed.notify_all();
    }
}

/// The running server (the private half of [`super::ControlServer`]).
pub struct Server {
    path: PathBuf,
    file: FileId,
    shared: Arc<Shared>,
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn spawn(
        path: &Path,
        mode: u32,
        target: Arc<dyn ControlTarget>,
        limits: ServerLimits,
    ) -> Result<Server, ControlError> {
        let io_err = |source: io::Error| ControlError::Io {
            path: path.display().to_string(),
            source,
        };
        limits.validate()?;
        let (listener, file) = socket_file::bind(path, mode)?;
        let started = (|| {
            listener.set_nonblocking(true)?;
            let wake = EventFd::new(EFD_NONBLOCK)?;
            let epoll = Epoll::new()?;
            epoll.ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )?;
            epoll.ctl(
                ControlOperation::Add,
                wake.as_raw_fd(),
                EpollEvent::new(EventSet::IN, WAKE_TOKEN),
            )?;
            Ok::<_, io::Error>((wake, epoll))
        })();
        let (wake, epoll) = match started {
            Ok(v) => v,
            Err(e) => {
                socket_file::remove_if_ours(path, file);
                return Err(io_err(e));
            }
        };
        let shared = Arc::new(Shared {
            target,
            limits,
            stopping: AtomicBool::new(false),
            conns: Mutex::new(Connections::default()),
            closed: Condvar::new(),
        });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("vblkcache-ctl".into())
            .spawn(move || accept_loop(listener, epoll, thread_shared));
        match thread {
            Ok(t) => Ok(Server {
                path: path.to_path_buf(),
                file,
                shared,
                wake,
                thread: Some(t),
            }),
            Err(e) => {
                socket_file::remove_if_ours(path, file);
                Err(io_err(e))
            }
        }
    }

    /// Stops accepting, wakes every handler, waits (bounded) for them and
    /// removes the socket file.
    pub fn shutdown(mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Err(e) = self.wake.write(1) {
            log::warn!("cannot wake the control server thread: {e}");
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("control server thread panicked");
            }
        }
        // Remove the file first so no new client finds it while we wait.
        socket_file::remove_if_ours(&self.path, self.file);
        let deadline = Instant::now() + self.shared.limits.shutdown_grace;
        let mut conns = self.shared.conns();
        for s in conns.open.values() {
            let _ = s.shutdown(Shutdown::Both);
        }
        while !conns.open.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!(
                    "control server: {} connection(s) still executing at shutdown",
                    conns.open.len()
                );
                break;
            }
            conns = match self.shared.closed.wait_timeout(conns, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

fn accept_loop(listener: UnixListener, epoll: Epoll, shared: Arc<Shared>) {
    let mut events = [EpollEvent::default(); 2];
    while !shared.stopping.load(Ordering::SeqCst) {
        match epoll.wait(-1, &mut events) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("control server: epoll_wait failed, stopping: {e}");
                return;
            }
        }
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        // Accept everything pending; the listener is nonblocking.
        loop {
            match listener.accept() {
                Ok((stream, _)) => start_handler(stream, &shared),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning
                    // on a level-triggered listener.
                    log::warn!("control server: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            }
        }
    }
}

fn start_handler(stream: UnixStream, shared: &Arc<Shared>) {
    let limits = shared.limits;
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(limits.idle_timeout)))
        .and_then(|()| stream.set_write_timeout(Some(limits.write_timeout)));
    if let Err(e) = setup {
        log::warn!("control server: cannot configure a connection: {e}");
        return;
    }
    let id = {
        let mut conns = shared.conns();
        if conns.open.len() >= limits.max_connections {
            drop(conns);
            let msg = format!(
                "too many control connections (limit {})",
                limits.max_connections
            );
            let mut s = &stream;
            let _ = writeln!(s, "{}", Reply::error(msg).to_line());
            return;
        }
        let clone = match stream.try_clone() {
            Ok(c) => c,
            Err(e) => {
                log::warn!("control server: cannot clone a connection: {e}");
                return;
            }
        };
        let id = conns.next_id;
        conns.next_id = conns.next_id.wrapping_add(1);
        conns.open.insert(id, clone);
        id
    };
    let handler_shared = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name("vblkcache-ctl-conn".into())
        .spawn(move || {
            let _reg = Registration {
                shared: &handler_shared,
                id,
            };
            if let Err(e) = serve_connection(stream, &handler_shared) {
                log::debug!("control connection closed: {e}");
            }
        });
    if let Err(e) = spawned {
        log::warn!("control server: cannot start a connection thread: {e}");
        shared.conns().open.remove(&id);
    }
}

fn send(out: &mut impl Write, reply: &Reply) -> io::Result<()> {
    let mut line = reply.to_line();
    line.push('\n');
    out.write_all(line.as_bytes())?;
    out.flush()
}

/// Serves requests on one connection until EOF, an I/O error or timeout, an
/// oversize line, or server shutdown.
fn serve_connection(stream: UnixStream, shared: &Shared) -> io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    while !shared.stopping.load(Ordering::SeqCst) {
        let line = match protocol::read_line(&mut reader, protocol::MAX_REQUEST_LINE)? {
            Line::Eof => return Ok(()),
            Line::TooLong => {
                // The rest of the line is unread and cannot be resynchronised
                // cheaply: answer and close.
                let e = RequestError::TooLong {
                    limit: protocol::MAX_REQUEST_LINE,
                };
                send(&mut out, &Reply::error(e))?;
                return Ok(());
            }
            Line::Data(l) => l,
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match protocol::parse_request(&line) {
            Ok(req) => execute(req, shared.target.as_ref(), &mut out)?,
            Err(e) => send(&mut out, &Reply::error(e))?,
        }
    }
    Ok(())
}

/// Runs one parsed request against the target and writes its reply lines.
fn execute(req: Request, target: &dyn ControlTarget, out: &mut UnixStream) -> io::Result<()> {
    match req {
        Request::Status => send(out, &Reply::Status(target.status())),
        Request::ResetStats => {
            target.reset_stats();
            send(out, &Reply::Done)
        }
        Request::SetMode { mode } => match target.set_mode(&mode) {
            Ok(()) => send(out, &Reply::ModeSet(mode)),
            Err(e) => send(out, &Reply::error(e)),
        },
        Request::Flush => {
            let mut throttle = ProgressThrottle::default();
            let mut write_error: Option<io::Error> = None;
            let result = target.flush_all(&mut |done, total| {
                if write_error.is_none() && throttle.should_report(done, total) {
                    if let Err(e) = send(out, &Reply::Progress { done, total }) {
                        // The client is gone; the flush itself carries on.
                        write_error = Some(e);
                    }
                }
            });
            if let Some(e) = write_error {
                return Err(e);
            }
            match result {
                Ok(()) => send(out, &Reply::Done),
                Err(e) => send(out, &Reply::error(format!("flush failed: {e}"))),
            }
        }
    }
}

/// Limits progress lines to one per whole percent (plus the first and the
/// last), so a flush of millions of blocks sends about a hundred lines.
#[derive(Debug, Default)]
struct ProgressThrottle {
    last_pct: Option<u64>,
}

impl ProgressThrottle {
    fn should_report(&mut self, done: u64, total: u64) -> bool {
        let pct = if total == 0 || done >= total {
            100
        } else {
            // done < total here, so done * 100 / total < 100; u128 avoids overflow.
            (u128::from(done) * 100 / u128::from(total)) as u64
        };
        if self.last_pct.is_some_and(|p| p >= pct) {
            return false;
        }
        self.last_pct = Some(pct);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::{ControlError, ProgressThrottle, ServerLimits};
    use std::time::Duration;

    #[test]
    fn limits_must_be_non_zero() {
        assert!(ServerLimits::default().validate().is_ok());
        let cases = [
            (
                ServerLimits {
                    max_connections: 0,
                    ..Default::default()
                },
                "max_connections",
            ),
            (
                ServerLimits {
                    idle_timeout: Duration::ZERO,
                    ..Default::default()
                },
                "idle_timeout",
            ),
            (
                ServerLimits {
                    write_timeout: Duration::ZERO,
                    ..Default::default()
                },
                "write_timeout",
            ),
        ];
        for (limits, name) in cases {
            match limits.validate() {
                Err(ControlError::InvalidLimit { field }) => assert_eq!(field, name),
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn throttle_reports_each_percent_once() {
        let mut t = ProgressThrottle::default();
        let reported: Vec<u64> = (0..=10_000u64)
            .filter(|&d| t.should_report(d, 10_000))
            .collect();
        assert_eq!(reported.len(), 101);
        assert_eq!(reported.first(), Some(&0));
        assert_eq!(reported.last(), Some(&10_000));
    }

    #[test]
    fn throttle_small_and_empty_flushes() {
        let mut t = ProgressThrottle::default();
        let reported: Vec<u64> = (0..=3u64).filter(|&d| t.should_report(d, 3)).collect();
        assert_eq!(reported, vec![0, 1, 2, 3]);
        let mut t = ProgressThrottle::default();
        assert!(t.should_report(0, 0));
        assert!(!t.should_report(0, 0));
    }
}
