//! Where the agent's local socket and the real runc are: a `--veil-*` flag, else the
//! environment, else `/etc/veil/oci-hook.toml`, else the defaults.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::HookError;

/// The hook's configuration file.
pub const CONFIG_FILE: &str = "/etc/veil/oci-hook.toml";
/// Overrides the socket path of the configuration file.
pub const SOCKET_VAR: &str = "VEIL_AGENT_SOCKET";
/// The runtime the shim execs unless configured otherwise (Debian's runc).
pub const DEFAULT_RUNC: &str = "/usr/sbin/runc";

/// The contents of `oci-hook.toml`; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    /// veil-agent's local socket.
    pub agent_socket: Option<PathBuf>,
    /// The real OCI runtime the shim execs.
    pub runc: Option<PathBuf>,
}

/// The settings in effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// veil-agent's local socket.
    pub agent_socket: PathBuf,
    /// The real OCI runtime.
    pub runc: PathBuf,
}

/// Reads `path`; a missing file is an empty one, a malformed one an error naming it.
pub fn read_file(path: &Path) -> Result<FileSettings, HookError> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|e| HookError::Config {
            path: path.to_owned(),
            message: e.message().to_owned(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileSettings::default()),
        Err(e) => Err(HookError::io(path)(e)),
    }
}

/// Resolves the settings: flags first, then `VEIL_AGENT_SOCKET`, then the file, then defaults.
pub fn resolve(
    socket_flag: Option<PathBuf>,
    runc_flag: Option<PathBuf>,
    env_socket: Option<PathBuf>,
    file: FileSettings,
) -> Settings {
    Settings {
        agent_socket: socket_flag
            .or(env_socket)
            .or(file.agent_socket)
            .unwrap_or_else(|| PathBuf::from(veil_link::local::DEFAULT_LOCAL_SOCKET)),
        runc: runc_flag
            .or(file.runc)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_RUNC)),
    }
}

/// Resolves the settings from the flags, this process's environment and [`CONFIG_FILE`].
pub fn load(
    socket_flag: Option<PathBuf>,
    runc_flag: Option<PathBuf>,
) -> Result<Settings, HookError> {
    let file = read_file(Path::new(CONFIG_FILE))?;
    let env = std::env::var_os(SOCKET_VAR)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    Ok(resolve(socket_flag, runc_flag, env, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_the_environment_which_beats_the_file() {
        let file = || FileSettings {
            agent_socket: Some("/file.sock".into()),
            runc: Some("/file/runc".into()),
        };
        let s = resolve(
            Some("/flag.sock".into()),
            None,
            Some("/env.sock".into()),
            file(),
        );
        assert_eq!(s.agent_socket, Path::new("/flag.sock"));
        assert_eq!(s.runc, Path::new("/file/runc"));
        let s = resolve(None, None, Some("/env.sock".into()), file());
        assert_eq!(s.agent_socket, Path::new("/env.sock"));
        let s = resolve(None, None, None, file());
        assert_eq!(s.agent_socket, Path::new("/file.sock"));
        let s = resolve(None, None, None, FileSettings::default());
        assert_eq!(
            s.agent_socket,
            Path::new(veil_link::local::DEFAULT_LOCAL_SOCKET)
        );
        assert_eq!(s.runc, Path::new(DEFAULT_RUNC));
    }

    #[test]
    fn the_shipped_file_holds_the_defaults() {
        let shipped: FileSettings =
            toml::from_str(include_str!("../../xtask/dist/oci-hook.toml")).unwrap();
        let s = resolve(None, None, None, shipped);
        assert_eq!(s, resolve(None, None, None, FileSettings::default()));
    }

    #[test]
    fn a_malformed_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("oci-hook.toml");
        std::fs::write(&p, "agent_sockett = \"/x\"\n").unwrap();
        let e = read_file(&p).unwrap_err().to_string();
        assert!(
            e.contains("oci-hook.toml") && e.contains("agent_sockett"),
            "{e}"
        );
        std::fs::write(&p, "agent_socket = \"/x\"\nrunc = \"/r\"\n").unwrap();
        let f = read_file(&p).unwrap();
        assert_eq!(f.agent_socket.as_deref(), Some(Path::new("/x")));
        assert!(read_file(&dir.path().join("missing.toml")).is_ok());
    }
}
