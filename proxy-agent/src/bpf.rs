//! Loads veil's eBPF programs, attaches them to sandbox cgroups and reads their maps.
//!
//! The only module with eBPF `unsafe`. The kernel side is `proxy-ebpf`; the map layouts are
//! `proxy-common`. Per sandbox: the cgroup's listener ports go into `VEIL_SANDBOXES` and every
//! program is linked to the cgroup through a link pinned in bpffs ([`crate::pins`]), so the
//! redirect outlives the agent; the agent recovers each accepted connection's original
//! destination with [`OrigDstTable::take`]. The listener ports of every sandbox go into
//! `VEIL_LISTENERS` (the bind guard) and veil's own listeners into `VEIL_GUARDED` (the connect
//! guard), both pinned so they hold while the agent is down.
//!
//! Submodules: [`links`] (pinned links per cgroup), [`unpin`] (removing them), [`origin`]
//! (`VEIL_ORIG`), [`ports`] (the two guard maps), [`layout`] (pinned map layouts across
//! builds), [`programs`] (names and attach order), [`error`], [`sys`] (raw syscalls).

pub mod error;
pub mod layout;
pub mod links;
pub mod origin;
pub mod ports;
pub mod programs;
pub mod sys;
pub mod unpin;

use std::{
    collections::BTreeSet,
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, Map, MapData, MapError, PerCpuArray},
};
use aya_log::EbpfLogger;
use proxy_common::{
    MAP_LISTENERS, MAP_ORIG, MAP_SANDBOXES, MAP_STATS, PINNED_MAPS, PortKey, SANDBOX_DIRECT,
    STAT_COUNT, SandboxTarget,
};
use tokio::{io::unix::AsyncFd, task::JoinHandle};

use crate::pins::PinLayout;

use error::{is_not_found, map_err, program_err};
use programs::{SOCK_ADDR_PROGRAMS, SOCK_OPS_PROGRAM, sock_addr_program, sock_ops_program};

pub use error::BpfError;
pub use origin::{ConnTuple, OrigDstTable, Recorded};
pub use ports::{GuardTable, PortTable, port_key};
pub use programs::PROGRAMS;
pub use sys::{netns_cookie, own_netns_cookie};
pub use unpin::{unpin_links, unpin_sandbox};

/// The eBPF object built by `build.rs` (see `xtask/src/ebpf.rs`).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("VEIL_EBPF_OBJ"));

/// The global aya-log-ebpf reads to skip disabled log levels in the kernel.
const LOG_LEVEL_GLOBAL: &str = "AYA_LOG_LEVEL";
/// `BPF_NOEXIST`: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

/// veil's loaded eBPF programs and maps.
pub struct Bpf {
    ebpf: Ebpf,
    sandboxes: HashMap<MapData, u64, SandboxTarget>,
    stats: PerCpuArray<MapData, u64>,
    orig: OrigDstTable,
    ports: PortTable,
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
    /// so links pinned by an earlier agent keep working on the same maps; a pinned map of
    /// another build's layout is replaced ([`layout`]). `pins` must have been
    /// [prepared](PinLayout::prepare).
    ///
    /// Every original-destination record is dropped: no listener exists yet, so each belongs
    /// to a connection nobody will accept.
    pub fn load(pins: &PinLayout) -> Result<Self, BpfError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| BpfError::LogPoll(io::Error::other(e)))?;
        // Same numbering as aya-log's levels (1 = error … 5 = trace); 0 silences the kernel side.
        let log_level = log::max_level() as u8;
        let map_pins: Vec<(&'static str, PathBuf)> =
            PINNED_MAPS.iter().map(|&n| (n, pins.map(n))).collect();
        for (name, path) in &map_pins {
            if let layout::PinState::Replaced((key, value, entries)) =
                layout::prepare_pin(name, path)?
            {
                log::warn!(
                    "pinned map {} had another build's layout (key {key} B, value {value} B, \
                     {entries} entries): replaced; sandboxes switch to it as they are adopted",
                    path.display()
                );
            }
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
        let orig = OrigDstTable::new(
            HashMap::try_from(take_map(&mut ebpf, MAP_ORIG)?).map_err(map_err(MAP_ORIG))?,
        );
        let ports = PortTable::new(
            HashMap::try_from(take_map(&mut ebpf, MAP_LISTENERS)?)
                .map_err(map_err(MAP_LISTENERS))?,
        );
        let stale = orig.clear()?;
        if stale > 0 {
            log::info!("dropped {stale} original-destination records of closed listeners");
        }
        let logger = EbpfLogger::init(&mut ebpf).map_err(|e| BpfError::Log(Box::new(e)))?;
        let log_task = spawn_log_bridge(&runtime, logger)?;
        Ok(Self {
            ebpf,
            sandboxes,
            stats,
            orig,
            ports,
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
        let target = clean(target);
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

    /// Sets (inserts or replaces) the cgroup's listener ports and flags; one map update, so
    /// a connect sees either the old entry or the new one.
    pub fn set_target(&mut self, cgroup_id: u64, target: SandboxTarget) -> Result<(), BpfError> {
        let target = clean(target);
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

    /// Unpins all of the sandbox's links, then removes its map entry and its listener ports.
    ///
    /// Keeps going after a failure and reports the first one; the map entry is removed in any
    /// case, so a program left attached refuses connects rather than letting them bypass veil.
    pub fn detach(&mut self, attachment: Attachment) -> Result<(), BpfError> {
        let unpinned = unpin_sandbox(&self.pins, attachment.cgroup_id);
        let removed = self.remove_target(attachment.cgroup_id);
        let ports = self.set_listener_ports(attachment.cgroup_id, &BTreeSet::new());
        unpinned.and(removed).and(ports)
    }

    /// Makes the listener ports the cgroup's sandbox owns exactly `ports` (netns cookie, port):
    /// no sandbox process may bind them while they are listed, whether or not the agent runs.
    pub fn set_listener_ports(
        &mut self,
        cgroup_id: u64,
        ports: &BTreeSet<PortKey>,
    ) -> Result<(), BpfError> {
        self.ports.set_owned(cgroup_id, ports)
    }

    /// Removes the listener ports of every sandbox `known` rejects (veil's own stay).
    pub fn retain_listener_ports(&mut self, known: impl Fn(u64) -> bool) -> Result<(), BpfError> {
        self.ports.retain_owners(known)
    }

    /// Every listener port entry: (key, owner).
    pub fn listener_ports(&self) -> Vec<(PortKey, u64)> {
        self.ports.entries()
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

/// `target` with only the flag bits the programs know (unknown bits must stay zero).
fn clean(target: SandboxTarget) -> SandboxTarget {
    SandboxTarget {
        flags: target.flags & SANDBOX_DIRECT,
        ..target
    }
}

/// Sums the per-CPU counters of the pinned `VEIL_STATS` (for the metrics endpoint, which does
/// not hold the loaded programs). `None` when the map is not there.
pub fn pinned_stats(pins: &PinLayout) -> Option<[u64; STAT_COUNT as usize]> {
    let data = MapData::from_pin(pins.map(MAP_STATS)).ok()?;
    let stats: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(data)).ok()?;
    let mut sums = [0u64; STAT_COUNT as usize];
    for (index, sum) in (0u32..).zip(sums.iter_mut()) {
        let values = stats.get(&index, 0).ok()?;
        *sum = values.iter().fold(0u64, |acc, v| acc.wrapping_add(*v));
    }
    Some(sums)
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

/// Removes map entries of the pinned `VEIL_SANDBOXES`, and those sandboxes' listener ports
/// from `VEIL_LISTENERS`, without loading any program (for `veil-agent teardown`): the ones
/// listed, or all with `None`. A missing map is fine.
pub fn remove_pinned_targets(pins: &PinLayout, which: Option<&[u64]>) -> Result<(), BpfError> {
    let ports = pins.map(MAP_LISTENERS);
    if ports.exists() {
        let mut ports = PortTable::open(&ports)?;
        match which {
            Some(ids) => ports.retain_owners(|owner| !ids.contains(&owner))?,
            None => ports.retain_owners(|_| false)?,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_can_move_between_tasks() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<OrigDstTable>();
        send::<Bpf>();
        send::<Attachment>();
        send::<GuardTable>();
        send::<PortTable>();
    }
}
