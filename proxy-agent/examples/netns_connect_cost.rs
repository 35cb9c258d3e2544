//! Per-connection cost of opening an upstream socket inside another network namespace.
//!
//! Compares, on a loopback listener inside a fresh netns (root only):
//! - `direct`: a socket of the agent's own netns to a listener there (no netns switch);
//! - `inplace`: `setns` into the netns and back around `socket()` on the calling worker thread;
//! - `blocking`: the same on tokio's blocking pool (`spawn_blocking`);
//! - `thread`: a long-lived thread that stays in the netns and creates sockets on request;
//! - `factory`: what the agent ships ([`proxy_agent::dialer`]).
//!
//! First socket creation alone, then socket creation + connect (the listener accepts on its own
//! thread). Run: `cargo run --release -p proxy-agent --example netns_connect_cost`.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpSocket;
use veil_tests::NetNs;

const N: usize = 5000;

fn new_socket() -> std::io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    s.set_nonblocking(true)?;
    Ok(s)
}

fn spawn_listener(l: TcpListener) {
    std::thread::spawn(move || {
        while let Ok((s, _)) = l.accept() {
            drop(s);
        }
    });
}

async fn connect(s: Socket, dst: SocketAddr) {
    let s = TcpSocket::from_std_stream(s.into());
    let c = s.connect(dst).await.expect("connect");
    drop(c);
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let p = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    println!(
        "{name:>9}: mean {:>6.1} µs  p50 {:>6.1} µs  p99 {:>6.1} µs",
        mean.as_secs_f64() * 1e6,
        p(0.5).as_secs_f64() * 1e6,
        p(0.99).as_secs_f64() * 1e6
    );
}

fn main() {
    veil_tests::require_root();
    let ns = NetNs::new("cost");
    let home = std::fs::File::open("/proc/thread-self/ns/net").expect("own netns");
    let target = std::fs::File::open(ns.path()).expect("netns");
    let inside = ns.run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind"));
    let inside_addr = inside.local_addr().expect("addr");
    spawn_listener(inside);
    let local = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let local_addr = local.local_addr().expect("addr");
    spawn_listener(local);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    // A long-lived thread parked in the netns, answering socket requests.
    type Reply = tokio::sync::oneshot::Sender<std::io::Result<Socket>>;
    let (tx, rx) = mpsc::channel::<Reply>();
    let path = ns.path().to_path_buf();
    std::thread::spawn(move || {
        let f = std::fs::File::open(path).expect("netns");
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        while let Ok(reply) = rx.recv() {
            let _ = reply.send(new_socket());
        }
    });

    let enter = |f: &std::fs::File| {
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns")
    };
    let dialer = proxy_agent::dialer::NetnsDialer::open(ns.path()).expect("dialer");

    rt.block_on(async {
        let mut so = [Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..20000 {
            let t = Instant::now();
            drop(new_socket());
            so[0].push(t.elapsed());
            let t = Instant::now();
            enter(&target);
            let s = new_socket();
            enter(&home);
            drop(s);
            so[1].push(t.elapsed());
            let t = Instant::now();
            let (a, b) = (
                target.try_clone().expect("dup"),
                home.try_clone().expect("dup"),
            );
            let s = tokio::task::spawn_blocking(move || {
                enter(&a);
                let s = new_socket();
                enter(&b);
                s
            })
            .await
            .expect("join");
            drop(s);
            so[2].push(t.elapsed());
            let t = Instant::now();
            let (reply, wait) = tokio::sync::oneshot::channel();
            tx.send(reply).expect("send");
            drop(wait.await.expect("reply"));
            so[3].push(t.elapsed());
            let t = Instant::now();
            drop(
                dialer
                    .socket(socket2::Domain::IPV4)
                    .expect("factory socket"),
            );
            so[4].push(t.elapsed());
        }
        println!("socket creation only, 20000 each:");
        let [a, b, c, d, e] = so;
        report("direct", a);
        report("inplace", b);
        report("blocking", c);
        report("thread", d);
        report("factory", e);
    });
    rt.block_on(async {
        for round in 0..2 {
            let mut direct = Vec::with_capacity(N);
            let mut inplace = Vec::with_capacity(N);
            let mut blocking = Vec::with_capacity(N);
            let mut thread = Vec::with_capacity(N);
            let mut factory = Vec::with_capacity(N);
            for _ in 0..N {
                let t = Instant::now();
                connect(new_socket().expect("socket"), local_addr).await;
                direct.push(t.elapsed());

                let t = Instant::now();
                enter(&target);
                let s = new_socket();
                enter(&home);
                connect(s.expect("socket"), inside_addr).await;
                inplace.push(t.elapsed());

                let t = Instant::now();
                let (a, b) = (
                    target.try_clone().expect("dup"),
                    home.try_clone().expect("dup"),
                );
                let s = tokio::task::spawn_blocking(move || {
                    enter(&a);
                    let s = new_socket();
                    enter(&b);
                    s
                })
                .await
                .expect("join");
                connect(s.expect("socket"), inside_addr).await;
                blocking.push(t.elapsed());

                let t = Instant::now();
                let (reply, wait) = tokio::sync::oneshot::channel();
                tx.send(reply).expect("send");
                let s = wait.await.expect("reply");
                connect(s.expect("socket"), inside_addr).await;
                thread.push(t.elapsed());

                let t = Instant::now();
                let c = dialer.connect(inside_addr).await.expect("factory connect");
                drop(c);
                factory.push(t.elapsed());
            }
            if round == 1 {
                println!("{N} connections each (socket + connect + accept), loopback in a netns:");
                report("direct", direct);
                report("inplace", inplace);
                report("blocking", blocking);
                report("thread", thread);
                report("factory", factory);
            }
        }
    });
}
