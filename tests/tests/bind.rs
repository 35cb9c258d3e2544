//! Declare, then bind: a sandbox declared through the REST API (no cgroup) reaches no agent;
//! bound through the agent's local socket (a fresh cgroup and netns, as a container runtime's
//! hook binds one) it is redirected before the Bind is answered; unbound, its declaration goes
//! (or stays with `keep`); a removed or replaced cgroup is reaped. Values are never printed.

use std::time::Duration;

use serde_json::json;
use veil_link::{LocalRequest, LocalResponse, RefusalKind};
use veil_tests::bind::{
    Container, declare, gauge, get, is_mounted, local, pins_dir, put, recreate_cgroup, refusal,
    write_bundle,
};
use veil_tests::cmd::wait_until;
use veil_tests::intercept_world::{InterceptWorld, Secret};
use veil_tests::sandbox_map_has;

const ALLOWED: &str = "api.allowed.test";

fn world() -> (InterceptWorld, Secret) {
    let w = InterceptWorld::builder("bind test CA", &[ALLOWED])
        .metrics()
        .start();
    let key = w.secret("upstream-key", &[ALLOWED], json!({}));
    (w, key)
}

fn sid(id: &str) -> veil_link::SandboxId {
    id.parse().expect("sandbox id")
}

/// The placeholder is replaced by the value at the allowed upstream: one curl from `c`.
fn assert_substituted(w: &InterceptWorld, c: &Container, key: &Secret) {
    let before = w.seen().len();
    let auth = format!("Authorization: Bearer {}", key.placeholder);
    let (ok, out) = c.curl(
        &w.bundle,
        &["-H", &auth, &w.url(ALLOWED, "/bind")],
        &key.value,
    );
    assert!(ok, "curl from the bound sandbox failed: {out}");
    let seen = w.seen();
    assert!(seen.len() > before, "the upstream saw no request");
    let got = seen.last().expect("request");
    let header = got
        .headers
        .iter()
        .find(|(n, _)| n == "authorization")
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    assert!(
        header == format!("Bearer {}", key.value),
        "the upstream did not receive the value (placeholder sent: {})",
        header.contains(&key.placeholder)
    );
}

#[test]
fn declared_sandboxes_reach_no_agent_until_bound() {
    let (w, key) = world();
    let veil = &w.veil;
    let declared = declare(veil, "app-1", &[("MY_KEY", "upstream-key")], false);
    assert_eq!(declared["env"]["MY_KEY"], key.placeholder.as_str());
    assert_eq!(declared["bound"], false);
    assert!(declared["caCertificate"].as_str().is_some());
    assert_eq!(get(veil, "app-1").1["bound"], false);
    // Least privilege: the agent holds neither the sandbox nor its only secret.
    assert_eq!(gauge(&w, "secrets"), 0.0, "the agent got a secret");
    let state = std::fs::read_to_string(veil.agent().state_dir().join("sandboxes.json"))
        .unwrap_or_default();
    assert!(
        !state.contains("app-1"),
        "the agent holds the declared sandbox"
    );

    // Describe: the placeholders and the agent's CA, not bound.
    let LocalResponse::Declared(d) = local(
        veil,
        &LocalRequest::Describe {
            sandbox: sid("app-1"),
        },
    ) else {
        panic!("describe refused");
    };
    assert_eq!(d.env["MY_KEY"], key.placeholder);
    assert!(!d.bound && d.ca_pem.contains("BEGIN CERTIFICATE"));

    // Bind: answered once the redirect is live, so the first connection is intercepted.
    let c = Container::new(&w, "app-1", &[ALLOWED]);
    let answer = local(veil, &c.bind_request("app-1"));
    let LocalResponse::Bound(d) = answer else {
        panic!("bind refused: {answer:?}\n{}", veil.agent().log_tail(20));
    };
    assert!(d.bound);
    write_bundle(&w, &d.ca_pem);
    assert_substituted(&w, &c, &key);
    let got = get(veil, "app-1").1;
    assert_eq!(got["bound"], true);
    assert_eq!(
        got["cgroup"],
        c.sandbox.cgroup().relative().trim_start_matches('/')
    );
    let pin = pins_dir(veil)
        .join("app-1")
        .join(c.sandbox.cgroup().id().to_string());
    assert_eq!(
        got["netns"],
        pin.display().to_string(),
        "control holds the agent's pin"
    );
    assert!(is_mounted(&pin), "the netns is pinned");
    assert!(gauge(&w, "secrets") >= 1.0);

    // Unbind without keep: the declaration goes, the pin and the redirect too.
    let answer = local(
        veil,
        &LocalRequest::Unbind {
            sandbox: sid("app-1"),
        },
    );
    assert_eq!(
        answer,
        LocalResponse::Unbound {
            sandbox: sid("app-1")
        }
    );
    assert_eq!(
        get(veil, "app-1").0,
        404,
        "declaration without keep removed"
    );
    assert!(!pin.exists() && !is_mounted(&pin), "netns pin left behind");
    assert!(
        !pins_dir(veil).join("app-1").exists(),
        "pin dir left behind"
    );
    assert!(
        !sandbox_map_has(c.sandbox.cgroup().id()),
        "redirect left behind"
    );
    assert_eq!(gauge(&w, "secrets"), 0.0, "the agent kept the secret");
}

#[test]
fn keep_lets_a_restarted_container_bind_again() {
    let (w, key) = world();
    let veil = &w.veil;
    declare(veil, "app-keep", &[("MY_KEY", "upstream-key")], true);
    let c = Container::new(&w, "app-keep-1", &[ALLOWED]);
    let LocalResponse::Bound(d) = local(veil, &c.bind_request("app-keep")) else {
        panic!("bind refused");
    };
    write_bundle(&w, &d.ca_pem);
    assert_substituted(&w, &c, &key);
    let answer = local(
        veil,
        &LocalRequest::Unbind {
            sandbox: sid("app-keep"),
        },
    );
    assert!(
        matches!(answer, LocalResponse::Unbound { .. }),
        "{answer:?}"
    );
    let (status, got) = get(veil, "app-keep");
    assert_eq!(
        (status, &got["bound"], &got["keep"]),
        (200, &json!(false), &json!(true))
    );
    assert_eq!(got["env"]["MY_KEY"], key.placeholder.as_str());
    // A new container (new cgroup, new netns) binds the same declaration.
    drop(c);
    let c2 = Container::new(&w, "app-keep-2", &[ALLOWED]);
    let answer = local(veil, &c2.bind_request("app-keep"));
    assert!(matches!(answer, LocalResponse::Bound(_)), "{answer:?}");
    assert_substituted(&w, &c2, &key);
    // DELETE removes a bound declaration as any sandbox.
    veil.unregister("app-keep");
    assert!(
        !pins_dir(veil).join("app-keep").exists(),
        "pin left after DELETE"
    );
}

#[test]
fn refused_binds_change_nothing() {
    let (w, _key) = world();
    let veil = &w.veil;
    let c = Container::new(&w, "refused", &[ALLOWED]);
    // Undeclared.
    let answer = local(veil, &c.bind_request("nobody-declared"));
    assert_eq!(refusal(&answer), RefusalKind::NotDeclared, "{answer:?}");
    declare(veil, "app-r", &[("MY_KEY", "upstream-key")], false);
    // A cgroup outside the allowed parents (it exists: the cgroup2 root's own child).
    let outside = LocalRequest::Bind {
        sandbox: sid("app-r"),
        cgroup: "/init.scope".into(),
        netns: Some(c.netns.path().to_owned()),
    };
    let answer = local(veil, &outside);
    assert_eq!(refusal(&answer), RefusalKind::BadTarget, "{answer:?}");
    // A cgroup that does not exist.
    let missing = LocalRequest::Bind {
        sandbox: sid("app-r"),
        cgroup: "/veil-test.slice/no-such-cgroup".into(),
        netns: None,
    };
    assert_eq!(refusal(&local(veil, &missing)), RefusalKind::BadTarget);
    // A netns that is a regular file.
    let file = w.scratch().join("not-a-netns");
    std::fs::write(&file, b"").expect("file");
    let fake = LocalRequest::Bind {
        sandbox: sid("app-r"),
        cgroup: c.sandbox.cgroup().relative().into(),
        netns: Some(file),
    };
    assert_eq!(refusal(&local(veil, &fake)), RefusalKind::BadTarget);
    // Nothing changed: still declared, unbound, no pin.
    assert_eq!(get(veil, "app-r").1["bound"], false);
    assert!(
        !pins_dir(veil).join("app-r").exists(),
        "pin left by a refused bind"
    );
    // Bound once; a second bind (from another cgroup) is refused and changes nothing.
    assert!(matches!(
        local(veil, &c.bind_request("app-r")),
        LocalResponse::Bound(_)
    ));
    let other = Container::new(&w, "refused-2", &[ALLOWED]);
    let answer = local(veil, &other.bind_request("app-r"));
    assert_eq!(refusal(&answer), RefusalKind::AlreadyBound, "{answer:?}");
    let live_pin = pins_dir(veil)
        .join("app-r")
        .join(c.sandbox.cgroup().id().to_string());
    assert!(
        is_mounted(&live_pin),
        "a refused bind took the live binding's pin"
    );
    // The same container bound again: refused, the live pin untouched.
    let answer = local(veil, &c.bind_request("app-r"));
    assert_eq!(refusal(&answer), RefusalKind::AlreadyBound, "{answer:?}");
    assert!(
        is_mounted(&live_pin),
        "a refused bind took the live binding's pin"
    );
    let other_pin = pins_dir(veil)
        .join("app-r")
        .join(other.sandbox.cgroup().id().to_string());
    assert!(!other_pin.exists(), "a refused bind left its pin");
    let got = get(veil, "app-r").1;
    assert_eq!(
        got["cgroup"],
        c.sandbox.cgroup().relative().trim_start_matches('/')
    );
    assert!(!sandbox_map_has(other.sandbox.cgroup().id()));
    // The same cgroup for a second declared sandbox: refused (one sandbox per cgroup).
    declare(veil, "app-r2", &[], false);
    let answer = local(veil, &c.bind_request("app-r2"));
    assert_eq!(refusal(&answer), RefusalKind::BadTarget, "{answer:?}");
    assert_eq!(get(veil, "app-r2").1["bound"], false);
}

#[test]
fn a_removed_or_replaced_cgroup_is_reaped() {
    let (w, key) = world();
    let veil = &w.veil;
    declare(veil, "app-gone", &[("MY_KEY", "upstream-key")], false);
    let c = Container::new(&w, "gone", &[ALLOWED]);
    let LocalResponse::Bound(d) = local(veil, &c.bind_request("app-gone")) else {
        panic!("bind refused");
    };
    write_bundle(&w, &d.ca_pem);
    assert_substituted(&w, &c, &key);
    let cgroup = c.sandbox.cgroup().path().to_owned();
    let old_id = c.sandbox.cgroup().id();
    let pin = pins_dir(veil)
        .join("app-gone")
        .join(c.sandbox.cgroup().id().to_string());
    // The container stops: its processes die and the runtime removes the cgroup.
    c.sandbox.cgroup().kill_all();
    std::fs::remove_dir(&cgroup).expect("rmdir cgroup");
    let reaped = wait_until(Duration::from_secs(5), || get(veil, "app-gone").0 == 404);
    assert!(
        reaped,
        "sandbox not reaped within 5 s:\n{}",
        veil.agent().log_tail(20)
    );
    assert!(
        wait_until(Duration::from_secs(5), || !is_mounted(&pin)
            && !pin.exists()),
        "netns pin left behind"
    );
    assert!(!sandbox_map_has(old_id), "map entry left behind");
    // A new cgroup at the same path (a `docker restart`) is not the old sandbox.
    recreate_cgroup(&cgroup);
    let new_id = c.sandbox.cgroup().id();
    assert_ne!(new_id, old_id);
    assert!(!sandbox_map_has(new_id), "the new cgroup is redirected");
    assert_eq!(get(veil, "app-gone").0, 404);
}

#[test]
fn a_replaced_cgroup_with_keep_is_unbound_not_enforced() {
    let (w, _key) = world();
    let veil = &w.veil;
    declare(veil, "app-restart", &[("MY_KEY", "upstream-key")], true);
    let c = Container::new(&w, "restart", &[ALLOWED]);
    assert!(matches!(
        local(veil, &c.bind_request("app-restart")),
        LocalResponse::Bound(_)
    ));
    let cgroup = c.sandbox.cgroup().path().to_owned();
    c.sandbox.cgroup().kill_all();
    std::fs::remove_dir(&cgroup).expect("rmdir");
    recreate_cgroup(&cgroup);
    let new_id = c.sandbox.cgroup().id();
    let unbound = wait_until(Duration::from_secs(5), || {
        get(veil, "app-restart").1["bound"] == false
    });
    assert!(
        unbound,
        "replaced cgroup not unbound:\n{}",
        veil.agent().log_tail(20)
    );
    assert!(
        !sandbox_map_has(new_id),
        "the new cgroup is redirected as the old sandbox"
    );
    // The restarted container binds again (the declaration was kept).
    let answer = local(veil, &c.bind_request("app-restart"));
    assert!(
        matches!(answer, LocalResponse::Bound(_)),
        "{answer:?}\n{}",
        veil.agent().log_tail(20)
    );
    assert!(sandbox_map_has(new_id));
}

#[test]
fn without_control_binds_are_unavailable() {
    let (mut w, _key) = world();
    declare(&w.veil, "app-u", &[], false);
    w.veil.control_mut().stop();
    let veil = &w.veil;
    let c = Container::new(&w, "unavail", &[ALLOWED]);
    let gone = wait_until(Duration::from_secs(10), || {
        refusal_kind(local(veil, &c.bind_request("app-u"))) == Some(RefusalKind::Unavailable)
    });
    assert!(gone, "bind without control not refused as unavailable");
    assert!(
        !pins_dir(veil).join("app-u").exists(),
        "pin left by an unavailable bind"
    );
}

fn refusal_kind(a: LocalResponse) -> Option<RefusalKind> {
    match a {
        LocalResponse::Refused { kind, .. } => Some(kind),
        _ => None,
    }
}

#[test]
fn declarations_through_post_get_unguessable_ids() {
    let (w, key) = world();
    let veil = &w.veil;
    let (status, a) = veil.block_on(veil.api().post(
        "/sandbox",
        veil.key(),
        json!({"secrets": [{"MY_KEY": "upstream-key"}]}),
    ));
    assert_eq!(status, 201, "{a}");
    let (_, b) = veil.block_on(veil.api().post("/sandbox", veil.key(), json!({})));
    let (ida, idb) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    assert_ne!(ida, idb);
    assert_eq!(ida.len(), 36, "a UUID: {ida}");
    assert_eq!(a["env"]["MY_KEY"], key.placeholder.as_str());
    assert_eq!(a["bound"], false);
    // A cgroup in a POST is refused: it declares only.
    let (status, _) = veil.block_on(veil.api().post(
        "/sandbox",
        veil.key(),
        json!({"cgroup": "veil-test.slice/x"}),
    ));
    assert_eq!(status, 400);
    // A netns without a cgroup is refused.
    let (status, body) = put(veil, "app-n", json!({"netns": "/run/netns/x"}));
    assert_eq!(status, 400, "{body}");
}
