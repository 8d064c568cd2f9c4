//! The subset of `onnx.proto` this crate reads and writes, as prost messages written by hand
//! (no protoc at build time).
//!
//! Field numbers and types are those of the public spec,
//! <https://github.com/onnx/onnx/blob/main/onnx/onnx.proto> (proto2 syntax; IR version 10).
//! Only the fields we use are declared. Decoding a model through these structs and encoding it
//! again would drop the rest, so [`crate::patch`] never round-trips a whole model through them:
//! it splices at the wire level and decodes only the initializers it replaces.
//!
//! Optional proto2 scalars are declared proto3-style (absent = default). That is wire-compatible:
//! ONNX never gives meaning to an explicitly set default.

#![allow(missing_docs)]

/// `ModelProto`: the top-level message of a `.onnx` file.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelProto {
    #[prost(int64, tag = "1")]
    pub ir_version: i64,
    #[prost(string, tag = "2")]
    pub producer_name: String,
    #[prost(string, tag = "3")]
    pub producer_version: String,
    #[prost(string, tag = "4")]
    pub domain: String,
    #[prost(int64, tag = "5")]
    pub model_version: i64,
    #[prost(string, tag = "6")]
    pub doc_string: String,
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
}

/// Field number of `ModelProto.graph`.
pub const MODEL_GRAPH_FIELD: u32 = 7;
/// Field number of `GraphProto.initializer`.
pub const GRAPH_INITIALIZER_FIELD: u32 = 5;

#[derive(Clone, PartialEq, prost::Message)]
pub struct OperatorSetIdProto {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(int64, tag = "2")]
    pub version: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    #[prost(string, tag = "10")]
    pub doc_string: String,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "13")]
    pub value_info: Vec<ValueInfoProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(string, tag = "4")]
    pub op_type: String,
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
    #[prost(string, tag = "6")]
    pub doc_string: String,
    #[prost(string, tag = "7")]
    pub domain: String,
}

/// `AttributeProto.AttributeType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum AttributeType {
    Undefined = 0,
    Float = 1,
    Int = 2,
    String = 3,
    Tensor = 4,
    Graph = 5,
    Floats = 6,
    Ints = 7,
    Strings = 8,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AttributeProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(float, tag = "2")]
    pub f: f32,
    #[prost(int64, tag = "3")]
    pub i: i64,
    #[prost(bytes = "vec", tag = "4")]
    pub s: Vec<u8>,
    #[prost(message, optional, tag = "5")]
    pub t: Option<TensorProto>,
    #[prost(float, repeated, tag = "7")]
    pub floats: Vec<f32>,
    #[prost(int64, repeated, tag = "8")]
    pub ints: Vec<i64>,
    #[prost(bytes = "vec", repeated, tag = "9")]
    pub strings: Vec<Vec<u8>>,
    #[prost(string, tag = "13")]
    pub doc_string: String,
    #[prost(enumeration = "AttributeType", tag = "20")]
    pub r#type: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ValueInfoProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
    #[prost(string, tag = "3")]
    pub doc_string: String,
}

/// `TypeProto`, tensors only (sequence/map/optional/sparse types are not declared).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TypeProto {
    #[prost(oneof = "type_proto::Value", tags = "1")]
    pub value: Option<type_proto::Value>,
    #[prost(string, tag = "6")]
    pub denotation: String,
}

pub mod type_proto {
    /// `TypeProto.Tensor`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Tensor {
        /// A `TensorProto.DataType` value.
        #[prost(int32, tag = "1")]
        pub elem_type: i32,
        #[prost(message, optional, tag = "2")]
        pub shape: Option<super::TensorShapeProto>,
    }

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        #[prost(message, tag = "1")]
        TensorType(Tensor),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<tensor_shape_proto::Dimension>,
}

pub mod tensor_shape_proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Dimension {
        #[prost(oneof = "dimension::Value", tags = "1, 2")]
        pub value: Option<dimension::Value>,
        #[prost(string, tag = "3")]
        pub denotation: String,
    }

    pub mod dimension {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Value {
            #[prost(int64, tag = "1")]
            DimValue(i64),
            #[prost(string, tag = "2")]
            DimParam(String),
        }
    }
}

/// `TensorProto.DataType` values this crate maps (the rest stay plain `i32`s).
pub mod data_type {
    pub const FLOAT: i32 = 1;
    pub const UINT8: i32 = 2;
    pub const INT32: i32 = 6;
    pub const INT64: i32 = 7;
    pub const BOOL: i32 = 9;
    pub const FLOAT16: i32 = 10;
}

/// `TensorProto.DataLocation.EXTERNAL`.
pub const DATA_LOCATION_EXTERNAL: i32 = 1;

/// `TensorProto`, without `segment` and `metadata_props` (never used for initializers we read).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    #[prost(float, repeated, tag = "4")]
    pub float_data: Vec<f32>,
    /// Also carries int8/uint8/int16/uint16/bool/float16 elements, one per int32.
    #[prost(int32, repeated, tag = "5")]
    pub int32_data: Vec<i32>,
    #[prost(bytes = "vec", repeated, tag = "6")]
    pub string_data: Vec<Vec<u8>>,
    #[prost(int64, repeated, tag = "7")]
    pub int64_data: Vec<i64>,
    #[prost(string, tag = "8")]
    pub name: String,
    #[prost(bytes = "vec", tag = "9")]
    pub raw_data: Vec<u8>,
    #[prost(double, repeated, tag = "10")]
    pub double_data: Vec<f64>,
    #[prost(uint64, repeated, tag = "11")]
    pub uint64_data: Vec<u64>,
    #[prost(string, tag = "12")]
    pub doc_string: String,
    #[prost(message, repeated, tag = "13")]
    pub external_data: Vec<StringStringEntryProto>,
    #[prost(int32, tag = "14")]
    pub data_location: i32,
}

/// A `TensorProto`'s head: its name, element type, shape and where its values are, never the
/// values. prost passes over the fields a message does not declare without copying them, so a
/// model decoded as [`ModelHead`] costs its graph's structure, not its weights (a 5M-weight
/// model with inline initializers would otherwise be copied whole to read its layout).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorHead {
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    #[prost(string, tag = "8")]
    pub name: String,
    #[prost(message, repeated, tag = "13")]
    pub external_data: Vec<StringStringEntryProto>,
    #[prost(int32, tag = "14")]
    pub data_location: i32,
}

/// `ModelProto` down to its main graph's structure: nodes, inputs and outputs, and the
/// initializers as [`TensorHead`]s (their values passed over, not copied).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelHead {
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphHead>,
}

/// `GraphProto` with its initializers as heads (see [`ModelHead`]).
#[derive(Clone, PartialEq, prost::Message)]
pub struct GraphHead {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorHead>,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
}

impl TensorProto {
    /// Its [`TensorHead`].
    pub fn head(&self) -> TensorHead {
        TensorHead {
            dims: self.dims.clone(),
            data_type: self.data_type,
            name: self.name.clone(),
            external_data: self.external_data.clone(),
            data_location: self.data_location,
        }
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StringStringEntryProto {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// Why bytes are not a protobuf message (or not one of our onnx.proto messages).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    Message(#[from] prost::DecodeError),
    #[error("field number {0} out of range")]
    FieldNumber(u64),
    #[error("field length {0} out of range")]
    Length(u64),
    #[error("unsupported wire type {0}")]
    WireType(u64),
    #[error("field truncated: {needed} bytes needed, {left} left")]
    Truncated { needed: usize, left: usize },
}

/// One top-level field of an encoded message, as raw bytes: `tag..end` is the whole field
/// (key included), `value` the payload of a length-delimited field.
#[derive(Debug, Clone)]
pub(crate) struct RawField<'a> {
    pub number: u32,
    /// The whole field, key included, exactly as encoded.
    pub bytes: &'a [u8],
    /// For length-delimited fields (wire type 2), the payload; empty otherwise.
    pub payload: &'a [u8],
}

/// Splits an encoded message into its top-level fields without decoding them, so the fields we
/// do not touch can be written back byte for byte.
pub(crate) fn raw_fields(mut buf: &[u8]) -> Result<Vec<RawField<'_>>, DecodeError> {
    let decode_varint = |b: &mut &[u8]| prost::encoding::decode_varint(b);
    let mut fields = Vec::new();
    while !buf.is_empty() {
        let start = buf;
        let key = decode_varint(&mut buf)?;
        let number = u32::try_from(key >> 3).map_err(|_| DecodeError::FieldNumber(key >> 3))?;
        let mut payload: &[u8] = &[];
        match key & 7 {
            0 => {
                decode_varint(&mut buf)?;
            }
            1 => buf = skip(buf, 8)?,
            2 => {
                let len = decode_varint(&mut buf)?;
                let len = usize::try_from(len).map_err(|_| DecodeError::Length(len))?;
                let rest = skip(buf, len)?;
                payload = &buf[..len];
                buf = rest;
            }
            5 => buf = skip(buf, 4)?,
            // Groups (3, 4) are deprecated and never used by onnx.proto.
            w => return Err(DecodeError::WireType(w)),
        }
        let used = start.len() - buf.len();
        fields.push(RawField {
            number,
            bytes: &start[..used],
            payload,
        });
    }
    Ok(fields)
}

fn skip(buf: &[u8], n: usize) -> Result<&[u8], DecodeError> {
    buf.get(n..).ok_or(DecodeError::Truncated {
        needed: n,
        left: buf.len(),
    })
}

/// Appends a length-delimited field `number` with `payload` to `out`.
pub(crate) fn put_len_field(out: &mut Vec<u8>, number: u32, payload: &[u8]) {
    prost::encoding::encode_key(number, prost::encoding::WireType::LengthDelimited, out);
    prost::encoding::encode_varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn a_model_head_has_the_structure_and_no_values() {
        let inline = TensorProto {
            dims: vec![2, 3],
            data_type: data_type::FLOAT,
            name: "w".into(),
            raw_data: vec![7; 24],
            float_data: vec![1.0; 6],
            ..Default::default()
        };
        let external = TensorProto {
            dims: vec![3],
            data_type: data_type::FLOAT,
            name: "b".into(),
            external_data: vec![StringStringEntryProto {
                key: "location".into(),
                value: "w.bin".into(),
            }],
            data_location: DATA_LOCATION_EXTERNAL,
            ..Default::default()
        };
        let node = NodeProto {
            op_type: "MatMul".into(),
            input: vec!["x".into(), "w".into()],
            output: vec!["y".into()],
            ..Default::default()
        };
        let output = ValueInfoProto {
            name: "y".into(),
            ..Default::default()
        };
        let bytes = ModelProto {
            graph: Some(GraphProto {
                node: vec![node.clone()],
                initializer: vec![inline.clone(), external.clone()],
                output: vec![output.clone()],
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec();
        let g = ModelHead::decode(bytes.as_slice())
            .expect("head")
            .graph
            .expect("graph");
        assert_eq!(g.initializer, vec![inline.head(), external.head()]);
        assert_eq!((g.node, g.output), (vec![node], vec![output]));
        // The head's encoding is its fields alone: the values were passed over.
        let head = TensorHead::decode(inline.encode_to_vec().as_slice()).expect("head");
        assert_eq!(head.encode_to_vec(), inline.head().encode_to_vec());
        assert!(head.encoded_len() < 24);
    }

    #[test]
    fn raw_fields_reassemble_to_the_same_bytes() {
        let m = ModelProto {
            ir_version: 8,
            producer_name: "t".into(),
            graph: Some(GraphProto {
                name: "g".into(),
                ..Default::default()
            }),
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
            ..Default::default()
        };
        let bytes = m.encode_to_vec();
        let fields = raw_fields(&bytes).expect("valid message");
        let joined: Vec<u8> = fields.iter().flat_map(|f| f.bytes.to_vec()).collect();
        assert_eq!(joined, bytes);
        let graph = fields
            .iter()
            .find(|f| f.number == MODEL_GRAPH_FIELD)
            .expect("graph field");
        assert_eq!(GraphProto::decode(graph.payload).expect("graph").name, "g");
    }

    #[test]
    fn raw_fields_reject_truncated_input() {
        let m = GraphProto {
            name: "a long enough name".into(),
            ..Default::default()
        };
        let bytes = m.encode_to_vec();
        assert!(raw_fields(&bytes[..bytes.len() - 3]).is_err());
    }
}
