//! The detection core: per-(stream, feature) rolling statistics, thresholds, hysteresis and
//! cooldown. No I/O: the stage feeds it values and a timestamp and persists [`State`]
//! itself, so all of it is unit-tested natively.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Version of the persisted [`State`] layout; state with another version is discarded.
pub const STATE_VERSION: u32 = 1;

/// Absolute limits for one feature; either bound may be absent.
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Alert when the value is below this.
    pub min: Option<f64>,
    /// Alert when the value is above this.
    pub max: Option<f64>,
}

/// Detection settings, validated by the stage's config parser.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Keys to watch; empty watches every numeric leaf of the input document.
    pub features: Vec<String>,
    /// EWMA weight of a new value, in (0, 1].
    pub alpha: f64,
    /// |z| at or above which a value is anomalous; 0 disables z-scores (limits only).
    pub z_threshold: f64,
    /// |z| below which an active anomaly clears (hysteresis), `<= z_threshold`.
    pub clear_z: f64,
    /// Values seen before z-scores are trusted.
    pub warmup: u64,
    /// Minimum time between two alerts for the same key, in frame-time milliseconds.
    pub cooldown_ms: u64,
    /// Floor for the standard deviation, so a nearly constant feature does not divide by ~0.
    pub min_std: f64,
    /// Leave the statistics untouched by anomalous values (else the baseline adapts to a
    /// lasting shift and the anomaly eventually clears).
    pub freeze_on_anomaly: bool,
    /// Absolute limits per key.
    pub limits: BTreeMap<String, Limits>,
    /// Most (stream, feature) pairs tracked at once; further keys are ignored.
    pub max_keys: usize,
}

/// Rolling state of one feature of one stream.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct KeyState {
    /// Values folded into the statistics.
    pub n: u64,
    pub mean: f64,
    pub var: f64,
    /// Inside an anomaly episode (set when triggered, cleared by hysteresis).
    pub active: bool,
    /// This episode raised an alert (it may have been suppressed by cooldown).
    pub alerted: bool,
    /// Frame time of the last alert for this key.
    pub last_alert_ms: Option<u64>,
}

/// Everything the detector remembers; what the stage persists in kv.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub v: u32,
    /// stream -> feature key -> state.
    pub streams: BTreeMap<String, BTreeMap<String, KeyState>>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            v: STATE_VERSION,
            streams: BTreeMap::new(),
        }
    }
}

/// Why a value was anomalous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    ZScore,
    AboveMax,
    BelowMin,
}

/// One anomalous feature, as reported in an alert.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    pub feature: String,
    pub value: f64,
    pub reason: Reason,
    /// The threshold crossed: |z| threshold, or the min/max limit.
    pub limit: f64,
    /// z-score against the statistics before this value; absent during warm-up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub z: Option<f64>,
    pub mean: f64,
    pub std: f64,
}

/// A feature whose anomaly ended (only for episodes that alerted).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cleared {
    pub feature: String,
    pub value: f64,
}

/// Result of one observation.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    /// Features that started an anomaly episode and are not in cooldown.
    pub alerts: Vec<Finding>,
    /// Features whose alerted episode ended.
    pub cleared: Vec<Cleared>,
    /// Episodes that started inside the cooldown and raised no alert.
    pub suppressed: u64,
    /// Configured features absent from (or not numeric in) the input.
    pub missing: u64,
    /// New keys ignored because `max_keys` are already tracked.
    pub untracked: u64,
}

/// The detector: settings plus state.
#[derive(Debug, Clone)]
pub struct Detector {
    settings: Settings,
    state: State,
    tracked: usize,
}

impl Detector {
    /// Starts from `state` (persisted earlier, or the default).
    pub fn new(settings: Settings, state: State) -> Self {
        let tracked = state.streams.values().map(BTreeMap::len).sum();
        Self {
            settings,
            state,
            tracked,
        }
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Number of (stream, feature) pairs with state.
    pub fn tracked(&self) -> usize {
        self.tracked
    }

    /// Observes the numeric leaves of one input document (see [`numeric_leaves`]).
    pub fn observe(
        &mut self,
        stream: &str,
        timestamp_ms: u64,
        leaves: &[(String, f64)],
    ) -> Outcome {
        let mut out = Outcome::default();
        let selected: Vec<(&str, f64)> = if self.settings.features.is_empty() {
            leaves.iter().map(|(k, v)| (k.as_str(), *v)).collect()
        } else {
            self.settings
                .features
                .iter()
                .filter_map(|f| match leaves.iter().find(|(k, _)| k == f) {
                    Some((_, v)) => Some((f.as_str(), *v)),
                    None => {
                        out.missing += 1;
                        None
                    }
                })
                .collect()
        };
        for (key, value) in selected {
            if !value.is_finite() {
                out.missing += 1;
                continue;
            }
            let known = self
                .state
                .streams
                .get(stream)
                .is_some_and(|m| m.contains_key(key));
            if !known && self.tracked >= self.settings.max_keys {
                out.untracked += 1;
                continue;
            }
            if !known {
                self.tracked += 1;
            }
            let ks = self
                .state
                .streams
                .entry(stream.to_owned())
                .or_default()
                .entry(key.to_owned())
                .or_default();
            step(&self.settings, key, ks, value, timestamp_ms, &mut out);
        }
        out
    }
}

/// One value of one key: evaluate against the current statistics, run the episode state
/// machine, then fold the value in.
fn step(s: &Settings, key: &str, ks: &mut KeyState, value: f64, ts: u64, out: &mut Outcome) {
    let std = ks.var.max(0.0).sqrt().max(s.min_std);
    let warm = ks.n >= s.warmup.max(1);
    let z = warm.then(|| (value - ks.mean) / std);
    let limits = s.limits.get(key).copied().unwrap_or_default();

    let mut trigger: Option<(Reason, f64)> = None;
    if let Some(max) = limits.max.filter(|&m| value > m) {
        trigger = Some((Reason::AboveMax, max));
    } else if let Some(min) = limits.min.filter(|&m| value < m) {
        trigger = Some((Reason::BelowMin, min));
    } else if z.is_some_and(|z| s.z_threshold > 0.0 && z.abs() >= s.z_threshold) {
        trigger = Some((Reason::ZScore, s.z_threshold));
    }

    match (ks.active, trigger) {
        (false, Some((reason, limit))) => {
            ks.active = true;
            let cooled = ks
                .last_alert_ms
                .is_none_or(|last| ts.saturating_sub(last) >= s.cooldown_ms);
            ks.alerted = cooled;
            if cooled {
                ks.last_alert_ms = Some(ts);
                out.alerts.push(Finding {
                    feature: key.to_owned(),
                    value,
                    reason,
                    limit,
                    z,
                    mean: ks.mean,
                    std,
                });
            } else {
                out.suppressed += 1;
            }
        }
        (true, None) => {
            // Hysteresis: inside the limits is not enough, |z| must also fall below clear_z.
            let calm = z.is_none_or(|z| s.z_threshold <= 0.0 || z.abs() < s.clear_z);
            if calm {
                ks.active = false;
                if std::mem::take(&mut ks.alerted) {
                    out.cleared.push(Cleared {
                        feature: key.to_owned(),
                        value,
                    });
                }
            }
        }
        _ => {}
    }

    if !(s.freeze_on_anomaly && trigger.is_some()) {
        // EWMA mean/variance (West 1979). The weight starts at 1/n so the first values build
        // an ordinary running mean and variance instead of a baseline biased towards zero.
        ks.n += 1;
        let a = s.alpha.max(1.0 / ks.n as f64);
        let diff = value - ks.mean;
        let incr = a * diff;
        ks.mean += incr;
        ks.var = (1.0 - a) * (ks.var + diff * incr);
    }
}

/// Most leaves taken from one document, and deepest nesting followed: bounds the work a
/// hostile or broken input can cause.
const MAX_LEAVES: usize = 4096;
const MAX_DEPTH: usize = 8;

/// Numeric leaves of a JSON document, keyed by dotted path: `{"a": {"b": 1}, "c": [2, 3]}`
/// gives `a.b = 1`, `c.0 = 2`, `c.1 = 3`. Booleans count as 0/1; strings and nulls are
/// skipped.
pub fn numeric_leaves(value: &serde_json::Value) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    walk(value, &mut String::new(), 0, &mut out);
    out
}

fn walk(value: &serde_json::Value, path: &mut String, depth: usize, out: &mut Vec<(String, f64)>) {
    use serde_json::Value;
    if out.len() >= MAX_LEAVES {
        return;
    }
    let child = |key: &str, v: &Value, path: &mut String, out: &mut Vec<(String, f64)>| {
        if depth >= MAX_DEPTH {
            return;
        }
        let len = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
        walk(v, path, depth + 1, out);
        path.truncate(len);
    };
    match value {
        Value::Number(n) => {
            if let Some(x) = n.as_f64() {
                out.push((path.clone(), x));
            }
        }
        Value::Bool(b) => out.push((path.clone(), if *b { 1.0 } else { 0.0 })),
        Value::Object(map) => {
            for (k, v) in map {
                child(k, v, path, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                child(&i.to_string(), v, path, out);
            }
        }
        Value::Null | Value::String(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings() -> Settings {
        Settings {
            features: vec![],
            alpha: 0.1,
            z_threshold: 4.0,
            clear_z: 2.0,
            warmup: 10,
            cooldown_ms: 1_000,
            min_std: 1e-6,
            freeze_on_anomaly: false,
            limits: BTreeMap::new(),
            max_keys: 16,
        }
    }

    fn rms(v: f64) -> Vec<(String, f64)> {
        vec![("rms".to_owned(), v)]
    }

    /// Feeds a noisy baseline around 1.0 (±0.1) for `n` frames starting at `t0`.
    fn baseline(d: &mut Detector, t0: u64, n: u64) -> u64 {
        for i in 0..n {
            let noise = if i % 2 == 0 { 0.1 } else { -0.1 };
            let o = d.observe("s", t0 + i * 100, &rms(1.0 + noise));
            assert!(o.alerts.is_empty(), "baseline alerted at {i}: {o:?}");
        }
        t0 + n * 100
    }

    #[test]
    fn flattens_nested_documents() {
        let doc = json!({"rms": 1.5, "bands": [1, 2], "x": {"ok": true, "name": "a", "n": null}});
        let mut leaves = numeric_leaves(&doc);
        leaves.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            leaves,
            vec![
                ("bands.0".into(), 1.0),
                ("bands.1".into(), 2.0),
                ("rms".into(), 1.5),
                ("x.ok".into(), 1.0)
            ]
        );
    }

    #[test]
    fn spike_alerts_once_then_hysteresis_holds_then_clears() {
        let mut d = Detector::new(settings(), State::default());
        let t = baseline(&mut d, 0, 50);
        let o = d.observe("s", t, &rms(5.0));
        assert_eq!(o.alerts.len(), 1);
        let f = &o.alerts[0];
        assert_eq!((f.feature.as_str(), f.reason), ("rms", Reason::ZScore));
        assert!(f.z.unwrap() > 4.0);
        // Still anomalous: no second alert, and no clear.
        let o = d.observe("s", t + 100, &rms(5.0));
        assert!(o.alerts.is_empty() && o.cleared.is_empty(), "{o:?}");
        // Back to baseline: clears (the stats moved a little towards 5, z is now negative-small).
        let mut cleared = false;
        for i in 0..20 {
            let o = d.observe("s", t + 200 + i * 100, &rms(1.0));
            assert!(o.alerts.is_empty(), "{o:?}");
            cleared |= !o.cleared.is_empty();
        }
        assert!(cleared);
    }

    #[test]
    fn no_alerts_during_warmup() {
        let mut d = Detector::new(settings(), State::default());
        for (i, v) in [1.0, 100.0, -50.0, 3.0].into_iter().enumerate() {
            assert!(d.observe("s", i as u64, &rms(v)).alerts.is_empty());
        }
    }

    #[test]
    fn cooldown_suppresses_a_second_episode() {
        let mut d = Detector::new(settings(), State::default());
        let t = baseline(&mut d, 0, 50);
        assert_eq!(d.observe("s", t, &rms(5.0)).alerts.len(), 1);
        // Calm down, then spike again within the 1 s cooldown.
        let t = baseline_after_spike(&mut d, t + 100);
        let o = d.observe("s", t, &rms(50.0));
        assert!(o.alerts.is_empty());
        assert_eq!(o.suppressed, 1);
        // After the cooldown a fresh episode alerts again.
        let t = baseline_after_spike(&mut d, t + 100);
        let t = t + 1_000;
        assert_eq!(d.observe("s", t, &rms(500.0)).alerts.len(), 1);
    }

    /// Feeds baseline values until the active episode clears; returns the next timestamp.
    fn baseline_after_spike(d: &mut Detector, mut t: u64) -> u64 {
        for _ in 0..200 {
            d.observe("s", t, &rms(1.0));
            t += 1;
            if !d.state().streams["s"]["rms"].active {
                return t;
            }
        }
        panic!("never cleared");
    }

    #[test]
    fn absolute_limits_apply_from_the_first_value() {
        let mut s = settings();
        s.limits.insert(
            "rms".into(),
            Limits {
                min: Some(0.5),
                max: Some(2.0),
            },
        );
        let mut d = Detector::new(s, State::default());
        let o = d.observe("s", 0, &rms(3.0));
        assert_eq!(o.alerts[0].reason, Reason::AboveMax);
        assert_eq!(o.alerts[0].limit, 2.0);
        assert_eq!(o.alerts[0].z, None);
        let o = d.observe("s", 10_000, &rms(1.0));
        assert_eq!(o.cleared.len(), 1);
        let o = d.observe("s", 20_000, &rms(0.1));
        assert_eq!(o.alerts[0].reason, Reason::BelowMin);
    }

    #[test]
    fn streams_have_separate_state_and_keys_are_bounded() {
        let mut s = settings();
        s.max_keys = 2;
        let mut d = Detector::new(s, State::default());
        let leaves = vec![("a".to_owned(), 1.0), ("b".to_owned(), 1.0)];
        assert_eq!(d.observe("s1", 0, &leaves).untracked, 0);
        assert_eq!(d.observe("s2", 0, &leaves).untracked, 2);
        assert_eq!(d.tracked(), 2);
    }

    #[test]
    fn configured_features_only_and_missing_counted() {
        let mut s = settings();
        s.features = vec!["rms".into(), "peak".into()];
        let mut d = Detector::new(s, State::default());
        let o = d.observe("s", 0, &[("rms".into(), 1.0), ("mean".into(), 2.0)]);
        assert_eq!(o.missing, 1);
        assert_eq!(
            d.state().streams["s"].keys().collect::<Vec<_>>(),
            vec!["rms"]
        );
    }

    #[test]
    fn running_statistics_match_exact_values_early_on() {
        let mut s = settings();
        s.alpha = 0.01; // 1/n dominates for the first 100 values
        let mut d = Detector::new(s, State::default());
        for (i, v) in [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]
            .into_iter()
            .enumerate()
        {
            d.observe("s", i as u64, &rms(v));
        }
        let ks = &d.state().streams["s"]["rms"];
        assert!((ks.mean - 5.0).abs() < 1e-9);
        assert!((ks.var - 4.0).abs() < 1e-9); // population variance
    }

    #[test]
    fn state_survives_a_round_trip_through_json() {
        let mut d = Detector::new(settings(), State::default());
        let t = baseline(&mut d, 0, 50);
        let saved = serde_json::to_vec(d.state()).unwrap();
        let restored: State = serde_json::from_slice(&saved).unwrap();
        // serde_json may round the last bit of an f64; the statistics are what matters.
        let (a, b) = (
            &restored.streams["s"]["rms"],
            &d.state().streams["s"]["rms"],
        );
        assert_eq!(
            (a.n, a.active, a.last_alert_ms),
            (b.n, b.active, b.last_alert_ms)
        );
        assert!((a.mean - b.mean).abs() < 1e-12 && (a.var - b.var).abs() < 1e-12);
        // A restarted detector still knows the baseline: the spike alerts without warm-up.
        let mut d2 = Detector::new(settings(), restored);
        assert_eq!(d2.observe("s", t, &rms(5.0)).alerts.len(), 1);
    }

    #[test]
    fn freeze_keeps_the_baseline_during_an_anomaly() {
        let mut s = settings();
        s.freeze_on_anomaly = true;
        let mut d = Detector::new(s, State::default());
        let t = baseline(&mut d, 0, 50);
        let before = d.state().streams["s"]["rms"].clone();
        d.observe("s", t, &rms(5.0));
        d.observe("s", t + 1, &rms(5.0));
        let after = &d.state().streams["s"]["rms"];
        assert_eq!((after.n, after.mean), (before.n, before.mean));
        assert!(after.active);
    }
}
