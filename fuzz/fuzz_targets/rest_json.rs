//! REST request bodies: the JSON parsing and validation chain of `POST /api/secret` and
//! `PUT /api/sandbox/{id}`, built from control's public pieces in the handlers' order.
//!
//! Properties: nothing panics; an accepted secret has a valid name and value and hosts that are
//! normal (parsing them again gives them back) and unique; no error message carries the value.
//! The first input byte picks the route; the rest is the body.
#![no_main]

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, header};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use veil_control::api::secrets::parse_hosts;
use veil_control::api::{ApiError, json_object, only_fields, opt_string, opt_string_array};
use veil_control::validate;

fn secret_create(headers: &HeaderMap, body: &[u8]) -> Result<(), ApiError> {
    let mut map = json_object(headers, Ok(Bytes::copy_from_slice(body)))?;
    let value = opt_string(&mut map, "value")?;
    // What the error could echo: every field but the value.
    let others = serde_json::to_string(&map).unwrap_or_default();
    let result = (|| {
        only_fields(&map, &["name", "description", "hosts"])?;
        let value = value
            .as_deref()
            .ok_or_else(|| ApiError::BadRequest("value is required".into()))?;
        let name = opt_string(&mut map, "name")?
            .ok_or_else(|| ApiError::BadRequest("name is required".into()))?;
        validate::secret_name(&name).map_err(ApiError::BadRequest)?;
        validate::secret_value(value).map_err(ApiError::BadRequest)?;
        if let Some(d) = opt_string(&mut map, "description")? {
            validate::description(&d).map_err(ApiError::BadRequest)?;
        }
        let hosts = parse_hosts(opt_string_array(&mut map, "hosts")?.unwrap_or_default())?;
        assert!(hosts.len() <= validate::MAX_HOSTS);
        assert_eq!(
            parse_hosts(hosts.clone()).ok().as_ref(),
            Some(&hosts),
            "stored hosts are not normal"
        );
        for (i, h) in hosts.iter().enumerate() {
            assert!(!hosts[..i].contains(h), "duplicate host {h}");
        }
        Ok(())
    })();
    if let (Err(e), Some(v)) = (&result, &value)
        && v.len() >= 8
        && !others.contains(v.as_str())
    {
        let shown = format!("{e} {e:?}");
        assert!(
            !shown.contains(v.as_str()),
            "an error message carries the value"
        );
    }
    result
}

fn sandbox_put(headers: &HeaderMap, body: &[u8]) -> Result<(), ApiError> {
    let mut map = json_object(headers, Ok(Bytes::copy_from_slice(body)))?;
    only_fields(&map, &["cgroup", "netns", "secrets"])?;
    let cgroup = opt_string(&mut map, "cgroup")?
        .ok_or_else(|| ApiError::BadRequest("cgroup is required".into()))?;
    let parents = ["veil".to_owned(), "system.slice".to_owned()];
    let normal = validate::cgroup(&cgroup, &parents).map_err(ApiError::BadRequest)?;
    // A normalised cgroup is a fixed point and stays under its parent.
    assert_eq!(validate::cgroup(&normal, &parents).as_ref(), Ok(&normal));
    assert!(
        !normal
            .split('/')
            .any(|p| p.is_empty() || p == ".." || p == ".")
    );
    if let Some(n) = opt_string(&mut map, "netns")? {
        validate::netns(&n).map_err(ApiError::BadRequest)?;
        assert!(
            !n.contains("/../") && !n.ends_with("/.."),
            "netns escapes: {n}"
        );
    }
    if let Some(Value::Array(items)) = map.remove("secrets") {
        for item in items {
            if let Value::Object(obj) = item {
                for (env, name) in obj {
                    let _ = validate::env_name(&env);
                    if let Value::String(name) = name {
                        let _ = validate::secret_name(&name);
                    }
                }
            }
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let Some((&route, body)) = data.split_first() else {
        return;
    };
    let mut headers = HeaderMap::new();
    let ct = if route & 0x80 == 0 {
        "application/json"
    } else {
        "application/json; charset=utf-8"
    };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    let parsed = json_object(&headers, Ok(Bytes::copy_from_slice(body)));
    if parsed.is_ok() {
        assert!(
            matches!(serde_json::from_slice::<Value>(body), Ok(Value::Object(_))),
            "accepted a body that is not a JSON object"
        );
    }
    let _ = match route & 1 {
        0 => secret_create(&headers, body),
        _ => sandbox_put(&headers, body),
    };
});
