//! `simulator`: proves Imprint at factory scale on one machine.
//!
//! By default it starts an embedded CA (a child process running this same binary as
//! `simulator ca-server serve`) on a sled store in a temporary folder, runs N virtual devices
//! through keygen, factory token, enrollment and verification over real sockets, shows a live
//! view, verifies the CA's store afterwards, and writes a report.

mod ceiling;
mod devices;
mod embedded;
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
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    eprintln!("measuring this machine's crypto ceiling ...");
    let ceiling = ceiling::measure(300, cli.algorithm, cli.ca_algorithm)?;
    eprintln!("starting the embedded CA ({}) ...", cli.ca_algorithm);
    let (mut ca, lines) = embedded::start(
        cli.devices,
        cli.ca_algorithm,
        cli.ca_verify_own_signatures,
        now,
    )?;
    let profile = CertProfile::from_ca_der(&ca.ca_der).map_err(|e| e.to_string())?;
    let url = CaUrl::parse(&format!("https://{}", ca.https)).map_err(|e| e.to_string())?;
    let client = HttpsClient::new(url, &ca.ca_der).map_err(|e| e.to_string())?;
    let coap_url = CaUrl::parse(&format!("coap://{}", ca.coap)).map_err(|e| e.to_string())?;
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
        now,
    });
    let progress = Arc::new(Progress::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
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
    let start = Instant::now();
    let (outcome, throughput) = rt.block_on(async {
        let ticker_progress = progress.clone();
        let ticker_bar = bar.clone();
        let ticker = tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            let mut n = 0u64;
            loop {
                tick.tick().await;
                let done = ticker_progress.done.load(Ordering::Relaxed);
                let failed = ticker_progress.failed.load(Ordering::Relaxed);
                ticker_bar.set_position(done + failed);
                ticker_bar.set_message(format!("failed {failed}"));
                n += 1;
                if n.is_multiple_of(5) {
                    samples.push((start.elapsed().as_secs_f64(), done));
                }
            }
        });
        let outcome = devices::run(fleet.clone(), progress.clone()).await;
        ticker.abort();
        let samples = ticker.await.err().map(|_| Vec::new()).unwrap_or_default();
        (outcome, samples)
    });
    let wall = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let (ca_peak, ca_cpu) = ca.usage();
    ca.stop()?;
    let store_bytes = report::dir_size(&ca.dir.store());
    let verification = verify::verify(
        &ca.dir.store(),
        &ca.ca_der,
        &outcome.received,
        !cli.no_secrets,
    )?;
    let (sim_peak, sim_cpu) = embedded::process_usage(std::process::id());
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
        store_bytes_per_device: store_bytes as f64 / verification.records.max(1) as f64,
        verification,
    };
    let path = report.write(&cli.report)?;
    print!("{}", report.summary());
    println!("report: {}", path.display());
    Ok(report.verification.ok && failed == 0)
}
