//! `/api/sandbox/{id}` and `/api/sandbox/{id}/secrets`: the sandbox registry.
//!
//! A sandbox is a cgroup (under a configured parent) and optionally a netns, with secrets mounted
//! as env vars, and an `egress` saying where the agent opens its upstream connections:
//! `"sandbox"` (default: inside its own netns, so its routes and firewall apply as without veil)
//! or `"host"` (from the host through the agent's egress rules, for a netns whose only way out
//! is veil). Answers carry placeholders and hosts, never values.
//!
//! Changes are stored first, then pushed to the agents, and answered once they acknowledged:
//! - PUT with `agent.required` and no agent connected: 503, nothing stored.
//! - an agent reports errors: the write is rolled back (the previous record is restored, or the
//!   new one removed), the restored state is pushed, and the answer is a 502 with the agent's
//!   report.
//! - no acknowledgement within `agent.timeout_ms` (or the agent went away): 503, and the change
//!   is KEPT — the store is the truth and agents converge to it (a reconnecting agent reconciles
//!   to its snapshot); retrying the same PUT waits again, DELETE undoes it.
//! - DELETE always removes the record (detaching is always safe); the 204 comes after the
//!   agents acknowledged, else a 502/503 that says the record is gone.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::put;
use axum::{Json, Router};
use serde_json::{Map, Value, json};

use super::{ApiError, AppState, Caller, blocking, json_object, only_fields, opt_string};
use crate::agent_link::{AgentEvent, AgentLinkError};
use crate::api::audit::entry;
use crate::auth::Permission;
use crate::hostcheck::{self, HostCheckError};
use crate::store::{Egress, Mount, SandboxRecord, SecretRecord, StoreError};
use crate::timefmt::{now_ms, rfc3339};
use crate::validate;

/// Routes of this resource.
pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/sandbox/{id}",
            put(put_sandbox).get(get_sandbox).delete(delete_sandbox),
        )
        .route("/sandbox/{id}/secrets", put(put_secrets).get(get_secrets))
}

fn bad(msg: String) -> ApiError {
    ApiError::BadRequest(msg)
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("sandbox {id} not found"))
}

/// Parses `secrets: [{ENV: secret-name}, …]` into (env, secret name) pairs.
fn parse_mount_list(value: Option<Value>) -> Result<Vec<(String, String)>, ApiError> {
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(bad(
                "secrets must be an array of {\"ENV_VAR\": \"secret-name\"} objects".into(),
            ));
        }
    };
    let mut out: Vec<(String, String)> = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let Value::Object(obj) = item else {
            return Err(bad(format!("secrets[{i}] must be an object")));
        };
        if obj.len() != 1 {
            return Err(bad(format!("secrets[{i}] must have exactly one key")));
        }
        let Some((env, name)) = obj.into_iter().next() else {
            return Err(bad(format!("secrets[{i}] must have exactly one key")));
        };
        validate::env_name(&env).map_err(bad)?;
        let Value::String(name) = name else {
            return Err(bad(format!(
                "secrets[{i}].{env} must be a secret name (string)"
            )));
        };
        validate::secret_name(&name).map_err(|e| bad(format!("secrets[{i}].{env}: {e}")))?;
        if out.iter().any(|(e, _)| *e == env) {
            return Err(bad(format!("environment variable {env} is mounted twice")));
        }
        out.push((env, name));
    }
    Ok(out)
}

/// Resolves secret names of `org` into mounts; unknown names are a 400 naming them all.
fn resolve(
    state: &AppState,
    org: &str,
    wanted: &[(String, String)],
) -> Result<Vec<Mount>, ApiError> {
    let mut mounts = Vec::with_capacity(wanted.len());
    let mut unknown = Vec::new();
    for (env, name) in wanted {
        match state
            .store
            .secret_by_name(org, name)
            .map_err(|e| ApiError::from_store(e, "secret"))?
        {
            Some(s) => mounts.push(Mount {
                env: env.clone(),
                secret_id: s.id,
                secret_name: s.name,
            }),
            None => unknown.push(name.as_str()),
        }
    }
    if !unknown.is_empty() {
        return Err(bad(format!("unknown secret(s): {}", unknown.join(", "))));
    }
    Ok(mounts)
}

/// The mounts that still resolve (a deleted secret resolves nothing), with their secrets.
fn live_mounts(
    state: &AppState,
    sb: &SandboxRecord,
) -> Result<Vec<(Mount, SecretRecord)>, ApiError> {
    let mut out = Vec::new();
    for m in &sb.mounts {
        if let Some(s) = state
            .store
            .secret(&sb.org, &m.secret_id)
            .map_err(|e| ApiError::from_store(e, "secret"))?
        {
            out.push((m.clone(), s));
        }
    }
    Ok(out)
}

fn view(state: &AppState, sb: &SandboxRecord) -> Result<Value, ApiError> {
    let live = live_mounts(state, sb)?;
    let ca = state.agent.ca_certificate();
    let env: BTreeMap<&str, &str> = live
        .iter()
        .map(|(m, s)| (m.env.as_str(), s.placeholder.as_str()))
        .collect();
    let secrets: Vec<Value> = sb
        .mounts
        .iter()
        .map(|m| json!({ m.env.clone(): m.secret_name }))
        .collect();
    Ok(json!({
        "id": sb.id,
        "cgroup": sb.cgroup,
        "netns": sb.netns,
        "egress": validate::egress_name(sb.egress),
        "secrets": secrets,
        "env": env,
        "caCert": ca,
        "caCertificate": ca,
        "createdAt": rfc3339(sb.created_at),
        "updatedAt": rfc3339(sb.updated_at),
    }))
}

fn mounts_json(mounts: &[Mount]) -> Value {
    Value::Array(
        mounts
            .iter()
            .map(|m| json!({"env": m.env, "secret": m.secret_name, "secretId": m.secret_id}))
            .collect(),
    )
}

fn require_agent(state: &AppState) -> Result<(), ApiError> {
    if state.config.agent.required && !state.agent.connected() {
        return Err(ApiError::Unavailable(
            "no veil-agent is connected; sandboxes cannot be registered".into(),
        ));
    }
    Ok(())
}

fn host_error(e: HostCheckError) -> ApiError {
    match e {
        HostCheckError::Invalid(m) => ApiError::BadRequest(m),
        HostCheckError::Unavailable(m) => ApiError::Unavailable(m),
    }
}

/// Pushes a stored sandbox write to the agents and turns their answer into the REST outcome
/// (see the module documentation).
async fn settle(
    state: &AppState,
    caller: &Caller,
    written: &SandboxRecord,
    previous: Option<SandboxRecord>,
) -> Result<(), ApiError> {
    let id = &written.id;
    match state
        .agent
        .notify(AgentEvent::SandboxUpserted(written.clone()))
        .await
    {
        Ok(()) => Ok(()),
        Err(AgentLinkError::Rejected(errors)) => {
            let report = errors.join("; ");
            roll_back(state, caller, written, previous, &report).await;
            Err(ApiError::AgentFailed(format!(
                "veil-agent could not enforce sandbox {id}: {report}; the change was rolled back"
            )))
        }
        Err(e @ AgentLinkError::Internal(_)) => {
            roll_back(state, caller, written, previous, "internal error").await;
            Err(ApiError::internal("agent link", e))
        }
        Err(e @ (AgentLinkError::NotConnected | AgentLinkError::NoAck(_))) => {
            if !state.config.agent.required {
                return Ok(());
            }
            tracing::warn!(sandbox = %id, error = %e, "sandbox change not acknowledged; kept");
            Err(ApiError::Unavailable(format!(
                "sandbox {id}: {e}; the change is stored and is enforced as soon as the agent \
                 catches up (retry the request to wait for it, or DELETE the sandbox)"
            )))
        }
    }
}

/// Undoes `written` (unless something changed it since) and pushes the restored state.
async fn roll_back(
    state: &AppState,
    caller: &Caller,
    written: &SandboxRecord,
    previous: Option<SandboxRecord>,
    reason: &str,
) {
    let st = state.clone();
    let audit = entry(
        caller,
        "sandbox.rollback",
        "sandbox",
        &written.id,
        None,
        json!({"reason": {"to": format!("veil-agent: {reason}")}}),
    );
    let (w, p) = (written.clone(), previous.clone());
    let restored = blocking(move || {
        st.store
            .restore_sandbox(&w, p.as_ref(), audit)
            .map_err(|e| ApiError::from_store(e, "sandbox"))
    })
    .await;
    match restored {
        Ok(true) => {
            let event = match previous {
                Some(p) => AgentEvent::SandboxUpserted(p),
                None => AgentEvent::SandboxRemoved {
                    id: written.id.clone(),
                },
            };
            if let Err(e) = state.agent.notify(event).await {
                tracing::warn!(sandbox = %written.id, error = %e, "pushing a rolled-back sandbox");
            }
        }
        Ok(false) => {
            tracing::warn!(sandbox = %written.id, "not rolled back: changed again meanwhile");
        }
        Err(e) => tracing::error!(sandbox = %written.id, error = %e, "rolling back a sandbox"),
    }
}

async fn put_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::WriteSandboxes)?;
    validate::sandbox_id(&id).map_err(bad)?;
    let mut map: Map<String, Value> = json_object(&headers, body)?;
    only_fields(&map, &["cgroup", "netns", "secrets", "egress"])?;
    let cgroup = opt_string(&mut map, "cgroup")?.ok_or_else(|| bad("cgroup is required".into()))?;
    let cgroup = validate::cgroup(&cgroup, &state.config.sandbox.cgroup_parents).map_err(bad)?;
    let netns = opt_string(&mut map, "netns")?;
    if let Some(n) = &netns {
        validate::netns(n).map_err(bad)?;
    }
    // Omitted (or null) = the default, as every other field of this full replacement.
    let egress = match opt_string(&mut map, "egress")? {
        Some(text) => validate::egress(&text).map_err(bad)?,
        None => Egress::default(),
    };
    let wanted = parse_mount_list(map.remove("secrets"))?;
    require_agent(&state)?;
    let st = state.clone();
    let caller2 = caller.clone();
    let (record, previous) = blocking(move || {
        let now = now_ms();
        // Ownership before anything else: another organization's id is a plain 404.
        let previous = st
            .store
            .sandbox(&id)
            .map_err(|e| ApiError::from_store(e, "sandbox"))?;
        let created_at = match &previous {
            Some(old) if old.org != caller2.org => return Err(not_found(&id)),
            Some(old) => old.created_at,
            None => now,
        };
        if st.config.sandbox.check_paths {
            hostcheck::check_sandbox(&cgroup, netns.as_deref()).map_err(host_error)?;
        }
        let mounts = resolve(&st, &caller2.org, &wanted)?;
        let record = SandboxRecord {
            egress,
            id: id.clone(),
            org: caller2.org.clone(),
            cgroup,
            netns,
            mounts,
            created_at,
            updated_at: now,
        };
        let audit = entry(
            &caller2,
            "sandbox.put",
            "sandbox",
            &id,
            None,
            json!({
                "cgroup": {"to": record.cgroup},
                "netns": {"to": record.netns},
                "egress": {"to": validate::egress_name(record.egress)},
                "secrets": {"to": mounts_json(&record.mounts)},
            }),
        );
        st.store.put_sandbox(&record, audit).map_err(|e| match e {
            StoreError::NotFound => not_found(&id),
            e => ApiError::from_store(e, "sandbox"),
        })?;
        Ok((record, previous))
    })
    .await?;
    settle(&state, &caller, &record, previous).await?;
    Ok(Json(view(&state, &record)?))
}

fn owned(state: &AppState, caller: &Caller, id: &str) -> Result<SandboxRecord, ApiError> {
    state
        .store
        .sandbox(id)
        .map_err(|e| ApiError::from_store(e, "sandbox"))?
        .filter(|s| s.org == caller.org)
        .ok_or_else(|| not_found(id))
}

async fn get_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::WriteSandboxes)?;
    let sb = owned(&state, &caller, &id)?;
    Ok(Json(view(&state, &sb)?))
}

async fn delete_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Permission::WriteSandboxes)?;
    let st = state.clone();
    let caller2 = caller.clone();
    let id2 = id.clone();
    blocking(move || {
        let audit = entry(&caller2, "sandbox.delete", "sandbox", &id2, None, json!({}));
        st.store
            .delete_sandbox(&caller2.org, &id2, audit)
            .map_err(|e| match e {
                StoreError::NotFound => not_found(&id2),
                e => ApiError::from_store(e, "sandbox"),
            })
    })
    .await?;
    match state
        .agent
        .notify(AgentEvent::SandboxRemoved { id: id.clone() })
        .await
    {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(AgentLinkError::Rejected(errors)) => Err(ApiError::AgentFailed(format!(
            "sandbox {id} was removed from the registry, but veil-agent reported: {}",
            errors.join("; ")
        ))),
        Err(e @ AgentLinkError::Internal(_)) => Err(ApiError::internal("agent link", e)),
        Err(e) if state.config.agent.required => {
            tracing::warn!(sandbox = %id, error = %e, "sandbox removal not acknowledged");
            Err(ApiError::Unavailable(format!(
                "sandbox {id} was removed from the registry, but {e}; the agent detaches it \
                 as soon as it catches up"
            )))
        }
        Err(_) => Ok(StatusCode::NO_CONTENT),
    }
}

async fn put_secrets(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::WriteSandboxes)?;
    let mut map = json_object(&headers, body)?;
    only_fields(&map, &["secrets"])?;
    if !map.contains_key("secrets") {
        return Err(bad("secrets is required ([] detaches all)".into()));
    }
    let wanted = parse_mount_list(map.remove("secrets"))?;
    require_agent(&state)?;
    let st = state.clone();
    let caller2 = caller.clone();
    let id2 = id.clone();
    let (record, previous) = blocking(move || {
        owned(&st, &caller2, &id2)?;
        let mounts = resolve(&st, &caller2.org, &wanted)?;
        let mut before = None;
        let mut change = |old: &SandboxRecord| {
            before = Some(old.clone());
            let mut new = old.clone();
            new.mounts = mounts.clone();
            new.updated_at = now_ms();
            let audit = entry(
                &caller2,
                "sandbox.secrets",
                "sandbox",
                &old.id,
                None,
                json!({"secrets": {"from": mounts_json(&old.mounts), "to": mounts_json(&new.mounts)}}),
            );
            Ok((new, audit))
        };
        let record = st
            .store
            .update_sandbox(&caller2.org, &id2, &mut change)
            .map_err(|e| match e {
                StoreError::NotFound => not_found(&id2),
                e => ApiError::from_store(e, "sandbox"),
            })?;
        Ok((record, before))
    })
    .await?;
    settle(&state, &caller, &record, previous).await?;
    Ok(Json(view(&state, &record)?))
}

async fn get_secrets(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::WriteSandboxes)?;
    let sb = owned(&state, &caller, &id)?;
    let live = live_mounts(&state, &sb)?;
    Ok(Json(Value::Array(
        live.iter()
            .map(|(m, s)| {
                json!({
                    "env": m.env,
                    "placeholder": s.placeholder,
                    "hosts": s.hosts,
                    "secretId": s.id,
                    "name": s.name,
                })
            })
            .collect(),
    )))
}
