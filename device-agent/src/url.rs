//! The CA URLs the agent accepts: `https://HOST:PORT` and `coap://HOST:PORT`.

use crate::AgentError;

/// Transport of a CA URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// HTTPS (TCP + TLS).
    Https,
    /// CoAP over UDP.
    Coap,
}

/// A parsed CA URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaUrl {
    /// Transport.
    pub scheme: Scheme,
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// Port (defaults: 443 for https, 5683 for coap).
    pub port: u16,
}

impl CaUrl {
    /// Parses `https://host[:port][/]` or `coap://host[:port][/]`.
    pub fn parse(text: &str) -> Result<Self, AgentError> {
        let bad = |why: &str| AgentError::Invalid(format!("--url {text:?}: {why}"));
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| bad("missing scheme"))?;
        let (scheme, default_port) = match scheme.to_ascii_lowercase().as_str() {
            "https" => (Scheme::Https, 443),
            "coap" => (Scheme::Coap, 5683),
            _ => return Err(bad("scheme must be https or coap")),
        };
        let authority = rest.split('/').next().unwrap_or("");
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad("bad port"))?,
                None if after.is_empty() => default_port,
                None => return Err(bad("junk after IPv6 address")),
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad("bad port"))?),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        Ok(CaUrl { scheme, host, port })
    }

    /// `host:port` for connecting.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_users_type() {
        let u = CaUrl::parse("https://127.0.0.1:8443").unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port),
            (Scheme::Https, "127.0.0.1", 8443)
        );
        let u = CaUrl::parse("coap://[::1]/").unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port),
            (Scheme::Coap, "::1", 5683)
        );
        assert_eq!(u.authority(), "[::1]:5683");
        assert!(CaUrl::parse("http://x").is_err());
        assert!(CaUrl::parse("https://:1").is_err());
    }
}
