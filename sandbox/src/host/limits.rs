//! Per-store resource limits: wasmtime's `StoreLimits` (memory, table and instance caps),
//! wrapped to remember a refused memory growth so a trap that follows it can be reported as
//! a memory-limit error rather than an anonymous `unreachable`.

use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};

pub(crate) struct Limits {
    inner: StoreLimits,
    max_memory: u64,
    /// The size a refused `memory.grow` asked for, since the last [`Limits::take_denied`].
    denied: Option<u64>,
    /// The largest linear memory the store was allowed to grow to, bytes (never above
    /// `max_memory`).
    peak: u64,
}

impl Limits {
    pub(crate) fn new(max_memory: u64, max_table_elements: u32) -> Self {
        let inner = StoreLimitsBuilder::new()
            .memory_size(usize::try_from(max_memory).unwrap_or(usize::MAX))
            .table_elements(max_table_elements as usize)
            // One component is several core instances, memories and tables; the pooling
            // allocator bounds their number per component, these bound the whole store.
            .instances(super::super::engine::MAX_CORE_INSTANCES_PER_COMPONENT as usize)
            .memories(super::super::engine::MAX_MEMORIES_PER_COMPONENT as usize)
            .tables(super::super::engine::MAX_TABLES_PER_COMPONENT as usize)
            .build();
        Limits {
            inner,
            max_memory,
            denied: None,
            peak: 0,
        }
    }

    pub(crate) fn max_memory(&self) -> u64 {
        self.max_memory
    }

    /// Forgets an earlier refusal; call before each guest call.
    pub(crate) fn clear_denied(&mut self) {
        self.denied = None;
    }

    pub(crate) fn take_denied(&mut self) -> Option<u64> {
        self.denied.take()
    }

    /// The largest linear memory granted so far, bytes.
    pub(crate) fn peak(&self) -> u64 {
        self.peak
    }
}

impl ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = self.inner.memory_growing(current, desired, maximum)?;
        if ok {
            self.peak = self.peak.max(desired as u64);
        } else {
            self.denied = Some(desired as u64);
        }
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}
