//! veil as a whole: a `veil-control` and a `veil-agent` joined by the local agent socket, with
//! sandboxes registered through the REST API as a runner would (`PUT /api/sandbox/{id}`).

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Mutex;

use serde_json::{Value, json};

use crate::agent::{Agent, AgentOptions, AgentSandbox};
use crate::cgroup::PARENT;
use crate::control::{Api, Control, Reply};
use crate::env::cgroup2_mount;
use crate::owner;

/// Organization the fixture's admin key belongs to.
pub const ORG: &str = "veil-e2e";
/// The secret [`Veil::register_redirected`] mounts.
pub const REDIRECT_ONLY_SECRET: &str = "veil-e2e-redirect-only";
/// The only host that secret allows; no test serves it.
pub const REDIRECT_ONLY_HOST: &str = "redirect-only.invalid";

/// A linked control + agent. Dropping it kills the agent (its pins are removed), then control.
#[must_use = "dropping it stops veil at once"]
#[derive(Debug)]
pub struct Veil {
    // Field order is drop order: the agent goes first, while control still answers.
    agent: Agent,
    control: Control,
    key: String,
    rt: tokio::runtime::Runtime,
    registered: Mutex<BTreeMap<String, AgentSandbox>>,
    _dir: tempfile::TempDir,
}

/// veil-control's config for the fixture: an agent is required; test cgroups are allowed;
/// `top_level` adds top-level keys.
fn control_config(agent_socket: &Path, top_level: &str) -> String {
    format!(
        "agent_socket = {sock:?}\n{top_level}\n[agent]\nrequired = true\n[sandbox]\ncgroup_parents = [{PARENT:?}]\n",
        sock = agent_socket.display().to_string()
    )
}

impl Veil {
    /// Starts control and agent, then registers `sandboxes` redirected into veil (each PUT
    /// answers once live; see [`Veil::register_redirected`]).
    pub fn start(sandboxes: &[AgentSandbox]) -> Veil {
        Veil::start_with(AgentOptions::default(), sandboxes)
    }

    /// As [`Veil::start`], with agent options (the control socket is set here).
    pub fn start_with(options: AgentOptions, sandboxes: &[AgentSandbox]) -> Veil {
        Veil::start_with_control(options, "", sandboxes)
    }

    /// As [`Veil::start_with`], with top-level keys added to control's config.
    pub fn start_with_control(
        options: AgentOptions,
        control_top_level: &str,
        sandboxes: &[AgentSandbox],
    ) -> Veil {
        Veil::start_inner(options, control_top_level, None, sandboxes)
    }

    /// A veil-control replica on a shared store (its `[store]` in `control_top_level`) holding
    /// the key files of the data dir `keys_from`, with its own agent.
    pub fn start_replica(
        options: AgentOptions,
        control_top_level: &str,
        keys_from: &std::path::Path,
    ) -> Veil {
        Veil::start_inner(options, control_top_level, Some(keys_from), &[])
    }

    fn start_inner(
        mut options: AgentOptions,
        control_top_level: &str,
        keys_from: Option<&std::path::Path>,
        sandboxes: &[AgentSandbox],
    ) -> Veil {
        crate::stale::init();
        let dir = tempfile::Builder::new()
            .prefix(&owner::tempdir_prefix())
            .tempdir()
            .unwrap_or_else(|e| panic!("creating veil temp dir: {e}"));
        let socket = dir.path().join("agent.sock");
        let config = control_config(&socket, control_top_level);
        let control = match keys_from {
            None => Control::start_with_config(&config),
            Some(from) => crate::replicas::start_replica(&config, from),
        };
        options.control_socket = Some(socket);
        let agent = Agent::start_with(options);
        // READY=1 means the agent re-adopted what it had; registrations need it linked too.
        let linked = crate::cmd::wait_until(std::time::Duration::from_secs(20), || {
            agent.log().contains("in sync with control")
        });
        assert!(
            linked,
            "agent never synced with control:\n{}",
            agent.log_tail(30)
        );
        let key = control.apikey(ORG, &["admin"]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("test runtime: {e}"));
        let veil = Veil {
            agent,
            control,
            key,
            rt,
            registered: Mutex::new(BTreeMap::new()),
            _dir: dir,
        };
        for sb in sandboxes {
            veil.register_redirected(sb);
        }
        veil
    }

    /// The agent process.
    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// The control process.
    pub fn control(&self) -> &Control {
        &self.control
    }

    /// The control process, for restarts.
    pub fn control_mut(&mut self) -> &mut Control {
        &mut self.control
    }

    /// The admin API key of [`ORG`].
    pub fn key(&self) -> &str {
        &self.key
    }

    /// An HTTP helper for control's API.
    pub fn api(&self) -> Api {
        self.control.api()
    }

    /// Runs a future (an [`Api`] call) to completion.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// `PUT /api/sandbox/{id}` with these `(ENV, secret name)` mounts; the raw reply. The
    /// `egress` is the sandbox's, else what a runner would choose for its netns
    /// ([`crate::egress::for_netns`]).
    pub fn try_register(&self, sb: &AgentSandbox, secrets: &[(&str, &str)]) -> Reply {
        let cgroup = sb
            .cgroup
            .strip_prefix(cgroup2_mount())
            .unwrap_or(&sb.cgroup)
            .to_string_lossy()
            .into_owned();
        let secrets: Vec<Value> = secrets
            .iter()
            .map(|(env, name)| json!({ *env: name }))
            .collect();
        let body = json!({ "cgroup": cgroup, "netns": sb.netns, "secrets": secrets, "egress": sb.egress() });
        let api = self.api();
        let path = format!("/sandbox/{}", sb.id);
        let reply = self.block_on(api.put(&path, &self.key, body));
        if reply.0 == 200 {
            self.registered_map().insert(sb.id.clone(), sb.clone());
        }
        reply
    }

    /// Registers a sandbox without secrets; panics unless control answers 200. Returns the answer.
    pub fn register(&self, sb: &AgentSandbox) -> Value {
        self.register_with(sb, &[])
    }

    /// Registers a sandbox with `(ENV, secret name)` mounts; panics unless 200.
    pub fn register_with(&self, sb: &AgentSandbox, secrets: &[(&str, &str)]) -> Value {
        let (status, body) = self.try_register(sb, secrets);
        assert_eq!(
            status,
            200,
            "registering sandbox {}: {body}\nagent log tail:\n{}",
            sb.id,
            self.agent.log_tail(30)
        );
        body
    }

    /// Registers a sandbox redirected into veil whatever its egress: it mounts a secret (created
    /// on first use, [`REDIRECT_ONLY_SECRET`]) that only [`REDIRECT_ONLY_HOST`] allows, so its
    /// connections pass through untouched as a secretless sandbox's would — but through the
    /// agent. (A sandbox without secrets that leaves from its own netns goes direct.) Panics
    /// unless 200; returns the answer.
    pub fn register_redirected(&self, sb: &AgentSandbox) -> Value {
        let created = self.block_on(self.api().post(
            "/secret",
            &self.key,
            json!({
                "name": REDIRECT_ONLY_SECRET,
                "value": format!("redirect-only-{}", crate::control::random_token(24)),
                "hosts": [REDIRECT_ONLY_HOST],
            }),
        ));
        assert!(
            created.0 == 201 || created.0 == 409,
            "creating the redirect-only secret: status {}",
            created.0
        );
        self.register_with(sb, &[("VEIL_REDIRECT_ONLY", REDIRECT_ONLY_SECRET)])
    }

    /// `DELETE /api/sandbox/{id}`; panics unless control answers 204.
    pub fn unregister(&self, id: &str) {
        let api = self.api();
        let (status, body) = self.block_on(api.delete(&format!("/sandbox/{id}"), &self.key));
        assert_eq!(status, 204, "unregistering sandbox {id}: {body}");
        self.registered_map().remove(id);
    }

    /// Brings the registered set to `sandboxes` through the API (deletes first, then puts
    /// redirected).
    pub fn reconfigure(&self, sandboxes: &[AgentSandbox]) {
        let current: Vec<String> = self.registered_map().keys().cloned().collect();
        for id in current {
            if !sandboxes.iter().any(|s| s.id == id) {
                self.unregister(&id);
            }
        }
        for sb in sandboxes {
            if self.registered_map().get(&sb.id) != Some(sb) {
                self.register_redirected(sb);
            }
        }
    }

    fn registered_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, AgentSandbox>> {
        self.registered.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The agent's log.
    pub fn log(&self) -> String {
        self.agent.log()
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.agent.pid()
    }
}
