//! `/api/api-keys`: an organization's API keys, for callers with `admin`. The key string is
//! returned once, at creation; only its hash is stored.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{delete, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use super::{ApiError, AppState, Caller, blocking, json_object, only_fields};
use crate::api::audit::entry;
use crate::auth::{self, Permission};
use crate::store::{ApiKeyRecord, StoreError};
use crate::timefmt::{now_ms, rfc3339};

/// Routes of this resource.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api-keys", post(create).get(list))
        .route("/api-keys/{id}", delete(revoke))
}

fn view(k: &ApiKeyRecord) -> Value {
    json!({
        "id": k.id,
        "organizationId": k.org,
        "permissions": k.permissions,
        "createdAt": rfc3339(k.created_at),
    })
}

async fn create(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(Permission::Admin)?;
    let mut map = json_object(&headers, body)?;
    only_fields(&map, &["permissions"])?;
    let bad = || {
        ApiError::BadRequest(
            "permissions must be a non-empty array of manage:secrets, write:sandboxes, read:audit, admin"
                .into(),
        )
    };
    let Some(Value::Array(items)) = map.remove("permissions") else {
        return Err(bad());
    };
    let mut permissions = items
        .iter()
        .map(|v| {
            v.as_str()
                .and_then(|s| s.parse::<Permission>().ok())
                .ok_or_else(bad)
        })
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
    let mut body = view(&record);
    body["value"] = json!(new.key.as_str());
    Ok((StatusCode::CREATED, Json(body)))
}

async fn list(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::Admin)?;
    let mut keys: Vec<ApiKeyRecord> = state
        .store
        .list_api_keys()
        .map_err(|e| ApiError::from_store(e, "api key"))?
        .into_iter()
        .filter(|k| k.org == caller.org)
        .collect();
    keys.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    Ok(Json(Value::Array(keys.iter().map(view).collect())))
}

async fn revoke(
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
