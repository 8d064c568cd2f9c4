//! Frames to and from JSON: what an outbox sink publishes, what file and MQTT sources read.
//!
//! A `json` frame is published as its document; other payloads are wrapped so the receiver
//! can tell them apart: `{"samples": [..]}`, `{"text": ".."}` (UTF-8 bytes),
//! `{"bytes_b64": ".."}`, and a tensor as the typed `{"tensor": {..}}` of
//! [`protocol::v1::DataPayload`] (`{"data_b64": "..", "dtype": "f32", "shape": [..]}`).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use protocol::v1::DataPayload;
use protocol::v1::tensor::DType;
use serde_json::{Value, json};

use crate::sandbox::{Dtype, Frame, Payload};

/// The data body payload an outbox sink publishes for a frame's payload.
pub fn data_payload(p: &Payload) -> DataPayload {
    match p {
        Payload::Tensor(t) => DataPayload::Tensor(t.into()),
        Payload::Json(s) => {
            DataPayload::Json(serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone())))
        }
        Payload::Samples(v) => DataPayload::Json(json!({ "samples": v })),
        Payload::Bytes(b) => DataPayload::Json(match std::str::from_utf8(b) {
            Ok(s) => json!({ "text": s }),
            Err(_) => json!({ "bytes_b64": B64.encode(b) }),
        }),
    }
}

/// A frame from a line of comma-separated numbers.
pub fn samples_from_line(line: &str) -> Result<Vec<f32>, CodecError> {
    line.split([',', ' ', '\t'])
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<f32>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| CodecError::NotANumber(t.to_owned()))
        })
        .collect()
}

/// Why a line or a frame is not a sample; each names the value at fault.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("{0:?} is not a finite number")]
    NotANumber(String),
    #[error("label {key}={value:?} is not an integer")]
    Label { key: String, value: String },
    #[error("json payload does not parse: {0}")]
    Json(serde_json::Error),
    #[error("json payload has no `features` array")]
    NoFeatures,
    #[error("`features` holds a value that is not a number")]
    FeatureNotNumber,
    #[error("a {0} payload is not a sample (need samples, an f32 tensor or json with features)")]
    NotASample(&'static str),
    #[error("sample has a feature that is not a finite number")]
    NotFinite,
}

/// Short description of a frame for log lines (never the whole payload).
pub fn summary(f: &Frame) -> String {
    const MAX: usize = 200;
    let mut s = match &f.payload {
        Payload::Json(j) => j.clone(),
        Payload::Samples(v) => format!("{} samples", v.len()),
        Payload::Bytes(b) => format!("{} bytes", b.len()),
        Payload::Tensor(t) => format!("tensor {} {:?}", DType::from(t.dtype), t.shape),
    };
    if s.len() > MAX {
        let mut cut = MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

/// Features and label of a frame for the dataset store: samples, an f32 tensor, or a JSON
/// object with a numeric `features` array (and optionally a numeric `label`).
pub fn sample_parts(f: &Frame, label_key: &str) -> Result<(Vec<f32>, Option<i64>), CodecError> {
    let meta_label = f
        .meta
        .iter()
        .find(|(k, _)| k == label_key)
        .map(|(_, v)| {
            v.parse::<i64>().map_err(|_| CodecError::Label {
                key: label_key.to_owned(),
                value: v.clone(),
            })
        })
        .transpose()?;
    let (features, json_label) = match &f.payload {
        Payload::Samples(v) => (v.clone(), None),
        Payload::Tensor(t) if t.dtype == Dtype::F32 => (
            t.data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            None,
        ),
        Payload::Json(s) => {
            let v: Value = serde_json::from_str(s).map_err(CodecError::Json)?;
            let feats = v
                .get("features")
                .and_then(Value::as_array)
                .ok_or(CodecError::NoFeatures)?
                .iter()
                .map(|x| x.as_f64().map(|x| x as f32))
                .collect::<Option<Vec<f32>>>()
                .ok_or(CodecError::FeatureNotNumber)?;
            (feats, v.get(label_key).and_then(Value::as_i64))
        }
        other => {
            return Err(CodecError::NotASample(match other {
                Payload::Bytes(_) => "bytes",
                _ => "non-f32 tensor",
            }));
        }
    };
    if features.iter().any(|x| !x.is_finite()) {
        return Err(CodecError::NotFinite);
    }
    Ok((features, meta_label.or(json_label)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::Tensor;

    fn frame(payload: Payload) -> Frame {
        Frame {
            stream: "s".into(),
            timestamp_ms: 1,
            payload,
            meta: vec![("label".into(), "3".into())],
        }
    }

    /// The JSON a payload is published as.
    fn payload_json(p: &Payload) -> Value {
        serde_json::to_value(data_payload(p)).expect("a data payload serializes")
    }

    #[test]
    fn payloads_to_json() {
        assert_eq!(
            payload_json(&Payload::Json("{\"a\":1}".into())),
            json!({"a": 1})
        );
        assert_eq!(payload_json(&Payload::Json("nope".into())), json!("nope"));
        assert_eq!(
            payload_json(&Payload::Samples(vec![1.0])),
            json!({"samples": [1.0]})
        );
        assert_eq!(
            payload_json(&Payload::Bytes(b"hi".to_vec())),
            json!({"text": "hi"})
        );
        assert_eq!(
            payload_json(&Payload::Bytes(vec![0xff])),
            json!({"bytes_b64": "/w=="})
        );
        let t = Payload::Tensor(Tensor {
            dtype: Dtype::U8,
            shape: vec![1],
            data: vec![7],
        });
        assert_eq!(payload_json(&t)["tensor"]["dtype"], "u8");
    }

    #[test]
    fn a_tensor_body_is_byte_for_byte_what_the_json_macro_built() {
        // The body as the sink built it before it was typed: a `json!` value (keys sorted).
        let t = Tensor {
            dtype: Dtype::F16,
            shape: vec![1, 2],
            data: vec![0, 60, 0, 188],
        };
        let before = json!({
            "tensor": {
                "dtype": "f16",
                "shape": t.shape,
                "data_b64": B64.encode(&t.data),
            }
        });
        let body = |payload| protocol::v1::Data {
            stream: "s".into(),
            payload,
        };
        assert_eq!(
            serde_json::to_vec(&body(data_payload(&Payload::Tensor(t)))).expect("encodes"),
            serde_json::to_vec(&body(DataPayload::Json(before))).expect("encodes"),
        );
    }

    #[test]
    fn samples_lines_and_dataset_parts() {
        assert_eq!(
            samples_from_line("1, 2.5,3").expect("ok"),
            vec![1.0, 2.5, 3.0]
        );
        assert!(samples_from_line("1,x").is_err());
        assert!(samples_from_line("1,NaN").is_err());
        let (f, l) = sample_parts(&frame(Payload::Samples(vec![1.0, 2.0])), "label").expect("ok");
        assert_eq!((f, l), (vec![1.0, 2.0], Some(3)));
        let mut j = frame(Payload::Json("{\"features\":[1,2],\"label\":4}".into()));
        j.meta.clear();
        assert_eq!(sample_parts(&j, "label").expect("ok").1, Some(4));
        assert!(sample_parts(&frame(Payload::Bytes(vec![1])), "label").is_err());
        assert!(sample_parts(&frame(Payload::Json("{}".into())), "label").is_err());
    }
}
