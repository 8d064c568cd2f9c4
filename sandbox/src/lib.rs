//! The WASM sandbox: runs pipeline-stage modules (components of the `stage` world in
//! `modules/wit/`) under wasmtime with bounded memory, time, output and capabilities.
//!
//! [`Sandbox`] is created at start-up but builds its parts when the first module loads (an
//! agent that runs no module never pays for them): one [`wasmtime::Engine`] (epoch
//! interruption, pooling allocator sized from [`SandboxConfig`], Cranelift, or Pulley on
//! 32-bit ARM), one `Linker` with WASI p2 and our host imports, the compiled-module cache and
//! the epoch ticker thread. They are then kept for the agent's life and shared by every
//! instantiation. [`Sandbox::load`] turns module bytes into a [`Module`]; a [`StageRunner`]
//! (or, by hand, [`Sandbox::instantiate`] and [`StageInstance`]) runs it as a stage.
//! Federated-learning trainers (world `trainer`) load with [`Sandbox::load_trainer`] and run
//! one call per instance through [`Sandbox::train`] and [`Sandbox::evaluate`] ([`trainer`]).
//!
//! - `config`: [`SandboxConfig`] (`[sandbox]` in the agent config) and [`Grants`].
//! - `engine`: engine settings, pooling plan, epoch ticker.
//! - `cache` / `compile`: the digest-keyed artifact cache; time-bounded compilation.
//! - `host/`: per-store state and the host imports (`log`, `clock`, `kv`, `counters`, WASI).
//! - `instance`: one instance, typed call errors. `runner`: restart with backoff.
//! - `metrics`: per-stage counters and the latency histogram.
//! - `trainer`: the `trainer` world: its bindings, the `samples` import, train/evaluate calls.
//!
//! **Invariant:** bytes that came from outside (the network, a deployment) are always
//! compiled, never deserialized; the only bytes ever deserialized are files in our own
//! cache directory written by [`cache::Cache::write`] from an artifact this engine compiled,
//! checked against their sha256 before wasmtime sees them. A module gets no filesystem,
//! network, environment or arguments; a trap fails one frame and poisons only its instance.
//! **Boundary:** the agent's pipeline runner (stages), deployment (loading modules) and
//! federated learning (trainers); the coordinator's `fl start`, which runs a task's trainer
//! once under a device's limits before accepting the task. Its own crate because both
//! binaries use it; the agent re-exports it as `edge_agent::sandbox`.

mod bindings;
mod cache;
mod compile;
mod config;
mod engine;
mod error;
pub mod fsutil;
mod host;
mod instance;
mod metrics;
mod runner;
pub mod setting;
pub mod trainer;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

pub use bindings::edge::pipeline::types::{Dtype, Frame, Payload, Tensor};
pub use compile::{CHILD_COMMAND as COMPILE_COMMAND, Compiler, child_main as compile_child_main};
pub use config::{Grants, SandboxConfig};
pub use error::SandboxError;
pub use host::kv::{KvStore, KvStoreError, SledKv};
pub use instance::{StageContext, StageInstance, frame_bytes};
pub use metrics::{CallOutcome, LatencyHistogram, LatencySummary, MetricsSnapshot, StageMetrics};
pub use runner::{AfterTrap, RestartPolicy, StageRunner};
pub use trainer::TrainerModule;

use bindings::StagePre;
use host::HostState;

// The WIT element types are the wire's six (`protocol::v1::tensor::DType`, which the inference
// crate uses too); the generated enum converts here, once.
impl From<Dtype> for protocol::v1::tensor::DType {
    fn from(d: Dtype) -> Self {
        use protocol::v1::tensor::DType;
        match d {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::I64 => DType::I64,
            Dtype::I32 => DType::I32,
            Dtype::U8 => DType::U8,
            Dtype::Bool => DType::Bool,
        }
    }
}

impl From<protocol::v1::tensor::DType> for Dtype {
    fn from(d: protocol::v1::tensor::DType) -> Self {
        use protocol::v1::tensor::DType;
        match d {
            DType::F32 => Dtype::F32,
            DType::F16 => Dtype::F16,
            DType::I64 => Dtype::I64,
            DType::I32 => Dtype::I32,
            DType::U8 => Dtype::U8,
            DType::Bool => Dtype::Bool,
        }
    }
}

/// A copy of a frame's tensor for the wire (a data body), without a name.
impl From<&Tensor> for protocol::v1::tensor::WireTensor {
    fn from(t: &Tensor) -> Self {
        protocol::v1::tensor::WireTensor::new("", t.dtype.into(), t.shape.clone(), t.data.clone())
    }
}

/// A module's identity: the name it was deployed under and the sha256 of its bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ModuleId {
    name: String,
    digest: [u8; 32],
    hex: String,
}

impl ModuleId {
    fn new(name: &str, digest: [u8; 32]) -> Self {
        ModuleId {
            name: name.to_owned(),
            digest,
            hex: cache::hex(&digest),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }

    /// The digest in hex, all 64 characters.
    pub fn digest_hex(&self) -> &str {
        &self.hex
    }

    /// The first 12 hex characters of the digest, for log lines.
    pub fn short_digest(&self) -> &str {
        &self.hex[..12]
    }
}

impl fmt::Display for ModuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.short_digest())
    }
}

impl fmt::Debug for ModuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Where a loaded module's code came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleSource {
    /// Compiled from the bytes given to [`Sandbox::load`] (and written to the cache).
    Compiled,
    /// Deserialized from our own cache.
    Cache,
}

/// A compiled module, ready to instantiate; cheap to clone.
#[derive(Clone)]
pub struct Module {
    inner: Arc<ModuleInner>,
}

struct ModuleInner {
    id: ModuleId,
    pre: StagePre<HostState>,
    source: ModuleSource,
    code_bytes: usize,
}

impl fmt::Debug for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Module")
            .field("id", &self.inner.id)
            .field("source", &self.inner.source)
            .finish_non_exhaustive()
    }
}

impl Module {
    pub fn id(&self) -> &ModuleId {
        &self.inner.id
    }

    pub fn source(&self) -> ModuleSource {
        self.inner.source
    }

    /// Size of the compiled artifact, bytes (what the module's code occupies once loaded).
    pub fn code_bytes(&self) -> usize {
        self.inner.code_bytes
    }

    pub(crate) fn pre(&self) -> &StagePre<HostState> {
        &self.inner.pre
    }
}

/// Counters of the sandbox as a whole.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SandboxStats {
    /// Loads served from the cache.
    pub cache_hits: u64,
    /// Loads that found no cache file.
    pub cache_misses: u64,
    /// Cache files that failed their checks or wasmtime's, deleted and recompiled.
    pub cache_rejected: u64,
    /// Successful compilations.
    pub compiles: u64,
    /// Modules refused for size, compile errors or timeouts.
    pub load_failures: u64,
}

#[derive(Default)]
struct Stats {
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    cache_rejected: AtomicU64,
    compiles: AtomicU64,
    load_failures: AtomicU64,
}

/// The sandbox facade; cheap to clone (all clones share one engine, linker and cache).
#[derive(Clone)]
pub struct Sandbox {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: SandboxConfig,
    cache_dir: PathBuf,
    /// Built by the first load ([`Sandbox::core`]), then kept.
    core: OnceLock<Core>,
    stats: Stats,
    /// Where modules compile.
    compiler: compile::Compiler,
    /// Set while a timed-out compilation is still running (on a thread).
    abandoned_compile: Arc<AtomicBool>,
    /// One load at a time per digest is enough; serialising loads keeps two threads from
    /// compiling the same module twice and bounds compile memory on small boards. Also
    /// serialises building the core.
    load_lock: Mutex<()>,
}

/// What the first module needs and every later one shares.
struct Core {
    engine: Engine,
    linker: Linker<HostState>,
    /// The stage linker's imports plus `samples`, for `trainer` components only.
    trainer_linker: Linker<HostState>,
    cache: cache::Cache,
    // Last: stopped (joined) when the sandbox goes away.
    _ticker: engine::EpochTicker,
}

impl fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sandbox")
            .field("cache_dir", &self.inner.cache_dir)
            .field("built", &self.is_built())
            .finish_non_exhaustive()
    }
}

impl Sandbox {
    /// Checks the config; the engine, linker, cache and epoch ticker are built by the first
    /// load. `state_dir` holds the cache unless `cfg.cache_dir` names another directory.
    pub fn new(cfg: &SandboxConfig, state_dir: &Path) -> Result<Sandbox, SandboxError> {
        Self::with_compiler(cfg, state_dir, Compiler::Thread)
    }

    /// [`Sandbox::new`] that compiles modules with `compiler` (the agent: in a child process).
    pub fn with_compiler(
        cfg: &SandboxConfig,
        state_dir: &Path,
        compiler: Compiler,
    ) -> Result<Sandbox, SandboxError> {
        cfg.validate()
            .map_err(|e| SandboxError::Config(e.to_string()))?;
        Ok(Sandbox {
            inner: Arc::new(Inner {
                cfg: cfg.clone(),
                cache_dir: cfg.cache_dir_in(state_dir),
                core: OnceLock::new(),
                stats: Stats::default(),
                compiler,
                abandoned_compile: Arc::new(AtomicBool::new(false)),
                load_lock: Mutex::new(()),
            }),
        })
    }

    /// Whether the engine has been built (a module was loaded, or [`Sandbox::cache_path`]
    /// asked for it).
    pub fn is_built(&self) -> bool {
        self.inner.core.get().is_some()
    }

    /// The engine, linkers, cache and ticker, built now if this is the first call. Callers
    /// that may race hold `load_lock`; a race without it only builds a second core that is
    /// dropped (its ticker joined).
    fn core(&self) -> Result<&Core, SandboxError> {
        if let Some(c) = self.inner.core.get() {
            return Ok(c);
        }
        let cfg = &self.inner.cfg;
        let started = Instant::now();
        let (engine, plan) = engine::build(cfg)?;
        let mut linker = Linker::new(&engine);
        host::add_to_linker(&mut linker)
            .map_err(|e| SandboxError::Engine(format!("adding host imports: {e:#}")))?;
        let trainer_linker = trainer::linker(&engine)?;
        let cache_dir = &self.inner.cache_dir;
        let cache =
            cache::Cache::open(cache_dir, cache::engine_key(&engine)).map_err(|source| {
                SandboxError::Cache {
                    path: cache_dir.clone(),
                    source,
                }
            })?;
        let ticker =
            engine::EpochTicker::start(engine.clone(), Duration::from_millis(cfg.epoch_tick_ms))?;
        tracing::info!(
            cache_dir = %cache_dir.display(),
            engine_key = %&cache::hex(cache.engine_key())[..16],
            max_instances = cfg.max_instances,
            memory_slots = plan.memories,
            reserved_mib = plan.reserved_bytes() >> 20,
            target = if cfg!(target_arch = "arm") { "pulley32" } else { "native" },
            build_ms = started.elapsed().as_millis() as u64,
            "wasm sandbox ready (first module)"
        );
        let _ = self.inner.core.set(Core {
            engine,
            linker,
            trainer_linker,
            cache,
            _ticker: ticker,
        });
        self.inner
            .core
            .get()
            .ok_or_else(|| SandboxError::Engine("the built engine was not kept".into()))
    }

    pub fn config(&self) -> &SandboxConfig {
        &self.inner.cfg
    }

    /// The directory of compiled modules.
    pub fn cache_dir(&self) -> &Path {
        &self.inner.cache_dir
    }

    /// The cache file a module with `digest` has under this engine's settings (builds the
    /// engine if no module has yet: the file name carries its compatibility key).
    pub fn cache_path(&self, digest: &[u8; 32]) -> Result<PathBuf, SandboxError> {
        let _serial = self
            .inner
            .load_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Ok(self.core()?.cache.path(digest))
    }

    pub fn stats(&self) -> SandboxStats {
        let s = &self.inner.stats;
        SandboxStats {
            cache_hits: s.cache_hits.load(Ordering::Relaxed),
            cache_misses: s.cache_misses.load(Ordering::Relaxed),
            cache_rejected: s.cache_rejected.load(Ordering::Relaxed),
            compiles: s.compiles.load(Ordering::Relaxed),
            load_failures: s.load_failures.load(Ordering::Relaxed),
        }
    }

    /// Loads module bytes deployed as `name`: refuses more than `max_module_bytes` before
    /// compiling, then uses the cached artifact for this digest and engine if there is a
    /// sound one, else compiles (bounded by `compile_timeout_ms`) and caches the result.
    /// `bytes` are never deserialized (see the module invariant).
    pub fn load(&self, name: &str, bytes: &[u8]) -> Result<Module, SandboxError> {
        self.load_as(name, bytes, |id, component, source, code| {
            self.finish(id, component, source, code)
        })
    }

    /// [`Sandbox::load`] for any world: `finish` turns the component into that world's
    /// module type.
    fn load_as<M>(
        &self,
        name: &str,
        bytes: &[u8],
        finish: impl FnOnce(ModuleId, Component, ModuleSource, usize) -> Result<M, SandboxError>,
    ) -> Result<M, SandboxError> {
        let result = self.load_inner(name, bytes, finish);
        if let Err(e) = &result {
            self.inner
                .stats
                .load_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(module = %name, error = %e, "module load failed");
        }
        result
    }

    fn load_inner<M>(
        &self,
        name: &str,
        bytes: &[u8],
        finish: impl FnOnce(ModuleId, Component, ModuleSource, usize) -> Result<M, SandboxError>,
    ) -> Result<M, SandboxError> {
        let inner = &*self.inner;
        let digest: [u8; 32] = Sha256::digest(bytes).into();
        let id = ModuleId::new(name, digest);
        let limit = inner.cfg.max_module_bytes;
        if bytes.len() as u64 > limit {
            return Err(SandboxError::TooLarge {
                digest: id.digest_hex().to_owned(),
                size: bytes.len() as u64,
                limit,
            });
        }
        let _serial = inner.load_lock.lock().unwrap_or_else(|p| p.into_inner());
        let core = self.core()?;
        let cache_err = |source| SandboxError::Cache {
            path: core.cache.path(&digest),
            source,
        };
        match core.cache.read(&digest).map_err(cache_err)? {
            cache::Lookup::Hit(artifact) => match Self::deserialize_own(core, &artifact) {
                Ok(component) => {
                    inner.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(module = %id, "module loaded from cache");
                    return finish(id, component, ModuleSource::Cache, artifact.len());
                }
                Err(e) => self.reject_cached(core, &id, &format!("{e:#}"))?,
            },
            cache::Lookup::Corrupt(reason) => {
                self.reject_cached(core, &id, &reason.to_string())?;
            }
            cache::Lookup::Missing => {
                inner.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
            }
        }
        let started = Instant::now();
        // A throwaway engine compiles; the sandbox's engine loads the artifact, as it would from
        // the cache (see compile.rs: the compiler's buffers go with the throwaway engine).
        // Here, on a bounded thread, and loaded by the sandbox's engine.
        let compile_here = || {
            let artifact = compile::compile_bounded(
                &inner.cfg,
                Arc::from(bytes),
                id.digest_hex(),
                &inner.abandoned_compile,
            )?;
            let component = Self::deserialize_own(core, &artifact).map_err(|e| {
                SandboxError::Engine(format!("loading module {id} just compiled: {e:#}"))
            })?;
            Ok::<_, SandboxError>((artifact, component))
        };
        let in_child = match &inner.compiler {
            Compiler::Thread => None,
            Compiler::Process { program, args } => {
                match compile::compile_in_child(&inner.cfg, program, args, bytes, id.digest_hex()) {
                    Ok(artifact) => Some(artifact),
                    Err(compile::ChildError::Failed(e)) => return Err(e),
                    Err(compile::ChildError::Spawn(e)) => {
                        tracing::warn!(
                            module = %id, program = %program.display(), error = %e,
                            "cannot start the compiler process; compiling in this process"
                        );
                        None
                    }
                }
            }
        };
        let (artifact, component) = match in_child {
            Some(artifact) => match Self::deserialize_own(core, &artifact) {
                Ok(component) => (artifact, component),
                Err(e) => {
                    // The binary on disk is not this process's any more (upgraded while
                    // running): its artifacts do not fit this engine.
                    tracing::warn!(
                        module = %id, error = %format!("{e:#}"),
                        "the compiler process's artifact does not load; compiling in this process"
                    );
                    compile_here()?
                }
            },
            None => compile_here()?,
        };
        inner.stats.compiles.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            module = %id, bytes = bytes.len(), code_bytes = artifact.len(),
            compile_ms = started.elapsed().as_millis() as u64,
            "module compiled"
        );
        if let Err(e) = core.cache.write(&digest, &artifact) {
            // The module still runs; only the next start pays for compiling again.
            tracing::warn!(module = %id, dir = %core.cache.dir().display(), error = %e, "writing module cache failed");
        }
        finish(id, component, ModuleSource::Compiled, artifact.len())
    }

    /// Deserializes an artifact of our own: read from our cache directory, or just compiled.
    #[allow(unsafe_code)]
    fn deserialize_own(core: &Core, artifact: &[u8]) -> wasmtime::Result<Component> {
        // SAFETY: wasmtime requires that the bytes were produced by `serialize` of a
        // compatible engine and are not tampered with. `artifact` comes only from
        // `compile::compile_bounded` in `load_inner` (this process's own compilation, by an
        // engine with this engine's settings, `engine::compiler`), from
        // `compile::compile_in_child` (the same compilation by a child process running this
        // binary's `compile_child_main`, read from the pipe only it writes; the settings go to it
        // in the request, and a child of another build is refused by wasmtime's check below), or from
        // `cache::Cache::read`, which returns files that `Cache::write` created in our
        // private cache directory from such a compilation, and only after checking the
        // module digest, this engine's compatibility key and the artifact's sha256 recorded
        // at write time. Bytes from outside never reach this function (they are compiled by
        // `load_inner`). wasmtime still checks the artifact's engine settings and refuses a
        // mismatch.
        unsafe { Component::deserialize(&core.engine, artifact) }
    }

    fn reject_cached(&self, core: &Core, id: &ModuleId, reason: &str) -> Result<(), SandboxError> {
        self.inner
            .stats
            .cache_rejected
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            module = %id, path = %core.cache.path(id.digest()).display(), reason = %reason,
            "cached module artifact unusable; deleting it and recompiling"
        );
        core.cache
            .remove(id.digest())
            .map_err(|source| SandboxError::Cache {
                path: core.cache.path(id.digest()),
                source,
            })
    }

    fn finish(
        &self,
        id: ModuleId,
        component: Component,
        source: ModuleSource,
        code_bytes: usize,
    ) -> Result<Module, SandboxError> {
        let pre = self
            .core()?
            .linker
            .instantiate_pre(&component)
            .and_then(StagePre::new)
            .map_err(|e| SandboxError::Instantiate {
                module: id.clone(),
                reason: format!("not a `stage` component of edge:pipeline@0.1.0 or imports something this host lacks: {e:#}"),
            })?;
        Ok(Module {
            inner: Arc::new(ModuleInner {
                id,
                pre,
                source,
                code_bytes,
            }),
        })
    }

    /// Fresh metrics for a stage, with this sandbox's cap on module metric names.
    pub fn new_stage_metrics(&self) -> Arc<StageMetrics> {
        Arc::new(StageMetrics::new(self.inner.cfg.max_metric_names as usize))
    }

    /// Creates an instance of `module` for a stage (without calling `init`).
    pub fn instantiate(
        &self,
        module: &Module,
        ctx: &StageContext,
    ) -> Result<StageInstance, SandboxError> {
        StageInstance::new(self, module, ctx)
    }
}
