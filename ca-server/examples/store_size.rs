//! Where the store's bytes go: fills a fresh sled store the way the simulator's devices do
//! (enroll, then version 1 of the secret delivered, then its acknowledgement; each step in
//! group commits of `--batch` devices), without network or TLS, and prints the logical bytes
//! (key + value lengths) per tree and per device beside the bytes on disk.
//!
//! `cargo run --release -p ca-server --example store_size -- --devices 100000`
//! `cargo run --release -p ca-server --example store_size -- --inspect PATH` (an existing store)

use std::collections::BTreeMap;
use std::path::Path;

use ca_server::records::SecretRecord;
use ca_server::secrets::SecretKeys;
use ca_server::store::{NewEnrollment, SecretOp, SecretOutcome, SledStore, Store};
use protocol_spec::profile::{CertProfile, new_ca_certificate};
use protocol_spec::{DeviceSerial, KeyAlgorithm, KeyPair, PublicKey};
use ring::rand::{SecureRandom, SystemRandom};

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if let Some(path) = arg("--inspect") {
        let store = SledStore::open(Path::new(&path)).map_err(|e| e.to_string())?;
        let devices = store.devices().count() as u64;
        print_trees(&store, devices)?;
        return Ok(());
    }
    let devices: u64 = arg("--devices")
        .unwrap_or_else(|| "100000".into())
        .parse()
        .map_err(|e| format!("--devices: {e}"))?;
    let batch: u64 = arg("--batch")
        .unwrap_or_else(|| "256".into())
        .parse()
        .map_err(|e| format!("--batch: {e}"))?;
    let no_secrets = args.iter().any(|a| a == "--no-secrets");
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = match arg("--dir") {
        Some(d) => std::path::PathBuf::from(d),
        None => tmp.path().join("store"),
    };
    fill(&path, devices, batch, no_secrets)?;
    let store = SledStore::open(&path).map_err(|e| e.to_string())?;
    print_trees(&store, devices)?;
    let on_disk = store.size_on_disk().map_err(|e| e.to_string())?;
    drop(store);
    // sled releases the store from a background thread; let it finish before measuring.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let dir = ca_server::store::dir_size(&path);
    println!(
        "size_on_disk {} B = {:.0} B/device; folder {} B = {:.0} B/device",
        on_disk,
        on_disk as f64 / devices as f64,
        dir,
        dir as f64 / devices as f64
    );
    Ok(())
}

fn fill(path: &Path, devices: u64, batch: u64, no_secrets: bool) -> Result<(), String> {
    let rng = SystemRandom::new();
    let e = |e: ca_server::store::StoreError| e.to_string();
    let ca_key = KeyPair::generate(KeyAlgorithm::Ed25519, &rng).map_err(|e| e.to_string())?;
    let ca_der = new_ca_certificate("Imprint Size CA", &ca_key, 1_760_000_000, &rng)
        .map_err(|e| e.to_string())?;
    let profile = CertProfile::from_ca_der(&ca_der).map_err(|e| e.to_string())?;
    let mut kek = [0u8; 32];
    rng.fill(&mut kek).map_err(|_| "random")?;
    let keys = SecretKeys::new(&kek)?;
    let store = SledStore::open(path).map_err(e)?;
    let line_key = KeyPair::generate(KeyAlgorithm::Ed25519, &rng).map_err(|e| e.to_string())?;
    let now = 1_764_000_000;
    let mut first = 1;
    let mut n = 0;
    while first <= devices {
        n += 1;
        let id = format!("line-{n:03}");
        let last = first + 100_000 - 1;
        ca_server::lines::add_line(
            &store,
            &id,
            &PublicKey::from(&line_key).to_pem(),
            (first, last),
            None,
            now,
            "size",
        )?;
        first = last + 1;
    }
    let mut serial = 1;
    while serial <= devices {
        let end = (serial + batch).min(devices + 1);
        let mut hashes = Vec::new();
        for s in serial..end {
            let key = KeyPair::generate(KeyAlgorithm::Ed25519, &rng).map_err(|e| e.to_string())?;
            let spki = key.spki_der();
            let ds = DeviceSerial::new(s).ok_or("serial 0")?;
            let cert = profile
                .issue(ds, &spki, &ca_key, &rng)
                .map_err(|e| e.to_string())?;
            let mut cti = vec![0u8; 16];
            rng.fill(&mut cti).map_err(|_| "random")?;
            let mut key_hash = [0u8; 32];
            key_hash.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &spki).as_ref());
            hashes.push(key_hash);
            store
                .apply_enrollment(&NewEnrollment {
                    serial: s,
                    spki,
                    key_hash,
                    certificate: cert.der,
                    generation: 0,
                    line: format!("line-{:03}", (s - 1) / 100_000 + 1),
                    token_id: cti,
                    at: now,
                })
                .map_err(e)?;
        }
        store.sync().map_err(e)?;
        if !no_secrets {
            let mut sealed: Vec<(SecretRecord, [u8; 32])> = Vec::new();
            for s in serial..end {
                let binding = hashes[(s - serial) as usize];
                let secret = keys.generate()?;
                let mut record =
                    keys.seal_version(s, 1, keys.new_key_id()?, secret.as_ref(), "csprng", now)?;
                record.delivered_at = Some(now);
                let op = SecretOp::Allocate {
                    record,
                    from_pool: None,
                    binding,
                };
                match store.apply_secret(&op).map_err(e)? {
                    SecretOutcome::Done(Some(r)) => sealed.push((r, binding)),
                    other => return Err(format!("allocate {s}: {other:?}")),
                }
            }
            store.sync().map_err(e)?;
            for (r, binding) in sealed {
                let op = SecretOp::Ack {
                    binding,
                    certificate: None,
                    serial: r.serial,
                    key_id: r.key_id.clone(),
                    version: r.version,
                    kcv: r.kcv.clone(),
                    at: now + 1,
                };
                match store.apply_secret(&op).map_err(e)? {
                    SecretOutcome::Done(_) => {}
                    other => return Err(format!("ack {}: {other:?}", r.serial)),
                }
            }
            store.sync().map_err(e)?;
        }
        serial = end;
    }
    Ok(())
}

fn print_trees(store: &SledStore, devices: u64) -> Result<(), String> {
    let mut trees: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    for (tree, k, v) in store.raw_records().map_err(|e| e.to_string())? {
        let t = trees.entry(tree).or_default();
        t.0 += 1;
        t.1 += k.len() as u64;
        t.2 += v.len() as u64;
    }
    let d = devices.max(1) as f64;
    println!("{devices} devices");
    println!(
        "{:<14} {:>10} {:>12} {:>12} {:>10}",
        "tree", "entries", "key B", "value B", "B/device"
    );
    let mut total = 0;
    for (name, (n, k, v)) in &trees {
        total += k + v;
        println!(
            "{:<14} {:>10} {:>12} {:>12} {:>10.1}",
            name,
            n,
            k,
            v,
            (k + v) as f64 / d
        );
    }
    println!(
        "{:<14} {:>10} {:>12} {:>12} {:>10.1}",
        "total",
        "",
        "",
        total,
        total as f64 / d
    );
    Ok(())
}
