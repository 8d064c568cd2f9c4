//! The agent's configuration: one typed struct read from TOML.
//!
//! The commented default file `config/agent.toml` is embedded here, printed by
//! `edge-agent generate-config`, and a test checks it parses to exactly [`Config::default`], so
//! the documentation and the code cannot drift apart.

use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::v1::Class;
use serde::Deserialize;

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
    pub dataset: DatasetConfig,
    /// ONNX inference: where the runtime library is, which execution providers to try.
    pub inference: edge_inference::InferenceConfig,
    /// Offloading inference stages' requests to the coordinator.
    pub offload: OffloadConfig,
}

/// `[offload]`: when an inference stage with an `offload_model` runs a frame locally and when
/// on the coordinator's inference service (see `crate::offload`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OffloadConfig {
    /// `local` (never offload), `offload` (always, while online), `cost` (the cost model) or
    /// `adaptive` (the cost model corrected by observed latencies).
    pub mode: crate::offload::policy::Mode,
    /// Weight of one millisecond of latency in a decision's cost.
    pub latency_weight: f64,
    /// Weight of one millijoule of the device's energy in a decision's cost.
    pub energy_weight: f64,
    /// A side expected to take longer than this is avoided, ms; 0: no deadline.
    pub deadline_ms: u64,
    /// Longest wait for the coordinator's answer before running the frame locally, ms.
    pub timeout_ms: u64,
    /// Start the local run as well after this long without an answer and take whichever
    /// finishes first, ms; 0: no hedging (wait up to `timeout_ms`).
    pub hedge_ms: u64,
    /// CPU power while inferring and radio/idle power while waiting, for the energy term.
    pub cpu_mw: f64,
    pub idle_mw: f64,
    pub radio_nj_per_byte: f64,
    /// Adaptive mode: exploration strength and the weight old outcomes keep per decision.
    pub exploration: f64,
    pub discount: f64,
    /// A coordinator's capacity advert counts this long after it was received, ms.
    pub advert_max_age_ms: u64,
    /// Requests waiting for answers at once; beyond it frames run locally.
    pub max_pending: u32,
    /// Cost and adaptive modes: measure the link with a small probe when no request did for
    /// this long (at most 1 s during an outage), and run one request locally when the device
    /// did not for this long, ms; 0: never (a side judged worse is then never re-measured).
    pub probe_interval_ms: u64,
}

impl Default for OffloadConfig {
    fn default() -> Self {
        let p = crate::offload::policy::PolicyConfig::default();
        OffloadConfig {
            mode: crate::offload::policy::Mode::Local,
            latency_weight: p.latency_weight,
            energy_weight: p.energy_weight,
            deadline_ms: 0,
            timeout_ms: 1000,
            hedge_ms: 0,
            cpu_mw: p.cpu_mw,
            idle_mw: p.idle_mw,
            radio_nj_per_byte: p.radio_nj_per_byte,
            exploration: p.exploration,
            discount: p.discount,
            advert_max_age_ms: 30_000,
            max_pending: 64,
            probe_interval_ms: 5000,
        }
    }
}

impl OffloadConfig {
    pub fn policy(&self) -> crate::offload::policy::PolicyConfig {
        crate::offload::policy::PolicyConfig {
            mode: self.mode,
            latency_weight: self.latency_weight,
            energy_weight: self.energy_weight,
            deadline_ms: self.deadline_ms as f64,
            cpu_mw: self.cpu_mw,
            idle_mw: self.idle_mw,
            radio_nj_per_byte: self.radio_nj_per_byte,
            exploration: self.exploration,
            discount: self.discount,
            refresh_ms: self.probe_interval_ms as f64,
        }
    }

    fn validate(&self) -> Result<(), String> {
        let finite_nonneg = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(format!(
                    "offload.{name} must be a finite number >= 0, not {v}"
                ))
            }
        };
        finite_nonneg("latency_weight", self.latency_weight)?;
        finite_nonneg("energy_weight", self.energy_weight)?;
        finite_nonneg("cpu_mw", self.cpu_mw)?;
        finite_nonneg("idle_mw", self.idle_mw)?;
        finite_nonneg("radio_nj_per_byte", self.radio_nj_per_byte)?;
        finite_nonneg("exploration", self.exploration)?;
        if self.latency_weight + self.energy_weight <= 0.0 {
            return Err("offload.latency_weight and offload.energy_weight are both 0".into());
        }
        if !(0.5..=1.0).contains(&self.discount) {
            return Err(format!(
                "offload.discount must be between 0.5 and 1, not {}",
                self.discount
            ));
        }
        if self.timeout_ms == 0 {
            return Err("offload.timeout_ms must be above 0".into());
        }
        if self.hedge_ms >= self.timeout_ms {
            return Err(format!(
                "offload.hedge_ms ({}) must be below offload.timeout_ms ({})",
                self.hedge_ms, self.timeout_ms
            ));
        }
        if self.max_pending == 0 {
            return Err("offload.max_pending must be above 0".into());
        }
        Ok(())
    }
}

/// The pipeline the agent runs when no deployment has installed one.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Pipeline description (TOML) to run from local files; module paths in it are relative
    /// to its directory. Empty: none. A pipeline deployed over MQTT takes precedence.
    pub file: PathBuf,
}

/// Signed deployments over MQTT.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeployConfig {
    /// Hex ed25519 public keys (from `edge-coordinator keygen`) a manifest must be signed
    /// with. Empty: every deployment is rejected.
    pub trusted_keys: Vec<String>,
    /// Deployment groups this device belongs to (`edge-coordinator deploy --group NAME`).
    pub groups: Vec<String>,
    /// Largest single artifact (module or model) accepted, bytes.
    pub max_artifact_bytes: u64,
    /// Most artifacts one deployment may list.
    pub max_artifacts: u32,
    /// Largest sum of artifact sizes of one deployment, bytes; also bounds the memory a
    /// download holds.
    pub max_total_bytes: u64,
    /// Ask the coordinator again for missing chunks after this long without one, ms.
    pub resend_after_ms: u64,
    /// Give a download up after this many resend requests in a row brought nothing.
    pub max_stalled_resends: u32,
}

/// The local dataset store fed by pipeline `dataset` sinks (training samples).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatasetConfig {
    /// Most samples kept; the oldest go first beyond it.
    pub max_samples: u64,
    /// Most bytes of samples kept; the oldest go first beyond it.
    pub max_bytes: u64,
}

impl Default for DeployConfig {
    fn default() -> Self {
        DeployConfig {
            trusted_keys: Vec::new(),
            groups: Vec::new(),
            max_artifact_bytes: 16 * 1024 * 1024,
            max_artifacts: 16,
            max_total_bytes: 32 * 1024 * 1024,
            resend_after_ms: 10_000,
            max_stalled_resends: 10,
        }
    }
}

impl Default for DatasetConfig {
    fn default() -> Self {
        DatasetConfig {
            max_samples: 10_000,
            max_bytes: 16 * 1024 * 1024,
        }
    }
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
pub struct MqttConfig {
    /// Broker address, `mqtt://HOST:PORT` or `mqtts://HOST:PORT`.
    pub url: String,
    /// Seconds between keepalive pings.
    pub keepalive_s: u64,
    /// Username; empty sends no credentials.
    pub username: String,
    /// Password sent with `username`.
    pub password: String,
    /// PEM CA bundle for mqtts; empty uses the system trust store.
    pub ca_file: PathBuf,
    /// PEM client certificate for mutual TLS.
    pub cert_file: PathBuf,
    /// PEM private key for mutual TLS.
    pub key_file: PathBuf,
    /// First reconnect delay, milliseconds.
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay, milliseconds.
    pub reconnect_max_ms: u64,
    /// QoS 1 publishes in flight before waiting for PUBACKs.
    pub inflight: u16,
    /// Largest MQTT packet accepted from the broker, bytes.
    pub max_packet_bytes: usize,
}

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
            dataset: DatasetConfig::default(),
            inference: edge_inference::InferenceConfig::default(),
            offload: OffloadConfig::default(),
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            url: "mqtt://127.0.0.1:1883".into(),
            keepalive_s: 30,
            username: String::new(),
            password: String::new(),
            ca_file: PathBuf::new(),
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            reconnect_min_ms: 200,
            reconnect_max_ms: 30_000,
            inflight: 64,
            max_packet_bytes: 131_072,
        }
    }
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
        cfg.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if !self.device.id.is_empty() {
            protocol::v1::validate_device_id(&self.device.id)
                .map_err(|e| format!("device.id: {e}"))?;
        }
        crate::uplink::BrokerAddr::parse(&self.mqtt.url).map_err(|e| format!("mqtt.url: {e}"))?;
        if self.mqtt.cert_file.as_os_str().is_empty() != self.mqtt.key_file.as_os_str().is_empty() {
            return Err("mqtt.cert_file and mqtt.key_file must be set together".into());
        }
        if self.mqtt.reconnect_min_ms == 0
            || self.mqtt.reconnect_min_ms > self.mqtt.reconnect_max_ms
        {
            return Err(
                "mqtt.reconnect_min_ms must be at least 1 and at most mqtt.reconnect_max_ms".into(),
            );
        }
        if self.mqtt.keepalive_s < 5 {
            return Err("mqtt.keepalive_s must be at least 5".into());
        }
        if self.mqtt.inflight == 0 {
            return Err("mqtt.inflight must be at least 1".into());
        }
        if self.mqtt.max_packet_bytes < 16 * 1024 {
            return Err("mqtt.max_packet_bytes must be at least 16384".into());
        }
        if self.outbox.max_bytes < 64 * 1024 {
            return Err("outbox.max_bytes must be at least 65536".into());
        }
        self.sandbox.validate()?;
        self.offload.validate()?;
        protocol::v1::deploy::TrustedKeys::from_hex(&self.deploy.trusted_keys)
            .map_err(|e| format!("deploy.trusted_keys: {e}"))?;
        for g in &self.deploy.groups {
            protocol::v1::validate_device_id(g)
                .map_err(|e| format!("deploy.groups: invalid group {g:?}: {e}"))?;
        }
        if self.deploy.max_artifacts == 0 || self.deploy.max_artifact_bytes == 0 {
            return Err(
                "deploy.max_artifacts and deploy.max_artifact_bytes must be at least 1".into(),
            );
        }
        if self.deploy.max_total_bytes < self.deploy.max_artifact_bytes {
            return Err("deploy.max_total_bytes must be at least deploy.max_artifact_bytes".into());
        }
        if self.deploy.resend_after_ms < 100 {
            return Err("deploy.resend_after_ms must be at least 100".into());
        }
        if self.dataset.max_samples == 0 || self.dataset.max_bytes < 1024 {
            return Err(
                "dataset.max_samples must be at least 1 and dataset.max_bytes at least 1024".into(),
            );
        }
        if self.local_api.max_message_bytes > protocol::v1::MAX_PAYLOAD_BYTES - 1024 {
            return Err(format!(
                "local_api.max_message_bytes must be at most {} (the wire limit less envelope room)",
                protocol::v1::MAX_PAYLOAD_BYTES - 1024
            ));
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
    fn bad_values_are_named() {
        let cases = [
            ("[device]\nid = \"a/b\"\n", "device.id"),
            ("[mqtt]\nurl = \"http://x\"\n", "mqtt.url"),
            ("[mqtt]\ncert_file = \"c.pem\"\n", "key_file"),
            ("[outbox]\non_corruption = \"ignore\"\n", "on_corruption"),
            ("[outbox]\nmax_bytes = -1\n", "max_bytes"),
        ];
        for (text, needle) in cases {
            let err = Config::parse(text, Path::new("a.toml"))
                .expect_err(text)
                .to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
