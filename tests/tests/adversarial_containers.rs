//! Containers as the attacker runs them: an unbound container under a guarded runtime parent,
//! an image that sets a mounted variable or names someone else's sandbox. Every container is a
//! real runc container (the harness's netns, cgroups, rootfs); nothing here prints a value.

use std::net::IpAddr;
use std::time::Duration;

use veil_tests::runc::{RuncContainer, RuncSpec};
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
