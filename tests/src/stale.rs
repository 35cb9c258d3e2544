//! Removing what dead test processes left behind, once per process, before the first fixture
//! of this one is made. Each kind of object has its module here, which knows its names.

pub mod agents;
pub mod cgroups;
pub mod locks;
pub mod netns;
pub mod postgres;
pub mod tempdirs;
pub mod veths;

use std::sync::Once;

static INIT: Once = Once::new();

/// Checks root and, once per process, removes leftovers of dead test processes.
///
/// Every fixture constructor calls this first.
pub fn init() {
    crate::env::require_root();
    INIT.call_once(cleanup_stale);
}

/// Removes what dead test processes left behind: their agents, cgroups (killing the processes
/// still in them), network namespaces, root-netns veths, address locks, PostgreSQL servers and
/// temp dirs.
///
/// Runs once per process from every constructor; safe to call again, and safe while other test
/// processes run (their pids are alive, so their objects are kept).
pub fn cleanup_stale() {
    agents::cleanup_stale_agents();
    agents::cleanup_stale_pins();
    cgroups::cleanup_stale_cgroups();
    netns::cleanup_stale_netns();
    veths::cleanup_stale_veths();
    locks::cleanup_stale_locks();
    postgres::cleanup_stale_servers();
    tempdirs::cleanup_stale_tempdirs();
}
