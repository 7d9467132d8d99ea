//! The admin API's messages (SPEC.md section 11.8): what operators send and get back, shared by
//! the admin door ([`crate::doors::admin`]), the command line's client
//! ([`crate::admin_client`]) and the offline commands, and the views of stored records they
//! show ([`views`]).

use hyper::StatusCode;
use serde::{Deserialize, Serialize};

pub mod views;
pub use views::{device_view, line_view, operator_views};

/// Most audit entries in one page.
pub const MAX_AUDIT_PAGE: usize = 10_000;

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
    /// A problem with `status` and its reason as title.
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        AdminProblem {
            status: status.as_u16(),
            title: status.canonical_reason().unwrap_or("error").to_string(),
            detail: detail.into(),
            allow: None,
        }
    }
    /// 404.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, detail)
    }
    /// 400.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, detail)
    }
    /// 500, the cause logged and not sent.
    pub fn internal(context: &str, e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "admin: {context}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error (see the server log)",
        )
    }
    /// A service call's problem: 503 when the store or the CA's key token does not answer
    /// (`unavailable`: nothing was written; retry), else an internal error.
    pub fn from_service(context: &str, p: protocol_spec::Problem) -> Self {
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
