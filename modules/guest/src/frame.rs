//! Helpers on the generated frame types: constructors, tensor encoding, payload names for
//! error messages.

use crate::{Dtype, Frame, Payload, Tensor};

/// Name of a payload's case, as in the WIT (`json`, `bytes`, `samples`, `tensor`), for
/// messages like "expected samples payload, got json".
pub fn payload_kind(payload: &Payload) -> &'static str {
    match payload {
        Payload::Json(_) => "json",
        Payload::Bytes(_) => "bytes",
        Payload::Samples(_) => "samples",
        Payload::Tensor(_) => "tensor",
    }
}

impl Frame {
    /// A frame with no labels.
    pub fn new(stream: impl Into<String>, timestamp_ms: u64, payload: Payload) -> Self {
        Self {
            stream: stream.into(),
            timestamp_ms,
            payload,
            meta: Vec::new(),
        }
    }

    /// The value of label `key`, if present (first occurrence).
    pub fn label(&self, key: &str) -> Option<&str> {
        self.meta
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl Dtype {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 => 2,
            Dtype::I64 => 8,
            Dtype::U8 | Dtype::Bool => 1,
        }
    }
}

impl Tensor {
    /// An f32 tensor of `shape` holding `values` (row-major), encoded little-endian.
    ///
    /// # Panics
    /// If `values.len()` is not the product of `shape`: that is a bug in the caller, not
    /// bad input.
    pub fn from_f32(shape: Vec<u32>, values: &[f32]) -> Self {
        let elements: usize = shape.iter().map(|&d| d as usize).product();
        assert_eq!(
            elements,
            values.len(),
            "tensor shape {shape:?} does not match {} values",
            values.len()
        );
        let mut data = Vec::with_capacity(values.len() * 4);
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        Self {
            dtype: Dtype::F32,
            shape,
            data,
        }
    }

    /// Number of elements the shape describes (1 for a scalar).
    pub fn elements(&self) -> usize {
        self.shape.iter().map(|&d| d as usize).product()
    }

    /// Decodes an f32 tensor, checking dtype and data length against the shape.
    pub fn to_f32(&self) -> Result<Vec<f32>, String> {
        if self.dtype != Dtype::F32 {
            return Err(format!("expected an f32 tensor, got {:?}", self.dtype));
        }
        let expected = self.elements().checked_mul(4);
        if expected != Some(self.data.len()) {
            return Err(format!(
                "tensor data is {} bytes, shape {:?} needs {} f32 values",
                self.data.len(),
                self.shape,
                self.elements()
            ));
        }
        Ok(self
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_tensor_round_trips_little_endian() {
        let t = Tensor::from_f32(vec![2, 2], &[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(t.data.len(), 16);
        assert_eq!(&t.data[0..4], &1.0f32.to_le_bytes());
        assert_eq!(t.to_f32(), Ok(vec![1.0, 2.0, 3.0, 4.0]));
    }

    #[test]
    fn to_f32_rejects_wrong_dtype_and_length() {
        let t = Tensor {
            dtype: Dtype::U8,
            shape: vec![1],
            data: vec![0],
        };
        assert!(t.to_f32().is_err());
        let t = Tensor {
            dtype: Dtype::F32,
            shape: vec![3],
            data: vec![0; 8],
        };
        assert!(t.to_f32().unwrap_err().contains("needs 3"));
    }

    #[test]
    fn scalar_has_one_element() {
        let t = Tensor::from_f32(vec![], &[5.0]);
        assert_eq!(t.elements(), 1);
    }

    #[test]
    fn labels_and_kinds() {
        let mut f = Frame::new("s", 1, Payload::Samples(vec![1.0]));
        f.meta.push(("sensor".into(), "imu0".into()));
        assert_eq!(f.label("sensor"), Some("imu0"));
        assert_eq!(f.label("x"), None);
        assert_eq!(payload_kind(&f.payload), "samples");
    }
}
