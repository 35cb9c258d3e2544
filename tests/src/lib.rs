//! End-to-end test harness for veil.
pub mod control;
