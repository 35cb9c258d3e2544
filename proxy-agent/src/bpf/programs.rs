//! The programs of veil's eBPF object: their names, attach order and typed handles.

use aya::{
    Ebpf,
    programs::{CgroupSockAddr, SockOps},
};

use super::error::BpfError;

/// cgroup/sock_addr programs, in the order they are attached: getpeername before connect so
/// that a redirected socket never reports the listener as its peer; bind first so that the
/// listener port is guarded before anything is redirected to it.
pub(crate) const SOCK_ADDR_PROGRAMS: [&str; 8] = [
    "bind4",
    "bind6",
    "getpeername4",
    "getpeername6",
    "sendmsg4",
    "sendmsg6",
    "connect4",
    "connect6",
];
/// The sock_ops program; attached before the sock_addr ones so every redirected connection is
/// recorded.
pub(crate) const SOCK_OPS_PROGRAM: &str = "veil_sockops";
/// Every program linked to a sandbox cgroup, in attach order (the names of their pins).
pub const PROGRAMS: [&str; 9] = [
    SOCK_OPS_PROGRAM,
    SOCK_ADDR_PROGRAMS[0],
    SOCK_ADDR_PROGRAMS[1],
    SOCK_ADDR_PROGRAMS[2],
    SOCK_ADDR_PROGRAMS[3],
    SOCK_ADDR_PROGRAMS[4],
    SOCK_ADDR_PROGRAMS[5],
    SOCK_ADDR_PROGRAMS[6],
    SOCK_ADDR_PROGRAMS[7],
];

/// The named cgroup/sock_addr program of the object.
pub(crate) fn sock_addr_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, BpfError> {
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(BpfError::MissingProgram(name))
}

/// The sock_ops program of the object.
pub(crate) fn sock_ops_program(ebpf: &mut Ebpf) -> Result<&mut SockOps, BpfError> {
    ebpf.program_mut(SOCK_OPS_PROGRAM)
        .and_then(|p| p.try_into().ok())
        .ok_or(BpfError::MissingProgram(SOCK_OPS_PROGRAM))
}
