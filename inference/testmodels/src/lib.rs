//! Small ONNX models built in Rust for tests, benchmarks and the demo, as module
//! `onnx_builder`; and the few models made by real exporters (skl2onnx, torch) that federated
//! learning must train unchanged, committed under `exported/` with the script that made them
//! ([`exported`]).
//!
//! Boundary: a dev-dependency of the crates' tests and a dependency of xtask only; no shipped
//! binary links it (the agent and the coordinator never build models).
//! Every model uses IR version 8 and the default-domain opset 17, which every ONNX Runtime the
//! agent accepts (1.24+) implements. A dimension of -1 is dynamic (named `N`).

use prost::Message;

pub mod onnx_builder {
    pub use super::*;
}

use edge_inference::onnx::{
    AttributeProto, AttributeType, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto, tensor_shape_proto, type_proto,
};
use edge_inference::{DType, Tensor};

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

/// One dense layer of an [`mlp`]: `y = x · weight + bias`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dense {
    /// Initializer name of the weight, e.g. `fc0.weight`: the name the trainer module's
    /// parameter has, so that trained weights patch in by name.
    pub weight_name: String,
    /// Initializer name of the bias, e.g. `fc0.bias`.
    pub bias_name: String,
    pub inputs: u32,
    pub outputs: u32,
    /// `[inputs, outputs]`, row-major.
    pub weight: Vec<f32>,
    /// `[outputs]`.
    pub bias: Vec<f32>,
}

/// Layers for an MLP with layer sizes `dims` (`[64, 32, 10]`: 64 inputs, one hidden layer of
/// 32, 10 classes), named `fc{i}.weight` / `fc{i}.bias`: weights uniform in
/// ±sqrt(6 / (inputs + outputs)) (Glorot) from `seed`, deterministic on every platform;
/// biases zero.
pub fn mlp_layers(dims: &[u32], seed: u64) -> Vec<Dense> {
    let mut state = seed;
    let mut uniform = move || {
        // SplitMix64, top 24 bits as a fraction in [0, 1).
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    };
    dims.windows(2)
        .enumerate()
        .map(|(i, d)| {
            let limit = (6.0 / (d[0] + d[1]) as f32).sqrt();
            Dense {
                weight_name: format!("fc{i}.weight"),
                bias_name: format!("fc{i}.bias"),
                inputs: d[0],
                outputs: d[1],
                weight: (0..d[0] * d[1])
                    .map(|_| (uniform() * 2.0 - 1.0) * limit)
                    .collect(),
                bias: vec![0.0; d[1] as usize],
            }
        })
        .collect()
}

/// A dense MLP classifier, the model the `mlp-trainer` module trains: input `x` f32
/// `[N, inputs of the first layer]` (dynamic batch), per layer `MatMul` with the weight and
/// `Add` of the bias (both initializers named as in `layers`), `Relu` between layers,
/// `Softmax` over the last axis at the end; output `probs` f32 `[N, outputs of the last
/// layer]`.
///
/// # Panics
/// If `layers` is empty, a layer's data does not match its sizes, or a layer's inputs are
/// not the previous layer's outputs (test-support code: a wrong model is a bug in the test).
pub fn mlp(layers: &[Dense]) -> Vec<u8> {
    assert!(!layers.is_empty(), "an mlp needs at least one layer");
    let mut nodes = Vec::new();
    let mut initializer = Vec::new();
    let mut input = "x".to_owned();
    for (i, l) in layers.iter().enumerate() {
        assert_eq!(
            l.weight.len(),
            (l.inputs * l.outputs) as usize,
            "{}: data does not match [{}, {}]",
            l.weight_name,
            l.inputs,
            l.outputs
        );
        assert_eq!(
            l.bias.len(),
            l.outputs as usize,
            "{}: data does not match [{}]",
            l.bias_name,
            l.outputs
        );
        if i > 0 {
            assert_eq!(
                l.inputs,
                layers[i - 1].outputs,
                "{} takes {} inputs, the layer before has {} outputs",
                l.weight_name,
                l.inputs,
                layers[i - 1].outputs
            );
        }
        // Intermediate names cannot collide with initializer names, whatever those are.
        let (mm, z) = (format!("/layer{i}/matmul"), format!("/layer{i}/add"));
        nodes.push(node(
            "MatMul",
            &[input.as_str(), l.weight_name.as_str()],
            &[mm.as_str()],
            vec![],
        ));
        if i + 1 < layers.len() {
            let relu = format!("/layer{i}/relu");
            nodes.push(node(
                "Add",
                &[mm.as_str(), l.bias_name.as_str()],
                &[z.as_str()],
                vec![],
            ));
            nodes.push(node("Relu", &[z.as_str()], &[relu.as_str()], vec![]));
            input = relu;
        } else {
            nodes.push(node(
                "Add",
                &[mm.as_str(), l.bias_name.as_str()],
                &["logits"],
                vec![],
            ));
        }
        initializer.push(init_f32(&l.weight_name, &[l.inputs, l.outputs], &l.weight));
        initializer.push(init_f32(&l.bias_name, &[l.outputs], &l.bias));
    }
    nodes.push(node(
        "Softmax",
        &["logits"],
        &["probs"],
        vec![attr_int("axis", -1)],
    ));
    let (first, last) = (&layers[0], &layers[layers.len() - 1]);
    model(GraphProto {
        name: "mlp".into(),
        node: nodes,
        initializer,
        input: vec![value_info("x", DType::F32, &[-1, i64::from(first.inputs)])],
        output: vec![value_info(
            "probs",
            DType::F32,
            &[-1, i64::from(last.outputs)],
        )],
        ..Default::default()
    })
}

/// The same computation as [`mlp`] in plain Rust: `x` is `[n, inputs]` row-major; returns
/// `[n, classes]` probabilities.
pub fn mlp_reference(layers: &[Dense], n: usize, x: &[f32]) -> Vec<f32> {
    let inputs = layers.first().map_or(0, |l| l.inputs as usize);
    let mut out = Vec::new();
    for row in x.chunks_exact(inputs.max(1)).take(n) {
        let mut a = row.to_vec();
        for (i, l) in layers.iter().enumerate() {
            let mut z = l.bias.clone();
            for (k, &ak) in a.iter().enumerate() {
                for (j, zj) in z.iter_mut().enumerate() {
                    *zj += ak * l.weight[k * l.outputs as usize + j];
                }
            }
            if i + 1 < layers.len() {
                z.iter_mut().for_each(|v| *v = v.max(0.0));
            }
            a = z;
        }
        let max = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f32> = a.iter().map(|v| (v - max).exp()).collect();
        let total: f32 = exp.iter().sum();
        out.extend(exp.iter().map(|e| e / total));
    }
    out
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

/// The exported-model fixtures in `inference/testmodels/exported/`, made by the real
/// exporters (skl2onnx, torch) with `make_fl_models.py` there: (file name, what made it).
pub const EXPORTED: &[(&str, &str)] = &[
    (
        "sklearn_mlp.onnx",
        "skl2onnx MLPClassifier 64-16-10, zipmap off",
    ),
    (
        "sklearn_sgd.onnx",
        "skl2onnx SGDClassifier(log_loss), zipmap off",
    ),
    (
        "sklearn_logreg.onnx",
        "skl2onnx LogisticRegression (ai.onnx.ml LinearClassifier)",
    ),
    (
        "torch_gemm.onnx",
        "torch.onnx.export(dynamo=False) of Linear(64,16), ReLU, Linear(16,10)",
    ),
    (
        "torch_dynamo.onnx",
        "torch.onnx.export(dynamo=True) of the same stack",
    ),
];

/// The external-data fixtures (`NAME.onnx` + `NAME.onnx.data`), made by torch's default export
/// with `make_torch_external.py` there; `torch_external_layout.txt` records what torch wrote
/// and torch's own scores for the first digits row.
pub const EXPORTED_EXTERNAL: &[(&str, &str)] = &[
    (
        "torch_mlp.onnx",
        "torch.onnx.export defaults of Linear(64,32), ReLU, Linear(32,10)",
    ),
    (
        "torch_cnn.onnx",
        "torch.onnx.export defaults of Conv2d(1,8,3), ReLU, Flatten, Linear(288,10)",
    ),
];

/// The path of an exported-model fixture (see [`EXPORTED`]).
pub fn exported_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("exported")
        .join(name)
}

/// The bytes of an exported-model fixture (see [`EXPORTED`]).
///
/// # Panics
/// If the file is missing (test-support code: the fixtures are committed).
pub fn exported(name: &str) -> Vec<u8> {
    let path = exported_path(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use edge_inference::{InferenceConfig, Model, Provider, Runtime, patch_initializers};

    /// The runtime on the workspace's library (`cargo xtask ort` puts it there; the
    /// integration tests in `tests/` run that themselves when it is missing).
    fn runtime() -> Runtime {
        let library = edge_inference::workspace_library();
        assert!(
            library.exists(),
            "{} missing: run `cargo xtask ort` (or any `cargo test -p edge-inference --test inference`, which does)",
            library.display()
        );
        Runtime::load(&InferenceConfig {
            library: Some(library),
            providers: vec![Provider::Cpu],
            intra_threads: 1,
            reject_non_finite: true,
        })
        .unwrap()
    }

    fn assert_close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "got {got:?}, want {want:?}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5,
                "element {i}: got {g}, want {w} ({got:?})"
            );
        }
    }

    fn dense(i: usize, inputs: u32, outputs: u32, weight: Vec<f32>, bias: Vec<f32>) -> Dense {
        Dense {
            weight_name: format!("fc{i}.weight"),
            bias_name: format!("fc{i}.bias"),
            inputs,
            outputs,
            weight,
            bias,
        }
    }

    /// 2 -> 2 (ReLU) -> 2 (softmax), numbers small enough to follow by hand.
    fn tiny() -> Vec<Dense> {
        vec![
            // h = relu([x0 - x1 + 0.5, 2 x0 + x1 - 1])
            dense(0, 2, 2, vec![1.0, 2.0, -1.0, 1.0], vec![0.5, -1.0]),
            // logits = [h0 + h1, -h1]
            dense(1, 2, 2, vec![1.0, 0.0, 1.0, -1.0], vec![0.0, 0.0]),
        ]
    }

    #[test]
    fn mlp_runs_and_matches_a_forward_pass_by_hand() {
        let rt = runtime();
        let layers = tiny();
        let m = Model::load(&rt, "mlp", "1", &mlp(&layers)).unwrap();
        assert_eq!(m.inputs()[0].name, "x");
        assert_eq!(m.inputs()[0].shape, vec![None, Some(2)]);
        assert_eq!(m.outputs()[0].name, "probs");
        // x = [1, 2]: h = relu([-0.5, 3]) = [0, 3]; logits = [3, -3].
        // x = [0, 0]: h = relu([0.5, -1]) = [0.5, 0]; logits = [0.5, 0].
        let x = Tensor::from_f32(vec![2, 2], &[1.0, 2.0, 0.0, 0.0]).unwrap();
        let out = m.run(&[x]).unwrap();
        assert_eq!(out[0].shape(), &[2, 2]);
        let softmax2 = |a: f32, b: f32| {
            let (ea, eb) = (a.exp(), b.exp());
            [ea / (ea + eb), eb / (ea + eb)]
        };
        let want: Vec<f32> = [softmax2(3.0, -3.0), softmax2(0.5, 0.0)].concat();
        let got = out[0].to_f32().unwrap();
        assert_close(&got, &want);
        assert_close(&mlp_reference(&layers, 2, &[1.0, 2.0, 0.0, 0.0]), &want);
    }

    #[test]
    fn a_digits_sized_mlp_matches_the_reference() {
        let rt = runtime();
        let layers = mlp_layers(&[64, 32, 10], 7);
        assert_eq!(layers.len(), 2);
        assert_eq!(layers[1].weight_name, "fc1.weight");
        assert_eq!(layers, mlp_layers(&[64, 32, 10], 7));
        assert_ne!(layers, mlp_layers(&[64, 32, 10], 8));
        let m = Model::load(&rt, "mlp", "1", &mlp(&layers)).unwrap();
        let n = 5;
        let x: Vec<f32> = (0..n * 64).map(|i| ((i * 7) % 17) as f32).collect();
        let out = m
            .run(&[Tensor::from_f32(vec![n as u32, 64], &x).unwrap()])
            .unwrap();
        assert_eq!(out[0].shape(), &[n as u32, 10]);
        assert_close(&out[0].to_f32().unwrap(), &mlp_reference(&layers, n, &x));
    }

    #[test]
    fn patching_trained_weights_by_name_changes_the_outputs() {
        let rt = runtime();
        let layers = tiny();
        let bytes = mlp(&layers);
        // As the trainer returns them: every parameter, by its name.
        let mut trained = layers.clone();
        trained[0].weight = vec![0.5, -1.0, 1.5, 0.25];
        trained[0].bias = vec![0.1, 0.2];
        trained[1].weight = vec![-2.0, 1.0, 0.5, 3.0];
        trained[1].bias = vec![1.0, -1.0];
        let updates: Vec<(&str, Tensor)> = trained
            .iter()
            .flat_map(|l| {
                [
                    (
                        l.weight_name.as_str(),
                        Tensor::from_f32(vec![l.inputs, l.outputs], &l.weight).unwrap(),
                    ),
                    (
                        l.bias_name.as_str(),
                        Tensor::from_f32(vec![l.outputs], &l.bias).unwrap(),
                    ),
                ]
            })
            .collect();
        let patched = patch_initializers(&bytes, &updates).unwrap();
        let x = [1.0, 2.0, -0.5, 0.25];
        let run = |model: &[u8]| {
            let m = Model::load(&rt, "mlp", "1", model).unwrap();
            m.run(&[Tensor::from_f32(vec![2, 2], &x).unwrap()]).unwrap()[0]
                .to_f32()
                .unwrap()
        };
        let (before, after) = (run(&bytes), run(&patched));
        assert_close(&before, &mlp_reference(&layers, 2, &x));
        assert_close(&after, &mlp_reference(&trained, 2, &x));
        assert!(
            before.iter().zip(&after).any(|(a, b)| (a - b).abs() > 1e-3),
            "{before:?} vs {after:?}"
        );
        // The same model as building it from the trained weights directly.
        assert_eq!(patched, mlp(&trained));
    }
}
