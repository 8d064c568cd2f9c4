//! Small ONNX models built in Rust for tests and benchmarks (no Python, no files checked in).
//!
//! Boundary: test and benchmark support only; the agent never builds models.
//! Every model uses IR version 8 and the default-domain opset 17, which every ONNX Runtime the
//! agent accepts (1.24+) implements. A dimension of -1 is dynamic (named `N`).

use prost::Message;

use crate::onnx::{
    AttributeProto, AttributeType, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto, tensor_shape_proto, type_proto,
};
use crate::tensor::{DType, Tensor};

pub const IR_VERSION: i64 = 8;
pub const OPSET: i64 = 17;

/// A tensor input/output declaration; -1 in `dims` is a dynamic dimension.
pub fn value_info(name: &str, dtype: DType, dims: &[i64]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|&d| tensor_shape_proto::Dimension {
            value: Some(if d < 0 {
                tensor_shape_proto::dimension::Value::DimParam("N".into())
            } else {
                tensor_shape_proto::dimension::Value::DimValue(d)
            }),
            denotation: String::new(),
        })
        .collect();
    ValueInfoProto {
        name: name.to_owned(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: dtype.onnx_code(),
                shape: Some(TensorShapeProto { dim }),
            })),
            denotation: String::new(),
        }),
        doc_string: String::new(),
    }
}

pub fn node(
    op: &str,
    inputs: &[&str],
    outputs: &[&str],
    attribute: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| (*s).to_owned()).collect(),
        output: outputs.iter().map(|s| (*s).to_owned()).collect(),
        name: format!("{op}_{}", outputs.first().copied().unwrap_or("")),
        op_type: op.to_owned(),
        attribute,
        ..Default::default()
    }
}

pub fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.to_owned(),
        i,
        r#type: AttributeType::Int as i32,
        ..Default::default()
    }
}

pub fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.to_owned(),
        ints: ints.to_vec(),
        r#type: AttributeType::Ints as i32,
        ..Default::default()
    }
}

/// An f32 initializer.
pub fn init_f32(name: &str, dims: &[u32], values: &[f32]) -> TensorProto {
    let mut t = TensorProto {
        name: name.to_owned(),
        dims: dims.iter().map(|&d| i64::from(d)).collect(),
        data_type: DType::F32.onnx_code(),
        ..Default::default()
    };
    t.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    t
}

/// Wraps a graph into an encoded model.
pub fn model(graph: GraphProto) -> Vec<u8> {
    ModelProto {
        ir_version: IR_VERSION,
        producer_name: "edge-inference onnx_builder".into(),
        graph: Some(graph),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        ..Default::default()
    }
    .encode_to_vec()
}

/// `sum = a + b`, f32 vectors of length `len`.
pub fn add(len: i64) -> Vec<u8> {
    model(GraphProto {
        name: "add".into(),
        node: vec![node("Add", &["a", "b"], &["sum"], vec![])],
        input: vec![
            value_info("a", DType::F32, &[len]),
            value_info("b", DType::F32, &[len]),
        ],
        output: vec![value_info("sum", DType::F32, &[len])],
        ..Default::default()
    })
}

/// `y = Identity(x)`: round-trips every dtype through ONNX Runtime.
pub fn identity(dtype: DType, dims: &[i64]) -> Vec<u8> {
    model(GraphProto {
        name: "identity".into(),
        node: vec![node("Identity", &["x"], &["y"], vec![])],
        input: vec![value_info("x", dtype, dims)],
        output: vec![value_info("y", dtype, dims)],
        ..Default::default()
    })
}

/// A linear layer `y = x · W + B`: `x` is `[N, inputs]`, `W` (`[inputs, outputs]`, row-major)
/// and `B` (`[outputs]`) are initializers, so weight patching can replace them.
pub fn linear(inputs: u32, outputs: u32, w: &[f32], b: &[f32]) -> Vec<u8> {
    model(GraphProto {
        name: "linear".into(),
        node: vec![
            node("MatMul", &["x", "W"], &["xw"], vec![]),
            node("Add", &["xw", "B"], &["y"], vec![]),
        ],
        initializer: vec![
            init_f32("W", &[inputs, outputs], w),
            init_f32("B", &[outputs], b),
        ],
        input: vec![value_info("x", DType::F32, &[-1, i64::from(inputs)])],
        output: vec![value_info("y", DType::F32, &[-1, i64::from(outputs)])],
        ..Default::default()
    })
}

/// `y = x / x`: NaN on the all-zero probe input, so it always fails a health check.
pub fn nan_on_probe() -> Vec<u8> {
    model(GraphProto {
        name: "nan".into(),
        node: vec![node("Div", &["x", "x"], &["y"], vec![])],
        input: vec![value_info("x", DType::F32, &[-1, 4])],
        output: vec![value_info("y", DType::F32, &[-1, 4])],
        ..Default::default()
    })
}

/// A model whose only node is an operator no ONNX Runtime implements.
pub fn unknown_operator() -> Vec<u8> {
    model(GraphProto {
        name: "unknown".into(),
        node: vec![node("EdgeNoSuchOperator", &["x"], &["y"], vec![])],
        input: vec![value_info("x", DType::F32, &[1, 4])],
        output: vec![value_info("y", DType::F32, &[1, 4])],
        ..Default::default()
    })
}

/// Weights of [`SmallCnn`]: `Conv(1→C, 3x3, pad 1)` → Relu → GlobalAveragePool → Flatten →
/// `Gemm(C→K)` → Softmax, on `[N, 1, H, W]` images.
#[derive(Debug, Clone)]
pub struct SmallCnn {
    pub height: u32,
    pub width: u32,
    pub channels: u32,
    pub classes: u32,
    /// `[channels, 1, 3, 3]`.
    pub conv_w: Vec<f32>,
    /// `[channels]`.
    pub conv_b: Vec<f32>,
    /// `[channels, classes]` (Gemm with transB = 0).
    pub fc_w: Vec<f32>,
    /// `[classes]`.
    pub fc_b: Vec<f32>,
}

impl SmallCnn {
    /// Deterministic weights for an 8x8 single-channel input (the digits data set's size),
    /// 4 filters, 10 classes.
    pub fn example() -> SmallCnn {
        let (channels, classes) = (4u32, 10u32);
        let wave = |i: usize, k: f32| (i as f32 * k).sin() * 0.5;
        SmallCnn {
            height: 8,
            width: 8,
            channels,
            classes,
            conv_w: (0..(channels * 9) as usize).map(|i| wave(i, 0.7)).collect(),
            conv_b: (0..channels as usize)
                .map(|i| 0.1 * i as f32 - 0.1)
                .collect(),
            fc_w: (0..(channels * classes) as usize)
                .map(|i| wave(i, 1.3))
                .collect(),
            fc_b: (0..classes as usize).map(|i| 0.01 * i as f32).collect(),
        }
    }

    pub fn to_onnx(&self) -> Vec<u8> {
        let (c, k) = (self.channels, self.classes);
        model(GraphProto {
            name: "small_cnn".into(),
            node: vec![
                node(
                    "Conv",
                    &["x", "conv_w", "conv_b"],
                    &["conv"],
                    vec![
                        attr_ints("kernel_shape", &[3, 3]),
                        attr_ints("pads", &[1, 1, 1, 1]),
                    ],
                ),
                node("Relu", &["conv"], &["relu"], vec![]),
                node("GlobalAveragePool", &["relu"], &["pool"], vec![]),
                node("Flatten", &["pool"], &["flat"], vec![attr_int("axis", 1)]),
                node("Gemm", &["flat", "fc_w", "fc_b"], &["logits"], vec![]),
                node(
                    "Softmax",
                    &["logits"],
                    &["probs"],
                    vec![attr_int("axis", -1)],
                ),
            ],
            initializer: vec![
                init_f32("conv_w", &[c, 1, 3, 3], &self.conv_w),
                init_f32("conv_b", &[c], &self.conv_b),
                init_f32("fc_w", &[c, k], &self.fc_w),
                init_f32("fc_b", &[k], &self.fc_b),
            ],
            input: vec![value_info(
                "x",
                DType::F32,
                &[-1, 1, i64::from(self.height), i64::from(self.width)],
            )],
            output: vec![value_info("probs", DType::F32, &[-1, i64::from(k)])],
            ..Default::default()
        })
    }

    /// The same computation in plain Rust, for checking ONNX Runtime's numbers. `x` is
    /// `[n, 1, height, width]` row-major; returns `[n, classes]`.
    pub fn reference(&self, n: usize, x: &[f32]) -> Vec<f32> {
        let (h, w, c, k) = (
            self.height as usize,
            self.width as usize,
            self.channels as usize,
            self.classes as usize,
        );
        let mut out = Vec::with_capacity(n * k);
        for img in x.chunks_exact(h * w).take(n) {
            let mut pooled = vec![0f32; c];
            for (ch, p) in pooled.iter_mut().enumerate() {
                let mut sum = 0f32;
                for i in 0..h {
                    for j in 0..w {
                        let mut acc = self.conv_b[ch];
                        for di in 0..3 {
                            for dj in 0..3 {
                                let (ii, jj) =
                                    (i as isize + di as isize - 1, j as isize + dj as isize - 1);
                                if ii >= 0 && jj >= 0 && (ii as usize) < h && (jj as usize) < w {
                                    acc += img[ii as usize * w + jj as usize]
                                        * self.conv_w[ch * 9 + di * 3 + dj];
                                }
                            }
                        }
                        sum += acc.max(0.0);
                    }
                }
                *p = sum / (h * w) as f32;
            }
            let logits: Vec<f32> = (0..k)
                .map(|j| {
                    self.fc_b[j]
                        + (0..c)
                            .map(|i| pooled[i] * self.fc_w[i * k + j])
                            .sum::<f32>()
                })
                .collect();
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
            let total: f32 = exp.iter().sum();
            out.extend(exp.iter().map(|e| e / total));
        }
        out
    }

    /// A deterministic input batch `[n, 1, height, width]`.
    pub fn example_input(&self, n: u32) -> Tensor {
        let len = (n * self.height * self.width) as usize;
        let values: Vec<f32> = (0..len).map(|i| ((i * 7) % 17) as f32 / 16.0).collect();
        #[allow(clippy::expect_used)] // the shape is built from the same numbers as the data
        Tensor::from_f32(vec![n, 1, self.height, self.width], &values).expect("shape matches data")
    }
}
