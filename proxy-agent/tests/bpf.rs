//! Userspace twin of `proxy-ebpf`: loads the real programs into the running kernel, attaches
//! them to a fresh cgroup, and drives them from a client process inside that cgroup and a fresh
//! network namespace. Needs root.
//!
//! The namespace has no routes, so a connection that is not redirected fails locally
//! (ENETUNREACH) and nothing ever leaves the machine.
#![allow(clippy::unwrap_used, reason = "tests may unwrap")]

mod common;
mod twin;

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Mutex, Once},
    time::Duration,
};

use common::{PinDir, attached_program_ids};
use proxy_agent::bpf::{Bpf, BpfError, ConnTuple};
use proxy_common::{
    ConnKey, MAP_ORIG, MAP_SANDBOXES, MAP_SOCKS, OrigDst, SANDBOX_DIRECT, STAT_DIRECT,
    STAT_NO_SANDBOX, STAT_ORIG_RECORDED, STAT_REDIRECTED, STAT_UDP443_REFUSED, SandboxTarget,
};
use twin::{
    Cgroup, ClientResult, EPERM, Netns, accept_tagged, cgroup2_mount, listeners, require_root,
    result, run_script, runtime,
};

const DIALLED_V4: &str = "198.18.255.1:80";
const DIALLED_V6: &str = "[fd76:6569:6c::1]:80";
const ENETUNREACH: i64 = 101;

/// Every `log` record the process emits, for checking the aya-log bridge.
static LOGS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

struct CaptureLogger;

impl log::Log for CaptureLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        LOGS.lock()
            .unwrap()
            .push((record.target().to_owned(), record.args().to_string()));
    }

    fn flush(&self) {}
}

fn capture_logs() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        log::set_logger(&CaptureLogger).unwrap();
        log::set_max_level(log::LevelFilter::Trace);
    });
}

/// Waits until the eBPF side has logged a message containing `needle`.
fn wait_for_log(needle: &str) {
    for _ in 0..200 {
        if LOGS
            .lock()
            .unwrap()
            .iter()
            .any(|(target, msg)| target.starts_with("proxy_ebpf") && msg.contains(needle))
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "no eBPF log containing {needle:?}: {:?}",
        LOGS.lock().unwrap()
    );
}

/// Client: dials the three test destinations (sending a one-byte tag), prints what
/// getpeername says, then tries UDP to 443 and 53. One JSON object per line.
const CLIENT: &str = r#"
import json, socket, sys
def tcp(tag, family, host, port):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect((host, port))
        peer = s.getpeername()
        s.sendall(tag.encode())
        s.close()
        return {"tag": tag, "peer": "%s|%d" % (peer[0], peer[1])}
    except OSError as e:
        return {"tag": tag, "errno": e.errno}
def udp(tag, family, host, port, connect):
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if connect:
            s.connect((host, port))
            s.send(b"x")
        else:
            s.sendto(b"x", (host, port))
        return {"tag": tag, "errno": 0}
    except OSError as e:
        return {"tag": tag, "errno": e.errno}
results = [
    tcp("4", socket.AF_INET, "198.18.255.1", 80),
    tcp("6", socket.AF_INET6, "fd76:6569:6c::1", 80),
    tcp("m", socket.AF_INET6, "::ffff:198.18.255.1", 80),
    tcp("l", socket.AF_INET, "127.0.0.1", int(sys.argv[1])),
    udp("u443", socket.AF_INET, "198.18.255.1", 443, False),
    udp("u443c", socket.AF_INET, "198.18.255.1", 443, True),
    udp("u443v6", socket.AF_INET6, "fd76:6569:6c::1", 443, False),
    udp("u53", socket.AF_INET, "198.18.255.1", 53, False),
    udp("u53c", socket.AF_INET, "198.18.255.1", 53, True),
]
for r in results:
    print(json.dumps(r))
"#;

/// Runs [`CLIENT`] in `netns`, and in `cgroup` if given.
fn run_client(
    netns: &Netns,
    cgroup: Option<&Path>,
    loopback_port: u16,
) -> Vec<(String, ClientResult)> {
    run_script(netns, cgroup, CLIENT, &[loopback_port.to_string()])
}

/// Number of programs attached to `cgroup` at the attach points veil uses.
fn attached_programs(cgroup: &Path) -> usize {
    attached_program_ids(cgroup).len()
}

/// A map of the programs attached to `cgroup`, opened by id like an outside tool would.
fn attached_map(cgroup: &Path, name: &str) -> aya::maps::MapData {
    let prog_ids = attached_program_ids(cgroup);
    let map_id = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| prog_ids.contains(&p.id()))
        .flat_map(|p| p.map_ids().unwrap().unwrap_or_default())
        .find(|&id| aya::maps::MapInfo::from_id(id).is_ok_and(|m| m.name_as_str() == Some(name)))
        .unwrap();
    aya::maps::MapData::from_id(map_id).unwrap()
}

/// Removes a cgroup's `VEIL_SANDBOXES` entry behind the agent's back: what a failed detach
/// would leave behind.
fn delete_sandbox_entry_behind_the_agents_back(cgroup: &Path, cgroup_id: u64) {
    let map = attached_map(cgroup, MAP_SANDBOXES);
    let mut map: aya::maps::HashMap<_, u64, SandboxTarget> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map)).unwrap();
    map.remove(&cgroup_id).unwrap();
}

/// Waits until the LRU maps of the programs attached to `cgroup` are empty.
fn wait_for_maps_to_drain(cgroup: &Path) {
    let socks: aya::maps::HashMap<_, u64, OrigDst> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(attached_map(cgroup, MAP_SOCKS)))
            .unwrap();
    let orig: aya::maps::HashMap<_, ConnKey, OrigDst> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(attached_map(cgroup, MAP_ORIG)))
            .unwrap();
    for _ in 0..300 {
        let (n_socks, n_orig) = (socks.keys().count(), orig.keys().count());
        if n_socks == 0 && n_orig == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "maps did not drain: {} sockets, {} origins",
        socks.keys().count(),
        orig.keys().count()
    );
}

/// Binds the given local port, dials `host:80` over IPv4 and sends a one-byte tag.
const BOUND_CLIENT: &str = r#"
import json, socket, sys
tag, port, host = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.settimeout(5)
try:
    s.connect((host, 80))
    s.sendall(tag.encode())
    print(json.dumps({"tag": tag, "errno": 0}))
except OSError as e:
    print(json.dumps({"tag": tag, "errno": e.errno}))
"#;

#[test]
fn identical_client_addresses_in_two_sandboxes_stay_apart() {
    require_root();
    let rt = runtime();
    let _rt = rt.enter();
    let pins = PinDir::new();
    let mut bpf = Bpf::load(pins.layout()).expect("loading the eBPF programs");
    let orig = bpf.orig_dst();
    let root = cgroup2_mount();
    let (ns_a, ns_b) = (Netns::new(), Netns::new());
    let (cg_a, cg_b) = (Cgroup::new_under(&root), Cgroup::new_under(&root));
    let (la, _la6, target_a) = listeners(&ns_a);
    let (lb, _lb6, target_b) = listeners(&ns_b);
    let att_a = bpf.attach(&cg_a.path, target_a).unwrap();
    let att_b = bpf.attach(&cg_b.path, target_b).unwrap();

    // Both clients end up as 127.0.0.1:41999 in their own namespace.
    let port = "41999".to_owned();
    for (tag, ns, cg, host) in [
        ("a", &ns_a, &cg_a, "198.18.0.1"),
        ("b", &ns_b, &cg_b, "198.18.0.2"),
    ] {
        let out = run_script(
            ns,
            Some(&cg.path),
            BOUND_CLIENT,
            &[tag.to_owned(), port.clone(), host.to_owned()],
        );
        assert_eq!(result(&out, tag).errno, Some(0), "{tag}");
    }
    let a = accept_tagged(&[&la], 1).remove(0);
    let b = accept_tagged(&[&lb], 1).remove(0);
    assert_eq!((a.tag, b.tag), ('a', 'b'));
    assert_eq!(a.tuple.peer, b.tuple.peer);
    assert_ne!(a.tuple.netns_cookie, b.tuple.netns_cookie);
    let taken = orig.take(&b.tuple).unwrap().unwrap();
    assert_eq!(taken.dst, "198.18.0.2:80".parse().unwrap());
    assert_eq!(taken.cgroup_id, cg_b.id());
    let taken = orig.take(&a.tuple).unwrap().unwrap();
    assert_eq!(taken.dst, "198.18.0.1:80".parse().unwrap());
    assert_eq!(taken.cgroup_id, cg_a.id());
    bpf.detach(att_a).unwrap();
    bpf.detach(att_b).unwrap();
}

#[test]
fn fails_closed_without_a_sandbox_entry_or_an_ipv6_listener() {
    require_root();
    let rt = runtime();
    let _rt = rt.enter();
    let pins = PinDir::new();
    let mut bpf = Bpf::load(pins.layout()).expect("loading the eBPF programs");
    let netns = Netns::new();
    let cgroup = Cgroup::new_under(&cgroup2_mount());
    let (l4, _l6, target) = listeners(&netns);
    let no_v6 = SandboxTarget {
        port_v6: 0,
        ..target
    };
    let attachment = bpf.attach(&cgroup.path, no_v6).unwrap();

    // No IPv6 listener: native IPv6 is refused, IPv4 and mapped still redirected.
    let out = run_client(&netns, Some(&cgroup.path), target.port_v4);
    assert_eq!(result(&out, "6").errno, Some(EPERM));
    assert!(result(&out, "4").peer.is_some(), "{out:?}");
    assert!(result(&out, "m").peer.is_some(), "{out:?}");
    accept_tagged(&[&l4], 3);

    // Programs attached but no entry for the cgroup: TCP is refused, not let through.
    delete_sandbox_entry_behind_the_agents_back(&cgroup.path, cgroup.id());
    let before = bpf.stats().unwrap();
    let out = run_client(&netns, Some(&cgroup.path), target.port_v4);
    for tag in ["4", "6", "m"] {
        assert_eq!(result(&out, tag).errno, Some(EPERM), "{tag}");
    }
    // Loopback and DNS are unaffected.
    assert!(result(&out, "l").peer.is_some(), "{out:?}");
    assert_ne!(result(&out, "u53").errno, Some(EPERM));
    accept_tagged(&[&l4], 1);
    let after = bpf.stats().unwrap();
    assert_eq!(
        after[STAT_NO_SANDBOX as usize] - before[STAT_NO_SANDBOX as usize],
        3
    );
    bpf.detach(attachment).unwrap();
}

/// Issue 19: a sandbox flagged direct keeps its connects where they were dialled (here: no
/// route, so ENETUNREACH), records nothing, and still has UDP/443 refused; clearing the flag
/// redirects again.
#[test]
fn a_direct_sandbox_is_not_redirected_and_keeps_the_udp_refusal() {
    require_root();
    let rt = runtime();
    let _rt = rt.enter();
    let pins = PinDir::new();
    let mut bpf = Bpf::load(pins.layout()).expect("loading the eBPF programs");
    let netns = Netns::new();
    let cgroup = Cgroup::new_under(&cgroup2_mount());
    let (l4, _l6, target) = listeners(&netns);
    let direct = SandboxTarget {
        flags: SANDBOX_DIRECT,
        ..target
    };
    let attachment = bpf.attach(&cgroup.path, direct).unwrap();
    assert_eq!(bpf.sandbox(cgroup.id()).unwrap(), Some(direct));
    let before = bpf.stats().unwrap();
    let out = run_client(&netns, Some(&cgroup.path), target.port_v4);
    for tag in ["4", "6", "m"] {
        assert_eq!(result(&out, tag).errno, Some(ENETUNREACH), "{tag}: {out:?}");
    }
    assert!(result(&out, "l").peer.is_some(), "{out:?}");
    for tag in ["u443", "u443c", "u443v6"] {
        assert_eq!(result(&out, tag).errno, Some(EPERM), "{tag}: {out:?}");
    }
    assert_ne!(result(&out, "u53").errno, Some(EPERM));
    accept_tagged(&[&l4], 1);
    let after = bpf.stats().unwrap();
    let delta = |stat: u32| after[stat as usize] - before[stat as usize];
    assert_eq!((delta(STAT_DIRECT), delta(STAT_REDIRECTED)), (3, 0));

    // Flag cleared: redirected again.
    bpf.set_target(cgroup.id(), target).unwrap();
    let out = run_client(&netns, Some(&cgroup.path), target.port_v4);
    assert!(result(&out, "4").peer.is_some(), "{out:?}");
    accept_tagged(&[&l4], 3);
    bpf.detach(attachment).unwrap();
}

#[test]
fn redirects_records_and_detaches() {
    require_root();
    let rt = runtime();
    let _rt = rt.enter();
    // Before loading: the kernel side skips levels above `log::max_level()` at load time.
    capture_logs();
    let pins = PinDir::new();
    let mut bpf = Bpf::load(pins.layout()).expect("loading the eBPF programs");
    let orig = bpf.orig_dst();

    let netns = Netns::new();
    let sandbox = Cgroup::new_under(&cgroup2_mount());
    // A nested cgroup: found through the ancestor walk.
    let nested = Cgroup::new_under(&sandbox.path);
    let (l4, l6, target) = listeners(&netns);
    let port_v4 = target.port_v4;
    let before = bpf.stats().unwrap();
    let attachment = bpf.attach(&sandbox.path, target).expect("attach");
    assert_eq!(attachment.cgroup_id(), sandbox.id());
    assert_eq!(bpf.sandbox(sandbox.id()).unwrap(), Some(target));
    assert_eq!(attached_programs(&sandbox.path), 9);
    assert!(
        matches!(
            bpf.attach(&sandbox.path, target),
            Err(BpfError::AlreadyAttached(_))
        ),
        "a second attach of one cgroup must fail"
    );
    assert_eq!(attached_programs(&sandbox.path), 9);

    for client_cgroup in [&sandbox.path, &nested.path] {
        let results = run_client(&netns, Some(client_cgroup), port_v4);
        // getpeername reports what was dialled.
        assert_eq!(
            result(&results, "4").peer.as_deref(),
            Some("198.18.255.1|80")
        );
        assert_eq!(
            result(&results, "6").peer.as_deref(),
            Some("fd76:6569:6c::1|80")
        );
        assert_eq!(
            result(&results, "m").peer.as_deref(),
            Some("::ffff:198.18.255.1|80")
        );
        // Loopback is untouched: the real peer.
        let loopback_peer = format!("127.0.0.1|{port_v4}");
        assert_eq!(result(&results, "l").peer.as_deref(), Some(&*loopback_peer));
        for tag in ["u443", "u443c", "u443v6"] {
            assert_eq!(result(&results, tag).errno, Some(EPERM), "{tag}");
        }
        for tag in ["u53", "u53c"] {
            let errno = result(&results, tag).errno;
            assert_ne!(errno, Some(EPERM), "{tag}");
            assert!(errno.is_some(), "{tag}");
        }

        let accepted = accept_tagged(&[&l4, &l6], 4);
        let mut tags: Vec<char> = accepted.iter().map(|a| a.tag).collect();
        tags.sort_unstable();
        assert_eq!(tags, ['4', '6', 'l', 'm']);
        for twin::Accepted { tag, tuple, .. } in accepted {
            let peer = tuple.peer;
            let expected: Option<SocketAddr> = match tag {
                '4' | 'm' => Some(DIALLED_V4.parse().unwrap()),
                '6' => Some(DIALLED_V6.parse().unwrap()),
                _ => None,
            };
            match tag {
                '6' => assert!(peer.is_ipv6(), "{peer}"),
                _ => assert!(peer.is_ipv4(), "{peer}"),
            }
            // Another namespace's identical tuple, or another listener, is another key.
            let other_ns = ConnTuple {
                netns_cookie: tuple.netns_cookie ^ 1,
                ..tuple
            };
            assert_eq!(orig.take(&other_ns).unwrap(), None);
            let mut other_listener = tuple;
            other_listener.listener.set_port(tuple.listener.port() ^ 1);
            assert_eq!(orig.take(&other_listener).unwrap(), None);
            let taken = orig.take(&tuple).unwrap();
            assert_eq!(taken.map(|r| r.dst), expected, "{tag} from {peer}");
            // The nested cgroup's connections are recorded under the registered sandbox.
            if let Some(r) = taken {
                assert_eq!(r.cgroup_id, sandbox.id(), "{tag}");
            }
            assert_eq!(orig.take(&tuple).unwrap(), None, "{tag}: taken twice");
        }
    }

    // Every redirected socket closed and every origin was taken.
    wait_for_maps_to_drain(&sandbox.path);
    // Refusals reach `log` through the aya-log bridge.
    wait_for_log("refused UDP to port 443");

    let after = bpf.stats().unwrap();
    assert_eq!(
        after[STAT_REDIRECTED as usize] - before[STAT_REDIRECTED as usize],
        6
    );
    assert_eq!(
        after[STAT_ORIG_RECORDED as usize] - before[STAT_ORIG_RECORDED as usize],
        6
    );
    assert_eq!(
        after[STAT_UDP443_REFUSED as usize] - before[STAT_UDP443_REFUSED as usize],
        6
    );
    assert_eq!(
        after[STAT_NO_SANDBOX as usize],
        before[STAT_NO_SANDBOX as usize]
    );

    // Same netns, outside the cgroup: nothing is redirected or refused.
    let outside = run_client(&netns, None, port_v4);
    for tag in ["4", "m", "u53"] {
        assert_eq!(
            result(&outside, tag).errno,
            Some(ENETUNREACH),
            "outside: {tag}"
        );
    }
    assert_ne!(result(&outside, "u443").errno, Some(EPERM));
    accept_tagged(&[&l4], 1);

    bpf.detach(attachment).expect("detach");
    assert_eq!(attached_programs(&sandbox.path), 0);
    assert_eq!(bpf.sandbox(sandbox.id()).unwrap(), None);
    let detached = run_client(&netns, Some(&sandbox.path), port_v4);
    for tag in ["4", "6", "m", "u53"] {
        assert_eq!(
            result(&detached, tag).errno,
            Some(ENETUNREACH),
            "detached: {tag}"
        );
    }
    assert_ne!(result(&detached, "u443").errno, Some(EPERM));
    accept_tagged(&[&l4], 1);
    let last = bpf.stats().unwrap();
    assert_eq!(
        last[STAT_REDIRECTED as usize],
        after[STAT_REDIRECTED as usize]
    );

    // Detached cgroups can be attached again.
    let again = bpf.attach(&sandbox.path, target).expect("re-attach");
    bpf.detach(again).expect("detach again");
    assert_eq!(
        attached_programs(&sandbox.path),
        0,
        "after the second detach"
    );
    drop(nested);
}

#[test]
fn refuses_a_directory_that_is_not_a_cgroup() {
    require_root();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _rt = runtime.enter();
    let pins = PinDir::new();
    let mut bpf = Bpf::load(pins.layout()).expect("loading the eBPF programs");
    let dir = std::env::temp_dir();
    let target = SandboxTarget {
        port_v4: 1,
        port_v6: 1,
        flags: 0,
    };
    assert!(matches!(
        bpf.attach(&dir, target),
        Err(BpfError::NotCgroup2(_))
    ));
}

#[test]
fn load_outside_a_runtime_is_an_error() {
    require_root();
    let pins = PinDir::new();
    assert!(Bpf::load(pins.layout()).is_err());
}
