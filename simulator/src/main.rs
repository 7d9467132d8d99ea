//! `simulator`: proves Imprint at factory scale on one machine.
//!
//! By default it starts an embedded CA (a child process running this same binary as
//! `simulator ca-server serve`) on a sled store in a temporary folder, runs N virtual devices
//! through keygen, factory token, enrollment and verification over real sockets, shows a live
//! view, verifies the CA's store afterwards, and writes a report.

mod ceiling;
mod devices;
mod embedded;
mod html;
mod relay;
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
use device_agent::url::CaUrl;
use indicatif::{ProgressBar, ProgressStyle};
use protocol_spec::KeyAlgorithm;
use protocol_spec::profile::CertProfile;

use crate::devices::{Fleet, PHASES, Progress};
use crate::report::{PhaseLatency, Report, Usage};

/// Runs virtual devices end to end against a CA and reports.
#[derive(Parser, Debug)]
#[command(name = "simulator", version, about)]
struct Cli {
    /// Number of virtual devices.
    #[arg(long, default_value_t = 100_000)]
    devices: u64,
    /// Enrollment transport.
    #[arg(long, value_enum, default_value_t = Transport::Coap)]
    transport: Transport,
    /// Device key algorithm.
    #[arg(long, default_value = "ed25519", value_parser = parse_alg)]
    algorithm: KeyAlgorithm,
    /// CA key algorithm of the embedded CA.
    #[arg(long = "ca-algorithm", default_value = "ed25519", value_parser = parse_alg)]
    ca_algorithm: KeyAlgorithm,
    /// Tasks stepping devices (devices in flight at once).
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Whether the embedded CA verifies its own signature on every certificate (the lint's
    /// fault guard; costs one verification per device).
    #[arg(long = "ca-verify-own-signatures", default_value_t = true, action = clap::ArgAction::Set)]
    ca_verify_own_signatures: bool,
    /// Where to write the report.
    #[arg(long, default_value = "simulator-report")]
    report: PathBuf,
    /// Drop this share of datagrams in each direction (CoAP only), e.g. 0.3.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Kill the CA with SIGKILL every SECONDS and restart it; devices retry, and the
    /// verification pass must still find nothing lost and nothing duplicated.
    #[arg(long = "kill-ca-every", value_name = "SECONDS")]
    kill_ca_every: Option<f64>,
    /// Skip the secret phases (mutual-TLS fetch and acknowledgement).
    #[arg(long)]
    no_secrets: bool,
    /// Hide the live view (for logs and CI).
    #[arg(long)]
    quiet: bool,
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

fn run(cli: Cli) -> Result<bool, String> {
    if cli.devices == 0 {
        return Err("--devices must be at least 1".into());
    }
    if !(0.0..1.0).contains(&cli.loss) {
        return Err("--loss must be at least 0 and below 1".into());
    }
    if cli.loss > 0.0 && cli.transport != Transport::Coap {
        return Err("--loss applies to datagrams: use it with --transport coap".into());
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    eprintln!("measuring this machine's crypto ceiling ...");
    let ceiling = ceiling::measure(
        300,
        cli.algorithm,
        cli.ca_algorithm,
        ceiling::Handshakes {
            https: cli.transport == Transport::Https,
            mtls: !cli.no_secrets,
        },
    )?;
    eprintln!("starting the embedded CA ({}) ...", cli.ca_algorithm);
    let (ca, lines) = embedded::start(
        cli.devices,
        cli.ca_algorithm,
        cli.ca_verify_own_signatures,
        now,
    )?;
    let profile = CertProfile::from_ca_der(&ca.ca_der).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let url = CaUrl::parse(&format!("https://{}", ca.https)).map_err(|e| e.to_string())?;
    let client = HttpsClient::new(url, &ca.ca_der).map_err(|e| e.to_string())?;
    let coap_addr = if cli.loss > 0.0 {
        rt.block_on(relay::start(ca.coap, cli.loss))?
    } else {
        ca.coap
    };
    let coap_url = CaUrl::parse(&format!("coap://{coap_addr}")).map_err(|e| e.to_string())?;
    let mtls_url = CaUrl::parse(&format!("https://{}", ca.mtls)).map_err(|e| e.to_string())?;
    let fleet = Arc::new(Fleet {
        devices: cli.devices,
        algorithm: cli.algorithm,
        concurrency: cli.concurrency,
        client,
        coap: (cli.transport == Transport::Coap).then(|| CoapClient::new(coap_url)),
        profile,
        ca_der: ca.ca_der.clone(),
        secrets: (!cli.no_secrets).then_some(mtls_url),
        lines,
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
    let (ca_store, ca_der) = (ca.dir.store(), ca.ca_der.clone());
    let ca = Arc::new(std::sync::Mutex::new(ca));
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
        let killer = cli.kill_ca_every.map(|every| {
            let (ca, bar) = (ca.clone(), bar.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs_f64(every.max(0.1)));
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let ca = ca.clone();
                    let r = tokio::task::spawn_blocking(move || match ca.lock() {
                        Ok(mut ca) => ca.kill_and_restart(),
                        Err(_) => Err("CA handle poisoned".to_string()),
                    })
                    .await;
                    match r {
                        Ok(Ok(())) => bar.println("CA killed with SIGKILL and restarted"),
                        Ok(Err(e)) => bar.println(format!("CA restart failed: {e}")),
                        Err(_) => return,
                    }
                }
            })
        });
        let outcome = devices::run(fleet.clone(), progress.clone()).await;
        ticker.abort();
        if let Some(k) = killer {
            k.abort();
            let _ = k.await;
        }
        outcome
    });
    let wall = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let mut ca = match Arc::try_unwrap(ca) {
        Ok(m) => m
            .into_inner()
            .map_err(|_| "CA handle poisoned".to_string())?,
        Err(_) => return Err("the CA handle is still shared".into()),
    };
    let (ca_peak, ca_cpu) = ca.usage();
    // The simulator's own figures cover the device phases; the verification pass that follows
    // opens the whole store in this process and would dominate them.
    let (sim_peak, sim_cpu) = embedded::process_usage(std::process::id());
    let ca_restarts = ca.restarts;
    ca.stop()?;
    let throughput =
        std::mem::take(&mut *samples.lock().map_err(|_| "samples poisoned".to_string())?);
    let store_bytes = report::dir_size(&ca_store);
    let verification = verify::verify(&ca_store, &ca_der, &outcome.received, !cli.no_secrets)?;
    let ok = progress.done.load(Ordering::Relaxed);
    let failed = progress.failed.load(Ordering::Relaxed);
    let rate = ok as f64 / wall.max(1e-9);
    let mut config = BTreeMap::new();
    config.insert("devices".into(), cli.devices.to_string());
    config.insert(
        "transport".into(),
        match cli.transport {
            Transport::Https => "https".into(),
            Transport::Coap => "coap".into(),
        },
    );
    config.insert("algorithm".into(), cli.algorithm.to_string());
    config.insert("ca_algorithm".into(), cli.ca_algorithm.to_string());
    config.insert("concurrency".into(), cli.concurrency.to_string());
    config.insert("secrets".into(), (!cli.no_secrets).to_string());
    config.insert("loss".into(), cli.loss.to_string());
    config.insert(
        "kill_ca_every".into(),
        cli.kill_ca_every
            .map(|s| s.to_string())
            .unwrap_or_else(|| "never".into()),
    );
    config.insert(
        "ca_verify_own_signatures".into(),
        cli.ca_verify_own_signatures.to_string(),
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
        ca: Usage {
            peak_memory_bytes: ca_peak,
            cpu_seconds: ca_cpu,
        },
        store_bytes,
        ca_restarts,
        store_bytes_per_device: store_bytes as f64 / verification.records.max(1) as f64,
        verification,
    };
    let path = report.write(&cli.report)?;
    print!("{}", report.summary());
    println!("report: {} (and report.json beside it)", path.display());
    Ok(report.verification.ok && failed == 0)
}
