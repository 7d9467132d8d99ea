//! Whole-store reads one record at a time, by tree name.

use super::{
    AUDIT, DEVICES, HISTORY, KEY_IDS, KEYS, LINES, POOL, POOL_MARK, REVOKED, SECRET_ACKS,
    SECRET_HEAD, SECRET_INDEX, SECRETS, SledStore, TOKENS, backend, token_key,
};
use crate::store::StoreError;

/// One record of a tree as stored: (key, value), or why it could not be read.
type RawEntry = Result<(Vec<u8>, Vec<u8>), StoreError>;

/// A store's trees read one record at a time, for whole-store checks (the simulator's
/// verification pass) that must not hold a store of millions of devices in memory, as
/// [`crate::store::Store::raw_records`] does.
impl SledStore {
    /// The tree names [`SledStore::raw_tree`] and [`SledStore::raw_get`] take.
    pub const TREES: [&'static str; 13] = [
        DEVICES,
        KEYS,
        TOKENS,
        LINES,
        AUDIT,
        SECRETS,
        SECRET_HEAD,
        SECRET_ACKS,
        SECRET_INDEX,
        KEY_IDS,
        POOL,
        REVOKED,
        HISTORY,
    ];

    /// The value a secret-index or key-id entry holds for a device's version (what
    /// [`SledStore::raw_get`] returns for `secret_index` and `key_ids`); an imported key still
    /// in the pool holds [`SledStore::POOL_MARK`] instead.
    pub fn secret_version_key(serial: u64, version: u64) -> Vec<u8> {
        let mut k = serial.to_be_bytes().to_vec();
        k.extend_from_slice(&version.to_be_bytes());
        k
    }

    /// The mark of a pool key in the secret-index and key-id trees.
    pub const POOL_MARK: &'static [u8] = POOL_MARK;

    /// The key of the `tokens` entry an enrollment with token `cti` from `line` wrote.
    pub fn token_index_key(line: &str, cti: &[u8]) -> Vec<u8> {
        token_key(line, cti)
    }

    /// The records of tree `name` as stored (undecoded), in key order, read as iterated.
    pub fn raw_tree(&self, name: &str) -> Result<impl Iterator<Item = RawEntry> + '_, StoreError> {
        let tree = self.tree(name)?;
        Ok(tree.iter().map(|r| {
            let (k, v) = r.map_err(backend)?;
            Ok((k.to_vec(), v.to_vec()))
        }))
    }

    /// One record of tree `name`, as stored.
    pub fn raw_get(&self, name: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tree(name)?
            .get(key)
            .map_err(backend)?
            .map(|v| v.to_vec()))
    }

    fn tree(&self, name: &str) -> Result<&sled::Tree, StoreError> {
        Ok(match name {
            DEVICES => &self.devices,
            KEYS => &self.keys,
            TOKENS => &self.tokens,
            LINES => &self.lines,
            AUDIT => &self.audit,
            SECRETS => &self.secrets,
            SECRET_HEAD => &self.secret_head,
            SECRET_ACKS => &self.secret_acks,
            SECRET_INDEX => &self.secret_index,
            KEY_IDS => &self.key_ids,
            POOL => &self.pool,
            REVOKED => &self.revoked,
            HISTORY => &self.history,
            other => return Err(StoreError::Backend(format!("no tree {other:?}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::store::test_support::{enrollment, line};
    use crate::store::{EnrollOutcome, Store};

    #[test]
    fn the_raw_trees_read_what_raw_records_holds() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SledStore::open(tmp.path()).unwrap();
        store.add_line(&line(10), "test").unwrap();
        let e = enrollment(1, 1, 1);
        assert!(matches!(
            store.apply_enrollment(&e).unwrap(),
            EnrollOutcome::Created(_)
        ));
        let mut streamed = Vec::new();
        for name in SledStore::TREES {
            for r in store.raw_tree(name).unwrap() {
                let (k, v) = r.unwrap();
                assert_eq!(store.raw_get(name, &k).unwrap(), Some(v.clone()));
                streamed.push((name.to_string(), k, v));
            }
        }
        streamed.sort();
        let mut all = store.raw_records().unwrap();
        all.sort();
        assert_eq!(streamed, all);
        let token = SledStore::token_index_key(&e.line, &e.token_id);
        assert!(store.raw_get(TOKENS, &token).unwrap().is_some());
        assert!(store.raw_tree("nope").is_err());
    }
}
