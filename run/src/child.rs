//! The sandboxed command's process tree, made between fork and exec — the only module of `run`
//! with `unsafe` code.
//!
//! ```text
//! veil-control run ── relay (host pid ns) ── init (pid 1 of a new pid ns) ── command (pid 2)
//! ```
//! The relay is the child std spawns (its `pre_exec` hook runs [`Entry::enter`]): it joins the
//! sandbox cgroup (before anything makes a socket), enters the sandbox netns, makes a private
//! mount and IPC namespace (fresh tmpfs on /tmp, /var/tmp, /dev/shm, /run/lock, the sandbox's
//! resolv.conf bound over /etc/resolv.conf, its HOME), and clones init into a new pid
//! namespace. Init mounts that namespace's own /proc (`hidepid=2`: the command sees only its
//! own uid's processes) and clones the command, which drops to the sandbox's uid, sets
//! no_new_privs and returns to std, which execs it.
//!
//! Why three processes: a process cannot move itself into a new pid namespace (only its
//! children are born there), and pid 1 ignores every signal it has no handler for, so the
//! command must not be pid 1 or SIGINT/SIGTERM from the caller would not stop a shell. Relay and
//! init forward SIGINT/SIGTERM/SIGHUP/SIGQUIT down, reap, and exit with the command's status
//! (128+N when signal N killed it). When init exits the kernel kills whatever is left in the
//! pid namespace; when the last process leaves, the mount namespace and its tmpfs go with it.
//!
//! Relay and init are forks of a multithreaded process that never exec: they make only raw
//! system calls on data prepared before the fork (no allocation, no locks; `clone` is the raw
//! syscall so glibc's fork handlers never run), are not dumpable (so their memory, a copy of
//! veil-control run's, cannot be read), and close every inherited descriptor but stdio.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The signals veil-control run forwards to the command.
pub const FORWARDED: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// The user the command runs as, when the caller names one (`--user`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: PathBuf,
}

/// Errors resolving the user.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// No such user.
    #[error("no user {0:?} on this host")]
    Unknown(String),
    /// The user database could not be read.
    #[error("looking up user {0:?}: {1}")]
    Lookup(String, nix::Error),
}

/// Resolves a user name or numeric uid.
pub fn resolve_user(spec: &str) -> Result<Identity, UserError> {
    let found = match spec.parse::<u32>() {
        Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)),
        Err(_) => nix::unistd::User::from_name(spec),
    }
    .map_err(|e| UserError::Lookup(spec.to_owned(), e))?
    .ok_or_else(|| UserError::Unknown(spec.to_owned()))?;
    Ok(Identity {
        name: found.name,
        uid: found.uid.as_raw(),
        gid: found.gid.as_raw(),
        home: found.dir,
    })
}

/// What the child does between fork and exec; everything is prepared before the fork.
#[derive(Debug)]
pub struct Entry {
    /// `cgroup.procs` of the sandbox cgroup, open for writing.
    pub cgroup_procs: File,
    /// The sandbox netns, when it has its own.
    pub netns: Option<File>,
    /// Directories that get a fresh tmpfs (mode 1777) in the sandbox's mount namespace.
    pub private_dirs: Vec<CString>,
    /// A resolv.conf to bind over /etc/resolv.conf.
    pub resolv_conf: Option<CString>,
    /// A directory to create (0700, owned by the command's uid) after the tmpfs mounts.
    pub make_home: Option<CString>,
    /// Who to become.
    pub uid: u32,
    /// Primary (and only) group.
    pub gid: u32,
}

/// A path as a C string (for the system calls in the child).
pub fn c_path(path: &Path) -> Result<CString, std::ffi::NulError> {
    CString::new(OsStr::as_bytes(path.as_os_str()))
}

/// Makes `cmd` run `entry` in its child before exec.
pub fn prepare(cmd: &mut tokio::process::Command, entry: Entry) {
    // SAFETY: `Entry::enter` makes only async-signal-safe system calls on data prepared here,
    // and its forks never return into Rust code other than std's exec path.
    unsafe {
        cmd.pre_exec(move || entry.enter());
    }
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The shell's convention for a wait(2) status: the exit code, or 128 + the killing signal.
fn status_code(status: libc::c_int) -> libc::c_int {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        125
    }
}

impl Entry {
    /// Runs in the forked child: returns (in the command's process) once it may exec.
    fn enter(&self) -> std::io::Result<()> {
        // SAFETY (whole block): plain system calls on fds we own, on sigset_t values on our
        // stack and on NUL-terminated strings built before the fork; no allocation, no locks.
        // The two `clone`s are the raw syscall without CLONE_VM: each child gets a copy of
        // this address space and continues on its own copy of the stack, as after fork(2).
        unsafe {
            // Signals first: from here on they queue, to be forwarded by relay and init
            // (and none runs a handler inherited from veil-control run).
            let mut wait_set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut wait_set);
            for sig in FORWARDED.into_iter().chain([libc::SIGCHLD]) {
                libc::sigaddset(&mut wait_set, sig);
            }
            let mut old_mask: libc::sigset_t = std::mem::zeroed();
            check(libc::sigprocmask(libc::SIG_BLOCK, &wait_set, &mut old_mask))?;
            let mut default: libc::sigaction = std::mem::zeroed();
            default.sa_sigaction = libc::SIG_DFL;
            for sig in FORWARDED.into_iter().chain([libc::SIGCHLD]) {
                check(libc::sigaction(sig, &default, std::ptr::null_mut()))?;
            }

            // The cgroup before anything else: every socket of the command is the sandbox's.
            let n = libc::write(self.cgroup_procs.as_raw_fd(), b"0".as_ptr().cast(), 1);
            if n != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(ns) = &self.netns {
                check(libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET))?;
            }
            self.make_mounts()?;
            // Relay and init hold a copy of veil-control run's memory: nobody may read it.
            check(libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0))?;

            let init = clone(libc::CLONE_NEWPID)?;
            if init != 0 {
                forward_until_exit(init, &wait_set, false);
            }
            // pid 1 of the new pid namespace, in the new mount namespace: its own /proc.
            check(libc::mount(
                c"proc".as_ptr(),
                c"/proc".as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c"hidepid=2".as_ptr().cast(),
            ))?;
            let command = clone(0)?;
            if command != 0 {
                forward_until_exit(command, &wait_set, true);
            }

            // The command (pid 2): drop privileges, then std execs it.
            let groups = [self.gid];
            check(libc::setgroups(1, groups.as_ptr()))?;
            check(libc::setgid(self.gid))?;
            check(libc::setuid(self.uid))?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            check(libc::sigprocmask(
                libc::SIG_SETMASK,
                &old_mask,
                std::ptr::null_mut(),
            ))?;
        }
        Ok(())
    }

    /// A private mount and IPC namespace with fresh temporary directories, the sandbox's
    /// resolv.conf and its HOME. Runs in the forked child.
    ///
    /// # Safety
    /// Only between fork and exec, as part of [`Entry::enter`].
    unsafe fn make_mounts(&self) -> std::io::Result<()> {
        // SAFETY: system calls on NUL-terminated strings prepared before the fork.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC))?;
            // Private, so nothing below propagates back to the host.
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            for dir in &self.private_dirs {
                check(libc::mount(
                    c"tmpfs".as_ptr(),
                    dir.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    c"mode=1777".as_ptr().cast(),
                ))?;
            }
            if let Some(resolv) = &self.resolv_conf {
                bind(resolv, c"/etc/resolv.conf")?;
            }
            if let Some(home) = &self.make_home {
                check(libc::mkdir(home.as_ptr(), 0o700))?;
                check(libc::chown(home.as_ptr(), self.uid, self.gid))?;
            }
        }
        Ok(())
    }
}

/// # Safety
/// Only between fork and exec.
unsafe fn bind(source: &CStr, target: &CStr) -> std::io::Result<()> {
    // SAFETY: mount(2) on two NUL-terminated strings.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    })
}

/// The raw clone(2) syscall, fork-like (no new stack, SIGCHLD to the parent) plus `flags`:
/// the child's pid in the parent, 0 in the child.
///
/// # Safety
/// Only between fork and exec: the child is a copy of a process whose other threads are gone.
unsafe fn clone(flags: libc::c_int) -> std::io::Result<libc::pid_t> {
    let flags = libc::c_long::from(flags | libc::SIGCHLD);
    // SAFETY: clone with a null stack pointer behaves as fork(2); no glibc state is involved.
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0) };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

/// Relay or init: forwards the signals in `wait_set` to `child` until it exits, then exits
/// with its status. Init (`reap_all`) also reaps every orphan of the pid namespace.
///
/// # Safety
/// Only between fork and exec, in a process that blocked `wait_set`.
unsafe fn forward_until_exit(child: libc::pid_t, wait_set: &libc::sigset_t, reap_all: bool) -> ! {
    // SAFETY: close_range, sigwaitinfo, waitpid, kill and _exit on plain values.
    unsafe {
        // std's exec-error pipe, the netns and cgroup fds, veil-control run's sockets: only
        // the command's process may keep them (until its exec closes them).
        libc::syscall(libc::SYS_close_range, 3, libc::c_uint::MAX, 0);
        let target = if reap_all { -1 } else { child };
        loop {
            let sig = libc::sigwaitinfo(wait_set, std::ptr::null_mut());
            if sig == libc::SIGCHLD {
                loop {
                    let mut status = 0;
                    let pid = libc::waitpid(target, &mut status, libc::WNOHANG);
                    if pid == child {
                        libc::_exit(status_code(status));
                    }
                    if pid <= 0 {
                        break;
                    }
                }
            } else if sig > 0 {
                libc::kill(child, sig);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_users() {
        let root = resolve_user("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(resolve_user("0").unwrap().name, "root");
        assert!(matches!(
            resolve_user("no-such-user-veil"),
            Err(UserError::Unknown(_))
        ));
    }

    #[test]
    fn wait_statuses_follow_the_shell() {
        assert_eq!(status_code(7 << 8), 7);
        assert_eq!(status_code(libc::SIGINT), 130);
    }
}
