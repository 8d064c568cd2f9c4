//! One instance of a module as a pipeline stage: its own `Store<HostState>` (limits, WASI
//! context, host imports), a deadline before every call, and the mapping of call failures
//! to typed errors. After any trap the instance is poisoned and refuses further calls.

use std::sync::Arc;
use std::time::Instant;

use wasmtime::{Store, Trap};

use super::bindings::Stage;
use super::bindings::edge::pipeline::types::{Frame, Payload};
use super::host::{HostState, clock, counters, kv, limits, log, wasi};
use super::metrics::{CallOutcome, StageMetrics};
use super::{Grants, KvStore, Module, ModuleId, Sandbox, SandboxError};

/// Longest guest error or trap message kept, bytes.
const MAX_MESSAGE_BYTES: usize = 1024;

/// What a stage instance needs from its surroundings; kept by [`super::StageRunner`] to
/// create the instance again after a trap.
#[derive(Clone)]
pub struct StageContext {
    /// The stage's name in its pipeline: tags log lines and names the kv namespace.
    pub stage: String,
    /// The stage's kv namespace.
    pub kv: Arc<dyn KvStore>,
    /// The stage's metrics; outlive instances.
    pub metrics: Arc<StageMetrics>,
    /// Capabilities beyond the `stage` world (none yet).
    pub grants: Grants,
}

impl std::fmt::Debug for StageContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageContext")
            .field("stage", &self.stage)
            .field("grants", &self.grants)
            .finish_non_exhaustive()
    }
}

/// A live instance of a stage module.
pub struct StageInstance {
    store: Store<HostState>,
    stage: Stage,
    module: ModuleId,
    metrics: Arc<StageMetrics>,
    deadline_ticks: u64,
    timeout_ms: u64,
    max_output_frames: usize,
    max_output_bytes: u64,
    poisoned: bool,
}

impl std::fmt::Debug for StageInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageInstance")
            .field("module", &self.module)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl StageInstance {
    pub(crate) fn new(
        sandbox: &Sandbox,
        module: &Module,
        ctx: &StageContext,
    ) -> Result<StageInstance, SandboxError> {
        let cfg = sandbox.config();
        let id = module.id().clone();
        let line_cap = cfg.log_max_line_bytes as usize;
        let sink = Arc::new(log::LogSink::new(
            &ctx.stage,
            &id,
            cfg.log_lines_per_s,
            cfg.log_burst,
            line_cap,
            Arc::clone(&ctx.metrics),
        ));
        let stdout = wasi::GuestOutput::stdout(Arc::clone(&sink), line_cap);
        let stderr = wasi::GuestOutput::stderr(Arc::clone(&sink), line_cap);
        let state = HostState {
            wasi: wasi::context(&id, &ctx.grants, stdout, stderr.clone())?,
            table: wasmtime::component::ResourceTable::new(),
            limits: limits::Limits::new(cfg.max_memory_bytes, cfg.max_table_elements),
            log: log::LogUnit { sink },
            clock: clock::ClockUnit::new(),
            kv: kv::KvUnit::new(
                Arc::clone(&ctx.kv),
                kv::KvQuotas {
                    max_key: cfg.kv_max_key_bytes as usize,
                    max_value: cfg.kv_max_value_bytes as usize,
                    max_total: cfg.kv_max_total_bytes,
                    sync_interval: std::time::Duration::from_millis(cfg.kv_sync_interval_ms),
                },
            ),
            counters: counters::CountersUnit {
                metrics: Arc::clone(&ctx.metrics),
            },
            stderr,
            // Past the call's deadline (timeout plus up to one tick), so the guest traps with
            // a timeout as soon as it runs again instead of seeing a short sleep succeed.
            sleep_cap_ns: cfg
                .call_timeout_ms
                .saturating_add(2 * cfg.epoch_tick_ms)
                .saturating_mul(1_000_000),
        };
        let mut store = Store::new(module.pre().engine(), state);
        store.limiter(|s| &mut s.limits);
        let deadline_ticks = super::engine::deadline_ticks(cfg.call_timeout_ms, cfg.epoch_tick_ms);
        // Instantiation runs start functions: guest code, so it gets a deadline too.
        store.set_epoch_deadline(deadline_ticks);
        store.data_mut().limits.clear_denied();
        let stage = match module.pre().instantiate(&mut store) {
            Ok(stage) => stage,
            Err(e) => {
                let err = classify(&mut store, &id, cfg.call_timeout_ms, e);
                if let Some(outcome) = outcome_of(&err) {
                    ctx.metrics.record_trap(outcome);
                }
                return Err(match err {
                    SandboxError::Trap { module, reason } => {
                        SandboxError::Instantiate { module, reason }
                    }
                    other => other,
                });
            }
        };
        Ok(StageInstance {
            store,
            stage,
            module: id,
            metrics: Arc::clone(&ctx.metrics),
            deadline_ticks,
            timeout_ms: cfg.call_timeout_ms,
            max_output_frames: cfg.max_output_frames as usize,
            max_output_bytes: cfg.max_output_bytes,
            poisoned: false,
        })
    }

    /// The module this is an instance of.
    pub fn module(&self) -> &ModuleId {
        &self.module
    }

    /// Whether a trap has made the instance unusable.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    fn before_call(&mut self) -> Result<(), SandboxError> {
        if self.poisoned {
            return Err(SandboxError::Poisoned {
                module: self.module.clone(),
            });
        }
        self.store.set_epoch_deadline(self.deadline_ticks);
        self.store.data_mut().limits.clear_denied();
        Ok(())
    }

    fn trapped(&mut self, e: wasmtime::Error) -> SandboxError {
        self.poisoned = true;
        classify(&mut self.store, &self.module, self.timeout_ms, e)
    }

    /// Calls the module's `init` with the stage's config (JSON object text). A trap poisons
    /// the instance; an `err` from the module is [`SandboxError::InitRefused`].
    pub fn init(&mut self, config_json: &str) -> Result<(), SandboxError> {
        self.before_call()?;
        match self.stage.call_init(&mut self.store, config_json) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(SandboxError::InitRefused {
                module: self.module.clone(),
                message: log::truncate(&message, MAX_MESSAGE_BYTES).into_owned(),
            }),
            Err(e) => {
                let err = self.trapped(e);
                if let Some(outcome) = outcome_of(&err) {
                    self.metrics.record_trap(outcome);
                }
                Err(err)
            }
        }
    }

    /// Runs one frame through the module. A trap (including a timeout or the memory limit)
    /// fails this frame and poisons the instance; `err` from the module or output over the
    /// limits fails this frame only.
    pub fn process(&mut self, frame: &Frame) -> Result<Vec<Frame>, SandboxError> {
        self.before_call()?;
        let started = Instant::now();
        let result = self.stage.call_process(&mut self.store, frame);
        let latency = started.elapsed();
        let (outcome, result) = match result {
            Ok(Ok(frames)) => match self.check_output(&frames) {
                Ok(()) => (CallOutcome::Ok, Ok(frames)),
                Err(e) => (CallOutcome::OutputLimit, Err(e)),
            },
            Ok(Err(message)) => (
                CallOutcome::GuestError,
                Err(SandboxError::GuestError {
                    module: self.module.clone(),
                    message: log::truncate(&message, MAX_MESSAGE_BYTES).into_owned(),
                }),
            ),
            Err(e) => {
                let err = self.trapped(e);
                (outcome_of(&err).unwrap_or(CallOutcome::Trap), Err(err))
            }
        };
        self.metrics.record_call(outcome, latency);
        result
    }

    fn check_output(&self, frames: &[Frame]) -> Result<(), SandboxError> {
        if frames.len() > self.max_output_frames {
            return Err(SandboxError::OutputLimit {
                module: self.module.clone(),
                reason: format!(
                    "{} frames returned, limit {}",
                    frames.len(),
                    self.max_output_frames
                ),
            });
        }
        let bytes: u64 = frames.iter().map(frame_bytes).sum();
        if bytes > self.max_output_bytes {
            return Err(SandboxError::OutputLimit {
                module: self.module.clone(),
                reason: format!("{bytes} bytes returned, limit {}", self.max_output_bytes),
            });
        }
        Ok(())
    }
}

/// Bytes a frame occupies: payload, stream name, labels and the timestamp.
pub fn frame_bytes(f: &Frame) -> u64 {
    let payload = match &f.payload {
        Payload::Json(s) => s.len(),
        Payload::Bytes(b) => b.len(),
        Payload::Samples(s) => s.len() * 4,
        Payload::Tensor(t) => t.data.len() + t.shape.len() * 4 + 1,
    };
    let meta: usize = f.meta.iter().map(|(k, v)| k.len() + v.len()).sum();
    (payload + meta + f.stream.len() + 8) as u64
}

fn outcome_of(err: &SandboxError) -> Option<CallOutcome> {
    match err {
        SandboxError::Timeout { .. } => Some(CallOutcome::Timeout),
        SandboxError::MemoryLimit { .. } => Some(CallOutcome::MemoryLimit),
        SandboxError::Trap { .. } => Some(CallOutcome::Trap),
        _ => None,
    }
}

/// Maps a failed call to a typed error: epoch deadline -> timeout; a trap after the memory
/// limit refused growth -> memory limit; anything else -> trap with wasmtime's reason and
/// the guest's last stderr lines (a Rust panic message lands there). Trainer calls use it too.
pub(crate) fn classify(
    store: &mut Store<HostState>,
    module: &ModuleId,
    timeout_ms: u64,
    e: wasmtime::Error,
) -> SandboxError {
    let denied = store.data_mut().limits.take_denied();
    let stderr = store.data().stderr.take_tail();
    let trap = e.downcast_ref::<Trap>().copied();
    if trap == Some(Trap::Interrupt) {
        return SandboxError::Timeout {
            module: module.clone(),
            timeout_ms,
        };
    }
    if let Some(requested) = denied {
        return SandboxError::MemoryLimit {
            module: module.clone(),
            limit: store.data().limits.max_memory(),
            requested,
        };
    }
    let mut reason = match trap {
        Some(Trap::StackOverflow) => "stack overflow".to_owned(),
        Some(t) => t.to_string(),
        None => format!("{e:#}"),
    };
    if !stderr.is_empty() {
        reason.push_str("; guest stderr: ");
        reason.push_str(&stderr);
    }
    SandboxError::Trap {
        module: module.clone(),
        reason: log::truncate(&reason, MAX_MESSAGE_BYTES).into_owned(),
    }
}
