//! Host side of a stage instance: the per-store state ([`HostState`]) and the host
//! capabilities, one small unit each with its own `add_to_linker`: `log`, `clock`, `kv`,
//! `counters` (the `stage` world's imports), `wasi` (a WASI context that grants nothing) and
//! `limits` (memory, table and instance caps).

pub(crate) mod clock;
pub(crate) mod counters;
pub(crate) mod kv;
pub(crate) mod limits;
pub(crate) mod log;
pub(crate) mod wasi;

use wasmtime::component::{Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// Everything one instance's store holds; dropped with the instance.
pub(crate) struct HostState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limits: limits::Limits,
    pub(crate) log: log::LogUnit,
    pub(crate) clock: clock::ClockUnit,
    pub(crate) kv: kv::KvUnit,
    pub(crate) counters: counters::CountersUnit,
    /// The module's stderr, kept to put its panic message into trap reports.
    pub(crate) stderr: wasi::GuestOutput,
    /// Longest a guest's clock wait may block, nanoseconds: just past the call deadline.
    pub(crate) sleep_cap_ns: u64,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Adds WASI (p2, synchronous) and the `stage` world's imports to `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    wasi::add_sleep_cap(linker)?;
    log::add_to_linker(linker)?;
    clock::add_to_linker(linker)?;
    kv::add_to_linker(linker)?;
    counters::add_to_linker(linker)?;
    Ok(())
}
