//! The `ca-server` command line, as a library so that the simulator can run the same CA as a
//! child process of its own binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::admin_client::{AdminClient, AdminResponse};
use crate::audit::{AuditLine, AuditVerdict, rfc3339};
use crate::config::CaDir;
use crate::ops::{
    AddLine, DeviceView, LineView, RotateFailure, RotateRequest, RotateResult, RotatedVersion,
};
use crate::server::{self, ListenOverrides};
use crate::service::{Clock, SystemClock};
use crate::setup::{self, InitOptions};
use crate::store::Store;
use clap::{Parser, Subcommand};
use protocol_spec::KeyAlgorithm;

/// The Imprint CA server.
#[derive(Parser, Debug)]
#[command(name = "ca-server", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a CA folder: CA key (0600) and certificate, key-encryption key, HTTPS server
    /// certificate, operator CA, config.toml with working defaults, and an empty store.
    Init {
        /// The CA folder to create.
        #[arg(long)]
        dir: PathBuf,
        /// CA key algorithm.
        #[arg(long, default_value = "ed25519", value_parser = parse_alg, conflicts_with = "pkcs11_existing")]
        algorithm: KeyAlgorithm,
        /// Keep the CA key in a PKCS#11 token instead of a file: an RFC 7512 URI,
        /// `pkcs11:token=LABEL;object=KEY?module-path=LIB.so&pin-source=file:PIN_FILE`
        /// (`pin-value=PIN` is accepted here, for tests, and never written to config.toml;
        /// without pin-source, `serve` reads the PIN from IMPRINT_PKCS11_PIN). A new key pair is
        /// generated in the token; no private key file is written.
        #[arg(long)]
        pkcs11: Option<String>,
        /// With --pkcs11: use the key already in the token under that label (its algorithm is
        /// the CA's) instead of generating one.
        #[arg(long = "pkcs11-existing", requires = "pkcs11")]
        pkcs11_existing: bool,
        /// With --pkcs11: write the HTTPS server's key as plain DIR/tls.key.pem (0600) instead of
        /// sealed by the token in DIR/tls.key.sealed (either way, handshakes sign in memory).
        #[arg(long = "tls-key-file", requires = "pkcs11")]
        tls_key_file: bool,
        /// CA common name.
        #[arg(long, default_value = "Imprint Device CA")]
        name: String,
        /// Extra DNS name or IP address for the HTTPS certificate (repeatable); localhost,
        /// 127.0.0.1 and ::1 are always included.
        #[arg(long = "tls-name")]
        tls_names: Vec<String>,
        /// Keep the records in this PostgreSQL database (`postgresql://USER@HOST:PORT/DB`, no
        /// password; the database must exist): init creates the schema. Default: a sled store
        /// in DIR/store.
        #[arg(long = "store")]
        store_url: Option<String>,
        /// File with the database password (mode 0600); or set IMPRINT_STORE_PASSWORD.
        #[arg(long = "store-password-file", requires = "store_url")]
        store_password_file: Option<PathBuf>,
        /// PEM of the CA that issued the database's certificate: TLS to the database, server
        /// verified.
        #[arg(long = "store-ca-file", requires = "store_url")]
        store_ca_file: Option<PathBuf>,
        /// Schema for Imprint's tables (default imprint).
        #[arg(long = "store-schema", requires = "store_url")]
        store_schema: Option<String>,
    },
    /// The CA key's custody.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// The store: schema migrations.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Serve until interrupted (SIGINT or SIGTERM).
    Serve {
        /// The CA folder.
        #[arg(long)]
        dir: PathBuf,
        /// HTTPS enrollment address (default from config.toml: 127.0.0.1:8443).
        #[arg(long)]
        https: Option<SocketAddr>,
        /// CoAP enrollment address, UDP (default from config.toml: off).
        #[arg(long)]
        coap: Option<SocketAddr>,
        /// Mutual-TLS secrets address (default from config.toml: off).
        #[arg(long)]
        mtls: Option<SocketAddr>,
        /// Admin API address, operators' mutual TLS (default from config.toml:
        /// 127.0.0.1:8445).
        #[arg(long, conflicts_with = "no_admin")]
        admin: Option<SocketAddr>,
        /// Do not serve the admin API (whatever config.toml says).
        #[arg(long = "no-admin")]
        no_admin: bool,
        /// This node's name among several CA nodes on one database: written on every audit
        /// entry it makes and as the `node` label of its metrics (default: the host name).
        #[arg(long = "node-id", value_name = "NAME")]
        node_id: Option<String>,
    },
    /// Operator certificates for the admin API.
    Operator {
        #[command(subcommand)]
        command: OperatorCommand,
    },
    /// Production lines: online through the admin API, or offline with --dir (server stopped).
    Line {
        #[command(subcommand)]
        command: LineCommand,
    },
    /// Look up, revoke and reset devices (admin API).
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Per-device secrets.
    Secrets {
        #[command(subcommand)]
        command: SecretsCommand,
    },
    /// The audit log: export and verify, online (admin API) or offline with --dir.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// AES DUKPT (ANSI X9.24-3-2017) Base Derivation Keys: online through the admin API, or
    /// offline with --dir (server stopped). A BDK is never shown: only its id, algorithm, KCV.
    Dukpt {
        #[command(subcommand)]
        command: DukptCommand,
    },
}

#[derive(Subcommand, Debug)]
enum DukptCommand {
    /// Store a Base Derivation Key, sealed under the key-encryption key.
    AddBdk {
        /// Act on the store of this CA folder directly (the server must be stopped).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The BDK id, 8 hex digits: the first 4 octets of every Initial Key ID it derives.
        #[arg(long = "bdk-id")]
        bdk_id: String,
        /// A file holding the key in hex: 32 digits (AES-128) or 64 (AES-256).
        #[arg(
            long = "key-file",
            conflicts_with = "generate",
            required_unless_present = "generate"
        )]
        key_file: Option<PathBuf>,
        /// Generate the key from the CA's random generator instead.
        #[arg(long)]
        generate: bool,
        /// For --generate: aes-128 or aes-256.
        #[arg(long, requires = "generate")]
        algorithm: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List the stored BDKs: id, algorithm, KCV (never the key).
    List {
        /// Read the store of this CA folder directly (the server must be stopped).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// The KCV of a transaction's working key, derived host-side from the stored BDK and the
    /// KSN (never the key): what a payment host's integration can check against.
    Derive {
        /// Read the store of this CA folder directly (the server must be stopped).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The BDK id; when given, it must be the KSN's first 8 hex digits.
        #[arg(long = "bdk-id")]
        bdk_id: Option<String>,
        /// The KSN: Initial Key ID (16 hex digits) and transaction counter (8).
        #[arg(long)]
        ksn: String,
        /// The working key's usage: pin-encryption (default), mac-generation,
        /// mac-verification, mac-both-ways, data-encrypt, data-decrypt, data-both-ways,
        /// key-encryption.
        #[arg(long)]
        usage: Option<String>,
        /// The working key's type: aes-128 or aes-256 (default: the BDK's).
        #[arg(long = "key-type")]
        key_type: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// How to reach the admin API. Every option can also come from the environment.
#[derive(clap::Args, Debug, Clone)]
struct AdminArgs {
    /// The admin API.
    #[arg(
        long = "admin",
        env = "IMPRINT_ADMIN",
        default_value = "https://127.0.0.1:8445"
    )]
    admin_url: String,
    /// The operator's certificate (from `ca-server operator add`).
    #[arg(long = "operator-cert", env = "IMPRINT_OPERATOR_CERT")]
    operator_cert: Option<PathBuf>,
    /// The operator's private key.
    #[arg(long = "operator-key", env = "IMPRINT_OPERATOR_KEY")]
    operator_key: Option<PathBuf>,
    /// The CA certificate that issued the server's TLS certificate (the CA folder's ca.pem).
    #[arg(long = "ca-cert", env = "IMPRINT_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Move the CA key from ca.key.pem into a PKCS#11 token (server stopped): import it,
    /// check a signature made in the token against the CA certificate, point config.toml at
    /// the token, then remove the key file.
    ToToken {
        /// The CA folder.
        #[arg(long)]
        dir: PathBuf,
        /// The token and the label to give the key: an RFC 7512 URI, as for `init --pkcs11`.
        #[arg(long)]
        pkcs11: String,
    },
}

#[derive(Subcommand, Debug)]
enum StoreCommand {
    /// Copy a CA's sled store (server stopped) into an empty PostgreSQL schema, then verify
    /// there the audit chain (against the sled head) and every record.
    Copy {
        /// The CA folder (its store must be sled).
        #[arg(long)]
        dir: PathBuf,
        /// The database (`postgresql://USER@HOST:PORT/DB`, no password).
        #[arg(long)]
        to: String,
        /// File with the database password (mode 0600); or set IMPRINT_STORE_PASSWORD.
        #[arg(long = "password-file")]
        password_file: Option<PathBuf>,
        /// PEM of the CA that issued the database's certificate (TLS, server verified).
        #[arg(long = "ca-file")]
        ca_file: Option<PathBuf>,
        /// Schema to create and fill (default imprint).
        #[arg(long)]
        schema: Option<String>,
        /// Once verified, point DIR/config.toml's [store] at the copy.
        #[arg(long)]
        switch: bool,
    },
    /// Bring the PostgreSQL schema named in DIR/config.toml to this build's version (run it
    /// with every CA process stopped, or before starting new ones).
    Migrate {
        /// The CA folder.
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum OperatorCommand {
    /// Issue an operator certificate from the operator CA: NAME.pem and NAME.key.pem (0600).
    /// Works whether or not the server runs (it does not touch the store).
    Add {
        /// The CA folder.
        #[arg(long)]
        dir: PathBuf,
        /// Operator name (A-Z a-z 0-9 . _ - @), shown in the audit log as operator:NAME.
        name: String,
        /// What the operator may do: `admin` (everything) or `read-only` (GET only: metrics,
        /// the CRL, lookups, listings, the audit log; for metrics scrapers). Carried in the
        /// certificate, so it cannot change later: revoke and issue under another name.
        #[arg(long, value_enum, default_value_t = crate::operators::OperatorRole::Admin)]
        role: crate::operators::OperatorRole,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Where to write the files (default: DIR/operators).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Revoke an operator (through the admin API): refused at the admin door from its next
    /// request on, on every node of a shared store. Names are issued once, so a revoked name
    /// stays revoked.
    Revoke {
        /// Operator name.
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Every operator issued from the CA folder, with its status (through the admin API).
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand, Debug)]
enum DeviceCommand {
    /// Everything recorded about a device: key fingerprint, certificate, line, token id,
    /// enrollment time, every secret version with its times (never the secret), history.
    Show {
        /// Device serial.
        serial: u64,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Revoke a device: refused at the mutual-TLS door from its next handshake, listed in the
    /// CRL.
    Revoke {
        /// Device serial.
        serial: u64,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Free a serial for re-enrollment, keeping its history; its key stays bound to it.
    Reset {
        /// Device serial.
        serial: u64,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Every audit entry as JSON lines on standard output.
    Export {
        /// Read the store of this CA folder directly (the server must be stopped; a copy of
        /// the folder works too).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Start after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Recompute the hash chain and name the first entry that does not match; exits 1 if one
    /// does not. Prints the head (SEQ:HASH): record it elsewhere, and check it later with
    /// --expect.
    Verify {
        /// Read the store of this CA folder directly (the server must be stopped; a copy of
        /// the folder works too).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// A head recorded earlier, SEQ:HASH: that entry must still be in the chain, unchanged
        /// (a hash chain alone cannot show a rewrite of an entry and everything after it).
        #[arg(long)]
        expect: Option<crate::audit::Anchor>,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand, Debug)]
enum SecretsCommand {
    /// Import pre-generated keys (offline): JSON lines {"key_id": "...", "key": "<64 hex>"} or
    /// CSV `key_id,key`. Each key goes to exactly one device, on its first fetch. A file
    /// holding a key or id already known is refused whole.
    Import {
        /// The CA folder.
        #[arg(long)]
        dir: PathBuf,
        /// The batch file.
        file: PathBuf,
    },
    /// Create a new pending secret version for one device, a line, or all devices; each
    /// device receives it on its next fetch.
    Rotate {
        /// Act on the store of this CA folder directly (the server must be stopped).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// One device.
        #[arg(long, conflicts_with_all = ["line", "all"])]
        serial: Option<u64>,
        /// Every device enrolled through this line.
        #[arg(long, conflicts_with = "all")]
        line: Option<String>,
        /// Every device.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand, Debug)]
enum LineCommand {
    /// Register a line station's key with its serial range and quota.
    Add {
        /// Act on the store of this CA folder directly (the server must be stopped).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Line id (the token issuer): A-Z a-z 0-9 . _ -
        #[arg(long)]
        id: String,
        /// The line station's public key (PEM, from `line-station keygen`).
        #[arg(long = "public-key")]
        public_key: PathBuf,
        /// Serial range FIRST-LAST, inclusive.
        #[arg(long)]
        serials: String,
        /// Devices the line may enroll in all (default: the size of the range).
        #[arg(long)]
        quota: Option<u64>,
        /// Enrollments per second the line may make (bursts up to one second's worth);
        /// 0 = no limit. Faster requests get rate-limited (429, CoAP 4.29).
        #[arg(long, default_value_t = 0)]
        rate: u32,
        /// Where its devices' secrets come from: random (the CA's CSPRNG, or an imported key
        /// while the pool holds any), pool (imported keys only), or dukpt:BDKID (each device's
        /// AES DUKPT Initial Key under that stored BDK).
        #[arg(long = "secret-source", default_value = "random")]
        secret_source: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List registered lines.
    List {
        /// Read the store of this CA folder directly (the server must be stopped).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Disable a line: its tokens are refused (line-unknown) from now on.
    Disable {
        /// Line id.
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Enable a disabled line again.
    Enable {
        /// Line id.
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Set a line's rate limit: enrollments per second across every node (bursts up to one
    /// second's worth); 0 = no limit. Every node applies it within `[store] refresh_ms`.
    Rate {
        /// Line id.
        id: String,
        /// Enrollments per second; 0 = no limit.
        rate: u32,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

fn parse_alg(s: &str) -> Result<KeyAlgorithm, String> {
    KeyAlgorithm::from_name(s).ok_or_else(|| format!("{s:?} is not ed25519 or p256"))
}

/// Runs the command line with `args` (the first item is the program name).
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_tracing();
    // The node this process is: serve's --node-id, else the host name (offline commands on a
    // shared database write audit entries too).
    let node = match &cli.command {
        Command::Serve {
            node_id: Some(n), ..
        } => n.clone(),
        _ => crate::audit::host_node_name(),
    };
    if let Err(e) = crate::audit::check_node_name(&node) {
        eprintln!("ca-server: --node-id: {e}");
        return ExitCode::from(2);
    }
    crate::audit::set_node(&node);
    // 0: done; 1: done, and the answer is no (a broken audit chain, devices not rotated);
    // 2: could not do it (bad input, unreachable server, refused request).
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("ca-server: {e}");
            ExitCode::from(2)
        }
    }
}

fn init_tracing() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("IMPRINT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never into a log file or a pipe.
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

fn run(cli: Cli) -> Result<bool, String> {
    match cli.command {
        Command::Init {
            dir,
            algorithm,
            pkcs11,
            pkcs11_existing,
            tls_key_file,
            name,
            tls_names,
            store_url,
            store_password_file,
            store_ca_file,
            store_schema,
        } => {
            let ca = CaDir::new(&dir);
            let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
            let ca_key_source = match &pkcs11 {
                None => setup::CaKeySource::File,
                Some(text) => setup::CaKeySource::Pkcs11 {
                    uri: crate::issuer::Pkcs11Uri::parse(text)
                        .map_err(|e| format!("--pkcs11: {e}"))?,
                    existing: pkcs11_existing,
                    tls_key_file,
                },
            };
            setup::init(
                &ca,
                &InitOptions {
                    algorithm,
                    name,
                    tls_names,
                    now: SystemClock.now(),
                    store: crate::config::StoreSettings {
                        url: store_url,
                        password_file: store_password_file.map(absolute),
                        ca_file: store_ca_file.map(absolute),
                        schema: store_schema,
                        refresh_ms: None,
                    },
                    ca_key: ca_key_source.clone(),
                },
            )?;
            let ca_pem = std::fs::read_to_string(ca.ca_cert())
                .map_err(|e| format!("{}: {e}", ca.ca_cert().display()))?;
            let algorithm = protocol_spec::profile::cert_from_pem(&ca_pem)
                .and_then(|der| protocol_spec::profile::CertProfile::from_ca_der(&der).ok())
                .map_or(algorithm, |p| p.ca_public_key().algorithm);
            println!("created CA in {} ({algorithm})", dir.display());
            if let setup::CaKeySource::Pkcs11 { uri, .. } = &ca_key_source {
                println!("  CA key:         in the PKCS#11 token (config.toml [issuer] pkcs11)");
                if let crate::issuer::pkcs11::PinSource::Value(_) = uri.pin {
                    println!(
                        "  PIN:            not kept (pin-value); serve reads it from {}",
                        crate::issuer::pkcs11::PIN_ENV
                    );
                }
            }
            println!("  CA certificate: {}", ca.ca_cert().display());
            println!("  operator CA:    {}", ca.operator_ca_cert().display());
            println!(
                "  next: ca-server line add --dir {} --id LINE --public-key LINE.pub.pem --serials FIRST-LAST",
                dir.display()
            );
            Ok(true)
        }
        Command::Key {
            command: KeyCommand::ToToken { dir, pkcs11 },
        } => {
            let ca = CaDir::new(&dir);
            let uri =
                crate::issuer::Pkcs11Uri::parse(&pkcs11).map_err(|e| format!("--pkcs11: {e}"))?;
            setup::key_to_token(&ca, &uri)?;
            println!(
                "the CA key is in the token ({}); {} is removed and {} names the token",
                uri.describe(),
                ca.ca_key().display(),
                ca.config().display()
            );
            Ok(true)
        }
        Command::Store {
            command:
                StoreCommand::Copy {
                    dir,
                    to,
                    password_file,
                    ca_file,
                    schema,
                    switch,
                },
        } => {
            let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
            let target = crate::config::StoreSettings {
                url: Some(to),
                password_file: password_file.map(absolute),
                ca_file: ca_file.map(absolute),
                schema,
                refresh_ms: None,
            };
            let report = crate::store::copy::sled_to_postgres(&CaDir::new(&dir), &target)?;
            println!("{report}");
            if switch {
                let ca = CaDir::new(&dir);
                let mut config = ca.load_config()?;
                config.store = target;
                let text = toml::to_string_pretty(&config).map_err(|e| e.to_string())?;
                std::fs::write(ca.config(), text)
                    .map_err(|e| format!("{}: {e}", ca.config().display()))?;
                println!(
                    "{} now names the database; the sled store in {} is no longer read",
                    ca.config().display(),
                    ca.store().display()
                );
            }
            Ok(true)
        }
        Command::Store {
            command: StoreCommand::Migrate { dir },
        } => {
            let ca = CaDir::new(&dir);
            let config = ca.load_config()?;
            let Some(pg) = crate::store::pg_config(&ca, &config.store)? else {
                return Err(format!(
                    "{} keeps its records in sled ({}), which needs no migration",
                    dir.display(),
                    ca.store().display()
                ));
            };
            let found = crate::store::PgStore::migrate(&pg).map_err(|e| e.to_string())?;
            let now = crate::store::postgres::schema::SCHEMA_VERSION;
            if found == now {
                println!("schema {:?} is at version {now}; nothing to do", pg.schema);
            } else {
                println!(
                    "schema {:?} migrated from version {found} to {now}",
                    pg.schema
                );
            }
            Ok(true)
        }
        Command::Operator {
            command:
                OperatorCommand::Add {
                    dir,
                    name,
                    role,
                    days,
                    out,
                },
        } => {
            let ca = CaDir::new(&dir);
            let out = out.unwrap_or_else(|| ca.operators());
            let files =
                crate::operators::add_operator(&ca, &name, role, days, &out, SystemClock.now())?;
            println!("operator {name} ({role}): certificate valid {days} days");
            println!("  certificate: {}", files.cert.display());
            println!("  key:         {} (mode 0600)", files.key.display());
            println!("use it with:");
            println!("  export IMPRINT_OPERATOR_CERT={}", files.cert.display());
            println!("  export IMPRINT_OPERATOR_KEY={}", files.key.display());
            println!("  export IMPRINT_CA_CERT={}", ca.ca_cert().display());
            Ok(true)
        }
        Command::Operator {
            command: OperatorCommand::Revoke { name, admin },
        } => {
            let path = format!("/operators/{name}/revoke");
            let v: crate::ops::OperatorView = call(&admin, "POST", &path, None)?.json()?;
            if admin.json {
                print_json(&v)?;
            } else {
                println!(
                    "operator {}: revoked; refused at the admin door from its next request",
                    v.name
                );
            }
            Ok(true)
        }
        Command::Operator {
            command: OperatorCommand::List { admin },
        } => {
            let list: Vec<crate::ops::OperatorView> =
                call(&admin, "GET", "/operators", None)?.json()?;
            if admin.json {
                print_json(&list)?;
            } else {
                println!(
                    "{:<24} {:<9} {:<8} {:<20}  revoked",
                    "operator", "role", "status", "expires"
                );
                for o in &list {
                    println!(
                        "{:<24} {:<9} {:<8} {:<20}  {}",
                        o.name,
                        o.role.as_deref().unwrap_or("-"),
                        o.status,
                        o.expires_at.map(rfc3339).unwrap_or_else(|| "-".into()),
                        match (&o.revoked_at, &o.revoked_by) {
                            (Some(t), Some(by)) => format!("{} by {by}", rfc3339(*t)),
                            _ => "-".into(),
                        }
                    );
                }
            }
            Ok(true)
        }
        Command::Line { command } => line_command(command),
        Command::Device { command } => device_command(command),
        Command::Secrets { command } => secrets_command(command),
        Command::Audit { command } => audit_command(command),
        Command::Dukpt { command } => dukpt_command(command),
        Command::Serve {
            dir,
            https,
            coap,
            mtls,
            admin,
            no_admin,
            node_id: _,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let running = server::start(
                    &CaDir::new(&dir),
                    &ListenOverrides {
                        https,
                        coap,
                        mtls,
                        admin,
                        no_admin,
                    },
                )
                .await?;
                println!("{}", running.listening_line());
                use std::io::Write;
                let _ = std::io::stdout().flush();
                wait_for_signal().await;
                running.stop().await;
                Ok(true)
            })
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Runs `f` on a small runtime (the admin client's requests).
fn block_on<T>(f: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?
        .block_on(f)
}

fn client(a: &AdminArgs) -> Result<AdminClient, String> {
    let need = |v: &Option<PathBuf>, flag: &str, env: &str, hint: &str| {
        v.clone()
            .ok_or_else(|| format!("the admin API needs --{flag} (or {env}): {hint}"))
    };
    let operator = "`ca-server operator add --dir CA NAME` makes it, in CA/operators/";
    let cert = need(
        &a.operator_cert,
        "operator-cert",
        "IMPRINT_OPERATOR_CERT",
        operator,
    )?;
    let key = need(
        &a.operator_key,
        "operator-key",
        "IMPRINT_OPERATOR_KEY",
        operator,
    )?;
    let ca = need(
        &a.ca_cert,
        "ca-cert",
        "IMPRINT_CA_CERT",
        "the CA certificate, ca.pem in the CA folder (`ca-server init` made it)",
    )?;
    AdminClient::new(&a.admin_url, &ca, &cert, &key)
}

fn call(
    a: &AdminArgs,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<AdminResponse, String> {
    let c = client(a)?;
    block_on(async move { c.request(method, path, body).await })
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), String> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).map_err(|e| e.to_string())?
    );
    Ok(())
}

/// The store of the CA folder `dir` (sled in the folder, or the database its config names),
/// sealing the audit entries it writes.
fn open_store(dir: &std::path::Path) -> Result<std::sync::Arc<dyn Store>, String> {
    open_store_with_key(dir).map(|(store, _)| store)
}

/// [`open_store`], and the audit key, loaded from the CA folder's key-encryption key (file, or
/// sealed by its PKCS#11 token).
fn open_store_with_key(
    dir: &std::path::Path,
) -> Result<(std::sync::Arc<dyn Store>, crate::audit::AuditKey), String> {
    let ca = CaDir::new(dir);
    if !ca.ca_cert().exists() {
        return Err(format!(
            "{} is not a CA folder ({} is missing; `ca-server init --dir {}` makes one)",
            dir.display(),
            ca.ca_cert().display(),
            dir.display()
        ));
    }
    let config = ca.load_config()?;
    let key = crate::issuer::load_secret_keys(&ca, &config)?.audit_key();
    let store = crate::store::open_sealing(&ca, &config.store, key.clone())?;
    Ok((store, key))
}

fn line_command(command: LineCommand) -> Result<bool, String> {
    match command {
        LineCommand::Add {
            dir,
            id,
            public_key,
            serials,
            quota,
            rate,
            secret_source,
            admin,
        } => {
            if rate > crate::ops::MAX_LINE_RATE {
                return Err(format!(
                    "--rate {rate} is above {} enrollments per second",
                    crate::ops::MAX_LINE_RATE
                ));
            }
            let pem = std::fs::read_to_string(&public_key)
                .map_err(|e| format!("{}: {e}", public_key.display()))?;
            let range = crate::lines::parse_range(&serials)?;
            let line = match dir {
                Some(dir) => {
                    let store = open_store(&dir)?;
                    let mut rec =
                        crate::lines::new_line(&id, &pem, range, quota, SystemClock.now())?;
                    rec.rate = rate;
                    rec.secret_source =
                        crate::lines::secret_source(store.as_ref(), &secret_source)?;
                    store.add_line(&rec, "cli").map_err(|e| e.to_string())?;
                    crate::ops::line_view(&rec)
                }
                None => {
                    let body = serde_json::to_vec(&AddLine {
                        id,
                        public_key: pem,
                        serials,
                        quota,
                        rate,
                        secret_source: Some(secret_source),
                    })
                    .map_err(|e| e.to_string())?;
                    call(&admin, "POST", "/lines", Some(body))?.json::<LineView>()?
                }
            };
            if admin.json {
                print_json(&line)?;
            } else {
                println!(
                    "line {} registered: serials {}-{}, quota {}, {}, secrets {}",
                    line.id,
                    line.first_serial,
                    line.last_serial,
                    line.quota,
                    rate_text(line.rate),
                    line.secret_source
                );
            }
            Ok(true)
        }
        LineCommand::List { dir, admin } => {
            let lines: Vec<LineView> = match dir {
                Some(dir) => open_store(&dir)?
                    .lines()
                    .map_err(|e| e.to_string())?
                    .iter()
                    .map(crate::ops::line_view)
                    .collect(),
                None => call(&admin, "GET", "/lines", None)?.json()?,
            };
            if admin.json {
                print_json(&lines)?;
            } else {
                println!(
                    "{:<16} {:>23} {:>10} {:>10} {:>8}  {:<8}  secrets",
                    "line", "serials", "quota", "enrolled", "rate/s", "state"
                );
                for l in &lines {
                    println!(
                        "{:<16} {:>23} {:>10} {:>10} {:>8}  {:<8}  {}",
                        l.id,
                        format!("{}-{}", l.first_serial, l.last_serial),
                        l.quota,
                        l.enrolled,
                        if l.rate == 0 {
                            "-".to_string()
                        } else {
                            l.rate.to_string()
                        },
                        if l.active { "active" } else { "disabled" },
                        l.secret_source
                    );
                }
            }
            Ok(true)
        }
        LineCommand::Disable { id, admin } => line_switch(&id, &admin, "disable"),
        LineCommand::Enable { id, admin } => line_switch(&id, &admin, "enable"),
        LineCommand::Rate { id, rate, admin } => {
            crate::lines::check_id(&id)?;
            let body =
                serde_json::to_vec(&crate::ops::SetRate { rate }).map_err(|e| e.to_string())?;
            let line: LineView =
                call(&admin, "POST", &format!("/lines/{id}/rate"), Some(body))?.json()?;
            if admin.json {
                print_json(&line)?;
            } else {
                println!("line {}: {}", line.id, rate_text(line.rate));
            }
            Ok(true)
        }
    }
}

fn rate_text(rate: u32) -> String {
    if rate == 0 {
        "no rate limit".into()
    } else {
        format!("at most {rate} enrollments/s")
    }
}

fn line_switch(id: &str, admin: &AdminArgs, action: &str) -> Result<bool, String> {
    crate::lines::check_id(id)?;
    {
        {
            let line: LineView =
                call(admin, "POST", &format!("/lines/{id}/{action}"), None)?.json()?;
            if admin.json {
                print_json(&line)?;
            } else {
                println!(
                    "line {}: {}",
                    line.id,
                    if line.active { "active" } else { "disabled" }
                );
            }
            Ok(true)
        }
    }
}

fn device_command(command: DeviceCommand) -> Result<bool, String> {
    let (serial, admin, path, method) = match &command {
        DeviceCommand::Show { serial, admin } => {
            (*serial, admin, format!("/devices/{serial}"), "GET")
        }
        DeviceCommand::Revoke { serial, admin } => {
            (*serial, admin, format!("/devices/{serial}/revoke"), "POST")
        }
        DeviceCommand::Reset { serial, admin } => {
            (*serial, admin, format!("/devices/{serial}/reset"), "POST")
        }
    };
    let view: DeviceView = call(admin, method, &path, None)?.json()?;
    if admin.json {
        print_json(&view)?;
        return Ok(true);
    }
    match command {
        DeviceCommand::Show { .. } => print_device(&view),
        DeviceCommand::Revoke { .. } => println!(
            "device {serial}: revoked; refused at the mutual-TLS door from its next handshake, listed in the CRL"
        ),
        DeviceCommand::Reset { .. } => println!(
            "device {serial}: reset; its certificate is on the CRL (superseded), and the serial \
             may enroll again as generation {} (history kept: {} earlier binding(s))",
            view.history.len(),
            view.history.len()
        ),
    }
    Ok(true)
}

fn print_device(v: &DeviceView) {
    let t = |t: Option<u64>| t.map(rfc3339).unwrap_or_else(|| "-".into());
    println!("device {}: {}", v.serial, v.status);
    if let Some(b) = &v.binding {
        println!("  key          {} ({})", b.key_fingerprint, b.key_algorithm);
        println!("  line         {}", b.line);
        println!("  token id     {}", b.token_id);
        println!("  enrolled     {}", b.enrolled);
        if b.generation != 0 {
            println!(
                "  generation   {} (reset {} time(s) before)",
                b.generation, b.generation
            );
        }
        if let Some(r) = b.revoked_at {
            println!("  revoked      {}", rfc3339(r));
        }
    }
    if v.secrets.is_empty() {
        println!("  secrets      none yet (allocated on the device's first fetch)");
    } else {
        println!("  secrets");
        println!(
            "    {:>3}  {:<34} {:<7} {:<6} {:<20} {:<20} {:<20}",
            "ver", "key id", "source", "kcv", "created", "delivered", "confirmed"
        );
        for s in &v.secrets {
            // A DUKPT version's key id is its Initial Key ID.
            let key_id = match &s.initial_key_id {
                Some(id) => format!("{id} (initial key id)"),
                None => s.key_id.clone(),
            };
            println!(
                "    {:>3}  {:<34} {:<7} {:<6} {:<20} {:<20} {:<20}{}",
                s.version,
                key_id,
                s.source,
                s.kcv,
                rfc3339(s.created_at),
                t(s.delivered_at),
                t(s.confirmed_at),
                s.retired_at
                    .map(|r| format!(" retired {}", rfc3339(r)))
                    .unwrap_or_default()
            );
        }
    }
    for h in &v.history {
        println!(
            "  reset        {} by {}: was {} with key {}, line {}, enrolled {}",
            rfc3339(h.reset_at),
            h.actor,
            h.status,
            h.binding.key_fingerprint,
            h.binding.line,
            h.binding.enrolled
        );
    }
    if let Some(b) = &v.binding {
        print!("{}", b.certificate);
    }
}

fn audit_command(command: AuditCommand) -> Result<bool, String> {
    use std::io::Write;
    match command {
        AuditCommand::Export { dir, after, admin } => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let io = |e: std::io::Error| e.to_string();
            match dir {
                Some(dir) => {
                    let store = open_store(&dir)?;
                    for item in store.audit_raw(after) {
                        let (_, v) = item.map_err(|e| e.to_string())?;
                        let e: crate::records::AuditEntry =
                            crate::records::from_cbor(&v).map_err(|e| {
                                format!("audit entry does not decode: {e} (run `audit verify`)")
                            })?;
                        serde_json::to_writer(&mut out, &AuditLine::from(&e))
                            .map_err(|e| e.to_string())?;
                        out.write_all(b"\n").map_err(io)?;
                    }
                }
                None => {
                    let c = client(&admin)?;
                    let mut after = after;
                    loop {
                        let path =
                            format!("/audit?after={after}&limit={}", crate::ops::MAX_AUDIT_PAGE);
                        let c2 = c.clone();
                        let r = block_on(async move { c2.request("GET", &path, None).await })?;
                        r.ok()?;
                        let mut n = 0usize;
                        for line in r.body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                            let e: AuditLine = serde_json::from_slice(line).map_err(|e| {
                                format!("the server's audit line does not decode: {e}")
                            })?;
                            after = e.seq;
                            out.write_all(line).map_err(io)?;
                            out.write_all(b"\n").map_err(io)?;
                            n += 1;
                        }
                        if n < crate::ops::MAX_AUDIT_PAGE {
                            break;
                        }
                    }
                }
            }
            out.flush().map_err(io)?;
            Ok(true)
        }
        AuditCommand::Verify { dir, expect, admin } => {
            let online = dir.is_none();
            let verdict: AuditVerdict = match dir {
                Some(dir) => {
                    let (store, key) = open_store_with_key(&dir)?;
                    let sealed_from = crate::audit::read_sealed_from(&CaDir::new(&dir))?;
                    crate::audit::verify(store.audit_raw(0), expect, Some(&key), sealed_from)
                        .map_err(|e| e.to_string())?
                }
                None => {
                    let path = match expect {
                        Some(a) => {
                            format!("/audit/verify?expect={}:{}", a.seq, hex::encode(a.hash))
                        }
                        None => "/audit/verify".to_string(),
                    };
                    call(&admin, "GET", &path, None)?.json()?
                }
            };
            if admin.json {
                /// The verdict, and its head in the form `--expect` takes.
                #[derive(serde::Serialize)]
                struct Out<'a> {
                    #[serde(flatten)]
                    verdict: &'a AuditVerdict,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    expect: Option<String>,
                }
                print_json(&Out {
                    verdict: &verdict,
                    expect: verdict
                        .ok()
                        .then(|| format!("{}:{}", verdict.entries, verdict.head)),
                })?;
            } else {
                match &verdict.first_bad {
                    None => println!(
                        "audit chain intact: {} entries, head {}:{}\n  {}\n  (record the head elsewhere; `audit verify --expect {}:{}` checks it later{})",
                        verdict.entries,
                        verdict.entries,
                        verdict.head,
                        key_note(&verdict),
                        verdict.entries,
                        verdict.head,
                        if online {
                            "; through the admin API each verify and export is an audit entry \
                             of its own, so the head moves with every call"
                        } else {
                            ""
                        }
                    ),
                    Some(b) => println!(
                        "audit chain BROKEN at entry {}: {}\n  (entries before it verify; last good head {})",
                        b.seq, b.reason, verdict.head
                    ),
                }
            }
            Ok(verdict.ok())
        }
    }
}

/// What an intact chain's MACs vouch for.
fn key_note(v: &AuditVerdict) -> String {
    match (v.keyed, v.keyed_from) {
        (false, _) => "(MACs not checked: the verifier has no audit key)".into(),
        (true, None) => "(no entries yet)".into(),
        (true, Some(1)) => "every entry sealed by the audit key".into(),
        (true, Some(k)) => format!(
            "entries {k} on sealed by the audit key; entries 1 to {} were written before the key              existed and are vouched for as a whole by entry {k}'s MAC",
            k - 1
        ),
    }
}

/// The CA folder's store and secret keys (the key-encryption key), for offline DUKPT actions.
fn offline_keys(
    dir: &std::path::Path,
) -> Result<(std::sync::Arc<dyn Store>, crate::secrets::SecretKeys), String> {
    let store = open_store(dir)?;
    let ca = CaDir::new(dir);
    let keys = crate::issuer::load_secret_keys(&ca, &ca.load_config()?)?;
    Ok((store, keys))
}

fn dukpt_command(command: DukptCommand) -> Result<bool, String> {
    use crate::dukpt::{AddBdk, BdkView, DeriveRequest, DeriveView};
    match command {
        DukptCommand::AddBdk {
            dir,
            bdk_id,
            key_file,
            generate,
            algorithm,
            admin,
        } => {
            let id = crate::dukpt::parse_bdk_id(&bdk_id).map_err(|e| e.to_string())?;
            let key = match &key_file {
                Some(f) => Some(
                    zeroize::Zeroizing::new(
                        std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?,
                    )
                    .trim()
                    .to_string(),
                ),
                None => None,
            };
            let at_file = |e: String| match &key_file {
                Some(f) => format!("{}: {e}", f.display()),
                None => e,
            };
            let request = AddBdk {
                bdk_id: id.to_string(),
                key,
                generate,
                algorithm,
            };
            let view = match dir {
                Some(dir) => {
                    let (store, keys) = offline_keys(&dir)?;
                    let new =
                        crate::dukpt::new_bdk(&request).map_err(|e| at_file(e.to_string()))?;
                    drop(request);
                    let rec =
                        crate::dukpt::add(store.as_ref(), &keys, id, new, SystemClock.now(), "cli")
                            .map_err(|e| e.to_string())?;
                    crate::dukpt::bdk_view(&rec)
                }
                None => {
                    let body = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
                    let body = zeroize::Zeroizing::new(body);
                    call(&admin, "POST", "/dukpt/bdks", Some(body.to_vec()))
                        .map_err(at_file)?
                        .json::<BdkView>()?
                }
            };
            if admin.json {
                print_json(&view)?;
            } else {
                println!(
                    "BDK {} stored: {}, kcv {}{}",
                    view.bdk_id,
                    view.algorithm,
                    view.kcv,
                    if view.custody == "token" {
                        ", kept in the PKCS#11 token"
                    } else {
                        ""
                    }
                );
            }
            Ok(true)
        }
        DukptCommand::List { dir, admin } => {
            let views: Vec<BdkView> = match dir {
                Some(dir) => open_store(&dir)?
                    .bdks()
                    .map_err(|e| e.to_string())?
                    .iter()
                    .map(crate::dukpt::bdk_view)
                    .collect(),
                None => call(&admin, "GET", "/dukpt/bdks", None)?.json()?,
            };
            if admin.json {
                print_json(&views)?;
            } else {
                println!(
                    "{:<10} {:<9} {:<12} {:<7} added",
                    "bdk id", "algorithm", "kcv", "kept"
                );
                for v in &views {
                    println!(
                        "{:<10} {:<9} {:<12} {:<7} {}",
                        v.bdk_id,
                        v.algorithm,
                        v.kcv,
                        v.custody,
                        rfc3339(v.created_at)
                    );
                }
            }
            Ok(true)
        }
        DukptCommand::Derive {
            dir,
            bdk_id,
            ksn,
            usage,
            key_type,
            admin,
        } => {
            let parsed = protocol_spec::dukpt::Ksn::from_hex(&ksn).map_err(|e| e.to_string())?;
            if let Some(b) = &bdk_id {
                let id = crate::dukpt::parse_bdk_id(b).map_err(|e| e.to_string())?;
                if id != parsed.initial_key_id.bdk_id() {
                    return Err(format!(
                        "the KSN {parsed} names BDK {}, not {id}",
                        parsed.initial_key_id.bdk_id()
                    ));
                }
            }
            let request = DeriveRequest {
                ksn,
                usage,
                key_type,
            };
            let view = match dir {
                Some(dir) => {
                    let (store, keys) = offline_keys(&dir)?;
                    crate::dukpt::derive(store.as_ref(), &keys, &request)
                        .map_err(|e| e.to_string())?
                }
                None => {
                    let body = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
                    call(&admin, "POST", "/dukpt/derive", Some(body))?.json::<DeriveView>()?
                }
            };
            if admin.json {
                print_json(&view)?;
            } else {
                println!("ksn {}", view.ksn);
                println!(
                    "kcv {} ({} {} working key, counter {})",
                    view.kcv, view.usage, view.key_type, view.counter
                );
            }
            Ok(true)
        }
    }
}

fn secrets_command(command: SecretsCommand) -> Result<bool, String> {
    let now = SystemClock.now();
    match command {
        SecretsCommand::Import { dir, file } => {
            let ca = CaDir::new(&dir);
            let text = zeroize::Zeroizing::new(
                std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?,
            );
            let batch = crate::secrets::parse_import(&text)
                .map_err(|e| format!("{}: {e}", file.display()))?;
            let keys = crate::issuer::load_secret_keys(&ca, &ca.load_config()?)?;
            let store = open_store(&dir)?;
            let n = crate::service::import_batch(store.as_ref(), &keys, batch, now, "cli")
                .map_err(|e| format!("{}: {e}", file.display()))?;
            println!("imported {n} keys from {}", file.display());
            Ok(true)
        }
        SecretsCommand::Rotate {
            dir,
            serial,
            line,
            all,
            admin,
        } => {
            let request = RotateRequest { serial, line, all };
            if request == RotateRequest::default() {
                return Err("give --serial S, --line L or --all".into());
            }
            let result = match dir {
                Some(dir) => rotate_offline(&dir, &request, now)?,
                None => {
                    let body = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
                    call(&admin, "POST", "/secrets/rotate", Some(body))?.json::<RotateResult>()?
                }
            };
            if admin.json {
                print_json(&result)?;
            } else {
                if result.requested == 1
                    && let Some(v) = result.versions.first()
                {
                    println!(
                        "serial {}: version {} ({}) pending delivery",
                        v.serial, v.version, v.key_id
                    );
                }
                for f in &result.failed {
                    eprintln!("serial {}: {} ({})", f.serial, f.detail, f.problem);
                }
                println!("rotated {} of {} devices", result.rotated, result.requested);
            }
            Ok(result.failed.is_empty())
        }
    }
}

fn rotate_offline(
    dir: &std::path::Path,
    request: &RotateRequest,
    now: u64,
) -> Result<RotateResult, String> {
    let ca = CaDir::new(dir);
    let keys = crate::issuer::load_secret_keys(&ca, &ca.load_config()?)?;
    let store = open_store(dir)?;
    let store = store.as_ref();
    let active =
        |d: &crate::records::DeviceRecord| d.status == crate::records::DeviceStatus::Active;
    let mut serials = Vec::new();
    match request {
        RotateRequest {
            serial: Some(s), ..
        } => serials.push(*s),
        RotateRequest { line, .. } => {
            if let Some(l) = line
                && store.line(l).map_err(|e| e.to_string())?.is_none()
            {
                return Err(format!("--line {l:?}: no such line"));
            }
            for d in store.devices() {
                let d = d.map_err(|e| e.to_string())?;
                if active(&d) && line.as_ref().is_none_or(|l| d.line == *l) {
                    serials.push(d.serial);
                }
            }
        }
    }
    let mut result = RotateResult {
        requested: serials.len() as u64,
        rotated: 0,
        versions: Vec::new(),
        failed: Vec::new(),
    };
    let mut results = Vec::with_capacity(serials.len());
    for chunk in serials.chunks(512) {
        let batch = crate::service::rotate_batch(store, &keys, chunk, now, "cli")
            .map_err(|e| e.to_string())?;
        results.extend(chunk.iter().copied().zip(batch));
    }
    for (s, r) in results {
        match r {
            Ok(rec) => {
                result.rotated += 1;
                if result.versions.len() < 100 {
                    result.versions.push(RotatedVersion {
                        serial: s,
                        key_id: rec.key_id,
                        version: rec.version,
                    });
                }
            }
            Err(p) => result.failed.push(RotateFailure {
                serial: s,
                problem: p.kind.to_string(),
                detail: p.detail,
            }),
        }
    }
    store.sync().map_err(|e| e.to_string())?;
    Ok(result)
}
