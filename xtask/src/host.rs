//! Host preparation: root check, Debian packages, running the daemons in the foreground.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

/// Debian packages the test suite and benchmarks run: real clients and network tools.
pub const TEST_PACKAGES: &[&str] = &[
    "ca-certificates",
    "curl",
    "iproute2",
    "procps",
    "python3",
    "python3-venv",
    "util-linux",
];

/// Extra Debian packages for benchmarks: the load generators and the reference upstream.
pub const BENCH_PACKAGES: &[&str] = &["nginx", "nghttp2-client", "wrk"];

/// Fails with a message naming `what` unless running as root.
pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "{what} needs root (cgroups, network namespaces, eBPF): run it as root, e.g. `sudo -E {what}`"
        );
    }
    Ok(())
}

/// Installs whichever of `packages` dpkg does not list as installed.
pub fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let apt = |args: &[&str]| -> Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("cannot run apt-get")?;
        if !status.success() {
            bail!("apt-get {} failed ({status})", args.join(" "));
        }
        Ok(())
    };
    apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    apt(&args)
}

/// Installs Debian's `package` when `command` is not on PATH (a newer one may already be there,
/// e.g. Node.js from elsewhere: keep it).
pub fn ensure_command(command: &str, package: &str) -> Result<()> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {command}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        Ok(())
    } else {
        ensure_packages(&[package])
    }
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Starts veil-control and veil-agent from `target/release` with state under
/// `target/veil-run/`, prints how to reach them, and waits until both exit (Ctrl-C stops them).
pub fn run_foreground(root: &Path) -> Result<()> {
    let bin = root.join("target/release");
    let state = root.join("target/veil-run");
    let control_dir = state.join("control");
    let agent_dir = state.join("agent");
    // Its own pin dir, so the try-out never touches an installed agent's pins.
    let pin_dir = Path::new("/sys/fs/bpf/veil-xtask-run");
    std::fs::create_dir_all(&state).context("cannot create target/veil-run")?;

    let key = Command::new(bin.join("veil-control"))
        .args(["apikey", "create", "--org", "demo", "--permission", "admin"])
        .arg("--data-dir")
        .arg(&control_dir)
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run veil-control apikey create")?;
    if !key.status.success() {
        bail!("veil-control apikey create failed ({})", key.status);
    }
    let key = String::from_utf8_lossy(&key.stdout).trim().to_owned();

    let mut control = spawn(
        Command::new(bin.join("veil-control"))
            .arg("serve")
            .arg("--data-dir")
            .arg(&control_dir),
    )?;
    let mut agent = match spawn(
        Command::new(bin.join("veil-agent"))
            .arg("--state-dir")
            .arg(&agent_dir)
            .arg("--pin-dir")
            .arg(pin_dir),
    ) {
        Ok(a) => a,
        Err(e) => {
            let _ = control.kill();
            let _ = control.wait();
            return Err(e);
        }
    };
    println!(
        "\nveil is running (Ctrl-C stops it).\n  export VEIL_API_URL=http://127.0.0.1:3900/api\n  export VEIL_API_KEY={key}\n  echo -n 'my-value' | target/release/veil-control secret create --name my-secret --host example.test\n"
    );
    // Ctrl-C reaches the whole foreground process group; the daemons stop on it and this
    // process waits for them instead of dying first.
    // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let agent_status = agent.wait()?;
    // The agent may stop alone (an error): stop control too, by its PID.
    // SAFETY: kill on the PID of our own child, which we have not reaped yet.
    unsafe { libc::kill(control.id() as libc::pid_t, libc::SIGTERM) };
    let control_status = control.wait()?;
    // A stopped agent leaves its sandboxes pinned (fail closed); the try-out removes them.
    let teardown = Command::new(bin.join("veil-agent"))
        .args(["teardown", "--all", "--state-dir"])
        .arg(&agent_dir)
        .arg("--pin-dir")
        .arg(pin_dir)
        .status()
        .context("cannot run veil-agent teardown")?;
    println!("veil-agent: {agent_status}; veil-control: {control_status}; teardown: {teardown}");
    Ok(())
}

fn spawn(cmd: &mut Command) -> Result<Child> {
    cmd.spawn()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))
}
