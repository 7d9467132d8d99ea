//! The CA folder and its `config.toml`. Every field has a default that works.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// `config.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Listener addresses.
    pub listen: Listen,
    /// Token rules.
    pub token: TokenRules,
    /// Front-end limits.
    pub limits: Limits,
    /// Issuance.
    pub issuer: IssuerRules,
    /// Where the records are kept.
    pub store: StoreSettings,
}

/// `[store]`: the sled store in the CA folder (no `url`), or a PostgreSQL database that
/// several CA processes may share.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// `postgresql://USER@HOST:PORT/DB` (libpq URL or key=value form, `sslmode` and
    /// `target_session_attrs` included), never with a password in it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// File holding the database password, mode 0600 (relative to the CA folder);
    /// `IMPRINT_STORE_PASSWORD` in the environment takes precedence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// PEM file of the CA that issued the database server's certificate (relative to the CA
    /// folder): with it the connection uses TLS and verifies the server; `sslmode=require`
    /// needs it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The schema holding Imprint's tables (default `imprint`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// How often, in milliseconds, a node on a shared store (PostgreSQL) reads again what
    /// other nodes may have changed: the revoked serials (its mutual-TLS door and its CRL) and
    /// the lines (default 500; SPEC.md 3.4 states the bound it gives).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_ms: Option<u64>,
}

/// Issuance settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IssuerRules {
    /// Verify the CA's own signature on every certificate before it is stored (the lint's
    /// guard against a faulty signer). Costs one signature verification per enrollment.
    pub verify_own_signatures: bool,
    /// The CA key in a PKCS#11 token: an RFC 7512 URI
    /// (`pkcs11:token=T;object=O?module-path=M&pin-source=file:PATH`), never with a
    /// `pin-value` in it (the PIN comes from the pin-source file, or from `IMPRINT_PKCS11_PIN`).
    /// Absent: the key is the file `ca.key.pem` in the CA folder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pkcs11: Option<String>,
    /// With `pkcs11`: the most sessions the CA opens with the token at once (an HSM limits the
    /// sessions of a partition; the CA key, the operator CA's key and the DUKPT BDKs share them).
    /// A call that finds every session busy waits up to 5 seconds for one, then answers
    /// `unavailable`. Absent: the number of CPU threads (one per signing thread).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pkcs11_sessions: Option<usize>,
}

impl Default for IssuerRules {
    fn default() -> Self {
        IssuerRules {
            verify_own_signatures: true,
            pkcs11: None,
            pkcs11_sessions: None,
        }
    }
}

/// Where the server listens; `serve` flags override these.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    /// HTTPS enrollment.
    pub https: Option<SocketAddr>,
    /// CoAP enrollment (UDP).
    pub coap: Option<SocketAddr>,
    /// Mutual-TLS secret delivery.
    pub mtls: Option<SocketAddr>,
    /// Operators' admin API (mutual TLS with operator certificates; loopback by default).
    pub admin: Option<SocketAddr>,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            https: Some(SocketAddr::from(([127, 0, 0, 1], 8443))),
            coap: None,
            mtls: None,
            admin: Some(SocketAddr::from(([127, 0, 0, 1], 8445))),
        }
    }
}

/// Factory-token time rules.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenRules {
    /// Allowed clock difference with line stations, seconds.
    pub max_clock_skew: u64,
    /// Longest accepted token lifetime (`exp - iat`), seconds.
    pub max_lifetime: u64,
}

impl Default for TokenRules {
    fn default() -> Self {
        TokenRules {
            max_clock_skew: 120,
            max_lifetime: protocol_spec::token::MAX_LIFETIME,
        }
    }
}

/// Limits that protect the front ends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Concurrent TLS connections per device listener (HTTPS enrollment, mutual-TLS secrets);
    /// a connection past it is closed on accept.
    pub max_connections: usize,
    /// Concurrent TLS connections from one source address per device listener; a connection
    /// past it is closed on accept.
    pub max_connections_per_source: usize,
    /// Concurrent connections to the admin listener (slots of its own).
    pub admin_max_connections: usize,
    /// Concurrent connections to the admin listener from one source address.
    pub admin_max_connections_per_source: usize,
    /// Seconds a client may take for the TLS handshake, its request headers and its body, and
    /// the longest the server's writes of an answer may stall (a client that stops reading).
    pub request_timeout_secs: u64,
    /// Requests per second from one source address at the device doors (HTTPS enrollment,
    /// CoAP, mutual-TLS secrets, counted together; CoAP counts each new exchange, a Block1
    /// piece included); past it 429 / 4.29 with a retry hint of 1 s. 0: no limit.
    pub rate_per_source: u32,
    /// Requests one source address may make at once before its rate applies.
    pub rate_burst_per_source: u32,
    /// What one TLS handshake attempt costs its source at the device doors' TCP listeners
    /// (HTTPS enrollment, mutual-TLS secrets), in requests of `rate_per_source`, taken when the
    /// connection is accepted: past the rate the connection is closed at once, before the
    /// handshake and its signature. 0: handshakes are not counted.
    pub rate_handshake_cost: u32,
    /// Requests per second from one source address at the admin door, a rate of its own (so
    /// that device traffic from an address never uses up an operator's); each accepted
    /// connection takes `rate_handshake_cost` from it too. Past it 429 with Retry-After, or the
    /// connection closed before the handshake. 0: no limit.
    pub admin_rate_per_source: u32,
    /// Requests one source address may make at once at the admin door before its rate applies.
    pub admin_rate_burst_per_source: u32,
    /// Source addresses whose rate is remembered at once (the least recently seen is
    /// forgotten first, and starts again with a full burst).
    pub rate_sources: usize,
    /// CoAP exchanges remembered for duplicate detection from one source address; past it
    /// that source's oldest is forgotten.
    pub coap_exchanges_per_source: usize,
    /// CoAP exchanges remembered for duplicate detection from all sources.
    pub coap_exchanges: usize,
    /// CoAP request bodies in Block1 reassembly from one source address; past it that
    /// source's oldest is forgotten.
    pub coap_assemblies_per_source: usize,
    /// CoAP request bodies in Block1 reassembly from all sources.
    pub coap_assemblies: usize,
    /// CoAP enrollment answers held for their next Block2 pieces, for one source address;
    /// past it that source's oldest is forgotten.
    pub coap_block2_per_source: usize,
    /// CoAP enrollment answers held for their next Block2 pieces, for all sources.
    pub coap_block2: usize,
}

impl Limits {
    /// Settings that cannot work together, refused when the server starts.
    pub fn check(&self) -> Result<(), String> {
        // A handshake that costs more than a whole burst could never be made.
        for (rate, burst_name, burst, who) in [
            (
                self.rate_per_source,
                "rate_burst_per_source",
                self.rate_burst_per_source,
                "source",
            ),
            (
                self.admin_rate_per_source,
                "admin_rate_burst_per_source",
                self.admin_rate_burst_per_source,
                "operator",
            ),
        ] {
            if rate > 0 && self.rate_handshake_cost > burst {
                return Err(format!(
                    "[limits] rate_handshake_cost ({}) is more than {burst_name} ({burst}): no {who} could ever make a TLS handshake",
                    self.rate_handshake_cost
                ));
            }
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 2048,
            max_connections_per_source: 512,
            admin_max_connections: 256,
            admin_max_connections_per_source: 64,
            request_timeout_secs: 10,
            // Above what one address sends on this 2-core machine when many devices share it
            // (a line gateway, a NAT, the simulator's loss relay: about 2,600 CoAP devices/s).
            rate_per_source: 5000,
            rate_burst_per_source: 10_000,
            rate_handshake_cost: 1,
            // An operator's script of lookups, one request each, well within it; a scan of
            // the door's routes or a flood of handshakes from one address is not.
            admin_rate_per_source: 200,
            admin_rate_burst_per_source: 400,
            rate_sources: 100_000,
            coap_exchanges_per_source: 50_000,
            coap_exchanges: 200_000,
            coap_assemblies_per_source: 256,
            coap_assemblies: 4096,
            coap_block2_per_source: 256,
            coap_block2: 16_384,
        }
    }
}

impl Limits {
    /// The CoAP front end's limits.
    pub fn coap(&self) -> crate::doors::coap::CoapConfig {
        crate::doors::coap::CoapConfig {
            max_remembered_per_source: self.coap_exchanges_per_source,
            max_remembered: self.coap_exchanges,
            max_assemblies_per_source: self.coap_assemblies_per_source,
            max_assemblies: self.coap_assemblies,
            max_representations_per_source: self.coap_block2_per_source,
            max_representations: self.coap_block2,
            ..crate::doors::coap::CoapConfig::default()
        }
    }
}

/// The files of a CA folder.
#[derive(Debug, Clone)]
pub struct CaDir {
    root: PathBuf,
}

impl CaDir {
    /// The folder at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        CaDir { root: root.into() }
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `config.toml`.
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    /// The CA private key, PEM, mode 0600.
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key.pem")
    }
    /// The CA certificate, PEM.
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.pem")
    }
    /// The key-encryption key for secrets at rest (32 bytes), mode 0600.
    pub fn kek(&self) -> PathBuf {
        self.root.join("kek.bin")
    }
    /// The key-encryption key sealed by the CA's PKCS#11 token (instead of `kek.bin`), 0600.
    pub fn kek_sealed(&self) -> PathBuf {
        self.root.join("kek.sealed")
    }
    /// The first audit entry sealed by the audit key, as this CA folder recorded it
    /// ([`crate::audit::read_sealed_from`]): outside the store, so that whoever can write the
    /// store cannot pass a chain stripped of its MACs for one written before the key.
    pub fn audit_sealed(&self) -> PathBuf {
        self.root.join("audit.sealed")
    }
    /// The HTTPS server certificate (issued by the CA), PEM.
    pub fn tls_cert(&self) -> PathBuf {
        self.root.join("tls.pem")
    }
    /// The HTTPS server key, PEM, mode 0600.
    pub fn tls_key(&self) -> PathBuf {
        self.root.join("tls.key.pem")
    }
    /// The HTTPS server key sealed by the CA key's PKCS#11 token (a CA made with `init
    /// --pkcs11`): magic, IV, AES-GCM ciphertext and tag.
    pub fn tls_key_sealed(&self) -> PathBuf {
        self.root.join("tls.key.sealed")
    }
    /// The operator CA's certificate, PEM: the admin listener trusts only this root.
    pub fn operator_ca_cert(&self) -> PathBuf {
        self.root.join("operators-ca.pem")
    }
    /// The operator CA's key, PEM, mode 0600.
    pub fn operator_ca_key(&self) -> PathBuf {
        self.root.join("operators-ca.key.pem")
    }
    /// Where `operator add` writes operator certificates and keys by default.
    pub fn operators(&self) -> PathBuf {
        self.root.join("operators")
    }
    /// The sled store.
    pub fn store(&self) -> PathBuf {
        self.root.join("store")
    }

    /// Reads `config.toml` (defaults when absent), naming the file and field on error.
    pub fn load_config(&self) -> Result<Config, String> {
        let path = self.config();
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handshake that costs more than a source's whole burst could never be made: refused.
    #[test]
    fn a_handshake_cost_over_the_burst_is_refused() {
        assert_eq!(Limits::default().check(), Ok(()));
        let over = Limits {
            rate_handshake_cost: 11,
            rate_burst_per_source: 10,
            ..Limits::default()
        };
        assert!(
            over.check()
                .is_err_and(|e| e.contains("rate_handshake_cost (11)")),
            "{:?}",
            over.check()
        );
        // With no rate at all, nothing is counted.
        let off = Limits {
            rate_per_source: 0,
            ..over
        };
        assert_eq!(off.check(), Ok(()));
        // The admin door's burst too.
        let admin = Limits {
            rate_handshake_cost: 5,
            admin_rate_burst_per_source: 4,
            ..Limits::default()
        };
        assert!(
            admin
                .check()
                .is_err_and(|e| e.contains("admin_rate_burst_per_source (4)")),
            "{:?}",
            admin.check()
        );
        let admin_off = Limits {
            admin_rate_per_source: 0,
            ..admin
        };
        assert_eq!(admin_off.check(), Ok(()));
    }
}
