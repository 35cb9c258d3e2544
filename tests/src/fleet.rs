//! The fleet: veil-control replicas with a mutual-TLS agent listener on one PostgreSQL,
//! enrolled hosts (their certificate files), host agents connected over `control_urls`, and a
//! link-level client that speaks veil-link inside mutual TLS as an agent (or an attacker) does.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use veil_link::{
    AgentId, AgentMsg, ControlMsg, LocalResponse, PROTOCOL_VERSION, read_frame, write_frame,
};

use crate::agent::AgentOptions;
use crate::cgroup::PARENT;
use crate::control::{Control, free_port};
use crate::postgres::Postgres;
use crate::replicas::store_config;

/// The name replicas put in their server certificate (what agents dial).
pub const SERVER_NAME: &str = "localhost";

/// A replica's config: the shared store, a fleet listener on `fleet_port`, test cgroups, an
/// agent required, `timeout_ms` for acknowledgements.
pub fn replica_config(pg: &Postgres, fleet_port: u16, timeout_ms: u64) -> String {
    format!(
        "{}[fleet]\nagent_listen = \"127.0.0.1:{fleet_port}\"\nserver_names = [{SERVER_NAME:?}]\n\
         [sandbox]\ncgroup_parents = [{PARENT:?}]\n[agent]\nrequired = true\ntimeout_ms = {timeout_ms}\n",
        store_config(pg)
    )
}

/// A replica with a fleet listener: its daemon and the port agents dial.
#[derive(Debug)]
pub struct Replica {
    /// The daemon.
    pub control: Control,
    /// The fleet listener's port (127.0.0.1).
    pub fleet_port: u16,
}

impl Replica {
    /// Starts the first replica (it makes the master key).
    pub fn first(pg: &Postgres) -> Replica {
        let fleet_port = free_port();
        let control = Control::start_with(&replica_config(pg, fleet_port, 5000), "info");
        Replica::ready(control, fleet_port)
    }

    /// Starts another replica holding the key files of `keys_from`.
    pub fn other(pg: &Postgres, keys_from: &Path) -> Replica {
        let fleet_port = free_port();
        let control =
            crate::replicas::start_replica(&replica_config(pg, fleet_port, 5000), keys_from);
        Replica::ready(control, fleet_port)
    }

    fn ready(control: Control, fleet_port: u16) -> Replica {
        let up = crate::cmd::wait_until(Duration::from_secs(20), || {
            control.log().contains("fleet ready")
        });
        assert!(up, "the fleet listener never came up:\n{}", control.log());
        Replica {
            control,
            fleet_port,
        }
    }

    /// `localhost:PORT`, as agents list it in `control_urls`.
    pub fn url(&self) -> String {
        format!("{SERVER_NAME}:{}", self.fleet_port)
    }

    /// Runs `veil-control fleet ARGS --config … --data-dir …` against this replica's store.
    pub fn fleet_cli(&self, args: &[&str]) -> Output {
        let mut all = vec!["fleet"];
        all.extend_from_slice(args);
        let config = self.control.config_path().to_str().expect("utf-8 path");
        let data = self.control.data_dir.to_str().expect("utf-8 path");
        all.extend(["--config", config, "--data-dir", data]);
        self.control.cli(&all)
    }

    /// Enrolls `host` into a fresh directory under `dir`; panics on failure.
    pub fn enroll(&self, host: &str, dir: &Path) -> HostCreds {
        self.enroll_valid(host, dir, None)
    }

    /// Enrolls `host` with a certificate valid `secs` seconds (default one year).
    pub fn enroll_valid(&self, host: &str, dir: &Path, secs: Option<u64>) -> HostCreds {
        let out_dir = dir.join(format!("creds-{host}-{}", crate::control::random_token(6)));
        let out = out_dir.to_str().expect("utf-8 path").to_owned();
        let secs_text = secs.map(|s| s.to_string());
        let mut args = vec!["enroll", "--host", host, "--out", &out];
        if let Some(s) = &secs_text {
            args.extend(["--validity-secs", s]);
        }
        let done = self.fleet_cli(&args);
        assert!(
            done.status.success(),
            "fleet enroll {host}: {}",
            String::from_utf8_lossy(&done.stderr)
        );
        HostCreds { dir: out_dir }
    }

    /// `fleet hosts` as JSON.
    pub fn hosts(&self) -> Value {
        let out = self.fleet_cli(&["hosts"]);
        assert!(
            out.status.success(),
            "fleet hosts: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("fleet hosts prints JSON")
    }

    /// `fleet revoke --host HOST`; panics on failure.
    pub fn revoke(&self, host: &str) {
        let out = self.fleet_cli(&["revoke", "--host", host]);
        assert!(
            out.status.success(),
            "fleet revoke {host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The files `fleet enroll` wrote for a host.
#[derive(Debug, Clone)]
pub struct HostCreds {
    /// Their directory.
    pub dir: PathBuf,
}

impl HostCreds {
    /// The host certificate.
    pub fn cert(&self) -> PathBuf {
        self.dir.join("host.pem")
    }
    /// The host key.
    pub fn key(&self) -> PathBuf {
        self.dir.join("host.key")
    }
    /// The fleet CA.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("fleet-ca.pem")
    }

    /// Agent options reaching `urls` over mutual TLS with these files (`ca` overrides the
    /// fleet CA the agent trusts).
    pub fn agent_options(&self, urls: &[String], ca: Option<&Path>) -> AgentOptions {
        let list: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
        let ca = ca.map_or_else(|| self.ca(), Path::to_owned);
        AgentOptions {
            extra_config: format!(
                "control_urls = [{}]\ncontrol_cert = {:?}\ncontrol_key = {:?}\ncontrol_ca = {:?}\n\
                 reconnect_min_ms = 25\nreconnect_max_ms = 200\n",
                list.join(", "),
                self.cert().display().to_string(),
                self.key().display().to_string(),
                ca.display().to_string(),
            ),
            ..AgentOptions::default()
        }
    }
}

/// A self-signed CA (not the fleet's) and a "host" certificate it issued: what an attacker
/// who never enrolled can make. Writes `ca.pem`, `host.pem`, `host.key` into `dir`.
pub fn foreign_creds(dir: &Path, host: &str) -> HostCreds {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    std::fs::create_dir_all(dir).expect("creds dir");
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "veil fleet CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("host key");
    let mut params = CertificateParams::new(vec![host.to_owned()]).expect("params");
    params.distinguished_name.push(DnType::CommonName, host);
    let cert = params.signed_by(&key, &issuer).expect("host cert");
    std::fs::write(dir.join("fleet-ca.pem"), ca_cert.pem()).expect("write ca");
    std::fs::write(dir.join("host.pem"), cert.pem()).expect("write cert");
    std::fs::write(dir.join("host.key"), key.serialize_pem()).expect("write key");
    HostCreds {
        dir: dir.to_owned(),
    }
}

/// What a link-level client got from a replica.
#[derive(Debug)]
pub enum LinkOutcome {
    /// The TLS handshake failed (this side's error).
    Handshake(String),
    /// The connection was closed (or failed) before a snapshot arrived.
    Closed(String),
    /// A snapshot arrived: the connection is an admitted agent's.
    Admitted(Box<LinkConn>),
}

/// An admitted link-level agent connection.
pub struct LinkConn {
    stream: TlsStream<TcpStream>,
    /// The first snapshot's sandboxes' ids.
    pub sandboxes: Vec<String>,
    /// The first snapshot's secrets' ids (never their values).
    pub secrets: Vec<String>,
}

impl std::fmt::Debug for LinkConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkConn")
            .field("sandboxes", &self.sandboxes)
            .field("secrets", &self.secrets)
            .finish()
    }
}

/// A TLS client config trusting `ca_pem` and presenting `cert`/`key` (or no certificate).
pub fn client_tls(ca: &Path, identity: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("read CA") {
        roots.add(c.expect("CA cert")).expect("add CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots);
    Arc::new(match identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .expect("read cert")
                .collect::<Result<Vec<_>, _>>()
                .expect("cert");
            let key = PrivateKeyDer::from_pem_file(key).expect("key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client auth")
        }
        None => builder.with_no_client_auth(),
    })
}

/// A fresh random agent id.
pub fn random_agent_id() -> AgentId {
    AgentId::parse(hex::encode(rand::random::<[u8; 16]>())).expect("agent id")
}

/// A stand-in interception CA PEM for Hello (the link checks only its shape).
pub const HELLO_CA: &str = "-----BEGIN CERTIFICATE-----\nMII=\n-----END CERTIFICATE-----\n";

/// Connects to `port` over TLS as `tls` says, says Hello and waits (≤ `wait`) for the snapshot.
pub async fn link_connect(
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    agent_id: &AgentId,
    wait: Duration,
) -> LinkOutcome {
    let tcp = match TcpStream::connect(("127.0.0.1", port)).await {
        Ok(t) => t,
        Err(e) => return LinkOutcome::Handshake(format!("connect: {e}")),
    };
    let name = ServerName::try_from(SERVER_NAME).expect("server name");
    let mut stream = match TlsConnector::from(tls).connect(name, tcp).await {
        Ok(s) => s,
        Err(e) => return LinkOutcome::Handshake(e.to_string()),
    };
    let hello = AgentMsg::Hello {
        protocol: PROTOCOL_VERSION,
        agent_id: agent_id.clone(),
        ca_pem: HELLO_CA.to_owned(),
    };
    // TLS 1.3: the server checks the client certificate after the client's handshake
    // completes, so a refusal shows on the first read or write.
    if let Err(e) = write_frame(&mut stream, &hello).await {
        return LinkOutcome::Closed(format!("writing Hello: {e}"));
    }
    match tokio::time::timeout(wait, read_frame::<ControlMsg, _>(&mut stream)).await {
        Ok(Ok(Some(ControlMsg::Snapshot {
            seq,
            sandboxes,
            secrets,
            ..
        }))) => {
            let mut conn = LinkConn {
                stream,
                sandboxes: sandboxes.iter().map(|s| s.id.to_string()).collect(),
                secrets: secrets.iter().map(|s| s.id.to_string()).collect(),
            };
            if let Err(e) = conn.ack(seq).await {
                return LinkOutcome::Closed(format!("acknowledging the snapshot: {e}"));
            }
            LinkOutcome::Admitted(Box::new(conn))
        }
        Ok(Ok(Some(other))) => LinkOutcome::Closed(format!(
            "first message not a snapshot: seq {:?}",
            other.seq()
        )),
        Ok(Ok(None)) => LinkOutcome::Closed("closed before a snapshot".into()),
        Ok(Err(e)) => LinkOutcome::Closed(format!("reading: {e}")),
        Err(_) => LinkOutcome::Closed(format!("no snapshot within {wait:?}")),
    }
}

impl LinkConn {
    /// Acknowledges `seq` as applied.
    pub async fn ack(&mut self, seq: u64) -> Result<(), veil_link::FrameError> {
        write_frame(
            &mut self.stream,
            &AgentMsg::Applied {
                seq,
                errors: Vec::new(),
            },
        )
        .await
    }

    /// Reads the next message (≤ `wait`) and acknowledges it; `None` when the connection
    /// ended (or nothing came in time: `Some(Err)`).
    pub async fn next(&mut self, wait: Duration) -> Option<Result<ControlMsg, String>> {
        match tokio::time::timeout(wait, read_frame::<ControlMsg, _>(&mut self.stream)).await {
            Ok(Ok(Some(msg))) => {
                if let Some(seq) = msg.seq()
                    && let Err(e) = self.ack(seq).await
                {
                    return Some(Err(format!("acknowledging: {e}")));
                }
                Some(Ok(msg))
            }
            Ok(Ok(None)) | Ok(Err(_)) => None,
            Err(_) => Some(Err("nothing in time".into())),
        }
    }

    /// Sends an agent request carrying `req` (Describe, Bind, Unbind) and waits (≤ `wait`) for
    /// control's Reply to it, acknowledging every numbered message meanwhile (as an agent
    /// applying them would); `None` when no Reply came.
    pub async fn request(
        &mut self,
        msg: AgentMsg,
        req: u64,
        wait: Duration,
    ) -> Option<LocalResponse> {
        write_frame(&mut self.stream, &msg).await.ok()?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await? {
                Ok(ControlMsg::Reply { req: r, outcome }) if r == req => return Some(outcome),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// Waits (≤ `wait`) until the replica closes the connection, answering what it sends;
    /// whether it closed.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.next(left).await {
                None => return true,
                Some(Ok(_)) => {}
                Some(Err(_)) => return false,
            }
        }
    }
}
