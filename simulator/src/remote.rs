//! A CA that runs elsewhere (`--ca URL...`): its enrollment endpoints, its secrets door, the
//! certificate the devices pin and the line stations the simulator plays, all checked before
//! the run so that a mistake is named by its flag instead of showing up as a million failed
//! devices.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use device_agent::coap::CoapClient;
use device_agent::https::HttpsClient;
use device_agent::url::{CaUrl, Scheme};
use protocol_spec::coap::TransmissionParams;
use protocol_spec::profile::CertProfile;

use crate::line::Lines;

/// What the command line says about a remote CA.
#[derive(Debug)]
pub struct RemoteArgs<'a> {
    /// `--ca`, as typed.
    pub ca: &'a [String],
    /// `--mtls`, as typed.
    pub mtls: &'a [String],
    /// `--ca-cert`.
    pub ca_cert: Option<&'a Path>,
    /// `--transport`, when given.
    pub transport: Option<Scheme>,
    /// Whether devices fetch and acknowledge secrets (not `--no-secrets`).
    pub secrets: bool,
    /// `--devices`.
    pub devices: u64,
    /// `--line-key`.
    pub line_keys: &'a [PathBuf],
    /// `--line-id`.
    pub line_ids: &'a [String],
    /// `--serials`.
    pub serials: &'a [String],
}

/// A remote CA, checked.
pub struct RemoteCa {
    /// Transport of every enrollment endpoint.
    pub scheme: Scheme,
    /// Enrollment endpoints (at least one), with the address each resolved to.
    pub enroll: Vec<(CaUrl, SocketAddr)>,
    /// Secrets doors (https); empty with `--no-secrets`.
    pub secrets: Vec<(CaUrl, SocketAddr)>,
    /// The CA certificate the devices pin, DER.
    pub ca_der: Vec<u8>,
    /// The pinned CA.
    pub profile: CertProfile,
    /// Where it was read from.
    pub ca_cert: PathBuf,
    /// The line stations.
    pub lines: Lines,
}

impl RemoteCa {
    /// Reads and checks the flags: URLs, transport, the CA certificate, the line stations,
    /// and whether `--devices` fits in their serials.
    pub fn from_args(a: &RemoteArgs<'_>) -> Result<Self, String> {
        let enroll =
            a.ca.iter()
                .map(|t| resolve("--ca", t))
                .collect::<Result<Vec<_>, _>>()?;
        let Some(((first, _), rest)) = enroll.split_first() else {
            return Err("--ca needs at least one URL".into());
        };
        if let Some((other, _)) = rest.iter().find(|(u, _)| u.scheme != first.scheme) {
            return Err(format!(
                "--ca {} and --ca {} use different transports; the CA nodes of one run share one \
                 (coap:// or https://)",
                show(first),
                show(other)
            ));
        }
        let scheme = first.scheme;
        if let Some(t) = a.transport
            && t != scheme
        {
            return Err(format!(
                "--transport {} disagrees with --ca {}: with --ca the URL's scheme sets the \
                 transport (drop --transport, or give --ca {}://HOST:PORT)",
                scheme_name(t),
                show(first),
                scheme_name(t)
            ));
        }
        let secrets = if a.secrets {
            if a.mtls.is_empty() {
                return Err(
                    "--ca needs --mtls https://HOST:PORT (the CA's secrets door, `ca-server serve \
                     --mtls`), or --no-secrets to skip the secret phases"
                        .into(),
                );
            }
            let doors = a
                .mtls
                .iter()
                .map(|t| resolve("--mtls", t))
                .collect::<Result<Vec<_>, _>>()?;
            if let Some((u, _)) = doors.iter().find(|(u, _)| u.scheme != Scheme::Https) {
                return Err(format!(
                    "--mtls {}: the secrets door is mutual TLS: give https://HOST:PORT",
                    show(u)
                ));
            }
            doors
        } else {
            Vec::new()
        };
        let path = a.ca_cert.ok_or(
            "--ca needs --ca-cert CA.pem: the CA certificate the devices pin (ca.pem in the CA's \
             folder)",
        )?;
        let ca_der = read_ca_cert(path)?;
        let profile = CertProfile::from_ca_der(&ca_der)
            .map_err(|e| format!("--ca-cert {}: {e}", path.display()))?;
        let lines = crate::line::load(a.line_keys, a.line_ids, a.serials)?;
        if a.devices > lines.capacity() {
            return Err(format!(
                "--devices {} does not fit in the line stations' serials (--serials {}: {} in \
                 all); give --devices {} or fewer, or another --line-key/--line-id/--serials",
                a.devices,
                a.serials.join(", --serials "),
                lines.capacity(),
                lines.capacity()
            ));
        }
        Ok(RemoteCa {
            scheme,
            enroll,
            secrets,
            ca_der,
            profile,
            ca_cert: path.to_path_buf(),
            lines,
        })
    }

    /// The enrollment endpoints, space-separated (for messages and the report).
    pub fn name(&self) -> String {
        self.enroll
            .iter()
            .map(|(u, _)| show(u))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Asks every enrollment endpoint for its CA certificate (it must be `--ca-cert`) and
    /// opens a TCP connection to every secrets door, so that an unreachable node or the wrong
    /// certificate is reported before the run.
    pub async fn preflight(&self) -> Result<(), String> {
        for (url, _) in &self.enroll {
            let got = match url.scheme {
                Scheme::Coap => {
                    // A short exchange lifetime: an absent CA is reported in seconds.
                    let client = CoapClient::new(url.clone()).with_params(TransmissionParams {
                        ack_timeout_ms: 500,
                        ack_random_factor: 1.5,
                        max_retransmit: 3,
                    });
                    match client.socket().await {
                        Ok(mut sock) => client.ca_certificate(&mut sock).await,
                        Err(e) => Err(e),
                    }
                }
                Scheme::Https => match HttpsClient::new(url.clone(), &self.ca_der) {
                    Ok(client) => client.ca_certificate().await,
                    Err(e) => Err(e),
                },
            }
            .map_err(|e| {
                format!(
                    "--ca {}: {e} (is a CA serving {} there, and is --ca-cert {} its certificate?)",
                    show(url),
                    scheme_name(url.scheme),
                    self.ca_cert.display()
                )
            })?;
            if got != self.ca_der {
                return Err(format!(
                    "--ca {} serves another CA certificate than --ca-cert {}",
                    show(url),
                    self.ca_cert.display()
                ));
            }
        }
        for (url, addr) in &self.secrets {
            match tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
                .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("--mtls {}: {e}", show(url))),
                Err(_) => {
                    return Err(format!("--mtls {}: no connection within 5 s", show(url)));
                }
            }
        }
        Ok(())
    }
}

/// Whether a device on a 127.0.0.0/8 source address reaches `addr` (devices spread their
/// source addresses over loopback only when every endpoint is on loopback).
pub fn on_loopback(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(ip) => ip.is_loopback(),
        IpAddr::V6(_) => false,
    }
}

fn scheme_name(s: Scheme) -> &'static str {
    match s {
        Scheme::Coap => "coap",
        Scheme::Https => "https",
    }
}

fn show(u: &CaUrl) -> String {
    format!("{}://{}", scheme_name(u.scheme), u.authority())
}

/// Parses a URL given to `flag` and resolves its host (an IPv4 address first, as the devices'
/// sockets prefer).
fn resolve(flag: &str, text: &str) -> Result<(CaUrl, SocketAddr), String> {
    let url = CaUrl::parse(text).map_err(|e| {
        let why = e.to_string();
        let why = why
            .strip_prefix(&format!("--url {text:?}: "))
            .unwrap_or(&why)
            .to_string();
        format!("{flag} {text}: {why}")
    })?;
    let addrs: Vec<SocketAddr> = url
        .authority()
        .to_socket_addrs()
        .map_err(|e| format!("{flag} {text}: {e}"))?
        .collect();
    let addr = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{flag} {text}: the host has no address"))?;
    Ok((url, addr))
}

/// The CA certificate: PEM (`ca.pem`), or DER.
fn read_ca_cert(path: &Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("--ca-cert {}: {e}", path.display()))?;
    match std::str::from_utf8(&bytes)
        .ok()
        .and_then(protocol_spec::profile::cert_from_pem)
    {
        Some(der) => Ok(der),
        None if bytes.first() == Some(&0x30) => Ok(bytes),
        None => Err(format!(
            "--ca-cert {}: not a PEM CERTIFICATE (nor DER)",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn args<'a>(ca: &'a [String], transport: Option<Scheme>) -> RemoteArgs<'a> {
        RemoteArgs {
            ca,
            mtls: &[],
            ca_cert: None,
            transport,
            secrets: false,
            devices: 1,
            line_keys: &[],
            line_ids: &[],
            serials: &[],
        }
    }

    fn err(a: &RemoteArgs<'_>) -> String {
        match RemoteCa::from_args(a) {
            Ok(_) => panic!("accepted {a:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn names_the_flag_at_fault() {
        let mixed = [
            "coap://127.0.0.1:5683".into(),
            "https://127.0.0.1:8443".into(),
        ];
        assert!(err(&args(&mixed, None)).contains("different transports"));
        let coap = ["coap://127.0.0.1:5683".to_string()];
        let e = err(&args(&coap, Some(Scheme::Https)));
        assert!(
            e.contains("--transport https disagrees with --ca coap://127.0.0.1:5683"),
            "{e}"
        );
        let bad = ["http://127.0.0.1:80".to_string()];
        let e = err(&args(&bad, None));
        assert!(e.starts_with("--ca http://127.0.0.1:80: scheme"), "{e}");
        let e = err(&args(&coap, None));
        assert!(e.contains("--ca-cert"), "{e}");
        let mut a = args(&coap, None);
        a.secrets = true;
        assert!(err(&a).contains("--mtls"));
        let mtls = ["coap://127.0.0.1:1".to_string()];
        a.mtls = &mtls;
        assert!(err(&a).contains("mutual TLS"));
    }
}
