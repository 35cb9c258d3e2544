//! The real `veil-agent` driven over veil-link by an in-test control: registration, live
//! acknowledgements, surviving SIGKILL/SIGTERM and control restarts without ever being
//! bypassed, the bind guard, and teardown. Real kernel, namespaces and cgroups; needs root.
//!
//! Sandboxes live in their own netns; the agent reaches upstreams in the "world" netns through
//! the host. A sandbox linked to the world (`link_sandbox`) could reach the upstream directly,
//! which is what makes "refused, not bypassed" observable.
#![allow(clippy::unwrap_used, reason = "tests may unwrap")]

mod common;

use std::time::{Duration, Instant};

use common::fixture::{Linked, NsSandbox, Upstream, connect};
use common::{
    AgentProc, Dirs, FakeControl, attached_program_ids, attached_programs, detach_pinned_link,
    p50_max, sandbox_state,
};
use veil_link::{AgentMsg, ControlMsg, SecretState, SecretValue};
use veil_tests::{ProbeOutput, Sandbox, TcpHello, World, require_root};

fn probe(sb: &Sandbox, addr: &str) -> ProbeOutput {
    sb.probe(&["tcp", "--addr", addr, "--timeout-ms", "3000"])
}

/// Asserts the sandbox reached `hello` through the agent: its socket was redirected to the
/// agent's loopback listener (a direct one has the sandbox's link address), and the agent
/// reached the upstream (from the sandbox's netns or the host's, as its egress says).
fn assert_via_agent(sb: &Sandbox, hello: &TcpHello, _world: &World) {
    let out = probe(sb, &hello.addr().to_string());
    let json = out.expect_ok();
    let local = json["local"].as_str().unwrap();
    let reply = json["reply"].as_str().unwrap();
    assert!(
        local.starts_with("127.0.0.1:") && reply.starts_with("up "),
        "not via the agent: local {local}, reply {reply}"
    );
}

fn snapshot(seq: u64, sandboxes: Vec<veil_link::SandboxState>) -> ControlMsg {
    ControlMsg::Snapshot {
        guarded: Vec::new(),
        seq,
        sandboxes,
        secrets: Vec::new(),
    }
}

#[test]
fn hello_snapshot_attaches_and_redirects_and_delete_detaches() {
    require_root();
    let Upstream { world, hello } = Upstream::start();
    let NsSandbox { ns: _ns, sb } = NsSandbox::new("lk-snap");
    let Linked {
        dirs,
        ctl,
        agent,
        mut conn,
    } = Linked::start();
    let id_before = match &conn.hello {
        AgentMsg::Hello { agent_id, .. } => agent_id.clone(),
        _ => unreachable!(),
    };

    let mut state = sandbox_state("sb-1", &sb);
    state
        .mounts
        .insert("API_KEY".into(), "sec-1".parse().unwrap());
    conn.apply(ControlMsg::Snapshot {
        guarded: Vec::new(),
        seq: 1,
        sandboxes: vec![state],
        secrets: vec![SecretState {
            previous: Vec::new(),
            retired: false,
            id: "sec-1".parse().unwrap(),
            org: "org-1".parse().unwrap(),
            name: "api".into(),
            placeholder: "veil-placeholder-1".into(),
            hosts: vec!["api.example.com".into()],
            value: SecretValue::new("plaintext-never-logged-42".into()),
            revision: 1u64.into(),
            body_substitution: false,
            wrong_host: Default::default(),
        }],
    });
    assert_eq!(attached_programs(sb.cgroup().path()), 9);
    assert_via_agent(&sb, &hello, &world);
    let pinned = dirs.pins.pinned_files();
    assert_eq!(
        pinned.iter().filter(|p| p.starts_with("sandboxes")).count(),
        9,
        "{pinned:?}"
    );
    assert_eq!(
        pinned.iter().filter(|p| p.starts_with("maps")).count(),
        proxy_common::PINNED_MAPS.len()
    );

    // The same snapshot again (a reconnection): nothing attached twice.
    conn.apply(snapshot(2, vec![sandbox_state("sb-1", &sb)]));
    assert_eq!(attached_programs(sb.cgroup().path()), 9);

    conn.apply(ControlMsg::DeleteSandbox {
        seq: 3,
        id: "sb-1".parse().unwrap(),
    });
    assert_eq!(attached_programs(sb.cgroup().path()), 0);
    assert!(
        !dirs
            .pins
            .pinned_files()
            .iter()
            .any(|p| p.starts_with("sandboxes")),
        "{:?}",
        dirs.pins.pinned_files()
    );
    // Detached, in a netns without routes: the connect fails locally.
    assert_eq!(
        probe(&sb, &hello.addr().to_string()).error(),
        Some("ENETUNREACH")
    );

    // Secrets are never logged; the identity is stable across restarts.
    let log = agent.log();
    assert!(!log.contains("plaintext-never-logged-42"), "{log}");
    drop(conn);
    drop(agent);
    let _agent = AgentProc::start(&dirs);
    match connect(&ctl).hello {
        AgentMsg::Hello { agent_id, .. } => assert_eq!(agent_id, id_before),
        _ => unreachable!(),
    }
}

#[test]
fn put_sandbox_is_redirected_as_soon_as_applied() {
    require_root();
    let Upstream { world, hello } = Upstream::start();
    let mut linked = Linked::start();
    let conn = &mut linked.conn;
    conn.apply(snapshot(1, Vec::new()));

    let mut latencies = Vec::new();
    let mut seq = 2;
    for i in 0..10 {
        let NsSandbox { ns: _ns, sb } = NsSandbox::new("lk-put");
        let id = format!("put-{i}");
        latencies.push(conn.apply(ControlMsg::PutSandbox {
            seq,
            sandbox: sandbox_state(&id, &sb),
        }));
        seq += 1;
        // Started right after the acknowledgement: must already be redirected.
        assert_via_agent(&sb, &hello, &world);
        assert_eq!(attached_programs(sb.cgroup().path()), 9);
        // A repeated PutSandbox changes nothing.
        conn.apply(ControlMsg::PutSandbox {
            seq,
            sandbox: sandbox_state(&id, &sb),
        });
        seq += 1;
        assert_eq!(attached_programs(sb.cgroup().path()), 9);
        conn.apply(ControlMsg::DeleteSandbox {
            seq,
            id: id.parse().unwrap(),
        });
        seq += 1;
        assert_eq!(attached_programs(sb.cgroup().path()), 0);
    }
    let (p50, max) = p50_max(&mut latencies);
    eprintln!("MEASURE PutSandbox->Applied over 10: p50 {p50:.1} ms, max {max:.1} ms");
}

#[test]
fn bad_sandboxes_are_reported_not_fatal() {
    require_root();
    let mut linked = Linked::start();
    let conn = &mut linked.conn;
    let NsSandbox { ns: _ns, sb } = NsSandbox::new("lk-bad");
    let mut outside = sandbox_state("bad-1", &sb);
    outside.cgroup = "/etc".into();
    let (errors, _) = conn.send(snapshot(1, vec![outside, sandbox_state("ok-1", &sb)]));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(attached_programs(sb.cgroup().path()), 9);
    // A second sandbox on the same cgroup is refused.
    let (errors, _) = conn.send(ControlMsg::PutSandbox {
        seq: 2,
        sandbox: sandbox_state("ok-2", &sb),
    });
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(attached_programs(sb.cgroup().path()), 9);
    conn.apply(snapshot(3, Vec::new()));
    assert_eq!(attached_programs(sb.cgroup().path()), 0);
}

#[test]
fn a_recreated_cgroup_is_attached_again() {
    require_root();
    let Upstream { world, hello } = Upstream::start();
    let NsSandbox { ns: _ns, sb } = NsSandbox::new("lk-recreate");
    let Linked {
        dirs,
        ctl: _ctl,
        agent: _agent,
        mut conn,
    } = Linked::start();
    let state = sandbox_state("sb-r", &sb);
    conn.apply(snapshot(1, vec![state.clone()]));
    let old_id = sb.cgroup().id();
    // The container restarts: same cgroup path, new directory.
    let path = sb.cgroup().path().to_path_buf();
    std::fs::remove_dir(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    assert_ne!(sb.cgroup().id(), old_id);
    assert_eq!(attached_programs(&path), 0);
    conn.apply(ControlMsg::PutSandbox {
        seq: 2,
        sandbox: state,
    });
    assert_eq!(attached_programs(&path), 9);
    assert_via_agent(&sb, &hello, &world);
    assert!(!dirs.pins.layout().sandbox_dir(old_id).exists());
}

#[test]
fn killed_agent_is_never_bypassed_and_restarts_adopt_without_control() {
    require_root();
    let Upstream { world, hello } = Upstream::start();
    let addr = hello.addr().to_string();
    let NsSandbox { ns, sb } = NsSandbox::new("lk-kill");
    let link = world.link_sandbox(&ns);
    let Linked {
        dirs,
        ctl,
        mut agent,
        mut conn,
    } = Linked::start();
    conn.apply(snapshot(1, vec![sandbox_state("sb-k", &sb)]));
    assert_via_agent(&sb, &hello, &world);
    // Control goes away here and stays down for the rest of the test.
    drop((conn, ctl));
    // Outside the cgroup the same netns reaches the upstream directly: a bypass would work.
    let direct = sb.probe_outside(&["tcp", "--addr", &addr, "--timeout-ms", "3000"]);
    let reply = direct.expect_ok()["reply"].as_str().unwrap().to_owned();
    assert!(
        reply.starts_with(&format!("up {}:", link.sandbox_v4())),
        "{reply}"
    );

    let mut adoption = Vec::new();
    let mut ready = Vec::new();
    for round in 0..10 {
        let programs_before = attached_program_ids(sb.cgroup().path());
        if round % 2 == 0 {
            agent.kill();
        } else {
            assert!(agent.terminate().success(), "{}", agent.log());
        }
        // The redirect stays: connections are refused, not sent around veil.
        assert_eq!(attached_programs(sb.cgroup().path()), 9);
        let out = probe(&sb, &addr);
        assert_eq!(
            out.error(),
            Some("ECONNREFUSED"),
            "round {round}: {:?}",
            out.json
        );
        // Nothing in the sandbox may take the agent's port meanwhile.
        let (port_v4, _) = dirs.ports("sb-k");
        let bound = sb.probe(&[
            "tcp",
            "--addr",
            &addr,
            "--bind",
            &format!("127.0.0.1:{port_v4}"),
            "--timeout-ms",
            "1000",
        ]);
        assert_eq!(bound.error(), Some("EPERM"), "{:?}", bound.json);

        let started = Instant::now();
        agent = AgentProc::start(&dirs);
        assert_via_agent(&sb, &hello, &world);
        adoption.push(started.elapsed());
        assert_eq!(
            dirs.ports("sb-k").0,
            port_v4,
            "the previous port is taken back"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "re-adoption took {:?}",
            started.elapsed()
        );
        ready.push(agent.ready_after);
        // Nothing attached twice; the kept links now run the new agent's programs.
        let programs_after = attached_program_ids(sb.cgroup().path());
        assert_eq!(programs_after.len(), 9, "attached twice");
        assert!(
            programs_after.iter().all(|p| !programs_before.contains(p)),
            "links not switched to the new programs: {programs_before:?} {programs_after:?}"
        );
        assert!(agent.log().contains("sandbox adopted"), "{}", agent.log());
    }
    // Kernel log records of the adopted links reach the new agent.
    let (port_v4, _) = dirs.ports("sb-k");
    let bound = sb.probe(&[
        "tcp",
        "--addr",
        &addr,
        "--bind",
        &format!("127.0.0.1:{port_v4}"),
    ]);
    assert_eq!(bound.error(), Some("EPERM"), "{:?}", bound.json);
    assert!(
        veil_tests::cmd::wait_until(Duration::from_secs(5), || agent
            .log()
            .contains("refused bind to the sandbox listener port")),
        "{}",
        agent.log()
    );
    let (r50, rmax) = p50_max(&mut ready);
    eprintln!("MEASURE restart spawn->READY=1 (adopted): p50 {r50:.1} ms, max {rmax:.1} ms");
    let (p50, max) = p50_max(&mut adoption);
    eprintln!(
        "MEASURE restart->redirect live again (spawn, READY, probe through the agent) over 10 \
         restarts without control: p50 {p50:.1} ms, max {max:.1} ms"
    );
}

/// Issue 19: a sandbox no secret applies to, with its own way out, goes direct; an agent
/// restarted without control keeps it direct (the flag its predecessor left in the pinned map),
/// while the sandbox a secret applies to is redirected again at once.
#[test]
fn a_restart_without_control_keeps_a_secretless_sandbox_direct() {
    require_root();
    let Upstream { world, hello } = Upstream::start();
    let addr = hello.addr().to_string();
    let NsSandbox { ns, sb } = NsSandbox::new("lk-free");
    let link = world.link_sandbox(&ns);
    let kept = Sandbox::new("lk-kept", Some(&ns));
    let Linked {
        dirs,
        ctl,
        mut agent,
        mut conn,
    } = Linked::start();
    let mut free = sandbox_state("sb-free", &sb);
    free.mounts.clear();
    conn.apply(snapshot(1, vec![free, sandbox_state("sb-kept", &kept)]));
    let own = format!("{}:", link.sandbox_v4());
    let assert_direct = |when: &str| {
        let out = probe(&sb, &addr);
        let json = out.expect_ok();
        let local = json["local"].as_str().unwrap();
        let reply = json["reply"].as_str().unwrap();
        assert!(
            local.starts_with(&own) && reply.starts_with(&format!("up {own}")),
            "{when}: the secretless sandbox did not go direct: local {local}, reply {reply}"
        );
    };
    assert_direct("served");
    assert_via_agent(&kept, &hello, &world);

    agent.kill();
    drop((conn, ctl));
    let agent = AgentProc::start(&dirs);
    assert_direct("after a restart without control");
    assert_via_agent(&kept, &hello, &world);
    drop(agent);
}

/// Item 6 of issue 15: one sandbox-id rule, the stricter one. An id an older agent accepted
/// (it may start with `_`) and persisted is refused when a restarted agent re-adopts it; the
/// sandbox is neither served nor dropped: its links and redirect stay, its connections are
/// refused, and the log names it.
#[test]
fn a_persisted_sandbox_whose_id_the_rule_refuses_stays_fail_closed() {
    require_root();
    let Upstream { world, hello } = Upstream::start();
    let addr = hello.addr().to_string();
    let NsSandbox { ns, sb } = NsSandbox::new("lk-legacy");
    let _link = world.link_sandbox(&ns);
    let Linked {
        dirs,
        ctl,
        mut agent,
        mut conn,
    } = Linked::start();
    conn.apply(snapshot(1, vec![sandbox_state("sb-legacy", &sb)]));
    assert_via_agent(&sb, &hello, &world);
    agent.kill();
    drop((conn, ctl));
    let file = dirs.state.path().join("sandboxes.json");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains(r#""sb-legacy""#), "{text}");
    std::fs::write(&file, text.replace(r#""sb-legacy""#, r#""_sb-legacy""#)).unwrap();

    // Restarted without control: nothing but the state file tells it about the sandbox.
    let agent = AgentProc::start(&dirs);
    assert_eq!(attached_programs(sb.cgroup().path()), 9, "{}", agent.log());
    let out = probe(&sb, &addr);
    assert_eq!(
        out.error(),
        Some("ECONNREFUSED"),
        "a sandbox whose id the rule refuses must stay redirected to a closed listener: {:?}",
        out.json
    );
    // Refused because redirected: outside its cgroup the same netns reaches the upstream.
    let direct = sb.probe_outside(&["tcp", "--addr", &addr, "--timeout-ms", "3000"]);
    assert!(
        direct.expect_ok()["reply"]
            .as_str()
            .unwrap()
            .starts_with("up ")
    );
    let log = agent.log();
    assert!(
        log.contains("_sb-legacy") && log.contains("fail-closed"),
        "the log must name the sandbox left fail-closed:\n{log}"
    );
    // Kept, not forgotten: the record is still there for control's snapshot to remove.
    let (port_v4, _) = dirs.ports("_sb-legacy");
    assert_ne!(port_v4, 0);
}

#[test]
fn a_link_detached_behind_the_agents_back_is_replaced_on_restart() {
    require_root();
    let Upstream { world, hello } = Upstream::start();
    let NsSandbox { ns: _ns, sb } = NsSandbox::new("lk-tamper");
    let Linked {
        dirs,
        ctl: _ctl,
        mut agent,
        mut conn,
    } = Linked::start();
    conn.apply(snapshot(1, vec![sandbox_state("sb-t", &sb)]));
    assert_via_agent(&sb, &hello, &world);
    agent.kill();
    drop(conn);

    let pin = dirs.pins.layout().link(sb.cgroup().id(), "connect4");
    detach_pinned_link(&pin);
    assert!(pin.exists());
    assert_eq!(attached_programs(sb.cgroup().path()), 8);
    // Without connect4 nothing is redirected: in this routeless netns the connect fails locally.
    assert_eq!(
        probe(&sb, &hello.addr().to_string()).error(),
        Some("ENETUNREACH")
    );

    let agent = AgentProc::start(&dirs);
    assert_eq!(attached_programs(sb.cgroup().path()), 9);
    assert_via_agent(&sb, &hello, &world);
    assert!(agent.log().contains("replaced=1"), "{}", agent.log());
}

#[test]
fn control_restart_reconciles_without_double_attachment() {
    require_root();
    let Upstream { world, hello } = Upstream::start();
    let NsSandbox { ns: _ns, sb } = NsSandbox::new("lk-ctl");
    let NsSandbox { ns: _ns2, sb: sb2 } = NsSandbox::new("lk-ctl2");
    let dirs = Dirs::new();
    let _agent = AgentProc::start(&dirs);
    {
        let ctl = FakeControl::bind(&dirs.control);
        let mut conn = connect(&ctl);
        conn.apply(snapshot(
            1,
            vec![sandbox_state("a", &sb), sandbox_state("b", &sb2)],
        ));
    }
    // Control is down: traffic continues.
    assert_via_agent(&sb, &hello, &world);
    std::thread::sleep(Duration::from_millis(300));
    assert_via_agent(&sb2, &hello, &world);

    let ctl = FakeControl::bind(&dirs.control);
    let reconnect = Instant::now();
    let mut conn = connect(&ctl);
    eprintln!(
        "MEASURE control back -> agent reconnected in {:?}",
        reconnect.elapsed()
    );
    // The new control no longer has "b": it is detached; "a" is kept as it is.
    conn.apply(snapshot(1, vec![sandbox_state("a", &sb)]));
    assert_eq!(attached_programs(sb.cgroup().path()), 9);
    assert_eq!(attached_programs(sb2.cgroup().path()), 0);
    assert_via_agent(&sb, &hello, &world);
    assert_eq!(
        probe(&sb2, &hello.addr().to_string()).error(),
        Some("ENETUNREACH")
    );
}

/// Binds each address in the sandbox and prints the errno (0 = bound).
const BINDS: &str = r#"
import socket, sys
for spec in sys.argv[1:]:
    fam, host, port = spec.split(",")
    s = socket.socket(socket.AF_INET6 if fam == "6" else socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, int(port)))
        print(0)
    except OSError as e:
        print(e.errno)
    s.close()
"#;

#[test]
fn sandbox_cannot_bind_the_listener_port() {
    require_root();
    let NsSandbox { ns: _ns, sb } = NsSandbox::new("lk-bind");
    let Linked {
        dirs,
        ctl: _ctl,
        agent: _agent,
        mut conn,
    } = Linked::start();
    conn.apply(snapshot(1, vec![sandbox_state("sb-b", &sb)]));
    let (p4, p6) = dirs.ports("sb-b");
    assert_ne!(p6, 0);
    let specs = [
        format!("4,127.0.0.1,{p4}"),
        format!("4,0.0.0.0,{p4}"),
        format!("6,::,{p4}"),
        format!("6,::1,{p6}"),
        format!("4,0.0.0.0,{p6}"),
        "4,127.0.0.1,0".to_owned(),
    ];
    let mut args = vec!["python3", "-c", BINDS];
    args.extend(specs.iter().map(String::as_str));
    let out = sb.run(&args, Duration::from_secs(10));
    let errnos: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(errnos, ["1", "1", "1", "1", "1", "0"], "{out:?}");
    // Outside the sandbox's cgroup the kernel decides (the port is simply in use).
    let out = sb.run_outside(
        &["python3", "-c", BINDS, &format!("4,127.0.0.1,{p4}")],
        Duration::from_secs(10),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "98", "{out:?}");
}

#[test]
fn teardown_all_leaves_no_pin_link_or_map_entry() {
    require_root();
    let NsSandbox { ns: _ns, sb } = NsSandbox::new("lk-td");
    let NsSandbox { ns: _ns2, sb: sb2 } = NsSandbox::new("lk-td2");
    let Linked {
        dirs,
        ctl: _ctl,
        mut agent,
        mut conn,
    } = Linked::start();
    conn.apply(snapshot(
        1,
        vec![sandbox_state("t1", &sb), sandbox_state("t2", &sb2)],
    ));
    // Refused while the agent holds the state dir.
    let busy = dirs.teardown(&["--all"]);
    assert_eq!(busy.status.code(), Some(2), "{busy:?}");
    assert_eq!(attached_programs(sb.cgroup().path()), 9);

    // Keep a handle on the pinned map to look inside after its pin is gone.
    let map = aya::maps::MapData::from_pin(dirs.pins.layout().map("VEIL_SANDBOXES")).unwrap();
    let map: aya::maps::HashMap<_, u64, proxy_common::SandboxTarget> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map)).unwrap();
    assert_eq!(map.keys().count(), 2);
    agent.kill();
    drop(conn);

    let one = dirs.teardown(&["--sandbox", "t1"]);
    assert!(one.status.success(), "{one:?}");
    assert_eq!(attached_programs(sb.cgroup().path()), 0);
    assert_eq!(attached_programs(sb2.cgroup().path()), 9);
    assert_eq!(map.keys().count(), 1);

    let all = dirs.teardown(&["--all"]);
    assert!(all.status.success(), "{all:?}");
    assert_eq!(attached_programs(sb2.cgroup().path()), 0);
    assert_eq!(map.keys().count(), 0);
    assert!(!dirs.pins.path().exists(), "{:?}", dirs.pins.pinned_files());
    // A fresh agent finds nothing to adopt.
    let agent = AgentProc::start(&dirs);
    assert!(agent.log().contains("sandboxes=0"), "{}", agent.log());
}

/// A sandbox bound by cgroup id is not enforced on another cgroup at its path (a container
/// restarted in the same cgroup path must be bound again, never taken for the old one).
#[test]
fn a_binding_on_a_replaced_cgroup_is_refused() {
    require_root();
    let mut linked = Linked::start();
    let conn = &mut linked.conn;
    let NsSandbox { ns: _ns, sb } = NsSandbox::new("lk-bound-id");
    let mut stale = sandbox_state("bound-1", &sb);
    stale.cgroup_id = Some(sb.cgroup().id() + 1);
    let (errors, _) = conn.send(ControlMsg::PutSandbox {
        seq: 1,
        sandbox: stale,
    });
    assert!(
        errors.len() == 1 && errors[0].contains("was replaced"),
        "a sandbox bound to another cgroup id was enforced on this one: errors {errors:?}"
    );
    assert_eq!(attached_programs(sb.cgroup().path()), 0);
    let mut current = sandbox_state("bound-1", &sb);
    current.cgroup_id = Some(sb.cgroup().id());
    let (errors, _) = conn.send(ControlMsg::PutSandbox {
        seq: 2,
        sandbox: current,
    });
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(attached_programs(sb.cgroup().path()), 9);
    conn.apply(snapshot(3, Vec::new()));
}
