//! Logging set-up for veil's binaries: to stderr, filtered by `RUST_LOG`, as text or JSON.

use clap::ValueEnum;

/// How log records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable text (colours only on a terminal).
    Human,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber (and the `log` → tracing bridge, which carries libraries'
/// `log` records such as aya-log's kernel records); `default` is the filter when `RUST_LOG` is
/// unset. Call once, first thing.
pub fn init(default: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // Colour codes only for a person at a terminal, never in journald or log files.
        LogFormat::Human => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .json()
            .with_ansi(false)
            .with_current_span(false)
            .init(),
    }
}
