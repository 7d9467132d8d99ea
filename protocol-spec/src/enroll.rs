//! The stateless half of enrollment checking: everything that can be decided from the request,
//! the registered lines and the time. The CA adds the stateful rules (quota, replay, duplicate
//! key, serial taken, revoked) on top; the vectors pin this half.

use crate::UnixTime;
use crate::csr::{ParsedCsr, VerifiedCsr};
use crate::messages::{EnrollRequest, ResponseForm};
use crate::problem::{Problem, ProblemType};
use crate::spki;
use crate::token::{self, LineDirectory, TokenPolicy, VerifiedToken};

/// How a request body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestEncoding {
    /// `application/cbor` (normative).
    Cbor,
    /// `application/json` (the JSON mapping).
    Json,
}

/// A request whose token, CSR and key binding all checked out.
#[derive(Debug, Clone)]
pub struct CheckedEnrollment {
    token: VerifiedToken,
    csr: VerifiedCsr,
    form: ResponseForm,
}

impl CheckedEnrollment {
    /// The verified token.
    pub fn token(&self) -> &VerifiedToken {
        &self.token
    }

    /// The verified CSR.
    pub fn csr(&self) -> &VerifiedCsr {
        &self.csr
    }

    /// The response form asked for.
    pub fn form(&self) -> ResponseForm {
        self.form
    }
}

/// Decodes and checks an enrollment request. Checks run in the order SPEC.md gives, so each bad
/// request gets one well-defined problem type.
pub fn check(
    body: &[u8],
    encoding: RequestEncoding,
    lines: &dyn LineDirectory,
    now: UnixTime,
    policy: TokenPolicy,
) -> Result<CheckedEnrollment, Problem> {
    let request = match encoding {
        RequestEncoding::Cbor => EnrollRequest::from_cbor(body)?,
        RequestEncoding::Json => EnrollRequest::from_json(body)?,
    };
    check_request(request, lines, now, policy)
}

/// [`check`] for an already-decoded request.
pub fn check_request(
    request: EnrollRequest,
    lines: &dyn LineDirectory,
    now: UnixTime,
    policy: TokenPolicy,
) -> Result<CheckedEnrollment, Problem> {
    let token = token::verify(&request.token, lines, now, policy)?;
    let csr = ParsedCsr::parse(&request.csr)?;
    if spki::sha256(csr.spki_der()) != token.claims().key_hash {
        return Err(Problem::new(
            ProblemType::KeyMismatch,
            "token cnf is not the SHA-256 of the CSR's SubjectPublicKeyInfo",
        ));
    }
    let csr = csr.verify()?;
    Ok(CheckedEnrollment {
        token,
        csr,
        form: request.form,
    })
}
