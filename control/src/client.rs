//! A small REST client for the `veil-control secret …` commands.

use reqwest::Method;
use serde_json::Value;
use zeroize::Zeroizing;

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error.
    #[error("{status}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// Transport failure.
    #[error("request failed: {0}")]
    Transport(String),
}

/// A REST client bound to one API URL and key.
#[derive(Debug)]
pub struct Client {
    base: String,
    key: Zeroizing<String>,
    http: reqwest::Client,
}

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

    /// Sends a request; `body` is JSON bytes (wiped after sending). Returns the JSON answer.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Zeroizing<Vec<u8>>>,
    ) -> Result<Option<Value>, ClientError> {
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
        let json: Option<Value> = serde_json::from_slice(&bytes).ok();
        if !status.is_success() {
            let message = json
                .as_ref()
                .and_then(|j| j["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Api {
                status: status.as_u16(),
                message,
            });
        }
        Ok(json)
    }

    /// Every secret, following `nextCursor`.
    pub async fn list_all(&self, name: Option<&str>) -> Result<Vec<Value>, ClientError> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut q = vec![("limit", "200".to_owned())];
            if let Some(n) = name {
                q.push(("name", n.to_owned()));
            }
            if let Some(c) = &cursor {
                q.push(("cursor", c.clone()));
            }
            let page = self
                .call(Method::GET, "/secret/paginated", &q, None)
                .await?
                .unwrap_or(Value::Null);
            if let Some(items) = page["items"].as_array() {
                out.extend(items.iter().cloned());
            }
            match page["nextCursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return Ok(out),
            }
        }
    }
}
