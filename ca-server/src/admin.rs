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
use protocol_spec::PublicKey;
use protocol_spec::profile::cert_pem;
use serde::{Deserialize, Serialize};

use crate::audit::{AuditLine, rfc3339};
use crate::coap::CoapStats;
use crate::https::respond;
use crate::metrics::Snapshot;
use crate::records::{
    DeviceRecord, DeviceStatus, LineRecord, ResetRecord, SecretRecord, from_cbor,
};
use crate::service::CaService;
use crate::store::ResetOutcome;

/// Largest admin request body.
const MAX_BODY: usize = 64 * 1024;
/// Most audit entries in one page.
pub const MAX_AUDIT_PAGE: usize = 10_000;

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

/// An operator as `GET /operators` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorView {
    /// Name (`operator:NAME` in the audit log).
    pub name: String,
    /// `active` or `revoked`.
    pub status: String,
    /// `admin` or `read-only` (as issued; unknown for an operator revoked but not issued from
    /// this CA folder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The certificate's serial, hex, when issued from this CA folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_serial: Option<String>,
    /// When the certificate expires, Unix seconds, when issued from this CA folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// When it was revoked, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<u64>,
    /// Who revoked it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_by: Option<String>,
}

/// A device as an operator sees it: never a secret, only key ids, versions and times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceView {
    /// The serial.
    pub serial: u64,
    /// `active`, `revoked`, or `reset` (no current binding, history only).
    pub status: String,
    /// The current binding, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding: Option<BindingView>,
    /// Every secret version, oldest first.
    pub secrets: Vec<SecretView>,
    /// Earlier bindings an operator reset, oldest first.
    pub history: Vec<ResetView>,
}

/// One serial -> key binding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindingView {
    /// `sha256:` and the hex SHA-256 of the DER SubjectPublicKeyInfo.
    pub key_fingerprint: String,
    /// `ed25519` or `p256`.
    pub key_algorithm: String,
    /// The line that vouched for it.
    pub line: String,
    /// The token id its enrollment consumed, hex.
    pub token_id: String,
    /// Enrollment time, Unix seconds.
    pub enrolled_at: u64,
    /// Enrollment time, RFC 3339.
    pub enrolled: String,
    /// The reset generation its certificate serial carries (SPEC.md 5): 0 for a serial never
    /// reset.
    #[serde(default)]
    pub generation: u32,
    /// Revocation time, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<u64>,
    /// The certificate, PEM.
    pub certificate: String,
}

/// One secret version, without the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretView {
    /// Key id.
    pub key_id: String,
    /// For a DUKPT Initial Key: its Initial Key ID, hex (BDK id, then derivation id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_key_id: Option<String>,
    /// Version.
    pub version: u64,
    /// `csprng` or `import`.
    pub source: String,
    /// Key check value, hex (3 octets: identifies the key without revealing it).
    pub kcv: String,
    /// Created, Unix seconds.
    pub created_at: u64,
    /// First delivered, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<u64>,
    /// Acknowledged by the device, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_at: Option<u64>,
    /// Retired by a reset of the serial, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<u64>,
}

/// An earlier binding of a serial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetView {
    /// When it was reset, Unix seconds.
    pub reset_at: u64,
    /// Who reset it.
    pub actor: String,
    /// Its status when it was reset.
    pub status: String,
    /// The binding.
    pub binding: BindingView,
}

/// A production line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineView {
    /// Line id.
    pub id: String,
    /// First serial.
    pub first_serial: u64,
    /// Last serial (inclusive).
    pub last_serial: u64,
    /// Quota.
    pub quota: u64,
    /// Devices enrolled so far.
    pub enrolled: u64,
    /// Enrollments per second allowed (0: no limit).
    #[serde(default)]
    pub rate: u32,
    /// Whether its tokens are accepted.
    pub active: bool,
    /// `sha256:` and the hex SHA-256 of the line station's SubjectPublicKeyInfo.
    pub key_fingerprint: String,
    /// Registration time, Unix seconds.
    pub created_at: u64,
    /// Where its devices' secrets come from: `random`, `pool` or `dukpt:BDKID`.
    #[serde(default = "random_source")]
    pub secret_source: String,
}

fn random_source() -> String {
    "random".into()
}

/// `POST /lines/{id}/rate` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetRate {
    /// Enrollments per second, 0 = no limit.
    pub rate: u32,
}

/// The largest line rate accepted (enrollments per second, across every node).
pub const MAX_LINE_RATE: u32 = 1_000_000;

/// `POST /lines`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddLine {
    /// Line id.
    pub id: String,
    /// The line station's public key, PEM.
    pub public_key: String,
    /// `FIRST-LAST`.
    pub serials: String,
    /// Quota (default: the size of the range).
    #[serde(default)]
    pub quota: Option<u64>,
    /// Enrollments per second (0 or absent: no limit).
    #[serde(default)]
    pub rate: u32,
    /// `random` (absent), `pool` or `dukpt:BDKID` (a stored BDK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_source: Option<String>,
}

/// `POST /secrets/rotate`: exactly one of the three.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// One device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<u64>,
    /// Every device of a line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<String>,
    /// Every device.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
}

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateResult {
    /// Devices asked for.
    pub requested: u64,
    /// New versions created.
    pub rotated: u64,
    /// The new versions (at most 100 listed).
    pub versions: Vec<RotatedVersion>,
    /// Devices not rotated, with why.
    pub failed: Vec<RotateFailure>,
}

/// One new version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotatedVersion {
    /// Device.
    pub serial: u64,
    /// New key id.
    pub key_id: String,
    /// New version (pending until the device fetches and acks it).
    pub version: u64,
}

/// A device that was not rotated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateFailure {
    /// Device.
    pub serial: u64,
    /// Problem type.
    pub problem: String,
    /// Detail.
    pub detail: String,
}

/// An admin API failure, sent as problem details.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminProblem {
    /// HTTP status.
    pub status: u16,
    /// Short title.
    pub title: String,
    /// What exactly.
    pub detail: String,
    /// For 405: the methods the path takes, sent as `Allow` (not in the body).
    #[serde(skip)]
    pub allow: Option<&'static str>,
}

impl AdminProblem {
    fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        AdminProblem {
            status: status.as_u16(),
            title: status.canonical_reason().unwrap_or("error").to_string(),
            detail: detail.into(),
            allow: None,
        }
    }
    fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, detail)
    }
    fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, detail)
    }
    fn internal(context: &str, e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "admin: {context}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error (see the server log)",
        )
    }
    /// A service call's problem: 503 when the store or the CA's key token does not answer
    /// (`unavailable`: nothing was written; retry), else an internal error.
    fn from_service(context: &str, p: protocol_spec::Problem) -> Self {
        if p.kind == protocol_spec::ProblemType::Unavailable {
            Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{context}: {}", p.detail),
            )
        } else {
            Self::internal(context, p.detail)
        }
    }
}

type AdminResult = Result<Response<Full<Bytes>>, AdminProblem>;

/// Handles one request on the admin door. `client_cert` has been checked against the operator
/// CA by the TLS layer; here it must also have the operator profile.
pub async fn handle(
    req: Request<Incoming>,
    service: &Arc<CaService>,
    ctx: &AdminContext,
    client_cert: Option<&Vec<u8>>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let operation = operation_name(req.method(), &path);
    let (operator, role) = match client_cert.map(|c| crate::operators::operator_identity(c)) {
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
            crate::https::closing(r)
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

/// Every operator issued from this CA folder, and every revoked one, by name.
fn operator_views(
    issued: &[crate::operators::IssuedOperator],
    revoked: &[crate::records::OperatorRevocation],
) -> Vec<OperatorView> {
    let mut views: std::collections::BTreeMap<String, OperatorView> = issued
        .iter()
        .map(|o| {
            (
                o.name.clone(),
                OperatorView {
                    name: o.name.clone(),
                    status: "active".into(),
                    role: Some(o.role.name().to_string()),
                    certificate_serial: Some(o.serial.clone()),
                    expires_at: Some(o.expires_at),
                    revoked_at: None,
                    revoked_by: None,
                },
            )
        })
        .collect();
    for r in revoked {
        let v = views.entry(r.name.clone()).or_insert_with(|| OperatorView {
            name: r.name.clone(),
            status: String::new(),
            role: None,
            certificate_serial: None,
            expires_at: None,
            revoked_at: None,
            revoked_by: None,
        });
        v.status = "revoked".into();
        v.revoked_at = Some(r.revoked_at);
        v.revoked_by = Some(r.actor.clone());
    }
    views.into_values().collect()
}

/// A device's full record as an operator sees it.
pub fn device_view(service: &CaService, serial: u64) -> Result<DeviceView, AdminProblem> {
    let store = service.store();
    let err = |e| AdminProblem::internal("store", e);
    let current = store.device(serial).map_err(err)?;
    let history = store.history(serial).map_err(err)?;
    if current.is_none() && history.is_empty() {
        return Err(AdminProblem::not_found(format!("no device {serial}")));
    }
    let secrets = store.secret_versions(serial).map_err(err)?;
    Ok(DeviceView {
        serial,
        status: match &current {
            Some(d) if d.status == DeviceStatus::Revoked => "revoked",
            Some(_) => "active",
            None => "reset",
        }
        .to_string(),
        binding: current.as_ref().map(binding_view),
        secrets: secrets.iter().map(secret_view).collect(),
        history: history.iter().map(reset_view).collect(),
    })
}

fn fingerprint(spki: &[u8]) -> String {
    format!("sha256:{}", hex::encode(protocol_spec::spki::sha256(spki)))
}

fn binding_view(d: &DeviceRecord) -> BindingView {
    BindingView {
        key_fingerprint: fingerprint(&d.spki),
        key_algorithm: PublicKey::from_spki_der(&d.spki)
            .map(|k| k.algorithm.to_string())
            .unwrap_or_else(|_| "unknown".into()),
        line: d.line.clone(),
        token_id: hex::encode(&d.token_id),
        enrolled_at: d.enrolled_at,
        enrolled: rfc3339(d.enrolled_at),
        generation: crate::records::generation_of(&d.certificate),
        revoked_at: d.revoked_at,
        certificate: cert_pem(&d.certificate),
    }
}

fn secret_view(s: &SecretRecord) -> SecretView {
    SecretView {
        initial_key_id: crate::ra::rules::dukpt_claim(s).map(|_| s.key_id.clone()),
        key_id: s.key_id.clone(),
        version: s.version,
        source: s.source.clone(),
        kcv: hex::encode(&s.kcv),
        created_at: s.created_at,
        delivered_at: s.delivered_at,
        confirmed_at: s.confirmed_at,
        retired_at: s.retired_at,
    }
}

fn reset_view(r: &ResetRecord) -> ResetView {
    ResetView {
        reset_at: r.reset_at,
        actor: r.actor.clone(),
        status: match r.device.status {
            DeviceStatus::Active => "active",
            DeviceStatus::Revoked => "revoked",
        }
        .to_string(),
        binding: binding_view(&r.device),
    }
}

/// A line as an operator sees it.
pub fn line_view(l: &LineRecord) -> LineView {
    LineView {
        id: l.id.clone(),
        first_serial: l.first_serial,
        last_serial: l.last_serial,
        quota: l.quota,
        enrolled: l.enrolled,
        rate: l.rate,
        active: l.active,
        key_fingerprint: fingerprint(&l.public_key),
        created_at: l.created_at,
        secret_source: l.secret_source.to_string(),
    }
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
    let ctype = crate::https::media_type(crate::https::header(&req, hyper::header::CONTENT_TYPE));
    if !matches!(ctype.as_str(), "" | "application/json") {
        return Err(AdminProblem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content type {ctype:?} is not application/json"),
        ));
    }
    let body = crate::https::read_body(req, MAX_BODY)
        .await
        .map_err(|e| match e {
            crate::https::BodyError::TooLarge => AdminProblem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {MAX_BODY} bytes"),
            ),
            crate::https::BodyError::TimedOut(t) => AdminProblem::new(
                StatusCode::REQUEST_TIMEOUT,
                format!("request body not received within {} s", t.as_secs()),
            ),
            crate::https::BodyError::Unreadable(e) => {
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
    }

    #[test]
    fn serials_are_positive_numbers() {
        assert_eq!(parse_serial("17").ok(), Some(17));
        assert!(parse_serial("0").is_err());
        assert!(parse_serial("x").is_err());
        assert!(parse_serial("-1").is_err());
    }
}
