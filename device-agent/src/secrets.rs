//! Fetching, checking, storing and acknowledging the device's secret over mutual TLS.

use std::sync::Arc;

use protocol_spec::messages::{SecretAck, SecretDelivery};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::AgentError;
use crate::https::{HttpsClient, HttpsSession, problem_of};
use crate::state::{DeviceState, StoredSecret};
use crate::url::CaUrl;

/// What a sync did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncOutcome {
    /// A new version was stored and acknowledged.
    Stored {
        /// Its key id.
        key_id: String,
        /// Its version.
        version: u64,
    },
    /// The device already held the CA's newest version.
    UpToDate {
        /// The version.
        version: u64,
    },
}

/// An HTTPS client that presents the device certificate and key from `state` and trusts only
/// the pinned CA.
pub fn mtls_client(url: CaUrl, state: &DeviceState) -> Result<HttpsClient, AgentError> {
    let not_enrolled =
        || AgentError::Invalid(format!("serial {} is not enrolled yet", state.serial));
    let cert = state.certificate.clone().ok_or_else(not_enrolled)?;
    let ca = state.ca_certificate.clone().ok_or_else(not_enrolled)?;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca))
        .map_err(|e| AgentError::Invalid(format!("pinned CA certificate: {e}")))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(state.key.pkcs8_der().to_vec()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| AgentError::Invalid(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![CertificateDer::from(cert)], key)
        .map_err(|e| AgentError::Invalid(format!("client certificate: {e}")))?;
    HttpsClient::with_config(url, Arc::new(config))
}

/// `GET /secret` on a new connection, checked (see [`fetch_on`]).
pub async fn fetch(client: &HttpsClient) -> Result<SecretDelivery, AgentError> {
    fetch_on(&mut client.session().await?).await
}

/// `GET /secret`, checked: algorithm known, KCV consistent with the secret.
pub async fn fetch_on(session: &mut HttpsSession) -> Result<SecretDelivery, AgentError> {
    let a = session
        .request("GET", "/secret", None, "application/cbor", Vec::new())
        .await?;
    if a.status != 200 {
        return Err(problem_of(&a));
    }
    let d = SecretDelivery::from_cbor(&a.body)
        .map_err(|p| AgentError::Verify(format!("secret: {}", p.detail)))?;
    // A known algorithm (aes-256, aes-128-dukpt, aes-256-dukpt), a secret of its length, an
    // Initial Key ID exactly for DUKPT, and the KCV of the secret.
    d.check()
        .map_err(|e| AgentError::Verify(format!("secret: {e}")))?;
    Ok(d)
}

/// `POST /secret/ack` on a new connection.
pub async fn ack(client: &HttpsClient, a: &SecretAck) -> Result<(), AgentError> {
    ack_on(&mut client.session().await?, a).await
}

/// `POST /secret/ack`.
pub async fn ack_on(session: &mut HttpsSession, ack: &SecretAck) -> Result<(), AgentError> {
    let a = session
        .request(
            "POST",
            "/secret/ack",
            Some("application/cbor"),
            "application/cbor",
            ack.to_cbor(),
        )
        .await?;
    if a.status == 204 || a.status == 200 {
        Ok(())
    } else {
        Err(problem_of(&a))
    }
}

/// Fetches the newest secret; a new one is stored (through `save`, before the acknowledgement,
/// so that an acknowledged secret is always on the device) and then acknowledged.
pub async fn sync(
    client: &HttpsClient,
    state: &mut DeviceState,
    mut save: impl FnMut(&DeviceState) -> Result<(), AgentError>,
) -> Result<SyncOutcome, AgentError> {
    let mut session = client.session().await?;
    let d = fetch_on(&mut session).await?;
    let known = state
        .secrets
        .iter()
        .position(|s| s.key_id == d.key_id && s.version == d.version);
    let index = match known {
        Some(i) => i,
        None => {
            state.secrets.push(StoredSecret {
                key_id: d.key_id.clone(),
                version: d.version,
                algorithm: d.algorithm.clone(),
                secret: d.secret.clone(),
                kcv: d.kcv.clone(),
                initial_key_id: d.initial_key_id,
                acknowledged: false,
            });
            save(state)?;
            state.secrets.len() - 1
        }
    };
    let stored = &state.secrets[index];
    if stored.acknowledged {
        return Ok(SyncOutcome::UpToDate { version: d.version });
    }
    let a = SecretAck {
        key_id: stored.key_id.clone(),
        version: stored.version,
        // The KCV of what the device holds, recomputed, not the one it was sent.
        kcv: protocol_spec::secret::SecretAlgorithm::from_name(&stored.algorithm)
            .and_then(|alg| alg.kcv(&stored.secret))
            .ok_or_else(|| AgentError::Verify("the stored secret does not check".into()))?,
    };
    ack_on(&mut session, &a).await?;
    state.secrets[index].acknowledged = true;
    save(state)?;
    Ok(if known.is_some() {
        SyncOutcome::UpToDate { version: d.version }
    } else {
        SyncOutcome::Stored {
            key_id: d.key_id,
            version: d.version,
        }
    })
}
