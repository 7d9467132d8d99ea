//! The `ca-server` command line, as a library so that the simulator can run the same CA as a
//! child process of its own binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::CaDir;
use crate::server::{self, ListenOverrides};
use crate::service::{Clock, SystemClock};
use crate::setup::{self, InitOptions};
use crate::store::{SledStore, Store};
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
    /// certificate, config.toml with working defaults, and an empty store.
    Init {
        /// The CA folder to create.
        #[arg(long)]
        dir: PathBuf,
        /// CA key algorithm.
        #[arg(long, default_value = "ed25519", value_parser = parse_alg)]
        algorithm: KeyAlgorithm,
        /// CA common name.
        #[arg(long, default_value = "Imprint Device CA")]
        name: String,
        /// Extra DNS name or IP address for the HTTPS certificate (repeatable); localhost,
        /// 127.0.0.1 and ::1 are always included.
        #[arg(long = "tls-name")]
        tls_names: Vec<String>,
    },
    /// Production lines (offline: the server must not be running).
    Line {
        #[command(subcommand)]
        command: LineCommand,
    },
    /// Per-device secrets (offline: the server must not be running).
    Secrets {
        #[command(subcommand)]
        command: SecretsCommand,
    },
    /// Serve enrollment until interrupted (SIGINT or SIGTERM).
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
    },
}

#[derive(Subcommand, Debug)]
enum SecretsCommand {
    /// Import pre-generated keys: JSON lines {"key_id": "...", "key": "<64 hex>"} or CSV
    /// `key_id,key`. Each key goes to exactly one device, on its first fetch. A file holding a
    /// key or id already known is refused whole.
    Import {
        /// The CA folder.
        #[arg(long)]
        dir: PathBuf,
        /// The batch file.
        file: PathBuf,
    },
    /// Create a new pending secret version for one device, a line, or all devices.
    Rotate {
        /// The CA folder.
        #[arg(long)]
        dir: PathBuf,
        /// One device.
        #[arg(long, conflicts_with_all = ["line", "all"])]
        serial: Option<u64>,
        /// Every device enrolled through this line.
        #[arg(long, conflicts_with = "all")]
        line: Option<String>,
        /// Every device.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand, Debug)]
enum LineCommand {
    /// Register a line station's key with its serial range and quota.
    Add {
        /// The CA folder.
        #[arg(long)]
        dir: PathBuf,
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
    },
    /// List registered lines.
    List {
        /// The CA folder.
        #[arg(long)]
        dir: PathBuf,
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
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ca-server: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("IMPRINT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Init {
            dir,
            algorithm,
            name,
            tls_names,
        } => {
            let ca = CaDir::new(&dir);
            setup::init(
                &ca,
                &InitOptions {
                    algorithm,
                    name,
                    tls_names,
                    now: SystemClock.now(),
                },
            )?;
            println!("created CA in {} ({algorithm})", dir.display());
            println!("  CA certificate: {}", ca.ca_cert().display());
            println!(
                "  next: ca-server line add --dir {} --id LINE --public-key LINE.pub.pem --serials FIRST-LAST",
                dir.display()
            );
            Ok(())
        }
        Command::Line { command } => match command {
            LineCommand::Add {
                dir,
                id,
                public_key,
                serials,
                quota,
            } => {
                let pem = std::fs::read_to_string(&public_key)
                    .map_err(|e| format!("{}: {e}", public_key.display()))?;
                let range = crate::lines::parse_range(&serials)?;
                let store =
                    SledStore::open(&CaDir::new(&dir).store()).map_err(|e| e.to_string())?;
                let rec = crate::lines::add_line(
                    &store,
                    &id,
                    &pem,
                    range,
                    quota,
                    SystemClock.now(),
                    "cli",
                )?;
                println!(
                    "line {} registered: serials {}-{}, quota {}",
                    rec.id, rec.first_serial, rec.last_serial, rec.quota
                );
                Ok(())
            }
            LineCommand::List { dir } => {
                let store =
                    SledStore::open(&CaDir::new(&dir).store()).map_err(|e| e.to_string())?;
                for l in store.lines().map_err(|e| e.to_string())? {
                    println!(
                        "{}\t{}-{}\tquota {}\tenrolled {}\t{}",
                        l.id,
                        l.first_serial,
                        l.last_serial,
                        l.quota,
                        l.enrolled,
                        if l.active { "active" } else { "disabled" }
                    );
                }
                Ok(())
            }
        },
        Command::Secrets { command } => secrets_command(command),
        Command::Serve {
            dir,
            https,
            coap,
            mtls,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let running =
                    server::start(&CaDir::new(&dir), &ListenOverrides { https, coap, mtls })
                        .await?;
                println!("{}", running.listening_line());
                use std::io::Write;
                let _ = std::io::stdout().flush();
                wait_for_signal().await;
                running.stop().await;
                Ok(())
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

fn secrets_command(command: SecretsCommand) -> Result<(), String> {
    let now = SystemClock.now();
    match command {
        SecretsCommand::Import { dir, file } => {
            let ca = CaDir::new(&dir);
            let text = zeroize::Zeroizing::new(
                std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?,
            );
            let batch = crate::secrets::parse_import(&text)
                .map_err(|e| format!("{}: {e}", file.display()))?;
            let keys = crate::secrets::SecretKeys::load(&ca.kek())?;
            let store = SledStore::open(&ca.store()).map_err(|e| e.to_string())?;
            let n = crate::service::import_batch(&store, &keys, batch, now, "cli")
                .map_err(|e| format!("{}: {e}", file.display()))?;
            println!("imported {n} keys from {}", file.display());
            Ok(())
        }
        SecretsCommand::Rotate {
            dir,
            serial,
            line,
            all,
        } => {
            let ca = CaDir::new(&dir);
            let keys = crate::secrets::SecretKeys::load(&ca.kek())?;
            let store = SledStore::open(&ca.store()).map_err(|e| e.to_string())?;
            let serials: Vec<u64> = match (serial, line, all) {
                (Some(s), _, _) => vec![s],
                (None, Some(l), _) => store
                    .devices()
                    .filter_map(|d| d.ok())
                    .filter(|d| d.line == l)
                    .map(|d| d.serial)
                    .collect(),
                (None, None, true) => store
                    .devices()
                    .filter_map(|d| d.ok())
                    .map(|d| d.serial)
                    .collect(),
                _ => return Err("give --serial S, --line L or --all".into()),
            };
            let mut rotated = 0;
            for s in &serials {
                match crate::service::rotate_in(&store, &keys, *s, now, "cli")
                    .map_err(|e| e.to_string())?
                {
                    Ok(rec) => {
                        rotated += 1;
                        if serials.len() == 1 {
                            println!(
                                "serial {s}: version {} ({}) pending delivery",
                                rec.version, rec.key_id
                            );
                        }
                    }
                    Err(p) => eprintln!("serial {s}: {}", p.detail),
                }
            }
            store.sync().map_err(|e| e.to_string())?;
            println!("rotated {rotated} of {} devices", serials.len());
            Ok(())
        }
    }
}
