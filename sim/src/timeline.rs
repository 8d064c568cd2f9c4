//! The run's timeline: one entry per thing that happened to a device (enrolled, candidate,
//! health failed, discarded, live, rebooted, power cut) or to the fleet, in the order the
//! simulator saw them. Shared by every device; written out at the end.

use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Entry {
    /// Milliseconds since the simulator started.
    pub t_ms: u64,
    /// Wall-clock time, ms since the Unix epoch (to line up with the coordinator's journal).
    pub unix_ms: u64,
    /// Device id, or `fleet`.
    pub device: String,
    pub event: String,
    pub detail: String,
}

/// Cheap to clone; every clone appends to the same list.
#[derive(Debug, Clone)]
pub struct Timeline {
    start: Instant,
    entries: Arc<Mutex<Vec<Entry>>>,
}

impl Default for Timeline {
    fn default() -> Self {
        Timeline {
            start: Instant::now(),
            entries: Arc::default(),
        }
    }
}

impl Timeline {
    pub fn record(&self, device: &str, event: &str, detail: &str) {
        let e = Entry {
            t_ms: u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX),
            unix_ms: protocol::v1::now_ms(),
            device: device.to_owned(),
            event: event.to_owned(),
            detail: detail.to_owned(),
        };
        tracing::debug!(device, event, detail, "sim event");
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(e);
    }

    pub fn entries(&self) -> Vec<Entry> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}
