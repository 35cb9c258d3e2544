//! veil-oci-hook: the binary's modes and exit statuses (see `--help`).

use std::ffi::OsString;
use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use veil_oci_hook::error::HookError;
use veil_oci_hook::{hooks, runc_args, runtime, settings};

const AFTER_HELP: &str = "\
Exit status: 0 done (runtime mode: the real runc's status, as it replaces this process);
1 veil refused the container or a step failed (one line on stderr; the runtime aborts the
container and its workload never runs); 2 bad usage.

The agent's local socket: --veil-socket=PATH (runtime mode) or --agent-socket (hooks), else
VEIL_AGENT_SOCKET, else agent_socket in /etc/veil/oci-hook.toml, else
/run/veil/agent-local.sock. The real runtime: --veil-runc=PATH, else runc in that file, else
/usr/sbin/runc. Any first argument that is not a mode of this binary means runtime mode, so
Podman's --runtime can name this binary directly.";

/// Gives containers the placeholders of the veil sandbox they name and binds them to veil.
#[derive(Debug, Parser)]
#[command(name = "veil-oci-hook", version, about, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Runtime shim: `runtime [--veil-socket=P] [--veil-runc=P] [runc flags] <runc command> …`.
    /// On create/run of a container naming a sandbox (annotation dev.veil.sandbox or
    /// VEIL_SANDBOX_ID in its env) edits config.json, then execs runc.
    Runtime {
        /// runc's arguments, passed on unchanged.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<OsString>,
    },
    /// OCI createRuntime hook (state JSON on stdin): binds the container's cgroup and netns.
    CreateRuntime {
        /// veil-agent's local socket.
        #[arg(long)]
        agent_socket: Option<PathBuf>,
    },
    /// OCI poststop hook (state JSON on stdin): unbinds, removes the container's runtime dir.
    Poststop {
        /// veil-agent's local socket.
        #[arg(long)]
        agent_socket: Option<PathBuf>,
    },
}

/// The first arguments that select a mode of this binary rather than runtime mode.
const OWN: &[&str] = &[
    "runtime",
    "create-runtime",
    "poststop",
    "help",
    "--help",
    "-h",
    "--version",
    "-V",
];

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let own = argv
        .get(1)
        .and_then(|a| a.to_str())
        .is_some_and(|a| OWN.contains(&a));
    let mode = if own {
        Cli::parse_from(argv).mode
    } else {
        Mode::Runtime {
            args: argv.into_iter().skip(1).collect(),
        }
    };
    match run(mode) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("veil-oci-hook: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(mode: Mode) -> anyhow::Result<()> {
    match mode {
        Mode::Runtime { args } => {
            let inv = runc_args::parse(args)?;
            let result = settings::load(inv.socket.clone(), inv.runc.clone())
                .and_then(|settings| runtime::prepare(&inv, &settings).map(|()| settings))
                .map_err(anyhow::Error::from)
                .and_then(|settings| {
                    let err = runtime::exec_runc(&settings.runc, &inv.args);
                    Err(anyhow::anyhow!(
                        "cannot run {}: {err}",
                        settings.runc.display()
                    ))
                });
            if let (Err(e), Some(log)) = (&result, &inv.json_log) {
                runtime::log_error(log, &format!("veil-oci-hook: {e:#}"));
            }
            result
        }
        Mode::CreateRuntime { agent_socket } => {
            let settings = settings::load(agent_socket, None)?;
            hooks::create_runtime(&read_state()?, &settings.agent_socket)?;
            Ok(())
        }
        Mode::Poststop { agent_socket } => {
            let settings = settings::load(agent_socket, None)?;
            hooks::poststop(&read_state()?, &settings.agent_socket)?;
            Ok(())
        }
    }
}

fn read_state() -> Result<hooks::State, HookError> {
    let mut text = String::new();
    std::io::stdin()
        .take(1 << 20)
        .read_to_string(&mut text)
        .map_err(HookError::io("stdin"))?;
    hooks::parse_state(&text)
}
