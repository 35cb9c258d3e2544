//! Ownership of harness objects: every name encodes the owning test process's pid, so that
//! leftovers of test processes that died without running their destructors can be removed.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Directory for cross-process state: address-block locks and agent pid files.
pub const STATE_DIR: &str = "/run/veil-tests";

static SEQ: AtomicU64 = AtomicU64::new(0);

/// The pid of this (owning) test process.
pub fn pid() -> u32 {
    std::process::id()
}

/// A number unique within this process, for object names.
pub fn next_seq() -> u64 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// Whether a process with this pid exists (a zombie counts as alive).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission; no signal is sent.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Reduces a caller's tag to characters valid in every name we build, at most 20 of them.
pub fn sanitize_tag(tag: &str) -> String {
    let s: String = tag
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(20)
        .collect();
    if s.is_empty() { "x".to_owned() } else { s }
}

/// Lowercase base-36 rendering, to fit a pid and a sequence number into a 15-byte ifname.
pub fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

/// The owner pid of a name `<prefix><pid>-<seq>[-...]` (decimal), if it has that shape.
pub fn owner_decimal(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    let mut parts = rest.splitn(3, '-');
    let pid = parts.next()?;
    let seq = parts.next()?;
    if pid.is_empty() || seq.is_empty() {
        return None;
    }
    if !pid.bytes().all(|b| b.is_ascii_digit()) || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// The owner pid of an interface name `<prefix><pid36>-<seq36>` (base 36), if it has that shape.
pub fn owner_base36(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    let (pid, seq) = rest.split_once('-')?;
    let valid = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
    if !valid(pid) || !valid(seq) {
        return None;
    }
    u32::from_str_radix(pid, 36).ok()
}

/// Whether `name` was made by a test process that no longer exists.
pub fn is_stale(owner: Option<u32>) -> bool {
    owner.is_some_and(|pid| pid != self::pid() && !pid_alive(pid))
}

/// Prefix of temp dirs made by the harness; followed by the owner pid.
pub fn tempdir_prefix() -> String {
    format!("veil-test-{}-", pid())
}

/// Entries of a directory; empty when it does not exist or cannot be read.
pub fn list_dir(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_owner_of_names() {
        assert_eq!(owner_decimal("veil-123-4-world", "veil-"), Some(123));
        assert_eq!(owner_decimal("veil-123-4", "veil-"), Some(123));
        assert_eq!(owner_decimal("veil-sb-4-x", "veil-"), None);
        assert_eq!(owner_decimal("veil-123", "veil-"), None);
        assert_eq!(owner_decimal("other-1-2", "veil-"), None);
        assert_eq!(
            owner_base36(&format!("vh-{}-{}", base36(4194304), base36(99)), "vh-"),
            Some(4194304)
        );
        assert_eq!(owner_base36("vh-zz", "vh-"), None);
        assert_eq!(owner_base36("eth0", "vh-"), None);
    }

    #[test]
    fn base36_round_trips() {
        for n in [0u64, 1, 35, 36, 4194304, u64::from(u32::MAX)] {
            assert_eq!(u64::from_str_radix(&base36(n), 36).unwrap(), n);
        }
        assert!(format!("vh-{}-{}", base36(4194304), base36(36 * 36 * 36 - 1)).len() <= 15);
    }

    #[test]
    fn tags_are_sanitized() {
        assert_eq!(sanitize_tag("a b/c"), "a_b_c");
        assert_eq!(sanitize_tag(""), "x");
        assert_eq!(sanitize_tag(&"y".repeat(50)).len(), 20);
    }
}
