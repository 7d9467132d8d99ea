//! The verification pass, against the CA's store after the run: every certificate chains to the
//! CA and matches its device's key, no key belongs to two devices, indices agree, the audit chain
//! is intact, and every certificate a device stored is the one on record.

use std::collections::HashSet;

use ca_server::records::from_cbor;
use ca_server::store::{SledStore, Store};
use protocol_spec::profile::CertProfile;
use protocol_spec::{DeviceSerial, spki};
use serde::Serialize;

/// What the pass found.
#[derive(Debug, Default, Serialize)]
pub struct Verification {
    /// Device records in the store.
    pub records: u64,
    /// Records whose certificate passed the profile lint (chain, key, serial, fields).
    pub certificates_valid: u64,
    /// Devices that stored a certificate.
    pub devices_with_certificate: u64,
    /// ... whose certificate is byte for byte the one on record.
    pub devices_matching_store: u64,
    /// Devices holding a certificate the store has no record of (must be 0).
    pub devices_missing_from_store: u64,
    /// Public keys bound to more than one serial (must be 0).
    pub shared_keys: u64,
    /// Key-index or token-index entries that disagree with the device records (must be 0).
    pub index_mismatches: u64,
    /// Devices with a secret delivered and confirmed (serial -> key -> key id -> version).
    pub devices_with_confirmed_secret: u64,
    /// Secrets held by more than one device (must be 0), by the keyed-hash index.
    pub shared_secrets: u64,
    /// Audit entries, and whether the hash chain verified.
    pub audit_entries: u64,
    /// Whether the audit hash chain verified from the first entry to the last.
    pub audit_chain_ok: bool,
    /// Every check passed.
    pub ok: bool,
    /// The first few problems found, for the report.
    pub problems: Vec<String>,
}

impl Verification {
    fn problem(&mut self, p: String) {
        if self.problems.len() < 20 {
            self.problems.push(p);
        }
    }
}

/// Runs the pass over the store at `path` (the CA must be stopped: sled allows one process).
pub fn verify(
    path: &std::path::Path,
    ca_der: &[u8],
    received: &[[u8; 32]],
    secrets: bool,
) -> Result<Verification, String> {
    let store = SledStore::open(path).map_err(|e| e.to_string())?;
    let profile = CertProfile::from_ca_der(ca_der).map_err(|e| e.to_string())?;
    let mut v = Verification::default();
    let mut keys = HashSet::new();
    let mut tokens = HashSet::new();
    let mut on_record = vec![None::<[u8; 32]>; received.len()];
    let mut secret_tags = HashSet::new();
    for rec in store.devices() {
        let rec = rec.map_err(|e| e.to_string())?;
        v.records += 1;
        let Some(serial) = DeviceSerial::new(rec.serial) else {
            v.problem("record with serial 0".to_string());
            continue;
        };
        match profile.lint(&rec.certificate, serial, &rec.spki) {
            Ok(()) => v.certificates_valid += 1,
            Err(e) => v.problem(format!("serial {}: {e}", rec.serial)),
        }
        let h = spki::sha256(&rec.spki);
        if !keys.insert(h) {
            v.shared_keys += 1;
            v.problem(format!(
                "serial {}: key already bound to another serial",
                rec.serial
            ));
        }
        if store.serial_for_key(&h).map_err(|e| e.to_string())? != Some(rec.serial) {
            v.index_mismatches += 1;
            v.problem(format!("serial {}: key index disagrees", rec.serial));
        }
        for sv in store
            .secret_versions(rec.serial)
            .map_err(|e| e.to_string())?
        {
            if !secret_tags.insert(sv.index_tag.clone()) {
                v.shared_secrets += 1;
                v.problem(format!(
                    "serial {}: secret {} shared with another device",
                    rec.serial, sv.key_id
                ));
            }
            if sv.version == 1 && sv.delivered_at.is_some() && sv.confirmed_at.is_some() {
                v.devices_with_confirmed_secret += 1;
            }
        }
        if !tokens.insert((rec.line.clone(), rec.token_id.clone())) {
            v.index_mismatches += 1;
            v.problem(format!("serial {}: token used twice", rec.serial));
        }
        if let Some(slot) = on_record.get_mut((rec.serial as usize).wrapping_sub(1)) {
            let d = ring::digest::digest(&ring::digest::SHA256, &rec.certificate);
            let mut out = [0u8; 32];
            out.copy_from_slice(d.as_ref());
            *slot = Some(out);
        }
    }
    for (i, got) in received.iter().enumerate() {
        if *got == [0u8; 32] {
            continue;
        }
        v.devices_with_certificate += 1;
        match on_record[i] {
            Some(r) if r == *got => v.devices_matching_store += 1,
            Some(_) => v.problem(format!(
                "serial {}: device holds another certificate than the store",
                i + 1
            )),
            None => {
                v.devices_missing_from_store += 1;
                v.problem(format!(
                    "serial {}: device holds a certificate the store has no record of",
                    i + 1
                ));
            }
        }
    }
    let token_entries = store
        .raw_records()
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|(t, _, _)| t == "tokens")
        .filter(|(_, _, val)| from_cbor::<ca_server::records::TokenUse>(val).is_ok())
        .count() as u64;
    if token_entries != v.records {
        v.index_mismatches += 1;
        v.problem(format!(
            "{token_entries} token entries for {} devices",
            v.records
        ));
    }
    let mut prev = [0u8; 32];
    v.audit_chain_ok = true;
    for (i, e) in store.audit().enumerate() {
        let e = e.map_err(|e| e.to_string())?;
        v.audit_entries += 1;
        if e.seq != i as u64 + 1 || e.prev_hash != prev {
            if v.audit_chain_ok {
                v.problem(format!("audit chain breaks at entry {}", e.seq));
            }
            v.audit_chain_ok = false;
        }
        prev = e.compute_hash();
    }
    if secrets && v.devices_with_confirmed_secret != v.devices_with_certificate {
        v.problem(format!(
            "{} of {} enrolled devices have a delivered and confirmed secret",
            v.devices_with_confirmed_secret, v.devices_with_certificate
        ));
    }
    v.ok = v.problems.is_empty()
        && v.certificates_valid == v.records
        && v.devices_matching_store == v.devices_with_certificate
        && v.audit_chain_ok;
    Ok(v)
}
