//! `veil-control run` end to end: a real control + agent, the CLI as a child process of the test
//! with VEIL_API_URL / VEIL_API_KEY, and real commands inside the sandbox it makes.
//!
//! Name resolution with `--netns` is tested without any outside DNS: the test runs a tiny DNS
//! responder in a World netns and hands `veil-control run --resolv-conf FILE` a resolv.conf
//! naming it, so the forwarder veil-control run serves for the sandbox asks the test's responder.
//! Assertions never print the secret value: they compare and report booleans.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use veil_tests::agent::AgentOptions;
use veil_tests::cgroup::PARENT;
use veil_tests::control::control_bin;
use veil_tests::runcli::{
    DEFAULT_UIDS, NAME, Running, Setup, UID_RECORDS, line_value, run_with_pid, sandbox_id,
};
use veil_tests::veil::ORG;
use veil_tests::{HttpsUpstream, TestCa, UpstreamReply, World, cgroup2_mount};

#[test]
fn command_sees_placeholder_runs_unprivileged_and_its_exit_code_comes_back() {
    let s = Setup::new(AgentOptions::default());
    let script = r#"printf 'K=%s\n' "$K"; echo "uid=$(id -u)"; echo "veilvars=$(env | grep -c '^VEIL_')";
        grep NoNewPrivs /proc/self/status; echo "veilca=$(grep -c 'veil interception CA' "$SSL_CERT_FILE")";
        echo "node=$NODE_EXTRA_CA_CERTS"; echo "ssl=$SSL_CERT_FILE"; cat /proc/self/cgroup; exit 7"#;
    let (pid, out) = run_with_pid(&mut s.command(&[], script));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let leaked = stdout.contains(&s.value) || stderr.contains(&s.value);
    assert!(!leaked, "the secret value reached the command's output");
    assert_eq!(
        out.status.code(),
        Some(7),
        "exit status {:?}; stdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert_eq!(
        line_value(&stdout, "K="),
        Some(s.placeholder.as_str()),
        "K is not the placeholder"
    );
    let uid = line_value(&stdout, "uid=").unwrap_or_default();
    assert!(!uid.is_empty() && uid != "0", "command ran as uid {uid:?}");
    assert_eq!(line_value(&stdout, "veilvars="), Some("0"), "VEIL_* in env");
    assert!(
        stdout
            .lines()
            .any(|l| l.split_whitespace().eq(["NoNewPrivs:", "1"])),
        "no_new_privs not set:\n{stdout}"
    );
    assert_eq!(
        line_value(&stdout, "veilca="),
        Some("1"),
        "veil CA not in bundle"
    );
    let ssl = line_value(&stdout, "ssl=").unwrap_or_default();
    assert!(!ssl.is_empty(), "SSL_CERT_FILE unset");
    assert_eq!(line_value(&stdout, "node="), Some(ssl));
    assert!(!Path::new(ssl).exists(), "CA bundle {ssl} left behind");
    let id = sandbox_id(&stdout);
    s.assert_gone(&id, pid);
}

#[test]
fn unknown_command_and_secret_fail_cleanly() {
    let s = Setup::new(AgentOptions::default());
    for (args, code) in [
        (vec!["--", "/nonexistent/veil-no-such-program"], 127),
        (vec!["--secret", "K=no-such-secret", "--", "true"], 125),
    ] {
        let mut cmd = Command::new(control_bin());
        cmd.args(["run", "--cgroup-parent", PARENT])
            .args(&args)
            .env("VEIL_API_URL", s.veil.control().url())
            .env("VEIL_API_KEY", s.veil.key());
        let (pid, out) = run_with_pid(&mut cmd);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {out:?}");
        let prefix = format!("run-{pid}-");
        let left: Vec<String> = std::fs::read_dir(cgroup2_mount().join(PARENT))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&prefix))
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "{args:?} left cgroups {left:?}");
    }
}

/// A DNS responder (UDP and TCP) in a World netns answering A queries for [`NAME`].
struct Dns {
    addr: Ipv4Addr,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The answer to a DNS query: `answer` for an A query of [`NAME`], an empty NOERROR for other
/// types of it, NXDOMAIN for other names.
fn dns_answer(query: &[u8], answer: Ipv4Addr) -> Option<Vec<u8>> {
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(i)?);
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(i..i + len)?).to_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*query.get(i)?, *query.get(i + 1)?]);
    let question_end = i + 4;
    let name = labels.join(".");
    let mut out = query.get(..2)?.to_vec();
    let known = name == NAME;
    let a = known && qtype == 1;
    out.extend_from_slice(&[0x81, if known { 0x80 } else { 0x83 }]);
    out.extend_from_slice(&[0, 1, 0, u8::from(a), 0, 0, 0, 0]);
    out.extend_from_slice(query.get(12..question_end)?);
    if a {
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        out.extend_from_slice(&answer.octets());
    }
    Some(out)
}

impl Dns {
    fn start(world: &World, answer: Ipv4Addr) -> Dns {
        let addr = world.upstream_v4();
        let (udp, tcp) = world.netns().run(move || {
            let udp = UdpSocket::bind((addr, 53)).expect("bind DNS udp");
            udp.set_read_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
            let tcp = std::net::TcpListener::bind((addr, 53)).expect("bind DNS tcp");
            tcp.set_nonblocking(true).expect("nonblocking");
            (udp, tcp)
        });
        let stop = Arc::new(AtomicBool::new(false));
        let stop_udp = stop.clone();
        let udp_thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stop_udp.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = udp.recv_from(&mut buf)
                    && let Some(reply) = dns_answer(&buf[..n], answer)
                {
                    let _ = udp.send_to(&reply, peer);
                }
            }
        });
        let stop_tcp = stop.clone();
        let tcp_thread = std::thread::spawn(move || {
            while !stop_tcp.load(Ordering::Relaxed) {
                let Ok((mut s, _)) = tcp.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut len = [0u8; 2];
                if s.read_exact(&mut len).is_err() {
                    continue;
                }
                let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if s.read_exact(&mut q).is_err() {
                    continue;
                }
                if let Some(reply) = dns_answer(&q, answer) {
                    let mut msg = u16::try_from(reply.len())
                        .unwrap_or(0)
                        .to_be_bytes()
                        .to_vec();
                    msg.extend_from_slice(&reply);
                    let _ = s.write_all(&msg);
                }
            }
        });
        Dns {
            addr,
            stop,
            threads: vec![udp_thread, tcp_thread],
        }
    }

    /// A resolv.conf naming this responder (for `--resolv-conf`).
    fn resolv_conf(&self) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp resolv.conf");
        writeln!(f, "nameserver {}\noptions timeout:2 attempts:2", self.addr).expect("write");
        f
    }
}

#[test]
fn netns_sandbox_resolves_names_and_is_removed() {
    let world = World::new();
    let dns = Dns::start(&world, world.upstream_v4());
    let resolv = dns.resolv_conf();
    let s = Setup::new(AgentOptions::default());
    // The second lookup goes over TCP (glibc's `use-vc`): a TCP connection to a host address
    // would be redirected into veil, whose egress rules refuse the host itself.
    let script = format!(
        "getent ahostsv4 {NAME} | head -n1; echo \"tcp=$(RES_OPTIONS=use-vc getent ahostsv4 {NAME} | head -n1)\"; \
         cat /proc/self/cgroup; echo \"netns=$(readlink /proc/self/ns/net)\"; \
         echo \"fds=$(ls -l /proc/self/fd | tr '\\n' ' ')\"; exit 3"
    );
    let resolv_path = resolv.path().to_string_lossy().into_owned();
    let (pid, out) =
        run_with_pid(&mut s.command(&["--netns", "--resolv-conf", &resolv_path], &script));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "exit status {:?}; stdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let resolved = stdout
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_default();
    assert_eq!(
        resolved,
        world.upstream_v4().to_string(),
        "{NAME} did not resolve through the sandbox's forwarder:\n{stdout}\n{stderr}"
    );
    let over_tcp = line_value(&stdout, "tcp=").unwrap_or_default();
    assert_eq!(
        over_tcp.split_whitespace().next().unwrap_or_default(),
        world.upstream_v4().to_string(),
        "{NAME} did not resolve over TCP through the sandbox's forwarder:\n{stdout}\n{stderr}"
    );
    let host_ns = std::fs::read_link("/proc/self/ns/net").expect("own netns");
    let sandbox_ns = line_value(&stdout, "netns=").unwrap_or_default();
    assert_ne!(
        sandbox_ns,
        host_ns.to_string_lossy(),
        "command shared the host netns"
    );
    // What veil-control run holds (netlink and DNS sockets, the netns, cgroup.procs, its
    // epoll) must not leak into the sandbox; what the test itself passed down may.
    let fds = line_value(&stdout, "fds=").unwrap_or_default();
    for held in ["socket:", "net:[", "cgroup.procs", "anon_inode:"] {
        assert!(
            !fds.contains(held),
            "the command inherited a {held} descriptor: {fds}"
        );
    }
    let id = sandbox_id(&stdout);
    s.assert_gone(&id, pid);
}

#[test]
fn sigint_mid_command_removes_the_sandbox() {
    let world = World::new();
    let dns = Dns::start(&world, world.upstream_v4());
    let resolv = dns.resolv_conf();
    let s = Setup::new(AgentOptions::default());
    let resolv_path = resolv.path().to_string_lossy().into_owned();
    // A background `sleep` ignores SIGINT (sh does that for `&` jobs) and outlives the shell,
    // as a daemon would: teardown must kill it with the cgroup. The shell dies of the SIGINT.
    let script = "cat /proc/self/cgroup; grep nameserver /etc/resolv.conf; sleep 60 & echo ready; \
                  wait; echo done";
    let (mut run, seen) =
        Running::start(&mut s.command(&["--netns", "--resolv-conf", &resolv_path], script));
    let pid = run.pid;
    let id = sandbox_id(&seen);
    let (status, rest) = run.stop(libc::SIGINT);
    assert_eq!(
        status.code(),
        Some(130),
        "exit status after SIGINT: {status:?}"
    );
    assert!(!rest.contains("done"), "the command was not interrupted");
    s.assert_gone(&id, pid);
}

/// `curl` in a run sandbox to a TLS upstream for [`NAME`]: the upstream gets the value, the
/// command sees only the placeholder, the exit code comes back and nothing is left. With
/// `echo`, the upstream echoes the request, which veil must scrub back to the placeholder. With
/// `host`, the run declares the sandbox and binds it through the agent's local socket.
fn upstream_gets_the_value(netns: bool, echo: bool, host: bool) {
    let world = World::new();
    let dns = Dns::start(&world, world.upstream_v4());
    let resolv = dns.resolv_conf();
    let ca = TestCa::new("run test CA");
    let up = HttpsUpstream::start_with(
        world.netns(),
        world.upstream_ip4(),
        Some((&ca, &[NAME])),
        if echo {
            UpstreamReply::Echo
        } else {
            UpstreamReply::Summary
        },
    );
    let s = Setup::new(AgentOptions {
        args: vec!["--upstream-ca".into(), ca.pem_path().into()],
        ..AgentOptions::default()
    });
    let port = up.addr().port();
    let resolv_path = resolv.path().to_string_lossy().into_owned();
    // Without --netns the sandbox uses the host's resolver, which knows no test names.
    let (mut extra, resolve) = if netns {
        (
            vec!["--netns", "--resolv-conf", resolv_path.as_str()],
            String::new(),
        )
    } else {
        (
            vec![],
            format!("--resolve {NAME}:{port}:{}", world.upstream_v4()),
        )
    };
    let local_socket = s.veil.agent().local_socket().to_string_lossy().into_owned();
    if host {
        extra.extend(["--host", "--local-socket", local_socket.as_str()]);
    }
    let script = format!(
        "curl -sS --max-time 20 {resolve} --cacert \"$SSL_CERT_FILE\" \
         -H \"Authorization: Bearer $K\" https://{NAME}:{port}/run; echo; printf 'K=%s\\n' \"$K\"; \
         cat /proc/self/cgroup; exit 5"
    );
    // The walk-through's key: it may register sandboxes, nothing else.
    let run_key = s.veil.control().apikey(ORG, &["write:sandboxes"]);
    let mut cmd = s.command(&extra, &script);
    cmd.env("VEIL_API_KEY", run_key);
    let (pid, out) = run_with_pid(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let leaked = stdout.contains(&s.value) || stderr.contains(&s.value);
    assert!(!leaked, "the secret value reached the command's output");
    assert_eq!(
        out.status.code(),
        Some(5),
        "exit status {:?}; stderr:\n{stderr}",
        out.status
    );
    let seen = up.seen();
    let got = seen
        .last()
        .and_then(|r| r.header("authorization"))
        .map(|h| h == format!("Bearer {}", s.value));
    assert_eq!(got, Some(true), "the upstream did not get the value");
    assert_eq!(line_value(&stdout, "K="), Some(s.placeholder.as_str()));
    if echo {
        let echoed = stdout.lines().next().unwrap_or_default();
        assert!(
            echoed.contains(&s.placeholder),
            "the echoed request does not show the placeholder"
        );
    }
    let id = sandbox_id(&stdout);
    s.assert_gone(&id, pid);
}

/// `run --host`: declared through the API, bound through veil-agent's local socket.
#[test]
fn upstream_gets_the_value_through_a_sandbox_bound_on_the_host() {
    upstream_gets_the_value(true, false, true);
}

#[test]
fn upstream_gets_the_value_through_a_shared_netns_sandbox() {
    upstream_gets_the_value(false, false, false);
}

#[test]
fn upstream_gets_the_value_through_a_netns_sandbox() {
    upstream_gets_the_value(true, false, false);
}

#[test]
fn echoed_value_is_scrubbed_in_a_netns_sandbox() {
    upstream_gets_the_value(true, true, false);
}

/// A cgroup tree removed on drop with what runs in it, also when the test failed half-way.
struct ParentCgroup(std::path::PathBuf);

impl Drop for ParentCgroup {
    fn drop(&mut self) {
        veil_tests::cgroup::remove_cgroup_tree(&self.0);
    }
}

#[test]
fn a_killed_run_is_reaped_by_the_next_one() {
    let world = World::new();
    let dns = Dns::start(&world, world.upstream_v4());
    let resolv = dns.resolv_conf();
    let s = Setup::new(AgentOptions::default());
    // A parent of its own: the other tests' runs (which reap under PARENT) must not reap our
    // leftover before we looked at it.
    // Named like the harness's cgroups, so cleanup_stale() removes it if this process dies.
    let parent = format!("{PARENT}/veil-test-{}-0-reap", std::process::id());
    let _parent = ParentCgroup(cgroup2_mount().join(&parent));
    let resolv_path = resolv.path().to_string_lossy().into_owned();
    let script = "cat /proc/self/cgroup; echo ready; exec sleep 60";
    let (mut run, seen) = Running::start(&mut s.command_in(
        &parent,
        &["--netns", "--resolv-conf", &resolv_path],
        script,
    ));
    let id = seen
        .lines()
        .find(|l| l.starts_with("0::/"))
        .and_then(|l| l.rsplit('/').next())
        .unwrap_or_else(|| panic!("no cgroup line:\n{seen}"))
        .to_owned();
    // Checked before the kill: once it is dead, any other test's run may reap its directory
    // and its uid record (cgroups are reaped only under their own parent, those wherever
    // they are).
    let dir = Path::new("/run/veil-run").join(&id);
    assert!(
        dir.exists(),
        "the run's directory {} is not where it should be",
        dir.display()
    );
    let record = uid_record(&id);
    assert!(record.is_some(), "the run holds no uid record");
    let (status, _) = run.stop(libc::SIGKILL);
    assert_eq!(status.code(), None, "veil-control run survived SIGKILL");
    // SIGKILL leaves everything in place (this is what the next run must clean): the sandbox
    // still runs, its uid still taken.
    let cg = cgroup2_mount().join(&parent).join(&id);
    let left = cg.exists() && uid_record(&id).is_some();
    // ... and the next run removes it (unless another test's run already did: then it is
    // gone just the same).
    let (_, out) = run_with_pid(&mut s.command_in(&parent, &[], "exit 0"));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    s.assert_gone_in(&parent, &id, run.pid);
    assert!(!dir.exists(), "the killed run's directory is left");
    assert!(
        uid_record(&id).is_none(),
        "the killed run's uid record is left"
    );
    if !left {
        // SIGKILL cleans nothing: only another test's run, reaping in between, explains this.
        eprintln!("note: sandbox {id} was reaped by another run before the next one started");
    }
}

/// The uid record (path) naming sandbox `id`, if any.
fn uid_record(id: &str) -> Option<std::path::PathBuf> {
    let records = std::fs::read_dir(UID_RECORDS)
        .into_iter()
        .flatten()
        .flatten();
    records.map(|r| r.path()).find(|p| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .any(|l| l == id)
    })
}

#[test]
fn env_passes_what_the_caller_names_and_refuses_secret_and_veil_names() {
    let s = Setup::new(AgentOptions::default());
    let script = r#"for v in GIVEN COPIED UNNAMED LANG PATH; do eval "printf '%s=%s\n' $v \"\${$v-unset}\""; done"#;
    let mut cmd = s.command(&["--env", "GIVEN=a b=c", "--env", "COPIED"], script);
    cmd.env("COPIED", "from-caller")
        .env("UNNAMED", "not-passed")
        .env("LANG", "C.UTF-8")
        .env("PATH", "/usr/bin:/bin");
    let (_, out) = run_with_pid(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(line_value(&stdout, "GIVEN="), Some("a b=c"));
    assert_eq!(line_value(&stdout, "COPIED="), Some("from-caller"));
    assert_eq!(line_value(&stdout, "UNNAMED="), Some("unset"));
    assert_eq!(line_value(&stdout, "LANG="), Some("C.UTF-8"));
    assert_eq!(line_value(&stdout, "PATH="), Some("/usr/bin:/bin"));

    // A name that is also a --secret ENV, a VEIL_* name, a bad name: usage errors (exit 2)
    // naming it, before anything is made.
    for (args, names) in [
        (vec!["--env", "K"], "K"),
        (vec!["--env", "K=mine"], "K"),
        (vec!["--env", "VEIL_API_KEY"], "VEIL_API_KEY"),
        (vec!["--env", "1BAD=x"], "1BAD"),
    ] {
        let (pid, out) = run_with_pid(&mut s.command(&args, "echo ran"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(
            stderr.contains(names),
            "{args:?}: error does not name {names}: {stderr}"
        );
        assert!(!String::from_utf8_lossy(&out.stdout).contains("ran"));
        let made = std::fs::read_dir(cgroup2_mount().join(PARENT))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("run-{pid}-"))
            });
        assert!(!made, "{args:?}: a sandbox was made");
    }
}

#[test]
fn a_sandbox_has_its_own_uid_home_tmp_and_pids() {
    let s = Setup::new(AgentOptions::default());
    // Something of the host's in /tmp: the sandbox's /tmp is its own.
    let host_file = tempfile::Builder::new()
        .prefix("veil-run-host-")
        .tempfile_in("/tmp")
        .expect("host temp file");
    let host_name = host_file
        .path()
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let script = format!(
        "echo \"uid=$(id -u)\"; echo \"gid=$(id -g)\"; echo \"home=$HOME\"; \
         touch \"$HOME/x\" && echo home-writable; echo \"home-owner=$(stat -c %u \"$HOME\")\"; \
         test -e /tmp/{host_name} && echo host-tmp-visible; echo x > /tmp/mine && echo tmp-writable; \
         echo \"pid=$$\"; echo \"procs=$(ls /proc | grep -c '^[0-9]')\"; cat /proc/self/cgroup"
    );
    let (pid, out) = run_with_pid(&mut s.command(&[], &script));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let uid: u32 = line_value(&stdout, "uid=")
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("no uid:\n{stdout}"));
    assert!(
        DEFAULT_UIDS.contains(&uid),
        "uid {uid} not from run.uid_range"
    );
    assert_eq!(line_value(&stdout, "gid="), Some(uid.to_string().as_str()));
    assert_eq!(line_value(&stdout, "home="), Some("/tmp/home"));
    assert!(stdout.contains("home-writable\n"), "{stdout}");
    assert_eq!(
        line_value(&stdout, "home-owner="),
        Some(uid.to_string().as_str())
    );
    assert!(stdout.contains("tmp-writable\n"), "{stdout}");
    assert!(
        !stdout.contains("host-tmp-visible"),
        "the host's /tmp is visible"
    );
    assert!(
        !Path::new("/tmp/mine").exists(),
        "the sandbox's /tmp is the host's"
    );
    // sh is pid 2 (pid 1 is veil's init, hidden from it); only its own processes are listed.
    assert_eq!(line_value(&stdout, "pid="), Some("2"), "{stdout}");
    let procs: u32 = line_value(&stdout, "procs=")
        .and_then(|n| n.parse().ok())
        .unwrap_or(u32::MAX);
    // sh, the command substitution, ls and grep.
    assert!(procs <= 5, "the sandbox lists {procs} processes");
    let id = sandbox_id(&stdout);
    s.assert_gone(&id, pid);

    // A named user keeps its own uid and HOME (and the private /tmp and pids).
    let (_, out) = run_with_pid(&mut s.command(
        &["--user", "nobody"],
        "echo \"uid=$(id -u)\"; echo \"home=$HOME\"; echo \"user=$USER\"; echo \"pid=$$\"",
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(line_value(&stdout, "uid="), Some("65534"));
    assert_eq!(line_value(&stdout, "home="), Some("/nonexistent"));
    assert_eq!(line_value(&stdout, "user="), Some("nobody"));
    assert_eq!(line_value(&stdout, "pid="), Some("2"));
}
