//! Phase timestamps when `VEIL_OCI_HOOK_TIMING` names a file, to see where a container's start
//! time goes (the container-start benchmark reads them). The shim hands the variable on to the
//! hooks it adds (a runtime gives hooks only the environment the spec names). Off by default.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

/// The variable that turns the timings on: the file the lines are appended to.
pub const TIMING_VAR: &str = "VEIL_OCI_HOOK_TIMING";

/// Appends `veil-oci-hook timing: <mode> <phase> +<µs since the mode started>` per phase.
#[derive(Debug)]
pub struct Timing {
    start: Instant,
    file: Option<PathBuf>,
    name: &'static str,
}

impl Timing {
    /// Starts timing the run of `name` (a mode of the binary).
    pub fn start(name: &'static str) -> Timing {
        Timing {
            start: Instant::now(),
            file: file(),
            name,
        }
    }

    /// Marks the end of `phase`.
    pub fn mark(&self, phase: &str) {
        if let Some(path) = &self.file {
            let us = self.start.elapsed().as_micros();
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = writeln!(f, "veil-oci-hook timing: {} {phase} +{us}us", self.name);
            }
        }
    }
}

/// The timing file, when set.
pub fn file() -> Option<PathBuf> {
    std::env::var_os(TIMING_VAR)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}
