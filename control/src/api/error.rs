//! The one error type of the REST API, rendered as NestJS-style JSON.
//!
//! Clients see `{"statusCode","message","error"}`; internal detail is logged, never sent.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

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
            StoreError::Conflict(m) => Self::Conflict(m),
            StoreError::Rejected(m) => Self::BadRequest(m),
            e @ (StoreError::Backend(_) | StoreError::Corrupt { .. }) => Self::internal("store", e),
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
        match e {
            HostCheckError::Invalid(m) => Self::BadRequest(m),
            HostCheckError::Unavailable(m) => Self::Unavailable(m),
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
