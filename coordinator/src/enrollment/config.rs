//! The `[enrollment]` section: which devices may join the fleet, and in which groups.
//!
//! Parsed once when the file is read ([`EnrollmentConfig::policy`] turns the hex keys into
//! verifying keys); `crate::config` only aggregates it.

use std::collections::BTreeSet;

use protocol::v1::deploy::{VerifyingKey, key_id, parse_public_key};
use serde::Deserialize;

use crate::config::ConfigError;

/// How a new enrollment request is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A request signed by a listed claim key is accepted at once, with that claim's groups;
    /// an unclaimed one waits for an operator.
    #[default]
    Claim,
    /// Every new request waits for `devices approve`.
    Manual,
    /// Ids in `allowlist` are accepted (no claim needed), every other id is rejected.
    Allowlist,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Claim => "claim",
            Mode::Manual => "manual",
            Mode::Allowlist => "allowlist",
        }
    }
}

/// One fleet claim key: its public half and the groups a device it claims joins.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimConfig {
    /// ed25519 public key, 64 hex digits (`edge-coordinator keygen` prints it).
    pub key: String,
    /// Deployment groups of the devices this key claims.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// `[enrollment]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnrollmentConfig {
    /// `claim`, `manual` or `allowlist`.
    pub mode: Mode,
    /// Fleet claim keys (`[[enrollment.claims]]`).
    pub claims: Vec<ClaimConfig>,
    /// Device ids accepted in `allowlist` mode.
    pub allowlist: Vec<String>,
    /// Groups of the devices accepted through the allowlist.
    pub allowlist_groups: Vec<String>,
    /// Most requests waiting for an operator; new unclaimed ones beyond it are rejected.
    pub max_pending: usize,
}

impl Default for EnrollmentConfig {
    fn default() -> Self {
        EnrollmentConfig {
            mode: Mode::Claim,
            claims: Vec::new(),
            allowlist: Vec::new(),
            allowlist_groups: Vec::new(),
            max_pending: 1000,
        }
    }
}

/// The section in the form decisions use.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub mode: Mode,
    /// Claim keys with their groups.
    pub claims: Vec<(VerifyingKey, Vec<String>)>,
    pub allowlist: BTreeSet<String>,
    pub allowlist_groups: Vec<String>,
    pub max_pending: usize,
}

impl Policy {
    /// The claim keys alone, as `protocol::v1::enroll::open_request` takes them.
    pub fn claim_keys(&self) -> Vec<VerifyingKey> {
        self.claims.iter().map(|(k, _)| *k).collect()
    }

    /// The groups of the claim signed by `key`.
    pub fn claim_groups(&self, key: &VerifyingKey) -> Option<&[String]> {
        self.claims
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, g)| g.as_slice())
    }
}

impl EnrollmentConfig {
    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.policy().map(drop)
    }

    /// Parses the claim keys and checks ids and groups.
    pub fn policy(&self) -> Result<Policy, ConfigError> {
        let invalid = |key: &'static str, reason: String| ConfigError::Invalid { key, reason };
        let mut claims: Vec<(VerifyingKey, Vec<String>)> = Vec::new();
        for (i, c) in self.claims.iter().enumerate() {
            let key = parse_public_key(&c.key)
                .map_err(|e| invalid("enrollment.claims.key", format!("claim {}: {e}", i + 1)))?;
            if claims.iter().any(|(k, _)| *k == key) {
                return Err(invalid(
                    "enrollment.claims.key",
                    format!("claim key {} is listed twice", key_id(&key)),
                ));
            }
            check_groups("enrollment.claims.groups", &c.groups)?;
            claims.push((key, c.groups.clone()));
        }
        for id in &self.allowlist {
            protocol::v1::validate_device_id(id).map_err(|_| {
                invalid(
                    "enrollment.allowlist",
                    format!(
                        "{id:?} is not a valid device id (1-64 characters from [A-Za-z0-9_.-])"
                    ),
                )
            })?;
        }
        check_groups("enrollment.allowlist_groups", &self.allowlist_groups)?;
        if self.mode == Mode::Allowlist && self.allowlist.is_empty() {
            return Err(invalid(
                "enrollment.allowlist",
                "must name at least one device in allowlist mode".into(),
            ));
        }
        Ok(Policy {
            mode: self.mode,
            claims,
            allowlist: self.allowlist.iter().cloned().collect(),
            allowlist_groups: self.allowlist_groups.clone(),
            max_pending: self.max_pending,
        })
    }
}

/// Group names are topic levels (`edge/v1/group/{group}/...`).
pub fn check_groups(key: &'static str, groups: &[String]) -> Result<(), ConfigError> {
    for g in groups {
        if protocol::v1::validate_device_id(g).is_err() {
            return Err(ConfigError::Invalid {
                key,
                reason: format!(
                    "group {g:?}: use 1-64 characters from [A-Za-z0-9_.-] (it is a topic level)"
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::v1::deploy::{SigningKey, public_key_hex};

    #[test]
    fn claims_parse_and_bad_values_name_the_key() {
        let key = SigningKey::from_bytes(&[3; 32]).verifying_key();
        let mut c = EnrollmentConfig {
            claims: vec![ClaimConfig {
                key: public_key_hex(&key),
                groups: vec!["lab".into()],
            }],
            ..EnrollmentConfig::default()
        };
        let p = c.policy().expect("valid");
        assert_eq!(p.claim_groups(&key), Some(&["lab".to_owned()][..]));
        c.claims[0].key = "abc".into();
        assert!(
            c.validate()
                .expect_err("bad key")
                .to_string()
                .contains("enrollment.claims.key")
        );
        c.claims[0].key = public_key_hex(&key);
        c.claims[0].groups = vec!["a/b".into()];
        assert!(
            c.validate()
                .expect_err("bad group")
                .to_string()
                .contains("enrollment.claims.groups")
        );
        c.claims.clear();
        c.mode = Mode::Allowlist;
        assert!(
            c.validate()
                .expect_err("empty")
                .to_string()
                .contains("enrollment.allowlist")
        );
        c.allowlist = vec!["pi 1".into()];
        assert!(c.validate().is_err());
        c.allowlist = vec!["pi-1".into()];
        c.validate().expect("valid");
    }
}
