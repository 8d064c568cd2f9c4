//! `feature-extractor` pipeline stage: turns a window of sensor samples into features.
//!
//! Input: `samples` frames (one window each, any length). Output per window: a `json`
//! frame `{"n", "mean", "rms", "peak", "crest_factor", "dominant_hz", "bands": [..]}`
//! and/or an f32 tensor `[1, 5 + bands]` in the order
//! `mean, rms, peak, crest_factor, dominant_hz, band_0..`, for an ONNX stage. The math is
//! the `dsp` crate; this file is config, validation and frame plumbing.

use edge_guest::{Frame, Payload, Tensor, config, payload_kind};
use serde::Deserialize;

/// Stage configuration (JSON object text, see `modules/README.md`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Sample rate of the input windows in Hz (required): scales `dominant_hz` and the
    /// band edges.
    sample_rate_hz: f32,
    /// Number of equal-width bands between 0 Hz and Nyquist.
    #[serde(default = "default_bands")]
    bands: u32,
    /// Window function before the FFT: `hann` or `rect`.
    #[serde(default)]
    window: WindowKind,
    /// Subtract the window's mean before the FFT (drops DC, e.g. gravity, from band 0).
    #[serde(default)]
    remove_dc: bool,
    /// What to emit: `json`, `tensor` or `both` (json first).
    #[serde(default)]
    output: Output,
    /// Stream name for output frames; default: the input frame's stream.
    #[serde(default)]
    stream: Option<String>,
    /// Longest window accepted; longer ones are rejected (bounds memory and time per call).
    #[serde(default = "default_max_samples")]
    max_samples: u32,
}

fn default_bands() -> u32 {
    8
}

fn default_max_samples() -> u32 {
    65_536
}

/// Upper bounds for config values; beyond them a window would not fit a small board's
/// memory budget for one stage.
const MAX_BANDS: u32 = 1024;
const MAX_SAMPLES_LIMIT: u32 = 1 << 20;

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum WindowKind {
    #[default]
    Hann,
    Rect,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Output {
    #[default]
    Json,
    Tensor,
    Both,
}

/// A configured extractor: the stage's whole state.
#[derive(Debug)]
pub struct Stage {
    extractor: dsp::Extractor,
    output: Output,
    stream: Option<String>,
    max_samples: usize,
}

impl Stage {
    /// Parses and validates the stage config.
    pub fn from_config(text: &str) -> Result<Self, String> {
        let c: Config = config::parse(text)?;
        if !(c.sample_rate_hz.is_finite() && c.sample_rate_hz > 0.0) {
            return Err(config::invalid(
                "sample_rate_hz",
                format!(
                    "must be a positive number of hertz, got {}",
                    c.sample_rate_hz
                ),
            ));
        }
        if !(1..=MAX_BANDS).contains(&c.bands) {
            return Err(config::invalid(
                "bands",
                format!("must be between 1 and {MAX_BANDS}, got {}", c.bands),
            ));
        }
        if !(1..=MAX_SAMPLES_LIMIT).contains(&c.max_samples) {
            return Err(config::invalid(
                "max_samples",
                format!(
                    "must be between 1 and {MAX_SAMPLES_LIMIT}, got {}",
                    c.max_samples
                ),
            ));
        }
        if c.stream.as_deref() == Some("") {
            return Err(config::invalid("stream", "must not be empty"));
        }
        let window = match c.window {
            WindowKind::Hann => dsp::Window::Hann,
            WindowKind::Rect => dsp::Window::Rect,
        };
        Ok(Self {
            extractor: dsp::Extractor::new(dsp::ExtractorConfig {
                sample_rate_hz: c.sample_rate_hz,
                bands: c.bands as usize,
                window,
                remove_dc: c.remove_dc,
            }),
            output: c.output,
            stream: c.stream,
            max_samples: c.max_samples as usize,
        })
    }

    /// Extracts features from one `samples` frame.
    pub fn process(&mut self, frame: Frame) -> Result<Vec<Frame>, String> {
        // Taken apart so the output frames take the input's stream name and labels instead
        // of copies (each copy is an allocation in the module).
        let Frame {
            stream,
            timestamp_ms,
            payload,
            meta,
        } = frame;
        let Payload::Samples(samples) = &payload else {
            return Err(format!(
                "expected a samples payload, got {}",
                payload_kind(&payload)
            ));
        };
        if samples.is_empty() {
            return Err("empty samples window".into());
        }
        if samples.len() > self.max_samples {
            return Err(format!(
                "window of {} samples exceeds max_samples {}",
                samples.len(),
                self.max_samples
            ));
        }
        let features = self
            .extractor
            .extract_finite(samples)
            .map_err(|i| format!("sample {i} is not a finite number ({})", samples[i]))?;

        let stream = self.stream.clone().unwrap_or(stream);
        let json = || Payload::Json(features.to_json());
        let tensor = || {
            let values = features.to_vec();
            Payload::Tensor(Tensor::from_f32(vec![1, values.len() as u32], &values))
        };
        let (first, second) = match self.output {
            Output::Json => (json(), None),
            Output::Tensor => (tensor(), None),
            Output::Both => (json(), Some(tensor())),
        };
        let mut out = Vec::with_capacity(2);
        if let Some(payload) = second {
            out.push(Frame {
                stream: stream.clone(),
                timestamp_ms,
                payload: first,
                meta: meta.clone(),
            });
            out.push(Frame {
                stream,
                timestamp_ms,
                payload,
                meta,
            });
        } else {
            out.push(Frame {
                stream,
                timestamp_ms,
                payload: first,
                meta,
            });
        }
        Ok(out)
    }
}

impl edge_guest::Stage for Stage {
    fn from_config(config: &str) -> Result<Self, String> {
        Stage::from_config(config)
    }

    fn process(&mut self, frame: Frame) -> Result<Vec<Frame>, String> {
        Stage::process(self, frame)
    }
}

edge_guest::export_stateful_stage!(Stage);

#[cfg(test)]
mod tests {
    use super::*;
    use edge_guest::Dtype;

    fn window(freq: f32, rate: f32, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (2.0 * std::f32::consts::PI * freq * i as f32 / rate).sin())
            .collect()
    }

    fn frame(samples: Vec<f32>) -> Frame {
        let mut f = Frame::new(
            "vibration/motor-1",
            1_700_000_000_000,
            Payload::Samples(samples),
        );
        f.meta.push(("sensor".into(), "imu0".into()));
        f
    }

    #[test]
    fn json_output_has_features_and_keeps_stream_labels_and_time() {
        let mut s = Stage::from_config(r#"{"sample_rate_hz": 1000, "bands": 4}"#).unwrap();
        let out = s.process(frame(window(300.0, 1000.0, 1000))).unwrap();
        assert_eq!(out.len(), 1);
        let f = &out[0];
        assert_eq!(f.stream, "vibration/motor-1");
        assert_eq!(f.timestamp_ms, 1_700_000_000_000);
        assert_eq!(f.label("sensor"), Some("imu0"));
        let Payload::Json(text) = &f.payload else {
            panic!("not json")
        };
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(v["n"], 1000);
        assert_eq!(v["bands"].as_array().unwrap().len(), 4);
        // 300 Hz with 125 Hz bands: band 2.
        let bands: Vec<f64> = v["bands"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_f64().unwrap())
            .collect();
        let max = bands.iter().cloned().fold(0.0, f64::max);
        assert_eq!(bands[2], max);
        assert!((v["rms"].as_f64().unwrap() - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-3);
    }

    #[test]
    fn tensor_output_layout() {
        let mut s = Stage::from_config(
            r#"{"sample_rate_hz": 100.0, "bands": 3, "output": "both", "stream": "features"}"#,
        )
        .unwrap();
        let out = s.process(frame(vec![1.0; 16])).unwrap();
        assert_eq!(out.len(), 2);
        assert!(matches!(out[0].payload, Payload::Json(_)));
        let Payload::Tensor(t) = &out[1].payload else {
            panic!("not a tensor")
        };
        assert_eq!(out[1].stream, "features");
        assert_eq!(t.dtype, Dtype::F32);
        assert_eq!(t.shape, vec![1, 8]);
        let v = t.to_f32().unwrap();
        assert_eq!(&v[..4], &[1.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn config_errors_name_the_key() {
        let e = Stage::from_config("").unwrap_err();
        assert!(e.contains("sample_rate_hz"), "{e}");
        let e = Stage::from_config(r#"{"sample_rate_hz": 100, "bands": 0}"#).unwrap_err();
        assert!(e.starts_with("bands:"), "{e}");
        let e = Stage::from_config(r#"{"sample_rate_hz": -1}"#).unwrap_err();
        assert!(e.starts_with("sample_rate_hz:"), "{e}");
        let e = Stage::from_config(r#"{"sample_rate_hz": 100, "window": "kaiser"}"#).unwrap_err();
        assert!(e.starts_with("window:"), "{e}");
        let e = Stage::from_config(r#"{"sample_rate_hz": 100, "bandz": 3}"#).unwrap_err();
        assert!(e.contains("bandz"), "{e}");
    }

    #[test]
    fn bad_frames_are_rejected_with_reasons() {
        let mut s = Stage::from_config(r#"{"sample_rate_hz": 100, "max_samples": 8}"#).unwrap();
        let e = s
            .process(Frame::new("x", 0, Payload::Json("{}".into())))
            .unwrap_err();
        assert!(e.contains("got json"), "{e}");
        assert!(s.process(frame(vec![])).unwrap_err().contains("empty"));
        assert!(
            s.process(frame(vec![0.0; 9]))
                .unwrap_err()
                .contains("max_samples")
        );
        let e = s.process(frame(vec![0.0, f32::NAN])).unwrap_err();
        assert!(e.contains("sample 1"), "{e}");
    }
}
