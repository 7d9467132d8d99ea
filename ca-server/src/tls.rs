//! rustls configuration, with ring as the one crypto provider.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::config::{CaDir, Config};
use crate::issuer::Pkcs11Uri;
use crate::revocation::Revocations;

/// The ring provider, passed explicitly everywhere (no process-wide default is installed).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads a PEM certificate chain, naming the file on error.
pub fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no CERTIFICATE in the file", path.display()));
    }
    Ok(chain)
}

/// Loads a PEM private key, naming the file on error.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The TLS server's private key (its certificate is `tls.pem`), loaded: from the file
/// `tls.key.pem`, or, for a CA made with `init --pkcs11`, from `tls.key.sealed`, which the CA
/// key's token unseals once at start (SPEC.md 11.8). Handshakes then sign in memory, and a
/// token that stops answering leaves the TLS doors able to say `unavailable`.
#[derive(Debug)]
pub struct ServerKey(PrivateKeyDer<'static>);

impl ServerKey {
    /// A PEM key file.
    pub fn file(path: &Path) -> Result<Self, String> {
        load_key(path).map(ServerKey)
    }

    /// The server key of a CA folder: `tls.key.pem` when the folder has it, else
    /// `tls.key.sealed` unsealed by the token of config.toml's `[issuer] pkcs11`.
    pub fn for_folder(dir: &CaDir, config: &Config) -> Result<Self, String> {
        let file = dir.tls_key();
        if file.exists() {
            return Self::file(&file);
        }
        let sealed_path = dir.tls_key_sealed();
        let sealed = std::fs::read(&sealed_path).map_err(|e| {
            format!(
                "{}: {e} (the HTTPS server's key: neither it nor {} is in the CA folder)",
                sealed_path.display(),
                file.display()
            )
        })?;
        let Some(text) = &config.issuer.pkcs11 else {
            return Err(format!(
                "{}: sealed by a PKCS#11 token, and config.toml names none ([issuer] pkcs11)",
                sealed_path.display()
            ));
        };
        let uri = Pkcs11Uri::parse(text)
            .map_err(|e| format!("{}: [issuer] pkcs11: {e}", dir.config().display()))?;
        let limits = crate::issuer::session_limits(dir, config)?;
        let pem = crate::issuer::pkcs11::unseal_tls_key(&uri, &sealed, &limits)
            .map_err(|e| format!("{}: {e}", sealed_path.display()))?;
        PrivateKeyDer::from_pem_slice(&pem)
            .map(ServerKey)
            .map_err(|e| format!("{}: {e}", sealed_path.display()))
    }

    fn der(&self) -> PrivateKeyDer<'static> {
        self.0.clone_key()
    }
}

/// Server config for the HTTPS enrollment listener: TLS 1.3 and 1.2, no client certificates.
pub fn https_server_config(cert: &Path, key: &ServerKey) -> Result<Arc<ServerConfig>, String> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(load_chain(cert)?, key.der())
        .map_err(|e| format!("TLS server certificate: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // A device enrolls once: session tickets would cost a seal, two records and the device's
    // work to store them, for a resumption that never comes.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// Server config for the mutual-TLS door: TLS 1.3 only, a client certificate chaining to the
/// device CA required, and a revoked device refused in the handshake (alert
/// `certificate_revoked`).
pub fn mtls_server_config(
    ca_cert: &Path,
    cert: &Path,
    key: &ServerKey,
    revocations: Arc<Revocations>,
) -> Result<Arc<ServerConfig>, String> {
    let verifier = Arc::new(DeviceVerifier {
        inner: chain_verifier(ca_cert)?,
        revocations,
    });
    client_auth_config(verifier, cert, key)
}

/// Server config for the admin listener: TLS 1.3 only, a client certificate chaining to the
/// operator CA required (device certificates, issued by the device CA, fail the handshake).
pub fn admin_server_config(
    operator_ca: &Path,
    cert: &Path,
    key: &ServerKey,
) -> Result<Arc<ServerConfig>, String> {
    client_auth_config(chain_verifier(operator_ca)?, cert, key)
}

/// The serial number of a certificate, when it is a device certificate's (SPEC.md 5): the
/// device serial and the reset generation.
pub fn certificate_serial(der: &[u8]) -> Option<protocol_spec::CertSerial> {
    protocol_spec::profile::cert_serial(der).ok()
}

/// The device serial and the SHA-256 of the SPKI of a DER certificate (one parse), or `None`
/// when it is no device certificate.
pub fn certificate_serial_and_key(der: &[u8]) -> Option<(protocol_spec::CertSerial, [u8; 32])> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let serial = protocol_spec::CertSerial::from_integer_octets(cert.tbs_certificate.raw_serial())?;
    Some((
        serial,
        protocol_spec::spki::sha256(cert.tbs_certificate.subject_pki.raw),
    ))
}

fn chain_verifier(ca_cert: &Path) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_chain(ca_cert)? {
        roots
            .add(c)
            .map_err(|e| format!("{}: {e}", ca_cert.display()))?;
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| format!("client verifier for {}: {e}", ca_cert.display()))
}

/// Checks the chain with webpki, then refuses revoked serials.
#[derive(Debug)]
struct DeviceVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revocations: Arc<Revocations>,
}

impl ClientCertVerifier for DeviceVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        match certificate_serial(end_entity) {
            Some(c) if self.revocations.is_revoked(c.device.get(), c.generation) => {
                tracing::info!(
                    serial = c.device.get(),
                    generation = c.generation,
                    "revoked device refused in the handshake"
                );
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Revoked,
                ))
            }
            _ => Ok(verified),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn client_auth_config(
    verifier: Arc<dyn ClientCertVerifier>,
    cert: &Path,
    key: &ServerKey,
) -> Result<Arc<ServerConfig>, String> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_chain(cert)?, key.der())
        .map_err(|e| format!("TLS server certificate: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // No session resumption: a resumed session skips the client certificate check, and a
    // revocation must bite at the very next handshake.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}
