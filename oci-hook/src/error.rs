//! Why the hook refused or failed: each variant prints as the one line the runtime shows.

use std::path::PathBuf;

/// A refusal or failure of the shim or a hook; it aborts the container.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The agent refused the request (the message is the agent's).
    #[error("veil refused sandbox {sandbox}: {message}")]
    Refused {
        /// The sandbox named by the container.
        sandbox: String,
        /// The agent's one line.
        message: String,
    },
    /// The agent could not be asked.
    #[error("{0}")]
    Agent(#[from] veil_link::LocalError),
    /// The agent answered something that does not fit the request.
    #[error("veil-agent answered {0} with an unexpected message")]
    Unexpected(&'static str),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The bundle's `config.json` or the runtime's state is not what the OCI spec says.
    #[error("{0}")]
    Spec(String),
    /// The hook's own configuration is malformed.
    #[error("{path}: {message}")]
    Config {
        /// The configuration file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl HookError {
    /// An I/O error about `path`.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> HookError {
        let path = path.into();
        move |source| HookError::Io { path, source }
    }
}
