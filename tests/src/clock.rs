//! Waiting for the wall clock: control stamps records (`createdAt`, `updatedAt`) with
//! millisecond resolution, so a test that needs two records' stamps to differ waits until the
//! clock has moved past the earlier one instead of sleeping a guessed time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// Returns once the wall clock's millisecond has changed: whatever control stamps from now on
/// is later than anything it stamped before the call (same host clock).
pub async fn next_millisecond() {
    let start = now_ms();
    while now_ms() <= start {
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
}
