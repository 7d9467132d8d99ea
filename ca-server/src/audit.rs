//! The audit log's outside view: export as JSON lines, and verification of the hash chain.
//!
//! Every entry carries the SHA-256 of the previous entry (`prev_hash`) and its own (`hash`,
//! computed with `hash` empty), and is stored in exactly the encoding that is hashed. So a
//! changed entry is named by itself: its bytes no longer decode, are no longer the canonical
//! encoding, or no longer match its hash; an entry rewritten with a fresh hash no longer
//! matches its successor's `prev_hash`; a removed entry leaves a gap in the sequence numbers.
//!
//! A hash chain has no secret: whoever can write the store could rewrite an entry *and every
//! entry after it*, consistently. So each entry also carries a MAC (`mac`): HMAC-SHA256 of its
//! hash under the audit key ([`AuditKey`]), which is derived from the key-encryption key and so
//! held only where the KEK is (the CA's memory; on disk in `kek.bin` or sealed by the PKCS#11
//! token). Someone who can write the store but has no key can change an entry and recompute
//! every hash after it, but not the MACs: with the key, [`verify`] names the first entry the
//! key cannot vouch for. Entries written before the key existed carry no MAC; the first entry
//! that does covers, through its `prev_hash`, the chain before it as it then stood (SPEC.md
//! 11.9).
//!
//! What a MAC cannot show is entries removed from the end, with the head moved back: for that,
//! `audit verify` prints the head, operators record it elsewhere (a ticket, a log server,
//! paper), and `audit verify --expect SEQ:HASH` later proves that the recorded entry is still
//! in the chain, unchanged, with everything before it.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::records::{AuditEntry, from_cbor};
use crate::store::{RawAudit, StoreError};

/// The key that seals each audit entry: an HMAC-SHA256 key derived from the key-encryption
/// key ([`crate::secrets::SecretKeys::audit_key`]).
#[derive(Clone)]
pub struct AuditKey(ring::hmac::Key);

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey([redacted])")
    }
}

/// What the MAC is computed over, before the entry's hash: a label of its own, so that no
/// other HMAC under a key derived from the KEK can be taken for an entry's.
const MAC_LABEL: &[u8] = b"imprint-audit-mac-v1";

impl AuditKey {
    /// The key, from 32 bytes derived for it.
    pub fn new(key: &[u8; 32]) -> Self {
        AuditKey(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key))
    }

    /// The MAC of an entry whose hash ([`AuditEntry::compute_hash`]) is `hash`.
    pub fn mac(&self, hash: &[u8; 32]) -> Vec<u8> {
        let mut ctx = ring::hmac::Context::with_key(&self.0);
        ctx.update(MAC_LABEL);
        ctx.update(hash);
        ctx.sign().as_ref().to_vec()
    }

    /// Whether `mac` is the MAC of `hash` (compared in constant time).
    pub fn vouches(&self, hash: &[u8; 32], mac: &[u8]) -> bool {
        let mut msg = Vec::with_capacity(MAC_LABEL.len() + hash.len());
        msg.extend_from_slice(MAC_LABEL);
        msg.extend_from_slice(hash);
        ring::hmac::verify(&self.0, &msg, mac).is_ok()
    }
}

/// The first sealed entry a CA folder recorded (`audit.sealed`, a decimal sequence number):
/// every entry from it on must carry a MAC. `None` when the folder has no record yet (a CA
/// created before the audit key, until its server first starts).
pub fn read_sealed_from(dir: &crate::config::CaDir) -> Result<Option<u64>, String> {
    let path = dir.audit_sealed();
    match std::fs::read_to_string(&path) {
        Ok(t) => t
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("{}: not a sequence number", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Records in a CA folder that its chain is sealed from entry `seq` on (written once, then
/// only read).
pub fn write_sealed_from(dir: &crate::config::CaDir, seq: u64) -> Result<(), String> {
    crate::setup::write_new(&dir.audit_sealed(), format!("{seq}\n").as_bytes(), 0o644)
}

/// The name of the CA node this process is (`serve --node-id`, else the host name): written on
/// every audit entry it seals and put as a label on its metrics. One per process, set once at
/// start, before the store is opened.
static NODE: OnceLock<String> = OnceLock::new();

/// Names this process's node; the first name set stays.
pub fn set_node(name: &str) {
    let _ = NODE.set(name.to_string());
}

/// This process's node name, if one was set.
pub fn node() -> Option<&'static str> {
    NODE.get().map(String::as_str)
}

/// A node name: 1 to 64 letters, digits, `.`, `_` or `-`.
pub fn check_node_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "node id {name:?}: 1 to 64 letters, digits, '.', '_' or '-'"
        ))
    }
}

/// The host name (`/proc/sys/kernel/hostname`), as a node name; `ca` when it cannot be read.
pub fn host_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| check_node_name(h).is_ok())
        .unwrap_or_else(|| "ca".into())
}

/// One audit entry as exported (`audit export`, JSON lines).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditLine {
    /// Position in the log, from 1.
    pub seq: u64,
    /// Unix seconds.
    pub at: u64,
    /// `at` as RFC 3339 UTC.
    pub time: String,
    /// What happened.
    pub event: String,
    /// The device concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<u64>,
    /// Who caused it: a line id, `device`, `operator:NAME`, `cli`.
    pub actor: String,
    /// Event facts (never a secret).
    pub detail: String,
    /// Hash of the previous entry, hex.
    pub prev_hash: String,
    /// This entry's hash, hex.
    pub hash: String,
    /// The CA node that wrote it (absent for entries written before nodes were named).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Its MAC under the audit key, hex (absent for entries written before the key existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl From<&AuditEntry> for AuditLine {
    fn from(e: &AuditEntry) -> Self {
        AuditLine {
            seq: e.seq,
            at: e.at,
            time: rfc3339(e.at),
            event: e.event.clone(),
            serial: e.serial,
            actor: e.actor.clone(),
            detail: e.detail.clone(),
            prev_hash: hex::encode(&e.prev_hash),
            hash: hex::encode(&e.hash),
            node: e.node.clone(),
            mac: e.mac.as_ref().map(hex::encode),
        }
    }
}

/// The result of verifying the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditVerdict {
    /// Entries checked (up to and including the first bad one).
    pub entries: u64,
    /// The hash of the last good entry, hex (what an operator records to detect a rewritten
    /// tail later).
    pub head: String,
    /// The first entry that does not match, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_bad: Option<BadEntry>,
    /// Whether the entries' MACs were checked (the verifier held the audit key).
    #[serde(default)]
    pub keyed: bool,
    /// The first entry sealed by the audit key: the entries before it were written before the
    /// key existed, and are vouched for only as a whole, by this entry's MAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyed_from: Option<u64>,
}

/// An entry that breaks the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadEntry {
    /// Its sequence number (where it should be).
    pub seq: u64,
    /// What is wrong with it.
    pub reason: String,
}

impl AuditVerdict {
    /// Whether the whole chain verified.
    pub fn ok(&self) -> bool {
        self.first_bad.is_none()
    }
}

/// A head recorded earlier (`SEQ:HASH`, as `audit verify` prints it): the entry `seq` must
/// still have this hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    /// Sequence number.
    pub seq: u64,
    /// Its hash.
    pub hash: [u8; 32],
}

impl std::str::FromStr for Anchor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not SEQ:HASH (a sequence number, a colon, 64 hex digits)");
        let (seq, hash) = s.split_once(':').ok_or_else(bad)?;
        let seq = seq.parse().map_err(|_| bad())?;
        let hash = hex::decode(hash)
            .ok()
            .and_then(|h| <[u8; 32]>::try_from(h).ok())
            .ok_or_else(bad)?;
        Ok(Anchor { seq, hash })
    }
}

/// Recomputes the chain over `entries` (as stored, in key order, from the first) and names the
/// first entry that does not match, checking `anchor` on the way; with the `audit_key`, also
/// the first entry the key cannot vouch for. A store read failure is an error, not a verdict.
///
/// With the key: every entry from the first one that carries a MAC on must carry one, and it
/// must be the MAC of the entry's hash; the entries before that first one (written before the
/// key existed) are vouched for by its MAC, which covers their last hash. A chain with entries
/// and no MAC at all is refused: a store written since the key existed always ends in a sealed
/// entry (the server seals an unsealed chain when it starts), so MACs stripped from the whole
/// chain show. `sealed_from` is the first sealed entry the CA folder recorded
/// ([`read_sealed_from`]): from it on every entry must carry a MAC, and the chain must reach it.
pub fn verify<I>(
    entries: I,
    anchor: Option<Anchor>,
    audit_key: Option<&AuditKey>,
    sealed_from: Option<u64>,
) -> Result<AuditVerdict, StoreError>
where
    I: IntoIterator<Item = Result<RawAudit, StoreError>>,
{
    let mut prev = [0u8; 32];
    let mut count = 0u64;
    let mut keyed_from: Option<u64> = None;
    let keyed = audit_key.is_some();
    let bad = |seq: u64, count: u64, prev: &[u8; 32], reason: String| AuditVerdict {
        entries: count,
        head: hex::encode(prev),
        first_bad: Some(BadEntry { seq, reason }),
        keyed,
        keyed_from: None,
    };
    for item in entries {
        let (key, value) = item?;
        let expected = count + 1;
        let Some(key_seq) = <[u8; 8]>::try_from(key.as_slice())
            .ok()
            .map(u64::from_be_bytes)
        else {
            return Ok(bad(
                expected,
                count + 1,
                &prev,
                format!("entry key {} is not a sequence number", hex::encode(&key)),
            ));
        };
        if key_seq != expected {
            return Ok(bad(
                expected,
                count,
                &prev,
                format!("entry {expected} is missing (the next entry found is {key_seq})"),
            ));
        }
        count += 1;
        let entry: AuditEntry = match from_cbor(&value) {
            Ok(e) => e,
            Err(e) => {
                return Ok(bad(
                    key_seq,
                    count,
                    &prev,
                    format!("entry {key_seq} does not decode: {e}"),
                ));
            }
        };
        if entry.seq != key_seq {
            return Ok(bad(
                key_seq,
                count,
                &prev,
                format!("entry {key_seq} claims sequence number {}", entry.seq),
            ));
        }
        if crate::records::to_cbor(&entry) != value {
            return Ok(bad(
                key_seq,
                count,
                &prev,
                format!(
                    "entry {key_seq} is not stored as written (its bytes were changed or added to)"
                ),
            ));
        }
        let computed = entry.compute_hash();
        if entry.hash != computed {
            return Ok(bad(
                key_seq,
                count,
                &prev,
                format!(
                    "entry {key_seq}'s content does not match its hash (changed after it was written)"
                ),
            ));
        }
        if entry.prev_hash != prev {
            return Ok(bad(
                key_seq,
                count,
                &prev,
                if key_seq == 1 {
                    "entry 1 does not start the chain (prev_hash is not zero)".to_string()
                } else {
                    format!(
                        "entry {key_seq} does not follow entry {} (its prev_hash differs: entry {} was rewritten, or this one was)",
                        key_seq - 1,
                        key_seq - 1
                    )
                },
            ));
        }
        if let Some(audit_key) = audit_key {
            match (&entry.mac, keyed_from) {
                (Some(mac), _) if !audit_key.vouches(&computed, mac) => {
                    // Entries before the first sealed one are vouched for only through it.
                    let (seq, reason) = match keyed_from {
                        None if key_seq > 1 => (
                            1,
                            format!(
                                "entry {key_seq}, the first sealed by the audit key, has a MAC the key does not vouch for: it, or one of the entries 1 to {} written before the key, was changed (and the hashes after it recomputed) by someone without the key, or it was sealed under another key",
                                key_seq - 1
                            ),
                        ),
                        _ => (
                            key_seq,
                            format!(
                                "entry {key_seq} has a MAC the audit key does not vouch for: it was changed (and the hashes after it recomputed) by someone without the key, or sealed under another key"
                            ),
                        ),
                    };
                    return Ok(bad(seq, count, &prev, reason));
                }
                (Some(_), None) => keyed_from = Some(key_seq),
                (Some(_), Some(_)) => {}
                (None, Some(first)) => {
                    return Ok(bad(
                        key_seq,
                        count,
                        &prev,
                        format!(
                            "entry {key_seq} carries no MAC, though the audit key seals every entry from {first} on: it was written (or rewritten) by someone without the key"
                        ),
                    ));
                }
                (None, None) if sealed_from.is_some_and(|k| key_seq >= k) => {
                    return Ok(bad(
                        key_seq,
                        count,
                        &prev,
                        format!(
                            "entry {key_seq} carries no MAC, though the CA folder records the chain sealed from entry {} on: it was written (or rewritten, its MAC stripped) by someone without the key",
                            sealed_from.unwrap_or(key_seq)
                        ),
                    ));
                }
                (None, None) => {}
            }
        }
        if let Some(a) = anchor
            && a.seq == key_seq
            && a.hash != computed
        {
            return Ok(bad(
                key_seq,
                count,
                &prev,
                format!(
                    "entry {key_seq} no longer has the hash recorded for it: the log was rewritten at or before entry {key_seq}"
                ),
            ));
        }
        prev = computed;
    }
    if let Some(a) = anchor
        && a.seq > count
    {
        return Ok(AuditVerdict {
            entries: count,
            head: hex::encode(prev),
            first_bad: Some(BadEntry {
                seq: a.seq,
                reason: format!(
                    "entry {} recorded earlier is gone: the log ends at entry {count}",
                    a.seq
                ),
            }),
            keyed,
            keyed_from,
        });
    }
    if let Some(k) = sealed_from
        && keyed
        && count > 0
        && count < k
    {
        return Ok(AuditVerdict {
            entries: count,
            head: hex::encode(prev),
            first_bad: Some(BadEntry {
                seq: count + 1,
                reason: format!(
                    "the log ends at entry {count}, before entry {k}, which the CA folder records as its first sealed entry: entries were removed"
                ),
            }),
            keyed,
            keyed_from,
        });
    }
    if keyed && count > 0 && keyed_from.is_none() {
        return Ok(AuditVerdict {
            entries: count,
            head: hex::encode(prev),
            first_bad: Some(BadEntry {
                seq: 1,
                reason: format!(
                    "no entry is sealed by the audit key (entries 1 to {count} carry no MAC): they were all written before the key existed (start the server once: it seals the chain), or their MACs were stripped"
                ),
            }),
            keyed,
            keyed_from,
        });
    }
    Ok(AuditVerdict {
        entries: count,
        head: hex::encode(prev),
        first_bad: None,
        keyed,
        keyed_from,
    })
}

/// Unix seconds as RFC 3339 UTC (`2026-11-25T06:02:40Z`).
pub fn rfc3339(t: u64) -> String {
    i64::try_from(t)
        .ok()
        .and_then(|t| ::time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|d| {
            d.format(&::time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("@{t}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::ra::rules::AuditEvent;
    use crate::records::to_cbor;

    fn event(n: u64) -> AuditEvent {
        AuditEvent {
            at: 1_000 + n,
            event: "enroll".into(),
            serial: Some(n),
            actor: "line-1".into(),
            detail: format!("entry {n}"),
        }
    }

    /// A chain of `n` entries, the first `unsealed` of them written without the key.
    fn chain(n: u64, unsealed: u64, key: &AuditKey) -> Vec<AuditEntry> {
        let mut head = (0, [0u8; 32]);
        (1..=n)
            .map(|i| {
                let e = event(i).entry_after(&head, (i > unsealed).then_some(key));
                head = (e.seq, e.compute_hash());
                e
            })
            .collect()
    }

    /// What an attacker who can write the store but has no key does: changes entry `at` and
    /// recomputes every hash from it on; `mac` decides what becomes of each MAC.
    fn rewrite(entries: &mut [AuditEntry], at: u64, mac: impl Fn(&AuditEntry) -> Option<Vec<u8>>) {
        let mut prev = vec![0u8; 32];
        for e in entries.iter_mut() {
            if e.seq == at {
                e.detail = "forged".into();
            }
            if e.seq >= at {
                e.prev_hash = prev.clone();
                let kept = mac(e);
                *e = e.clone().sealed(None);
                e.mac = kept;
            }
            prev = e.hash.clone();
        }
    }

    fn check(entries: &[AuditEntry], key: Option<&AuditKey>, from: Option<u64>) -> AuditVerdict {
        verify(
            entries
                .iter()
                .map(|e| Ok((e.seq.to_be_bytes().to_vec(), to_cbor(e)))),
            None,
            key,
            from,
        )
        .unwrap()
    }

    fn named(v: &AuditVerdict) -> (u64, &str) {
        let b = v.first_bad.as_ref().unwrap();
        (b.seq, b.reason.as_str())
    }

    #[test]
    fn the_key_names_an_entry_rewritten_with_every_later_hash() {
        let key = AuditKey::new(&[5u8; 32]);
        let good = chain(8, 0, &key);
        let v = check(&good, Some(&key), Some(1));
        assert!(v.ok() && v.keyed && v.keyed_from == Some(1), "{v:?}");

        // Entry 4 changed, hashes recomputed, MACs kept: entry 4 is named.
        let mut forged = good.clone();
        rewrite(&mut forged, 4, |e| e.mac.clone());
        assert!(
            check(&forged, None, None).ok(),
            "a hash chain alone shows nothing"
        );
        let v = check(&forged, Some(&key), Some(1));
        let (seq, why) = named(&v);
        assert_eq!(seq, 4, "{why}");
        assert!(why.contains("does not vouch"), "{why}");
        assert_eq!(v.entries, 4);

        // The same with the MACs stripped from entry 4 on: named too.
        let mut stripped = good.clone();
        rewrite(&mut stripped, 4, |_| None);
        let v = check(&stripped, Some(&key), Some(1));
        assert_eq!(named(&v).0, 4, "{v:?}");
        assert!(named(&v).1.contains("carries no MAC"), "{v:?}");

        // Every MAC stripped: refused, whether or not the CA folder's record is at hand.
        let mut bare = good.clone();
        rewrite(&mut bare, 1, |_| None);
        let v = check(&bare, Some(&key), None);
        assert_eq!(named(&v).0, 1, "{v:?}");
        assert!(named(&v).1.contains("no entry is sealed"), "{v:?}");
        let v = check(&bare, Some(&key), Some(1));
        assert_eq!(named(&v).0, 1, "{v:?}");

        // Sealed with another key (an attacker's): named at once.
        let mut other = good.clone();
        let theirs = AuditKey::new(&[6u8; 32]);
        rewrite(&mut other, 2, |e| Some(theirs.mac(&e.compute_hash())));
        let v = check(&other, Some(&key), Some(1));
        assert_eq!(named(&v).0, 2, "{v:?}");

        // Truncated below the first sealed entry the CA folder records.
        let v = check(&good[..3], Some(&key), Some(5));
        assert_eq!(named(&v).0, 4, "{v:?}");
        assert!(named(&v).1.contains("removed"), "{v:?}");
    }

    #[test]
    fn entries_written_before_the_key_are_vouched_for_by_the_first_sealed_one() {
        let key = AuditKey::new(&[5u8; 32]);
        let upgraded = chain(7, 3, &key);
        let v = check(&upgraded, Some(&key), Some(4));
        assert!(v.ok() && v.keyed_from == Some(4), "{v:?}");
        // An old entry rewritten, with every later hash: the first sealed entry's MAC fails,
        // and entry 1 is the first one the key cannot vouch for.
        let mut forged = upgraded.clone();
        rewrite(&mut forged, 2, |e| e.mac.clone());
        let v = check(&forged, Some(&key), Some(4));
        let (seq, why) = named(&v);
        assert_eq!(seq, 1, "{why}");
        assert!(why.contains("entry 4, the first sealed"), "{why}");
        // An unsealed entry after the sealed ones.
        let mut late = upgraded.clone();
        late[5].mac = None;
        let v = check(&late, Some(&key), Some(4));
        assert_eq!(named(&v).0, 6, "{v:?}");
    }
}
