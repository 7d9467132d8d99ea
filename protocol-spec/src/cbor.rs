//! Small helpers over ciborium for the integer-keyed maps every Imprint message uses.
//!
//! Encoding is deterministic (RFC 8949 section 4.2.1): the writers below emit keys in ascending
//! order and ciborium always uses the shortest integer and length forms.

use ciborium::Value;
use zeroize::{Zeroize, Zeroizing};

/// Serializes a CBOR value. Writing into a `Vec` cannot fail, so an error yields an empty vector,
/// which every decoder rejects.
pub fn to_vec(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    if ciborium::into_writer(value, &mut out).is_err() {
        out.clear();
    }
    out
}

/// Parses exactly one CBOR data item; trailing bytes are an error.
pub fn from_slice(bytes: &[u8]) -> Result<Value, String> {
    let mut reader = bytes;
    let value: Value =
        ciborium::from_reader(&mut reader).map_err(|e| format!("invalid CBOR: {e}"))?;
    if !reader.is_empty() {
        return Err(format!(
            "{} trailing bytes after the CBOR item",
            reader.len()
        ));
    }
    Ok(value)
}

/// A decoded integer-keyed map: duplicate keys are refused, unknown keys are kept aside so that
/// receivers can ignore them (SPEC.md "Extensibility").
#[derive(Debug)]
pub struct IntMap {
    entries: Vec<(i64, Value)>,
    what: &'static str,
}

impl IntMap {
    /// Decodes `bytes` as a map whose keys are all integers.
    pub fn decode(bytes: &[u8], what: &'static str) -> Result<Self, String> {
        Self::from_value(from_slice(bytes)?, what)
    }

    /// Wraps an already-decoded value.
    pub fn from_value(value: Value, what: &'static str) -> Result<Self, String> {
        let Value::Map(map) = value else {
            return Err(format!("{what}: expected a CBOR map"));
        };
        let mut entries: Vec<(i64, Value)> = Vec::with_capacity(map.len());
        for (k, v) in map {
            let key = match k {
                Value::Integer(i) => {
                    i64::try_from(i).map_err(|_| format!("{what}: key out of range"))?
                }
                _ => return Err(format!("{what}: map keys must be integers")),
            };
            if entries.iter().any(|(e, _)| *e == key) {
                return Err(format!("{what}: duplicate map key {key}"));
            }
            entries.push((key, v));
        }
        Ok(IntMap { entries, what })
    }

    fn take(&mut self, key: i64) -> Option<Value> {
        let pos = self.entries.iter().position(|(k, _)| *k == key)?;
        Some(self.entries.swap_remove(pos).1)
    }

    /// A required byte string.
    pub fn bytes(&mut self, key: i64, name: &str) -> Result<Vec<u8>, String> {
        match self.take(key) {
            Some(Value::Bytes(b)) => Ok(b),
            Some(_) => Err(format!(
                "{}: field {name} ({key}) must be a byte string",
                self.what
            )),
            None => Err(format!("{}: missing field {name} ({key})", self.what)),
        }
    }

    /// A required text string.
    pub fn text(&mut self, key: i64, name: &str) -> Result<String, String> {
        match self.take(key) {
            Some(Value::Text(t)) => Ok(t),
            Some(_) => Err(format!(
                "{}: field {name} ({key}) must be a text string",
                self.what
            )),
            None => Err(format!("{}: missing field {name} ({key})", self.what)),
        }
    }

    /// A required unsigned integer.
    pub fn uint(&mut self, key: i64, name: &str) -> Result<u64, String> {
        match self.take(key) {
            Some(Value::Integer(i)) => u64::try_from(i).map_err(|_| {
                format!(
                    "{}: field {name} ({key}) must be an unsigned integer",
                    self.what
                )
            }),
            Some(_) => Err(format!(
                "{}: field {name} ({key}) must be an unsigned integer",
                self.what
            )),
            None => Err(format!("{}: missing field {name} ({key})", self.what)),
        }
    }

    /// An optional unsigned integer.
    pub fn opt_uint(&mut self, key: i64, name: &str) -> Result<Option<u64>, String> {
        if self.entries.iter().any(|(k, _)| *k == key) {
            self.uint(key, name).map(Some)
        } else {
            Ok(None)
        }
    }

    /// An optional byte string.
    pub fn opt_bytes(&mut self, key: i64, name: &str) -> Result<Option<Vec<u8>>, String> {
        if self.has(key) {
            self.bytes(key, name).map(Some)
        } else {
            Ok(None)
        }
    }

    /// True when `key` is present.
    pub fn has(&self, key: i64) -> bool {
        self.entries.iter().any(|(k, _)| *k == key)
    }
}

/// Builds an integer-keyed map, in ascending key order.
#[derive(Debug, Default)]
pub struct MapWriter(Vec<(i64, Value)>);

impl MapWriter {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a byte string.
    pub fn bytes(mut self, key: i64, v: &[u8]) -> Self {
        self.0.push((key, Value::Bytes(v.to_vec())));
        self
    }

    /// Adds a text string.
    pub fn text(mut self, key: i64, v: &str) -> Self {
        self.0.push((key, Value::Text(v.to_string())));
        self
    }

    /// Adds an unsigned integer.
    pub fn uint(mut self, key: i64, v: u64) -> Self {
        self.0.push((key, Value::Integer(v.into())));
        self
    }

    /// The encoded map.
    pub fn encode(mut self) -> Vec<u8> {
        // RFC 8949 4.2.1: keys sorted by their encoded bytes; for these small integers that is
        // non-negative keys ascending, then negative keys.
        self.0.sort_by_key(|(k, _)| (*k < 0, k.unsigned_abs()));
        let map = self
            .0
            .into_iter()
            .map(|(k, v)| (Value::Integer(k.into()), v))
            .collect();
        to_vec(&Value::Map(map))
    }

    /// The encoded map, for a map that carries a secret: written into a buffer that is wiped
    /// when dropped and sized once, before writing, for the largest encoding the values can
    /// have (so that no reallocation leaves an unwiped copy behind); the values' own copies
    /// are wiped once written.
    pub fn encode_secret(mut self) -> Zeroizing<Vec<u8>> {
        self.0.sort_by_key(|(k, _)| (*k < 0, k.unsigned_abs()));
        // RFC 8949 3: a head (initial byte and argument) is at most 9 bytes; each entry is a
        // key head, a value head and the value's content.
        let bound = HEAD_MAX
            + self
                .0
                .iter()
                .map(|(_, v)| 2 * HEAD_MAX + content_len(v))
                .sum::<usize>();
        let mut out = Zeroizing::new(Vec::with_capacity(bound));
        let map = Value::Map(
            self.0
                .drain(..)
                .map(|(k, v)| (Value::Integer(k.into()), v))
                .collect(),
        );
        if ciborium::into_writer(&map, &mut *out).is_err() {
            out.clear();
        }
        if let Value::Map(entries) = map {
            for (_, v) in entries {
                wipe(v);
            }
        }
        out
    }
}

/// The longest CBOR head: the initial byte and an 8-byte argument.
const HEAD_MAX: usize = 9;

/// The bytes a value written by [`MapWriter`] takes beyond its head.
fn content_len(v: &Value) -> usize {
    match v {
        Value::Bytes(b) => b.len(),
        Value::Text(t) => t.len(),
        _ => 0,
    }
}

/// Wipes the content of a byte or text string value before it is dropped.
fn wipe(v: Value) {
    match v {
        Value::Bytes(mut b) => b.zeroize(),
        Value::Text(mut t) => t.zeroize(),
        _ => {}
    }
}
