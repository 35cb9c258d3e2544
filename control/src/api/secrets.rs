//! `/api/secret…`: create, list, paginate, get, update, delete. No route returns a value.

mod input;
mod view;

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use veil_api::{CreateSecret, Secret, SecretDetail, SecretPage, UpdateSecret, UpdateSecretQuery};

use super::body::decode;
use super::error::{ApiError, Unconfirmed};
use super::state::{AppState, Caller, Route, blocking, parse_limit, query, with_state};
use crate::agent_link::{AgentEvent, AgentLinkError};
use crate::api::audit::entry;
use crate::auth::Permission;
use crate::crypto::RecordBinding;
use crate::grace;
use crate::paginate::{Cursor, Order, SortField, SortValue};
use crate::store::{Revision, SecretId, SecretPageQuery, SecretRecord, StoreError};
use crate::timefmt::now_ms;
use crate::validate;
use input::{bad, new_placeholder, parse_description};
pub use input::{new_uuid, parse_hosts, parse_wait};
pub use view::{detail, view};
use view::{wrong_host_name, wrong_host_record};

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("secret {id} not found"))
}

/// A secret id from a path: one that cannot exist is not found, as an unknown one.
fn path_id(text: &str) -> Result<SecretId, ApiError> {
    SecretId::parse(text).map_err(|_| not_found(text))
}

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
    validate::secret_value(value.expose())?;
    let description = parse_description(description)?;
    let hosts = parse_hosts(hosts.unwrap_or_default())?;
    let body_substitution = body_substitution.unwrap_or(false);
    let wrong_host = wrong_host_record(wrong_host.unwrap_or_default());
    let now = now_ms();
    // A UUID always passes the rule; a failure here would be a bug, answered as one.
    let id = SecretId::parse(new_uuid()).map_err(|e| ApiError::internal("secret id", e))?;
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
                    revision: Revision(1),
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
            revision: Revision(1),
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
async fn push_secret(state: &AppState, id: &SecretId) {
    let event = AgentEvent::SecretChanged { id: id.clone() };
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
    Ok(Json(all.iter().map(view).collect()))
}

fn sort_value(s: &SecretRecord, field: SortField) -> (SortValue, String) {
    let v = match field {
        SortField::Name => SortValue::Text(s.name.clone()),
        SortField::CreatedAt => SortValue::Time(s.created_at),
        SortField::UpdatedAt => SortValue::Time(s.updated_at),
    };
    (v, s.id.to_string())
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
        items: page.items.iter().map(view).collect(),
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
    let id = path_id(&id)?;
    let s = read_secret(&state, &caller, &id).await?;
    detail_of(&state, s).await.map(Json)
}

/// A secret of the caller's organization; a 404 when there is none.
async fn read_secret(
    state: &AppState,
    caller: &Caller,
    id: &SecretId,
) -> Result<SecretRecord, ApiError> {
    let (org, id) = (caller.org.clone(), id.clone());
    with_state(state, move |st| {
        st.store
            .secret(&org, &id)
            .map_err(|e| ApiError::from_store(e, "secret"))?
            .ok_or_else(|| not_found(id.as_str()))
    })
    .await
}

/// The detail view: the record with its usage (read from the store) and propagation.
async fn detail_of(state: &AppState, s: SecretRecord) -> Result<SecretDetail, ApiError> {
    with_state(state, move |st| detail_now(st, &s)).await
}

fn detail_now(state: &AppState, s: &SecretRecord) -> Result<SecretDetail, ApiError> {
    let usage = state
        .store
        .secret_usage(&s.id)
        .map_err(|e| ApiError::from_store(e, "secret"))?;
    Ok(detail(s, &state.agent.propagation(&s.id), &usage))
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
        validate::secret_value(v.expose())?;
    }
    let description = parse_description(description)?;
    let hosts = hosts.map(parse_hosts).transpose()?;
    let wrong_host = wrong_host.map(wrong_host_record);
    let id = path_id(&id)?;
    if nothing {
        // Nothing to change: answer like a GET, without a write or an audit entry (with
        // `wait`, once the agents hold the current revision).
        let s = read_secret(&state, &caller, &id).await?;
        if let Some(wait) = wait {
            wait_for_agents(&state, &id, s.revision, wait).await?;
        }
        return detail_of(&state, s).await.map(Json);
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
                new.revision = old.revision.next();
                let seal_err = StoreError::Seal;
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
                            .map_err(StoreError::Open)?;
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
                StoreError::NotFound => not_found(id2.as_str()),
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
    detail_of(&state, record).await.map(Json)
}

/// Waits until no agent may still use a revision older than `revision`; a 504 that says the
/// change is stored when they do not acknowledge in time, a 502 when one reported a failure.
async fn wait_for_agents(
    state: &AppState,
    id: &SecretId,
    revision: Revision,
    wait: Duration,
) -> Result<(), ApiError> {
    let Err(e) = state.agent.wait_acked(id, revision, wait).await else {
        return Ok(());
    };
    let required = state.config.agent.required;
    match ApiError::from_agent(e, Unconfirmed::SecretWait { id, revision }, required) {
        Some(answer) => Err(answer),
        None => Ok(()),
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
    let id = path_id(&id)?;
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
                StoreError::NotFound => not_found(id2.as_str()),
                e => ApiError::from_store(e, "secret"),
            })
    })
    .await?;
    push_secret(&state, &id).await;
    Ok(StatusCode::NO_CONTENT)
}
