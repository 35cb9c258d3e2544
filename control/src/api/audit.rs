//! `/api/audit`: the organization's audit log, newest first, keyset-paginated.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::Method;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde_json::Value;
use veil_api::{AuditEntry, AuditPage, AuditQuery, OrgId};

use super::error::ApiError;
use super::state::{AppState, Caller, Route, parse_limit, query, with_state};
use crate::auth::Permission;
use crate::paginate::Order;
use crate::store::{AuditRecord, Direction};
use crate::timefmt::{now_ms, rfc3339};

/// Routes of this resource.
pub fn routes() -> Vec<Route> {
    vec![Route::new(Method::GET, "/audit", list)]
}

/// Builds an audit entry for a change made by `caller`.
pub fn entry(
    caller: &Caller,
    action: &str,
    target_type: &str,
    target_id: &(impl AsRef<str> + ?Sized),
    target_name: Option<&str>,
    changes: Value,
) -> AuditRecord {
    AuditRecord {
        seq: 0,
        time: now_ms(),
        actor: caller.key_id.clone(),
        org: caller.org.to_string(),
        action: action.to_owned(),
        target_type: target_type.to_owned(),
        target_id: target_id.as_ref().to_owned(),
        target_name: target_name.map(str::to_owned),
        changes,
    }
}

/// The public view of an audit entry.
pub fn view(a: &AuditRecord) -> Result<AuditEntry, ApiError> {
    Ok(AuditEntry {
        id: a.seq.to_string(),
        created_at: rfc3339(a.time),
        actor_key_id: a.actor.to_string(),
        organization_id: OrgId::parse(a.org.to_string())
            .map_err(|e| ApiError::internal("stored audit entry", e))?,
        action: a.action.clone(),
        target_type: a.target_type.clone(),
        target_id: a.target_id.to_string(),
        target_name: a.target_name.clone(),
        changes: a.changes.clone(),
    })
}

#[utoipa::path(
    get,
    path = "/audit",
    operation_id = "listAudit",
    summary = "The organization's audit log, values masked (read:audit)",
    params(AuditQuery),
    responses((status = 200, description = "A page", body = AuditPage))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    caller.require(Permission::ReadAudit)?;
    let q = query(q)?;
    let limit = parse_limit(q.limit.as_deref())?;
    let order = match q.order.as_deref() {
        None | Some("") => Order::Desc,
        Some(o) => Order::parse(o).map_err(ApiError::BadRequest)?,
    };
    let after = match q.cursor.as_deref() {
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
    let org = caller.org.clone();
    let (mut items, total) = with_state(&state, move |st| {
        st.store
            .audit_page(&org, after, limit + 1, dir)
            .map_err(|e| ApiError::from_store(e, "audit"))
    })
    .await?;
    let more = items.len() > limit;
    items.truncate(limit);
    let next = more
        .then(|| items.last().map(|a| B64URL.encode(a.seq.to_be_bytes())))
        .flatten();
    Ok(Json(AuditPage {
        items: items.iter().map(view).collect::<Result<_, _>>()?,
        total: total as u64,
        next_cursor: next,
    }))
}
