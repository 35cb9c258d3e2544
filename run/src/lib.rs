//! `veil-control run`: runs one command in a fresh, registered sandbox and removes the sandbox
//! when the command exits (also on SIGINT/SIGTERM/SIGHUP/SIGQUIT, which are forwarded to it).
//!
//! Steps: a directory for the run's files (see [`state`]); a cgroup `<parent>/<id>` under the
//! cgroup2 mount (see [`cgroup`]); a uid of its own from `run.uid_range` (see [`uids`]) unless
//! `--user` names one; with `--netns` a named netns linked to the host by a veth (see
//! [`netns`]) and a DNS forwarder on the host end (see [`dns`]); the REST registration
//! (`PUT /api/sandbox/{id}`, answered once veil-agent enforces it), which returns the
//! placeholders and veil's CA; a CA bundle (system roots + veil's CA); then the command, with an
//! environment built from an allowlist (see [`env`]), in its own pid, mount and IPC namespaces
//! (see [`child`]). With `--host` the sandbox is declared (no cgroup) and bound through
//! veil-agent's local socket instead (see [`host`]).
//!
//! Exit status: the command's own, 128+N when a signal N killed it, 125 when veil-control run
//! itself failed, 126 when the command could not be executed, 127 when it was not found.
#![deny(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod cgroup;
pub mod child;
pub mod dns;
pub mod env;
pub mod host;
pub mod netns;
mod reap;
pub mod state;
pub mod uids;

use std::collections::BTreeMap;
use std::ffi::{CString, OsString};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use cgroup::SandboxCgroup;
use child::Entry;
use env::EnvArg;
use netns::{Ipv4Range, SandboxNet};
use state::RunDir;
use veil_client::{Client, ClientError};

/// What the exit status of `veil-control run` means; shown under its `--help`.
pub const EXIT_STATUS: &str = "\
Exit status:
  N      the command's own exit status
  128+N  the command was killed by signal N (also when run was interrupted during set-up)
  125    veil-control run itself failed (set-up, registration); one line on stderr says why
  126    the command could not be executed
  127    the command was not found
  2      bad command line or config; nothing was set up";

/// Exit status when veil-control run itself fails.
pub const EXIT_SETUP: u8 = 125;
/// HOME of a sandbox with a uid of its own: in its private /tmp, so it goes with the sandbox.
pub const SANDBOX_HOME: &str = "/tmp/home";
/// The world-writable directories every sandbox gets a fresh, private tmpfs on (those that
/// exist on the host): what it leaves there goes with it, and it sees nothing of the host's
/// or another sandbox's.
pub const PRIVATE_DIRS: [&str; 4] = ["/tmp", "/var/tmp", "/dev/shm", "/run/lock"];
/// Control's config file `run` reads `[run]` from when `--config` is not given (if it exists).
pub const DEFAULT_CONFIG: &str = "/etc/veil/control.toml";
/// Options of `veil-control run` (the API URL and key come with the other client commands).
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Mount a secret as an environment variable holding its placeholder (repeatable).
    #[arg(long = "secret", value_name = "ENV=SECRET_NAME", value_parser = parse_mount)]
    pub secrets: Vec<(String, String)>,
    /// Pass a variable to the command: NAME=VALUE, or NAME alone for this shell's value
    /// (repeatable). Nothing else of the caller's environment is passed but PATH, LANG,
    /// LC_*, TERM and TZ.
    #[arg(long = "env", value_name = "NAME[=VALUE]", value_parser = env::parse_env)]
    pub env: Vec<EnvArg>,
    /// Give the sandbox its own network namespace (with DNS through a forwarder on the host).
    #[arg(long)]
    pub netns: bool,
    /// Run as this user (name or uid) instead of a uid of the sandbox's own from
    /// `run.uid_range` (sandboxes of the same user are not isolated from each other by uid).
    #[arg(long)]
    pub user: Option<String>,
    /// veil-control's TOML config, for `[run]` (default: /etc/veil/control.toml if it exists).
    #[arg(long)]
    pub config: Option<PathBuf>,
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
    /// Seconds to wait for the host-wide network set-up lock (`--netns`) before giving up.
    #[arg(long, env = "VEIL_RUN_LOCK_TIMEOUT", default_value_t = 30)]
    pub lock_timeout: u64,
    /// Declare the sandbox through the API (no cgroup), then bind it through veil-agent's
    /// local socket on this host, as a container runtime's hook does.
    #[arg(long)]
    pub host: bool,
    /// veil-agent's local binding socket (`--host`).
    #[arg(long, env = "VEIL_AGENT_LOCAL_SOCKET", default_value = veil_link::local::DEFAULT_LOCAL_SOCKET)]
    pub local_socket: PathBuf,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

impl RunArgs {
    /// What clap cannot check: an `--env` name that is also a `--secret` ENV.
    pub fn check(&self) -> Result<(), String> {
        env::check_conflicts(&self.env, &self.secrets)
    }

    /// The config file `[run]` is read from: `--config`, else [`DEFAULT_CONFIG`] when it
    /// exists, else none (the defaults).
    pub fn config_file(&self) -> Option<&Path> {
        let default = Path::new(DEFAULT_CONFIG);
        match &self.config {
            Some(p) => Some(p.as_path()),
            None => default.exists().then_some(default),
        }
    }
}

/// Parses `ENV=SECRET_NAME`.
pub fn parse_mount(s: &str) -> Result<(String, String), String> {
    let (env, name) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected ENV=SECRET_NAME"))?;
    veil_api::names::env_name(env)?;
    if env.starts_with("VEIL_") {
        return Err(format!("{env}: VEIL_* variables are reserved for veil"));
    }
    veil_api::names::secret_name(name)?;
    Ok((env.to_owned(), name.to_owned()))
}

/// What `run` takes from veil-control: its `[run]` settings and its host knowledge.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// The uids sandboxes get, one each (`run.uid_range`).
    pub uids: uids::UidRange,
    /// Finds the cgroup2 mount of this mount namespace (control's one implementation).
    pub cgroup2_mount: fn() -> anyhow::Result<PathBuf>,
}

/// Runs `args.command` in a fresh sandbox; returns the exit status to report.
pub async fn run(
    api_url: &str,
    api_key: Zeroizing<String>,
    args: RunArgs,
    settings: Settings,
) -> u8 {
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
    reap::reap_stale(&client, &args.cgroup_parent, settings.cgroup2_mount).await;
    let id = format!("run-{}-{:08x}", std::process::id(), rand::random::<u32>());
    let mut res = Resources::default();
    let prepared = tokio::select! {
        r = setup(&client, &args, &settings, &id, &mut res) => match r {
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

/// How set-up ended.
enum SetUp {
    Ready(tokio::process::Command),
    Failed(anyhow::Error),
    Interrupted(i32),
}

/// A channel of the termination signals veil-control run receives (it no longer dies of them).
fn forward_signals() -> anyhow::Result<mpsc::UnboundedReceiver<i32>> {
    let (tx, rx) = mpsc::unbounded_channel();
    for n in child::FORWARDED {
        let mut stream = signal(SignalKind::from_raw(n)).context("installing signal handlers")?;
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
                // Our own child, not yet reaped: it relays the signal to the command.
                if let (Some(pid), Ok(sig)) = (pid, Signal::try_from(sig)) {
                    let _ = kill(Pid::from_raw(pid), sig);
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
    dir: Option<RunDir>,
    uid: Option<uids::Lease>,
}

impl Resources {
    /// Removes the sandbox: its processes, the registration, the cgroup, the network, files,
    /// and last its uid (free again only now that nothing of the sandbox is left).
    async fn teardown(mut self, client: &Client, id: &str) {
        if let Some(cg) = &self.cgroup {
            cg.kill_all().await;
        }
        if self.registered {
            match client.delete_sandbox(id).await {
                Ok(()) | Err(ClientError::Api { status: 404, .. }) => {}
                Err(e) => eprintln!("veil-control run: unregistering sandbox {id}: {e}"),
            }
        }
        let emptied = match self.cgroup.take() {
            Some(cg) => {
                let empty = !cg.populated();
                cg.remove().await;
                empty
            }
            None => true,
        };
        drop(self.dns.take());
        if let (Some(net), Some(host)) = (self.net.take(), &self.host) {
            net.remove(host).await;
        }
        drop(self.dir.take());
        match self.uid.take() {
            Some(lease) if emptied => lease.release(),
            // Something of the sandbox may still run as it: the next run reaps it first.
            Some(lease) => eprintln!(
                "veil-control run: keeping uid {} taken: sandbox {id} did not empty",
                lease.uid()
            ),
            None => {}
        }
    }
}

/// Who the command runs as.
struct Who {
    uid: u32,
    gid: u32,
    home: PathBuf,
    name: Option<String>,
}

/// Creates the sandbox and prepares the command (not yet started).
async fn setup(
    client: &Client,
    args: &RunArgs,
    settings: &Settings,
    id: &str,
    res: &mut Resources,
) -> anyhow::Result<tokio::process::Command> {
    let named = args.user.as_deref().map(child::resolve_user).transpose()?;
    // Named after the run (id = `run-<pid>-<hex>`) so that the next run can tell the
    // directory of one killed outright from a live one and remove it.
    let dir = RunDir::create(id).context("creating the run's directory")?;
    let dir_path = dir.path().to_path_buf();
    res.dir = Some(dir);

    let cgroup = SandboxCgroup::create(&(settings.cgroup2_mount)()?, &args.cgroup_parent, id)?;
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cgroup.path.join("cgroup.procs"))
        .context("opening the sandbox's cgroup.procs")?;
    let relative = cgroup.relative.clone();
    res.cgroup = Some(cgroup);

    let private_dirs: Vec<&str> = PRIVATE_DIRS
        .into_iter()
        .filter(|d| std::fs::symlink_metadata(d).is_ok_and(|m| m.is_dir()))
        .collect();
    let who = match named {
        Some(user) => Who {
            uid: user.uid,
            gid: user.gid,
            home: user.home,
            name: Some(user.name),
        },
        None => {
            if !private_dirs.contains(&"/tmp") {
                anyhow::bail!(
                    "/tmp is not a directory on this host: no place for the sandbox's HOME"
                );
            }
            let records = state::private_dir(Some(state::UID_RECORDS))?;
            let record = uids::Record {
                owner: std::process::id(),
                sandbox: id.to_owned(),
                cgroup: relative.clone(),
            };
            let lease = uids::claim(&records, settings.uids, &record)?;
            let uid = lease.uid();
            res.uid = Some(lease);
            Who {
                uid,
                gid: uid,
                home: PathBuf::from(SANDBOX_HOME),
                name: None,
            }
        }
    };

    let mut netns_path = None;
    let mut netns_file = None;
    let mut resolv = None;
    if args.netns {
        let host = netns::host_handle()?;
        res.host = Some(host.clone());
        let name = format!("veil-{id}");
        let host_if = format!("vrun-{}", std::process::id());
        let timeout = Duration::from_secs(args.lock_timeout);
        let net = SandboxNet::create(&name, &host_if, args.address_range, &host, timeout).await?;
        netns_path = Some(net.path().to_string_lossy().into_owned());
        let ns_file = net.file().try_clone().context("duplicating the netns fd")?;
        // Owned by `res` from here, so a failure below still removes it.
        res.net = Some(net);

        let host_resolv = std::fs::read_to_string(&args.resolv_conf)
            .with_context(|| format!("reading {}", args.resolv_conf.display()))?;
        let forwarder = dns::Forwarder::start(&ns_file, dns::nameservers(&host_resolv))
            .with_context(|| {
                format!(
                    "starting the DNS forwarder on {}:53 in the sandbox's netns",
                    dns::FORWARDER_ADDR
                )
            })?;
        res.dns = Some(forwarder);
        netns_file = Some(ns_file);
        let path = dir_path.join("resolv.conf");
        write_file(&path, &dns::sandbox_resolv_conf(&host_resolv), 0o644)?;
        resolv = Some(child::c_path(&path)?);
    }

    let secrets = args
        .secrets
        .iter()
        .map(|(env, name)| BTreeMap::from([(env.clone(), name.clone())]))
        .collect();
    // Nothing is forwarded out of a netns of its own: veil opens its connections from the host.
    let egress = netns_path.as_ref().map(|_| "host".to_owned());
    let (placeholders, ca) = if args.host {
        let body = veil_api::PutSandbox {
            cgroup: None,
            keep: None,
            egress,
            netns: None,
            secrets: Some(secrets),
            host: None,
        };
        res.registered = true;
        client
            .put_sandbox(id, &body)
            .await
            .context("declaring the sandbox")?;
        let bound = host::bind(&args.local_socket, id, &relative, netns_path.as_deref())
            .await
            .context("binding the sandbox")?;
        (bound.env, Some(bound.ca_pem))
    } else {
        let body = veil_api::PutSandbox {
            cgroup: Some(relative),
            keep: None,
            egress,
            netns: netns_path,
            secrets: Some(secrets),
            host: None,
        };
        // From here on the registration may exist even if the call fails (a timeout keeps it).
        res.registered = true;
        let answer = client
            .put_sandbox(id, &body)
            .await
            .context("registering the sandbox")?;
        (answer.env, answer.ca_certificate)
    };

    let bundle = dir_path.join("ca-bundle.pem");
    write_file(
        &bundle,
        &ca_bundle(&args.system_roots, ca.as_deref()),
        0o644,
    )?;

    let private_dirs = private_dirs
        .into_iter()
        .map(|d| CString::new(d).context("a private directory"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let make_home = match who.name {
        None => Some(child::c_path(&who.home)?),
        Some(_) => None,
    };
    let entry = Entry {
        cgroup_procs: procs,
        netns: netns_file,
        private_dirs,
        resolv_conf: resolv,
        make_home,
        uid: who.uid,
        gid: who.gid,
    };
    Ok(command(args, &who, &placeholders, &bundle, entry))
}

fn command(
    args: &RunArgs,
    who: &Who,
    placeholders: &BTreeMap<String, String>,
    bundle: &Path,
    entry: Entry,
) -> tokio::process::Command {
    let (program, rest) = match args.command.split_first() {
        Some((p, r)) => (p.clone(), r.to_vec()),
        None => (OsString::from("true"), Vec::new()),
    };
    let person = env::Person {
        home: &who.home,
        name: who.name.as_deref(),
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(rest).env_clear().envs(env::child_env(
        std::env::vars_os(),
        &args.env,
        placeholders,
        bundle,
        person,
    ));
    child::prepare(&mut cmd, entry);
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
