//! One route of the API: a method, a path and its handler. The table of them
//! (`super::route_table`) builds the router and is what the OpenAPI test checks.

use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{MethodFilter, MethodRouter, on};

/// One route: a method on a path (relative to `/api`, axum's syntax) and its handler for state
/// `S` (generic so that this module needs nothing of the API's own).
#[derive(Debug)]
pub struct Route<S> {
    /// The method.
    pub method: Method,
    /// The path template.
    pub path: &'static str,
    /// The handler, for `method` only.
    pub handler: MethodRouter<S>,
}

impl<S: Clone + Send + Sync + 'static> Route<S> {
    /// `handler` answers `method` on `path`.
    pub fn new<H, T>(method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, S>,
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
