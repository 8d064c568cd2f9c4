//! The wasmtime [`Engine`] (built once per agent) and the epoch ticker that enforces call
//! deadlines.
//!
//! Settings that matter for safety and for small boards:
//! - epoch interruption: every call gets a deadline in ticks; a thread bumps the epoch every
//!   `epoch_tick_ms`, so a guest spinning without host calls still stops;
//! - the pooling allocator, sized from `max_instances` and the per-component maxima below,
//!   so all address space is reserved once, when the first module loads, and its total is
//!   known (and logged);
//! - linear memories reserve 4 GiB on 64-bit targets (bounds checks elided, guard pages) but
//!   only `max_memory_bytes` on 32-bit ones, where 16 x 4 GiB cannot exist;
//! - on 32-bit ARM Cranelift has no backend, so the engine targets the Pulley interpreter.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::{SandboxConfig, SandboxError};

/// Core wasm instances one component may contain. A Rust `wasm32-wasip2` component (all of
/// `modules/`) instantiates 3 core modules: the program and two small shims.
pub(crate) const MAX_CORE_INSTANCES_PER_COMPONENT: u32 = 16;
/// Linear memories per component. Rust `wasm32-wasip2` components have one; a module built
/// with the wasip1 adapter (other toolchains) has two and then counts double in the pool.
pub(crate) const MAX_MEMORIES_PER_COMPONENT: u32 = 2;
/// Tables per component (Rust `wasm32-wasip2`: 2, the program's and a shim's).
pub(crate) const MAX_TABLES_PER_COMPONENT: u32 = 8;
/// Set (to anything) in the agent's environment, the engine writes a perf map of the code it
/// compiles, so `perf record`/`perf report` of the agent name the guest's functions (modules
/// built without `strip` keep their names). For profiling a stage on a device.
pub(crate) const PERFMAP_ENV: &str = "EDGE_WASM_PERFMAP";

/// Guard after each linear memory on 64-bit targets.
const GUARD_BYTES_64: u64 = 32 * 1024 * 1024;

/// How the pooling allocator is sized; computed without touching wasmtime so it can be
/// tested and logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PoolPlan {
    pub component_instances: u32,
    pub core_instances: u32,
    pub memories: u32,
    pub tables: u32,
    pub memory_reservation: u64,
    pub memory_guard: u64,
}

impl PoolPlan {
    pub(crate) fn new(cfg: &SandboxConfig, pointer_width_64: bool) -> PoolPlan {
        let n = cfg.max_instances;
        let (reservation, guard) = match (cfg.memory_reservation_bytes, pointer_width_64) {
            (0, true) => (4 * 1024 * 1024 * 1024, GUARD_BYTES_64),
            (0, false) => (cfg.max_memory_bytes, 0),
            (r, true) => (r, GUARD_BYTES_64),
            (r, false) => (r, 0),
        };
        PoolPlan {
            component_instances: n,
            // Budgets per instance on average (measured on `modules/`: 3 core instances,
            // 1 memory, 2 tables); one component may take up to the per-component maxima.
            // Memories are what reserves address space, so they get no slack.
            core_instances: n.saturating_mul(4).max(MAX_CORE_INSTANCES_PER_COMPONENT),
            memories: n.max(MAX_MEMORIES_PER_COMPONENT),
            tables: n.saturating_mul(4).max(MAX_TABLES_PER_COMPONENT),
            memory_reservation: reservation,
            memory_guard: guard,
        }
    }

    /// Address space reserved for linear memories, bytes.
    pub(crate) fn reserved_bytes(&self) -> u64 {
        u64::from(self.memories).saturating_mul(self.memory_reservation + self.memory_guard)
    }
}

/// Builds the engine for `cfg`.
pub(crate) fn build(cfg: &SandboxConfig) -> Result<(Engine, PoolPlan), SandboxError> {
    let plan = PoolPlan::new(cfg, cfg!(target_pointer_width = "64"));
    let mut c = config(cfg, &plan)?;
    c.allocation_strategy(InstanceAllocationStrategy::Pooling(pool(cfg, &plan)?));
    if std::env::var_os(PERFMAP_ENV).is_some() {
        // `perf report` names the compiled guest functions (`/tmp/perf-PID.map`).
        c.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    let engine = Engine::new(&c).map_err(engine_err)?;
    Ok((engine, plan))
}

/// An engine for one compilation: the sandbox engine's settings, so its artifacts deserialize
/// there, without the instance pool (nothing runs in it). Dropped with the compiled component,
/// it takes the compiler's working buffers with it (see `compile.rs`).
pub(crate) fn compiler(cfg: &SandboxConfig) -> Result<Engine, SandboxError> {
    let plan = PoolPlan::new(cfg, cfg!(target_pointer_width = "64"));
    Engine::new(&config(cfg, &plan)?).map_err(engine_err)
}

fn engine_err(e: wasmtime::Error) -> SandboxError {
    SandboxError::Engine(format!("{e:#}"))
}

fn to_usize(v: u64, key: &str) -> Result<usize, SandboxError> {
    usize::try_from(v)
        .map_err(|_| SandboxError::Config(format!("sandbox.{key} is too large for this target")))
}

fn pool(cfg: &SandboxConfig, plan: &PoolPlan) -> Result<PoolingAllocationConfig, SandboxError> {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(plan.component_instances)
        .total_core_instances(plan.core_instances)
        .total_memories(plan.memories)
        .total_tables(plan.tables)
        // Synchronous calls only: no fiber stacks to reserve.
        .total_stacks(0)
        .max_core_instances_per_component(MAX_CORE_INSTANCES_PER_COMPONENT)
        .max_memories_per_component(MAX_MEMORIES_PER_COMPONENT)
        .max_tables_per_component(MAX_TABLES_PER_COMPONENT)
        .max_memories_per_module(1)
        .max_memory_size(to_usize(cfg.max_memory_bytes, "max_memory_bytes")?)
        .table_elements(cfg.max_table_elements as usize);
    Ok(pool)
}

/// Everything that decides how modules compile (what an artifact's compatibility is checked
/// against), shared by the sandbox engine and the compiling ones.
fn config(cfg: &SandboxConfig, plan: &PoolPlan) -> Result<Config, SandboxError> {
    let mut c = Config::new();
    c.wasm_component_model(true)
        .epoch_interruption(cfg.epoch_checks)
        .max_wasm_stack(to_usize(cfg.max_wasm_stack_bytes, "max_wasm_stack_bytes")?)
        .memory_reservation(plan.memory_reservation)
        .memory_guard_size(plan.memory_guard)
        .memory_reservation_for_growth(0);
    #[cfg(target_arch = "arm")]
    {
        // No Cranelift backend for 32-bit ARM: compile to Pulley bytecode and interpret it.
        c.target("pulley32").map_err(engine_err)?;
    }
    Ok(c)
}

/// Thread that increments the engine's epoch every tick; stops when dropped.
pub(crate) struct EpochTicker {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    pub(crate) fn start(engine: Engine, tick: Duration) -> Result<EpochTicker, SandboxError> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                // recv_timeout doubles as the sleep; a message or a dropped sender ends it.
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(tick) {
                    engine.increment_epoch();
                }
            })
            .map_err(|e| SandboxError::Engine(format!("starting the epoch ticker thread: {e}")))?;
        Ok(EpochTicker {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Epoch ticks to allow for a call of `timeout_ms`: the deadline fires after at least the
/// timeout, at most one tick later.
pub(crate) fn deadline_ticks(timeout_ms: u64, tick_ms: u64) -> u64 {
    timeout_ms.div_ceil(tick_ms.max(1)) + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_plan_fits_small_boards() {
        let cfg = SandboxConfig::default();
        let p32 = PoolPlan::new(&cfg, false);
        // 16 memories x 64 MiB = 1 GiB of a 32-bit process's 3 GiB: exactly what modules
        // may use, no guard regions on top.
        assert_eq!(p32.memory_reservation, cfg.max_memory_bytes);
        assert_eq!(p32.memory_guard, 0);
        assert_eq!(p32.reserved_bytes(), 16 * 64 * 1024 * 1024);
        let p64 = PoolPlan::new(&cfg, true);
        assert_eq!(p64.memory_reservation, 4 << 30);
        assert!(
            p64.reserved_bytes() < 1 << 40,
            "fits a 39-bit address space"
        );
        let explicit = SandboxConfig {
            memory_reservation_bytes: 128 << 20,
            ..cfg
        };
        assert_eq!(PoolPlan::new(&explicit, true).memory_reservation, 128 << 20);
    }

    #[test]
    fn deadline_covers_the_timeout() {
        assert_eq!(deadline_ticks(1000, 10), 101);
        assert_eq!(deadline_ticks(5, 10), 2);
        assert_eq!(deadline_ticks(10, 0), 11);
    }
}
