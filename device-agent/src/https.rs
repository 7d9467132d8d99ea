//! The HTTPS transport: a new TLS connection per request, as a device makes, verifying the
//! server against the pinned CA certificate.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use protocol_spec::Problem;
use protocol_spec::messages::EnrollResponse;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

use crate::AgentError;
use crate::url::CaUrl;

/// Time allowed for one request, connection and TLS included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// An HTTPS client for one CA.
#[derive(Clone)]
pub struct HttpsClient {
    url: CaUrl,
    tls: TlsConnector,
    server_name: ServerName<'static>,
    source: Option<IpAddr>,
}

impl std::fmt::Debug for HttpsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsClient")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// A raw HTTP answer.
#[derive(Debug)]
pub struct HttpAnswer {
    /// Status code.
    pub status: u16,
    /// Content-Type, if any.
    pub content_type: String,
    /// Every header of the answer.
    pub headers: hyper::HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl HttpsClient {
    /// A client for `url` that trusts only `ca_der` (and, optionally, presents a client
    /// certificate: see [`HttpsClient::with_config`]).
    pub fn new(url: CaUrl, ca_der: &[u8]) -> Result<Self, AgentError> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca_der.to_vec()))
            .map_err(|e| AgentError::Invalid(format!("CA certificate: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| AgentError::Invalid(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self::with_config(url, Arc::new(config))
    }

    /// A client with a prepared rustls configuration.
    pub fn with_config(url: CaUrl, config: Arc<rustls::ClientConfig>) -> Result<Self, AgentError> {
        let server_name = ServerName::try_from(url.host.clone())
            .map_err(|e| AgentError::Invalid(format!("host {:?}: {e}", url.host)))?;
        Ok(HttpsClient {
            url,
            tls: TlsConnector::from(config),
            server_name,
            source: None,
        })
    }

    /// The same client, connecting from `source` (a load generator spreads its connections over
    /// 127.0.0.0/8 so that a million connections do not run out of ephemeral ports).
    pub fn with_source(&self, source: IpAddr) -> Self {
        HttpsClient {
            source: Some(source),
            ..self.clone()
        }
    }

    async fn connect(&self) -> std::io::Result<TcpStream> {
        let Some(source) = self.source else {
            return TcpStream::connect(self.url.authority()).await;
        };
        let target = tokio::net::lookup_host(self.url.authority())
            .await?
            .find(|a| a.is_ipv4() == source.is_ipv4())
            .ok_or_else(|| std::io::Error::other("no address of the source's family"))?;
        let socket = if source.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(source, 0))?;
        socket.connect(target).await
    }

    /// One request on a fresh connection.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        accept: &str,
        body: Vec<u8>,
    ) -> Result<HttpAnswer, AgentError> {
        tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.request_inner(method, path, content_type, accept, body),
        )
        .await
        .map_err(|_| AgentError::Transport(format!("{} timed out", self.url.authority())))?
    }

    async fn request_inner(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        accept: &str,
        body: Vec<u8>,
    ) -> Result<HttpAnswer, AgentError> {
        let mut session = self.open_session().await?;
        session
            .request(method, path, content_type, accept, body)
            .await
    }

    /// A connection kept open for several requests (a device fetching and acknowledging its
    /// secret makes one handshake, not two).
    pub async fn session(&self) -> Result<HttpsSession, AgentError> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.open_session())
            .await
            .map_err(|_| AgentError::Transport(format!("{} timed out", self.url.authority())))?
    }

    async fn open_session(&self) -> Result<HttpsSession, AgentError> {
        let authority = self.url.authority();
        let t = |e: &dyn std::fmt::Display| AgentError::Transport(format!("{authority}: {e}"));
        let tcp = self.connect().await.map_err(|e| t(&e))?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| {
                // A certificate problem is not going to fix itself.
                if e.to_string().contains("certificate") {
                    AgentError::Verify(format!("TLS: {e}"))
                } else {
                    t(&e)
                }
            })?;
        let io_error = Arc::new(std::sync::Mutex::new(None));
        let tls = Remembering {
            inner: tls,
            error: io_error.clone(),
        };
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| t(&e))?;
        let conn = tokio::spawn(async move { conn.await.map_err(|e| connection_error(&e)) });
        Ok(HttpsSession {
            sender,
            authority,
            conn: Some(conn),
            io_error,
        })
    }

    /// `POST /enroll` with a CBOR EnrollRequest; the decoded response, or the CA's problem.
    pub async fn enroll(&self, request_cbor: Vec<u8>) -> Result<EnrollResponse, AgentError> {
        let a = self
            .request(
                "POST",
                "/enroll",
                Some("application/cbor"),
                "application/cbor",
                request_cbor,
            )
            .await?;
        if a.status == 200 {
            return EnrollResponse::from_cbor(&a.body)
                .map_err(|p| AgentError::Verify(format!("response: {}", p.detail)));
        }
        Err(problem_of(&a))
    }

    /// `GET /ca`: the CA certificate, DER.
    pub async fn ca_certificate(&self) -> Result<Vec<u8>, AgentError> {
        let a = self
            .request("GET", "/ca", None, "application/pkix-cert", Vec::new())
            .await?;
        if a.status == 200 {
            Ok(a.body.to_vec())
        } else {
            Err(problem_of(&a))
        }
    }
}

/// The problem in an error answer (or a transport error when the body is none of ours).
pub fn problem_of(a: &HttpAnswer) -> AgentError {
    let p = if a.content_type.contains("cbor") {
        Problem::from_cbor(&a.body)
    } else {
        Problem::from_json(&a.body)
    };
    match p {
        Some(p) => AgentError::Refused(p),
        None if a.status >= 500 => AgentError::Transport(format!("HTTP {}", a.status)),
        None => AgentError::Verify(format!("HTTP {} without problem details", a.status)),
    }
}

/// An open HTTPS connection (see [`HttpsClient::session`]).
pub struct HttpsSession {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    authority: String,
    /// The connection task: when a request fails, its error says why (in TLS 1.3 a server's
    /// refusal of the client certificate, such as `certificate_revoked`, arrives only there).
    conn: Option<tokio::task::JoinHandle<Result<(), String>>>,
    /// The connection's first I/O error, as [`Remembering`] kept it.
    io_error: Arc<std::sync::Mutex<Option<String>>>,
}

/// A stream that keeps its first I/O error. hyper drops a read error met while no request is
/// in flight, and a request queued then fails with "operation was canceled" alone; in TLS 1.3
/// that is how a refused client certificate arrives (the server's alert comes after the
/// client's Finished, as the client sends its request), so this keeps the alert's name.
struct Remembering<S> {
    inner: S,
    error: Arc<std::sync::Mutex<Option<String>>>,
}

impl<S> Remembering<S> {
    fn keep<T>(
        &self,
        r: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        if let std::task::Poll::Ready(Err(e)) = &r
            && let Ok(mut slot) = self.error.lock()
            && slot.is_none()
        {
            *slot = Some(e.to_string());
        }
        r
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Remembering<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        self.keep(r)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Remembering<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.keep(r)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.keep(r)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_shutdown(cx);
        self.keep(r)
    }
}

/// A connection error with its causes (hyper's own message is only the outermost one).
fn connection_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

impl std::fmt::Debug for HttpsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsSession")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl HttpsSession {
    /// One request on this connection.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        accept: &str,
        body: Vec<u8>,
    ) -> Result<HttpAnswer, AgentError> {
        let authority = self.authority.clone();
        let t = |e: &dyn std::fmt::Display| AgentError::Transport(format!("{authority}: {e}"));
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &self.authority)
            .header(ACCEPT, accept);
        if let Some(ct) = content_type {
            req = req.header(CONTENT_TYPE, ct);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| AgentError::Invalid(e.to_string()))?;
        let work = async {
            // The previous exchange on this connection must be finished before the next starts.
            self.sender.ready().await.map_err(|e| t(&e))?;
            let resp = self.sender.send_request(req).await.map_err(|e| t(&e))?;
            let (head, body) = resp.into_parts();
            let status = head.status.as_u16();
            let content_type = head
                .headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = body.collect().await.map_err(|e| t(&e))?.to_bytes();
            Ok(HttpAnswer {
                status,
                content_type,
                headers: head.headers,
                body,
            })
        };
        let r = tokio::time::timeout(REQUEST_TIMEOUT, work)
            .await
            .map_err(|_| AgentError::Transport(format!("{} timed out", self.authority)))?;
        match r {
            Err(AgentError::Transport(msg)) => Err(AgentError::Transport(self.why(msg).await)),
            other => other,
        }
    }

    /// Adds the connection's own error to a failed request's message.
    async fn why(&mut self, msg: String) -> String {
        let Some(conn) = self.conn.take() else {
            return msg;
        };
        let kept = || self.io_error.lock().ok().and_then(|e| e.clone());
        match tokio::time::timeout(std::time::Duration::from_secs(1), conn).await {
            Ok(Ok(Err(e))) => format!("{msg} ({e})"),
            // hyper ended the connection without an error of its own: the stream's.
            _ => match kept() {
                Some(e) => format!("{msg} ({e})"),
                None => msg,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A stream whose reads fail as a TLS stream does on the server's alert.
    struct Alerted;

    impl tokio::io::AsyncRead for Alerted {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "received fatal alert: CertificateRevoked",
            )))
        }
    }

    #[tokio::test]
    async fn the_stream_keeps_its_first_error_for_the_answer() {
        let error = Arc::new(std::sync::Mutex::new(None));
        let mut s = Remembering {
            inner: Alerted,
            error: error.clone(),
        };
        let mut buf = [0u8; 4];
        assert!(s.read(&mut buf).await.is_err());
        let kept = error.lock().unwrap().clone();
        assert_eq!(
            kept.as_deref(),
            Some("received fatal alert: CertificateRevoked")
        );
    }
}
