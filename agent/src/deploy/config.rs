//! `[deploy]` of the agent config, owned by the deployment code and only aggregated by
//! `crate::config`. The one deploy config type: the file's section is what the [`Deployer`]
//! runs with, and the trusted keys are parsed once, when the file is read. The device's
//! groups are not here: the coordinator assigns them at enrollment.
//!
//! [`Deployer`]: super::Deployer

use protocol::v1::deploy::TrustedKeys;
use serde::Deserialize;

use crate::setting::InvalidSetting;

/// `[deploy]`: signed deployments over MQTT.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeployConfig {
    /// Hex ed25519 public keys (from `edge-coordinator keygen`) a manifest must be signed
    /// with. Empty: every deployment is rejected.
    pub trusted_keys: TrustedKeyList,
    /// The removed `groups` key, kept only so a file that still has it gets an error saying
    /// where groups come from now instead of "unknown field".
    #[serde(rename = "groups")]
    removed_groups: RemovedGroups,
    /// Largest single artifact (module or model) accepted, bytes.
    pub max_artifact_bytes: u64,
    /// Most artifacts one deployment may list.
    pub max_artifacts: u32,
    /// Largest sum of artifact sizes of one deployment, bytes; also bounds the memory a
    /// download holds.
    pub max_total_bytes: u64,
    /// Ask the coordinator again for missing chunks after this long without one, ms; each
    /// next request waits twice as long, up to 8x.
    pub resend_after_ms: u64,
    /// Give a download up after this many resend requests in a row brought nothing.
    pub max_stalled_resends: u32,
}

impl Default for DeployConfig {
    fn default() -> Self {
        DeployConfig {
            trusted_keys: TrustedKeyList::default(),
            removed_groups: RemovedGroups,
            max_artifact_bytes: 16 * 1024 * 1024,
            max_artifacts: 16,
            max_total_bytes: 32 * 1024 * 1024,
            resend_after_ms: 10_000,
            max_stalled_resends: 10,
        }
    }
}

impl DeployConfig {
    /// Checks the values serde cannot (the keys were checked as they were parsed); the
    /// message names the key (`deploy.KEY`).
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.max_artifacts == 0 || self.max_artifact_bytes == 0 {
            return Err(
                "deploy.max_artifacts and deploy.max_artifact_bytes must be at least 1".into(),
            );
        }
        if self.max_total_bytes < self.max_artifact_bytes {
            return Err("deploy.max_total_bytes must be at least deploy.max_artifact_bytes".into());
        }
        if self.resend_after_ms < 100 {
            return Err("deploy.resend_after_ms must be at least 100".into());
        }
        Ok(())
    }
}

/// `deploy.groups`, which no longer exists: reading it is always an error.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct RemovedGroups;

/// What a config that still sets `deploy.groups` is told.
pub const GROUPS_REMOVED: &str = "deploy.groups was removed: deployment groups are assigned by the coordinator at enrollment (a claim key's groups, `edge-coordinator devices approve ID --group G`, or the allowlist's); delete the key";

impl<'de> Deserialize<'de> for RemovedGroups {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(serde::de::Error::custom(GROUPS_REMOVED))
    }
}

/// `deploy.trusted_keys`: the hex strings as written (for equality and messages) and the keys
/// they parse to, parsed once while the file is read. Our own type, so the config schema
/// stays a list of strings and the protocol's key type does not leak into it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(try_from = "Vec<String>")]
pub struct TrustedKeyList {
    hex: Vec<String>,
    keys: TrustedKeys,
}

impl TrustedKeyList {
    /// Parses hex public keys; the error names the bad one.
    pub fn from_hex(hex: Vec<String>) -> Result<Self, protocol::v1::deploy::DeployError> {
        let keys = TrustedKeys::from_hex(&hex)?;
        Ok(TrustedKeyList { hex, keys })
    }

    /// The parsed keys, for verifying manifests and round messages.
    pub fn keys(&self) -> &TrustedKeys {
        &self.keys
    }

    pub fn is_empty(&self) -> bool {
        self.hex.is_empty()
    }
}

/// A `deploy.trusted_keys` entry that is not an ed25519 public key.
#[derive(Debug, thiserror::Error)]
#[error("deploy.trusted_keys: {0}")]
pub struct BadTrustedKey(#[from] protocol::v1::deploy::DeployError);

impl TryFrom<Vec<String>> for TrustedKeyList {
    type Error = BadTrustedKey;

    fn try_from(hex: Vec<String>) -> Result<Self, BadTrustedKey> {
        Ok(TrustedKeyList::from_hex(hex)?)
    }
}

/// Equal when the same keys are written the same way: what a config comparison means.
impl PartialEq for TrustedKeyList {
    fn eq(&self, other: &Self) -> bool {
        self.hex == other.hex
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_keys_are_parsed_with_the_file_and_a_bad_one_is_named() {
        let key = protocol::v1::deploy::SigningKey::from_bytes(&[3; 32]);
        let hex = protocol::v1::deploy::public_key_hex(&key.verifying_key());
        let cfg: DeployConfig =
            toml::from_str(&format!("trusted_keys = [\"{hex}\"]\n")).expect("parses");
        let id = protocol::v1::deploy::key_id(&key.verifying_key());
        assert!(cfg.trusted_keys.keys().get(&id).is_some());

        let err = toml::from_str::<DeployConfig>("trusted_keys = [\"zz\"]\n")
            .expect_err("bad key")
            .to_string();
        assert!(err.contains("deploy.trusted_keys"), "{err}");
        assert!(err.contains("zz"), "{err}");
    }

    #[test]
    fn groups_are_refused_with_where_they_come_from_now() {
        let err = toml::from_str::<DeployConfig>("max_artifacts = 4\ngroups = [\"lab\"]\n")
            .expect_err("removed key")
            .to_string();
        assert!(err.contains(GROUPS_REMOVED), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }
}
