//! Userspace twin of `proxy-ebpf`'s guards: records that follow their socket (deleted when it
//! is reset, kept for a client that closed first), the bind guard over every listener port of a
//! netns, the connect guard over veil's own listeners, and a start over pinned maps of another
//! build's layout. Loads the real programs into the running kernel; needs root.
#![allow(clippy::unwrap_used, reason = "tests may unwrap")]

mod common;
mod twin;

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd as _;
use std::path::Path;

use common::PinDir;
use proxy_agent::bpf::{Bpf, ConnTuple, GuardTable, netns_cookie, port_key};
use proxy_common::{
    GUARD_ANY_LOCAL, GuardKey, MAP_GUARDED, MAP_ORIG, MAP_SOCKS, MAP_STATS, STAT_BIND_REFUSED,
    STAT_GUARDED_REFUSED, STAT_ORIG_FORGOTTEN, STAT_ORIG_RECORDED, STAT_REDIRECTED,
};
use twin::{
    Cgroup, EPERM, Netns, accept_tagged, cgroup2_mount, listeners, require_root, result,
    run_script, runtime,
};

/// Binds 127.0.0.1:`port`, dials 198.18.0.1:80 (redirected) or, with `direct`, 127.0.0.1:`to`
/// (not redirected), sends the tag, and closes — resetting with SO_LINGER 0 when `abort`.
const CLOSING_CLIENT: &str = r#"
import json, socket, struct, sys
tag, port, mode, to = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.settimeout(5)
try:
    s.connect(("127.0.0.1", to) if mode == "direct" else ("198.18.0.1", 80))
    s.sendall(tag.encode())
    if mode == "abort":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    print(json.dumps({"tag": tag, "errno": 0}))
except OSError as e:
    print(json.dumps({"tag": tag, "errno": e.errno}))
"#;

fn netns_cookie_of(netns: &Netns) -> u64 {
    netns.within(|| {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        netns_cookie(probe.as_fd()).unwrap()
    })
}

fn tuple(cookie: u64, listener_port: u16, client_port: u16) -> ConnTuple {
    ConnTuple {
        netns_cookie: cookie,
        listener: SocketAddr::from(([127, 0, 0, 1], listener_port)),
        peer: SocketAddr::from(([127, 0, 0, 1], client_port)),
    }
}

fn stat(bpf: &Bpf, index: u32) -> u64 {
    bpf.stats().unwrap()[index as usize]
}

#[test]
fn a_reset_socket_takes_its_record_along_and_a_closing_one_leaves_it_to_the_agent() {
    require_root();
    let rt = runtime();
    let _rt = rt.enter();
    let pins = PinDir::new();
    let mut bpf = Bpf::load(pins.layout()).unwrap();
    let orig = bpf.orig_dst();
    let netns = Netns::new();
    let cgroup = Cgroup::new_under(&cgroup2_mount());
    let (l4, _l6, target) = listeners(&netns);
    let attachment = bpf.attach(&cgroup.path, target).unwrap();
    let cookie = netns_cookie_of(&netns);
    let recorded = stat(&bpf, STAT_ORIG_RECORDED);
    let forgotten = stat(&bpf, STAT_ORIG_FORGOTTEN);

    // Nobody accepts yet: the agent is busy. One client resets its connection, another closes
    // after sending.
    let port = |p: u16| p.to_string();
    let to = port(target.port_v4);
    for (tag, client, mode) in [("r", 41901, "abort"), ("c", 41902, "close")] {
        let out = run_script(
            &netns,
            Some(&cgroup.path),
            CLOSING_CLIENT,
            &[tag.into(), port(client), mode.into(), to.clone()],
        );
        assert_eq!(result(&out, tag).errno, Some(0), "{tag}");
    }
    assert_eq!(stat(&bpf, STAT_ORIG_RECORDED) - recorded, 2);
    assert_eq!(stat(&bpf, STAT_ORIG_FORGOTTEN) - forgotten, 1);
    // The reset one is gone: the same port dialling the listener directly finds nothing.
    assert_eq!(
        orig.take(&tuple(cookie, target.port_v4, 41901)).unwrap(),
        None
    );
    // The closed one waits for the agent, which may still read what it sent.
    let kept = orig.take(&tuple(cookie, target.port_v4, 41902)).unwrap();
    assert_eq!(
        kept.map(|r| (r.dst, r.cgroup_id)),
        Some(("198.18.0.1:80".parse().unwrap(), cgroup.id()))
    );
    drop(l4);
    bpf.detach(attachment).unwrap();
}

#[test]
fn no_sandbox_binds_a_listener_port_of_its_netns_even_with_the_listener_closed() {
    require_root();
    let rt = runtime();
    let _rt = rt.enter();
    let pins = PinDir::new();
    let mut bpf = Bpf::load(pins.layout()).unwrap();
    // A pod: sandboxes A and B share one netns.
    let pod = Netns::new();
    let (cg_a, cg_b) = (
        Cgroup::new_under(&cgroup2_mount()),
        Cgroup::new_under(&cgroup2_mount()),
    );
    let (la, la6, target_a) = listeners(&pod);
    let (lb, lb6, target_b) = listeners(&pod);
    let cookie = netns_cookie_of(&pod);
    let att_a = bpf.attach(&cg_a.path, target_a).unwrap();
    let att_b = bpf.attach(&cg_b.path, target_b).unwrap();
    let keys = |t: proxy_common::SandboxTarget| -> BTreeSet<_> {
        [t.port_v4, t.port_v6]
            .into_iter()
            .map(|p| port_key(cookie, p))
            .collect()
    };
    bpf.set_listener_ports(cg_a.id(), &keys(target_a)).unwrap();
    bpf.set_listener_ports(cg_b.id(), &keys(target_b)).unwrap();
    // The agent is down: B's listeners are closed.
    drop((lb, lb6));

    const BINDER: &str = r#"
import json, socket, sys
for arg in sys.argv[1:]:
    host, port = arg.rsplit(":", 1)
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, int(port)))
        print(json.dumps({"tag": arg, "errno": 0}))
    except OSError as e:
        print(json.dumps({"tag": arg, "errno": e.errno}))
"#;
    let (b4, b6) = (target_b.port_v4, target_b.port_v6);
    let attempts = [
        format!("127.0.0.1:{b4}"),
        format!("0.0.0.0:{b4}"),
        format!("::1:{b6}"),
        format!("::1:{b4}"),
        "127.0.0.1:0".to_owned(),
    ];
    let before = stat(&bpf, STAT_BIND_REFUSED);
    let out = run_script(&pod, Some(&cg_a.path), BINDER, &attempts);
    for a in &attempts[..4] {
        assert_eq!(result(&out, a).errno, Some(EPERM), "A bound B's port: {a}");
    }
    assert_eq!(result(&out, &attempts[4]).errno, Some(0));
    assert_eq!(stat(&bpf, STAT_BIND_REFUSED) - before, 4);
    // The same port number in another netns is someone else's business.
    let elsewhere = Netns::new();
    let out = run_script(&elsewhere, Some(&cg_a.path), BINDER, &attempts[..1]);
    assert_eq!(result(&out, &attempts[0]).errno, Some(0));
    // Once B is gone, its ports are free again.
    bpf.detach(att_b).unwrap();
    let out = run_script(&pod, Some(&cg_a.path), BINDER, &attempts[..1]);
    assert_eq!(result(&out, &attempts[0]).errno, Some(0));
    drop((la, la6));
    bpf.detach(att_a).unwrap();
    assert!(
        bpf.listener_ports().is_empty(),
        "{:?}",
        bpf.listener_ports()
    );
}

fn guard(netns_cookie: u64, addr: SocketAddr) -> GuardKey {
    let ip = match addr.ip().to_canonical() {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        std::net::IpAddr::V6(v6) => v6,
    };
    let o = ip.octets();
    let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    GuardKey {
        netns_cookie,
        addr: [word(0), word(4), word(8), word(12)],
        port: addr.port(),
        _pad: [0; 6],
    }
}

#[test]
fn connects_to_veils_own_listeners_are_refused() {
    require_root();
    let rt = runtime();
    let _rt = rt.enter();
    let pins = PinDir::new();
    let mut bpf = Bpf::load(pins.layout()).unwrap();
    let netns = Netns::new();
    let cgroup = Cgroup::new_under(&cgroup2_mount());
    let (l4, l6, target) = listeners(&netns);
    let attachment = bpf.attach(&cgroup.path, target).unwrap();
    let cookie = netns_cookie_of(&netns);
    // Stand-ins for veil's listeners inside the netns, and an ordinary service beside them.
    let (own, any, other_ns, service) = netns.within(|| {
        (
            TcpListener::bind("127.0.0.1:0").unwrap(),
            TcpListener::bind("0.0.0.0:0").unwrap(),
            TcpListener::bind("127.0.0.1:0").unwrap(),
            TcpListener::bind("127.0.0.1:0").unwrap(),
        )
    });
    let port = |l: &TcpListener| l.local_addr().unwrap().port();
    let mut table = GuardTable::open(&pins.layout().map(MAP_GUARDED)).unwrap();
    let rules: BTreeSet<GuardKey> = [
        // A host address, guarded from every netns.
        guard(0, "198.18.0.9:80".parse().unwrap()),
        // A loopback listener of this netns.
        guard(cookie, SocketAddr::from(([127, 0, 0, 1], port(&own)))),
        // A listener on 0.0.0.0 of this netns: every local destination.
        GuardKey {
            netns_cookie: cookie,
            addr: GUARD_ANY_LOCAL,
            port: port(&any),
            _pad: [0; 6],
        },
        // Another netns's loopback: not this one's.
        guard(
            cookie ^ 1,
            SocketAddr::from(([127, 0, 0, 1], port(&other_ns))),
        ),
    ]
    .into();
    table.set(&rules).unwrap();

    const DIALLER: &str = r#"
import json, socket, sys
for arg in sys.argv[1:]:
    host, port = arg.rsplit(":", 1)
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect((host, int(port)))
        s.sendall(b"g")
        print(json.dumps({"tag": arg, "errno": 0}))
    except OSError as e:
        print(json.dumps({"tag": arg, "errno": e.errno}))
"#;
    let refused = [
        "198.18.0.9:80".to_owned(),
        "::ffff:198.18.0.9:80".to_owned(),
        format!("127.0.0.1:{}", port(&own)),
        format!("127.0.0.1:{}", port(&any)),
        format!("127.0.0.2:{}", port(&any)),
        format!("::ffff:127.0.0.1:{}", port(&any)),
        format!("0.0.0.0:{}", port(&any)),
    ];
    let allowed = [
        format!("127.0.0.1:{}", port(&other_ns)),
        format!("127.0.0.1:{}", port(&service)),
        // Another port of the guarded host address is redirected as usual.
        "198.18.0.9:81".to_owned(),
    ];
    let before = bpf.stats().unwrap();
    let args: Vec<String> = refused.iter().chain(&allowed).cloned().collect();
    let out = run_script(&netns, Some(&cgroup.path), DIALLER, &args);
    for a in &refused {
        assert_eq!(result(&out, a).errno, Some(EPERM), "reached {a}");
    }
    for a in &allowed {
        assert_eq!(result(&out, a).errno, Some(0), "{a}");
    }
    let after = bpf.stats().unwrap();
    let delta = |i: u32| after[i as usize] - before[i as usize];
    assert_eq!(delta(STAT_GUARDED_REFUSED), refused.len() as u64);
    assert_eq!(
        delta(STAT_REDIRECTED),
        1,
        "only 198.18.0.9:81 is redirected"
    );
    accept_tagged(&[&l4], 1);
    // Outside the sandbox's cgroup nothing is guarded (the agent's own sockets, the host).
    let outside = run_script(&netns, None, DIALLER, &refused[2..3]);
    assert_eq!(result(&outside, &refused[2]).errno, Some(0));
    drop((l4, l6));
    bpf.detach(attachment).unwrap();
}

/// Creates and pins a map of the given shape, as a build with other layouts would have left it.
fn pin_map(path: &Path, map_type: u32, key: u32, value: u32, entries: u32) {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    // union bpf_attr, map_create member: type, key_size, value_size, max_entries, rest zero.
    let mut attr = [0u32; 32];
    attr[..4].copy_from_slice(&[map_type, key, value, entries]);
    // SAFETY: `attr` is a zeroed bpf_attr prefix large enough for BPF_MAP_CREATE.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // obj_pin member: pathname (u64), bpf_fd (u32), file_flags (u32).
    let mut pin = [0u64; 4];
    pin[0] = c_path.as_ptr() as u64;
    pin[1] = fd as u64;
    // SAFETY: `pin` is a zeroed bpf_attr prefix for BPF_OBJ_PIN; `c_path` outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            pin.as_mut_ptr(),
            std::mem::size_of_val(&pin),
        )
    };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: the fd the kernel returned above, owned here and closed once.
    unsafe { libc::close(fd as i32) };
}

#[test]
fn an_agent_starts_over_the_pinned_maps_of_the_previous_layout() {
    require_root();
    let rt = runtime();
    let _rt = rt.enter();
    let pins = PinDir::new();
    // What the previous build pinned: 32-byte connection keys, 24-byte origins, 5 counters.
    const LRU_HASH: u32 = 9;
    const PERCPU_ARRAY: u32 = 6;
    pin_map(&pins.layout().map(MAP_ORIG), LRU_HASH, 32, 24, 65536);
    pin_map(&pins.layout().map(MAP_SOCKS), LRU_HASH, 8, 24, 65536);
    pin_map(&pins.layout().map(MAP_STATS), PERCPU_ARRAY, 4, 8, 5);
    let mut bpf = Bpf::load(pins.layout()).expect("starting over old pins");
    for name in [MAP_ORIG, MAP_SOCKS, MAP_STATS] {
        let info = aya::maps::MapInfo::from_pin(pins.layout().map(name)).unwrap();
        let found = (
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        assert_eq!(
            Some(found),
            proxy_agent::bpf::layout::expected_layout(name),
            "{name}"
        );
    }
    // And it works: a redirected connection is recorded in the new layout.
    let netns = Netns::new();
    let cgroup = Cgroup::new_under(&cgroup2_mount());
    let (l4, _l6, target) = listeners(&netns);
    let attachment = bpf.attach(&cgroup.path, target).unwrap();
    let out = run_script(
        &netns,
        Some(&cgroup.path),
        CLOSING_CLIENT,
        &["n".into(), "41903".into(), "close".into(), "0".into()],
    );
    assert_eq!(result(&out, "n").errno, Some(0));
    let accepted = accept_tagged(&[&l4], 1).remove(0);
    let taken = bpf.orig_dst().take(&accepted.tuple).unwrap().unwrap();
    assert_eq!(taken.cgroup_id, cgroup.id());
    bpf.detach(attachment).unwrap();
    drop(bpf);

    // A pin that is not a map at all is not guessed about: the start fails (closed).
    let odd = PinDir::new();
    std::fs::write(odd.layout().map(MAP_ORIG), b"x").unwrap_or_else(|_| {
        // bpffs refuses regular files: pin a program-less object instead, a dir.
        std::fs::create_dir(odd.layout().map(MAP_ORIG)).unwrap();
    });
    assert!(Bpf::load(odd.layout()).is_err());
}

#[test]
fn listener_ports_are_reserved_in_their_netns_and_released_leaving_the_rest() {
    require_root();
    let netns = Netns::new();
    let path = Path::new("/run/netns").join(&netns.name);
    let sysctl = "/proc/sys/net/ipv4/ip_local_reserved_ports";
    let read = || netns.within(|| std::fs::read_to_string(sysctl).unwrap().trim().to_owned());
    // Someone else's reservations, which must survive.
    netns.within(|| std::fs::write(sysctl, "1000,2000-2002\n").unwrap());
    proxy_agent::reserved::update(Some(&path), &[3000, 3001, 0], &[]).unwrap();
    assert_eq!(read(), "1000,2000-2002,3000-3001");
    proxy_agent::reserved::update(Some(&path), &[], &[3000, 3001]).unwrap();
    assert_eq!(read(), "1000,2000-2002");
    // Emptied entirely, the list is empty (a zero-length write would change nothing).
    netns.within(|| std::fs::write(sysctl, "3000\n").unwrap());
    proxy_agent::reserved::update(Some(&path), &[], &[3000]).unwrap();
    assert_eq!(read(), "");
    // A netns that is gone is an error the caller may ignore.
    assert!(proxy_agent::reserved::update(Some(Path::new("/run/netns/none")), &[1], &[]).is_err());
}
