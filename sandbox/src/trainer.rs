//! Federated-learning trainers: components of the `trainer` world (`modules/wit/trainer.wit`)
//! that read model parameters through the `weights` import and the device's labeled samples
//! through `samples`, and write new parameters back ([`Sandbox::train`]) or return metrics
//! ([`Sandbox::evaluate`]).
//!
//! The weights cross the boundary one tensor at a time and change hands as they do: the host
//! drops its copy of a tensor once the module has read it, and the tensors the module writes
//! back wait in a spool file (no name, beside the module cache) until the instance, and the
//! module's memory with it, is gone. A call never holds the model twice (a 5-million-weight
//! round would otherwise hold the host's input, the module's copy and the host's output at
//! once).
//!
//! Same engine, cache, WASI denial, memory limit and epoch interruption as stages; what
//! differs: every call gets a fresh instance that is dropped after it (a trainer keeps no
//! state), the time budget is `sandbox.train_timeout_ms`, and both the weights going in and
//! the result coming out are checked here (names, shapes, finite values), so a caller never
//! sees a malformed model from a module.
//!
//! **Invariant:** a [`TrainResult`] returned to the caller has exactly the input's parameter
//! names, shapes and order, and only finite values. **Boundary:** the agent's federated
//! learning (`edge_agent::fl`), the coordinator's task check (`fl start`) and tests.

use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::{Component, HasData, Linker, Resource, ResourceTable};
use wasmtime::{Engine, Store};

use super::host::{HostState, clock, counters, kv, limits, log, wasi};
use super::instance::classify;
use super::metrics::StageMetrics;
use super::{Grants, ModuleId, ModuleSource, Sandbox, SandboxError};

/// Host-side bindings of the `trainer` world. Its own module: the generated types must not
/// mix with the `stage` world's; `log` and `clock` are the stage bindings' (one host
/// implementation each).
mod bindings {
    wasmtime::component::bindgen!({
        world: "trainer",
        path: "../modules/wit",
        with: {
            "edge:pipeline/log": crate::bindings::edge::pipeline::log,
            "edge:pipeline/clock": crate::bindings::edge::pipeline::clock,
        },
        // A read when the store has no sample source is a host bug; trap rather than lie.
        imports: { "edge:pipeline/samples": trappable, "edge:pipeline/weights": trappable },
        additional_derives: [PartialEq],
    });
}

use bindings::edge::pipeline::samples as wit_samples;
pub use bindings::edge::pipeline::training::EvalResult;
use bindings::edge::pipeline::training::ParamInfo;
use bindings::edge::pipeline::weights as wit_weights;
use bindings::{Trainer, TrainerPre};

/// One named parameter tensor, f32, row-major; `data.len()` is the product of `shape`.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    /// The ONNX initializer it replaces when trained weights are applied.
    pub name: String,
    pub shape: Vec<u32>,
    pub data: Vec<f32>,
}

/// What [`Sandbox::train`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainResult {
    /// The trained parameters: the input's names, shapes and order.
    pub weights: Vec<Param>,
    /// Samples trained on (per epoch).
    pub samples: u32,
    /// Mean training loss over the last epoch.
    pub loss: f32,
    /// Fraction of samples classified correctly during the last epoch, 0..1.
    pub accuracy: f32,
}

/// Most samples one `samples.read` call returns (the WIT promises 1024).
pub const MAX_READ_BATCH: u32 = 1024;

/// Longest guest error or trap message kept, bytes.
const MAX_MESSAGE_BYTES: usize = 1024;

/// Tags a trainer's log lines where a stage's would carry its stage name.
const LOG_STAGE: &str = "trainer";

/// The labeled samples a trainer reads; implemented by the dataset store (and by tests).
/// `read` returns the samples from index `start` on, at most `n` (fewer at the end).
pub trait SampleSource: Send + Sync {
    fn count(&self) -> u32;
    fn read(&self, start: u32, n: u32) -> Vec<(Vec<f32>, i64)>;
}

/// Samples held in memory (the agent's labeled dataset rows, a synthetic batch, tests).
impl SampleSource for Vec<(Vec<f32>, i64)> {
    fn count(&self) -> u32 {
        u32::try_from(self.len()).unwrap_or(u32::MAX)
    }

    fn read(&self, start: u32, n: u32) -> Vec<(Vec<f32>, i64)> {
        let start = (start as usize).min(self.len());
        let end = start.saturating_add(n as usize).min(self.len());
        self[start..end].to_vec()
    }
}

/// Why a train or evaluate call produced nothing usable.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The sandbox stopped the call: trap, timeout, memory limit, or no instance.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The weights given were unusable before any module saw them.
    #[error("trainer {module}: weights given: {reason}")]
    Input {
        module: ModuleId,
        reason: Box<ParamError>,
    },
    /// The module returned `err` (bad hyperparameters, shapes, labels, no samples).
    #[error("trainer {module} refused to {call}: {message}")]
    Refused {
        module: ModuleId,
        call: &'static str,
        message: String,
    },
    /// The module returned something that breaks the contract (other names or shapes,
    /// non-finite values, more samples than there are); it is not used.
    #[error("trainer {module}: {call} returned an invalid result: {reason}")]
    InvalidResult {
        module: ModuleId,
        call: &'static str,
        reason: Box<ParamError>,
    },
}

/// What is wrong with weights given to or returned by a trainer, or with its metrics; each
/// names the parameter (or metric) at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParamError {
    #[error("no parameters")]
    Empty,
    #[error("parameter {0} has an empty name")]
    EmptyName(usize),
    #[error("{0}: name given twice")]
    Duplicate(String),
    #[error("{name}: {values} values do not fill shape {shape:?}")]
    Size {
        name: String,
        values: usize,
        shape: Vec<u32>,
    },
    #[error("{name}: value {index} is not finite ({value})")]
    NotFinite {
        name: String,
        index: usize,
        value: f32,
    },
    #[error("{0}: never written back")]
    NotWritten(String),
    #[error(
        "{name}: written in pieces that leave value {from} of {values} (and maybe more) unwritten"
    )]
    Uncovered {
        name: String,
        from: usize,
        values: usize,
    },
    #[error("reading parameter {name} back from the spool file: {error}")]
    Spool { name: String, error: String },
    #[error("loss is not finite ({0})")]
    Loss(f32),
    #[error("accuracy {0} is outside 0..1")]
    Accuracy(f32),
    #[error("{samples} samples used, but only {count} were available")]
    Samples { samples: u32, count: u32 },
}

/// A train call's result and what it used.
#[derive(Debug)]
pub struct Trained {
    pub result: TrainResult,
    /// The largest linear memory the instance grew to, bytes (at most
    /// `sandbox.max_memory_bytes`).
    pub peak_memory_bytes: u64,
}

/// A compiled `trainer` component, ready to run; cheap to clone.
#[derive(Clone)]
pub struct TrainerModule {
    inner: Arc<TrainerInner>,
}

struct TrainerInner {
    id: ModuleId,
    pre: TrainerPre<HostState>,
    source: ModuleSource,
}

impl std::fmt::Debug for TrainerModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainerModule")
            .field("id", &self.inner.id)
            .field("source", &self.inner.source)
            .finish_non_exhaustive()
    }
}

impl TrainerModule {
    pub fn id(&self) -> &ModuleId {
        &self.inner.id
    }

    pub fn source(&self) -> ModuleSource {
        self.inner.source
    }
}

/// The linker for trainers: everything a stage gets (WASI denied, sleep cap, `log`,
/// `clock`, `kv`, `counters`; the last two are not in the `trainer` world and so are never
/// imported by a well-formed trainer) plus `samples` and `weights`.
pub(crate) fn linker(engine: &Engine) -> Result<Linker<HostState>, SandboxError> {
    let mut linker = Linker::new(engine);
    super::host::add_to_linker(&mut linker)
        .and_then(|()| {
            wit_samples::add_to_linker::<HostState, HasSamples>(&mut linker, |s| SamplesView {
                table: &s.table,
            })
        })
        .and_then(|()| {
            wit_weights::add_to_linker::<HostState, HasWeights>(&mut linker, |s| WeightsView {
                table: &mut s.table,
            })
        })
        .map_err(|e| SandboxError::Engine(format!("adding trainer host imports: {e:#}")))?;
    Ok(linker)
}

impl Sandbox {
    /// Loads a `trainer` component deployed as `name`, like [`Sandbox::load`] (size limit,
    /// cache, bounded compilation); refuses a component of another world.
    pub fn load_trainer(&self, name: &str, bytes: &[u8]) -> Result<TrainerModule, SandboxError> {
        self.load_as(name, bytes, |id, component, source, _code| {
            self.finish_trainer(id, component, source)
        })
    }

    fn finish_trainer(
        &self,
        id: ModuleId,
        component: Component,
        source: ModuleSource,
    ) -> Result<TrainerModule, SandboxError> {
        let pre = self
            .core()?
            .trainer_linker
            .instantiate_pre(&component)
            .and_then(TrainerPre::new)
            .map_err(|e| SandboxError::Instantiate {
                module: id.clone(),
                reason: format!(
                    "not a `trainer` component of edge:pipeline@0.1.0 (a trainer built before the \
                     `weights` import took its weights as an argument: rebuild it against \
                     modules/wit/trainer.wit) or imports something this host lacks: {e:#}"
                ),
            })?;
        Ok(TrainerModule {
            inner: Arc::new(TrainerInner { id, pre, source }),
        })
    }

    /// Trains from `weights` on `samples` with the hyperparameters `params_json` (a JSON
    /// object, see `trainer.wit`) in a fresh instance of `module`, bounded by
    /// `sandbox.train_timeout_ms` and the memory limit. The result has the input's names,
    /// shapes and order and only finite values (checked here).
    pub fn train(
        &self,
        module: &TrainerModule,
        weights: Vec<Param>,
        params_json: &str,
        samples: Arc<dyn SampleSource>,
    ) -> Result<TrainResult, TrainError> {
        self.train_measured(module, weights, params_json, samples)
            .map(|t| t.result)
    }

    /// [`Sandbox::train`], with what the call used.
    pub fn train_measured(
        &self,
        module: &TrainerModule,
        weights: Vec<Param>,
        params_json: &str,
        samples: Arc<dyn SampleSource>,
    ) -> Result<Trained, TrainError> {
        let id = module.id();
        check_weights(&weights).map_err(|reason| TrainError::Input {
            module: id.clone(),
            reason: Box::new(reason),
        })?;
        let started = Instant::now();
        let mut call = Call::new(self, module, samples, weights)?;
        let result = call.trainer.call_train(&mut call.store, params_json);
        let out = match result {
            Ok(Ok(out)) => out,
            Ok(Err(message)) => {
                return Err(TrainError::Refused {
                    module: id.clone(),
                    call: "train",
                    message: log::truncate(&message, MAX_MESSAGE_BYTES).into_owned(),
                });
            }
            Err(e) => return Err(call.trapped(e).into()),
        };
        let invalid = |reason: ParamError| TrainError::InvalidResult {
            module: id.clone(),
            call: "train",
            reason: Box::new(reason),
        };
        check_metrics(out.loss, out.accuracy, out.samples, call.count).map_err(invalid)?;
        let slot = call.take_weights()?;
        let peak_memory_bytes = call.store.data().limits.peak();
        // The instance, and the module's memory with its copy of the model, go before the
        // result is read back from the spool.
        drop(call);
        let weights = take_written(slot).map_err(invalid)?;
        tracing::debug!(
            module = %id, samples = out.samples, loss = out.loss, accuracy = out.accuracy,
            ms = started.elapsed().as_millis() as u64, "trainer call done"
        );
        Ok(Trained {
            result: TrainResult {
                weights,
                samples: out.samples,
                loss: out.loss,
                accuracy: out.accuracy,
            },
            peak_memory_bytes,
        })
    }

    /// Loss and accuracy of `weights` over all of `samples`, computed by `module` in a fresh
    /// instance (same bounds as [`Sandbox::train`]).
    pub fn evaluate(
        &self,
        module: &TrainerModule,
        weights: Vec<Param>,
        samples: Arc<dyn SampleSource>,
    ) -> Result<EvalResult, TrainError> {
        let id = module.id();
        check_weights(&weights).map_err(|reason| TrainError::Input {
            module: id.clone(),
            reason: Box::new(reason),
        })?;
        let mut call = Call::new(self, module, samples, weights)?;
        let out = match call.trainer.call_evaluate(&mut call.store) {
            Ok(Ok(out)) => out,
            Ok(Err(message)) => {
                return Err(TrainError::Refused {
                    module: id.clone(),
                    call: "evaluate",
                    message: log::truncate(&message, MAX_MESSAGE_BYTES).into_owned(),
                });
            }
            Err(e) => return Err(call.trapped(e).into()),
        };
        check_metrics(out.loss, out.accuracy, out.samples, call.count).map_err(|reason| {
            TrainError::InvalidResult {
                module: id.clone(),
                call: "evaluate",
                reason: Box::new(reason),
            }
        })?;
        Ok(out)
    }
}

/// One instance for one call.
struct Call {
    store: Store<HostState>,
    trainer: Trainer,
    module: ModuleId,
    timeout_ms: u64,
    /// The sample count the module sees (fixed for the call).
    count: u32,
}

impl Call {
    fn new(
        sandbox: &Sandbox,
        module: &TrainerModule,
        samples: Arc<dyn SampleSource>,
        weights: Vec<Param>,
    ) -> Result<Call, SandboxError> {
        let cfg = sandbox.config();
        let id = module.id().clone();
        let metrics = Arc::new(StageMetrics::new(cfg.max_metric_names as usize));
        let line_cap = cfg.log_max_line_bytes as usize;
        let sink = Arc::new(log::LogSink::new(
            LOG_STAGE,
            &id,
            cfg.log_lines_per_s,
            cfg.log_burst,
            line_cap,
            Arc::clone(&metrics),
        ));
        let stdout = wasi::GuestOutput::stdout(Arc::clone(&sink), line_cap);
        let stderr = wasi::GuestOutput::stderr(Arc::clone(&sink), line_cap);
        let count = samples.count();
        let mut table = ResourceTable::new();
        install(
            &mut table,
            SampleSlot {
                source: samples,
                count,
            },
            SAMPLE_SLOT,
            "sample source",
        )?;
        install(
            &mut table,
            WeightsSlot::new(weights, Some(sandbox.cache_dir().to_path_buf())),
            WEIGHTS_SLOT,
            "weights",
        )?;
        let state = HostState {
            wasi: wasi::context(&id, &Grants::default(), stdout, stderr.clone())?,
            table,
            limits: limits::Limits::new(cfg.max_memory_bytes, cfg.max_table_elements),
            log: log::LogUnit { sink },
            clock: clock::ClockUnit::new(),
            kv: kv::KvUnit::new(
                Arc::new(NoKv),
                kv::KvQuotas {
                    max_key: cfg.kv_max_key_bytes as usize,
                    max_value: 0,
                    max_total: 0,
                    sync_interval: std::time::Duration::from_millis(cfg.kv_sync_interval_ms),
                },
            ),
            counters: counters::CountersUnit { metrics },
            stderr,
            sleep_cap_ns: cfg
                .train_timeout_ms
                .saturating_add(2 * cfg.epoch_tick_ms)
                .saturating_mul(1_000_000),
        };
        let mut store = Store::new(module.inner.pre.engine(), state);
        store.limiter(|s| &mut s.limits);
        // One deadline covers instantiation (start functions) and the call.
        store.set_epoch_deadline(super::engine::deadline_ticks(
            cfg.train_timeout_ms,
            cfg.epoch_tick_ms,
        ));
        let timeout_ms = cfg.train_timeout_ms;
        let trainer = match module.inner.pre.instantiate(&mut store) {
            Ok(t) => t,
            Err(e) => {
                return Err(match classify(&mut store, &id, timeout_ms, e) {
                    SandboxError::Trap { module, reason } => {
                        SandboxError::Instantiate { module, reason }
                    }
                    other => other,
                });
            }
        };
        Ok(Call {
            store,
            trainer,
            module: id,
            timeout_ms,
            count,
        })
    }

    fn trapped(&mut self, e: wasmtime::Error) -> SandboxError {
        classify(&mut self.store, &self.module, self.timeout_ms, e)
    }

    /// The call's weights, with what the module wrote back (checked by [`take_written`]).
    fn take_weights(&mut self) -> Result<WeightsSlot, SandboxError> {
        self.store
            .data_mut()
            .table
            .delete(Resource::<WeightsSlot>::new_own(WEIGHTS_SLOT))
            .map_err(|e| SandboxError::Engine(format!("taking the weights back: {e}")))
    }
}

/// The sample source of one call. It lives in the store's resource table rather than in
/// [`HostState`] (shared with stages, which have no samples) at a fixed index: the first
/// entry of the call's fresh table (the weights, [`WeightsSlot`], are the second). The guest
/// cannot reach either: it only holds handles the host gave it, and the host never hands
/// these out.
struct SampleSlot {
    source: Arc<dyn SampleSource>,
    count: u32,
}

const SAMPLE_SLOT: u32 = 0;
const WEIGHTS_SLOT: u32 = 1;

/// Stores `slot` in a fresh call's table, where the imports look for it (`index`).
fn install<T: Send + 'static>(
    table: &mut ResourceTable,
    slot: T,
    index: u32,
    what: &str,
) -> Result<(), SandboxError> {
    let r = table
        .push(slot)
        .map_err(|e| SandboxError::Engine(format!("storing the {what}: {e}")))?;
    if r.rep() != index {
        return Err(SandboxError::Engine(format!(
            "{what} stored at index {}, expected {index}",
            r.rep()
        )));
    }
    Ok(())
}

/// The `samples` import of one call.
struct SamplesView<'a> {
    table: &'a ResourceTable,
}

impl SamplesView<'_> {
    fn slot(&self) -> wasmtime::Result<&SampleSlot> {
        self.table
            .get(&Resource::<SampleSlot>::new_borrow(SAMPLE_SLOT))
            .map_err(|e| wasmtime::format_err!("samples: no sample source in this store ({e})"))
    }
}

impl wit_samples::Host for SamplesView<'_> {
    fn count(&mut self) -> wasmtime::Result<u32> {
        Ok(self.slot()?.count)
    }

    fn read(&mut self, start: u32, n: u32) -> wasmtime::Result<Vec<wit_samples::Sample>> {
        let slot = self.slot()?;
        // Clamped to the count the call started with, whatever the source does meanwhile.
        let n = n.min(MAX_READ_BATCH).min(slot.count.saturating_sub(start));
        if n == 0 {
            return Ok(Vec::new());
        }
        Ok(slot
            .source
            .read(start, n)
            .into_iter()
            .take(n as usize)
            .map(|(features, label)| wit_samples::Sample { features, label })
            .collect())
    }
}

struct HasSamples;

impl HasData for HasSamples {
    type Data<'a> = SamplesView<'a>;
}

/// The parameters of one call: each tensor's values until the module reads them, and what
/// it writes back.
struct WeightsSlot {
    /// Names, shapes and (until read) values, in order.
    given: Vec<Param>,
    /// Read whole or taken from.
    read: Vec<bool>,
    written: Vec<Option<Written>>,
    /// Per parameter: `None` if written whole (or not at all), else the ranges its pieces
    /// (`write-at`) covered since, merged where they touch.
    pieces: Vec<Option<Vec<(usize, usize)>>>,
    /// Where written tensors wait for the instance to go (made at the first write).
    spool_dir: Option<std::path::PathBuf>,
    spool: Option<Spool>,
    /// Set once making or writing the spool failed: later tensors stay in memory.
    spool_failed: bool,
}

/// Most separate pieces one parameter may be written in (pieces that touch count as one).
const MAX_PIECES: usize = 4096;

/// A tensor the module wrote back.
enum Written {
    /// As written whole (of any length: [`take_written`] checks it), or put together from
    /// pieces (its shape's length).
    Memory(Vec<f32>),
    /// In the spool at its parameter's offset, its shape's length.
    Spooled,
}

impl WeightsSlot {
    fn new(given: Vec<Param>, spool_dir: Option<std::path::PathBuf>) -> WeightsSlot {
        WeightsSlot {
            read: vec![false; given.len()],
            written: (0..given.len()).map(|_| None).collect(),
            pieces: vec![None; given.len()],
            given,
            spool_dir,
            spool: None,
            spool_failed: false,
        }
    }

    /// Values in parameter `i`'s shape.
    fn elements(&self, i: usize) -> usize {
        self.given[i]
            .shape
            .iter()
            .map(|&d| d as usize)
            .product::<usize>()
    }

    /// The spool, made at the first need; `None` once it failed or without a folder.
    fn spool(&mut self) -> Option<&Spool> {
        if self.spool.is_none()
            && !self.spool_failed
            && let Some(dir) = &self.spool_dir
        {
            let sizes: Vec<usize> = (0..self.given.len()).map(|k| self.elements(k)).collect();
            match Spool::new(dir, &sizes) {
                Ok(s) => self.spool = Some(s),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot make a spool file for trained weights; they stay in memory");
                    self.spool_failed = true;
                }
            }
        }
        self.spool.as_ref().filter(|_| !self.spool_failed)
    }

    /// Keeps a written tensor: in the spool if it fills its shape and the spool works, else
    /// in memory (a tensor of the wrong size is refused by [`take_written`] with the rest).
    fn keep(&mut self, i: usize, data: Vec<f32>) {
        self.pieces[i] = None;
        if data.len() == self.elements(i)
            && let Some(spool) = self.spool()
        {
            match spool.put(i, 0, &data) {
                Ok(()) => {
                    self.written[i] = Some(Written::Spooled);
                    return;
                }
                Err(e) => self.spool_lost(e),
            }
        }
        self.written[i] = Some(Written::Memory(data));
    }

    /// Keeps a piece of a written tensor (`write-at`), `start..start + data.len()` within its
    /// shape (the caller checked).
    fn keep_at(&mut self, i: usize, start: usize, data: &[f32]) -> Result<(), String> {
        let n = self.elements(i);
        let end = start + data.len();
        // Pieces after a whole write of the right length lay over it; else they start afresh.
        let whole = self.pieces[i].is_none()
            && match &self.written[i] {
                Some(Written::Spooled) => true,
                Some(Written::Memory(v)) => v.len() == n,
                None => false,
            };
        if !whole && self.pieces[i].is_none() {
            self.pieces[i] = Some(Vec::new());
            self.written[i] = Some(if self.spool().is_some() {
                Written::Spooled
            } else {
                Written::Memory(vec![0.0; n])
            });
        }
        if let Some(Written::Spooled) = self.written[i] {
            let put = self.spool.as_ref().map(|s| s.put(i, start, data));
            if let Some(Err(e)) = put {
                // The spool failed: this tensor's pieces so far to memory, the rest after it.
                let held = self.spool.as_ref().map(|s| s.get(i, n));
                self.spool_lost(e);
                match held {
                    Some(Ok(v)) => self.written[i] = Some(Written::Memory(v)),
                    _ => return Err("cannot keep the trained values: the spool file failed".into()),
                }
            }
        }
        if let Some(Written::Memory(v)) = &mut self.written[i] {
            v[start..end].copy_from_slice(data);
        }
        if let Some(ranges) = &mut self.pieces[i] {
            let full = ranges.len() >= MAX_PIECES;
            match ranges.last_mut() {
                Some(last) if last.1 == start => last.1 = end,
                _ if full => return Err(format!("over {MAX_PIECES} separate pieces")),
                _ => ranges.push((start, end)),
            }
        }
        Ok(())
    }

    fn spool_lost(&mut self, e: std::io::Error) {
        tracing::warn!(error = %e, "cannot spool trained weights; they stay in memory");
        self.spool_failed = true;
    }
}

/// The tensors a trainer writes back, kept in a file without a name beside the module cache
/// until its instance is gone, so the module's memory (which holds its own copy of the model
/// until the instance drops) and the result are never both in memory. Each parameter has a
/// fixed place, so a module writing one tensor again and again does not grow the file; the
/// file goes when its handle closes, also after a crash.
struct Spool {
    file: std::fs::File,
    offsets: Vec<u64>,
}

/// Values converted at a time between the spool and memory (64 KiB).
const SPOOL_BLOCK: usize = 16 * 1024;

impl Spool {
    fn new(dir: &std::path::Path, sizes: &[usize]) -> std::io::Result<Spool> {
        let file = tempfile::tempfile_in(dir)?;
        let mut at = 0u64;
        let offsets = sizes
            .iter()
            .map(|&n| {
                let o = at;
                at += n as u64 * 4;
                o
            })
            .collect();
        Ok(Spool { file, offsets })
    }

    /// Writes `data` as parameter `i`'s values from value `start` on.
    fn put(&self, i: usize, start: usize, data: &[f32]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut at = self.offsets[i] + start as u64 * 4;
        let mut buf = Vec::with_capacity(SPOOL_BLOCK * 4);
        for block in data.chunks(SPOOL_BLOCK) {
            buf.clear();
            block
                .iter()
                .for_each(|v| buf.extend_from_slice(&v.to_le_bytes()));
            self.file.write_all_at(&buf, at)?;
            at += buf.len() as u64;
        }
        Ok(())
    }

    fn get(&self, i: usize, n: usize) -> std::io::Result<Vec<f32>> {
        use std::os::unix::fs::FileExt;
        let mut out = Vec::with_capacity(n);
        let mut buf = vec![0u8; SPOOL_BLOCK * 4];
        let mut at = self.offsets[i];
        while out.len() < n {
            let take = (n - out.len()).min(SPOOL_BLOCK) * 4;
            self.file.read_exact_at(&mut buf[..take], at)?;
            at += take as u64;
            out.extend(
                buf[..take]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        Ok(out)
    }
}

/// The `weights` import of one call.
struct WeightsView<'a> {
    table: &'a mut ResourceTable,
}

impl WeightsView<'_> {
    fn slot(&mut self) -> wasmtime::Result<&mut WeightsSlot> {
        self.table
            .get_mut(&Resource::<WeightsSlot>::new_borrow(WEIGHTS_SLOT))
            .map_err(|e| wasmtime::format_err!("weights: no weights in this store ({e})"))
    }
}

fn out_of_range(index: u32, count: usize) -> wasmtime::Error {
    wasmtime::format_err!("weights: parameter {index} does not exist (there are {count})")
}

impl wit_weights::Host for WeightsView<'_> {
    fn describe(&mut self) -> wasmtime::Result<Vec<ParamInfo>> {
        Ok(self
            .slot()?
            .given
            .iter()
            .map(|p| ParamInfo {
                name: p.name.clone(),
                shape: p.shape.clone(),
            })
            .collect())
    }

    fn read(&mut self, index: u32) -> wasmtime::Result<Vec<f32>> {
        let slot = self.slot()?;
        let count = slot.given.len();
        let i = index as usize;
        let (Some(p), Some(read)) = (slot.given.get_mut(i), slot.read.get_mut(i)) else {
            return Err(out_of_range(index, count));
        };
        if std::mem::replace(read, true) {
            return Err(wasmtime::format_err!(
                "weights: parameter {index} ({}) read twice (each is handed over once)",
                p.name
            ));
        }
        // Handed over: the module's copy is the only one while it runs.
        Ok(std::mem::take(&mut p.data))
    }

    fn take(&mut self, index: u32, len: u32) -> wasmtime::Result<Vec<f32>> {
        let slot = self.slot()?;
        let count = slot.given.len();
        let i = index as usize;
        let (Some(p), Some(read)) = (slot.given.get_mut(i), slot.read.get_mut(i)) else {
            return Err(out_of_range(index, count));
        };
        *read = true;
        let left = p.data.len();
        let Some(start) = left.checked_sub(len as usize) else {
            return Err(wasmtime::format_err!(
                "weights: took {len} values of parameter {index} ({}), {left} are left",
                p.name
            ));
        };
        // Handed over from the end: what the module has is no longer held here.
        let piece = p.data[start..].to_vec();
        p.data.truncate(start);
        p.data.shrink_to_fit();
        Ok(piece)
    }

    fn write(&mut self, index: u32, data: Vec<f32>) -> wasmtime::Result<()> {
        let slot = self.slot()?;
        let count = slot.written.len();
        if index as usize >= count {
            return Err(out_of_range(index, count));
        }
        slot.keep(index as usize, data);
        Ok(())
    }

    fn write_at(&mut self, index: u32, start: u32, data: Vec<f32>) -> wasmtime::Result<()> {
        let slot = self.slot()?;
        let count = slot.written.len();
        let i = index as usize;
        if i >= count {
            return Err(out_of_range(index, count));
        }
        let n = slot.elements(i);
        let start = start as usize;
        if start + data.len() > n {
            return Err(wasmtime::format_err!(
                "weights: {} values at {start} run past the end of parameter {index} ({}, {n} values)",
                data.len(),
                slot.given[i].name
            ));
        }
        slot.keep_at(i, start, &data).map_err(|reason| {
            wasmtime::format_err!(
                "weights: parameter {index} ({}): {reason}",
                slot.given[i].name
            )
        })
    }
}

struct HasWeights;

impl HasData for HasWeights {
    type Data<'a> = WeightsView<'a>;
}

/// The `kv` a trainer's store must have but its world does not import: empty, refuses writes.
struct NoKv;

impl super::KvStore for NoKv {
    fn get(&self, _key: &[u8]) -> Result<Option<Vec<u8>>, super::KvStoreError> {
        Ok(None)
    }

    fn insert(&self, _key: &[u8], _value: &[u8]) -> Result<Option<usize>, super::KvStoreError> {
        Err(super::KvStoreError("trainers have no kv".into()))
    }

    fn remove(&self, _key: &[u8]) -> Result<Option<usize>, super::KvStoreError> {
        Ok(None)
    }

    fn used_bytes(&self) -> Result<u64, super::KvStoreError> {
        Ok(0)
    }

    fn flush(&self) -> Result<(), super::KvStoreError> {
        Ok(())
    }

    fn sync(&self) -> Result<(), super::KvStoreError> {
        Ok(())
    }
}

/// Checks weights before a module sees them: unique non-empty names, data matching the
/// shape, finite values.
fn check_weights(weights: &[Param]) -> Result<(), ParamError> {
    if weights.is_empty() {
        return Err(ParamError::Empty);
    }
    for (i, p) in weights.iter().enumerate() {
        if p.name.is_empty() {
            return Err(ParamError::EmptyName(i));
        }
        if weights[..i].iter().any(|q| q.name == p.name) {
            return Err(ParamError::Duplicate(p.name.clone()));
        }
        check_param(p)?;
    }
    Ok(())
}

fn check_param(p: &Param) -> Result<(), ParamError> {
    let elements = p
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize));
    if elements != Some(p.data.len()) {
        return Err(ParamError::Size {
            name: p.name.clone(),
            values: p.data.len(),
            shape: p.shape.clone(),
        });
    }
    if let Some(k) = p.data.iter().position(|v| !v.is_finite()) {
        return Err(ParamError::NotFinite {
            name: p.name.clone(),
            index: k,
            value: p.data[k],
        });
    }
    Ok(())
}

/// The parameters a module wrote back, under the names and shapes it was given: every one
/// written, each filling its shape with finite values.
fn take_written(slot: WeightsSlot) -> Result<Vec<Param>, ParamError> {
    let sizes: Vec<usize> = (0..slot.given.len()).map(|i| slot.elements(i)).collect();
    let (spool, mut pieces) = (slot.spool, slot.pieces);
    slot.given
        .into_iter()
        .zip(slot.written)
        .enumerate()
        .map(|(i, (p, data))| {
            if let Some(ranges) = &mut pieces[i] {
                ranges.sort_unstable();
                let mut covered = 0;
                for &(start, end) in ranges.iter() {
                    if start > covered {
                        break;
                    }
                    covered = covered.max(end);
                }
                if covered < sizes[i] {
                    return Err(ParamError::Uncovered {
                        name: p.name.clone(),
                        from: covered,
                        values: sizes[i],
                    });
                }
            }
            let data = match data {
                None => return Err(ParamError::NotWritten(p.name.clone())),
                Some(Written::Memory(v)) => v,
                Some(Written::Spooled) => spool
                    .as_ref()
                    .map(|s| s.get(i, sizes[i]))
                    .unwrap_or_else(|| Err(std::io::ErrorKind::NotFound.into()))
                    .map_err(|e| ParamError::Spool {
                        name: p.name.clone(),
                        error: e.to_string(),
                    })?,
            };
            let p = Param { data, ..p };
            check_param(&p)?;
            Ok(p)
        })
        .collect()
}

fn check_metrics(loss: f32, accuracy: f32, samples: u32, count: u32) -> Result<(), ParamError> {
    if !loss.is_finite() {
        return Err(ParamError::Loss(loss));
    }
    if !(0.0..=1.0).contains(&accuracy) {
        return Err(ParamError::Accuracy(accuracy));
    }
    if samples > count {
        return Err(ParamError::Samples { samples, count });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;

    use super::*;
    use crate::SandboxConfig;

    const BUILD_COMMAND: &str =
        "cargo build --release --target wasm32-wasip2 -p mlp-trainer (in modules/)";

    /// Bytes of `modules/target/wasm32-wasip2/release/mlp_trainer.wasm`, building it once if
    /// missing (as the integration tests' `common::module` does for all modules).
    fn trainer_wasm() -> Vec<u8> {
        static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
        let modules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../modules");
        let path: PathBuf = modules.join("target/wasm32-wasip2/release/mlp_trainer.wasm");
        if !path.exists() {
            let built = BUILT.get_or_init(|| {
                let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
                let status = std::process::Command::new(cargo)
                    .args([
                        "build",
                        "--release",
                        "--target",
                        "wasm32-wasip2",
                        "-p",
                        "mlp-trainer",
                    ])
                    .current_dir(&modules)
                    .env_remove("CARGO_TARGET_DIR")
                    .env_remove("RUSTFLAGS")
                    .status()
                    .map_err(|e| format!("cannot run cargo: {e}"))?;
                if status.success() {
                    Ok(())
                } else {
                    Err(format!("exit status {status}"))
                }
            });
            if let Err(e) = built {
                panic!(
                    "mlp_trainer.wasm missing and building it failed ({e}); run `{BUILD_COMMAND}`"
                );
            }
        }
        std::fs::read(&path).unwrap_or_else(|e| {
            panic!("cannot read {}: {e}; run `{BUILD_COMMAND}`", path.display())
        })
    }

    fn sandbox(cfg: &SandboxConfig) -> (tempfile::TempDir, Sandbox, TrainerModule) {
        let dir = tempfile::tempdir().unwrap();
        let sandbox = Sandbox::new(cfg, dir.path()).unwrap();
        let module = sandbox
            .load_trainer("mlp-trainer", &trainer_wasm())
            .unwrap();
        (dir, sandbox, module)
    }

    /// Deterministic weights of an MLP with layer sizes `dims`, named `fc{i}.weight/bias`.
    fn mlp_weights(dims: &[u32]) -> Vec<Param> {
        let wave = |n: u32, k: f32| -> Vec<f32> {
            (0..n).map(|i| ((i as f32 + 1.0) * k).sin() * 0.3).collect()
        };
        dims.windows(2)
            .enumerate()
            .flat_map(|(i, d)| {
                [
                    Param {
                        name: format!("fc{i}.weight"),
                        shape: vec![d[0], d[1]],
                        data: wave(d[0] * d[1], 0.37 + i as f32),
                    },
                    Param {
                        name: format!("fc{i}.bias"),
                        shape: vec![d[1]],
                        data: vec![0.0; d[1] as usize],
                    },
                ]
            })
            .collect()
    }

    /// `n` samples of `classes` separable clusters in `inputs` dimensions: class `c` has
    /// feature `c` high, every feature gets a small deterministic jitter.
    fn clusters(n: usize, inputs: usize, classes: usize) -> Arc<Vec<(Vec<f32>, i64)>> {
        let samples = (0..n)
            .map(|i| {
                let c = i % classes;
                let x = (0..inputs)
                    .map(|k| {
                        let jitter = (((i * 31 + k * 17) % 13) as f32 / 13.0 - 0.5) * 0.4;
                        if k == c { 1.0 + jitter } else { jitter }
                    })
                    .collect();
                (x, c as i64)
            })
            .collect();
        Arc::new(samples)
    }

    const PARAMS: &str = r#"{"epochs": 20, "lr": 0.1, "batch_size": 8, "mu": 0.0, "seed": 7}"#;

    #[test]
    fn training_lowers_loss_and_raises_accuracy() {
        let (_dir, sandbox, module) = sandbox(&SandboxConfig::default());
        let weights = mlp_weights(&[4, 8, 3]);
        let data = clusters(90, 4, 3);
        let before = sandbox
            .evaluate(&module, weights.clone(), data.clone())
            .unwrap();
        assert_eq!(before.samples, 90);
        let out = sandbox
            .train(&module, weights.clone(), PARAMS, data.clone())
            .unwrap();
        assert_eq!(out.samples, 90);
        let shapes = |w: &[Param]| {
            w.iter()
                .map(|p| (p.name.clone(), p.shape.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(shapes(&out.weights), shapes(&weights));
        let after = sandbox
            .evaluate(&module, out.weights.clone(), data.clone())
            .unwrap();
        assert!(
            after.loss < before.loss * 0.5,
            "loss {} -> {}",
            before.loss,
            after.loss
        );
        assert!(
            after.accuracy > before.accuracy && after.accuracy >= 0.95,
            "accuracy {} -> {}",
            before.accuracy,
            after.accuracy
        );
        // Same inputs, same seed: the same weights.
        let again = sandbox.train(&module, weights, PARAMS, data).unwrap();
        assert_eq!(again.weights, out.weights);
    }

    #[test]
    fn a_bad_shape_is_refused_naming_the_param() {
        let (_dir, sandbox, module) = sandbox(&SandboxConfig::default());
        let mut weights = mlp_weights(&[4, 8, 3]);
        weights[1] = Param {
            name: "fc0.bias".into(),
            shape: vec![5],
            data: vec![0.0; 5],
        };
        let err = sandbox
            .train(&module, weights, PARAMS, clusters(9, 4, 3))
            .unwrap_err();
        assert!(matches!(err, TrainError::Refused { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("mlp-trainer@") && text.contains("fc0.bias") && text.contains("[5]"),
            "{text}"
        );
        // Features that do not fit the first layer.
        let err = sandbox
            .train(&module, mlp_weights(&[5, 3]), PARAMS, clusters(9, 4, 3))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sample 0: 4 features"), "{err}");
        // A shape the data does not fill never reaches the module.
        let mut weights = mlp_weights(&[4, 3]);
        weights[0].data.pop();
        let err = sandbox
            .train(&module, weights, PARAMS, clusters(9, 4, 3))
            .unwrap_err();
        assert!(matches!(err, TrainError::Input { .. }), "{err:?}");
        assert!(err.to_string().contains("fc0.weight: 11 values"), "{err}");
    }

    #[test]
    fn nan_weights_labels_out_of_range_and_no_samples_are_refused() {
        let (_dir, sandbox, module) = sandbox(&SandboxConfig::default());
        let mut weights = mlp_weights(&[4, 8, 3]);
        weights[2].data[5] = f32::NAN;
        let err = sandbox
            .train(&module, weights, PARAMS, clusters(9, 4, 3))
            .unwrap_err();
        assert!(matches!(err, TrainError::Input { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains("fc1.weight: value 5 is not finite"),
            "{err}"
        );
        let err = sandbox
            .train(&module, mlp_weights(&[4, 2]), PARAMS, clusters(9, 4, 3))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sample 2: label 2 is outside 0..2"), "{err}");
        let err = sandbox
            .train(
                &module,
                mlp_weights(&[4, 3]),
                PARAMS,
                Arc::new(Vec::<(Vec<f32>, i64)>::new()),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("no samples to train on"), "{err}");
        let err = sandbox
            .train(
                &module,
                mlp_weights(&[4, 3]),
                r#"{"lr": -1}"#,
                clusters(9, 4, 3),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("lr: must be"), "{err}");
    }

    #[test]
    fn reads_cross_the_batch_cap_and_max_samples_limits() {
        let (_dir, sandbox, module) = sandbox(&SandboxConfig::default());
        let data = clusters(2500, 4, 3);
        let eval = sandbox
            .evaluate(&module, mlp_weights(&[4, 3]), data.clone())
            .unwrap();
        assert_eq!(eval.samples, 2500);
        let out = sandbox
            .train(
                &module,
                mlp_weights(&[4, 3]),
                r#"{"epochs": 1, "max_samples": 1500}"#,
                data,
            )
            .unwrap();
        assert_eq!(out.samples, 1500);
    }

    #[test]
    fn a_long_training_is_stopped_at_train_timeout() {
        let cfg = SandboxConfig {
            train_timeout_ms: 50,
            ..SandboxConfig::default()
        };
        let (_dir, sandbox, module) = sandbox(&cfg);
        let err = sandbox
            .train(
                &module,
                mlp_weights(&[16, 256, 10]),
                r#"{"epochs": 10000, "lr": 0.001}"#,
                clusters(2000, 16, 10),
            )
            .unwrap_err();
        match &err {
            TrainError::Sandbox(SandboxError::Timeout { timeout_ms, .. }) => {
                assert_eq!(*timeout_ms, 50);
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(err.to_string().contains("mlp-trainer@"), "{err}");
    }

    #[test]
    fn worlds_do_not_mix() {
        let dir = tempfile::tempdir().unwrap();
        let sandbox = Sandbox::new(&SandboxConfig::default(), dir.path()).unwrap();
        let err = sandbox.load("mlp-trainer", &trainer_wasm()).unwrap_err();
        assert!(
            matches!(err, SandboxError::Instantiate { .. }),
            "a trainer is not a stage: {err:?}"
        );
    }

    /// Each tensor is handed over once (the host keeps no copy); indices out of range trap.
    /// The same with the written tensors spooled to a file and kept in memory.
    #[test]
    fn weights_change_hands_once() {
        let dir = tempfile::tempdir().unwrap();
        weights_change_hands_once_with(Some(dir.path().to_path_buf()));
        weights_change_hands_once_with(None);
        weights_change_hands_once_with(Some(dir.path().join("missing")));
    }

    /// A call's resource table as the host sets it up: a sample slot (a placeholder here) and
    /// the weights `given`, spooled to `spool`.
    fn weights_table(given: &[Param], spool: Option<std::path::PathBuf>) -> ResourceTable {
        let mut table = ResourceTable::new();
        install(&mut table, 0u8, SAMPLE_SLOT, "placeholder").unwrap();
        install(
            &mut table,
            WeightsSlot::new(given.to_vec(), spool),
            WEIGHTS_SLOT,
            "weights",
        )
        .unwrap();
        table
    }

    fn weights_change_hands_once_with(spool: Option<std::path::PathBuf>) {
        use wit_weights::Host as _;
        let given = mlp_weights(&[2, 3]);
        let mut table = weights_table(&given, spool.clone());
        let mut view = WeightsView { table: &mut table };
        let info = view.describe().unwrap();
        assert_eq!(
            info.iter()
                .map(|p| (&p.name[..], &p.shape[..]))
                .collect::<Vec<_>>(),
            given
                .iter()
                .map(|p| (&p.name[..], &p.shape[..]))
                .collect::<Vec<_>>()
        );
        assert_eq!(view.read(0).unwrap(), given[0].data);
        assert!(
            view.slot().unwrap().given[0].data.is_empty(),
            "the host kept a copy"
        );
        let twice = view.read(0).unwrap_err().to_string();
        assert!(
            twice.contains("parameter 0 (fc0.weight) read twice"),
            "{twice}"
        );
        let past = view.read(2).unwrap_err().to_string();
        assert!(
            past.contains("parameter 2 does not exist (there are 2)"),
            "{past}"
        );
        assert!(view.write(2, vec![1.0]).is_err());
        view.write(1, vec![9.0; 3]).unwrap();
        view.write(1, given[1].data.clone()).unwrap();
        view.write(0, given[0].data.clone()).unwrap();
        let slot = table
            .delete(Resource::<WeightsSlot>::new_own(WEIGHTS_SLOT))
            .unwrap();
        let spooled = slot.spool.is_some();
        assert_eq!(
            spooled,
            spool.is_some_and(|d| d.exists()),
            "spooled where the folder is"
        );
        assert!(
            slot.written
                .iter()
                .all(|w| matches!(w, Some(Written::Spooled)) == spooled),
            "every tensor in the spool, or none"
        );
        assert_eq!(take_written(slot).unwrap(), given, "a later write replaces");
    }

    /// `take` hands a parameter over from its end and the host lets go of what it handed;
    /// `write-at` pieces put a parameter together, in the spool or in memory, later pieces
    /// over earlier ones, and a gap or a piece past the end is named.
    #[test]
    fn weights_cross_in_pieces_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        for spool in [Some(dir.path().to_path_buf()), None] {
            use wit_weights::Host as _;
            let given = mlp_weights(&[4, 3]); // fc0.weight [4, 3], fc0.bias [3]
            let mut table = weights_table(&given, spool.clone());
            let mut view = WeightsView { table: &mut table };
            let last = view.take(0, 5).unwrap();
            assert_eq!(last, given[0].data[7..]);
            assert_eq!(view.slot().unwrap().given[0].data, given[0].data[..7]);
            let over = view.take(0, 8).unwrap_err().to_string();
            assert!(
                over.contains("took 8 values of parameter 0 (fc0.weight), 7 are left"),
                "{over}"
            );
            assert_eq!(view.take(0, 7).unwrap(), given[0].data[..7]);
            assert!(view.slot().unwrap().given[0].data.is_empty());
            assert!(view.read(0).is_err(), "read after take");
            assert!(view.take(2, 0).is_err(), "out of range");

            // Pieces out of order and overlapping; the later one counts.
            view.write_at(0, 6, vec![-1.0; 6]).unwrap();
            view.write_at(0, 0, given[0].data[..8].to_vec()).unwrap();
            view.write_at(0, 8, given[0].data[8..].to_vec()).unwrap();
            let past = view.write_at(1, 2, vec![0.0; 2]).unwrap_err().to_string();
            assert!(
                past.contains("2 values at 2 run past the end of parameter 1 (fc0.bias, 3 values)"),
                "{past}"
            );
            // A gap in the bias: named.
            view.write_at(1, 0, vec![0.5]).unwrap();
            view.write_at(1, 2, vec![0.5]).unwrap();
            let slot = table
                .delete(Resource::<WeightsSlot>::new_own(WEIGHTS_SLOT))
                .unwrap();
            assert_eq!(slot.spool.is_some(), spool.is_some());
            let gap = take_written(slot).unwrap_err().to_string();
            assert!(
                gap.contains("fc0.bias: written in pieces that leave value 1 of 3"),
                "{gap}"
            );

            // The same, the gap filled, and pieces over a whole write.
            let mut slot = WeightsSlot::new(given.clone(), spool.clone());
            slot.keep_at(0, 0, &given[0].data).unwrap();
            slot.keep(1, vec![7.0; 3]);
            slot.keep_at(1, 1, &given[1].data[1..]).unwrap();
            slot.keep_at(1, 0, &given[1].data[..1]).unwrap();
            assert_eq!(take_written(slot).unwrap(), given);
        }
        // Pieces that never touch are bounded.
        let given = mlp_weights(&[2 * MAX_PIECES as u32 + 2, 1]);
        let mut slot = WeightsSlot::new(given, None);
        for k in 0..MAX_PIECES {
            slot.keep_at(0, 2 * k, &[1.0]).unwrap();
        }
        assert!(
            slot.keep_at(0, 2 * MAX_PIECES, &[1.0])
                .unwrap_err()
                .contains("separate pieces")
        );
    }

    #[test]
    fn results_that_break_the_contract_are_named() {
        let given = mlp_weights(&[2, 2]);
        let dir = tempfile::tempdir().unwrap();
        let written = |data: Vec<Option<Vec<f32>>>| {
            let mut slot = WeightsSlot::new(given.clone(), Some(dir.path().to_path_buf()));
            for (i, d) in data.into_iter().enumerate() {
                if let Some(d) = d {
                    slot.keep(i, d);
                }
            }
            take_written(slot)
        };
        let all: Vec<Option<Vec<f32>>> = given.iter().map(|p| Some(p.data.clone())).collect();
        assert_eq!(written(all.clone()).unwrap(), given);
        let mut missing = all.clone();
        missing[1] = None;
        assert_eq!(
            written(missing).unwrap_err().to_string(),
            "fc0.bias: never written back"
        );
        let mut short = all.clone();
        short[0] = Some(vec![0.5; 3]);
        assert!(
            written(short)
                .unwrap_err()
                .to_string()
                .contains("fc0.weight: 3 values do not fill shape [2, 2]")
        );
        let mut inf = all;
        inf[0].as_mut().unwrap()[0] = f32::INFINITY;
        assert!(
            written(inf)
                .unwrap_err()
                .to_string()
                .contains("value 0 is not finite")
        );
        assert!(check_metrics(f32::NAN, 0.5, 1, 1).is_err());
        assert!(check_metrics(0.1, 1.5, 1, 1).is_err());
        assert!(check_metrics(0.1, 0.5, 2, 1).is_err());
        check_metrics(0.1, 0.5, 1, 1).unwrap();
    }
}
