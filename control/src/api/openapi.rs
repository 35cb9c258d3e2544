//! `/api/openapi.json`: an OpenAPI 3.1 description of every route (kept next to the router;
//! a test checks every routed path is described).

use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use super::{AppState, Caller};

/// Routes of this resource.
pub fn router() -> Router<AppState> {
    Router::new().route("/openapi.json", get(spec))
}

async fn spec(_caller: Caller) -> Json<Value> {
    Json(document())
}

fn err(desc: &str) -> Value {
    json!({"description": desc, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

fn ok(desc: &str, schema: Value) -> Value {
    json!({"description": desc, "content": {"application/json": {"schema": schema}}})
}

fn body(schema: Value) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": schema}}})
}

fn path_param(name: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}})
}

fn query(name: &str, schema: Value) -> Value {
    json!({"name": name, "in": "query", "required": false, "schema": schema})
}

fn r(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn std_errors(mut responses: Value, extra: &[(&str, &str)]) -> Value {
    let base = [
        ("400", "Validation failed; the message names the problem"),
        ("401", "Missing or invalid API key"),
        ("403", "The API key lacks the permission"),
    ];
    for (code, desc) in base.iter().chain(extra.iter()) {
        responses[*code] = err(desc);
    }
    responses
}

/// The OpenAPI document.
pub fn document() -> Value {
    let secret_id = path_param("secretId");
    let sandbox_id = path_param("sandboxId");
    json!({
        "openapi": "3.1.0",
        "info": {"title": "veil-control", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Daytona-compatible secrets API plus veil's sandbox registry. No route ever returns a secret value."},
        "servers": [{"url": "/api"}],
        "security": [{"bearer": []}],
        "paths": {
            "/secret": {
                "post": {"operationId": "createSecret", "summary": "Create a secret (manage:secrets)",
                    "requestBody": body(r("CreateSecret")),
                    "responses": std_errors(json!({"201": ok("Created", r("Secret"))}), &[("409", "A secret with this name exists in the organization"), ("415", "Not JSON")])},
                "get": {"operationId": "listSecrets", "summary": "List all secrets (manage:secrets)",
                    "responses": std_errors(json!({"200": ok("Secrets", json!({"type": "array", "items": r("Secret")}))}), &[])}
            },
            "/secret/paginated": {
                "get": {"operationId": "listSecretsPaginated", "summary": "List secrets a page at a time (manage:secrets)",
                    "parameters": [
                        query("cursor", json!({"type": "string"})),
                        query("limit", json!({"type": "integer", "minimum": 1, "maximum": 200, "default": 100})),
                        query("name", json!({"type": "string", "description": "case-insensitive partial match"})),
                        query("sort", json!({"type": "string", "enum": ["name", "createdAt", "updatedAt"], "default": "createdAt"})),
                        query("order", json!({"type": "string", "enum": ["asc", "desc"], "default": "desc"}))
                    ],
                    "responses": std_errors(json!({"200": ok("A page", r("SecretPage"))}), &[])}
            },
            "/secret/{secretId}": {
                "parameters": [secret_id],
                "get": {"operationId": "getSecret", "summary": "Get a secret (manage:secrets)",
                    "description": "Beyond the list view: propagation (which revision each veil-agent acknowledged, and when) and usage (agent-reported placeholder counts per host, lastUsedAt).",
                    "responses": std_errors(json!({"200": ok("The secret", r("SecretDetail"))}), &[("404", "No such secret in the organization")])},
                "patch": {"operationId": "updateSecret", "summary": "Update a secret; omitted or null fields are unchanged, hosts [] makes it unrestricted (manage:secrets)",
                    "description": "Every change bumps revision and is pushed to the veil-agents at once. Without wait the answer comes after the push (bounded by agent.timeout_ms) and is 200 even if an agent did not acknowledge; with wait it is 200 only once no agent may still use an older revision (propagation.complete), else 504 — the change is stored either way and agents converge when they reconnect. Once an agent acknowledged, every request it sends upstream carries the new value.",
                    "parameters": [{"name": "wait", "in": "query", "required": false,
                        "description": "Wait up to this long (1 ms to 60 s; a plain number is seconds) for every veil-agent that holds or held the secret to acknowledge the new revision.",
                        "schema": {"type": "string", "pattern": "^[0-9.]+(ms|s)?$", "examples": ["500ms", "5s"]}}],
                    "requestBody": body(r("UpdateSecret")),
                    "responses": std_errors(json!({"200": ok("Updated (with wait: and acknowledged by every agent)", r("SecretDetail"))}), &[("404", "No such secret in the organization"), ("415", "Not JSON"), ("502", "wait: an agent reported it could not apply the change (stored anyway)"), ("504", "wait: not every agent acknowledged in time; the message names them; the change is stored")])},
                "delete": {"operationId": "deleteSecret", "summary": "Delete a secret (manage:secrets)",
                    "responses": std_errors(json!({"204": {"description": "Deleted"}}), &[("404", "No such secret in the organization")])}
            },
            "/sandbox/{sandboxId}": {
                "parameters": [sandbox_id.clone()],
                "put": {"operationId": "putSandbox", "summary": "Register or replace a sandbox (write:sandboxes)",
                    "requestBody": body(r("PutSandbox")),
                    "description": "Answers once every connected veil-agent acknowledged that the sandbox is enforced (programs attached, listener open). 400 also when the cgroup directory or netns file does not exist on the host (sandbox.check_paths). The answer carries env (ENV → placeholder) and caCertificate.",
                    "responses": std_errors(json!({"200": ok("Registered and enforced; env holds placeholders", r("Sandbox"))}), &[("404", "The id belongs to another organization"), ("409", "The cgroup is registered to another sandbox"), ("502", "A veil-agent could not enforce the sandbox; the message carries its report and the change was rolled back"), ("503", "agent.required is set and no agent is connected (nothing stored), or no agent acknowledged within agent.timeout_ms (the registration is kept and enforced when the agent catches up; retry to wait)")])},
                "get": {"operationId": "getSandbox", "summary": "Get a sandbox (write:sandboxes)",
                    "responses": std_errors(json!({"200": ok("The sandbox", r("Sandbox"))}), &[("404", "No such sandbox in the organization")])},
                "delete": {"operationId": "deleteSandbox", "summary": "Remove a sandbox (write:sandboxes)",
                    "description": "Removes the record, then answers once the agents acknowledged detaching everything for the sandbox.",
                    "responses": std_errors(json!({"204": {"description": "Removed and detached"}}), &[("404", "No such sandbox in the organization"), ("502", "Removed from the registry; a veil-agent reported a failure while detaching"), ("503", "Removed from the registry; no agent acknowledged the detach in time (it detaches when it catches up)")])}
            },
            "/sandbox/{sandboxId}/secrets": {
                "parameters": [sandbox_id],
                "put": {"operationId": "putSandboxSecrets", "summary": "Replace the mounted secrets; [] detaches all (write:sandboxes)",
                    "requestBody": body(json!({"type": "object", "required": ["secrets"], "properties": {"secrets": r("MountList")}})),
                    "responses": std_errors(json!({"200": ok("The sandbox, with the new mounts enforced", r("Sandbox"))}), &[("404", "No such sandbox in the organization"), ("502", "A veil-agent could not apply the mounts; rolled back"), ("503", "No agent connected (nothing changed) or none acknowledged in time (kept)")])},
                "get": {"operationId": "getSandboxSecrets", "summary": "Mounted secrets: env, placeholder, hosts — never a value (write:sandboxes)",
                    "responses": std_errors(json!({"200": ok("Mounted secrets", json!({"type": "array", "items": r("MountedSecret")}))}), &[("404", "No such sandbox in the organization")])}
            },
            "/audit": {
                "get": {"operationId": "listAudit", "summary": "The organization's audit log, values masked (read:audit)",
                    "parameters": [
                        query("cursor", json!({"type": "string"})),
                        query("limit", json!({"type": "integer", "minimum": 1, "maximum": 200, "default": 100})),
                        query("order", json!({"type": "string", "enum": ["asc", "desc"], "default": "desc"}))
                    ],
                    "responses": std_errors(json!({"200": ok("A page", r("AuditPage"))}), &[])}
            },
            "/api-keys": {
                "post": {"operationId": "createApiKey", "summary": "Create an API key in the caller's organization; the key is in `value`, shown once (admin)",
                    "requestBody": body(json!({"type": "object", "required": ["permissions"], "additionalProperties": false, "properties": {
                        "permissions": {"type": "array", "minItems": 1, "items": {"type": "string", "enum": ["manage:secrets", "write:sandboxes", "read:audit", "admin"]}}}})),
                    "responses": std_errors(json!({"201": ok("Created", r("ApiKey"))}), &[("415", "Not JSON")])},
                "get": {"operationId": "listApiKeys", "summary": "The organization's API keys, never their values (admin)",
                    "responses": std_errors(json!({"200": ok("Keys", json!({"type": "array", "items": r("ApiKey")}))}), &[])}
            },
            "/api-keys/{keyId}": {
                "parameters": [path_param("keyId")],
                "delete": {"operationId": "revokeApiKey", "summary": "Revoke an API key (admin)",
                    "responses": std_errors(json!({"204": {"description": "Revoked"}}), &[("404", "No such key in the organization")])}
            },
            "/openapi.json": {
                "get": {"operationId": "openapi", "summary": "This document (any valid API key)",
                    "responses": {"200": {"description": "OpenAPI 3.1"}, "401": err("Missing or invalid API key")}}
            }
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["statusCode", "message", "error"], "properties": {
                    "statusCode": {"type": "integer"}, "message": {"type": "string"}, "error": {"type": "string"}}},
                "Secret": {"type": "object", "required": ["id", "name", "placeholder", "hosts", "createdAt", "updatedAt"], "properties": {
                    "id": {"type": "string"}, "name": {"type": "string"}, "description": {"type": ["string", "null"]},
                    "placeholder": {"type": "string"}, "hosts": {"type": "array", "items": {"type": "string"}},
                    "createdAt": {"type": "string", "format": "date-time"}, "updatedAt": {"type": "string", "format": "date-time"},
                    "revision": {"type": "integer", "description": "veil: bumped on every change of the secret"},
                    "bodySubstitution": {"type": "boolean", "description": "veil: placeholders in request bodies are replaced too"},
                    "wrongHost": {"type": "string", "enum": ["forward", "block"], "description": "veil: the placeholder sent to a host the secret does not allow is forwarded unchanged (Daytona's behaviour) or the request is refused with 403 and audited as secret.blocked"}}},
                "SecretDetail": {"allOf": [r("Secret"), {"type": "object", "properties": {
                    "propagation": {"type": "object", "description": "veil: what the agents acknowledged (in memory in veil-control: after its restart every agent re-acknowledges through its snapshot)", "properties": {
                        "complete": {"type": "boolean", "description": "no agent may still use an older revision than revision"},
                        "agents": {"type": "array", "items": {"type": "object", "properties": {
                            "agentId": {"type": "string"},
                            "connected": {"type": "boolean", "description": "a disconnected agent keeps enforcing the revision it acknowledged"},
                            "acknowledgedRevision": {"type": ["integer", "null"], "description": "null = sent, not acknowledged yet"},
                            "acknowledgedAt": {"type": ["string", "null"], "format": "date-time"}}}}}},
                    "lastUsedAt": {"type": ["string", "null"], "format": "date-time", "description": "veil: last time an agent substituted the value (reported about once a second)"},
                    "usage": {"type": "object", "description": "veil: per host (the SNI): counts since creation, as the agents reported them", "additionalProperties": {"type": "object", "properties": {
                        "substituted": {"type": "integer"}, "wrongHost": {"type": "integer", "description": "placeholder sent to a host the secret does not allow (forwarded unchanged)"},
                        "hostMismatch": {"type": "integer", "description": "Host / :authority differed from the SNI (not substituted)"},
                        "blocked": {"type": "integer", "description": "requests refused (wrongHost: block)"},
                        "lastUsedAt": {"type": ["string", "null"], "format": "date-time"}, "lastSeenAt": {"type": ["string", "null"], "format": "date-time"}}}}}}]},
                "CreateSecret": {"type": "object", "required": ["name", "value"], "additionalProperties": false, "properties": {
                    "name": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_-]*$", "maxLength": 255},
                    "value": {"type": "string", "minLength": 1, "description": "at most 64 KiB; write-only"},
                    "description": {"type": ["string", "null"]},
                    "hosts": {"type": ["array", "null"], "items": {"type": "string"}, "description": "hostnames or *.wildcards; omitted or [] = unrestricted"},
                    "bodySubstitution": {"type": ["boolean", "null"], "description": "veil: default false"},
                    "wrongHost": {"type": ["string", "null"], "enum": ["forward", "block", null], "description": "veil: default forward"}}},
                "UpdateSecret": {"type": "object", "additionalProperties": false, "properties": {
                    "value": {"type": ["string", "null"]}, "description": {"type": ["string", "null"]},
                    "hosts": {"type": ["array", "null"], "items": {"type": "string"}},
                    "bodySubstitution": {"type": ["boolean", "null"]},
                    "wrongHost": {"type": ["string", "null"], "enum": ["forward", "block", null]}}},
                "SecretPage": {"type": "object", "required": ["items", "total", "nextCursor"], "properties": {
                    "items": {"type": "array", "items": r("Secret")}, "total": {"type": "integer"}, "nextCursor": {"type": ["string", "null"]}}},
                "MountList": {"type": "array", "items": {"type": "object", "minProperties": 1, "maxProperties": 1, "additionalProperties": {"type": "string"}},
                    "description": "[{\"ENV_VAR\": \"secret-name\"}, …]"},
                "PutSandbox": {"type": "object", "required": ["cgroup"], "additionalProperties": false, "properties": {
                    "cgroup": {"type": "string", "description": "cgroup v2 path under a configured parent"},
                    "netns": {"type": ["string", "null"], "description": "/run/netns/NAME or /proc/PID/ns/net"},
                    "egress": {"type": ["string", "null"], "enum": ["sandbox", "host", null], "default": "sandbox",
                        "description": "veil: where veil-agent opens the sandbox's upstream connections. sandbox (default): inside the sandbox's own netns (or the host's when it has none), so its routes, source address and firewall apply exactly as without veil. host: from the host netns through the agent's egress rules (loopback, link-local and cloud metadata, the host's own addresses, private and ULA ranges refused unless agent.egress_allow opens them), for a netns whose only way out is veil, as veil-control run --netns makes. Omitted or null = sandbox; changing it on a re-PUT applies to new connections at once"},
                    "secrets": r("MountList")}},
                "Sandbox": {"type": "object", "properties": {
                    "id": {"type": "string"}, "cgroup": {"type": "string"}, "netns": {"type": ["string", "null"]},
                    "egress": {"type": "string", "enum": ["sandbox", "host"], "description": "veil: where the agent opens its upstream connections (see PutSandbox)"},
                    "secrets": r("MountList"), "env": {"type": "object", "additionalProperties": {"type": "string"}, "description": "ENV → placeholder"},
                    "caCert": {"type": ["string", "null"], "description": "PEM of the CA the sandbox must trust (once an agent is linked); same as caCertificate"},
                    "caCertificate": {"type": ["string", "null"], "description": "PEM of veil-agent's interception CA, which the sandbox must trust; the last CA an agent reported (kept across restarts), null until one did"},
                    "createdAt": {"type": "string", "format": "date-time"}, "updatedAt": {"type": "string", "format": "date-time"}}},
                "MountedSecret": {"type": "object", "properties": {
                    "env": {"type": "string"}, "placeholder": {"type": "string"}, "hosts": {"type": "array", "items": {"type": "string"}},
                    "secretId": {"type": "string"}, "name": {"type": "string"}}},
                "ApiKey": {"type": "object", "properties": {
                    "id": {"type": "string"}, "organizationId": {"type": "string"},
                    "permissions": {"type": "array", "items": {"type": "string"}},
                    "createdAt": {"type": "string", "format": "date-time"},
                    "value": {"type": "string", "description": "the key; only in the creation response"}}},
                "AuditEntry": {"type": "object", "properties": {
                    "id": {"type": "string"}, "createdAt": {"type": "string", "format": "date-time"}, "actorKeyId": {"type": "string"},
                    "organizationId": {"type": "string"}, "action": {"type": "string"}, "targetType": {"type": "string"},
                    "targetId": {"type": "string"}, "targetName": {"type": ["string", "null"]},
                    "changes": {"type": "object", "description": "field → {from, to}; values are always ***. Agent reports (actor veil-agent:ID): secret.used {sandboxId, host, substituted, wrongHost, hostMismatch, blocked} aggregated per report interval (about 1 s) and (secret, sandbox, host), never per request; secret.blocked {sandboxId, host} per refused request"}}},
                "AuditPage": {"type": "object", "properties": {
                    "items": {"type": "array", "items": r("AuditEntry")}, "total": {"type": "integer"}, "nextCursor": {"type": ["string", "null"]}}}
            }
        }
    })
}
