//! Stored records as an operator sees them.

use protocol_spec::PublicKey;
use protocol_spec::profile::cert_pem;

use super::{AdminProblem, BindingView, DeviceView, LineView, OperatorView, ResetView, SecretView};
use crate::audit::rfc3339;
use crate::records::{DeviceRecord, DeviceStatus, LineRecord, ResetRecord, SecretRecord};
use crate::service::CaService;

/// Every operator issued from this CA folder, and every revoked one, by name.
pub fn operator_views(
    issued: &[crate::operators::IssuedOperator],
    revoked: &[crate::records::OperatorRevocation],
) -> Vec<OperatorView> {
    let mut views: std::collections::BTreeMap<String, OperatorView> = issued
        .iter()
        .map(|o| {
            (
                o.name.clone(),
                OperatorView {
                    name: o.name.clone(),
                    status: "active".into(),
                    role: Some(o.role.name().to_string()),
                    certificate_serial: Some(o.serial.clone()),
                    expires_at: Some(o.expires_at),
                    revoked_at: None,
                    revoked_by: None,
                },
            )
        })
        .collect();
    for r in revoked {
        let v = views.entry(r.name.clone()).or_insert_with(|| OperatorView {
            name: r.name.clone(),
            status: String::new(),
            role: None,
            certificate_serial: None,
            expires_at: None,
            revoked_at: None,
            revoked_by: None,
        });
        v.status = "revoked".into();
        v.revoked_at = Some(r.revoked_at);
        v.revoked_by = Some(r.actor.clone());
    }
    views.into_values().collect()
}

/// A device's full record as an operator sees it.
pub fn device_view(service: &CaService, serial: u64) -> Result<DeviceView, AdminProblem> {
    let store = service.store();
    let err = |e| AdminProblem::internal("store", e);
    let current = store.device(serial).map_err(err)?;
    let history = store.history(serial).map_err(err)?;
    if current.is_none() && history.is_empty() {
        return Err(AdminProblem::not_found(format!("no device {serial}")));
    }
    let secrets = store.secret_versions(serial).map_err(err)?;
    Ok(DeviceView {
        serial,
        status: match &current {
            Some(d) if d.status == DeviceStatus::Revoked => "revoked",
            Some(_) => "active",
            None => "reset",
        }
        .to_string(),
        binding: current.as_ref().map(binding_view),
        secrets: secrets.iter().map(secret_view).collect(),
        history: history.iter().map(reset_view).collect(),
    })
}

fn fingerprint(spki: &[u8]) -> String {
    format!("sha256:{}", hex::encode(protocol_spec::spki::sha256(spki)))
}

fn binding_view(d: &DeviceRecord) -> BindingView {
    BindingView {
        key_fingerprint: fingerprint(&d.spki),
        key_algorithm: PublicKey::from_spki_der(&d.spki)
            .map(|k| k.algorithm.to_string())
            .unwrap_or_else(|_| "unknown".into()),
        line: d.line.clone(),
        token_id: hex::encode(&d.token_id),
        enrolled_at: d.enrolled_at,
        enrolled: rfc3339(d.enrolled_at),
        generation: crate::records::generation_of(&d.certificate),
        revoked_at: d.revoked_at,
        certificate: cert_pem(&d.certificate),
    }
}

fn secret_view(s: &SecretRecord) -> SecretView {
    SecretView {
        initial_key_id: crate::ra::rules::dukpt_claim(s).map(|_| s.key_id.clone()),
        key_id: s.key_id.clone(),
        version: s.version,
        source: s.source.clone(),
        kcv: hex::encode(&s.kcv),
        created_at: s.created_at,
        delivered_at: s.delivered_at,
        confirmed_at: s.confirmed_at,
        retired_at: s.retired_at,
    }
}

fn reset_view(r: &ResetRecord) -> ResetView {
    ResetView {
        reset_at: r.reset_at,
        actor: r.actor.clone(),
        status: match r.device.status {
            DeviceStatus::Active => "active",
            DeviceStatus::Revoked => "revoked",
        }
        .to_string(),
        binding: binding_view(&r.device),
    }
}

/// A line as an operator sees it.
pub fn line_view(l: &LineRecord) -> LineView {
    LineView {
        id: l.id.clone(),
        first_serial: l.first_serial,
        last_serial: l.last_serial,
        quota: l.quota,
        enrolled: l.enrolled,
        rate: l.rate,
        active: l.active,
        key_fingerprint: fingerprint(&l.public_key),
        created_at: l.created_at,
        secret_source: l.secret_source.to_string(),
    }
}
