//! The byte-counting sink upstream, and running the client processes measured against it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use veil_tests::NetNs;

/// A server in `ns` that reads to EOF and answers the byte count (8 bytes, big-endian).
pub(crate) fn start_sink(ns: &NetNs, ip: std::net::IpAddr) -> (SocketAddr, Arc<AtomicBool>) {
    let listener = ns.run(move || TcpListener::bind((ip, 0)).expect("bind sink"));
    let addr = listener.local_addr().expect("sink addr");
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            if stop2.load(Ordering::Relaxed) {
                break;
            }
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                let mut total = 0u64;
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = conn.write_all(&total.to_be_bytes());
            });
        }
    });
    (addr, stop)
}

/// Runs a re-executed client to completion and returns its trimmed stdout.
pub(crate) fn run_client(mut cmd: Command) -> Result<String> {
    let out = cmd.output().context("run bench client")?;
    if !out.status.success() {
        bail!(
            "bench client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
