//! The verification pass after the run. With the embedded CA it reads the CA's store: every
//! certificate chains to the CA and matches its device's key, no key belongs to two devices,
//! indices agree, the audit chain is intact, and every certificate a device stored is the one on
//! record. A remote CA's store cannot be read, so the pass is device-side instead: from what
//! each device saw ([`Evidence`]), every certificate chains to the pinned CA and matches its
//! device's serial and key, no public key, certificate serial, secret or key id belongs to two
//! devices, and every device acknowledged a secret version.

use std::collections::HashSet;

use ca_server::records::from_cbor;
use ca_server::store::{SledStore, Store};
use protocol_spec::profile::CertProfile;
use protocol_spec::{DeviceSerial, spki};
use serde::Serialize;

/// What the pass found, and where it looked.
#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Verification {
    /// Against the embedded CA's store.
    Store(StoreVerification),
    /// Device-side, for a remote CA.
    DeviceSide(DeviceSideVerification),
}

impl Verification {
    /// Every check passed.
    pub fn ok(&self) -> bool {
        match self {
            Verification::Store(v) => v.ok,
            Verification::DeviceSide(v) => v.ok,
        }
    }

    /// Where the pass looked, for people.
    pub fn label(&self) -> &'static str {
        match self {
            Verification::Store(_) => "against the CA's store",
            Verification::DeviceSide(_) => "device-side: a remote CA's store cannot be read",
        }
    }

    /// The first few problems found.
    pub fn problems(&self) -> &[String] {
        match self {
            Verification::Store(v) => &v.problems,
            Verification::DeviceSide(v) => &v.problems,
        }
    }

    /// One line of figures.
    pub fn figures(&self) -> String {
        match self {
            Verification::Store(v) => format!(
                "{} records, {} certificates valid, {}/{} device certificates match the store, {} confirmed secrets, {} shared keys, {} shared secrets, {} index mismatches, audit chain {}",
                v.records,
                v.certificates_valid,
                v.devices_matching_store,
                v.devices_with_certificate,
                v.devices_with_confirmed_secret,
                v.shared_keys,
                v.shared_secrets,
                v.index_mismatches,
                if v.audit_chain_ok { "intact" } else { "BROKEN" }
            ),
            Verification::DeviceSide(v) => format!(
                "{} devices with a certificate, {} certificates valid against the pinned CA, {} acknowledged secrets, {} shared keys, {} shared certificate serials, {} shared secrets, {} shared key ids",
                v.devices_with_certificate,
                v.certificates_valid,
                v.devices_with_acked_secret,
                v.shared_keys,
                v.shared_certificate_serials,
                v.shared_secrets,
                v.shared_key_ids
            ),
        }
    }
}

/// What the pass against the embedded CA's store found.
#[derive(Debug, Default, Serialize)]
pub struct StoreVerification {
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

/// Problems kept for the report.
const MAX_PROBLEMS: usize = 20;

fn note(problems: &mut Vec<String>, p: String) {
    if problems.len() < MAX_PROBLEMS {
        problems.push(p);
    }
}

impl StoreVerification {
    fn problem(&mut self, p: String) {
        note(&mut self.problems, p);
    }
}

/// Runs the pass over the store at `path` (the CA must be stopped: sled allows one process).
/// `received[i]` is the SHA-256 of the certificate device `i` stored (serial `i + 1`).
pub fn verify_store(
    path: &std::path::Path,
    ca_der: &[u8],
    received: &[[u8; 32]],
    secrets: bool,
) -> Result<StoreVerification, String> {
    let store = SledStore::open(path).map_err(|e| e.to_string())?;
    let profile = CertProfile::from_ca_der(ca_der).map_err(|e| e.to_string())?;
    let mut v = StoreVerification::default();
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

/// What one device saw, kept for the device-side pass. Digests are SHA-256 cut to 128 bits:
/// ample to tell millions of values apart, and only ever held in memory.
#[derive(Debug, Clone, Copy, Default)]
pub struct Evidence {
    /// The device serial (0: the device did not finish).
    pub serial: u64,
    /// The serial number its certificate carries (0: unreadable).
    pub certificate_serial: u64,
    /// Whether its certificate passed the profile lint: issued by the pinned CA (signature
    /// verified), for this serial and this device's key, every field as the profile says.
    pub certificate_valid: bool,
    /// Digest of its public key (SPKI DER).
    pub key: [u8; 16],
    /// Digest of the secret it acknowledged (zeros: none).
    pub secret: [u8; 16],
    /// Digest of that secret's key id.
    pub key_id: [u8; 16],
    /// The secret version it acknowledged (0: none).
    pub acked_version: u64,
}

/// SHA-256 of `bytes`, cut to 128 bits.
pub fn digest16(bytes: &[u8]) -> [u8; 16] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 16];
    out.copy_from_slice(&d.as_ref()[..16]);
    out
}

/// What the device-side pass found.
#[derive(Debug, Default, Serialize)]
pub struct DeviceSideVerification {
    /// Devices that hold a certificate.
    pub devices_with_certificate: u64,
    /// ... whose certificate chains to the pinned CA and matches its serial and key.
    pub certificates_valid: u64,
    /// Public keys held by more than one device (must be 0).
    pub shared_keys: u64,
    /// Certificate serial numbers held by more than one device (must be 0).
    pub shared_certificate_serials: u64,
    /// Devices that acknowledged a secret version (with secrets: all of them).
    pub devices_with_acked_secret: u64,
    /// Secrets held by more than one device (must be 0).
    pub shared_secrets: u64,
    /// Secret key ids held by more than one device (must be 0).
    pub shared_key_ids: u64,
    /// Every check passed.
    pub ok: bool,
    /// The first few problems found, for the report.
    pub problems: Vec<String>,
}

/// Runs the device-side pass over what the devices saw (`evidence[i]` for device `i`; a
/// device that did not finish has serial 0 and is not counted). With `secrets`, every device
/// must have acknowledged a secret version.
pub fn verify_devices(evidence: &[Evidence], secrets: bool) -> DeviceSideVerification {
    let mut v = DeviceSideVerification::default();
    let done: Vec<&Evidence> = evidence.iter().filter(|e| e.serial != 0).collect();
    v.devices_with_certificate = done.len() as u64;
    for e in &done {
        if e.certificate_valid && e.certificate_serial == e.serial {
            v.certificates_valid += 1;
        } else if !e.certificate_valid {
            note(
                &mut v.problems,
                format!(
                    "serial {}: certificate does not pass the profile lint against the pinned CA",
                    e.serial
                ),
            );
        } else {
            note(
                &mut v.problems,
                format!(
                    "serial {}: certificate carries serial {}",
                    e.serial, e.certificate_serial
                ),
            );
        }
        if e.acked_version != 0 {
            v.devices_with_acked_secret += 1;
        }
    }
    let serial_of = |i: usize| done.get(i).map_or(0, |e| e.serial);
    v.shared_keys = duplicates(
        &done,
        |e| e.key,
        |a, b| {
            format!(
                "serials {} and {} hold the same public key",
                serial_of(a),
                serial_of(b)
            )
        },
        &mut v.problems,
    );
    v.shared_certificate_serials = duplicates(
        &done,
        |e| e.certificate_serial,
        |a, b| {
            format!(
                "serials {} and {} hold certificates with one serial number",
                serial_of(a),
                serial_of(b)
            )
        },
        &mut v.problems,
    );
    let acked: Vec<&Evidence> = done
        .iter()
        .copied()
        .filter(|e| e.acked_version != 0)
        .collect();
    let acked_serial = |i: usize| acked.get(i).map_or(0, |e| e.serial);
    v.shared_secrets = duplicates(
        &acked,
        |e| e.secret,
        |a, b| {
            format!(
                "serials {} and {} hold the same secret",
                acked_serial(a),
                acked_serial(b)
            )
        },
        &mut v.problems,
    );
    v.shared_key_ids = duplicates(
        &acked,
        |e| e.key_id,
        |a, b| {
            format!(
                "serials {} and {} hold secrets with one key id",
                acked_serial(a),
                acked_serial(b)
            )
        },
        &mut v.problems,
    );
    if secrets && v.devices_with_acked_secret != v.devices_with_certificate {
        note(
            &mut v.problems,
            format!(
                "{} of {} enrolled devices acknowledged a secret",
                v.devices_with_acked_secret, v.devices_with_certificate
            ),
        );
    }
    v.ok = v.problems.is_empty() && v.certificates_valid == v.devices_with_certificate;
    v
}

/// Values that occur more than once among `items` (each repeat counted once), found by
/// sorting (a few bytes per device, where a hash set would cost several times more).
fn duplicates<T: Ord + Copy>(
    items: &[&Evidence],
    value: impl Fn(&Evidence) -> T,
    describe: impl Fn(usize, usize) -> String,
    problems: &mut Vec<String>,
) -> u64 {
    let mut sorted: Vec<(T, usize)> = items
        .iter()
        .enumerate()
        .map(|(i, e)| (value(e), i))
        .collect();
    sorted.sort_unstable();
    let mut n = 0;
    for pair in sorted.windows(2) {
        if let [(a, i), (b, j)] = pair
            && a == b
        {
            n += 1;
            note(problems, describe(*i, *j));
        }
    }
    n
}

/// The serial number of a DER certificate, if it fits in 64 bits (RFC 5280 section 4.1):
///
/// ```text
/// Certificate ::= SEQUENCE { tbsCertificate SEQUENCE {
///     [0] EXPLICIT version OPTIONAL, serialNumber INTEGER, ... }, ... }
/// ```
pub fn certificate_serial(der: &[u8]) -> Option<u64> {
    let cert = inside(der, 0x30)?;
    let mut tbs = inside(cert, 0x30)?;
    if tbs.first() == Some(&0xa0) {
        let (header, len) = tlv_header(tbs)?;
        tbs = tbs.get(header.checked_add(len)?..)?;
    }
    let bytes = inside(tbs, 0x02)?;
    // DER INTEGER: a leading 0x00 only keeps a positive number's top bit clear.
    let digits = match bytes {
        [0, rest @ ..] => rest,
        _ if bytes.first().is_some_and(|b| b & 0x80 != 0) => return None,
        _ => bytes,
    };
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    Some(digits.iter().fold(0u64, |n, b| (n << 8) | u64::from(*b)))
}

/// The contents of the DER element at the start of `der`, if its tag is `tag`.
fn inside(der: &[u8], tag: u8) -> Option<&[u8]> {
    if der.first() != Some(&tag) {
        return None;
    }
    let (header, len) = tlv_header(der)?;
    der.get(header..header.checked_add(len)?)
}

/// (header length, contents length) of the DER element at the start of `der`.
fn tlv_header(der: &[u8]) -> Option<(usize, usize)> {
    let first = *der.get(1)?;
    if first < 0x80 {
        return Some((2, usize::from(first)));
    }
    let n = usize::from(first & 0x7f);
    if n == 0 || n > 4 {
        return None;
    }
    let len = der
        .get(2..2 + n)?
        .iter()
        .fold(0usize, |l, b| (l << 8) | usize::from(*b));
    Some((2 + n, len))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use protocol_spec::{KeyAlgorithm, KeyPair, profile};
    use ring::rand::SystemRandom;

    #[test]
    fn reads_the_serial_of_an_issued_certificate() {
        let rng = SystemRandom::new();
        let ca_key = KeyPair::generate(KeyAlgorithm::Ed25519, &rng).unwrap();
        let ca =
            CertProfile::from_ca_der(&profile::new_ca_certificate("t", &ca_key, 0, &rng).unwrap())
                .unwrap();
        let device = KeyPair::generate(KeyAlgorithm::P256, &rng).unwrap();
        for serial in [1u64, 127, 128, 700_001, u64::MAX >> 1, u64::MAX] {
            let Some(sn) = DeviceSerial::new(serial) else {
                continue;
            };
            let cert = ca.issue(sn, &device.spki_der(), &ca_key, &rng).unwrap();
            assert_eq!(certificate_serial(&cert.der), Some(serial), "{serial}");
        }
        assert_eq!(certificate_serial(b"\x30\x03\x02\x01"), None);
        assert_eq!(certificate_serial(&[]), None);
    }

    fn seen(serial: u64, key: u8, secret: u8) -> Evidence {
        Evidence {
            serial,
            certificate_serial: serial,
            certificate_valid: true,
            key: [key; 16],
            secret: [secret; 16],
            key_id: [secret; 16],
            acked_version: 1,
        }
    }

    #[test]
    fn the_device_side_pass_finds_shared_keys_and_secrets_and_missing_acks() {
        let good = [seen(1, 1, 1), seen(2, 2, 2), Evidence::default()];
        let v = verify_devices(&good, true);
        assert!(v.ok, "{:?}", v.problems);
        assert_eq!(v.devices_with_certificate, 2);
        assert_eq!(v.devices_with_acked_secret, 2);

        let v = verify_devices(&[seen(1, 1, 1), seen(2, 1, 1), seen(3, 3, 3)], true);
        assert!(!v.ok);
        assert_eq!(
            (v.shared_keys, v.shared_secrets, v.shared_key_ids),
            (1, 1, 1)
        );
        assert!(
            v.problems.iter().any(|p| p.contains("serials 1 and 2")),
            "{:?}",
            v.problems
        );

        let mut no_ack = seen(4, 4, 4);
        no_ack.acked_version = 0;
        assert!(!verify_devices(&[seen(1, 1, 1), no_ack], true).ok);
        assert!(verify_devices(&[seen(1, 1, 1), no_ack], false).ok);

        let mut wrong = seen(5, 5, 5);
        wrong.certificate_serial = 1;
        let v = verify_devices(&[seen(1, 1, 1), wrong], true);
        assert_eq!(v.shared_certificate_serials, 1);
        assert!(!v.ok);
    }
}
