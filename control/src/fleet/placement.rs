//! A sandbox's `host`: where it may be placed (an enrolled, unrevoked host; never moved to
//! another), whether that host has an agent on some replica, and the CA its sandboxes trust.
//! Presence and the CA come from the database, so any replica answers for any host.

use crate::api::ApiError;
use crate::store::fleet::HostRecord;
use crate::store::{SandboxRecord, Store};

use super::ca::check_host_name;

fn enrolled(store: &dyn Store, host: &str) -> Result<Option<HostRecord>, ApiError> {
    let Some(fleet) = store.fleet() else {
        return Ok(None);
    };
    fleet
        .host(host)
        .map_err(|e| ApiError::from_store(e, "host"))
}

/// Checks a PUT's `host` against the sandbox's previous record: 400 for a bad name or a host
/// that is not enrolled (or revoked), 409 for a move between hosts, 503 when `agent_required`
/// and no agent of the host is connected to any replica. Blocks on the store.
pub fn check(
    store: &dyn Store,
    host: Option<&str>,
    previous: Option<&SandboxRecord>,
    agent_required: bool,
) -> Result<(), ApiError> {
    if let Some(prev) = previous
        && prev.host.as_deref() != host
    {
        let name =
            |h: Option<&str>| h.map_or("this control's host".to_owned(), |h| format!("host {h}"));
        return Err(ApiError::Conflict(format!(
            "sandbox {} is registered on {}; it cannot move to {} (delete it first)",
            prev.id,
            name(prev.host.as_deref()),
            name(host)
        )));
    }
    let Some(host) = host else { return Ok(()) };
    check_host_name(host).map_err(ApiError::BadRequest)?;
    let record = enrolled(store, host)?
        .filter(|h| h.revoked_at.is_none())
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "host {host} is not enrolled (veil-control fleet enroll --host {host})"
            ))
        })?;
    if agent_required && !connected_somewhere(store, &record) {
        return Err(ApiError::Unavailable(format!(
            "no veil-agent of host {host} is connected; sandboxes cannot be registered on it"
        )));
    }
    Ok(())
}

/// Whether an agent of `host` is connected to a replica that is alive: a replica killed with
/// its agents connected never recorded their departure.
fn connected_somewhere(store: &dyn Store, host: &HostRecord) -> bool {
    let alive: Option<Vec<String>> = store
        .shared_keys()
        .and_then(|k| k.keyring().ok())
        .map(|ring| ring.replicas.into_iter().map(|r| r.replica).collect());
    host.connected.iter().any(|c| match &alive {
        Some(alive) => alive.contains(&c.replica),
        // Liveness unknown: take the record as it is.
        None => true,
    })
}

/// The CA the sandboxes of `host` trust: what its agent reported last. Blocks on the store.
pub fn host_ca(store: &dyn Store, host: &str) -> Result<Option<String>, ApiError> {
    Ok(enrolled(store, host)?.and_then(|h| h.agent_ca_pem))
}
