//! Named network namespaces (`ip netns`), deleted on drop.
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sched::{CloneFlags, setns};

use crate::cmd::{ip, try_run};
use crate::owner;

pub(crate) const NETNS_DIR: &str = "/run/netns";
pub(crate) const PREFIX: &str = "veil-";

/// A network namespace `veil-<pid>-<n>-<tag>` with `lo` up and IPv6 enabled; deleted on drop.
#[must_use = "dropping it removes it at once"]
#[derive(Debug)]
pub struct NetNs {
    name: String,
    path: PathBuf,
}

impl NetNs {
    /// Creates the namespace (panics with `ip`'s stderr on failure).
    pub fn new(tag: &str) -> NetNs {
        crate::stale::init();
        let name = format!(
            "{PREFIX}{}-{}-{}",
            owner::pid(),
            owner::next_seq(),
            owner::sanitize_tag(tag)
        );
        ip(&["netns", "add", &name]);
        let ns = NetNs {
            path: Path::new(NETNS_DIR).join(&name),
            name,
        };
        ns.run(|| {
            for key in ["all", "default", "lo"] {
                let p = format!("/proc/sys/net/ipv6/conf/{key}/disable_ipv6");
                std::fs::write(&p, "0").unwrap_or_else(|e| panic!("writing 0 to {p}: {e}"));
            }
        });
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, for `setns`, `nsenter --net=` or an agent config.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a fresh thread that entered this namespace (sockets it creates live here).
    ///
    /// A panic in `f` propagates to the caller.
    pub fn run<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> T {
        let path = &self.path;
        std::thread::scope(|s| {
            let handle = s.spawn(move || {
                enter(path);
                f()
            });
            match handle.join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Runs `ip -n <name> args…` and returns stdout; panics with its stderr on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command that runs `program` inside this namespace via `nsenter --net=` (mounts kept,
    /// so the cgroup2 mount stays visible — unlike `ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path.display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// TCP sockets listening in this namespace (from /proc/thread-self/net/tcp{,6}).
    pub fn tcp_listeners(&self) -> Vec<SocketAddr> {
        self.run(current_tcp_listeners)
    }

    /// The namespace's inode number (what `readlink /proc/<pid>/ns/net` shows in brackets).
    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path)
            .unwrap_or_else(|e| panic!("stat {}: {e}", self.path.display()))
            .ino()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = try_run("ip", &["netns", "del", &self.name]) {
            eprintln!("veil-tests: {e}");
        }
    }
}

/// TCP sockets listening in the calling thread's network namespace.
pub fn current_tcp_listeners() -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        let path = format!("/proc/thread-self/net/{file}");
        // A netns without IPv6 has no tcp6 file; that is "no listeners", not an error.
        if let Ok(text) = std::fs::read_to_string(&path) {
            out.extend(parse_proc_net_tcp(&text, v6));
        }
    }
    out
}

/// Listening sockets of a /proc/net/tcp or tcp6 table.
fn parse_proc_net_tcp(text: &str, v6: bool) -> Vec<SocketAddr> {
    const LISTEN: &str = "0A";
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            if state != LISTEN {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            // The kernel prints each 32-bit word of the network-order address as a native u32.
            let words: Option<Vec<[u8; 4]>> = (0..addr.len() / 8)
                .map(|i| {
                    u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16)
                        .ok()
                        .map(u32::to_ne_bytes)
                })
                .collect();
            let bytes: Vec<u8> = words?.concat();
            let ip = match (v6, bytes.len()) {
                (false, 4) => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
                (true, 16) => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
                _ => return None,
            };
            Some(SocketAddr::new(ip, port))
        })
        .collect()
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &Path) {
    let f = File::open(path).unwrap_or_else(|e| panic!("opening netns {}: {e}", path.display()));
    setns(&f, CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("setns into {}: {e}", path.display()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listeners_from_proc_net_tcp() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n\
           1: 0100007F:1F91 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n";
        let expected: Vec<SocketAddr> = vec!["127.0.0.1:8080".parse().unwrap()];
        if cfg!(target_endian = "little") {
            assert_eq!(parse_proc_net_tcp(v4, false), expected);
        }
        let v6 = "  sl  local_address                         remote_address                        st\n\
           0: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 0\n";
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse_proc_net_tcp(v6, true),
                vec!["[::1]:80".parse::<SocketAddr>().unwrap()]
            );
        }
    }
}
