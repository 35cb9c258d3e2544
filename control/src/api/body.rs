//! Request bodies: the content type, the JSON, unknown fields and each field's type, checked
//! in that order with messages that name the problem (and never quote a value).
//!
//! The body is decoded twice: first as an object of ignored values (syntax, object-ness and the
//! field names, without copying any value), then into its `veil_api` type, whose schema lists
//! the known fields so that the type is the one place they are named.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::{DeserializeOwned, IgnoredAny};
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::Schema;

use super::error::ApiError;
use crate::validate;

/// Largest accepted request body (a 64 KiB value JSON-escaped fits comfortably).
pub const BODY_LIMIT: usize = 512 * 1024;

/// A request body type and what each of its fields must be, for messages.
pub trait RequestBody: DeserializeOwned + utoipa::PartialSchema {
    /// The message when the field at `path` (like `hosts` or `secrets[0].ENV`) has a wrong
    /// type or value.
    fn invalid(path: &str) -> String;

    /// The message when the required `field` is missing.
    fn missing(field: &str) -> String {
        format!("{field} is required")
    }
}

/// Decodes a request body of type `T`; sizes are capped by the router.
pub fn decode<T: RequestBody>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::UnsupportedMediaType(
            "Content-Type must be application/json".into(),
        ));
    }
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!("request body exceeds {BODY_LIMIT} bytes"))
        } else {
            ApiError::BadRequest("could not read request body".into())
        }
    })?;
    // The body may hold a value: copy it into a buffer that is wiped when decoding is done.
    let body = zeroize::Zeroizing::new(body.to_vec());
    let fields = serde_json::from_slice::<BTreeMap<String, IgnoredAny>>(&body).map_err(|e| {
        if e.is_data() {
            ApiError::BadRequest("request body must be a JSON object".into())
        } else {
            ApiError::BadRequest(format!(
                "malformed JSON at line {} column {}",
                e.line(),
                e.column()
            ))
        }
    })?;
    let known = field_names::<T>();
    let unknown: Vec<&str> = fields
        .keys()
        .map(String::as_str)
        .filter(|k| !known.iter().any(|f| f == k))
        .collect();
    if !unknown.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "unknown field(s): {}",
            unknown.join(", ")
        )));
    }
    let mut de = serde_json::Deserializer::from_slice(&body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        // serde's own messages quote the offending input, which may be a value: only a missing
        // field's (static) name is taken from them.
        let inner = e.into_inner().to_string();
        let named = |prefix: &str| {
            inner
                .strip_prefix(prefix)
                .and_then(|rest| rest.split('`').next())
                .map(str::to_owned)
        };
        if let Some(field) = named("missing field `") {
            ApiError::BadRequest(T::missing(&field))
        } else if let Some(field) = named("duplicate field `") {
            ApiError::BadRequest(format!("{field} is given twice"))
        } else {
            ApiError::BadRequest(T::invalid(&path))
        }
    })
}

/// The property names of `T`'s schema (its JSON field names).
fn field_names<T: utoipa::PartialSchema>() -> Vec<String> {
    match T::schema() {
        RefOr::T(Schema::Object(o)) => o.properties.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

const HOSTS: &str = "hosts must be an array of strings";
const BODY_SUBSTITUTION: &str = "bodySubstitution must be true or false";
const WRONG_HOST: &str = "wrongHost must be \"forward\" or \"block\"";

fn secret_field(path: &str) -> String {
    match path {
        "bodySubstitution" => BODY_SUBSTITUTION.into(),
        "wrongHost" => WRONG_HOST.into(),
        p if p.starts_with("hosts") => HOSTS.into(),
        p => format!("{p} must be a string"),
    }
}

impl RequestBody for veil_api::CreateSecret {
    fn invalid(path: &str) -> String {
        secret_field(path)
    }
}

impl RequestBody for veil_api::UpdateSecret {
    fn invalid(path: &str) -> String {
        secret_field(path)
    }
}

/// `secrets`, `secrets[i]` or `secrets[i].ENV` of a mount list.
fn mount_field(path: &str) -> String {
    let Some(rest) = path.strip_prefix("secrets[") else {
        return "secrets must be an array of {\"ENV_VAR\": \"secret-name\"} objects".into();
    };
    match rest.split_once("].") {
        None => format!("secrets[{rest} must be an object"),
        Some((i, env)) => match validate::env_name(env) {
            Ok(()) => format!("secrets[{i}].{env} must be a secret name (string)"),
            Err(e) => e,
        },
    }
}

impl RequestBody for veil_api::PutSandbox {
    fn invalid(path: &str) -> String {
        sandbox_field(path)
    }
}

impl RequestBody for veil_api::DeclareSandbox {
    fn invalid(path: &str) -> String {
        sandbox_field(path)
    }
}

fn sandbox_field(path: &str) -> String {
    if path.starts_with("secrets") {
        mount_field(path)
    } else if path == "keep" {
        "keep must be a boolean".into()
    } else {
        format!("{path} must be a string")
    }
}

impl RequestBody for veil_api::PutSandboxSecrets {
    fn invalid(path: &str) -> String {
        mount_field(path)
    }

    fn missing(field: &str) -> String {
        format!("{field} is required ([] detaches all)")
    }
}

impl RequestBody for veil_api::CreateApiKey {
    fn invalid(_path: &str) -> String {
        PERMISSIONS.into()
    }
}

/// What `permissions` of a new key must be.
pub const PERMISSIONS: &str =
    "permissions must be a non-empty array of manage:secrets, write:sandboxes, read:audit, admin";

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn json(body: &str) -> Result<veil_api::PutSandbox, ApiError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        decode(&headers, Ok(Bytes::from(body.to_owned())))
    }

    fn message(r: Result<veil_api::PutSandbox, ApiError>) -> String {
        match r {
            Ok(_) => "accepted".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn messages_name_the_field_never_the_value() {
        assert_eq!(message(json("{")), "malformed JSON at line 1 column 1");
        assert_eq!(message(json("[1]")), "request body must be a JSON object");
        assert_eq!(message(json(r#"{"b":1,"a":2}"#)), "unknown field(s): a, b");
        // No cgroup: a declaration (bound later through veil-agent).
        assert_eq!(message(json("{}")), "accepted");
        assert_eq!(message(json(r#"{"keep":"yes"}"#)), "keep must be a boolean");
        assert_eq!(message(json(r#"{"cgroup":7}"#)), "cgroup must be a string");
        assert_eq!(
            message(json(
                r#"{"cgroup":"c","secrets":[{"K":"hunter2"},{"V":3}]}"#
            )),
            "secrets[1].V must be a secret name (string)"
        );
        assert_eq!(
            message(json(r#"{"cgroup":"c","secrets":["hunter2"]}"#)),
            "secrets[0] must be an object"
        );
        assert_eq!(
            message(json(r#"{"cgroup":"c","secrets":"hunter2"}"#)),
            "secrets must be an array of {\"ENV_VAR\": \"secret-name\"} objects"
        );
        assert_eq!(
            message(json(r#"{"cgroup":"c","cgroup":"d"}"#)),
            "cgroup is given twice"
        );
        assert_eq!(message(json(r#"{"cgroup":"c","netns":null}"#)), "accepted");
    }
}
