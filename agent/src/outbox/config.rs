//! `[outbox]` of the agent config, owned by the outbox and only aggregated by
//! `crate::config`.

use std::time::Duration;

use protocol::v1::Class;
use serde::Deserialize;

use crate::setting::InvalidSetting;

/// What to do with an outbox database that cannot be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnCorruption {
    /// Exit with an error naming the directory.
    Refuse,
    /// Move the directory aside, log an error, start empty.
    Quarantine,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Disk budget for queued messages, bytes.
    pub max_bytes: u64,
    /// sled page cache, bytes.
    pub cache_bytes: u64,
    /// TTL of control messages, seconds (0 = no expiry).
    pub ttl_control_s: u64,
    /// TTL of model updates, seconds (0 = no expiry).
    pub ttl_model_s: u64,
    /// TTL of results, seconds (0 = no expiry).
    pub ttl_results_s: u64,
    /// TTL of telemetry, seconds (0 = no expiry).
    pub ttl_telemetry_s: u64,
    /// Policy for a corrupted database at start.
    pub on_corruption: OnCorruption,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            max_bytes: 64 * 1024 * 1024,
            cache_bytes: 8 * 1024 * 1024,
            ttl_control_s: 0,
            ttl_model_s: 604_800,
            ttl_results_s: 86_400,
            ttl_telemetry_s: 7_200,
            on_corruption: OnCorruption::Refuse,
        }
    }
}

impl OutboxConfig {
    /// Default TTL for a class; `None` means the message never expires.
    pub fn ttl(&self, class: Class) -> Option<Duration> {
        let s = match class {
            Class::Control => self.ttl_control_s,
            Class::Model => self.ttl_model_s,
            Class::Results => self.ttl_results_s,
            Class::Telemetry => self.ttl_telemetry_s,
        };
        (s > 0).then(|| Duration::from_secs(s))
    }

    /// Checks the values serde cannot; the message names the key (`outbox.KEY`).
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.max_bytes < 64 * 1024 {
            return Err("outbox.max_bytes must be at least 65536".into());
        }
        Ok(())
    }
}
