//! gRPC-shaped calls through interception (issue 20): unary and server-streaming over h2 with the
//! credential in `authorization` metadata; the trailers (`grpc-status`, `grpc-message`) reach the
//! client intact, the value in `grpc-message` scrubbed. Two clients: Python's `h2` (hyper-h2,
//! the HTTP/2 stack under httpx) driven directly, which shows the raw trailers, and grpcio (the
//! gRPC client, generic stubs on raw bytes), which shows what an application sees: status code
//! and details, for OK and for a failed call.

use serde_json::json;
use veil_tests::clients::python_clients;
use veil_tests::control::random_token;
use veil_tests::grpc_upstream::GrpcUpstream;
use veil_tests::intercept_world::{InterceptWorld, Upstream as _, run_text};

const ALLOWED: &str = "api.allowed.test";

const CLIENT: &str = r#"
import json, os, socket, ssl, sys
import h2.config, h2.connection, h2.events
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context()
ctx.set_alpn_protocols(["h2"])
s = ctx.wrap_socket(socket.create_connection((host, port), timeout=20), server_hostname=host)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
c.initiate_connection()
sid = c.get_next_available_stream_id()
c.send_headers(sid, [(":method", "POST"), (":scheme", "https"), (":authority", "%s:%d" % (host, port)),
                     (":path", path), ("content-type", "application/grpc"), ("te", "trailers"),
                     ("authorization", "Bearer " + os.environ["K"])])
c.send_data(sid, b"\x00\x00\x00\x00\x02{}", end_stream=True)
s.sendall(c.data_to_send())
res = {"alpn": s.selected_alpn_protocol(), "headers": {}, "data": "", "trailers": {}, "ended": False}
while not res["ended"]:
    d = s.recv(65535)
    if not d:
        break
    for e in c.receive_data(d):
        if isinstance(e, h2.events.ResponseReceived):
            res["headers"] = dict(e.headers)
        elif isinstance(e, h2.events.DataReceived):
            res["data"] += e.data.decode("latin-1")
            c.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        elif isinstance(e, h2.events.TrailersReceived):
            res["trailers"] = dict(e.headers)
        elif isinstance(e, h2.events.StreamEnded):
            res["ended"] = True
        elif isinstance(e, h2.events.StreamReset):
            res["reset"] = e.error_code
            res["ended"] = True
    s.sendall(c.data_to_send())
print(json.dumps(res))
"#;

#[test]
fn unary_and_server_streaming_calls_keep_their_trailers_scrubbed() {
    let value = format!("sk-test-{}", random_token(40));
    let v = value.clone();
    let mut w = InterceptWorld::builder("grpc test CA", &[ALLOWED])
        .start_with(move |ns, ip, ca, names| GrpcUpstream::start(ns, ip, ca, names, v));
    let key = w.secret_valued("grpc-key", value.clone(), &[ALLOWED], json!({}));
    let sb = w.add_sandbox("grpc", &[("K", "grpc-key")]);
    let python = python_clients();
    let port = w.up.addr().port().to_string();
    for (path, messages) in [("/echo.Echo/Unary", 1), ("/echo.Echo/Stream", 3)] {
        let mut cmd = w.command(sb, python.to_str().expect("path"));
        cmd.args(["-c", CLIENT, ALLOWED, &port, path])
            .env("K", &key.placeholder);
        let (ok, out) = run_text(&mut cmd);
        let out = out.replace(&value, "<VALUE!>");
        assert!(ok, "{path}: {out}");
        assert!(
            !out.contains("<VALUE!>"),
            "{path}: the value reached the sandbox: {out}"
        );
        let line = out.lines().find(|l| l.starts_with('{')).unwrap_or_default();
        let res: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        assert_eq!(res["alpn"], "h2", "{path}: {out}");
        assert_eq!(res["ended"], true, "{path}: {out}");
        // The upstream authenticated the substituted metadata: status 0, not 16.
        assert_eq!(res["trailers"]["grpc-status"], "0", "{path}: {out}");
        assert_eq!(
            res["trailers"]["grpc-message"],
            format!("done for {}", key.placeholder),
            "{path}: {out}"
        );
        let data = res["data"].as_str().unwrap_or_default();
        assert_eq!(
            data.matches(&key.placeholder).count(),
            messages,
            "{path}: {out}"
        );
    }
}

/// grpcio with generic stubs (raw bytes, no protobuf): unary, server-streaming and a denied
/// unary call; prints one JSON line with each call's code, details and payloads (latin-1).
const GRPCIO_CLIENT: &str = r#"
import json, os, sys
import grpc
host, port = sys.argv[1], sys.argv[2]
roots = open(os.environ["SSL_CERT_FILE"], "rb").read()
md = (("authorization", "Bearer " + os.environ["K"]),)
req = b"{}"
res = {}
with grpc.secure_channel("%s:%s" % (host, port), grpc.ssl_channel_credentials(roots)) as ch:
    unary = ch.unary_unary("/echo.Echo/Unary")
    reply, call = unary.with_call(req, metadata=md, timeout=20)
    res["unary"] = {"code": call.code().name, "details": call.details(),
                    "data": [reply.decode("latin-1")]}
    stream = ch.unary_stream("/echo.Echo/Stream")(req, metadata=md, timeout=20)
    data = [m.decode("latin-1") for m in stream]
    res["stream"] = {"code": stream.code().name, "details": stream.details(), "data": data}
    for name in ("Denied", "Compressed"):
        try:
            ch.unary_unary("/echo.Echo/" + name)(req, metadata=md, timeout=20)
            res[name] = {"code": "OK"}
        except grpc.RpcError as e:
            res[name] = {"code": e.code().name, "details": e.details()}
print(json.dumps(res))
"#;

#[test]
fn grpcio_unary_streaming_and_failed_calls_see_status_and_scrubbed_details() {
    let value = format!("sk-test-{}", random_token(40));
    let v = value.clone();
    let mut w = InterceptWorld::builder("grpcio test CA", &[ALLOWED])
        .start_with(move |ns, ip, ca, names| GrpcUpstream::start(ns, ip, ca, names, v));
    let key = w.secret_valued("grpc-key", value.clone(), &[ALLOWED], json!({}));
    let sb = w.add_sandbox("grpcio", &[("K", "grpc-key")]);
    let python = python_clients();
    let port = w.up.addr().port().to_string();
    let mut cmd = w.command(sb, python.to_str().expect("path"));
    // getaddrinfo (the sandbox's /etc/hosts), not c-ares.
    cmd.args(["-c", GRPCIO_CLIENT, ALLOWED, &port])
        .env("K", &key.placeholder)
        .env("GRPC_DNS_RESOLVER", "native");
    let (ok, out) = run_text(&mut cmd);
    let out = out.replace(&value, "<VALUE!>");
    assert!(
        !out.contains("<VALUE!>"),
        "grpcio: the value reached the sandbox: {out}"
    );
    assert!(ok, "grpcio: {out}");
    let line = out.lines().find(|l| l.starts_with('{')).unwrap_or_default();
    let res: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
    let ph = &key.placeholder;
    // The upstream authenticated the substituted metadata (else UNAUTHENTICATED), each message
    // arrived whole with the placeholder (re-framed: the placeholder is longer than the value).
    // grpcio does not show an OK call's grpc-message; the failed call's is scrubbed.
    for (call, messages) in [("unary", 1), ("stream", 3)] {
        assert_eq!(res[call]["code"], "OK", "{call}: {out}");
        let data = res[call]["data"].as_array().cloned().unwrap_or_default();
        assert_eq!(data.len(), messages, "{call}: {out}");
        for (i, m) in data.iter().enumerate() {
            assert_eq!(
                m.as_str().unwrap_or_default(),
                format!("{{\"n\": {i}, \"key\": \"{ph}\"}}"),
                "{call}: {out}"
            );
        }
    }
    assert_eq!(res["Denied"]["code"], "PERMISSION_DENIED", "{out}");
    assert_eq!(
        res["Denied"]["details"],
        format!("denied for {ph}"),
        "{out}"
    );
    // A compressed message (never negotiated) is not passed: the call fails with veil's status.
    assert_eq!(res["Compressed"]["code"], "INTERNAL", "{out}");
    let details = res["Compressed"]["details"].as_str().unwrap_or_default();
    assert!(
        details.starts_with("veil: a compressed gRPC message"),
        "{out}"
    );
}

/// A grpcio server-streaming call that prints `FIRST` after its first message, then waits for
/// the rest and prints one JSON line with the code and every message (latin-1).
const GRPCIO_LATER: &str = r#"
import json, os, sys
import grpc
host, port = sys.argv[1], sys.argv[2]
roots = open(os.environ["SSL_CERT_FILE"], "rb").read()
md = (("authorization", "Bearer " + os.environ["K"]),)
with grpc.secure_channel("%s:%s" % (host, port), grpc.ssl_channel_credentials(roots)) as ch:
    stream = ch.unary_stream("/echo.Echo/Later")(b"{}", metadata=md, timeout=30)
    data = []
    for m in stream:
        data.append(m.decode("latin-1"))
        if len(data) == 1:
            print("FIRST", flush=True)
    print(json.dumps({"code": stream.code().name, "data": data}), flush=True)
"#;

/// A rotation while a gRPC response streams: an upstream that echoes the NEW value in a later
/// message of the same call gets it scrubbed, as the body scrubber does for any other response.
#[test]
fn a_rotation_during_a_grpc_stream_is_scrubbed_from_its_later_messages() {
    use std::io::{BufRead as _, BufReader, Read as _};
    use std::process::Stdio;

    let old = format!("sk-test-{}", random_token(40));
    let new = format!("sk-test-{}", random_token(40));
    let v = old.clone();
    let mut w = InterceptWorld::builder("grpc rotation test CA", &[ALLOWED])
        .start_with(move |ns, ip, ca, names| GrpcUpstream::start(ns, ip, ca, names, v));
    let key = w.secret_valued("grpc-key", old.clone(), &[ALLOWED], json!({}));
    let sb = w.add_sandbox("grpcrot", &[("K", "grpc-key")]);
    let python = python_clients();
    let port = w.up.addr().port().to_string();
    let mut cmd = w.command(sb, python.to_str().expect("path"));
    cmd.args(["-c", GRPCIO_LATER, ALLOWED, &port])
        .env("K", &key.placeholder)
        .env("GRPC_DNS_RESOLVER", "native")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn the grpcio client");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    out.read_line(&mut first)
        .expect("read the client's first line");
    let first = first.replace(&old, "<OLD!>");
    assert_eq!(first.trim(), "FIRST", "the first message did not arrive");

    // Rotate while the call is open; once every agent acknowledged, the upstream echoes the
    // new value in the call's second message.
    let (api, admin) = (w.veil.api(), w.veil.key().to_owned());
    let path = format!("/secret/{}?wait=5s", key.id);
    let (status, answer) = w
        .veil
        .block_on(api.patch(&path, &admin, json!({ "value": new })));
    assert_eq!(status, 200, "rotation: {answer}");
    assert_eq!(answer["propagation"]["complete"], true, "{answer}");
    w.up.release(new.clone());

    let mut rest = String::new();
    out.read_to_string(&mut rest)
        .expect("read the client's output");
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let ok = child.wait().expect("wait for the client").success();
    let shown = format!("{rest}{err}")
        .replace(&new, "<NEW VALUE!>")
        .replace(&old, "<OLD VALUE!>");
    assert!(
        !shown.contains("<NEW VALUE!>"),
        "the rotated-in value reached the sandbox in a later gRPC message: {shown}"
    );
    assert!(
        !shown.contains("<OLD VALUE!>"),
        "the old value reached the sandbox: {shown}"
    );
    assert!(ok, "grpcio: {shown}");
    let line = rest
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_default();
    let res: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
    assert_eq!(res["code"], "OK", "{shown}");
    let ph = &key.placeholder;
    let data = res["data"].as_array().cloned().unwrap_or_default();
    let expected: Vec<String> = (0..2)
        .map(|i| format!("{{\"n\": {i}, \"key\": \"{ph}\"}}"))
        .collect();
    let got: Vec<&str> = data.iter().filter_map(|m| m.as_str()).collect();
    assert_eq!(got, expected, "{shown}");
}
