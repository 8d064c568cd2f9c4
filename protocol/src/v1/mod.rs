//! Version 1 of the wire protocol: topic tree, message classes, envelopes and bodies.
//!
//! Control messages are JSON so `mosquitto_sub -v -t 'edge/#'` shows readable traffic; bulk
//! payloads use the compact binary envelope in [`binary`]. Both carry a unique message id so a
//! receiver can drop the duplicates that at-least-once delivery produces.

pub mod ack;
pub mod auth;
pub mod binary;
pub mod command;
pub mod deploy;
pub mod enroll;
pub mod fl;
pub mod offload;
pub mod tensor;
pub mod topics;

use serde::{Deserialize, Serialize};

/// Protocol version carried in every envelope (`"v": 1`).
pub const VERSION: u8 = 1;

/// Largest payload (bytes) any party publishes on the `edge/v1` tree. Brokers and clients are
/// configured to accept at least this much plus MQTT framing; receivers drop anything larger.
/// Kept well under the 128 KB cap common on cloud brokers; bigger artifacts are chunked.
pub const MAX_PAYLOAD_BYTES: usize = 96 * 1024;

/// Longest device id accepted anywhere.
pub const MAX_DEVICE_ID_LEN: usize = 64;

/// Errors from decoding or validating wire data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed json envelope: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported protocol version {0}")]
    Version(u8),
    #[error("malformed binary envelope: {0}")]
    Binary(&'static str),
    #[error(
        "invalid device id {0:?}: use 1-64 characters from [A-Za-z0-9_.-], not coordinator or group"
    )]
    DeviceId(String),
    #[error("invalid message id {0:?}: use 1-64 characters from [A-Za-z0-9_.-]")]
    MessageId(String),
    #[error(
        "invalid stream name {0:?}: use levels of [A-Za-z0-9_.-] separated by '/', at most 128 characters"
    )]
    Stream(String),
    #[error("envelope device {envelope:?} does not match topic device {topic:?}")]
    DeviceMismatch { envelope: String, topic: String },
    #[error("malformed acknowledgement: {0}")]
    Ack(&'static str),
    #[error("malformed command: {0}")]
    Command(String),
}

/// Delivery class of an outbound message; also its priority (control is sent first) and the
/// order in which a full outbox sheds load (only telemetry is ever evicted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    Control,
    Model,
    Results,
    Telemetry,
}

impl Class {
    /// All classes, highest priority first.
    pub const ALL: [Class; 4] = [
        Class::Control,
        Class::Model,
        Class::Results,
        Class::Telemetry,
    ];

    /// Dense index, 0 = highest priority.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn from_index(i: u8) -> Option<Class> {
        Class::ALL.get(i as usize).copied()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Control => "control",
            Class::Model => "model",
            Class::Results => "results",
            Class::Telemetry => "telemetry",
        }
    }
}

impl std::fmt::Display for Class {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A class name that is none of the four.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown class {0:?}: use control, model, results or telemetry")]
pub struct UnknownClass(pub String);

impl std::str::FromStr for Class {
    type Err = UnknownClass;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Class::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownClass(s.to_owned()))
    }
}

fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_DEVICE_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Checks that a device id is safe to put in a topic level (no `/`, `+`, `#`, no spaces).
pub fn validate_device_id(id: &str) -> Result<(), Error> {
    // `coordinator` and `group` stand in the device position of other topics.
    if valid_token(id) && !RESERVED_DEVICE_IDS.contains(&id) {
        Ok(())
    } else {
        Err(Error::DeviceId(id.to_owned()))
    }
}

/// Names that cannot be device ids because the topic tree uses them.
pub const RESERVED_DEVICE_IDS: [&str; 2] = ["coordinator", "group"];

/// Checks a message id's shape (ids are opaque otherwise).
pub fn validate_message_id(id: &str) -> Result<(), Error> {
    if valid_token(id) {
        Ok(())
    } else {
        Err(Error::MessageId(id.to_owned()))
    }
}

/// Builds the id of an outbox message: the outbox's random incarnation (new whenever its store
/// is created) and the message's sequence number. Unique across restarts and store wipes.
pub fn message_id(incarnation: u64, seq: u64) -> String {
    format!("{incarnation:016x}{seq:016x}")
}

/// The JSON envelope every control-plane message travels in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope<B> {
    /// Protocol version, always [`VERSION`].
    pub v: u8,
    /// Unique message id; receivers drop a second message with the same id.
    pub id: String,
    /// Sending device (or `coordinator`).
    pub device: String,
    /// Delivery class the sender queued it under.
    pub class: Class,
    /// Sender's per-outbox sequence number (increasing in enqueue order).
    pub seq: u64,
    /// The seq of the previous message of this class the sender still held, unacknowledged,
    /// when it sent this one; the coordinator processes this one only after that one
    /// ([`ack`]). Absent when nothing earlier was outstanding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<u64>,
    /// Sender's wall clock when the message was accepted, ms since the Unix epoch.
    pub created_ms: u64,
    pub body: B,
}

impl<B: Serialize> Envelope<B> {
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing our own plain structs cannot fail (no maps with non-string keys).
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl<B: serde::de::DeserializeOwned> Envelope<B> {
    /// Decodes and validates an envelope received on `topic_device`'s topics.
    pub fn from_json(payload: &[u8], topic_device: &str) -> Result<Self, Error> {
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(Error::TooLarge {
                size: payload.len(),
                limit: MAX_PAYLOAD_BYTES,
            });
        }
        let env: Envelope<B> = serde_json::from_slice(payload)?;
        if env.v != VERSION {
            return Err(Error::Version(env.v));
        }
        // The coordinator signs its own messages with its reserved name.
        if env.device != topics::COORDINATOR {
            validate_device_id(&env.device)?;
        }
        validate_message_id(&env.id)?;
        if env.device != topic_device {
            return Err(Error::DeviceMismatch {
                envelope: env.device,
                topic: topic_device.to_owned(),
            });
        }
        Ok(env)
    }
}

/// Retained on `edge/v1/{device}/status`; the agent's last will publishes `online: false`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    pub v: u8,
    pub device: String,
    pub online: bool,
    /// When the agent (re)connected, ms since the Unix epoch. The will carries the same stamp,
    /// so an offline status can be matched to the session it ends.
    pub since_ms: u64,
    pub agent_version: String,
}

impl Status {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(payload: &[u8], topic_device: &str) -> Result<Self, Error> {
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(Error::TooLarge {
                size: payload.len(),
                limit: MAX_PAYLOAD_BYTES,
            });
        }
        let s: Status = serde_json::from_slice(payload)?;
        if s.v != VERSION {
            return Err(Error::Version(s.v));
        }
        if s.device != topic_device {
            return Err(Error::DeviceMismatch {
                envelope: s.device,
                topic: topic_device.to_owned(),
            });
        }
        Ok(s)
    }
}

/// Body of `edge/v1/{device}/register`, sent (class control) at every agent start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub agent_version: String,
    pub hostname: String,
    pub os: String,
    pub arch: String,
    /// Random per process start; lets the coordinator count restarts.
    pub boot_id: String,
    pub started_ms: u64,
    /// Capabilities this agent build offers (e.g. `outbox`, `telemetry`).
    pub capabilities: Vec<String>,
    /// Deployment groups the device belongs to (`[deploy] groups`); the coordinator resolves
    /// `deploy --group` from these. Absent in messages from older agents.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Whether ONNX inference works on this device, and why not. Absent from older agents.
    #[serde(default)]
    pub inference: InferenceStatus,
}

/// The agent's ONNX Runtime, as found at start-up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceStatus {
    pub available: bool,
    /// ONNX Runtime's version (`1.32.0`); empty when unavailable.
    #[serde(default)]
    pub version: String,
    /// The library file in use; empty when unavailable.
    #[serde(default)]
    pub library: String,
    /// Why inference is unavailable (every path tried); empty when available.
    #[serde(default)]
    pub reason: String,
}

/// Inference in telemetry: the runtime and every loaded model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceTelemetry {
    pub status: InferenceStatus,
    #[serde(default)]
    pub models: Vec<ModelTelemetry>,
}

/// One loaded model. Counters are totals since the agent started, over all its versions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelTelemetry {
    /// The model's name as pipelines and model deployments refer to it.
    pub name: String,
    /// The version serving now (first 12 hex digits of its sha256).
    pub version: String,
    /// Execution provider it actually runs on (`cpu`, `cuda`, ...).
    pub provider: String,
    /// `full`, or `partial` when the provider left some nodes to the CPU.
    pub placement: String,
    /// Preferred providers that were skipped, each `provider: reason`.
    #[serde(default)]
    pub skipped: Vec<String>,
    pub runs: u64,
    pub errors: u64,
    /// Versions swapped in after the first.
    #[serde(default)]
    pub swaps: u64,
    /// Run latency percentiles, microseconds.
    pub p50_us: u64,
    pub p99_us: u64,
}

/// Body of `edge/v1/{device}/telemetry` (class telemetry).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Telemetry {
    /// Whole-machine CPU use since the previous sample, percent of all cores.
    pub cpu_percent: f32,
    pub cpu_count: u32,
    /// 1, 5 and 15 minute load averages.
    pub load_avg: [f64; 3],
    pub mem_total_bytes: u64,
    pub mem_used_bytes: u64,
    pub uptime_s: u64,
    pub disks: Vec<DiskStat>,
    pub temperatures: Vec<Temperature>,
    pub networks: Vec<NetStat>,
    /// Resident set size of the agent process itself.
    pub agent_rss_bytes: u64,
    pub outbox: OutboxStats,
    /// The running pipeline; absent when none runs (or from older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<PipelineTelemetry>,
    /// ONNX inference: runtime status and loaded models; absent from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference: Option<InferenceTelemetry>,
    /// Federated learning on the device; absent from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fl: Option<FlTelemetry>,
    /// Offload decisions and outcomes; absent from older agents and when no stage offloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload: Option<OffloadTelemetry>,
    /// Enrollment and message authentication on the device; absent from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthTelemetry>,
}

/// A device's view of message authentication, totals since the agent started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthTelemetry {
    /// Whether the device holds an accepted enrollment (and so seals and sends).
    pub enrolled: bool,
    /// Incoming messages dropped because they did not authenticate, by reason
    /// (`auth::AuthError::reason`, or `not_enrolled` for what arrived before enrollment).
    #[serde(default)]
    pub rejected: std::collections::BTreeMap<String, u64>,
}

/// Offload decisions of a device, totals since the agent started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffloadTelemetry {
    /// The configured mode (`local`, `offload`, `cost`, `adaptive`).
    pub mode: String,
    /// Decisions by `side/reason` (`local/offline`, `offload/learned`, ...).
    pub decisions: std::collections::BTreeMap<String, u64>,
    /// Offloaded frames that ran locally after all, by cause (`timeout`, `overloaded`,
    /// `expired`, `unknown_model`, `error`, `not_sent`, `hedge`).
    pub fallbacks: std::collections::BTreeMap<String, u64>,
    /// Offloaded frames answered by the coordinator.
    pub remote_ok: u64,
    /// Answers that came after their frame was already done (late, or hedge lost).
    pub late_answers: u64,
    /// Link probes sent (when no offload measured the link for a while).
    #[serde(default)]
    pub probes: u64,
    /// The link as measured: round trip (ms) and uplink throughput (bytes/s, 0: unknown).
    pub rtt_ms: f64,
    pub uplink_bps: f64,
    /// Per offloadable model: moving averages of local and end-to-end remote latency, ms.
    pub models: Vec<OffloadModelTelemetry>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffloadModelTelemetry {
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_ms: Option<f64>,
}

/// Federated learning counters of a device, totals since the agent started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlTelemetry {
    /// Round messages received (before verification).
    pub rounds_received: u64,
    /// Round messages refused (signature, key, malformed).
    pub rejected: u64,
    /// Global weights patched into the served model.
    pub applied: u64,
    /// Local trainings that returned weights.
    pub trained: u64,
    /// Updates queued in the outbox.
    pub queued: u64,
    /// Rounds that produced no update (no samples, trainer error, outbox refusal).
    pub failed: u64,
    /// The last round message's task, round and global version.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub task: String,
    #[serde(default)]
    pub round: u32,
    #[serde(default)]
    pub version: u32,
}

/// The running pipeline in telemetry. Counters are totals since the pipeline started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineTelemetry {
    pub name: String,
    /// The deployment that installed it; empty for a pipeline from the local config.
    pub deployment_id: String,
    pub version: u64,
    pub started_ms: u64,
    pub sources: Vec<NodeTelemetry>,
    pub stages: Vec<StageTelemetry>,
    pub sinks: Vec<NodeTelemetry>,
}

/// A source (frames emitted) or sink (frames written).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeTelemetry {
    pub name: String,
    pub frames: u64,
    /// Dropped because the next channel was full.
    pub dropped: u64,
    pub errors: u64,
}

/// One stage: a WASM module or an ONNX model (`kind = "inference"`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageTelemetry {
    pub name: String,
    /// `inference` for an ONNX model stage; empty for a WASM stage (and from older agents).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// Module (or model) name and the first 12 hex digits of its sha256.
    pub module: String,
    /// `process` calls and how they ended.
    pub calls: u64,
    pub ok: u64,
    pub errors: u64,
    pub traps: u64,
    pub timeouts: u64,
    pub memory_limits: u64,
    pub restarts: u64,
    /// Frames refused while the stage waited to restart or after it failed.
    pub refused: u64,
    /// Frames the stage emitted.
    pub frames_out: u64,
    /// Call latency percentiles, microseconds.
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// Why the stage was marked failed, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskStat {
    pub mount: String,
    pub total_bytes: u64,
    pub available_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Temperature {
    pub label: String,
    pub celsius: f32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetStat {
    pub iface: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// Outbox accounting as reported in telemetry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxStats {
    /// Messages waiting, per class in [`Class::ALL`] order.
    pub depth: [u64; 4],
    pub depth_bytes: u64,
    pub capacity_bytes: u64,
    /// Messages removed because their TTL passed before delivery.
    pub expired: u64,
    /// Telemetry messages evicted to make room (the only class ever evicted).
    pub evicted: u64,
    /// Messages refused because the outbox was full.
    pub refused: u64,
    /// Messages the coordinator acknowledged as committed since start (end-to-end acks).
    pub delivered: u64,
    /// Messages the broker took that still await the coordinator's acknowledgement (kept,
    /// and counted in `depth`, until it comes).
    #[serde(default)]
    pub awaiting_ack: u64,
}

/// Body of `edge/v1/{device}/data/{stream}`: an application message published through the
/// agent's local API, or a pipeline's outbox sink output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Data {
    pub stream: String,
    pub payload: DataPayload,
}

/// What a data message carries: a tensor (`{"tensor": {..}}`, an inference stage's output, in
/// [`tensor::WireTensor`]'s JSON form) or any other JSON document (what apps publish through
/// the local API, and the other frame kinds of pipelines: `{"samples": [..]}`, `{"text": ..}`,
/// `{"bytes_b64": ..}`, a stage's own JSON).
///
/// On the wire it is the JSON itself, untagged. Decoding reads `{"tensor": {..}}` as a tensor
/// only when it is exactly what encoding a tensor writes (the tensor's strict JSON form, no
/// other key), and anything else as JSON, so decoding then encoding never changes a payload
/// beyond what `serde_json::Value` normalises (the coordinator's journal writes it back).
#[derive(Debug, Clone, PartialEq)]
pub enum DataPayload {
    Tensor(tensor::WireTensor),
    Json(serde_json::Value),
}

impl From<serde_json::Value> for DataPayload {
    /// Reads a tensor body as a tensor, as decoding does.
    fn from(v: serde_json::Value) -> DataPayload {
        if let serde_json::Value::Object(m) = &v
            && m.len() == 1
            && let Some(t) = m.get("tensor")
            && let Ok(t) = tensor::WireTensor::deserialize(t)
        {
            return DataPayload::Tensor(t);
        }
        DataPayload::Json(v)
    }
}

/// A payload equals the JSON document it is on the wire.
impl PartialEq<serde_json::Value> for DataPayload {
    fn eq(&self, other: &serde_json::Value) -> bool {
        match self {
            DataPayload::Json(v) => v == other,
            DataPayload::Tensor(_) => serde_json::to_value(self).is_ok_and(|v| &v == other),
        }
    }
}

impl Serialize for DataPayload {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            DataPayload::Tensor(t) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("tensor", t)?;
                m.end()
            }
            DataPayload::Json(v) => v.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for DataPayload {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde_json::Value::deserialize(d).map(DataPayload::from)
    }
}

/// Milliseconds since the Unix epoch by the local wall clock (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_order_is_priority() {
        assert!(Class::Control < Class::Model);
        assert!(Class::Results < Class::Telemetry);
        for c in Class::ALL {
            assert_eq!(Class::from_index(c.index() as u8), Some(c));
            assert_eq!(c.as_str().parse::<Class>(), Ok(c));
        }
        assert!("bulk".parse::<Class>().is_err());
    }

    #[test]
    fn device_ids_that_would_break_topics_are_refused() {
        for bad in ["", "a/b", "a+b", "#", "with space", &"x".repeat(65)] {
            assert!(validate_device_id(bad).is_err(), "{bad:?}");
        }
        validate_device_id("pi-4.lab_01").expect("valid id");
    }

    #[test]
    fn envelope_roundtrip_and_validation() {
        let env = Envelope {
            v: VERSION,
            id: message_id(7, 42),
            device: "d1".into(),
            class: Class::Results,
            seq: 42,
            prev: None,
            created_ms: 1,
            body: Data {
                stream: "s".into(),
                payload: serde_json::json!({"x": 1}).into(),
            },
        };
        let bytes = env.to_json();
        let back: Envelope<Data> = Envelope::from_json(&bytes, "d1").expect("decodes");
        assert_eq!(back, env);
        assert!(matches!(
            Envelope::<Data>::from_json(&bytes, "d2"),
            Err(Error::DeviceMismatch { .. })
        ));
        assert!(matches!(
            Envelope::<Data>::from_json(b"{not json", "d1"),
            Err(Error::Json(_))
        ));
        let big = vec![b' '; MAX_PAYLOAD_BYTES + 1];
        assert!(matches!(
            Envelope::<Data>::from_json(&big, "d1"),
            Err(Error::TooLarge { .. })
        ));
        let v2 = String::from_utf8(bytes)
            .expect("utf8")
            .replace("\"v\":1", "\"v\":2");
        assert!(matches!(
            Envelope::<Data>::from_json(v2.as_bytes(), "d1"),
            Err(Error::Version(2))
        ));
    }

    #[test]
    fn data_payloads_decode_and_encode_back_unchanged() {
        let tensor = r#"{"tensor":{"data_b64":"AACAPw==","dtype":"f32","shape":[1]}}"#;
        for text in [
            tensor,
            r#"{"tensor":{"data_b64":"AACAPw==","dtype":"f32","name":"y","shape":[1]}}"#,
            // Not exactly a tensor body: kept as JSON.
            r#"{"tensor":{"data_b64":"AACAPw==","dtype":"f32","shape":[2]}}"#,
            r#"{"tensor":{"data_b64":"AACAPw==","dtype":"f32","name":"","shape":[1]}}"#,
            r#"{"other":1,"tensor":{"data_b64":"AACAPw==","dtype":"f32","shape":[1]}}"#,
            r#"{"tensor":{"data_b64":"AACAPw==","dtype":"f32","shape":[1.0]}}"#,
            r#"{"tensor":"x"}"#,
            r#"{"samples":[1,0.1,1e-7]}"#,
            r#"{"text":"hi"}"#,
            r#"[1,2]"#,
            r#""nope""#,
            "null",
            "17",
        ] {
            let v: serde_json::Value = serde_json::from_str(text).expect("json");
            let p: DataPayload = serde_json::from_str(text).expect("any json decodes");
            assert_eq!(
                serde_json::to_string(&p).expect("encodes"),
                serde_json::to_string(&v).expect("encodes"),
                "{text}"
            );
        }
        match serde_json::from_str::<DataPayload>(tensor).expect("decodes") {
            DataPayload::Tensor(t) => assert_eq!(t.to_f32(), Some(vec![1.0])),
            other => panic!("not read as a tensor: {other:?}"),
        }
        let body = Data {
            stream: "s".into(),
            payload: DataPayload::Tensor(tensor::WireTensor::from_f32("", vec![1], &[1.0])),
        };
        assert_eq!(
            serde_json::to_string(&body).expect("encodes"),
            format!(r#"{{"stream":"s","payload":{tensor}}}"#)
        );
    }

    #[test]
    fn message_ids_are_unique_per_incarnation_and_seq() {
        assert_ne!(message_id(1, 2), message_id(2, 1));
        validate_message_id(&message_id(u64::MAX, u64::MAX)).expect("valid");
    }
}
