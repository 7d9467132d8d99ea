//! The client side of the admin API, used by the `ca-server` subcommands that act on a running
//! server: TLS 1.3 with the operator's certificate, the server checked against the CA
//! certificate.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::ops::AdminProblem;
use crate::tls::{load_chain, load_key, provider};

/// How long one admin request may take.
const TIMEOUT: Duration = Duration::from_secs(120);

/// A connection recipe for the admin API.
#[derive(Clone)]
pub struct AdminClient {
    host: String,
    port: u16,
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

/// A response: status and body.
#[derive(Debug, Clone)]
pub struct AdminResponse {
    /// HTTP status.
    pub status: StatusCode,
    /// Body.
    pub body: Vec<u8>,
}

impl AdminResponse {
    /// The body as `T` if the status is a success, else the server's problem as an error.
    pub fn json<T: for<'de> serde::Deserialize<'de>>(&self) -> Result<T, String> {
        self.ok()?;
        serde_json::from_slice(&self.body)
            .map_err(|e| format!("the server's answer does not decode: {e}"))
    }

    /// An error naming the server's problem unless the status is a success.
    pub fn ok(&self) -> Result<(), String> {
        if self.status.is_success() {
            return Ok(());
        }
        match serde_json::from_slice::<AdminProblem>(&self.body) {
            Ok(p) => Err(format!("{} {}: {}", p.status, p.title, p.detail)),
            Err(_) => Err(format!(
                "{}: {}",
                self.status,
                String::from_utf8_lossy(&self.body).trim()
            )),
        }
    }
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl AdminClient {
    /// A client for `url` (`https://HOST:PORT`), trusting `ca_cert` for the server and
    /// presenting `cert` and `key`.
    pub fn new(url: &str, ca_cert: &Path, cert: &Path, key: &Path) -> Result<Self, String> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| format!("--admin {url:?}: must start with https://"))?
            .trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h.trim_start_matches('[').trim_end_matches(']').to_string(),
                p.parse::<u16>()
                    .map_err(|_| format!("--admin {url:?}: bad port {p:?}"))?,
            ),
            _ => (rest.to_string(), 8445),
        };
        if host.is_empty() {
            return Err(format!("--admin {url:?}: no host"));
        }
        let mut roots = rustls::RootCertStore::empty();
        for c in load_chain(ca_cert)? {
            roots
                .add(c)
                .map_err(|e| format!("{}: {e}", ca_cert.display()))?;
        }
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(load_chain(cert)?, load_key(key)?)
            .map_err(|e| format!("{} with {}: {e}", cert.display(), key.display()))?;
        let server_name =
            ServerName::try_from(host.clone()).map_err(|e| format!("--admin {url:?}: {e}"))?;
        Ok(AdminClient {
            host,
            port,
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// One request on a new connection.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<AdminResponse, String> {
        tokio::time::timeout(TIMEOUT, self.request_inner(method, path, body))
            .await
            .map_err(|_| {
                format!(
                    "no answer from {}:{} within {TIMEOUT:?}",
                    self.host, self.port
                )
            })?
    }

    async fn request_inner(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<AdminResponse, String> {
        let at = format!("{}:{}", self.host, self.port);
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| {
                format!("admin API at {at}: {e} (is `ca-server serve` running with --admin?)")
            })?;
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| format!("admin API at {at}: TLS: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("admin API at {at}: {e}"))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", at.as_str())
            .header("accept", "application/json");
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| {
            // A refused handshake shows up here in TLS 1.3 (the server checks the client's
            // certificate after the client considers the handshake done).
            format!("admin API at {at}: {e}; the server may have refused the operator certificate")
        })?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("admin API at {at}: {e}"))?
            .to_bytes()
            .to_vec();
        driver.abort();
        Ok(AdminResponse { status, body })
    }
}
