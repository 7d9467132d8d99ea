//! `simulator`: proves Imprint at factory scale on one machine.
//!
//! By default it starts an embedded CA (a child process running this same binary as
//! `simulator ca-server serve`) on a sled store in a temporary folder, runs N virtual devices
//! through keygen, factory token, enrollment and verification over real sockets, shows a live
//! view, verifies the CA's store afterwards, and writes a report. With `--ca URL...` it runs
//! the devices against a CA that runs elsewhere, playing line stations registered there, and
//! the verification pass is device-side.

mod ceiling;
mod devices;
mod embedded;
mod html;
mod killer;
mod line;
mod relay;
mod remote;
mod report;
mod verify;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use device_agent::coap::CoapClient;
use device_agent::https::HttpsClient;
use device_agent::url::{CaUrl, Scheme};
use indicatif::{ProgressBar, ProgressStyle};
use protocol_spec::KeyAlgorithm;
use protocol_spec::profile::CertProfile;

use crate::devices::{Enrollment, Fleet, PHASES, Progress};
use crate::embedded::EmbeddedCa;
use crate::remote::{RemoteArgs, RemoteCa};
use crate::report::{NodeUsage, PassUsage, PhaseLatency, Report, Usage, Verdict};
use crate::verify::Verification;

/// Runs virtual devices end to end against a CA and reports.
#[derive(Parser, Debug)]
#[command(name = "simulator", version, about)]
struct Cli {
    /// Number of virtual devices.
    #[arg(long, default_value_t = 100_000)]
    devices: u64,
    /// Enrollment transport [default: coap; with --ca, the scheme of its URLs].
    #[arg(long, value_enum)]
    transport: Option<Transport>,
    /// Device key algorithm.
    #[arg(long, default_value = "ed25519", value_parser = parse_alg)]
    algorithm: KeyAlgorithm,
    /// CA key algorithm of the embedded CA [default: ed25519].
    #[arg(long = "ca-algorithm", value_parser = parse_alg)]
    ca_algorithm: Option<KeyAlgorithm>,
    /// Tasks stepping devices (devices in flight at once).
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Whether the embedded CA verifies its own signature on every certificate (the lint's
    /// fault guard; costs one verification per device) [default: true].
    #[arg(long = "ca-verify-own-signatures", action = clap::ArgAction::Set)]
    ca_verify_own_signatures: Option<bool>,
    /// Put the embedded CA's records in this PostgreSQL database instead of a sled folder:
    /// postgresql://USER@HOST:PORT/DB (no password in it: IMPRINT_STORE_PASSWORD or
    /// --store-password-file). The run makes a schema of its own there and drops it at the end.
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// With --store: a file holding the database password (mode 0600).
    #[arg(long = "store-password-file", value_name = "FILE")]
    store_password_file: Option<PathBuf>,
    /// With --store: the PEM CA certificate of the database server (TLS, server verified).
    #[arg(long = "store-ca-file", value_name = "CA.pem")]
    store_ca_file: Option<PathBuf>,
    /// Run against a CA that runs elsewhere instead of an embedded one: the enrollment
    /// endpoint of a CA node, coap://HOST:PORT or https://HOST:PORT (the scheme sets the
    /// transport). Repeat it for several nodes: devices are spread over them round robin.
    #[arg(long = "ca", value_name = "URL")]
    ca: Vec<String>,
    /// The remote CA's secrets door (`ca-server serve --mtls`), https://HOST:PORT; required
    /// with --ca unless --no-secrets. Repeatable, round robin like --ca.
    #[arg(long, value_name = "URL")]
    mtls: Vec<String>,
    /// The remote CA's certificate (ca.pem), which the devices pin; required with --ca.
    #[arg(long = "ca-cert", value_name = "CA.pem")]
    ca_cert: Option<PathBuf>,
    /// A line station to play against the remote CA: its key, from `line-station keygen`.
    /// Repeatable; the k-th --line-key goes with the k-th --line-id and --serials.
    #[arg(long = "line-key", value_name = "LINE.key")]
    line_key: Vec<PathBuf>,
    /// The line's id, as registered on the remote CA with `ca-server line add --id`.
    #[arg(long = "line-id", value_name = "ID")]
    line_id: Vec<String>,
    /// The line's serial range, as registered (`ca-server line add --serials`); devices take
    /// these serials in order, so --devices must fit in them.
    #[arg(long, value_name = "FIRST-LAST")]
    serials: Vec<String>,
    /// Where to write the report.
    #[arg(long, default_value = "simulator-report")]
    report: PathBuf,
    /// Drop this share of datagrams in each direction (CoAP only), e.g. 0.3: a relay sits in
    /// front of the CA's CoAP address (of each node, with --ca).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Start this many embedded CA nodes on the one database (needs --store); devices are
    /// spread over them round robin, for enrollment and for secrets.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Kill an embedded CA node with SIGKILL every SECONDS (one drawn at random with --nodes)
    /// and restart it; devices retry, and the verification pass must still find nothing lost
    /// and nothing duplicated (not with --ca).
    #[arg(
        long = "kill-node-every",
        alias = "kill-ca-every",
        value_name = "SECONDS"
    )]
    kill_node_every: Option<f64>,
    /// Skip the secret phases (mutual-TLS fetch and acknowledgement).
    #[arg(long)]
    no_secrets: bool,
    /// Where the embedded CA's lines take each device's secret: random (the CSPRNG), or dukpt
    /// (the CA gets a generated AES-256 DUKPT BDK and every line is a DUKPT line: each device
    /// receives its Initial Key, and the verification pass derives every one again from the
    /// BDK).
    #[arg(long = "secret-source", value_enum, default_value = "random")]
    secret_source: SimSecretSource,
    /// Hide the live view (for logs and CI).
    #[arg(long)]
    quiet: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum SimSecretSource {
    /// The CA's CSPRNG.
    Random,
    /// AES DUKPT Initial Keys under a BDK the embedded CA generates.
    Dukpt,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Transport {
    /// HTTPS, a new TLS connection per device.
    Https,
    /// CoAP over UDP.
    Coap,
}

fn parse_alg(s: &str) -> Result<KeyAlgorithm, String> {
    KeyAlgorithm::from_name(s).ok_or_else(|| format!("{s:?} is not ed25519 or p256"))
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // The embedded CA runs as this binary's hidden `ca-server` subcommand.
    if args.get(1).is_some_and(|a| a == "ca-server") {
        return ca_server::cli::main_with_args(args[1..].iter().cloned());
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("simulator: {e}");
            ExitCode::from(2)
        }
    }
}

/// Where the CA is: started here, or running elsewhere.
enum CaMode {
    /// The embedded CA, with its key algorithm and whether it verifies its own signatures.
    Embedded(KeyAlgorithm, bool),
    /// A CA that runs elsewhere.
    Remote(Box<RemoteCa>),
}

impl CaMode {
    /// Reads the CA flags; flags of the other mode are refused by name.
    fn from_cli(cli: &Cli) -> Result<Self, String> {
        if cli.ca.is_empty() {
            let remote_only = [
                ("--mtls", !cli.mtls.is_empty()),
                ("--ca-cert", cli.ca_cert.is_some()),
                ("--line-key", !cli.line_key.is_empty()),
                ("--line-id", !cli.line_id.is_empty()),
                ("--serials", !cli.serials.is_empty()),
            ];
            if cli.store.is_none()
                && let Some(flag) = [
                    ("--store-password-file", cli.store_password_file.is_some()),
                    ("--store-ca-file", cli.store_ca_file.is_some()),
                ]
                .iter()
                .find(|(_, given)| *given)
                .map(|(f, _)| f)
            {
                return Err(format!("{flag} goes with --store URL"));
            }
            if let Some((flag, _)) = remote_only.iter().find(|(_, given)| *given) {
                return Err(format!(
                    "{flag} describes a remote CA: use it with --ca URL (without --ca the \
                     simulator starts its own CA)"
                ));
            }
            return Ok(CaMode::Embedded(
                cli.ca_algorithm.unwrap_or(KeyAlgorithm::Ed25519),
                cli.ca_verify_own_signatures.unwrap_or(true),
            ));
        }
        if cli.store.is_some() {
            return Err(
                "--store sets the embedded CA's database; a CA that runs elsewhere has its own \
                 (its config.toml [store]): drop --ca or --store"
                    .into(),
            );
        }
        if cli.secret_source == SimSecretSource::Dukpt {
            return Err(
                "--secret-source dukpt sets up the embedded CA's BDK and lines; a CA that runs \
                 elsewhere has its own lines (`ca-server line add --secret-source dukpt:BDKID`): \
                 drop --ca or --secret-source"
                    .into(),
            );
        }
        if cli.nodes != 1 {
            return Err(
                "--nodes starts embedded CA nodes; a CA that runs elsewhere has its own: drop \
                 --ca or --nodes (repeat --ca for each remote node)"
                    .into(),
            );
        }
        if cli.kill_node_every.is_some() {
            return Err(
                "--kill-node-every needs the embedded CA (the simulator kills and restarts a CA it \
                 started, not one that runs elsewhere): drop --ca or --kill-node-every"
                    .into(),
            );
        }
        if cli.ca_algorithm.is_some() {
            return Err(
                "--ca-algorithm applies to the embedded CA; with --ca the CA's algorithm is the \
                 one of --ca-cert"
                    .into(),
            );
        }
        if cli.ca_verify_own_signatures.is_some() {
            return Err(
                "--ca-verify-own-signatures applies to the embedded CA; with --ca set \
                 verify_own_signatures in that CA's config.toml"
                    .into(),
            );
        }
        let remote = RemoteCa::from_args(&RemoteArgs {
            ca: &cli.ca,
            mtls: &cli.mtls,
            ca_cert: cli.ca_cert.as_deref(),
            transport: cli.transport.map(|t| match t {
                Transport::Https => Scheme::Https,
                Transport::Coap => Scheme::Coap,
            }),
            secrets: !cli.no_secrets,
            devices: cli.devices,
            line_keys: &cli.line_key,
            line_ids: &cli.line_id,
            serials: &cli.serials,
        })?;
        Ok(CaMode::Remote(Box::new(remote)))
    }
}

/// What the devices need from the CA side, and the embedded CA when there is one.
struct Setup {
    embedded: Option<EmbeddedCa>,
    enrollment: Enrollment,
    secrets: Vec<CaUrl>,
    lines: line::Lines,
    ca_der: Vec<u8>,
    ca_algorithm: KeyAlgorithm,
    spread_sources: bool,
    /// The CA as the report's configuration names it.
    ca_name: String,
}

fn run(cli: Cli) -> Result<bool, String> {
    if cli.devices == 0 {
        return Err("--devices must be at least 1".into());
    }
    if !(0.0..1.0).contains(&cli.loss) {
        return Err("--loss must be at least 0 and below 1".into());
    }
    if cli.nodes == 0 || (cli.nodes > 1 && cli.store.is_none() && cli.ca.is_empty()) {
        return Err(
            "--nodes above 1 needs --store postgresql://... (sled is held by one process)".into(),
        );
    }
    let mode = CaMode::from_cli(&cli)?;
    let transport = match &mode {
        CaMode::Remote(r) => match r.scheme {
            Scheme::Https => Transport::Https,
            Scheme::Coap => Transport::Coap,
        },
        CaMode::Embedded(..) => cli.transport.unwrap_or(Transport::Coap),
    };
    if cli.loss > 0.0 && transport != Transport::Coap {
        return Err("--loss applies to datagrams: use it with --transport coap".into());
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let ca_algorithm = match &mode {
        CaMode::Embedded(alg, _) => *alg,
        CaMode::Remote(r) => r.profile.ca_public_key().algorithm,
    };
    if let CaMode::Remote(remote) = &mode {
        eprintln!("checking the remote CA ({}) ...", remote.name());
        rt.block_on(remote.preflight())?;
    }
    eprintln!("measuring this machine's crypto ceiling ...");
    let ceiling = ceiling::measure(
        300,
        cli.algorithm,
        ca_algorithm,
        ceiling::Handshakes {
            https: transport == Transport::Https,
            mtls: !cli.no_secrets,
        },
    )?;
    let setup = match mode {
        CaMode::Embedded(alg, verify_own) => {
            eprintln!("starting the embedded CA ({alg}) ...");
            embedded_setup(&cli, &rt, transport, alg, verify_own, now)?
        }
        CaMode::Remote(remote) => remote_setup(&cli, &rt, *remote)?,
    };
    let Setup {
        embedded,
        enrollment,
        secrets,
        lines,
        ca_der,
        ca_algorithm,
        spread_sources,
        ca_name,
    } = setup;
    let remote = embedded.is_none();
    let profile = CertProfile::from_ca_der(&ca_der).map_err(|e| e.to_string())?;
    let fleet = Arc::new(Fleet {
        devices: cli.devices,
        algorithm: cli.algorithm,
        concurrency: cli.concurrency,
        enrollment,
        profile,
        ca_der: ca_der.clone(),
        secrets,
        lines,
        spread_sources,
        device_checks: remote,
    });
    let progress = Arc::new(Progress::default());
    let bar = if cli.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(cli.devices)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} devices {per_sec} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let ca = embedded.map(|ca| Arc::new(std::sync::Mutex::new(ca)));
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let start = Instant::now();
    let outcome = rt.block_on(async {
        let (ticker_progress, ticker_bar, ticker_samples) =
            (progress.clone(), bar.clone(), samples.clone());
        let ticker = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            let mut n = 0u64;
            loop {
                tick.tick().await;
                let done = ticker_progress.done.load(Ordering::Relaxed);
                let failed = ticker_progress.failed.load(Ordering::Relaxed);
                ticker_bar.set_position(done + failed);
                ticker_bar.set_message(format!("failed {failed}"));
                n += 1;
                if n.is_multiple_of(5)
                    && let Ok(mut s) = ticker_samples.lock()
                {
                    s.push((start.elapsed().as_secs_f64(), done));
                }
            }
        });
        let killer = cli.kill_node_every.zip(ca.clone()).map(|(every, ca)| {
            let bar = bar.clone();
            killer::Killer::start(every, ca, move |m| bar.println(m))
        });
        let outcome = devices::run(fleet.clone(), progress.clone()).await;
        ticker.abort();
        if let Some(k) = killer {
            k.stop().await;
        }
        outcome
    });
    let wall = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    // The simulator's own figures cover the device phases; the verification pass that follows
    // opens the whole store in this process and would dominate them.
    // The stopped CA lives until the pass has read its store (dropping it removes the
    // temporary folder).
    let stopped = match ca {
        Some(ca) => {
            let mut ca = match Arc::try_unwrap(ca) {
                Ok(m) => m
                    .into_inner()
                    .map_err(|_| "CA handle poisoned".to_string())?,
                Err(_) => return Err("the CA handle is still shared".into()),
            };
            let (peak_memory_bytes, cpu_seconds) = ca.usage();
            let nodes: Vec<NodeUsage> = ca
                .nodes
                .iter()
                .map(|n| {
                    let (peak_memory_bytes, cpu_seconds) = n.usage();
                    NodeUsage {
                        node: n.name.clone(),
                        peak_memory_bytes,
                        cpu_seconds,
                        restarts: n.restarts,
                    }
                })
                .collect();
            ca.stop()?;
            Some((
                Usage {
                    peak_memory_bytes,
                    cpu_seconds,
                },
                nodes,
                ca,
            ))
        }
        None => None,
    };
    let (sim_peak, sim_cpu) = embedded::process_usage(std::process::id());
    let throughput =
        std::mem::take(&mut *samples.lock().map_err(|_| "samples poisoned".to_string())?);
    // The pass's own peak: the kernel's high-water mark is reset to the current size first
    // (the device phases' peak was read just above).
    let pass_start = Instant::now();
    let peak_reset_before_pass = embedded::reset_peak_memory();
    let (verification, store_bytes, store_bytes_per_device) = match &stopped {
        Some((_, _, ca)) => {
            let store = ca.open_store()?;
            let bytes = ca.store_bytes(&*store)?;
            let kek = ca_server::secrets::SecretKeys::load(&ca.dir.kek())?;
            let v =
                verify::verify_store(&*store, &ca_der, &kek, &outcome.received, !cli.no_secrets)?;
            let per_device = bytes as f64 / v.records.max(1) as f64;
            (Verification::Store(v), Some(bytes), Some(per_device))
        }
        None => (
            Verification::DeviceSide(verify::verify_devices(&outcome.evidence, !cli.no_secrets)),
            None,
            None,
        ),
    };
    let verification_pass = PassUsage {
        seconds: pass_start.elapsed().as_secs_f64(),
        peak_memory_bytes: embedded::process_usage(std::process::id()).0,
        peak_reset_before_pass,
    };
    let ok = progress.done.load(Ordering::Relaxed);
    let failed = progress.failed.load(Ordering::Relaxed);
    let verdict = Verdict::of(
        cli.devices,
        ok,
        &outcome.errors,
        &outcome.worker_faults,
        &verification,
    );
    let rate = ok as f64 / wall.max(1e-9);
    let mut config = BTreeMap::new();
    config.insert("devices".into(), cli.devices.to_string());
    config.insert(
        "transport".into(),
        match transport {
            Transport::Https => "https".into(),
            Transport::Coap => "coap".into(),
        },
    );
    config.insert("ca".into(), ca_name);
    config.insert("algorithm".into(), cli.algorithm.to_string());
    config.insert("ca_algorithm".into(), ca_algorithm.to_string());
    config.insert("concurrency".into(), cli.concurrency.to_string());
    config.insert("secrets".into(), (!cli.no_secrets).to_string());
    config.insert(
        "secret_source".into(),
        match cli.secret_source {
            SimSecretSource::Random => "random".into(),
            SimSecretSource::Dukpt => "dukpt".into(),
        },
    );
    config.insert("loss".into(), cli.loss.to_string());
    config.insert("nodes".into(), fleet.enrollment.nodes().to_string());
    config.insert(
        "kill_node_every".into(),
        cli.kill_node_every
            .map(|s| s.to_string())
            .unwrap_or_else(|| "never".into()),
    );
    config.insert(
        "ca_verify_own_signatures".into(),
        match (remote, cli.ca_verify_own_signatures) {
            (true, _) => "set by the remote CA".into(),
            (false, v) => v.unwrap_or(true).to_string(),
        },
    );
    let mut throughput = throughput;
    throughput.push((wall, ok));
    let report = Report {
        config,
        wall_seconds: wall,
        devices_ok: ok,
        devices_failed: failed,
        devices_per_second: rate,
        throughput,
        phases: PHASES
            .iter()
            .zip(&outcome.phases)
            .filter(|(_, h)| !h.is_empty())
            .map(|(n, h)| (n.to_string(), PhaseLatency::of(h)))
            .collect(),
        errors: outcome.errors,
        fraction_of_ceiling: rate / ceiling.devices_per_second,
        ceiling,
        simulator: Usage {
            peak_memory_bytes: sim_peak,
            cpu_seconds: sim_cpu,
        },
        ca_restarts: stopped.as_ref().map_or(0, |(_, _, ca)| ca.restarts),
        ca_nodes: stopped
            .as_ref()
            .map(|(_, nodes, _)| nodes.clone())
            .unwrap_or_default(),
        ca: stopped.map(|(usage, _, _)| usage),
        store_bytes,
        store_bytes_per_device,
        verification,
        verification_pass,
        worker_faults: outcome.worker_faults,
        verdict,
    };
    let path = report.write(&cli.report)?;
    print!("{}", report.summary());
    if remote && report.errors.contains_key("serial-taken") {
        println!(
            "note: the remote CA had already enrolled some of these serials (an earlier run?): \
             give --serials a range no run has used"
        );
    }
    println!("report: {} (and report.json beside it)", path.display());
    Ok(report.verdict.passed)
}

/// Starts the embedded CA and points the devices at it (through the loss relay, if any).
fn embedded_setup(
    cli: &Cli,
    rt: &tokio::runtime::Runtime,
    transport: Transport,
    ca_algorithm: KeyAlgorithm,
    verify_own_signatures: bool,
    now: u64,
) -> Result<Setup, String> {
    let store = cli.store.as_ref().map(|url| {
        let absolute = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
        ca_server::config::StoreSettings {
            url: Some(url.clone()),
            password_file: cli.store_password_file.as_ref().map(absolute),
            ca_file: cli.store_ca_file.as_ref().map(absolute),
            schema: None,
            refresh_ms: None,
        }
    });
    let (ca, lines) = embedded::start(
        cli.devices,
        cli.nodes,
        ca_algorithm,
        verify_own_signatures,
        now,
        store,
        cli.secret_source == SimSecretSource::Dukpt,
    )?;
    let enrollment = match transport {
        Transport::Https => Enrollment::Https(
            ca.nodes
                .iter()
                .map(|n| {
                    let url =
                        CaUrl::parse(&format!("https://{}", n.https)).map_err(|e| e.to_string())?;
                    HttpsClient::new(url, &ca.ca_der).map_err(|e| e.to_string())
                })
                .collect::<Result<_, String>>()?,
        ),
        Transport::Coap => {
            let mut clients = Vec::new();
            for n in &ca.nodes {
                let addr = if cli.loss > 0.0 {
                    rt.block_on(relay::start(n.coap, cli.loss))?
                } else {
                    n.coap
                };
                let url = CaUrl::parse(&format!("coap://{addr}")).map_err(|e| e.to_string())?;
                clients.push(CoapClient::new(url));
            }
            Enrollment::Coap(clients)
        }
    };
    let mtls = ca
        .nodes
        .iter()
        .map(|n| CaUrl::parse(&format!("https://{}", n.mtls)).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Setup {
        enrollment,
        secrets: if cli.no_secrets { vec![] } else { mtls },
        lines,
        ca_der: ca.ca_der.clone(),
        ca_algorithm,
        spread_sources: true,
        ca_name: format!("embedded, records in {}", ca.store_name()),
        embedded: Some(ca),
    })
}

/// Points the devices at a remote CA (CoAP through one loss relay per node, if any).
fn remote_setup(
    cli: &Cli,
    rt: &tokio::runtime::Runtime,
    remote: RemoteCa,
) -> Result<Setup, String> {
    let ca_name = remote.name();
    // The addresses devices open connections to, to know whether they may spread their
    // source addresses over loopback.
    let mut targets: Vec<std::net::SocketAddr> = remote.secrets.iter().map(|(_, a)| *a).collect();
    let enrollment = match remote.scheme {
        Scheme::Https => {
            targets.extend(remote.enroll.iter().map(|(_, a)| *a));
            Enrollment::Https(
                remote
                    .enroll
                    .iter()
                    .map(|(u, _)| HttpsClient::new(u.clone(), &remote.ca_der))
                    .collect::<Result<_, _>>()
                    .map_err(|e| e.to_string())?,
            )
        }
        Scheme::Coap => {
            let mut clients = Vec::new();
            for (url, addr) in &remote.enroll {
                if cli.loss > 0.0 {
                    let front = rt.block_on(relay::start(*addr, cli.loss))?;
                    targets.push(front);
                    let url =
                        CaUrl::parse(&format!("coap://{front}")).map_err(|e| e.to_string())?;
                    clients.push(CoapClient::new(url));
                } else {
                    targets.push(*addr);
                    clients.push(CoapClient::new(url.clone()));
                }
            }
            Enrollment::Coap(clients)
        }
    };
    let spread_sources = targets.iter().all(remote::on_loopback);
    if !spread_sources {
        eprintln!(
            "note: the CA is not on 127.0.0.0/8, so devices connect from this machine's own \
             address (its ephemeral ports bound the HTTPS and mutual-TLS connection rate)"
        );
    }
    Ok(Setup {
        embedded: None,
        enrollment,
        secrets: remote.secrets.into_iter().map(|(u, _)| u).collect(),
        lines: remote.lines,
        ca_algorithm: remote.profile.ca_public_key().algorithm,
        ca_der: remote.ca_der,
        spread_sources,
        ca_name,
    })
}
