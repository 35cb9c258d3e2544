//! Fixtures for veil-control tests.
