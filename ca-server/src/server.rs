//! Starting and stopping a CA server from a CA folder.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use protocol_spec::token::TokenPolicy;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{CaDir, Config};
use crate::issuer::Issuer;
use crate::service::{CaService, Clock, SystemClock};
use crate::store::Store;

/// Listener overrides from the command line.
#[derive(Debug, Clone, Default)]
pub struct ListenOverrides {
    /// `--https`.
    pub https: Option<SocketAddr>,
    /// `--coap`.
    pub coap: Option<SocketAddr>,
    /// `--mtls`.
    pub mtls: Option<SocketAddr>,
    /// `--admin`.
    pub admin: Option<SocketAddr>,
    /// `--no-admin`: no admin listener, whatever the configuration says.
    pub no_admin: bool,
}

/// A running server.
#[derive(Debug)]
pub struct RunningServer {
    /// Where HTTPS listens (the real port when 0 was asked for).
    pub https: Option<SocketAddr>,
    /// Where CoAP listens.
    pub coap: Option<SocketAddr>,
    /// Where the mutual-TLS secrets door listens.
    pub mtls: Option<SocketAddr>,
    /// Where the admin API listens.
    pub admin: Option<SocketAddr>,
    /// CoAP counters.
    pub coap_stats: Arc<crate::doors::coap::CoapStats>,
    /// The service (for tests and metrics).
    pub service: Arc<CaService>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningServer {
    /// The line `serve` prints once listening, e.g.
    /// `ca-server: listening https=127.0.0.1:8443 coap=127.0.0.1:5683`.
    pub fn listening_line(&self) -> String {
        let mut s = String::from("ca-server: listening");
        if let Some(a) = self.https {
            s += &format!(" https={a}");
        }
        if let Some(a) = self.coap {
            s += &format!(" coap={a}");
        }
        if let Some(a) = self.mtls {
            s += &format!(" mtls={a}");
        }
        if let Some(a) = self.admin {
            s += &format!(" admin={a}");
        }
        s
    }

    /// Stops accepting and waits for the listeners to finish.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Opens the CA folder and starts the configured listeners.
pub async fn start(dir: &CaDir, overrides: &ListenOverrides) -> Result<RunningServer, String> {
    start_with_clock(dir, overrides, Arc::new(SystemClock)).await
}

/// [`start`] with an injected clock.
pub async fn start_with_clock(
    dir: &CaDir,
    overrides: &ListenOverrides,
    clock: Arc<dyn Clock>,
) -> Result<RunningServer, String> {
    let config: Config = dir.load_config()?;
    let ca_key = crate::issuer::load_ca_key(dir, &config)?;
    let ca_pem = std::fs::read_to_string(dir.ca_cert())
        .map_err(|e| format!("{}: {e}", dir.ca_cert().display()))?;
    let ca_der = protocol_spec::profile::cert_from_pem(&ca_pem)
        .ok_or_else(|| format!("{}: no CERTIFICATE", dir.ca_cert().display()))?;
    let issuer = Issuer::new(ca_key, &ca_der)
        .map_err(|e| format!("{}: {e}", dir.ca_cert().display()))?
        .with_signature_check(config.issuer.verify_own_signatures);
    if !config.issuer.verify_own_signatures {
        tracing::warn!(
            "[issuer] verify_own_signatures = false: certificates are linted without checking \
             the CA's own signature (no guard against a faulty signer)"
        );
    }
    let secrets = crate::issuer::load_secret_keys(dir, &config)?;
    let store: Arc<dyn Store> =
        crate::store::open_sealing(dir, &config.store, secrets.audit_key())?;
    let policy = TokenPolicy {
        max_clock_skew: config.token.max_clock_skew,
        max_lifetime: config.token.max_lifetime,
    };
    // The audit chain is sealed by the audit key (SPEC.md 11.9). The CA folder records from
    // which entry on; a chain that ends unsealed past it was written without the key.
    let sealed_from = crate::audit::read_sealed_from(dir)?;
    let last = store
        .last_audit()
        .map_err(|e| format!("the newest audit entry: {e}"))?;
    if let (Some(k), Some(e)) = (sealed_from, &last)
        && e.mac.is_none()
        && e.seq >= k
    {
        return Err(format!(
            "the audit chain ends in entry {} without a MAC, though {} records it sealed \
             from entry {k} on: the store was written by someone without the audit key (run \
             `ca-server audit verify --dir {}`)",
            e.seq,
            dir.audit_sealed().display(),
            dir.root().display()
        ));
    }
    let service = Arc::new(CaService::new(issuer, secrets, store, policy, clock)?);
    if sealed_from.is_none() {
        let first_sealed = match &last {
            None => 1,
            Some(e) if e.mac.is_some() => e.seq,
            Some(e) => {
                // A chain written before the audit key existed: one sealed entry now, whose
                // MAC covers the chain as it stands.
                service
                    .record_event(
                        "audit-key",
                        None,
                        "ca",
                        format!(
                            "the audit key seals every entry from here; entries 1 to {} were \
                             written before it",
                            e.seq
                        ),
                    )
                    .await
                    .map_err(|e| format!("sealing the audit chain: {e}"))?;
                tracing::info!(
                    entries = e.seq,
                    "audit chain written before the audit key: sealed from here on"
                );
                e.seq + 1
            }
        };
        crate::audit::write_sealed_from(dir, first_sealed)?;
    }
    let sealed_from = crate::audit::read_sealed_from(dir)?;
    let (shutdown, rx) = watch::channel(false);
    let mut tasks = Vec::new();
    config
        .limits
        .check()
        .map_err(|e| format!("{}: {e}", dir.config().display()))?;
    warn_if_slots_exceed_open_files(&config.limits, overrides);
    let timeout = Duration::from_secs(config.limits.request_timeout_secs.max(1));
    // One rate per source address for every device door, HTTPS and CoAP alike.
    let rate = Arc::new(crate::limits::SourceRate::new(
        config.limits.rate_per_source,
        config.limits.rate_burst_per_source,
        config.limits.rate_sources,
    ));

    // The HTTPS server's key, for the three TLS doors: a file, or sealed by the CA's token.
    let server_key = crate::tls::ServerKey::for_folder(dir, &config)?;
    let https_addr = overrides.https.or(config.listen.https);
    let mut https = None;
    if let Some(addr) = https_addr {
        let tls = crate::tls::https_server_config(&dir.tls_cert(), &server_key)?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("HTTPS {addr}: {e}"))?;
        https = Some(listener.local_addr().map_err(|e| e.to_string())?);
        tasks.push(tokio::spawn(crate::doors::http::serve(
            listener,
            tls,
            Arc::new(crate::doors::enroll_https::EnrollDoor::new(service.clone())),
            service.metrics().clone(),
            crate::doors::http::DoorLimits {
                slots: crate::limits::Slots::new(
                    config.limits.max_connections_per_source,
                    config.limits.max_connections,
                ),
                timeout,
                rate: Some(rate.clone()),
                handshake_cost: config.limits.rate_handshake_cost,
            },
            rx.clone(),
        )));
    }
    let coap_stats = Arc::new(crate::doors::coap::CoapStats::default());
    let mut coap = None;
    if let Some(addr) = overrides.coap.or(config.listen.coap) {
        let socket = tokio::net::UdpSocket::bind(addr)
            .await
            .map_err(|e| format!("CoAP {addr}: {e}"))?;
        coap = Some(socket.local_addr().map_err(|e| e.to_string())?);
        tasks.push(tokio::spawn(crate::doors::coap::serve(
            socket,
            service.clone(),
            config.limits.coap(),
            coap_stats.clone(),
            rate.clone(),
            rx.clone(),
        )));
    }
    let mut mtls = None;
    if let Some(addr) = overrides.mtls.or(config.listen.mtls) {
        let tls = crate::tls::mtls_server_config(
            &dir.ca_cert(),
            &dir.tls_cert(),
            &server_key,
            service.revocations().clone(),
        )?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("mutual TLS {addr}: {e}"))?;
        mtls = Some(listener.local_addr().map_err(|e| e.to_string())?);
        tasks.push(tokio::spawn(crate::doors::http::serve(
            listener,
            tls,
            Arc::new(crate::doors::secrets::SecretsDoor::new(service.clone())),
            service.metrics().clone(),
            crate::doors::http::DoorLimits {
                slots: crate::limits::Slots::new(
                    config.limits.max_connections_per_source,
                    config.limits.max_connections,
                ),
                timeout,
                rate: Some(rate.clone()),
                handshake_cost: config.limits.rate_handshake_cost,
            },
            rx.clone(),
        )));
    }
    let mut admin = None;
    if let Some(addr) = overrides
        .admin
        .or(config.listen.admin)
        .filter(|_| !overrides.no_admin)
    {
        crate::operators::ensure_operator_ca(
            dir,
            &crate::operators::OperatorCaKey::for_config(dir, &config)?,
            service.now(),
        )?;
        let tls =
            crate::tls::admin_server_config(&dir.operator_ca_cert(), &dir.tls_cert(), &server_key)?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("admin {addr}: {e}"))?;
        admin = Some(listener.local_addr().map_err(|e| e.to_string())?);
        // The admin door's rate per source is its own: device traffic from an address never
        // uses up an operator's.
        let admin_rate = Arc::new(crate::limits::SourceRate::new(
            config.limits.admin_rate_per_source,
            config.limits.admin_rate_burst_per_source,
            config.limits.rate_sources,
        ));
        let ctx = crate::doors::admin::AdminContext {
            coap: coap_stats.clone(),
            operators_issued: dir.root().join("operators.issued"),
            audit_sealed_from: sealed_from,
        };
        tasks.push(tokio::spawn(crate::doors::http::serve(
            listener,
            tls,
            Arc::new(crate::doors::admin::AdminDoor::new(service.clone(), ctx)),
            service.metrics().clone(),
            crate::doors::http::DoorLimits {
                slots: crate::limits::Slots::new(
                    config.limits.admin_max_connections_per_source,
                    config.limits.admin_max_connections,
                ),
                timeout,
                rate: Some(admin_rate),
                handshake_cost: config.limits.rate_handshake_cost,
            },
            rx.clone(),
        )));
    }
    if service.store().shared() {
        let every = Duration::from_millis(config.store.refresh_ms.unwrap_or(500).max(10));
        tasks.push(tokio::spawn(refresh_shared_state(
            service.clone(),
            every,
            rx.clone(),
        )));
    }
    Ok(RunningServer {
        https,
        coap,
        mtls,
        admin,
        coap_stats,
        service,
        shutdown,
        tasks,
    })
}

/// Every `every`, reads again the state other nodes on the shared store may have changed
/// ([`CaService::refresh_shared_state`]), until shutdown. A failure is logged once until a read
/// succeeds again; the node keeps serving on what it last read (its doors read the store for
/// each device anyway).
async fn refresh_shared_state(
    service: Arc<CaService>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    // A node not seen for three intervals (or a second, whichever is longer) no longer counts
    // among those sharing each line's rate.
    let window = (every * 3).max(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => {
                let s = service.clone();
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || s.leave()).await {
                    tracing::warn!(error = %e, "could not say on the store that this node stops");
                }
                return;
            }
        }
        let s = service.clone();
        match tokio::task::spawn_blocking(move || s.refresh_shared_state(window)).await {
            Ok(Ok(changed)) => {
                if changed {
                    tracing::info!(
                        "revocations changed on the shared store; CRL to be signed again"
                    );
                }
                if failing {
                    tracing::info!("shared state read again");
                    failing = false;
                }
            }
            Ok(Err(e)) if !failing => {
                tracing::warn!(error = %e, "reading the shared state failed; retrying");
                failing = true;
            }
            Ok(Err(_)) => {}
            Err(_) => return,
        }
    }
}

/// Descriptors the process needs beside its connections (store files, database connections,
/// sockets, logs), counted generously.
const OTHER_DESCRIPTORS: u64 = 256;

/// Warns when the doors' connection slots together could use up the process's open-file limit:
/// then a flood at a device door could leave the admin door unable to accept (EMFILE), whatever
/// its own slots say.
fn warn_if_slots_exceed_open_files(limits: &crate::config::Limits, overrides: &ListenOverrides) {
    let device_doors = 2u64; // HTTPS enrollment and mutual TLS, at most
    let admin = if overrides.no_admin {
        0
    } else {
        limits.admin_max_connections as u64
    };
    let needed = (limits.max_connections as u64)
        .saturating_mul(device_doors)
        .saturating_add(admin)
        .saturating_add(OTHER_DESCRIPTORS);
    let Some(soft) = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| open_files_limit(&t))
    else {
        return;
    };
    if soft < needed {
        tracing::warn!(
            open_files = soft,
            needed,
            "the doors' connection slots ([limits] max_connections for each device door, \
             admin_max_connections) and {OTHER_DESCRIPTORS} other descriptors exceed the \
             open-file limit: a flood could keep the admin door from accepting; raise the limit \
             (ulimit -n, LimitNOFILE=) or lower max_connections"
        );
    }
}

/// The soft "Max open files" of a `/proc/PID/limits` text (`None` when unlimited or absent).
fn open_files_limit(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok())
}

/// Parses [`RunningServer::listening_line`]: the address of each listener by name.
pub fn parse_listening_line(line: &str) -> Option<std::collections::BTreeMap<String, SocketAddr>> {
    let rest = line.trim().strip_prefix("ca-server: listening")?;
    rest.split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::setup::{self, InitOptions};
    use protocol_spec::KeyAlgorithm;

    /// `[issuer] verify_own_signatures` in config.toml reaches the issuer the server runs, both
    /// ways (what the issuer then does with it: `issuer::tests`).
    #[tokio::test]
    async fn the_issuer_runs_with_the_configured_signature_check() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CaDir::new(tmp.path().join("ca"));
        setup::init(
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
        let quiet = ListenOverrides {
            no_admin: true,
            ..ListenOverrides::default()
        };
        for (config, want) in [
            ("", true),
            ("[issuer]\nverify_own_signatures = true\n", true),
            ("[issuer]\nverify_own_signatures = false\n", false),
        ] {
            // Only the listeners the test needs: no HTTPS on the default port.
            let text = format!("[listen]\nhttps = \"127.0.0.1:0\"\n{config}");
            std::fs::write(dir.config(), text).unwrap();
            let server = start(&dir, &quiet).await.unwrap();
            assert_eq!(
                server.service.issuer().verifies_own_signatures(),
                want,
                "{config:?}"
            );
            server.stop().await;
        }
    }

    #[test]
    fn the_open_file_limit_is_read_from_proc_limits() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max processes             63445                63445                processes \n\
                    Max open files            1024                 524288               files     \n";
        assert_eq!(open_files_limit(text), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(open_files_limit(unlimited), None);
        assert!(open_files_limit(&std::fs::read_to_string("/proc/self/limits").unwrap()).is_some());
    }

    /// Revoking a revoked device again changes nothing, and counts nothing.
    #[tokio::test]
    async fn a_second_revocation_of_a_device_is_not_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CaDir::new(tmp.path().join("ca"));
        setup::init(
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
        {
            let store = crate::store::SledStore::open(&dir.store()).unwrap();
            store
                .add_line(&crate::store::test_support::line(10), "test")
                .unwrap();
            store
                .apply_enrollment(&crate::store::test_support::enrollment(1, 1, 1))
                .unwrap();
            store.sync().unwrap();
        }
        std::fs::write(dir.config(), "[listen]\nhttps = \"127.0.0.1:0\"\n").unwrap();
        // Written without the audit key, as by a build before it: the CA folder must not
        // record the chain as sealed (the server seals it when it starts).
        std::fs::remove_file(dir.audit_sealed()).unwrap();
        let quiet = ListenOverrides {
            no_admin: true,
            ..ListenOverrides::default()
        };
        let server = start(&dir, &quiet).await.unwrap();
        let revocations = |server: &RunningServer| {
            let text = server
                .service
                .metrics()
                .encode(&crate::metrics::Snapshot::default())
                .unwrap();
            text.lines()
                .find_map(|l| l.strip_prefix("imprint_revocations_total "))
                .map(str::to_string)
        };
        assert_eq!(revocations(&server).as_deref(), Some("0"));
        for _ in 0..2 {
            let rec = server.service.revoke(1, "test").await.unwrap().unwrap();
            assert_eq!(rec.status, crate::records::DeviceStatus::Revoked);
        }
        assert_eq!(revocations(&server).as_deref(), Some("1"));
        // No such device: nothing counted either.
        assert!(server.service.revoke(2, "test").await.unwrap().is_none());
        assert_eq!(revocations(&server).as_deref(), Some("1"));
        server.stop().await;
    }
}
