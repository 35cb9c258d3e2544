//! `veil-control run`: runs one command in a fresh, registered sandbox and removes the sandbox
//! when the command exits (also on SIGINT/SIGTERM/SIGHUP/SIGQUIT, which are forwarded to it).
//!
//! Steps: a cgroup `<parent>/<id>` under the cgroup2 mount; with `--netns` a named netns linked
//! to the host by a veth (see [`netns`]) and a DNS forwarder on the host end (see [`dns`]); the
//! REST registration (`PUT /api/sandbox/{id}`, answered once veil-agent enforces it), which
//! returns the placeholders and veil's CA; a CA bundle (system roots + veil's CA) in a private
//! temp dir; then the command, which joins the cgroup and netns before exec (see [`child`]).
//!
//! Exit status: the command's own, 128+N when a signal N killed it, 125 when veil-control run
//! itself failed, 126 when the command could not be executed, 127 when it was not found.

pub mod child;
pub mod dns;
pub mod netns;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use crate::client::{Client, ClientError};
use crate::hostcheck;
use child::{Entry, Identity};
use netns::{Ipv4Range, SandboxNet};

/// Exit status when veil-control run itself fails.
pub const EXIT_SETUP: u8 = 125;

/// Options of `veil-control run` (the API URL and key come with the other client commands).
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Mount a secret as an environment variable holding its placeholder (repeatable).
    #[arg(long = "secret", value_name = "ENV=SECRET_NAME", value_parser = parse_mount)]
    pub secrets: Vec<(String, String)>,
    /// Give the sandbox its own network namespace (with DNS through a forwarder on the host).
    #[arg(long)]
    pub netns: bool,
    /// User (name or uid) the command runs as.
    #[arg(long, default_value = "nobody")]
    pub user: String,
    /// cgroup under which the sandbox's cgroup is made (relative to the cgroup2 mount; must be
    /// one of control's `sandbox.cgroup_parents`).
    #[arg(long, env = "VEIL_CGROUP_PARENT", default_value = "veil.slice")]
    pub cgroup_parent: String,
    /// IPv4 range the sandbox's /30 link is taken from (`--netns`).
    #[arg(long, env = "VEIL_RUN_ADDRESS_RANGE", default_value = "198.19.0.0/16")]
    pub address_range: Ipv4Range,
    /// The resolv.conf whose nameservers the sandbox's DNS forwarder asks (`--netns`).
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
    /// System CA roots put in the sandbox's CA bundle beside veil's CA.
    #[arg(long, default_value = "/etc/ssl/certs/ca-certificates.crt")]
    pub system_roots: PathBuf,
    /// Seconds the command has to exit after a forwarded signal before everything in the
    /// sandbox is killed.
    #[arg(long, default_value_t = 10)]
    pub stop_timeout: u64,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// Parses `ENV=SECRET_NAME`.
pub fn parse_mount(s: &str) -> Result<(String, String), String> {
    let (env, name) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected ENV=SECRET_NAME"))?;
    crate::validate::env_name(env)?;
    if env.starts_with("VEIL_") {
        return Err(format!("{env}: VEIL_* variables are reserved for veil"));
    }
    crate::validate::secret_name(name)?;
    Ok((env.to_owned(), name.to_owned()))
}

/// Runs `args.command` in a fresh sandbox; returns the exit status to report.
pub async fn run(api_url: &str, api_key: Zeroizing<String>, args: RunArgs) -> u8 {
    let mut signals = match forward_signals() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("veil-control run: {e:#}");
            return EXIT_SETUP;
        }
    };
    let client = match Client::new(api_url, api_key) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("veil-control run: {e}");
            return EXIT_SETUP;
        }
    };
    reap_stale(&client, &args.cgroup_parent).await;
    let id = format!("run-{}-{:08x}", std::process::id(), rand::random::<u32>());
    let mut res = Resources::default();
    let prepared = tokio::select! {
        r = setup(&client, &args, &id, &mut res) => match r {
            Ok(cmd) => SetUp::Ready(cmd),
            Err(e) => SetUp::Failed(e),
        },
        s = signals.recv() => SetUp::Interrupted(s.unwrap_or(libc::SIGTERM)),
    };
    let code = match prepared {
        SetUp::Ready(cmd) => {
            let kill = res
                .cgroup
                .as_ref()
                .map(|c| c.path.join("cgroup.kill"))
                .unwrap_or_default();
            let grace = Duration::from_secs(args.stop_timeout);
            supervise(cmd, &mut signals, kill, grace).await
        }
        SetUp::Failed(e) => {
            eprintln!("veil-control run: {e:#}");
            EXIT_SETUP
        }
        // The sandbox is removed and we exit as if the command had been killed by the signal.
        SetUp::Interrupted(sig) => {
            eprintln!("veil-control run: interrupted during set-up");
            u8::try_from(128 + sig).unwrap_or(EXIT_SETUP)
        }
    };
    res.teardown(&client, &id).await;
    code
}

/// The pid of the `veil-control run` that made `name` (`<prefix><pid>-<hex>`).
fn run_owner(name: &str, prefix: &str) -> Option<u32> {
    let (pid, suffix) = name.strip_prefix(prefix)?.split_once('-')?;
    let ok = !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_hexdigit());
    ok.then(|| pid.parse().ok()).flatten()
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes what runs that were killed outright (SIGKILL, a crash) left behind: their cgroups
/// under `parent` (and what still runs there), registrations, network namespaces (their veth
/// pairs go with them) and temp dirs. Only objects named for a pid that no longer exists are touched.
async fn reap_stale(client: &Client, parent: &str) {
    let Ok(mount) = hostcheck::cgroup2_mount() else {
        return;
    };
    let parent = parent.trim_matches('/');
    let dirs = std::fs::read_dir(mount.join(parent)).into_iter().flatten();
    for entry in dirs.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if run_owner(&name, "run-").is_none_or(pid_alive) {
            continue;
        }
        let cg = SandboxCgroup {
            path: entry.path(),
            relative: format!("{parent}/{name}"),
            created_parent: None,
        };
        cg.kill_all().await;
        match client
            .call(Method::DELETE, &format!("/sandbox/{name}"), &[], None)
            .await
        {
            Ok(_) | Err(ClientError::Api { status: 404, .. }) => {}
            Err(e) => eprintln!("veil-control run: unregistering stale sandbox {name}: {e}"),
        }
        cg.remove().await;
    }
    let tmp = std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten();
    for entry in tmp.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if run_owner(&name, "veil-run-").is_some_and(|pid| !pid_alive(pid)) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let netns = std::fs::read_dir(netns::NETNS_DIR).into_iter().flatten();
    for entry in netns.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if run_owner(&name, "veil-run-").is_some_and(|pid| !pid_alive(pid)) {
            netns::remove_named(&entry.path());
        }
    }
}

/// How set-up ended.
enum SetUp {
    Ready(tokio::process::Command),
    Failed(anyhow::Error),
    Interrupted(i32),
}

/// A channel of the termination signals veil-control run receives (it no longer dies of them).
fn forward_signals() -> anyhow::Result<mpsc::UnboundedReceiver<i32>> {
    let (tx, rx) = mpsc::unbounded_channel();
    for (kind, n) in [
        (SignalKind::interrupt(), libc::SIGINT),
        (SignalKind::terminate(), libc::SIGTERM),
        (SignalKind::hangup(), libc::SIGHUP),
        (SignalKind::quit(), libc::SIGQUIT),
    ] {
        let mut stream = signal(kind).context("installing signal handlers")?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(n).is_err() {
                    return;
                }
            }
        });
    }
    Ok(rx)
}

/// Runs the command to its end, forwarding signals to it by pid; its exit status. When it is
/// still running `grace` after the first signal, everything in the sandbox cgroup is killed
/// (a shell's children do not get a signal sent to the shell alone).
async fn supervise(
    mut cmd: tokio::process::Command,
    signals: &mut mpsc::UnboundedReceiver<i32>,
    cgroup_kill: PathBuf,
    grace: Duration,
) -> u8 {
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("veil-control run: starting the command: {e}");
            return if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
        }
    };
    let pid = child.id().and_then(|p| i32::try_from(p).ok());
    let deadline = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(deadline);
    let mut signalled = false;
    let status = loop {
        tokio::select! {
            st = child.wait() => break st,
            Some(sig) = signals.recv() => {
                if let Some(pid) = pid {
                    // SAFETY: kill(2) of our own child, which we have not reaped yet.
                    unsafe { libc::kill(pid, sig) };
                }
                if !signalled {
                    signalled = true;
                    deadline.as_mut().reset(tokio::time::Instant::now() + grace);
                }
            }
            () = &mut deadline => {
                eprintln!("veil-control run: the command ignored the signal for {grace:?}; killing the sandbox");
                if let Err(e) = std::fs::write(&cgroup_kill, "1") {
                    eprintln!("veil-control run: {}: {e}", cgroup_kill.display());
                }
                deadline.as_mut().reset(tokio::time::Instant::now() + Duration::MAX / 4);
            }
        }
    };
    match status {
        Ok(st) => exit_code(st),
        Err(e) => {
            eprintln!("veil-control run: waiting for the command: {e}");
            EXIT_SETUP
        }
    }
}

/// The shell's convention: the exit code, or 128 + the signal that killed the process.
fn exit_code(st: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => u8::try_from(c & 0xff).unwrap_or(EXIT_SETUP),
        (None, Some(s)) => u8::try_from(128 + (s & 0x7f)).unwrap_or(EXIT_SETUP),
        (None, None) => EXIT_SETUP,
    }
}

/// Everything the sandbox is made of, for teardown.
#[derive(Debug, Default)]
struct Resources {
    cgroup: Option<SandboxCgroup>,
    host: Option<rtnetlink::Handle>,
    net: Option<SandboxNet>,
    dns: Option<dns::Forwarder>,
    registered: bool,
    dir: Option<tempfile::TempDir>,
}

impl Resources {
    /// Removes the sandbox: its processes, the registration, the cgroup, the network, files.
    async fn teardown(mut self, client: &Client, id: &str) {
        if let Some(cg) = &self.cgroup {
            cg.kill_all().await;
        }
        if self.registered {
            match client
                .call(Method::DELETE, &format!("/sandbox/{id}"), &[], None)
                .await
            {
                Ok(_) | Err(ClientError::Api { status: 404, .. }) => {}
                Err(e) => eprintln!("veil-control run: unregistering sandbox {id}: {e}"),
            }
        }
        if let Some(cg) = self.cgroup.take() {
            cg.remove().await;
        }
        drop(self.dns.take());
        if let (Some(net), Some(host)) = (self.net.take(), &self.host) {
            net.remove(host).await;
        }
        drop(self.dir.take());
    }
}

/// Creates the sandbox and prepares the command (not yet started).
async fn setup(
    client: &Client,
    args: &RunArgs,
    id: &str,
    res: &mut Resources,
) -> anyhow::Result<tokio::process::Command> {
    let user = child::resolve_user(&args.user)?;
    // Named after the run (`veil-<id>`, id = `run-<pid>-<hex>`) so that the next run can tell
    // the directory of one killed outright from a live one and remove it.
    let dir = tempfile::Builder::new()
        .prefix(&format!("veil-{id}"))
        .rand_bytes(0)
        .tempdir()
        .context("creating a temp dir")?;
    let dir_path = dir.path().to_path_buf();
    res.dir = Some(dir);

    let cgroup = SandboxCgroup::create(&args.cgroup_parent, id)?;
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cgroup.path.join("cgroup.procs"))
        .context("opening the sandbox's cgroup.procs")?;
    let relative = cgroup.relative.clone();
    res.cgroup = Some(cgroup);

    let mut netns_path = None;
    let mut netns_file = None;
    let mut resolv = None;
    if args.netns {
        let host = netns::host_handle()?;
        res.host = Some(host.clone());
        let name = format!("veil-{id}");
        let host_if = format!("vrun-{}", std::process::id());
        let net = SandboxNet::create(&name, &host_if, args.address_range, &host).await?;
        netns_path = Some(net.path().to_string_lossy().into_owned());
        netns_file = Some(net.file().try_clone().context("duplicating the netns fd")?);
        let host_ip = net.host_ip;
        res.net = Some(net);

        let host_resolv = std::fs::read_to_string(&args.resolv_conf)
            .with_context(|| format!("reading {}", args.resolv_conf.display()))?;
        let forwarder = dns::Forwarder::start(host_ip, dns::nameservers(&host_resolv))
            .await
            .with_context(|| format!("starting the DNS forwarder on {host_ip}:53"))?;
        res.dns = Some(forwarder);
        let path = dir_path.join("resolv.conf");
        write_file(
            &path,
            &dns::sandbox_resolv_conf(&host_resolv, host_ip),
            0o644,
        )?;
        resolv = Some(child::c_path(&path)?);
    }

    let secrets: Vec<Value> = args
        .secrets
        .iter()
        .map(|(env, name)| json!({ env.clone(): name }))
        .collect();
    let mut body = json!({ "cgroup": relative, "secrets": secrets });
    if let Some(n) = &netns_path {
        body["netns"] = json!(n);
        // Nothing is forwarded out of this netns: veil opens its connections from the host.
        body["egress"] = json!("host");
    }
    // From here on the registration may exist even if the call fails (a timeout keeps it).
    res.registered = true;
    let answer = client
        .call(
            Method::PUT,
            &format!("/sandbox/{id}"),
            &[],
            Some(Zeroizing::new(serde_json::to_vec(&body)?)),
        )
        .await
        .context("registering the sandbox")?
        .unwrap_or(Value::Null);
    let placeholders: BTreeMap<String, String> = answer["env"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();

    let bundle = dir_path.join("ca-bundle.pem");
    write_file(
        &bundle,
        &ca_bundle(&args.system_roots, answer["caCertificate"].as_str()),
        0o644,
    )?;
    // The command (unprivileged) reads the bundle; nobody else needs the directory.
    std::fs::set_permissions(&dir_path, std::fs::Permissions::from_mode(0o700))?;
    nix::unistd::chown(
        &dir_path,
        Some(nix::unistd::Uid::from_raw(user.uid)),
        Some(nix::unistd::Gid::from_raw(user.gid)),
    )
    .context("handing the temp dir to the command's user")?;

    Ok(command(
        args,
        &user,
        &placeholders,
        &bundle,
        Entry {
            cgroup_procs: procs,
            netns: netns_file,
            resolv_conf: resolv,
            uid: user.uid,
            gid: user.gid,
        },
    ))
}

fn command(
    args: &RunArgs,
    user: &Identity,
    placeholders: &BTreeMap<String, String>,
    bundle: &Path,
    entry: Entry,
) -> tokio::process::Command {
    let (program, rest) = match args.command.split_first() {
        Some((p, r)) => (p.clone(), r.to_vec()),
        None => (OsString::from("true"), Vec::new()),
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(rest).env_clear().envs(child::child_env(
        std::env::vars_os(),
        placeholders,
        bundle,
        user,
    ));
    // SAFETY: `Entry::enter` only makes async-signal-safe system calls on data prepared here.
    unsafe {
        cmd.pre_exec(move || entry.enter());
    }
    cmd
}

/// System roots (when the file exists) followed by veil's CA.
fn ca_bundle(system_roots: &Path, veil_ca: Option<&str>) -> String {
    let mut out = std::fs::read_to_string(system_roots).unwrap_or_default();
    match veil_ca {
        Some(ca) => {
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str("# veil interception CA\n");
            out.push_str(ca.trim_end());
            out.push('\n');
        }
        None => eprintln!(
            "veil-control run: veil-agent has not reported its CA; intercepted TLS will not verify"
        ),
    }
    out
}

fn write_file(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// The sandbox's cgroup directory.
#[derive(Debug)]
struct SandboxCgroup {
    path: PathBuf,
    relative: String,
    /// The parent, when this run created it (removed again when empty).
    created_parent: Option<PathBuf>,
}

impl SandboxCgroup {
    fn create(parent: &str, id: &str) -> anyhow::Result<SandboxCgroup> {
        let parent = parent.trim_matches('/');
        if parent.is_empty()
            || parent
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
        {
            anyhow::bail!("--cgroup-parent {parent:?} must be a relative path without . or ..");
        }
        let mount = hostcheck::cgroup2_mount()?;
        let parent_path = mount.join(parent);
        let created_parent = (!parent_path.exists()).then(|| parent_path.clone());
        let path = parent_path.join(id);
        // Another process may remove an empty parent between our two steps: retry.
        for attempt in 0.. {
            std::fs::create_dir_all(&parent_path)
                .with_context(|| format!("creating cgroup {}", parent_path.display()))?;
            match std::fs::create_dir(&path) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempt < 10 => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("creating cgroup {}", path.display()));
                }
            }
        }
        Ok(SandboxCgroup {
            path,
            relative: format!("{parent}/{id}"),
            created_parent,
        })
    }

    fn populated(&self) -> bool {
        match std::fs::read_to_string(self.path.join("cgroup.events")) {
            Ok(events) => events.lines().any(|l| l.trim() == "populated 1"),
            Err(_) => false,
        }
    }

    /// Kills whatever the command left running in the cgroup and waits (≤ 5 s) until it is empty.
    async fn kill_all(&self) {
        for _ in 0..100 {
            if !self.populated() {
                return;
            }
            if std::fs::write(self.path.join("cgroup.kill"), "1").is_err() {
                let pids =
                    std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
                for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    // SAFETY: kill(2) of a process in the sandbox cgroup this run made.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "veil-control run: cgroup {} still has processes after 5 s",
            self.path.display()
        );
    }

    async fn remove(self) {
        let mut last = None;
        for _ in 0..100 {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(e) = last {
            eprintln!(
                "veil-control run: removing cgroup {}: {e}",
                self.path.display()
            );
        }
        if let Some(parent) = self.created_parent {
            // Busy when other sandboxes live there: fine.
            let _ = std::fs::remove_dir(parent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_secret_mounts() {
        assert_eq!(
            parse_mount("OPENAI_API_KEY=openai").unwrap(),
            ("OPENAI_API_KEY".to_owned(), "openai".to_owned())
        );
        assert!(parse_mount("NOEQUALS").is_err());
        assert!(parse_mount("VEIL_API_KEY=x").is_err());
        assert!(parse_mount("1BAD=x").is_err());
        assert!(parse_mount("GOOD=").is_err());
    }

    #[test]
    fn finds_the_owner_of_run_objects() {
        assert_eq!(run_owner("run-123-00ab12cd", "run-"), Some(123));
        assert_eq!(run_owner("veil-run-123-00ab12cd", "veil-run-"), Some(123));
        assert_eq!(run_owner("run-123-", "run-"), None);
        assert_eq!(run_owner("run-x-00ab", "run-"), None);
        assert_eq!(run_owner("docker-123-00ab", "run-"), None);
        assert_eq!(run_owner("run-123-zz", "run-"), None);
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(exit_code(std::process::ExitStatus::from_raw(7 << 8)), 7);
        assert_eq!(
            exit_code(std::process::ExitStatus::from_raw(libc::SIGINT)),
            130
        );
    }

    #[test]
    fn bundle_appends_veil_ca_to_the_roots() {
        let dir = tempfile::tempdir().unwrap();
        let roots = dir.path().join("roots.pem");
        std::fs::write(&roots, "ROOTS").unwrap();
        let b = ca_bundle(&roots, Some("VEILCA\n"));
        assert!(b.starts_with("ROOTS\n"));
        assert!(b.ends_with("VEILCA\n"));
        assert_eq!(
            ca_bundle(&dir.path().join("none"), Some("X")),
            "# veil interception CA\nX\n"
        );
    }
}
