//! The audit log's outside view: export as JSON lines, and verification of the hash chain.
//!
//! Every entry carries the SHA-256 of the previous entry (`prev_hash`) and its own (`hash`,
//! computed with `hash` empty), and is stored in exactly the encoding that is hashed. So a
//! changed entry is named by itself: its bytes no longer decode, are no longer the canonical
//! encoding, or no longer match its hash; an entry rewritten with a fresh hash no longer
//! matches its successor's `prev_hash`; a removed entry leaves a gap in the sequence numbers.
//!
//! A hash chain has no secret: whoever can write the store can rewrite an entry *and every
//! entry after it*, consistently. That is what the head hash is for: `audit verify` prints it,
//! operators record it elsewhere (a ticket, a log server, paper), and `audit verify --expect
//! SEQ:HASH` later proves that the recorded entry is still in the chain, unchanged, with
//! everything before it.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::records::{AuditEntry, from_cbor};
use crate::store::{RawAudit, StoreError};

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
/// first entry that does not match, checking `anchor` on the way. A store read failure is an
/// error, not a verdict.
pub fn verify<I>(entries: I, anchor: Option<Anchor>) -> Result<AuditVerdict, StoreError>
where
    I: IntoIterator<Item = Result<RawAudit, StoreError>>,
{
    let mut prev = [0u8; 32];
    let mut count = 0u64;
    let bad = |seq: u64, count: u64, prev: &[u8; 32], reason: String| AuditVerdict {
        entries: count,
        head: hex::encode(prev),
        first_bad: Some(BadEntry { seq, reason }),
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
        });
    }
    Ok(AuditVerdict {
        entries: count,
        head: hex::encode(prev),
        first_bad: None,
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
