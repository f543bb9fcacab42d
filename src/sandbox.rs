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
}
