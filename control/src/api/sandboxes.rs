//! `/api/sandbox/{id}` and `/api/sandbox/{id}/secrets`: the sandbox registry.
//!
//! A sandbox is a cgroup (under a configured parent) and optionally a netns, with secrets mounted
//! as env vars, and an `egress` saying where the agent opens its upstream connections:
//! `"sandbox"` (default: inside its own netns, so its routes and firewall apply as without veil)
//! or `"host"` (from the host through the agent's egress rules, for a netns whose only way out
//! is veil). Answers carry placeholders and hosts, never values.
//!
//! A PUT without `cgroup` (or a POST, under a generated id) only declares a sandbox (see
//! [`super::declaration`]): nothing of it reaches an agent until veil-agent binds it on the host
//! (see [`super::binding`]). Such a PUT on a bound sandbox keeps its binding and changes its
//! secrets, egress and keep; DELETE removes a declared or bound sandbox alike.
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

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use serde_json::json;
use veil_api::{
    DeclareSandbox, MountList, MountedSecret, PutSandbox, PutSandboxSecrets, Sandbox, SandboxId,
};

use super::body::decode;
use super::declaration::{
    Declaration, generated_id, mounts_json, parse_mount_list, resolve, store_put,
};
use super::error::{ApiError, Unconfirmed};
use super::state::{AppState, Caller, Route, blocking, with_state};
use crate::agent_link::{AgentEvent, AgentLinkError};
use crate::api::audit::entry;
use crate::auth::Permission;
use crate::hostcheck;
use crate::store::{Mount, SandboxRecord, SecretRecord, StoreError};
use crate::timefmt::{now_ms, rfc3339};
use crate::validate;

/// Routes of this resource.
pub fn routes() -> Vec<Route> {
    vec![
        Route::new(Method::POST, "/sandbox", declare_sandbox),
        Route::new(Method::PUT, "/sandbox/{id}", put_sandbox),
        Route::new(Method::GET, "/sandbox/{id}", get_sandbox),
        Route::new(Method::DELETE, "/sandbox/{id}", delete_sandbox),
        Route::new(Method::PUT, "/sandbox/{id}/secrets", put_secrets),
        Route::new(Method::GET, "/sandbox/{id}/secrets", get_secrets),
    ]
}

fn bad(msg: String) -> ApiError {
    ApiError::BadRequest(msg)
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("sandbox {id} not found"))
}

/// A sandbox id from a path: one that cannot exist is not found, as an unknown one.
fn path_id(text: &str) -> Result<SandboxId, ApiError> {
    SandboxId::parse(text).map_err(|_| not_found(text))
}

/// The mounts that still resolve (a deleted secret resolves nothing), with their secrets.
pub(crate) fn live_mounts(
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

pub(crate) fn view(state: &AppState, sb: &SandboxRecord) -> Result<Sandbox, ApiError> {
    let live = live_mounts(state, sb)?;
    let ca = match &sb.host {
        Some(host) => crate::fleet::placement::host_ca(state.store.as_ref(), host)?,
        None => state.agent.ca_certificate(),
    };
    let env: BTreeMap<String, String> = live
        .iter()
        .map(|(m, s)| (m.env.clone(), s.placeholder.clone()))
        .collect();
    let secrets: MountList = sb
        .mounts
        .iter()
        .map(|m| BTreeMap::from([(m.env.clone(), m.secret_name.clone())]))
        .collect();
    Ok(Sandbox {
        id: sb.id.clone(),
        cgroup: sb.cgroup.clone(),
        netns: sb.netns.clone(),
        bound: sb.bound,
        keep: sb.keep,
        egress: sb.egress,
        secrets,
        env,
        ca_cert: ca.clone(),
        ca_certificate: ca,
        created_at: rfc3339(sb.created_at),
        updated_at: rfc3339(sb.updated_at),
        host: sb.host.clone(),
    })
}

fn require_agent(state: &AppState) -> Result<(), ApiError> {
    if state.config.agent.required && !state.agent.connected() {
        return Err(ApiError::Unavailable(
            "no veil-agent is connected; sandboxes cannot be registered".into(),
        ));
    }
    Ok(())
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
    let required = state.config.agent.required;
    let Err(e) = state
        .agent
        .notify(AgentEvent::SandboxUpserted(written.clone()))
        .await
    else {
        return Ok(());
    };
    match &e {
        AgentLinkError::Rejected(errors) => {
            roll_back(state, caller, written, previous, &errors.join("; ")).await;
        }
        AgentLinkError::Internal(_) => {
            roll_back(state, caller, written, previous, "internal error").await;
        }
        // A fleet host's agent may be on another replica, which delivers it from the store.
        AgentLinkError::NotConnected if written.host.is_some() => return Ok(()),
        AgentLinkError::NotConnected | AgentLinkError::NoAck(_) if required => {
            tracing::warn!(sandbox = %id, error = %e, "sandbox change not acknowledged; kept");
        }
        AgentLinkError::NotConnected | AgentLinkError::NoAck(_) => {}
    }
    match ApiError::from_agent(e, Unconfirmed::SandboxPut { id }, required) {
        Some(answer) => Err(answer),
        None => Ok(()),
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

#[utoipa::path(
    put,
    path = "/sandbox/{sandboxId}",
    operation_id = "putSandbox",
    summary = "Register or replace a sandbox; without cgroup, declare it (write:sandboxes)",
    description = "With cgroup: declared and bound in one step; answers once every connected veil-agent acknowledged that the sandbox is enforced (programs attached, listener open). 400 also when the cgroup directory or netns file does not exist on the host (sandbox.check_paths). Without cgroup: only declared (secrets, egress, keep); nothing reaches an agent until veil-agent binds it on the host (its local socket); on a bound sandbox the binding is kept and secrets, egress and keep change. The answer carries env (ENV → placeholder) and caCertificate.",
    params(("sandboxId" = String, Path, description = "The sandbox's id: 1-128 characters of A-Z a-z 0-9 _ . -, starting with a letter or digit")),
    request_body = PutSandbox,
    responses(
        (status = 200, description = "Registered and enforced (or declared); env holds placeholders", body = Sandbox),
        (status = 404, description = "The id belongs to another organization", body = veil_api::ErrorBody),
        (status = 409, description = "The cgroup is registered to another sandbox", body = veil_api::ErrorBody),
        (status = 502, description = "A veil-agent could not enforce the sandbox; the message carries its report and the change was rolled back", body = veil_api::ErrorBody),
        (status = 503, description = "agent.required is set and no agent is connected (nothing stored), or no agent acknowledged within agent.timeout_ms (the registration is kept and enforced when the agent catches up; retry to wait)", body = veil_api::ErrorBody),
    )
)]
pub(crate) async fn put_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Sandbox>, ApiError> {
    caller.require(Permission::WriteSandboxes)?;
    let id = SandboxId::parse(id).map_err(|e| bad(e.to_string()))?;
    let PutSandbox {
        cgroup,
        keep,
        netns,
        secrets,
        egress,
        host,
    } = decode(&headers, body)?;
    let placement = match cgroup {
        Some(cgroup) => {
            let cgroup = validate::cgroup(&cgroup, &state.config.sandbox.cgroup_parents)?;
            if let Some(n) = &netns {
                validate::netns(n)?;
            }
            Some((cgroup, netns))
        }
        None if netns.is_some() => {
            return Err(bad(
                "netns needs a cgroup: a declared sandbox gets its netns when it is bound".into(),
            ));
        }
        None => None,
    };
    let declared = Declaration::parse(secrets, egress, keep, host)?;
    // A fleet host's agent is looked for on every replica (checked with the record below).
    if placement.is_some() && declared.host().is_none() {
        require_agent(&state)?;
    }
    let st = state.clone();
    let caller2 = caller.clone();
    let (record, previous) = blocking(move || {
        let previous = st
            .store
            .sandbox(&id)
            .map_err(|e| ApiError::from_store(e, "sandbox"))?;
        if matches!(&previous, Some(old) if old.org != caller2.org) {
            // Ownership before anything else: another organization's id is a plain 404.
            return Err(not_found(id.as_str()));
        }
        let was_bound = previous.as_ref().is_some_and(|p| p.bound);
        if placement.is_none() && was_bound && declared.host().is_none() {
            require_agent(&st)?;
        }
        // A fleet host's sandbox, declared or bound, needs an agent of that host somewhere:
        // its answer carries that agent's CA, and only that agent can ever bind it.
        crate::fleet::placement::check(
            st.store.as_ref(),
            declared.host(),
            previous.as_ref(),
            st.config.agent.required,
        )?;
        // Another host's paths are checked by its agent, not here.
        if let Some((cgroup, netns)) = &placement
            && st.config.sandbox.check_paths
            && declared.host().is_none()
        {
            hostcheck::check_sandbox(cgroup, netns.as_deref())?;
        }
        let record = declared.record(&st, &caller2, &id, previous.as_ref(), placement)?;
        store_put(&st, &caller2, &record)?;
        Ok((record, previous))
    })
    .await?;
    if record.bound || previous.as_ref().is_some_and(|p| p.bound) {
        settle(&state, &caller, &record, previous).await?;
    }
    with_state(&state, move |st| view(st, &record))
        .await
        .map(Json)
}

#[utoipa::path(
    post,
    path = "/sandbox",
    operation_id = "declareSandbox",
    summary = "Declare a sandbox under a generated id (write:sandboxes)",
    description = "Declares a sandbox (secrets, egress, keep) under a 128-bit random id (a UUIDv4). Nothing reaches an agent until veil-agent binds the sandbox on the host through its local socket (the container runtime's hook passes the id). The answer is the same as PUT's, with the id.",
    request_body = DeclareSandbox,
    responses(
        (status = 201, description = "Declared; env holds placeholders", body = Sandbox),
        (status = 400, description = "A field is not acceptable", body = veil_api::ErrorBody),
    )
)]
pub(crate) async fn declare_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Sandbox>), ApiError> {
    caller.require(Permission::WriteSandboxes)?;
    let DeclareSandbox {
        secrets,
        egress,
        keep,
        host,
    } = decode(&headers, body)?;
    let declared = Declaration::parse(secrets, egress, keep, host)?;
    let st = state.clone();
    let record = blocking(move || {
        let id = generated_id();
        crate::fleet::placement::check(
            st.store.as_ref(),
            declared.host(),
            None,
            st.config.agent.required,
        )?;
        let record = declared.record(&st, &caller, &id, None, None)?;
        store_put(&st, &caller, &record)?;
        Ok(record)
    })
    .await?;
    let sandbox = with_state(&state, move |st| view(st, &record)).await?;
    Ok((StatusCode::CREATED, Json(sandbox)))
}

fn owned(state: &AppState, caller: &Caller, id: &SandboxId) -> Result<SandboxRecord, ApiError> {
    state
        .store
        .sandbox(id)
        .map_err(|e| ApiError::from_store(e, "sandbox"))?
        .filter(|s| s.org == caller.org)
        .ok_or_else(|| not_found(id.as_str()))
}

#[utoipa::path(
    get,
    path = "/sandbox/{sandboxId}",
    operation_id = "getSandbox",
    summary = "Get a sandbox (write:sandboxes)",
    params(("sandboxId" = String, Path, description = "The sandbox's id")),
    responses(
        (status = 200, description = "The sandbox", body = Sandbox),
        (status = 404, description = "No such sandbox in the organization", body = veil_api::ErrorBody),
    )
)]
pub(crate) async fn get_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Sandbox>, ApiError> {
    caller.require(Permission::WriteSandboxes)?;
    let id = path_id(&id)?;
    with_state(&state, move |st| view(st, &owned(st, &caller, &id)?))
        .await
        .map(Json)
}

#[utoipa::path(
    delete,
    path = "/sandbox/{sandboxId}",
    operation_id = "deleteSandbox",
    summary = "Remove a sandbox (write:sandboxes)",
    description = "Removes the record, then answers once the agents acknowledged detaching everything for the sandbox.",
    params(("sandboxId" = String, Path, description = "The sandbox's id")),
    responses(
        (status = 204, description = "Removed and detached"),
        (status = 404, description = "No such sandbox in the organization", body = veil_api::ErrorBody),
        (status = 502, description = "Removed from the registry; a veil-agent reported a failure while detaching", body = veil_api::ErrorBody),
        (status = 503, description = "Removed from the registry; no agent acknowledged the detach in time (it detaches when it catches up)", body = veil_api::ErrorBody),
    )
)]
pub(crate) async fn delete_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Permission::WriteSandboxes)?;
    let id = path_id(&id)?;
    let st = state.clone();
    let caller2 = caller.clone();
    let id2 = id.clone();
    let (was_bound, host) = blocking(move || {
        let current = owned(&st, &caller2, &id2)?;
        let audit = entry(&caller2, "sandbox.delete", "sandbox", &id2, None, json!({}));
        st.store
            .delete_sandbox(&caller2.org, &id2, audit)
            .map_err(|e| match e {
                StoreError::NotFound => not_found(id2.as_str()),
                e => ApiError::from_store(e, "sandbox"),
            })?;
        Ok((current.bound, current.host))
    })
    .await?;
    if !was_bound {
        // Nothing of it ever reached an agent.
        return Ok(StatusCode::NO_CONTENT);
    }
    let required = state.config.agent.required;
    let Err(e) = state
        .agent
        .notify(AgentEvent::SandboxRemoved { id: id.clone() })
        .await
    else {
        return Ok(StatusCode::NO_CONTENT);
    };
    // A fleet host's agent may be on another replica, which delivers the removal from the store.
    if host.is_some() && matches!(e, AgentLinkError::NotConnected) {
        return Ok(StatusCode::NO_CONTENT);
    }
    if required && matches!(e, AgentLinkError::NotConnected | AgentLinkError::NoAck(_)) {
        tracing::warn!(sandbox = %id, error = %e, "sandbox removal not acknowledged");
    }
    match ApiError::from_agent(e, Unconfirmed::SandboxDelete { id: &id }, required) {
        Some(answer) => Err(answer),
        None => Ok(StatusCode::NO_CONTENT),
    }
}

#[utoipa::path(
    put,
    path = "/sandbox/{sandboxId}/secrets",
    operation_id = "putSandboxSecrets",
    summary = "Replace the mounted secrets; [] detaches all (write:sandboxes)",
    params(("sandboxId" = String, Path, description = "The sandbox's id")),
    request_body = PutSandboxSecrets,
    responses(
        (status = 200, description = "The sandbox, with the new mounts enforced", body = Sandbox),
        (status = 404, description = "No such sandbox in the organization", body = veil_api::ErrorBody),
        (status = 502, description = "A veil-agent could not apply the mounts; rolled back", body = veil_api::ErrorBody),
        (status = 503, description = "No agent connected (nothing changed) or none acknowledged in time (kept)", body = veil_api::ErrorBody),
    )
)]
pub(crate) async fn put_secrets(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Sandbox>, ApiError> {
    caller.require(Permission::WriteSandboxes)?;
    let PutSandboxSecrets { secrets } = decode(&headers, body)?;
    let wanted = parse_mount_list(secrets)?;
    let id2 = path_id(&id)?;
    let st = state.clone();
    let caller2 = caller.clone();
    let (record, previous) = blocking(move || {
        let current = owned(&st, &caller2, &id2)?;
        match &current.host {
            None if current.bound => require_agent(&st)?,
            None => {}
            host => crate::fleet::placement::check(
                st.store.as_ref(),
                host.as_deref(),
                Some(&current),
                st.config.agent.required && current.bound,
            )?,
        }
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
                StoreError::NotFound => not_found(id2.as_str()),
                e => ApiError::from_store(e, "sandbox"),
            })?;
        Ok((record, before))
    })
    .await?;
    if record.bound {
        settle(&state, &caller, &record, previous).await?;
    }
    with_state(&state, move |st| view(st, &record))
        .await
        .map(Json)
}

#[utoipa::path(
    get,
    path = "/sandbox/{sandboxId}/secrets",
    operation_id = "getSandboxSecrets",
    summary = "Mounted secrets: env, placeholder, hosts — never a value (write:sandboxes)",
    params(("sandboxId" = String, Path, description = "The sandbox's id")),
    responses(
        (status = 200, description = "Mounted secrets", body = Vec<MountedSecret>),
        (status = 404, description = "No such sandbox in the organization", body = veil_api::ErrorBody),
    )
)]
pub(crate) async fn get_secrets(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<MountedSecret>>, ApiError> {
    caller.require(Permission::WriteSandboxes)?;
    let id = path_id(&id)?;
    let live = with_state(&state, move |st| live_mounts(st, &owned(st, &caller, &id)?)).await?;
    Ok(Json(
        live.iter()
            .map(|(m, s)| MountedSecret {
                env: m.env.clone(),
                placeholder: s.placeholder.clone(),
                hosts: s.hosts.clone(),
                secret_id: s.id.clone(),
                name: s.name.clone(),
            })
            .collect(),
    ))
}
