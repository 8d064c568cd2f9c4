//! Host import `clock`: wall-clock milliseconds and a per-instance monotonic clock.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use wasmtime::component::{HasData, Linker};

use super::HostState;
use crate::bindings::edge::pipeline::clock as wit;

pub(crate) struct ClockUnit {
    /// Origin of `monotonic-ns`: the WIT only promises differences within one instance.
    origin: Instant,
}

impl ClockUnit {
    pub(crate) fn new() -> Self {
        ClockUnit {
            origin: Instant::now(),
        }
    }
}

impl wit::Host for ClockUnit {
    fn now_ms(&mut self) -> u64 {
        // A clock set before 1970 reads as 0 rather than trapping the guest.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }

    fn monotonic_ns(&mut self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

struct HasClock;

impl HasData for HasClock {
    type Data<'a> = &'a mut ClockUnit;
}

pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    wit::add_to_linker::<HostState, HasClock>(linker, |s| &mut s.clock)
}
