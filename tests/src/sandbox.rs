//! A sandbox as veil sees one: a cgroup, and usually a network namespace; commands started in it.
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::cgroup::Cgroup;
use crate::cmd::{ProbeOutput, output_within, run_probe};
use crate::env::bin_path;
use crate::netns::NetNs;

/// A cgroup (owned) plus an optional netns (borrowed by path; the [`NetNs`] must outlive it).
#[must_use = "dropping it removes it at once"]
#[derive(Debug)]
pub struct Sandbox {
    cgroup: Cgroup,
    netns: Option<PathBuf>,
    /// A private /etc/hosts bind-mounted (in a fresh mount namespace) for every command.
    hosts: Option<(std::ffi::CString, tempfile::TempDir)>,
}

impl Sandbox {
    /// Creates the sandbox's cgroup; `netns` = `None` means it shares the host netns.
    pub fn new(tag: &str, netns: Option<&NetNs>) -> Sandbox {
        Sandbox {
            cgroup: Cgroup::new(tag),
            netns: netns.map(|n| n.path().to_path_buf()),
            hosts: None,
        }
    }

    /// Gives every command of this sandbox a private `/etc/hosts` with these entries (plus
    /// localhost), so real clients resolve test names without any DNS server.
    pub fn with_hosts(mut self, entries: &[(&str, std::net::IpAddr)]) -> Sandbox {
        let dir = tempfile::Builder::new()
            .prefix(&crate::owner::tempdir_prefix())
            .tempdir()
            .unwrap_or_else(|e| panic!("hosts temp dir: {e}"));
        let path = dir.path().join("hosts");
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost ip6-localhost\n");
        for (name, ip) in entries {
            text.push_str(&format!("{ip} {name}\n"));
        }
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing hosts file: {e}"));
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .unwrap_or_else(|e| panic!("hosts path: {e}"));
        self.hosts = Some((c_path, dir));
        self
    }

    /// The sandbox's cgroup.
    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    /// The sandbox's netns path, if it has its own.
    pub fn netns_path(&self) -> Option<&Path> {
        self.netns.as_deref()
    }

    /// The agent config entry for this sandbox.
    pub fn agent_entry(&self, id: &str) -> crate::agent::AgentSandbox {
        crate::agent::AgentSandbox {
            id: id.to_owned(),
            cgroup: self.cgroup.path().to_path_buf(),
            netns: self.netns.clone(),
            egress: None,
        }
    }

    /// A command that runs `program` inside the sandbox: it joins the cgroup and the netns
    /// between fork and exec, before it can create any socket.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let procs_path = self.cgroup.path().join("cgroup.procs");
        let procs = OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", procs_path.display()));
        let mut cmd = self.outside_command(program);
        // SAFETY: the hook only calls write(2) on an fd opened before fork, which is
        // async-signal-safe, and builds an io::Error from errno without allocating.
        unsafe {
            cmd.pre_exec(move || join_cgroup(&procs));
        }
        cmd
    }

    /// A command that runs `program` in the sandbox's netns but NOT in its cgroup.
    pub fn outside_command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        if let Some(path) = &self.netns {
            let ns = File::open(path)
                .unwrap_or_else(|e| panic!("opening netns {}: {e}", path.display()));
            // SAFETY: setns(2) on an fd opened before fork is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || enter_netns(&ns));
            }
        }
        if let Some((hosts, _)) = &self.hosts {
            let hosts = hosts.clone();
            // SAFETY: unshare(2) and mount(2) with C strings prepared before fork are
            // async-signal-safe.
            unsafe {
                cmd.pre_exec(move || private_hosts(&hosts));
            }
        }
        cmd
    }

    /// Runs `args[0] args[1..]` in the sandbox, waiting at most `timeout`; on timeout the
    /// process is killed by pid and the test fails. Returns the output; the exit is not judged.
    pub fn run(&self, args: &[&str], timeout: Duration) -> Output {
        let (program, rest) = args
            .split_first()
            .unwrap_or_else(|| panic!("Sandbox::run needs a program"));
        output_within(self.command(program).args(rest), timeout)
    }

    /// Like [`Sandbox::run`], in the netns but outside the cgroup.
    pub fn run_outside(&self, args: &[&str], timeout: Duration) -> Output {
        let (program, rest) = args
            .split_first()
            .unwrap_or_else(|| panic!("Sandbox::run_outside needs a program"));
        output_within(self.outside_command(program).args(rest), timeout)
    }

    /// Runs `veil-probe args…` in the sandbox (timeout 60 s) and parses its JSON line.
    pub fn probe(&self, args: &[&str]) -> ProbeOutput {
        run_probe(
            self.command(bin_path("veil-probe")).args(args),
            Duration::from_secs(60),
        )
    }

    /// Runs `veil-probe args…` in the sandbox's netns, outside its cgroup.
    pub fn probe_outside(&self, args: &[&str]) -> ProbeOutput {
        run_probe(
            self.outside_command(bin_path("veil-probe")).args(args),
            Duration::from_secs(60),
        )
    }
}

/// Runs `veil-probe args…` in the test's own (host) netns and cgroup.
pub fn probe_host(args: &[&str]) -> ProbeOutput {
    run_probe(
        Command::new(bin_path("veil-probe")).args(args),
        Duration::from_secs(60),
    )
}

/// Runs in the forked child: moves it into the cgroup whose `cgroup.procs` is open as `procs`.
fn join_cgroup(procs: &File) -> std::io::Result<()> {
    // SAFETY: write(2) of a 1-byte static buffer to an open fd.
    let n = unsafe { libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) };
    if n == 1 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Runs in the forked child: moves it into the network namespace open as `ns`.
fn enter_netns(ns: &File) -> std::io::Result<()> {
    // SAFETY: setns(2) with an fd we own.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Runs in the forked child: a private mount namespace with `hosts` bound over /etc/hosts.
fn private_hosts(hosts: &std::ffi::CStr) -> std::io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: plain syscalls with NUL-terminated static or pre-built strings.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        check(libc::mount(
            hosts.as_ptr(),
            c"/etc/hosts".as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ))
    }
}
