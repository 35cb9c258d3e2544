//! REST request bodies: the decoding and validation chain of `POST /api/secret` and
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
use veil_control::api::ApiError;
use veil_control::api::body::decode;
use veil_control::api::secrets::parse_hosts;
use veil_control::validate;

fn secret_create(headers: &HeaderMap, body: &[u8]) -> Result<(), ApiError> {
    // What an error may carry: the value, when the body holds one as a string.
    let value = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["value"].as_str().map(str::to_owned));
    let result = (|| {
        let req: veil_api::CreateSecret = decode(headers, Ok(Bytes::copy_from_slice(body)))?;
        validate::secret_name(&req.name).map_err(ApiError::BadRequest)?;
        validate::secret_value(req.value.expose())?;
        if let Some(d) = &req.description {
            validate::description(d)?;
        }
        let hosts = parse_hosts(req.hosts.unwrap_or_default())?;
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
    if let (Err(e), Some(v)) = (&result, &value) {
        // Only a value that appears nowhere else in the body could be echoed from it.
        let elsewhere = String::from_utf8_lossy(body).matches(v.as_str()).count() > 1;
        if v.len() >= 8 && !elsewhere {
            let shown = format!("{e} {e:?}");
            assert!(
                !shown.contains(v.as_str()),
                "an error message carries the value"
            );
        }
    }
    result
}

fn sandbox_put(headers: &HeaderMap, body: &[u8]) -> Result<(), ApiError> {
    let req: veil_api::PutSandbox = decode(headers, Ok(Bytes::copy_from_slice(body)))?;
    let parents = ["veil".to_owned(), "system.slice".to_owned()];
    // Without a cgroup the sandbox is only declared.
    if let Some(cgroup) = &req.cgroup {
        let normal = validate::cgroup(cgroup, &parents)?;
        // A normalised cgroup is a fixed point and stays under its parent.
        assert_eq!(validate::cgroup(&normal, &parents).as_ref(), Ok(&normal));
        assert!(
            !normal
                .split('/')
                .any(|p| p.is_empty() || p == ".." || p == ".")
        );
    }
    if let Some(n) = &req.netns {
        validate::netns(n)?;
        assert!(
            !n.contains("/../") && !n.ends_with("/.."),
            "netns escapes: {n}"
        );
    }
    for obj in req.secrets.unwrap_or_default() {
        for (env, name) in obj {
            let _ = validate::env_name(&env);
            let _ = validate::secret_name(&name);
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
    let parsed = decode::<veil_api::UpdateSecret>(&headers, Ok(Bytes::copy_from_slice(body)));
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
