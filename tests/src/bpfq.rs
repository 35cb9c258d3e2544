//! Read-only eBPF queries for assertions: which programs are attached to a cgroup, what veil's
//! maps hold. Raw bpf(2) for queries aya does not offer; aya for enumerating loaded maps.
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;

use aya::maps::MapInfo;

/// The cgroup attach points veil uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttachType {
    /// `BPF_CGROUP_INET4_CONNECT`.
    Connect4,
    /// `BPF_CGROUP_INET6_CONNECT`.
    Connect6,
    /// `BPF_CGROUP_UDP4_SENDMSG`.
    Sendmsg4,
    /// `BPF_CGROUP_UDP6_SENDMSG`.
    Sendmsg6,
    /// `BPF_CGROUP_INET4_GETPEERNAME`.
    Getpeername4,
    /// `BPF_CGROUP_INET6_GETPEERNAME`.
    Getpeername6,
    /// `BPF_CGROUP_SOCK_OPS`.
    SockOps,
    /// `BPF_CGROUP_INET4_BIND`.
    Bind4,
    /// `BPF_CGROUP_INET6_BIND`.
    Bind6,
}

impl AttachType {
    /// Every attach point veil uses.
    pub const ALL: [AttachType; 9] = [
        AttachType::Connect4,
        AttachType::Connect6,
        AttachType::Sendmsg4,
        AttachType::Sendmsg6,
        AttachType::Getpeername4,
        AttachType::Getpeername6,
        AttachType::SockOps,
        AttachType::Bind4,
        AttachType::Bind6,
    ];

    /// The kernel's `enum bpf_attach_type` value.
    pub fn kernel_value(self) -> u32 {
        match self {
            AttachType::SockOps => 3,
            AttachType::Bind4 => 8,
            AttachType::Bind6 => 9,
            AttachType::Connect4 => 10,
            AttachType::Connect6 => 11,
            AttachType::Sendmsg4 => 14,
            AttachType::Sendmsg6 => 15,
            AttachType::Getpeername4 => 29,
            AttachType::Getpeername6 => 30,
        }
    }
}

/// A failed eBPF query.
#[derive(Debug, thiserror::Error)]
pub enum BpfqError {
    /// Opening the cgroup directory failed.
    #[error("opening cgroup {path}: {source}")]
    OpenCgroup {
        /// The cgroup directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A bpf(2) command failed.
    #[error("bpf({cmd}) failed: {source}")]
    Syscall {
        /// The command name.
        cmd: &'static str,
        /// errno.
        source: std::io::Error,
    },
    /// aya could not enumerate or open a map.
    #[error("map enumeration: {0}")]
    Map(#[from] aya::maps::MapError),
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_PROG_QUERY: libc::c_long = 16;

/// Issues bpf(cmd, attr); `attr` is the kernel's `union bpf_attr` prefix for that command.
fn bpf(cmd: libc::c_long, name: &'static str, attr: &mut [u64]) -> Result<libc::c_long, BpfqError> {
    let size = std::mem::size_of_val(attr);
    // SAFETY: attr is a zero-initialised, 8-byte aligned buffer of `size` bytes laid out as the
    // kernel expects for `cmd`; every pointer in it refers to a live buffer of the stated size.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size) };
    if rc < 0 {
        Err(BpfqError::Syscall {
            cmd: name,
            source: std::io::Error::last_os_error(),
        })
    } else {
        Ok(rc)
    }
}

/// Ids of the programs attached to `cgroup` (directly, not inherited) at `attach_type`.
pub fn try_attached_prog_ids(
    cgroup: &Path,
    attach_type: AttachType,
) -> Result<Vec<u32>, BpfqError> {
    let dir = File::open(cgroup).map_err(|source| BpfqError::OpenCgroup {
        path: cgroup.display().to_string(),
        source,
    })?;
    let mut ids = vec![0u32; 64];
    loop {
        // struct { u32 target_fd; u32 attach_type; u32 query_flags; u32 attach_flags;
        //          u64 prog_ids; u32 prog_cnt; ... }
        let mut attr = [0u64; 8];
        attr[0] = u64::from(dir.as_raw_fd() as u32) | (u64::from(attach_type.kernel_value()) << 32);
        attr[2] = ids.as_mut_ptr() as u64;
        attr[3] = ids.len() as u64;
        match bpf(BPF_PROG_QUERY, "BPF_PROG_QUERY", &mut attr) {
            Ok(_) => {
                let count = (attr[3] & 0xffff_ffff) as usize;
                ids.truncate(count.min(ids.len()));
                return Ok(ids);
            }
            Err(BpfqError::Syscall { source, .. })
                if source.raw_os_error() == Some(libc::ENOSPC) =>
            {
                let needed = (attr[3] & 0xffff_ffff) as usize;
                ids = vec![0u32; needed.max(ids.len() * 2)];
            }
            Err(e) => return Err(e),
        }
    }
}

/// [`try_attached_prog_ids`], panicking with the cgroup and errno on failure.
pub fn attached_prog_ids(cgroup: &Path, attach_type: AttachType) -> Vec<u32> {
    try_attached_prog_ids(cgroup, attach_type).unwrap_or_else(|e| {
        panic!(
            "querying {attach_type:?} programs on {}: {e}",
            cgroup.display()
        )
    })
}

/// Every (attach type, program ids) pair with at least one program on `cgroup`.
pub fn attached_progs(cgroup: &Path) -> Vec<(AttachType, Vec<u32>)> {
    AttachType::ALL
        .iter()
        .map(|&t| (t, attached_prog_ids(cgroup, t)))
        .filter(|(_, ids)| !ids.is_empty())
        .collect()
}

/// A loaded eBPF map: its id and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapRef {
    /// Kernel map id.
    pub id: u32,
    /// Map name (at most 15 bytes).
    pub name: String,
}

/// Every loaded map called `name` on the host (several agents may run at once).
pub fn maps_named(name: &str) -> Vec<MapInfo> {
    aya::maps::loaded_maps()
        // A map freed between listing and opening it is simply gone.
        .filter_map(Result::ok)
        .filter(|m| m.name_as_str() == Some(name))
        .collect()
}

/// Maps held open by process `pid`, from the `map_id:` lines of /proc/<pid>/fdinfo.
pub fn process_maps(pid: u32) -> Vec<MapRef> {
    let mut ids: Vec<u32> = crate::owner::list_dir(Path::new(&format!("/proc/{pid}/fdinfo")))
        .into_iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .filter_map(|info| {
            info.lines().find_map(|l| {
                l.strip_prefix("map_id:")
                    .and_then(|v| v.trim().parse().ok())
            })
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids.into_iter()
        .filter_map(|id| {
            let info = MapInfo::from_id(id).ok()?;
            Some(MapRef {
                id,
                name: info.name_as_str().unwrap_or_default().to_owned(),
            })
        })
        .collect()
}

/// Visits every key of the map open as `fd` (key size `key_size`); stops early when `f` says so.
fn for_each_key(
    fd: BorrowedFd<'_>,
    key_size: usize,
    mut f: impl FnMut(&[u8]) -> bool,
) -> Result<(), BpfqError> {
    let mut key: Option<Vec<u8>> = None;
    let mut next = vec![0u8; key_size];
    // A bound on iterations guards against a map that changes under us forever.
    for _ in 0..10_000_000 {
        let mut attr = [0u64; 4];
        attr[0] = u64::from(fd.as_raw_fd() as u32);
        attr[1] = key.as_ref().map_or(0, |k| k.as_ptr() as u64);
        attr[2] = next.as_mut_ptr() as u64;
        match bpf(BPF_MAP_GET_NEXT_KEY, "BPF_MAP_GET_NEXT_KEY", &mut attr) {
            Ok(_) => {
                if !f(&next) {
                    return Ok(());
                }
                key = Some(next.clone());
            }
            Err(BpfqError::Syscall { source, .. })
                if source.raw_os_error() == Some(libc::ENOENT) =>
            {
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Number of entries in the map with this id.
pub fn try_map_len(id: u32) -> Result<usize, BpfqError> {
    let info = MapInfo::from_id(id)?;
    let fd = info.fd()?;
    let mut n = 0;
    for_each_key(fd.as_fd(), info.key_size() as usize, |_| {
        n += 1;
        true
    })?;
    Ok(n)
}

/// [`try_map_len`], panicking on failure.
pub fn map_len(id: u32) -> usize {
    try_map_len(id).unwrap_or_else(|e| panic!("counting entries of map {id}: {e}"))
}

/// Total entries over every loaded map called `name`.
pub fn map_len_by_name(name: &str) -> usize {
    maps_named(name).iter().map(|m| map_len(m.id())).sum()
}

/// Total entries over every loaded `VEIL_ORIG` map (all agents on the host).
pub fn orig_map_len() -> usize {
    map_len_by_name(proxy_common::MAP_ORIG)
}

/// Total entries over every loaded `VEIL_SOCKS` map (all agents on the host).
pub fn socks_map_len() -> usize {
    map_len_by_name(proxy_common::MAP_SOCKS)
}

/// Whether the map open as `fd` has `key`.
fn has_key(fd: BorrowedFd<'_>, value_size: usize, key: &[u8]) -> Result<bool, BpfqError> {
    // Per-CPU maps return one value per possible CPU; size generously.
    let mut value = vec![0u8; value_size.div_ceil(8) * 8 * 1024];
    let mut attr = [0u64; 4];
    attr[0] = u64::from(fd.as_raw_fd() as u32);
    attr[1] = key.as_ptr() as u64;
    attr[2] = value.as_mut_ptr() as u64;
    match bpf(BPF_MAP_LOOKUP_ELEM, "BPF_MAP_LOOKUP_ELEM", &mut attr) {
        Ok(_) => Ok(true),
        Err(BpfqError::Syscall { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Whether any loaded map called `name` with 8-byte keys holds `key`.
pub fn map_has_u64(name: &str, key: u64) -> bool {
    maps_named(name)
        .iter()
        .filter(|m| m.key_size() == 8)
        .any(|m| {
            let fd = m
                .fd()
                .unwrap_or_else(|e| panic!("opening map {name} (id {}): {e}", m.id()));
            has_key(fd.as_fd(), m.value_size() as usize, &key.to_ne_bytes())
                .unwrap_or_else(|e| panic!("looking up {key} in map {name} (id {}): {e}", m.id()))
        })
}

/// Whether any loaded `VEIL_SANDBOXES` map (any agent) holds this cgroup id.
pub fn sandbox_map_has(cgroup_id: u64) -> bool {
    map_has_u64(proxy_common::MAP_SANDBOXES, cgroup_id)
}
