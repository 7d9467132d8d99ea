//! The admin API: operators, authenticated by their mutual-TLS certificates (issued by the
//! operator CA, see [`crate::operators`]), look up, revoke, reset and rotate devices, manage
//! lines, export and verify the audit log, and scrape metrics. JSON in and out; errors are
//! problem details (RFC 9457) with `application/problem+json`.
//!
//! | method, path | what |
//! |---|---|
//! | `GET /devices/{serial}` | [`DeviceView`] |
//! | `POST /devices/{serial}/revoke` | [`DeviceView`] after revocation |
//! | `POST /devices/{serial}/reset` | [`DeviceView`] after the reset |
//! | `POST /secrets/rotate` | [`RotateRequest`] -> [`RotateResult`] |
//! | `GET /lines`, `POST /lines` | [`LineView`] list; [`AddLine`] -> [`LineView`] |
//! | `POST /lines/{id}/disable`, `POST /lines/{id}/enable` | [`LineView`] |
//! | `GET /dukpt/bdks`, `POST /dukpt/bdks` | [`BdkView`](crate::dukpt::BdkView) list; [`AddBdk`](crate::dukpt::AddBdk) -> `BdkView` |
//! | `POST /dukpt/derive` | [`DeriveRequest`](crate::dukpt::DeriveRequest) -> [`DeriveView`](crate::dukpt::DeriveView) (a KCV, never a key) |
//! | `GET /audit?after=N&limit=M` | JSON lines of [`AuditLine`] after sequence N |
//! | `GET /audit/verify` | [`AuditVerdict`](crate::audit::AuditVerdict) |
//! | `GET /crl` | the CRL, DER |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /operators` | [`OperatorView`] list: every operator issued from this CA folder, and every revoked one |
//! | `POST /operators/{name}/revoke` | [`OperatorView`]: refused at this door from its next request |
//!
//! A read-only operator ([`crate::operators::OperatorRole::ReadOnly`]) may make every `GET`
//! above; anything else is refused with 403 before it is routed.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::coap::CoapStats;
use super::http::{BodyError, closing, header, media_type, read_body, respond};
use crate::audit::{AuditLine, rfc3339};
use crate::metrics::Snapshot;
use crate::ops::{
    AddLine, AdminProblem, MAX_AUDIT_PAGE, MAX_LINE_RATE, RotateFailure, RotateRequest,
    RotateResult, RotatedVersion, SetRate, device_view, line_view, operator_views,
};
use crate::records::{DeviceRecord, DeviceStatus, from_cbor};
use crate::service::CaService;
use crate::store::ResetOutcome;

/// Largest admin request body.
const MAX_BODY: usize = 64 * 1024;

/// What the admin door needs beyond the service.
#[derive(Debug)]
pub struct AdminContext {
    /// The CoAP front end's counters, for metrics.
    pub coap: Arc<CoapStats>,
    /// The CA folder's register of issued operators (`operators.issued`).
    pub operators_issued: std::path::PathBuf,
    /// The first audit entry sealed by the audit key, as the CA folder records it.
    pub audit_sealed_from: Option<u64>,
}

type AdminResult = Result<Response<Full<Bytes>>, AdminProblem>;

/// The admin door: the routes above, for operators with certificates of the operator CA.
#[derive(Debug)]
pub struct AdminDoor {
    service: Arc<CaService>,
    ctx: AdminContext,
}

impl AdminDoor {
    pub fn new(service: Arc<CaService>, ctx: AdminContext) -> Self {
        AdminDoor { service, ctx }
    }
}

impl super::http::Door for AdminDoor {
    fn name(&self) -> &'static str {
        "admin"
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        _peer: std::net::SocketAddr,
        client_cert: Option<&[u8]>,
    ) -> Response<Full<Bytes>> {
        handle(req, &self.service, &self.ctx, client_cert).await
    }

    /// 429 as the admin door's other problems are: JSON, with Retry-After.
    fn rate_limited(&self, req: &Request<Incoming>, retry_secs: u32) -> Response<Full<Bytes>> {
        let operation = operation_name(req.method(), req.uri().path());
        let mut r = finish(
            &self.service,
            operation,
            Err(AdminProblem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests from this address; retry later",
            )),
        );
        r.headers_mut()
            .insert(hyper::header::RETRY_AFTER, HeaderValue::from(retry_secs));
        r
    }
}

/// Handles one request on the admin door. `client_cert` has been checked against the operator
/// CA by the TLS layer; here it must also have the operator profile.
async fn handle(
    req: Request<Incoming>,
    service: &Arc<CaService>,
    ctx: &AdminContext,
    client_cert: Option<&[u8]>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let operation = operation_name(req.method(), &path);
    let (operator, role) = match client_cert.map(crate::operators::operator_identity) {
        Some(Ok(o)) => (o.name, o.role),
        Some(Err(why)) => {
            return finish(
                service,
                operation,
                Err(AdminProblem::new(
                    StatusCode::FORBIDDEN,
                    format!("not an operator certificate: {why}"),
                )),
            );
        }
        None => {
            return finish(
                service,
                operation,
                Err(AdminProblem::new(
                    StatusCode::FORBIDDEN,
                    "an operator certificate is required",
                )),
            );
        }
    };
    // A revoked operator is refused from its next request, on a kept-alive connection too:
    // the store is read for every request (admin requests are few), so a revocation made
    // through any node of a shared store counts at once.
    let name = operator.clone();
    match blocking(service, move |s| {
        s.store()
            .operator_revocation(&name)
            .map_err(|e| AdminProblem::internal("operator revocation", e))
    })
    .await
    {
        Ok(None) => {}
        Ok(Some(r)) => {
            tracing::info!(operator, operation, "revoked operator refused");
            return finish(
                service,
                operation,
                Err(AdminProblem::new(
                    StatusCode::FORBIDDEN,
                    format!(
                        "operator {operator} was revoked at {} by {}",
                        rfc3339(r.revoked_at),
                        r.actor
                    ),
                )),
            );
        }
        Err(p) => return finish(service, operation, Err(p)),
    }
    // A read-only operator reads: every request that could change the CA is refused before
    // it is routed (an unknown path too), whatever its body.
    if !role.allows(req.method()) {
        tracing::info!(operator, operation, "read-only operator refused a change");
        return finish(
            service,
            operation,
            Err(AdminProblem::new(
                StatusCode::FORBIDDEN,
                format!(
                    "operator {operator} is read-only: it may only GET (metrics, the CRL, \
                     lookups, listings, the audit log); {} {path} needs an admin operator",
                    req.method()
                ),
            )),
        );
    }
    let actor = format!("operator:{operator}");
    let r = route(req, service, ctx, &actor, &path).await;
    if let Err(p) = &r {
        tracing::info!(operator, operation, status = p.status, detail = %p.detail, "admin request refused");
    } else {
        tracing::info!(operator, operation, "admin request");
    }
    finish(service, operation, r)
}

fn finish(service: &CaService, operation: &str, r: AdminResult) -> Response<Full<Bytes>> {
    let resp = r.unwrap_or_else(|p| {
        let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = respond(
            status,
            "application/problem+json",
            serde_json::to_vec(&p).unwrap_or_default(),
        );
        if let Some(allow) = p.allow {
            r.headers_mut()
                .insert(hyper::header::ALLOW, HeaderValue::from_static(allow));
        }
        if status == StatusCode::REQUEST_TIMEOUT {
            closing(r)
        } else {
            r
        }
    });
    service.metrics().admin(operation, resp.status().as_u16());
    resp
}

/// A fixed name per route, so that metrics labels stay few.
fn operation_name(method: &Method, path: &str) -> &'static str {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method.as_str(), parts.as_slice()) {
        ("GET", ["devices", _]) => "device-show",
        ("POST", ["devices", _, "revoke"]) => "device-revoke",
        ("POST", ["devices", _, "reset"]) => "device-reset",
        ("POST", ["secrets", "rotate"]) => "secrets-rotate",
        ("GET", ["lines"]) => "line-list",
        ("POST", ["lines"]) => "line-add",
        ("POST", ["lines", _, "disable"]) => "line-disable",
        ("POST", ["lines", _, "enable"]) => "line-enable",
        ("POST", ["lines", _, "rate"]) => "line-rate",
        ("GET", ["dukpt", "bdks"]) => "dukpt-list",
        ("POST", ["dukpt", "bdks"]) => "dukpt-add-bdk",
        ("POST", ["dukpt", "derive"]) => "dukpt-derive",
        ("GET", ["audit"]) => "audit-export",
        ("GET", ["audit", "verify"]) => "audit-verify",
        ("GET", ["crl"]) => "crl",
        ("GET", ["metrics"]) => "metrics",
        ("GET", ["health"]) => "health",
        ("GET", ["operators"]) => "operator-list",
        ("POST", ["operators", _, "revoke"]) => "operator-revoke",
        _ => "other",
    }
}

async fn route(
    req: Request<Incoming>,
    service: &Arc<CaService>,
    ctx: &AdminContext,
    actor: &str,
    path: &str,
) -> AdminResult {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    let query = req.uri().query().unwrap_or("").to_string();
    // A route that takes no body refuses one rather than act without it: whoever sent a body
    // to `revoke` or `reset` meant something the door would not do.
    let served = allowed_methods(&parts).is_some_and(|a| a.split(", ").any(|m| m == method));
    if served && !reads_body(&method, &parts) && !hyper::body::Body::is_end_stream(req.body()) {
        return Err(AdminProblem::bad_request(format!(
            "{method} {path} takes no request body; send none"
        )));
    }
    match (method.as_str(), parts.as_slice()) {
        ("GET", ["health"]) => Ok(respond(StatusCode::OK, "text/plain", b"ok\n".to_vec())),
        ("GET", ["metrics"]) => metrics(service, ctx),
        ("GET", ["crl"]) => {
            let crl = service
                .crl()
                .map_err(|p| AdminProblem::from_service("CRL", p))?;
            Ok(respond(
                StatusCode::OK,
                "application/pkix-crl",
                crl.der.to_vec(),
            ))
        }
        ("GET", ["devices", serial]) => {
            let serial = parse_serial(serial)?;
            let view = device_view(service, serial)?;
            service
                .record_event("device-show", Some(serial), actor, String::new())
                .await
                .map_err(|e| AdminProblem::internal("audit", e))?;
            json(StatusCode::OK, &view)
        }
        ("POST", ["devices", serial, "revoke"]) => {
            let serial = parse_serial(serial)?;
            service
                .revoke(serial, actor)
                .await
                .map_err(|p| AdminProblem::from_service("revoke", p))?
                .ok_or_else(|| AdminProblem::not_found(format!("no enrolled device {serial}")))?;
            // Sign the new CRL now, so that it is ready before anyone asks.
            let _ = blocking(service, |s| Ok(s.crl())).await;
            json(StatusCode::OK, &device_view(service, serial)?)
        }
        ("POST", ["devices", serial, "reset"]) => {
            let serial = parse_serial(serial)?;
            match service
                .reset(serial, actor)
                .await
                .map_err(|p| AdminProblem::from_service("reset", p))?
            {
                ResetOutcome::Reset(_) => json(StatusCode::OK, &device_view(service, serial)?),
                ResetOutcome::Missing => Err(AdminProblem::not_found(format!(
                    "no enrolled device {serial}"
                ))),
                ResetOutcome::Revoked => Err(AdminProblem::new(
                    StatusCode::CONFLICT,
                    format!(
                        "device {serial} is revoked: a revocation is final (its certificate \
                         stays on the CRL); enroll the replacement under a new serial"
                    ),
                )),
            }
        }
        ("GET", ["operators"]) => {
            let issued = crate::operators::issued(&ctx.operators_issued)
                .map_err(|e| AdminProblem::internal("operators.issued", e))?;
            let list = blocking(service, move |s| {
                let revoked = s
                    .store()
                    .operator_revocations()
                    .map_err(|e| AdminProblem::internal("store", e))?;
                Ok(operator_views(&issued, &revoked))
            })
            .await?;
            json(StatusCode::OK, &list)
        }
        ("POST", ["operators", name, "revoke"]) => {
            let name = name.to_string();
            crate::operators::check_name(&name).map_err(AdminProblem::bad_request)?;
            let issued = crate::operators::issued(&ctx.operators_issued)
                .map_err(|e| AdminProblem::internal("operators.issued", e))?;
            if !issued.iter().any(|o| o.name == name) {
                return Err(AdminProblem::not_found(format!(
                    "no operator {name:?} was issued from this CA (see operators.issued)"
                )));
            }
            let rec = service
                .revoke_operator(&name, actor)
                .await
                .map_err(|e| AdminProblem::internal("operator revoke", e))?;
            let view = operator_views(&issued, std::slice::from_ref(&rec))
                .into_iter()
                .find(|v| v.name == name)
                .ok_or_else(|| AdminProblem::internal("operator revoke", "no view"))?;
            json(StatusCode::OK, &view)
        }
        ("POST", ["secrets", "rotate"]) => {
            let body: RotateRequest = read_json(req).await?;
            rotate(service, body, actor).await
        }
        ("GET", ["lines"]) => {
            let lines = service
                .store()
                .lines()
                .map_err(|e| AdminProblem::internal("store", e))?;
            json(
                StatusCode::OK,
                &lines.iter().map(line_view).collect::<Vec<_>>(),
            )
        }
        ("POST", ["lines"]) => {
            let body: AddLine = read_json(req).await?;
            let range =
                crate::lines::parse_range(&body.serials).map_err(AdminProblem::bad_request)?;
            let mut line = crate::lines::new_line(
                &body.id,
                &body.public_key,
                range,
                body.quota,
                service.now(),
            )
            .map_err(AdminProblem::bad_request)?;
            if body.rate > MAX_LINE_RATE {
                return Err(AdminProblem::bad_request(format!(
                    "rate {} is above {MAX_LINE_RATE} enrollments per second",
                    body.rate
                )));
            }
            line.rate = body.rate;
            if let Some(source) = &body.secret_source {
                line.secret_source = crate::lines::secret_source(service.store().as_ref(), source)
                    .map_err(AdminProblem::bad_request)?;
            }
            if service
                .store()
                .line(&line.id)
                .map_err(|e| AdminProblem::internal("store", e))?
                .is_some()
            {
                return Err(AdminProblem::new(
                    StatusCode::CONFLICT,
                    format!("line {:?} already exists", line.id),
                ));
            }
            let line = service.add_line(line, actor).await.map_err(|e| match e {
                crate::store::StoreError::LineExists(_) => {
                    AdminProblem::new(StatusCode::CONFLICT, e.to_string())
                }
                e => AdminProblem::internal("line add", e),
            })?;
            json(StatusCode::CREATED, &line_view(&line))
        }
        ("GET", ["dukpt", "bdks"]) => {
            let bdks = service
                .store()
                .bdks()
                .map_err(|e| AdminProblem::internal("store", e))?;
            json(
                StatusCode::OK,
                &bdks.iter().map(crate::dukpt::bdk_view).collect::<Vec<_>>(),
            )
        }
        ("POST", ["dukpt", "bdks"]) => {
            let body: crate::dukpt::AddBdk = read_json(req).await?;
            let id = crate::dukpt::parse_bdk_id(&body.bdk_id).map_err(dukpt_problem)?;
            let new = crate::dukpt::new_bdk(&body).map_err(dukpt_problem)?;
            drop(body);
            let record = crate::dukpt::prepare(
                service.store().as_ref(),
                service.secret_keys(),
                id,
                new,
                service.now(),
            )
            .map_err(dukpt_problem)?;
            let record = match service.add_bdk(record.clone(), actor).await {
                Ok(r) => r,
                Err(e) => {
                    crate::dukpt::discard(service.secret_keys(), &record);
                    return Err(dukpt_problem(e.into()));
                }
            };
            json(StatusCode::CREATED, &crate::dukpt::bdk_view(&record))
        }
        ("POST", ["dukpt", "derive"]) => {
            let body: crate::dukpt::DeriveRequest = read_json(req).await?;
            let view = crate::dukpt::derive(service.store().as_ref(), service.secret_keys(), &body)
                .map_err(dukpt_problem)?;
            service
                .record_event("dukpt-derive", None, actor, format!("ksn={}", view.ksn))
                .await
                .map_err(|e| AdminProblem::internal("audit", e))?;
            json(StatusCode::OK, &view)
        }
        ("POST", ["lines", id, action @ ("disable" | "enable")]) => {
            let change = crate::store::LineChange::Active(*action == "enable");
            let line = service
                .change_line(id, change, actor)
                .await
                .map_err(|e| AdminProblem::internal("line", e))?
                .ok_or_else(|| AdminProblem::not_found(format!("no line {id:?}")))?;
            json(StatusCode::OK, &line_view(&line))
        }
        ("POST", ["lines", id, "rate"]) => {
            let body: SetRate = read_json(req).await?;
            if body.rate > MAX_LINE_RATE {
                return Err(AdminProblem::bad_request(format!(
                    "rate {} is above {MAX_LINE_RATE} enrollments per second",
                    body.rate
                )));
            }
            let line = service
                .change_line(id, crate::store::LineChange::Rate(body.rate), actor)
                .await
                .map_err(|e| AdminProblem::internal("line", e))?
                .ok_or_else(|| AdminProblem::not_found(format!("no line {id:?}")))?;
            json(StatusCode::OK, &line_view(&line))
        }
        ("GET", ["audit"]) => audit_page(service, &query, actor).await,
        ("GET", ["audit", "verify"]) => {
            let anchor = match query.split_once('=') {
                None if query.is_empty() => None,
                Some(("expect", v)) => Some(
                    v.parse::<crate::audit::Anchor>()
                        .map_err(|e| AdminProblem::bad_request(format!("expect: {e}")))?,
                ),
                _ => {
                    return Err(AdminProblem::bad_request(format!(
                        "unknown query {query:?} (only expect=SEQ:HASH)"
                    )));
                }
            };
            let store = service.store().clone();
            let key = service.secret_keys().audit_key();
            let sealed_from = ctx.audit_sealed_from;
            let verdict = tokio::task::spawn_blocking(move || {
                crate::audit::verify(store.audit_raw(0), anchor, Some(&key), sealed_from)
            })
            .await
            .map_err(|e| AdminProblem::internal("audit verify", e))?
            .map_err(|e| AdminProblem::internal("audit verify", e))?;
            let detail = match &verdict.first_bad {
                None => format!("ok entries={} head={}", verdict.entries, verdict.head),
                Some(b) => format!("broken at entry {}: {}", b.seq, b.reason),
            };
            service
                .record_event("audit-verify", None, actor, detail)
                .await
                .map_err(|e| AdminProblem::internal("audit", e))?;
            json(StatusCode::OK, &verdict)
        }
        (_, parts) => match allowed_methods(parts) {
            // RFC 9110 section 15.5.6: a 405 names the methods the path takes in Allow.
            Some(allow) => Err(AdminProblem {
                allow: Some(allow),
                ..AdminProblem::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("method {method} not allowed on {path} (only {allow})"),
                )
            }),
            None => Err(AdminProblem::not_found(format!(
                "no admin resource {method} {path}"
            ))),
        },
    }
}

/// Whether a route reads a request body (JSON): the others take none.
fn reads_body(method: &Method, parts: &[&str]) -> bool {
    *method == Method::POST
        && matches!(
            parts,
            ["secrets", "rotate"] | ["lines"] | ["lines", _, "rate"] | ["dukpt", "bdks" | "derive"]
        )
}

/// The methods a path of the admin door takes (every route of [`route`]), when it is one.
fn allowed_methods(parts: &[&str]) -> Option<&'static str> {
    match parts {
        ["health"]
        | ["metrics"]
        | ["crl"]
        | ["devices", _]
        | ["operators"]
        | ["audit"]
        | ["audit", "verify"] => Some("GET"),
        ["lines"] | ["dukpt", "bdks"] => Some("GET, POST"),
        ["devices", _, "revoke" | "reset"]
        | ["operators", _, "revoke"]
        | ["secrets", "rotate"]
        | ["lines", _, "disable" | "enable" | "rate"]
        | ["dukpt", "derive"] => Some("POST"),
        _ => None,
    }
}

fn metrics(service: &CaService, ctx: &AdminContext) -> AdminResult {
    use std::sync::atomic::Ordering::Relaxed;
    let store = service.store();
    let lines = store
        .lines()
        .map_err(|e| AdminProblem::internal("store", e))?;
    let c = &ctx.coap;
    let snapshot = Snapshot {
        store_bytes: store.size_on_disk().unwrap_or(0),
        revoked: service.revocations().count() as u64,
        lines: lines
            .iter()
            .map(|l| (l.id.clone(), l.enrolled, l.quota))
            .collect(),
        coap: vec![
            ("received", c.received.load(Relaxed)),
            ("processed", c.processed.load(Relaxed)),
            ("duplicates_answered", c.duplicates_answered.load(Relaxed)),
            (
                "duplicates_in_progress",
                c.duplicates_in_progress.load(Relaxed),
            ),
            ("dropped_busy", c.dropped_busy.load(Relaxed)),
            ("malformed", c.malformed.load(Relaxed)),
            ("resets", c.resets.load(Relaxed)),
            (
                "amplification_refused",
                c.amplification_refused.load(Relaxed),
            ),
            ("rate_limited", c.rate_limited.load(Relaxed)),
            ("exchanges_evicted", c.exchanges_evicted.load(Relaxed)),
            ("block1_evicted", c.block1_evicted.load(Relaxed)),
            ("block2_evicted", c.block2_evicted.load(Relaxed)),
        ],
        coap_state: vec![
            ("exchanges", c.exchanges_held.load(Relaxed)),
            ("block1", c.block1_held.load(Relaxed)),
            ("block2", c.block2_held.load(Relaxed)),
        ],
    };
    let text = service
        .metrics()
        .encode(&snapshot)
        .map_err(|e| AdminProblem::internal("metrics", e))?;
    Ok(respond(
        StatusCode::OK,
        crate::metrics::CONTENT_TYPE,
        text.into_bytes(),
    ))
}

async fn rotate(service: &Arc<CaService>, body: RotateRequest, actor: &str) -> AdminResult {
    let serials: Vec<u64> = match (&body.serial, &body.line, body.all) {
        (Some(s), None, false) => vec![*s],
        (None, Some(line), false) => {
            if service
                .store()
                .line(line)
                .map_err(|e| AdminProblem::internal("store", e))?
                .is_none()
            {
                return Err(AdminProblem::not_found(format!("no line {line:?}")));
            }
            let line = line.clone();
            blocking(service, move |s| devices_where(s, |d| d.line == line)).await?
        }
        (None, None, true) => blocking(service, |s| devices_where(s, |_| true)).await?,
        _ => {
            return Err(AdminProblem::bad_request(
                "give exactly one of \"serial\", \"line\" or \"all\": true",
            ));
        }
    };
    let requested = serials.len() as u64;
    let (rotated, done, failed) = service
        .rotate_many(serials, actor, 100)
        .await
        .map_err(|p| AdminProblem::from_service("rotate", p))?;
    if body.serial.is_some()
        && let Some((serial, p)) = failed.first()
    {
        let status = StatusCode::from_u16(p.kind.http_status())
            .ok()
            .filter(|_| p.kind != protocol_spec::ProblemType::UnknownDevice)
            .unwrap_or(StatusCode::NOT_FOUND);
        return Err(AdminProblem::new(
            status,
            format!("serial {serial}: {}", p.detail),
        ));
    }
    json(
        StatusCode::OK,
        &RotateResult {
            requested,
            rotated,
            versions: done
                .iter()
                .map(|r| RotatedVersion {
                    serial: r.serial,
                    key_id: r.key_id.clone(),
                    version: r.version,
                })
                .collect(),
            failed: failed
                .into_iter()
                .map(|(serial, p)| RotateFailure {
                    serial,
                    problem: p.kind.to_string(),
                    detail: p.detail,
                })
                .collect(),
        },
    )
}

fn devices_where(
    service: &CaService,
    keep: impl Fn(&DeviceRecord) -> bool,
) -> Result<Vec<u64>, AdminProblem> {
    let mut out = Vec::new();
    for d in service.store().devices() {
        let d = d.map_err(|e| AdminProblem::internal("store", e))?;
        if d.status == DeviceStatus::Active && keep(&d) {
            out.push(d.serial);
        }
    }
    Ok(out)
}

async fn audit_page(service: &Arc<CaService>, query: &str, actor: &str) -> AdminResult {
    let mut after = 0u64;
    let mut limit = 1000usize;
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        match kv.split_once('=') {
            Some(("after", v)) => {
                after = v.parse().map_err(|_| {
                    AdminProblem::bad_request(format!("after={v:?} is not a number"))
                })?;
            }
            Some(("limit", v)) => {
                limit = v.parse().map_err(|_| {
                    AdminProblem::bad_request(format!("limit={v:?} is not a number"))
                })?;
            }
            _ => {
                return Err(AdminProblem::bad_request(format!(
                    "unknown query parameter {kv:?}"
                )));
            }
        }
    }
    let limit = limit.clamp(1, MAX_AUDIT_PAGE);
    if after == 0 {
        service
            .record_event("audit-export", None, actor, String::new())
            .await
            .map_err(|e| AdminProblem::internal("audit", e))?;
    }
    let out = blocking(service, move |s| {
        let mut out = Vec::new();
        for item in s.store().audit_raw(after).take(limit) {
            let (_, v) = item.map_err(|e| AdminProblem::internal("store", e))?;
            let e = from_cbor(&v).map_err(|e| AdminProblem::internal("audit entry", e))?;
            serde_json::to_writer(&mut out, &AuditLine::from(&e))
                .map_err(|e| AdminProblem::internal("json", e))?;
            out.push(b'\n');
        }
        Ok(out)
    })
    .await?;
    Ok(respond(StatusCode::OK, "application/x-ndjson", out))
}

/// Runs store scans, decoding and signing off the async workers (a scan of a million devices
/// must not stall enrollment).
async fn blocking<T, F>(service: &Arc<CaService>, f: F) -> Result<T, AdminProblem>
where
    T: Send + 'static,
    F: FnOnce(&CaService) -> Result<T, AdminProblem> + Send + 'static,
{
    let service = service.clone();
    tokio::task::spawn_blocking(move || f(&service))
        .await
        .map_err(|e| AdminProblem::internal("blocking task", e))?
}

/// A refused DUKPT action: bad input 400, an id taken 409, an unknown BDK 404.
fn dukpt_problem(r: crate::dukpt::BdkRefusal) -> AdminProblem {
    use crate::dukpt::BdkRefusal;
    match r {
        BdkRefusal::Invalid(why) => AdminProblem::bad_request(why),
        e @ BdkRefusal::Exists(_) => AdminProblem::new(StatusCode::CONFLICT, e.to_string()),
        e @ BdkRefusal::Unknown(_) => AdminProblem::not_found(e.to_string()),
        BdkRefusal::TokenConflict(why) => AdminProblem::new(StatusCode::CONFLICT, why),
        BdkRefusal::Unavailable(why) => {
            tracing::warn!(error = %why, "dukpt: the BDK's token");
            AdminProblem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the PKCS#11 token holding the BDK: {why}; nothing was stored; retry"),
            )
        }
        BdkRefusal::Internal(why) => AdminProblem::internal("dukpt", why),
    }
}

fn parse_serial(s: &str) -> Result<u64, AdminProblem> {
    s.parse::<u64>()
        .ok()
        .filter(|s| *s > 0)
        .ok_or_else(|| AdminProblem::bad_request(format!("{s:?} is not a device serial")))
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> AdminResult {
    let body = serde_json::to_vec(v).map_err(|e| AdminProblem::internal("json", e))?;
    Ok(respond(status, "application/json", body))
}

async fn read_json<T: for<'de> Deserialize<'de>>(
    req: Request<Incoming>,
) -> Result<T, AdminProblem> {
    // JSON only (absent: taken as JSON), refused before the body is read.
    let ctype = media_type(header(&req, hyper::header::CONTENT_TYPE));
    if !matches!(ctype.as_str(), "" | "application/json") {
        return Err(AdminProblem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content type {ctype:?} is not application/json"),
        ));
    }
    let body = read_body(req, MAX_BODY).await.map_err(|e| match e {
        BodyError::TooLarge => AdminProblem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {MAX_BODY} bytes"),
        ),
        BodyError::TimedOut(t) => AdminProblem::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("request body not received within {} s", t.as_secs()),
        ),
        BodyError::Unreadable(e) => {
            AdminProblem::bad_request(format!("request body unreadable: {e}"))
        }
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| AdminProblem::bad_request(format!("request body: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_names_are_fixed() {
        assert_eq!(operation_name(&Method::GET, "/devices/17"), "device-show");
        assert_eq!(
            operation_name(&Method::POST, "/devices/17/revoke"),
            "device-revoke"
        );
        assert_eq!(
            operation_name(&Method::POST, "/lines/L1/disable"),
            "line-disable"
        );
        assert_eq!(operation_name(&Method::GET, "/nothing/here"), "other");
    }

    /// Every route (each has an operation name) is in `allowed_methods` with its method, so
    /// that no route of the door is ever answered 405 or 404, and a 405's Allow names it.
    #[test]
    fn every_route_takes_its_method_and_allow_names_it() {
        let routes = [
            ("GET", "/devices/17"),
            ("POST", "/devices/17/revoke"),
            ("POST", "/devices/17/reset"),
            ("POST", "/secrets/rotate"),
            ("GET", "/lines"),
            ("POST", "/lines"),
            ("POST", "/lines/L1/disable"),
            ("POST", "/lines/L1/enable"),
            ("POST", "/lines/L1/rate"),
            ("GET", "/dukpt/bdks"),
            ("POST", "/dukpt/bdks"),
            ("POST", "/dukpt/derive"),
            ("GET", "/audit"),
            ("GET", "/audit/verify"),
            ("GET", "/crl"),
            ("GET", "/metrics"),
            ("GET", "/health"),
            ("GET", "/operators"),
            ("POST", "/operators/alice/revoke"),
        ];
        for (method, path) in routes {
            let m = Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET);
            assert_ne!(operation_name(&m, path), "other", "{method} {path}");
            let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
            let allow = allowed_methods(&parts).unwrap_or("");
            assert!(allow.split(", ").any(|a| a == method), "{method} {path}");
        }
        assert_eq!(allowed_methods(&["nothing", "here"]), None);
        // The routes that read a body are those that call read_json; the others refuse one.
        let with_body: Vec<&str> = routes
            .iter()
            .filter(|(method, path)| {
                let m = Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET);
                let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
                reads_body(&m, &parts)
            })
            .map(|(_, path)| *path)
            .collect();
        assert_eq!(
            with_body,
            [
                "/secrets/rotate",
                "/lines",
                "/lines/L1/rate",
                "/dukpt/bdks",
                "/dukpt/derive"
            ]
        );
    }

    #[test]
    fn serials_are_positive_numbers() {
        assert_eq!(parse_serial("17").ok(), Some(17));
        assert!(parse_serial("0").is_err());
        assert!(parse_serial("x").is_err());
        assert!(parse_serial("-1").is_err());
    }
}
