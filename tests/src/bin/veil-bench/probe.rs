//! Whether a sandbox's connection goes through the agent: a `veil-probe` in the sandbox asks a
//! greeting server who connected.

use std::net::SocketAddr;
use std::time::Duration;

use veil_tests::Sandbox;
use veil_tests::cmd::run_probe;

/// Whether a probe in `sb` reaches `hello` through the agent (upstream sees `agent_ip`).
pub(crate) fn through_agent(sb: &Sandbox, hello: SocketAddr, agent_ip: std::net::IpAddr) -> bool {
    through_agent_sending(sb, hello, agent_ip, None)
}

/// [`through_agent`], the probe sending `first` once connected: a client that speaks first
/// is passed on at once, where a silent one waits for the agent's 100 ms speculation delay in
/// a sandbox with secrets (proxy-agent's `SPECULATE_AFTER`).
pub(crate) fn through_agent_sending(
    sb: &Sandbox,
    hello: SocketAddr,
    agent_ip: std::net::IpAddr,
    first: Option<&str>,
) -> bool {
    let mut cmd = sb.command(veil_tests::bin_path("veil-probe"));
    cmd.args(["tcp", "--addr", &hello.to_string()]);
    if let Some(text) = first {
        cmd.args(["--send", text]);
    }
    let out = run_probe(&mut cmd, Duration::from_secs(10));
    out.ok()
        && out
            .json
            .get("reply")
            .and_then(|r| r.as_str())
            .and_then(|r| r.trim().split_once(' '))
            .and_then(|(_, peer)| peer.parse::<SocketAddr>().ok())
            .is_some_and(|p| p.ip() == agent_ip)
}
