//! Registering production lines.

use protocol_spec::PublicKey;

use crate::records::{LineRecord, SecretSource};
use crate::store::Store;

/// Parses `FIRST-LAST` (inclusive, decimal).
pub fn parse_range(text: &str) -> Result<(u64, u64), String> {
    let (a, b) = text
        .split_once('-')
        .ok_or_else(|| format!("serial range {text:?} is not FIRST-LAST"))?;
    let first: u64 = a
        .trim()
        .parse()
        .map_err(|_| format!("serial range: {a:?} is not a number"))?;
    let last: u64 = b
        .trim()
        .parse()
        .map_err(|_| format!("serial range: {b:?} is not a number"))?;
    if first == 0 || last < first {
        return Err(format!(
            "serial range {first}-{last}: need 1 <= FIRST <= LAST"
        ));
    }
    Ok((first, last))
}

/// Checks a line id: 1 to 64 characters of `A-Z a-z 0-9 . _ -`.
pub fn check_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "line id {id:?} must be 1 to 64 characters of A-Z a-z 0-9 . _ -"
        ))
    }
}

/// Registers a line with the store (offline: `ca-server line add --dir`).
pub fn add_line(
    store: &dyn Store,
    id: &str,
    public_key_pem: &str,
    range: (u64, u64),
    quota: Option<u64>,
    now: u64,
    actor: &str,
) -> Result<LineRecord, String> {
    let rec = new_line(id, public_key_pem, range, quota, now)?;
    store.add_line(&rec, actor).map_err(|e| e.to_string())?;
    Ok(rec)
}

/// Parses a line's secret source and checks it against the store: a DUKPT source must name a
/// stored BDK (BDKs are never removed, so the check holds once made).
pub fn secret_source(store: &dyn Store, text: &str) -> Result<SecretSource, String> {
    let source: SecretSource = text.parse().map_err(|e| format!("--secret-source: {e}"))?;
    if let SecretSource::Dukpt(id) = source {
        let name = id.to_string();
        if !store
            .bdks()
            .map_err(|e| e.to_string())?
            .iter()
            .any(|b| b.id == name)
        {
            return Err(format!(
                "--secret-source {source}: no BDK {name} is stored (`ca-server dukpt add-bdk`, \
                 `ca-server dukpt list`)"
            ));
        }
    }
    Ok(source)
}

/// A checked line record, not yet stored.
pub fn new_line(
    id: &str,
    public_key_pem: &str,
    range: (u64, u64),
    quota: Option<u64>,
    now: u64,
) -> Result<LineRecord, String> {
    check_id(id)?;
    let key = PublicKey::from_pem(public_key_pem).map_err(|e| format!("line public key: {e}"))?;
    let size = range.1 - range.0 + 1;
    let quota = quota.unwrap_or(size);
    if quota == 0 {
        return Err("quota must be at least 1".into());
    }
    Ok(LineRecord {
        id: id.to_string(),
        public_key: key.spki_der(),
        first_serial: range.0,
        last_serial: range.1,
        quota,
        rate: 0,
        enrolled: 0,
        active: true,
        created_at: now,
        secret_source: Default::default(),
    })
}
