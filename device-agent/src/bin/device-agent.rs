//! `device-agent`: a device's first power-on, enrollment and inspection.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand, ValueEnum};
use device_agent::AgentError;
use device_agent::coap::CoapClient;
use device_agent::enroll::{accept_response, build_request};
use device_agent::https::HttpsClient;
use device_agent::retry::{self, Backoff};
use device_agent::state::DeviceState;
use device_agent::url::{CaUrl, Scheme};
use protocol_spec::messages::ResponseForm;
use protocol_spec::profile::{CertProfile, cert_from_pem, cert_pem};
use protocol_spec::{DeviceSerial, KeyAlgorithm};
use ring::rand::SystemRandom;
use zeroize::Zeroizing;

/// Prints a line, and ends the command quietly when the reader went away (`| head`), as Unix
/// tools do, instead of panicking on the broken pipe.
macro_rules! say {
    ($($arg:tt)*) => {
        out(&format!("{}\n", format_args!($($arg)*)))?
    };
}

/// [`say`] without the newline.
macro_rules! say_raw {
    ($($arg:tt)*) => {
        out(&format!($($arg)*))?
    };
}

/// Imprint device agent: a device's key, enrollment, certificate and secret.
#[derive(Parser, Debug)]
#[command(name = "device-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Form {
    /// The whole certificate.
    Full,
    /// CA key id and signature; the agent rebuilds the certificate.
    Compact,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// First power-on: generate the device key pair into a new state file (mode 0600) and print
    /// the public key (PEM) for the line station.
    Keygen {
        /// The state file to create.
        #[arg(long)]
        state: PathBuf,
        /// The device serial.
        #[arg(long)]
        serial: DeviceSerial,
        /// Key algorithm.
        #[arg(long, default_value = "ed25519", value_parser = parse_alg)]
        algorithm: KeyAlgorithm,
    },
    /// Enroll with the CA using a factory token; verifies the certificate against the pinned
    /// CA certificate and the device key before storing it.
    Enroll {
        /// The state file.
        #[arg(long)]
        state: PathBuf,
        /// The factory token (raw COSE_Sign1 bytes from `line-station attest`).
        #[arg(long)]
        token: PathBuf,
        /// The CA certificate (PEM) this device trusts.
        #[arg(long = "ca-cert")]
        ca_cert: PathBuf,
        /// The CA: https://HOST:PORT (or coap://HOST:PORT).
        #[arg(long)]
        url: String,
        /// Response form (default: full over HTTPS, compact over CoAP, which fits one datagram).
        #[arg(long, value_enum)]
        form: Option<Form>,
        /// Attempts in all before giving up on transient failures.
        #[arg(long, default_value_t = 8)]
        attempts: u32,
    },
    /// Fetch the device's secret over mutual TLS (certificate and key from the state file),
    /// check its key check value, store it, and acknowledge it.
    Secret {
        /// The state file.
        #[arg(long)]
        state: PathBuf,
        /// The CA's mutual-TLS door: https://HOST:PORT.
        #[arg(long)]
        url: String,
    },
    /// Pick up a rotated secret (the same exchange as `secret`; says when nothing changed).
    Sync {
        /// The state file.
        #[arg(long)]
        state: PathBuf,
        /// The CA's mutual-TLS door: https://HOST:PORT.
        #[arg(long)]
        url: String,
    },
    /// Show what the device holds (never a secret, and the private key only when asked with
    /// --key-pem).
    Show {
        /// The state file.
        #[arg(long)]
        state: PathBuf,
        /// Print the certificate as PEM only.
        #[arg(long, conflicts_with = "key_pem")]
        pem: bool,
        /// Print the device's private key as PKCS#8 PEM only, for tools that take a key file
        /// (`curl --key`). It is the device's identity: keep the output as private as the
        /// state file (mode 0600).
        #[arg(long = "key-pem")]
        key_pem: bool,
    },
    /// Write the device's provisioning record (SPEC.md section 13): everything it must keep
    /// after enrolling, in about 100 bytes (mode 0600: it holds the private key).
    ExportRecord {
        /// The state file of an enrolled device.
        #[arg(long)]
        state: PathBuf,
        /// Where to write the record.
        #[arg(long)]
        out: PathBuf,
    },
    /// Rebuild a whole state from a provisioning record and the CA certificate the device was
    /// built with: the key pair, and the certificate byte for byte (checked under the CA key).
    /// The secret is fetched again with `secret`.
    ImportRecord {
        /// The provisioning record.
        #[arg(long)]
        record: PathBuf,
        /// The CA certificate (PEM or DER).
        #[arg(long = "ca-cert")]
        ca_cert: PathBuf,
        /// The state file to create (refused if it exists).
        #[arg(long)]
        state: PathBuf,
    },
    /// AES DUKPT (ANSI X9.24-3-2017) on the device side, from the Initial Key the device holds:
    /// print the KSN of transaction COUNTER and the KCV of its working key (never a key), to
    /// compare with `ca-server dukpt derive --ksn KSN` on the host side.
    Dukpt {
        /// The state file.
        #[arg(long)]
        state: PathBuf,
        /// The transaction counter: decimal, or hex with 0x (from 1, at most 16 one bits).
        #[arg(long, value_parser = parse_counter)]
        counter: u32,
        /// The working key's usage: pin-encryption (default), mac-generation,
        /// mac-verification, mac-both-ways, data-encrypt, data-decrypt, data-both-ways,
        /// key-encryption.
        #[arg(long, default_value = "pin-encryption")]
        usage: String,
        /// The working key's type: aes-128 or aes-256 (default: the Initial Key's).
        #[arg(long = "key-type")]
        key_type: Option<String>,
    },
    /// Build an enrollment request (CBOR, as CoAP carries it) from a factory token and a CSR
    /// made elsewhere (e.g. by openssl), for enrolling by hand with a generic CoAP client.
    Request {
        /// The factory token (raw COSE_Sign1 bytes from `line-station attest`).
        #[arg(long)]
        token: PathBuf,
        /// The device's CSR (PEM or DER).
        #[arg(long)]
        csr: PathBuf,
        /// Response form to ask for.
        #[arg(long, value_enum, default_value = "full")]
        form: Form,
        /// Where to write the request.
        #[arg(long)]
        out: PathBuf,
    },
}

/// The device key as PKCS#8 PEM that OpenSSL (and so curl) reads: an Ed25519 key is a
/// version 1 document (RFC 8410 section 7: the seed only), as `KeyPair` keeps it, also when the
/// state file holds ring's version 2 (OpenSSL 3 refuses its public key field).
fn interoperable_key_pem(key: &protocol_spec::KeyPair) -> Result<Zeroizing<String>, AgentError> {
    Ok(key.to_pem())
}

/// Writes `text` to stdout; a reader that went away ends the process with status 0.
fn out(text: &str) -> Result<(), AgentError> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(AgentError::Invalid(format!("standard output: {e}"))),
    }
}

fn parse_alg(s: &str) -> Result<KeyAlgorithm, String> {
    KeyAlgorithm::from_name(s).ok_or_else(|| format!("{s:?} is not ed25519 or p256"))
}

fn parse_counter(s: &str) -> Result<u32, String> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?} is not a 32-bit counter: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("device-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn read(path: &PathBuf) -> Result<Vec<u8>, AgentError> {
    std::fs::read(path).map_err(|e| AgentError::io(path, e))
}

fn run(cli: Cli) -> Result<(), AgentError> {
    let rng = SystemRandom::new();
    match cli.command {
        Command::Keygen {
            state,
            serial,
            algorithm,
        } => {
            let s = DeviceState::generate(serial, algorithm, &rng)?;
            s.create(&state)?;
            say_raw!("{}", s.public_key().to_pem());
            Ok(())
        }
        Command::Enroll {
            state,
            token,
            ca_cert,
            url,
            form,
            attempts,
        } => {
            let mut s = DeviceState::load(&state, &rng)?;
            let ca_text = String::from_utf8(read(&ca_cert)?)
                .map_err(|_| AgentError::Invalid(format!("{}: not PEM text", ca_cert.display())))?;
            let ca_der = cert_from_pem(&ca_text).ok_or_else(|| {
                AgentError::Invalid(format!("{}: no CERTIFICATE", ca_cert.display()))
            })?;
            let ca = CertProfile::from_ca_der(&ca_der)
                .map_err(|e| AgentError::Invalid(format!("{}: {e}", ca_cert.display())))?;
            if let Some(cert) = &s.certificate {
                let again = protocol_spec::messages::EnrollResponse::Full {
                    certificate: cert.clone(),
                };
                accept_response(&s, &ca, &again)?;
                say!(
                    "serial {} is already enrolled with this CA; nothing to do",
                    s.serial
                );
                return Ok(());
            }
            let url = CaUrl::parse(&url)?;
            let form = match (form, url.scheme) {
                (Some(Form::Compact), _) | (None, Scheme::Coap) => ResponseForm::Compact,
                (Some(Form::Full), _) | (None, Scheme::Https) => ResponseForm::Full,
            };
            let token_bytes = read(&token)?;
            let request = build_request(&s, &token_bytes, form, &rng)?.to_cbor();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| AgentError::Transport(e.to_string()))?;
            let backoff = Backoff {
                max_attempts: attempts.max(1),
                ..Backoff::default()
            };
            let response = match url.scheme {
                Scheme::Https => {
                    let client = HttpsClient::new(url, &ca_der)?;
                    rt.block_on(retry::run(backoff, |_| client.enroll(request.clone())))?
                }
                Scheme::Coap => {
                    let client = CoapClient::new(url);
                    rt.block_on(retry::run(backoff, |_| client.enroll_once(request.clone())))?
                }
            };
            let cert = accept_response(&s, &ca, &response)?;
            s.certificate = Some(cert);
            s.ca_certificate = Some(ca_der);
            s.enrolled_at = Some(now());
            s.save(&state)?;
            say!(
                "serial {} enrolled; certificate stored in {}",
                s.serial,
                state.display()
            );
            Ok(())
        }
        Command::Secret { state, url } | Command::Sync { state, url } => {
            let mut s = DeviceState::load(&state, &rng)?;
            let url = CaUrl::parse(&url)?;
            if url.scheme != Scheme::Https {
                return Err(AgentError::Invalid(
                    "secrets are served over mutual TLS: use https://".into(),
                ));
            }
            let client = device_agent::secrets::mtls_client(url, &s)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| AgentError::Transport(e.to_string()))?;
            let outcome = rt.block_on(async {
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    match device_agent::secrets::sync(&client, &mut s, |st| st.save(&state)).await {
                        Err(e) if e.is_transient() && attempt < 8 => {
                            tokio::time::sleep(
                                Backoff::default().delay(attempt, 0.5).unwrap_or_default(),
                            )
                            .await;
                        }
                        other => break other,
                    }
                }
            })?;
            match outcome {
                device_agent::secrets::SyncOutcome::Stored { key_id, version } => {
                    say!("stored and acknowledged secret {key_id} version {version}")
                }
                device_agent::secrets::SyncOutcome::UpToDate { version } => {
                    say!("up to date: version {version}")
                }
            }
            Ok(())
        }
        Command::ExportRecord { state, out: path } => {
            let s = DeviceState::load(&state, &rng)?;
            let record = device_agent::record::export(&s, &rng)?;
            device_agent::state::write_atomically(&path, &record, 0o600)?;
            say!(
                "provisioning record of serial {} written to {} ({} bytes)",
                s.serial,
                path.display(),
                record.len()
            );
            Ok(())
        }
        Command::ImportRecord {
            record,
            ca_cert,
            state,
        } => {
            let bytes = Zeroizing::new(read(&record)?);
            let ca = read(&ca_cert)?;
            let ca_der = match std::str::from_utf8(&ca).ok().and_then(cert_from_pem) {
                Some(der) => der,
                None => ca,
            };
            let s = device_agent::record::import(&bytes, &ca_der, &rng)
                .map_err(|e| AgentError::Invalid(format!("{}: {e}", record.display())))?;
            s.create(&state)?;
            say!(
                "serial {} rebuilt from {} into {}",
                s.serial,
                record.display(),
                state.display()
            );
            Ok(())
        }
        Command::Request {
            token,
            csr,
            form,
            out: path,
        } => {
            let request = protocol_spec::messages::EnrollRequest {
                token: read(&token)?,
                csr: device_agent::line_station::csr_der(&read(&csr)?)?,
                form: match form {
                    Form::Full => ResponseForm::Full,
                    Form::Compact => ResponseForm::Compact,
                },
            };
            std::fs::write(&path, request.to_cbor()).map_err(|e| AgentError::io(&path, e))?;
            say!("enrollment request written to {}", path.display());
            Ok(())
        }
        Command::Dukpt {
            state,
            counter,
            usage,
            key_type,
        } => {
            let s = DeviceState::load(&state, &rng)?;
            let usage: protocol_spec::dukpt::KeyUsage =
                usage.parse().map_err(AgentError::Invalid)?;
            let key_type = key_type
                .map(|t| {
                    protocol_spec::dukpt::KeyType::from_name(&t).ok_or_else(|| {
                        AgentError::Invalid(format!("key type {t:?} is not aes-128 or aes-256"))
                    })
                })
                .transpose()?;
            let (ksn, kcv) = s.dukpt_transaction(counter, usage, key_type)?;
            let (ik, _) = s.dukpt_initial_key()?;
            say!("ksn {ksn}");
            say!(
                "kcv {} ({} {} working key, counter {})",
                hex::encode_upper(kcv),
                usage.name(),
                key_type.unwrap_or(ik.key_type()).name(),
                ksn.counter
            );
            Ok(())
        }
        Command::Show {
            state,
            pem,
            key_pem,
        } => {
            let s = DeviceState::load(&state, &rng)?;
            if key_pem {
                // Straight from a zeroized buffer, not through a formatted copy.
                out(interoperable_key_pem(&s.key)?.as_str())?;
                return Ok(());
            }
            if pem {
                let cert = s.certificate.as_ref().ok_or_else(|| {
                    AgentError::Invalid(format!("serial {} is not enrolled yet", s.serial))
                })?;
                say_raw!("{}", cert_pem(cert));
                return Ok(());
            }
            say!("serial:      {}", s.serial);
            say!("algorithm:   {}", s.key.algorithm());
            say!("key sha256:  {}", hex::encode(s.key_hash()));
            match (&s.certificate, s.enrolled_at) {
                (Some(cert), at) => {
                    say!(
                        "enrolled:    yes (at {})",
                        at.map(|t| t.to_string()).unwrap_or_default()
                    );
                    if let Ok((_, c)) = x509_parser::parse_x509_certificate(cert) {
                        say!("issuer:      {}", c.issuer());
                        say!("subject:     {}", c.subject());
                        say!("not before:  {}", c.validity().not_before);
                    }
                    say_raw!("{}", cert_pem(cert));
                }
                (None, _) => say!("enrolled:    no"),
            }
            for sec in &s.secrets {
                say!(
                    "secret:      {} version {} {} kcv {}{} {}",
                    sec.key_id,
                    sec.version,
                    sec.algorithm,
                    hex::encode(&sec.kcv),
                    sec.initial_key_id
                        .map(|id| format!(" initial key id {}", hex::encode_upper(id)))
                        .unwrap_or_default(),
                    if sec.acknowledged {
                        "acknowledged"
                    } else {
                        "not acknowledged"
                    }
                );
            }
            Ok(())
        }
    }
}
