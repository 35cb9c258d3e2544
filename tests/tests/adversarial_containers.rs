//! Containers as the attacker runs them: an unbound container under a guarded runtime parent,
//! an image that sets a mounted variable or names someone else's sandbox. Every container is a
//! real runc container (the harness's netns, cgroups, rootfs); nothing here prints a value.

use std::net::IpAddr;
use std::time::Duration;

use serde_json::json;
use veil_link::LocalResponse;
use veil_tests::bind::{Container, declare, get, local};
use veil_tests::cmd::wait_until;
use veil_tests::oci_world::{
    ALLOWED, Place, VAR, echo_world, env_values, last_bearer_is, report_script, rundir_left,
};
use veil_tests::runc::{RuncContainer, RuncSpec};
use veil_tests::sandbox_map_has;
use veil_tests::{
    AgentOptions, Cgroup, HttpHello, NetNs, Veil, World, output_within, require_root,
};

const RUN: Duration = Duration::from_secs(60);

/// A container in `parent` whose netns links to the world, fetching `url` with curl.
fn fetcher(parent: &Cgroup, ns: &NetNs, url: &str) -> RuncContainer {
    RuncContainer::new(
        "guard",
        &RuncSpec {
            args: vec![
                "curl".into(),
                "-sS".into(),
                "--max-time".into(),
                "10".into(),
                url.into(),
            ],
            cgroup: format!("{}/ctr", parent.relative()),
            netns: Some(ns.path().to_owned()),
            ..RuncSpec::default()
        },
    )
}

#[test]
fn an_unbound_container_under_a_guarded_parent_cannot_connect_also_while_the_agent_is_down() {
    require_root();
    let world = World::new();
    let ns = NetNs::new("guarded");
    let link = world.link_sandbox(&ns);
    let up = HttpHello::start(world.netns(), IpAddr::V4(link.world_v4()), "up");
    let url = format!("http://{}/", up.addr());
    let parent = Cgroup::new("guard-parent");

    // Without the guard the route is real: the container reaches the upstream directly.
    let out = fetcher(&parent, &ns, &url).run_plain(RUN);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("up"),
        "without a guard the container must connect: status {} stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    let veil = Veil::start_with(
        AgentOptions {
            extra_config: format!(
                "guard_cgroups = [{:?}]",
                parent.relative().trim_start_matches('/')
            ),
            ..AgentOptions::default()
        },
        &[],
    );
    let out = fetcher(&parent, &ns, &url).run_plain(RUN);
    assert!(
        !out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("up"),
        "an unbound container under a guarded parent connected: status {} stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    // The guard is pinned: it holds while the agent is down.
    veil.agent().kill();
    let out = fetcher(&parent, &ns, &url).run_plain(RUN);
    assert!(
        !out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("up"),
        "with the agent down, an unbound container under a guarded parent connected: status {}",
        out.status
    );

    // Taken out of the config, the parent is released at the next start.
    let config = veil.agent().config_path();
    let text = std::fs::read_to_string(&config).expect("agent config");
    let without: String = text
        .lines()
        .filter(|l| !l.starts_with("guard_cgroups"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&config, without).expect("agent config");
    veil.agent().respawn();
    let out = fetcher(&parent, &ns, &url).run_plain(RUN);
    assert!(
        out.status.success(),
        "a parent removed from guard_cgroups is still guarded: status {}",
        out.status
    );
}

#[test]
fn the_agent_refuses_to_guard_the_host_or_its_own_cgroup() {
    require_root();
    for bad in ["system.slice", "/docker", "..", "init.scope"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("agent.toml");
        // Its own pin dir and control socket: an agent that wrongly started touches nothing
        // shared, and the harness removes the pin dir.
        let pin_dir = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/veil-test-{}-guardcfg",
            std::process::id()
        ));
        let _pins = RemoveDir(pin_dir.clone());
        std::fs::write(
            &config,
            format!(
                "[agent]\nbpf_pin_dir = {pin_dir:?}\ncontrol_socket = {:?}\nguard_cgroups = [\"docker\", {bad:?}]\n",
                dir.path().join("control.sock")
            ),
        )
        .expect("config");
        // Bounded: an agent that accepted the entry would run until killed.
        let out = output_within(
            std::process::Command::new(veil_tests::bin_path("veil-agent"))
                .arg("--config")
                .arg(&config)
                .arg("--state-dir")
                .arg(dir.path().join("state")),
            Duration::from_secs(20),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(
            stderr.contains("agent.guard_cgroups") && stderr.contains(&format!("{bad:?}")),
            "{bad}: the error must name the entry: {stderr}"
        );
    }
}

/// Removes a directory tree on drop.
struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A container that was refused: not created, its workload never ran, nothing left.
fn assert_refused_cleanly(
    out: &std::process::Output,
    c: &RuncContainer,
    place: &Place,
    cgroup_dir: &std::path::Path,
    what: &str,
) {
    assert!(!out.status.success(), "{what}: the container was created");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("veil-oci-hook:") || stderr.contains("veil"),
        "{what}: no clear error line: {stderr}"
    );
    assert!(place.read("ran").is_none(), "{what}: the workload ran");
    assert!(!c.exists(), "{what}: runc still lists the container");
    assert!(
        !cgroup_dir.exists(),
        "{what}: the container's cgroup is left"
    );
    assert!(!rundir_left(c.id()), "{what}: the runtime dir is left");
}

#[test]
fn refused_binds_abort_the_container_before_its_workload_and_leave_nothing() {
    let (w, key) = echo_world("refused containers CA");
    let veil = &w.veil;
    let socket = veil.agent().local_socket();
    let script = "touch /out/ran";

    // A sandbox nobody declared.
    let place = Place::new("undeclared");
    let c = RuncContainer::new(
        "undeclared",
        &place.spec(script, &["VEIL_SANDBOX_ID=nobody-declared".into()]),
    );
    let out = c.run_veil(&socket, RUN);
    assert_refused_cleanly(&out, &c, &place, &place.cgroup_dir(), "undeclared");

    // Someone else's bound sandbox: refused, and the victim stays bound (the refused
    // container's poststop must not unbind it).
    declare(veil, "victim", &[(VAR, "upstream-key")], false);
    let victim = Container::new(&w, "victim", &[ALLOWED]);
    assert!(matches!(
        local(veil, &victim.bind_request("victim")),
        LocalResponse::Bound(_)
    ));
    let place = Place::new("thief");
    let c = RuncContainer::new(
        "thief",
        &place.spec(script, &["VEIL_SANDBOX_ID=victim".into()]),
    );
    let out = c.run_veil(&socket, RUN);
    assert_refused_cleanly(&out, &c, &place, &place.cgroup_dir(), "bound elsewhere");
    assert_eq!(
        get(veil, "victim").1["bound"],
        json!(true),
        "a refused container unbound someone else's sandbox"
    );
    assert!(
        sandbox_map_has(victim.sandbox.cgroup().id()),
        "the victim lost its redirect"
    );

    // A cgroup outside the parents control allows.
    declare(veil, "outside", &[(VAR, "upstream-key")], false);
    let place = Place::new("outside");
    let outside = OutsideCgroup::new();
    let mut spec = place.spec(script, &["VEIL_SANDBOX_ID=outside".into()]);
    spec.cgroup = format!("{}/ctr", outside.relative());
    let c = RuncContainer::new("outside", &spec);
    let out = c.run_veil(&socket, RUN);
    assert_refused_cleanly(&out, &c, &place, &outside.dir.join("ctr"), "outside cgroup");
    assert_eq!(get(veil, "outside").1["bound"], json!(false));

    // The agent is down: nothing can bind, so nothing starts.
    declare(veil, "agentless", &[(VAR, "upstream-key")], false);
    veil.agent().kill();
    let place = Place::new("agentless");
    let c = RuncContainer::new(
        "agentless",
        &place.spec(script, &["VEIL_SANDBOX_ID=agentless".into()]),
    );
    let out = c.run_veil(&socket, RUN);
    assert_refused_cleanly(&out, &c, &place, &place.cgroup_dir(), "agent down");
    let _ = key;
}

#[test]
fn an_image_cannot_set_or_override_a_mounted_variable_or_the_ca() {
    let (w, key) = echo_world("image env CA");
    let veil = &w.veil;
    declare(veil, "img", &[(VAR, "upstream-key")], false);
    let place = Place::new("img");
    // What an image's ENV (or `docker run -e`) would put in config.json.
    let env = [
        format!("{VAR}=sk-set-by-the-image"),
        "SSL_CERT_FILE=/evil.pem".to_owned(),
        "VEIL_SANDBOX_ID=img".to_owned(),
        format!("{VAR}=sk-set-twice"),
    ];
    let c = RuncContainer::new("img", &place.spec(&report_script(&w), &env));
    let out = c.run_veil(&veil.agent().local_socket(), RUN);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What every OCI runtime is handed: exactly one entry per name. (runc itself lets the last
    // entry win; a runtime that passes duplicates to execve leaves getenv() the first one.)
    let config = c.config();
    let entries: Vec<&str> = config["process"]["env"]
        .as_array()
        .expect("process.env")
        .iter()
        .filter_map(|e| e.as_str())
        .collect();
    let named = |name: &str| -> Vec<String> {
        entries
            .iter()
            .filter_map(|e| e.strip_prefix(&format!("{name}=")).map(str::to_owned))
            .collect()
    };
    assert_eq!(
        named(VAR),
        vec![key.placeholder.clone()],
        "config.json keeps the image's {VAR} next to the placeholder"
    );
    assert_eq!(
        named("SSL_CERT_FILE"),
        vec!["/etc/veil/ca-bundle.pem".to_owned()]
    );
    let environ = place.read("environ").expect("the workload ran");
    assert_eq!(
        env_values(&environ, VAR),
        vec![key.placeholder.as_str()],
        "the image's {VAR} survived next to (or instead of) the placeholder"
    );
    assert_eq!(
        env_values(&environ, "SSL_CERT_FILE"),
        vec!["/etc/veil/ca-bundle.pem"]
    );
    assert!(
        last_bearer_is(&w, &key.value),
        "the placeholder was not the one sent"
    );
}

#[test]
fn a_container_killed_without_poststop_is_reaped() {
    let (w, _key) = echo_world("reap CA");
    let veil = &w.veil;
    declare(veil, "reaped", &[(VAR, "upstream-key")], false);
    let place = Place::new("reaped");
    let c = RuncContainer::new(
        "reaped",
        &place.spec(
            "touch /out/ran; while :; do sleep 1; done",
            &["VEIL_SANDBOX_ID=reaped".into()],
        ),
    );
    let mut runtime = c.spawn_veil(&veil.agent().local_socket());
    assert!(
        wait_until(Duration::from_secs(30), || place.read("ran").is_some()),
        "the container did not start"
    );
    assert_eq!(get(veil, "reaped").1["bound"], json!(true));
    // The runtime dies with its container, no hook runs; what is left of the cgroup goes.
    let _ = runtime.kill();
    let _ = runtime.wait();
    kill_cgroup(&place.cgroup_dir());
    let gone = wait_until(Duration::from_secs(5), || {
        let (status, body) = get(veil, "reaped");
        status == 404 || body["bound"] == json!(false)
    });
    assert!(
        gone,
        "the sandbox of a vanished container was not reaped within 5 s"
    );
}

/// SIGKILLs every process in `dir` (by pid, all ours: the test's container) and removes it.
fn kill_cgroup(dir: &std::path::Path) {
    let emptied = wait_until(Duration::from_secs(10), || {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|p| p.parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        procs.trim().is_empty()
    });
    assert!(emptied, "the container's processes did not die");
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::remove_dir(dir).is_ok()
            || !dir.exists()),
        "cannot remove {}",
        dir.display()
    );
}

/// A cgroup at the cgroup2 root (outside `veil-test.slice`, which control allows), removed on
/// drop.
struct OutsideCgroup {
    dir: std::path::PathBuf,
}

impl OutsideCgroup {
    fn new() -> OutsideCgroup {
        let dir =
            veil_tests::cgroup2_mount().join(format!("veil-test-{}-outside", std::process::id()));
        std::fs::create_dir_all(&dir).expect("outside cgroup");
        OutsideCgroup { dir }
    }

    fn relative(&self) -> String {
        format!(
            "/{}",
            self.dir
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        )
    }
}

impl Drop for OutsideCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(self.dir.join("ctr"));
        let _ = std::fs::remove_dir(&self.dir);
    }
}
