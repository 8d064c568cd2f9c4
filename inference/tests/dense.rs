//! Layer discovery on the exporters' own models (`inference/testmodels/exported/`) and on
//! models built to break each rule.

use edge_inference::DType;
use edge_inference::dense::{
    DenseLayer, Layout, NamedWeights, dense_layers, from_trainer, into_trainer, to_trainer,
    trainable_names,
};
use edge_inference::onnx::GraphProto;
use edge_inference::read_initializers;
use edge_testmodels::onnx_builder::{self as b, exported};
use edge_testmodels::onnx_builder::{attr_int, init_f32, node, value_info};

fn names(layers: &[DenseLayer]) -> Vec<(&str, Layout, &str, u32, u32)> {
    layers
        .iter()
        .map(|l| {
            (
                l.weight.as_str(),
                l.layout,
                l.bias.as_str(),
                l.inputs,
                l.outputs,
            )
        })
        .collect()
}

#[test]
fn sklearn_mlp_layers_by_structure_with_row_biases() {
    let layers = dense_layers(&exported("sklearn_mlp.onnx")).expect("ok");
    assert_eq!(
        names(&layers),
        [
            ("coefficient", Layout::InOut, "intercepts", 64, 16),
            ("coefficient1", Layout::InOut, "intercepts1", 16, 10)
        ]
    );
    assert_eq!(layers[0].bias_shape, [1, 16]);
}

#[test]
fn sklearn_sgd_is_one_layer_and_its_head_is_not_trained() {
    let layers = dense_layers(&exported("sklearn_sgd.onnx")).expect("ok");
    assert_eq!(
        names(&layers),
        [("coef", Layout::InOut, "intercept", 64, 10)]
    );
}

#[test]
fn torch_gemm_weights_are_out_in() {
    for f in ["torch_gemm.onnx", "torch_dynamo.onnx"] {
        let layers = dense_layers(&exported(f)).expect("ok");
        assert_eq!(
            names(&layers),
            [
                ("0.weight", Layout::OutIn, "0.bias", 64, 16),
                ("2.weight", Layout::OutIn, "2.bias", 16, 10)
            ],
            "{f}"
        );
        assert_eq!(layers[0].weight_shape, [16, 64]);
    }
}

/// skl2onnx's LogisticRegression as exported, before `trainable_form` (tests/linear.rs)
/// rewrites it: its weights are attributes, and the structure check says so.
#[test]
fn a_linear_classifier_as_exported_is_refused_naming_the_operator() {
    let err = dense_layers(&exported("sklearn_logreg.onnx")).expect_err("refused");
    let text = err.to_string();
    assert!(text.contains("LinearClassifier"), "{text}");
    assert!(text.contains("attributes"), "{text}");
}

#[test]
fn to_trainer_and_back_is_the_identity_and_transposes_gemm_weights() {
    let model = exported("torch_gemm.onnx");
    let layers = dense_layers(&model).expect("ok");
    let inits = read_initializers(&model).expect("ok");
    // Reversed: the order the weights arrive in does not matter.
    let given: Vec<NamedWeights> = inits
        .iter()
        .rev()
        .map(|(n, t)| NamedWeights {
            name: n.clone(),
            shape: t.shape().to_vec(),
            data: t.to_f32().expect("ok"),
        })
        .collect();
    let views: Vec<_> = given.iter().map(NamedWeights::view).collect();
    let trainer = to_trainer(&layers, &views).expect("ok");
    assert_eq!(trainer[0].shape, [64, 16]);
    assert_eq!(trainer[1].shape, [16]);
    // W[o][i] of the model is W'[i][o] for the trainer.
    let w = &given
        .iter()
        .find(|w| w.name == "0.weight")
        .expect("ok")
        .data;
    assert_eq!(trainer[0].data[3 * 16 + 5], w[5 * 64 + 3]);
    let back = from_trainer(&layers, trainer).expect("ok");
    for b in &back {
        let g = given.iter().find(|w| w.name == b.name).expect("ok");
        assert_eq!((&b.shape, &b.data), (&g.shape, &g.data), "{}", b.name);
    }
}

/// The caller's own weights move into the trainer's layout: a tensor in that layout already
/// keeps its buffer (no second copy of the model on a device), a transposed one gets a new one.
#[test]
fn into_trainer_moves_the_weights_it_need_not_transpose() {
    let owned = |file: &str| {
        let model = exported(file);
        let given: Vec<NamedWeights> = read_initializers(&model)
            .expect("ok")
            .iter()
            .filter_map(|(n, t)| {
                Some(NamedWeights {
                    name: n.clone(),
                    shape: t.shape().to_vec(),
                    data: t.to_f32()?,
                })
            })
            .collect();
        (dense_layers(&model).expect("ok"), given)
    };
    let (layers, given) = owned("sklearn_mlp.onnx");
    let buffers: Vec<(String, *const f32)> = given
        .iter()
        .map(|w| (w.name.clone(), w.data.as_ptr()))
        .collect();
    let trainer = into_trainer(&layers, given).expect("ok");
    assert_eq!(trainer.len(), 4);
    for t in &trainer {
        let (_, at) = buffers.iter().find(|(n, _)| *n == t.name).expect("given");
        assert_eq!(t.data.as_ptr(), *at, "{} was copied", t.name);
    }
    // skl2onnx's [1, n] biases become [n] for the trainer.
    assert_eq!(trainer[1].shape, [16]);

    let (layers, given) = owned("torch_gemm.onnx");
    let weight_at = given
        .iter()
        .find(|w| w.name == "0.weight")
        .expect("ok")
        .data
        .as_ptr();
    let trainer = into_trainer(&layers, given).expect("ok");
    assert_ne!(trainer[0].data.as_ptr(), weight_at, "transposed");
    assert_eq!(trainer[0].shape, [64, 16]);
}

#[test]
fn to_trainer_names_a_missing_or_reshaped_tensor() {
    let layers = dense_layers(&exported("sklearn_mlp.onnx")).expect("ok");
    let err = to_trainer(&layers, &[]).expect_err("refused");
    assert!(err.contains("coefficient"), "{err}");
    let wrong = [NamedWeights {
        name: "coefficient".into(),
        shape: vec![16, 64],
        data: vec![0.0; 1024],
    }];
    let views: Vec<_> = wrong.iter().map(NamedWeights::view).collect();
    let err = to_trainer(&layers, &views).expect_err("refused");
    assert!(
        err.contains("[16, 64]") && err.contains("[64, 16]"),
        "{err}"
    );
}

fn graph(
    nodes: Vec<edge_inference::onnx::NodeProto>,
    inits: Vec<edge_inference::onnx::TensorProto>,
) -> Vec<u8> {
    b::model(GraphProto {
        name: "g".into(),
        node: nodes,
        initializer: inits,
        input: vec![value_info("x", DType::F32, &[-1, 2])],
        output: vec![value_info("y", DType::F32, &[-1, 2])],
        ..Default::default()
    })
}

#[test]
fn built_models_that_break_a_rule_are_named() {
    let w = || init_f32("W", &[2, 2], &[0.0; 4]);
    let bias = || init_f32("B", &[2], &[0.0; 2]);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            graph(vec![node("MatMul", &["x", "W"], &["y"], vec![])], vec![w()]),
            "W is not followed by an Add of a bias",
        ),
        (
            graph(
                vec![
                    node("MatMul", &["x", "W"], &["m"], vec![]),
                    node("Add", &["m", "B"], &["z"], vec![]),
                    node("Tanh", &["z"], &["t"], vec![]),
                    node("MatMul", &["t", "W2"], &["y"], vec![]),
                ],
                vec![w(), bias(), init_f32("W2", &[2, 2], &[0.0; 4])],
            ),
            "uses the weight \"W2\"",
        ),
        (
            graph(vec![node("Conv", &["x", "W"], &["y"], vec![])], vec![w()]),
            "(Conv) cannot be trained",
        ),
        (
            graph(
                vec![node(
                    "Gemm",
                    &["x", "W"],
                    &["y"],
                    vec![attr_int("transB", 1)],
                )],
                vec![w()],
            ),
            "W has no bias",
        ),
        (
            graph(
                vec![
                    node("MatMul", &["x", "W"], &["m"], vec![]),
                    node("Add", &["m", "B"], &["y"], vec![]),
                ],
                vec![w(), init_f32("B", &[3], &[0.0; 3])],
            ),
            "bias B has shape [3], expected [2] or [1, 2]",
        ),
    ];
    for (model, want) in cases {
        let err = dense_layers(&model).expect_err("refused").to_string();
        assert!(err.contains(want), "want {want:?}, got {err:?}");
    }
    // The builder's own MLP (MatMul + Add, [n] biases) is found as before.
    let layers = b::mlp_layers(&[4, 3, 2], 1);
    let found = dense_layers(&b::mlp(&layers)).expect("ok");
    assert_eq!(
        trainable_names(&found),
        ["fc0.weight", "fc0.bias", "fc1.weight", "fc1.bias"]
    );
}
