//! Per-stage metrics: call outcomes, restarts, log drops, the module's own counters and
//! gauges (capped in number), and a small latency histogram for p50/p95/p99.
//!
//! One [`StageMetrics`] belongs to a pipeline stage, not to an instance, so the numbers carry
//! across restarts; [`StageMetrics::snapshot`] copies them out for telemetry.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// Largest length of a module-chosen metric name, bytes.
const MAX_NAME_BYTES: usize = 64;

/// How a call ended, for [`StageMetrics::record_call`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    Ok,
    GuestError,
    OutputLimit,
    Trap,
    Timeout,
    MemoryLimit,
}

/// Metrics of one stage; shared (`Arc`) between the runner, its instance and its host
/// imports.
#[derive(Debug)]
pub struct StageMetrics {
    max_names: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    snap: MetricsSnapshot,
    latency: LatencyHistogram,
}

/// A copy of a stage's metrics at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsSnapshot {
    /// `process` calls made (not counting frames refused while restarting or failed).
    pub calls: u64,
    pub ok: u64,
    /// `process` returned `err`: the frame was rejected, the instance kept.
    pub guest_errors: u64,
    /// Output over `max_output_frames`/`max_output_bytes`: frame dropped, instance kept.
    pub output_limits: u64,
    /// Traps other than timeouts and memory limits (panics, stack overflow, bad access).
    pub traps: u64,
    pub timeouts: u64,
    pub memory_limits: u64,
    /// Instances created again after a trap.
    pub restarts: u64,
    /// Frames not processed because the stage was waiting to restart or had failed.
    pub refused: u64,
    pub log_lines: u64,
    /// Log lines dropped by the rate limit.
    pub log_dropped: u64,
    /// The module's counters, by its own name.
    pub counters: BTreeMap<String, u64>,
    /// The module's gauges, by its own name.
    pub gauges: BTreeMap<String, f64>,
    /// Counter/gauge updates ignored: over the name cap or an invalid name.
    pub metric_names_dropped: u64,
    /// Latency of `process` calls.
    pub latency: LatencySummary,
    /// Set when the stage was marked failed: the last trap's reason.
    pub failed: Option<String>,
}

/// Percentiles of call latency, microseconds (each within 12.5% above the true value).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl StageMetrics {
    /// Metrics allowing the module at most `max_names` distinct counter and gauge names.
    pub fn new(max_names: usize) -> Self {
        StageMetrics {
            max_names,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Metrics are plain numbers: a panic elsewhere while holding the lock cannot leave
        // them inconsistent in a way that matters, so keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let inner = self.lock();
        let mut snap = inner.snap.clone();
        snap.latency = inner.latency.summary();
        snap
    }

    /// Records one `process` call and its latency.
    pub fn record_call(&self, outcome: CallOutcome, latency: Duration) {
        let mut inner = self.lock();
        inner.latency.record(latency);
        let s = &mut inner.snap;
        s.calls += 1;
        match outcome {
            CallOutcome::Ok => s.ok += 1,
            CallOutcome::GuestError => s.guest_errors += 1,
            CallOutcome::OutputLimit => s.output_limits += 1,
            CallOutcome::Trap => s.traps += 1,
            CallOutcome::Timeout => s.timeouts += 1,
            CallOutcome::MemoryLimit => s.memory_limits += 1,
        }
    }

    /// Records a trap outside `process` (in `init` or instantiation).
    pub(crate) fn record_trap(&self, outcome: CallOutcome) {
        let mut inner = self.lock();
        let s = &mut inner.snap;
        match outcome {
            CallOutcome::Timeout => s.timeouts += 1,
            CallOutcome::MemoryLimit => s.memory_limits += 1,
            _ => s.traps += 1,
        }
    }

    pub(crate) fn record_restart(&self) {
        self.lock().snap.restarts += 1;
    }

    pub(crate) fn record_refused(&self) {
        self.lock().snap.refused += 1;
    }

    pub(crate) fn record_failed(&self, reason: &str) {
        self.lock().snap.failed = Some(reason.to_owned());
    }

    pub(crate) fn record_log(&self, written: bool) {
        let mut inner = self.lock();
        if written {
            inner.snap.log_lines += 1;
        } else {
            inner.snap.log_dropped += 1;
        }
    }

    /// The module's `counters.increment`.
    pub(crate) fn increment(&self, name: &str, n: u64) {
        let mut inner = self.lock();
        let names = inner.snap.counters.len() + inner.snap.gauges.len();
        let s = &mut inner.snap;
        if let Some(v) = s.counters.get_mut(name) {
            *v = v.saturating_add(n);
        } else if valid_name(name) && names < self.max_names {
            s.counters.insert(name.to_owned(), n);
        } else {
            s.metric_names_dropped += 1;
        }
    }

    /// The module's `counters.set-gauge`; NaN is ignored, as the WIT promises.
    pub(crate) fn set_gauge(&self, name: &str, value: f64) {
        if value.is_nan() {
            return;
        }
        let mut inner = self.lock();
        let names = inner.snap.counters.len() + inner.snap.gauges.len();
        let s = &mut inner.snap;
        if let Some(v) = s.gauges.get_mut(name) {
            *v = value;
        } else if valid_name(name) && names < self.max_names {
            s.gauges.insert(name.to_owned(), value);
        } else {
            s.metric_names_dropped += 1;
        }
    }
}

/// Names end up in telemetry keys: lowercase snake_case, as the WIT asks.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Log-linear histogram of microseconds: exact below 8 µs, then 8 buckets per power of two
/// (12.5% wide), up to 2^36 µs (19 hours); larger values land in the last bucket.
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    buckets: Vec<u64>,
    count: u64,
    max_us: u64,
}

const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
const MAX_EXP: u32 = 36;
const BUCKETS: usize = (SUB + (MAX_EXP as u64 - SUB_BITS as u64 + 1) * SUB) as usize;

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: vec![0; BUCKETS],
            count: 0,
            max_us: 0,
        }
    }
}

impl LatencyHistogram {
    fn index(us: u64) -> usize {
        if us < SUB {
            return us as usize;
        }
        let exp = (63 - us.leading_zeros()).min(MAX_EXP);
        if exp == MAX_EXP && us >= (1u64 << (MAX_EXP + 1)) {
            return BUCKETS - 1;
        }
        let sub = (us >> (exp - SUB_BITS)) & (SUB - 1);
        (SUB + (u64::from(exp - SUB_BITS)) * SUB + sub) as usize
    }

    /// Largest value that falls in bucket `i`.
    fn upper(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            return i;
        }
        let exp = (i - SUB) / SUB + u64::from(SUB_BITS);
        let sub = (i - SUB) % SUB;
        let width = 1u64 << (exp - u64::from(SUB_BITS));
        ((SUB + sub) << (exp - u64::from(SUB_BITS))) + width - 1
    }

    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.buckets[Self::index(us)] += 1;
        self.count += 1;
        self.max_us = self.max_us.max(us);
    }

    /// Value at quantile `q` (0..=1): the upper edge of its bucket, capped at the maximum.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::upper(i).min(self.max_us);
            }
        }
        self.max_us
    }

    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            count: self.count,
            p50_us: self.quantile(0.50),
            p95_us: self.quantile(0.95),
            p99_us: self.quantile(0.99),
            max_us: self.max_us,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_within_an_eighth() {
        let mut prev_upper = None;
        for i in 0..BUCKETS - 1 {
            let up = LatencyHistogram::upper(i);
            if let Some(p) = prev_upper {
                assert_eq!(LatencyHistogram::index(p + 1), i, "bucket {i}");
            }
            assert_eq!(LatencyHistogram::index(up), i, "bucket {i} upper {up}");
            prev_upper = Some(up);
        }
        for v in [9u64, 100, 1_000, 123_456, 10_000_000] {
            let up = LatencyHistogram::upper(LatencyHistogram::index(v));
            assert!(up >= v && (up - v) as f64 <= v as f64 / 8.0, "{v} -> {up}");
        }
        assert_eq!(LatencyHistogram::index(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_of_a_known_distribution() {
        let mut h = LatencyHistogram::default();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert!((500..=563).contains(&s.p50_us), "{s:?}");
        assert!((950..=1000).contains(&s.p95_us), "{s:?}");
        assert!((990..=1000).contains(&s.p99_us), "{s:?}");
        assert_eq!(s.max_us, 1000);
        assert_eq!(
            LatencyHistogram::default().summary(),
            LatencySummary::default()
        );
    }

    #[test]
    fn metric_names_are_capped_and_checked() {
        let m = StageMetrics::new(2);
        m.increment("a_total", 1);
        m.increment("a_total", 2);
        m.set_gauge("depth", 3.0);
        m.increment("third", 1);
        m.set_gauge("depth", f64::NAN);
        let s = m.snapshot();
        assert_eq!(s.counters["a_total"], 3);
        assert_eq!(s.gauges["depth"], 3.0);
        assert_eq!(s.metric_names_dropped, 1);
        let m = StageMetrics::new(10);
        m.increment("Bad-Name", 1);
        m.increment("", 1);
        m.increment(&"x".repeat(65), 1);
        assert_eq!(m.snapshot().metric_names_dropped, 3);
    }
}
