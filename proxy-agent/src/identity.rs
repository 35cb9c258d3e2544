//! The agent's stable identity: a random id created on first start in the state directory.

use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use veil_link::AgentId;

/// File name of the id inside the state directory.
pub const AGENT_ID_FILE: &str = "agent-id";

/// Why the id could not be read or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file system failed.
    #[error("agent id file: {0}")]
    Io(#[from] io::Error),
    /// The file exists but does not hold an id this agent wrote.
    #[error("agent id file {0} is corrupt (expected 32 lowercase hex digits)")]
    Corrupt(String),
    /// No randomness was available.
    #[error("no randomness for the agent id: {0}")]
    Random(String),
}

/// Reads the id from `state_dir`, creating it on first start.
pub fn load_or_create(state_dir: &Path) -> Result<AgentId, IdentityError> {
    let path = state_dir.join(AGENT_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => AgentId::parse(text.trim())
            .map_err(|_| IdentityError::Corrupt(path.display().to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut raw = [0u8; 16];
            getrandom::fill(&mut raw).map_err(|e| IdentityError::Random(e.to_string()))?;
            let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            writeln!(f, "{id}")?;
            f.sync_all()?;
            AgentId::parse(id).map_err(|_| IdentityError::Corrupt(path.display().to_string()))
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_stable() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        assert_eq!(a.as_str().len(), 32, "{a}");
        assert_eq!(load_or_create(dir.path()).unwrap(), a);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(load_or_create(other.path()).unwrap(), a);
        std::fs::write(dir.path().join(AGENT_ID_FILE), "nope\n").unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(IdentityError::Corrupt(_))
        ));
    }
}
