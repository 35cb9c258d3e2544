//! Snapshots shared among the agents admitted while nothing changed. A failover brings
//! hundreds of agents to a replica at once; reading the registry and unsealing its secrets
//! once per agent, one agent at a time under the link's lock, made the last one wait seconds.
//!
//! Correctness rests on the link's change generation ([`super::state::LinkState::generation`]):
//! every dispatch and resync bumps it under the state lock before reading the store. An entry
//! records the generation read *before* its store read, and an agent is registered with it only
//! if, under the state lock, the generation is still that one. So a change either reached the
//! store before the entry's read (the entry has it) or its dispatch runs after the agent is
//! registered (and sends it the change), exactly as when each agent read the store itself.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::agent_link::plan::{Held, RegistryView};

/// Longest an entry is reused even without a change notification: a store write that reaches
/// no dispatch (a grace sweep) shows up in new snapshots within this.
pub(super) const MAX_AGE: Duration = Duration::from_secs(1);

/// A snapshot built from one view of the registry, and what the agent holds once applied.
#[derive(Clone)]
pub(super) struct Built {
    pub(super) sandboxes: Vec<veil_link::SandboxState>,
    pub(super) secrets: Vec<veil_link::SecretState>,
    pub(super) acks: Vec<(veil_link::SecretId, veil_link::Revision)>,
    pub(super) held: Held,
}

/// The registry view and the per-host snapshots built from it at one generation.
#[derive(Default)]
pub(super) struct SnapshotCache {
    generation: u64,
    loaded_at: Option<Instant>,
    full: Option<Arc<RegistryView>>,
    per_host: HashMap<Option<String>, Arc<Built>>,
}

// Entries carry unsealed values: a Debug print shows only their shape.
impl std::fmt::Debug for SnapshotCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotCache")
            .field("generation", &self.generation)
            .field("hosts", &self.per_host.len())
            .finish_non_exhaustive()
    }
}

impl SnapshotCache {
    /// Forgets every entry unless they were built at `generation` less than [`MAX_AGE`] ago.
    pub(super) fn refresh(&mut self, generation: u64, now: Instant) {
        let fresh = self
            .loaded_at
            .is_some_and(|t| now.saturating_duration_since(t) < MAX_AGE);
        if self.generation != generation || !fresh {
            *self = SnapshotCache {
                generation,
                ..SnapshotCache::default()
            };
        }
    }

    /// The snapshot for `host`, built with `build` from the view `load` reads (once per
    /// generation, shared by every host).
    pub(super) fn get_or_build<E>(
        &mut self,
        host: Option<&str>,
        now: Instant,
        load: impl FnOnce() -> Result<RegistryView, E>,
        build: impl FnOnce(&RegistryView) -> Result<Built, E>,
    ) -> Result<Arc<Built>, E> {
        let key = host.map(str::to_owned);
        if let Some(b) = self.per_host.get(&key) {
            return Ok(b.clone());
        }
        let full = match &self.full {
            Some(v) => v.clone(),
            None => {
                let v = Arc::new(load()?);
                self.full = Some(v.clone());
                self.loaded_at = Some(now);
                v
            }
        };
        let built = Arc::new(build(&full.for_host(host))?);
        self.per_host.insert(key, built.clone());
        Ok(built)
    }

    /// The generation the entries belong to.
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built() -> Built {
        Built {
            sandboxes: Vec::new(),
            secrets: Vec::new(),
            acks: Vec::new(),
            held: Held::new(),
        }
    }

    #[test]
    fn one_load_per_generation_and_a_new_generation_reloads() {
        let mut cache = SnapshotCache::default();
        let (mut loads, mut builds) = (0, 0);
        let t0 = Instant::now();
        for host in [Some("a"), Some("a"), Some("b"), None, Some("b")] {
            cache.refresh(1, t0);
            cache
                .get_or_build::<()>(
                    host,
                    t0,
                    || {
                        loads += 1;
                        Ok(RegistryView::default())
                    },
                    |_| {
                        builds += 1;
                        Ok(built())
                    },
                )
                .unwrap();
        }
        assert_eq!((loads, builds), (1, 3), "one read, one build per host");
        cache.refresh(2, t0);
        assert_eq!(cache.generation(), 2);
        cache
            .get_or_build::<()>(
                Some("a"),
                t0,
                || {
                    loads += 1;
                    Ok(RegistryView::default())
                },
                |_| Ok(built()),
            )
            .unwrap();
        assert_eq!(loads, 2, "a change (new generation) is read again");
        cache.refresh(2, t0 + MAX_AGE);
        cache
            .get_or_build::<()>(
                Some("a"),
                t0 + MAX_AGE,
                || {
                    loads += 1;
                    Ok(RegistryView::default())
                },
                |_| Ok(built()),
            )
            .unwrap();
        assert_eq!(loads, 3, "an old entry is read again");
    }

    #[test]
    fn a_failed_read_caches_nothing() {
        let mut cache = SnapshotCache::default();
        let t0 = Instant::now();
        cache.refresh(1, t0);
        assert!(
            cache
                .get_or_build(None, t0, || Err("down"), |_| Ok(built()))
                .is_err()
        );
        let mut loads = 0;
        cache
            .get_or_build::<&str>(
                None,
                t0,
                || {
                    loads += 1;
                    Ok(RegistryView::default())
                },
                |_| Ok(built()),
            )
            .unwrap();
        assert_eq!(loads, 1);
    }
}
