//! The embedded CA: a child process (this same binary, `simulator ca-server ...`) on a sled
//! store in a temporary folder, or one or more such node processes on a PostgreSQL database in
//! a schema of their own made for the run and dropped after it, so that their memory and CPU
//! are measured apart and each can be killed and restarted.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use ca_server::config::{CaDir, StoreSettings};
use ca_server::setup::{self, InitOptions};
use ca_server::store::{PgConfig, PgStore, Store};
use protocol_spec::{KeyAlgorithm, KeyPair, PublicKey};
use ring::rand::SystemRandom;

use crate::line::{LineStation, Lines};

/// Serials each registered line covers, as on a real floor.
pub const SERIALS_PER_LINE: u64 = 100_000;

/// The CA's node processes and their folder.
pub struct EmbeddedCa {
    _tmp: tempfile::TempDir,
    /// The CA folder.
    pub dir: CaDir,
    /// The CA certificate, DER.
    pub ca_der: Vec<u8>,
    /// The nodes: one on sled, one or more on PostgreSQL.
    pub nodes: Vec<Node>,
    /// The run's own PostgreSQL schema, dropped with the CA.
    pg: Option<PgConfig>,
    /// Times a node was killed and restarted.
    pub restarts: u64,
}

/// One `ca-server serve` process of the embedded CA.
pub struct Node {
    /// Its `--node-id`.
    pub name: String,
    /// HTTPS address.
    pub https: SocketAddr,
    /// CoAP address.
    pub coap: SocketAddr,
    /// Mutual-TLS secrets address.
    pub mtls: SocketAddr,
    child: Child,
    /// Times this node was killed and restarted.
    pub restarts: u64,
    earlier_peak: u64,
    earlier_cpu: f64,
}

impl Node {
    /// Peak memory (the largest of every incarnation) and CPU seconds (all incarnations).
    pub fn usage(&self) -> (u64, f64) {
        let (peak, cpu) = process_usage(self.child.id());
        (peak.max(self.earlier_peak), cpu + self.earlier_cpu)
    }
}

/// The BDK id of the embedded CA's generated DUKPT BDK (`--secret-source dukpt`).
pub const SIM_BDK_ID: &str = "51A0B0D1";

/// Creates the CA folder, registers one line per [`SERIALS_PER_LINE`] serials, starts `nodes`
/// node processes. With `store` (`[store]` settings with a url), the records go to that PostgreSQL database, in
/// a new schema named for this run (its `schema` setting is ignored);
/// without, on sled, which one process at a time can hold: `nodes` must be 1. With `dukpt`, the CA
/// gets a generated AES-256 BDK ([`SIM_BDK_ID`]) and every line is a DUKPT line under it.
pub fn start(
    devices: u64,
    nodes: usize,
    ca_algorithm: KeyAlgorithm,
    verify_own_signatures: bool,
    now: u64,
    store: Option<StoreSettings>,
    dukpt: bool,
) -> Result<(EmbeddedCa, Lines), String> {
    if nodes == 0 || (nodes > 1 && store.is_none()) {
        return Err(
            "--nodes above 1 needs --store postgresql://... (sled is held by one process)".into(),
        );
    }
    let tmp = tempfile::Builder::new()
        .prefix("imprint-sim-")
        .tempdir()
        .map_err(|e| format!("temporary folder: {e}"))?;
    let dir = CaDir::new(tmp.path().join("ca"));
    let rng = SystemRandom::new();
    let store = match store {
        Some(mut s) => {
            let mut tag = [0u8; 4];
            ring::rand::SecureRandom::fill(&rng, &mut tag).map_err(|_| "no random bytes")?;
            s.schema = Some(format!(
                "imprint_sim_{}_{}",
                std::process::id(),
                hex::encode(tag)
            ));
            s
        }
        None => StoreSettings::default(),
    };
    setup::init(
        &dir,
        &InitOptions {
            algorithm: ca_algorithm,
            name: "Imprint Simulator CA".into(),
            tls_names: vec![],
            now: now.saturating_sub(3600),
            store: store.clone(),
            ca_key: Default::default(),
        },
    )?;
    let pg = ca_server::store::pg_config(&dir, &store)?;
    set_signature_check(&dir, verify_own_signatures)?;
    let mut lines = Vec::new();
    {
        let store = ca_server::store::open(&dir, &store)?;
        let store: &dyn Store = &*store;
        let source = if dukpt {
            let keys = ca_server::secrets::SecretKeys::load(&dir.kek())?;
            let request = ca_server::dukpt::AddBdk {
                bdk_id: SIM_BDK_ID.into(),
                generate: true,
                algorithm: Some("aes-256".into()),
                key: None,
            };
            let id = ca_server::dukpt::parse_bdk_id(SIM_BDK_ID).map_err(|e| e.to_string())?;
            let bdk = ca_server::dukpt::key_of(&request, &keys).map_err(|e| e.to_string())?;
            ca_server::dukpt::add_bdk(store, &keys, id, &bdk, now, "simulator")
                .map_err(|e| e.to_string())?;
            ca_server::records::SecretSource::Dukpt(id)
        } else {
            ca_server::records::SecretSource::Random
        };
        let mut first = 1;
        let mut n = 0;
        while first <= devices.max(1) {
            n += 1;
            let key = KeyPair::generate(KeyAlgorithm::Ed25519, &rng).map_err(|e| e.to_string())?;
            let id = format!("line-{n:03}");
            let last = first + SERIALS_PER_LINE - 1;
            let mut rec = ca_server::lines::new_line(
                &id,
                &PublicKey::from(&key).to_pem(),
                (first, last),
                None,
                now,
            )?;
            rec.secret_source = source;
            store
                .add_line(&rec, "simulator")
                .map_err(|e| e.to_string())?;
            lines.push(LineStation {
                id,
                key,
                first,
                last,
            });
            first = last + 1;
        }
    }
    let pem = std::fs::read_to_string(dir.ca_cert()).map_err(|e| e.to_string())?;
    let ca_der = protocol_spec::profile::cert_from_pem(&pem).ok_or("CA certificate unreadable")?;
    let any: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut ca = EmbeddedCa {
        _tmp: tmp,
        dir,
        ca_der,
        nodes: Vec::new(),
        pg,
        restarts: 0,
    };
    for k in 1..=nodes {
        let name = format!("sim-node-{k}");
        let (child, https, coap, mtls) = spawn(ca.dir.root(), &name, [any, any, any])?;
        ca.nodes.push(Node {
            name,
            https,
            coap,
            mtls,
            child,
            restarts: 0,
            earlier_peak: 0,
            earlier_cpu: 0.0,
        });
    }
    Ok((ca, Lines::new(lines)))
}

/// Writes `[issuer] verify_own_signatures` into the CA folder's config.toml, which the CA child
/// applies when it starts (`ca_server::server`).
fn set_signature_check(dir: &CaDir, verify_own_signatures: bool) -> Result<(), String> {
    let mut config = dir.load_config()?;
    config.issuer.verify_own_signatures = verify_own_signatures;
    let text = toml::to_string_pretty(&config).map_err(|e| e.to_string())?;
    std::fs::write(dir.config(), text).map_err(|e| format!("{}: {e}", dir.config().display()))
}

fn spawn(
    dir: &Path,
    node: &str,
    at: [SocketAddr; 3],
) -> Result<(Child, SocketAddr, SocketAddr, SocketAddr), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args([
            "ca-server",
            "serve",
            "--https",
            &at[0].to_string(),
            "--coap",
            &at[1].to_string(),
        ])
        .args([
            "--mtls",
            &at[2].to_string(),
            "--admin",
            "127.0.0.1:0",
            "--node-id",
            node,
            "--dir",
        ])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting the CA: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout from the CA")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| format!("reading the CA's address: {e}"))?;
    let addrs = ca_server::server::parse_listening_line(&line).unwrap_or_default();
    match (addrs.get("https"), addrs.get("coap"), addrs.get("mtls")) {
        (Some(h), Some(c), Some(m)) => Ok((child, *h, *c, *m)),
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!(
                "the CA did not report its three listeners: {line:?}"
            ))
        }
    }
}

/// Resets this process's peak resident memory (VmHWM) to its current size (Linux 4.0 and
/// later, `/proc/self/clear_refs`), so that a later reading is the peak of what ran since.
/// False when the kernel did not allow it: a later reading is then the whole process's peak.
pub fn reset_peak_memory() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak resident memory (VmHWM) and CPU seconds (user + system) of a process, from /proc.
pub fn process_usage(pid: u32) -> (u64, f64) {
    let hwm = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0);
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may contain spaces) start at ") ".
            let rest = s.rsplit_once(") ")?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / 100.0)
        })
        .unwrap_or(0.0);
    (hwm, cpu)
}

impl EmbeddedCa {
    /// Peak memory (the largest of any node's incarnations) and CPU seconds (every node, every
    /// incarnation) of the CA so far.
    pub fn usage(&self) -> (u64, f64) {
        self.nodes
            .iter()
            .map(Node::usage)
            .fold((0, 0.0), |(p, c), (np, nc)| (p.max(np), c + nc))
    }

    /// Kills a node with SIGKILL, as a power cut would (a node drawn at random when there are
    /// several), and starts it again on the same addresses and store. Returns its name.
    pub fn kill_and_restart(&mut self) -> Result<String, String> {
        let k = if self.nodes.len() > 1 {
            let mut b = [0u8; 4];
            ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut b)
                .map_err(|_| "no random bytes")?;
            u32::from_le_bytes(b) as usize % self.nodes.len()
        } else {
            0
        };
        let root = self.dir.root().to_path_buf();
        let node = self.nodes.get_mut(k).ok_or("no node to kill")?;
        let (peak, cpu) = node.usage();
        let _ = node.child.kill();
        node.child.wait().map_err(|e| e.to_string())?;
        node.earlier_peak = peak;
        node.earlier_cpu = cpu;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match spawn(&root, &node.name, [node.https, node.coap, node.mtls]) {
                Ok((child, ..)) => {
                    node.child = child;
                    node.restarts += 1;
                    self.restarts += 1;
                    return Ok(node.name.clone());
                }
                // A port may take a moment to be free again.
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Opens the CA's store (stopped CA: sled allows one process), to verify it.
    pub fn open_store(&self) -> Result<std::sync::Arc<dyn Store>, String> {
        let config = self.dir.load_config()?;
        ca_server::store::open(&self.dir, &config.store)
    }

    /// Where the records are, for the report: "sled" or the database and schema.
    pub fn store_name(&self) -> String {
        match &self.pg {
            None => "sled".into(),
            Some(c) => format!(
                "PostgreSQL {} schema {}",
                ca_server::store::postgres::redact(&c.url),
                c.schema
            ),
        }
    }

    /// Bytes the store takes: the sled folder's files, or the run's tables with their indexes.
    pub fn store_bytes(&self, store: &dyn Store) -> Result<u64, String> {
        match &self.pg {
            None => Ok(ca_server::store::dir_size(&self.dir.store())),
            Some(_) => store.size_on_disk().map_err(|e| e.to_string()),
        }
    }

    /// Stops every node with SIGTERM and waits for them.
    pub fn stop(&mut self) -> Result<(), String> {
        for node in &self.nodes {
            let _ = Command::new("kill")
                .args(["-TERM", &node.child.id().to_string()])
                .status();
        }
        for node in &mut self.nodes {
            node.child.wait().map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

impl Drop for EmbeddedCa {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
        if let Some(c) = &self.pg
            && let Err(e) = PgStore::drop_schema(c)
        {
            eprintln!("simulator: dropping the run's schema {}: {e}", c.schema);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    /// `--ca-verify-own-signatures` reaches the CA folder's config.toml both ways (the server
    /// applies what that file says: `ca_server::server::tests`).
    #[test]
    fn the_signature_check_flag_reaches_the_ca_config() {
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
        for on in [false, true, false] {
            set_signature_check(&dir, on).unwrap();
            assert_eq!(dir.load_config().unwrap().issuer.verify_own_signatures, on);
        }
    }
}
