//! Operators: people (and scripts) who run the CA through the admin API, authenticated by
//! mutual-TLS certificates of their own.
//!
//! Operator certificates come from a separate operator CA (`operators-ca.pem`, made by `init`
//! or by the first `operator add`), never from the device CA. The two doors trust different
//! roots, so a device certificate cannot complete the admin handshake and an operator
//! certificate cannot complete the device door's. On top of that the admin door checks the
//! operator profile ([`operator_name`]): subject `O=Imprint, OU=operators, CN=<name>`, no
//! serialNumber attribute, extKeyUsage clientAuth, not a CA. Device certificates carry a
//! serialNumber attribute and come from the other root, so they satisfy neither check.
//!
//! An operator is an admin or read-only ([`OperatorRole`]): the role is the subject's unit
//! (`OU=operators` or `OU=operators-read-only`), fixed when the certificate is issued.
//!
//! The operator CA's key is a file (`operators-ca.key.pem`, 0600), or, for a CA whose key is in
//! a PKCS#11 token, a second key pair of that token labelled `OBJECT-operators` (OBJECT: the CA
//! key's label), made when the operator CA is made ([`OperatorCaKey`]).

use std::path::{Path, PathBuf};

use protocol_spec::{KeyAlgorithm, KeyPair};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyUsagePurpose, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use x509_parser::der_parser::oid::Oid;
use x509_parser::prelude::*;

use crate::config::{CaDir, Config};
use crate::issuer::{CaKey, Pkcs11Uri, SessionLimits, TokenKey};
use crate::setup::write_new;

/// The organisation and unit every operator certificate carries in its subject.
pub const OPERATOR_ORG: &str = "Imprint";
/// See [`OPERATOR_ORG`].
pub const OPERATOR_UNIT: &str = "operators";

/// The organisational unit of a read-only operator's certificate, in place of
/// [`OPERATOR_UNIT`]. A distinct unit, rather than an attribute added to an admin subject, so
/// that a server that knows no roles refuses the certificate instead of granting it everything.
pub const READ_ONLY_UNIT: &str = "operators-read-only";

/// What an operator may do at the admin door. Carried in the operator's certificate (the
/// subject's organisational unit), set when it is issued: see SPEC.md 11.8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OperatorRole {
    /// Everything the admin API offers (the role of every operator issued before roles).
    #[default]
    Admin,
    /// `GET` requests only: metrics, the CRL, lookups and listings, audit export and
    /// verification. Every other request is refused with 403.
    ReadOnly,
}

impl OperatorRole {
    /// Its name, as `operator add --role` and `operator list` spell it.
    pub fn name(self) -> &'static str {
        match self {
            OperatorRole::Admin => "admin",
            OperatorRole::ReadOnly => "read-only",
        }
    }

    /// The role a name spells.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "admin" => Some(OperatorRole::Admin),
            "read-only" => Some(OperatorRole::ReadOnly),
            _ => None,
        }
    }

    /// The organisational unit its certificates carry.
    pub fn unit(self) -> &'static str {
        match self {
            OperatorRole::Admin => OPERATOR_UNIT,
            OperatorRole::ReadOnly => READ_ONLY_UNIT,
        }
    }

    /// Whether it may make a request with this method: a read-only operator only reads.
    pub fn allows(self, method: &hyper::Method) -> bool {
        match self {
            OperatorRole::Admin => true,
            OperatorRole::ReadOnly => method == hyper::Method::GET,
        }
    }
}

impl std::fmt::Display for OperatorRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An operator as its certificate names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorIdentity {
    /// Name (`operator:NAME` in the audit log).
    pub name: String,
    /// Role.
    pub role: OperatorRole,
}

/// Where a new operator CA's key is made.
#[derive(Debug, Clone)]
pub enum OperatorCaKey {
    /// A new key in `operators-ca.key.pem` (0600).
    File,
    /// A key pair in the CA key's token, labelled `OBJECT-operators` (and with that id):
    /// generated there, private half sensitive and not extractable; with `existing`, the one
    /// already there under that label, if any.
    Token {
        /// The CA key's URI (its token, PIN source and label).
        uri: Pkcs11Uri,
        /// The token's session limits.
        limits: SessionLimits,
        /// Use a key already in the token under the label (`init --pkcs11-existing`).
        existing: bool,
    },
}

impl OperatorCaKey {
    /// Where `config` keeps keys: the CA key's token (`[issuer] pkcs11`), or files.
    pub fn for_config(dir: &CaDir, config: &Config) -> Result<Self, String> {
        let Some(text) = &config.issuer.pkcs11 else {
            return Ok(OperatorCaKey::File);
        };
        Ok(OperatorCaKey::Token {
            uri: Pkcs11Uri::parse(text)
                .map_err(|e| format!("{}: [issuer] pkcs11: {e}", dir.config().display()))?,
            limits: crate::issuer::session_limits(dir, config)?,
            existing: false,
        })
    }
}

/// The URI of the operator CA's key in the token of the CA key `ca`: the label
/// `OBJECT-operators`, no id of its own (the label is its id).
pub fn operator_key_uri(ca: &Pkcs11Uri) -> Pkcs11Uri {
    Pkcs11Uri {
        object: format!("{}-operators", ca.object),
        id: None,
        ..ca.clone()
    }
}

/// Creates the operator CA of a CA folder if it has none, its key where `key` says. Returns
/// whether it created it.
pub fn ensure_operator_ca(dir: &CaDir, key: &OperatorCaKey, now: u64) -> Result<bool, String> {
    if dir.operator_ca_cert().exists() {
        return Ok(false);
    }
    let rng = SystemRandom::new();
    let key = match key {
        OperatorCaKey::File => {
            CaKey::File(KeyPair::generate(KeyAlgorithm::P256, &rng).map_err(|e| e.to_string())?)
        }
        OperatorCaKey::Token {
            uri,
            limits,
            existing,
        } => {
            let uri = operator_key_uri(uri);
            let at = |e: String| format!("the operator CA's key: {e}");
            // Made only when it is really absent: a wrong PIN or a token that does not
            // answer stops here, with its own error.
            let found = if *existing {
                TokenKey::open_if_present(&uri, limits).map_err(at)?
            } else {
                None
            };
            match found {
                Some(k) => CaKey::Token(k),
                None => {
                    CaKey::Token(TokenKey::generate(&uri, KeyAlgorithm::P256, limits).map_err(at)?)
                }
            }
        }
    };
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::OrganizationName, OPERATOR_ORG);
    p.distinguished_name
        .push(DnType::CommonName, "Imprint operator CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.serial_number = Some(random_serial(&rng)?);
    let start = at(now.saturating_sub(300))?;
    p.not_before = start;
    p.not_after = start + ::time::Duration::days(3650);
    let signer = key.signer(&rng);
    let cert = p
        .self_signed(&&signer)
        .map_err(|e| signing_error("operator CA", &signer, e))?;
    if let CaKey::File(k) = &key {
        write_new(&dir.operator_ca_key(), k.to_pem().as_bytes(), 0o600)?;
    }
    write_new(&dir.operator_ca_cert(), cert.pem().as_bytes(), 0o644)?;
    Ok(true)
}

/// Files written for a new operator.
#[derive(Debug, Clone)]
pub struct OperatorFiles {
    /// The certificate, PEM.
    pub cert: PathBuf,
    /// The private key, PEM, mode 0600.
    pub key: PathBuf,
}

/// Issues an operator certificate (P-256 key, valid `days` from now, with `role`) from the
/// operator CA and writes `NAME.pem` and `NAME.key.pem` (0600) into `out`, refusing to
/// overwrite.
pub fn add_operator(
    dir: &CaDir,
    name: &str,
    role: OperatorRole,
    days: u32,
    out: &Path,
    now: u64,
) -> Result<OperatorFiles, String> {
    check_name(name)?;
    if days == 0 {
        return Err("--days must be at least 1".into());
    }
    let config = dir.load_config()?;
    let key_home = OperatorCaKey::for_config(dir, &config)?;
    ensure_operator_ca(dir, &key_home, now)?;
    let registry = dir.root().join("operators.issued");
    let issued = match std::fs::read_to_string(&registry) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("{}: {e}", registry.display())),
    };
    if issued.lines().any(|l| l.split('\t').next() == Some(name)) {
        return Err(format!(
            "operator {name:?} was already issued (see {}); names are issued once, so that the \
             audit log's operator:{name} means one person",
            registry.display()
        ));
    }
    let rng = SystemRandom::new();
    let ca_key = operator_ca_key(dir, &key_home, &rng)?;
    let ca_pem = std::fs::read_to_string(dir.operator_ca_cert())
        .map_err(|e| format!("{}: {e}", dir.operator_ca_cert().display()))?;
    let ca_der = protocol_spec::profile::cert_from_pem(&ca_pem)
        .ok_or_else(|| format!("{}: no CERTIFICATE", dir.operator_ca_cert().display()))?;
    let signer = ca_key.signer(&rng);
    let issuer = Issuer::from_ca_cert_der(&ca_der.into(), &signer)
        .map_err(|e| format!("{}: {e}", dir.operator_ca_cert().display()))?;

    let key = KeyPair::generate(KeyAlgorithm::P256, &rng).map_err(|e| e.to_string())?;
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::OrganizationName, OPERATOR_ORG);
    p.distinguished_name
        .push(DnType::OrganizationalUnitName, role.unit());
    p.distinguished_name
        .push(DnType::CommonName, DnValue::Utf8String(name.to_string()));
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.use_authority_key_identifier_extension = true;
    let serial = random_serial(&rng)?;
    let serial_hex = hex::encode(serial.as_ref());
    p.serial_number = Some(serial);
    let start = at(now.saturating_sub(300))?;
    p.not_before = start;
    p.not_after = start + ::time::Duration::days(i64::from(days));
    let cert = p
        .signed_by(&key.rcgen_signer(&rng), &issuer)
        .map_err(|e| signing_error("operator certificate", &signer, e))?;

    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let files = OperatorFiles {
        cert: out.join(format!("{name}.pem")),
        key: out.join(format!("{name}.key.pem")),
    };
    for f in [&files.cert, &files.key] {
        if f.exists() {
            return Err(format!(
                "{} exists; an operator name is issued once (choose another name)",
                f.display()
            ));
        }
    }
    // The name is taken before the files are written, so that a crash leaves it used, not
    // issued twice.
    let mut reg = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&registry)
        .map_err(|e| format!("{}: {e}", registry.display()))?;
    use std::io::Write;
    writeln!(
        reg,
        "{name}\t{}\t{}\t{}\t{}",
        serial_hex,
        now.saturating_sub(300) + u64::from(days) * 86_400,
        files.cert.display(),
        role.name()
    )
    .and_then(|()| reg.sync_all())
    .map_err(|e| format!("{}: {e}", registry.display()))?;
    write_new(&files.key, key.to_pem().as_bytes(), 0o600)?;
    write_new(&files.cert, cert.pem().as_bytes(), 0o600)?;
    Ok(files)
}

/// One line of a CA folder's `operators.issued`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedOperator {
    /// Name.
    pub name: String,
    /// Certificate serial, hex.
    pub serial: String,
    /// Expiry, Unix seconds.
    pub expires_at: u64,
    /// Role (the fifth field; operators issued before roles have none and are admins).
    pub role: OperatorRole,
}

/// The operators issued from a CA folder (its `operators.issued`; none when it has no such
/// file yet).
pub fn issued(registry: &Path) -> Result<Vec<IssuedOperator>, String> {
    let text = match std::fs::read_to_string(registry) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", registry.display())),
    };
    text.lines()
        .filter(|l| !l.is_empty())
        .enumerate()
        .map(|(n, l)| {
            let mut f = l.split('\t');
            let fields = (f.next(), f.next(), f.next().and_then(|t| t.parse().ok()));
            let role = match f.nth(1) {
                None => Some(OperatorRole::Admin),
                Some(r) => OperatorRole::from_name(r),
            };
            match (fields, role) {
                ((Some(name), Some(serial), Some(expires_at)), Some(role)) => Ok(IssuedOperator {
                    name: name.to_string(),
                    serial: serial.to_string(),
                    expires_at,
                    role,
                }),
                _ => Err(format!(
                    "{}: line {} is not NAME, SERIAL, EXPIRY, PATH[, ROLE]",
                    registry.display(),
                    n + 1
                )),
            }
        })
        .collect()
}

/// The operator a client certificate names, with its role, if it has the operator profile
/// (the chain to the operator CA was already checked by the TLS layer).
pub fn operator_identity(der: &[u8]) -> Result<OperatorIdentity, String> {
    let (_, cert) =
        parse_x509_certificate(der).map_err(|_| "the certificate does not parse".to_string())?;
    let subject = cert.subject();
    if subject
        .iter_by_oid(&oid_registry::OID_X509_SERIALNUMBER)
        .next()
        .is_some()
    {
        return Err("a device certificate is not an operator certificate".into());
    }
    fn first(subject: &X509Name<'_>, oid: &Oid<'_>) -> Option<String> {
        subject
            .iter_by_oid(oid)
            .next()
            .and_then(|a| a.as_str().ok())
            .map(str::to_string)
    }
    let attr = |oid: Oid<'static>| first(subject, &oid);
    let units: Vec<String> = subject
        .iter_by_oid(&oid_registry::OID_X509_ORGANIZATIONAL_UNIT)
        .map(|a| a.as_str().map(str::to_string).unwrap_or_default())
        .collect();
    let role = match units.as_slice() {
        [u] if u == OPERATOR_UNIT => OperatorRole::Admin,
        [u] if u == READ_ONLY_UNIT => OperatorRole::ReadOnly,
        _ => {
            return Err(format!(
                "the subject is not O={OPERATOR_ORG}, OU={OPERATOR_UNIT} (or OU={READ_ONLY_UNIT})"
            ));
        }
    };
    if attr(oid_registry::OID_X509_ORGANIZATION_NAME).as_deref() != Some(OPERATOR_ORG) {
        return Err(format!(
            "the subject is not O={OPERATOR_ORG}, OU={OPERATOR_UNIT} (or OU={READ_ONLY_UNIT})"
        ));
    }
    let name = attr(oid_registry::OID_X509_COMMON_NAME)
        .ok_or_else(|| "the subject has no common name".to_string())?;
    check_name(&name)?;
    let client_auth = cert
        .extended_key_usage()
        .ok()
        .flatten()
        .is_some_and(|e| e.value.client_auth);
    if !client_auth {
        return Err("the certificate is not for client authentication".into());
    }
    if cert.is_ca() {
        return Err("a CA certificate is not an operator certificate".into());
    }
    Ok(OperatorIdentity { name, role })
}

/// The operator a client certificate names (see [`operator_identity`]).
pub fn operator_name(der: &[u8]) -> Result<String, String> {
    operator_identity(der).map(|o| o.name)
}

/// Operator names: 1 to 64 characters of `A-Z a-z 0-9 . _ - @`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "operator name {name:?} must be 1 to 64 characters of A-Z a-z 0-9 . _ - @"
        ))
    }
}

/// The operator CA's key: the file `operators-ca.key.pem` when the folder has one (an operator
/// CA made before its CA moved into a token keeps it), else the object `key` names.
fn operator_ca_key(dir: &CaDir, key: &OperatorCaKey, rng: &SystemRandom) -> Result<CaKey, String> {
    let path = dir.operator_ca_key();
    match (std::fs::read_to_string(&path), key) {
        (Ok(pem), _) => KeyPair::from_pem(&pem, rng)
            .map(CaKey::File)
            .map_err(|e| format!("{}: {e}", path.display())),
        (Err(e), OperatorCaKey::Token { uri, limits, .. })
            if e.kind() == std::io::ErrorKind::NotFound =>
        {
            TokenKey::open(&operator_key_uri(uri), limits)
                .map(CaKey::Token)
                .map_err(|e| format!("the operator CA's key: {e}"))
        }
        (Err(e), _) => Err(format!("{}: {e}", path.display())),
    }
}

/// What a failed signature with the operator CA's key means: the key's own error when it kept
/// one (a token that does not answer), rcgen's otherwise.
fn signing_error(what: &str, signer: &crate::issuer::key::CaSigner<'_>, e: rcgen::Error) -> String {
    match signer.take_error() {
        Some(why) => format!("{what}: {why}"),
        None => format!("{what}: {e}"),
    }
}

fn random_serial(rng: &SystemRandom) -> Result<SerialNumber, String> {
    let mut b = [0u8; 16];
    rng.fill(&mut b)
        .map_err(|_| "random generator failed".to_string())?;
    b[0] &= 0x7f;
    b[0] |= 0x01;
    Ok(SerialNumber::from_slice(&b))
}

fn at(t: u64) -> Result<::time::OffsetDateTime, String> {
    i64::try_from(t)
        .ok()
        .and_then(|t| ::time::OffsetDateTime::from_unix_timestamp(t).ok())
        .ok_or_else(|| format!("time {t} out of range"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The role is read back from the certificate it was issued in, and from the register; a
    /// register line written before roles (four fields) is an admin's.
    #[test]
    fn a_role_is_carried_by_the_certificate_and_the_register() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CaDir::new(tmp.path().join("ca"));
        std::fs::create_dir_all(dir.root()).unwrap();
        let out = tmp.path().join("ops");
        let now = 1_800_000_000;
        for (name, role) in [
            ("alice", OperatorRole::Admin),
            ("scraper", OperatorRole::ReadOnly),
        ] {
            let files = add_operator(&dir, name, role, 30, &out, now).unwrap();
            let pem = std::fs::read_to_string(&files.cert).unwrap();
            let der = protocol_spec::profile::cert_from_pem(&pem).unwrap();
            let id = operator_identity(&der).unwrap();
            assert_eq!((id.name.as_str(), id.role), (name, role));
        }
        let registry = dir.root().join("operators.issued");
        let mut text = std::fs::read_to_string(&registry).unwrap();
        text.push_str("old\t0102\t1900000000\t/somewhere/old.pem\n");
        std::fs::write(&registry, &text).unwrap();
        let roles: Vec<(String, OperatorRole)> = issued(&registry)
            .unwrap()
            .into_iter()
            .map(|o| (o.name, o.role))
            .collect();
        assert_eq!(
            roles,
            [
                ("alice".to_string(), OperatorRole::Admin),
                ("scraper".to_string(), OperatorRole::ReadOnly),
                ("old".to_string(), OperatorRole::Admin),
            ]
        );
        std::fs::write(&registry, "bad\t01\t1\t/p\tsuperuser\n").unwrap();
        assert!(issued(&registry).unwrap_err().contains("line 1"));
    }
}
