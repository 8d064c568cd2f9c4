//! The agent's ONNX inference service: ONNX Runtime, loaded when the first model loads (or
//! the reason it cannot be), the registry of loaded models shared by every pipeline's
//! inference stages and by model deployments, and per-model run statistics for telemetry.
//!
//! An agent that runs no model never maps the library (about 20 MB of it): at start it only
//! probes which file it would load ([`edge_inference::Runtime::probe`]) and reports that as
//! available but not loaded yet. The first [`Inference::ensure`] or [`Inference::prepare`]
//! loads it; if that fails, the status turns unavailable with the reason, which telemetry
//! carries to the coordinator, and the next model load tries again. ONNX Runtime cannot be
//! unloaded from a process (ort keeps it in a global), so it stays once loaded.
//!
//! Models are named as pipelines refer to them (`models/vad.onnx`); a version is the first 12
//! hex digits of the model file's sha256, so the same bytes load once.
//!
//! **Invariant:** never panics and never touches ort without a loaded library (an unavailable
//! runtime answers every call with [`InferenceError::Unavailable`] and its reason); the status
//! it reports is what is true now (probed, loaded, or why not); a model deployment swaps a
//! model only after it loaded, passed its probe and matches the inputs and outputs of the
//! version it replaces. **Boundary:** built by `agent::run`; used by the pipeline's inference
//! stages, `deploy::task` and telemetry.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use edge_inference::{
    DataFiles, InferenceConfig, IoInfo, Model, ModelError, ModelRegistry, Placement, Runtime,
    Tensor,
};
use protocol::v1::{InferenceStatus, InferenceTelemetry, ModelTelemetry};
use sha2::{Digest, Sha256};

use crate::sandbox::LatencyHistogram;

/// The status's `reason` while the library is found but not loaded yet.
pub const NOT_LOADED: &str = "not loaded yet: the library was found and loads with the first model";

/// Why a model could not be loaded, checked or run; every message names the model.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InferenceError {
    #[error("model {model}: onnx inference is unavailable on this device: {reason}")]
    Unavailable { model: String, reason: String },
    #[error("model {0} is not loaded")]
    NotLoaded(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("model {model}: version {version} does not match the loaded version {old}: {detail}")]
    Incompatible {
        model: String,
        version: String,
        old: String,
        detail: String,
    },
}

#[derive(Debug, Default)]
struct ModelStats {
    runs: AtomicU64,
    errors: AtomicU64,
    swaps: AtomicU64,
    latency: Mutex<LatencyHistogram>,
}

struct Inner {
    /// `None`: built by [`Inference::unavailable`], never loads.
    config: Option<InferenceConfig>,
    status: Mutex<InferenceStatus>,
    /// Accelerators known from the probe (separate provider libraries), until loaded.
    probed_accelerators: Vec<String>,
    /// Set once, by the first successful load.
    registry: OnceLock<ModelRegistry>,
    /// One load attempt at a time.
    loading: Mutex<()>,
    stats: Mutex<BTreeMap<String, Arc<ModelStats>>>,
}

/// Cheap to clone; every clone shares the runtime, the models and their statistics.
#[derive(Clone)]
pub struct Inference {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Inference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inference")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

/// A model's version: the first 12 hex digits of its file's sha256.
pub fn version_of(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))[..12].to_owned()
}

/// The version of a model with external data files: the graph's digest alone when it has
/// none (as [`version_of`]); otherwise the digest also covers each file's name and bytes, so
/// new weights under the same graph are a new version.
pub fn version_of_files(graph: &[u8], data: &DataFiles) -> String {
    if data.is_empty() {
        return version_of(graph);
    }
    let mut h = Sha256::new();
    h.update(Sha256::digest(graph));
    for (name, file) in data {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(file_digest(file));
    }
    hex::encode(h.finalize())[..12].to_owned()
}

/// SHA-256 of a data file; one on disk is streamed through the hasher, never held whole. A
/// file that cannot be read hashes its error, so its version differs from every readable one
/// and loading it then fails with the reason.
fn file_digest(file: &edge_inference::DataFile) -> impl AsRef<[u8]> {
    let mut h = Sha256::new();
    if let Err(e) = file.write_to(&mut h) {
        h = Sha256::new();
        h.update(format!("unreadable: {e}"));
    }
    h.finalize()
}

impl Inference {
    /// The service for `config`, without loading ONNX Runtime: probes the library file it
    /// would load (exists, an ELF shared object for this machine) and reports it available
    /// but [`NOT_LOADED`]; without one it logs WARN with every path tried and reports itself
    /// unavailable (a later model load tries again). Cheap: a few `stat`s and one read.
    pub fn new(config: &InferenceConfig) -> Inference {
        let (status, accelerators) = match Runtime::probe(config) {
            Ok(p) => (
                InferenceStatus {
                    available: true,
                    version: p.version,
                    library: p.library.display().to_string(),
                    reason: if p.loaded {
                        String::new()
                    } else {
                        NOT_LOADED.into()
                    },
                },
                p.provider_libraries
                    .iter()
                    .map(|p| p.as_str().to_owned())
                    .collect(),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "onnx inference unavailable; WASM pipelines keep running, inference stages will not start");
                (
                    InferenceStatus {
                        available: false,
                        reason: e.to_string(),
                        ..InferenceStatus::default()
                    },
                    Vec::new(),
                )
            }
        };
        let inf = Inference::with(status, Some(config.clone()), accelerators);
        if inf.status().available && inf.status().reason.is_empty() {
            // Already loaded in this process (tests): share it now, nothing to save.
            let _ = inf.loaded_registry("(already loaded)");
        }
        inf
    }

    /// A service without a runtime that never loads one (tests, benchmarks).
    pub fn unavailable(reason: impl Into<String>) -> Inference {
        let status = InferenceStatus {
            available: false,
            reason: reason.into(),
            ..InferenceStatus::default()
        };
        Inference::with(status, None, Vec::new())
    }

    fn with(
        status: InferenceStatus,
        config: Option<InferenceConfig>,
        probed_accelerators: Vec<String>,
    ) -> Inference {
        Inference {
            inner: Arc::new(Inner {
                config,
                status: Mutex::new(status),
                probed_accelerators,
                registry: OnceLock::new(),
                loading: Mutex::new(()),
                stats: Mutex::default(),
            }),
        }
    }

    /// What is true now: available and loaded (empty `reason`), available and [`NOT_LOADED`],
    /// or unavailable and why.
    pub fn status(&self) -> InferenceStatus {
        self.inner
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether ONNX Runtime is loaded in this process by this service.
    pub fn is_loaded(&self) -> bool {
        self.inner.registry.get().is_some()
    }

    /// The accelerator execution providers the library has (`cuda`, `xnnpack`, ...; not
    /// cpu), for the enrollment request's hardware facts. Built in, not proven: the device or
    /// its libraries may still be missing. Before the library loads, only those shipped as
    /// separate provider libraries beside it are known. Empty without a runtime.
    pub fn accelerators(&self) -> Vec<String> {
        match self.inner.registry.get() {
            Some(r) => r
                .runtime()
                .built_in_providers()
                .iter()
                .filter(|p| **p != edge_inference::Provider::Cpu)
                .map(|p| p.as_str().to_owned())
                .collect(),
            None => self.inner.probed_accelerators.clone(),
        }
    }

    /// The registry, loading ONNX Runtime first if no model has loaded it yet. Blocking.
    fn loaded_registry(&self, model: &str) -> Result<&ModelRegistry, InferenceError> {
        if let Some(r) = self.inner.registry.get() {
            return Ok(r);
        }
        let unavailable = |reason: String| InferenceError::Unavailable {
            model: model.to_owned(),
            reason,
        };
        let Some(config) = &self.inner.config else {
            return Err(unavailable(self.status().reason));
        };
        let _one = self
            .inner
            .loading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = self.inner.registry.get() {
            return Ok(r);
        }
        let started = Instant::now();
        let mut status = self
            .inner
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match Runtime::load(config) {
            Ok(rt) => {
                *status = InferenceStatus {
                    available: true,
                    version: rt.version().to_owned(),
                    library: rt.library().display().to_string(),
                    reason: String::new(),
                };
                tracing::info!(
                    model, library = %rt.library().display(), version = %rt.version(),
                    load_ms = started.elapsed().as_millis() as u64,
                    "onnx runtime loaded for the first model"
                );
                let _ = self.inner.registry.set(ModelRegistry::new(rt));
                drop(status);
                self.inner
                    .registry
                    .get()
                    .ok_or_else(|| unavailable("the loaded runtime was not kept".into()))
            }
            Err(e) => {
                tracing::error!(model, error = %e, "onnx runtime failed to load; inference stages cannot start");
                *status = InferenceStatus {
                    available: false,
                    reason: e.to_string(),
                    ..InferenceStatus::default()
                };
                Err(unavailable(e.to_string()))
            }
        }
    }

    /// The registry if the runtime is loaded; never loads it.
    fn registry(&self, model: &str) -> Result<&ModelRegistry, InferenceError> {
        self.inner
            .registry
            .get()
            .ok_or_else(|| match self.status() {
                s if s.available => InferenceError::NotLoaded(model.to_owned()),
                s => InferenceError::Unavailable {
                    model: model.to_owned(),
                    reason: s.reason,
                },
            })
    }

    fn stats(&self, name: &str) -> Arc<ModelStats> {
        self.inner
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// The version serving `name`, if loaded.
    pub fn model(&self, name: &str) -> Option<Arc<Model>> {
        self.inner.registry.get()?.get(name)
    }

    /// Makes `bytes` the model serving `name` (loaded, health-checked with a zero probe);
    /// bytes already serving it are reused. Blocking.
    pub fn ensure(
        &self,
        name: &str,
        bytes: &[u8],
        data: &DataFiles,
    ) -> Result<Arc<Model>, InferenceError> {
        let registry = self.loaded_registry(name)?;
        let version = version_of_files(bytes, data);
        if let Some(m) = registry.get(name)
            && m.version() == version
        {
            return Ok(m);
        }
        let installed = registry.install_with_data(name, &version, bytes, data, None)?;
        if installed.replaced.is_some() {
            self.stats(name).swaps.fetch_add(1, Ordering::Relaxed);
        }
        Ok(installed.model)
    }

    /// Loads and checks a new version of the loaded model `name` without swapping it in:
    /// it must load, pass its probe (finite outputs of the declared shapes) and take and give
    /// the same inputs and outputs as the version serving now. Blocking.
    pub fn prepare(
        &self,
        name: &str,
        bytes: &[u8],
        data: &DataFiles,
    ) -> Result<Arc<Model>, InferenceError> {
        let registry = self.loaded_registry(name)?;
        let old = registry
            .get(name)
            .ok_or_else(|| InferenceError::NotLoaded(name.to_owned()))?;
        let version = version_of_files(bytes, data);
        let model = Model::load_with_data(registry.runtime(), name, &version, bytes, data)?;
        model.health_check(None)?;
        let incompatible = |what: &str, old_io: &[IoInfo], new_io: &[IoInfo]| {
            if same_io(old_io, new_io) {
                return Ok(());
            }
            Err(InferenceError::Incompatible {
                model: name.to_owned(),
                version: version.clone(),
                old: old.version().to_owned(),
                detail: format!(
                    "{what} {} instead of {}",
                    describe_io(new_io),
                    describe_io(old_io)
                ),
            })
        };
        incompatible("inputs", old.inputs(), model.inputs())?;
        incompatible("outputs", old.outputs(), model.outputs())?;
        Ok(Arc::new(model))
    }

    /// Swaps in a model [`Inference::prepare`] checked. Requests running on the old version
    /// finish on it; the next ones use the new one.
    pub fn commit(&self, model: Arc<Model>) {
        if let Some(registry) = self.inner.registry.get() {
            let name = model.name().to_owned();
            if registry.insert(model).replaced.is_some() {
                self.stats(&name).swaps.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Unloads `name` (requests in flight finish first).
    pub fn remove(&self, name: &str) {
        if let Some(r) = self.inner.registry.get() {
            r.remove(name);
        }
    }

    /// Runs the version of `name` serving now, counting the run for telemetry. Blocking.
    pub fn run(
        &self,
        name: &str,
        inputs: &[Tensor],
    ) -> Result<(Arc<Model>, Vec<Tensor>), InferenceError> {
        let model = self
            .registry(name)?
            .get(name)
            .ok_or_else(|| InferenceError::NotLoaded(name.to_owned()))?;
        let stats = self.stats(name);
        let start = Instant::now();
        let out = model.run(inputs);
        record(&stats, start.elapsed(), out.is_ok());
        Ok((model, out?))
    }

    /// The runtime's status and every loaded model.
    pub fn telemetry(&self) -> InferenceTelemetry {
        let models = self
            .inner
            .registry
            .get()
            .map(ModelRegistry::models)
            .unwrap_or_default()
            .iter()
            .map(|m| {
                let s = self.stats(m.name());
                let latency = s
                    .latency
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .summary();
                let report = m.provider_report();
                ModelTelemetry {
                    name: m.name().to_owned(),
                    version: m.version().to_owned(),
                    provider: report.provider.as_str().to_owned(),
                    placement: match report.placement {
                        Placement::Full => "full".into(),
                        Placement::Partial => "partial".into(),
                    },
                    skipped: report
                        .skipped
                        .iter()
                        .map(|s| format!("{}: {}", s.provider.as_str(), s.reason))
                        .collect(),
                    runs: s.runs.load(Ordering::Relaxed),
                    errors: s.errors.load(Ordering::Relaxed),
                    swaps: s.swaps.load(Ordering::Relaxed),
                    p50_us: latency.p50_us,
                    p99_us: latency.p99_us,
                }
            })
            .collect();
        InferenceTelemetry {
            status: self.status(),
            models,
        }
    }
}

fn record(stats: &ModelStats, latency: Duration, ok: bool) {
    stats.runs.fetch_add(1, Ordering::Relaxed);
    if !ok {
        stats.errors.fetch_add(1, Ordering::Relaxed);
    }
    stats
        .latency
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .record(latency);
}

fn same_io(a: &[IoInfo], b: &[IoInfo]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(a, b)| a.name == b.name && a.dtype == b.dtype && a.shape == b.shape)
}

fn describe_io(io: &[IoInfo]) -> String {
    let parts: Vec<String> = io
        .iter()
        .map(|i| {
            let ty = i
                .dtype
                .map_or_else(|| i.type_name.clone(), |d| d.to_string());
            format!("{} {ty} {}", i.name, i.shape_string())
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_answers_with_its_reason_and_never_panics() {
        let inf = Inference::unavailable("no library at /nowhere/libonnxruntime.so");
        assert!(!inf.status().available);
        let e = inf
            .ensure("models/x.onnx", b"bytes", &DataFiles::new())
            .expect_err("no runtime");
        assert!(e.to_string().contains("models/x.onnx"), "{e}");
        assert!(e.to_string().contains("/nowhere"), "{e}");
        assert!(inf.run("models/x.onnx", &[]).is_err());
        assert!(inf.model("models/x.onnx").is_none());
        let t = inf.telemetry();
        assert!(!t.status.available && t.models.is_empty());
    }

    #[test]
    fn a_missing_library_is_reported_at_start_and_at_the_first_model() {
        let inf = Inference::new(&InferenceConfig {
            library: Some("/nowhere/libonnxruntime.so".into()),
            ..InferenceConfig::default()
        });
        let s = inf.status();
        assert!(!s.available);
        assert!(
            s.reason.contains("/nowhere/libonnxruntime.so") && s.reason.contains("no such file"),
            "{s:?}"
        );
        let e = inf
            .ensure("models/x.onnx", b"bytes", &DataFiles::new())
            .expect_err("no runtime")
            .to_string();
        assert!(
            e.contains("models/x.onnx") && e.contains("/nowhere/libonnxruntime.so"),
            "{e}"
        );
        assert!(!inf.is_loaded());
        assert!(!inf.telemetry().status.available);
    }

    #[test]
    fn versions_are_short_content_digests() {
        assert_eq!(version_of(b"abc"), "ba7816bf8f01");
    }
}
