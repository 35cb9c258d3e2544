//! `/api/audit`: the organization's audit log, newest first, keyset-paginated.

use std::collections::HashMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde_json::{Value, json};

use super::{ApiError, AppState, Caller, parse_limit, query_map};
use crate::auth::Permission;
use crate::paginate::Order;
use crate::store::{AuditRecord, Direction};
use crate::timefmt::{now_ms, rfc3339};

/// Routes of this resource.
pub fn router() -> Router<AppState> {
    Router::new().route("/audit", get(list))
}

/// Builds an audit entry for a change made by `caller`.
pub fn entry(
    caller: &Caller,
    action: &str,
    target_type: &str,
    target_id: &str,
    target_name: Option<&str>,
    changes: Value,
) -> AuditRecord {
    AuditRecord {
        seq: 0,
        time: now_ms(),
        actor: caller.key_id.clone(),
        org: caller.org.clone(),
        action: action.to_owned(),
        target_type: target_type.to_owned(),
        target_id: target_id.to_owned(),
        target_name: target_name.map(str::to_owned),
        changes,
    }
}

/// The public view of an audit entry.
pub fn view(a: &AuditRecord) -> Value {
    json!({
        "id": a.seq.to_string(),
        "createdAt": rfc3339(a.time),
        "actorKeyId": a.actor,
        "organizationId": a.org,
        "action": a.action,
        "targetType": a.target_type,
        "targetId": a.target_id,
        "targetName": a.target_name,
        "changes": a.changes,
    })
}

async fn list(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::ReadAudit)?;
    let q = query_map(q)?;
    let limit = parse_limit(&q)?;
    let order = match q.get("order").map(String::as_str) {
        None | Some("") => Order::Desc,
        Some(o) => Order::parse(o).map_err(ApiError::BadRequest)?,
    };
    let after = match q.get("cursor").map(String::as_str) {
        None | Some("") => None,
        Some(c) => Some(
            B64URL
                .decode(c)
                .ok()
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| ApiError::BadRequest("cursor is malformed".into()))?,
        ),
    };
    let dir = match order {
        Order::Asc => Direction::Asc,
        Order::Desc => Direction::Desc,
    };
    // One extra item tells whether another page exists.
    let (mut items, total) = state
        .store
        .audit_page(&caller.org, after, limit + 1, dir)
        .map_err(|e| ApiError::from_store(e, "audit"))?;
    let more = items.len() > limit;
    items.truncate(limit);
    let next = more
        .then(|| items.last().map(|a| B64URL.encode(a.seq.to_be_bytes())))
        .flatten();
    Ok(Json(json!({
        "items": items.iter().map(view).collect::<Vec<_>>(),
        "total": total,
        "nextCursor": next,
    })))
}
