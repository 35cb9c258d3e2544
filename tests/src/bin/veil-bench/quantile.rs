//! Percentiles of measured durations (nearest rank).

use std::time::Duration;

/// The `p` quantile of `sorted` (ascending), by nearest rank.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
