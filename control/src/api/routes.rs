//! The route table: every method and path of the API, from which the router is built, so that
//! a test can check each against the OpenAPI document.

use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{MethodFilter, MethodRouter, on};

use super::{AppState, audit, keys, openapi, sandboxes, secrets};

/// One route: a method on a path (relative to `/api`, axum's syntax) and its handler.
#[derive(Debug)]
pub struct Route {
    /// The method.
    pub method: Method,
    /// The path template.
    pub path: &'static str,
    /// The handler, for `method` only.
    pub handler: MethodRouter<AppState>,
}

impl Route {
    /// `handler` answers `method` on `path`.
    pub fn new<H, T>(method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        // The table is static: a method axum cannot route is a programming error.
        #[allow(clippy::expect_used)]
        let filter = MethodFilter::try_from(method.clone()).expect("a method axum routes");
        Self {
            method,
            path,
            handler: on(filter, handler),
        }
    }
}

/// Every route of the API.
pub fn table() -> Vec<Route> {
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
