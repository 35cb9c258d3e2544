//! Raw bpf(2) commands aya 0.14 does not offer, and `SO_NETNS_COOKIE`.

use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::path::Path;

/// `SO_NETNS_COOKIE` (not in every libc crate version).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// `BPF_OBJ_GET`: opens a pinned object.
pub(super) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    /// `BPF_OBJ_GET` from `linux/bpf.h`.
    const BPF_OBJ_GET: libc::c_long = 7;
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        // The kernel refuses non-zero bytes past the fields it knows: no implicit padding.
        _pad: u32,
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut attr = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: `attr` is the obj_get member of union bpf_attr; `c_path` outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw mut attr,
            std::mem::size_of::<ObjGetAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(rc).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `BPF_LINK_UPDATE`: makes a link run `program` instead of the one it has, atomically.
pub(super) fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    /// `BPF_LINK_UPDATE` from `linux/bpf.h`.
    const BPF_LINK_UPDATE: libc::c_long = 29;
    #[repr(C)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: `attr` is the link_update member of union bpf_attr (no padding) and outlives
    // the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &raw mut attr,
            std::mem::size_of::<LinkUpdateAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `BPF_LINK_DETACH`: detaches a link from its hook now, whoever else holds it.
pub(super) fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    /// `BPF_LINK_DETACH` from `linux/bpf.h`.
    const BPF_LINK_DETACH: libc::c_long = 34;
    #[repr(C)]
    struct LinkDetachAttr {
        link_fd: u32,
    }
    let mut attr = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
    };
    // SAFETY: `attr` is the link_detach member of union bpf_attr and outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            &raw mut attr,
            std::mem::size_of::<LinkDetachAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM`: removes `key` from a hash map (LRU included, kernel 5.14+)
/// and returns its value, in one syscall; `None` when the key is not there.
pub(super) fn map_take<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    /// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` from `linux/bpf.h`.
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    #[repr(C)]
    struct MapElemAttr {
        map_fd: u32,
        // The kernel's struct aligns `key` to 8 bytes: explicit, so it is zeroed.
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut value = std::mem::MaybeUninit::<V>::uninit();
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `attr` is the map-element member of union bpf_attr (no implicit padding); `key`
    // and `value` are live for the call and as large as the map's key and value (`K` and `V`
    // are the map's own types); the kernel writes at most `size_of::<V>()` bytes to `value`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &raw mut attr,
            std::mem::size_of::<MapElemAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: the call succeeded, so the kernel wrote the whole value; `V: Pod` has no
    // invalid bit patterns.
    Ok(Some(unsafe { value.assume_init() }))
}

/// Reads SO_NETNS_COOKIE (71) of a socket.
pub fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `fd` is a live descriptor for the call; the kernel writes at most `len` bytes
    // into `cookie`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of::<u64>() {
        return Err(io::Error::other("SO_NETNS_COOKIE returned a short value"));
    }
    Ok(cookie)
}

/// Cookie of the agent's own network namespace (the host's).
pub fn own_netns_cookie() -> io::Result<u64> {
    use std::os::fd::AsFd as _;
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    netns_cookie(probe.as_fd())
}
