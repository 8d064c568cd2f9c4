//! [`Model`]: one loaded ONNX model (an ort session) with its input/output metadata, the
//! provider it runs on, input validation, and a health check.
//!
//! Invariant: every error names the model (`name@version`) and, where there is one, the input or
//! output; bad input is an `Err`, never a panic or an ort abort.
//! Boundary: built by [`crate::ModelRegistry`] (or directly in tests and benchmarks).

use std::sync::{Mutex, PoisonError};

use ort::session::Session;
use ort::session::builder::SessionBuilder;
use ort::value::{DynValue, ValueType};

use crate::external::{DataFile, DataFiles, DataRef, ExternalError};
use crate::provider::{Placement, Provider, ProviderReport, Skipped};
use crate::runtime::Runtime;
use crate::tensor::{DType, Tensor, TensorError};

/// A model input or output as the model declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoInfo {
    pub name: String,
    /// `None` when the element type is outside the WIT contract (e.g. f64, string).
    pub dtype: Option<DType>,
    /// ONNX Runtime's description of the type, for messages when `dtype` is `None`.
    pub type_name: String,
    /// `None` for a dynamic dimension. Empty for a scalar.
    pub shape: Vec<Option<u32>>,
}

impl IoInfo {
    fn from_outlet(name: &str, ty: &ValueType) -> IoInfo {
        match ty {
            ValueType::Tensor {
                ty: elem, shape, ..
            } => IoInfo {
                name: name.to_owned(),
                dtype: crate::tensor::dtype_from_ort(*elem),
                type_name: elem.to_string(),
                shape: shape.iter().map(|&d| u32::try_from(d).ok()).collect(),
            },
            other => IoInfo {
                name: name.to_owned(),
                dtype: None,
                type_name: other.to_string(),
                shape: Vec::new(),
            },
        }
    }

    /// `[?, 3, 224, 224]`-style, for messages.
    pub fn shape_string(&self) -> String {
        let dims: Vec<String> = self
            .shape
            .iter()
            .map(|d| d.map_or_else(|| "?".to_owned(), |d| d.to_string()))
            .collect();
        format!("[{}]", dims.join(", "))
    }

    fn accepts_shape(&self, shape: &[u32]) -> bool {
        self.shape.len() == shape.len()
            && self
                .shape
                .iter()
                .zip(shape)
                .all(|(want, got)| want.is_none_or(|w| w == *got))
    }
}

/// What went wrong with a model. `model` is always `name@version`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelError {
    #[error("model {model}: corrupt model file: {detail}")]
    Corrupt { model: String, detail: String },
    #[error("model {model}: unsupported operator: {detail}")]
    UnsupportedOperator { model: String, detail: String },
    #[error("model {model}: load failed: {detail}")]
    Load { model: String, detail: String },
    #[error("model {model}: {source}")]
    ExternalData {
        model: String,
        source: ExternalError,
    },
    #[error("model {model}: no preferred execution provider took it: {}", skipped_text(.skipped))]
    NoProvider {
        model: String,
        skipped: Vec<Skipped>,
    },
    #[error("model {model}: expected {expected} inputs ({names}), got {got}")]
    InputCount {
        model: String,
        expected: usize,
        names: String,
        got: usize,
    },
    #[error("model {model} input {input}: expected dtype {expected}, got {got}")]
    InputDtype {
        model: String,
        input: String,
        expected: String,
        got: DType,
    },
    #[error("model {model} input {input}: expected shape {expected}, got {got:?}")]
    InputShape {
        model: String,
        input: String,
        expected: String,
        got: Vec<u32>,
    },
    #[error("model {model} input {input}: element {index} is not finite (NaN or infinity)")]
    NonFinite {
        model: String,
        input: String,
        index: usize,
    },
    #[error("model {model} {what}: {source}")]
    Tensor {
        model: String,
        what: String,
        source: TensorError,
    },
    #[error("model {model}: run failed: {detail}")]
    Run { model: String, detail: String },
    #[error("model {model}: health check failed: {detail}")]
    Health { model: String, detail: String },
}

fn skipped_text(skipped: &[Skipped]) -> String {
    skipped
        .iter()
        .map(|s| format!("{}: {}", s.provider, s.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

/// A loaded model. `run` takes `&self` and is safe from many threads.
pub struct Model {
    id: String,
    name: String,
    version: String,
    /// ort's `run` takes `&mut Session` (some providers' allocators are not thread-safe), so
    /// requests to one model are serialised; each run still uses ONNX Runtime's intra-op
    /// threads. Different models run in parallel.
    session: Mutex<Session>,
    inputs: Vec<IoInfo>,
    outputs: Vec<IoInfo>,
    report: ProviderReport,
    reject_non_finite: bool,
    size_bytes: usize,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("id", &self.id)
            .field("provider", &self.report.provider)
            .finish()
    }
}

impl Model {
    /// Builds a session for `bytes` on the first preferred provider that takes it (see
    /// [`crate::provider`]). Does not run it: see [`Model::health_check`]. A graph that keeps
    /// weights in external data files is refused, naming the file: see [`Model::load_with_data`].
    pub fn load(
        rt: &Runtime,
        name: &str,
        version: &str,
        bytes: &[u8],
    ) -> Result<Model, ModelError> {
        Model::load_with_data(rt, name, version, bytes, &DataFiles::new())
    }

    /// [`Model::load`] for a graph whose weights are (partly) in external data files: `data`
    /// holds each file's bytes by location as the graph writes it (read them with
    /// [`crate::ModelFiles::read`]). Every location and extent is checked first; ONNX Runtime
    /// gets the bytes by name and never opens a file, so nothing is resolved against the
    /// working directory. ONNX Runtime copies the bytes into the session ("The data will be
    /// copied into the graph ... The buffer can be freed after session creation",
    /// `AddExternalInitializersFromFilesInMemory` in `onnxruntime_c_api.h`), so the model
    /// keeps none of `data`: once the caller drops it, the weights are held once.
    pub fn load_with_data(
        rt: &Runtime,
        name: &str,
        version: &str,
        bytes: &[u8],
        data: &DataFiles,
    ) -> Result<Model, ModelError> {
        let id = format!("{name}@{version}");
        // A graph that does not decode is left to ONNX Runtime, whose message `classify` sorts.
        let refs = match crate::external::check(bytes, data) {
            Ok(refs) => refs,
            Err(ExternalError::Graph { .. }) => Vec::new(),
            Err(source) => {
                return Err(ModelError::ExternalData { model: id, source });
            }
        };
        let data =
            &Weights::for_session(&refs, data).map_err(|source| ModelError::ExternalData {
                model: id.clone(),
                source,
            })?;
        let mut skipped = Vec::new();
        let mut chosen = None;
        for &p in &rt.inner.config.providers {
            if !rt.inner.built_in.contains(&p) {
                let has: Vec<&str> = rt.inner.built_in.iter().map(|p| p.as_str()).collect();
                skipped.push(Skipped {
                    provider: p,
                    reason: format!(
                        "not built into onnx runtime {} at {} (it has: {})",
                        rt.inner.version,
                        rt.inner.library.display(),
                        has.join(", ")
                    ),
                });
                continue;
            }
            if p == Provider::Cpu {
                // The last resort: a failure here is the model's, not the provider's.
                let s =
                    build(rt, None, false, bytes, data).map_err(|e| classify(&id, &e, bytes))?;
                chosen = Some((p, Placement::Full, s));
                break;
            }
            match build(rt, Some(p), true, bytes, data) {
                Ok(s) => {
                    chosen = Some((p, Placement::Full, s));
                    break;
                }
                Err(strict) => match build(rt, Some(p), false, bytes, data) {
                    Ok(s) => {
                        tracing::debug!(model = %id, provider = %p, error = %strict, "provider does not take every node");
                        chosen = Some((p, Placement::Partial, s));
                        break;
                    }
                    Err(e) => skipped.push(Skipped {
                        provider: p,
                        // ONNX Runtime's messages end with a newline; reports are one line each.
                        reason: e.to_string().trim_end().to_owned(),
                    }),
                },
            }
        }
        let Some((provider, placement, session)) = chosen else {
            return Err(ModelError::NoProvider { model: id, skipped });
        };
        let inputs = session
            .inputs()
            .iter()
            .map(|o| IoInfo::from_outlet(o.name(), o.dtype()))
            .collect();
        let outputs = session
            .outputs()
            .iter()
            .map(|o| IoInfo::from_outlet(o.name(), o.dtype()))
            .collect();
        let report = ProviderReport {
            provider,
            placement,
            skipped,
        };
        tracing::info!(model = %id, provider = %report, "model loaded");
        Ok(Model {
            id,
            name: name.to_owned(),
            version: version.to_owned(),
            session: Mutex::new(session),
            inputs,
            outputs,
            report,
            reject_non_finite: rt.inner.config.reject_non_finite,
            size_bytes: bytes.len() + data.len(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// `name@version`, as in error messages.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn inputs(&self) -> &[IoInfo] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[IoInfo] {
        &self.outputs
    }

    /// Which provider this model runs on, and why the preferred ones before it were skipped.
    pub fn provider_report(&self) -> &ProviderReport {
        &self.report
    }

    /// Size of the model file it was loaded from, with its external data files.
    pub fn size_bytes(&self) -> usize {
        self.size_bytes
    }

    /// Runs the model. `inputs` are in the order of [`Model::inputs`]; the result is in the
    /// order of [`Model::outputs`].
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, ModelError> {
        self.check_inputs(inputs)?;
        let mut values: Vec<(&str, DynValue)> = Vec::with_capacity(inputs.len());
        for (info, t) in self.inputs.iter().zip(inputs) {
            let v = t.to_ort().map_err(|source| ModelError::Tensor {
                model: self.id.clone(),
                what: format!("input {}", info.name),
                source,
            })?;
            values.push((info.name.as_str(), v));
        }
        let mut session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
        let outputs = session.run(values).map_err(|e| ModelError::Run {
            model: self.id.clone(),
            detail: e.to_string(),
        })?;
        self.outputs
            .iter()
            .map(|info| {
                let tensor_err = |source| ModelError::Tensor {
                    model: self.id.clone(),
                    what: format!("output {}", info.name),
                    source,
                };
                let v = outputs.get(&info.name).ok_or_else(|| ModelError::Run {
                    model: self.id.clone(),
                    detail: format!("output {} missing from the results", info.name),
                })?;
                Tensor::from_ort(v).map_err(tensor_err)
            })
            .collect()
    }

    fn check_inputs(&self, inputs: &[Tensor]) -> Result<(), ModelError> {
        if inputs.len() != self.inputs.len() {
            let names: Vec<&str> = self.inputs.iter().map(|i| i.name.as_str()).collect();
            return Err(ModelError::InputCount {
                model: self.id.clone(),
                expected: self.inputs.len(),
                names: names.join(", "),
                got: inputs.len(),
            });
        }
        for (info, t) in self.inputs.iter().zip(inputs) {
            if info.dtype != Some(t.dtype()) {
                return Err(ModelError::InputDtype {
                    model: self.id.clone(),
                    input: info.name.clone(),
                    expected: info
                        .dtype
                        .map_or_else(|| info.type_name.clone(), |d| d.to_string()),
                    got: t.dtype(),
                });
            }
            if !info.accepts_shape(t.shape()) {
                return Err(ModelError::InputShape {
                    model: self.id.clone(),
                    input: info.name.clone(),
                    expected: info.shape_string(),
                    got: t.shape().to_vec(),
                });
            }
            if self.reject_non_finite
                && let Some(index) = t.first_non_finite()
            {
                return Err(ModelError::NonFinite {
                    model: self.id.clone(),
                    input: info.name.clone(),
                    index,
                });
            }
        }
        Ok(())
    }

    /// Zero-filled inputs with every dynamic dimension set to 1.
    pub fn probe_inputs(&self) -> Result<Vec<Tensor>, ModelError> {
        self.inputs
            .iter()
            .map(|info| {
                let dtype = info.dtype.ok_or_else(|| ModelError::Health {
                    model: self.id.clone(),
                    detail: format!(
                        "input {} has type {}, which a probe cannot build",
                        info.name, info.type_name
                    ),
                })?;
                let shape = info.shape.iter().map(|d| d.unwrap_or(1)).collect();
                Tensor::zeros(dtype, shape).map_err(|source| ModelError::Tensor {
                    model: self.id.clone(),
                    what: format!("probe for input {}", info.name),
                    source,
                })
            })
            .collect()
    }

    /// Runs `probe` (default: [`Model::probe_inputs`]) and checks that every output is finite
    /// and has the shape the model declares.
    pub fn health_check(&self, probe: Option<&[Tensor]>) -> Result<(), ModelError> {
        let owned;
        let inputs = match probe {
            Some(p) => p,
            None => {
                owned = self.probe_inputs()?;
                &owned
            }
        };
        let health = |detail: String| ModelError::Health {
            model: self.id.clone(),
            detail,
        };
        let outputs = self
            .run(inputs)
            .map_err(|e| health(format!("probe run: {e}")))?;
        for (info, out) in self.outputs.iter().zip(&outputs) {
            if let Some(i) = out.first_non_finite() {
                return Err(health(format!(
                    "output {} element {i} is not finite on the probe input",
                    info.name
                )));
            }
            if !info.accepts_shape(out.shape()) && !info.shape.is_empty() {
                return Err(health(format!(
                    "output {} has shape {:?}, the model declares {}",
                    info.name,
                    out.shape(),
                    info.shape_string()
                )));
            }
        }
        Ok(())
    }
}

/// How a session gets a model's external data files (only those its graph names).
enum Weights {
    /// In memory, by location: ONNX Runtime copies them into the session.
    Memory(Vec<(String, std::sync::Arc<[u8]>)>),
    /// Every file on disk in one checked folder: ONNX Runtime maps them from there, so they are
    /// held once (the session's tensors are the mapping). Prepacking is off for such a session:
    /// a packed copy of each weight matrix would hold them twice, and the original stays mapped
    /// until every kernel has packed, so the load would peak at twice the weights.
    Folder {
        folder: std::path::PathBuf,
        len: usize,
    },
}

impl Weights {
    fn for_session(refs: &[DataRef], data: &DataFiles) -> Result<Weights, ExternalError> {
        let mut used: Vec<(&str, &DataFile)> = Vec::new();
        for r in refs {
            if let Some(d) = data.get(&r.location)
                && !used.iter().any(|(l, _)| *l == r.location)
            {
                used.push((&r.location, d));
            }
        }
        let len = used.iter().map(|(_, d)| d.len() as usize).sum();
        let mut folders = used.iter().map(|(_, d)| match d {
            DataFile::OnDisk { folder, .. } => Some(folder),
            DataFile::Bytes(_) => None,
        });
        if let Some(Some(first)) = folders.next()
            && folders.all(|f| f == Some(first))
        {
            return Ok(Weights::Folder {
                folder: first.clone(),
                len,
            });
        }
        let mut memory = Vec::with_capacity(used.len());
        for (location, d) in used {
            memory.push((location.to_owned(), d.read_all(location)?));
        }
        Ok(Weights::Memory(memory))
    }

    fn len(&self) -> usize {
        match self {
            Weights::Memory(m) => m.iter().map(|(_, b)| b.len()).sum(),
            Weights::Folder { len, .. } => *len,
        }
    }

    fn apply(&self, mut b: SessionBuilder) -> Result<SessionBuilder, ort::Error> {
        match self {
            Weights::Memory(files) => {
                for (location, bytes) in files {
                    b = b.with_external_initializer_file_in_memory(
                        location,
                        std::sync::Arc::clone(bytes),
                    )?;
                }
                Ok(b)
            }
            Weights::Folder { folder, .. } => {
                let folder = folder.to_str().ok_or_else(|| {
                    ort::Error::new(format!("model folder {} is not UTF-8", folder.display()))
                })?;
                // ONNX Runtime's `kOrtSessionOptionsModelExternalInitializersFileFolderPath`
                // (onnxruntime_session_options_config_keys.h): where the locations of a model
                // loaded from bytes are resolved, instead of the working directory.
                Ok(b.with_config_entry(
                    "session.model_external_initializers_file_folder_path",
                    folder,
                )?
                .with_prepacking(false)?)
            }
        }
    }
}

fn build(
    rt: &Runtime,
    ep: Option<Provider>,
    strict: bool,
    bytes: &[u8],
    data: &Weights,
) -> Result<Session, ort::Error> {
    let mut b = data.apply(Session::builder(&rt.inner.env)?)?;
    if rt.inner.config.intra_threads > 0 {
        b = b.with_intra_threads(rt.inner.config.intra_threads)?;
    }
    if let Some(p) = ep {
        b = b.with_execution_providers([p.dispatch()])?;
    }
    if strict {
        b = b.with_disable_cpu_fallback()?;
    }
    b.commit_from_memory(bytes)
}

/// Sorts ONNX Runtime's load error into corrupt / unsupported operator / other.
fn classify(id: &str, e: &ort::Error, bytes: &[u8]) -> ModelError {
    use prost::Message;
    let detail = e.message().to_owned();
    let model = id.to_owned();
    if e.code() == ort::error::ErrorCode::InvalidProtobuf
        || crate::onnx::ModelProto::decode(bytes).is_err()
    {
        return ModelError::Corrupt { model, detail };
    }
    if e.code() == ort::error::ErrorCode::NotImplemented
        || detail.contains("is not a registered function/op")
        || detail.contains("No Op registered for")
        || detail.contains("Could not find an implementation")
        || detail.contains("No opset import for domain")
    {
        return ModelError::UnsupportedOperator { model, detail };
    }
    ModelError::Load { model, detail }
}
