//! Host import `log`: a module's log lines go to `tracing`, tagged with the stage, module
//! name and digest, truncated, and rate-limited by a token bucket (dropped lines are counted
//! and summarised once lines flow again). The module's stdout/stderr lines (see
//! [`super::wasi`]) go through the same [`LogSink`], so printing cannot bypass the limit.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use wasmtime::component::{HasData, Linker};

use super::HostState;
use crate::bindings::edge::pipeline::log as wit;
use crate::metrics::StageMetrics;

/// Where a module's log lines go: tags, rate limit and truncation, shared by the `log`
/// import and the captured stdout/stderr of one instance.
pub(crate) struct LogSink {
    stage: String,
    module: String,
    digest: String,
    max_line: usize,
    metrics: Arc<StageMetrics>,
    bucket: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
    dropped_since_last: u64,
}

impl Bucket {
    fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Level of a line, ours rather than the generated enum so stdout/stderr can use it too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl LogSink {
    pub(crate) fn new(
        stage: &str,
        module: &crate::ModuleId,
        lines_per_s: u32,
        burst: u32,
        max_line: usize,
        metrics: Arc<StageMetrics>,
    ) -> Self {
        let burst = f64::from(burst.max(1));
        LogSink {
            stage: stage.to_owned(),
            module: module.name().to_owned(),
            digest: module.short_digest().to_owned(),
            max_line,
            metrics,
            bucket: Mutex::new(Bucket {
                tokens: burst,
                rate: f64::from(lines_per_s),
                burst,
                last: Instant::now(),
                dropped_since_last: 0,
            }),
        }
    }

    /// Writes one line if the rate limit allows; otherwise counts it as dropped.
    pub(crate) fn line(&self, level: Level, message: &str) {
        // Levels the subscriber would filter cost nothing more (and use no tokens).
        let enabled = match level {
            Level::Trace => {
                tracing::enabled!(target: "edge_agent::sandbox::guest", tracing::Level::TRACE)
            }
            Level::Debug => {
                tracing::enabled!(target: "edge_agent::sandbox::guest", tracing::Level::DEBUG)
            }
            Level::Info => {
                tracing::enabled!(target: "edge_agent::sandbox::guest", tracing::Level::INFO)
            }
            Level::Warn => {
                tracing::enabled!(target: "edge_agent::sandbox::guest", tracing::Level::WARN)
            }
            Level::Error => {
                tracing::enabled!(target: "edge_agent::sandbox::guest", tracing::Level::ERROR)
            }
        };
        if !enabled {
            return;
        }
        let (allowed, dropped_before) = {
            let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
            if b.take(Instant::now()) {
                (true, std::mem::take(&mut b.dropped_since_last))
            } else {
                b.dropped_since_last += 1;
                (false, 0)
            }
        };
        self.metrics.record_log(allowed);
        if !allowed {
            return;
        }
        let (stage, module, digest) = (&self.stage, &self.module, &self.digest);
        if dropped_before > 0 {
            tracing::warn!(
                target: "edge_agent::sandbox::guest",
                stage = %stage, module = %module, digest = %digest, dropped = dropped_before,
                "module log rate-limited; lines dropped"
            );
        }
        let msg = truncate(message, self.max_line);
        match level {
            Level::Trace => {
                tracing::trace!(target: "edge_agent::sandbox::guest", stage = %stage, module = %module, digest = %digest, "{msg}")
            }
            Level::Debug => {
                tracing::debug!(target: "edge_agent::sandbox::guest", stage = %stage, module = %module, digest = %digest, "{msg}")
            }
            Level::Info => {
                tracing::info!(target: "edge_agent::sandbox::guest", stage = %stage, module = %module, digest = %digest, "{msg}")
            }
            Level::Warn => {
                tracing::warn!(target: "edge_agent::sandbox::guest", stage = %stage, module = %module, digest = %digest, "{msg}")
            }
            Level::Error => {
                tracing::error!(target: "edge_agent::sandbox::guest", stage = %stage, module = %module, digest = %digest, "{msg}")
            }
        }
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary, with
/// a marker when something was cut.
pub(crate) fn truncate(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}... ({} bytes cut)", &s[..end], s.len() - end))
}

/// The `log` import of one instance.
pub(crate) struct LogUnit {
    pub(crate) sink: Arc<LogSink>,
}

impl wit::Host for LogUnit {
    fn log(&mut self, level: wit::Level, message: String) {
        let level = match level {
            wit::Level::Trace => Level::Trace,
            wit::Level::Debug => Level::Debug,
            wit::Level::Info => Level::Info,
            wit::Level::Warn => Level::Warn,
            wit::Level::Error => Level::Error,
        };
        self.sink.line(level, &message);
    }
}

struct HasLog;

impl HasData for HasLog {
    type Data<'a> = &'a mut LogUnit;
}

pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    wit::add_to_linker::<HostState, HasLog>(linker, |s| &mut s.log)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = Bucket {
            tokens: 3.0,
            rate: 2.0,
            burst: 3.0,
            last: t0,
            dropped_since_last: 0,
        };
        assert!((0..3).all(|_| b.take(t0)));
        assert!(!b.take(t0));
        assert!(b.take(t0 + Duration::from_millis(500)));
        assert!(!b.take(t0 + Duration::from_millis(600)));
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(100);
        assert_eq!((0..10).filter(|_| b.take(later)).count(), 3);
    }

    #[test]
    fn truncate_keeps_char_boundaries() {
        assert_eq!(truncate("abc", 5), "abc");
        let t = truncate("ééé", 3);
        assert!(t.starts_with('é') && t.contains("cut"), "{t}");
    }
}
