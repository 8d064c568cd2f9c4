//! The one tensor type on the wire, [`WireTensor`], and its element types, [`DType`] (the
//! WIT contract's six, `modules/wit/types.wit`). It travels in two encodings:
//!
//! - binary, in offload requests and responses (`offload.rs` writes and reads it): the ONNX
//!   `TensorProto.DataType` code as one byte, so codes beyond the six pass through;
//! - JSON, in data bodies (`{"tensor": {..}}`, see [`super::DataPayload`]):
//!   `{"data_b64": "..", "dtype": "f32", "shape": [..]}` (keys in this order, which is also
//!   the order `serde_json::Value` keeps them in, so a body re-encoded by the coordinator's
//!   journal is unchanged), plus `"name"` when the tensor has one.
//!
//! Data: product(shape) elements, row-major, each little-endian, packed; bool is one byte.
//! `protocol` does not run models: the inference crate converts its validated tensor to and
//! from this one (`edge_inference::Tensor`), and the agent its WIT records.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize, de, ser::SerializeStruct};

use super::MAX_PAYLOAD_BYTES;
use super::offload::{MAX_RANK, OffloadError};

/// Element type, as in the WIT `dtype` enum; JSON names are `f32`, `f16`, `i64`, `i32`, `u8`,
/// `bool`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    I64,
    I32,
    U8,
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 => 2,
            DType::I64 => 8,
            DType::U8 | DType::Bool => 1,
        }
    }

    /// The name used in the WIT file, in JSON and in error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::U8 => "u8",
            DType::Bool => "bool",
        }
    }

    /// The ONNX `TensorProto.DataType` code, as the binary encoding carries it.
    pub fn code(self) -> u8 {
        match self {
            DType::F32 => 1,
            DType::F16 => 10,
            DType::I64 => 7,
            DType::I32 => 6,
            DType::U8 => 2,
            DType::Bool => 9,
        }
    }

    /// The ONNX `TensorProto.DataType` code, as ONNX's own messages type it.
    pub fn onnx_code(self) -> i32 {
        i32::from(self.code())
    }

    /// From an ONNX `TensorProto.DataType` code; `None` for types the WIT contract lacks.
    pub fn from_onnx_code(code: i32) -> Option<DType> {
        [
            DType::F32,
            DType::F16,
            DType::I64,
            DType::I32,
            DType::U8,
            DType::Bool,
        ]
        .into_iter()
        .find(|d| d.onnx_code() == code)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Bytes per element of an ONNX dtype code; `None` for codes this protocol does not size.
pub fn element_size(dtype: u8) -> Option<usize> {
    match dtype {
        1 | 6 | 12 => Some(4),      // float, int32, uint32
        2 | 3 | 9 => Some(1),       // uint8, int8, bool
        4 | 5 | 10 | 16 => Some(2), // uint16, int16, float16, bfloat16
        7 | 11 | 13 => Some(8),     // int64, double, uint64
        _ => None,
    }
}

/// A tensor as it travels: the ONNX element type code, row-major little-endian data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireTensor {
    /// Input or output name; empty means "by position".
    pub name: String,
    /// ONNX `TensorProto.DataType` code (1 = f32, 10 = f16, 7 = i64, 6 = i32, 2 = u8, 9 = bool).
    pub dtype: u8,
    pub shape: Vec<u32>,
    pub data: Vec<u8>,
}

impl WireTensor {
    /// A tensor of one of the WIT element types.
    pub fn new(name: impl Into<String>, dtype: DType, shape: Vec<u32>, data: Vec<u8>) -> Self {
        WireTensor {
            name: name.into(),
            dtype: dtype.code(),
            shape,
            data,
        }
    }

    /// An f32 tensor (ONNX code 1) from values.
    pub fn from_f32(name: &str, shape: Vec<u32>, values: &[f32]) -> WireTensor {
        WireTensor::new(
            name,
            DType::F32,
            shape,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }

    /// The element type; `None` for an ONNX code beyond the WIT contract's six.
    pub fn dtype(&self) -> Option<DType> {
        DType::from_onnx_code(i32::from(self.dtype))
    }

    /// The values of an f32 tensor; `None` for another dtype or a ragged length.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        if self.dtype != 1 || !self.data.len().is_multiple_of(4) {
            return None;
        }
        Some(
            self.data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    }

    /// Checks the rank, name length and, for known dtypes, the data length.
    pub fn check(&self) -> Result<(), OffloadError> {
        if self.name.len() > u8::MAX as usize {
            return Err(OffloadError::TooLong {
                what: "tensor name",
                len: self.name.len(),
                max: u8::MAX as usize,
            });
        }
        if self.shape.len() > MAX_RANK {
            return Err(OffloadError::Rank {
                name: self.name.clone(),
                rank: self.shape.len(),
            });
        }
        if let Some(size) = element_size(self.dtype) {
            let expected = self
                .shape
                .iter()
                .try_fold(size, |n, &d| n.checked_mul(d as usize))
                .filter(|n| *n <= MAX_PAYLOAD_BYTES)
                .ok_or_else(|| OffloadError::ShapeOverflow {
                    name: self.name.clone(),
                    shape: self.shape.clone(),
                })?;
            if expected != self.data.len() {
                return Err(OffloadError::DataLength {
                    name: self.name.clone(),
                    shape: self.shape.clone(),
                    expected,
                    got: self.data.len(),
                });
            }
        }
        Ok(())
    }
}

/// The JSON form. Serializing a tensor whose code is not one of the six fails (the agent only
/// builds data bodies from WIT tensors, which always have one).
impl Serialize for WireTensor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let dtype = self.dtype().ok_or_else(|| {
            serde::ser::Error::custom(format!("tensor dtype code {} has no name", self.dtype))
        })?;
        let named = !self.name.is_empty();
        let mut m = s.serialize_struct("WireTensor", 3 + usize::from(named))?;
        m.serialize_field("data_b64", &B64.encode(&self.data))?;
        m.serialize_field("dtype", &dtype)?;
        if named {
            m.serialize_field("name", &self.name)?;
        }
        m.serialize_field("shape", &self.shape)?;
        m.end()
    }
}

/// The JSON form, read strictly: only what [`WireTensor`]'s `Serialize` writes for a tensor
/// that passes [`WireTensor::check`] (canonical base64, a named dtype, a non-empty name if
/// any, no other keys), so a tensor read from JSON writes back to the same JSON.
impl<'de> Deserialize<'de> for WireTensor {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Json {
            data_b64: String,
            dtype: DType,
            #[serde(default)]
            name: Option<String>,
            shape: Vec<u32>,
        }
        let j = Json::deserialize(d)?;
        if j.name.as_deref() == Some("") {
            return Err(de::Error::custom("tensor name is empty"));
        }
        let data = B64
            .decode(&j.data_b64)
            .map_err(|e| de::Error::custom(format!("tensor data_b64: {e}")))?;
        let t = WireTensor::new(j.name.unwrap_or_default(), j.dtype, j.shape, data);
        t.check().map_err(de::Error::custom)?;
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_names_round_trip() {
        for d in [
            DType::F32,
            DType::F16,
            DType::I64,
            DType::I32,
            DType::U8,
            DType::Bool,
        ] {
            assert_eq!(DType::from_onnx_code(d.onnx_code()), Some(d));
            assert_eq!(element_size(d.code()), Some(d.size()));
            let name = serde_json::to_string(&d).expect("serializes");
            assert_eq!(name, format!("\"{}\"", d.as_str()));
        }
        assert_eq!(DType::from_onnx_code(8), None, "string");
    }

    #[test]
    fn json_form_is_the_data_body_tensor() {
        let t = WireTensor::new("", DType::U8, vec![1, 2], vec![7, 8]);
        let text = serde_json::to_string(&t).expect("serializes");
        assert_eq!(text, r#"{"data_b64":"Bwg=","dtype":"u8","shape":[1,2]}"#);
        assert_eq!(
            serde_json::from_str::<WireTensor>(&text).expect("parses"),
            t
        );
        let named = WireTensor::from_f32("y", vec![1], &[0.5]);
        let text = serde_json::to_string(&named).expect("serializes");
        assert_eq!(
            serde_json::from_str::<WireTensor>(&text).expect("parses"),
            named
        );
        // What would not write back the same is refused.
        for bad in [
            r#"{"data_b64":"Bwg=","dtype":"u8","shape":[3]}"#,
            r#"{"data_b64":"Bwh=","dtype":"u8","shape":[2]}"#,
            r#"{"data_b64":"Bwg=","dtype":"u8","name":"","shape":[2]}"#,
            r#"{"data_b64":"Bwg=","dtype":"u8","shape":[2],"x":1}"#,
            r#"{"data_b64":"Bwg=","dtype":"U8","shape":[2]}"#,
            r#"{"data_b64":"Bwg=","dtype":"u8","shape":[2.0]}"#,
        ] {
            assert!(serde_json::from_str::<WireTensor>(bad).is_err(), "{bad}");
        }
        let odd = WireTensor {
            name: String::new(),
            dtype: 8,
            shape: vec![],
            data: vec![],
        };
        assert!(serde_json::to_string(&odd).is_err());
    }
}
