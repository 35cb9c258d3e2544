//! The servers the benchmarks run against, each in the world netns and stopped by PID on drop:
//! the upstream (Debian nginx answering fixed bodies over TLS), and the proxies veil is
//! compared with: nginx terminating TLS with `proxy_set_header`, and mitmproxy in reverse mode
//! with a one-line addon. Plus what the suite reads about a process tree (CPU, RSS).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use veil_tests::{NetNs, TestCa};

/// The name every client asks for (mapped to the upstream's address in the sandbox).
pub const HOST: &str = "bench.test";
/// The upstream's port.
pub const UPSTREAM_PORT: u16 = 8443;
/// Path of the 64 KiB body on the upstream.
pub const BIG_PATH: &str = "/64k";
/// Size of that body.
pub const BIG_LEN: usize = 64 * 1024;

/// A server process started through `nsenter` (which execs it, so the PID is the server's).
#[derive(Debug)]
pub struct Server {
    child: Child,
    name: &'static str,
    _dir: tempfile::TempDir,
}

impl Server {
    /// The server's PID (nginx: the master; its workers are its children).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_listening(&mut self, ns: &NetNs, port: u16, timeout: Duration) -> Result<()> {
        let up = veil_tests::cmd::wait_until(timeout, || {
            ns.tcp_listeners().iter().any(|a| a.port() == port)
        });
        if !up {
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "{} exited before listening on port {port}: {status}",
                    self.name
                );
            }
            bail!(
                "{} did not listen on port {port} within {timeout:?}",
                self.name
            );
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) of our own unreaped child; nginx's master stops its workers on
            // SIGTERM, mitmdump exits on it.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nsenter(ns: &NetNs) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", ns.path().display()));
    cmd
}

fn spawn_nginx(ns: &NetNs, dir: tempfile::TempDir, name: &'static str) -> Result<Server> {
    let child = nsenter(ns)
        .args(["nginx", "-p"])
        .arg(dir.path())
        .arg("-c")
        .arg(dir.path().join("nginx.conf"))
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start nginx (apt-get install nginx)")?;
    Ok(Server {
        child,
        name,
        _dir: dir,
    })
}

/// The upstream: nginx with one worker answering `ok\n` on `/` and 64 KiB on [`BIG_PATH`],
/// over TLS (h1 and h2) on `ip`:[`UPSTREAM_PORT`], with a certificate for [`HOST`] and `ip`.
pub fn upstream(ns: &NetNs, ip: IpAddr, ca: &TestCa) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let (cert, key) = ca.issue_pem(&[HOST, &ip.to_string()]);
    std::fs::write(dir.path().join("cert.pem"), cert)?;
    std::fs::write(dir.path().join("key.pem"), key)?;
    std::fs::create_dir(dir.path().join("www"))?;
    std::fs::write(
        dir.path()
            .join("www")
            .join(BIG_PATH.trim_start_matches('/')),
        vec![b'x'; BIG_LEN],
    )?;
    let d = dir.path().display();
    let conf = format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         worker_rlimit_nofile 65536;\n\
         events {{ worker_connections 16384; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 10000000;\n\
           default_type application/octet-stream;\n\
           server {{\n    listen {ip}:{UPSTREAM_PORT} ssl http2;\n\
             ssl_protocols TLSv1.2 TLSv1.3;\n    ssl_certificate {d}/cert.pem;\n    ssl_certificate_key {d}/key.pem;\n\
             location = {BIG_PATH} {{ root {d}/www; }}\n\
             location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n"
    );
    std::fs::write(dir.path().join("nginx.conf"), conf)?;
    let mut s = spawn_nginx(ns, dir, "upstream nginx")?;
    s.wait_listening(ns, UPSTREAM_PORT, Duration::from_secs(10))?;
    Ok(s)
}

/// nginx as the TLS-terminating reverse proxy: listens on `ip`:`port` (h1 and h2), sets
/// `x-api-key: value` with `proxy_set_header`, and reaches the upstream over verified TLS with
/// a keep-alive pool of `keepalive` connections; `workers` worker processes.
pub fn nginx_proxy(
    ns: &NetNs,
    ip: IpAddr,
    port: u16,
    ca: &TestCa,
    value: &str,
    keepalive: u32,
    workers: u32,
) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let (cert, key) = ca.issue_pem(&[HOST]);
    std::fs::write(dir.path().join("cert.pem"), cert)?;
    std::fs::write(dir.path().join("key.pem"), key)?;
    std::fs::copy(ca.pem_path(), dir.path().join("ca.pem"))?;
    let d = dir.path().display();
    let conf = format!(
        "worker_processes {workers};\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         worker_rlimit_nofile 65536;\n\
         events {{ worker_connections 16384; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 10000000;\n\
           upstream up {{ server {ip}:{UPSTREAM_PORT}; keepalive {keepalive}; keepalive_requests 10000000; }}\n\
           server {{\n    listen {ip}:{port} ssl http2;\n\
             ssl_protocols TLSv1.2 TLSv1.3;\n    ssl_certificate {d}/cert.pem;\n    ssl_certificate_key {d}/key.pem;\n\
             location / {{\n\
               proxy_pass https://up;\n\
               proxy_http_version 1.1;\n\
               proxy_set_header Connection \"\";\n\
               proxy_set_header Host $host;\n\
               proxy_set_header x-api-key \"{value}\";\n\
               proxy_ssl_server_name on;\n      proxy_ssl_name {HOST};\n\
               proxy_ssl_verify on;\n      proxy_ssl_trusted_certificate {d}/ca.pem;\n\
               proxy_ssl_session_reuse on;\n\
             }}\n  }}\n}}\n"
    );
    std::fs::write(dir.path().join("nginx.conf"), conf)?;
    let mut s = spawn_nginx(ns, dir, "nginx proxy")?;
    s.wait_listening(ns, port, Duration::from_secs(10))?;
    Ok(s)
}

/// The addon: the same replacement veil makes (placeholder → value in `x-api-key`).
fn mitm_addon(placeholder: &str, value: &str) -> String {
    format!(
        "class Substitute:\n\
         \x20   def request(self, flow):\n\
         \x20       if flow.request.headers.get(\"x-api-key\") == {placeholder:?}:\n\
         \x20           flow.request.headers[\"x-api-key\"] = {value:?}\n\
         \n\
         addons = [Substitute()]\n"
    )
}

/// mitmproxy (`mitmdump`) in reverse mode to the upstream on `ip`:`port`, with an addon
/// replacing the placeholder; it verifies the upstream against the test CA.
pub fn mitmproxy(
    ns: &NetNs,
    mitmdump: &Path,
    ip: IpAddr,
    port: u16,
    ca: &TestCa,
    placeholder: &str,
    value: &str,
) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("addon.py"), mitm_addon(placeholder, value))?;
    std::fs::copy(ca.pem_path(), dir.path().join("ca.pem"))?;
    let child = nsenter(ns)
        .arg(mitmdump)
        .arg("--mode")
        .arg(format!("reverse:https://{ip}:{UPSTREAM_PORT}"))
        .args([
            "--listen-host",
            &ip.to_string(),
            "--listen-port",
            &port.to_string(),
        ])
        .arg("-s")
        .arg(dir.path().join("addon.py"))
        .arg("--set")
        .arg(format!("confdir={}", dir.path().join("conf").display()))
        .arg("--set")
        .arg(format!(
            "ssl_verify_upstream_trusted_ca={}",
            dir.path().join("ca.pem").display()
        ))
        .args(["--set", "termlog_verbosity=error", "--set", "flow_detail=0"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("start {}", mitmdump.display()))?;
    let mut s = Server {
        child,
        name: "mitmdump",
        _dir: dir,
    };
    s.wait_listening(ns, port, Duration::from_secs(60))?;
    Ok(s)
}

/// `pid` and all its descendants (from /proc's parent links).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let after = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
            if let Some(ppid) = after.split_whitespace().nth(1).and_then(|x| x.parse().ok()) {
                parents.push((p, ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

/// User + system CPU seconds of `pid` and its descendants.
pub fn tree_cpu_seconds(pid: u32) -> f64 {
    process_tree(pid)
        .into_iter()
        .map(crate::host::process_cpu_seconds)
        .sum()
}

/// Resident memory of `pid` and its descendants, in KiB (VmRSS).
pub fn tree_rss_kib(pid: u32) -> u64 {
    process_tree(pid).into_iter().map(rss_kib).sum()
}

/// VmRSS of one process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Open file descriptors of one process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |rd| rd.count())
}

/// The mitmdump found next to the release build (`target/mitmproxy-venv`), if any.
pub fn default_mitmdump() -> PathBuf {
    PathBuf::from("target/mitmproxy-venv/bin/mitmdump")
}
