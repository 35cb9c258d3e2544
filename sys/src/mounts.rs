//! The cgroup v2 mount point, read from `/proc/self/mounts` (never assumed: distributions and
//! containers mount it in different places, and `ip netns exec` remounts /sys).

use std::io;
use std::path::PathBuf;

/// The first cgroup2 mount point listed in a `/proc/self/mounts`-format text.
pub fn cgroup2_mount_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape(target)))
    })
}

/// The cgroup2 mount of this process's mount namespace; `NotFound` when there is none.
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    cgroup2_mount_in(&mounts).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 file system is mounted (veil needs cgroup v2)",
        )
    })
}

/// Undoes the octal escapes of /proc/self/mounts (`\040` for a space). A backslash not followed
/// by three octal digits of a byte value (at most `\377`) stays as it is.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(byte) = b.get(i + 1..i + 4).and_then(octal_byte)
        {
            out.push(byte);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Three octal digits as a byte; `None` for anything else, including values above 255.
fn octal_byte(digits: &[u8]) -> Option<u8> {
    let value = digits.iter().try_fold(0u32, |acc, &d| {
        (b'0'..=b'7')
            .contains(&d)
            .then(|| acc * 8 + u32::from(d - b'0'))
    })?;
    u8::try_from(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cases of the four copies this replaces (control's hostcheck, the agent's config,
    /// the test harness's env), in one place.
    #[test]
    fn finds_the_cgroup2_mount_wherever_it_is() {
        let hybrid = "sysfs /sys sysfs rw 0 0\n\
            tmpfs /sys/fs/cgroup tmpfs ro 0 0\n\
            cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nsdelegate 0 0\n\
            cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount_in(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let escaped = "none /mnt/my\\040cg cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_mount_in(escaped), Some(PathBuf::from("/mnt/my cg")));
        assert_eq!(
            cgroup2_mount_in("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
        );
        assert_eq!(cgroup2_mount_in("proc /proc proc rw 0 0\n"), None);
        assert_eq!(cgroup2_mount_in("garbage\n\n"), None);
        assert_eq!(unescape("a\\134b\\"), "a\\b\\");
    }

    #[test]
    fn finds_the_first_cgroup2_mount_and_unescapes_it() {
        let mounts = "sysfs /sys sysfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/my\\040dir cgroup2 rw 0 0\n\
                      cgroup2 /other cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount_in(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/my dir"))
        );
        assert_eq!(cgroup2_mount_in("sysfs /sys sysfs rw 0 0\n"), None);
        assert_eq!(cgroup2_mount_in(""), None);
    }

    #[test]
    fn escapes_decode_only_when_they_are_bytes() {
        assert_eq!(unescape(r"a\040b\011c\134d"), "a b\tc\\d");
        // Above \377 is not a byte: kept literally, never wrapped or overflowed.
        assert_eq!(unescape(r"x\777y\400"), r"x\777y\400");
        // Too short, not octal, or at the very end: kept.
        assert_eq!(unescape(r"a\04"), r"a\04");
        assert_eq!(unescape(r"a\089"), r"a\089");
        assert_eq!(unescape("a\\"), "a\\");
        assert_eq!(unescape(r"\377"), "\u{fffd}");
    }
}
