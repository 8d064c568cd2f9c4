//! The `[api]` section: where the HTTP API, `/metrics` and the dashboard listen, who may call
//! them (bearer tokens, stored as sha256 digests) and how much the coordinator keeps in memory
//! for them. `crate::config` only aggregates it.

use std::net::SocketAddr;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::ConfigError;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Every GET: devices, deployments, federated tasks, offload, journal, metrics.
    Read,
    /// Read, plus decisions: enrollment, starting and stopping federated tasks.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }
}

/// One API token: only the sha256 of the secret is kept (`edge-coordinator api-token` prints
/// the secret once and this entry).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// A name for logs (who called).
    pub name: String,
    /// sha256 of the token, 64 lowercase hex digits.
    pub sha256: String,
    /// `read` or `admin`.
    pub scope: Scope,
}

/// `[api]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Serve the API at all.
    pub enabled: bool,
    /// Listen address; port 0 picks a free one (written to `state_dir/api.json`).
    pub listen: SocketAddr,
    /// Largest request body, bytes; larger ones get 413.
    pub max_body_bytes: usize,
    /// Telemetry samples kept in memory per device for the history endpoints and charts.
    pub history_samples: usize,
    /// Most devices with per-device series on `/metrics` (label cardinality); 0 turns them off.
    pub metrics_max_devices: usize,
    /// Serve `/metrics` without a token (Prometheus scrapers often have none).
    pub metrics_public: bool,
    /// Largest deployment package `POST /api/deployments` takes, bytes; larger ones get 413.
    /// The whole package is held in memory while it is checked.
    pub max_upload_bytes: usize,
    /// Public keys (64 hex digits, as `keygen` prints them) whose signed deployments the API
    /// accepts: the keys the devices trust (`[deploy] trusted_keys`). Empty: uploads refused.
    pub deploy_keys: Vec<String>,
    /// Tokens (`[[api.tokens]]`).
    pub tokens: Vec<TokenConfig>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 8480)),
            max_body_bytes: 65536,
            history_samples: 120,
            metrics_max_devices: 1000,
            metrics_public: false,
            max_upload_bytes: 64 * 1024 * 1024,
            deploy_keys: Vec::new(),
            tokens: Vec::new(),
        }
    }
}

impl ApiConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        if self.max_body_bytes < 1024 {
            return invalid("api.max_body_bytes", "must be at least 1024".into());
        }
        if self.history_samples == 0 || self.history_samples > 100_000 {
            return invalid("api.history_samples", "must be 1 to 100000".into());
        }
        if self.max_upload_bytes < 1024 {
            return invalid("api.max_upload_bytes", "must be at least 1024".into());
        }
        if let Err(e) = protocol::v1::deploy::TrustedKeys::from_hex(&self.deploy_keys) {
            return invalid("api.deploy_keys", e.to_string());
        }
        for (i, t) in self.tokens.iter().enumerate() {
            if t.name.is_empty() {
                return invalid("api.tokens", format!("token {} has an empty name", i + 1));
            }
            if t.sha256.len() != 64
                || !t
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return invalid(
                    "api.tokens",
                    format!(
                        "token {:?}: sha256 must be 64 lowercase hex digits (edge-coordinator api-token prints it)",
                        t.name
                    ),
                );
            }
        }
        Ok(())
    }
}

/// Hex sha256 of a token, as stored in config.
pub fn token_digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random token: `edge_` and 32 random bytes in hex.
pub fn new_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("edge_{}", hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_must_be_digests() {
        let mut c = ApiConfig::default();
        c.tokens.push(TokenConfig {
            name: "ops".into(),
            sha256: token_digest(&new_token()),
            scope: Scope::Read,
        });
        assert!(c.validate().is_ok());
        c.tokens[0].sha256 = "edge_secret".into();
        let e = c
            .validate()
            .expect_err("a plain token is refused")
            .to_string();
        assert!(e.contains("api.tokens") && e.contains("ops"), "{e}");
    }
}
