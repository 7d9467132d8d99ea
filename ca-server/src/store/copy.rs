//! `ca-server store copy`: a sled store into an empty PostgreSQL schema, then verified there.

use super::{Exported, PgStore, SledStore, Store, StoreError};
use crate::config::{CaDir, StoreSettings};

/// Copies the sled store of `dir` (no server may hold it) into the schema `target` names
/// (created if absent; it must hold no record), then checks there: the audit chain, ending at
/// the sled store's head; every line and device record equal; every device's secret versions
/// and reset history equal; as many key index entries, token uses and pool entries. Returns a
/// one-line report.
pub fn sled_to_postgres(dir: &CaDir, target: &StoreSettings) -> Result<String, String> {
    let config = dir.load_config()?;
    if config.store.url.is_some() {
        return Err(format!(
            "{} already keeps its records in PostgreSQL; copy reads a sled store",
            dir.config().display()
        ));
    }
    if !dir.ca_cert().exists() {
        return Err(format!("{} is not a CA folder", dir.root().display()));
    }
    let sled = SledStore::open(&dir.store()).map_err(|e| e.to_string())?;
    let pg_config = super::pg_config(dir, target)?
        .ok_or_else(|| "give the database URL with --to".to_string())?;
    PgStore::migrate(&pg_config).map_err(|e| e.to_string())?;
    let pg = PgStore::open(&pg_config).map_err(|e| e.to_string())?;

    // The sled chain first: a broken chain is not copied.
    let head =
        crate::audit::verify(sled.audit_raw(0), None, None, None).map_err(|e| e.to_string())?;
    if let Some(bad) = &head.first_bad {
        return Err(format!(
            "the sled audit chain is broken at entry {} ({}); nothing copied",
            bad.seq, bad.reason
        ));
    }

    let mut counts = [0u64; 10];
    let mut importer = pg.importer().map_err(|e| e.to_string())?;
    let index_entries = sled
        .export(&mut |e| {
            counts[kind_index(&e)] += 1;
            importer.push(e)
        })
        .map_err(|e| e.to_string())?;
    let rows = importer.finish().map_err(|e| e.to_string())?;
    if index_entries != counts[4] + counts[5] {
        return Err(format!(
            "the sled secret index has {index_entries} entries for {} versions and {} pool keys",
            counts[4], counts[5]
        ));
    }

    verify(&sled, &pg, &head, &counts).map_err(|e| format!("copy does not verify: {e}"))?;
    Ok(format!(
        "copied {rows} records ({} devices, {} secret versions, {} audit entries) into schema {:?} at {}; audit chain and records verified",
        counts[1],
        counts[4],
        counts[7],
        pg_config.schema,
        pg.target()
    ))
}

fn kind_index(e: &Exported) -> usize {
    match e {
        Exported::Line(_) => 0,
        Exported::Device(_) => 1,
        Exported::Key { .. } => 2,
        Exported::Token { .. } => 3,
        Exported::Version(_) => 4,
        Exported::Pool(_) => 5,
        Exported::Reset { .. } => 6,
        Exported::Audit(_) => 7,
        Exported::Operator(_) => 8,
        Exported::Bdk { .. } => 9,
    }
}

fn verify(
    sled: &SledStore,
    pg: &PgStore,
    head: &crate::audit::AuditVerdict,
    counts: &[u64; 10],
) -> Result<(), String> {
    let err = |e: StoreError| e.to_string();
    let anchor: crate::audit::Anchor = format!("{}:{}", head.entries, head.head).parse()?;
    let copied = crate::audit::verify(pg.audit_raw(0), Some(anchor), None, None).map_err(err)?;
    if let Some(bad) = copied.first_bad {
        return Err(format!("audit entry {}: {}", bad.seq, bad.reason));
    }
    if copied.entries != head.entries {
        return Err(format!(
            "{} audit entries, {} in sled",
            copied.entries, head.entries
        ));
    }
    if sled.lines().map_err(err)? != pg.lines().map_err(err)? {
        return Err("the lines differ".into());
    }
    let bdks = sled.bdks().map_err(err)?;
    if bdks != pg.bdks().map_err(err)? || bdks.len() as u64 != counts[9] {
        return Err("the DUKPT BDKs differ".into());
    }
    for b in &bdks {
        if sled.dukpt_next(&b.id).map_err(err)? != pg.dukpt_next(&b.id).map_err(err)? {
            return Err(format!("the allocation counter of BDK {} differs", b.id));
        }
    }
    let mut devices = 0u64;
    for d in sled.devices() {
        let d = d.map_err(err)?;
        if pg.device(d.serial).map_err(err)?.as_ref() != Some(&d) {
            return Err(format!("device {} differs", d.serial));
        }
        if pg
            .serial_for_key(&protocol_spec::spki::sha256(&d.spki))
            .map_err(err)?
            != Some(d.serial)
        {
            return Err(format!("the key of device {} is not bound to it", d.serial));
        }
        devices += 1;
    }
    if devices != counts[1] || pg.devices().count() as u64 != devices {
        return Err("device counts differ".into());
    }
    // Versions and history by serial: every serial with a version has (or had) a device.
    let mut serials: Vec<u64> = sled
        .devices()
        .filter_map(Result::ok)
        .map(|d| d.serial)
        .collect();
    for h in sled.export_history_serials().map_err(err)? {
        serials.push(h);
    }
    serials.sort_unstable();
    serials.dedup();
    let mut versions = 0u64;
    for s in serials {
        let a = sled.secret_versions(s).map_err(err)?;
        if a != pg.secret_versions(s).map_err(err)? {
            return Err(format!("the secret versions of serial {s} differ"));
        }
        versions += a.len() as u64;
        if sled.history(s).map_err(err)? != pg.history(s).map_err(err)? {
            return Err(format!("the reset history of serial {s} differs"));
        }
    }
    if versions != counts[4] {
        return Err(format!(
            "{versions} secret versions compared, {} copied",
            counts[4]
        ));
    }
    if sled.operator_revocations().map_err(err)? != pg.operator_revocations().map_err(err)? {
        return Err("the revoked operators differ".into());
    }
    for (name, want) in [
        ("operator_revocations", counts[8]),
        ("keys", counts[2]),
        ("tokens", counts[3]),
        ("secret_pool", counts[5]),
    ] {
        let got = pg.row_count(name).map_err(err)?;
        if got != want {
            return Err(format!("{name}: {got} rows, {want} in sled"));
        }
    }
    Ok(())
}
