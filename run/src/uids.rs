//! A uid of its own for each `veil-control run` sandbox, from `run.uid_range`.
//!
//! A uid is taken by creating its record `<PRIVATE_DIR>/uids/<uid>` (O_EXCL: two runs never
//! take the same one) and holding an flock on it while the run lives; the record names the
//! owning run's pid, the sandbox id and its cgroup. The run removes the record only after its
//! teardown (processes killed, cgroup, registration and files removed), so a uid is reused only
//! once its sandbox is gone. A run killed outright leaves its record: the next run finds it
//! (unlocked, owner pid gone), removes that sandbox and only then the record. The flock also
//! keeps two reapers, or a reaper and a new owner, from acting on the same record.
//!
//! A uid is never taken while any process runs as it, nor when the host's user or group
//! database names it.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};

/// `run.uid_range`: the first and last uid (inclusive) sandboxes get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    /// First uid.
    pub first: u32,
    /// Last uid (inclusive).
    pub last: u32,
}

/// Errors taking a uid.
#[derive(Debug, thiserror::Error)]
pub enum UidError {
    /// The record directory could not be prepared.
    #[error(transparent)]
    State(#[from] super::state::StateError),
    /// A system call on a record failed.
    #[error("{path}: {source}")]
    Io {
        /// The record.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Every uid of the range is taken.
    #[error(
        "no free uid in run.uid_range {first}-{last}: every one is held by a live sandbox, a \
         process or a user of this host"
    )]
    Exhausted {
        /// First uid.
        first: u32,
        /// Last uid.
        last: u32,
    },
}

/// What a record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The pid of the `veil-control run` that holds it.
    pub owner: u32,
    /// The sandbox id.
    pub sandbox: String,
    /// The sandbox's cgroup, relative to the cgroup2 mount.
    pub cgroup: String,
}

impl Record {
    fn render(&self) -> String {
        format!("{}\n{}\n{}\n", self.owner, self.sandbox, self.cgroup)
    }

    fn parse(text: &str) -> Option<Record> {
        let mut lines = text.lines();
        let owner = lines.next()?.parse().ok()?;
        let sandbox = lines.next()?.to_owned();
        let cgroup = lines.next()?.to_owned();
        Some(Record {
            owner,
            sandbox,
            cgroup,
        })
    }
}

/// A uid held by this run (its record, locked); [`Lease::release`] gives it back.
#[derive(Debug)]
pub struct Lease {
    uid: u32,
    path: PathBuf,
    lock: Flock<File>,
}

impl Lease {
    /// The uid.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// Removes the record: the uid may be taken again. Call once the sandbox is gone.
    pub fn release(self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            eprintln!("veil-control run: removing {}: {e}", self.path.display());
        }
        drop(self.lock);
    }
}

/// The uids some process runs as (real, effective, saved or filesystem).
fn uids_in_use() -> HashSet<u32> {
    let mut used = HashSet::new();
    let procs = std::fs::read_dir("/proc").into_iter().flatten().flatten();
    for entry in procs {
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        if let Some(line) = status.lines().find(|l| l.starts_with("Uid:")) {
            used.extend(
                line.split_whitespace()
                    .skip(1)
                    .filter_map(|u| u.parse::<u32>().ok()),
            );
        }
    }
    used
}

/// Whether the host's user or group database knows `id` (such a uid belongs to someone).
fn named(id: u32) -> bool {
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(id));
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(id));
    !matches!((user, group), (Ok(None), Ok(None)))
}

/// The candidates of `range` in probing order: from `start` (taken modulo the range's size)
/// up, wrapping around.
pub fn probe_order(range: UidRange, start: u64) -> impl Iterator<Item = u32> {
    let size = u64::from(range.last - range.first) + 1;
    (0..size).filter_map(move |k| {
        let offset = (start.wrapping_add(k)) % size;
        u32::try_from(u64::from(range.first) + offset).ok()
    })
}

/// Takes a free uid of `range` for `record`'s sandbox (its records live in `dir`).
pub fn claim(dir: &Path, range: UidRange, record: &Record) -> Result<Lease, UidError> {
    let in_use = uids_in_use();
    // A random start spreads sandboxes over the range, so a uid is rarely reused soon.
    for uid in probe_order(range, rand::random::<u64>()) {
        if in_use.contains(&uid) || named(uid) {
            continue;
        }
        let path = dir.join(uid.to_string());
        let file = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(source) => return Err(UidError::Io { path, source }),
        };
        let io = |source| UidError::Io {
            path: path.clone(),
            source,
        };
        let mut lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| io(std::io::Error::from(e)))?;
        lock.write_all(record.render().as_bytes()).map_err(io)?;
        return Ok(Lease { uid, path, lock });
    }
    Err(UidError::Exhausted {
        first: range.first,
        last: range.last,
    })
}

/// A record whose run is gone, locked by us until [`Stale::release`].
#[derive(Debug)]
pub struct Stale {
    /// What it says.
    pub record: Record,
    path: PathBuf,
    _lock: Flock<File>,
}

impl Stale {
    /// Removes the record: call once its sandbox is removed.
    pub fn release(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// How long a record may stay empty (its run died between creating and writing it).
const EMPTY_GRACE: Duration = Duration::from_secs(60);

/// The records in `dir` whose run is gone (no one holds their lock and their owner pid is not
/// alive), each locked; empty ones older than a minute are removed here.
pub fn stale(dir: &Path, alive: impl Fn(u32) -> bool) -> Vec<Stale> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).into_iter().flatten().flatten();
    for entry in entries {
        let path = entry.path();
        let Ok(file) = File::open(&path) else {
            continue;
        };
        let Ok(mut lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
            continue;
        };
        // Removed (and perhaps taken again as a new file) between our open and lock.
        let same = match (lock.metadata(), std::fs::symlink_metadata(&path)) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.nlink() > 0,
            _ => false,
        };
        if !same {
            continue;
        }
        let mut text = String::new();
        if lock.read_to_string(&mut text).is_err() {
            continue;
        }
        match Record::parse(&text) {
            Some(record) if !alive(record.owner) => out.push(Stale {
                record,
                path,
                _lock: lock,
            }),
            Some(_) => {}
            None => {
                let old = lock
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .is_some_and(|age| age > EMPTY_GRACE);
                if old {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(owner: u32, id: &str) -> Record {
        Record {
            owner,
            sandbox: id.into(),
            cgroup: format!("veil.slice/{id}"),
        }
    }

    #[test]
    fn probing_covers_the_range_once_from_any_start() {
        let r = UidRange {
            first: 10,
            last: 14,
        };
        assert_eq!(probe_order(r, 0).collect::<Vec<_>>(), [10, 11, 12, 13, 14]);
        assert_eq!(probe_order(r, 3).collect::<Vec<_>>(), [13, 14, 10, 11, 12]);
        assert_eq!(probe_order(r, u64::MAX).count(), 5);
        let one = UidRange {
            first: u32::MAX - 1,
            last: u32::MAX - 1,
        };
        assert_eq!(probe_order(one, 7).collect::<Vec<_>>(), [u32::MAX - 1]);
    }

    #[test]
    fn records_round_trip() {
        let r = record(42, "run-42-00ab");
        assert_eq!(Record::parse(&r.render()), Some(r));
        assert_eq!(Record::parse(""), None);
        assert_eq!(Record::parse("x\ny\nz\n"), None);
    }

    #[test]
    fn claims_are_exclusive_and_released_records_are_free_again() {
        let dir = tempfile::tempdir().unwrap();
        let range = UidRange {
            first: 3_999_000_000,
            last: 3_999_000_001,
        };
        let a = claim(dir.path(), range, &record(1, "a")).unwrap();
        let b = claim(dir.path(), range, &record(1, "b")).unwrap();
        assert_ne!(a.uid(), b.uid());
        assert!(matches!(
            claim(dir.path(), range, &record(1, "c")),
            Err(UidError::Exhausted { .. })
        ));
        // Held (locked) records are never stale, whatever the owner pid says.
        assert!(stale(dir.path(), |_| false).is_empty());
        let uid = a.uid();
        a.release();
        let c = claim(dir.path(), range, &record(1, "c")).unwrap();
        assert_eq!(c.uid(), uid);
        drop((b, c));
    }

    #[test]
    fn concurrent_claims_never_share_a_uid() {
        let dir = tempfile::tempdir().unwrap();
        let range = UidRange {
            first: 3_999_000_100,
            last: 3_999_000_115,
        };
        let leases: Vec<Lease> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|i| {
                    let dir = dir.path();
                    s.spawn(move || claim(dir, range, &record(1, &format!("s{i}"))).unwrap())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let uids: HashSet<u32> = leases.iter().map(Lease::uid).collect();
        assert_eq!(uids.len(), 16);
        assert!(claim(dir.path(), range, &record(1, "one-too-many")).is_err());
    }

    #[test]
    fn a_dead_runs_record_is_stale_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let range = UidRange {
            first: 3_999_000_010,
            last: 3_999_000_010,
        };
        // A run that died: its lock went with it, its record stayed.
        let lease = claim(dir.path(), range, &record(7, "dead")).unwrap();
        drop(lease.lock);
        assert!(stale(dir.path(), |_| true).is_empty(), "owner alive");
        let found = stale(dir.path(), |_| false);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].record, record(7, "dead"));
        // While one reaper holds it, no other sees it and the uid stays taken.
        assert!(stale(dir.path(), |_| false).is_empty());
        assert!(claim(dir.path(), range, &record(1, "new")).is_err());
        for s in found {
            s.release();
        }
        claim(dir.path(), range, &record(1, "new")).unwrap();
    }
}
