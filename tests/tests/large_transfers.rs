//! Large uploads and downloads through interception (issue 20): 128 MiB each way, over
//! HTTP/1.1 and h2, with curl in a sandbox and SHA-256 at both ends; the agent's peak resident
//! memory (VmHWM) stays bounded — it streams, it does not hold a transfer.

use std::io::Write as _;

use serde_json::json;
use sha2::{Digest, Sha256};
use veil_tests::bulk_upstream::{BulkUpstream, CHUNK, pattern};
use veil_tests::intercept_world::{InterceptWorld, run_text};

const ALLOWED: &str = "api.allowed.test";
const SIZE: u64 = 128 * 1024 * 1024;
/// The agent's peak RSS bound (debug build): well under one transfer.
const PEAK_MAX_KIB: u64 = 64 * 1024;

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[test]
fn transfers_of_128_mib_each_way_keep_the_agent_memory_bounded() {
    let mut w = InterceptWorld::builder("bulk test CA", &[ALLOWED])
        .metrics()
        .start_with(BulkUpstream::start);
    w.secret("bulk-key", &[ALLOWED], json!({}));
    let sb = w.add_sandbox("bulk", &[("K", "bulk-key")]);
    // The expected content, hashed, and written once for the upload.
    let file = w.scratch().join("upload.bin");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&file).expect("upload file"));
    let mut hash = Sha256::new();
    for i in 0..SIZE / CHUNK as u64 {
        let c = pattern(i);
        hash.update(&c);
        out.write_all(&c).expect("write upload file");
    }
    out.flush().expect("flush");
    drop(out);
    let sha = hex::encode(hash.finalize());
    let before = vm_hwm_kib(w.veil.pid());
    for flag in ["--http1.1", "--http2"] {
        let download = format!(
            "curl -sS --fail --max-time 300 {flag} '{}' | sha256sum",
            w.url(ALLOWED, &format!("/download?n={SIZE}"))
        );
        let (ok, got) = run_text(w.command(sb, "sh").args(["-c", &download]));
        assert!(ok && got.starts_with(&sha), "download {flag}: {got}");
        let (ok, got) = run_text(w.command(sb, "curl").args([
            "-sS",
            "--fail",
            "--max-time",
            "300",
            flag,
            "-H",
            "content-type: application/octet-stream",
            "--data-binary",
            &format!("@{}", file.display()),
            &w.url(ALLOWED, "/upload"),
        ]));
        assert!(
            ok && got.starts_with(&format!("{SIZE} {sha}")),
            "upload {flag}: {got}"
        );
    }
    // Every transfer went through veil's interception, not around it.
    assert!(w.counter("intercepted") >= 4.0);
    assert!(w.counter("requests") >= 4.0);
    let peak = vm_hwm_kib(w.veil.pid());
    eprintln!("agent VmHWM: {before} KiB before, {peak} KiB after 4 x 128 MiB");
    assert!(
        peak < PEAK_MAX_KIB,
        "agent peak RSS {peak} KiB (before {before} KiB) over {PEAK_MAX_KIB} KiB"
    );
}
