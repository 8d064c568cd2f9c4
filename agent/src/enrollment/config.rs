//! `[enrollment]` of the agent config, owned by the enrollment part and only aggregated by
//! `crate::config`: the fleet claim key, the coordinator pin and the request's retry pace.

use std::path::PathBuf;

use protocol::v1::auth::PublicIdentity;
use serde::Deserialize;

use crate::setting::InvalidSetting;

/// Longest wait between two requests while no answer accepts the device, ms (5 minutes).
pub const MAX_RETRY_MS: u64 = 300_000;

/// `[enrollment]`: how the device asks to join the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnrollmentConfig {
    /// Fleet claim key (key file, mode 0600, made by `edge-coordinator keygen --out claim.key`)
    /// that co-signs the enrollment request, so a coordinator in `claim` mode accepts the device
    /// at once. Unset: the request is unclaimed and waits for an operator or an allowlist.
    pub claim_key_file: Option<PathBuf>,
    /// The coordinator's public identity, as `edge-coordinator identity` prints it. Set: only
    /// answers signed by it count. Unset: the key named in the first accepted answer about this
    /// device's key is trusted from then on (trust on first use, logged at WARN).
    pub coordinator: Option<CoordinatorPin>,
    /// Wait before the first repeat of an unanswered request, ms; it doubles per repeat (with
    /// jitter) up to 5 minutes.
    pub retry_ms: u64,
}

impl Default for EnrollmentConfig {
    fn default() -> Self {
        EnrollmentConfig {
            claim_key_file: None,
            coordinator: None,
            retry_ms: 5_000,
        }
    }
}

/// `enrollment.coordinator`: the coordinator's public keys, hex. Our own type, so the config
/// schema does not change when the wire type does.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorPin {
    /// ed25519 verifying key, 64 hex digits.
    pub sign: String,
    /// x25519 public key, 64 hex digits.
    pub agree: String,
}

impl CoordinatorPin {
    pub fn public(&self) -> PublicIdentity {
        PublicIdentity {
            sign: self.sign.clone(),
            agree: self.agree.clone(),
        }
    }
}

impl EnrollmentConfig {
    /// Checks the values serde cannot; the message names the key (`enrollment.KEY`).
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self
            .claim_key_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(
                "enrollment.claim_key_file is empty; remove the key for an unclaimed request"
                    .into(),
            );
        }
        if let Some(pin) = &self.coordinator {
            pin.public()
                .validate()
                .map_err(|e| format!("enrollment.coordinator: {e}"))?;
        }
        if !(100..=MAX_RETRY_MS).contains(&self.retry_ms) {
            return Err(
                format!("enrollment.retry_ms must be between 100 and {MAX_RETRY_MS}").into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_pin_or_retry_is_named() {
        let id = protocol::v1::auth::Identity::generate().public();
        let ok: EnrollmentConfig = toml::from_str(&format!(
            "claim_key_file = \"/etc/edge-agent/claim.key\"\ncoordinator = {{ sign = \"{}\", agree = \"{}\" }}\n",
            id.sign, id.agree
        ))
        .expect("parses");
        ok.validate().expect("valid");
        assert_eq!(
            ok.coordinator.as_ref().map(CoordinatorPin::public),
            Some(id)
        );

        let bad: EnrollmentConfig =
            toml::from_str("coordinator = { sign = \"zz\", agree = \"00\" }\n").expect("parses");
        let err = bad.validate().expect_err("bad pin").to_string();
        assert!(err.contains("enrollment.coordinator"), "{err}");
        let slow = EnrollmentConfig {
            retry_ms: MAX_RETRY_MS + 1,
            ..EnrollmentConfig::default()
        };
        assert!(
            slow.validate()
                .expect_err("too slow")
                .0
                .contains("retry_ms")
        );
    }
}
