//! Containers get a declared sandbox's secrets with no glue: `veil-oci-hook` as the runtime
//! gives the container the placeholders and veil's CA, binds it before its workload runs and
//! unbinds it when it stops. Real runc containers (shared busybox+curl rootfs, the harness's
//! netns and cgroups), a real TLS upstream that echoes requests; values are never printed.

use std::time::Duration;

use serde_json::json;

use veil_tests::bind::{declare, get};
use veil_tests::cmd::wait_until;
use veil_tests::dockerd::Dockerd;
use veil_tests::oci_world::{
    Place, VAR, echo_world, env_values, last_bearer_is, report_script, rundir_left,
};
use veil_tests::podman::Podman;
use veil_tests::runc::RuncContainer;
use veil_tests::{bin_path, output_within};

const RUN: Duration = Duration::from_secs(90);

#[test]
fn a_runc_container_gets_placeholders_substitution_scrubbing_and_trusts_veil_unaided() {
    let (w, key) = echo_world("containers runc CA");
    let veil = &w.veil;
    declare(veil, "ctr-runc", &[(VAR, "upstream-key")], false);
    let place = Place::new("ctr-runc");
    let c = RuncContainer::new(
        "runc",
        &place.spec(&report_script(&w), &["VEIL_SANDBOX_ID=ctr-runc".into()]),
    );
    let out = c.run_veil(&veil.agent().local_socket(), RUN);
    assert!(
        out.status.success(),
        "the container failed: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).replace(&key.value, "<VALUE!>")
    );
    let environ = place.read("environ").expect("the workload ran");
    assert_eq!(
        env_values(&environ, VAR),
        vec![key.placeholder.as_str()],
        "the container's {VAR}"
    );
    assert!(
        !environ.contains(&key.value),
        "the value is in /proc/1/environ"
    );
    assert_eq!(
        env_values(&environ, "SSL_CERT_FILE"),
        vec!["/etc/veil/ca-bundle.pem"]
    );
    let config = c.config().to_string();
    assert!(
        config.contains(&key.placeholder) && !config.contains(&key.value),
        "config.json must hold the placeholder, never the value"
    );
    assert_eq!(
        place.read("curl").map(|s| s.trim().to_owned()),
        Some("0".into()),
        "curl without CA flags or variables failed: {}",
        place
            .read("curl-err")
            .unwrap_or_default()
            .replace(&key.value, "<VALUE!>")
    );
    assert!(
        last_bearer_is(&w, &key.value),
        "the upstream did not receive the value"
    );
    let echo = place.read("echo").unwrap_or_default();
    assert!(
        echo.contains(&key.placeholder) && !echo.contains(&key.value),
        "the echoed answer was not scrubbed (placeholder back: {})",
        echo.contains(&key.placeholder)
    );
    // Stopped: unbound by poststop, the declaration (no keep) gone, the runtime dir removed.
    assert_eq!(
        get(veil, "ctr-runc").0,
        404,
        "the sandbox outlived its container"
    );
    assert!(!rundir_left(c.id()), "runtime dir left behind");
    assert!(!place.cgroup_dir().exists(), "container cgroup left behind");
}

#[test]
fn a_container_naming_no_sandbox_runs_untouched() {
    let (w, _key) = echo_world("containers plain CA");
    let place = Place::new("ctr-plain");
    let c = RuncContainer::new("plain", &place.spec("touch /out/ran; env > /out/env", &[]));
    let before = c.config();
    let out = c.run_veil(&w.veil.agent().local_socket(), RUN);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(place.read("ran").is_some());
    assert_eq!(
        c.config(),
        before,
        "config.json of a container naming no sandbox changed"
    );
    assert!(
        !place
            .read("env")
            .unwrap_or_default()
            .contains("SSL_CERT_FILE")
    );
}

#[test]
fn restarting_a_container_rebinds_with_keep_and_is_refused_without() {
    let (w, key) = echo_world("containers restart CA");
    let veil = &w.veil;
    let socket = veil.agent().local_socket();
    for (id, keep) in [("ctr-keep", true), ("ctr-once", false)] {
        declare(veil, id, &[(VAR, "upstream-key")], keep);
        let place = Place::new(id);
        let env = [format!("VEIL_SANDBOX_ID={id}")];
        let first = RuncContainer::new(id, &place.spec(&report_script(&w), &env));
        let out = first.run_veil(&socket, RUN);
        assert!(out.status.success(), "{id}: first start failed");
        assert!(
            last_bearer_is(&w, &key.value),
            "{id}: first start not substituted"
        );
        drop(first);
        std::fs::remove_file(place.path("ran")).expect("marker");
        std::fs::remove_file(place.path("curl")).expect("curl status");
        // The same container started again: a new cgroup, the same declaration.
        let again = RuncContainer::new(id, &place.spec(&report_script(&w), &env));
        let out = again.run_veil(&socket, RUN);
        if keep {
            assert!(out.status.success(), "{id}: restart with keep failed");
            assert_eq!(
                place.read("curl").map(|s| s.trim().to_owned()),
                Some("0".into())
            );
            assert!(
                last_bearer_is(&w, &key.value),
                "{id}: restart not substituted"
            );
            assert_eq!(get(veil, id).1["bound"], json!(false), "{id}: left bound");
        } else {
            // Never direct: the declaration went with the first stop, so it cannot start.
            assert!(
                !out.status.success(),
                "{id}: restarted without a declaration"
            );
            assert!(
                place.read("ran").is_none(),
                "{id}: the workload ran unbound"
            );
        }
    }
}

#[test]
fn two_containers_sharing_one_netns_keep_their_own_identity() {
    let (w, key_a) = echo_world("containers pod CA");
    let key_b = w.secret("other-key", &[veil_tests::oci_world::ALLOWED], json!({}));
    let veil = &w.veil;
    declare(veil, "pod-a", &[(VAR, "upstream-key")], false);
    declare(veil, "pod-b", &[(VAR, "other-key")], false);
    let a = Place::new("pod-a");
    let b = Place::new("pod-b");
    // Each waits for the other before exiting, so both are bound at once in a's netns.
    let script = |me: &str, peer: &str| {
        format!(
            "{}; touch /shared/{me}; while [ ! -e /shared/{peer} ]; do sleep 0.1; done",
            report_script(&w)
        )
    };
    let shared = tempfile::tempdir().expect("tempdir");
    let spec = |place: &Place, me: &str, peer: &str| {
        let mut s = place.spec(&script(me, peer), &[format!("VEIL_SANDBOX_ID=pod-{me}")]);
        s.netns = Some(a.netns.path().to_owned());
        s.binds.push((shared.path().to_owned(), "/shared".into()));
        s
    };
    let ca = RuncContainer::new("pod-a", &spec(&a, "a", "b"));
    let cb = RuncContainer::new("pod-b", &spec(&b, "b", "a"));
    let socket = veil.agent().local_socket();
    let (out_a, out_b) = std::thread::scope(|s| {
        let ta = s.spawn(|| ca.run_veil(&socket, RUN));
        let tb = s.spawn(|| cb.run_veil(&socket, RUN));
        (ta.join().expect("a"), tb.join().expect("b"))
    });
    assert!(
        out_a.status.success() && out_b.status.success(),
        "a pod container failed"
    );
    for (place, mine, other) in [(&a, &key_a, &key_b), (&b, &key_b, &key_a)] {
        let environ = place.read("environ").expect("ran");
        assert_eq!(env_values(&environ, VAR), vec![mine.placeholder.as_str()]);
        let echo = place.read("echo").unwrap_or_default();
        assert!(
            echo.contains(&mine.placeholder)
                && !echo.contains(&mine.value)
                && !echo.contains(&other.value),
            "a pod container's answer was not its own, scrubbed"
        );
    }
    let bearers: Vec<bool> = [&key_a, &key_b]
        .iter()
        .map(|k| {
            w.seen().iter().any(|s| {
                s.headers
                    .iter()
                    .any(|(n, v)| n == "authorization" && *v == format!("Bearer {}", k.value))
            })
        })
        .collect();
    assert_eq!(
        bearers,
        vec![true, true],
        "each container's own value must arrive"
    );
}

#[test]
fn a_docker_container_gets_its_sandbox_through_the_veil_runtime() {
    let (w, key) = echo_world("containers docker CA");
    let veil = &w.veil;
    declare(veil, "ctr-docker", &[(VAR, "upstream-key")], false);
    let docker = Dockerd::start(&veil.agent().local_socket());
    let image = docker.import("curl");
    let out = tempfile::tempdir().expect("tempdir");
    let volume = format!("{}:/out", out.path().display());
    let name = format!("veil-test-{}-docker", std::process::id());
    let run = docker.cli(&[
        "run",
        "--name",
        &name,
        "--runtime",
        "veil",
        "--network",
        "none",
        "-e",
        "VEIL_SANDBOX_ID=ctr-docker",
        "-v",
        &volume,
        &image,
        "sh",
        "-c",
        &report_script(&w),
    ]);
    assert!(
        run.status.success(),
        "docker run failed ({}): {}",
        run.status,
        String::from_utf8_lossy(&run.stderr).replace(&key.value, "<VALUE!>")
    );
    let read = |f: &str| std::fs::read_to_string(out.path().join(f)).unwrap_or_default();
    let environ = read("environ");
    assert_eq!(env_values(&environ, VAR), vec![key.placeholder.as_str()]);
    assert!(
        !environ.contains(&key.value),
        "the value is in /proc/1/environ"
    );
    assert_eq!(
        read("curl").trim(),
        "0",
        "curl without CA flags failed: {}",
        read("curl-err")
    );
    assert!(
        last_bearer_is(&w, &key.value),
        "the upstream did not receive the value"
    );
    let echo = read("echo");
    assert!(
        echo.contains(&key.placeholder) && !echo.contains(&key.value),
        "not scrubbed"
    );
    // Docker's own record never saw the placeholder's value (it never sees either: the
    // runtime adds the placeholder).
    let inspect = docker.cli(&["inspect", &name]);
    assert!(inspect.status.success());
    assert!(
        !String::from_utf8_lossy(&inspect.stdout).contains(&key.value),
        "value in inspect"
    );
    assert_eq!(
        get(veil, "ctr-docker").0,
        404,
        "the sandbox outlived its container"
    );

    // A container naming a sandbox nobody declared does not start: docker run exits 125 and
    // the workload never ran.
    std::fs::remove_file(out.path().join("ran")).expect("marker");
    let refused = docker.cli(&[
        "run",
        "--rm",
        "--runtime",
        "veil",
        "--network",
        "none",
        "-e",
        "VEIL_SANDBOX_ID=nobody-declared",
        "-v",
        &volume,
        &image,
        "touch",
        "/out/ran",
    ]);
    assert_eq!(
        refused.status.code(),
        Some(125),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("veil"),
        "docker's error must carry veil's line: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!out.path().join("ran").exists(), "the refused workload ran");
    let running = docker.cli(&["ps", "-q"]);
    assert!(
        String::from_utf8_lossy(&running.stdout).trim().is_empty(),
        "a container runs"
    );
}

#[test]
fn a_podman_container_gets_its_sandbox_through_an_annotation() {
    let (w, key) = echo_world("containers podman CA");
    let veil = &w.veil;
    declare(veil, "ctr-podman", &[(VAR, "upstream-key")], false);
    let podman = Podman::new();
    let image = podman.import("curl");
    let out = tempfile::tempdir().expect("tempdir");
    let volume = format!("{}:/out", out.path().display());
    let name = format!("veil-test-{}-podman", std::process::id());
    let run = podman.run_veil(
        &veil.agent().local_socket(),
        &[
            "--name",
            &name,
            "--network",
            "none",
            "--annotation",
            "dev.veil.sandbox=ctr-podman",
            // An image-level attempt to set the mounted variable.
            "-e",
            &format!("{VAR}=sk-from-the-command-line"),
            "-v",
            &volume,
            &image,
            "sh",
            "-c",
            &report_script(&w),
        ],
    );
    assert!(
        run.status.success(),
        "podman run failed ({}): {}",
        run.status,
        String::from_utf8_lossy(&run.stderr).replace(&key.value, "<VALUE!>")
    );
    let read = |f: &str| std::fs::read_to_string(out.path().join(f)).unwrap_or_default();
    let environ = read("environ");
    assert_eq!(env_values(&environ, VAR), vec![key.placeholder.as_str()]);
    assert!(
        !environ.contains(&key.value),
        "the value is in /proc/1/environ"
    );
    assert_eq!(
        read("curl").trim(),
        "0",
        "curl without CA flags failed: {}",
        read("curl-err")
    );
    assert!(
        last_bearer_is(&w, &key.value),
        "the upstream did not receive the value"
    );
    let echo = read("echo");
    assert!(
        echo.contains(&key.placeholder) && !echo.contains(&key.value),
        "not scrubbed"
    );
    let inspect = podman.cli(&["inspect", &name]);
    assert!(
        !String::from_utf8_lossy(&inspect.stdout).contains(&key.value),
        "value in inspect"
    );
    assert_eq!(
        get(veil, "ctr-podman").0,
        404,
        "the sandbox outlived its container"
    );
}

#[test]
fn docker_restart_rebinds_with_keep_and_is_refused_without() {
    let (w, key) = echo_world("containers docker restart CA");
    let veil = &w.veil;
    let docker = Dockerd::start(&veil.agent().local_socket());
    let image = docker.import("restart");
    for (id, keep) in [("dock-keep", true), ("dock-once", false)] {
        declare(veil, id, &[(VAR, "upstream-key")], keep);
        let out = tempfile::tempdir().expect("tempdir");
        let volume = format!("{}:/out", out.path().display());
        // Reports once per start, then waits to be stopped.
        let script = format!("{}; while :; do sleep 0.2; done", report_script(&w));
        let env = format!("VEIL_SANDBOX_ID={id}");
        let started = docker.cli(&[
            "run",
            "-d",
            "--name",
            id,
            "--runtime",
            "veil",
            "--network",
            "none",
            "-e",
            &env,
            "-v",
            &volume,
            &image,
            "sh",
            "-c",
            &script,
        ]);
        assert!(
            started.status.success(),
            "{id}: {}",
            String::from_utf8_lossy(&started.stderr)
        );
        let curl = out.path().join("curl");
        assert!(
            wait_until(RUN, || reported(&curl)),
            "{id}: first start did not report"
        );
        assert!(
            last_bearer_is(&w, &key.value),
            "{id}: first start not substituted"
        );
        std::fs::remove_file(&curl).expect("curl status");
        std::fs::remove_file(out.path().join("ran")).expect("marker");
        let restarted = docker.cli(&["restart", "-t", "1", id]);
        if keep {
            assert!(restarted.status.success(), "{id}: restart failed");
            assert!(
                wait_until(RUN, || reported(&curl)),
                "{id}: restart did not report"
            );
            assert_eq!(
                std::fs::read_to_string(&curl).unwrap_or_default().trim(),
                "0"
            );
            assert!(
                last_bearer_is(&w, &key.value),
                "{id}: restart not substituted"
            );
            assert_eq!(
                get(veil, id).1["bound"],
                json!(true),
                "{id}: not bound again"
            );
        } else {
            assert!(
                !restarted.status.success(),
                "{id}: restarted without its declaration"
            );
            assert!(
                !out.path().join("ran").exists(),
                "{id}: the workload ran unbound"
            );
        }
        let _ = docker.cli(&["rm", "-f", id]);
    }
}

#[test]
fn podman_hooks_d_binds_without_the_shim() {
    let (w, key) = echo_world("containers hooks.d CA");
    let veil = &w.veil;
    declare(veil, "ctr-hooksd", &[(VAR, "upstream-key")], false);
    let podman = Podman::new();
    let image = podman.import("hooksd");
    // The hooks.d file of the README, pointed at this test's agent.
    let hooks = tempfile::tempdir().expect("tempdir");
    let hook = bin_path("veil-oci-hook").display().to_string();
    let socket = veil.agent().local_socket().display().to_string();
    for (stage, mode) in [
        ("createRuntime", "create-runtime"),
        ("poststop", "poststop"),
    ] {
        let file = json!({
            "version": "1.0.0",
            "hook": {"path": hook, "args": ["veil-oci-hook", mode, "--agent-socket", socket]},
            "when": {"annotations": {"^dev\\.veil\\.sandbox$": ".+"}},
            "stages": [stage],
        });
        std::fs::write(
            hooks.path().join(format!("veil-{mode}.json")),
            file.to_string(),
        )
        .expect("hooks.d file");
    }
    let out = tempfile::tempdir().expect("tempdir");
    let volume = format!("{}:/out", out.path().display());
    let trust = format!(
        "{}:/etc/ssl/certs/ca-certificates.crt:ro",
        out.path().join("ca.pem").display()
    );
    let run = |sandbox: &str| {
        let mut cmd = podman.command();
        cmd.arg("--hooks-dir")
            .arg(hooks.path())
            .args([
                "run",
                "--rm",
                "--network",
                "none",
                "--runtime",
                "/usr/sbin/runc",
            ])
            .arg("--cgroup-parent")
            .arg(podman.parent.relative())
            .args(veil_tests::podman::ULIMITS)
            .args(["--annotation", &format!("dev.veil.sandbox={sandbox}")])
            // Without the shim nothing sets the placeholder or the CA: the caller does.
            .args(["-e", &format!("{VAR}={}", key.placeholder)])
            .args(["-v", &trust, "-v", &volume, &image])
            .args(["sh", "-c", &report_script(&w)]);
        output_within(&mut cmd, RUN)
    };
    let ca = std::fs::read_to_string(&w.bundle).unwrap_or_default();
    let agent_ca = veil_tests::bind::local(
        veil,
        &veil_link::LocalRequest::Describe {
            sandbox: "ctr-hooksd".parse().expect("id"),
        },
    );
    let veil_link::LocalResponse::Declared(d) = agent_ca else {
        panic!("describe: {agent_ca:?}");
    };
    std::fs::write(out.path().join("ca.pem"), format!("{ca}\n{}", d.ca_pem)).expect("ca");
    let refused = run("nobody-declared");
    assert!(!refused.status.success(), "an undeclared sandbox started");
    assert!(!out.path().join("ran").exists(), "the refused workload ran");
    let ran = run("ctr-hooksd");
    assert!(
        ran.status.success(),
        "{}",
        String::from_utf8_lossy(&ran.stderr).replace(&key.value, "<VALUE!>")
    );
    assert!(
        last_bearer_is(&w, &key.value),
        "hooks.d container not substituted"
    );
    assert_eq!(get(veil, "ctr-hooksd").0, 404, "poststop did not unbind");
}

/// Whether the container wrote curl's status (the file exists before the shell writes into it).
fn reported(curl: &std::path::Path) -> bool {
    std::fs::read_to_string(curl).is_ok_and(|s| !s.trim().is_empty())
}
