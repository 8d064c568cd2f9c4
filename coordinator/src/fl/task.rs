//! The federated task file (TOML) and its validation into a [`TaskSpec`].
//!
//! ```toml
//! id = "digits"                     # task id (letters, digits, `-_.`), unique per coordinator
//! model = "models/digits.onnx"      # the model's name in the devices' pipelines
//! initial = "digits_mlp.onnx"       # ONNX file (relative to this file): initial global weights
//! trainer = "mlp_trainer.wasm"      # optional, relative to this file: the devices' trainer
//!                                   # module, run once on a synthetic batch before the task
//!                                   # is accepted (see fl::trainer_check)
//! params = ["fc2.weight", "fc2.bias"]   # optional, the older spelling of train.trainable
//! group = "fl"                      # members: a device group, or devices = ["a", "b"]
//! rounds = 20
//! fraction = 1.0                    # of the online members selected per round (default 1.0)
//! min_clients = 3                   # no round opens with fewer online members (default 1)
//! quorum = 0.7                      # of the selected whose on-time updates close a round (1.0)
//! round_timeout_s = 60              # deadline after opening (default 60)
//! round_interval_s = 0              # pause between a round's close and the next one (default 0):
//!                                   # a cadence that spares devices' batteries and uplinks
//! min_updates = 1                   # updates needed to close at the deadline (default 1)
//! max_staleness = 1                 # late updates up to this many rounds old count (default 1)
//! max_failed_rounds = 3             # failed rounds in a row that stop the task (default 3)
//! max_extensions = 10               # deadlines without min_updates before a round fails (10)
//! seed = 0                          # client selection and per-device training seeds (default 0)
//! [train]                           # sent to the devices with each round
//! trainable = ["fc2.weight", "fc2.bias"]  # optional: the layers to train, whole and the
//!                                   # last ones (a head); the others stay frozen and are
//!                                   # never sent. Default: every dense layer, found from the
//!                                   # graph. Any order.
//! epochs = 5                        # default 1
//! lr = 0.1                          # default 0.05
//! batch_size = 16                   # default 32
//! mu = 0.0                          # FedProx proximal term (default 0)
//! codec = "fp32"                    # fp32 | fp16 | int8 | int4 | topk:F | sign (default fp32)
//! max_samples = 1000                # optional
//! [aggregate]
//! rule = "fedavg"                   # fedavg | trimmed-mean (trim, default 0.1) | median
//! server_optimizer = "sgd"          # sgd | fedavgm | fedadam
//! server_lr = 1.0                   # default 1.0 (sgd, fedavgm), 0.01 (fedadam)
//! momentum = 0.9                    # fedavgm (default 0.9)
//! beta1 = 0.9                       # fedadam (default 0.9)
//! beta2 = 0.99                      # fedadam (default 0.99)
//! tau = 0.001                       # fedadam (default 0.001)
//! clip = "auto"                     # update norms: auto (clip_multiplier x the round's
//!                                   # median norm, the default) | a number (fixed L2 norm) | "off"
//! clip_multiplier = 2.0             # auto (default 2.0)
//! [privacy]                         # optional: Gaussian differential privacy (DP-FedAvg),
//!                                   # needs rule = "fedavg" and a numeric clip; see fl::privacy
//! noise_multiplier = 1.0            # noise deviation over the clip norm
//! delta = 1e-5                      # default 1e-5
//! max_epsilon = 8.0                 # optional: the task stops before a round would pass it
//! [device]                          # optional, needs trainer: the limits the trainer is checked
//!                                   # under; the agent's [sandbox] keys and defaults
//! max_memory_bytes = 67108864       # default 64 MiB
//! train_timeout_ms = 60000          # default 60000
//! [eval]
//! holdout = "holdout.csv"           # optional: rows of features..., label
//! output = "probabilities"          # optional: the class-scores output (default: the first
//!                                   # f32 output, e.g. skl2onnx's `probabilities`, not `label`)
//! ```
//!
//! Every error names the file and the key. Keys that do not apply to the chosen rule or
//! optimizer are refused rather than silently ignored.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use edge_inference::{DType, read_initializers};
use protocol::v1::deploy::SigningKey;
use protocol::v1::fl::{
    Codec, ParamSpec, RoundHeader, TrainOrder, WeightsBlob, chunks, encode_round, weight_count,
};
use protocol::v1::{MAX_PAYLOAD_BYTES, validate_device_id, validate_message_id};
use serde::{Deserialize, Serialize};

use edge_sandbox::SandboxConfig;

use super::aggregate::{Rule, ServerOptimizer};
use super::eval::Holdout;
use super::privacy::{Clip, Privacy};
use super::trainer_check::{self, TrainerRun};

/// Errors from reading and validating a task file; each names the file, and the key where
/// one is at fault.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("cannot read {what} {path}: {error}")]
    Read {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    /// The `toml` message carries the line, column and an excerpt; it is kept whole.
    #[error("invalid task file {path}:\n{error}")]
    Parse {
        path: PathBuf,
        error: toml::de::Error,
    },
    #[error("task file {path}: invalid {key}: {reason}")]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
    /// The trainer module failed its one run in the sandbox ([`super::trainer_check`]); the
    /// reason is the sandbox's or the trainer's, as a device would report it.
    #[error(
        "task file {path}: the trainer {trainer} cannot train model {model} on a device with \
         max_memory_bytes={max_memory_bytes}, train_timeout_ms={train_timeout_ms}: {reason}"
    )]
    Trainer {
        path: PathBuf,
        trainer: String,
        model: String,
        max_memory_bytes: u64,
        train_timeout_ms: u64,
        reason: String,
    },
}

/// Why a model's initializers cannot be a task's trained weights.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read the model's initializers: {0}")]
    Read(edge_inference::PatchError),
    #[error("the trainer cannot train this model: {0}")]
    Structure(edge_inference::StructureError),
    #[error("{name} is not the weight or bias of a dense layer (the trainable ones: {trainable})")]
    NotTrainable { name: String, trainable: String },
    #[error(
        "{missing} is not listed, but its layer's other half is: a layer is trained whole, \
         weight and bias"
    )]
    Partial { missing: String },
    #[error(
        "{first} is trained but {frozen}, a later layer, is not: only the last layers can be \
         trained (a frozen feature extractor under a trained head), not a frozen layer \
         between trained ones"
    )]
    NotSuffix { first: String, frozen: String },
    #[error("lists no initializer")]
    NoneListed,
    #[error(
        "the last layer ({weight}) has one output: the trainer fits a classifier with a softmax \
         over two or more classes (export a binary classifier with two outputs)"
    )]
    SingleOutput { weight: String },
    #[error("{name} is listed twice")]
    Twice { name: String },
    #[error("the model has no initializer {name} (it has: {have})")]
    Missing { name: String, have: String },
    #[error("initializer {name} is {dtype}, only f32 can be trained")]
    NotF32 { name: String, dtype: DType },
    #[error("the model has no f32 initializer to train")]
    NoF32,
    #[error("initializer {name} is a scalar or empty; it cannot be trained")]
    Scalar { name: String },
    #[error("initializer {name} has a non-finite value at {index}")]
    NonFinite { name: String, index: usize },
    #[error(
        "{weights} weights make a round message of {size} bytes, over the protocol's limit of \
         {MAX_PAYLOAD_BYTES} bytes"
    )]
    TooLarge { weights: usize, size: usize },
    #[error(
        "{weights} weights: a task may have at most {} (32 MiB of f32)",
        chunks::MAX_WEIGHTS
    )]
    TooMany { weights: usize },
    #[error(transparent)]
    Round(protocol::v1::fl::FlError),
}

/// Which devices take part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Members {
    /// Every registered device whose registration lists this group.
    Group(String),
    /// These devices (once registered).
    Devices(Vec<String>),
}

impl Members {
    pub fn contains(&self, device: &str, groups: &[String]) -> bool {
        match self {
            Members::Group(g) => groups.iter().any(|x| x == g),
            Members::Devices(d) => d.iter().any(|x| x == device),
        }
    }
}

impl std::fmt::Display for Members {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Members::Group(g) => write!(f, "group {g}"),
            Members::Devices(d) => write!(f, "devices {}", d.join(",")),
        }
    }
}

/// The local-training hyperparameters sent with every round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSpec {
    pub epochs: u32,
    pub lr: f32,
    pub batch_size: u32,
    pub mu: f32,
    pub codec: Codec,
    pub max_samples: Option<u32>,
}

impl TrainSpec {
    /// The train order a selected device gets: these hyperparameters, its deadline and seed.
    pub fn order(&self, deadline_ms: u64, seed: u64) -> TrainOrder {
        TrainOrder {
            deadline_ms,
            epochs: self.epochs,
            lr: self.lr,
            batch_size: self.batch_size,
            mu: self.mu,
            codec: self.codec,
            seed,
            max_samples: self.max_samples,
        }
    }
}

/// A validated task: what `fl start` spools and `serve` runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub id: String,
    pub model: String,
    /// The trained initializers, in the order their weights are concatenated.
    pub params: Vec<ParamSpec>,
    pub members: Members,
    pub rounds: u32,
    pub fraction: f32,
    pub min_clients: u32,
    pub quorum: f32,
    pub round_timeout_s: u32,
    /// Least time between a round's close and the next round's opening, s (0: at once).
    #[serde(default)]
    pub round_interval_s: u32,
    pub min_updates: u32,
    pub max_staleness: u32,
    pub seed: u64,
    pub train: TrainSpec,
    pub rule: Rule,
    pub server_optimizer: ServerOptimizer,
    /// With only the last layers trained: the digest of the frozen ones in front
    /// ([`protocol::v1::fl::frozen_digest`]), which every round names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen: Option<String>,
    /// How update norms are bounded (tasks persisted before clipping existed: off).
    #[serde(default = "clip_off")]
    pub clip: Clip,
    /// Gaussian differential privacy (`[privacy]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<Privacy>,
    /// True when the task has a held-out set (`holdout.csv` beside it).
    pub holdout: bool,
    /// Rounds in a row that may fail (every selected device failed, or no update within
    /// `max_extensions` deadlines) before the task stops with their reasons.
    #[serde(default = "default_max_failed_rounds")]
    pub max_failed_rounds: u32,
    /// Deadlines a round may pass with fewer than `min_updates` updates (each extending it)
    /// before it fails.
    #[serde(default = "default_max_extensions")]
    pub max_extensions: u32,
    /// The output evaluation scores (`[eval] output`); `None`: the first f32 output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_output: Option<String>,
}

impl TaskSpec {
    pub fn weight_count(&self) -> usize {
        weight_count(&self.params)
    }

    /// On-time updates from the selected devices that close a round early.
    pub fn quorum_count(&self, selected: usize) -> usize {
        ceil_fraction(self.quorum, selected).clamp(1, selected.max(1))
    }

    /// Devices to select from `online` members: `fraction` of them, at least `min_clients`.
    pub fn selection_count(&self, online: usize) -> usize {
        ceil_fraction(self.fraction, online)
            .max(self.min_clients as usize)
            .min(online)
    }
}

fn clip_off() -> Clip {
    Clip::Off
}

fn default_max_failed_rounds() -> u32 {
    3
}

fn default_max_extensions() -> u32 {
    10
}

/// `ceil(fraction * n)`, where a product within f32 rounding of an integer counts as that
/// integer: 0.7 is 0.699999988 as f32 and must not make `0.7 * 10` round up to 8.
fn ceil_fraction(fraction: f32, n: usize) -> usize {
    let x = f64::from(fraction) * n as f64;
    let nearest = x.round();
    if (x - nearest).abs() <= 1e-6 * nearest.max(1.0) {
        nearest as usize
    } else {
        x.ceil() as usize
    }
}

/// A task file read and checked, with what it refers to.
#[derive(Debug, Clone)]
pub struct LoadedTask {
    pub spec: TaskSpec,
    /// The initial model file's bytes (kept: evaluation patches the global weights into it).
    pub model_bytes: Vec<u8>,
    /// Version 0 of the global weights: the params' initializers concatenated.
    pub initial: Vec<f32>,
    /// The held-out set's text, as read (copied beside the task for `serve`).
    pub holdout_text: Option<String>,
    /// The trainer's one run ([`super::trainer_check`]); `None` when the task names no
    /// `trainer` (not checked).
    pub trainer: Option<TrainerRun>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTask {
    id: String,
    model: String,
    initial: PathBuf,
    trainer: Option<PathBuf>,
    /// Deserialized as the agent's `[sandbox]` section: the same keys and defaults.
    device: Option<SandboxConfig>,
    params: Option<Vec<String>>,
    group: Option<String>,
    devices: Option<Vec<String>>,
    rounds: u32,
    fraction: Option<f32>,
    min_clients: Option<u32>,
    quorum: Option<f32>,
    round_timeout_s: Option<u32>,
    round_interval_s: Option<u32>,
    min_updates: Option<u32>,
    max_staleness: Option<u32>,
    max_failed_rounds: Option<u32>,
    max_extensions: Option<u32>,
    seed: Option<u64>,
    #[serde(default)]
    train: RawTrain,
    #[serde(default)]
    aggregate: RawAggregate,
    #[serde(default)]
    eval: RawEval,
    privacy: Option<RawPrivacy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrivacy {
    noise_multiplier: f32,
    delta: Option<f64>,
    max_epsilon: Option<f64>,
}

/// `clip = "auto" | "off" | 1.5`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawClip {
    Word(String),
    Norm(f32),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrain {
    trainable: Option<Vec<String>>,
    epochs: Option<u32>,
    lr: Option<f32>,
    batch_size: Option<u32>,
    mu: Option<f32>,
    codec: Option<String>,
    max_samples: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAggregate {
    rule: Option<String>,
    trim: Option<f32>,
    server_optimizer: Option<String>,
    server_lr: Option<f32>,
    momentum: Option<f32>,
    beta1: Option<f32>,
    beta2: Option<f32>,
    tau: Option<f32>,
    clip: Option<RawClip>,
    clip_multiplier: Option<f32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEval {
    holdout: Option<PathBuf>,
    output: Option<String>,
}

/// A task id: a message-id token (it travels in round messages and updates) that is also a
/// safe directory name (no leading dot: `.` and `..` are tokens too).
pub fn valid_task_id(id: &str) -> bool {
    validate_message_id(id).is_ok() && !id.starts_with('.')
}

/// Reads `path`, the model and the held-out set it names, and validates everything.
pub fn load(path: &Path) -> Result<LoadedTask, TaskError> {
    let text = std::fs::read_to_string(path).map_err(|error| TaskError::Read {
        what: "task file",
        path: path.to_owned(),
        error,
    })?;
    let mut raw: RawTask = toml::from_str(&text).map_err(|error| TaskError::Parse {
        path: path.to_owned(),
        error,
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let invalid = |key: &str, reason: String| TaskError::Invalid {
        path: path.to_owned(),
        key: key.to_owned(),
        reason,
    };
    let read = |what: &'static str, file: &Path| {
        let full = base.join(file);
        std::fs::read(&full).map_err(|error| TaskError::Read {
            what,
            path: full,
            error,
        })
    };
    // A model with external data files (torch's default `m.onnx` + `m.onnx.data`): read
    // beside the model file, checked, and written inline into the task's copy, so the
    // evaluation and the spooled task hold one self-contained model. Devices keep their own
    // layout (they patch their data files in place).
    let mut model_bytes = read("initial model", &raw.initial)?;
    let full = base.join(&raw.initial);
    let bad =
        |e: edge_inference::ExternalError| invalid("initial", format!("{}: {e}", full.display()));
    let named = match edge_inference::external::data_file_names(&model_bytes) {
        Ok(names) => names,
        // Not a model: `initial_weights` says why, as for any broken file.
        Err(edge_inference::ExternalError::Graph { .. }) => Vec::new(),
        Err(e) => return Err(bad(e)),
    };
    if !named.is_empty() {
        let files = edge_inference::ModelFiles::read(&full).map_err(bad)?;
        model_bytes = edge_inference::external::inline(&files.graph, &files.data).map_err(bad)?;
    }
    // skl2onnx's LogisticRegression keeps its weights in a LinearClassifier's attributes: the
    // task trains (and evaluates) the same model with them in initializers, as every device
    // rewrites its own copy (`edge_inference::trainable_form`). A model that does not decode
    // is named by the checks below.
    if let Ok(Some(rewritten)) = edge_inference::trainable_form(&model_bytes) {
        model_bytes = rewritten;
    }
    let (names, names_key) = match (&raw.params, &raw.train.trainable) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "train.trainable",
                "and params both list the trained initializers; keep one (train.trainable)".into(),
            ));
        }
        (Some(p), None) => (Some(p.as_slice()), "params"),
        (None, Some(t)) => (Some(t.as_slice()), "train.trainable"),
        (None, None) => (None, "initial"),
    };
    let (params, initial) = initial_weights(&model_bytes, names)
        .map_err(|reason| invalid(names_key, reason.to_string()))?;
    check_output(&model_bytes, raw.eval.output.as_deref())
        .map_err(|(key, reason)| invalid(key, reason))?;
    let holdout_text = match &raw.eval.holdout {
        Some(file) => {
            let bytes = read("held-out set", file)?;
            let text = String::from_utf8(bytes).map_err(|_| {
                invalid(
                    "eval.holdout",
                    format!("{} is not utf-8 text", file.display()),
                )
            })?;
            Holdout::parse(&text).map_err(|reason| {
                invalid("eval.holdout", format!("{}: {reason}", file.display()))
            })?;
            Some(text)
        }
        None => None,
    };
    let frozen = frozen_layers_digest(&model_bytes, &params)
        .map_err(|reason| invalid(names_key, reason.to_string()))?;
    let trainer = raw.trainer.clone();
    let limits = device_limits(raw.device.take(), trainer.is_some())
        .map_err(|(key, reason)| invalid(key, reason))?;
    let initial_file = raw.initial.clone();
    let mut spec = validate(raw, params, holdout_text.is_some())
        .map_err(|(key, reason)| invalid(key, reason))?;
    spec.frozen = frozen;
    check_fits(&spec, &initial).map_err(|reason| invalid("initial", reason.to_string()))?;
    let trainer = match trainer {
        Some(file) => {
            let bytes = read("trainer module", &file)?;
            let name = file_name(&file);
            let trial = trainer_check::Trial {
                trainer: &name,
                trainer_bytes: &bytes,
                limits: &limits,
                model: &model_bytes,
                params: &spec.params,
                initial: &initial,
                train: &spec.train,
            };
            let run = trainer_check::run(&trial).map_err(|reason| TaskError::Trainer {
                path: path.to_owned(),
                trainer: name.clone(),
                model: file_name(&initial_file),
                max_memory_bytes: limits.max_memory_bytes,
                train_timeout_ms: limits.train_timeout_ms,
                reason,
            })?;
            Some(run)
        }
        None => None,
    };
    Ok(LoadedTask {
        spec,
        model_bytes,
        initial,
        holdout_text,
        trainer,
    })
}

/// A file's last component, as messages name it.
fn file_name(file: &Path) -> String {
    file.file_name()
        .unwrap_or(file.as_os_str())
        .to_string_lossy()
        .into_owned()
}

/// The device limits the trainer is checked under: `[device]` (the agent's `[sandbox]` keys,
/// its defaults for those not given), checked as the agent checks them. Limits with no
/// trainer to check them against are refused rather than ignored.
fn device_limits(device: Option<SandboxConfig>, trainer: bool) -> Result<SandboxConfig, Bad> {
    let Some(limits) = device else {
        return Ok(SandboxConfig::default());
    };
    if !trainer {
        return Err((
            "device",
            "limits given, but no trainer to check them with: add trainer = \"...wasm\"".into(),
        ));
    }
    if !limits.cache_dir.as_os_str().is_empty() {
        return Err(("device.cache_dir", "is not a device limit".into()));
    }
    // The agent's messages name its section (`sandbox.KEY`); here the keys are `device.KEY`.
    limits
        .validate()
        .map_err(|e| ("device", e.0.replace("sandbox.", "device.")))?;
    Ok(limits)
}

/// The trained params and their values, concatenated: the weight and bias of every dense
/// layer in layer order, found from the graph's structure ([`edge_inference::dense_layers`]),
/// whatever the exporter named them. `names`, when given, lists the layers to train (in any
/// order): whole layers (weight and bias), the last ones of the model; the layers in front
/// stay frozen, and are neither sent nor trained. The result is in layer order either way.
pub fn initial_weights(
    model: &[u8],
    names: Option<&[String]>,
) -> Result<(Vec<ParamSpec>, Vec<f32>), WeightsError> {
    let inits = read_initializers(model).map_err(WeightsError::Read)?;
    let layers = edge_inference::dense_layers(model).map_err(WeightsError::Structure)?;
    // The trainer's loss is softmax cross-entropy over the last layer's outputs: one output
    // (a binary classifier exported with a sigmoid, a regressor) would fail every round.
    if let Some(last) = layers.last()
        && last.outputs < 2
    {
        return Err(WeightsError::SingleOutput {
            weight: last.weight.clone(),
        });
    }
    let trainable = edge_inference::dense::trainable_names(&layers);
    if let Some(names) = names {
        if names.is_empty() {
            return Err(WeightsError::NoneListed);
        }
        for (i, name) in names.iter().enumerate() {
            if names[..i].contains(name) {
                return Err(WeightsError::Twice { name: name.clone() });
            }
            if !inits.iter().any(|(n, _)| n == name) {
                let have: Vec<&str> = inits.iter().map(|(n, _)| n.as_str()).collect();
                return Err(WeightsError::Missing {
                    name: name.clone(),
                    have: have.join(", "),
                });
            }
            if !trainable.contains(&name.as_str()) {
                return Err(WeightsError::NotTrainable {
                    name: name.clone(),
                    trainable: trainable.join(", "),
                });
            }
        }
    }
    // Listed (or, with no list, every) layer: trained. Layers are whole, and the trained ones
    // are the last: the device runs the frozen ones in front of the trainer.
    let listed = |name: &str| names.is_none_or(|names| names.iter().any(|n| n == name));
    let mut trained_from = None;
    for (i, l) in layers.iter().enumerate() {
        match (listed(&l.weight), listed(&l.bias)) {
            (true, true) => {
                trained_from.get_or_insert(i);
            }
            (false, false) => {
                if let Some(first) = trained_from {
                    return Err(WeightsError::NotSuffix {
                        first: layers[first].weight.clone(),
                        frozen: l.weight.clone(),
                    });
                }
            }
            (true, false) => {
                return Err(WeightsError::Partial {
                    missing: l.bias.clone(),
                });
            }
            (false, true) => {
                return Err(WeightsError::Partial {
                    missing: l.weight.clone(),
                });
            }
        }
    }
    let trained_from = trained_from.unwrap_or(layers.len());
    let trainable = edge_inference::dense::trainable_names(&layers[trained_from..]);
    let mut chosen: Vec<&(String, edge_inference::Tensor)> = Vec::with_capacity(trainable.len());
    for name in &trainable {
        let found = inits
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| WeightsError::Missing {
                name: (*name).to_owned(),
                have: String::new(),
            })?;
        if found.1.dtype() != DType::F32 {
            return Err(WeightsError::NotF32 {
                name: (*name).to_owned(),
                dtype: found.1.dtype(),
            });
        }
        chosen.push(found);
    }
    if chosen.is_empty() {
        return Err(WeightsError::NoF32);
    }
    let mut params = Vec::new();
    let mut weights = Vec::new();
    for (name, t) in chosen {
        if t.shape().is_empty() || t.is_empty() {
            return Err(WeightsError::Scalar { name: name.clone() });
        }
        let values = t.to_f32().ok_or_else(|| WeightsError::NotF32 {
            name: name.clone(),
            dtype: t.dtype(),
        })?;
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(WeightsError::NonFinite {
                name: name.clone(),
                index,
            });
        }
        params.push(ParamSpec {
            name: name.clone(),
            shape: t.shape().to_vec(),
        });
        weights.extend(values);
    }
    Ok((params, weights))
}

/// The digest of the dense layers in front of the first trained one (`None` when every layer
/// is trained): weight then bias per layer, as the model stores them.
pub fn frozen_layers_digest(
    model: &[u8],
    params: &[ParamSpec],
) -> Result<Option<String>, WeightsError> {
    let layers = edge_inference::dense_layers(model).map_err(WeightsError::Structure)?;
    let first = edge_inference::dense::first_named(&layers, |n| params.iter().any(|p| p.name == n))
        .unwrap_or(0);
    if first == 0 {
        return Ok(None);
    }
    let inits = read_initializers(model).map_err(WeightsError::Read)?;
    let mut values = Vec::with_capacity(first * 2);
    for l in &layers[..first] {
        for name in [&l.weight, &l.bias] {
            let t = inits
                .iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, t)| t.to_f32())
                .ok_or_else(|| WeightsError::Missing {
                    name: name.clone(),
                    have: String::new(),
                })?;
            values.push(t);
        }
    }
    Ok(Some(protocol::v1::fl::frozen_digest(
        values.iter().map(Vec::as_slice),
    )))
}

type Bad = (&'static str, String);

/// The output evaluation will score: the one named, which must be f32, or else the first
/// f32 output (checked here so that `fl start` refuses a model evaluation would not read).
fn check_output(model: &[u8], named: Option<&str>) -> Result<(), Bad> {
    let outputs =
        edge_inference::dense::graph_outputs(model).map_err(|e| ("initial", e.to_string()))?;
    let listed = outputs
        .iter()
        .map(|(n, d)| format!("{n} {}", d.map_or("other".into(), |d| d.to_string())))
        .collect::<Vec<_>>()
        .join(", ");
    match named {
        Some(name) => match outputs.iter().find(|(n, _)| n == name) {
            Some((_, Some(DType::F32))) => Ok(()),
            Some(_) => Err((
                "eval.output",
                format!("output {name} is not f32 class scores (the outputs: {listed})"),
            )),
            None => Err((
                "eval.output",
                format!("the model has no output {name} (the outputs: {listed})"),
            )),
        },
        None if outputs.iter().any(|(_, d)| *d == Some(DType::F32)) => Ok(()),
        None => Err((
            "initial",
            format!("the model has no f32 output to evaluate (the outputs: {listed})"),
        )),
    }
}

fn validate(raw: RawTask, params: Vec<ParamSpec>, holdout: bool) -> Result<TaskSpec, Bad> {
    fn bad<T>(key: &'static str, reason: impl Into<String>) -> Result<T, Bad> {
        Err((key, reason.into()))
    }
    fn in_range(key: &'static str, v: f32, ok: bool, what: &str) -> Result<f32, Bad> {
        if v.is_finite() && ok {
            Ok(v)
        } else {
            bad(key, format!("{v} must be {what}"))
        }
    }
    if !valid_task_id(&raw.id) {
        return bad(
            "id",
            format!(
                "{:?}: use 1-64 letters, digits and -_. not starting with a dot",
                raw.id
            ),
        );
    }
    if raw.model.is_empty() || raw.model.len() > 255 {
        return bad("model", "must be 1-255 bytes");
    }
    let members = match (raw.group, raw.devices) {
        (Some(_), Some(_)) => return bad("group", "give group or devices, not both"),
        (None, None) => {
            return bad(
                "group",
                "name the members with group = \"...\" or devices = [...]",
            );
        }
        (Some(g), None) => {
            if g.is_empty() || g.len() > 64 {
                return bad("group", "must be 1-64 bytes");
            }
            Members::Group(g)
        }
        (None, Some(d)) => {
            if d.is_empty() {
                return bad("devices", "lists no device");
            }
            for (i, id) in d.iter().enumerate() {
                if validate_device_id(id).is_err() {
                    return bad("devices", format!("{id:?} is not a valid device id"));
                }
                if d[..i].contains(id) {
                    return bad("devices", format!("{id} is listed twice"));
                }
            }
            Members::Devices(d)
        }
    };
    if raw.rounds == 0 {
        return bad("rounds", "must be at least 1");
    }
    let fraction = raw.fraction.unwrap_or(1.0);
    in_range(
        "fraction",
        fraction,
        fraction > 0.0 && fraction <= 1.0,
        "in (0, 1]",
    )?;
    let min_clients = raw.min_clients.unwrap_or(1);
    if min_clients == 0 {
        return bad("min_clients", "must be at least 1");
    }
    if let Members::Devices(d) = &members
        && min_clients as usize > d.len()
    {
        return bad(
            "min_clients",
            format!("{min_clients} is more than the {} devices listed", d.len()),
        );
    }
    let quorum = raw.quorum.unwrap_or(1.0);
    in_range("quorum", quorum, quorum > 0.0 && quorum <= 1.0, "in (0, 1]")?;
    let round_timeout_s = raw.round_timeout_s.unwrap_or(60);
    if round_timeout_s == 0 {
        return bad("round_timeout_s", "must be at least 1");
    }
    let min_updates = raw.min_updates.unwrap_or(1);
    if min_updates == 0 {
        return bad("min_updates", "must be at least 1");
    }
    let max_failed_rounds = raw
        .max_failed_rounds
        .unwrap_or_else(default_max_failed_rounds);
    if max_failed_rounds == 0 {
        return bad("max_failed_rounds", "must be at least 1");
    }
    let max_extensions = raw.max_extensions.unwrap_or_else(default_max_extensions);

    let t = raw.train;
    let epochs = t.epochs.unwrap_or(1);
    if epochs == 0 {
        return bad("train.epochs", "must be at least 1");
    }
    let lr = t.lr.unwrap_or(0.05);
    in_range("train.lr", lr, lr > 0.0, "> 0")?;
    let batch_size = t.batch_size.unwrap_or(32);
    if batch_size == 0 {
        return bad("train.batch_size", "must be at least 1");
    }
    let mu = t.mu.unwrap_or(0.0);
    in_range("train.mu", mu, mu >= 0.0, ">= 0")?;
    let codec = match t.codec.as_deref() {
        None => Codec::Fp32,
        Some(c) => Codec::from_str(c).map_err(|e| ("train.codec", e.to_string()))?,
    };
    if t.max_samples == Some(0) {
        return bad("train.max_samples", "must be at least 1");
    }

    let a = raw.aggregate;
    let rule = match a.rule.as_deref().unwrap_or("fedavg") {
        "fedavg" | "median" if a.trim.is_some() => {
            return bad("aggregate.trim", "only applies to rule = \"trimmed-mean\"");
        }
        "fedavg" => Rule::FedAvg,
        "median" => Rule::Median,
        "trimmed-mean" => {
            let trim = a.trim.unwrap_or(0.1);
            in_range(
                "aggregate.trim",
                trim,
                (0.0..0.5).contains(&trim),
                "in [0, 0.5)",
            )?;
            Rule::TrimmedMean { trim }
        }
        other => {
            return bad(
                "aggregate.rule",
                format!("unknown rule {other:?}: use fedavg, trimmed-mean or median"),
            );
        }
    };
    let optimizer = a.server_optimizer.as_deref().unwrap_or("sgd");
    let only = |key: &'static str, given: bool, applies: &[&str]| -> Result<(), Bad> {
        if given && !applies.contains(&optimizer) {
            return bad(
                key,
                format!(
                    "does not apply to server_optimizer = {optimizer:?} (only to {})",
                    applies.join(", ")
                ),
            );
        }
        Ok(())
    };
    only("aggregate.momentum", a.momentum.is_some(), &["fedavgm"])?;
    only("aggregate.beta1", a.beta1.is_some(), &["fedadam"])?;
    only("aggregate.beta2", a.beta2.is_some(), &["fedadam"])?;
    only("aggregate.tau", a.tau.is_some(), &["fedadam"])?;
    let server_lr = a
        .server_lr
        .unwrap_or(if optimizer == "fedadam" { 0.01 } else { 1.0 });
    in_range("aggregate.server_lr", server_lr, server_lr > 0.0, "> 0")?;
    let unit = |key, v: f32| in_range(key, v, (0.0..1.0).contains(&v), "in [0, 1)");
    let server_optimizer = match optimizer {
        "sgd" => ServerOptimizer::Sgd { lr: server_lr },
        "fedavgm" => ServerOptimizer::FedAvgM {
            lr: server_lr,
            momentum: unit("aggregate.momentum", a.momentum.unwrap_or(0.9))?,
        },
        "fedadam" => {
            let tau = a.tau.unwrap_or(1e-3);
            ServerOptimizer::FedAdam {
                lr: server_lr,
                beta1: unit("aggregate.beta1", a.beta1.unwrap_or(0.9))?,
                beta2: unit("aggregate.beta2", a.beta2.unwrap_or(0.99))?,
                tau: in_range("aggregate.tau", tau, tau > 0.0, "> 0")?,
            }
        }
        other => {
            return bad(
                "aggregate.server_optimizer",
                format!("unknown optimizer {other:?}: use sgd, fedavgm or fedadam"),
            );
        }
    };

    let clip = match &a.clip {
        Some(RawClip::Norm(norm)) => Clip::Norm {
            norm: in_range("aggregate.clip", *norm, *norm > 0.0, "> 0")?,
        },
        Some(RawClip::Word(w)) if w == "off" => Clip::Off,
        Some(RawClip::Word(w)) if w != "auto" => {
            return bad(
                "aggregate.clip",
                format!("unknown value {w:?}: use \"auto\", \"off\" or a norm (a number > 0)"),
            );
        }
        _ => {
            let multiplier = a.clip_multiplier.unwrap_or(2.0);
            Clip::Auto {
                multiplier: in_range(
                    "aggregate.clip_multiplier",
                    multiplier,
                    multiplier >= 1.0,
                    ">= 1 (below the median norm, most honest updates would be clipped)",
                )?,
            }
        }
    };
    if a.clip_multiplier.is_some() && !matches!(clip, Clip::Auto { .. }) {
        return bad(
            "aggregate.clip_multiplier",
            "only applies to clip = \"auto\"",
        );
    }
    let privacy = match raw.privacy {
        None => None,
        Some(p) => {
            if !matches!(clip, Clip::Norm { .. }) {
                return bad(
                    "aggregate.clip",
                    format!(
                        "is {clip}, but [privacy] needs a fixed norm (a number): the guarantee \
                         rests on a bound that does not depend on the updates"
                    ),
                );
            }
            if rule != Rule::FedAvg {
                return bad(
                    "aggregate.rule",
                    format!("is {rule}, but [privacy] works with \"fedavg\" only"),
                );
            }
            let z = in_range(
                "privacy.noise_multiplier",
                p.noise_multiplier,
                p.noise_multiplier > 0.0,
                "> 0",
            )?;
            let delta = p.delta.unwrap_or(1e-5);
            if !(delta > 0.0 && delta < 1.0) {
                return bad("privacy.delta", format!("{delta} must be in (0, 1)"));
            }
            if let Some(max) = p.max_epsilon {
                if !(max > 0.0 && max.is_finite()) {
                    return bad("privacy.max_epsilon", format!("{max} must be > 0"));
                }
                let first = super::privacy::epsilon(1, f64::from(z), delta);
                if first > max {
                    return bad(
                        "privacy.max_epsilon",
                        format!(
                            "{max} is below one round's epsilon ({first:.2} at noise_multiplier \
                             {z}, delta {delta}): no round could run"
                        ),
                    );
                }
            }
            Some(Privacy {
                noise_multiplier: z,
                delta,
                max_epsilon: p.max_epsilon,
            })
        }
    };

    Ok(TaskSpec {
        id: raw.id,
        model: raw.model,
        params,
        members,
        rounds: raw.rounds,
        fraction,
        min_clients,
        quorum,
        round_timeout_s,
        round_interval_s: raw.round_interval_s.unwrap_or(0),
        min_updates,
        max_staleness: raw.max_staleness.unwrap_or(1),
        seed: raw.seed.unwrap_or(0),
        train: TrainSpec {
            epochs,
            lr,
            batch_size,
            mu,
            codec,
            max_samples: t.max_samples,
        },
        rule,
        server_optimizer,
        frozen: None,
        clip,
        privacy,
        holdout,
        max_failed_rounds,
        max_extensions,
        eval_output: raw.eval.output,
    })
}

/// Refuses a model with more weights than a task may have, or whose round message (with the
/// weights inline, or the digests of their chunks) would not fit one MQTT payload.
fn check_fits(spec: &TaskSpec, initial: &[f32]) -> Result<(), WeightsError> {
    if initial.len() > chunks::MAX_WEIGHTS {
        return Err(WeightsError::TooMany {
            weights: initial.len(),
        });
    }
    let blob = (initial.len() > chunks::MAX_INLINE_WEIGHTS).then(|| WeightsBlob::of(initial));
    let inline = if blob.is_some() { &[][..] } else { initial };
    let header = RoundHeader {
        task: spec.id.clone(),
        // The longest id a device may have.
        device: "d".repeat(protocol::v1::MAX_DEVICE_ID_LEN),
        round: u32::MAX,
        version: u32::MAX,
        model: spec.model.clone(),
        params: spec.params.clone(),
        issued_ms: u64::MAX,
        frozen: spec.frozen.clone(),
        train: Some(spec.train.order(u64::MAX, u64::MAX)),
        done: false,
        blob,
    };
    match encode_round(&header, inline, &SigningKey::from_bytes(&[0; 32])) {
        Ok(_) => Ok(()),
        Err(protocol::v1::fl::FlError::TooLarge { size, .. }) => Err(WeightsError::TooLarge {
            weights: initial.len(),
            size,
        }),
        Err(e) => Err(WeightsError::Round(e)),
    }
}

#[cfg(test)]
mod tests;
