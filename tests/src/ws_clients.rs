//! Real WebSocket clients for the websocket scenarios (issue 20): Python `websockets` (in the
//! pinned clients venv) and Node's `ws` (npm, installed once under `target/node-ws`) over
//! HTTP/1.1, and `veil-ws-h2` (tests/src/bin; hyper + tokio-tungstenite) over h2 extended
//! CONNECT, as neither Python nor Node has a client that speaks RFC 8441. All run
//! the same script: send each command as a text message, read the replies (until `done` for
//! `leak` and `big:N`, one reply otherwise, or the close), and write what they received — hex,
//! never printed — to a JSON file the test reads ([`WsRun`]). The Python client also knows
//! `wait`: send nothing, read until the connection closes.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::intercept_world::{InterceptWorld, Upstream, run_text};

/// The pinned `ws` release.
pub const NODE_WS: &str = "ws@8.18.3";

/// The Python client: `python client.py URL OUT CMD...`, the key in `$K`.
pub const PYTHON_CLIENT: &str = r#"
import json, os, sys
from websockets.sync.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
url, out_path, cmds = sys.argv[1], sys.argv[2], sys.argv[3:]
res = {"messages": [], "close": None, "error": None}
def rec(m):
    if isinstance(m, str):
        res["messages"].append({"t": "text", "hex": m.encode().hex()})
        return m
    res["messages"].append({"t": "binary", "hex": m.hex()})
    return None
try:
    with connect(url, additional_headers={"Authorization": "Bearer " + os.environ["K"]},
                 open_timeout=20, max_size=None) as ws:
        for cmd in cmds:
            if cmd != "wait":
                ws.send(cmd)
            while True:
                text = rec(ws.recv(timeout=20))
                if not (cmd in ("leak", "wait") or cmd.startswith("big:")) or text == "done":
                    break
        ws.close()
except ConnectionClosed as e:
    if e.rcvd is not None:
        res["close"] = {"code": e.rcvd.code, "reason": e.rcvd.reason.encode().hex()}
except InvalidStatus as e:
    res["error"] = "status %d" % e.response.status_code
except Exception as e:
    res["error"] = type(e).__name__
json.dump(res, open(out_path, "w"))
"#;

/// The Node client: `node client.js URL OUT CMD...`, the key in `$K`, `ws` from `$WS_MODULE`.
pub const NODE_CLIENT: &str = r#"
const fs = require('fs');
const WebSocket = require(process.env.WS_MODULE);
const [url, outPath, ...cmds] = process.argv.slice(2);
const res = {messages: [], close: null, error: null};
const queue = []; let waiter = null;
const push = (x) => { if (waiter) { const w = waiter; waiter = null; w(x); } else queue.push(x); };
const next = () => new Promise((r) => { if (queue.length) r(queue.shift()); else waiter = r; });
const ws = new WebSocket(url, {headers: {Authorization: 'Bearer ' + process.env.K}, perMessageDeflate: true});
ws.on('message', (data, isBinary) => push({t: isBinary ? 'binary' : 'text', hex: Buffer.from(data).toString('hex')}));
ws.on('unexpected-response', (req, r) => { res.error = 'status ' + r.statusCode; ws.terminate(); });
ws.on('error', (e) => { if (!res.error) res.error = e.code || 'error'; });
ws.on('close', (code, reason) => {
  if (code !== 1005 && code !== 1006) res.close = {code, reason: Buffer.from(reason).toString('hex')};
  push(null);
  fs.writeFileSync(outPath, JSON.stringify(res));
});
ws.on('open', async () => {
  for (const cmd of cmds) {
    ws.send(cmd);
    for (;;) {
      const m = await next();
      if (m === null) return;
      res.messages.push(m);
      const text = m.t === 'text' ? Buffer.from(m.hex, 'hex').toString() : null;
      if (!(cmd === 'leak' || cmd.startsWith('big:')) || text === 'done') break;
    }
  }
  ws.close(1000);
});
"#;

/// A real client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsClient {
    /// Python `websockets` (sync client).
    Python,
    /// Node `ws`.
    Node,
    /// `veil-ws-h2`: WebSocket over h2 extended CONNECT (falls back to HTTP/1.1 when the
    /// server resets the stream with `HTTP_1_1_REQUIRED`).
    RustH2,
}

/// What a client received. Debug prints sizes only (payloads may carry a value).
#[derive(Default)]
pub struct WsRun {
    /// Data messages: (is text, payload).
    pub messages: Vec<(bool, Vec<u8>)>,
    /// The close frame the client got: (code, reason).
    pub close: Option<(u16, Vec<u8>)>,
    /// The client's own failure, if any (a status, an error class).
    pub error: Option<String>,
    /// The reset that made the client fall back to HTTP/1.1 (`veil-ws-h2` only).
    pub fallback: Option<String>,
    /// Whether the client process exited 0.
    pub ok: bool,
    /// Its output, redacted by the caller's values.
    pub output: String,
}

impl std::fmt::Debug for WsRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lens: Vec<usize> = self.messages.iter().map(|m| m.1.len()).collect();
        f.debug_struct("WsRun")
            .field("message_lengths", &lens)
            .field("close_code", &self.close.as_ref().map(|c| c.0))
            .field("error", &self.error)
            .field("fallback", &self.fallback)
            .field("ok", &self.ok)
            .field("output", &self.output)
            .finish()
    }
}

impl WsRun {
    /// Every payload and the close reason, concatenated (for absence checks).
    pub fn all_bytes(&self) -> Vec<u8> {
        let mut all: Vec<u8> = self.messages.iter().flat_map(|m| m.1.clone()).collect();
        if let Some((_, reason)) = &self.close {
            all.extend_from_slice(reason);
        }
        all
    }

    /// The text messages, lossy.
    pub fn texts(&self) -> Vec<String> {
        self.messages
            .iter()
            .filter(|m| m.0)
            .map(|m| String::from_utf8_lossy(&m.1).into_owned())
            .collect()
    }
}

/// The `ws` module directory, installed once (under a lock) into `target/node-ws`.
pub fn node_ws() -> PathBuf {
    let target = crate::control::target_dir()
        .parent()
        .expect("target dir")
        .to_path_buf();
    let dir = target.join("node-ws");
    let module = dir.join("node_modules").join("ws");
    let marker = dir.join(format!(".installed-{NODE_WS}"));
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(target.join("node-ws.lock"))
        .unwrap_or_else(|e| panic!("open node-ws lock: {e}"));
    lock.lock().unwrap_or_else(|e| panic!("lock node-ws: {e}"));
    if !marker.exists() {
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir node-ws: {e}"));
        let out = Command::new("npm")
            .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .arg(NODE_WS)
            .output()
            .unwrap_or_else(|e| panic!("npm is missing ({e}): run `cargo xtask test`"));
        assert!(
            out.status.success(),
            "npm install {NODE_WS}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(&marker, b"").unwrap_or_else(|e| panic!("write marker: {e}"));
    }
    module
}

/// Runs `client` in sandbox `sb` of `w` against `url` with `key` in the Authorization header,
/// sending `cmds`; `redact` values are removed from its output.
pub fn run_client<U: Upstream>(
    w: &InterceptWorld<U>,
    sb: usize,
    client: WsClient,
    url: &str,
    key: &str,
    cmds: &[&str],
    redact: &[&str],
) -> WsRun {
    let dir = w.scratch();
    let out = dir.join(format!(
        "ws-{client:?}-{}.json",
        crate::control::random_token(8)
    ));
    let (program, script) = match client {
        WsClient::Python => {
            let script = write(dir, "ws_client.py", PYTHON_CLIENT);
            (crate::clients::python_clients(), script)
        }
        WsClient::Node => {
            let script = write(dir, "ws_client.js", NODE_CLIENT);
            (crate::clients::node(), script)
        }
        WsClient::RustH2 => (crate::env::bin_path("veil-ws-h2"), PathBuf::new()),
    };
    let mut cmd = w.command(sb, program.to_str().expect("path"));
    if client != WsClient::RustH2 {
        cmd.arg(&script);
    }
    cmd.arg(url).arg(&out).args(cmds).env("K", key);
    if client == WsClient::Node {
        cmd.env("WS_MODULE", node_ws());
    }
    let (ok, mut output) = run_text(&mut cmd);
    for v in redact {
        output = output.replace(v, "<VALUE!>");
    }
    let mut run = WsRun {
        ok,
        output,
        ..WsRun::default()
    };
    let Ok(text) = std::fs::read_to_string(&out) else {
        run.error = Some("the client wrote no result".into());
        return run;
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let hex = |v: &serde_json::Value| hex::decode(v.as_str().unwrap_or("")).unwrap_or_default();
    for m in v["messages"].as_array().into_iter().flatten() {
        run.messages.push((m["t"] == "text", hex(&m["hex"])));
    }
    if let Some(c) = v["close"].as_object() {
        let code = c
            .get("code")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        let reason = c.get("reason").map(hex).unwrap_or_default();
        run.close = Some((u16::try_from(code).unwrap_or(0), reason));
    }
    run.error = v["error"].as_str().map(str::to_owned);
    run.fallback = v["fallback"].as_str().map(str::to_owned);
    run
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {name}: {e}"));
    path
}
