//! scikit-learn's linear classifiers as skl2onnx writes them, in a form federated training can
//! use. skl2onnx writes `LogisticRegression` as one `ai.onnx.ml` `LinearClassifier` node whose
//! weights are attributes (`coefficients`, `intercepts`), not initializers, so nothing finds,
//! patches or sends them. [`trainable_form`] rewrites each such node into standard operators
//! with the weights in initializers and the same outputs:
//!
//! ```text
//! LinearClassifier(X) -> label, P       becomes   scores = Gemm(X, W, b, transB=1)
//!                                                  P      = Softmax(scores)
//!                                                  label  = Gather(classes, ArgMax(scores))
//! ```
//!
//! `W` is `coefficients` as `[classes, features]` (the node's row-major layout, what a torch
//! `Gemm` with `transB=1` holds), `b` is `intercepts`, `classes` the int64 `classlabels_ints`.
//! The operator's definition (onnx/docs/Operators-ml.md, `ai.onnx.ml.LinearClassifier`): scores
//! are `X * coefficients^T + intercepts`, the label is the class of the highest score, and the
//! `SOFTMAX` post-transform turns the scores into probabilities. Only that form is rewritten:
//! a softmax over classes is what the trainer fits. Any other (`LOGISTIC` one-vs-rest, string
//! labels, a binary model's single row) is left as it is, and [`crate::dense_layers`] refuses
//! it naming the node.
//!
//! The coordinator rewrites a task's initial model and the agent the model a pipeline trains,
//! the same way, so the initializers have the same names on both sides:
//! `{node name}.coefficients` and `{node name}.intercepts`.

use prost::Message;

use crate::onnx::{
    self, AttributeProto, AttributeType, GRAPH_INITIALIZER_FIELD, MODEL_GRAPH_FIELD, NodeProto,
    OperatorSetIdProto, TensorProto, data_type,
};
use crate::patch::PatchError;

/// Field number of `GraphProto.node`.
const GRAPH_NODE_FIELD: u32 = 1;
/// Field number of `ModelProto.opset_import`.
const MODEL_OPSET_FIELD: u32 = 8;

/// `model` with every `LinearClassifier` that has a softmax form rewritten into standard
/// operators (see the module docs); `None` when it has none (or imports no standard opset of
/// at least 13, which the new nodes need). Other fields are written back byte for byte.
pub fn trainable_form(model: &[u8]) -> Result<Option<Vec<u8>>, PatchError> {
    let decode = |e: prost::DecodeError| PatchError::Decode(e.into());
    let fields = onnx::raw_fields(model).map_err(PatchError::Decode)?;
    let standard_opset = fields
        .iter()
        .filter(|f| f.number == MODEL_OPSET_FIELD)
        .filter_map(|f| OperatorSetIdProto::decode(f.payload).ok())
        .any(|o| (o.domain.is_empty() || o.domain == "ai.onnx") && o.version >= 13);
    if !standard_opset || !has_softmax_classifier(&fields)? {
        // Most models: nothing to rewrite, and nothing copied.
        return Ok(None);
    }
    let mut out = Vec::with_capacity(model.len());
    let mut bases: Vec<String> = Vec::new();
    for field in fields {
        if field.number != MODEL_GRAPH_FIELD {
            out.extend_from_slice(field.bytes);
            continue;
        }
        let mut graph = Vec::with_capacity(field.payload.len());
        let mut added = Vec::new();
        for g in onnx::raw_fields(field.payload).map_err(PatchError::Decode)? {
            if g.number != GRAPH_NODE_FIELD {
                graph.extend_from_slice(g.bytes);
                continue;
            }
            let node = NodeProto::decode(g.payload).map_err(decode)?;
            match softmax_classifier(&node) {
                Some(c) => {
                    // The node's name, made unique among the rewritten ones (in graph order,
                    // so the coordinator and every device name the weights alike).
                    let mut base = if node.name.is_empty() {
                        "LinearClassifier".to_owned()
                    } else {
                        node.name.clone()
                    };
                    if bases.contains(&base) {
                        base = format!("{base}_{}", bases.len());
                    }
                    let (nodes, inits) = c.rewrite(&node, &base);
                    bases.push(base);
                    for n in nodes {
                        onnx::put_len_field(&mut graph, GRAPH_NODE_FIELD, &n.encode_to_vec());
                    }
                    added.extend(inits);
                }
                None => graph.extend_from_slice(g.bytes),
            }
        }
        for t in added {
            onnx::put_len_field(&mut graph, GRAPH_INITIALIZER_FIELD, &t.encode_to_vec());
        }
        onnx::put_len_field(&mut out, MODEL_GRAPH_FIELD, &graph);
    }
    Ok((!bases.is_empty()).then_some(out))
}

/// Whether the model's graph has a node [`trainable_form`] rewrites (nodes are small: a
/// model's weights are in its initializers, passed over here).
fn has_softmax_classifier(fields: &[onnx::RawField<'_>]) -> Result<bool, PatchError> {
    for field in fields.iter().filter(|f| f.number == MODEL_GRAPH_FIELD) {
        for g in onnx::raw_fields(field.payload).map_err(PatchError::Decode)? {
            if g.number == GRAPH_NODE_FIELD {
                let node =
                    NodeProto::decode(g.payload).map_err(|e| PatchError::Decode(e.into()))?;
                if softmax_classifier(&node).is_some() {
                    return Ok(true);
                }
            }
        }
    }
    Ok(false)
}

/// A `LinearClassifier` with a softmax over three or more int64 classes.
struct SoftmaxClassifier<'n> {
    coefficients: &'n [f32],
    intercepts: &'n [f32],
    classes: &'n [i64],
}

fn softmax_classifier(node: &NodeProto) -> Option<SoftmaxClassifier<'_>> {
    if node.op_type != "LinearClassifier" || node.domain != "ai.onnx.ml" {
        return None;
    }
    let attr = |name: &str| node.attribute.iter().find(|a| a.name == name);
    let classes = attr("classlabels_ints")?.ints.as_slice();
    let coefficients = attr("coefficients")?.floats.as_slice();
    let intercepts = attr("intercepts")?.floats.as_slice();
    let softmax = attr("post_transform").is_some_and(|a| a.s == b"SOFTMAX");
    let fits = classes.len() >= 3
        && intercepts.len() == classes.len()
        && !coefficients.is_empty()
        && coefficients.len() % classes.len() == 0;
    let single_output_pair = node.input.len() == 1 && node.output.len() == 2;
    (softmax && fits && single_output_pair).then_some(SoftmaxClassifier {
        coefficients,
        intercepts,
        classes,
    })
}

impl SoftmaxClassifier<'_> {
    /// The nodes and initializers that replace `node`, named after `base`.
    fn rewrite(&self, node: &NodeProto, base: &str) -> (Vec<NodeProto>, Vec<TensorProto>) {
        let name = |suffix: &str| format!("{base}.{suffix}");
        let (weight, bias, classes) = (name("coefficients"), name("intercepts"), name("classes"));
        let (scores, index) = (name("scores"), name("index"));
        let n = self.classes.len();
        let features = self.coefficients.len() / n;
        let f32_tensor = |name: &str, dims: Vec<i64>, values: &[f32]| TensorProto {
            name: name.to_owned(),
            dims,
            data_type: data_type::FLOAT,
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        };
        let inits = vec![
            f32_tensor(&weight, vec![n as i64, features as i64], self.coefficients),
            f32_tensor(&bias, vec![n as i64], self.intercepts),
            TensorProto {
                name: classes.clone(),
                dims: vec![n as i64],
                data_type: data_type::INT64,
                raw_data: self.classes.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ..Default::default()
            },
        ];
        let op =
            |op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>| NodeProto {
                input: inputs.iter().map(|s| (*s).to_owned()).collect(),
                output: vec![output.to_owned()],
                name: format!("{base}/{op}"),
                op_type: op.to_owned(),
                attribute,
                ..Default::default()
            };
        let int = |name: &str, i: i64| AttributeProto {
            name: name.to_owned(),
            i,
            r#type: AttributeType::Int as i32,
            ..Default::default()
        };
        let (label, probabilities) = (node.output[0].as_str(), node.output[1].as_str());
        let nodes = vec![
            op(
                "Gemm",
                &[node.input[0].as_str(), &weight, &bias],
                &scores,
                vec![int("transB", 1)],
            ),
            op("Softmax", &[&scores], probabilities, vec![int("axis", -1)]),
            op(
                "ArgMax",
                &[&scores],
                &index,
                vec![int("axis", -1), int("keepdims", 0)],
            ),
            op("Gather", &[&classes, &index], label, vec![int("axis", 0)]),
        ];
        (nodes, inits)
    }
}
