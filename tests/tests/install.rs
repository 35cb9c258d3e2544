//! `cargo xtask install` and the hardened systemd units.
//!
//! systemd is not PID 1 on these machines, so the units' restrictions are proven by emulation:
//! each daemon runs with the capability bounding set and writable paths read from its own unit
//! file (setpriv + a private, read-only mount namespace), and must still do its job — including
//! an agent restart that finds its bpffs pins where it left them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use veil_tests::agent::AgentOptions;
use veil_tests::cmd::wait_until;
use veil_tests::{NetNs, Sandbox, TcpHello, Veil, World, bin_path, require_root};

fn xtask(args: &[&str]) {
    let out = Command::new(bin_path("xtask"))
        .args(args)
        .output()
        .expect("run xtask");
    assert!(
        out.status.success(),
        "xtask {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn profile_dir() -> PathBuf {
    bin_path("veil-agent")
        .parent()
        .expect("profile dir")
        .to_path_buf()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// `key=` values of a unit file (last one wins, as in systemd).
fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .next_back()
        .unwrap_or("")
        .trim()
        .to_owned()
}

#[test]
fn install_lays_out_the_tree_idempotently_and_systemd_accepts_the_units() {
    require_root();
    let dest = tempfile::tempdir().expect("tempdir");
    let d = dest.path();
    let from = profile_dir();
    let args = [
        "install",
        "--destdir",
        d.to_str().expect("utf-8"),
        "--from",
        from.to_str().expect("utf-8"),
    ];
    xtask(&args);

    for (path, want) in [
        ("usr/local/bin/veil-control", 0o755),
        ("usr/local/bin/veil-agent", 0o755),
        ("usr/local/bin/veil-oci-hook", 0o755),
        ("etc/veil/oci-hook.toml", 0o644),
        ("etc/systemd/system/veil-control.service", 0o644),
        ("etc/systemd/system/veil-agent.service", 0o644),
        ("etc/veil/control.toml", 0o640),
        ("etc/veil/agent.toml", 0o640),
        ("var/lib/veil", 0o700),
        ("var/lib/veil/control", 0o700),
        ("var/lib/veil/agent", 0o700),
        ("usr/local/share/doc/veil/README.md", 0o644),
    ] {
        assert_eq!(mode(&d.join(path)), want, "{path}");
    }
    // The shipped configs parse as the daemons' own config and document every key.
    let out = Command::new(d.join("usr/local/bin/veil-agent"))
        .args(["teardown", "--sandbox", "none", "--config"])
        .arg(d.join("etc/veil/agent.toml"))
        .args(["--state-dir"])
        .arg(d.join("var/lib/veil/agent"))
        .args(["--pin-dir", "/sys/fs/bpf/veil-install-test-unused"])
        .output()
        .expect("veil-agent teardown");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("invalid config"),
        "shipped agent.toml rejected: {stderr}"
    );

    // Idempotent: a second install keeps an operator's config edit and replaces the rest.
    let edited = "# edited by the operator\nlisten = \"127.0.0.1:3999\"\n";
    std::fs::write(d.join("etc/veil/control.toml"), edited).expect("edit");
    xtask(&args);
    assert_eq!(
        std::fs::read_to_string(d.join("etc/veil/control.toml")).expect("read"),
        edited
    );

    // systemd-analyze verify, with ExecStart pointed at the staged binaries.
    let units = tempfile::tempdir().expect("tempdir");
    let mut files = Vec::new();
    for unit in ["veil-control.service", "veil-agent.service"] {
        let text = std::fs::read_to_string(d.join("etc/systemd/system").join(unit)).expect("unit");
        let text = text.replace(
            "/usr/local/bin/",
            &format!("{}/usr/local/bin/", d.display()),
        );
        let path = units.path().join(unit);
        std::fs::write(&path, text).expect("write unit");
        files.push(path);
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&files)
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    xtask(&["uninstall", "--destdir", d.to_str().expect("utf-8")]);
    assert!(!d.join("usr/local/bin/veil-agent").exists());
    assert!(
        d.join("etc/veil/control.toml").exists(),
        "config kept without --purge"
    );
    xtask(&[
        "uninstall",
        "--destdir",
        d.to_str().expect("utf-8"),
        "--purge",
    ]);
    assert!(!d.join("etc/veil").exists() && !d.join("var/lib/veil").exists());
}

/// A wrapper that runs `exec` as its unit would: capability bounding set `caps` (setpriv
/// syntax), no_new_privs, and every mount read-only except the API file systems and `rw`.
fn confine_script(dir: &Path, name: &str, exec: &Path, caps: &str, rw: &[&Path]) -> PathBuf {
    let rw: Vec<String> = rw.iter().map(|p| p.display().to_string()).collect();
    let bounding = if caps.is_empty() {
        "-all".to_owned()
    } else {
        format!("-all,{caps}")
    };
    let script = format!(
        r#"#!/bin/sh
set -eu
if [ -z "${{CONFINED:-}}" ]; then
  CONFINED=1 exec unshare --mount --propagation slave -- "$0" "$@"
fi
RW="{rw}"
for p in $RW; do mount --bind "$p" "$p"; done
awk '{{print $5}}' /proc/self/mountinfo | sort -u | while read -r m; do
  case "$m" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue ;; esac
  keep=no
  for p in $RW; do [ "$m" = "$p" ] && keep=yes; done
  [ "$keep" = yes ] || mount -o remount,bind,ro "$m" 2>/dev/null || true
done
unset CONFINED
exec setpriv --no-new-privs --bounding-set {bounding} --inh-caps -all -- {exec} "$@"
"#,
        rw = rw.join(" "),
        exec = exec.display()
    );
    let path = dir.join(name);
    std::fs::write(&path, script).expect("write wrapper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// `CAP_BPF CAP_NET_ADMIN` → `+bpf,+net_admin` (setpriv's syntax).
fn setpriv_caps(unit_caps: &str) -> String {
    unit_caps
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect::<Vec<_>>()
        .join(",")
}

/// The `CapBnd:` mask of a process, as a set of capability numbers.
fn bounding_set(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .expect("CapBnd")
        .trim();
    u64::from_str_radix(hex, 16).expect("hex")
}

fn no_new_privs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["NoNewPrivs:", "1"])
}

/// Whether `/` is mounted read-only in the process's mount namespace.
fn root_read_only(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .expect("mountinfo")
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .is_some_and(|l| {
            l.split_whitespace()
                .nth(5)
                .is_some_and(|o| o.split(',').any(|f| f == "ro"))
        })
}

#[test]
fn both_daemons_work_under_their_units_restrictions_and_pins_survive_a_restart() {
    require_root();
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../xtask/dist");
    let control_unit = std::fs::read_to_string(units.join("veil-control.service")).expect("unit");
    let agent_unit = std::fs::read_to_string(units.join("veil-agent.service")).expect("unit");
    let control_caps = setpriv_caps(&unit_value(&control_unit, "CapabilityBoundingSet"));
    let agent_caps = setpriv_caps(&unit_value(&agent_unit, "CapabilityBoundingSet"));
    assert!(
        control_caps.is_empty(),
        "control needs no capability: {control_caps}"
    );
    assert!(
        agent_unit.contains("NoNewPrivileges=yes") && control_unit.contains("NoNewPrivileges=yes")
    );
    assert!(
        agent_unit.contains("ProtectSystem=strict")
            && control_unit.contains("ProtectSystem=strict")
    );

    // The units' writable paths that exist here, plus /tmp standing in for the state and
    // runtime dirs (the fixtures keep data dirs, sockets and state in temp dirs).
    let tmp = Path::new("/tmp");
    let bpffs = Path::new("/sys/fs/bpf");
    let dir = tempfile::tempdir().expect("tempdir");
    let control = confine_script(
        dir.path(),
        "control",
        &bin_path("veil-control"),
        &control_caps,
        &[tmp],
    );
    let agent = confine_script(
        dir.path(),
        "agent",
        &bin_path("veil-agent"),
        &agent_caps,
        &[tmp, bpffs],
    );
    // The other test in this binary starts no veil-control: the process-wide override is safe.
    // SAFETY: no other thread of this test binary reads the environment concurrently.
    unsafe { std::env::set_var("VEIL_CONTROL_BIN", &control) };

    // What the unit's ExecStartPre does: bpffs mounted in the host namespace, so the pins
    // outlive the agent's private mount namespace.
    let mounted = Command::new("sh")
        .args([
            "-c",
            "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf",
        ])
        .status()
        .expect("sh");
    assert!(mounted.success(), "cannot mount bpffs");

    let world = World::new();
    let hello = TcpHello::start(world.netns(), world.upstream_v4().into(), "U");
    let ns = NetNs::new("confined");
    let link = world.link_sandbox(&ns);
    let sb = Sandbox::new("confined", Some(&ns));
    let veil = Veil::start_with(
        AgentOptions {
            binary: Some(agent),
            ..AgentOptions::default()
        },
        &[sb.agent_entry("confined")],
    );

    // The restrictions really apply: bounding set as the unit says, no_new_privs, / read-only.
    let agent_pid = veil.pid();
    let expected: u64 = [39u32, 12, 21, 38, 19] // BPF, NET_ADMIN, SYS_ADMIN, PERFMON, SYS_PTRACE
        .iter()
        .map(|c| 1u64 << c)
        .sum();
    assert_eq!(bounding_set(agent_pid), expected, "agent bounding set");
    assert!(no_new_privs(agent_pid) && root_read_only(agent_pid));
    let control_pid = veil.control().pid().expect("control pid");
    assert_eq!(bounding_set(control_pid), 0, "control bounding set");
    assert!(no_new_privs(control_pid) && root_read_only(control_pid));

    // Redirected to the agent's loopback listener, and forwarded from inside the sandbox's
    // netns (egress "sandbox": the confined agent can still enter it).
    let through_agent = || {
        let out = sb.probe(&["tcp", "--addr", &hello.addr().to_string()]);
        out.hello().map(|(_, p)| p.ip()) == Some(link.sandbox_v4().into())
            && out.json["local"]
                .as_str()
                .is_some_and(|l| l.starts_with("127.0.0.1:"))
    };
    assert!(through_agent(), "confined agent does not proxy");

    // Restarted under the same restrictions, the agent finds its pins and serves again.
    veil.agent().kill();
    assert!(
        !through_agent(),
        "with the agent down the sandbox must fail closed"
    );
    veil.agent().respawn();
    assert!(
        wait_until(Duration::from_secs(5), through_agent),
        "the restarted confined agent did not re-adopt its pinned sandbox:\n{}",
        veil.agent().log_tail(20)
    );
}

/// `pub <field>:` names of `pub struct <name> { … }` in Rust source `src`.
fn struct_fields(src: &str, name: &str) -> Vec<(String, String)> {
    let start = src
        .find(&format!("pub struct {name} {{"))
        .unwrap_or_else(|| panic!("no struct {name}"));
    let body = &src[start..];
    let body = &body[..body.find("\n}").expect("struct end")];
    body.lines()
        .filter_map(|l| l.trim().strip_prefix("pub "))
        .filter_map(|l| l.split_once(':'))
        .filter(|(field, _)| !field.contains(' '))
        .map(|(field, ty)| (field.to_owned(), ty.trim().trim_end_matches(',').to_owned()))
        .collect()
}

/// The keys (`table.key`, or `key` at the top level) of every struct in `structs` (table name,
/// struct name) from `src`; a field whose type is another listed struct is a table, not a key.
fn config_keys(src: &str, structs: &[(&str, &str)]) -> Vec<String> {
    let mut keys = Vec::new();
    for (table, name) in structs {
        for (field, ty) in struct_fields(src, name) {
            if structs.iter().any(|(_, s)| *s == ty) {
                continue;
            }
            keys.push(if table.is_empty() {
                field
            } else {
                format!("{table}.{field}")
            });
        }
    }
    keys
}

/// Every `table.key` (or top-level `key`) set in a TOML text.
fn toml_keys(text: &str) -> Vec<String> {
    let table: toml::Table = toml::from_str(text).expect("valid TOML");
    let mut keys = Vec::new();
    for (k, v) in &table {
        match v.as_table() {
            Some(inner) => keys.extend(inner.keys().map(|ik| format!("{k}.{ik}"))),
            None => keys.push(k.clone()),
        }
    }
    keys
}

#[test]
fn shipped_configs_and_the_readme_document_every_config_key() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let read = |p: &str| {
        std::fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("reading {p}: {e}"))
    };
    let readme = read("README.md");
    for (config_rs, structs, dist) in [
        (
            "proxy-agent/src/config.rs",
            vec![("agent", "AgentSettings")],
            "xtask/dist/agent.toml",
        ),
        (
            "control/src/config.rs+control/src/config/store.rs+control/src/config/fleet.rs",
            vec![
                ("", "Config"),
                ("sandbox", "SandboxConfig"),
                ("agent", "AgentConfig"),
                ("run", "RunConfig"),
                ("store", "StoreConfig"),
                ("fleet", "FleetConfig"),
            ],
            "xtask/dist/control.toml",
        ),
    ] {
        // A config may span files (`a.rs+b.rs`).
        let source: String = config_rs.split('+').map(read).collect();
        let mut want = config_keys(&source, &structs);
        want.sort();
        let shipped = read(dist);
        let mut have = toml_keys(&shipped);
        have.sort();
        assert_eq!(have, want, "{dist} vs the keys of {config_rs}");
        // The README's reference carries the shipped file's settings line for line.
        for line in shipped
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        {
            assert!(
                readme.lines().any(|r| r == line),
                "README's configuration reference lacks `{line}` from {dist}"
            );
        }
    }
}
