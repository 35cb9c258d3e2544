//! What the API's resources share: the handlers' state, the authenticated caller, blocking
//! work, the query and `limit` helpers and the route type; `super` only assembles the router.

use std::sync::{Arc, RwLock};

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Query};
use axum::http::header;
use axum::http::request::Parts;

use super::error::ApiError;
use super::route;
use crate::agent_link::AgentLink;
use crate::auth::{self, Permission};
use crate::config::Config;
use crate::crypto::Keyring;
use crate::store::Store;

/// A route of this API.
pub type Route = route::Route<AppState>;

/// Everything handlers share.
#[derive(Clone, Debug)]
pub struct AppState {
    /// Persistent state.
    pub store: Arc<dyn Store>,
    /// Master keys.
    pub keyring: Arc<RwLock<Keyring>>,
    /// Daemon configuration.
    pub config: Arc<Config>,
    /// The agent seam.
    pub agent: Arc<dyn AgentLink>,
    /// Request metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Runs blocking store/crypto work off the async workers.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal("blocking task", e))?
}

/// Runs `f` with the state on a blocking thread: everything that reads the store goes
/// through here or [`blocking`] (the store may wait on its database).
pub async fn with_state<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&AppState) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let state = state.clone();
    blocking(move || f(&state)).await
}

/// The authenticated caller.
#[derive(Clone, Debug)]
pub struct Caller {
    /// API key id (the audit's actor).
    pub key_id: String,
    /// The key's organization.
    pub org: veil_link::OrgId,
    /// The key's permissions.
    pub permissions: Vec<Permission>,
}

impl Caller {
    /// 403 unless the key carries `needed` (or `admin`).
    pub fn require(&self, needed: Permission) -> Result<(), ApiError> {
        if auth::permits(&self.permissions, needed) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "this API key lacks the {needed} permission"
            )))
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let missing =
            || ApiError::Unauthorized("missing API key (Authorization: Bearer <key>)".into());
        let invalid = || ApiError::Unauthorized("invalid API key".into());
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(missing)?
            .to_str()
            .map_err(|_| invalid())?;
        let (scheme, key) = value.split_once(' ').ok_or_else(invalid)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(invalid());
        }
        let key = key.trim();
        let id = auth::key_id(key).ok_or_else(invalid)?;
        let (store, key_id) = (state.store.clone(), id.to_owned());
        let record = blocking(move || {
            store
                .api_key(&key_id)
                .map_err(|e| ApiError::from_store(e, "api key"))
        })
        .await?
        .ok_or_else(invalid)?;
        if !auth::verify(&record, key) {
            return Err(invalid());
        }
        Ok(Caller {
            key_id: record.id,
            org: record.org,
            permissions: record.permissions,
        })
    }
}

/// A query of type `T`; a malformed query string is a 400.
pub fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t)
        .map_err(|_| ApiError::BadRequest("malformed query string".into()))
}

/// Parses `limit` (1..=200, default 100).
pub fn parse_limit(limit: Option<&str>) -> Result<usize, ApiError> {
    match limit {
        None | Some("") => Ok(100),
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=200).contains(&n) => Ok(n),
            _ => Err(ApiError::BadRequest(
                "limit must be an integer between 1 and 200".into(),
            )),
        },
    }
}
