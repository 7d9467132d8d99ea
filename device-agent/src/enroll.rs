//! Enrollment, sans I/O: build the request, then accept or reject the response.

use protocol_spec::messages::{EnrollRequest, EnrollResponse, ResponseForm};
use protocol_spec::profile::{CertProfile, cert_serial, signature_value};
use protocol_spec::{CertSerial, csr, token};
use ring::rand::SecureRandom;

use crate::AgentError;
use crate::state::DeviceState;

/// Builds the EnrollRequest (CBOR) for `token`, after checking that the token is for this
/// device (serial and key), so that a mix-up on the line is caught before the CA sees it.
pub fn build_request(
    state: &DeviceState,
    token_bytes: &[u8],
    form: ResponseForm,
    rng: &dyn SecureRandom,
) -> Result<EnrollRequest, AgentError> {
    let (_, claims) = token::inspect(token_bytes)
        .map_err(|p| AgentError::Invalid(format!("token: {}", p.detail)))?;
    if claims.serial != state.serial {
        return Err(AgentError::Invalid(format!(
            "the token is for serial {}, this device is {}",
            claims.serial, state.serial
        )));
    }
    if claims.key_hash != state.key_hash() {
        return Err(AgentError::Invalid(
            "the token confirms another public key than this device's".into(),
        ));
    }
    let csr = csr::build(&state.key, state.serial, rng)
        .map_err(|e| AgentError::Invalid(format!("CSR: {e}")))?;
    Ok(EnrollRequest {
        token: token_bytes.to_vec(),
        csr,
        form,
    })
}

/// Checks a response against the pinned CA and the device's own serial and key, and returns
/// the certificate. A full certificate is accepted only if it is exactly what expanding its own
/// signature yields, which checks issuer, serial, key, profile and signature at once.
pub fn accept_response(
    state: &DeviceState,
    ca: &CertProfile,
    response: &EnrollResponse,
) -> Result<Vec<u8>, AgentError> {
    let spki = state.key.spki_der();
    let verify = |e: protocol_spec::profile::ProfileError| AgentError::Verify(e.to_string());
    match response {
        EnrollResponse::Compact {
            ca_key_id,
            signature,
            generation,
        } => ca
            .expand(
                CertSerial::new(state.serial, *generation),
                &spki,
                ca_key_id,
                signature,
            )
            .map_err(verify),
        EnrollResponse::Full { certificate } => {
            let sig = signature_value(certificate).map_err(verify)?;
            // The generation (how often the serial was reset) is the CA's to know; the device
            // serial under it must be this device's, which the expansion checks too.
            let generation = cert_serial(certificate).map_err(verify)?.generation;
            let rebuilt = ca
                .expand(
                    CertSerial::new(state.serial, generation),
                    &spki,
                    ca.ca_key_id(),
                    &sig,
                )
                .map_err(verify)?;
            if &rebuilt != certificate {
                return Err(AgentError::Verify(
                    "the certificate is not the profile's certificate for this device".into(),
                ));
            }
            Ok(rebuilt)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol_spec::token::FactoryClaims;
    use protocol_spec::{DeviceSerial, KeyAlgorithm, KeyPair, profile};
    use ring::rand::SystemRandom;

    #[test]
    fn refuses_a_token_for_another_device_and_a_certificate_for_another_key() {
        let rng = SystemRandom::new();
        let dev = DeviceState::generate(DeviceSerial::new(5).unwrap(), KeyAlgorithm::Ed25519, &rng)
            .unwrap();
        let line = KeyPair::generate(KeyAlgorithm::Ed25519, &rng).unwrap();
        let claims = FactoryClaims {
            line: "l".into(),
            serial: DeviceSerial::new(6).unwrap(),
            key_hash: dev.key_hash(),
            issued_at: 0,
            expires_at: 600,
            token_id: vec![1; 16],
        };
        let t = token::mint(&claims, &line, &rng).unwrap();
        assert!(build_request(&dev, &t, ResponseForm::Full, &rng).is_err());

        let ca_key = KeyPair::generate(KeyAlgorithm::P256, &rng).unwrap();
        let ca =
            CertProfile::from_ca_der(&profile::new_ca_certificate("t", &ca_key, 0, &rng).unwrap())
                .unwrap();
        let other = KeyPair::generate(KeyAlgorithm::Ed25519, &rng).unwrap();
        let issued = ca
            .issue(dev.serial, &other.spki_der(), &ca_key, &rng)
            .unwrap();
        let err = accept_response(
            &dev,
            &ca,
            &EnrollResponse::Full {
                certificate: issued.der,
            },
        )
        .unwrap_err();
        assert!(matches!(err, AgentError::Verify(_)));
        let mine = ca
            .issue(dev.serial, &dev.key.spki_der(), &ca_key, &rng)
            .unwrap();
        assert_eq!(
            accept_response(
                &dev,
                &ca,
                &EnrollResponse::Full {
                    certificate: mine.der.clone()
                }
            )
            .unwrap(),
            mine.der
        );
        // A serial reset three times: the generation comes in the response (compact) or in
        // the certificate serial (full), and the rebuilt certificate is the issued one.
        let third = CertSerial::new(dev.serial, 3);
        let reissued = ca.issue(third, &dev.key.spki_der(), &ca_key, &rng).unwrap();
        let compact = EnrollResponse::Compact {
            ca_key_id: ca.ca_key_id().to_vec(),
            signature: reissued.signature.clone(),
            generation: 3,
        };
        assert_eq!(accept_response(&dev, &ca, &compact).unwrap(), reissued.der);
        let full = EnrollResponse::Full {
            certificate: reissued.der.clone(),
        };
        assert_eq!(accept_response(&dev, &ca, &full).unwrap(), reissued.der);
        let no_generation = EnrollResponse::Compact {
            ca_key_id: ca.ca_key_id().to_vec(),
            signature: reissued.signature,
            generation: 0,
        };
        assert!(accept_response(&dev, &ca, &no_generation).is_err());
    }
}
