//! [`Tensor`]: the dense tensor of the WIT contract (`modules/wit/types.wit`, `record tensor`),
//! validated on construction, and its conversions to and from ort values, ONNX `TensorProto`s
//! and the wire's tensor ([`WireTensor`], the agent's offload requests and the coordinator's
//! answers). [`DType`] is the wire's (`protocol::v1::tensor`).
//!
//! Encoding (as the WIT file documents it): `data` holds product(shape) elements, row-major,
//! each little-endian, packed; bool is one byte, 0 or 1. A `Tensor` that exists is valid: the
//! fields are private and every constructor checks the length and the bool bytes.

use std::fmt;

use half::f16;
use ort::value::{DynValue, TensorElementType, ValueType};
use protocol::v1::tensor::WireTensor;

use crate::onnx;

pub use protocol::v1::tensor::DType;

/// The element type of an ort tensor; `None` for types the WIT contract lacks.
pub(crate) fn dtype_from_ort(ty: TensorElementType) -> Option<DType> {
    Some(match ty {
        TensorElementType::Float32 => DType::F32,
        TensorElementType::Float16 => DType::F16,
        TensorElementType::Int64 => DType::I64,
        TensorElementType::Int32 => DType::I32,
        TensorElementType::Uint8 => DType::U8,
        TensorElementType::Bool => DType::Bool,
        _ => return None,
    })
}

/// Why bytes do not make a [`Tensor`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    #[error("tensor data is {got} bytes, shape {shape:?} of {dtype} needs {expected}")]
    Length {
        dtype: DType,
        shape: Vec<u32>,
        expected: usize,
        got: usize,
    },
    #[error("bool tensor byte {index} is {value}, only 0 and 1 are allowed")]
    Bool { index: usize, value: u8 },
    #[error("tensor shape {0:?} has more elements than this machine can address")]
    TooLarge(Vec<u32>),
    #[error("element type {0} is not one of f32, f16, i64, i32, u8, bool")]
    UnsupportedType(String),
    #[error("tensor is stored outside the model file (external data), which is not supported")]
    External,
    #[error("ort: {0}")]
    Ort(String),
}

/// A dense, row-major, little-endian tensor (the WIT `tensor` record).
#[derive(Clone, PartialEq)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<u32>,
    data: Vec<u8>,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// Number of elements of `shape` (1 for a scalar), `None` on overflow.
pub(crate) fn element_count(shape: &[u32]) -> Option<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
}

impl Tensor {
    /// Checks the length against the shape and, for bool, that every byte is 0 or 1.
    pub fn new(dtype: DType, shape: Vec<u32>, data: Vec<u8>) -> Result<Tensor, TensorError> {
        let expected = element_count(&shape)
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| TensorError::TooLarge(shape.clone()))?;
        if data.len() != expected {
            return Err(TensorError::Length {
                dtype,
                shape,
                expected,
                got: data.len(),
            });
        }
        if dtype == DType::Bool
            && let Some((index, &value)) = data.iter().enumerate().find(|(_, b)| **b > 1)
        {
            return Err(TensorError::Bool { index, value });
        }
        Ok(Tensor { dtype, shape, data })
    }

    /// All-zero (false) tensor.
    pub fn zeros(dtype: DType, shape: Vec<u32>) -> Result<Tensor, TensorError> {
        let len = element_count(&shape)
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| TensorError::TooLarge(shape.clone()))?;
        Tensor::new(dtype, shape, vec![0; len])
    }

    pub fn from_f32(shape: Vec<u32>, values: &[f32]) -> Result<Tensor, TensorError> {
        Tensor::new(
            DType::F32,
            shape,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }

    pub fn from_f16(shape: Vec<u32>, values: &[f16]) -> Result<Tensor, TensorError> {
        Tensor::new(
            DType::F16,
            shape,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }

    pub fn from_i64(shape: Vec<u32>, values: &[i64]) -> Result<Tensor, TensorError> {
        Tensor::new(
            DType::I64,
            shape,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }

    pub fn from_i32(shape: Vec<u32>, values: &[i32]) -> Result<Tensor, TensorError> {
        Tensor::new(
            DType::I32,
            shape,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }

    pub fn from_u8(shape: Vec<u32>, values: &[u8]) -> Result<Tensor, TensorError> {
        Tensor::new(DType::U8, shape, values.to_vec())
    }

    pub fn from_bool(shape: Vec<u32>, values: &[bool]) -> Result<Tensor, TensorError> {
        Tensor::new(
            DType::Bool,
            shape,
            values.iter().map(|&b| u8::from(b)).collect(),
        )
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[u32] {
        &self.shape
    }

    /// The packed little-endian bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The parts, for moving into a WIT record without a copy.
    pub fn into_parts(self) -> (DType, Vec<u32>, Vec<u8>) {
        (self.dtype, self.shape, self.data)
    }

    pub fn len(&self) -> usize {
        self.data.len() / self.dtype.size()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The elements as f32 (f16 widened); `None` for other dtypes.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        match self.dtype {
            DType::F32 => Some(
                self.data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            DType::F16 => Some(
                self.data
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
            _ => None,
        }
    }

    /// The elements as i64 (integer and bool dtypes); `None` for floats.
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        match self.dtype {
            DType::I64 => Some(
                self.data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect(),
            ),
            DType::I32 => Some(
                self.data
                    .chunks_exact(4)
                    .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                    .collect(),
            ),
            DType::U8 | DType::Bool => Some(self.data.iter().map(|&b| i64::from(b)).collect()),
            DType::F32 | DType::F16 => None,
        }
    }

    /// Index of the first NaN or infinite element (floats only).
    pub fn first_non_finite(&self) -> Option<usize> {
        match self.dtype {
            DType::F32 => self
                .data
                .chunks_exact(4)
                .position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
            DType::F16 => self
                .data
                .chunks_exact(2)
                .position(|c| !f16::from_le_bytes([c[0], c[1]]).is_finite()),
            _ => None,
        }
    }

    /// Into an ort value (one copy into ort-owned memory).
    pub(crate) fn to_ort(&self) -> Result<DynValue, TensorError> {
        let shape: Vec<i64> = self.shape.iter().map(|&d| i64::from(d)).collect();
        let err = |e: ort::Error| TensorError::Ort(e.to_string());
        Ok(match self.dtype {
            DType::F32 => ort::value::Tensor::from_array((
                shape,
                decode::<4, f32>(&self.data, f32::from_le_bytes),
            ))
            .map_err(err)?
            .into_dyn(),
            DType::F16 => ort::value::Tensor::from_array((
                shape,
                decode::<2, f16>(&self.data, f16::from_le_bytes),
            ))
            .map_err(err)?
            .into_dyn(),
            DType::I64 => ort::value::Tensor::from_array((
                shape,
                decode::<8, i64>(&self.data, i64::from_le_bytes),
            ))
            .map_err(err)?
            .into_dyn(),
            DType::I32 => ort::value::Tensor::from_array((
                shape,
                decode::<4, i32>(&self.data, i32::from_le_bytes),
            ))
            .map_err(err)?
            .into_dyn(),
            DType::U8 => ort::value::Tensor::from_array((shape, self.data.clone()))
                .map_err(err)?
                .into_dyn(),
            DType::Bool => ort::value::Tensor::from_array((
                shape,
                self.data.iter().map(|&b| b != 0).collect::<Vec<bool>>(),
            ))
            .map_err(err)?
            .into_dyn(),
        })
    }

    /// From an ort output value (one copy out of ort-owned memory).
    pub(crate) fn from_ort(value: &DynValue) -> Result<Tensor, TensorError> {
        let ty = match value.dtype() {
            ValueType::Tensor { ty, .. } => *ty,
            other => return Err(TensorError::UnsupportedType(other.to_string())),
        };
        let dtype =
            dtype_from_ort(ty).ok_or_else(|| TensorError::UnsupportedType(ty.to_string()))?;
        let err = |e: ort::Error| TensorError::Ort(e.to_string());
        let (shape, data): (&ort::value::Shape, Vec<u8>) = match dtype {
            DType::F32 => {
                let (s, d) = value.try_extract_tensor::<f32>().map_err(err)?;
                (s, d.iter().flat_map(|v| v.to_le_bytes()).collect())
            }
            DType::F16 => {
                let (s, d) = value.try_extract_tensor::<f16>().map_err(err)?;
                (s, d.iter().flat_map(|v| v.to_le_bytes()).collect())
            }
            DType::I64 => {
                let (s, d) = value.try_extract_tensor::<i64>().map_err(err)?;
                (s, d.iter().flat_map(|v| v.to_le_bytes()).collect())
            }
            DType::I32 => {
                let (s, d) = value.try_extract_tensor::<i32>().map_err(err)?;
                (s, d.iter().flat_map(|v| v.to_le_bytes()).collect())
            }
            DType::U8 => {
                let (s, d) = value.try_extract_tensor::<u8>().map_err(err)?;
                (s, d.to_vec())
            }
            DType::Bool => {
                let (s, d) = value.try_extract_tensor::<bool>().map_err(err)?;
                (s, d.iter().map(|&b| u8::from(b)).collect())
            }
        };
        let shape = shape
            .iter()
            .map(|&d| {
                u32::try_from(d)
                    .map_err(|_| TensorError::Ort(format!("output dimension {d} out of range")))
            })
            .collect::<Result<Vec<u32>, _>>()?;
        Tensor::new(dtype, shape, data)
    }

    /// As an ONNX initializer named `name` (raw_data encoding, which is little-endian and packed
    /// exactly like ours).
    pub fn to_onnx(&self, name: &str) -> onnx::TensorProto {
        onnx::TensorProto {
            name: name.to_owned(),
            dims: self.shape.iter().map(|&d| i64::from(d)).collect(),
            data_type: self.dtype.onnx_code(),
            raw_data: self.data.clone(),
            ..Default::default()
        }
    }

    /// From an ONNX `TensorProto`, in either raw_data or typed-field encoding.
    pub fn from_onnx(t: &onnx::TensorProto) -> Result<Tensor, TensorError> {
        if t.data_location == onnx::DATA_LOCATION_EXTERNAL {
            return Err(TensorError::External);
        }
        let dtype = DType::from_onnx_code(t.data_type).ok_or_else(|| {
            TensorError::UnsupportedType(format!("onnx data type {}", t.data_type))
        })?;
        let shape = t
            .dims
            .iter()
            .map(|&d| {
                u32::try_from(d).map_err(|_| TensorError::UnsupportedType(format!("dimension {d}")))
            })
            .collect::<Result<Vec<u32>, _>>()?;
        let data = if !t.raw_data.is_empty() || element_count(&shape) == Some(0) {
            t.raw_data.clone()
        } else {
            // Typed fields: f16/bool/u8 travel one per int32 (f16 as its bit pattern).
            match dtype {
                DType::F32 => t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                DType::I64 => t.int64_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                DType::I32 => t.int32_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                DType::F16 => t
                    .int32_data
                    .iter()
                    .flat_map(|&v| (v as u16).to_le_bytes())
                    .collect(),
                DType::U8 | DType::Bool => t.int32_data.iter().map(|&v| v as u8).collect(),
            }
        };
        Tensor::new(dtype, shape, data)
    }
}

/// A copy of `t` for the wire, without a name (inputs by position).
impl From<&Tensor> for WireTensor {
    fn from(t: &Tensor) -> WireTensor {
        WireTensor::new("", t.dtype, t.shape.clone(), t.data.clone())
    }
}

impl Tensor {
    /// Into a wire tensor named `name`, without a copy.
    pub fn into_wire(self, name: impl Into<String>) -> WireTensor {
        WireTensor::new(name, self.dtype, self.shape, self.data)
    }
}

/// The element type of a wire tensor, or why it has none we run.
fn wire_dtype(t: &WireTensor) -> Result<DType, TensorError> {
    t.dtype()
        .ok_or_else(|| TensorError::UnsupportedType(format!("onnx data type {}", t.dtype)))
}

/// Checked like every [`Tensor`]; the name is dropped (the caller matches names).
impl TryFrom<WireTensor> for Tensor {
    type Error = TensorError;

    fn try_from(t: WireTensor) -> Result<Tensor, TensorError> {
        Tensor::new(wire_dtype(&t)?, t.shape, t.data)
    }
}

/// As `TryFrom<WireTensor>`, copying the data.
impl TryFrom<&WireTensor> for Tensor {
    type Error = TensorError;

    fn try_from(t: &WireTensor) -> Result<Tensor, TensorError> {
        Tensor::new(wire_dtype(t)?, t.shape.clone(), t.data.clone())
    }
}

fn decode<const N: usize, T>(bytes: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            f(a)
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::onnx::data_type;

    #[test]
    fn wire_codes_are_onnx_codes() {
        for (d, code) in [
            (DType::F32, data_type::FLOAT),
            (DType::F16, data_type::FLOAT16),
            (DType::I64, data_type::INT64),
            (DType::I32, data_type::INT32),
            (DType::U8, data_type::UINT8),
            (DType::Bool, data_type::BOOL),
        ] {
            assert_eq!(d.onnx_code(), code, "{d}");
        }
    }

    #[test]
    fn wire_tensors_convert_both_ways_checked() {
        let t = Tensor::from_i32(vec![2], &[7, -7]).unwrap();
        let wire = WireTensor::from(&t);
        assert_eq!((wire.name.as_str(), wire.dtype), ("", 6));
        assert_eq!(Tensor::try_from(&wire).as_ref(), Ok(&t));
        let named = t.clone().into_wire("y");
        assert_eq!(named.name, "y");
        assert_eq!(Tensor::try_from(named), Ok(t));
        let string = WireTensor {
            dtype: 8,
            ..WireTensor::from(&Tensor::from_u8(vec![1], &[1]).unwrap())
        };
        assert!(matches!(
            Tensor::try_from(string),
            Err(TensorError::UnsupportedType(_))
        ));
        let bad_bool = WireTensor::new("b", DType::Bool, vec![1], vec![2]);
        assert!(matches!(
            Tensor::try_from(bad_bool),
            Err(TensorError::Bool { .. })
        ));
    }

    #[test]
    fn length_must_match_shape() {
        let err = Tensor::new(DType::F32, vec![2, 2], vec![0; 15]).unwrap_err();
        assert!(
            matches!(
                err,
                TensorError::Length {
                    expected: 16,
                    got: 15,
                    ..
                }
            ),
            "{err}"
        );
        assert!(Tensor::new(DType::F32, vec![2, 2], vec![0; 16]).is_ok());
    }

    #[test]
    fn scalar_and_empty_shapes() {
        assert_eq!(
            Tensor::zeros(DType::I64, vec![]).map(|t| t.data().len()),
            Ok(8)
        );
        assert_eq!(
            Tensor::zeros(DType::I64, vec![3, 0]).map(|t| t.data().len()),
            Ok(0)
        );
    }

    #[test]
    fn bool_bytes_other_than_0_1_are_rejected() {
        let err = Tensor::new(DType::Bool, vec![3], vec![0, 1, 2]).unwrap_err();
        assert_eq!(err, TensorError::Bool { index: 2, value: 2 });
    }

    #[test]
    fn overflowing_shape_is_an_error_not_a_panic() {
        let err = Tensor::new(DType::I64, vec![u32::MAX, u32::MAX, u32::MAX], vec![]).unwrap_err();
        assert!(matches!(err, TensorError::TooLarge(_)));
    }

    #[test]
    fn wit_example_encoding() {
        // The example in types.wit: [[1.0, 2.0], [3.0, 4.0]].
        let t = Tensor::from_f32(vec![2, 2], &[1.0, 2.0, 3.0, 4.0]).expect("valid");
        assert_eq!(&t.data()[..4], &1.0f32.to_le_bytes());
        assert_eq!(t.to_f32(), Some(vec![1.0, 2.0, 3.0, 4.0]));
    }

    #[test]
    fn non_finite_is_found() {
        let t = Tensor::from_f32(vec![3], &[1.0, f32::NAN, 2.0]).expect("valid");
        assert_eq!(t.first_non_finite(), Some(1));
        let h = Tensor::from_f16(vec![2], &[f16::ONE, f16::INFINITY]).expect("valid");
        assert_eq!(h.first_non_finite(), Some(1));
    }

    #[test]
    fn onnx_typed_fields_decode() {
        let t = onnx::TensorProto {
            dims: vec![2],
            data_type: data_type::FLOAT,
            float_data: vec![1.5, -2.0],
            ..Default::default()
        };
        assert_eq!(
            Tensor::from_onnx(&t).expect("valid").to_f32(),
            Some(vec![1.5, -2.0])
        );
        let raw = Tensor::from_i32(vec![2], &[7, -7]).expect("valid");
        assert_eq!(Tensor::from_onnx(&raw.to_onnx("w")).as_ref(), Ok(&raw));
    }
}
