//! `[store]`: which backend holds control's state — the embedded sled store (one host) or a
//! PostgreSQL database shared by any number of replicas.
//!
//! ```toml
//! [store]
//! backend = "postgres"
//! url_file = "/etc/veil/postgres.url"   # 0600: may carry a password
//! # url = "postgresql://veil@db.example:5432/veil"   # never a password
//! ca_file = "/etc/ssl/certs/ca-certificates.crt"
//! ```

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why the `[store]` table is not usable; errors name files, never their content.
#[derive(Debug, thiserror::Error)]
pub enum StoreConfigError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A value is not acceptable.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Where control's state lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The embedded store in `data_dir` (the default; one veil-control per store).
    #[default]
    Sled,
    /// A PostgreSQL database, shared by every replica.
    Postgres,
}

/// The `[store]` table.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// The backend.
    pub backend: Backend,
    /// PostgreSQL connection URL or key=value string, without a password.
    pub url: String,
    /// A file holding the connection string (it may carry a password: must be 0600 or 0400);
    /// `""` = none.
    pub url_file: PathBuf,
    /// CA bundle that verifies the server's certificate when the server is not on loopback.
    pub ca_file: PathBuf,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: Backend::default(),
            url: String::new(),
            url_file: PathBuf::new(),
            ca_file: PathBuf::from(SYSTEM_CA_FILE),
        }
    }
}

/// Default CA bundle for PostgreSQL servers off this host.
pub const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

impl StoreConfig {
    /// The `url_file`, when set.
    fn url_file(&self) -> Option<&Path> {
        Some(self.url_file.as_path()).filter(|p| !p.as_os_str().is_empty())
    }

    /// Checks the table; `config_file` is named in errors about a password in it.
    pub fn validate(&self, config_file: Option<&Path>) -> Result<(), StoreConfigError> {
        let named = || {
            config_file.map_or_else(
                || "the configuration".to_owned(),
                |p| p.display().to_string(),
            )
        };
        match self.backend {
            Backend::Sled => {
                if !self.url.is_empty() || self.url_file().is_some() {
                    return Err(StoreConfigError::Invalid(
                        "store.url and store.url_file need store.backend = \"postgres\"".into(),
                    ));
                }
            }
            Backend::Postgres => match (self.url_file(), self.url.is_empty()) {
                (Some(_), false) => {
                    return Err(StoreConfigError::Invalid(
                        "set one of store.url and store.url_file, not both".into(),
                    ));
                }
                (None, true) => {
                    return Err(StoreConfigError::Invalid(
                        "store.backend = \"postgres\" needs store.url or store.url_file".into(),
                    ));
                }
                (None, false) => {
                    let parsed = parse(&self.url).map_err(|e| {
                        StoreConfigError::Invalid(format!("store.url in {}: {e}", named()))
                    })?;
                    if parsed.get_password().is_some() {
                        return Err(StoreConfigError::Invalid(format!(
                            "store.url in {} carries a password: a config file is not a place \
                             for one; put the URL in a 0600 file named by store.url_file",
                            named()
                        )));
                    }
                }
                (Some(_), true) => {}
            },
        }
        Ok(())
    }

    /// The connection settings: `url`, or `url_file`'s content once its mode is checked.
    pub fn connection(&self) -> Result<tokio_postgres::Config, StoreConfigError> {
        let Some(file) = self.url_file() else {
            return parse(&self.url)
                .map_err(|e| StoreConfigError::Invalid(format!("store.url: {e}")));
        };
        let meta = std::fs::metadata(file).map_err(|source| StoreConfigError::Read {
            path: file.to_path_buf(),
            source,
        })?;
        if meta.mode() & 0o077 != 0 {
            return Err(StoreConfigError::Invalid(format!(
                "store.url_file {} is readable by group or others (mode {:o}); chmod 600 it",
                file.display(),
                meta.mode() & 0o777
            )));
        }
        let text = std::fs::read_to_string(file).map_err(|source| StoreConfigError::Read {
            path: file.to_path_buf(),
            source,
        })?;
        // The error names the file, never its content (it may hold a password).
        parse(text.trim()).map_err(|_| {
            StoreConfigError::Invalid(format!(
                "store.url_file {} does not hold a PostgreSQL connection string",
                file.display()
            ))
        })
    }
}

fn parse(text: &str) -> Result<tokio_postgres::Config, String> {
    text.parse::<tokio_postgres::Config>()
        .map_err(|_| "not a PostgreSQL connection string".to_owned())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn pg(url: &str) -> StoreConfig {
        StoreConfig {
            backend: Backend::Postgres,
            url: url.into(),
            ..StoreConfig::default()
        }
    }

    #[test]
    fn a_password_in_the_config_is_refused_naming_the_file() {
        let e = pg("postgresql://veil:hunter2@db.example/veil")
            .validate(Some(Path::new("/etc/veil/control.toml")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/veil/control.toml"), "{e}");
        assert!(e.contains("password"), "{e}");
        assert!(!e.contains("hunter2"), "the error repeats the password");
        pg("postgresql://veil@db.example/veil")
            .validate(None)
            .unwrap();
        pg("host=/run/postgresql user=veil dbname=veil")
            .validate(None)
            .unwrap();
    }

    #[test]
    fn url_file_must_be_private_and_is_never_echoed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pg.url");
        std::fs::write(&file, "postgresql://veil:hunter2@127.0.0.1/veil\n").unwrap();
        let config = StoreConfig {
            backend: Backend::Postgres,
            url_file: file.clone(),
            ..StoreConfig::default()
        };
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = config.connection().unwrap_err().to_string();
        assert!(
            e.contains(&file.display().to_string()) && e.contains("644"),
            "{e}"
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            config.connection().unwrap().get_password(),
            Some(&b"hunter2"[..])
        );
        std::fs::write(&file, "hunter2 is not a url = =").unwrap();
        let e = config.connection().unwrap_err().to_string();
        assert!(
            !e.contains("hunter2"),
            "the error repeats the file's content"
        );
    }

    #[test]
    fn backend_and_url_must_agree() {
        let mut c = pg("");
        assert!(c.validate(None).is_err());
        c.backend = Backend::Sled;
        c.url = "postgresql://veil@h/veil".into();
        assert!(c.validate(None).is_err());
    }
}
