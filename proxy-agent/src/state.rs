//! The agent's persistent, non-secret sandbox set (`<state dir>/sandboxes.json`).
//!
//! It lets a restarted agent re-adopt every sandbox while control is still down: which cgroup
//! (and cgroup id, the name of its pins), which netns, which listener ports it had. It holds no
//! secret and no mount. Written atomically (temporary file, fsync, rename), mode 0600.

use std::collections::BTreeMap;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name of the sandbox set inside the state directory.
pub const SANDBOXES_FILE: &str = "sandboxes.json";
/// Version of the file's layout.
const FORMAT: u32 = 1;

/// One sandbox as the agent left it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// Sandbox id.
    pub id: String,
    /// Organization.
    pub org: String,
    /// Absolute cgroup v2 directory.
    pub cgroup: PathBuf,
    /// Network namespace file, if the sandbox has its own.
    pub netns: Option<PathBuf>,
    /// Inode of the cgroup directory: the key of its map entry and the name of its pins.
    pub cgroup_id: u64,
    /// Port of its IPv4 listener.
    pub port_v4: u16,
    /// Port of its IPv6 listener (0 = none).
    pub port_v6: u16,
    /// Where its upstream connections leave from (records of older agents: from its netns).
    #[serde(default)]
    pub egress: veil_link::Egress,
}

#[derive(Debug, Serialize, Deserialize)]
struct File {
    format: u32,
    sandboxes: Vec<SandboxRecord>,
}

/// Why the sandbox set could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file system failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The file is not a sandbox set this agent understands.
    #[error("{path} is corrupt or of an unknown format")]
    Corrupt {
        /// The file.
        path: PathBuf,
    },
}

/// The sandbox set file of one state directory.
#[derive(Debug, Clone)]
pub struct SandboxFile {
    path: PathBuf,
}

impl SandboxFile {
    /// The file inside `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(SANDBOXES_FILE),
        }
    }

    /// Reads the set; a missing file is an empty set.
    pub fn load(&self) -> Result<BTreeMap<String, SandboxRecord>, StateError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(source) => {
                return Err(StateError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        parse(&bytes).ok_or_else(|| StateError::Corrupt {
            path: self.path.clone(),
        })
    }

    /// Replaces the set.
    pub fn store(&self, records: &BTreeMap<String, SandboxRecord>) -> Result<(), StateError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let io_err = |source| StateError::Io {
            path: self.path.clone(),
            source,
        };
        let body = serde_json::to_vec_pretty(&File {
            format: FORMAT,
            sandboxes: records.values().cloned().collect(),
        })
        .map_err(|e| io_err(io::Error::other(e)))?;
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err)?;
        f.write_all(&body).map_err(io_err)?;
        f.sync_all().map_err(io_err)?;
        std::fs::rename(&tmp, &self.path).map_err(io_err)
    }
}

/// Parses the file's bytes; `None` when it is not a valid set (unknown format, duplicate ids).
fn parse(bytes: &[u8]) -> Option<BTreeMap<String, SandboxRecord>> {
    let file: File = serde_json::from_slice(bytes).ok()?;
    if file.format != FORMAT {
        return None;
    }
    let mut map = BTreeMap::new();
    for r in file.sandboxes {
        if map.insert(r.id.clone(), r).is_some() {
            return None;
        }
    }
    Some(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> SandboxRecord {
        SandboxRecord {
            egress: Default::default(),
            id: id.into(),
            org: "o".into(),
            cgroup: "/sys/fs/cgroup/x".into(),
            netns: Some("/run/netns/x".into()),
            cgroup_id: 77,
            port_v4: 40000,
            port_v6: 40001,
        }
    }

    #[test]
    fn round_trips_and_missing_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let f = SandboxFile::new(dir.path());
        assert!(f.load().unwrap().is_empty());
        let set: BTreeMap<_, _> = [("a", record("a")), ("b", record("b"))]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        f.store(&set).unwrap();
        assert_eq!(f.load().unwrap(), set);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join(SANDBOXES_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn rejects_garbage_other_formats_and_duplicates() {
        assert!(parse(b"{").is_none());
        assert!(parse(br#"{"format":2,"sandboxes":[]}"#).is_none());
        let dup = serde_json::to_vec(&File {
            format: FORMAT,
            sandboxes: vec![record("a"), record("a")],
        })
        .unwrap();
        assert!(parse(&dup).is_none());
        assert_eq!(
            parse(br#"{"format":1,"sandboxes":[]}"#),
            Some(BTreeMap::new())
        );
    }
}
