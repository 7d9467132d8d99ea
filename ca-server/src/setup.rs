//! `ca-server init`: a new CA folder with working defaults.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use protocol_spec::{KeyAlgorithm, KeyPair, profile};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyUsagePurpose, SanType};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::config::{CaDir, Config};
use crate::store::{PgStore, SledStore};

/// What `init` needs to know.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// CA key algorithm.
    pub algorithm: KeyAlgorithm,
    /// CA common name.
    pub name: String,
    /// Extra DNS names or IP addresses for the HTTPS server certificate (localhost, 127.0.0.1
    /// and ::1 are always included).
    pub tls_names: Vec<String>,
    /// The CA's notBefore (and every device certificate's), Unix seconds.
    pub now: u64,
    /// `[store]`: where the records go (the sled store in the folder when it has no url).
    pub store: crate::config::StoreSettings,
}

/// Writes `bytes` to a new file with `mode`, refusing to overwrite.
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Creates a CA folder: CA key (0600) and certificate, key-encryption key (0600), HTTPS server
/// key (0600) and certificate issued by the CA, `config.toml`, and an empty store.
pub fn init(dir: &CaDir, opts: &InitOptions) -> Result<(), String> {
    if dir.ca_key().exists() {
        return Err(format!(
            "{} already holds a CA ({} exists); refusing to overwrite it",
            dir.root().display(),
            dir.ca_key().display()
        ));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir.root())
        .map_err(|e| format!("{}: {e}", dir.root().display()))?;
    // A database is checked before anything is written: reachable, and holding no other CA.
    let pg = crate::store::pg_config(dir, &opts.store)?;
    if let Some(c) = &pg {
        match PgStore::installed_version(c) {
            Ok(None) => {}
            Ok(Some(v)) => {
                return Err(format!(
                    "schema {:?} at {} already holds an Imprint store (version {v}); give another --store-schema, or drop that one",
                    c.schema,
                    crate::store::postgres::redact(&c.url)
                ));
            }
            Err(crate::store::StoreError::Unavailable(why)) => {
                return Err(format!(
                    "cannot reach the database at {}: {why}",
                    crate::store::postgres::redact(&c.url)
                ));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    let rng = SystemRandom::new();
    let ca_key = KeyPair::generate(opts.algorithm, &rng).map_err(|e| e.to_string())?;
    let not_before = i64::try_from(opts.now).map_err(|_| "time out of range".to_string())?;
    let ca_der = profile::new_ca_certificate(&opts.name, &ca_key, not_before, &rng)
        .map_err(|e| e.to_string())?;
    write_new(&dir.ca_key(), ca_key.to_pem().as_bytes(), 0o600)?;
    write_new(&dir.ca_cert(), profile::cert_pem(&ca_der).as_bytes(), 0o644)?;
    let mut kek = Zeroizing::new([0u8; 32]);
    rng.fill(kek.as_mut())
        .map_err(|_| "random generator failed".to_string())?;
    write_new(&dir.kek(), kek.as_ref(), 0o600)?;
    let (tls_cert, tls_key) =
        server_certificate(&ca_der, &ca_key, &opts.tls_names, opts.now, &rng)?;
    write_new(&dir.tls_key(), tls_key.as_bytes(), 0o600)?;
    write_new(&dir.tls_cert(), tls_cert.as_bytes(), 0o644)?;
    let config = Config {
        store: opts.store.clone(),
        ..Config::default()
    };
    let config = toml::to_string_pretty(&config).map_err(|e| e.to_string())?;
    let header =
        "# Imprint CA configuration. Every field may be left out; these are the defaults.\n";
    write_new(&dir.config(), format!("{header}{config}").as_bytes(), 0o644)?;
    crate::operators::ensure_operator_ca(dir, opts.now)?;
    match &pg {
        None => {
            // The store holds every binding and the encrypted secrets: only the CA's own
            // user may list or read it (sled would make the folder 0755).
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir.store())
                .map_err(|e| format!("{}: {e}", dir.store().display()))?;
            SledStore::open(&dir.store()).map_err(|e| e.to_string())?;
        }
        Some(c) => {
            PgStore::migrate(c).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// An HTTPS server certificate issued by the CA, so that devices verify the server with the one
/// CA certificate they pin. Its key has the CA's algorithm: with an Ed25519 CA, every TLS
/// handshake a device makes signs and verifies Ed25519 only (cheaper than P-256 on both sides;
/// TLS 1.3 clients such as rustls, OpenSSL 1.1.1+ (curl) and Go support it).
fn server_certificate(
    ca_der: &[u8],
    ca_key: &KeyPair,
    names: &[String],
    now: u64,
    rng: &SystemRandom,
) -> Result<(String, Zeroizing<String>), String> {
    let key = KeyPair::generate(ca_key.algorithm(), rng).map_err(|e| e.to_string())?;
    let mut sans = vec![
        SanType::DnsName(
            "localhost"
                .try_into()
                .map_err(|e: rcgen::Error| e.to_string())?,
        ),
        SanType::IpAddress([127, 0, 0, 1].into()),
        SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
    ];
    for n in names {
        match n.parse::<std::net::IpAddr>() {
            Ok(ip) => sans.push(SanType::IpAddress(ip)),
            Err(_) => sans.push(SanType::DnsName(
                n.as_str()
                    .try_into()
                    .map_err(|e: rcgen::Error| format!("--tls-name {n:?}: {e}"))?,
            )),
        }
    }
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, "Imprint CA server");
    p.subject_alt_names = sans;
    let start = time::OffsetDateTime::from_unix_timestamp(i64::try_from(now).unwrap_or(0))
        .map_err(|e| e.to_string())?;
    p.not_before = start;
    p.not_after = start + time::Duration::days(3650);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    let issuer = Issuer::from_ca_cert_der(&ca_der.into(), ca_key.rcgen_signer(rng))
        .map_err(|e| e.to_string())?;
    let cert = p
        .signed_by(&key.rcgen_signer(rng), &issuer)
        .map_err(|e| e.to_string())?;
    Ok((cert.pem(), key.to_pem()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Hardening finding 12: the store folder was 0755.
    #[test]
    fn the_ca_folder_and_its_store_are_for_the_ca_user_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CaDir::new(tmp.path().join("ca"));
        init(
            &dir,
            &InitOptions {
                algorithm: KeyAlgorithm::Ed25519,
                name: "t".into(),
                tls_names: vec![],
                now: 1_700_000_000,
                store: Default::default(),
            },
        )
        .unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(dir.root()), 0o700);
        assert_eq!(mode(&dir.store()), 0o700);
        for key in [
            dir.ca_key(),
            dir.kek(),
            dir.tls_key(),
            dir.operator_ca_key(),
        ] {
            assert_eq!(mode(&key), 0o600, "{}", key.display());
        }
    }
}
