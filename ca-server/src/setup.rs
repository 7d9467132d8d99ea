//! `ca-server init`: a new CA folder with working defaults.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use protocol_spec::{KeyAlgorithm, KeyPair, profile};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::config::{CaDir, Config};
use crate::issuer::{CaKey, Issuer, Pkcs11Uri, SessionLimits, TokenKey};
use crate::operators::OperatorCaKey;
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
    /// Where the CA key is made or found.
    pub ca_key: CaKeySource,
}

/// Where `init` gets the CA key.
#[derive(Debug, Clone, Default)]
pub enum CaKeySource {
    /// A new key, written to `ca.key.pem` (0600).
    #[default]
    File,
    /// A key in a PKCS#11 token: a new key pair generated in it, or (`existing`) the key
    /// already there under the URI's label, whose algorithm then decides the CA's. No private
    /// key file is written; config.toml keeps the URI without any PIN value.
    Pkcs11 {
        /// The key's URI.
        uri: Pkcs11Uri,
        /// Use the key already in the token.
        existing: bool,
        /// Keep the HTTPS server's key in plain `tls.key.pem` rather than sealed by the token
        /// in `tls.key.sealed`.
        tls_key_file: bool,
    },
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

/// Makes the entries of `folder` (files written, renamed or removed there) durable: an fsync of
/// the folder itself, without which a crash may lose a file whose own data was synced.
pub fn sync_folder(folder: &Path) -> Result<(), String> {
    std::fs::File::open(folder)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("{}: {e}", folder.display()))
}

/// Creates a CA folder: CA key (0600) and certificate, key-encryption key (0600), HTTPS server
/// key (0600) and certificate issued by the CA, `config.toml`, and an empty store.
pub fn init(dir: &CaDir, opts: &InitOptions) -> Result<(), String> {
    for existing in [dir.ca_key(), dir.ca_cert()] {
        if existing.exists() {
            return Err(format!(
                "{} already holds a CA ({} exists); refusing to overwrite it",
                dir.root().display(),
                existing.display()
            ));
        }
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
    let (ca_key, pkcs11) = match &opts.ca_key {
        CaKeySource::File => (
            CaKey::File(KeyPair::generate(opts.algorithm, &rng).map_err(|e| e.to_string())?),
            None,
        ),
        CaKeySource::Pkcs11 { uri, existing, .. } => {
            let limits = SessionLimits::default();
            let key = if *existing {
                TokenKey::open(uri, &limits)?
            } else {
                TokenKey::generate(uri, opts.algorithm, &limits)?
            };
            (CaKey::Token(key), Some(uri.to_config_string()))
        }
    };
    let not_before = i64::try_from(opts.now).map_err(|_| "time out of range".to_string())?;
    let signer = ca_key.signer(&rng);
    let ca_der = profile::new_ca_certificate_with(&opts.name, &&signer, not_before).map_err(
        |e| match signer.take_error() {
            Some(why) => why.to_string(),
            None => e.to_string(),
        },
    )?;
    if let CaKey::File(k) = &ca_key {
        write_new(&dir.ca_key(), k.to_pem().as_bytes(), 0o600)?;
    }
    write_new(&dir.ca_cert(), profile::cert_pem(&ca_der).as_bytes(), 0o644)?;
    let algorithm = ca_key.algorithm();
    let issuer = Issuer::new(ca_key, &ca_der)?;
    let mut kek = Zeroizing::new([0u8; 32]);
    rng.fill(kek.as_mut())
        .map_err(|_| "random generator failed".to_string())?;
    match &opts.ca_key {
        CaKeySource::File => write_new(&dir.kek(), kek.as_ref(), 0o600)?,
        // The key-encryption key only leaves the token's seal in the CA's memory.
        CaKeySource::Pkcs11 { uri, .. } => write_new(
            &dir.kek_sealed(),
            &crate::issuer::pkcs11::seal_kek(uri, kek.as_ref(), &SessionLimits::default())?,
            0o600,
        )?,
    }
    // The HTTPS server's key, of the CA's algorithm: a file, or, for a CA whose key is in a
    // token, written only sealed by that token (unless asked for a file).
    let tls_key = KeyPair::generate(algorithm, &rng).map_err(|e| e.to_string())?;
    let tls_cert = issuer
        .server_certificate(&tls_key, &opts.tls_names, opts.now)
        .map_err(|e| e.to_string())?;
    match &opts.ca_key {
        CaKeySource::Pkcs11 {
            uri,
            tls_key_file: false,
            ..
        } => write_new(
            &dir.tls_key_sealed(),
            &crate::issuer::pkcs11::seal_tls_key(
                uri,
                tls_key.to_pem().as_bytes(),
                &SessionLimits::default(),
            )?,
            0o600,
        )?,
        _ => write_new(&dir.tls_key(), tls_key.to_pem().as_bytes(), 0o600)?,
    }
    write_new(&dir.tls_cert(), tls_cert.as_bytes(), 0o644)?;
    let mut config = Config {
        store: opts.store.clone(),
        ..Config::default()
    };
    config.issuer.pkcs11 = pkcs11;
    let config = toml::to_string_pretty(&config).map_err(|e| e.to_string())?;
    let header =
        "# Imprint CA configuration. Every field may be left out; these are the defaults.\n";
    write_new(&dir.config(), format!("{header}{config}").as_bytes(), 0o644)?;
    // With the CA key in a token, the operator CA's key is a second key pair there.
    let operator_key = match &opts.ca_key {
        CaKeySource::File => OperatorCaKey::File,
        CaKeySource::Pkcs11 { uri, existing, .. } => OperatorCaKey::Token {
            uri: uri.clone(),
            limits: SessionLimits::default(),
            existing: *existing,
        },
    };
    crate::operators::ensure_operator_ca(dir, &operator_key, opts.now)?;
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
    // A new CA's chain is sealed by the audit key from its first entry (SPEC.md 11.9).
    crate::audit::write_sealed_from(dir, 1)?;
    Ok(())
}

/// `ca-server key to-token`: moves the CA key from `ca.key.pem` into the PKCS#11 token `uri`
/// names. Imports it, signs a message in the token and checks the signature under the CA
/// certificate's key, seals the HTTPS server's key by the token (`tls.key.sealed`, checked to
/// open again), imports the operator CA's key as the token's `OBJECT-operators` key pair
/// (checked by a signature under the operator CA certificate's key), points config.toml's
/// `[issuer] pkcs11` at the token (written whole, then renamed into place), and only then
/// removes the key files. Run it with the server stopped.
///
/// It can be run again after it failed part way: keys already imported under the same labels
/// are used again when they are the files' keys (their public halves equal), and a run that
/// stopped after config.toml named the token (the key files still there) is finished.
pub fn key_to_token(dir: &CaDir, uri: &Pkcs11Uri) -> Result<(), String> {
    let mut config = dir.load_config()?;
    if let Some(already) = &config.issuer.pkcs11 {
        // A run that stopped between config.toml and the removal of the key files is
        // finished by the same command; otherwise the key has moved already.
        let unfinished = *already == uri.to_config_string() && dir.ca_key().exists();
        if !unfinished {
            return Err(format!(
                "{}: the CA key is already in a token ({already})",
                dir.config().display()
            ));
        }
    }
    let rng = SystemRandom::new();
    let key_pem = std::fs::read_to_string(dir.ca_key())
        .map_err(|e| format!("{}: {e}", dir.ca_key().display()))?;
    let key = KeyPair::from_pem(&key_pem, &rng)
        .map_err(|e| format!("{}: {e}", dir.ca_key().display()))?;
    let ca_pem = std::fs::read_to_string(dir.ca_cert())
        .map_err(|e| format!("{}: {e}", dir.ca_cert().display()))?;
    let ca_der = profile::cert_from_pem(&ca_pem)
        .ok_or_else(|| format!("{}: no CERTIFICATE", dir.ca_cert().display()))?;
    let ca_public = profile::CertProfile::from_ca_der(&ca_der)
        .map_err(|e| format!("{}: {e}", dir.ca_cert().display()))?
        .ca_public_key()
        .clone();
    if ca_public.raw != key.public_key_raw() {
        return Err(format!(
            "{} is not the key of {}",
            dir.ca_key().display(),
            dir.ca_cert().display()
        ));
    }
    let token = import_again(uri, &key, &crate::issuer::session_limits(dir, &config)?)?;
    let mut probe = [0u8; 32];
    rng.fill(&mut probe)
        .map_err(|_| "random generator failed".to_string())?;
    let signature = token.sign_x509(&probe).map_err(|e| e.to_string())?;
    if token.public_key_raw() != ca_public.raw.as_slice()
        || !ca_public.verify_x509(&probe, &signature)
    {
        return Err(format!(
            "{}: a signature made in the token does not verify under the CA certificate's key; {} and config.toml are unchanged (delete the imported objects from the token)",
            uri.describe(),
            dir.ca_key().display()
        ));
    }
    // The HTTPS server's key is sealed by the token too (as `init --pkcs11` writes it), and
    // checked to open again, before anything is removed.
    let tls_pem = match std::fs::read(dir.tls_key()) {
        Ok(pem) => Some(Zeroizing::new(pem)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("{}: {e}", dir.tls_key().display())),
    };
    if let Some(pem) = &tls_pem {
        let limits = crate::issuer::session_limits(dir, &config)?;
        let sealed = crate::issuer::pkcs11::seal_tls_key(uri, pem, &limits)?;
        let opened = crate::issuer::pkcs11::unseal_tls_key(uri, &sealed, &limits)?;
        if opened.as_slice() != pem.as_slice() {
            return Err(format!(
                "{}: the sealed HTTPS server key does not open to {}; nothing changed",
                uri.describe(),
                dir.tls_key().display()
            ));
        }
        let _ = std::fs::remove_file(dir.tls_key_sealed());
        write_new(&dir.tls_key_sealed(), &sealed, 0o600)?;
    }
    // The operator CA's key becomes the token's `OBJECT-operators` key pair, as init --pkcs11
    // makes it, checked by a signature made there under the operator CA certificate's key.
    let operator_key = dir.operator_ca_key();
    let moved_operator_key = match std::fs::read_to_string(&operator_key) {
        Ok(pem) => {
            let pem = Zeroizing::new(pem);
            let at = |e: String| format!("{}: {e}", operator_key.display());
            let key = KeyPair::from_pem(&pem, &rng).map_err(|e| at(e.to_string()))?;
            let cert_path = dir.operator_ca_cert();
            let cert_pem = std::fs::read_to_string(&cert_path)
                .map_err(|e| format!("{}: {e}", cert_path.display()))?;
            let der = profile::cert_from_pem(&cert_pem)
                .ok_or_else(|| format!("{}: no CERTIFICATE", cert_path.display()))?;
            let (_, cert) = x509_parser::parse_x509_certificate(&der)
                .map_err(|e| format!("{}: {e}", cert_path.display()))?;
            let public = protocol_spec::PublicKey::from_spki_der(cert.public_key().raw)
                .map_err(|e| format!("{}: {e}", cert_path.display()))?;
            if public.raw != key.public_key_raw() {
                return Err(at(format!("not the key of {}", cert_path.display())));
            }
            let token = import_again(
                &crate::operators::operator_key_uri(uri),
                &key,
                &crate::issuer::session_limits(dir, &config)?,
            )?;
            let mut probe = [0u8; 32];
            rng.fill(&mut probe)
                .map_err(|_| "random generator failed".to_string())?;
            let signature = token.sign_x509(&probe).map_err(|e| e.to_string())?;
            if !public.verify_x509(&probe, &signature) {
                return Err(format!(
                    "{}: a signature made in the token does not verify under the operator CA certificate's key; nothing removed, config.toml unchanged",
                    uri.describe()
                ));
            }
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(format!("{}: {e}", operator_key.display())),
    };
    config.issuer.pkcs11 = Some(uri.to_config_string());
    let text = toml::to_string_pretty(&config).map_err(|e| e.to_string())?;
    let temporary = dir.root().join("config.toml.new");
    let _ = std::fs::remove_file(&temporary);
    write_new(&temporary, text.as_bytes(), 0o644)?;
    std::fs::rename(&temporary, dir.config())
        .map_err(|e| format!("{}: {e}", dir.config().display()))?;
    // tls.key.sealed and config.toml are durable before any key file is removed: a crash
    // cannot leave a CA folder without its keys and without what replaces them.
    sync_folder(dir.root())?;
    std::fs::remove_file(dir.ca_key()).map_err(|e| format!("{}: {e}", dir.ca_key().display()))?;
    if tls_pem.is_some() {
        std::fs::remove_file(dir.tls_key())
            .map_err(|e| format!("{}: {e}", dir.tls_key().display()))?;
    }
    if moved_operator_key {
        std::fs::remove_file(&operator_key)
            .map_err(|e| format!("{}: {e}", operator_key.display()))?;
    }
    sync_folder(dir.root())
}

/// Imports `key` into the token as `uri` names it ([`TokenKey::import`]), or, when a key is
/// already there under that label (left by an earlier run that failed part way), uses it if it
/// is `key` (the same algorithm and public key); another key under the label is refused.
fn import_again(
    uri: &Pkcs11Uri,
    key: &KeyPair,
    limits: &SessionLimits,
) -> Result<TokenKey, String> {
    match TokenKey::open_if_present(uri, limits)? {
        None => TokenKey::import(uri, key, limits),
        Some(found)
            if found.algorithm() == key.algorithm()
                && found.public_key_raw() == key.public_key_raw() =>
        {
            Ok(found)
        }
        Some(_) => Err(format!(
            "{}: the token already holds another key with that label; name another object=",
            uri.describe()
        )),
    }
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
                ca_key: Default::default(),
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
