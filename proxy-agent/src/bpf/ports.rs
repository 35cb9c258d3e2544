//! `VEIL_LISTENERS` (ports no sandbox may bind, per netns) and `VEIL_GUARDED` (veil's own
//! listeners, which no sandbox may connect to). Both are pinned, so they hold while the agent
//! is down.

use std::collections::BTreeSet;
use std::path::Path;

use aya::maps::{HashMap, Map, MapData};
use proxy_common::{GuardKey, MAP_GUARDED, MAP_LISTENERS, OWNER_VEIL, PortKey};

use super::error::{BpfError, is_not_found, map_err};

/// Handle on `VEIL_LISTENERS`: entries are owned by a sandbox (its cgroup id) or by veil
/// ([`OWNER_VEIL`]); each owner only ever changes its own.
pub struct PortTable {
    map: HashMap<MapData, PortKey, u64>,
}

impl std::fmt::Debug for PortTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortTable").finish_non_exhaustive()
    }
}

/// The key of `port` in the netns `netns_cookie`.
pub fn port_key(netns_cookie: u64, port: u16) -> PortKey {
    PortKey {
        netns_cookie,
        port,
        _pad: [0; 6],
    }
}

impl PortTable {
    pub(super) fn new(map: HashMap<MapData, PortKey, u64>) -> Self {
        Self { map }
    }

    /// Opens the pinned map (another handle on the one the programs use).
    pub fn open(pin: &Path) -> Result<Self, BpfError> {
        let data = MapData::from_pin(pin).map_err(map_err(MAP_LISTENERS))?;
        let map = HashMap::try_from(Map::HashMap(data)).map_err(map_err(MAP_LISTENERS))?;
        Ok(Self { map })
    }

    /// Every entry: (key, owner).
    pub fn entries(&self) -> Vec<(PortKey, u64)> {
        self.map.iter().filter_map(Result::ok).collect()
    }

    /// Makes `owner`'s entries exactly `keys`: inserts them first, then removes the owner's
    /// others, so a port stays guarded throughout.
    pub fn set_owned(&mut self, owner: u64, keys: &BTreeSet<PortKey>) -> Result<(), BpfError> {
        for key in keys {
            self.map
                .insert(key, owner, 0)
                .map_err(map_err(MAP_LISTENERS))?;
        }
        let stale: Vec<PortKey> = self
            .entries()
            .into_iter()
            .filter(|(k, o)| *o == owner && !keys.contains(k))
            .map(|(k, _)| k)
            .collect();
        self.remove(&stale)
    }

    /// Removes every entry whose owner `keep` rejects (veil's own are never touched here).
    pub fn retain_owners(&mut self, keep: impl Fn(u64) -> bool) -> Result<(), BpfError> {
        let stale: Vec<PortKey> = self
            .entries()
            .into_iter()
            .filter(|(_, o)| *o != OWNER_VEIL && !keep(*o))
            .map(|(k, _)| k)
            .collect();
        self.remove(&stale)
    }

    fn remove(&mut self, keys: &[PortKey]) -> Result<(), BpfError> {
        for key in keys {
            match self.map.remove(key) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(source) => return Err(map_err(MAP_LISTENERS)(source)),
            }
        }
        Ok(())
    }
}

/// Handle on `VEIL_GUARDED`, owned by veil alone.
pub struct GuardTable {
    map: HashMap<MapData, GuardKey, u64>,
}

impl std::fmt::Debug for GuardTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardTable").finish_non_exhaustive()
    }
}

impl GuardTable {
    /// Opens the pinned map.
    pub fn open(pin: &Path) -> Result<Self, BpfError> {
        let data = MapData::from_pin(pin).map_err(map_err(MAP_GUARDED))?;
        let map = HashMap::try_from(Map::HashMap(data)).map_err(map_err(MAP_GUARDED))?;
        Ok(Self { map })
    }

    /// Every rule.
    pub fn keys(&self) -> BTreeSet<GuardKey> {
        self.map.keys().filter_map(Result::ok).collect()
    }

    /// Adds `keys` (keeping the others).
    pub fn add(&mut self, keys: &BTreeSet<GuardKey>) -> Result<(), BpfError> {
        for key in keys {
            self.map
                .insert(key, OWNER_VEIL, 0)
                .map_err(map_err(MAP_GUARDED))?;
        }
        Ok(())
    }

    /// Makes the rules exactly `keys`: adds first, then removes the others.
    pub fn set(&mut self, keys: &BTreeSet<GuardKey>) -> Result<(), BpfError> {
        self.add(keys)?;
        for key in self.keys().difference(keys) {
            match self.map.remove(key) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(source) => return Err(map_err(MAP_GUARDED)(source)),
            }
        }
        Ok(())
    }
}
