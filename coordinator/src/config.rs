//! The coordinator's configuration: one typed struct, parsed from TOML with unknown keys refused.
//!
//! The commented default file `config/coordinator.toml` is embedded as [`DEFAULT_TOML`] and a
//! test keeps it and [`Config::default`] identical, so the file is the documentation.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use crate::api::config::ApiConfig;
pub use crate::enrollment::config::{ClaimConfig, EnrollmentConfig, Mode as EnrollmentMode};

/// The commented default configuration, printed by `edge-coordinator generate-config`.
pub const DEFAULT_TOML: &str = include_str!("../../config/coordinator.toml");

/// The largest payload on the wire: a body of the protocol's limit and the largest
/// authentication trailer.
pub const MAX_WIRE_PAYLOAD: usize =
    protocol::v1::MAX_PAYLOAD_BYTES + protocol::v1::auth::MAX_TRAILER_LEN;

/// Errors from reading or validating a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The `toml` message carries the line, column and an excerpt; it is kept whole.
    #[error("invalid config file {path}:\n{error}")]
    Parse {
        path: PathBuf,
        error: toml::de::Error,
    },
    #[error("invalid config value {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// Log output format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// Everything `edge-coordinator serve` needs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory for the sled database and, by default, the journal.
    pub state_dir: PathBuf,
    /// Log format on stderr.
    pub log_format: LogFormat,
    /// Seconds between INFO statistics lines; 0 turns them off.
    pub stats_interval_s: u64,
    /// Subscribe to all of `edge/v1/#` so unknown topics are seen and rejected loudly.
    pub watch_unknown_topics: bool,
    /// The embedded broker, used when `mqtt.url` is empty.
    pub embedded: EmbeddedConfig,
    /// The external broker connection.
    pub mqtt: MqttConfig,
    /// Registry and duplicate-detection database.
    pub store: StoreConfig,
    /// The JSON-lines event journal.
    pub journal: JournalConfig,
    /// The inference service for offloaded requests.
    pub offload: OffloadConfig,
    /// Which devices may join, and in which groups (`crate::enrollment::config`).
    pub enrollment: EnrollmentConfig,
    /// The HTTP API, `/metrics` and the dashboard (`crate::api::config`).
    pub api: ApiConfig,
}

/// The embedded rumqttd broker.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedConfig {
    /// Listen address; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Most client connections at once.
    pub max_connections: usize,
    /// Largest payload a client may publish, bytes.
    pub max_payload_bytes: usize,
    /// Milliseconds a new connection has to send CONNECT.
    pub connect_timeout_ms: u16,
    /// Size of one in-memory log segment per subscription filter, bytes.
    pub log_segment_bytes: usize,
    /// Segments kept per subscription filter.
    pub log_segments: usize,
}

/// Connection to an external broker.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// `mqtt://HOST:PORT` or `mqtts://HOST:PORT`; empty runs the embedded broker.
    pub url: String,
    /// Stable MQTT client id (the broker keeps this session across restarts).
    pub client_id: String,
    /// Keepalive interval, seconds (at least 1).
    pub keepalive_s: u64,
    /// Username; empty sends no credentials.
    pub username: String,
    /// Password, sent with a non-empty username.
    pub password: String,
    /// PEM CA file for mqtts; empty uses the system trust store.
    pub ca_file: PathBuf,
    /// PEM client certificate for mutual TLS; needs `key_file`.
    pub cert_file: PathBuf,
    /// PEM private key for mutual TLS; needs `cert_file`.
    pub key_file: PathBuf,
    /// First reconnect delay, milliseconds.
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay, milliseconds.
    pub reconnect_max_ms: u64,
    /// Largest MQTT packet accepted from the broker, bytes.
    pub max_packet_bytes: usize,
}

/// The sled database.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// sled page cache, bytes.
    pub cache_bytes: u64,
    /// How long a message id is remembered, seconds.
    pub dedup_retention_s: u64,
    /// Seconds between sweeps of expired message ids.
    pub prune_interval_s: u64,
    /// fsync journal and database before acknowledging to the broker.
    pub fsync: bool,
}

/// The event journal.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    /// Journal file; empty means `state_dir/journal.jsonl`.
    pub path: PathBuf,
    /// Size at which the journal is rotated to `PATH.1`, bytes.
    pub max_bytes: u64,
    /// Rotated journals kept, `PATH.1` (newest) to `PATH.{keep}`, 1 to 100. A 10,000-device
    /// fleet writes 64 MiB of telemetry and duplicates in minutes, so one was too few to keep
    /// a rollout's lines.
    pub keep: u32,
}

/// The offload inference service (`crate::offload`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OffloadConfig {
    /// Serve offload requests.
    pub enabled: bool,
    /// Models served: the name devices use (their pipeline path) -> the `.onnx` file here.
    pub models: BTreeMap<String, PathBuf>,
    /// Worker threads running models (each has its own session of every model).
    pub workers: usize,
    /// Most requests waiting for a worker; more are answered `overloaded`.
    pub max_queue: usize,
    /// This replica's id in its capacity advert topic; empty: `{hostname}-{pid}`.
    pub replica: String,
    /// Milliseconds between retained capacity adverts.
    pub advertise_interval_ms: u64,
}

impl Default for OffloadConfig {
    fn default() -> Self {
        OffloadConfig {
            enabled: false,
            models: BTreeMap::new(),
            workers: 2,
            max_queue: 64,
            replica: String::new(),
            advertise_interval_ms: 1000,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: PathBuf::from("/var/lib/edge-coordinator"),
            log_format: LogFormat::Human,
            stats_interval_s: 60,
            watch_unknown_topics: true,
            embedded: EmbeddedConfig::default(),
            mqtt: MqttConfig::default(),
            store: StoreConfig::default(),
            journal: JournalConfig::default(),
            offload: OffloadConfig::default(),
            enrollment: EnrollmentConfig::default(),
            api: ApiConfig::default(),
        }
    }
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            max_connections: 10_000,
            max_payload_bytes: 256 * 1024,
            connect_timeout_ms: 10_000,
            log_segment_bytes: 4 * 1024 * 1024,
            log_segments: 4,
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            url: String::new(),
            client_id: "edge-coordinator".into(),
            keepalive_s: 30,
            username: String::new(),
            password: String::new(),
            ca_file: PathBuf::new(),
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            reconnect_min_ms: 200,
            reconnect_max_ms: 30_000,
            max_packet_bytes: 320 * 1024,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            cache_bytes: 32 * 1024 * 1024,
            dedup_retention_s: 7 * 24 * 3600,
            prune_interval_s: 3600,
            fsync: true,
        }
    }
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            path: PathBuf::new(),
            max_bytes: 64 * 1024 * 1024,
            keep: 4,
        }
    }
}

/// Where the coordinator gets its messages from, decided from `mqtt.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerMode {
    /// Run rumqttd in-process.
    Embedded,
    /// Connect to an external broker.
    External { tls: bool, host: String, port: u16 },
}

impl Config {
    /// Parses TOML text; `path` only names the source in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            error,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Config::from_toml(&text, path)
    }

    /// Checks what serde cannot: value ranges and keys that only make sense together. Run it
    /// again after command-line overrides.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.into(),
            })
        };
        self.broker_mode()?;
        if self.state_dir.as_os_str().is_empty() {
            return invalid("state_dir", "must not be empty");
        }
        if self.mqtt.client_id.is_empty() {
            return invalid(
                "mqtt.client_id",
                "must not be empty (the broker keeps the session by it)",
            );
        }
        if self.mqtt.keepalive_s == 0 {
            return invalid("mqtt.keepalive_s", "must be at least 1");
        }
        if self.mqtt.cert_file.as_os_str().is_empty() != self.mqtt.key_file.as_os_str().is_empty() {
            return invalid(
                "mqtt.cert_file",
                "cert_file and key_file must be given together",
            );
        }
        if self.mqtt.reconnect_min_ms == 0
            || self.mqtt.reconnect_min_ms > self.mqtt.reconnect_max_ms
        {
            return invalid(
                "mqtt.reconnect_min_ms",
                "must be at least 1 and at most reconnect_max_ms",
            );
        }
        if self.mqtt.max_packet_bytes < MAX_WIRE_PAYLOAD + 1024 {
            return invalid(
                "mqtt.max_packet_bytes",
                &format!(
                    "must leave room for the protocol's {MAX_WIRE_PAYLOAD} byte payloads (body and authentication trailer) plus framing"
                ),
            );
        }
        if self.embedded.max_payload_bytes < MAX_WIRE_PAYLOAD {
            return invalid(
                "embedded.max_payload_bytes",
                &format!(
                    "must be at least the protocol's {MAX_WIRE_PAYLOAD} bytes (body and authentication trailer)"
                ),
            );
        }
        if self.embedded.max_connections == 0 {
            return invalid("embedded.max_connections", "must be at least 1");
        }
        if self.embedded.log_segments == 0 {
            return invalid("embedded.log_segments", "must be at least 1");
        }
        if self.embedded.log_segment_bytes < self.embedded.max_payload_bytes {
            return invalid(
                "embedded.log_segment_bytes",
                "must be at least embedded.max_payload_bytes (a segment holds whole messages)",
            );
        }
        if self.store.dedup_retention_s == 0 {
            return invalid("store.dedup_retention_s", "must be at least 1");
        }
        if self.store.prune_interval_s == 0 {
            return invalid("store.prune_interval_s", "must be at least 1");
        }
        if self.journal.max_bytes < 4096 {
            return invalid("journal.max_bytes", "must be at least 4096");
        }
        if !(1..=100).contains(&self.journal.keep) {
            return invalid("journal.keep", "must be 1 to 100");
        }
        self.enrollment.validate()?;
        self.api.validate()?;
        self.validate_offload()
    }

    fn validate_offload(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        let o = &self.offload;
        if o.workers == 0 || o.workers > 256 {
            return invalid("offload.workers", "must be 1 to 256".into());
        }
        if o.max_queue == 0 || o.max_queue > 1_000_000 {
            return invalid("offload.max_queue", "must be 1 to 1000000".into());
        }
        if o.advertise_interval_ms < 50 {
            return invalid(
                "offload.advertise_interval_ms",
                "must be at least 50".into(),
            );
        }
        if !o.replica.is_empty() && protocol::v1::validate_device_id(&o.replica).is_err() {
            return invalid(
                "offload.replica",
                format!(
                    "{:?}: use 1-64 characters from [A-Za-z0-9_.-] (it is a topic level)",
                    o.replica
                ),
            );
        }
        if o.enabled && o.models.is_empty() {
            return invalid(
                "offload.models",
                "must name at least one model when enabled".into(),
            );
        }
        for (name, path) in &o.models {
            if name.is_empty() || name.len() > u8::MAX as usize {
                return invalid(
                    "offload.models",
                    format!("model name {name:?} must be 1 to 255 bytes (the wire format's limit)"),
                );
            }
            if path.as_os_str().is_empty() {
                return invalid(
                    "offload.models",
                    format!("model {name:?} has an empty path"),
                );
            }
        }
        Ok(())
    }

    /// Embedded broker or external broker address, from `mqtt.url`.
    pub fn broker_mode(&self) -> Result<BrokerMode, ConfigError> {
        if self.mqtt.url.is_empty() {
            return Ok(BrokerMode::Embedded);
        }
        let invalid = |reason: String| ConfigError::Invalid {
            key: "mqtt.url",
            reason,
        };
        let url = url::Url::parse(&self.mqtt.url)
            .map_err(|e| invalid(format!("{:?} is not a url: {e}", self.mqtt.url)))?;
        let (tls, default_port) = match url.scheme() {
            "mqtt" | "tcp" => (false, 1883),
            "mqtts" | "ssl" => (true, 8883),
            other => {
                return Err(invalid(format!(
                    "unsupported scheme {other:?}: use mqtt:// or mqtts://"
                )));
            }
        };
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| invalid(format!("{:?} has no host", self.mqtt.url)))?;
        // `Url` keeps the brackets of an IPv6 literal; the socket layer wants them off.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Ok(BrokerMode::External {
            tls,
            host,
            port: url.port().unwrap_or(default_port),
        })
    }

    /// The journal file: `journal.path`, or `state_dir/journal.jsonl`.
    pub fn journal_path(&self) -> PathBuf {
        if self.journal.path.as_os_str().is_empty() {
            self.state_dir.join("journal.jsonl")
        } else {
            self.journal.path.clone()
        }
    }

    /// The sled database directory inside the state directory.
    pub fn db_path(&self) -> PathBuf {
        db_path(&self.state_dir)
    }
}

/// The sled database directory for a state directory (shared with `devices`).
pub fn db_path(state_dir: &Path) -> PathBuf {
    state_dir.join("registry.sled")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_matches_default_struct() {
        let parsed = Config::from_toml(DEFAULT_TOML, Path::new("coordinator.toml"));
        assert_eq!(parsed.expect("default file parses"), Config::default());
    }

    #[test]
    fn empty_file_is_all_defaults() {
        let parsed = Config::from_toml("", Path::new("empty.toml")).expect("parses");
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = "state_dir = \"/tmp/x\"\n\n[store]\ncache_bytes = 1024\ndedup_retension_s = 5\n";
        let err = Config::from_toml(text, Path::new("c.toml")).expect_err("unknown key refused");
        let msg = err.to_string();
        assert!(msg.contains("dedup_retension_s"), "{msg}");
        assert!(msg.contains("line 5"), "{msg}");
        assert!(msg.contains("c.toml"), "{msg}");
    }

    #[test]
    fn bad_value_is_named_with_its_line() {
        let text = "[embedded]\nlisten = \"not an address\"\n";
        let msg = Config::from_toml(text, Path::new("c.toml"))
            .expect_err("refused")
            .to_string();
        assert!(msg.contains("line 2"), "{msg}");
        let msg = Config::from_toml("log_format = \"xml\"\n", Path::new("c.toml"))
            .expect_err("refused")
            .to_string();
        assert!(msg.contains("line 1") && msg.contains("xml"), "{msg}");
    }

    #[test]
    fn broker_urls() {
        let mut c = Config::default();
        assert_eq!(c.broker_mode().expect("embedded"), BrokerMode::Embedded);
        c.mqtt.url = "mqtts://broker.example:8884".into();
        assert_eq!(
            c.broker_mode().expect("valid"),
            BrokerMode::External {
                tls: true,
                host: "broker.example".into(),
                port: 8884
            }
        );
        c.mqtt.url = "mqtt://[::1]".into();
        assert_eq!(
            c.broker_mode().expect("valid"),
            BrokerMode::External {
                tls: false,
                host: "::1".into(),
                port: 1883
            }
        );
        c.mqtt.url = "http://x".into();
        assert!(
            c.validate()
                .expect_err("refused")
                .to_string()
                .contains("mqtt.url")
        );
    }

    #[test]
    fn enrollment_section_parses() {
        let key = protocol::v1::deploy::public_key_hex(
            &protocol::v1::deploy::SigningKey::from_bytes(&[1; 32]).verifying_key(),
        );
        let text = format!(
            "[enrollment]\nmode = \"manual\"\nmax_pending = 5\n\n[[enrollment.claims]]\nkey = \"{key}\"\ngroups = [\"lab\"]\n"
        );
        let c = Config::from_toml(&text, Path::new("c.toml")).expect("parses");
        assert_eq!(c.enrollment.mode, EnrollmentMode::Manual);
        assert_eq!(c.enrollment.max_pending, 5);
        assert_eq!(c.enrollment.claims[0].groups, vec!["lab".to_owned()]);
        let msg = Config::from_toml("[enrollment]\nmode = \"open\"\n", Path::new("c.toml"))
            .expect_err("refused")
            .to_string();
        assert!(msg.contains("line 2") && msg.contains("open"), "{msg}");
        let msg = Config::from_toml("[[enrollment.claims]]\nkey = \"00\"\n", Path::new("c.toml"))
            .expect_err("refused")
            .to_string();
        assert!(msg.contains("enrollment.claims.key"), "{msg}");
    }

    #[test]
    fn cert_without_key_is_refused() {
        let mut c = Config::default();
        c.mqtt.cert_file = "/c.pem".into();
        assert!(
            c.validate()
                .expect_err("refused")
                .to_string()
                .contains("key_file")
        );
    }
}
