//! Fleet administration, straight on the database through the config (like the other admin
//! commands on PostgreSQL): enroll a host (its certificate and key written to files, never
//! printed), list the hosts, revoke one.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

use super::ca::{FleetCa, HOST_VALIDITY, check_host_name, fingerprint};
use crate::config::Config;
use crate::crypto::Keyring;
use crate::store::Store;
use crate::store::fleet::{FleetStore, HostConnection, HostRecord};
use crate::timefmt::{now_ms, rfc3339};

/// File names `enroll` writes in its output directory.
pub const HOST_CERT: &str = "host.pem";
/// The host's private key (mode 0600).
pub const HOST_KEY: &str = "host.key";
/// The fleet CA certificate (the agent's `control_ca`).
pub const FLEET_CA: &str = "fleet-ca.pem";

fn fleet_of(store: &dyn Store) -> anyhow::Result<&dyn FleetStore> {
    store.fleet().context(
        "the fleet needs [store] backend = \"postgres\" (the fleet CA and hosts live in the \
         shared database)",
    )
}

fn open(
    config: &Config,
    with_keys: bool,
) -> anyhow::Result<(std::sync::Arc<dyn Store>, Option<Keyring>)> {
    let keyring = with_keys
        .then(|| Keyring::open_or_create(&config.data_dir))
        .transpose()
        .context("opening the master keys (data_dir)")?;
    let (store, _) = crate::daemon::open_store(config, keyring.as_ref())?;
    Ok((store, keyring))
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// What `enroll` reports (no key material).
#[derive(Debug, Serialize)]
pub struct Enrolled {
    /// The host.
    pub host: String,
    /// The new certificate's serial (hex).
    pub serial: String,
    /// Its expiry (RFC 3339).
    pub expires: String,
    /// The files written.
    pub files: Vec<String>,
}

/// Enrolls `host`: a new certificate (the previous one stops being accepted), written with its
/// key and the fleet CA into `out`. Blocks.
pub fn enroll(
    config: &Config,
    host: &str,
    out: &Path,
    validity: Option<Duration>,
) -> anyhow::Result<Enrolled> {
    check_host_name(host).map_err(anyhow::Error::msg)?;
    let (store, keyring) = open(config, true)?;
    let fleet = fleet_of(store.as_ref())?;
    let keyring = keyring.context("no keyring")?;
    let ca = FleetCa::open_or_create(fleet, &keyring)?;
    let issued = ca.issue_host(host, validity.unwrap_or(HOST_VALIDITY))?;
    if !out.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(out)
            .with_context(|| format!("creating {}", out.display()))?;
    }
    // Files first: an enrollment whose key was not written would lock the host out.
    write_file(&out.join(HOST_KEY), issued.key_pem.as_bytes(), 0o600)?;
    write_file(&out.join(HOST_CERT), issued.cert_pem.as_bytes(), 0o644)?;
    write_file(&out.join(FLEET_CA), ca.cert_pem.as_bytes(), 0o644)?;
    let previous = fleet.host(host)?;
    fleet.enroll_host(&HostRecord {
        name: host.to_owned(),
        cert_sha256: fingerprint(&issued.cert_der),
        serial: issued.serial.clone(),
        enrolled_at: now_ms(),
        not_after: issued.not_after,
        revoked_at: None,
        agent_ca_pem: previous.as_ref().and_then(|p| p.agent_ca_pem.clone()),
        connected: previous
            .as_ref()
            .map(|p| p.connected.clone())
            .unwrap_or_default(),
        agents: previous.map(|p| p.agents).unwrap_or_default(),
        last_seen: None,
    })?;
    Ok(Enrolled {
        host: host.to_owned(),
        serial: issued.serial,
        expires: rfc3339(issued.not_after),
        files: [HOST_CERT, HOST_KEY, FLEET_CA]
            .iter()
            .map(|f| out.join(f).display().to_string())
            .collect(),
    })
}

/// One host as `fleet hosts` lists it.
#[derive(Debug, Serialize)]
pub struct HostInfo {
    /// The host.
    pub host: String,
    /// Current certificate's serial (hex).
    pub serial: String,
    /// When it was enrolled (RFC 3339).
    pub enrolled: String,
    /// When its certificate expires (RFC 3339).
    pub expires: String,
    /// When it was revoked, if it was.
    pub revoked: Option<String>,
    /// Agents connected as this host (replica, agent id, since).
    pub connected: Vec<HostConnection>,
    /// Last connection or disconnection seen (RFC 3339).
    pub last_seen: Option<String>,
}

/// Every enrolled host. Blocks.
pub fn hosts(config: &Config) -> anyhow::Result<Vec<HostInfo>> {
    let (store, _) = open(config, false)?;
    let fleet = fleet_of(store.as_ref())?;
    Ok(fleet
        .hosts()?
        .into_iter()
        .map(|h| HostInfo {
            host: h.name,
            serial: h.serial,
            enrolled: rfc3339(h.enrolled_at),
            expires: rfc3339(h.not_after),
            revoked: h.revoked_at.map(rfc3339),
            connected: h.connected,
            last_seen: h.last_seen.map(rfc3339),
        })
        .collect())
}

/// Revokes `host`: every replica drops its connections and refuses it until it is enrolled
/// again. Blocks.
pub fn revoke(config: &Config, host: &str) -> anyhow::Result<()> {
    check_host_name(host).map_err(anyhow::Error::msg)?;
    let (store, _) = open(config, false)?;
    let fleet = fleet_of(store.as_ref())?;
    match fleet.revoke_host(host, now_ms()) {
        Ok(()) => Ok(()),
        Err(crate::store::StoreError::NotFound) => bail!("host {host:?} is not enrolled"),
        Err(e) => Err(e.into()),
    }
}
