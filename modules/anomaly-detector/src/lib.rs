//! `anomaly-detector` pipeline stage: watches numeric features in JSON frames (e.g. the
//! `feature-extractor` output) and emits an alert frame when one leaves its normal range.
//!
//! Per (input stream, feature key) it keeps an EWMA mean and variance and alerts on a
//! z-score or absolute-limit crossing, once per episode (hysteresis) and at most once per
//! cooldown. Frames that raise nothing produce no output. The rolling state is saved in
//! the host's `kv` so a restart or instance replacement keeps the learned baseline;
//! alerts and problems are counted through `counters`.
//!
//! [`detector`] holds the logic (pure, unit-tested); this file is config, kv persistence
//! and frame plumbing.

pub mod detector;

use detector::{Cleared, Detector, Finding, Limits, STATE_VERSION, Settings, State};
use edge_guest::{Frame, Guest, Payload, config, counters, kv, payload_kind};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::BTreeMap;

/// kv key holding the serialized [`State`].
const STATE_KEY: &str = "anomaly-detector/state";

/// Stage configuration (JSON object text, see `modules/README.md`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Stream name of alert frames.
    #[serde(default = "default_stream")]
    stream: String,
    /// Feature keys to watch (dotted paths, e.g. `rms`, `bands.3`); empty: all numeric leaves.
    #[serde(default)]
    features: Vec<String>,
    /// |z| that raises an alert; 0 disables z-scores (absolute limits only).
    #[serde(default = "default_z")]
    z_threshold: f64,
    /// |z| under which an anomaly ends; default 0.75 x z_threshold.
    #[serde(default)]
    clear_z: Option<f64>,
    /// EWMA weight of each new value, in (0, 1]: about 2/alpha values of memory.
    #[serde(default = "default_alpha")]
    alpha: f64,
    /// Values per key before z-scores count.
    #[serde(default = "default_warmup")]
    warmup: u32,
    /// Minimum milliseconds (frame time) between alerts for the same key.
    #[serde(default = "default_cooldown")]
    cooldown_ms: u64,
    /// Floor for the standard deviation used in z-scores.
    #[serde(default = "default_min_std")]
    min_std: f64,
    /// Keep anomalous values out of the statistics.
    #[serde(default)]
    freeze_on_anomaly: bool,
    /// Also emit a `cleared` frame when an alerted anomaly ends.
    #[serde(default)]
    emit_clear: bool,
    /// Absolute limits per key: `{ "rms": { "max": 2.5 } }`.
    #[serde(default)]
    limits: BTreeMap<String, Limits>,
    /// Most (stream, key) pairs tracked; bounds memory and the persisted state.
    #[serde(default = "default_max_keys")]
    max_keys: u32,
    /// Save state to kv every this many frames (alerts and clears always save).
    #[serde(default = "default_persist_every")]
    persist_every: u32,
}

fn default_stream() -> String {
    "alerts".into()
}
fn default_z() -> f64 {
    4.0
}
fn default_alpha() -> f64 {
    0.05
}
fn default_warmup() -> u32 {
    30
}
fn default_cooldown() -> u64 {
    60_000
}
fn default_min_std() -> f64 {
    1e-6
}
fn default_max_keys() -> u32 {
    256
}
fn default_persist_every() -> u32 {
    1
}

const MAX_KEYS_LIMIT: u32 = 4096;

/// Parses and validates the config into detector settings plus stage options.
fn settings_from_config(text: &str) -> Result<(Settings, Options), String> {
    let c: Config = config::parse(text)?;
    let finite_pos = |v: f64| v.is_finite() && v > 0.0;
    if c.stream.is_empty() {
        return Err(config::invalid("stream", "must not be empty"));
    }
    if !(c.z_threshold.is_finite() && c.z_threshold >= 0.0) {
        return Err(config::invalid(
            "z_threshold",
            format!("must be 0 (off) or positive, got {}", c.z_threshold),
        ));
    }
    let clear_z = c.clear_z.unwrap_or(0.75 * c.z_threshold);
    if !(clear_z.is_finite() && clear_z >= 0.0 && clear_z <= c.z_threshold) {
        return Err(config::invalid(
            "clear_z",
            format!(
                "must be between 0 and z_threshold ({}), got {clear_z}",
                c.z_threshold
            ),
        ));
    }
    if !(finite_pos(c.alpha) && c.alpha <= 1.0) {
        return Err(config::invalid(
            "alpha",
            format!("must be in (0, 1], got {}", c.alpha),
        ));
    }
    if !(c.min_std.is_finite() && c.min_std >= 0.0) {
        return Err(config::invalid(
            "min_std",
            format!("must be zero or positive, got {}", c.min_std),
        ));
    }
    if !(1..=MAX_KEYS_LIMIT).contains(&c.max_keys) {
        return Err(config::invalid(
            "max_keys",
            format!("must be between 1 and {MAX_KEYS_LIMIT}, got {}", c.max_keys),
        ));
    }
    if c.persist_every == 0 {
        return Err(config::invalid("persist_every", "must be at least 1"));
    }
    if let Some(f) = c.features.iter().find(|f| f.is_empty()) {
        return Err(config::invalid(
            "features",
            format!("empty feature key {f:?}"),
        ));
    }
    for (key, l) in &c.limits {
        let name = format!("limits.{key}");
        if l.min.is_none() && l.max.is_none() {
            return Err(config::invalid(&name, "set min, max or both"));
        }
        if l.min.is_some_and(|v| !v.is_finite()) || l.max.is_some_and(|v| !v.is_finite()) {
            return Err(config::invalid(&name, "limits must be finite numbers"));
        }
        // (No let-chains: they need Rust 1.88 and the workspace promises 1.85.)
        if let (Some(min), Some(max)) = (l.min, l.max) {
            if min > max {
                return Err(config::invalid(
                    &name,
                    format!("min {min} exceeds max {max}"),
                ));
            }
        }
        if !c.features.is_empty() && !c.features.contains(key) {
            return Err(config::invalid(
                &name,
                format!("`{key}` is not in features, so it is never checked"),
            ));
        }
    }
    if c.z_threshold == 0.0 && c.limits.is_empty() {
        return Err(config::invalid(
            "z_threshold",
            "is 0 and no limits are set: nothing would ever alert",
        ));
    }
    let settings = Settings {
        features: c.features,
        alpha: c.alpha,
        z_threshold: c.z_threshold,
        clear_z,
        warmup: u64::from(c.warmup),
        cooldown_ms: c.cooldown_ms,
        min_std: c.min_std,
        freeze_on_anomaly: c.freeze_on_anomaly,
        limits: c.limits,
        max_keys: c.max_keys as usize,
    };
    Ok((
        settings,
        Options {
            stream: c.stream,
            emit_clear: c.emit_clear,
            persist_every: c.persist_every,
        },
    ))
}

/// Stage options outside the detector core.
#[derive(Debug, Clone)]
struct Options {
    stream: String,
    emit_clear: bool,
    persist_every: u32,
}

/// Alert document (`kind` = `anomaly`) or clear document (`kind` = `cleared`).
#[derive(Serialize)]
struct AlertJson<'a> {
    kind: &'static str,
    source_stream: &'a str,
    timestamp_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    findings: Option<&'a [Finding]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cleared: Option<&'a [Cleared]>,
    labels: BTreeMap<&'a str, &'a str>,
}

/// Counter deltas for one frame, applied by the component glue (natively untestable).
#[derive(Debug, Default, PartialEq)]
pub struct Counts {
    pub alerts: u64,
    pub findings: u64,
    pub cleared: u64,
    pub suppressed: u64,
    pub missing: u64,
    pub untracked: u64,
}

/// The stage: detector plus output options. Pure: persistence and counters are the
/// caller's job ([`Stage::should_persist`], [`Counts`]).
#[derive(Debug)]
pub struct Stage {
    detector: Detector,
    options: Options,
    since_persist: u32,
}

impl Stage {
    /// Builds the stage from config text and previously persisted state bytes (if any).
    /// Returns a warning when the persisted state could not be used.
    pub fn new(
        config_text: &str,
        persisted: Option<&[u8]>,
    ) -> Result<(Self, Option<String>), String> {
        let (settings, options) = settings_from_config(config_text)?;
        let (state, warning) = match persisted.map(serde_json::from_slice::<State>) {
            None => (State::default(), None),
            Some(Ok(s)) if s.v == STATE_VERSION => (s, None),
            Some(Ok(s)) => (
                State::default(),
                Some(format!(
                    "discarding saved state of version {} (expected {STATE_VERSION})",
                    s.v
                )),
            ),
            Some(Err(e)) => (
                State::default(),
                Some(format!("discarding unreadable saved state: {e}")),
            ),
        };
        Ok((
            Self {
                detector: Detector::new(settings, state),
                options,
                since_persist: 0,
            },
            warning,
        ))
    }

    /// Runs one frame through the detector; returns alert frames and counter deltas.
    pub fn process(&mut self, frame: &Frame) -> Result<(Vec<Frame>, Counts), String> {
        let Payload::Json(text) = &frame.payload else {
            return Err(format!(
                "expected a json payload, got {}",
                payload_kind(&frame.payload)
            ));
        };
        let doc: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("invalid json payload: {e}"))?;
        let outcome = self.detector.observe(
            &frame.stream,
            frame.timestamp_ms,
            &detector::numeric_leaves(&doc),
        );
        self.since_persist += 1;

        let labels: BTreeMap<&str, &str> = frame
            .meta
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut out = Vec::new();
        let mut emit = |kind, findings, cleared| -> Result<(), String> {
            let doc = AlertJson {
                kind,
                source_stream: &frame.stream,
                timestamp_ms: frame.timestamp_ms,
                findings,
                cleared,
                labels: labels.clone(),
            };
            let text = serde_json::to_string(&doc).map_err(|e| format!("encoding alert: {e}"))?;
            let mut meta = frame.meta.clone();
            meta.push(("source_stream".into(), frame.stream.clone()));
            out.push(Frame {
                stream: self.options.stream.clone(),
                timestamp_ms: frame.timestamp_ms,
                payload: Payload::Json(text),
                meta,
            });
            Ok(())
        };
        if !outcome.alerts.is_empty() {
            emit("anomaly", Some(&outcome.alerts[..]), None)?;
        }
        if self.options.emit_clear && !outcome.cleared.is_empty() {
            emit("cleared", None, Some(&outcome.cleared[..]))?;
        }
        let counts = Counts {
            alerts: u64::from(!outcome.alerts.is_empty()),
            findings: outcome.alerts.len() as u64,
            cleared: outcome.cleared.len() as u64,
            suppressed: outcome.suppressed,
            missing: outcome.missing,
            untracked: outcome.untracked,
        };
        if !outcome.alerts.is_empty() || !outcome.cleared.is_empty() {
            // Episode changes must survive a restart, or the next instance re-alerts.
            self.since_persist = self.since_persist.max(self.options.persist_every);
        }
        Ok((out, counts))
    }

    /// Whether the state is due to be saved; call [`Stage::persisted`] after saving.
    pub fn should_persist(&self) -> bool {
        self.since_persist >= self.options.persist_every
    }

    /// Serialized state for kv.
    pub fn state_bytes(&self) -> Result<Vec<u8>, String> {
        serde_json::to_vec(self.detector.state()).map_err(|e| format!("encoding state: {e}"))
    }

    pub fn persisted(&mut self) {
        self.since_persist = 0;
    }

    pub fn tracked(&self) -> usize {
        self.detector.tracked()
    }
}

thread_local! {
    // A component instance is single-threaded; the host calls init before process.
    static STAGE: RefCell<Option<Stage>> = const { RefCell::new(None) };
    // Log kv failures once per failure streak, not once per frame.
    static KV_FAILING: RefCell<bool> = const { RefCell::new(false) };
}

struct Component;

impl Guest for Component {
    fn init(config: String) -> Result<(), String> {
        let saved = match kv::get(STATE_KEY) {
            Ok(v) => v,
            Err(e) => {
                // Start with a fresh baseline rather than not at all: alerts after warm-up
                // are better than none.
                edge_guest::warn(&format!("reading state {STATE_KEY}: {}", kv_error(&e)));
                counters::increment("kv_errors_total", 1);
                None
            }
        };
        let (stage, warning) = Stage::new(&config, saved.as_deref())?;
        if let Some(w) = warning {
            edge_guest::warn(&w);
        }
        counters::set_gauge("tracked_features", stage.tracked() as f64);
        STAGE.with(|s| *s.borrow_mut() = Some(stage));
        Ok(())
    }

    fn process(frame: Frame) -> Result<Vec<Frame>, String> {
        STAGE.with(|s| {
            let mut guard = s.borrow_mut();
            let stage = guard.as_mut().ok_or("process called before init")?;
            let (out, counts) = stage.process(&frame)?;
            for (name, n) in [
                ("alerts_total", counts.alerts),
                ("findings_total", counts.findings),
                ("cleared_total", counts.cleared),
                ("suppressed_total", counts.suppressed),
                ("missing_features_total", counts.missing),
                ("untracked_features_total", counts.untracked),
            ] {
                if n > 0 {
                    counters::increment(name, n);
                }
            }
            counters::set_gauge("tracked_features", stage.tracked() as f64);
            if stage.should_persist() {
                save(stage);
            }
            Ok(out)
        })
    }
}

/// Saves the state; a failure is logged and counted but does not fail the frame: detection
/// goes on and the next save retries.
fn save(stage: &mut Stage) {
    let result = stage
        .state_bytes()
        .and_then(|bytes| kv::set(STATE_KEY, &bytes).map_err(|e| kv_error(&e)));
    let was_failing = KV_FAILING.with(|f| f.replace(result.is_err()));
    match result {
        Ok(()) => {
            stage.persisted();
            if was_failing {
                edge_guest::info(&format!("saving state {STATE_KEY} works again"));
            }
        }
        Err(e) => {
            counters::increment("kv_errors_total", 1);
            if !was_failing {
                edge_guest::warn(&format!("saving state {STATE_KEY}: {e}"));
            }
        }
    }
}

fn kv_error(e: &kv::Error) -> String {
    match e {
        kv::Error::InvalidKey(m) => format!("invalid key: {m}"),
        kv::Error::QuotaExceeded(m) => format!("quota exceeded: {m}"),
        kv::Error::Unavailable(m) => format!("store unavailable: {m}"),
    }
}

edge_guest::export_stage!(Component);

#[cfg(test)]
mod tests {
    use super::*;

    fn features(ts: u64, rms: f64) -> Frame {
        let mut f = Frame::new(
            "vibration/motor-1",
            ts,
            Payload::Json(format!(r#"{{"rms": {rms}, "bands": [0.1, 0.2]}}"#)),
        );
        f.meta.push(("sensor".into(), "imu0".into()));
        f
    }

    #[test]
    fn alert_frame_shape() {
        let (mut s, w) = Stage::new(
            r#"{"features": ["rms"], "warmup": 5, "stream": "alerts/motor"}"#,
            None,
        )
        .unwrap();
        assert!(w.is_none());
        for i in 0..20 {
            let (out, _) = s
                .process(&features(i * 10, 1.0 + (i % 2) as f64 * 0.01))
                .unwrap();
            assert!(out.is_empty());
        }
        let (out, counts) = s.process(&features(1_000, 9.0)).unwrap();
        assert_eq!(
            counts,
            Counts {
                alerts: 1,
                findings: 1,
                ..Counts::default()
            }
        );
        assert_eq!(out.len(), 1);
        let f = &out[0];
        assert_eq!(f.stream, "alerts/motor");
        assert_eq!(f.timestamp_ms, 1_000);
        assert_eq!(f.label("source_stream"), Some("vibration/motor-1"));
        let Payload::Json(text) = &f.payload else {
            panic!()
        };
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(v["kind"], "anomaly");
        assert_eq!(v["labels"]["sensor"], "imu0");
        assert_eq!(v["findings"][0]["feature"], "rms");
        assert_eq!(v["findings"][0]["reason"], "z_score");
        assert!(s.should_persist());
    }

    #[test]
    fn restart_from_persisted_state_keeps_baseline() {
        let cfg = r#"{"warmup": 5, "features": ["rms"]}"#;
        let (mut s, _) = Stage::new(cfg, None).unwrap();
        for i in 0..20 {
            s.process(&features(i, 1.0 + (i % 2) as f64 * 0.01))
                .unwrap();
        }
        let saved = s.state_bytes().unwrap();
        let (mut s2, w) = Stage::new(cfg, Some(&saved)).unwrap();
        assert!(w.is_none());
        assert_eq!(s2.process(&features(100, 9.0)).unwrap().0.len(), 1);
    }

    #[test]
    fn unusable_saved_state_is_a_warning_not_an_error() {
        let (_, w) = Stage::new("", Some(b"not json")).unwrap();
        assert!(w.unwrap().contains("unreadable"));
        let (_, w) = Stage::new("", Some(br#"{"v": 99, "streams": {}}"#)).unwrap();
        assert!(w.unwrap().contains("version 99"));
    }

    #[test]
    fn clear_frames_when_enabled() {
        let cfg = r#"{"emit_clear": true, "limits": {"rms": {"max": 2.0}}}"#;
        let (mut s, _) = Stage::new(cfg, None).unwrap();
        assert_eq!(s.process(&features(0, 3.0)).unwrap().0.len(), 1);
        let (out, counts) = s.process(&features(1, 1.0)).unwrap();
        assert_eq!(counts.cleared, 1);
        let Payload::Json(text) = &out[0].payload else {
            panic!()
        };
        assert!(text.contains(r#""kind":"cleared""#), "{text}");
    }

    #[test]
    fn persist_every_n_frames() {
        let (mut s, _) = Stage::new(r#"{"persist_every": 3}"#, None).unwrap();
        s.process(&features(0, 1.0)).unwrap();
        s.process(&features(1, 1.0)).unwrap();
        assert!(!s.should_persist());
        s.process(&features(2, 1.0)).unwrap();
        assert!(s.should_persist());
        s.persisted();
        assert!(!s.should_persist());
    }

    #[test]
    fn config_errors_name_the_key() {
        for (cfg, key) in [
            (r#"{"alpha": 0}"#, "alpha:"),
            (r#"{"alpha": "x"}"#, "alpha:"),
            (r#"{"z_threshold": 3, "clear_z": 4}"#, "clear_z:"),
            (
                r#"{"limits": {"rms": {"min": 3, "max": 1}}}"#,
                "limits.rms:",
            ),
            (r#"{"limits": {"rms": {}}}"#, "limits.rms:"),
            (
                r#"{"limits": {"rms": {"maximum": 1}}}"#,
                "limits.rms.maximum:",
            ),
            (
                r#"{"features": ["peak"], "limits": {"rms": {"max": 1}}}"#,
                "limits.rms:",
            ),
            (r#"{"max_keys": 0}"#, "max_keys:"),
            (r#"{"persist_every": 0}"#, "persist_every:"),
            (r#"{"z_threshold": 0}"#, "z_threshold:"),
            (r#"{"stream": ""}"#, "stream:"),
        ] {
            let e = Stage::new(cfg, None).unwrap_err();
            assert!(e.starts_with(key), "{cfg}: {e}");
        }
        assert!(
            Stage::new(r#"{"treshold": 1}"#, None)
                .unwrap_err()
                .contains("treshold")
        );
    }

    #[test]
    fn rejects_non_json_frames() {
        let (mut s, _) = Stage::new("", None).unwrap();
        assert!(
            s.process(&Frame::new("x", 0, Payload::Samples(vec![])))
                .unwrap_err()
                .contains("got samples")
        );
        assert!(
            s.process(&Frame::new("x", 0, Payload::Json("{".into())))
                .unwrap_err()
                .contains("invalid json")
        );
    }
}
