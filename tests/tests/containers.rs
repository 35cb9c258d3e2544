//! Containers get a declared sandbox's secrets with no glue: `veil-oci-hook` as the runtime
//! gives the container the placeholders and veil's CA, binds it before its workload runs and
//! unbinds it when it stops. Real runc containers (shared busybox+curl rootfs, the harness's
//! netns and cgroups), a real TLS upstream that echoes requests; values are never printed.

use std::time::Duration;

use veil_tests::bind::{declare, get};
use veil_tests::oci_world::{
    Place, VAR, echo_world, env_values, last_bearer_is, report_script, rundir_left,
};
use veil_tests::runc::RuncContainer;

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
