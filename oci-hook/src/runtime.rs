//! The runtime shim: on `create`/`run` of a container that names a sandbox, asks the agent what
//! the sandbox gets, edits the bundle's `config.json` (see [`crate::spec`]) and then execs the
//! real runc with the original arguments; any other invocation execs runc untouched.

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::HookError;
use crate::runc_args::Invocation;
use crate::rundir::{BASE, HOST_ROOTS, RunDir};
use crate::settings::Settings;
use crate::timing::Timing;
use crate::{agent, rundir, spec};

/// Prepares the container when it names a sandbox. Returns with the spec edited (or nothing
/// to do); an error means the container must not be created.
pub fn prepare(inv: &Invocation, settings: &Settings) -> Result<(), HookError> {
    let Some(create) = &inv.create else {
        return Ok(());
    };
    let t = Timing::start("runtime");
    let bundle = match &create.bundle {
        Some(b) => b.clone(),
        None => std::env::current_dir().map_err(HookError::io("."))?,
    };
    let file = bundle.join("config.json");
    let text = std::fs::read(&file).map_err(HookError::io(&file))?;
    let mut config: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| HookError::Spec(format!("{}: {e}", file.display())))?;
    let Some(sandbox) = spec::sandbox_id(&config)? else {
        return Ok(());
    };
    let dir = RunDir::new(Path::new(BASE), &create.id)?;
    t.mark("read");
    let declared = agent::describe(&settings.agent_socket, &sandbox)?;
    if declared.bound {
        return Err(HookError::Refused {
            sandbox: sandbox.to_string(),
            message: "the sandbox is already bound (one container per sandbox)".into(),
        });
    }
    t.mark("described");
    dir.prepare(Path::new(HOST_ROOTS), &declared.ca_pem, &sandbox)?;
    t.mark("bundle");
    let trust = spec::rootfs(&config, &bundle)
        .map(|r| spec::trust_paths_in(&r))
        .unwrap_or_default();
    let exe = std::env::current_exe().map_err(HookError::io("/proc/self/exe"))?;
    let ca_file = dir.ca_file();
    let hook_env: Vec<String> = crate::timing::file()
        .map(|f| format!("{}={}", crate::timing::TIMING_VAR, f.display()))
        .into_iter()
        .collect();
    let grant = spec::Grant {
        env: &declared.env,
        ca_file: &ca_file,
        trust_paths: &trust,
        hook_exe: &exe,
        socket: &absolute(&settings.agent_socket)?,
        hook_env: &hook_env,
    };
    let edited = spec::give(&mut config, &grant).and_then(|()| {
        let bytes = serde_json::to_vec(&config)
            .map_err(|e| HookError::Spec(format!("cannot write config.json: {e}")))?;
        let mode = std::fs::metadata(&file)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777)
            .unwrap_or(0o600);
        rundir::write_file(&file, &bytes, mode)
    });
    if let Err(e) = edited {
        let _ = dir.remove();
        return Err(e);
    }
    t.mark("written");
    Ok(())
}

/// The hooks run with another working directory: hand them an absolute socket path.
fn absolute(p: &Path) -> Result<PathBuf, HookError> {
    if p.is_absolute() {
        Ok(p.to_owned())
    } else {
        Ok(std::env::current_dir().map_err(HookError::io("."))?.join(p))
    }
}

/// Replaces this process by the real runtime with `args`; returns only on failure.
pub fn exec_runc(runc: &Path, args: &[OsString]) -> std::io::Error {
    Command::new(runc).arg0("runc").args(args).exec()
}

/// Appends `message` to runc's JSON log as an error record, the way runc reports one, so that
/// containerd (and `docker run`) show veil's line instead of "unable to retrieve OCI runtime
/// error". Best effort: stderr has the line too.
pub fn log_error(json_log: &Path, message: &str) {
    use std::io::Write as _;
    let record = serde_json::json!({"level": "error", "msg": message});
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(json_log)
    {
        let _ = writeln!(f, "{record}");
    }
}
