//! `veil-bench sandboxes [--count N] [--traffic K]`: N sandboxes registered on one host.
//!
//! Each sandbox is a cgroup and its own netns with no route out (registered `egress: "host"`,
//! as `veil-control run --netns` does, so no veth per sandbox is needed), with the bench
//! secret mounted. Measured: `PUT /api/sandbox/{id}` until it answers (it answers once the
//! redirect is live; each is then verified with a connection through the agent), p50/p99;
//! memory per sandbox (RSS and fd growth of the agent and of control, divided by N); then one
//! intercepted client in each of K sandboxes picked at random, whose requests must reach the
//! upstream with the placeholder substituted (failures counted, must be 0); then the removal of
//! all (`DELETE`, p50/p99) and the agent's fds after it.

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::seq::index::sample;
use veil_tests::{NetNs, Sandbox, TcpHello, TestCa, World};

use crate::peers::{fd_count, rss_kib};
use crate::quantile::percentile;
use crate::soak;

/// What `sandboxes` measured.
#[derive(Debug, Clone, Default)]
pub(crate) struct ScaleResult {
    /// Sandboxes registered.
    pub(crate) count: u64,
    /// PUT → answered, p50/p99/max, ms.
    pub(crate) register_ms: [f64; 3],
    /// Sandboxes whose first connection after the PUT did not reach the agent.
    pub(crate) not_live: u64,
    /// Growth per sandbox: agent RSS KiB, control RSS KiB, agent fds, control fds.
    pub(crate) per_sandbox: [f64; 4],
    /// Sandboxes that carried traffic, requests they made, and failures (failed or corrupted
    /// requests, requests the upstream saw without the value, clients with no request done).
    pub(crate) traffic_sandboxes: u64,
    pub(crate) requests: u64,
    pub(crate) failures: u64,
    /// DELETE → answered, p50/p99, ms.
    pub(crate) remove_ms: [f64; 2],
    /// Agent fds before the first registration and after the last removal.
    pub(crate) agent_fds: [usize; 2],
    /// Seconds the whole measurement took.
    pub(crate) took: f64,
}

impl ScaleResult {
    /// Whether every check held: all live, all traffic served substituted.
    pub(crate) fn ok(&self) -> bool {
        self.not_live == 0 && self.failures == 0 && self.traffic_sandboxes > 0
    }
}

/// Runs `sandboxes` and prints its report; fails when a check did not hold.
pub fn run(count: u64, traffic: u64) -> Result<()> {
    let r = measure(count, traffic)?;
    println!("{} sandboxes on one host ({:.0} s in all)", r.count, r.took);
    println!(
        "  registration (PUT -> answered, redirect live): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; not live after the answer: {}",
        r.register_ms[0], r.register_ms[1], r.register_ms[2], r.not_live
    );
    println!(
        "  per sandbox: agent {:.1} KiB RSS and {:.2} fds, control {:.1} KiB RSS and {:.2} fds",
        r.per_sandbox[0], r.per_sandbox[2], r.per_sandbox[1], r.per_sandbox[3]
    );
    println!(
        "  traffic through {} random sandboxes: {} intercepted requests, {} failures",
        r.traffic_sandboxes, r.requests, r.failures
    );
    println!(
        "  removal (DELETE -> answered): p50 {:.1} ms, p99 {:.1} ms; agent fds {} before, {} after",
        r.remove_ms[0], r.remove_ms[1], r.agent_fds[0], r.agent_fds[1]
    );
    if !r.ok() {
        bail!("sandboxes failed: a sandbox was not live after its PUT or a request failed");
    }
    println!("  OK");
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Registers `count` sandboxes, sends traffic through `traffic` of them, removes them all.
pub(crate) fn measure(count: u64, traffic: u64) -> Result<ScaleResult> {
    veil_tests::require_root();
    crate::host::raise_nofile();
    if traffic > count {
        bail!("--traffic {traffic} is more than the {count} sandboxes");
    }
    let started = Instant::now();
    let me = std::env::current_exe().context("own path")?;
    let world = World::new();
    let ip: IpAddr = world.upstream_v4().into();
    let ca = TestCa::new("veil sandboxes CA");
    let echo = soak::start_echo(world.netns(), ip, &ca)?;
    let hello = TcpHello::start(world.netns(), ip, "U");
    let (veil, placeholder) = soak::start_veil(&ca)?;
    let control = veil.control().pid().context("control is not running")?;
    let agent = veil.pid();

    eprintln!("sandboxes: creating {count} cgroups and network namespaces");
    let mut boxes = Vec::new();
    for i in 0..count {
        let ns = NetNs::new(&format!("sbx{i}"));
        let sb = Sandbox::new(&format!("sbx{i}"), Some(&ns));
        boxes.push((ns, sb));
    }
    std::thread::sleep(Duration::from_millis(500));
    let before = [
        rss_kib(agent),
        rss_kib(control),
        fd_count(agent) as u64,
        fd_count(control) as u64,
    ];

    eprintln!(
        "sandboxes: registering {count} ({:.0} s in)",
        started.elapsed().as_secs_f64()
    );
    let mut took = Vec::new();
    let mut not_live = 0;
    for (i, (_, sb)) in boxes.iter().enumerate() {
        // No route out of the netns: a runner registers such a sandbox with egress "host".
        let spec = sb
            .agent_entry(&format!("sbx{i}"))
            .with_egress(veil_tests::egress::HOST);
        let t = Instant::now();
        let (status, body) = veil.try_register(&spec, &[("KEY", soak::SECRET)]);
        took.push(t.elapsed());
        if status != 200 {
            bail!("registering sandbox {i} of {count}: {status} {body}");
        }
        // The probe speaks first: the sandbox has a secret, so a silent client would wait
        // for the agent's 100 ms speculation delay, 100 s over 1,000 sandboxes.
        if !crate::probe::through_agent_sending(
            sb,
            hello.addr(),
            world.host_v4().into(),
            Some("ping\n"),
        ) {
            not_live += 1;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = [
        rss_kib(agent),
        rss_kib(control),
        fd_count(agent) as u64,
        fd_count(control) as u64,
    ];
    let per_sandbox = [0, 1, 2, 3]
        .map(|i| after[i] as f64 - before[i] as f64)
        .map(|d| d / count as f64);
    took.sort();
    let register_ms = [
        ms(percentile(&took, 0.5)),
        ms(percentile(&took, 0.99)),
        ms(took[took.len() - 1]),
    ];

    eprintln!(
        "sandboxes: traffic through {traffic} picked at random ({:.0} s in)",
        started.elapsed().as_secs_f64()
    );
    let mut rng = rand::rng();
    let picked = sample(&mut rng, boxes.len(), traffic as usize).into_vec();
    let mut children = Vec::new();
    for (n, &i) in picked.iter().enumerate() {
        let mut cmd = boxes[i].1.command(&me);
        cmd.args(["client-soak", &echo.addr.to_string()])
            .args(["--count", "1", "--seconds", "1", "--think-ms", "200"])
            .args(["--header", &format!("x-api-key: {placeholder}")])
            .arg("--seed")
            .arg(n.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        children.push(cmd.spawn().context("start client-soak")?);
    }
    let (mut requests, mut failures) = (0u64, 0u64);
    for mut child in children {
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            BufReader::new(out).read_line(&mut line)?;
        }
        let _ = child.wait();
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .with_context(|| format!("client-soak output {line:?}"))?;
        let field = |k: &str| v[k].as_u64().unwrap_or(0);
        requests += field("requests");
        failures += field("failed") + u64::from(field("corrupt") > 0);
        if field("requests") == 0 {
            failures += 1;
        }
    }
    let wrong = echo.wrong_key.load(Ordering::Relaxed);
    failures += wrong;
    if echo.served.load(Ordering::Relaxed) + wrong != requests {
        // A request the client counted that the upstream never saw (or the reverse).
        failures += 1;
    }

    eprintln!(
        "sandboxes: removing {count} ({:.0} s in)",
        started.elapsed().as_secs_f64()
    );
    let mut removed = Vec::new();
    for i in 0..count {
        let t = Instant::now();
        let (status, body) =
            veil.block_on(veil.api().delete(&format!("/sandbox/sbx{i}"), veil.key()));
        removed.push(t.elapsed());
        if status != 204 {
            bail!("removing sandbox {i} of {count}: {status} {body}");
        }
    }
    removed.sort();
    std::thread::sleep(Duration::from_millis(500));
    let fds_after = fd_count(agent);
    drop(boxes);
    Ok(ScaleResult {
        count,
        register_ms,
        not_live,
        per_sandbox,
        traffic_sandboxes: traffic,
        requests,
        failures,
        remove_ms: [
            ms(percentile(&removed, 0.5)),
            ms(percentile(&removed, 0.99)),
        ],
        agent_fds: [before[2] as usize, fds_after],
        took: started.elapsed().as_secs_f64(),
    })
}
