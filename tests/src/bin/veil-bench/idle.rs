//! `veil-bench client-idle ADDR --count N --header 'name: value'`: opens N TLS connections to
//! ADDR (SNI [`crate::peers::HOST`]), sends one HTTP/1.1 request on each and reads its answer,
//! then holds them all open, idle. It prints `ready <n>` once every connection has been
//! answered and exits (closing them) when its stdin closes. The benchmark measures the
//! proxy's memory in between.
//!
//! The client does not verify certificates: it talks to veil, nginx and mitmproxy, each with
//! its own CA, and measures memory, not trust.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS client config that accepts any server certificate, offering HTTP/1.1 only.
pub fn insecure_client_config() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
                .with_no_client_auth()
        })
        .unwrap_or_else(|e| panic!("TLS client config: {e}"));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Reads one HTTP/1.1 `200` response (Content-Length or chunked body); returns the body.
pub async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Result<Vec<u8>> {
    let mut r = Reader {
        s,
        buf: Vec::with_capacity(4096),
    };
    let head_end = r.until(b"\r\n\r\n").await?;
    let head = String::from_utf8_lossy(&r.buf[..head_end]).to_ascii_lowercase();
    r.buf.drain(..head_end);
    if !head.starts_with("http/1.1 200") {
        bail!("unexpected response: {}", head.lines().next().unwrap_or(""));
    }
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
    };
    if header("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
        let mut body = Vec::new();
        loop {
            let line_end = r.until(b"\r\n").await?;
            let line = String::from_utf8_lossy(&r.buf[..line_end - 2]).into_owned();
            r.buf.drain(..line_end);
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .with_context(|| format!("bad chunk size {line:?}"))?;
            if size == 0 {
                // Trailers (if any) end with an empty line.
                loop {
                    let end = r.until(b"\r\n").await?;
                    r.buf.drain(..end);
                    if end == 2 {
                        return Ok(body);
                    }
                }
            }
            r.fill(size + 2).await?;
            body.extend_from_slice(&r.buf[..size]);
            r.buf.drain(..size + 2);
        }
    }
    let len: usize = header("content-length:")
        .and_then(|v| v.parse().ok())
        .context("response without content-length or chunked body")?;
    r.fill(len).await?;
    let mut body = std::mem::take(&mut r.buf);
    if body.len() > len {
        bail!("bytes after the response body");
    }
    body.truncate(len);
    Ok(body)
}

/// A read buffer over a stream (responses are read one at a time, nothing pipelined).
struct Reader<'a, S> {
    s: &'a mut S,
    buf: Vec<u8>,
}

impl<S: tokio::io::AsyncRead + Unpin> Reader<'_, S> {
    /// Reads until `buf` holds `n` bytes.
    async fn fill(&mut self, n: usize) -> Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        while self.buf.len() < n {
            let got = self.s.read(&mut chunk).await?;
            if got == 0 {
                bail!("connection closed inside a response");
            }
            self.buf.extend_from_slice(&chunk[..got]);
        }
        Ok(())
    }

    /// Reads until `buf` contains `delim`; returns the index just past it.
    async fn until(&mut self, delim: &[u8]) -> Result<usize> {
        loop {
            if let Some(i) = self.buf.windows(delim.len()).position(|w| w == delim) {
                return Ok(i + delim.len());
            }
            if self.buf.len() > 256 * 1024 {
                bail!("response head or chunk line over 256 KiB");
            }
            let n = self.buf.len() + 1;
            self.fill(n).await?;
        }
    }
}

/// The `client-idle` subcommand.
pub fn client(addr: SocketAddr, count: u64, header: &str) -> Result<()> {
    crate::host::raise_nofile();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let config = insecure_client_config();
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\n{header}\r\n\r\n",
        crate::peers::HOST
    );
    let conns = rt.block_on(async {
        let connector = tokio_rustls::TlsConnector::from(config);
        let mut tasks = Vec::new();
        // Paced, so that no proxy sees a thousand handshakes at once.
        for _ in 0..count {
            let connector = connector.clone();
            let request = request.clone();
            tasks.push(tokio::spawn(async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = ServerName::try_from(crate::peers::HOST)?;
                let mut tls = connector.connect(name, tcp).await?;
                tls.write_all(request.as_bytes()).await?;
                read_response(&mut tls).await?;
                anyhow::Ok(tls)
            }));
            if tasks.len() % 50 == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        let mut conns = Vec::new();
        for t in tasks {
            conns.push(t.await??);
        }
        anyhow::Ok(conns)
    })?;
    let mut out = std::io::stdout();
    writeln!(out, "ready {}", conns.len())?;
    out.flush()?;
    // Hold them until the parent is done measuring.
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    drop(conns);
    Ok(())
}
