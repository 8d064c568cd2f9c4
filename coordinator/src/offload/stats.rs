//! Counters and compute-time figures of the offload service: totals by outcome, p50/p99 over a
//! window of recent runs, and a moving average per model for the capacity advert.
//! No I/O and no clock: callers pass the durations.

use std::collections::{BTreeMap, VecDeque};

use protocol::v1::offload::Status;

/// Compute times kept for the percentiles.
const WINDOW: usize = 1024;
/// Weight of the newest run in the moving average.
const EWMA_ALPHA: f64 = 0.2;

/// Totals since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Requests that decoded (whatever their outcome).
    pub requests: u64,
    pub ok: u64,
    pub errors: u64,
    pub overloaded: u64,
    pub expired: u64,
    pub unknown_model: u64,
    /// Payloads that were not a request (ignored, never answered).
    pub garbage: u64,
    /// Link probes (empty model, no inputs) answered at once.
    pub probes: u64,
    /// Answers dropped because the publish queue was full or closed.
    pub dropped: u64,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub counters: Counters,
    recent_us: VecDeque<u64>,
    ewma_ms: BTreeMap<String, f64>,
}

impl Stats {
    /// Counts one answer by its status.
    pub fn answered(&mut self, status: Status) {
        let c = &mut self.counters;
        match status {
            Status::Ok => c.ok += 1,
            Status::Error => c.errors += 1,
            Status::Overloaded => c.overloaded += 1,
            Status::Expired => c.expired += 1,
            Status::UnknownModel => c.unknown_model += 1,
        }
    }

    /// Records one model run (successful or not: both used the worker).
    pub fn computed(&mut self, model: &str, micros: u64) {
        if self.recent_us.len() == WINDOW {
            self.recent_us.pop_front();
        }
        self.recent_us.push_back(micros);
        let ms = micros as f64 / 1000.0;
        self.ewma_ms
            .entry(model.to_owned())
            .and_modify(|e| *e = EWMA_ALPHA * ms + (1.0 - EWMA_ALPHA) * *e)
            .or_insert(ms);
    }

    /// (p50, p99) compute time over the recent window, milliseconds; `None` before any run.
    pub fn percentiles_ms(&self) -> Option<(f64, f64)> {
        if self.recent_us.is_empty() {
            return None;
        }
        let mut v: Vec<u64> = self.recent_us.iter().copied().collect();
        v.sort_unstable();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
        Some((at(0.5), at(0.99)))
    }

    pub fn ewma_ms(&self) -> &BTreeMap<String, f64> {
        &self.ewma_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_percentiles() {
        let mut s = Stats::default();
        assert_eq!(s.percentiles_ms(), None);
        for status in [
            Status::Ok,
            Status::Ok,
            Status::Expired,
            Status::UnknownModel,
        ] {
            s.answered(status);
        }
        assert_eq!(s.counters.ok, 2);
        assert_eq!(s.counters.expired, 1);
        assert_eq!(s.counters.unknown_model, 1);
        for us in 1..=100 {
            s.computed("m", us * 1000);
        }
        let (p50, p99) = s.percentiles_ms().expect("some");
        assert!((50.0..=51.0).contains(&p50), "{p50}");
        assert!((98.0..=100.0).contains(&p99), "{p99}");
        let e = s.ewma_ms()["m"];
        assert!(e > 90.0 && e <= 100.0, "{e}");
        for _ in 0..WINDOW {
            s.computed("m", 1);
        }
        assert_eq!(s.recent_us.len(), WINDOW);
    }
}
