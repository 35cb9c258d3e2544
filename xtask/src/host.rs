//! `cargo xtask run`: veil on its embedded defaults in the foreground, with a demo upstream and a
//! demo sandbox network.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Debian packages `cargo xtask run` and its walk-through use (the demo upstream is Python with
/// an openssl-made certificate; the sandboxed client is curl).
pub const RUN_PACKAGES: &[&str] = &[
    "ca-certificates",
    "curl",
    "iproute2",
    "nftables",
    "openssl",
    "python3",
    "python3-venv",
];

/// The demo upstream's name, network namespace and addresses (RFC 2544 benchmarking space; the
/// last /30 of 198.19.0.0/16, far from what tests and `veil-control run` pick first).
const DEMO_HOST: &str = "api.example.test";
const DEMO_NETNS: &str = "veil-xtask-run-demo";
const DEMO_HOST_IF: &str = "veil-demo0";
const DEMO_HOST_IP: &str = "198.19.255.253";
const DEMO_IP: &str = "198.19.255.254";
/// Its own pin dir, so the try-out never touches an installed agent's pins.
const PIN_DIR: &str = "/sys/fs/bpf/veil-xtask-run";
/// Beside, not inside, the checkout: a Unix socket path must stay under 108 bytes.
const RUN_DIR: &str = "/run/veil-xtask-run";
const API: &str = "127.0.0.1:3900";
const CONTROL_METRICS: &str = "127.0.0.1:9464";
const AGENT_METRICS: &str = "127.0.0.1:9465";
const DEMO_UPSTREAM_PY: &str = include_str!("../dist/demo-upstream.py");

/// The signal that asked `run` to stop (0 = none yet).
static STOP: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(sig: libc::c_int) {
    STOP.store(sig, Ordering::Relaxed);
}

/// Children killed (by PID) and reaped when dropped: nothing outlives `run` on an error path.
struct Children(Vec<(&'static str, Child)>);

impl Children {
    /// SIGTERMs every child still running, waits up to `grace`, then SIGKILLs what is left.
    fn stop(&mut self, grace: Duration) -> Vec<(&'static str, ExitStatus)> {
        for (_, child) in &mut self.0 {
            if matches!(child.try_wait(), Ok(None)) {
                // SAFETY: kill(2) of our own child, not yet reaped (try_wait said it runs).
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + grace;
        let mut done = Vec::new();
        for (name, mut child) in self.0.drain(..) {
            let status = loop {
                match child.try_wait() {
                    Ok(Some(status)) => break Some(status),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    _ => {
                        eprintln!("xtask: {name} did not stop in {grace:?}; killing it");
                        let _ = child.kill();
                        break child.wait().ok();
                    }
                }
            };
            if let Some(status) = status {
                done.push((name, status));
            }
        }
        done
    }

    /// The first child that exited on its own, if any.
    fn exited(&mut self) -> Option<(&'static str, ExitStatus)> {
        self.0
            .iter_mut()
            .find_map(|(name, c)| c.try_wait().ok().flatten().map(|s| (*name, s)))
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            self.stop(Duration::from_secs(5));
        }
    }
}

/// The demo upstream's network namespace (a veth to the host); removed on drop.
struct DemoNet;

impl DemoNet {
    fn create() -> Result<DemoNet> {
        remove_demo_net();
        ip(&["netns", "add", DEMO_NETNS])?;
        let net = DemoNet;
        ip(&[
            "link",
            "add",
            DEMO_HOST_IF,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            DEMO_NETNS,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{DEMO_HOST_IP}/30"),
            "dev",
            DEMO_HOST_IF,
        ])?;
        ip(&["link", "set", DEMO_HOST_IF, "up"])?;
        ip(&[
            "-n",
            DEMO_NETNS,
            "addr",
            "add",
            &format!("{DEMO_IP}/30"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", DEMO_NETNS, "link", "set", "eth0", "up"])?;
        ip(&["-n", DEMO_NETNS, "link", "set", "lo", "up"])?;
        Ok(net)
    }
}

impl Drop for DemoNet {
    fn drop(&mut self) {
        remove_demo_net();
    }
}

/// Removes the demo namespace (its veth pair goes with it), also one a killed run left.
fn remove_demo_net() {
    if Path::new("/run/netns").join(DEMO_NETNS).exists() {
        let _ = ip(&["netns", "del", DEMO_NETNS]);
    }
    if Path::new("/sys/class/net").join(DEMO_HOST_IF).exists() {
        let _ = ip(&["link", "del", DEMO_HOST_IF]);
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `program args`, failing with its stderr.
fn checked(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A demo CA and a certificate for [`DEMO_HOST`] signed by it (made once, kept in `dir`).
fn demo_certificates(dir: &Path) -> Result<()> {
    if dir.join("leaf.pem").exists() && dir.join("ca.pem").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let p = |name: &str| dir.join(name).display().to_string();
    let ext = p("leaf.ext");
    std::fs::write(
        &ext,
        format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=DNS:{DEMO_HOST}\n"
        ),
    )?;
    let (ca_key, ca_pem) = (p("ca.key"), p("ca.pem"));
    let (leaf_key, leaf_csr, leaf_pem) = (p("leaf.key"), p("leaf.csr"), p("leaf.pem"));
    let subject = format!("/CN={DEMO_HOST}");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    args.extend(["-keyout", &ca_key, "-out", &ca_pem]);
    args.extend(["-days", "3650", "-subj", "/CN=veil demo upstream CA"]);
    checked("openssl", &args)?;
    let mut args = vec!["req", "-new"];
    args.extend(ec);
    args.extend(["-keyout", &leaf_key, "-out", &leaf_csr, "-subj", &subject]);
    checked("openssl", &args)?;
    let mut args = vec![
        "x509", "-req", "-in", &leaf_csr, "-CA", &ca_pem, "-CAkey", &ca_key,
    ];
    args.extend([
        "-CAcreateserial",
        "-days",
        "825",
        "-extfile",
        &ext,
        "-out",
        &leaf_pem,
    ]);
    checked("openssl", &args)
}

/// Whether a TCP connection to `addr` succeeds within a second.
fn reachable(addr: &str) -> bool {
    addr.parse::<SocketAddr>()
        .is_ok_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok())
}

/// The body of `GET http://addr/path` (HTTP/1.0, so the server closes), if it answers.
fn http_get(addr: &str, path: &str) -> Option<String> {
    let addr: SocketAddr = addr.parse().ok()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text)
}

/// Waits up to `timeout` for `ready`, failing early when a child exits.
fn wait_for(
    children: &mut Children,
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if let Some((name, status)) = children.exited() {
            bail!("{name} exited ({status}) while waiting for {what}");
        }
        if STOP.load(Ordering::Relaxed) != 0 {
            bail!("interrupted while waiting for {what}");
        }
        if Instant::now() > deadline {
            bail!("{what} not ready after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Where `cargo build --release` puts the binaries (CARGO_TARGET_DIR moves them).
pub fn release_dir(root: &Path) -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), |d| root.join(d))
        .join("release")
}

/// Starts a demo HTTPS upstream in its own netns, veil-control and veil-agent from
/// `target/release` with fresh state under `target/veil-run/`, prints what to do next, and runs
/// until Ctrl-C (SIGINT) or SIGTERM; then stops the daemons, detaches every sandbox and removes
/// the demo namespace.
pub fn run_foreground(root: &Path) -> Result<()> {
    crate::packages::ensure_packages(RUN_PACKAGES)?;
    let bin = release_dir(root);
    let state = root.join("target/veil-run");
    let control_dir = state.join("control");
    let agent_dir = state.join("agent");
    let demo_dir = state.join("demo");
    for taken in [API, CONTROL_METRICS, AGENT_METRICS] {
        if reachable(taken) {
            bail!(
                "{taken} is in use (an installed veil, or another cargo xtask run?): stop it first"
            );
        }
    }
    // A try-out starts from nothing: no secret or sandbox of an earlier run.
    for dir in [&control_dir, &agent_dir] {
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot remove {}", dir.display()));
            }
            _ => {}
        }
    }
    std::fs::create_dir_all(&state).context("cannot create target/veil-run")?;
    // What an earlier run that was SIGKILLed may have left attached.
    let _ = Command::new(bin.join("veil-agent"))
        .args(["teardown", "--all", "--pin-dir", PIN_DIR, "--state-dir"])
        .arg(&agent_dir)
        .stdout(Stdio::null())
        .status();
    demo_certificates(&demo_dir)?;
    let upstream_py = demo_dir.join("demo-upstream.py");
    std::fs::write(&upstream_py, DEMO_UPSTREAM_PY)?;
    let upstream_log = state.join("demo-upstream.log");
    std::fs::write(&upstream_log, "")?;

    let control_toml = state.join("control.toml");
    std::fs::write(
        &control_toml,
        format!(
            "# Written by cargo xtask run: the embedded defaults, with state in target/veil-run.\n\
             listen = \"{API}\"\ndata_dir = {:?}\nagent_socket = \"{RUN_DIR}/control-agent.sock\"\n\
             metrics_listen = \"{CONTROL_METRICS}\"\n",
            control_dir.display().to_string()
        ),
    )?;
    let agent_toml = state.join("agent.toml");
    std::fs::write(
        &agent_toml,
        format!(
            "# Written by cargo xtask run: the embedded defaults, with state in target/veil-run\n\
             # and the demo upstream's CA trusted.\n[agent]\n\
             control_socket = \"{RUN_DIR}/control-agent.sock\"\nstate_dir = {:?}\n\
             bpf_pin_dir = \"{PIN_DIR}\"\nmetrics_listen = \"{AGENT_METRICS}\"\n\
             upstream_ca = [{:?}]\n",
            agent_dir.display().to_string(),
            demo_dir.join("ca.pem").display().to_string()
        ),
    )?;

    // Two keys, each with only what its use needs: the shell's (VEIL_API_KEY, for
    // `veil-control run`) can register sandboxes but not read, create or change secrets; the
    // one that manages secrets stays in a file and is named only where a command needs it.
    let apikey = |permission: &str| -> Result<String> {
        let out = Command::new(bin.join("veil-control"))
            .args([
                "apikey",
                "create",
                "--org",
                "demo",
                "--permission",
                permission,
            ])
            .arg("--data-dir")
            .arg(&control_dir)
            .stderr(Stdio::inherit())
            .output()
            .context("cannot run veil-control apikey create")?;
        if !out.status.success() {
            bail!("veil-control apikey create failed ({})", out.status);
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let run_key = apikey("write:sandboxes")?;
    let secrets_key = apikey("manage:secrets")?;
    let secrets_key_file = state.join("secrets.key");
    write_private(&secrets_key_file, &format!("{secrets_key}\n"))?;
    let env_file = state.join("env");
    write_private(
        &env_file,
        &format!(
            "# Written by cargo xtask run: `. target/veil-run/env` points the CLI and SDKs at it.\n\
             # VEIL_API_KEY may only register sandboxes (write:sandboxes), what `veil-control run`\n\
             # needs; the key that manages secrets is in target/veil-run/secrets.key.\n\
             export VEIL_API_URL=http://{API}/api\nexport VEIL_API_KEY={run_key}\n\
             export DAYTONA_API_URL=http://{API}/api\n\
             export PATH={}:\"$PATH\"\n",
            shell_quote(&bin.display().to_string())
        ),
    )?;

    // From here on a signal stops everything in order instead of killing this process first.
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_stop_signal as *const () as libc::sighandler_t) };
    }
    let net = DemoNet::create()?;
    let mut children = Children(Vec::new());
    children.0.push((
        "demo upstream",
        spawn(
            Command::new("ip")
                .args(["netns", "exec", DEMO_NETNS, "python3", "-u"])
                .arg(&upstream_py)
                .arg(demo_dir.join("leaf.pem"))
                .arg(demo_dir.join("leaf.key"))
                .arg("443")
                .arg(&upstream_log)
                .stdin(Stdio::null()),
        )?,
    ));
    let demo_addr = format!("{DEMO_IP}:443");
    wait_for(
        &mut children,
        "the demo upstream",
        Duration::from_secs(20),
        || reachable(&demo_addr),
    )?;
    children.0.push((
        "veil-control",
        spawn(
            Command::new(bin.join("veil-control"))
                .arg("serve")
                .arg("--config")
                .arg(&control_toml)
                .stdin(Stdio::null()),
        )?,
    ));
    wait_for(
        &mut children,
        "veil-control",
        Duration::from_secs(30),
        || reachable(API),
    )?;
    children.0.push((
        "veil-agent",
        spawn(
            Command::new(bin.join("veil-agent"))
                .arg("--config")
                .arg(&agent_toml)
                .stdin(Stdio::null()),
        )?,
    ));
    wait_for(
        &mut children,
        "veil-agent's link to veil-control",
        Duration::from_secs(30),
        || {
            http_get(CONTROL_METRICS, "/metrics")
                .is_some_and(|t| t.lines().any(|l| l == "veil_control_agent_connected 1"))
        },
    )?;
    println!(
        "\n\
         veil is running; Ctrl-C here stops it and removes everything it attached.\n\
         \n  REST API        http://{API}/api   (org `demo`: a write:sandboxes key in target/veil-run/env,\
         \n                  a manage:secrets key in target/veil-run/secrets.key)\
         \n  metrics         http://{CONTROL_METRICS}/metrics (veil-control), http://{AGENT_METRICS}/metrics (veil-agent)\
         \n  demo upstream   https://{DEMO_HOST} at {DEMO_IP}:443 (netns {DEMO_NETNS}); it prints what it receives\
         \n                  here and in target/veil-run/demo-upstream.log; veil-agent trusts its CA\n\
         \nNext, in another terminal, as root, in {}:\
         \n  . target/veil-run/env\
         \n  curl -sS -X POST \"$VEIL_API_URL/secret\" -H \"Authorization: Bearer $(cat target/veil-run/secrets.key)\" \\\
         \n    -H 'Content-Type: application/json' \\\
         \n    -d '{{\"name\": \"demo\", \"value\": \"sk-demo-123\", \"hosts\": [\"{DEMO_HOST}\"]}}'\
         \n  veil-control run --secret DEMO_KEY=demo -- sh -c \\\
         \n    'echo \"sandbox sees DEMO_KEY=$DEMO_KEY\"; curl -sS --resolve {DEMO_HOST}:443:{DEMO_IP} -H \"x-api-key: $DEMO_KEY\" https://{DEMO_HOST}/hello'\
         \n  (the README's walk-through goes on from there)\n",
        root.display()
    );

    let reason = loop {
        let sig = STOP.load(Ordering::Relaxed);
        if sig != 0 {
            break format!("signal {sig}");
        }
        if let Some((name, status)) = children.exited() {
            break format!("{name} exited ({status})");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("xtask: stopping ({reason})");
    // The agent first (it drains its connections), then control, then the upstream.
    children.0.reverse();
    let stopped = children.stop(Duration::from_secs(15));
    // A stopped agent leaves its sandboxes pinned (fail closed); the try-out removes them.
    let teardown = Command::new(bin.join("veil-agent"))
        .args(["teardown", "--all", "--pin-dir", PIN_DIR, "--state-dir"])
        .arg(&agent_dir)
        .status()
        .context("cannot run veil-agent teardown")?;
    drop(net);
    // Empty once control removed its socket; left alone if anything else is in it.
    let _ = std::fs::remove_dir(RUN_DIR);
    for (name, status) in stopped {
        println!("{name}: {status}");
    }
    println!("teardown: {teardown}; demo namespace removed");
    Ok(())
}

/// Writes `text` to a new file only its owner may read (0600 from the start: it holds a key).
fn write_private(path: &Path, text: &str) -> Result<()> {
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// `s` single-quoted for sh.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn spawn(cmd: &mut Command) -> Result<Child> {
    cmd.spawn()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))
}
