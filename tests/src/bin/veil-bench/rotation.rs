//! `veil-bench rotation`: PATCH response → first upstream request carrying the new value (issue 7).

use anyhow::{Result, bail};

/// Runs `count` rotations under continuous traffic and prints p50/p99 latency.
pub fn run(count: u64) -> Result<()> {
    bail!("rotation benchmark not built yet ({count} rotations asked)")
}
