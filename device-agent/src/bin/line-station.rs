//! `line-station`: the factory tool that holds a line's key and vouches for devices.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use device_agent::AgentError;
use device_agent::line_station::{DEFAULT_TTL, attest, spki_from_csr, spki_from_public_key_pem};
use device_agent::state::write_atomically;
use protocol_spec::{DeviceSerial, KeyAlgorithm, KeyPair, PublicKey};
use ring::rand::SystemRandom;

/// Imprint line station: line keys and factory-attestation tokens.
#[derive(Parser, Debug)]
#[command(name = "line-station", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate a line key: DIR/NAME.key (mode 0600) and DIR/NAME.pub.pem (for `ca-server line add`).
    Keygen {
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// File name stem.
        #[arg(long, default_value = "line")]
        name: String,
        /// Key algorithm.
        #[arg(long, default_value = "ed25519", value_parser = parse_alg)]
        algorithm: KeyAlgorithm,
    },
    /// Mint a factory token binding a serial to a device key.
    Attest {
        /// The line key (from `keygen`).
        #[arg(long)]
        key: PathBuf,
        /// The line id, as registered with the CA.
        #[arg(long)]
        line: String,
        /// The device serial.
        #[arg(long)]
        serial: DeviceSerial,
        /// The device public key (PEM).
        #[arg(
            long = "public-key",
            conflicts_with = "csr",
            required_unless_present = "csr"
        )]
        public_key: Option<PathBuf>,
        /// The device's CSR (PEM or DER); its signature is checked first.
        #[arg(long)]
        csr: Option<PathBuf>,
        /// Token lifetime, seconds.
        #[arg(long, default_value_t = DEFAULT_TTL)]
        ttl: u64,
        /// Where to write the token (raw COSE_Sign1 bytes).
        #[arg(long)]
        out: PathBuf,
    },
}

fn parse_alg(s: &str) -> Result<KeyAlgorithm, String> {
    KeyAlgorithm::from_name(s).ok_or_else(|| format!("{s:?} is not ed25519 or p256"))
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("line-station: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), AgentError> {
    let rng = SystemRandom::new();
    match cli.command {
        Command::Keygen {
            out,
            name,
            algorithm,
        } => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&out)
                .map_err(|e| AgentError::io(&out, e))?;
            let key = KeyPair::generate(algorithm, &rng)
                .map_err(|e| AgentError::Invalid(e.to_string()))?;
            let key_path = out.join(format!("{name}.key"));
            let pub_path = out.join(format!("{name}.pub.pem"));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&key_path)
                .map_err(|e| AgentError::io(&key_path, e))?;
            f.write_all(key.to_pem().as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| AgentError::io(&key_path, e))?;
            write_atomically(&pub_path, PublicKey::from(&key).to_pem().as_bytes(), 0o644)?;
            println!("{}\n{}", key_path.display(), pub_path.display());
            Ok(())
        }
        Command::Attest {
            key,
            line,
            serial,
            public_key,
            csr,
            ttl,
            out,
        } => {
            let key_text = std::fs::read_to_string(&key).map_err(|e| AgentError::io(&key, e))?;
            let line_key = KeyPair::from_pem(&key_text, &rng)
                .map_err(|e| AgentError::Invalid(format!("{}: {e}", key.display())))?;
            let spki = match (public_key, csr) {
                (Some(p), _) => {
                    let text = std::fs::read_to_string(&p).map_err(|e| AgentError::io(&p, e))?;
                    spki_from_public_key_pem(&text)
                        .map_err(|e| AgentError::Invalid(format!("{}: {e}", p.display())))?
                }
                (None, Some(c)) => {
                    let bytes = std::fs::read(&c).map_err(|e| AgentError::io(&c, e))?;
                    spki_from_csr(&bytes)
                        .map_err(|e| AgentError::Invalid(format!("{}: {e}", c.display())))?
                }
                (None, None) => {
                    return Err(AgentError::Invalid("give --public-key or --csr".into()));
                }
            };
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let token = attest(&line_key, &line, serial, &spki, now, ttl, &rng)?;
            write_atomically(&out, &token, 0o644)?;
            println!(
                "token for serial {serial} (line {line}, valid {ttl} s) written to {}",
                out.display()
            );
            Ok(())
        }
    }
}
