//! `/api/secret…`: create, list, paginate, get, update, delete. No route returns a value.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use rand::RngCore;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use veil_api::{
    AgentAck, CreateSecret, HostUsage, Revision, Secret, SecretDetail, SecretId, SecretPage,
    UpdateSecret, UpdateSecretQuery,
};

use super::body::decode;
use super::routes::Route;
use super::{ApiError, AppState, Caller, blocking, parse_limit, query};
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
pub fn routes() -> Vec<Route> {
    vec![
        Route::new(Method::POST, "/secret", create),
        Route::new(Method::GET, "/secret", list),
        Route::new(Method::GET, "/secret/paginated", paginated),
        Route::new(Method::GET, "/secret/{id}", get_one),
        Route::new(Method::PATCH, "/secret/{id}", update),
        Route::new(Method::DELETE, "/secret/{id}", remove),
    ]
}

/// Longest `?wait=` a PATCH accepts.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// The public view of a secret: metadata only (Daytona's fields, then veil's extra ones).
pub fn view(s: &SecretRecord) -> Result<Secret, ApiError> {
    Ok(Secret {
        id: SecretId::parse(s.id.clone()).map_err(|e| ApiError::internal("stored secret", e))?,
        name: s.name.clone(),
        description: s.description.clone(),
        placeholder: s.placeholder.clone(),
        hosts: s.hosts.clone(),
        created_at: rfc3339(s.created_at),
        updated_at: rfc3339(s.updated_at),
        revision: Revision(s.revision),
        body_substitution: s.body_substitution,
        wrong_host: wrong_host_view(s.wrong_host),
    })
}

/// The single-secret view (GET, PATCH): [`view`] plus what the agents acknowledged and what
/// they reported about its use.
pub fn detail(
    s: &SecretRecord,
    propagation: &Propagation,
    usage: &SecretUsage,
) -> Result<SecretDetail, ApiError> {
    let agents = propagation
        .agents
        .iter()
        .map(|a| AgentAck {
            agent_id: a.agent_id.to_string(),
            connected: a.connected,
            acknowledged_revision: a.revision.map(Revision),
            acknowledged_at: a.at.map(rfc3339),
        })
        .collect();
    let hosts = usage
        .hosts
        .iter()
        .map(|(host, u)| {
            let counts = HostUsage {
                substituted: u.counts.substituted,
                wrong_host: u.counts.wrong_host,
                host_mismatch: u.counts.host_mismatch,
                blocked: u.counts.blocked,
                last_used_at: u.last_used_at.map(rfc3339),
                last_seen_at: u.last_seen_at.map(rfc3339),
            };
            (host.clone(), counts)
        })
        .collect();
    Ok(SecretDetail {
        secret: view(s)?,
        propagation: veil_api::Propagation {
            complete: propagation.pending(s.revision).is_empty(),
            agents,
        },
        last_used_at: usage.last_used_at.map(rfc3339),
        usage: hosts,
    })
}

fn wrong_host_view(w: WrongHost) -> veil_api::WrongHost {
    match w {
        WrongHost::Forward => veil_api::WrongHost::Forward,
        WrongHost::Block => veil_api::WrongHost::Block,
    }
}

fn wrong_host_record(w: veil_api::WrongHost) -> WrongHost {
    match w {
        veil_api::WrongHost::Forward => WrongHost::Forward,
        veil_api::WrongHost::Block => WrongHost::Block,
    }
}

fn wrong_host_name(w: WrongHost) -> &'static str {
    match w {
        WrongHost::Forward => "forward",
        WrongHost::Block => "block",
    }
}

/// `?wait=` of a PATCH: `500ms`, `5s` or plain seconds, 1 ms to [`MAX_WAIT`].
pub fn parse_wait(wait: Option<&str>) -> Result<Option<Duration>, ApiError> {
    let Some(raw) = wait.map(str::trim).filter(|w| !w.is_empty()) else {
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

#[utoipa::path(
    post,
    path = "/secret",
    operation_id = "createSecret",
    summary = "Create a secret (manage:secrets)",
    request_body = CreateSecret,
    responses(
        (status = 201, description = "Created", body = Secret),
        (status = 409, description = "A secret with this name exists in the organization", body = veil_api::ErrorBody),
        (status = 415, description = "Not JSON", body = veil_api::ErrorBody),
    )
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Secret>), ApiError> {
    caller.require(Permission::ManageSecrets)?;
    let CreateSecret {
        name,
        value,
        description,
        hosts,
        body_substitution,
        wrong_host,
    } = decode(&headers, body)?;
    validate::secret_name(&name).map_err(bad)?;
    validate::secret_value(value.expose()).map_err(bad)?;
    let description = parse_description(description)?;
    let hosts = parse_hosts(hosts.unwrap_or_default())?;
    let body_substitution = body_substitution.unwrap_or(false);
    let wrong_host = wrong_host_record(wrong_host.unwrap_or_default());
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
                value.expose().as_bytes(),
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
    Ok((StatusCode::CREATED, Json(view(&record)?)))
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

#[utoipa::path(
    get,
    path = "/secret",
    operation_id = "listSecrets",
    summary = "List all secrets (manage:secrets)",
    responses((status = 200, description = "Secrets", body = Vec<Secret>))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Secret>>, ApiError> {
    caller.require(Permission::ManageSecrets)?;
    let mut all = blocking(move || {
        state
            .store
            .list_secrets(&caller.org)
            .map_err(|e| ApiError::from_store(e, "secret"))
    })
    .await?;
    all.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
    all.iter().map(view).collect::<Result<_, _>>().map(Json)
}

fn sort_value(s: &SecretRecord, field: SortField) -> (SortValue, String) {
    let v = match field {
        SortField::Name => SortValue::Text(s.name.clone()),
        SortField::CreatedAt => SortValue::Time(s.created_at),
        SortField::UpdatedAt => SortValue::Time(s.updated_at),
    };
    (v, s.id.clone())
}

#[utoipa::path(
    get,
    path = "/secret/paginated",
    operation_id = "listSecretsPaginated",
    summary = "List secrets a page at a time (manage:secrets)",
    params(veil_api::SecretPageQuery),
    responses((status = 200, description = "A page", body = SecretPage))
)]
pub(crate) async fn paginated(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<veil_api::SecretPageQuery>, QueryRejection>,
) -> Result<Json<SecretPage>, ApiError> {
    caller.require(Permission::ManageSecrets)?;
    let q = query(q)?;
    let limit = parse_limit(q.limit.as_deref())?;
    let cursor = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(Cursor::decode(c).map_err(bad)?),
    };
    let sort = match q.sort.as_deref() {
        None | Some("") => cursor.as_ref().map_or(SortField::CreatedAt, |c| c.s),
        Some(s) => SortField::parse(s).map_err(bad)?,
    };
    let order = match q.order.as_deref() {
        None | Some("") => cursor.as_ref().map_or(Order::Desc, |c| c.o),
        Some(o) => Order::parse(o).map_err(bad)?,
    };
    if let Some(c) = &cursor
        && (c.s != sort || c.o != order)
    {
        return Err(bad("cursor was issued for a different sort or order".into()));
    }
    let filter = q.name.filter(|n| !n.is_empty()).map(|n| n.to_lowercase());
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
    Ok(Json(SecretPage {
        items: page.items.iter().map(view).collect::<Result<_, _>>()?,
        total: page.total as u64,
        next_cursor: next,
    }))
}

#[utoipa::path(
    get,
    path = "/secret/{secretId}",
    operation_id = "getSecret",
    summary = "Get a secret (manage:secrets)",
    description = "Beyond the list view: propagation (which revision each veil-agent acknowledged, and when) and usage (agent-reported placeholder counts per host, lastUsedAt).",
    params(("secretId" = String, Path, description = "The secret's id")),
    responses(
        (status = 200, description = "The secret", body = SecretDetail),
        (status = 404, description = "No such secret in the organization", body = veil_api::ErrorBody),
    )
)]
pub(crate) async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<SecretDetail>, ApiError> {
    caller.require(Permission::ManageSecrets)?;
    let s = state
        .store
        .secret(&caller.org, &id)
        .map_err(|e| ApiError::from_store(e, "secret"))?
        .ok_or_else(|| ApiError::NotFound(format!("secret {id} not found")))?;
    detail_of(&state, &s).map(Json)
}

fn detail_of(state: &AppState, s: &SecretRecord) -> Result<SecretDetail, ApiError> {
    let usage = state
        .store
        .secret_usage(&s.id)
        .map_err(|e| ApiError::from_store(e, "secret"))?;
    detail(s, &state.agent.propagation(&s.id), &usage)
}

#[utoipa::path(
    patch,
    path = "/secret/{secretId}",
    operation_id = "updateSecret",
    summary = "Update a secret; omitted or null fields are unchanged, hosts [] makes it unrestricted (manage:secrets)",
    description = "Every change bumps revision and is pushed to the veil-agents at once. Without wait the answer comes after the push (bounded by agent.timeout_ms) and is 200 even if an agent did not acknowledge; with wait it is 200 only once no agent may still use an older revision (propagation.complete), else 504 — the change is stored either way and agents converge when they reconnect. Once an agent acknowledged, every request it sends upstream carries the new value.",
    params(("secretId" = String, Path, description = "The secret's id"), UpdateSecretQuery),
    request_body = UpdateSecret,
    responses(
        (status = 200, description = "Updated (with wait: and acknowledged by every agent)", body = SecretDetail),
        (status = 404, description = "No such secret in the organization", body = veil_api::ErrorBody),
        (status = 415, description = "Not JSON", body = veil_api::ErrorBody),
        (status = 502, description = "wait: an agent reported it could not apply the change (stored anyway)", body = veil_api::ErrorBody),
        (status = 504, description = "wait: not every agent acknowledged in time; the message names them; the change is stored", body = veil_api::ErrorBody),
    )
)]
pub(crate) async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    q: Result<Query<UpdateSecretQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<SecretDetail>, ApiError> {
    caller.require(Permission::ManageSecrets)?;
    let wait = parse_wait(query(q)?.wait.as_deref())?;
    let req: UpdateSecret = decode(&headers, body)?;
    let nothing = req.is_empty();
    let UpdateSecret {
        value,
        description,
        hosts,
        body_substitution,
        wrong_host,
    } = req;
    if let Some(v) = &value {
        validate::secret_value(v.expose()).map_err(bad)?;
    }
    let description = parse_description(description)?;
    let hosts = hosts.map(parse_hosts).transpose()?;
    let wrong_host = wrong_host.map(wrong_host_record);
    if nothing {
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
                        stored.is_ok_and(|s| bool::from(s.as_slice().ct_eq(v.expose().as_bytes())))
                    }),
                    None => grace::previous_kept(old, now, grace),
                };
                new.sealed = match &value {
                    Some(v) => ring
                        .seal(binding, v.expose().as_bytes())
                        .map_err(seal_err)?,
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

#[utoipa::path(
    delete,
    path = "/secret/{secretId}",
    operation_id = "deleteSecret",
    summary = "Delete a secret (manage:secrets)",
    params(("secretId" = String, Path, description = "The secret's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such secret in the organization", body = veil_api::ErrorBody),
    )
)]
pub(crate) async fn remove(
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
        parse_wait(Some(v))
    }

    #[test]
    fn wait_parses_durations_within_bounds() {
        assert_eq!(wait("").unwrap(), None);
        assert_eq!(parse_wait(None).unwrap(), None);
        assert_eq!(wait("500ms").unwrap(), Some(Duration::from_millis(500)));
        assert_eq!(wait("5s").unwrap(), Some(Duration::from_secs(5)));
        assert_eq!(wait("2").unwrap(), Some(Duration::from_secs(2)));
        assert_eq!(wait("1.5s").unwrap(), Some(Duration::from_millis(1500)));
        for bad in ["0", "0ms", "61s", "-1", "abc", "5m", "NaN", "inf"] {
            assert!(wait(bad).is_err(), "{bad}");
        }
    }
}
