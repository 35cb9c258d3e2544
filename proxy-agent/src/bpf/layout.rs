//! The layouts of the pinned maps, and what happens to a pin left by a build with another one.
//!
//! aya reuses a pinned map whatever its shape, and one of another layout would be read wrongly.
//! Such a pin (an upgrade or a downgrade changed the map) is unpinned before loading, so this
//! build creates its own map under that name. The programs still attached through the old
//! links keep the old map (a map lives while a program uses it) and keep failing closed — their
//! listeners are gone — until adopting a sandbox switches its links to this build's programs,
//! after its entries are in the new maps.

use std::io;
use std::mem::size_of;
use std::path::Path;

use aya::maps::MapInfo;
use proxy_common::{
    ConnKey, GuardKey, MAP_GUARDED, MAP_LISTENERS, MAP_ORIG, MAP_SANDBOXES, MAP_SOCKS, MAP_STATS,
    MAX_GUARDED, MAX_LISTENER_PORTS, MAX_SANDBOXES, MAX_TRACKED_CONNS, OrigDst, PortKey,
    STAT_COUNT, SandboxTarget,
};

use super::error::{BpfError, map_err};

/// Key size, value size and capacity of a map.
pub type Layout = (usize, usize, u32);

/// Key size, value size and capacity of each pinned map, as this build defines them.
pub fn expected_layout(name: &str) -> Option<Layout> {
    match name {
        MAP_SANDBOXES => Some((size_of::<u64>(), size_of::<SandboxTarget>(), MAX_SANDBOXES)),
        MAP_SOCKS => Some((size_of::<u64>(), size_of::<OrigDst>(), MAX_TRACKED_CONNS)),
        MAP_ORIG => Some((
            size_of::<ConnKey>(),
            size_of::<OrigDst>(),
            MAX_TRACKED_CONNS,
        )),
        MAP_STATS => Some((size_of::<u32>(), size_of::<u64>(), STAT_COUNT)),
        MAP_LISTENERS => Some((size_of::<PortKey>(), size_of::<u64>(), MAX_LISTENER_PORTS)),
        MAP_GUARDED => Some((size_of::<GuardKey>(), size_of::<u64>(), MAX_GUARDED)),
        _ => None,
    }
}

/// What [`prepare_pin`] found at a map's pin path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinState {
    /// No pin: the map is created.
    Absent,
    /// A map of this build's layout: reused.
    Reused,
    /// A map of another layout: unpinned, a new one is created.
    Replaced(Layout),
}

/// Makes the pin path of map `name` ready for loading: keeps a map of this build's layout,
/// unpins one of another layout. Anything that is not a map there is an error (fail closed).
pub fn prepare_pin(name: &'static str, path: &Path) -> Result<PinState, BpfError> {
    if !path.exists() {
        return Ok(PinState::Absent);
    }
    let info = MapInfo::from_pin(path).map_err(map_err(name))?;
    let found = (
        info.key_size() as usize,
        info.value_size() as usize,
        info.max_entries(),
    );
    if expected_layout(name) == Some(found) {
        return Ok(PinState::Reused);
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(PinState::Replaced(found)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(PinState::Replaced(found)),
        Err(source) => Err(BpfError::Pin {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::PINNED_MAPS;

    /// The layouts this build pins. A change here is an upgrade: the agent replaces the old
    /// pins (see the module doc), and `proxy-agent/tests/bpf.rs` starts over old pins.
    #[test]
    fn every_pinned_map_has_a_known_layout() {
        for name in PINNED_MAPS {
            assert!(expected_layout(name).is_some(), "{name}");
        }
        assert_eq!(expected_layout(MAP_ORIG), Some((48, 32, MAX_TRACKED_CONNS)));
        assert_eq!(expected_layout(MAP_SOCKS), Some((8, 32, MAX_TRACKED_CONNS)));
        assert_eq!(
            expected_layout(MAP_LISTENERS),
            Some((16, 8, MAX_LISTENER_PORTS))
        );
        assert_eq!(expected_layout(MAP_GUARDED), Some((32, 8, MAX_GUARDED)));
        assert_eq!(expected_layout(MAP_STATS), Some((4, 8, STAT_COUNT)));
        assert_eq!(expected_layout("OTHER"), None);
    }

    #[test]
    fn an_absent_pin_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let state = prepare_pin(MAP_ORIG, &dir.path().join("VEIL_ORIG")).unwrap();
        assert_eq!(state, PinState::Absent);
    }

    #[test]
    fn a_file_that_is_not_a_map_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("VEIL_ORIG");
        std::fs::write(&path, b"not a map").unwrap();
        assert!(prepare_pin(MAP_ORIG, &path).is_err());
        assert!(path.exists(), "left in place for the operator");
    }
}
