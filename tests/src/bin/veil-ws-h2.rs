//! `veil-ws-h2`: a WebSocket client over h2 extended CONNECT (RFC 8441), run inside sandboxes
//! by the websocket scenarios (issue 20) — no Python or Node client speaks it.
//!
//! ```text
//! veil-ws-h2 URL OUT CMD...      (the key in $K, the CA bundle in $SSL_CERT_FILE)
//! ```
//!
//! It connects offering only `h2`, waits for the server's SETTINGS, and opens the WebSocket
//! with `CONNECT :protocol websocket` and `Authorization: Bearer $K`; then it runs the same
//! script as the Python client of `veil_tests::ws_clients` and writes the same JSON to OUT
//! (payloads in hex, never printed). `error` is `no extended CONNECT` when the server did not
//! enable it, `status N` on a refusal, `reset REASON` when the stream was reset. When the reset
//! is `HTTP_1_1_REQUIRED` it does what browsers do: opens the WebSocket again over HTTP/1.1
//! (an `Upgrade`), and records `"fallback": "HTTP_1_1_REQUIRED"`.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::Role;

/// Bound on each step (connect, settings, each message).
const STEP: Duration = Duration::from_secs(20);

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, out, cmds @ ..] = args.as_slice() else {
        bail!("usage: veil-ws-h2 URL OUT CMD...");
    };
    let key = std::env::var("K").context("$K (the key) is not set")?;
    let mut res = json!({"messages": [], "close": null, "error": null});
    match open_h2(url, &key).await {
        Ok(Opened::H2(ws)) => script(*ws, cmds, &mut res).await,
        Ok(Opened::Http11Required) => {
            res["fallback"] = json!("HTTP_1_1_REQUIRED");
            match open_h1(url, &key).await {
                Ok(ws) => script(ws, cmds, &mut res).await,
                Err(e) => res["error"] = json!(format!("fallback: {e}")),
            }
        }
        Err(e) => res["error"] = json!(e.to_string()),
    }
    std::fs::write(out, serde_json::to_vec(&res)?).context("writing the result")?;
    Ok(())
}

enum Opened<S> {
    H2(Box<WebSocketStream<S>>),
    /// The server reset the stream with `HTTP_1_1_REQUIRED`.
    Http11Required,
}

/// TLS to the URL's host (resolved by the system, trusting `$SSL_CERT_FILE`) offering `alpn`.
async fn tls(
    url: &hyper::Uri,
    alpn: &[u8],
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let host = url.host().context("URL without host")?.to_owned();
    let port = url.port_u16().unwrap_or(443);
    let bundle = std::env::var("SSL_CERT_FILE").context("$SSL_CERT_FILE is not set")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&bundle).context("reading the CA bundle")? {
        roots.add(cert.context("a CA certificate")?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::time::timeout(STEP, TcpStream::connect((host.as_str(), port)))
        .await
        .context("connect timed out")??;
    let name = ServerName::try_from(host)?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .context("TLS handshake")?;
    Ok(tls)
}

async fn open_h2(
    url: &str,
    key: &str,
) -> anyhow::Result<Opened<TokioIo<hyper::upgrade::Upgraded>>> {
    let ws_url: hyper::Uri = url.parse().context("URL")?;
    let tls = tls(&ws_url, b"h2").await?;
    if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
        bail!("the server did not choose h2");
    }
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tls))
        .await
        .context("h2 handshake")?;
    // RFC 8441 §3: :protocol only once the server's SETTINGS enabled it. They are its first
    // frame: drive the connection until they are in (or it ends, or a bounded while passes).
    let mut conn = Box::pin(conn);
    let settings = std::future::poll_fn(|cx| {
        if conn.is_extended_connect_protocol_enabled() {
            return Poll::Ready(true);
        }
        match conn.as_mut().poll(cx) {
            Poll::Ready(_) => Poll::Ready(false),
            Poll::Pending => match conn.is_extended_connect_protocol_enabled() {
                true => Poll::Ready(true),
                false => Poll::Pending,
            },
        }
    });
    let enabled = tokio::time::timeout(Duration::from_secs(5), settings).await;
    tokio::spawn(conn);
    if enabled != Ok(true) {
        bail!("no extended CONNECT");
    }
    // https://host:port/path: the :scheme, :authority and :path of the extended CONNECT.
    let target = format!(
        "https://{}{}",
        ws_url.authority().context("URL without authority")?,
        ws_url.path_and_query().map_or("/", |p| p.as_str())
    );
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(target)
        .header("sec-websocket-version", "13")
        .header("sec-websocket-extensions", "permessage-deflate")
        .header("authorization", format!("Bearer {key}"))
        .body(Empty::<Bytes>::new())?;
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    send.ready().await.context("h2 connection")?;
    let resp = match tokio::time::timeout(STEP, send.send_request(req))
        .await
        .context("no answer to the CONNECT")?
    {
        Ok(resp) => resp,
        Err(e) => {
            return match reset_reason(&e) {
                Some(h2::Reason::HTTP_1_1_REQUIRED) => Ok(Opened::Http11Required),
                Some(reason) => Err(anyhow!("reset {reason:?}")),
                None => Err(anyhow!("request failed: {e}")),
            };
        }
    };
    if resp.status() != StatusCode::OK {
        bail!("status {}", resp.status().as_u16());
    }
    let upgraded = hyper::upgrade::on(resp).await.context("upgrade")?;
    let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    Ok(Opened::H2(Box::new(ws)))
}

async fn open_h1(
    url: &str,
    key: &str,
) -> anyhow::Result<WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>> {
    let ws_url: hyper::Uri = url.parse().context("URL")?;
    let tls = tls(&ws_url, b"http/1.1").await?;
    let mut req = url.into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {key}").parse()?);
    let (ws, _) = tokio::time::timeout(STEP, tokio_tungstenite::client_async(req, tls))
        .await
        .context("h1 handshake timed out")??;
    Ok(ws)
}

fn reset_reason(e: &hyper::Error) -> Option<h2::Reason> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason();
        }
        cur = err.source();
    }
    None
}

/// Sends each command as a text message and reads the replies, like the Python client:
/// until `done` for `leak`, `big:N` and `wait` (which sends nothing), one reply otherwise.
async fn script<S>(mut ws: WebSocketStream<S>, cmds: &[String], res: &mut Value)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for cmd in cmds {
        if cmd != "wait" && ws.send(Message::Text(cmd.as_str().into())).await.is_err() {
            res["error"] = json!("send failed");
            return;
        }
        loop {
            let msg = match tokio::time::timeout(STEP, ws.next()).await {
                Err(_) => {
                    res["error"] = json!("TimeoutError");
                    return;
                }
                Ok(None) => return,
                Ok(Some(Err(e))) => {
                    res["error"] = json!(format!("websocket: {e}"));
                    return;
                }
                Ok(Some(Ok(msg))) => msg,
            };
            let text = match msg {
                Message::Text(t) => {
                    push(res, "text", t.as_bytes());
                    Some(t.to_string())
                }
                Message::Binary(b) => {
                    push(res, "binary", &b);
                    None
                }
                Message::Close(frame) => {
                    if let Some(f) = frame {
                        res["close"] = json!({
                            "code": u16::from(f.code),
                            "reason": hex::encode(f.reason.as_bytes()),
                        });
                    }
                    // Answer the close; the stream then ends.
                    while let Some(Ok(_)) = ws.next().await {}
                    return;
                }
                _ => continue,
            };
            let many = cmd == "leak" || cmd == "wait" || cmd.starts_with("big:");
            if !many || text.as_deref() == Some("done") {
                break;
            }
        }
    }
    let _ = ws.close(None).await;
    while let Some(Ok(_)) = ws.next().await {}
}

fn push(res: &mut Value, kind: &str, payload: &[u8]) {
    if let Some(list) = res["messages"].as_array_mut() {
        list.push(json!({"t": kind, "hex": hex::encode(payload)}));
    }
}
