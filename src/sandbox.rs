//! Locking the daemon down once it is set up: socket group, dropping to an
//! unprivileged user/group, and (where built in) a seccomp filter.
//!
//! Order matters and is fixed by the daemon: devices are opened and sockets
//! bound first (they may need privileges), then [`drop_privileges`] runs,
//! then the serving threads start. Names are resolved while parsing the
//! configuration, so a typo fails before anything is opened.

use std::ffi::CString;

/// Sandbox errors. Each names the option involved.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{option}: no such {what} '{name}'")]
    Unknown {
        option: &'static str,
        what: &'static str,
        name: String,
    },
    #[error("{option}: '{name}' contains a NUL byte")]
    Nul { option: &'static str, name: String },
    #[error("--seccomp: '{0}' is not 'on' or 'off'")]
    SeccompValue(String),
    #[error("dropping privileges: {what} failed: {source}")]
    Drop {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("--user: uid {0} has no passwd entry, so its group is unknown; give --group too")]
    NeedGroup(u32),
    #[error("--seccomp: cannot build the filter: {0}")]
    SeccompBuild(String),
    #[error("--seccomp: cannot install the filter: {0}")]
    SeccompInstall(String),
    #[error("dropping privileges: still able to regain uid 0 after switching user")]
    Regained,
}

/// What the daemon was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SandboxConfig {
    /// Install the seccomp filter on the serving threads.
    pub seccomp: bool,
    /// Switch to this user after setup.
    pub uid: Option<u32>,
    /// Switch to this group after setup (default: the user's primary group).
    pub gid: Option<u32>,
    /// Group owner of the sockets.
    pub socket_group: Option<u32>,
}

impl SandboxConfig {
    /// Resolves the command-line values (names or numbers).
    pub fn from_args(
        seccomp: &str,
        user: Option<&str>,
        group: Option<&str>,
        socket_group: Option<&str>,
    ) -> Result<SandboxConfig, SandboxError> {
        let seccomp = match seccomp {
            "on" => true,
            "off" => false,
            other => return Err(SandboxError::SeccompValue(other.to_string())),
        };
        let user = user.map(|u| lookup_user("--user", u)).transpose()?;
        let gid = match group {
            Some(g) => Some(lookup_group("--group", g)?),
            None => match user {
                Some((_, Some(primary))) => Some(primary),
                // Never switch user while keeping root's groups.
                Some((uid, None)) => return Err(SandboxError::NeedGroup(uid)),
                None => None,
            },
        };
        let socket_group = socket_group
            .map(|g| lookup_group("--socket-group", g))
            .transpose()?;
        Ok(SandboxConfig {
            seccomp,
            uid: user.map(|(uid, _)| uid),
            gid,
            socket_group,
        })
    }

    /// The socket mode to use: with `--socket-group` the group gets
    /// read-write access unless `--socket-mode` already gave it some.
    pub fn socket_mode(&self, mode: u32) -> u32 {
        if self.socket_group.is_some() && mode & 0o070 == 0 {
            mode | 0o060
        } else {
            mode
        }
    }
}

fn cstring(option: &'static str, s: &str) -> Result<CString, SandboxError> {
    CString::new(s).map_err(|_| SandboxError::Nul {
        option,
        name: s.to_string(),
    })
}

/// A user name or number -> (uid, primary gid if the user has a passwd
/// entry).
fn lookup_user(option: &'static str, name: &str) -> Result<(u32, Option<u32>), SandboxError> {
    let unknown = || SandboxError::Unknown {
        option,
        what: "user",
        name: name.to_string(),
    };
    let c = cstring(option, name)?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: passwd is plain old data; all-zero is a valid value.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer refers to a live local of the right type and
    // `buf.len()` is the size of `buf`; getpwnam_r writes only into them.
    let rc = unsafe {
        libc::getpwnam_r(
            c.as_ptr(),
            &mut pw,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        )
    };
    if rc == 0 && !out.is_null() {
        return Ok((pw.pw_uid, Some(pw.pw_gid)));
    }
    // A number that is not a name: a bare uid.
    name.parse::<u32>()
        .map(|n| (n, None))
        .map_err(|_| unknown())
}

/// A group name or number -> gid.
fn lookup_group(option: &'static str, name: &str) -> Result<u32, SandboxError> {
    let c = cstring(option, name)?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: group is plain old data; all-zero is a valid value.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: as in lookup_user.
    let rc = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            &mut gr,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        )
    };
    if rc == 0 && !out.is_null() {
        return Ok(gr.gr_gid);
    }
    name.parse::<u32>().map_err(|_| SandboxError::Unknown {
        option,
        what: "group",
        name: name.to_string(),
    })
}

fn check(rc: libc::c_int, what: &'static str) -> Result<(), SandboxError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(SandboxError::Drop {
            what,
            source: std::io::Error::last_os_error(),
        })
    }
}

/// Switches the whole process to `gid`/`uid` (supplementary groups cleared
/// first, group before user, since a non-root user can no longer change its
/// group). glibc applies set*id to every thread. Verifies afterwards that
/// root cannot be regained.
pub fn drop_privileges(uid: Option<u32>, gid: Option<u32>) -> Result<(), SandboxError> {
    if let Some(g) = gid {
        let groups = [g as libc::gid_t];
        // SAFETY: `groups` is a live one-element array and the length matches.
        check(unsafe { libc::setgroups(1, groups.as_ptr()) }, "setgroups")?;
        // SAFETY: setresgid only changes process credentials.
        check(unsafe { libc::setresgid(g, g, g) }, "setresgid")?;
    }
    if let Some(u) = uid {
        // SAFETY: setresuid only changes process credentials.
        check(unsafe { libc::setresuid(u, u, u) }, "setresuid")?;
        // SAFETY: as above; this must fail for a non-root target user.
        if u != 0 && unsafe { libc::setuid(0) } == 0 {
            return Err(SandboxError::Regained);
        }
    }
    if uid.is_some() || gid.is_some() {
        log::info!(
            "dropped privileges: uid {:?} gid {:?}",
            uid.unwrap_or_else(current_uid),
            gid.unwrap_or_else(current_gid)
        );
    }
    Ok(())
}

fn current_uid() -> u32 {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() }
}

fn current_gid() -> u32 {
    // SAFETY: getgid has no preconditions.
    unsafe { libc::getgid() }
}

/// Syscalls the daemon makes once it serves (found by tracing the test
/// suite's daemons, then reviewed): file I/O on already-open devices, the
/// vhost-user and control sockets, epoll/eventfd, threads and memory
/// (including mapping guest memory the front-end sends), signals, time,
/// and removing the socket files at exit. Notably absent: opening files,
/// creating sockets, bind/listen/connect, exec, ptrace, mount, chmod/chown,
/// set*id, kernel keyrings, bpf. `ioctl` stays because block devices are
/// discarded and zeroed with it.
#[cfg(target_arch = "x86_64")]
const ALLOWED: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fstat,
    // A queue checks whether the guest's memory is on hugetlbfs.
    libc::SYS_fstatfs,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ioctl,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_accept4,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sigaltstack,
    libc::SYS_prctl,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_restart_syscall,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rmdir,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // Cache hits are served with io_uring (src/virtio/uring.rs). Its
    // operations bypass this filter, but the daemon only submits reads and
    // writes (plain, vectored and on registered buffers) on the cache
    // device; io_uring_register also runs after set-up, to register guest
    // memory with --pin-guest-memory.
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
];

/// Builds the filter: the syscalls in [`ALLOWED`] pass, every other one
/// fails with EPERM. EPERM rather than killing the process: a path missed
/// by the list then surfaces as an I/O error in the log instead of taking
/// every guest's disk down, and the call is refused all the same.
#[cfg(target_arch = "x86_64")]
fn build_filter() -> Result<seccompiler::BpfProgram, SandboxError> {
    use seccompiler::{SeccompAction, SeccompFilter, TargetArch};
    let rules = ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| SandboxError::SeccompBuild(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SandboxError::SeccompBuild(e.to_string()))
}

/// Installs the filter on every thread of the process (TSYNC), so threads
/// started earlier (I/O pool, engine workers, control server) are covered
/// and threads started later inherit it. Returns false, after a warning,
/// when the kernel has no seccomp filter support.
#[cfg(target_arch = "x86_64")]
pub fn install_seccomp() -> Result<bool, SandboxError> {
    let prog = build_filter()?;
    match seccompiler::apply_filter_all_threads(&prog) {
        Ok(()) => {
            log::info!(
                "seccomp filter installed ({} syscalls allowed)",
                ALLOWED.len()
            );
            Ok(true)
        }
        Err(seccompiler::Error::Seccomp(e))
            if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) =>
        {
            log::warn!("the kernel does not support seccomp filters ({e}); running without");
            Ok(false)
        }
        Err(e) => Err(SandboxError::SeccompInstall(e.to_string())),
    }
}

/// No syscall list for this architecture yet: runs without a filter.
#[cfg(not(target_arch = "x86_64"))]
pub fn install_seccomp() -> Result<bool, SandboxError> {
    log::warn!("no seccomp filter for this architecture; running without");
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_resolve() {
        let c = SandboxConfig::from_args("on", Some("root"), None, Some("0")).unwrap();
        assert_eq!(
            c,
            SandboxConfig {
                seccomp: true,
                uid: Some(0),
                gid: Some(0),
                socket_group: Some(0),
            }
        );
        let c = SandboxConfig::from_args("off", Some("4321"), Some("77"), None).unwrap();
        assert_eq!((c.seccomp, c.uid, c.gid), (false, Some(4321), Some(77)));
        // A bare uid without --group would keep root's group: refused.
        let e = SandboxConfig::from_args("off", Some("4321"), None, None).unwrap_err();
        assert!(matches!(e, SandboxError::NeedGroup(4321)), "{e}");
        let e = SandboxConfig::from_args("off", Some("no-such-user-xyz"), None, None).unwrap_err();
        assert!(e.to_string().contains("--user"), "{e}");
        let e = SandboxConfig::from_args("off", None, None, Some("no-such-group-xyz")).unwrap_err();
        assert!(e.to_string().contains("--socket-group"), "{e}");
        let e = SandboxConfig::from_args("maybe", None, None, None).unwrap_err();
        assert!(e.to_string().contains("--seccomp"), "{e}");
        assert!(SandboxConfig::from_args("off", Some("a\0b"), None, None).is_err());
    }

    #[test]
    fn socket_group_opens_group_access_only_when_asked() {
        let none = SandboxConfig::default();
        assert_eq!(none.socket_mode(0o600), 0o600);
        let grp = SandboxConfig {
            socket_group: Some(5),
            ..SandboxConfig::default()
        };
        assert_eq!(grp.socket_mode(0o600), 0o660);
        assert_eq!(grp.socket_mode(0o640), 0o640);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn filter_refuses_what_is_not_listed_and_allows_the_rest() {
        // Installed on one thread only (no TSYNC), so the test process is
        // unaffected.
        let prog = build_filter().unwrap();
        let opened = tempfile::tempfile().unwrap();
        let t = std::thread::spawn(move || {
            seccompiler::apply_filter(&prog).unwrap();
            // Allowed: the filesystem type of an open file (guest memory
            // on hugetlbfs is served in place).
            assert!(crate::device::fs_type(&opened).is_some(), "fstatfs refused");
            // Allowed: pipes made before, read/write, pread on an open file.
            let mut out = Vec::new();
            // SAFETY: socket() takes no pointers.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            out.push(("socket", fd, std::io::Error::last_os_error().raw_os_error()));
            let path = CString::new("/proc/self/status").unwrap();
            // SAFETY: `path` is a valid NUL-terminated string.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) };
            out.push(("open", fd, std::io::Error::last_os_error().raw_os_error()));
            // The raw syscall: glibc's setuid() would broadcast to every
            // thread of the test process.
            // SAFETY: setuid takes no pointers; refused here anyway.
            let rc = unsafe { libc::syscall(libc::SYS_setuid, 0) } as libc::c_int;
            out.push(("setuid", rc, std::io::Error::last_os_error().raw_os_error()));
            // Threads can still be made, and memory allocated.
            let v =
                std::thread::spawn(|| vec![1u8; 1 << 20].iter().map(|b| *b as u32).sum::<u32>())
                    .join()
                    .unwrap();
            (out, v)
        });
        let (refused, sum) = t.join().unwrap();
        assert_eq!(sum, 1 << 20);
        for (what, rc, errno) in refused {
            assert_eq!((what, rc, errno), (what, -1, Some(libc::EPERM)));
        }
        // This thread never had the filter.
        let path = CString::new("/proc/self/status").unwrap();
        // SAFETY: as above.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) };
        assert!(fd >= 0);
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
    }
}
