//! The agent's configuration: one typed struct read from TOML.
//!
//! The commented default file `config/agent.toml` is embedded here, printed by
//! `edge-agent generate-config`, and a test checks it parses to exactly [`Config::default`], so
//! the documentation and the code cannot drift apart.
//!
//! Each part owns its section (type, defaults, checks): `[mqtt]` the uplink, `[outbox]` the
//! outbox, `[offload]` the offloader, `[deploy]` the deployer, `[enrollment]` enrollment,
//! `[dataset]` the dataset store, `[sandbox]` the sandbox. This file only aggregates them, so dependencies run one way: the
//! parts never import the root config. The section types are re-exported here for callers
//! that build a config in code.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use crate::dataset::DatasetConfig;
pub use crate::deploy::DeployConfig;
pub use crate::enrollment::{CoordinatorPin, EnrollmentConfig};
pub use crate::offload::OffloadConfig;
pub use crate::outbox::{OnCorruption, OutboxConfig};
use crate::setting::InvalidSetting;
pub use crate::uplink::MqttConfig;

/// The commented default configuration file.
pub const DEFAULT_TOML: &str = include_str!("../../config/agent.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The toml error message already names the key, line and column.
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory for durable state: the outbox database and the device identity.
    pub state_dir: PathBuf,
    pub device: DeviceConfig,
    pub mqtt: MqttConfig,
    pub outbox: OutboxConfig,
    pub telemetry: TelemetryConfig,
    pub local_api: LocalApiConfig,
    pub sandbox: crate::sandbox::SandboxConfig,
    pub pipeline: PipelineConfig,
    pub deploy: DeployConfig,
    /// Joining the fleet: claim key, coordinator pin, request retries.
    pub enrollment: EnrollmentConfig,
    pub dataset: DatasetConfig,
    /// ONNX inference: where the runtime library is, which execution providers to try.
    pub inference: edge_inference::InferenceConfig,
    /// Offloading inference stages' requests to the coordinator.
    pub offload: OffloadConfig,
}

/// The pipeline the agent runs when no deployment has installed one.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Pipeline description (TOML) to run from local files; module paths in it are relative
    /// to its directory. Empty: none. A pipeline deployed over MQTT takes precedence.
    pub file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[derive(Default)]
pub struct DeviceConfig {
    /// Device id for MQTT topics; empty derives one from /etc/machine-id.
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Seconds between samples; 0 disables telemetry.
    pub interval_s: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalApiConfig {
    /// Unix socket path; empty means `state_dir/agent.sock`.
    pub socket: PathBuf,
    /// Largest payload accepted, bytes.
    pub max_message_bytes: usize,
    /// Serve Prometheus `GET /metrics` on this local TCP address (`127.0.0.1:9464`); empty: not
    /// on TCP.
    pub metrics_listen: String,
    /// Serve Prometheus `GET /metrics` (HTTP) on this Unix socket path; empty: not on a socket.
    pub metrics_socket: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: PathBuf::from("/var/lib/edge-agent"),
            device: DeviceConfig::default(),
            mqtt: MqttConfig::default(),
            outbox: OutboxConfig::default(),
            telemetry: TelemetryConfig::default(),
            local_api: LocalApiConfig::default(),
            sandbox: crate::sandbox::SandboxConfig::default(),
            pipeline: PipelineConfig::default(),
            deploy: DeployConfig::default(),
            enrollment: EnrollmentConfig::default(),
            dataset: DatasetConfig::default(),
            inference: edge_inference::InferenceConfig::default(),
            offload: OffloadConfig::default(),
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig { interval_s: 10 }
    }
}

impl Default for LocalApiConfig {
    fn default() -> Self {
        LocalApiConfig {
            socket: PathBuf::new(),
            max_message_bytes: 65_536,
            metrics_listen: String::new(),
            metrics_socket: PathBuf::new(),
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates config text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        cfg.validate().map_err(|e| ConfigError::Invalid {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), InvalidSetting> {
        if !self.device.id.is_empty() {
            protocol::v1::validate_device_id(&self.device.id)
                .map_err(|e| format!("device.id: {e}"))?;
        }
        self.mqtt.validate()?;
        self.outbox.validate()?;
        self.sandbox.validate()?;
        self.offload.validate()?;
        self.deploy.validate()?;
        self.enrollment.validate()?;
        self.dataset.validate()?;
        if self.local_api.max_message_bytes > protocol::v1::MAX_PAYLOAD_BYTES - 1024 {
            return Err(InvalidSetting(format!(
                "local_api.max_message_bytes must be at most {} (the wire limit less envelope room)",
                protocol::v1::MAX_PAYLOAD_BYTES - 1024
            )));
        }
        Ok(())
    }

    /// Where the local API socket lives.
    pub fn socket_path(&self) -> PathBuf {
        if self.local_api.socket.as_os_str().is_empty() {
            self.state_dir.join("agent.sock")
        } else {
            self.local_api.socket.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_is_the_default_config() {
        let parsed = Config::parse(DEFAULT_TOML, Path::new("agent.toml")).expect("default parses");
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = "state_dir = \"/tmp/x\"\n[mqtt]\nurl = \"mqtt://h:1\"\nkeepalive = 3\n";
        let err = Config::parse(text, Path::new("a.toml"))
            .expect_err("unknown key")
            .to_string();
        assert!(err.contains("keepalive"), "{err}");
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("a.toml"), "{err}");
    }

    #[test]
    fn deploy_groups_say_where_groups_come_from_now() {
        let text = "[deploy]\ntrusted_keys = []\ngroups = [\"lab\"]\n";
        let err = Config::parse(text, Path::new("a.toml"))
            .expect_err("removed key")
            .to_string();
        assert!(err.contains("a.toml"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(
            err.contains("assigned by the coordinator at enrollment"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            ("[device]\nid = \"a/b\"\n", "device.id"),
            ("[mqtt]\nurl = \"http://x\"\n", "mqtt.url"),
            ("[mqtt]\ncert_file = \"c.pem\"\n", "key_file"),
            ("[outbox]\non_corruption = \"ignore\"\n", "on_corruption"),
            ("[outbox]\nmax_bytes = -1\n", "max_bytes"),
            (
                "[mqtt]\nmax_packet_bytes = 16384\n",
                "mqtt.max_packet_bytes",
            ),
            ("[enrollment]\nretry_ms = 0\n", "enrollment.retry_ms"),
            (
                "[enrollment]\ncoordinator = { sign = \"ab\", agree = \"cd\" }\n",
                "enrollment.coordinator",
            ),
            (
                "[enrollment]\nclaim_key_file = \"\"\n",
                "enrollment.claim_key_file",
            ),
        ];
        for (text, needle) in cases {
            let err = Config::parse(text, Path::new("a.toml"))
                .expect_err(text)
                .to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
