//! `/api/secret…`: create, list, paginate, get, update, delete. No route returns a value.

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::RngCore;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::{
    ApiError, AppState, Caller, blocking, json_object, only_fields, opt_string, opt_string_array,
    parse_limit, query_map,
};
use crate::agent_link::{AgentEvent, AgentLinkError, Propagation};
use crate::api::audit::entry;
use crate::auth::Permission;
use crate::crypto::RecordBinding;
use crate::grace;
use crate::paginate::{Cursor, Order, SortField, SortValue};
use crate::store::{SecretPageQuery, SecretRecord, SecretUsage, StoreError, WrongHost};
use crate::timefmt::{now_ms, rfc3339};
use crate::validate;
use veil_policy::HostPattern;

/// Routes of this resource.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/secret", post(create).get(list))
        .route("/secret/paginated", get(paginated))
        .route("/secret/{id}", get(get_one).patch(update).delete(remove))
}

/// Longest `?wait=` a PATCH accepts.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// The public view of a secret: metadata only (Daytona's fields, then veil's extra ones).
pub fn view(s: &SecretRecord) -> Value {
    json!({
        "id": s.id,
        "name": s.name,
        "description": s.description,
        "placeholder": s.placeholder,
        "hosts": s.hosts,
        "createdAt": rfc3339(s.created_at),
        "updatedAt": rfc3339(s.updated_at),
        "revision": s.revision,
        "bodySubstitution": s.body_substitution,
        "wrongHost": wrong_host_name(s.wrong_host),
    })
}

/// The single-secret view (GET, PATCH): [`view`] plus what the agents acknowledged and what
/// they reported about its use.
pub fn detail(s: &SecretRecord, propagation: &Propagation, usage: &SecretUsage) -> Value {
    let mut v = view(s);
    let agents: Vec<Value> = propagation
        .agents
        .iter()
        .map(|a| {
            json!({
                "agentId": a.agent_id,
                "connected": a.connected,
                "acknowledgedRevision": a.revision,
                "acknowledgedAt": a.at.map(rfc3339),
            })
        })
        .collect();
    v["propagation"] = json!({
        "complete": propagation.pending(s.revision).is_empty(),
        "agents": agents,
    });
    let hosts: serde_json::Map<String, Value> = usage
        .hosts
        .iter()
        .map(|(host, u)| {
            (
                host.clone(),
                json!({
                    "substituted": u.counts.substituted,
                    "wrongHost": u.counts.wrong_host,
                    "hostMismatch": u.counts.host_mismatch,
                    "blocked": u.counts.blocked,
                    "lastUsedAt": u.last_used_at.map(rfc3339),
                    "lastSeenAt": u.last_seen_at.map(rfc3339),
                }),
            )
        })
        .collect();
    v["lastUsedAt"] = json!(usage.last_used_at.map(rfc3339));
    v["usage"] = Value::Object(hosts);
    v
}

fn wrong_host_name(w: WrongHost) -> &'static str {
    match w {
        WrongHost::Forward => "forward",
        WrongHost::Block => "block",
    }
}

fn parse_wrong_host(
    map: &mut serde_json::Map<String, Value>,
) -> Result<Option<WrongHost>, ApiError> {
    match opt_string(map, "wrongHost")
        .map_err(|_| bad("wrongHost must be \"forward\" or \"block\"".into()))?
        .as_deref()
    {
        None => Ok(None),
        Some("forward") => Ok(Some(WrongHost::Forward)),
        Some("block") => Ok(Some(WrongHost::Block)),
        Some(_) => Err(bad("wrongHost must be \"forward\" or \"block\"".into())),
    }
}

fn parse_body_substitution(
    map: &mut serde_json::Map<String, Value>,
) -> Result<Option<bool>, ApiError> {
    match map.remove("bodySubstitution") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(_) => Err(bad("bodySubstitution must be true or false".into())),
    }
}

/// `?wait=` of a PATCH: `500ms`, `5s` or plain seconds, 1 ms to [`MAX_WAIT`].
pub fn parse_wait(q: &HashMap<String, String>) -> Result<Option<Duration>, ApiError> {
    let Some(raw) = q.get("wait").map(|w| w.trim()).filter(|w| !w.is_empty()) else {
        return Ok(None);
    };
    let invalid = || {
        bad(format!(
            "wait must be a duration like 500ms or 5s (at most {} s)",
            MAX_WAIT.as_secs()
        ))
    };
    let (number, unit_ms) = if let Some(n) = raw.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = raw.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (raw, 1000.0)
    };
    let n: f64 = number.trim().parse().map_err(|_| invalid())?;
    let ms = n * unit_ms;
    if !ms.is_finite() || ms < 1.0 || ms > MAX_WAIT.as_millis() as f64 {
        return Err(invalid());
    }
    Ok(Some(Duration::from_millis(ms as u64)))
}

/// A random UUID v4 string.
pub fn new_uuid() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn new_placeholder(prefix: &str) -> String {
    // 192 random bits, hex: safe in URLs, headers and shells.
    let mut b = [0u8; 24];
    rand::rng().fill_bytes(&mut b);
    format!("{prefix}{}", hex::encode(b))
}

/// Validates and normalises a hosts list (deduplicated, order kept).
pub fn parse_hosts(hosts: Vec<String>) -> Result<Vec<String>, ApiError> {
    if hosts.len() > validate::MAX_HOSTS {
        return Err(ApiError::BadRequest(format!(
            "hosts may list at most {} entries",
            validate::MAX_HOSTS
        )));
    }
    let mut out: Vec<String> = Vec::with_capacity(hosts.len());
    for (i, host) in hosts.iter().enumerate() {
        let pattern = HostPattern::parse(host)
            .map_err(|e| ApiError::BadRequest(format!("hosts[{i}] {host:?}: {e}")))?
            .to_string();
        if !out.contains(&pattern) {
            out.push(pattern);
        }
    }
    Ok(out)
}

fn bad(msg: String) -> ApiError {
    ApiError::BadRequest(msg)
}

fn parse_description(d: Option<String>) -> Result<Option<String>, ApiError> {
    match d {
        Some(d) => {
            validate::description(&d).map_err(bad)?;
            Ok(Some(d))
        }
        None => Ok(None),
    }
}

async fn create(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(Permission::ManageSecrets)?;
    let mut map = json_object(&headers, body)?;
    // Move the value into a wiped buffer before anything else can fail and drop the map.
    let value = opt_string(&mut map, "value")?.map(Zeroizing::new);
    only_fields(
        &map,
        &[
            "name",
            "description",
            "hosts",
            "bodySubstitution",
            "wrongHost",
        ],
    )?;
    let value = value.ok_or_else(|| bad("value is required".into()))?;
    let name = opt_string(&mut map, "name")?.ok_or_else(|| bad("name is required".into()))?;
    validate::secret_name(&name).map_err(bad)?;
    validate::secret_value(&value).map_err(bad)?;
    let description = parse_description(opt_string(&mut map, "description")?)?;
    let hosts = parse_hosts(opt_string_array(&mut map, "hosts")?.unwrap_or_default())?;
    let body_substitution = parse_body_substitution(&mut map)?.unwrap_or(false);
    let wrong_host = parse_wrong_host(&mut map)?.unwrap_or_default();
    let now = now_ms();
    let id = new_uuid();
    let placeholder = new_placeholder(&state.config.placeholder_prefix);
    let st = state.clone();
    let caller2 = caller.clone();
    let record = blocking(move || {
        // Hold the keyring across seal and write so a rekey cannot retire the sealing key
        // before this record is stored.
        let ring = st
            .keyring
            .read()
            .map_err(|_| ApiError::internal("keyring", "poisoned"))?;
        let sealed = ring
            .seal(
                RecordBinding {
                    org: &caller2.org,
                    secret_id: &id,
                    revision: 1,
                },
                value.as_bytes(),
            )
            .map_err(|e| ApiError::internal("seal", e))?;
        let record = SecretRecord {
            id: id.clone(),
            org: caller2.org.clone(),
            name: name.clone(),
            description,
            hosts: hosts.clone(),
            placeholder,
            created_at: now,
            updated_at: now,
            revision: 1,
            sealed,
            body_substitution,
            wrong_host,
            previous: Vec::new(),
        };
        let audit = entry(
            &caller2,
            "secret.create",
            "secret",
            &id,
            Some(&name),
            json!({
                "name": {"to": name},
                "value": {"to": "***"},
                "description": {"to": record.description},
                "hosts": {"to": hosts, "unrestricted": hosts.is_empty()},
                "bodySubstitution": {"to": body_substitution},
                "wrongHost": {"to": wrong_host_name(wrong_host)},
            }),
        );
        st.store
            .insert_secret(&record, audit)
            .map_err(|e| ApiError::from_store(e, "secret"))?;
        Ok(record)
    })
    .await?;
    push_secret(&state, &record.id).await;
    Ok((StatusCode::CREATED, Json(view(&record))))
}

/// Pushes a secret change to the agents and waits for them, so that once the answer is sent the
/// connected agents use the new state. The store is the truth: an agent that does not
/// acknowledge converges later, so this never fails the request (it is logged).
async fn push_secret(state: &AppState, id: &str) {
    let event = AgentEvent::SecretChanged { id: id.to_owned() };
    match state.agent.notify(event).await {
        Ok(()) | Err(AgentLinkError::NotConnected) => {}
        Err(e) => {
            tracing::warn!(secret = %id, error = %e, "secret change not acknowledged by the agents")
        }
    }
}

async fn list(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::ManageSecrets)?;
    let mut all = blocking(move || {
        state
            .store
            .list_secrets(&caller.org)
            .map_err(|e| ApiError::from_store(e, "secret"))
    })
    .await?;
    all.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
    Ok(Json(Value::Array(all.iter().map(view).collect())))
}

fn sort_value(s: &SecretRecord, field: SortField) -> (SortValue, String) {
    let v = match field {
        SortField::Name => SortValue::Text(s.name.clone()),
        SortField::CreatedAt => SortValue::Time(s.created_at),
        SortField::UpdatedAt => SortValue::Time(s.updated_at),
    };
    (v, s.id.clone())
}

async fn paginated(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::ManageSecrets)?;
    let q = query_map(q)?;
    let limit = parse_limit(&q)?;
    let cursor = match q.get("cursor").map(String::as_str) {
        None | Some("") => None,
        Some(c) => Some(Cursor::decode(c).map_err(bad)?),
    };
    let sort = match q.get("sort").map(String::as_str) {
        None | Some("") => cursor.as_ref().map_or(SortField::CreatedAt, |c| c.s),
        Some(s) => SortField::parse(s).map_err(bad)?,
    };
    let order = match q.get("order").map(String::as_str) {
        None | Some("") => cursor.as_ref().map_or(Order::Desc, |c| c.o),
        Some(o) => Order::parse(o).map_err(bad)?,
    };
    if let Some(c) = &cursor
        && (c.s != sort || c.o != order)
    {
        return Err(bad("cursor was issued for a different sort or order".into()));
    }
    let filter = q
        .get("name")
        .filter(|n| !n.is_empty())
        .map(|n| n.to_lowercase());
    let st = state.clone();
    let org = caller.org.clone();
    let page = blocking(move || {
        st.store
            .page_secrets(
                &org,
                &SecretPageQuery {
                    sort,
                    order,
                    after: cursor.as_ref(),
                    limit,
                    name_contains: filter.as_deref(),
                },
            )
            .map_err(|e| ApiError::from_store(e, "secret"))
    })
    .await?;
    let next = if page.more {
        page.items.last().map(|s| {
            let (v, i) = sort_value(s, sort);
            Cursor {
                s: sort,
                o: order,
                v,
                i,
            }
            .encode()
        })
    } else {
        None
    };
    Ok(Json(json!({
        "items": page.items.iter().map(view).collect::<Vec<_>>(),
        "total": page.total,
        "nextCursor": next,
    })))
}

async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::ManageSecrets)?;
    let s = state
        .store
        .secret(&caller.org, &id)
        .map_err(|e| ApiError::from_store(e, "secret"))?
        .ok_or_else(|| ApiError::NotFound(format!("secret {id} not found")))?;
    detail_of(&state, &s).map(Json)
}

fn detail_of(state: &AppState, s: &SecretRecord) -> Result<Value, ApiError> {
    let usage = state
        .store
        .secret_usage(&s.id)
        .map_err(|e| ApiError::from_store(e, "secret"))?;
    Ok(detail(s, &state.agent.propagation(&s.id), &usage))
}

async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::ManageSecrets)?;
    let wait = parse_wait(&query_map(q)?)?;
    let mut map = json_object(&headers, body)?;
    let value = opt_string(&mut map, "value")?.map(Zeroizing::new);
    only_fields(
        &map,
        &["description", "hosts", "bodySubstitution", "wrongHost"],
    )?;
    if let Some(v) = &value {
        validate::secret_value(v).map_err(bad)?;
    }
    let description = parse_description(opt_string(&mut map, "description")?)?;
    let hosts = match opt_string_array(&mut map, "hosts")? {
        Some(h) => Some(parse_hosts(h)?),
        None => None,
    };
    let body_substitution = parse_body_substitution(&mut map)?;
    let wrong_host = parse_wrong_host(&mut map)?;
    if value.is_none()
        && description.is_none()
        && hosts.is_none()
        && body_substitution.is_none()
        && wrong_host.is_none()
    {
        // Nothing to change: answer like a GET, without a write or an audit entry (with
        // `wait`, once the agents hold the current revision).
        let s = state
            .store
            .secret(&caller.org, &id)
            .map_err(|e| ApiError::from_store(e, "secret"))?
            .ok_or_else(|| ApiError::NotFound(format!("secret {id} not found")))?;
        if let Some(wait) = wait {
            wait_for_agents(&state, &id, s.revision, wait).await?;
        }
        return detail_of(&state, &s).map(Json);
    }
    let st = state.clone();
    let caller2 = caller.clone();
    let id2 = id.clone();
    let grace = state.config.rotated_value_grace.0;
    let record = blocking(move || {
        let ring = st
            .keyring
            .read()
            .map_err(|_| ApiError::internal("keyring", "poisoned"))?;
        let mut change = |old: &SecretRecord| {
            let now = now_ms().max(old.updated_at);
            let mut new = old.clone();
            let mut changes = serde_json::Map::new();
            if value.is_some() {
                changes.insert("value".into(), json!({"from": "***", "to": "***"}));
            }
            if let Some(d) = &description {
                // An empty description clears it.
                let d = (!d.is_empty()).then(|| d.clone());
                if d != old.description {
                    changes.insert(
                        "description".into(),
                        json!({"from": old.description, "to": d}),
                    );
                }
                new.description = d;
            }
            if let Some(h) = &hosts
                && *h != old.hosts
            {
                let mut c = json!({"from": old.hosts, "to": h});
                if h.is_empty() {
                    // Widening to every host is the change an auditor most needs to see.
                    c["unrestricted"] = json!(true);
                    c["widened"] = json!(true);
                }
                changes.insert("hosts".into(), c);
                new.hosts = h.clone();
            }
            if let Some(b) = body_substitution
                && b != old.body_substitution
            {
                changes.insert(
                    "bodySubstitution".into(),
                    json!({"from": old.body_substitution, "to": b}),
                );
                new.body_substitution = b;
            }
            if let Some(w) = wrong_host
                && w != old.wrong_host
            {
                changes.insert(
                    "wrongHost".into(),
                    json!({"from": wrong_host_name(old.wrong_host), "to": wrong_host_name(w)}),
                );
                new.wrong_host = w;
            }
            if !changes.is_empty() {
                // Every change bumps the revision (agents and caches key on it); the value is
                // re-sealed because the revision is part of its ciphertext binding.
                new.revision = old.revision + 1;
                let seal_err = |e| StoreError::Backend(format!("seal: {e}"));
                let binding = RecordBinding {
                    org: &new.org,
                    secret_id: &new.id,
                    revision: new.revision,
                };
                // The replaced value stays scrubbed for the grace period, sealed as it was
                // (bound to its own revision).
                new.previous = match &value {
                    Some(v) => grace::previous_after_rotation(old, now, grace, |p| {
                        let stored = ring.open(
                            RecordBinding {
                                org: &old.org,
                                secret_id: &old.id,
                                revision: p.revision,
                            },
                            &p.sealed,
                        );
                        stored.is_ok_and(|s| bool::from(s.as_slice().ct_eq(v.as_bytes())))
                    }),
                    None => grace::previous_kept(old, now, grace),
                };
                new.sealed = match &value {
                    Some(v) => ring.seal(binding, v.as_bytes()).map_err(seal_err)?,
                    None => {
                        let plain = ring
                            .open(
                                RecordBinding {
                                    org: &old.org,
                                    secret_id: &old.id,
                                    revision: old.revision,
                                },
                                &old.sealed,
                            )
                            .map_err(|e| StoreError::Backend(format!("open: {e}")))?;
                        ring.seal(binding, &plain).map_err(seal_err)?
                    }
                };
            }
            new.updated_at = now;
            let audit = entry(
                &caller2,
                "secret.update",
                "secret",
                &old.id,
                Some(&old.name),
                Value::Object(changes),
            );
            Ok((new, audit))
        };
        st.store
            .update_secret(&caller2.org, &id2, &mut change)
            .map_err(|e| match e {
                StoreError::NotFound => ApiError::NotFound(format!("secret {id2} not found")),
                e => ApiError::from_store(e, "secret"),
            })
    })
    .await?;
    match wait {
        None => push_secret(&state, &id).await,
        Some(wait) => {
            // The push runs on its own, bounded by agent.timeout_ms, while this answer waits
            // for the acknowledgements for at most `wait`.
            let agent = state.agent.clone();
            let event = AgentEvent::SecretChanged { id: id.clone() };
            tokio::spawn(async move {
                if let Err(e) = agent.notify(event).await
                    && !matches!(e, AgentLinkError::NotConnected)
                {
                    tracing::warn!(error = %e, "secret change not acknowledged by the agents");
                }
            });
            wait_for_agents(&state, &id, record.revision, wait).await?;
        }
    }
    detail_of(&state, &record).map(Json)
}

/// Waits until no agent may still use a revision older than `revision`; a 504 that says the
/// change is stored when they do not acknowledge in time, a 502 when one reported a failure.
async fn wait_for_agents(
    state: &AppState,
    id: &str,
    revision: u64,
    wait: Duration,
) -> Result<(), ApiError> {
    match state.agent.wait_acked(id, revision, wait).await {
        Ok(()) => Ok(()),
        Err(AgentLinkError::Rejected(e)) => Err(ApiError::AgentFailed(format!(
            "secret {id} is stored at revision {revision}, but a veil-agent reported: {}",
            e.join("; ")
        ))),
        Err(e) => Err(ApiError::GatewayTimeout(format!(
            "secret {id} is stored at revision {revision}, but it was {e}; agents converge when \
             they reconnect, and GET /api/secret/{id} shows the propagation"
        ))),
    }
}

async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Permission::ManageSecrets)?;
    let st = state.clone();
    let caller2 = caller.clone();
    let id2 = id.clone();
    let grace = state.config.rotated_value_grace.0;
    blocking(move || {
        st.store
            .delete_secret(&caller2.org, &id2, &mut |old| {
                let audit = entry(
                    &caller2,
                    "secret.delete",
                    "secret",
                    &old.id,
                    Some(&old.name),
                    json!({"value": {"from": "***"}}),
                );
                // Its last values are still scrubbed, in every sandbox of the organization,
                // for the grace period.
                (audit, grace::tombstone(old, now_ms(), grace))
            })
            .map_err(|e| match e {
                StoreError::NotFound => ApiError::NotFound(format!("secret {id2} not found")),
                e => ApiError::from_store(e, "secret"),
            })
    })
    .await?;
    push_secret(&state, &id).await;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait(v: &str) -> Result<Option<Duration>, ApiError> {
        parse_wait(&HashMap::from([("wait".to_owned(), v.to_owned())]))
    }

    #[test]
    fn wait_parses_durations_within_bounds() {
        assert_eq!(wait("").unwrap(), None);
        assert_eq!(parse_wait(&HashMap::new()).unwrap(), None);
        assert_eq!(wait("500ms").unwrap(), Some(Duration::from_millis(500)));
        assert_eq!(wait("5s").unwrap(), Some(Duration::from_secs(5)));
        assert_eq!(wait("2").unwrap(), Some(Duration::from_secs(2)));
        assert_eq!(wait("1.5s").unwrap(), Some(Duration::from_millis(1500)));
        for bad in ["0", "0ms", "61s", "-1", "abc", "5m", "NaN", "inf"] {
            assert!(wait(bad).is_err(), "{bad}");
        }
    }
}
