//! Cross-process allocator of address blocks: block `i` is `198.18.0.0/15`'s i-th /30 and
//! `fd76:6569:6c:i::/64`.
//!
//! A block is owned through a lock file `/run/veil-tests/block-<i>.lock` that holds the owner's
//! pid and an exclusive `flock`. The kernel drops the flock when its owner dies, so a dead test
//! process's blocks are reclaimed by the next allocation even without cleanup; a live owner's
//! lock can never be stolen (unlike a pid check followed by an unlink, which races).
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::owner;

/// Number of blocks: /30s in a /15.
pub const BLOCKS: u32 = 1 << 15;
const V4_BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);

/// One allocated block; released (lock file removed) on drop.
#[derive(Debug)]
pub struct Block {
    index: u32,
    path: PathBuf,
    /// Held only for its flock, which is the ownership.
    _lock: File,
}

impl Block {
    /// The block's index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Address `host` (1 or 2) of the block's /30.
    pub fn v4(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::from(V4_BASE + self.index * 4 + u32::from(host & 3))
    }

    /// Address `::host` of the block's /64.
    pub fn v6(&self, host: u16) -> Ipv6Addr {
        let i = u16::try_from(self.index).unwrap_or(u16::MAX);
        Ipv6Addr::new(0xfd76, 0x6569, 0x006c, i, 0, 0, 0, host)
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // Unlink while still holding the lock (the `_lock` field closes after this body): a
        // racing allocator that opened the old inode notices (inode check) and moves on.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The lock file that owns block `index`.
pub fn lock_path(index: u32) -> PathBuf {
    Path::new(owner::STATE_DIR).join(format!("block-{index}.lock"))
}

/// Tries to take block `index`; `None` if another live process holds it.
pub(crate) fn try_take(index: u32) -> Option<Block> {
    let path = lock_path(index);
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return None;
    }
    // The file may have been unlinked (released) between our open and our flock.
    let same = match (lock.metadata(), std::fs::metadata(&path)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    };
    if !same {
        return None;
    }
    let mut f = &lock;
    let _ = f.set_len(0);
    let _ = writeln!(f, "{}", owner::pid());
    Some(Block {
        index,
        path,
        _lock: lock,
    })
}

/// Allocates a free block (panics when all are taken).
pub fn allocate() -> Block {
    crate::stale::init();
    std::fs::create_dir_all(owner::STATE_DIR)
        .unwrap_or_else(|e| panic!("creating {}: {e}", owner::STATE_DIR));
    // Start at a random block so parallel processes rarely contend for the same lock files.
    let start = rand::random::<u32>() % BLOCKS;
    for k in 0..BLOCKS {
        let index = (start + k) % BLOCKS;
        if let Some(b) = try_take(index) {
            return b;
        }
    }
    panic!("no free address block in 198.18.0.0/15 (all {BLOCKS} lock files in use)");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(index: u32) -> Block {
        Block {
            index,
            path: PathBuf::from("/nonexistent"),
            _lock: File::open("/dev/null").unwrap(),
        }
    }

    #[test]
    fn addresses_stay_inside_the_test_ranges() {
        let first = block(0);
        assert_eq!(first.v4(1), Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(first.v4(2), Ipv4Addr::new(198, 18, 0, 2));
        let last = block(BLOCKS - 1);
        assert_eq!(last.v4(2), Ipv4Addr::new(198, 19, 255, 254));
        assert_eq!(
            last.v6(2),
            "fd76:6569:6c:7fff::2".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            block(5).v6(1),
            "fd76:6569:6c:5::1".parse::<Ipv6Addr>().unwrap()
        );
    }
}
