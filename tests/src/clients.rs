//! Real HTTP clients for interception tests: Python `requests` and `httpx` (h2) in a pinned
//! venv created on first use (and `websockets`, see `ws_clients`), and Node's built-in `fetch`.

use std::fs::File;
use std::path::PathBuf;
use std::process::Command;

/// Pinned Python client packages.
pub const PYTHON_CLIENTS: &[&str] = &[
    "requests==2.32.3",
    "httpx[http2]==0.28.1",
    "websockets==15.0.1",
    "grpcio==1.85.1",
];

/// A venv at `<target>/<name>` with `packages` installed, created once under a file lock
/// (concurrent test binaries wait for one installer). Returns the venv's python.
pub fn venv(name: &str, packages: &[&str]) -> PathBuf {
    let target = crate::control::target_dir()
        .parent()
        .expect("target dir")
        .to_path_buf();
    let venv = target.join(name);
    let python = venv.join("bin").join("python");
    let marker = venv.join(format!(".installed-{}", packages.join(",")));
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(target.join(format!("{name}.lock")))
        .unwrap_or_else(|e| panic!("open {name} lock: {e}"));
    lock.lock().unwrap_or_else(|e| panic!("lock {name}: {e}"));
    if !marker.exists() {
        if !python.exists() {
            run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
        }
        // `python -m pip`, not `bin/pip`: a venv copied from another tree keeps that tree's
        // path in its scripts' shebangs, and would install there.
        run(Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(packages));
        std::fs::write(&marker, b"").unwrap_or_else(|e| panic!("write marker: {e}"));
    }
    python
}

/// The python of the clients venv (`requests`, `httpx` with h2, `websockets`, `grpcio`).
pub fn python_clients() -> PathBuf {
    venv("clients-venv", PYTHON_CLIENTS)
}

/// The `node` binary (Node.js ≥ 18 has `fetch` built in).
pub fn node() -> PathBuf {
    let out = Command::new("node")
        .arg("--version")
        .output()
        .unwrap_or_else(|e| {
            panic!("node is missing ({e}): run `cargo xtask test`, which installs it")
        });
    let version = String::from_utf8_lossy(&out.stdout);
    let major: u32 = version
        .trim()
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    assert!(
        major >= 18,
        "node {version} has no built-in fetch; need ≥ 18"
    );
    PathBuf::from("node")
}

fn run(cmd: &mut Command) {
    let what = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
