//! Test helpers: a CA folder with a registered line, devices that make real requests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ca_server::config::CaDir;
use ca_server::config::StoreSettings;
use ca_server::server::{self, ListenOverrides, RunningServer};
use ca_server::setup::{self, CaKeySource, InitOptions};
use ca_server::store::Store;
use device_agent::https::HttpsClient;
use device_agent::url::CaUrl;
use protocol_spec::messages::{EnrollRequest, ResponseForm};
use protocol_spec::token::{self, FactoryClaims};
use protocol_spec::{DeviceSerial, KeyAlgorithm, KeyPair, PublicKey, csr, spki};
use ring::rand::{SecureRandom, SystemRandom};

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A line registered with the test CA.
pub struct Line {
    pub id: String,
    pub key: KeyPair,
}

impl Line {
    pub fn new(id: &str, alg: KeyAlgorithm) -> Self {
        Line {
            id: id.into(),
            key: KeyPair::generate(alg, &SystemRandom::new()).unwrap(),
        }
    }

    /// A token for (serial, key) with a random cti.
    pub fn token(&self, serial: u64, spki_der: &[u8]) -> Vec<u8> {
        let mut cti = vec![0u8; 16];
        SystemRandom::new().fill(&mut cti).unwrap();
        self.token_with(serial, spki_der, cti, now() - 5, now() + 600)
    }

    pub fn token_with(
        &self,
        serial: u64,
        spki_der: &[u8],
        cti: Vec<u8>,
        iat: u64,
        exp: u64,
    ) -> Vec<u8> {
        let claims = FactoryClaims {
            line: self.id.clone(),
            serial: DeviceSerial::new(serial).unwrap(),
            key_hash: spki::sha256(spki_der),
            issued_at: iat,
            expires_at: exp,
            token_id: cti,
        };
        token::mint(&claims, &self.key, &SystemRandom::new()).unwrap()
    }
}

/// A virtual device.
pub struct Device {
    pub serial: DeviceSerial,
    pub key: KeyPair,
}

impl Device {
    pub fn new(serial: u64, alg: KeyAlgorithm) -> Self {
        Device {
            serial: DeviceSerial::new(serial).unwrap(),
            key: KeyPair::generate(alg, &SystemRandom::new()).unwrap(),
        }
    }

    pub fn csr(&self) -> Vec<u8> {
        csr::build(&self.key, self.serial, &SystemRandom::new()).unwrap()
    }

    pub fn request(&self, line: &Line, form: ResponseForm) -> Vec<u8> {
        EnrollRequest {
            token: line.token(self.serial.get(), &self.key.spki_der()),
            csr: self.csr(),
            form,
        }
        .to_cbor()
    }
}

/// A CA folder in a temporary directory.
pub struct TestCa {
    pub tmp: tempfile::TempDir,
    pub dir: CaDir,
    pub ca_der: Vec<u8>,
}

impl TestCa {
    /// A CA on the suite's store ([`test_store`]).
    pub fn new(alg: KeyAlgorithm) -> Self {
        Self::with_store(alg, test_store())
    }

    /// A CA whose records go where `store` says, its key where [`test_ca_key`] says.
    pub fn with_store(alg: KeyAlgorithm, store: StoreSettings) -> Self {
        Self::with_key(alg, store, test_ca_key())
    }

    /// A CA on the suite's store whose key is the file `ca.key.pem` (for a test that reads it).
    pub fn with_file_key(alg: KeyAlgorithm) -> Self {
        Self::with_key(alg, test_store(), CaKeySource::File)
    }

    fn with_key(alg: KeyAlgorithm, store: StoreSettings, ca_key: CaKeySource) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CaDir::new(tmp.path().join("ca"));
        setup::init(
            &dir,
            &InitOptions {
                algorithm: alg,
                name: "Test CA".into(),
                tls_names: vec![],
                now: now() - 60,
                store,
                ca_key,
            },
        )
        .unwrap();
        let pem = std::fs::read_to_string(dir.ca_cert()).unwrap();
        let ca_der = protocol_spec::profile::cert_from_pem(&pem).unwrap();
        TestCa { tmp, dir, ca_der }
    }

    /// The CA's store, opened as `ca-server` opens it (for sled: only while no server runs).
    pub fn store(&self) -> Arc<dyn Store> {
        let config = self.dir.load_config().unwrap();
        ca_server::store::open(&self.dir, &config.store).unwrap()
    }

    /// Whether the records are in PostgreSQL.
    pub fn on_postgres(&self) -> bool {
        self.dir.load_config().unwrap().store.url.is_some()
    }

    /// Registers `line` for serials `first..=last` (store opened offline).
    pub fn add_line(&self, line: &Line, first: u64, last: u64, quota: Option<u64>) {
        let store = self.store();
        let pem = PublicKey::from(&line.key).to_pem();
        ca_server::lines::add_line(
            store.as_ref(),
            &line.id,
            &pem,
            (first, last),
            quota,
            now(),
            "test",
        )
        .unwrap();
    }

    pub async fn start(&self) -> RunningServer {
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        server::start(
            &self.dir,
            &ListenOverrides {
                https: Some(loopback),
                coap: Some(loopback),
                mtls: Some(loopback),
                admin: Some(loopback),
                no_admin: false,
            },
        )
        .await
        .unwrap()
    }

    pub fn client(&self, addr: SocketAddr) -> HttpsClient {
        HttpsClient::new(
            CaUrl::parse(&format!("https://{addr}")).unwrap(),
            &self.ca_der,
        )
        .unwrap()
    }

    pub fn root(&self) -> &Path {
        self.dir.root()
    }

    pub fn ca_pem_path(&self) -> PathBuf {
        self.dir.ca_cert()
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        // A test's own schema goes with it (best effort: the database may be gone).
        if let Ok(config) = self.dir.load_config()
            && let Ok(Some(pg)) = ca_server::store::pg_config(&self.dir, &config.store)
        {
            let _ = ca_server::store::PgStore::drop_schema(&pg);
        }
    }
}

/// Where the suite's test CAs keep their key, from the environment: with
/// `IMPRINT_TEST_PKCS11=pkcs11:token=PREFIX?module-path=LIB&pin-source=file:PIN` (and the
/// module's own settings, such as `SOFTHSM2_CONF`, for the whole test process; `.ci/run` gives a
/// SoftHSM2 token folder), each test CA makes its key in a token of its own, `PREFIX-` and 16 hex
/// digits, initialized here in the test process with the user PIN the file PIN holds
/// (`ca_server::issuer::pkcs11::session::init_token` says why one token per CA); unset: the
/// file `ca.key.pem`.
pub fn test_ca_key() -> CaKeySource {
    let Ok(base) = std::env::var("IMPRINT_TEST_PKCS11") else {
        return CaKeySource::File;
    };
    let (path, query) = base.split_once('?').unwrap_or((&base, ""));
    let base_uri = ca_server::issuer::Pkcs11Uri::parse(&format!("{path};object=test-ca?{query}"))
        .unwrap_or_else(|e| panic!("IMPRINT_TEST_PKCS11: {e}"));
    let ca_server::issuer::pkcs11::PinSource::File(pin_file) = &base_uri.pin else {
        panic!("IMPRINT_TEST_PKCS11: give the PIN as pin-source=file:PATH");
    };
    let pin = std::fs::read_to_string(pin_file).unwrap();
    let pin = pin.lines().next().unwrap_or("");
    let mut tag = [0u8; 8];
    SystemRandom::new().fill(&mut tag).unwrap();
    let token = format!("{}-{}", base_uri.token, hex::encode(tag));
    ca_server::issuer::pkcs11::session::init_token(
        &base_uri.module_path,
        &token,
        "imprint-test-so",
        pin,
    )
    .unwrap_or_else(|e| panic!("IMPRINT_TEST_PKCS11: {e}"));
    let uri = format!("pkcs11:token={token};object=test-ca?{query}");
    CaKeySource::Pkcs11 {
        uri: ca_server::issuer::Pkcs11Uri::parse(&uri)
            .unwrap_or_else(|e| panic!("IMPRINT_TEST_PKCS11: {e}")),
        existing: false,
        tls_key_file: false,
    }
}

/// The store the suite runs on, from the environment: `IMPRINT_TEST_STORE=postgres` puts each
/// test CA in a schema of its own in the database at `IMPRINT_TEST_PG_URL` (TLS verified with
/// `IMPRINT_TEST_PG_CA`, password in `IMPRINT_STORE_PASSWORD`; `.ci/run` starts one, and so does
/// `eval "$(ca-server/scripts/test-postgres.sh start)"`); unset or `sled`: the sled store.
pub fn test_store() -> StoreSettings {
    match std::env::var("IMPRINT_TEST_STORE").as_deref() {
        Ok("postgres") => pg_store(),
        Ok("sled") | Err(_) => StoreSettings::default(),
        Ok(other) => panic!("IMPRINT_TEST_STORE={other:?}: use sled or postgres"),
    }
}

/// Settings for a new schema in the test database (which must be reachable: a test that needs
/// it fails, saying how to start one, rather than skip).
pub fn pg_store() -> StoreSettings {
    let url = std::env::var("IMPRINT_TEST_PG_URL").unwrap_or_else(|_| {
        panic!(
            "this test needs PostgreSQL: set IMPRINT_TEST_PG_URL, IMPRINT_TEST_PG_CA and IMPRINT_STORE_PASSWORD, e.g. with `eval \"$(ca-server/scripts/test-postgres.sh start)\"` (.ci/run does)"
        )
    });
    let mut tag = [0u8; 8];
    SystemRandom::new().fill(&mut tag).unwrap();
    StoreSettings {
        url: Some(url),
        password_file: None,
        ca_file: std::env::var("IMPRINT_TEST_PG_CA").ok().map(PathBuf::from),
        schema: Some(format!("t_{}", hex::encode(tag))),
        refresh_ms: None,
    }
}

/// Every record of every table, for before/after comparisons.
pub fn snapshot(store: &Arc<dyn Store>) -> Vec<ca_server::store::RawRecord> {
    store.raw_records().unwrap()
}

/// Fails unless the store holds exactly `before` (a [`snapshot`]), naming the records `what`
/// added and removed (a changed record is one of each), by table.
pub fn assert_unchanged(
    store: &Arc<dyn Store>,
    before: &[ca_server::store::RawRecord],
    what: &str,
) {
    let after = snapshot(store);
    if after == before {
        return;
    }
    let show = |r: &ca_server::store::RawRecord| {
        format!(
            "{} {} {}",
            r.0,
            hex::encode(&r.1),
            String::from_utf8(r.2.clone()).unwrap_or_else(|_| hex::encode(&r.2))
        )
    };
    let added: Vec<String> = after
        .iter()
        .filter(|r| !before.contains(r))
        .map(show)
        .collect();
    let removed: Vec<String> = before
        .iter()
        .filter(|r| !after.contains(r))
        .map(show)
        .collect();
    panic!("{what} changed the store:\nadded: {added:#?}\nremoved: {removed:#?}");
}

/// A TLS 1.3 client trusting `ca_der`, presenting `client` (certificate, key) when given.
pub fn tls_client(
    ca_der: &[u8],
    client: Option<(
        rustls::pki_types::CertificateDer<'static>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der.to_vec().into()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots);
    Arc::new(match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key).unwrap(),
    })
}

/// The (certificate, key) of PEM files, for [`tls_client`].
pub fn pem_identity(
    cert: &Path,
    key: &Path,
) -> (
    rustls::pki_types::CertificateDer<'static>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    use rustls::pki_types::pem::PemObject;
    (
        rustls::pki_types::CertificateDer::from_pem_file(cert).unwrap(),
        rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap(),
    )
}

/// What a mutual-TLS door says to a TLS handshake with `config`, read before the client sends
/// anything: in TLS 1.3 the server judges the client certificate after the client's Finished,
/// so a refusal is the server's alert, as rustls names it ("received fatal alert: ..."). (A
/// client that sent a request first could find the connection reset before it reads the
/// alert.) Panics if the door accepts the handshake.
pub async fn handshake_refusal(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> String {
    use tokio::io::AsyncReadExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    match tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
    {
        Err(e) => e.to_string(),
        Ok(mut tls) => {
            let mut byte = [0u8; 1];
            match tls.read(&mut byte).await {
                Err(e) => e.to_string(),
                Ok(n) => panic!("the door accepted the handshake and sent {n} bytes"),
            }
        }
    }
}

impl TestCa {
    /// Sets `[limits] request_timeout_secs` in config.toml (before `start`).
    pub fn set_request_timeout(&self, secs: u64) {
        self.set_limits(|l| l.request_timeout_secs = secs);
    }

    /// Changes `[limits]` in config.toml (before `start`).
    pub fn set_limits(&self, change: impl FnOnce(&mut ca_server::config::Limits)) {
        let mut config = self.dir.load_config().unwrap();
        change(&mut config.limits);
        std::fs::write(self.dir.config(), toml::to_string(&config).unwrap()).unwrap();
    }
}

/// Starts `ca-server serve --dir CA --https 127.0.0.1:0 EXTRA...` as a process of its own and
/// returns it with its HTTPS address, read from its listening line.
pub fn serve_process(ca: &TestCa, extra: &[&str]) -> (std::process::Child, SocketAddr) {
    let (child, addrs) = serve_process_addrs(ca, extra);
    (child, addrs["https"])
}

/// [`serve_process`], with the address of every listener by name (`https`, `mtls`, ...).
pub fn serve_process_addrs(
    ca: &TestCa,
    extra: &[&str],
) -> (
    std::process::Child,
    std::collections::BTreeMap<String, SocketAddr>,
) {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_ca-server"))
        .args(["serve", "--https", "127.0.0.1:0"])
        .args(extra)
        .arg("--dir")
        .arg(ca.root())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addrs = ca_server::server::parse_listening_line(&line)
        .unwrap_or_else(|| panic!("unexpected: {line}"));
    (child, addrs)
}

/// What a server did with a request whose body never came.
#[derive(Debug)]
pub struct StalledBody {
    /// Everything the server sent.
    pub answer: String,
    /// Whether it closed the connection within the wait.
    pub closed: bool,
    /// How long until it closed (or the wait).
    pub after: std::time::Duration,
}

/// Opens TLS to `addr` with `openssl s_client` (trusting `ca_pem`, presenting `client` as
/// (certificate, key) files when given), sends `POST path` with `Content-Length: 100` and no
/// body, keeps its side open, and waits up to 8 s for the server to answer and close.
pub async fn stalled_body(
    addr: SocketAddr,
    ca_pem: PathBuf,
    client: Option<(PathBuf, PathBuf)>,
    path: &'static str,
) -> StalledBody {
    tokio::task::spawn_blocking(move || stalled_body_blocking(addr, &ca_pem, client, path))
        .await
        .unwrap()
}

impl StalledBody {
    /// The server answered 408 (with the `request-timeout` problem when `problem`) and closed.
    pub fn assert_timed_out(&self, problem: bool) {
        assert!(self.closed, "connection still open after {:?}", self.after);
        assert!(self.answer.starts_with("HTTP/1.1 408"), "{}", self.answer);
        assert!(
            !problem || self.answer.contains("urn:imprint:problem:request-timeout"),
            "{}",
            self.answer
        );
    }
}

fn stalled_body_blocking(
    addr: SocketAddr,
    ca_pem: &Path,
    client: Option<(PathBuf, PathBuf)>,
    path: &str,
) -> StalledBody {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    let wait = std::time::Duration::from_secs(8);
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-quiet",
        "-connect",
        &addr.to_string(),
        "-CAfile",
    ])
    .arg(ca_pem);
    if let Some((cert, key)) = client {
        cmd.arg("-cert").arg(cert).arg("-key").arg(key);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_client runs (Debian package openssl)");
    let mut stdin = child.stdin.take().unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    );
    stdin.write_all(head.as_bytes()).unwrap();
    stdin.flush().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let started = std::time::Instant::now();
    std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = stdout.read_to_end(&mut all);
        let _ = tx.send(all);
    });
    let (answer, closed) = match rx.recv_timeout(wait) {
        Ok(all) => (String::from_utf8_lossy(&all).into_owned(), true),
        Err(_) => (String::new(), false),
    };
    let after = started.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    drop(stdin);
    StalledBody {
        answer,
        closed,
        after,
    }
}

pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-postgres.sh");

/// A PostgreSQL cluster of this test's own (it is stopped and started): (folder, settings).
pub fn own_cluster() -> (PathBuf, StoreSettings) {
    let out = Command::new("bash")
        .args([SCRIPT, "start"])
        .output()
        .expect("bash runs ca-server/scripts/test-postgres.sh");
    assert!(
        out.status.success(),
        "starting PostgreSQL (Debian package postgresql-15; .ci/run installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let var = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("export {name}=")))
            .map(|v| v.trim_matches('\'').to_string())
            .unwrap_or_else(|| panic!("{name} in {text}"))
    };
    let dir = PathBuf::from(var("IMPRINT_TEST_PG_DIR"));
    let password_file = dir.join("imprint-password");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&password_file)
            .unwrap();
        writeln!(f, "{}", var("IMPRINT_STORE_PASSWORD")).unwrap();
    }
    let settings = StoreSettings {
        url: Some(var("IMPRINT_TEST_PG_URL")),
        password_file: Some(password_file),
        ca_file: Some(PathBuf::from(var("IMPRINT_TEST_PG_CA"))),
        schema: Some("imprint".into()),
        refresh_ms: None,
    };
    (dir, settings)
}

pub fn script(verb: &str, dir: &std::path::Path) {
    let out = Command::new("bash")
        .arg(SCRIPT)
        .arg(verb)
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "test-postgres.sh {verb}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct Cluster(pub PathBuf);

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(SCRIPT)
            .arg("stop")
            .arg(&self.0)
            .output();
    }
}

/// A synchronous standby of the cluster in `primary` (`test-postgres.sh standby`): its folder
/// and port.
pub fn standby(primary: &Path) -> (PathBuf, u16) {
    let out = std::process::Command::new("bash")
        .arg(SCRIPT)
        .arg("standby")
        .arg(primary)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "test-postgres.sh standby: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let var = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("export {name}=")))
            .map(|v| v.to_string())
            .unwrap_or_else(|| panic!("{name} in {text}"))
    };
    (
        PathBuf::from(var("IMPRINT_TEST_PG_STANDBY_DIR")),
        var("IMPRINT_TEST_PG_STANDBY_PORT").parse().unwrap(),
    )
}

/// Runs SQL as the cluster's superuser (`superpw` in its folder); the output, unaligned.
pub fn psql(cluster: &Path, port: u16, sql: &str) -> String {
    let out = std::process::Command::new("psql")
        .args([
            "-qtA",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "imprint",
            "-p",
        ])
        .arg(port.to_string())
        .args(["-c", sql])
        .env(
            "PGPASSWORD",
            std::fs::read_to_string(cluster.join("superpw"))
                .unwrap()
                .trim(),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// An operator certificate for the admin door, made offline before the server starts.
pub fn operator(ca: &TestCa, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    operator_with(ca, name, &[])
}

/// `operator add --dir CA NAME EXTRA...` (offline); its (certificate, key) files.
pub fn operator_with(
    ca: &TestCa,
    name: &str,
    extra: &[&str],
) -> (std::path::PathBuf, std::path::PathBuf) {
    let out = Command::new(env!("CARGO_BIN_EXE_ca-server"))
        .args([
            "operator",
            "add",
            "--dir",
            ca.root().to_str().unwrap(),
            name,
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ops = ca.dir.operators();
    (
        ops.join(format!("{name}.pem")),
        ops.join(format!("{name}.key.pem")),
    )
}

/// A TLS client configuration that trusts the CA certificate `ca_der` (no client certificate).
pub fn trusting(ca_der: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca_der.to_vec()))
        .unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// SoftHSM2's PKCS#11 module as Debian's `softhsm2` installs it.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The user PIN of every [`SoftHsmToken`] (its SO PIN is 5678).
pub const SOFTHSM_PIN: &str = "1234";

/// A SoftHSM2 token in a temporary folder of its own: `conf` is the file `SOFTHSM2_CONF`
/// names, `pin_file` holds the user PIN ([`SOFTHSM_PIN`]).
pub struct SoftHsmToken {
    pub tmp: tempfile::TempDir,
    pub conf: PathBuf,
    pub pin_file: PathBuf,
}

impl SoftHsmToken {
    /// Makes a token labelled `label` with `softhsm2-util --init-token`.
    pub fn new(label: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let tokens = tmp.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = tmp.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", label])
            .args(["--pin", SOFTHSM_PIN, "--so-pin", "5678"])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .expect("softhsm2-util (Debian package softhsm2) is installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pin_file = tmp.path().join("pin");
        std::fs::write(&pin_file, format!("{SOFTHSM_PIN}\n")).unwrap();
        SoftHsmToken {
            tmp,
            conf,
            pin_file,
        }
    }
}

/// A device of key type `alg` enrolled through the CoAP door at `coap` (compact response, the
/// cheap way), its certificate and the CA's in its state: ready for the secrets door.
pub async fn enrolled_over_coap(
    ca: &TestCa,
    coap: SocketAddr,
    line: &Line,
    serial: u64,
    alg: KeyAlgorithm,
) -> device_agent::state::DeviceState {
    let rng = SystemRandom::new();
    let mut s =
        device_agent::state::DeviceState::generate(DeviceSerial::new(serial).unwrap(), alg, &rng)
            .unwrap();
    let token = line.token(serial, &s.key.spki_der());
    let req = device_agent::enroll::build_request(&s, &token, ResponseForm::Compact, &rng)
        .unwrap()
        .to_cbor();
    let client =
        device_agent::coap::CoapClient::new(CaUrl::parse(&format!("coap://{coap}")).unwrap());
    let resp = client.enroll_once(req).await.unwrap();
    let profile = protocol_spec::profile::CertProfile::from_ca_der(&ca.ca_der).unwrap();
    s.certificate = Some(device_agent::enroll::accept_response(&s, &profile, &resp).unwrap());
    s.ca_certificate = Some(ca.ca_der.clone());
    s
}
