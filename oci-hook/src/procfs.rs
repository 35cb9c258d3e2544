//! A process's cgroup v2 path and netns file, as the agent's Bind wants them.

use std::path::{Path, PathBuf};

use crate::error::HookError;

/// The cgroup v2 path in a `/proc/PID/cgroup` text: the `0::` line (hybrid hosts list the v1
/// hierarchies too). `None` when the process has no v2 cgroup.
pub fn unified_cgroup(text: &str) -> Option<PathBuf> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim_end)
        .filter(|p| p.starts_with('/'))
        .map(PathBuf::from)
}

/// The cgroup v2 path of `pid`.
pub fn cgroup_of(pid: u32) -> Result<PathBuf, HookError> {
    let file = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let text = std::fs::read_to_string(&file).map_err(HookError::io(&file))?;
    unified_cgroup(&text).ok_or_else(|| {
        HookError::Spec(format!(
            "{} has no cgroup v2 (0::) line: veil needs cgroup v2",
            file.display()
        ))
    })
}

/// The netns file of `pid`.
pub fn netns_of(pid: u32) -> PathBuf {
    Path::new("/proc").join(pid.to_string()).join("ns/net")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unified_line_is_found_among_v1_lines() {
        let hybrid = "12:pids:/docker/abc\n1:name=systemd:/docker/abc\n0::/docker/abc\n";
        assert_eq!(unified_cgroup(hybrid), Some(PathBuf::from("/docker/abc")));
        assert_eq!(
            unified_cgroup("0::/libpod_parent/libpod-1\n"),
            Some(PathBuf::from("/libpod_parent/libpod-1"))
        );
        assert_eq!(unified_cgroup("1:cpu:/x\n"), None);
        assert_eq!(unified_cgroup(""), None);
    }
}
