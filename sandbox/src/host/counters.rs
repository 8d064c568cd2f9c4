//! Host import `counters`: the module's counters and gauges, kept in its stage's
//! [`StageMetrics`] (which caps the number of names).

use std::sync::Arc;

use wasmtime::component::{HasData, Linker};

use super::HostState;
use crate::bindings::edge::pipeline::counters as wit;
use crate::metrics::StageMetrics;

pub(crate) struct CountersUnit {
    pub(crate) metrics: Arc<StageMetrics>,
}

impl wit::Host for CountersUnit {
    fn increment(&mut self, name: String, n: u64) {
        self.metrics.increment(&name, n);
    }

    fn set_gauge(&mut self, name: String, value: f64) {
        self.metrics.set_gauge(&name, value);
    }
}

struct HasCounters;

impl HasData for HasCounters {
    type Data<'a> = &'a mut CountersUnit;
}

pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    wit::add_to_linker::<HostState, HasCounters>(linker, |s| &mut s.counters)
}
