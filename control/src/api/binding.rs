//! Agents' requests about declared sandboxes (their local socket's Describe, Bind, Unbind, and
//! their reports of a cgroup that is gone): decided by [`crate::bind_rules`], stored with
//! compare-and-swap so a concurrent change is never overwritten, delivered to the agents like a
//! PUT or DELETE, audited with the agent as actor.
//!
//! A bind is answered once every agent acknowledged the sandbox (the requesting agent's
//! redirect is live); if the agents refuse it, or none acknowledges in time, it is rolled back
//! to the declaration and refused.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use serde_json::json;
use veil_link::{Declared, LocalResponse, RefusalKind, SandboxId};

use super::audit::entry;
use super::sandboxes::view;
use super::state::{AppState, Caller};
use crate::agent_link::{AgentEvent, AgentLinkError, AgentRequest, Binder, BinderFuture};
use crate::bind_rules::{self, Refusal, Requester};
use crate::hostcheck;
use crate::store::{Conflict, SandboxRecord, StoreError};
use crate::timefmt::now_ms;
use crate::validate;

/// The [`Binder`] of a running control.
#[derive(Clone, Debug)]
pub struct Bindings {
    state: AppState,
}

impl Bindings {
    /// Decides agents' requests against `state`.
    pub fn new(state: AppState) -> Arc<Self> {
        Arc::new(Self { state })
    }
}

impl Binder for Bindings {
    fn handle(&self, agent: Requester, request: AgentRequest) -> BinderFuture<'_> {
        Box::pin(async move {
            let answer = match request {
                AgentRequest::Describe { sandbox } => self.describe(&agent, sandbox).await,
                AgentRequest::Bind {
                    sandbox,
                    cgroup,
                    cgroup_id,
                    netns,
                } => self.bind(&agent, sandbox, cgroup, cgroup_id, netns).await,
                AgentRequest::Unbind { sandbox } => self.unbind(&agent, sandbox, None).await,
                AgentRequest::Gone { sandbox, cgroup_id } => {
                    self.unbind(&agent, sandbox, Some(cgroup_id)).await
                }
            };
            answer.unwrap_or_else(|r| LocalResponse::Refused {
                kind: r.kind,
                message: r.message,
            })
        })
    }
}

/// The audit's actor for an agent: `agent:<id>` (`agent:<id>@<host>` in a fleet) in the
/// sandbox's organization.
fn actor(agent: &Requester, record: &SandboxRecord) -> Caller {
    let key_id = match &agent.host {
        Some(host) => format!("agent:{}@{host}", agent.agent),
        None => format!("agent:{}", agent.agent),
    };
    Caller {
        key_id,
        org: record.org.clone(),
        permissions: Vec::new(),
    }
}

fn failed(what: &str, e: impl std::fmt::Display) -> Refusal {
    tracing::error!(error = %e, "{what}");
    Refusal::new(RefusalKind::Failed, format!("{what}: {e}"))
}

fn bad_target(e: impl std::fmt::Display) -> Refusal {
    Refusal::new(RefusalKind::BadTarget, e.to_string())
}

impl Bindings {
    /// Runs `f` on the store off the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&AppState) -> Result<T, Refusal> + Send + 'static,
    ) -> Result<T, Refusal> {
        let st = self.state.clone();
        tokio::task::spawn_blocking(move || f(&st))
            .await
            .map_err(|e| failed("store task", e))?
    }

    /// What `record` is given: env (placeholders) and whether it is bound. The CA is the
    /// agent's own; it fills it in.
    fn declared(st: &AppState, record: &SandboxRecord) -> Result<Declared, Refusal> {
        let v = view(st, record).map_err(|e| failed("reading the sandbox", e))?;
        Ok(Declared {
            sandbox: record.id.clone(),
            env: v.env,
            ca_pem: v.ca_certificate.unwrap_or_default(),
            bound: record.bound,
        })
    }

    async fn describe(&self, who: &Requester, id: SandboxId) -> Result<LocalResponse, Refusal> {
        let who = who.clone();
        self.blocking(move |st| {
            let current = st
                .store
                .sandbox(&id)
                .map_err(|e| failed("reading the sandbox", e))?;
            let record = bind_rules::describable(id.as_str(), current.as_ref(), &who)?;
            Ok(LocalResponse::Declared(Self::declared(st, record)?))
        })
        .await
    }

    async fn bind(
        &self,
        agent: &Requester,
        id: SandboxId,
        cgroup: String,
        cgroup_id: u64,
        netns: Option<String>,
    ) -> Result<LocalResponse, Refusal> {
        let who = agent.clone();
        let (declared, bound) = self
            .blocking(move |st| {
                let current = st
                    .store
                    .sandbox(&id)
                    .map_err(|e| failed("reading the sandbox", e))?;
                let declared = bind_rules::bindable(id.as_str(), current.as_ref(), &who)?;
                let cgroup = validate::cgroup(&cgroup, &st.config.sandbox.cgroup_parents)
                    .map_err(bad_target)?;
                if let Some(n) = &netns {
                    bind_rules::netns_path(n)?;
                }
                // Another host's paths are its agent's to check (it did, before asking).
                if st.config.sandbox.check_paths && who.host.is_none() {
                    check_host(&cgroup, cgroup_id, netns.as_deref())?;
                }
                let bound = bind_rules::bound(declared, cgroup, cgroup_id, netns, now_ms());
                let audit = entry(
                    &actor(&who, &bound),
                    "sandbox.bound",
                    "sandbox",
                    &bound.id,
                    None,
                    json!({
                        "cgroup": {"to": bound.cgroup},
                        "cgroupId": {"to": cgroup_id},
                        "netns": {"to": bound.netns},
                    }),
                );
                swap(st, declared, Some(&bound), audit)?;
                Ok((declared.clone(), bound))
            })
            .await?;
        let delivered = self
            .state
            .agent
            .notify(AgentEvent::SandboxUpserted(bound.clone()))
            .await;
        let refusal = match delivered {
            Ok(()) => {
                return self
                    .blocking(move |st| Ok(LocalResponse::Bound(Self::declared(st, &bound)?)))
                    .await;
            }
            Err(AgentLinkError::Rejected(errors)) => Refusal::new(
                RefusalKind::BadTarget,
                format!(
                    "veil-agent could not enforce the binding: {}",
                    errors.join("; ")
                ),
            ),
            Err(e @ (AgentLinkError::NotConnected | AgentLinkError::NoAck(_))) => {
                Refusal::new(RefusalKind::Unavailable, e.to_string())
            }
            Err(e) => failed("delivering the binding", e),
        };
        self.roll_back(agent, bound, declared, &refusal.message)
            .await;
        Err(refusal)
    }

    /// Puts the declaration back after the agents did not take a binding, and detaches it.
    async fn roll_back(
        &self,
        agent: &Requester,
        bound: SandboxRecord,
        declared: SandboxRecord,
        reason: &str,
    ) {
        let audit = entry(
            &actor(agent, &bound),
            "sandbox.rollback",
            "sandbox",
            &bound.id,
            None,
            json!({"reason": {"to": reason}}),
        );
        let id = bound.id.clone();
        let restored = self
            .blocking(move |st| swap(st, &bound, Some(&declared), audit))
            .await;
        match restored {
            Ok(()) => {
                if let Err(e) = self
                    .state
                    .agent
                    .notify(AgentEvent::SandboxRemoved { id: id.clone() })
                    .await
                {
                    tracing::warn!(sandbox = %id, error = %e, "detaching a refused binding");
                }
            }
            Err(r) => tracing::warn!(sandbox = %id, reason = %r.message, "binding not rolled back"),
        }
    }

    /// Unbinds `id` (on request, or when `gone` names the cgroup id of its binding); its
    /// declaration stays only if it was declared with `keep`.
    async fn unbind(
        &self,
        agent: &Requester,
        id: SandboxId,
        gone: Option<u64>,
    ) -> Result<LocalResponse, Refusal> {
        let who = agent.clone();
        let id2 = id.clone();
        let changed = self
            .blocking(move |st| {
                let current = st
                    .store
                    .sandbox(&id2)
                    .map_err(|e| failed("reading the sandbox", e))?;
                if let Some(cgroup_id) = gone
                    && !bind_rules::gone_applies(current.as_ref(), cgroup_id)
                {
                    tracing::info!(sandbox = %id2, cgroup_id, "stale report of a gone cgroup; ignored");
                    return Ok(false);
                }
                let record = bind_rules::unbindable(id2.as_str(), current.as_ref(), &who)?;
                let after = bind_rules::unbound(record, now_ms());
                let audit = entry(
                    &actor(&who, record),
                    "sandbox.unbound",
                    "sandbox",
                    &record.id,
                    None,
                    json!({
                        "cgroup": {"from": record.cgroup},
                        "reason": {"to": if gone.is_some() { "cgroup gone" } else { "unbind" }},
                        "declaration": {"to": if after.is_some() { "kept" } else { "removed" }},
                    }),
                );
                swap(st, record, after.as_ref(), audit)?;
                Ok(true)
            })
            .await?;
        if changed
            && let Err(e) = self
                .state
                .agent
                .notify(AgentEvent::SandboxRemoved { id: id.clone() })
                .await
        {
            // The binding is gone from the store: agents converge to it when they catch up.
            tracing::warn!(sandbox = %id, error = %e, "unbinding not acknowledged");
        }
        Ok(LocalResponse::Unbound { sandbox: id })
    }
}

/// Replaces `expected` by `new` (or removes it) only if the store still holds `expected`.
fn swap(
    st: &AppState,
    expected: &SandboxRecord,
    new: Option<&SandboxRecord>,
    audit: crate::store::AuditRecord,
) -> Result<(), Refusal> {
    match st.store.restore_sandbox(expected, new, audit) {
        Ok(true) => Ok(()),
        Ok(false) => Err(Refusal::new(
            RefusalKind::AlreadyBound,
            format!("sandbox {} changed meanwhile; retry", expected.id),
        )),
        Err(StoreError::Conflict(Conflict::CgroupMeanwhile(c) | Conflict::Cgroup(c))) => {
            Err(Refusal::new(
                RefusalKind::BadTarget,
                format!("cgroup {c} is registered to another sandbox"),
            ))
        }
        Err(e) => Err(failed("storing the sandbox", e)),
    }
}

/// The host paths of a bind: the cgroup exists and still has the id the agent saw; the netns
/// file is a network namespace.
fn check_host(cgroup: &str, cgroup_id: u64, netns: Option<&str>) -> Result<(), Refusal> {
    let mount = hostcheck::cgroup2_mount().map_err(bad_target)?;
    hostcheck::check_cgroup(&mount, cgroup).map_err(bad_target)?;
    let ino = std::fs::metadata(mount.join(cgroup))
        .map_err(|e| bad_target(format!("cgroup {cgroup}: {e}")))?
        .ino();
    if ino != cgroup_id {
        return Err(bad_target(format!(
            "cgroup {cgroup} was replaced (its id is no longer {cgroup_id})"
        )));
    }
    if let Some(n) = netns {
        hostcheck::check_netns(n).map_err(bad_target)?;
    }
    Ok(())
}
