//! `/api/api-keys`: an organization's API keys, for callers with `admin`. The key string is
//! returned once, at creation; only its hash is stored.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use serde_json::json;
use veil_api::{ApiKey, CreateApiKey, NewApiKey, SecretValue};

use super::body::{PERMISSIONS, decode};
use super::error::ApiError;
use super::state::{AppState, Caller, Route, blocking, with_state};
use crate::api::audit::entry;
use crate::auth::{self, Permission};
use crate::store::{ApiKeyRecord, StoreError};
use crate::timefmt::{now_ms, rfc3339};

/// Routes of this resource.
pub fn routes() -> Vec<Route> {
    vec![
        Route::new(Method::POST, "/api-keys", create),
        Route::new(Method::GET, "/api-keys", list),
        Route::new(Method::DELETE, "/api-keys/{id}", revoke),
    ]
}

fn view(k: &ApiKeyRecord) -> ApiKey {
    ApiKey {
        id: k.id.to_string(),
        organization_id: k.org.clone(),
        permissions: k.permissions.iter().map(|p| p.to_string()).collect(),
        created_at: rfc3339(k.created_at),
    }
}

#[utoipa::path(
    post,
    path = "/api-keys",
    operation_id = "createApiKey",
    summary = "Create an API key in the caller's organization; the key is in `value`, shown once (admin)",
    request_body = CreateApiKey,
    responses(
        (status = 201, description = "Created", body = NewApiKey),
        (status = 415, description = "Not JSON", body = veil_api::ErrorBody),
    )
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<NewApiKey>), ApiError> {
    caller.require(Permission::Admin)?;
    let req: CreateApiKey = decode(&headers, body)?;
    let bad = || ApiError::BadRequest(PERMISSIONS.into());
    let mut permissions = req
        .permissions
        .iter()
        .map(|s| s.parse::<Permission>().map_err(|_| bad()))
        .collect::<Result<Vec<_>, _>>()?;
    if permissions.is_empty() {
        return Err(bad());
    }
    permissions.sort();
    permissions.dedup();
    let new = auth::generate_key();
    let record = ApiKeyRecord {
        id: new.id.clone(),
        org: caller.org.clone(),
        permissions,
        hash: new.hash.clone(),
        created_at: now_ms(),
    };
    let st = state.clone();
    let rec = record.clone();
    blocking(move || {
        let audit = entry(
            &caller,
            "apikey.create",
            "apikey",
            &rec.id,
            None,
            json!({"permissions": {"to": rec.permissions}}),
        );
        st.store
            .create_api_key(&rec, audit)
            .map_err(|e| ApiError::from_store(e, "api key"))
    })
    .await?;
    let body = NewApiKey {
        key: view(&record),
        value: SecretValue::new(new.key.as_str()),
    };
    Ok((StatusCode::CREATED, Json(body)))
}

#[utoipa::path(
    get,
    path = "/api-keys",
    operation_id = "listApiKeys",
    summary = "The organization's API keys, never their values (admin)",
    responses((status = 200, description = "Keys", body = Vec<ApiKey>))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<ApiKey>>, ApiError> {
    caller.require(Permission::Admin)?;
    let all = with_state(&state, |st| {
        st.store
            .list_api_keys()
            .map_err(|e| ApiError::from_store(e, "api key"))
    })
    .await?;
    let mut keys: Vec<ApiKeyRecord> = all.into_iter().filter(|k| k.org == caller.org).collect();
    keys.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    Ok(Json(keys.iter().map(view).collect()))
}

#[utoipa::path(
    delete,
    path = "/api-keys/{keyId}",
    operation_id = "revokeApiKey",
    summary = "Revoke an API key (admin)",
    params(("keyId" = String, Path, description = "The key's id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 404, description = "No such key in the organization", body = veil_api::ErrorBody),
    )
)]
pub(crate) async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Permission::Admin)?;
    let not_found = |id: &str| ApiError::NotFound(format!("api key {id} not found"));
    blocking(move || {
        let key = state
            .store
            .api_key(&id)
            .map_err(|e| ApiError::from_store(e, "api key"))?
            .filter(|k| k.org == caller.org)
            .ok_or_else(|| not_found(&id))?;
        let audit = entry(&caller, "apikey.revoke", "apikey", &key.id, None, json!({}));
        state
            .store
            .revoke_api_key(&key.id, audit)
            .map(|_| ())
            .map_err(|e| match e {
                StoreError::NotFound => not_found(&id),
                e => ApiError::from_store(e, "api key"),
            })
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
