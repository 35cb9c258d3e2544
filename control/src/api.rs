//! The REST API under `/api`: assembles the resources' routes (what they share lives in
//! [`state`]) into the router, with request logging and JSON errors for unrouted requests.

pub mod audit;
pub mod binding;
pub mod body;
pub mod error;
pub mod keys;
pub mod openapi;
pub mod route;
pub mod sandboxes;
pub mod secrets;
pub mod state;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::IntoResponse;

use body::BODY_LIMIT;
pub use error::ApiError;
pub use state::{AppState, Caller, Route};

/// Logs each request's method, path, status and latency (never bodies or query strings).
async fn log_request(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    // The route template, not the path: ids must not become metric labels.
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_owned();
    let start = std::time::Instant::now();
    let resp = next.run(req).await;
    state.metrics.observe(
        method.as_str(),
        &route,
        resp.status().as_u16(),
        start.elapsed(),
    );
    tracing::debug!(
        target: "veil::http",
        %method,
        %path,
        status = resp.status().as_u16(),
        micros = start.elapsed().as_micros() as u64,
        "request"
    );
    resp
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

async fn method_not_allowed() -> impl IntoResponse {
    let status = StatusCode::METHOD_NOT_ALLOWED;
    let body = veil_api::ErrorBody {
        status_code: status.as_u16(),
        message: "method not allowed on this route".into(),
        error: "Method Not Allowed".into(),
    };
    (status, axum::Json(body))
}

/// The full application: `/api/...` routes, JSON errors for everything else.
pub fn router(state: AppState) -> Router {
    let api = route_table()
        .into_iter()
        .fold(Router::new(), |r, route| r.route(route.path, route.handler));
    Router::new()
        .nest("/api", api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            log_request,
        ))
        .with_state(state)
}

/// Every route of the API.
pub fn route_table() -> Vec<Route> {
    [
        secrets::routes(),
        sandboxes::routes(),
        audit::routes(),
        keys::routes(),
        openapi::routes(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// `{anything}` → `{}`: the router names path parameters `{id}`, the document by resource.
    fn shape(path: &str) -> String {
        let mut out = String::new();
        let mut in_param = false;
        for c in path.chars() {
            match c {
                '{' => {
                    in_param = true;
                    out.push('{');
                }
                '}' => {
                    in_param = false;
                    out.push('}');
                }
                _ if in_param => {}
                c => out.push(c),
            }
        }
        out
    }

    #[test]
    fn the_document_describes_exactly_the_routed_methods_and_paths() {
        let routed: BTreeSet<(String, String)> = route_table()
            .iter()
            .map(|r| (r.method.as_str().to_lowercase(), shape(r.path)))
            .collect();
        let doc = openapi::document();
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            for method in item.as_object().into_iter().flatten().map(|(m, _)| m) {
                if method != "parameters" {
                    documented.insert((method.clone(), shape(path)));
                }
            }
        }
        let undocumented: Vec<_> = routed.difference(&documented).collect();
        let unrouted: Vec<_> = documented.difference(&routed).collect();
        assert!(
            undocumented.is_empty(),
            "routed, not documented: {undocumented:?}"
        );
        assert!(unrouted.is_empty(), "documented, not routed: {unrouted:?}");
        assert_eq!(routed.len(), 17, "{routed:?}");
    }
}
