//! The mutual-TLS door: devices fetch and acknowledge their secrets, identified by the
//! certificate they enrolled with.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use protocol_spec::messages::{MAX_ACK, SecretAck};
use protocol_spec::{Problem, ProblemType};

use super::http::{
    closing, header, media_type, method_not_allowed, not_found, problem, read_body, respond,
    unsupported_media_type,
};
use crate::service::CaService;

/// The mutual-TLS secrets door: `GET /secret`, `POST /secret/ack`, `GET /health`.
#[derive(Debug)]
pub struct SecretsDoor {
    service: Arc<CaService>,
}

impl SecretsDoor {
    pub fn new(service: Arc<CaService>) -> Self {
        SecretsDoor { service }
    }
}

impl super::http::Door for SecretsDoor {
    fn name(&self) -> &'static str {
        "secrets"
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        _peer: SocketAddr,
        client_cert: Option<&[u8]>,
    ) -> Response<Full<Bytes>> {
        handle(req, &self.service, client_cert).await
    }
}

/// Handles one request on the mutual-TLS door.
async fn handle(
    req: Request<Incoming>,
    service: &CaService,
    client_cert: Option<&[u8]>,
) -> Response<Full<Bytes>> {
    let json = media_type(header(&req, ACCEPT)) == "application/json"
        || media_type(header(&req, CONTENT_TYPE)) == "application/json";
    let path = req.uri().path().to_string();
    // Routed before the device is looked up: a request the door cannot serve costs no read.
    match (req.method(), path.as_str()) {
        (&Method::GET, "/health") => {
            return respond(StatusCode::OK, "text/plain", b"ok\n".to_vec());
        }
        (&Method::GET, "/secret") | (&Method::POST, "/secret/ack") => {}
        (m, "/secret" | "/health") => return method_not_allowed(m, &path, "GET"),
        (m, "/secret/ack") => return method_not_allowed(m, &path, "POST"),
        _ => return not_found(&path),
    }
    let Some(cert) = client_cert else {
        // The TLS configuration requires a certificate; this is a belt to those braces.
        return problem(
            &Problem::new(ProblemType::UnknownDevice, "no client certificate"),
            !json,
        );
    };
    // Checked on every request, so that a revocation takes effect at once, even on a
    // kept-alive connection. A fetch's first reads go in the same flight as the check; an
    // acknowledgement's check is made by its own transaction, over the record it reads.
    if req.method() == Method::POST {
        return ack(req, service, cert, json).await;
    }
    let (device, first_read) = match service.device_for_fetch(cert) {
        Ok(d) => d,
        Err(p) => {
            tracing::info!(problem = %p.kind, "mutual-TLS client refused");
            return problem(&p, !json);
        }
    };
    match service.fetch_secret_after(&device, Some(first_read)).await {
        Ok(d) => {
            let (content_type, body) = if json {
                ("application/json", d.to_json())
            } else {
                ("application/cbor", d.to_cbor())
            };
            drop(d);
            // Unsealing and encoding went through stack variables (ring's, base64's):
            // wiped before the answer goes back to hyper and the task yields.
            crate::secrets::scrub_stack();
            // The encoding itself becomes the body, without a copy: hyper drops it once
            // written (rustls encrypts it into a buffer of its own), and dropping wipes it.
            let mut r = Response::new(Full::new(Bytes::from_owner(body)));
            if let Ok(v) = HeaderValue::from_str(content_type) {
                r.headers_mut().insert(CONTENT_TYPE, v);
            }
            r
        }
        Err(p) => problem(&p, !json),
    }
}

/// `POST /secret/ack`: the device's confirmation of what it stored. The door's rule (the
/// record exists, is active and holds this very certificate) is applied inside the
/// acknowledgement's transaction.
async fn ack(
    req: Request<Incoming>,
    service: &CaService,
    cert: &[u8],
    json: bool,
) -> Response<Full<Bytes>> {
    // CBOR is the default; JSON when it says so; anything else is not an ack this door reads.
    let body_json = match media_type(header(&req, CONTENT_TYPE)).as_str() {
        "" | "application/cbor" => false,
        "application/json" => true,
        other => return unsupported_media_type(other, "application/cbor or application/json"),
    };
    let body = match read_body(req, MAX_ACK + 1).await {
        Ok(b) => b,
        Err(e) => {
            return closing(problem(&e.problem("ack", MAX_ACK), !json));
        }
    };
    let ack = if body_json {
        SecretAck::from_json(&body)
    } else {
        SecretAck::from_cbor(&body)
    };
    let ack = match ack {
        Ok(a) => a,
        Err(p) => return problem(&p, !json),
    };
    match service.ack_secret_for_certificate(cert, ack).await {
        Ok(()) => {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        Err(p) => {
            tracing::info!(problem = %p.kind, "secret acknowledgement refused");
            problem(&p, !json)
        }
    }
}
