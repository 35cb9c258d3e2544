//! Phase timestamps on stderr when `VEIL_OCI_HOOK_TIMING` is set, to see where a container's
//! start time goes (the container-start benchmark reads them). Off by default.

use std::time::Instant;

/// The variable that turns the timings on.
pub const TIMING_VAR: &str = "VEIL_OCI_HOOK_TIMING";

/// Prints `<what> +<ms since start>` per phase when enabled.
#[derive(Debug)]
pub struct Timing {
    start: Instant,
    on: bool,
    name: &'static str,
}

impl Timing {
    /// Starts timing the run of `name` (a mode of the binary).
    pub fn start(name: &'static str) -> Timing {
        Timing {
            start: Instant::now(),
            on: std::env::var_os(TIMING_VAR).is_some(),
            name,
        }
    }

    /// Marks the end of `phase`.
    pub fn mark(&self, phase: &str) {
        if self.on {
            let us = self.start.elapsed().as_micros();
            eprintln!("veil-oci-hook timing: {} {phase} +{us}us", self.name);
        }
    }
}
