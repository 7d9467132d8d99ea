//! The provisioning record on the device side (SPEC.md section 13), sans I/O: a device state
//! to the record it keeps in write-once memory, and the record plus the CA certificate the
//! device was built with back to a whole state.

use protocol_spec::profile::CertProfile;
use protocol_spec::record::ProvisioningRecord;
use ring::rand::SecureRandom;
use zeroize::Zeroizing;

use crate::AgentError;
use crate::state::DeviceState;

/// The record of an enrolled device (secret: it holds the private key). The state's own
/// pinned CA certificate is the one the record is checked against: the record rebuilds the
/// state's certificate byte for byte, or it is not made.
pub fn export(
    state: &DeviceState,
    rng: &dyn SecureRandom,
) -> Result<Zeroizing<Vec<u8>>, AgentError> {
    let (Some(certificate), Some(ca)) = (&state.certificate, &state.ca_certificate) else {
        return Err(AgentError::Invalid(format!(
            "serial {} is not enrolled yet: a record keeps an enrolled device",
            state.serial
        )));
    };
    let profile = CertProfile::from_ca_der(ca)
        .map_err(|e| AgentError::Invalid(format!("the pinned CA certificate: {e}")))?;
    let record = ProvisioningRecord::of(&state.key, certificate, &profile, rng)
        .map_err(|e| AgentError::Invalid(e.to_string()))?;
    Ok(record.encode())
}

/// A whole device state from a record and the CA certificate (DER) the device was built
/// with: its key pair, its certificate (rebuilt, and checked under the CA key), the CA pinned.
/// Secrets are not in a record: the device fetches its secret again over mutual TLS.
pub fn import(
    record: &[u8],
    ca_der: &[u8],
    rng: &dyn SecureRandom,
) -> Result<DeviceState, AgentError> {
    let profile = CertProfile::from_ca_der(ca_der)
        .map_err(|e| AgentError::Invalid(format!("the CA certificate: {e}")))?;
    let record =
        ProvisioningRecord::decode(record).map_err(|e| AgentError::Invalid(e.to_string()))?;
    let (key, certificate) = record
        .rebuild(&profile, rng)
        .map_err(|e| AgentError::Verify(e.to_string()))?;
    Ok(DeviceState {
        serial: record.serial,
        key,
        ca_certificate: Some(ca_der.to_vec()),
        certificate: Some(certificate),
        enrolled_at: None,
        secrets: Vec::new(),
    })
}
