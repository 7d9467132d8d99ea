//! Targets on protocol-spec and device-agent: the enrollment request (CBOR, JSON), the factory
//! token, the CSR checks, the agent's acceptance of a (compact) response, the secret ack.
//! The context (lines, time, CA, device) is the committed test vectors' (protocol-spec/vectors,
//! manifest.json), so that inputs grown from the vectors reach the signature checks.

use std::sync::OnceLock;

use device_agent::enroll::accept_response;
use device_agent::state::DeviceState;
use protocol_spec::csr::ParsedCsr;
use protocol_spec::messages::{EnrollRequest, EnrollResponse, SecretAck};
use protocol_spec::profile::CertProfile;
use protocol_spec::record::ProvisioningRecord;
use protocol_spec::token::{self, LineInfo, TokenPolicy};
use protocol_spec::{PublicKey, enroll};

/// The vectors' `now` (manifest.json).
pub const NOW: u64 = 1_767_225_600;

/// An EnrollRequest in CBOR, as the HTTPS and CoAP doors decode it, then checked as the
/// registration authority checks it (token, CSR, key binding).
pub fn enroll_request_cbor(data: &[u8]) {
    let Ok(request) = EnrollRequest::from_cbor(data) else {
        return;
    };
    let again = EnrollRequest::from_cbor(&request.to_cbor());
    assert_eq!(again.as_ref(), Ok(&request), "CBOR round trip");
    check(request);
}

/// An EnrollRequest in JSON (the HTTPS door's other encoding), then checked.
pub fn enroll_request_json(data: &[u8]) {
    let Ok(request) = EnrollRequest::from_json(data) else {
        return;
    };
    let again = EnrollRequest::from_json(&request.to_json());
    assert_eq!(again.as_ref(), Ok(&request), "JSON round trip");
    check(request);
}

/// A factory token (COSE_Sign1 CWT): parsed, then verified against the vectors' lines.
pub fn factory_token(data: &[u8]) {
    let inspected = token::inspect(data);
    if let Ok(verified) = token::verify(data, &lines, NOW, TokenPolicy::default()) {
        let (_, claims) = inspected.expect("a token that verifies can be inspected");
        assert_eq!(&claims, verified.claims(), "inspect and verify agree");
        let line = lines(&claims.line).expect("a verified token's line is known");
        assert!(line.active, "a disabled line vouches for nothing");
        let serial = claims.serial.get();
        assert!(serial >= line.first_serial && serial <= line.last_serial);
    }
}

/// A CSR (PKCS#10 DER): parsed and its proof of possession checked.
pub fn csr(data: &[u8]) {
    if let Ok(parsed) = ParsedCsr::parse(data) {
        let spki = parsed.spki_der().to_vec();
        if let Ok(verified) = parsed.verify() {
            assert_eq!(verified.spki_der(), &spki[..]);
        }
    }
}

/// An EnrollResponse (CBOR), compact or full, as the agent accepts it: expanded or compared
/// under the pinned CA for the vectors' device `ok-compact-ed25519-ca`. Only that device's one
/// certificate may ever come out.
pub fn compact_response(data: &[u8]) {
    let Ok(response) = EnrollResponse::from_cbor(data) else {
        return;
    };
    let v = vectors();
    if let Ok(cert) = accept_response(&v.device, &v.ca, &response) {
        assert_eq!(cert, CERTIFICATE, "only the CA's certificate is accepted");
    }
}

/// A secret ack body, CBOR and JSON, as the mutual-TLS door decodes it.
pub fn secret_ack(data: &[u8]) {
    if let Ok(ack) = SecretAck::from_cbor(data) {
        assert_eq!(SecretAck::from_cbor(&ack.to_cbor()).as_ref(), Ok(&ack));
    }
    if let Ok(ack) = SecretAck::from_json(data) {
        assert_eq!(SecretAck::from_json(&ack.to_json()).as_ref(), Ok(&ack));
    }
}

fn check(request: EnrollRequest) {
    let _ = enroll::check_request(request, &lines, NOW, TokenPolicy::default());
}

const CERTIFICATE: &[u8] =
    include_bytes!("../../protocol-spec/vectors/cases/ok-compact-ed25519-ca/certificate.der");

struct Vectors {
    lines: Vec<(&'static str, LineInfo)>,
    ca: CertProfile,
    device: DeviceState,
}

/// The vectors' line directory (manifest.json `lines`).
pub fn lines(id: &str) -> Option<LineInfo> {
    vectors()
        .lines
        .iter()
        .find(|(name, _)| *name == id)
        .map(|(_, l)| l.clone())
}

fn vectors() -> &'static Vectors {
    static V: OnceLock<Vectors> = OnceLock::new();
    V.get_or_init(|| {
        let line = |pem: &str, first: u64, last: u64, active: bool| LineInfo {
            public_key: PublicKey::from_pem(pem).expect("vector line key"),
            first_serial: first,
            last_serial: last,
            active,
        };
        let lines = vec![
            (
                "line-a",
                line(
                    include_str!("../../protocol-spec/vectors/lines/line-a.pub.pem"),
                    1000,
                    1999,
                    true,
                ),
            ),
            (
                "line-b",
                line(
                    include_str!("../../protocol-spec/vectors/lines/line-b.pub.pem"),
                    2000,
                    2999,
                    true,
                ),
            ),
            (
                "line-c",
                line(
                    include_str!("../../protocol-spec/vectors/lines/line-c.pub.pem"),
                    18_446_744_073_709_551_000,
                    u64::MAX,
                    true,
                ),
            ),
            (
                "line-d",
                line(
                    include_str!("../../protocol-spec/vectors/lines/line-d.pub.pem"),
                    3000,
                    3999,
                    false,
                ),
            ),
        ];
        let ca = CertProfile::from_ca_der(include_bytes!(
            "../../protocol-spec/vectors/cas/ca-ed25519.der"
        ))
        .expect("vector CA");
        let record = ProvisioningRecord::decode(include_bytes!(
            "../../protocol-spec/vectors/records/ok-compact-ed25519-ca.rec"
        ))
        .expect("vector record");
        let (key, certificate) = record
            .rebuild(&ca, &ring::rand::SystemRandom::new())
            .expect("the record rebuilds");
        assert_eq!(certificate, CERTIFICATE);
        let device = DeviceState {
            serial: record.serial,
            key,
            ca_certificate: None,
            certificate: None,
            enrolled_at: None,
            secrets: Vec::new(),
        };
        Vectors { lines, ca, device }
    })
}
