//! A typed client of veil-control's REST API: one method per route, the bodies are
//! [`veil_api`]'s types, errors carry the status and the server's message.
//!
//! The URL and key come from the caller (flags) or from `VEIL_API_URL` / `VEIL_API_KEY`
//! ([`Client::from_env`]). The key is wiped from memory when the client is dropped and never
//! shown by `Debug`.

#![forbid(unsafe_code)]

use reqwest::Method;
use serde::Serialize;
use serde::de::DeserializeOwned;
use veil_api::{
    ApiKey, AuditPage, AuditQuery, CreateApiKey, CreateSecret, MountedSecret, NewApiKey,
    PutSandbox, PutSandboxSecrets, Sandbox, Secret, SecretDetail, SecretPage, SecretPageQuery,
    UpdateSecret, UpdateSecretQuery,
};

pub use veil_api;
pub use zeroize::Zeroizing;

/// The API URL when `VEIL_API_URL` is not set.
pub const DEFAULT_URL: &str = "http://127.0.0.1:3900/api";
/// The environment variable holding the API URL (including `/api`).
pub const URL_ENV: &str = "VEIL_API_URL";
/// The environment variable holding the API key.
pub const KEY_ENV: &str = "VEIL_API_KEY";

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error status; `message` is its own.
    #[error("{status}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// The request did not get an answer.
    #[error("request failed: {0}")]
    Transport(String),
    /// The answer is not what the API documents.
    #[error("unexpected answer from {route}: {detail}")]
    Decode {
        /// `METHOD /path` of the call.
        route: String,
        /// What did not match.
        detail: String,
    },
    /// No API key was given.
    #[error("no API key: set {KEY_ENV} or pass one")]
    NoKey,
}

impl ClientError {
    /// The HTTP status of an [`ClientError::Api`] error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client bound to one API URL and key.
pub struct Client {
    base: String,
    key: Zeroizing<String>,
    http: reqwest::Client,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// A request body already serialized into a buffer that is wiped after sending.
type Body = Option<Zeroizing<Vec<u8>>>;

impl Client {
    /// `base` is the API URL including `/api` (like `http://127.0.0.1:3900/api`).
    pub fn new(base: &str, key: Zeroizing<String>) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .build()
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            key,
            http,
        })
    }

    /// A client from `VEIL_API_URL` (default [`DEFAULT_URL`]) and `VEIL_API_KEY`.
    pub fn from_env() -> Result<Self, ClientError> {
        let base = std::env::var(URL_ENV).unwrap_or_else(|_| DEFAULT_URL.to_owned());
        let key = std::env::var(KEY_ENV).map_err(|_| ClientError::NoKey)?;
        Self::new(&base, Zeroizing::new(key))
    }

    /// The API URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn body(value: &impl Serialize) -> Result<Body, ClientError> {
        serde_json::to_vec(value)
            .map(|b| Some(Zeroizing::new(b)))
            .map_err(|e| ClientError::Transport(format!("encoding the request: {e}")))
    }

    /// Sends one request; returns the answer's bytes when its status is a success.
    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &impl Serialize,
        body: Body,
    ) -> Result<Vec<u8>, ClientError> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.key.as_str())
            .query(query);
        if let Some(body) = body {
            req = req
                .header("content-type", "application/json")
                .body(body.to_vec());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        if !status.is_success() {
            let message = serde_json::from_slice::<veil_api::ErrorBody>(&bytes)
                .map(|e| e.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Api {
                status: status.as_u16(),
                message,
            });
        }
        Ok(bytes.to_vec())
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &impl Serialize,
        body: Body,
    ) -> Result<T, ClientError> {
        let route = format!("{method} {path}");
        let bytes = self.send(method, path, query, body).await?;
        // serde's message may quote the answer (a new API key is one): only where it failed.
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
            route,
            detail: format!(
                "{:?} error at line {} column {}",
                e.classify(),
                e.line(),
                e.column()
            ),
        })
    }

    /// `POST /secret`.
    pub async fn create_secret(&self, req: &CreateSecret) -> Result<Secret, ClientError> {
        self.call(Method::POST, "/secret", &(), Self::body(req)?)
            .await
    }

    /// `GET /secret`: every secret in one answer.
    pub async fn list_secrets(&self) -> Result<Vec<Secret>, ClientError> {
        self.call(Method::GET, "/secret", &(), None).await
    }

    /// `GET /secret/paginated`: one page.
    pub async fn secrets_page(&self, query: &SecretPageQuery) -> Result<SecretPage, ClientError> {
        self.call(Method::GET, "/secret/paginated", query, None)
            .await
    }

    /// Every secret (whose name contains `name`), following `nextCursor`.
    pub async fn all_secrets(&self, name: Option<&str>) -> Result<Vec<Secret>, ClientError> {
        let mut out = Vec::new();
        let mut query = SecretPageQuery {
            limit: Some("200".into()),
            name: name.map(str::to_owned),
            ..SecretPageQuery::default()
        };
        loop {
            let page = self.secrets_page(&query).await?;
            out.extend(page.items);
            match page.next_cursor {
                Some(c) => query.cursor = Some(c),
                None => return Ok(out),
            }
        }
    }

    /// `GET /secret/{id}`.
    pub async fn secret(&self, id: &str) -> Result<SecretDetail, ClientError> {
        self.call(Method::GET, &format!("/secret/{id}"), &(), None)
            .await
    }

    /// `PATCH /secret/{id}`; `wait` (like `5s`) waits for the agents' acknowledgements.
    pub async fn update_secret(
        &self,
        id: &str,
        req: &UpdateSecret,
        wait: Option<&str>,
    ) -> Result<SecretDetail, ClientError> {
        let query = UpdateSecretQuery {
            wait: wait.map(str::to_owned),
        };
        let path = format!("/secret/{id}");
        self.call(Method::PATCH, &path, &query, Self::body(req)?)
            .await
    }

    /// `DELETE /secret/{id}`.
    pub async fn delete_secret(&self, id: &str) -> Result<(), ClientError> {
        let path = format!("/secret/{id}");
        self.send(Method::DELETE, &path, &(), None).await.map(drop)
    }

    /// `PUT /sandbox/{id}`: registers or replaces a sandbox.
    pub async fn put_sandbox(&self, id: &str, req: &PutSandbox) -> Result<Sandbox, ClientError> {
        let path = format!("/sandbox/{id}");
        self.call(Method::PUT, &path, &(), Self::body(req)?).await
    }

    /// `GET /sandbox/{id}`.
    pub async fn sandbox(&self, id: &str) -> Result<Sandbox, ClientError> {
        self.call(Method::GET, &format!("/sandbox/{id}"), &(), None)
            .await
    }

    /// `DELETE /sandbox/{id}`.
    pub async fn delete_sandbox(&self, id: &str) -> Result<(), ClientError> {
        let path = format!("/sandbox/{id}");
        self.send(Method::DELETE, &path, &(), None).await.map(drop)
    }

    /// `PUT /sandbox/{id}/secrets`: replaces the mounted secrets.
    pub async fn put_sandbox_secrets(
        &self,
        id: &str,
        req: &PutSandboxSecrets,
    ) -> Result<Sandbox, ClientError> {
        let path = format!("/sandbox/{id}/secrets");
        self.call(Method::PUT, &path, &(), Self::body(req)?).await
    }

    /// `GET /sandbox/{id}/secrets`.
    pub async fn sandbox_secrets(&self, id: &str) -> Result<Vec<MountedSecret>, ClientError> {
        let path = format!("/sandbox/{id}/secrets");
        self.call(Method::GET, &path, &(), None).await
    }

    /// `GET /audit`: one page of the audit log.
    pub async fn audit(&self, query: &AuditQuery) -> Result<AuditPage, ClientError> {
        self.call(Method::GET, "/audit", query, None).await
    }

    /// `POST /api-keys`: the answer holds the key, shown this once.
    pub async fn create_api_key(&self, req: &CreateApiKey) -> Result<NewApiKey, ClientError> {
        self.call(Method::POST, "/api-keys", &(), Self::body(req)?)
            .await
    }

    /// `GET /api-keys`.
    pub async fn api_keys(&self) -> Result<Vec<ApiKey>, ClientError> {
        self.call(Method::GET, "/api-keys", &(), None).await
    }

    /// `DELETE /api-keys/{id}`.
    pub async fn revoke_api_key(&self, id: &str) -> Result<(), ClientError> {
        let path = format!("/api-keys/{id}");
        self.send(Method::DELETE, &path, &(), None).await.map(drop)
    }
}
