//! `veil-bench containers`: what veil adds to a container's start. `true` in a container, with
//! the veil runtime (`veil-oci-hook`) and a declared sandbox (keep: one declaration, bound and
//! unbound at each start) vs the plain runc runtime; Docker, Podman and runc; interleaved, p50
//! and p99. Then the hook's own phases (`VEIL_OCI_HOOK_TIMING`) over the runc starts.

use std::collections::BTreeMap;
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use veil_tests::bind::declare;
use veil_tests::dockerd::Dockerd;
use veil_tests::oci_world::{Place, VAR, echo_world};
use veil_tests::podman::Podman;
use veil_tests::runc::RuncContainer;

use crate::quantile::percentile;

const SANDBOX: &str = "bench-ctr";

/// Runs the benchmark with `count` starts per runtime and mode.
pub fn run(count: u64) -> Result<()> {
    veil_tests::require_root();
    let (w, _key) = echo_world("containers bench CA");
    let veil = &w.veil;
    declare(veil, SANDBOX, &[(VAR, "upstream-key")], true);
    let socket = veil.agent().local_socket();
    let env = format!("VEIL_SANDBOX_ID={SANDBOX}");

    let docker = Dockerd::start(&socket);
    let image = docker.import("bench");
    let docker_run = |veil_runtime: bool| {
        let mut args = vec!["run", "--rm", "--network", "none"];
        if veil_runtime {
            args.extend(["--runtime", "veil", "-e", &env]);
        }
        args.extend([image.as_str(), "true"]);
        timed(|| docker.cli(&args))
    };
    let docker_times = measure("docker", count, docker_run)?;
    drop(docker);

    let podman = Podman::new();
    let pimage = podman.import("bench");
    let annotation = format!("dev.veil.sandbox={SANDBOX}");
    let parent = podman.parent.relative();
    let podman_run = |veil_runtime: bool| {
        if veil_runtime {
            timed(|| {
                podman.run_veil(
                    &socket,
                    &[
                        "--rm",
                        "--network",
                        "none",
                        "--annotation",
                        &annotation,
                        &pimage,
                        "true",
                    ],
                )
            })
        } else {
            let mut args = vec![
                "run",
                "--rm",
                "--network",
                "none",
                "--runtime",
                "/usr/sbin/runc",
            ];
            args.extend(veil_tests::podman::ULIMITS);
            args.extend(["--cgroup-parent", &parent]);
            args.extend([pimage.as_str(), "true"]);
            timed(|| podman.cli(&args))
        }
    };
    let podman_times = measure("podman", count, podman_run)?;
    drop(podman);

    let place = Place::new("bench");
    let mut phases: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    let timing = place.path("timing");
    let runc_run = |veil_runtime: bool| {
        if veil_runtime {
            let c = RuncContainer::new("bench", &place.spec("true", std::slice::from_ref(&env)));
            let started = Instant::now();
            let out = c.run_veil_timed(&socket, &timing, Duration::from_secs(60));
            (started.elapsed(), out)
        } else {
            let spec = place.spec("true", &[]);
            let c = RuncContainer::new("bench-plain", &spec);
            timed(|| c.run_plain(Duration::from_secs(60)))
        }
    };
    let mut runc_times = (Vec::new(), Vec::new());
    for i in 0..count + 3 {
        for veil_runtime in [true, false] {
            let (took, out) = runc_run(veil_runtime);
            if !out.status.success() {
                bail!(
                    "runc start {i} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            if i < 3 {
                continue;
            }
            if veil_runtime {
                runc_times.0.push(took);
                let lines = std::fs::read_to_string(&timing).unwrap_or_default();
                let _ = std::fs::remove_file(&timing);
                for (phase, d) in parse_timing(&lines) {
                    phases.entry(phase).or_default().push(d);
                }
            } else {
                runc_times.1.push(took);
            }
        }
    }
    for (name, (mut with, mut without)) in [
        ("docker", docker_times),
        ("podman", podman_times),
        ("runc", runc_times),
    ] {
        with.sort();
        without.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{name:7} start over {count}: plain p50 {:.1} ms p99 {:.1} ms | veil p50 {:.1} ms p99 {:.1} ms | +{:.1} ms p50",
            ms(percentile(&without, 0.5)),
            ms(percentile(&without, 0.99)),
            ms(percentile(&with, 0.5)),
            ms(percentile(&with, 0.99)),
            ms(percentile(&with, 0.5)) - ms(percentile(&without, 0.5)),
        );
    }
    println!("veil-oci-hook phases over the runc starts (p50, time since the mode's start):");
    for (phase, mut ds) in phases {
        ds.sort();
        println!(
            "  {phase:32} {:.2} ms",
            percentile(&ds, 0.5).as_secs_f64() * 1e3
        );
    }
    Ok(())
}

fn timed(f: impl FnOnce() -> Output) -> (Duration, Output) {
    let started = Instant::now();
    let out = f();
    (started.elapsed(), out)
}

/// `count` interleaved starts with and without veil (after 3 of each to warm up).
fn measure(
    name: &str,
    count: u64,
    run: impl Fn(bool) -> (Duration, Output),
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for i in 0..count + 3 {
        for veil_runtime in [true, false] {
            let (took, out) = run(veil_runtime);
            if !out.status.success() {
                bail!(
                    "{name} start {i} (veil: {veil_runtime}) failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            if i >= 3 {
                if veil_runtime {
                    &mut with
                } else {
                    &mut without
                }
                .push(took);
            }
        }
    }
    Ok((with, without))
}

/// `veil-oci-hook timing: MODE PHASE +Nus` lines → ("MODE PHASE", duration).
fn parse_timing(text: &str) -> Vec<(String, Duration)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("veil-oci-hook timing: "))
        .filter_map(|l| {
            let (what, us) = l.rsplit_once(" +")?;
            let us: u64 = us.strip_suffix("us")?.parse().ok()?;
            Some((what.to_owned(), Duration::from_micros(us)))
        })
        .collect()
}
