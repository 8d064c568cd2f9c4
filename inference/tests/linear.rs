//! scikit-learn's `LogisticRegression` as skl2onnx writes it (`sklearn_logreg.onnx`, an
//! `ai.onnx.ml` `LinearClassifier` with its weights in attributes), rewritten by
//! `trainable_form` into a `Gemm` layer the trainer finds: the same labels and probabilities on
//! the real ONNX Runtime, the weights in initializers, and the forms it cannot train left alone.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::{assert_close, runtime};
use edge_inference::onnx::{AttributeProto, ModelProto, NodeProto, OperatorSetIdProto};
use edge_inference::{Layout, Model, Tensor, dense_layers, read_initializers, trainable_form};
use edge_testmodels::onnx_builder::exported;
use prost::Message;

/// The first `n` digits rows (pixel values / 16), from the committed data set.
fn digits(n: usize) -> Vec<f32> {
    let gz = std::fs::read(common::root().join("tests/data/digits.csv.gz")).unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut text).unwrap();
    text.lines()
        .take(n)
        .flat_map(|l| {
            l.split(',')
                .take(64)
                .map(|v| v.parse::<f32>().unwrap() / 16.0)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The exported LogisticRegression, decoded.
fn fixture() -> ModelProto {
    ModelProto::decode(exported("sklearn_logreg.onnx").as_slice()).unwrap()
}

/// The model's (first) `LinearClassifier` node.
fn classifier(m: &mut ModelProto) -> &mut NodeProto {
    let g = m.graph.as_mut().unwrap();
    g.node
        .iter_mut()
        .find(|n| n.op_type == "LinearClassifier")
        .unwrap()
}

/// The fixture's classifier's attribute `name`, as floats.
fn attribute(name: &str) -> Vec<f32> {
    let mut m = fixture();
    let a = classifier(&mut m).attribute.iter().find(|a| a.name == name);
    a.unwrap().floats.clone()
}

/// The fixture with its classifier's attribute `name` changed by `change`.
fn with_attribute(name: &str, change: impl Fn(&mut AttributeProto)) -> Vec<u8> {
    let mut m = fixture();
    let a = classifier(&mut m)
        .attribute
        .iter_mut()
        .find(|a| a.name == name);
    change(a.unwrap());
    m.encode_to_vec()
}

#[test]
fn logistic_regression_becomes_one_gemm_layer_with_its_weights_in_initializers() {
    let original = exported("sklearn_logreg.onnx");
    let model = trainable_form(&original).unwrap().expect("rewritten");
    let layers = dense_layers(&model).expect("a layer the trainer trains");
    assert_eq!(layers.len(), 1);
    let l = &layers[0];
    assert_eq!(
        (l.weight.as_str(), l.bias.as_str(), l.layout),
        (
            "LinearClassifier.coefficients",
            "LinearClassifier.intercepts",
            Layout::OutIn
        )
    );
    assert_eq!((l.inputs, l.outputs), (64, 10));
    let inits = read_initializers(&model).unwrap();
    let value = |name: &str| {
        inits
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, t)| t.to_f32())
            .unwrap()
    };
    assert_eq!(
        value("LinearClassifier.coefficients"),
        attribute("coefficients")
    );
    assert_eq!(
        value("LinearClassifier.intercepts"),
        attribute("intercepts")
    );
    // Rewriting the rewritten model changes nothing more.
    assert_eq!(trainable_form(&model).unwrap(), None);
}

#[test]
fn the_rewritten_model_gives_the_same_labels_and_probabilities() {
    let original = exported("sklearn_logreg.onnx");
    let model = trainable_form(&original).unwrap().expect("rewritten");
    let rt = runtime();
    let n = 40;
    let x = Tensor::from_f32(vec![n as u32, 64], &digits(n)).unwrap();
    let run = |bytes: &[u8]| {
        let m = Model::load(&rt, "logreg", "1", bytes).expect("loads");
        let out = m.run(std::slice::from_ref(&x)).expect("runs");
        (
            out[0].to_i64().expect("int64 label"),
            out[1].to_f32().expect("f32 probabilities"),
        )
    };
    let (want_labels, want_p) = run(&original);
    let (labels, p) = run(&model);
    assert_eq!(labels, want_labels);
    assert_close(&p, &want_p);
    // Not a model that predicts one class for everything: the comparison means something.
    let distinct: std::collections::BTreeSet<i64> = labels.iter().copied().collect();
    assert!(distinct.len() > 5, "{distinct:?}");
}

#[test]
fn two_unnamed_classifiers_get_weights_of_their_own() {
    let mut m = fixture();
    let first = classifier(&mut m);
    first.name.clear();
    let mut second = first.clone();
    second.output = vec!["label2".into(), "p2".into()];
    m.graph.as_mut().unwrap().node.push(second);
    let model = trainable_form(&m.encode_to_vec())
        .unwrap()
        .expect("rewritten");
    let names: Vec<String> = read_initializers(&model)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.ends_with("coefficients"))
        .collect();
    assert_eq!(
        names,
        [
            "LinearClassifier.coefficients",
            "LinearClassifier_1.coefficients"
        ]
    );
}

#[test]
fn forms_the_trainer_cannot_fit_are_left_for_the_structure_check_to_refuse() {
    // One-vs-rest (a sigmoid per class): not the softmax the trainer fits.
    let ovr = with_attribute("post_transform", |a| a.s = b"LOGISTIC".to_vec());
    assert_eq!(trainable_form(&ovr).unwrap(), None);
    let e = dense_layers(&ovr).expect_err("refused").to_string();
    assert!(
        e.contains("LinearClassifier") && e.contains("softmax"),
        "{e}"
    );
    // Coefficients that do not fill whole rows of the classes.
    let ragged = with_attribute("coefficients", |a| {
        a.floats.pop();
    });
    assert_eq!(trainable_form(&ragged).unwrap(), None);
    // No standard opset to write the new nodes in.
    let mut m = fixture();
    m.opset_import = vec![OperatorSetIdProto {
        domain: "ai.onnx.ml".into(),
        version: 1,
    }];
    assert_eq!(trainable_form(&m.encode_to_vec()).unwrap(), None);
    // Not a model at all.
    assert!(trainable_form(b"\xff\xff\xff").is_err());
}
