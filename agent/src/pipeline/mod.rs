//! Pipelines: sources -> WASM and inference stages -> sinks, described in TOML ([`spec`]),
//! wired with bounded channels and run until stopped.
//!
//! ```text
//! synthetic | file | mqtt ──► stage (thread, StageRunner) ──► stage ──► outbox | log | dataset
//!             (sources)         bounded channel, blocking send          (sinks, tokio tasks)
//! ```
//!
//! [`Pipeline::start`] loads every module (compiling or from the cache) and every model
//! (through the shared [`Inference`] registry), starts each stage on its own thread and calls
//! `init`; any failure there is returned and nothing keeps running. An inference stage runs
//! the registry's current version of its model on every frame, so a model deployment swaps it
//! under a running pipeline. [`Pipeline::stop`] stops the sources and lets the rest drain. A pipeline started
//! in [`Mode::Shadow`] (a deployment under health check) runs its stages on live input but
//! its outbox and dataset sinks only count, and its stages get a scratch kv namespace.
//!
//! - `spec`: the description and its validation (pure).
//! - `nodes`: sources, the stage loop, sinks, counters.
//! - `codec`: frames to/from JSON for sinks and sources.
//! - `host`: [`PipelineHost`], the task that owns the running pipeline and the candidate,
//!   driven by commands (start, shadow, swap, discard) from the deploy task.
//!
//! **Invariant:** no unbounded queue: every channel has `channel_capacity` slots; sources
//! that cannot wait (sensors, MQTT) drop and count. A stage failure never stops the other
//! stages or the agent. **Boundary:** the pipeline host starts and stops pipelines (the deploy
//! task tells it when); telemetry reads [`RunningSlot`].

pub mod codec;
pub mod host;
mod nodes;
pub mod spec;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::v1::{NodeTelemetry, PipelineTelemetry, StageTelemetry};
use tokio::sync::mpsc;

pub use host::{Command, HostError, HostHandle, Launch, PipelineHost, run_start};
pub use nodes::{HealthCounters, NodeCounters};
pub use spec::{PipelineSpec, SinkSpec, SourceSpec, SpecError, StageKind, StageSpec, TrainingSpec};

use crate::dataset::Dataset;
use crate::fl::{TrainingSetup, TrainingSlot};
use crate::inbox::Inbox;
use crate::inference::Inference;
use crate::outbox::Outbox;
use crate::sandbox::{
    Frame, Grants, Sandbox, SandboxError, SledKv, StageContext, StageMetrics, StageRunner,
};
use crate::statedb::StateDb;
use nodes::{Outputs, SinkKind, Stop};

/// Longest [`Pipeline::stop`] waits for the pipeline to drain before it gives up on it.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("invalid pipeline description: {0}")]
    Spec(#[from] SpecError),
    #[error("stage {stage}: cannot get module {module}: {reason}")]
    Module {
        stage: String,
        module: String,
        reason: String,
    },
    #[error("stage {stage}: {source}")]
    Stage {
        stage: String,
        #[source]
        source: Box<SandboxError>,
    },
    #[error("stage {stage}: model {model}: {reason}")]
    Model {
        stage: String,
        model: String,
        reason: String,
    },
    #[error("training.trainer {module}: {reason}")]
    Training { module: String, reason: String },
    #[error("stage {stage}: kv namespace: {reason}")]
    Kv { stage: String, reason: String },
    #[error("source {source_name}: {reason}")]
    Source { source_name: String, reason: String },
    #[error("cannot start a pipeline thread: {0}")]
    Thread(std::io::Error),
}

/// Why the bytes of a module or model a description names cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not an artifact of the deployment manifest")]
    NotListed(String),
    #[error(
        "model {model} names data file {file}, which is not an artifact of the deployment manifest"
    )]
    DataNotListed { model: String, file: String },
    #[error(transparent)]
    External(#[from] edge_inference::ExternalError),
    #[error("artifact {0} is missing from the store")]
    Missing(String),
    #[error("stored artifact {sha} is corrupted (sha256 {actual})")]
    Corrupted { sha: String, actual: String },
    /// The artifact store failed; boxed because the store's type belongs to `deploy`,
    /// which depends on this module and not the other way round.
    #[error(transparent)]
    Store(Box<dyn std::error::Error + Send + Sync>),
}

/// Where a pipeline's module bytes and files come from.
pub trait Artifacts: Send + Sync {
    /// The bytes of the module (or model) the description names `name`.
    fn module(&self, name: &str) -> Result<Vec<u8>, ArtifactError>;
    /// The model the description names `name`, with the external data files its graph names
    /// (resolved against the model's folder, each location checked). Default: artifacts by
    /// name, a data file's name being its location joined to the model's folder.
    /// Where the artifacts come from a store (see [`Artifacts::unpacked`]), the data files are
    /// written out of it and left on disk for ONNX Runtime to map.
    fn model(&self, name: &str) -> Result<edge_inference::ModelFiles, ArtifactError> {
        let graph = self.module(name)?;
        let locations = edge_inference::external::data_file_names(&graph)?;
        if let (Some(unpacked), Some(graph_sha)) = (self.unpacked(), self.digest(name))
            && !locations.is_empty()
        {
            let mut listed = Vec::with_capacity(locations.len());
            for location in &locations {
                let file = protocol::v1::deploy::data_artifact_name(name, location);
                let sha = self
                    .digest(&file)
                    .ok_or_else(|| ArtifactError::DataNotListed {
                        model: name.to_owned(),
                        file: file.clone(),
                    })?;
                listed.push((location.as_str(), file, sha));
            }
            let files: Vec<crate::deploy::unpack::DataArtifact<'_>> = listed
                .iter()
                .map(
                    |(location, file, sha)| crate::deploy::unpack::DataArtifact {
                        location,
                        name: file,
                        sha256: sha,
                    },
                )
                .collect();
            let folder = unpacked.folder(&graph_sha, &files, |f| self.module(f.name))?;
            return Ok(edge_inference::ModelFiles::open_in(graph, name, &folder)?);
        }
        let mut data = edge_inference::DataFiles::new();
        for location in locations {
            let file = protocol::v1::deploy::data_artifact_name(name, &location);
            let bytes = match self.module(&file) {
                Ok(b) => b,
                Err(ArtifactError::NotListed(_)) => {
                    return Err(ArtifactError::DataNotListed {
                        model: name.to_owned(),
                        file,
                    });
                }
                Err(e) => return Err(e),
            };
            data.insert(location, bytes.into());
        }
        Ok(edge_inference::ModelFiles { graph, data })
    }
    /// Directory that relative file paths in the description are relative to (`None`:
    /// only absolute paths are allowed).
    fn base_dir(&self) -> Option<&Path>;
    /// The sha256 of the artifact named `name`, when it comes from the artifact store.
    fn digest(&self, _name: &str) -> Option<String> {
        None
    }
    /// Where a stored model's data files are written out (`None`: handed over in memory).
    fn unpacked(&self) -> Option<&crate::deploy::unpack::Unpacked> {
        None
    }
}

/// A pipeline from local files: modules and replay files relative to the description.
#[derive(Debug, Clone)]
pub struct LocalFiles {
    pub dir: PathBuf,
}

impl Artifacts for LocalFiles {
    fn module(&self, name: &str) -> Result<Vec<u8>, ArtifactError> {
        let path = self.dir.join(name);
        std::fs::read(&path).map_err(|source| ArtifactError::Read { path, source })
    }

    /// The data files stay on disk (checked, not read): ONNX Runtime maps them, so a local
    /// model's weights are held once.
    fn model(&self, name: &str) -> Result<edge_inference::ModelFiles, ArtifactError> {
        Ok(edge_inference::ModelFiles::open(&self.dir.join(name))?)
    }

    fn base_dir(&self) -> Option<&Path> {
        Some(&self.dir)
    }
}

/// Everything a pipeline runs against; built once by the agent.
#[derive(Clone)]
pub struct Deps {
    pub sandbox: Sandbox,
    pub state: StateDb,
    pub outbox: Arc<Outbox>,
    pub inbox: Inbox,
    pub dataset: Arc<Dataset>,
    pub device: String,
    pub runtime: tokio::runtime::Handle,
    /// ONNX Runtime and the loaded models (possibly unavailable).
    pub inference: Inference,
    /// Where a live pipeline with `[training]` tells federated learning what it trains.
    pub training: TrainingSlot,
    /// Offloading of inference stages with an `offload_model`; `None`: never.
    pub offload: Option<crate::offload::Offloader>,
}

impl std::fmt::Debug for Deps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deps")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// Whether the pipeline's output counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Live,
    /// Health check of a deployment: outbox and dataset sinks count but do not write, and
    /// stages get a fresh scratch kv namespace.
    Shadow,
}

/// Which deployment a pipeline came from (empty id: local config).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    pub deployment_id: String,
    pub version: u64,
}

struct StageStats {
    name: String,
    kind: StageKind,
    /// Inference stages: the registry and the model's name there, so telemetry names the
    /// version serving now (a model deployment swaps it under the running stage).
    model: Option<(Inference, String, String)>,
    module: String,
    metrics: Arc<StageMetrics>,
    counters: Arc<NodeCounters>,
}

/// Live counters of a running pipeline, shared with telemetry.
pub struct Stats {
    name: String,
    origin: Origin,
    started_ms: u64,
    sources: Vec<(String, Arc<NodeCounters>)>,
    stages: Vec<StageStats>,
    sinks: Vec<(String, Arc<NodeCounters>)>,
    health: Arc<HealthCounters>,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn node(name: &str, c: &NodeCounters) -> NodeTelemetry {
    NodeTelemetry {
        name: name.to_owned(),
        frames: c.frames.load(Ordering::Relaxed),
        dropped: c.dropped.load(Ordering::Relaxed),
        errors: c.errors.load(Ordering::Relaxed),
    }
}

impl Stats {
    /// Figures of a pipeline that runs no nodes: only its name and origin reach telemetry.
    /// The fleet simulator's devices report the version they run with it.
    pub fn without_nodes(name: String, origin: Origin) -> Stats {
        Stats {
            name,
            origin,
            started_ms: protocol::v1::now_ms(),
            sources: Vec::new(),
            stages: Vec::new(),
            sinks: Vec::new(),
            health: Arc::default(),
        }
    }

    pub fn telemetry(&self) -> PipelineTelemetry {
        PipelineTelemetry {
            name: self.name.clone(),
            deployment_id: self.origin.deployment_id.clone(),
            version: self.origin.version,
            started_ms: self.started_ms,
            sources: self.sources.iter().map(|(n, c)| node(n, c)).collect(),
            stages: self
                .stages
                .iter()
                .map(|s| {
                    let m = s.metrics.snapshot();
                    let module = match &s.model {
                        Some((inf, registry_name, artifact)) => inf
                            .model(registry_name)
                            .map(|cur| format!("{artifact}@{}", cur.version()))
                            .unwrap_or_else(|| s.module.clone()),
                        None => s.module.clone(),
                    };
                    StageTelemetry {
                        name: s.name.clone(),
                        kind: match s.kind {
                            StageKind::Wasm => String::new(),
                            StageKind::Inference => "inference".into(),
                        },
                        module,
                        calls: m.calls,
                        ok: m.ok,
                        errors: m.guest_errors + m.output_limits,
                        traps: m.traps,
                        timeouts: m.timeouts,
                        memory_limits: m.memory_limits,
                        restarts: m.restarts,
                        refused: m.refused,
                        frames_out: s.counters.frames.load(Ordering::Relaxed),
                        p50_us: m.latency.p50_us,
                        p95_us: m.latency.p95_us,
                        p99_us: m.latency.p99_us,
                        max_us: m.latency.max_us,
                        failed: m.failed,
                    }
                })
                .collect(),
            sinks: self.sinks.iter().map(|(n, c)| node(n, c)).collect(),
        }
    }

    /// Frames processed by stages (or written by sinks, for a pipeline without stages) and
    /// the first failure of any stage.
    pub fn health(&self) -> (u64, Option<String>) {
        let processed = if self.stages.is_empty() {
            self.sinks
                .iter()
                .map(|(_, c)| c.frames.load(Ordering::Relaxed))
                .sum()
        } else {
            self.health.processed.load(Ordering::Relaxed)
        };
        let failure = self
            .health
            .first_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        (processed, failure)
    }
}

/// The pipeline whose figures telemetry reports.
#[derive(Clone, Default)]
pub struct RunningSlot(Arc<Mutex<Option<Arc<Stats>>>>);

impl std::fmt::Debug for RunningSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RunningSlot")
    }
}

impl RunningSlot {
    pub fn set(&self, stats: Option<Arc<Stats>>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = stats;
    }

    pub fn telemetry(&self) -> Option<PipelineTelemetry> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|s| s.telemetry())
    }
}

/// A running pipeline.
pub struct Pipeline {
    stats: Arc<Stats>,
    stop: Arc<Stop>,
    threads: Vec<(String, std::thread::JoinHandle<()>)>,
    tasks: Vec<(String, tokio::task::JoinHandle<()>)>,
    mode: Mode,
    /// Registry names of the models this pipeline loaded, unloaded when it stops.
    models: Vec<String>,
    inference: Inference,
    /// What this live pipeline published for federated learning, withdrawn when it stops.
    training: Option<(TrainingSlot, Arc<TrainingSetup>)>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("name", &self.stats.name)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Loads the modules, starts and initialises every stage, then the sinks and sources.
    /// Blocking (compiles modules): call from a blocking thread.
    pub fn start(
        spec: &PipelineSpec,
        artifacts: &dyn Artifacts,
        deps: &Deps,
        mode: Mode,
        origin: Origin,
    ) -> Result<Pipeline, PipelineError> {
        let mut p = Pipeline {
            stats: Arc::new(Stats {
                name: spec.name.clone(),
                origin,
                started_ms: protocol::v1::now_ms(),
                sources: Vec::new(),
                stages: Vec::new(),
                sinks: Vec::new(),
                health: Arc::default(),
            }),
            stop: Stop::new(),
            threads: Vec::new(),
            tasks: Vec::new(),
            mode,
            models: Vec::new(),
            inference: deps.inference.clone(),
            training: None,
        };
        match p.wire(spec, artifacts, deps) {
            Ok(()) => {
                tracing::info!(pipeline = %spec.name, mode = ?mode, sources = spec.sources.len(), stages = spec.stages.len(), sinks = spec.sinks.len(), "pipeline started");
                Ok(p)
            }
            Err(e) => {
                p.stop_and_join();
                Err(e)
            }
        }
    }

    fn wire(
        &mut self,
        spec: &PipelineSpec,
        artifacts: &dyn Artifacts,
        deps: &Deps,
    ) -> Result<(), PipelineError> {
        let shadow = self.mode == Mode::Shadow;
        let cap = spec.channel_capacity;
        // Load every module first: a missing or broken module fails before anything runs.
        let mut modules = BTreeMap::new();
        let mut models = BTreeMap::new();
        for st in spec
            .stages
            .iter()
            .filter(|s| s.kind == StageKind::Inference)
        {
            let model = self.load_model(st, artifacts, deps)?;
            models.insert(st.name.clone(), model);
        }
        for st in spec.stages.iter().filter(|s| s.kind == StageKind::Wasm) {
            let bytes = artifacts
                .module(&st.module)
                .map_err(|e| PipelineError::Module {
                    stage: st.name.clone(),
                    module: st.module.clone(),
                    reason: e.to_string(),
                })?;
            let module =
                deps.sandbox
                    .load(&st.module, &bytes)
                    .map_err(|source| PipelineError::Stage {
                        stage: st.name.clone(),
                        source: Box::new(source),
                    })?;
            modules.insert(st.name.clone(), module);
        }
        // Published only by a live pipeline: a candidate under check must not take rounds.
        let training = self
            .training_setup(spec, artifacts, deps)?
            .filter(|_| !shadow);
        // One input channel per consumer; producers get a sender to each consumer.
        let mut outputs: BTreeMap<String, Outputs> = BTreeMap::new();
        let mut inputs: BTreeMap<String, mpsc::Receiver<Frame>> = BTreeMap::new();
        let sink_names = spec.sink_names();
        let consumers = spec
            .stages
            .iter()
            .map(|s| (s.name.clone(), s.input.names()))
            .chain(
                spec.sinks
                    .iter()
                    .zip(&sink_names)
                    .map(|(s, n)| (n.clone(), s.inputs().names())),
            );
        for (name, ins) in consumers {
            let (tx, rx) = mpsc::channel(cap);
            inputs.insert(name, rx);
            for i in ins {
                outputs.entry(i.to_owned()).or_default().push(tx.clone());
            }
        }
        let health = self.stats.health.clone();
        let (mut sources, mut stages, mut sinks) = (Vec::new(), Vec::new(), Vec::new());

        // Sinks first, so nothing upstream ever waits on a consumer that does not exist.
        for (sink, name) in spec.sinks.iter().zip(&sink_names) {
            let Some(rx) = inputs.remove(name) else {
                continue;
            };
            let c = Arc::new(NodeCounters::default());
            sinks.push((name.clone(), c.clone()));
            let kind = match sink {
                SinkSpec::Outbox {
                    class,
                    stream,
                    ttl_s,
                    ..
                } => SinkKind::Outbox {
                    outbox: deps.outbox.clone(),
                    device: deps.device.clone(),
                    class: *class,
                    stream: stream.clone(),
                    ttl: ttl_s.map(Duration::from_secs),
                },
                SinkSpec::Log { every, .. } => SinkKind::Log { every: *every },
                SinkSpec::Dataset {
                    dataset,
                    label_key,
                    require_label,
                    ..
                } => SinkKind::Dataset {
                    store: deps.dataset.clone(),
                    dataset: dataset.clone(),
                    label_key: label_key.clone(),
                    require_label: *require_label,
                },
            };
            let task = deps.runtime.spawn(nodes::run_sink(
                spec.name.clone(),
                name.clone(),
                kind,
                rx,
                c,
                shadow,
            ));
            self.tasks.push((name.clone(), task));
        }

        // Stages, downstream first is not needed: each thread only blocks on its own input.
        let mut inits = Vec::new();
        for idx in spec.stage_order() {
            let st = &spec.stages[idx];
            let Some(rx) = inputs.remove(&st.name) else {
                continue;
            };
            let outs = outputs.remove(&st.name).unwrap_or_default();
            if let Some((registry_name, model)) = models.remove(&st.name) {
                let metrics = deps.sandbox.new_stage_metrics();
                let counters = Arc::new(NodeCounters::default());
                stages.push(StageStats {
                    name: st.name.clone(),
                    kind: StageKind::Inference,
                    model: Some((
                        deps.inference.clone(),
                        registry_name.clone(),
                        st.model.clone(),
                    )),
                    module: format!("{}@{}", st.model, model.version()),
                    metrics: metrics.clone(),
                    counters: counters.clone(),
                });
                let s = nodes::InferenceStage {
                    stage: st.name.clone(),
                    model: registry_name,
                    inference: deps.inference.clone(),
                    outputs: st.model_outputs.clone(),
                    max_batch: st.max_batch as usize,
                    max_wait: Duration::from_millis(st.max_wait_ms),
                    metrics,
                    runtime: deps.runtime.clone(),
                    // A shadow pipeline's health check measures the device's own model.
                    offload: deps
                        .offload
                        .clone()
                        .filter(|o| {
                            self.mode == Mode::Live
                                && !st.offload_model.is_empty()
                                && o.mode() != crate::offload::policy::Mode::Local
                        })
                        .map(|o| (o, st.offload_model.clone())),
                };
                let health = health.clone();
                let thread = std::thread::Builder::new()
                    .name(format!("stage-{}", st.name))
                    .spawn(move || nodes::run_inference_stage(s, rx, outs, counters, health))
                    .map_err(PipelineError::Thread)?;
                self.threads.push((st.name.clone(), thread));
                continue;
            }
            let module = modules
                .remove(&st.name)
                .ok_or_else(|| PipelineError::Module {
                    stage: st.name.clone(),
                    module: st.module.clone(),
                    reason: "module not loaded".into(),
                })?;
            let ns = if shadow {
                format!("shadow/{}/{}", spec.name, st.name)
            } else {
                format!("{}/{}", spec.name, st.name)
            };
            if shadow {
                let _ = deps.state.db.drop_tree(format!("kv/{ns}"));
            }
            let kv = SledKv::open(&deps.state.db, &deps.state.dir, &ns).map_err(|e| {
                PipelineError::Kv {
                    stage: st.name.clone(),
                    reason: e.to_string(),
                }
            })?;
            let metrics = deps.sandbox.new_stage_metrics();
            let counters = Arc::new(NodeCounters::default());
            stages.push(StageStats {
                name: st.name.clone(),
                kind: StageKind::Wasm,
                model: None,
                module: format!("{}@{}", st.module, module.id().short_digest()),
                metrics: metrics.clone(),
                counters: counters.clone(),
            });
            let ctx = StageContext {
                stage: st.name.clone(),
                kv: Arc::new(kv),
                metrics,
                grants: Grants::default(),
            };
            let config_json = serde_json::to_string(&st.config).unwrap_or_else(|_| "{}".into());
            let (init_tx, init_rx) = std::sync::mpsc::sync_channel(1);
            let sandbox = deps.sandbox.clone();
            let health = health.clone();
            let stop = self.stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("stage-{}", st.name))
                .spawn(move || {
                    // The runner lives and dies on this thread: its calls block.
                    match StageRunner::start(&sandbox, &module, ctx, &config_json) {
                        Ok(runner) => {
                            let _ = init_tx.send(Ok(()));
                            nodes::run_stage(runner, rx, outs, counters, health, stop);
                        }
                        Err(e) => {
                            let _ = init_tx.send(Err(e));
                        }
                    }
                })
                .map_err(PipelineError::Thread)?;
            self.threads.push((st.name.clone(), thread));
            inits.push((st.name.clone(), init_rx));
        }
        for (stage, rx) in inits {
            match rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(source)) => {
                    return Err(PipelineError::Stage {
                        stage,
                        source: Box::new(source),
                    });
                }
                Err(_) => {
                    return Err(PipelineError::Thread(std::io::Error::other(format!(
                        "stage thread of {stage} ended during init"
                    ))));
                }
            }
        }

        // Sources last.
        for src in &spec.sources {
            let name = src.name().to_owned();
            let outs = outputs.remove(&name).unwrap_or_default();
            let c = Arc::new(NodeCounters::default());
            sources.push((name.clone(), c.clone()));
            let stop = self.stop.clone();
            match src {
                SourceSpec::Synthetic {
                    stream,
                    rate_hz,
                    window,
                    sample_rate_hz,
                    tones,
                    noise,
                    anomaly_every,
                    anomaly_gain,
                    count,
                    seed,
                    on_full,
                    ..
                } => {
                    let s = nodes::Synthetic {
                        stream: stream.clone().unwrap_or_else(|| name.clone()),
                        rate_hz: *rate_hz,
                        window: *window,
                        sample_rate_hz: *sample_rate_hz,
                        tones: tones.clone(),
                        noise: *noise,
                        anomaly_every: *anomaly_every,
                        anomaly_gain: *anomaly_gain,
                        count: *count,
                        seed: *seed,
                        on_full: *on_full,
                    };
                    self.spawn_thread(&name, move || nodes::run_synthetic(s, outs, stop, c))?;
                }
                SourceSpec::File {
                    path,
                    format,
                    stream,
                    rate_hz,
                    repeat,
                    on_full,
                    ..
                } => {
                    let path =
                        resolve(path, artifacts.base_dir()).map_err(|e| PipelineError::Source {
                            source_name: name.clone(),
                            reason: e.to_string(),
                        })?;
                    std::fs::File::open(&path).map_err(|e| PipelineError::Source {
                        source_name: name.clone(),
                        reason: format!("cannot open {}: {e}", path.display()),
                    })?;
                    let f = nodes::FileReplay {
                        name: name.clone(),
                        path,
                        format: *format,
                        stream: stream.clone().unwrap_or_else(|| name.clone()),
                        rate_hz: *rate_hz,
                        repeat: *repeat,
                        on_full: *on_full,
                    };
                    self.spawn_thread(&name, move || nodes::run_file(f, outs, stop, c))?;
                }
                SourceSpec::Mqtt {
                    topic,
                    payload,
                    stream,
                    on_full,
                    ..
                } => {
                    let sub = deps.inbox.subscribe(topic, cap);
                    let m = nodes::MqttSource {
                        name: name.clone(),
                        payload: *payload,
                        stream: stream.clone(),
                        on_full: *on_full,
                    };
                    let task = deps.runtime.spawn(nodes::run_mqtt(m, sub, outs, stop, c));
                    self.tasks.push((name.clone(), task));
                }
            }
        }
        if let Some(stats) = Arc::get_mut(&mut self.stats) {
            (stats.sources, stats.stages, stats.sinks) = (sources, stages, sinks);
        }
        if let Some(t) = training {
            deps.training.set(Some(t.clone()));
            self.training = Some((deps.training.clone(), t));
        }
        Ok(())
    }

    /// Reads and compiles what `[training]` names, so a missing or broken trainer fails the
    /// start (and a deployment carrying it rolls back) instead of the first round.
    fn training_setup(
        &self,
        spec: &PipelineSpec,
        artifacts: &dyn Artifacts,
        deps: &Deps,
    ) -> Result<Option<Arc<TrainingSetup>>, PipelineError> {
        let Some(t) = &spec.training else {
            return Ok(None);
        };
        let fail = |reason: String| PipelineError::Training {
            module: t.trainer.clone(),
            reason,
        };
        let trainer_bytes = artifacts
            .module(&t.trainer)
            .map_err(|e| fail(e.to_string()))?;
        deps.sandbox
            .load_trainer(&t.trainer, &trainer_bytes)
            .map_err(|e| fail(e.to_string()))?;
        let mut model_bytes = artifacts
            .module(&t.model)
            .map_err(|e| fail(e.to_string()))?;
        // A LinearClassifier (skl2onnx's LogisticRegression) is trained as the Gemm layer the
        // coordinator rewrote the task's model into, under the same initializer names; the
        // first round's weights swap the rewritten model in (the same outputs).
        if let Ok(Some(rewritten)) = edge_inference::trainable_form(&model_bytes) {
            model_bytes = rewritten;
        }
        // The base that global weights are patched into, in the model's layout. Only a
        // pipeline that trains holds this copy of the data files (ONNX Runtime copies them
        // into each session and keeps its own).
        let model_data = artifacts
            .model(&t.model)
            .map_err(|e| fail(e.to_string()))?
            .data;
        Ok(Some(Arc::new(TrainingSetup {
            pipeline: spec.name.clone(),
            model: t.model.clone(),
            model_bytes,
            model_data,
            trainer_name: t.trainer.clone(),
            trainer_bytes,
            dataset: t.dataset.clone(),
        })))
    }

    /// Loads an inference stage's model into the registry (a shadow pipeline's under its
    /// own name, so a candidate never replaces what the running pipeline uses) and checks the
    /// stage's input and output names against it.
    fn load_model(
        &mut self,
        st: &StageSpec,
        artifacts: &dyn Artifacts,
        deps: &Deps,
    ) -> Result<(String, Arc<edge_inference::Model>), PipelineError> {
        let fail = |reason: String| PipelineError::Model {
            stage: st.name.clone(),
            model: st.model.clone(),
            reason,
        };
        let registry_name = match self.mode {
            Mode::Live => st.model.clone(),
            Mode::Shadow => format!("shadow/{}/{}", self.stats.name, st.model),
        };
        let files = artifacts
            .model(&st.model)
            .map_err(|e| fail(e.to_string()))?;
        let model = deps
            .inference
            .ensure(&registry_name, &files.graph, &files.data)
            .map_err(|e| fail(e.to_string()))?;
        // The session holds the data files; the graph's bytes go now.
        drop(files);
        if !self.models.contains(&registry_name) {
            self.models.push(registry_name.clone());
        }
        check_model_io(st, &model)?;
        Ok((registry_name, model))
    }

    fn spawn_thread(
        &mut self,
        name: &str,
        f: impl FnOnce() + Send + 'static,
    ) -> Result<(), PipelineError> {
        let t = std::thread::Builder::new()
            .name(format!("source-{name}"))
            .spawn(f)
            .map_err(PipelineError::Thread)?;
        self.threads.push((name.to_owned(), t));
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.stats.name
    }

    pub fn origin(&self) -> &Origin {
        &self.stats.origin
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// True once every source ended and everything drained (a finite replay is done).
    pub fn is_finished(&self) -> bool {
        self.threads.iter().all(|(_, t)| t.is_finished())
            && self.tasks.iter().all(|(_, t)| t.is_finished())
    }

    /// Stops the sources and waits (bounded) for the rest to drain. Blocking.
    pub fn stop(mut self) {
        self.stop_and_join();
        tracing::info!(pipeline = %self.stats.name, mode = ?self.mode, "pipeline stopped");
    }

    fn stop_and_join(&mut self) {
        if let Some((slot, t)) = self.training.take() {
            slot.clear_if(&t);
        }
        self.stop.stop();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while !self.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for (name, t) in self.threads.drain(..) {
            if t.is_finished() {
                if t.join().is_err() {
                    tracing::error!(pipeline = %self.stats.name, node = %name, "pipeline thread panicked");
                }
            } else {
                tracing::error!(pipeline = %self.stats.name, node = %name, "pipeline thread did not stop in time; abandoning it");
            }
        }
        for (name, t) in self.tasks.drain(..) {
            if !t.is_finished() {
                tracing::error!(pipeline = %self.stats.name, node = %name, "pipeline task did not stop in time; aborting it");
                t.abort();
            }
        }
        for m in self.models.drain(..) {
            self.inference.remove(&m);
        }
    }
}

/// The stage's `model_input` and `model_outputs` against what the model takes and gives.
fn check_model_io(st: &StageSpec, model: &edge_inference::Model) -> Result<(), PipelineError> {
    let fail = |reason: String| PipelineError::Model {
        stage: st.name.clone(),
        model: st.model.clone(),
        reason,
    };
    let inputs: Vec<&str> = model.inputs().iter().map(|i| i.name.as_str()).collect();
    match (&st.model_input, inputs.as_slice()) {
        (None, [_]) => {}
        (Some(want), [only]) if want == only => {}
        (None, _) => {
            return Err(fail(format!(
                "the model takes {} inputs ({}); an inference stage feeds exactly one",
                inputs.len(),
                inputs.join(", ")
            )));
        }
        (Some(want), _) => {
            return Err(fail(format!(
                "model_input {want:?}: the model's inputs are {}; an inference stage feeds a model with exactly one",
                inputs.join(", ")
            )));
        }
    }
    for o in &st.model_outputs {
        if !model.outputs().iter().any(|m| &m.name == o) {
            let names: Vec<&str> = model.outputs().iter().map(|m| m.name.as_str()).collect();
            return Err(fail(format!(
                "model_outputs names {o:?}, which is not one of its outputs ({})",
                names.join(", ")
            )));
        }
    }
    Ok(())
}

/// What `edge-agent check-config` does with a pipeline: everything [`Pipeline::start`] does
/// before data flows, through the same code, and nothing after: reads and loads every model
/// (with its external data files; health-checked on a zero probe) and checks it against its
/// stage, compiles every WASM module, loads the trainer and checks that the training model
/// has layers it can train, and opens every replay file. Models load under `check/` names in
/// `inference`, so a dry run never replaces what a pipeline runs. Returns one line per thing
/// checked; the first failure is the error.
pub fn dry_run(
    spec: &PipelineSpec,
    artifacts: &dyn Artifacts,
    sandbox: &Sandbox,
    inference: &Inference,
) -> Result<Vec<String>, PipelineError> {
    let mut done = Vec::new();
    let mut load =
        |stage: &str, model: &str| -> Result<Arc<edge_inference::Model>, PipelineError> {
            let fail = |reason: String| PipelineError::Model {
                stage: stage.to_owned(),
                model: model.to_owned(),
                reason,
            };
            let files = artifacts.model(model).map_err(|e| fail(e.to_string()))?;
            let m = inference
                .ensure(&format!("check/{model}"), &files.graph, &files.data)
                .map_err(|e| fail(e.to_string()))?;
            done.push(format!(
                "model {model}: loads on {}, {} data file(s), health check passed",
                m.provider_report().provider,
                files.data.len()
            ));
            Ok(m)
        };
    for st in spec
        .stages
        .iter()
        .filter(|s| s.kind == StageKind::Inference)
    {
        let m = load(&st.name, &st.model)?;
        check_model_io(st, &m)?;
    }
    if let Some(t) = &spec.training {
        let fail = |reason: String| PipelineError::Training {
            module: t.trainer.clone(),
            reason,
        };
        let trainer = artifacts
            .module(&t.trainer)
            .map_err(|e| fail(e.to_string()))?;
        sandbox
            .load_trainer(&t.trainer, &trainer)
            .map_err(|e| fail(e.to_string()))?;
        let m = load("training", &t.model)?;
        let files = artifacts.model(&t.model).map_err(|e| fail(e.to_string()))?;
        let layers = edge_inference::dense_layers(&files.graph)
            .map_err(|e| fail(format!("training model {}: {e}", t.model)))?;
        done.push(format!(
            "training: trainer {} compiles; model {} ({}) has {} dense layer(s) it trains",
            t.trainer,
            t.model,
            m.version(),
            layers.len()
        ));
    }
    for st in spec.stages.iter().filter(|s| s.kind == StageKind::Wasm) {
        let bytes = artifacts
            .module(&st.module)
            .map_err(|e| PipelineError::Module {
                stage: st.name.clone(),
                module: st.module.clone(),
                reason: e.to_string(),
            })?;
        sandbox
            .load(&st.module, &bytes)
            .map_err(|source| PipelineError::Stage {
                stage: st.name.clone(),
                source: Box::new(source),
            })?;
        done.push(format!("module {}: compiles", st.module));
    }
    for src in &spec.sources {
        if let SourceSpec::File { path, .. } = src {
            let fail = |reason: String| PipelineError::Source {
                source_name: src.name().to_owned(),
                reason,
            };
            let path = resolve(path, artifacts.base_dir()).map_err(|e| fail(e.to_string()))?;
            std::fs::File::open(&path)
                .map_err(|e| fail(format!("cannot open {}: {e}", path.display())))?;
            done.push(format!("replay file {}: opens", path.display()));
        }
    }
    Ok(done)
}

/// A relative path against the description's directory; deployed descriptions (no
/// directory) may only name absolute paths.
fn resolve(path: &Path, base: Option<&Path>) -> Result<PathBuf, RelativePath> {
    if path.is_absolute() {
        return Ok(path.to_owned());
    }
    match base {
        Some(dir) => Ok(dir.join(path)),
        None => Err(RelativePath(path.to_owned())),
    }
}

/// A deployed description named a file relative to a directory it does not have.
#[derive(Debug, thiserror::Error)]
#[error("relative path {} in a deployed pipeline; use an absolute path", .0.display())]
struct RelativePath(PathBuf);
