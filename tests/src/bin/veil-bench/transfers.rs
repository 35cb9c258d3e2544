//! `veil-bench transfers --bytes N` (issue 20): N bytes down and N bytes up through interception,
//! over HTTP/1.1 and h2, with curl in a sandbox against the bulk upstream (which streams and
//! hashes, holding nothing). SHA-256 at both ends: the download is piped through `sha256sum`
//! in the sandbox and compared with the pattern's hash; the upload is hashed by the upstream as
//! it arrives. Prints MiB/s per transfer (wall time of the curl run, hashing included) and the
//! agent's peak resident memory (VmHWM) before and after. The sandbox has a secret mounted, so
//! every transfer is intercepted and scrubbed. The same transfers direct (curl in the world's
//! namespace, to the upstream) give the baseline.

use std::io::Write as _;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::json;
use sha2::{Digest, Sha256};
use veil_tests::bulk_upstream::{BulkUpstream, CHUNK, pattern};
use veil_tests::intercept_world::{InterceptWorld, Upstream as _};

const ALLOWED: &str = "api.allowed.test";

/// Where a transfer's client runs.
#[derive(Debug, Clone, Copy)]
enum Via {
    /// In the sandbox: intercepted by veil.
    Veil,
    /// In the world's namespace, to the upstream directly (the baseline).
    Direct,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Veil => "veil",
            Via::Direct => "direct",
        }
    }
}

/// Runs the transfers of `bytes` each, through veil and direct.
pub fn run(bytes: u64) -> Result<()> {
    veil_tests::require_root();
    let mut w = InterceptWorld::builder("bench transfers CA", &[ALLOWED])
        .metrics()
        .start_with(BulkUpstream::start);
    w.secret("bulk-key", &[ALLOWED], json!({}));
    let sb = w.add_sandbox("bench-transfers", &[("K", "bulk-key")]);
    // The pattern the upstream sends, hashed, and written once for the uploads.
    let file = w.scratch().join("upload.bin");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&file)?);
    let mut hash = Sha256::new();
    let mut left = bytes;
    let mut i = 0;
    while left > 0 {
        let mut c = pattern(i);
        c.truncate(usize::try_from(left).unwrap_or(CHUNK).min(CHUNK));
        hash.update(&c);
        out.write_all(&c)?;
        left -= c.len() as u64;
        i += 1;
    }
    out.flush()?;
    drop(out);
    let sha = hex::encode(hash.finalize());
    let pid = w.veil.pid();
    let before = vm_hwm_kib(pid)?;
    let mib = bytes as f64 / (1024.0 * 1024.0);
    println!(
        "transfers: {mib:.0} MiB each way through interception, curl in a sandbox, SHA-256 at both ends"
    );
    let resolve = format!("{ALLOWED}:{}:{}", w.up.addr().port(), w.up.addr().ip());
    for (flag, proto) in [("--http1.1", "HTTP/1.1"), ("--http2", "h2")] {
        for via in [Via::Veil, Via::Direct] {
            // Through veil: curl in the sandbox. Direct: curl in the world's namespace, the
            // name resolved to the upstream, trusting the same bundle.
            let command = |program: &str| match via {
                Via::Veil => w.command(sb, program),
                Via::Direct => {
                    let mut c = w.world.netns().command(program);
                    c.env("CURL_CA_BUNDLE", &w.bundle);
                    c
                }
            };
            let download = format!(
                "curl -sS --fail --max-time 3600 {flag} --resolve {resolve} '{}' | sha256sum",
                w.url(ALLOWED, &format!("/download?n={bytes}"))
            );
            let start = Instant::now();
            let (ok, got) = run_long(command("sh").args(["-c", &download]));
            let down = start.elapsed();
            if !ok || !got.starts_with(&sha) {
                bail!(
                    "download {proto} {via:?}: SHA-256 mismatch or failure: {}",
                    got.trim()
                );
            }
            let start = Instant::now();
            let (ok, got) = run_long(command("curl").args([
                "-sS",
                "--fail",
                "--max-time",
                "3600",
                flag,
                "--resolve",
                &resolve,
                "-X",
                "POST",
                "-H",
                "content-type: application/octet-stream",
                "-T",
                &file.display().to_string(),
                &w.url(ALLOWED, "/upload"),
            ]));
            let up = start.elapsed();
            if !ok || !got.starts_with(&format!("{bytes} {sha}")) {
                bail!(
                    "upload {proto} {via:?}: SHA-256 mismatch or failure: {}",
                    got.trim()
                );
            }
            println!(
                "  {proto:<8} {:<6} download {:>7.1} MiB/s ({:.2} s)   upload {:>7.1} MiB/s ({:.2} s)",
                via.name(),
                mib / down.as_secs_f64(),
                down.as_secs_f64(),
                mib / up.as_secs_f64(),
                up.as_secs_f64()
            );
        }
    }
    if w.counter("intercepted") < 4.0 {
        bail!("the transfers were not all intercepted");
    }
    let peak = vm_hwm_kib(pid)?;
    println!(
        "  agent peak RSS (VmHWM): {before} KiB before, {peak} KiB after ({:.1} MiB)",
        peak as f64 / 1024.0
    );
    Ok(())
}

/// Runs `cmd` to its end (the transfers outlast `run_text`'s bound on slow builds).
fn run_long(cmd: &mut std::process::Command) -> (bool, String) {
    match cmd.output() {
        Ok(out) => (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
        Err(e) => (false, e.to_string()),
    }
}

fn vm_hwm_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in the agent's status")
}
