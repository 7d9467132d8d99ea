//! HTTP serving, written once for the three TLS doors (HTTPS enrollment, the mutual-TLS
//! secrets door, the admin door): connection slots per source and per listener, the source's
//! rate (handshakes and requests), time limits on the handshake, the headers, the body and
//! every write, and the problem responses they share. A door is a [`Door`]: its name and its
//! handler; it sees requests that passed all of this and nothing of the others.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use protocol_spec::Problem;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::{RATE_LIMITED_RETRY_SECS, UNAVAILABLE_RETRY_SECS};
use crate::limits::{Slots, SourceRate};
use crate::metrics::Metrics;

pub(crate) const CBOR: &str = "application/cbor";
pub(crate) const JSON: &str = "application/json";
pub(crate) const PROBLEM_JSON: &str = "application/problem+json";
const PROBLEM_CBOR: &str = "application/concise-problem-details+cbor";

/// One listener's requests: a door answers what [`serve`] lets through.
pub trait Door: Send + Sync + 'static {
    /// The door's name in logs and metrics.
    fn name(&self) -> &'static str;

    /// Answers one request from `peer`; `client_cert` is the certificate rustls checked on a
    /// mutual-TLS door (none on the enrollment door).
    fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        client_cert: Option<&[u8]>,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send;

    /// The answer to a request past its source's rate: 429 with Retry-After (SPEC.md section
    /// 11.6), by default the problem in CBOR unless the request asks for JSON.
    fn rate_limited(&self, req: &Request<Incoming>, retry_secs: u32) -> Response<Full<Bytes>> {
        rate_limited(req, retry_secs)
    }
}

/// What a door allows each peer.
#[derive(Debug, Clone)]
pub struct DoorLimits {
    /// Connection slots, per source address and for the listener (each door its own).
    pub slots: Slots,
    /// Bounds the TLS handshake, each request's headers (an idle kept-alive connection
    /// included) and each request's body.
    pub timeout: Duration,
    /// Requests per second per source address (one rate shared by the device doors, the
    /// admin door's its own).
    pub rate: Option<Arc<SourceRate>>,
    /// What each accepted connection (a TLS handshake attempt) takes from its source's `rate`
    /// (`[limits] rate_handshake_cost`; 0: not counted).
    pub handshake_cost: u32,
}

/// Serves `door` on `listener` until `shutdown` turns true. Each connection takes one of
/// `limits.slots` once accepted (per source address and per listener): a connection past its
/// source's share or the listener's is closed at once, so that one source cannot hold every
/// slot, and a client behind a flood is never left in the kernel's backlog; each door has its
/// own slots, so enrollment traffic cannot starve the admin door. Each accepted connection
/// takes `limits.handshake_cost` from its source's rate, and is closed before the TLS handshake
/// when the source is past it; a request past its source's rate gets 429 (rate-limited) with
/// Retry-After.
pub async fn serve<D: Door>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    door: Arc<D>,
    metrics: Arc<Metrics>,
    limits: DoorLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let DoorLimits {
        slots,
        timeout,
        rate,
        handshake_cost,
    } = limits;
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let permit = match slots.take(peer.ip()) {
            Ok(p) => p,
            Err(full) => {
                // Closed at once: the peer sees the connection end before any handshake.
                metrics.connection_refused(door.name(), full);
                tracing::debug!(%peer, door = door.name(), ?full, "no connection slot");
                drop(tcp);
                continue;
            }
        };
        // Each handshake costs the server a signature: a source past its rate is not given
        // one. Its connection is closed at once (an answer of 429 would need the handshake).
        if let Some(r) = &rate
            && r.check_cost(peer.ip(), std::time::Instant::now(), handshake_cost)
                .is_err()
        {
            metrics.handshake_rate_limited(door.name());
            tracing::debug!(%peer, door = door.name(), "source rate exceeded: no handshake");
            drop(permit);
            drop(tcp);
            continue;
        }
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let metrics = metrics.clone();
        let door = door.clone();
        let rate = rate.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            // The client certificate, checked against the CA by rustls (mutual-TLS door only).
            let client_cert: Option<Arc<Vec<u8>>> = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| Arc::new(c.to_vec()));
            let svc = service_fn(move |mut req: Request<Incoming>| {
                let (metrics, client_cert, door) =
                    (metrics.clone(), client_cert.clone(), door.clone());
                let limited = rate
                    .as_ref()
                    .and_then(|r| r.check(peer.ip(), std::time::Instant::now()).err());
                // The body must be in within the time limit, counted from the moment the
                // headers are: a client that announces a body and sends nothing gives its
                // connection slot back (read by `read_body`).
                req.extensions_mut()
                    .insert(BodyDeadline(tokio::time::Instant::now() + timeout));
                async move {
                    if let Some(retry) = limited {
                        tracing::debug!(%peer, door = door.name(), "source rate exceeded");
                        metrics.source_rate_limited(door.name());
                        return Ok::<_, Infallible>(door.rate_limited(&req, retry));
                    }
                    let cert = client_cert.as_deref().map(Vec::as_slice);
                    Ok::<_, Infallible>(door.handle(req, peer, cert).await)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(TokioIo::new(WriteDeadline::new(tls, timeout)), svc);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// A stream whose writes must make progress within `limit`: a client that stops reading the
/// answers (a slow reader, or one that pipelines requests and never reads) stalls the server's
/// writes, and after `limit` without progress its connection ends and its slot is free again.
pub(crate) struct WriteDeadline<S> {
    inner: S,
    limit: Duration,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteDeadline<S> {
    pub(crate) fn new(inner: S, limit: Duration) -> Self {
        WriteDeadline {
            inner,
            limit,
            stalled: None,
        }
    }

    /// `Pending` from the inner stream starts (or goes on with) the stall timer; its end is an
    /// error; any progress stops it.
    fn watch<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        r: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future;
        use std::task::Poll;
        match r {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let limit = self.limit;
                let timer = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client stopped reading",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, r)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, r)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, r)
    }
}

/// When a request's body must have arrived whole; set by [`serve`] as each request's headers
/// are read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyDeadline(tokio::time::Instant);

/// Why a request body could not be read.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// Longer than the door's limit.
    TooLarge,
    /// Not all there by the deadline: the client announced a body and stopped sending.
    TimedOut(Duration),
    /// The connection failed while reading.
    Unreadable(String),
}

impl BodyError {
    /// The problem a device door answers with (`limit` and `what` name the door's rule).
    pub(crate) fn problem(&self, what: &str, limit: usize) -> Problem {
        match self {
            BodyError::TooLarge => Problem::new(
                protocol_spec::ProblemType::TooLarge,
                format!("{what} exceeds {limit} bytes"),
            ),
            BodyError::TimedOut(t) => Problem::new(
                protocol_spec::ProblemType::RequestTimeout,
                format!("{what} not received within {} s", t.as_secs()),
            ),
            BodyError::Unreadable(e) => {
                Problem::malformed(format!("could not read the {what}: {e}"))
            }
        }
    }
}

/// Reads the whole body of `req`, at most `limit` bytes, by the deadline [`serve`] set (a
/// request that reached a handler without one gets the default request timeout).
pub(crate) async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, BodyError> {
    let deadline = req
        .extensions()
        .get::<BodyDeadline>()
        .map(|d| d.0)
        .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(10));
    let allowed = deadline.saturating_duration_since(tokio::time::Instant::now());
    match tokio::time::timeout_at(deadline, Limited::new(req.into_body(), limit).collect()).await {
        Err(_) => Err(BodyError::TimedOut(allowed)),
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(BodyError::TooLarge)
        }
        Ok(Err(e)) => Err(BodyError::Unreadable(e.to_string())),
    }
}

/// Marks a response as the last on its connection (RFC 9110 section 7.6.1), as a 408 must be:
/// the rest of the unread body would otherwise be taken for the next request.
pub(crate) fn closing(mut r: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    r.headers_mut()
        .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    r
}

pub(crate) fn header(req: &Request<Incoming>, name: hyper::header::HeaderName) -> &str {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

pub(crate) fn media_type(value: &str) -> String {
    value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

pub(crate) fn respond(
    status: StatusCode,
    content_type: &str,
    body: Vec<u8>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(CONTENT_TYPE, v);
    }
    r
}

pub(crate) fn problem(p: &Problem, cbor: bool) -> Response<Full<Bytes>> {
    let status =
        StatusCode::from_u16(p.kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = if cbor {
        respond(status, PROBLEM_CBOR, p.to_cbor())
    } else {
        respond(status, PROBLEM_JSON, p.to_json())
    };
    // RFC 9110 section 10.2.3: when to come back (a line's bucket refills within a second; a
    // database comes back, or fails over, within seconds).
    let retry_after = match p.kind {
        protocol_spec::ProblemType::RateLimited => Some(RATE_LIMITED_RETRY_SECS),
        protocol_spec::ProblemType::Unavailable => Some(UNAVAILABLE_RETRY_SECS),
        _ => None,
    };
    if let Some(secs) = retry_after {
        r.headers_mut()
            .insert(hyper::header::RETRY_AFTER, HeaderValue::from(secs));
    }
    r
}

/// The answer to a request past its source's rate (SPEC.md section 11.6): 429 with
/// Retry-After, the problem in CBOR unless the request asks for JSON.
fn rate_limited(req: &Request<Incoming>, retry_secs: u32) -> Response<Full<Bytes>> {
    let json = media_type(header(req, ACCEPT)).contains("json")
        || media_type(header(req, CONTENT_TYPE)).contains("json");
    let p = Problem::new(
        protocol_spec::ProblemType::RateLimited,
        "too many requests from this address; retry later",
    );
    let mut r = problem(&p, !json);
    r.headers_mut()
        .insert(hyper::header::RETRY_AFTER, HeaderValue::from(retry_secs));
    r
}

/// A JSON problem sent with another status than its type's (404, 405, 415), the body's
/// `status` saying the same.
fn problem_with_status(p: &Problem, status: StatusCode) -> Response<Full<Bytes>> {
    respond(status, PROBLEM_JSON, p.to_json_with_status(status.as_u16()))
}

/// The answer to a path a door does not serve: 404, a `malformed` problem saying 404.
pub(crate) fn not_found(path: &str) -> Response<Full<Bytes>> {
    let p = Problem::malformed(format!("no resource {path}"));
    problem_with_status(&p, StatusCode::NOT_FOUND)
}

/// The answer to a path asked with a method it does not take: 405 with the methods it takes in
/// `Allow` (RFC 9110 section 15.5.6: the origin server "MUST generate an Allow header field in
/// a 405 response"), a `malformed` problem saying 405.
pub(crate) fn method_not_allowed(
    method: &Method,
    path: &str,
    allow: &'static str,
) -> Response<Full<Bytes>> {
    let p = Problem::malformed(format!(
        "method {method} not allowed on {path} (only {allow})"
    ));
    let mut r = problem_with_status(&p, StatusCode::METHOD_NOT_ALLOWED);
    r.headers_mut()
        .insert(hyper::header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// The answer to a request body in a content type the door does not read: 415, a `malformed`
/// problem saying 415 and naming the types it reads (`accepted`).
pub(crate) fn unsupported_media_type(given: &str, accepted: &str) -> Response<Full<Bytes>> {
    let p = Problem::malformed(format!("content type {given:?} is not {accepted}"));
    problem_with_status(&p, StatusCode::UNSUPPORTED_MEDIA_TYPE)
}
