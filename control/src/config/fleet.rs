//! `[fleet]`: where agents of other hosts connect (mutual TLS), and the names the replica's
//! server certificate carries.
//!
//! ```toml
//! [fleet]
//! agent_listen = "0.0.0.0:3901"
//! server_names = ["control-1.example", "10.0.0.5"]
//! ```
//!
//! The replica issues its own server certificate from the fleet CA at every start, for
//! `server_names`: no certificate file to distribute. Agents name a replica in `control_urls`
//! by one of these names.

use std::net::SocketAddr;

use serde::Deserialize;

/// The fleet settings of a replica.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// TCP address for agents of enrolled hosts (mutual TLS 1.3); `""` = no fleet listener.
    pub agent_listen: String,
    /// DNS names and IP addresses of this replica's server certificate (what agents put in
    /// `control_urls`); default: `localhost` and the listen address's IP.
    pub server_names: Vec<String>,
}

impl FleetConfig {
    /// The listen address, if the fleet listener is on (valid once validated).
    pub fn listen(&self) -> Option<SocketAddr> {
        self.agent_listen.parse().ok()
    }

    /// The names of the server certificate (`server_names`, or the defaults).
    pub fn names(&self) -> Vec<String> {
        if !self.server_names.is_empty() {
            return self.server_names.clone();
        }
        let mut names = vec!["localhost".to_owned()];
        if let Some(addr) = self.listen()
            && !addr.ip().is_unspecified()
        {
            names.push(addr.ip().to_string());
        }
        names
    }

    /// Checks the names (the store backend is checked by [`super::Config::validate`]).
    pub fn validate(&self) -> Result<(), String> {
        if !self.agent_listen.is_empty() && self.listen().is_none() {
            return Err(format!(
                "fleet.agent_listen {:?} is not an address:port (\"\" turns it off)",
                self.agent_listen
            ));
        }
        for name in &self.server_names {
            let ok = name.parse::<std::net::IpAddr>().is_ok()
                || (!name.is_empty()
                    && name.len() <= 253
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'));
            if !ok {
                return Err(format!(
                    "fleet.server_names entry {name:?} is neither a DNS name nor an IP address"
                ));
            }
        }
        Ok(())
    }
}
