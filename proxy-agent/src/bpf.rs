//! Loads veil's eBPF programs, attaches them to sandbox cgroups and reads their maps.
//!
//! The only module with eBPF `unsafe`. The kernel side is `proxy-ebpf`; the map layouts are
//! `proxy-common`. Per sandbox: the cgroup's listener ports go into `VEIL_SANDBOXES` and every
//! program is linked to the cgroup through a link pinned in bpffs ([`crate::pins`]), so the
//! redirect outlives the agent; the agent recovers each accepted connection's original
//! destination with [`OrigDstTable::take`].

use std::{
    fs::File,
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError, MapInfo, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps, links::FdLink},
};
use aya_log::EbpfLogger;
use proxy_common::{
    AF_INET, ConnKey, MAP_ORIG, MAP_SANDBOXES, MAP_SOCKS, MAP_STATS, MAX_SANDBOXES,
    MAX_TRACKED_CONNS, OrigDst, PINNED_MAPS, STAT_COUNT, SandboxTarget,
};
use tokio::{io::unix::AsyncFd, task::JoinHandle};

use crate::pins::PinLayout;

/// The eBPF object built by `build.rs` (see `xtask/src/ebpf.rs`).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("VEIL_EBPF_OBJ"));

/// cgroup/sock_addr programs, in the order they are attached: getpeername before connect so
/// that a redirected socket never reports the listener as its peer; bind first so that the
/// listener port is guarded before anything is redirected to it.
const SOCK_ADDR_PROGRAMS: [&str; 8] = [
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
const SOCK_OPS_PROGRAM: &str = "veil_sockops";
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
/// The global aya-log-ebpf reads to skip disabled log levels in the kernel.
const LOG_LEVEL_GLOBAL: &str = "AYA_LOG_LEVEL";
/// `BPF_NOEXIST`: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;
/// `SO_NETNS_COOKIE` (not in every libc crate version).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Why loading, attaching or a map access failed.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The object could not be parsed or its maps created.
    #[error("loading the eBPF object")]
    Load(#[source] Box<aya::EbpfError>),
    /// A program the agent needs is missing from the object or has another type.
    #[error("eBPF program {0} is missing or has the wrong type")]
    MissingProgram(&'static str),
    /// The kernel refused to load or attach a program.
    #[error("eBPF program {name}")]
    Program {
        /// Program name.
        name: &'static str,
        /// What the kernel or aya said.
        #[source]
        source: Box<ProgramError>,
    },
    /// A map the agent needs is missing from the object or has another type.
    #[error("eBPF map {name}")]
    Map {
        /// Map name.
        name: &'static str,
        /// What aya said.
        #[source]
        source: Box<MapError>,
    },
    /// A map the agent needs is missing from the object.
    #[error("eBPF map {0} is missing")]
    MissingMap(&'static str),
    /// The aya-log bridge could not be started.
    #[error("starting the eBPF log bridge")]
    Log(#[source] Box<aya_log::Error>),
    /// [`Bpf::load`] was called outside a tokio runtime, or the log fd could not be registered.
    #[error("polling eBPF logs")]
    LogPoll(#[source] io::Error),
    /// The cgroup directory could not be opened or inspected.
    #[error("cgroup {path}")]
    Cgroup {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The directory is not on a cgroup v2 file system.
    #[error("{0} is not a cgroup v2 directory")]
    NotCgroup2(PathBuf),
    /// The cgroup already has veil's programs attached.
    #[error("cgroup {0} is already attached")]
    AlreadyAttached(PathBuf),
    /// A thread panicked while holding a map lock.
    #[error("eBPF map lock poisoned")]
    Poisoned,
    /// A pinned map (left by an agent of another build) has another layout than this build's.
    #[error(
        "pinned map {path} has another layout (key {key} B, value {value} B, {entries} entries) \
         than this agent's; run `veil-agent teardown --all` first"
    )]
    PinnedMapLayout {
        /// The pin.
        path: PathBuf,
        /// Its key size.
        key: u32,
        /// Its value size.
        value: u32,
        /// Its capacity.
        entries: u32,
    },
    /// A link could not be pinned, opened from its pin, or unpinned.
    #[error("pin {path}")]
    Pin {
        /// The pin path.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
}

/// veil's loaded eBPF programs and maps.
pub struct Bpf {
    ebpf: Ebpf,
    sandboxes: HashMap<MapData, u64, SandboxTarget>,
    stats: PerCpuArray<MapData, u64>,
    orig: OrigDstTable,
    pins: PinLayout,
    log_task: JoinHandle<()>,
}

impl std::fmt::Debug for Bpf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bpf")
            .field("pins", &self.pins)
            .finish_non_exhaustive()
    }
}

impl Drop for Bpf {
    fn drop(&mut self) {
        self.log_task.abort();
    }
}

/// One attached sandbox cgroup (its links live in bpffs); pass it back to [`Bpf::detach`].
#[derive(Debug)]
pub struct Attachment {
    cgroup_id: u64,
}

/// What [`Bpf::ensure_links`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkReport {
    /// Programs attached by this call.
    pub attached: usize,
    /// Programs whose pinned link was already there and kept (switched to this agent's
    /// program).
    pub reused: usize,
    /// Programs whose pinned link was dead or foreign and was replaced by a new one.
    pub replaced: usize,
}

/// What happened to one program's link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkOutcome {
    Attached,
    Kept,
    Replaced,
}

impl Attachment {
    /// The cgroup id (inode number of the cgroup v2 directory).
    pub fn cgroup_id(&self) -> u64 {
        self.cgroup_id
    }
}

impl Bpf {
    /// Loads the embedded object (include_bytes_aligned!(env!("VEIL_EBPF_OBJ"))), starts the
    /// aya-log → `log` bridge (polled with AsyncFd on the current tokio runtime; must be called
    /// inside one). The agent installs tracing-log's LogTracer so these reach tracing.
    ///
    /// The kernel side drops records above `log::max_level()` as it is at this call (still
    /// `Off` if no logger is installed yet), so install the logger first.
    ///
    /// The maps are pinned under `pins` (created or, when a previous agent left them, reused),
    /// so links pinned by an earlier agent keep working on the same maps. `pins` must have been
    /// [prepared](PinLayout::prepare).
    pub fn load(pins: &PinLayout) -> Result<Self, BpfError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| BpfError::LogPoll(io::Error::other(e)))?;
        // Same numbering as aya-log's levels (1 = error … 5 = trace); 0 silences the kernel side.
        let log_level = log::max_level() as u8;
        let map_pins: Vec<(&str, PathBuf)> =
            PINNED_MAPS.iter().map(|&n| (n, pins.map(n))).collect();
        for (name, path) in &map_pins {
            check_pinned_layout(name, path)?;
        }
        let mut loader = EbpfLoader::new();
        loader.override_global(LOG_LEVEL_GLOBAL, &log_level, true);
        for (name, path) in &map_pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| BpfError::Load(Box::new(e)))?;
        for name in SOCK_ADDR_PROGRAMS {
            sock_addr_program(&mut ebpf, name)?
                .load()
                .map_err(program_err(name))?;
        }
        sock_ops_program(&mut ebpf)?
            .load()
            .map_err(program_err(SOCK_OPS_PROGRAM))?;
        // Maps are taken only now: the programs above were relocated against their fds.
        let sandboxes = HashMap::try_from(take_map(&mut ebpf, MAP_SANDBOXES)?)
            .map_err(map_err(MAP_SANDBOXES))?;
        let stats =
            PerCpuArray::try_from(take_map(&mut ebpf, MAP_STATS)?).map_err(map_err(MAP_STATS))?;
        let orig = HashMap::try_from(take_map(&mut ebpf, MAP_ORIG)?).map_err(map_err(MAP_ORIG))?;
        let logger = EbpfLogger::init(&mut ebpf).map_err(|e| BpfError::Log(Box::new(e)))?;
        let log_task = spawn_log_bridge(&runtime, logger)?;
        Ok(Self {
            ebpf,
            sandboxes,
            stats,
            orig: OrigDstTable {
                map: Arc::new(Mutex::new(orig)),
            },
            pins: pins.clone(),
            log_task,
        })
    }

    /// Where this agent pins its maps and links.
    pub fn pins(&self) -> &PinLayout {
        &self.pins
    }

    /// Inserts the map entry for the cgroup (refusing a cgroup that already has one), then
    /// attaches and pins every program. On any failure undoes what it did.
    pub fn attach(
        &mut self,
        cgroup_dir: &Path,
        target: SandboxTarget,
    ) -> Result<Attachment, BpfError> {
        let cgroup_id = cgroup_id(cgroup_dir)?;
        let target = SandboxTarget { _pad: 0, ..target };
        match self.sandboxes.insert(cgroup_id, target, BPF_NOEXIST) {
            Ok(()) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                return Err(BpfError::AlreadyAttached(cgroup_dir.to_owned()));
            }
            Err(source) => {
                return Err(map_err(MAP_SANDBOXES)(source));
            }
        }
        let attachment = Attachment { cgroup_id };
        if let Err(e) = self.ensure_links(cgroup_dir, cgroup_id) {
            // Best effort: the original error is the one worth reporting.
            let _ = self.detach(attachment);
            return Err(e);
        }
        Ok(attachment)
    }

    /// Sets (inserts or replaces) the cgroup's listener ports.
    pub fn set_target(&mut self, cgroup_id: u64, target: SandboxTarget) -> Result<(), BpfError> {
        let target = SandboxTarget { _pad: 0, ..target };
        self.sandboxes
            .insert(cgroup_id, target, 0)
            .map_err(map_err(MAP_SANDBOXES))
    }

    /// Removes the cgroup's map entry (absent is fine).
    pub fn remove_target(&mut self, cgroup_id: u64) -> Result<(), BpfError> {
        match self.sandboxes.remove(&cgroup_id) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(source) => Err(map_err(MAP_SANDBOXES)(source)),
        }
    }

    /// Cgroup ids that have a map entry.
    pub fn target_ids(&self) -> Vec<u64> {
        self.sandboxes.keys().filter_map(Result::ok).collect()
    }

    /// Makes sure every program is linked to the cgroup through a pin under
    /// `<pins>/sandboxes/<cgroup_id>/`: a pin that opens as a link is kept (never attached a
    /// second time); a missing one is attached and pinned, a dead one replaced. On failure,
    /// the links this call newly attached are removed again and the others are left alone.
    pub fn ensure_links(
        &mut self,
        cgroup_dir: &Path,
        cgroup_id: u64,
    ) -> Result<LinkReport, BpfError> {
        let cgroup_err = |source| BpfError::Cgroup {
            path: cgroup_dir.to_owned(),
            source,
        };
        let cgroup = File::open(cgroup_dir).map_err(cgroup_err)?;
        let dir = self.pins.sandbox_dir(cgroup_id);
        std::fs::create_dir_all(&dir).map_err(|source| BpfError::Pin {
            path: dir.clone(),
            source,
        })?;
        let mut report = LinkReport::default();
        let mut new_pins = Vec::new();
        for name in PROGRAMS {
            let path = self.pins.link(cgroup_id, name);
            match self.ensure_link(&cgroup, name, &path) {
                Ok(LinkOutcome::Attached) => {
                    report.attached += 1;
                    new_pins.push(path);
                }
                Ok(LinkOutcome::Replaced) => report.replaced += 1,
                Ok(LinkOutcome::Kept) => report.reused += 1,
                Err(e) => {
                    for pin in new_pins.iter().rev() {
                        let _ = std::fs::remove_file(pin);
                    }
                    return Err(e);
                }
            }
        }
        Ok(report)
    }

    fn ensure_link(
        &mut self,
        cgroup: &File,
        name: &'static str,
        path: &Path,
    ) -> Result<LinkOutcome, BpfError> {
        let pin_err = |source| BpfError::Pin {
            path: path.to_owned(),
            source,
        };
        let old = match obj_get(path) {
            Ok(fd) => Some(fd),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            // Not a bpf object: a stray file, replaced below.
            Err(_) => {
                std::fs::remove_file(path).map_err(pin_err)?;
                None
            }
        };
        if let Some(old) = &old {
            // Kept, never attached twice; but switched over to this agent's program (same
            // pinned maps), so an upgrade takes effect and kernel log records reach this agent
            // rather than the ring buffer of the one before.
            let program = self
                .ebpf
                .program(name)
                .ok_or(BpfError::MissingProgram(name))?;
            let updated = program
                .fd()
                .map_err(|e| io::Error::other(e.to_string()))
                .and_then(|fd| link_update(old.as_fd(), fd.as_fd()));
            match updated {
                Ok(()) => return Ok(LinkOutcome::Kept),
                // A link detached behind our back (ENOLINK), or no link at all: replace it.
                Err(e) => log::warn!("{}: replacing the pinned link: {e}", path.display()),
            }
        }
        let fd_link: FdLink = if name == SOCK_OPS_PROGRAM {
            let program = sock_ops_program(&mut self.ebpf)?;
            let id = program
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(program_err(name))?;
            let link = program.take_link(id).map_err(program_err(name))?;
            FdLink::try_from(link).map_err(|e| pin_err(io::Error::other(e)))?
        } else {
            let program = sock_addr_program(&mut self.ebpf, name)?;
            let id = program
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(program_err(name))?;
            let link = program.take_link(id).map_err(program_err(name))?;
            FdLink::try_from(link).map_err(|e| pin_err(io::Error::other(e)))?
        };
        let outcome = match old {
            // The new link runs before the old one goes, so there is no moment without the
            // hook (running both for an instant is harmless: a redirected connect targets
            // loopback, which connect4/6 leave alone).
            Some(old) => {
                let _ = link_detach(old.as_fd());
                std::fs::remove_file(path).map_err(pin_err)?;
                LinkOutcome::Replaced
            }
            None => LinkOutcome::Attached,
        };
        // Dropping the pinned link closes our fd; the pin keeps the program attached.
        fd_link
            .pin(path)
            .map_err(|e| pin_err(io::Error::other(e)))?;
        Ok(outcome)
    }

    /// Unpins all of the sandbox's links, then removes its map entry.
    ///
    /// Keeps going after a failure and reports the first one; the map entry is removed in any
    /// case, so a program left attached refuses connects rather than letting them bypass veil.
    pub fn detach(&mut self, attachment: Attachment) -> Result<(), BpfError> {
        let unpinned = unpin_sandbox(&self.pins, attachment.cgroup_id);
        let removed = self.remove_target(attachment.cgroup_id);
        unpinned.and(removed)
    }

    /// The listener ports registered for a cgroup id, if it is attached.
    pub fn sandbox(&self, cgroup_id: u64) -> Result<Option<SandboxTarget>, BpfError> {
        match self.sandboxes.get(&cgroup_id, 0) {
            Ok(target) => Ok(Some(target)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(map_err(MAP_SANDBOXES)(source)),
        }
    }

    /// Cheap, cloneable, Send+Sync handle for per-connection lookups.
    pub fn orig_dst(&self) -> OrigDstTable {
        self.orig.clone()
    }

    /// Sums the per-CPU counters (index = STAT_*).
    pub fn stats(&self) -> Result<[u64; STAT_COUNT as usize], BpfError> {
        let mut sums = [0u64; STAT_COUNT as usize];
        for (index, sum) in (0u32..).zip(sums.iter_mut()) {
            let values = self.stats.get(&index, 0).map_err(map_err(MAP_STATS))?;
            *sum = values.iter().fold(0u64, |acc, v| acc.wrapping_add(*v));
        }
        Ok(sums)
    }
}

/// Key size, value size and capacity of each pinned map, as this build defines them.
fn expected_layout(name: &str) -> Option<(usize, usize, u32)> {
    use std::mem::size_of;
    match name {
        MAP_SANDBOXES => Some((size_of::<u64>(), size_of::<SandboxTarget>(), MAX_SANDBOXES)),
        MAP_SOCKS => Some((size_of::<u64>(), size_of::<OrigDst>(), MAX_TRACKED_CONNS)),
        MAP_ORIG => Some((
            size_of::<ConnKey>(),
            size_of::<OrigDst>(),
            MAX_TRACKED_CONNS,
        )),
        MAP_STATS => Some((size_of::<u32>(), size_of::<u64>(), STAT_COUNT)),
        _ => None,
    }
}

/// aya reuses a pinned map whatever its shape; one of another build's layout would be read
/// wrongly, so it is refused instead.
fn check_pinned_layout(name: &'static str, path: &Path) -> Result<(), BpfError> {
    if !path.exists() {
        return Ok(());
    }
    let info = MapInfo::from_pin(path).map_err(map_err(name))?;
    let (key, value, entries) = (info.key_size(), info.value_size(), info.max_entries());
    let matches = expected_layout(name)
        .is_some_and(|(k, v, e)| key as usize == k && value as usize == v && entries == e);
    if matches {
        Ok(())
    } else {
        Err(BpfError::PinnedMapLayout {
            path: path.to_owned(),
            key,
            value,
            entries,
        })
    }
}

/// The cgroup id (inode of the directory), after checking the directory is cgroup v2.
pub fn cgroup_id(cgroup_dir: &Path) -> Result<u64, BpfError> {
    let cgroup_err = |source| BpfError::Cgroup {
        path: cgroup_dir.to_owned(),
        source,
    };
    let fs = nix::sys::statfs::statfs(cgroup_dir).map_err(|e| cgroup_err(e.into()))?;
    if fs.filesystem_type() != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        return Err(BpfError::NotCgroup2(cgroup_dir.to_owned()));
    }
    Ok(std::fs::metadata(cgroup_dir).map_err(cgroup_err)?.ino())
}

/// Removes the pins of one sandbox cgroup's links (connect first, so nothing new is redirected
/// meanwhile), then its directory. Without pins and without an open fd the kernel detaches.
pub fn unpin_sandbox(pins: &PinLayout, cgroup_id: u64) -> Result<(), BpfError> {
    let mut first_err = None;
    for name in PROGRAMS.iter().rev() {
        let path = pins.link(cgroup_id, name);
        // Dropping the last reference releases a link asynchronously; detaching it first makes
        // "unpinned" mean "no longer runs" by the time this returns.
        if let Ok(fd) = obj_get(&path)
            && let Err(source) = link_detach(fd.as_fd())
        {
            first_err.get_or_insert(BpfError::Pin {
                path: path.clone(),
                source,
            });
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                first_err.get_or_insert(BpfError::Pin { path, source });
            }
        }
    }
    let dir = pins.sandbox_dir(cgroup_id);
    // Anything else in there (nothing we made) is removed too: the directory must go.
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    match std::fs::remove_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            first_err.get_or_insert(BpfError::Pin { path: dir, source });
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// `BPF_OBJ_GET`: opens a pinned object.
fn obj_get(path: &Path) -> io::Result<OwnedFd> {
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
fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
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
fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
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

/// Removes map entries of the pinned `VEIL_SANDBOXES` without loading any program (for
/// `veil-agent teardown`): the ones listed, or all with `None`. A missing map is fine.
pub fn remove_pinned_targets(pins: &PinLayout, which: Option<&[u64]>) -> Result<(), BpfError> {
    let path = pins.map(MAP_SANDBOXES);
    if !path.exists() {
        return Ok(());
    }
    let data = MapData::from_pin(&path).map_err(map_err(MAP_SANDBOXES))?;
    let mut map: HashMap<MapData, u64, SandboxTarget> =
        HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(map_err(MAP_SANDBOXES))?;
    let keys: Vec<u64> = match which {
        Some(ids) => ids.to_vec(),
        None => map.keys().filter_map(Result::ok).collect(),
    };
    for key in keys {
        match map.remove(&key) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(source) => return Err(map_err(MAP_SANDBOXES)(source)),
        }
    }
    Ok(())
}

/// aya reports a missing key as `KeyNotFound` on lookup but as ENOENT on delete.
fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn program_err(name: &'static str) -> impl FnOnce(ProgramError) -> BpfError {
    move |source| BpfError::Program {
        name,
        source: Box::new(source),
    }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> BpfError {
    move |source| BpfError::Map {
        name,
        source: Box::new(source),
    }
}

fn sock_addr_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, BpfError> {
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(BpfError::MissingProgram(name))
}

fn sock_ops_program(ebpf: &mut Ebpf) -> Result<&mut SockOps, BpfError> {
    ebpf.program_mut(SOCK_OPS_PROGRAM)
        .and_then(|p| p.try_into().ok())
        .ok_or(BpfError::MissingProgram(SOCK_OPS_PROGRAM))
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, BpfError> {
    ebpf.take_map(name).ok_or(BpfError::MissingMap(name))
}

/// Forwards kernel log records to `log` whenever the ring buffer becomes readable.
fn spawn_log_bridge(
    runtime: &tokio::runtime::Handle,
    logger: EbpfLogger<&'static dyn log::Log>,
) -> Result<JoinHandle<()>, BpfError> {
    // AsyncFd registers with the reactor of the runtime we are inside.
    let mut logger = {
        let _guard = runtime.enter();
        // SAFETY: the logger owns its ring buffer's fd for its whole life and `as_raw_fd`
        // always returns that fd; the AsyncFd owns the logger.
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
            .map_err(|e| BpfError::LogPoll(e.into_parts().1))?
    };
    Ok(runtime.spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                log::error!("eBPF log bridge stopped: ring buffer fd failed");
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}

/// Handle on `VEIL_ORIG`: where each redirected connection was going.
#[derive(Clone)]
pub struct OrigDstTable {
    map: Arc<Mutex<HashMap<MapData, ConnKey, OrigDst>>>,
}

impl std::fmt::Debug for OrigDstTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrigDstTable").finish_non_exhaustive()
    }
}

impl OrigDstTable {
    /// Removes and returns the original destination recorded for the client end `peer` (as the
    /// agent's accepted socket sees it) in the netns whose cookie is given. v4-mapped origins
    /// come back as SocketAddr::V4.
    pub fn take(
        &self,
        netns_cookie: u64,
        peer: SocketAddr,
    ) -> Result<Option<SocketAddr>, BpfError> {
        let key = conn_key(netns_cookie, peer);
        let mut map = self.map.lock().map_err(|_| BpfError::Poisoned)?;
        let orig = match map.get(&key, 0) {
            Ok(orig) => orig,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(source) => {
                return Err(map_err(MAP_ORIG)(source));
            }
        };
        match map.remove(&key) {
            Ok(()) => {}
            // The LRU may have evicted it meanwhile; we already hold the value.
            Err(e) if is_not_found(&e) => {}
            Err(source) => {
                return Err(map_err(MAP_ORIG)(source));
            }
        }
        Ok(Some(orig_to_socket_addr(&orig)))
    }
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

/// Words of an IPv6 address as the kernel stores them: network-order bytes in memory.
fn ipv6_words(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

fn words_to_ipv6(words: [u32; 4]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (chunk, word) in o.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

/// The key sock_ops wrote for this client end: IPv4 peers (and IPv6 sockets talking IPv4)
/// are stored IPv4-mapped.
fn conn_key(netns_cookie: u64, peer: SocketAddr) -> ConnKey {
    let addr = match peer {
        SocketAddr::V4(v4) => ipv6_words(v4.ip().to_ipv6_mapped()),
        SocketAddr::V6(v6) => ipv6_words(*v6.ip()),
    };
    ConnKey {
        netns_cookie,
        addr,
        port: peer.port(),
        _pad: [0; 6],
    }
}

/// The destination the application dialled; IPv4 and IPv4-mapped origins as `SocketAddr::V4`.
fn orig_to_socket_addr(orig: &OrigDst) -> SocketAddr {
    let ip = words_to_ipv6(orig.addr);
    match ip.to_ipv4_mapped() {
        Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, orig.port)),
        None if orig.family == AF_INET => {
            // A v4 socket's origin is always stored mapped; anything else is corrupt, but the
            // low word is still the address it dialled.
            let o = ip.octets();
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::new(o[12], o[13], o[14], o[15]),
                orig.port,
            ))
        }
        None => SocketAddr::V6(SocketAddrV6::new(ip, orig.port, 0, 0)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests may unwrap")]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proxy_common::AF_INET6;

    fn orig(addr: Ipv6Addr, port: u16, family: u16) -> OrigDst {
        OrigDst {
            addr: ipv6_words(addr),
            port,
            family,
            _pad: 0,
        }
    }

    #[test]
    fn every_pinned_map_has_a_known_layout() {
        for name in PINNED_MAPS {
            assert!(expected_layout(name).is_some(), "{name}");
        }
        assert_eq!(expected_layout(MAP_ORIG), Some((32, 24, MAX_TRACKED_CONNS)));
        assert_eq!(expected_layout("OTHER"), None);
    }

    #[test]
    fn handles_can_move_between_tasks() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<OrigDstTable>();
        send::<Bpf>();
        send::<Attachment>();
    }

    #[test]
    fn ipv6_words_are_network_order_in_memory() {
        let words = ipv6_words("::ffff:127.0.0.1".parse().unwrap());
        assert_eq!(words[0], 0);
        assert_eq!(words[1], 0);
        assert_eq!(words[2].to_ne_bytes(), [0, 0, 0xff, 0xff]);
        assert_eq!(words[3].to_ne_bytes(), [127, 0, 0, 1]);
        let ip: Ipv6Addr = "fd76:6569:6c::1".parse().unwrap();
        assert_eq!(words_to_ipv6(ipv6_words(ip)), ip);
    }

    #[test]
    fn v4_peer_and_mapped_v6_peer_give_the_same_key() {
        let v4: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().unwrap();
        assert_eq!(conn_key(7, v4), conn_key(7, mapped));
        assert_ne!(conn_key(7, v4), conn_key(8, v4));
        let native: SocketAddr = "[::1]:40000".parse().unwrap();
        let key = conn_key(7, native);
        assert_eq!(key.addr, [0, 0, 0, 1u32.to_be()]);
        assert_eq!(key.port, 40000);
        assert_eq!(key._pad, [0; 6]);
    }

    #[test]
    fn v4_origins_come_back_as_v4() {
        let dialled = orig("::ffff:198.18.255.1".parse().unwrap(), 80, AF_INET);
        assert_eq!(
            orig_to_socket_addr(&dialled),
            "198.18.255.1:80".parse::<SocketAddr>().unwrap()
        );
        // An IPv6 socket dialling a mapped address: still reached over IPv4.
        let dialled6 = orig("::ffff:198.18.255.1".parse().unwrap(), 443, AF_INET6);
        assert_eq!(
            orig_to_socket_addr(&dialled6),
            "198.18.255.1:443".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn v6_origins_come_back_as_v6() {
        let dialled = orig("fd76:6569:6c::1".parse().unwrap(), 8443, AF_INET6);
        assert_eq!(
            orig_to_socket_addr(&dialled),
            "[fd76:6569:6c::1]:8443".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn every_v4_address_round_trips_through_the_map_layout() {
        for ip in [
            Ipv4Addr::new(0, 0, 0, 1),
            Ipv4Addr::new(198, 18, 255, 1),
            Ipv4Addr::new(255, 255, 255, 255),
        ] {
            for port in [1u16, 80, 65535] {
                let dialled = SocketAddr::V4(SocketAddrV4::new(ip, port));
                let stored = orig(ip.to_ipv6_mapped(), port, AF_INET);
                assert_eq!(orig_to_socket_addr(&stored), dialled);
            }
        }
    }

    proptest! {
        #[test]
        fn v4_peers_key_like_their_mapped_form(cookie: u64, ip: [u8; 4], port: u16) {
            let ip = Ipv4Addr::from(ip);
            let v4 = SocketAddr::V4(SocketAddrV4::new(ip, port));
            let v6 = SocketAddr::V6(SocketAddrV6::new(ip.to_ipv6_mapped(), port, 0, 0));
            prop_assert_eq!(conn_key(cookie, v4), conn_key(cookie, v6));
            prop_assert_eq!(conn_key(cookie, v4).addr, ipv6_words(ip.to_ipv6_mapped()));
        }

        #[test]
        fn origins_round_trip(octets: [u8; 16], port: u16) {
            let ip = Ipv6Addr::from(octets);
            let expected = match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                None => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)),
            };
            prop_assert_eq!(orig_to_socket_addr(&orig(ip, port, AF_INET6)), expected);
            prop_assert_eq!(words_to_ipv6(ipv6_words(ip)), ip);
        }
    }
}
