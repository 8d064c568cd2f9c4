//! The agent's recent log lines and its log level, as remote commands see them.
//!
//! [`init`] installs the process's tracing subscriber: the filter (behind a reload handle, so a
//! command can change it for a while), the stderr format, and a second, plain-text format whose
//! lines go into a bounded [`LogRing`] (at most [`RING_LINES`] lines and [`RING_BYTES`] bytes,
//! oldest dropped first) and to live followers (a broadcast channel that never blocks the
//! writer: a follower that lags loses lines and is told how many).
//!
//! The subscriber is global, so the handle is too ([`installed`]): the binary calls [`init`];
//! a process that embeds the agent library and logs its own way (a fleet simulator) does not,
//! and its agents then answer log commands with "not captured in this process".

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::broadcast;

/// Most lines the ring keeps.
pub const RING_LINES: usize = 2000;
/// Most bytes of text the ring keeps.
pub const RING_BYTES: usize = 512 * 1024;
/// Longest line kept; the rest is cut (a log line is not a data path).
pub const MAX_LINE_BYTES: usize = 4096;
/// Lines a follower may be behind before it loses some.
const FOLLOW_CAPACITY: usize = 1024;

/// Recent lines, bounded by count and bytes.
#[derive(Debug, Default)]
pub struct LogRing {
    lines: VecDeque<String>,
    bytes: usize,
    /// Lines pushed out since start.
    evicted: u64,
}

impl LogRing {
    pub fn push(&mut self, line: String) {
        self.bytes += line.len();
        self.lines.push_back(line);
        while self.lines.len() > RING_LINES || self.bytes > RING_BYTES {
            match self.lines.pop_front() {
                Some(old) => {
                    self.bytes -= old.len();
                    self.evicted += 1;
                }
                None => break,
            }
        }
    }

    /// The last `n` lines (oldest first), and how many lines written since start are not in
    /// them because the ring no longer holds them.
    pub fn last(&self, n: usize) -> (Vec<String>, u64) {
        let skip = self.lines.len().saturating_sub(n);
        (
            self.lines.iter().skip(skip).cloned().collect(),
            self.evicted,
        )
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Changes the process's log filter; `Err` names why the directive was refused.
type Reload = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The process's log capture and level control.
pub struct LogControl {
    ring: Mutex<LogRing>,
    follow: broadcast::Sender<Arc<str>>,
    reload: Reload,
    /// The filter the process started with, which an override returns to.
    base: String,
    /// The filter in force now.
    current: Mutex<String>,
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

static INSTALLED: OnceLock<Arc<LogControl>> = OnceLock::new();

/// The capture [`init`] installed in this process, if any.
pub fn installed() -> Option<Arc<LogControl>> {
    INSTALLED.get().cloned()
}

impl LogControl {
    /// A control over `reload`, starting at filter `base`.
    pub fn new(base: String, reload: Reload) -> LogControl {
        LogControl {
            ring: Mutex::new(LogRing::default()),
            follow: broadcast::channel(FOLLOW_CAPACITY).0,
            reload,
            current: Mutex::new(base.clone()),
            base,
        }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, LogRing> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records one formatted line (called by the tracing layer's writer).
    pub fn record(&self, line: &str) {
        let mut line = line.trim_end().to_owned();
        if line.len() > MAX_LINE_BYTES {
            let mut cut = MAX_LINE_BYTES;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
        }
        // Nobody following is the normal case: the send error only says so.
        let _ = self.follow.send(Arc::from(line.as_str()));
        self.ring().push(line);
    }

    pub fn last(&self, n: usize) -> (Vec<String>, u64) {
        self.ring().last(n)
    }

    /// A receiver of every line recorded from now on.
    pub fn follow(&self) -> broadcast::Receiver<Arc<str>> {
        self.follow.subscribe()
    }

    /// The filter the process started with.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sets the filter; `Err` names why `directive` was refused (the filter stays).
    pub fn set(&self, directive: &str) -> Result<(), String> {
        (self.reload)(directive)?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = directive.to_owned();
        Ok(())
    }
}

/// Log format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Human,
    Json,
}

/// Installs the global subscriber (filter from `RUST_LOG`, else `info`) with the capture;
/// see the module docs. Call once, from the binary.
pub fn init(format: Format) {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, fmt, reload};

    let base = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| EnvFilter::try_new(v).is_ok())
        .unwrap_or_else(|| "info".to_owned());
    let (filter, handle) = reload::Layer::new(EnvFilter::new(&base));
    let control = Arc::new(LogControl::new(
        base,
        Box::new(move |directive| {
            let f = EnvFilter::try_new(directive)
                .map_err(|e| format!("log filter {directive:?}: {e}"))?;
            handle
                .reload(f)
                .map_err(|e| format!("cannot change the log filter: {e}"))
        }),
    ));
    let stderr = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let stderr = match format {
        Format::Human => stderr.boxed(),
        Format::Json => stderr.json().flatten_event(true).boxed(),
    };
    let capture = fmt::layer()
        .with_ansi(false)
        .with_writer(RingWriter(control.clone()));
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .with(capture)
        .try_init()
        .is_ok();
    if installed {
        let _ = INSTALLED.set(control);
    }
}

/// Makes a [`LineWriter`] per event.
struct RingWriter(Arc<LogControl>);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RingWriter {
    type Writer = LineWriter;
    fn make_writer(&'a self) -> LineWriter {
        LineWriter {
            control: self.0.clone(),
            buf: Vec::new(),
        }
    }
}

/// Collects one formatted event and records it when dropped.
struct LineWriter {
    control: Arc<LogControl>,
    buf: Vec<u8>,
}

impl std::io::Write for LineWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() < MAX_LINE_BYTES * 2 {
            self.buf.extend_from_slice(bytes);
        }
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.control.record(&String::from_utf8_lossy(&self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_lines_within_its_bounds() {
        let mut ring = LogRing::default();
        for i in 0..RING_LINES + 10 {
            ring.push(format!("line {i}"));
        }
        assert_eq!(ring.len(), RING_LINES);
        let (lines, evicted) = ring.last(3);
        assert_eq!(
            lines,
            [
                format!("line {}", RING_LINES + 7),
                format!("line {}", RING_LINES + 8),
                format!("line {}", RING_LINES + 9)
            ]
        );
        assert_eq!(evicted, 10);
        let mut ring = LogRing::default();
        for _ in 0..10 {
            ring.push("x".repeat(RING_BYTES / 4));
        }
        assert!(ring.bytes() <= RING_BYTES);
        assert_eq!(ring.len(), 4);
        assert_eq!(ring.last(100).0.len(), 4);
    }

    #[test]
    fn lines_are_cut_followers_see_them_and_a_bad_filter_is_refused() {
        let control = LogControl::new(
            "info".into(),
            Box::new(|d: &str| {
                if d.contains('!') {
                    Err(format!("bad {d}"))
                } else {
                    Ok(())
                }
            }),
        );
        let mut rx = control.follow();
        control.record(&"é".repeat(MAX_LINE_BYTES));
        let got = rx.try_recv().expect("a follower sees the line");
        assert!(got.len() <= MAX_LINE_BYTES);
        assert_eq!(control.last(5).0.len(), 1);
        assert!(control.set("debug").is_ok());
        assert_eq!(control.current(), "debug");
        assert_eq!(control.set("de!bug"), Err("bad de!bug".into()));
        assert_eq!(control.current(), "debug");
        assert_eq!(control.base(), "info");
    }
}
