//! The pipeline description: what a user writes in `pipeline.toml` (or a deployment
//! carries), parsed and checked without touching a module, a file or the network.
//!
//! ```toml
//! name = "vibration"
//!
//! [[source]]
//! name = "imu"
//! kind = "synthetic"          # synthetic | file | mqtt
//! stream = "vibration/motor-1"
//! rate_hz = 20                # frames per second
//! window = 256                # samples per frame
//!
//! [[stage]]
//! name = "features"
//! module = "feature_extractor.wasm"
//! input = "imu"
//! config = { sample_rate_hz = 1000.0, bands = 8 }
//!
//! [[sink]]
//! kind = "outbox"             # outbox | log | dataset
//! input = "features"
//! ```
//!
//! Nodes connect by name: a stage or sink lists its inputs (sources or stages); a node's
//! output goes to every node that names it. The graph must be acyclic and every source and
//! stage must feed something.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::Deserialize;

/// Most nodes (sources, stages and sinks together) one pipeline may have.
pub const MAX_NODES: usize = 64;
/// Largest channel capacity between two nodes, frames.
pub const MAX_CHANNEL_CAPACITY: usize = 65_536;

/// A whole pipeline.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    /// Names the pipeline in logs, metrics and the stages' kv namespaces.
    pub name: String,
    /// Frames each channel between two nodes holds before the sender waits (or, for
    /// sources with `on_full = "drop"`, drops): the pipeline's backpressure.
    #[serde(default = "default_capacity")]
    pub channel_capacity: usize,
    #[serde(default, rename = "source")]
    pub sources: Vec<SourceSpec>,
    #[serde(default, rename = "stage")]
    pub stages: Vec<StageSpec>,
    #[serde(default, rename = "sink")]
    pub sinks: Vec<SinkSpec>,
    /// What this pipeline can train in federated-learning rounds (optional).
    #[serde(default)]
    pub training: Option<TrainingSpec>,
}

/// `[training]`: the pipeline trains `model` (the model of one of its inference stages) with
/// the `trainer` module on the samples its dataset sink stores in `dataset`. Each new global
/// model of a federated task is patched into that model, so the inference stage serves it.
///
/// ```toml
/// [training]
/// model = "models/digits.onnx"
/// trainer = "mlp_trainer.wasm"
/// dataset = "digits"
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSpec {
    pub model: String,
    pub trainer: String,
    pub dataset: String,
}

fn default_capacity() -> usize {
    64
}

/// One or several input names: `input = "a"` or `input = ["a", "b"]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Inputs {
    One(String),
    Many(Vec<String>),
}

impl Inputs {
    pub fn names(&self) -> Vec<&str> {
        match self {
            Inputs::One(n) => vec![n.as_str()],
            Inputs::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// What a source does when the next node's channel is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Wait for room (replaying a file: nothing is lost, the replay slows down).
    Block,
    /// Drop the frame and count it (live sensors and MQTT: the data cannot be paused).
    Drop,
}

/// A source of frames.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceSpec {
    /// A generated sensor signal (demos, tests and benchmarks): sine tones plus noise, with
    /// an optional burst of extra amplitude every `anomaly_every` frames.
    Synthetic {
        name: String,
        /// Stream name of the frames; default: the source name.
        #[serde(default)]
        stream: Option<String>,
        /// Frames per second; 0: as fast as the pipeline takes them.
        #[serde(default = "default_rate")]
        rate_hz: f64,
        /// Samples per frame.
        #[serde(default = "default_window")]
        window: u32,
        /// Sample rate of the simulated sensor, Hz (sets the tone frequencies' scale).
        #[serde(default = "default_sample_rate")]
        sample_rate_hz: f64,
        /// Tones as `[frequency_hz, amplitude]` pairs.
        #[serde(default = "default_tones")]
        tones: Vec<[f64; 2]>,
        /// Amplitude of uniform noise added to every sample.
        #[serde(default = "default_noise")]
        noise: f64,
        /// Every this many frames one frame gets `anomaly_gain` times the amplitude; 0: never.
        #[serde(default)]
        anomaly_every: u64,
        #[serde(default = "default_gain")]
        anomaly_gain: f64,
        /// Stop after this many frames; 0: run until the pipeline stops.
        #[serde(default)]
        count: u64,
        #[serde(default)]
        seed: u64,
        #[serde(default = "drop_when_full")]
        on_full: OnFull,
    },
    /// Replays a local file, one frame per line.
    File {
        name: String,
        /// The file; relative paths are relative to the pipeline description's directory.
        path: PathBuf,
        #[serde(default)]
        format: FileFormat,
        #[serde(default)]
        stream: Option<String>,
        /// Lines per second; 0: as fast as the pipeline takes them.
        #[serde(default)]
        rate_hz: f64,
        /// Start again at the end of the file.
        #[serde(default)]
        repeat: bool,
        #[serde(default = "block_when_full")]
        on_full: OnFull,
    },
    /// Messages from an MQTT topic filter on the agent's broker connection.
    Mqtt {
        name: String,
        /// Topic filter (`+` and `#` allowed).
        topic: String,
        /// How to read the payload: `json` (a JSON document) or `bytes` (opaque).
        #[serde(default)]
        payload: MqttPayload,
        /// Stream name of the frames; default: the message's topic.
        #[serde(default)]
        stream: Option<String>,
        #[serde(default = "drop_when_full")]
        on_full: OnFull,
    },
}

fn default_rate() -> f64 {
    10.0
}
fn default_window() -> u32 {
    256
}
fn default_sample_rate() -> f64 {
    1000.0
}
fn default_tones() -> Vec<[f64; 2]> {
    vec![[50.0, 1.0], [120.0, 0.3]]
}
fn default_noise() -> f64 {
    0.05
}
fn default_gain() -> f64 {
    8.0
}
fn drop_when_full() -> OnFull {
    OnFull::Drop
}
fn block_when_full() -> OnFull {
    OnFull::Block
}

/// Line format of a replayed file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    /// One JSON document per line (a `json` frame).
    #[default]
    Jsonl,
    /// Comma-separated numbers per line (a `samples` frame).
    Samples,
    /// Each line as opaque bytes (a `bytes` frame; e.g. CSV records for the encoder).
    Lines,
}

/// How an MQTT source reads payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MqttPayload {
    #[default]
    Json,
    Bytes,
}

impl SourceSpec {
    pub fn name(&self) -> &str {
        match self {
            SourceSpec::Synthetic { name, .. }
            | SourceSpec::File { name, .. }
            | SourceSpec::Mqtt { name, .. } => name,
        }
    }
}

/// What runs a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StageKind {
    /// A WASM component (`module`).
    #[default]
    Wasm,
    /// An ONNX model (`model`) on ONNX Runtime: tensor (or samples) frames in, one tensor
    /// frame per model output out.
    Inference,
}

/// A stage: a WASM module, or an ONNX model with `kind = "inference"`:
///
/// ```toml
/// [[stage]]
/// name = "vad"
/// kind = "inference"
/// model = "models/vad.onnx"   # relative to the description, or the deployment's artifact
/// input = "encoder"
/// model_input = "x"           # optional: the model input frames feed (default: its only one)
/// model_outputs = ["y"]       # optional: outputs to emit (default: all)
/// max_batch = 8               # optional: frames run together (leading dimension)
/// max_wait_ms = 5             # optional: longest a frame waits for a batch to fill
/// offload_model = "vad"       # optional: the coordinator's name for it; frames may run there
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    pub name: String,
    #[serde(default)]
    pub kind: StageKind,
    /// WASM stages: the module, a `.wasm` path relative to the description (local pipelines)
    /// or the artifact name in the deployment manifest.
    #[serde(default)]
    pub module: String,
    /// Inference stages: the `.onnx` model, named like `module`. It is also the model's name
    /// in telemetry and in model deployments (`edge-coordinator deploy --model NAME=FILE`).
    #[serde(default)]
    pub model: String,
    pub input: Inputs,
    /// WASM stages: handed to the module's `init` as JSON.
    #[serde(default = "empty_table")]
    pub config: toml::Value,
    /// Inference stages: the model input that frames feed; default: the model's only input.
    #[serde(default)]
    pub model_input: Option<String>,
    /// Inference stages: the model outputs emitted as frames, in this order; default: all.
    #[serde(default)]
    pub model_outputs: Vec<String>,
    /// Inference stages: most frames run as one batch (concatenated along the first
    /// dimension, which the model must leave dynamic); 1: no batching.
    #[serde(default = "one_u32")]
    pub max_batch: u32,
    /// Inference stages: longest a frame waits for its batch to fill, ms.
    #[serde(default)]
    pub max_wait_ms: u64,
    /// Inference stages: the coordinator's name for the same model (a key of its
    /// `[offload.models]`); set, the agent's `[offload]` policy may run frames there.
    #[serde(default)]
    pub offload_model: String,
}

/// Largest `max_batch` of an inference stage.
pub const MAX_BATCH: u32 = 1024;

fn one_u32() -> u32 {
    1
}

impl StageSpec {
    /// The artifact the stage runs: its module or its model.
    pub fn artifact(&self) -> &str {
        match self.kind {
            StageKind::Wasm => &self.module,
            StageKind::Inference => &self.model,
        }
    }
}

fn empty_table() -> toml::Value {
    toml::Value::Table(Default::default())
}

/// Where frames leave the pipeline.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkSpec {
    /// Publish through the outbox (durable, delivered when online) on
    /// `edge/v1/{device}/data/{stream}`.
    Outbox {
        #[serde(default)]
        name: Option<String>,
        input: Inputs,
        /// Outbox class: `results` (default), `telemetry`, `model` or `control`.
        #[serde(default = "default_class")]
        class: SinkClass,
        /// Data stream to publish on; default: the frame's stream.
        #[serde(default)]
        stream: Option<String>,
        /// Time to live, seconds; default: the class's TTL from the agent config.
        #[serde(default)]
        ttl_s: Option<u64>,
    },
    /// Write a line to the agent's log.
    Log {
        #[serde(default)]
        name: Option<String>,
        input: Inputs,
        /// Log one frame in this many.
        #[serde(default = "one")]
        every: u64,
    },
    /// Append labeled samples to the local dataset store (training data).
    Dataset {
        #[serde(default)]
        name: Option<String>,
        input: Inputs,
        /// Dataset name inside the store.
        #[serde(default = "default_dataset")]
        dataset: String,
        /// Frame label holding the sample's class (`label=3`); frames without it are
        /// stored unlabeled unless `require_label`. A JSON frame's `label` field also counts.
        #[serde(default = "default_label_key")]
        label_key: String,
        #[serde(default)]
        require_label: bool,
    },
}

fn one() -> u64 {
    1
}
fn default_dataset() -> String {
    "default".into()
}
fn default_label_key() -> String {
    "label".into()
}
fn default_class() -> SinkClass {
    SinkClass::Results
}

/// Outbox class of an outbox sink (our own enum: the config schema stays ours).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkClass {
    Control,
    Model,
    Results,
    Telemetry,
}

impl SinkSpec {
    pub fn inputs(&self) -> &Inputs {
        match self {
            SinkSpec::Outbox { input, .. }
            | SinkSpec::Log { input, .. }
            | SinkSpec::Dataset { input, .. } => input,
        }
    }

    fn explicit_name(&self) -> Option<&str> {
        match self {
            SinkSpec::Outbox { name, .. }
            | SinkSpec::Log { name, .. }
            | SinkSpec::Dataset { name, .. } => name.as_deref(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            SinkSpec::Outbox { .. } => "outbox",
            SinkSpec::Log { .. } => "log",
            SinkSpec::Dataset { .. } => "dataset",
        }
    }
}

/// A description that does not parse or does not make a pipeline; the message names the
/// node and field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

impl PipelineSpec {
    /// Parses and validates a description.
    pub fn parse(text: &str) -> Result<PipelineSpec, SpecError> {
        let spec: PipelineSpec = toml::from_str(text).map_err(|e| SpecError(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Sink names, explicit or derived (`{kind}-{n}`), in declaration order.
    pub fn sink_names(&self) -> Vec<String> {
        self.sinks
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.explicit_name()
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("{}-{}", s.kind(), i + 1))
            })
            .collect()
    }

    /// Stages in an order where every stage comes after the stages it reads from.
    pub fn stage_order(&self) -> Vec<usize> {
        // validate() has proven the graph acyclic, so this terminates with every stage.
        let index: BTreeMap<&str, usize> = self
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let mut done = vec![false; self.stages.len()];
        let mut order = Vec::with_capacity(self.stages.len());
        while order.len() < self.stages.len() {
            let before = order.len();
            for (i, s) in self.stages.iter().enumerate() {
                if done[i] {
                    continue;
                }
                let ready = s
                    .input
                    .names()
                    .iter()
                    .all(|n| index.get(n).is_none_or(|&j| done[j]));
                if ready {
                    done[i] = true;
                    order.push(i);
                }
            }
            if order.len() == before {
                break;
            }
        }
        order
    }

    fn validate_training(&self, t: &TrainingSpec) -> Result<(), SpecError> {
        let err = |m: String| Err(SpecError(m));
        if t.trainer.trim().is_empty() {
            return err("training.trainer: empty module name".into());
        }
        if !self
            .stages
            .iter()
            .any(|s| s.kind == StageKind::Inference && s.model == t.model)
        {
            return err(format!(
                "training.model {:?} is not the model of an inference stage of this pipeline",
                t.model
            ));
        }
        let datasets: BTreeSet<&str> = self
            .sinks
            .iter()
            .filter_map(|s| match s {
                SinkSpec::Dataset { dataset, .. } => Some(dataset.as_str()),
                _ => None,
            })
            .collect();
        if !datasets.contains(t.dataset.as_str()) {
            return err(format!(
                "training.dataset {:?} is not written by a dataset sink of this pipeline (they write {datasets:?})",
                t.dataset
            ));
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), SpecError> {
        let err = |m: String| Err(SpecError(m));
        if !valid_name(&self.name) {
            return err(format!(
                "pipeline name {:?} must be 1-64 characters of letters, digits, '-', '_' or '.'",
                self.name
            ));
        }
        if self.channel_capacity == 0 || self.channel_capacity > MAX_CHANNEL_CAPACITY {
            return err(format!(
                "channel_capacity must be between 1 and {MAX_CHANNEL_CAPACITY}"
            ));
        }
        let total = self.sources.len() + self.stages.len() + self.sinks.len();
        if total > MAX_NODES {
            return err(format!(
                "{total} nodes; a pipeline may have at most {MAX_NODES}"
            ));
        }
        if self.sources.is_empty() {
            return err("a pipeline needs at least one [[source]]".into());
        }
        if let Some(t) = &self.training {
            self.validate_training(t)?;
        }
        if self.sinks.is_empty() {
            return err("a pipeline needs at least one [[sink]]".into());
        }
        // Names that produce frames, and everything's name for uniqueness.
        let mut producers = BTreeSet::new();
        let mut all = BTreeSet::new();
        let sink_names = self.sink_names();
        let names = self
            .sources
            .iter()
            .map(|s| (s.name().to_owned(), "source", true))
            .chain(self.stages.iter().map(|s| (s.name.clone(), "stage", true)))
            .chain(sink_names.iter().map(|n| (n.clone(), "sink", false)));
        for (name, what, produces) in names {
            if !valid_name(&name) {
                return err(format!(
                    "{what} name {name:?} must be 1-64 characters of letters, digits, '-', '_' or '.'"
                ));
            }
            if !all.insert(name.clone()) {
                return err(format!("name {name:?} is used twice"));
            }
            if produces {
                producers.insert(name);
            }
        }
        for s in &self.sources {
            self.validate_source(s)?;
        }
        let mut consumed = BTreeSet::new();
        let edges = self
            .stages
            .iter()
            .map(|s| (&s.name, &s.input, "stage"))
            .chain(
                self.sinks
                    .iter()
                    .zip(&sink_names)
                    .map(|(s, n)| (n, s.inputs(), "sink")),
            );
        for (name, inputs, what) in edges {
            let names = inputs.names();
            if names.is_empty() {
                return err(format!("{what} {name:?} has no input"));
            }
            for i in names {
                if !producers.contains(i) {
                    return err(format!(
                        "{what} {name:?} reads from {i:?}, which is not a source or stage of this pipeline"
                    ));
                }
                if i == name {
                    return err(format!("stage {name:?} reads from itself"));
                }
                consumed.insert(i.to_owned());
            }
        }
        for s in &self.stages {
            let n = &s.name;
            match s.kind {
                StageKind::Wasm => {
                    if s.module.trim().is_empty() {
                        return err(format!("stage {n:?} has an empty module"));
                    }
                    let inference_only = !s.model.is_empty()
                        || s.model_input.is_some()
                        || !s.model_outputs.is_empty()
                        || s.max_batch != 1
                        || s.max_wait_ms != 0
                        || !s.offload_model.is_empty();
                    if inference_only {
                        return err(format!(
                            "stage {n:?}: model, model_input, model_outputs, max_batch, max_wait_ms and offload_model are for kind = \"inference\""
                        ));
                    }
                }
                StageKind::Inference => {
                    if s.model.trim().is_empty() {
                        return err(format!("stage {n:?}: an inference stage needs a model"));
                    }
                    if !s.module.is_empty() {
                        return err(format!(
                            "stage {n:?}: an inference stage runs a model, not a module"
                        ));
                    }
                    if s.config.as_table().is_some_and(|t| !t.is_empty()) {
                        return err(format!(
                            "stage {n:?}: config is for WASM stages; an inference stage takes none"
                        ));
                    }
                    if s.max_batch == 0 || s.max_batch > MAX_BATCH {
                        return err(format!(
                            "stage {n:?}: max_batch must be between 1 and {MAX_BATCH}"
                        ));
                    }
                    if s.max_wait_ms > 10_000 {
                        return err(format!("stage {n:?}: max_wait_ms must be at most 10000"));
                    }
                    if !s.offload_model.is_empty()
                        && (s.offload_model.len() > 255
                            || s.offload_model.trim() != s.offload_model)
                    {
                        return err(format!(
                            "stage {n:?}: offload_model must be 1-255 characters without surrounding spaces"
                        ));
                    }
                }
            }
            if !s.config.is_table() {
                return err(format!("stage {n:?}: config must be a table"));
            }
        }
        if self.stage_order().len() != self.stages.len() {
            return err("stages form a cycle; a pipeline must be acyclic".into());
        }
        for p in &producers {
            if !consumed.contains(p) {
                return err(format!(
                    "{p:?} feeds nothing: its frames would be discarded; connect it to a stage or sink, or remove it"
                ));
            }
        }
        for (s, name) in self.sinks.iter().zip(&sink_names) {
            match s {
                SinkSpec::Outbox {
                    stream: Some(st), ..
                } => {
                    protocol::v1::topics::validate_stream(st).map_err(|e| {
                        SpecError(format!("sink {name:?}: invalid stream {st:?}: {e}"))
                    })?;
                }
                SinkSpec::Log { every, .. } if *every == 0 => {
                    return err(format!("sink {name:?}: every must be at least 1"));
                }
                SinkSpec::Dataset { dataset, .. } if !valid_name(dataset) => {
                    return err(format!("sink {name:?}: invalid dataset name {dataset:?}"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn validate_source(&self, s: &SourceSpec) -> Result<(), SpecError> {
        let name = s.name();
        let err = |m: String| Err(SpecError(format!("source {name:?}: {m}")));
        match s {
            SourceSpec::Synthetic {
                rate_hz,
                window,
                sample_rate_hz,
                tones,
                noise,
                anomaly_gain,
                ..
            } => {
                if !(rate_hz.is_finite() && *rate_hz >= 0.0 && *rate_hz <= 100_000.0) {
                    return err("rate_hz must be between 0 and 100000".into());
                }
                if *window == 0 || *window > 1 << 20 {
                    return err("window must be between 1 and 1048576 samples".into());
                }
                if !(sample_rate_hz.is_finite() && *sample_rate_hz > 0.0) {
                    return err("sample_rate_hz must be positive".into());
                }
                if tones.iter().flatten().any(|x| !x.is_finite())
                    || !noise.is_finite()
                    || !anomaly_gain.is_finite()
                {
                    return err("tones, noise and anomaly_gain must be finite numbers".into());
                }
            }
            SourceSpec::File { path, rate_hz, .. } => {
                if path.as_os_str().is_empty() {
                    return err("path is empty".into());
                }
                if !(rate_hz.is_finite() && *rate_hz >= 0.0) {
                    return err("rate_hz must be 0 or positive".into());
                }
            }
            SourceSpec::Mqtt { topic, .. } => {
                if !valid_filter(topic) {
                    return err(format!("invalid MQTT topic filter {topic:?}"));
                }
            }
        }
        Ok(())
    }
}

/// Pipeline, node and dataset names: short, printable, usable in a kv namespace.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// An MQTT topic filter: non-empty, `#` only as the whole last level, `+` only as a whole
/// level, no NUL.
pub fn valid_filter(f: &str) -> bool {
    if f.is_empty() || f.len() > 1024 || f.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = f.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == levels.len() - 1,
        "+" => true,
        l => !l.contains('#') && !l.contains('+'),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "vib"
[[source]]
name = "imu"
kind = "synthetic"
rate_hz = 5
[[stage]]
name = "features"
module = "feature_extractor.wasm"
input = "imu"
config = { sample_rate_hz = 1000.0, bands = 4 }
[[stage]]
name = "detect"
module = "anomaly_detector.wasm"
input = ["features"]
[[sink]]
kind = "outbox"
input = "detect"
[[sink]]
kind = "log"
name = "show"
input = ["features", "imu"]
"#;

    #[test]
    fn a_good_pipeline_parses_with_defaults() {
        let p = PipelineSpec::parse(GOOD).expect("valid");
        assert_eq!(p.channel_capacity, 64);
        assert_eq!(
            p.sink_names(),
            vec!["outbox-1".to_owned(), "show".to_owned()]
        );
        assert_eq!(p.stage_order(), vec![0, 1]);
        let SourceSpec::Synthetic {
            window, on_full, ..
        } = &p.sources[0]
        else {
            panic!("synthetic")
        };
        assert_eq!((*window, *on_full), (256, OnFull::Drop));
        assert_eq!(p.stages[0].config["bands"].as_integer(), Some(4));
    }

    #[test]
    fn stage_order_puts_readers_after_writers() {
        let text = GOOD
            .replace("name = \"features\"\nmodule", "name = \"f2\"\nmodule")
            .replace("input = [\"features\"]", "input = [\"f2\"]")
            .replace(
                "input = [\"features\", \"imu\"]",
                "input = [\"f2\", \"imu\"]",
            );
        // Declared in order; now reverse the declaration order of the two stages.
        let mut p = PipelineSpec::parse(&text).expect("valid");
        p.stages.reverse();
        let order = p.stage_order();
        assert_eq!(p.stages[order[0]].name, "f2");
    }

    fn err(text: &str) -> String {
        PipelineSpec::parse(text).expect_err("invalid").0
    }

    const TRAINS: &str = r#"
name = "digits"
[[source]]
name = "shard"
kind = "file"
path = "/data/shard.jsonl"
format = "jsonl"
[[stage]]
name = "classify"
kind = "inference"
model = "models/digits.onnx"
input = "shard"
[[sink]]
kind = "dataset"
input = "shard"
dataset = "digits"
[[sink]]
kind = "log"
input = "classify"
[training]
model = "models/digits.onnx"
trainer = "mlp_trainer.wasm"
dataset = "digits"
"#;

    #[test]
    fn training_names_a_model_and_a_dataset_of_the_pipeline() {
        let p = PipelineSpec::parse(TRAINS).expect("valid");
        let t = p.training.expect("training");
        assert_eq!(
            (t.model.as_str(), t.dataset.as_str()),
            ("models/digits.onnx", "digits")
        );
        let (graph, _) = TRAINS.split_once("[training]").expect("section");
        let training = |body: &str| format!("{graph}[training]\n{body}");
        let e = err(&training(
            "model = \"other.onnx\"\ntrainer = \"t.wasm\"\ndataset = \"digits\"",
        ));
        assert!(e.contains("training.model \"other.onnx\""), "{e}");
        let e = err(&training(
            "model = \"models/digits.onnx\"\ntrainer = \"t.wasm\"\ndataset = \"faces\"",
        ));
        assert!(e.contains("training.dataset \"faces\""), "{e}");
        let e = err(&training(
            "model = \"models/digits.onnx\"\ntrainer = \"\"\ndataset = \"digits\"",
        ));
        assert!(e.contains("training.trainer"), "{e}");
        let e = err(&training(
            "model = \"models/digits.onnx\"\ntrainer = \"t.wasm\"",
        ));
        assert!(e.contains("dataset"), "{e}");
    }

    #[test]
    fn bad_pipelines_name_the_problem() {
        assert!(err(&GOOD.replace("kind = \"synthetic\"", "kind = \"camera\"")).contains("camera"));
        assert!(err(&GOOD.replace("rate_hz = 5", "rate_hz = 5\ncolour = 1")).contains("colour"));
        assert!(
            err(&GOOD.replace("input = \"imu\"", "input = \"imx\"")).contains("\"imx\""),
            "unknown input"
        );
        assert!(err(&GOOD.replace("name = \"show\"", "name = \"imu\"")).contains("twice"));
        let cycle = GOOD.replace("input = \"imu\"", "input = \"detect\"");
        assert!(err(&cycle).contains("cycle") || err(&cycle).contains("feeds nothing"));
        let self_loop = GOOD.replace("input = [\"features\"]", "input = [\"detect\"]");
        assert!(err(&self_loop).contains("itself"));
        let dangling = GOOD.replace("input = \"detect\"", "input = \"features\"");
        assert!(
            err(&dangling).contains("feeds nothing"),
            "{}",
            err(&dangling)
        );
        assert!(err("name = \"x\"\n").contains("source"));
        assert!(err(&GOOD.replace("name = \"vib\"", "name = \"a b\"")).contains("pipeline name"));
        assert!(err(&GOOD.replace("rate_hz = 5", "rate_hz = -1")).contains("rate_hz"));
        assert!(
            err(&GOOD.replace("kind = \"log\"", "kind = \"log\"\nevery = 0")).contains("every")
        );
        assert!(
            err(&GOOD.replace(
                "kind = \"synthetic\"\nrate_hz = 5",
                "kind = \"mqtt\"\ntopic = \"a/#/b\""
            ))
            .contains("topic filter")
        );
    }

    const MIXED: &str = r#"
name = "mixed"
[[source]]
name = "imu"
kind = "synthetic"
[[stage]]
name = "enc"
module = "encoder.wasm"
input = "imu"
[[stage]]
name = "vad"
kind = "inference"
model = "models/vad.onnx"
input = "enc"
max_batch = 8
max_wait_ms = 5
[[sink]]
kind = "log"
input = "vad"
"#;

    #[test]
    fn inference_stages_parse_and_their_fields_are_checked() {
        let spec = PipelineSpec::parse(MIXED).expect("valid");
        assert_eq!(spec.stages[0].kind, StageKind::Wasm);
        assert_eq!(spec.stages[1].kind, StageKind::Inference);
        assert_eq!(spec.stages[1].artifact(), "models/vad.onnx");
        assert_eq!(spec.stages[1].max_batch, 8);
        assert!(err(&MIXED.replace("model = \"models/vad.onnx\"\n", "")).contains("needs a model"));
        assert!(err(&MIXED.replace("max_batch = 8", "max_batch = 0")).contains("max_batch"));
        assert!(
            err(&MIXED.replace(
                "module = \"encoder.wasm\"",
                "module = \"encoder.wasm\"\nmax_batch = 2"
            ))
            .contains("kind = \"inference\"")
        );
        assert!(
            err(&MIXED.replace(
                "model = \"models/vad.onnx\"",
                "model = \"m.onnx\"\nmodule = \"x.wasm\""
            ))
            .contains("not a module")
        );
        assert!(err(&MIXED.replace("kind = \"inference\"", "kind = \"gpu\"")).contains("gpu"));
    }

    #[test]
    fn filters() {
        for ok in ["a", "a/+/b", "a/#", "#", "+/+"] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in ["", "a/#/b", "a#", "a/b+", "x\0"] {
            assert!(!valid_filter(bad), "{bad:?}");
        }
    }
}
