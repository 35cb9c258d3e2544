//! The one error type of the REST API, rendered as NestJS-style JSON.
//!
//! Clients see `{"statusCode","message","error"}`; internal detail is logged, never sent.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use veil_link::{Revision, SandboxId, SecretId};

use crate::agent_link::AgentLinkError;
use crate::hostcheck::HostCheckError;
use crate::store::StoreError;

/// Every way a REST call can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed or fails validation; the message names the problem.
    #[error("{0}")]
    BadRequest(String),
    /// 401: missing or invalid API key.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: the key lacks a permission.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such object in the caller's organization.
    #[error("{0}")]
    NotFound(String),
    /// 409: a uniqueness rule.
    #[error("{0}")]
    Conflict(String),
    /// 413: body too large.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 415: not JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 503: a required dependency (the agent) is not available.
    #[error("{0}")]
    Unavailable(String),
    /// 502: the agent could not apply a change; the message carries its report (never a value).
    #[error("{0}")]
    AgentFailed(String),
    /// 504: the change is stored but the agents did not acknowledge it within the asked wait.
    #[error("{0}")]
    GatewayTimeout(String),
    /// 500: logged in full, sent as a generic message.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// Wraps an internal failure; `context` says where.
    pub fn internal(context: &str, err: impl std::fmt::Display) -> Self {
        Self::Internal(format!("{context}: {err}"))
    }

    /// The status code.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::AgentFailed(_) => StatusCode::BAD_GATEWAY,
            Self::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Maps a store error, naming the object kind for 404s.
    pub fn from_store(err: StoreError, what: &str) -> Self {
        match err {
            StoreError::NotFound => Self::NotFound(format!("{what} not found")),
            StoreError::Conflict(c) => Self::Conflict(c.to_string()),
            StoreError::Rejected(r) => Self::BadRequest(r.to_string()),
            e @ StoreError::Unavailable(_) => Self::Unavailable(e.to_string()),
            e @ (StoreError::Backend(_)
            | StoreError::Database(_)
            | StoreError::Schema(_)
            | StoreError::Encode(_)
            | StoreError::Seal(_)
            | StoreError::Open(_)
            | StoreError::OpenSecret { .. }
            | StoreError::Corrupt { .. }) => Self::internal("store", e),
        }
    }
}

/// A change already stored that the agents did not confirm, named for the answer's message.
#[derive(Clone, Copy, Debug)]
pub enum Unconfirmed<'a> {
    /// A sandbox PUT (rolled back by the caller when an agent refused it or the messages could
    /// not be built).
    SandboxPut {
        /// The sandbox.
        id: &'a SandboxId,
    },
    /// A sandbox DELETE (never rolled back).
    SandboxDelete {
        /// The sandbox.
        id: &'a SandboxId,
    },
    /// A secret change whose caller waits (`?wait`) for the agents' acknowledgements.
    SecretWait {
        /// The secret.
        id: &'a SecretId,
        /// The revision stored.
        revision: Revision,
    },
}

impl ApiError {
    /// The answer to `change` when the agents did not confirm it: `None` when the request
    /// succeeds anyway (no agent is required and none confirmed a sandbox change).
    pub fn from_agent(
        err: AgentLinkError,
        change: Unconfirmed<'_>,
        agent_required: bool,
    ) -> Option<Self> {
        match (change, err) {
            (Unconfirmed::SandboxPut { id }, AgentLinkError::Rejected(errors)) => {
                Some(Self::AgentFailed(format!(
                    "veil-agent could not enforce sandbox {id}: {}; the change was rolled back",
                    errors.join("; ")
                )))
            }
            (Unconfirmed::SandboxDelete { id }, AgentLinkError::Rejected(errors)) => {
                Some(Self::AgentFailed(format!(
                    "sandbox {id} was removed from the registry, but veil-agent reported: {}",
                    errors.join("; ")
                )))
            }
            (Unconfirmed::SecretWait { id, revision }, AgentLinkError::Rejected(errors)) => {
                Some(Self::AgentFailed(format!(
                    "secret {id} is stored at revision {revision}, but a veil-agent reported: {}",
                    errors.join("; ")
                )))
            }
            (
                Unconfirmed::SandboxPut { .. } | Unconfirmed::SandboxDelete { .. },
                e @ AgentLinkError::Internal(_),
            ) => Some(Self::internal("agent link", e)),
            (_, _) if !agent_required && !matches!(change, Unconfirmed::SecretWait { .. }) => None,
            (Unconfirmed::SandboxPut { id }, e) => Some(Self::Unavailable(format!(
                "sandbox {id}: {e}; the change is stored and is enforced as soon as the agent \
                 catches up (retry the request to wait for it, or DELETE the sandbox)"
            ))),
            (Unconfirmed::SandboxDelete { id }, e) => Some(Self::Unavailable(format!(
                "sandbox {id} was removed from the registry, but {e}; the agent detaches it \
                 as soon as it catches up"
            ))),
            (Unconfirmed::SecretWait { id, revision }, e) => Some(Self::GatewayTimeout(format!(
                "secret {id} is stored at revision {revision}, but it was {e}; agents converge \
                 when they reconnect, and GET /api/secret/{id} shows the propagation"
            ))),
        }
    }
}

impl From<crate::validate::Invalid> for ApiError {
    fn from(e: crate::validate::Invalid) -> Self {
        Self::BadRequest(e.to_string())
    }
}

impl From<HostCheckError> for ApiError {
    fn from(e: HostCheckError) -> Self {
        if e.is_unavailable() {
            Self::Unavailable(e.to_string())
        } else {
            Self::BadRequest(e.to_string())
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            Self::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                "Internal server error".to_owned()
            }
            other => other.to_string(),
        };
        let body = serde_json::json!({
            "statusCode": status.as_u16(),
            "message": message,
            "error": status.canonical_reason().unwrap_or("Error"),
        });
        (status, Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent_link::BuildError;

    fn answer(e: AgentLinkError, change: Unconfirmed<'_>, required: bool) -> Option<(u16, String)> {
        ApiError::from_agent(e, change, required).map(|a| (a.status().as_u16(), a.to_string()))
    }

    #[test]
    fn unconfirmed_changes_answer_by_kind_and_requirement() {
        let (sb, s1) = (
            SandboxId::parse("sb").unwrap(),
            SecretId::parse("s1").unwrap(),
        );
        let put = Unconfirmed::SandboxPut { id: &sb };
        let del = Unconfirmed::SandboxDelete { id: &sb };
        let wait = Unconfirmed::SecretWait {
            id: &s1,
            revision: Revision(3),
        };
        // Without a required agent, an unconfirmed sandbox change succeeds; a wait never does.
        assert_eq!(answer(AgentLinkError::NotConnected, put, false), None);
        assert_eq!(answer(AgentLinkError::NoAck("x".into()), del, false), None);
        let (status, msg) = answer(AgentLinkError::NotConnected, wait, false).unwrap();
        assert_eq!(status, 504);
        assert!(msg.starts_with("secret s1 is stored at revision 3, but it was no veil-agent"));
        let (status, msg) = answer(AgentLinkError::NotConnected, put, true).unwrap();
        assert_eq!(status, 503);
        assert!(msg.starts_with("sandbox sb: no veil-agent is connected; the change is stored"));
        let (status, _) = answer(AgentLinkError::NoAck("x".into()), del, true).unwrap();
        assert_eq!(status, 503);
        // A refusal is a 502 naming the agent's report, whatever the requirement.
        for change in [put, del, wait] {
            let (status, msg) = answer(
                AgentLinkError::Rejected(vec!["a".into(), "b".into()]),
                change,
                false,
            )
            .unwrap();
            assert_eq!(status, 502);
            assert!(msg.contains("a; b"), "{msg}");
        }
        // Messages that could not be built: a 500 for sandboxes, the wait's 504 for secrets.
        let internal = || AgentLinkError::Internal(BuildError::KeyringPoisoned);
        assert_eq!(answer(internal(), put, false).unwrap().0, 500);
        assert_eq!(answer(internal(), del, true).unwrap().0, 500);
        assert_eq!(answer(internal(), wait, true).unwrap().0, 504);
    }
}
