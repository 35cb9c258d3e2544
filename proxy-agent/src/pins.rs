//! Where the agent pins its eBPF objects in bpffs, and making sure bpffs is there.
//!
//! ```text
//! <pin dir>/maps/<MAP NAME>                      maps shared by agent generations of one layout
//! <pin dir>/sandboxes/<cgroup id>/<program>      one bpf_link per program and sandbox cgroup
//! <pin dir>/guarded/<cgroup id>/<program>        the refusing programs on a guarded parent
//! ```
//! Pinned links stay attached when the agent exits (SIGTERM, SIGKILL, upgrade), so a sandbox is
//! never left without its redirect; only removing the pin detaches a link. A pinned map of
//! another build's layout is replaced at load (see `bpf::layout`).

use std::io;
use std::path::{Path, PathBuf};

/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is conventionally mounted.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// Paths of the pinned objects under one pin directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    /// The layout under `root` (which must be on bpffs before anything is pinned).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The pin directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of the pinned maps.
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    /// Pin path of the map `name`.
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// Directory of all sandboxes' links.
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.root.join("sandboxes")
    }

    /// Directory of one sandbox cgroup's links.
    pub fn sandbox_dir(&self, cgroup_id: u64) -> PathBuf {
        self.sandboxes_dir().join(cgroup_id.to_string())
    }

    /// Directory of the guarded runtime parents' links (`<pin dir>/guarded/<cgroup id>/`).
    pub fn guarded_dir(&self) -> PathBuf {
        self.root.join("guarded")
    }

    /// Pin path of `program`'s link on the cgroup `cgroup_id`.
    pub fn link(&self, cgroup_id: u64, program: &str) -> PathBuf {
        self.sandbox_dir(cgroup_id).join(program)
    }

    /// Cgroup ids that have a link directory (whatever its contents).
    pub fn pinned_cgroups(&self) -> io::Result<Vec<u64>> {
        let entries = match std::fs::read_dir(self.sandboxes_dir()) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut ids = Vec::new();
        for entry in entries {
            if let Some(id) = parse_cgroup_dir(&entry?.file_name().to_string_lossy()) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// Creates the map and sandbox directories (0700); mounts bpffs at /sys/fs/bpf first when
    /// the pin directory is not on bpffs and nothing is mounted there.
    pub fn prepare(&self) -> io::Result<()> {
        ensure_bpffs(&self.root)?;
        for dir in [self.maps_dir(), self.sandboxes_dir()] {
            create_private_dir(&dir)?;
        }
        Ok(())
    }
}

/// A sandbox link directory's name is its cgroup id in decimal, nothing else.
pub fn parse_cgroup_dir(name: &str) -> Option<u64> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_digit()) || name.starts_with('0') {
        return None;
    }
    name.parse().ok()
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", dir.display())))
}

/// Whether the nearest existing ancestor of `path` (or `path` itself) is on bpffs.
fn on_bpffs(path: &Path) -> io::Result<bool> {
    let mut probe = path;
    loop {
        match nix::sys::statfs::statfs(probe) {
            Ok(fs) => return Ok(fs.filesystem_type().0 == BPF_FS_MAGIC),
            Err(nix::errno::Errno::ENOENT) => match probe.parent() {
                Some(parent) => probe = parent,
                None => return Ok(false),
            },
            Err(e) => return Err(e.into()),
        }
    }
}

/// Makes sure `pin_dir` will be on bpffs, mounting bpffs at /sys/fs/bpf when it is absent.
pub fn ensure_bpffs(pin_dir: &Path) -> io::Result<()> {
    if on_bpffs(pin_dir)? {
        return Ok(());
    }
    let mount_point = Path::new(BPFFS_MOUNT);
    if pin_dir.starts_with(mount_point) && !on_bpffs(mount_point)? {
        nix::mount::mount(
            Some("bpf"),
            mount_point,
            Some("bpf"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some("mode=0700"),
        )
        .map_err(|e| io::Error::other(format!("mounting bpffs at {BPFFS_MOUNT}: {e}")))?;
    }
    if on_bpffs(pin_dir)? {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "pin dir {} is not on a bpf file system (mount one, or use a dir under {BPFFS_MOUNT})",
            pin_dir.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_paths() {
        let l = PinLayout::new("/sys/fs/bpf/veil");
        assert_eq!(
            l.map("VEIL_ORIG"),
            Path::new("/sys/fs/bpf/veil/maps/VEIL_ORIG")
        );
        assert_eq!(
            l.link(42, "connect4"),
            Path::new("/sys/fs/bpf/veil/sandboxes/42/connect4")
        );
    }

    #[test]
    fn only_canonical_decimal_names_are_cgroup_dirs() {
        assert_eq!(parse_cgroup_dir("12345"), Some(12345));
        for bad in ["", "0", "012", "1a", "-1", "99999999999999999999999", " 1"] {
            assert_eq!(parse_cgroup_dir(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_tmp_dir_is_not_bpffs() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!on_bpffs(&dir.path().join("not/yet")).unwrap());
        assert!(ensure_bpffs(dir.path()).is_err());
    }
}
