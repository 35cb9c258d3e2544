//! What can go wrong loading, attaching or using the eBPF programs and maps.

use std::{io, path::PathBuf};

use aya::{maps::MapError, programs::ProgramError};

/// Why loading, attaching or a map access failed.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The object could not be parsed or its maps created.
    #[error("loading the eBPF object")]
    Load(#[source] Box<aya::EbpfError>),
    /// A program the agent needs is missing from the object or has another type.
    #[error("eBPF program {0} is missing or has the wrong type")]
    MissingProgram(&'static str),
    /// The kernel refused to load or attach a program.
    #[error("eBPF program {name}")]
    Program {
        /// Program name.
        name: &'static str,
        /// What the kernel or aya said.
        #[source]
        source: Box<ProgramError>,
    },
    /// A map the agent needs is missing from the object or has another type.
    #[error("eBPF map {name}")]
    Map {
        /// Map name.
        name: &'static str,
        /// What aya said.
        #[source]
        source: Box<MapError>,
    },
    /// A map the agent needs is missing from the object.
    #[error("eBPF map {0} is missing")]
    MissingMap(&'static str),
    /// The aya-log bridge could not be started.
    #[error("starting the eBPF log bridge")]
    Log(#[source] Box<aya_log::Error>),
    /// [`Bpf::load`] was called outside a tokio runtime, or the log fd could not be registered.
    #[error("polling eBPF logs")]
    LogPoll(#[source] io::Error),
    /// The cgroup directory could not be opened or inspected.
    #[error("cgroup {path}")]
    Cgroup {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The directory is not on a cgroup v2 file system.
    #[error("{0} is not a cgroup v2 directory")]
    NotCgroup2(PathBuf),
    /// The cgroup already has veil's programs attached.
    #[error("cgroup {0} is already attached")]
    AlreadyAttached(PathBuf),
    /// A thread panicked while holding a map lock.
    #[error("eBPF map lock poisoned")]
    Poisoned,
    /// A link could not be pinned, opened from its pin, or unpinned.
    #[error("pin {path}")]
    Pin {
        /// The pin path.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
}

/// aya reports a missing key as `KeyNotFound` on lookup but as ENOENT on delete.
pub(crate) fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// Wraps a program's error with its name.
pub(crate) fn program_err(name: &'static str) -> impl FnOnce(ProgramError) -> BpfError {
    move |source| BpfError::Program {
        name,
        source: Box::new(source),
    }
}

/// Wraps a map's error with its name.
pub(crate) fn map_err(name: &'static str) -> impl FnOnce(MapError) -> BpfError {
    move |source| BpfError::Map {
        name,
        source: Box::new(source),
    }
}
