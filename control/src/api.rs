//! The REST API under `/api`: shared state, authentication, JSON body handling, the router.

pub mod audit;
pub mod body;
pub mod error;
pub mod keys;
pub mod openapi;
pub mod route;
pub mod sandboxes;
pub mod secrets;

use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Query};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;

use crate::agent_link::AgentLink;
use crate::auth::{self, Permission};
use crate::config::Config;
use crate::crypto::Keyring;
use crate::store::Store;
pub use error::ApiError;

/// A route of this API.
pub type Route = route::Route<AppState>;

/// Largest accepted request body (a 64 KiB value JSON-escaped fits comfortably).
const BODY_LIMIT: usize = 512 * 1024;

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

/// The authenticated caller.
#[derive(Clone, Debug)]
pub struct Caller {
    /// API key id (the audit's actor).
    pub key_id: String,
    /// The key's organization.
    pub org: String,
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
        let record = state
            .store
            .api_key(id)
            .map_err(|e| ApiError::from_store(e, "api key"))?
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

/// Logs each request's method, path, status and latency (never bodies or query strings).
async fn log_request(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    // The route template, not the path: ids must not become metric labels.
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_owned();
    let start = std::time::Instant::now();
    let resp = next.run(req).await;
    state.metrics.observe(
        method.as_str(),
        &route,
        resp.status().as_u16(),
        start.elapsed(),
    );
    tracing::debug!(
        target: "veil::http",
        %method,
        %path,
        status = resp.status().as_u16(),
        micros = start.elapsed().as_micros() as u64,
        "request"
    );
    resp
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

async fn method_not_allowed() -> impl IntoResponse {
    let status = StatusCode::METHOD_NOT_ALLOWED;
    let body = veil_api::ErrorBody {
        status_code: status.as_u16(),
        message: "method not allowed on this route".into(),
        error: "Method Not Allowed".into(),
    };
    (status, axum::Json(body))
}

/// The full application: `/api/...` routes, JSON errors for everything else.
pub fn router(state: AppState) -> Router {
    let api = route_table()
        .into_iter()
        .fold(Router::new(), |r, route| r.route(route.path, route.handler));
    Router::new()
        .nest("/api", api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            log_request,
        ))
        .with_state(state)
}

/// Every route of the API.
pub fn route_table() -> Vec<Route> {
    [
        secrets::routes(),
        sandboxes::routes(),
        audit::routes(),
        keys::routes(),
        openapi::routes(),
    ]
    .into_iter()
    .flatten()
    .collect()
}
