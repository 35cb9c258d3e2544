use super::*;

const MNT: &str = "/sys/fs/cgroup/unified";

#[test]
fn empty_config_is_valid_with_defaults() {
    let c = Config::parse("", Path::new(MNT)).unwrap();
    assert_eq!(c.agent, AgentSettings::default());
    assert_eq!(c.agent.bpf_pin_dir, Path::new(DEFAULT_BPF_PIN_DIR));
}

fn state(id: &str, cgroup: &str, netns: Option<&str>) -> veil_link::SandboxState {
    veil_link::SandboxState {
        egress: Default::default(),
        id: id.parse().unwrap(),
        org: "o".parse().unwrap(),
        cgroup: cgroup.into(),
        netns: netns.map(PathBuf::from),
        mounts: Default::default(),
        cgroup_id: None,
    }
}

#[test]
fn sandbox_cgroups_resolve_under_the_mount() {
    let s = SandboxSpec::from_state(
        &state("a", "system.slice/docker-1.scope", None),
        Path::new(MNT),
    )
    .unwrap();
    assert_eq!(
        s.cgroup,
        Path::new("/sys/fs/cgroup/unified/system.slice/docker-1.scope")
    );
    let s = SandboxSpec::from_state(
        &state("b", "/sys/fs/cgroup/unified/x/y", Some("/run/netns/b")),
        Path::new(MNT),
    )
    .unwrap();
    assert_eq!(s.cgroup, Path::new("/sys/fs/cgroup/unified/x/y"));
    assert_eq!(s.netns.as_deref(), Some(Path::new("/run/netns/b")));
}

#[test]
fn rejects_bad_sandboxes() {
    for (id, cgroup, netns) in [
        ("a", "../etc", None),
        ("a", "/sys/fs/cgroup/other", None),
        ("a", "/sys/fs/cgroup/unified", None),
        ("a", "x", Some("run/netns/a")),
    ] {
        assert!(
            SandboxSpec::from_state(&state(id, cgroup, netns), Path::new(MNT)).is_err(),
            "accepted {id} {cgroup} {netns:?}"
        );
    }
    // A malformed id never becomes a SandboxState: the message is refused as it is read.
    let json = serde_json::json!({"id": "a b", "org": "o", "cgroup": "x", "netns": null,
                                  "mounts": {}});
    let e = serde_json::from_value::<veil_link::SandboxState>(json).unwrap_err();
    assert!(e.to_string().contains("sandbox id"), "{e}");
}

#[test]
fn rejects_static_sandboxes_unknown_keys_and_bad_values() {
    let bad = [
        "[[sandbox]]\nid = \"a\"\ncgroup = \"x\"",
        "[agent]\nbogus = 1",
        "[agent]\nlisten_backlog = 0",
        "[agent]\nreconnect_min_ms = 0",
        "[agent]\nreconnect_min_ms = 2000\nreconnect_max_ms = 1000",
        "[agent]\nbpf_pin_dir = \"rel/dir\"",
        "[agent]\npeek_timeout_ms = 0",
        "[agent]\nleaf_cache_size = 0",
        "[agent]\nbody_substitution_max_bytes = 0",
        "[agent]\nhandshake_timeout_ms = 0",
        "[agent]\nidle_timeout_ms = 0",
        "[agent]\nmax_connections_per_sandbox = 0",
        "[agent]\nmax_streams_per_connection = 0",
        "[agent]\nmax_header_bytes = 0",
        "[agent]\nmax_header_bytes = 8191",
        "[agent]\nwrong_host = \"drop\"",
        "[agent]\nbody_substitution = \"yes\"",
        "[agent]\negress_deny = \"10.0.0.0/8\"",
        "[agent]\negress_deny = [\"10.0.0.0/33\"]",
        "[agent]\negress_allow = [\"metadata\"]",
    ];
    for text in bad {
        assert!(
            Config::parse(text, Path::new(MNT)).is_err(),
            "accepted: {text}"
        );
    }
    let c = Config::parse(
        "[agent]\nbpf_pin_dir = \"/sys/fs/bpf/t1\"\nreconnect_max_ms = 500",
        Path::new(MNT),
    )
    .unwrap();
    assert_eq!(c.agent.bpf_pin_dir, Path::new("/sys/fs/bpf/t1"));
    assert_eq!(c.agent.reconnect().1, Duration::from_millis(500));
}

#[test]
fn request_policy_keys() {
    let d = AgentSettings::default();
    assert_eq!(d.mode_overrides(), ModeOverrides::default());
    assert_eq!(d.request_limits(), RequestLimits::default());
    let c = Config::parse(
        "[agent]\nbody_substitution = true\nwrong_host = \"block\"\n\
         body_substitution_max_bytes = 4096\nmax_header_bytes = 8192\n\
         handshake_timeout_ms = 1500\nidle_timeout_ms = 2500\n\
         max_connections_per_sandbox = 7\nmax_streams_per_connection = 3",
        Path::new(MNT),
    )
    .unwrap();
    let l = c.agent.request_limits();
    assert_eq!(
        l.overrides,
        ModeOverrides {
            body_substitution: true,
            wrong_host: WrongHost::Block
        }
    );
    assert_eq!(l.body_max_bytes, 4096);
    assert_eq!(l.max_header_bytes, 8192);
    assert_eq!(l.handshake_timeout, Duration::from_millis(1500));
    assert_eq!(l.idle_timeout, Duration::from_millis(2500));
    assert_eq!(l.max_connections_per_sandbox, 7);
    assert_eq!(l.max_streams_per_connection, 3);
    let e = Config::parse("[agent]\nidle_timeout_ms = 0", Path::new(MNT)).unwrap_err();
    assert!(e.to_string().contains("agent.idle_timeout_ms"), "{e}");
}

#[test]
fn egress_keys_parse_and_errors_name_the_entry() {
    use std::net::IpAddr;
    let no_host = |_: IpAddr| false;
    let d = AgentSettings::default().egress_rules().unwrap();
    assert_eq!(d, EgressRules::default());
    let c = Config::parse(
        "[agent]\negress_deny = [\"203.0.113.0/24\"]\n\
         egress_allow = [\"10.20.0.0/16\", \"169.254.169.254\"]",
        Path::new(MNT),
    )
    .unwrap();
    let r = c.agent.egress_rules().unwrap();
    let verdict = |ip: &str| r.verdict(ip.parse().unwrap(), no_host);
    assert!(matches!(verdict("203.0.113.9"), egress::Verdict::Denied(_)));
    assert_eq!(verdict("10.20.1.1"), egress::Verdict::Allowed);
    assert_eq!(verdict("169.254.169.254"), egress::Verdict::Allowed);
    assert!(matches!(
        verdict("169.254.169.253"),
        egress::Verdict::Denied(_)
    ));
    let e = Config::parse(
        "[agent]\negress_allow = [\"10.0.0.0/8\", \"nope\"]",
        Path::new(MNT),
    )
    .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("agent.egress_allow") && text.contains("\"nope\""),
        "{text}"
    );
}

#[test]
fn guard_cgroups_refuses_the_host_naming_the_entry() {
    let c = Config::parse("[agent]\nguard_cgroups = [\"docker\"]\n", Path::new(MNT)).unwrap();
    assert_eq!(c.agent.guard_cgroups, vec![PathBuf::from("docker")]);
    for bad in ["system.slice", "/docker", "..", ""] {
        let text = format!("[agent]\nguard_cgroups = [\"docker\", {bad:?}]\n");
        let e = Config::parse(&text, Path::new(MNT))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("invalid config: agent.guard_cgroups: ")
                && e.contains(&format!("{bad:?}")),
            "{bad}: {e}"
        );
    }
}

#[test]
fn control_socket_or_urls_with_their_tls_files() {
    let err = |text: &str| Config::parse(text, Path::new(MNT)).unwrap_err().to_string();
    let tls = "control_cert = \"/c\"\ncontrol_key = \"/k\"\ncontrol_ca = \"/a\"\n";
    let fleet = format!("[agent]\ncontrol_urls = [\"c1:3901\", \"c2:3901\"]\n{tls}");
    let c = Config::parse(&fleet, Path::new(MNT)).unwrap();
    assert_eq!(c.agent.control_urls.len(), 2);
    let both = format!("{fleet}control_socket = \"/run/other.sock\"\n");
    let e = err(&both);
    assert!(
        e.contains("control_socket") && e.contains("control_urls"),
        "{e}"
    );
    let e = err("[agent]\ncontrol_urls = [\"c1:3901\"]\ncontrol_ca = \"/a\"\n");
    assert!(
        e.contains("control_cert") && e.contains("control_key"),
        "{e}"
    );
    let e = err(&format!("[agent]\n{tls}"));
    assert!(e.contains("not set"), "{e}");
    let e = err(&format!("[agent]\ncontrol_urls = [\"c1\"]\n{tls}"));
    assert!(e.contains("host:port"), "{e}");
}
