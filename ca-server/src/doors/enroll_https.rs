//! HTTPS enrollment (SPEC.md section 3): decoding, size limits, content negotiation and error
//! mapping. Nothing else: every decision is the service's, and the serving (slots, rates, time
//! limits) is [`super::http`]'s.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ACCEPT, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use protocol_spec::enroll::RequestEncoding;
use protocol_spec::messages::MAX_ENROLL_REQUEST_JSON;
use protocol_spec::profile::cert_pem;

use super::http::{
    CBOR, JSON, closing, header, media_type, method_not_allowed, not_found, problem, read_body,
    respond, unsupported_media_type,
};
use crate::service::CaService;

const PEM_CHAIN: &str = "application/pem-certificate-chain";

/// The HTTPS enrollment door: `POST /enroll`, `GET /ca`, `GET /crl`, `GET /health`.
#[derive(Debug)]
pub struct EnrollDoor {
    service: Arc<CaService>,
}

impl EnrollDoor {
    pub fn new(service: Arc<CaService>) -> Self {
        EnrollDoor { service }
    }
}

impl super::http::Door for EnrollDoor {
    fn name(&self) -> &'static str {
        "enrollment"
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        _client_cert: Option<&[u8]>,
    ) -> Response<Full<Bytes>> {
        handle(req, &self.service, peer).await
    }
}

async fn handle(
    req: Request<Incoming>,
    service: &CaService,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/health") => respond(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
        (&Method::GET, "/ca") => {
            let der = service.issuer().profile().ca_der().to_vec();
            if header(&req, ACCEPT).contains("pem") {
                respond(
                    StatusCode::OK,
                    "application/x-pem-file",
                    cert_pem(&der).into_bytes(),
                )
            } else {
                respond(StatusCode::OK, "application/pkix-cert", der)
            }
        }
        (&Method::GET, "/crl") => match service.crl() {
            Ok(crl) => {
                if header(&req, ACCEPT).contains("pem") {
                    let pem = pem::encode(&pem::Pem::new("X509 CRL", crl.der.to_vec()));
                    respond(StatusCode::OK, "application/x-pem-file", pem.into_bytes())
                } else {
                    respond(StatusCode::OK, "application/pkix-crl", crl.der.to_vec())
                }
            }
            Err(p) => problem(&p, false),
        },
        (&Method::POST, "/enroll") => enroll(req, service, peer).await,
        (m, "/enroll") => method_not_allowed(m, &path, "POST"),
        (m, "/ca" | "/crl" | "/health") => method_not_allowed(m, &path, "GET"),
        _ => not_found(&path),
    }
}

async fn enroll(
    req: Request<Incoming>,
    service: &CaService,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let ctype = media_type(header(&req, CONTENT_TYPE));
    let accept = media_type(header(&req, ACCEPT));
    let encoding = match ctype.as_str() {
        CBOR => RequestEncoding::Cbor,
        JSON => RequestEncoding::Json,
        other => return unsupported_media_type(other, &format!("{CBOR} or {JSON}")),
    };
    let cbor_problems = encoding == RequestEncoding::Cbor && !accept.contains("json");
    // Read one byte past the limit so that an oversize body is reported as too-large.
    let body = match read_body(req, MAX_ENROLL_REQUEST_JSON + 1).await {
        Ok(b) => b,
        Err(e) => {
            let p = e.problem("request body", MAX_ENROLL_REQUEST_JSON);
            tracing::info!(%peer, problem = %p.kind, "enrollment request not read");
            return closing(problem(&p, cbor_problems));
        }
    };
    match service
        .enroll(&body, encoding, crate::metrics::Transport::Https)
        .await
    {
        Err(p) => {
            tracing::info!(%peer, problem = %p.kind, "enrollment refused");
            problem(&p, cbor_problems)
        }
        Ok(enrolled) => {
            if accept == PEM_CHAIN {
                return respond(
                    StatusCode::OK,
                    PEM_CHAIN,
                    cert_pem(&enrolled.certificate).into_bytes(),
                );
            }
            let msg = match service.response(&enrolled) {
                Ok(m) => m,
                Err(p) => return problem(&p, cbor_problems),
            };
            let json = accept == JSON || (accept != CBOR && encoding == RequestEncoding::Json);
            if json {
                respond(StatusCode::OK, JSON, msg.to_json())
            } else {
                respond(StatusCode::OK, CBOR, msg.to_cbor())
            }
        }
    }
}
