//! The dense layers of a model, found from the graph's structure (federated learning trains
//! them): which initializer is each layer's weight and which its bias, in which layout.
//!
//! Exporters name and order initializers as they like (skl2onnx: `coefficient`, `intercepts`,
//! `coefficient1`, ..., plus int64 `classes` and shape tensors; torch: `fc.0.weight` or
//! `onnx::MatMul_12`), and lay them out differently (`MatMul` takes `[inputs, outputs]`,
//! torch's `Gemm` with `transB=1` takes `[outputs, inputs]`; skl2onnx biases are `[1, n]`).
//! So the layers are found by walking the graph from its input: optional `Cast`/`Identity`/
//! `Flatten`, then per layer either `MatMul(x, W)` followed by `Add(_, B)` or `Gemm(x, W, B)`,
//! with `Relu` between layers. What follows the last layer (softmax, argmax, the label
//! lookup) is not trained; it may not hold another weight matrix. Anything else on the path
//! (another activation, a convolution, an `ai.onnx.ml` classifier that keeps its weights in
//! attributes) is refused with an error naming the node.
//!
//! [`to_trainer`] and [`from_trainer`] convert between the model's layout and the one the
//! trainer module takes (`weight [inputs, outputs]`, `bias [outputs]`, pairs in layer order).
//! Tests: `inference/tests/dense.rs` (they need the exporters' fixtures from `edge-testmodels`).

use std::collections::{HashMap, HashSet};

use prost::Message;

use crate::DType;
use crate::onnx::{self, ModelHead, NodeProto, data_type};

/// Why a model's dense layers cannot be found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StructureError {
    #[error("model is not valid onnx: {0}")]
    Decode(String),
    #[error("model has no graph")]
    NoGraph,
    #[error("model has {0} inputs besides its initializers; a trainable model has one")]
    Inputs(usize),
    #[error(
        "unsupported layer: node {node:?} ({op}) cannot be trained; supported are dense layers \
         (MatMul + Add, or Gemm) with Relu between them{hint}"
    )]
    Unsupported {
        node: String,
        op: String,
        hint: &'static str,
    },
    #[error("dense layer at node {node:?} ({op}): {reason}")]
    Layer {
        node: String,
        op: String,
        reason: String,
    },
    #[error("model has no dense layer (MatMul + Add, or Gemm) after its input {0:?}")]
    NoLayer(String),
    #[error(
        "node {node:?} ({op}) after the last dense layer uses the weight {weight:?}; the \
         trainer cannot map it"
    )]
    Trailing {
        node: String,
        op: String,
        weight: String,
    },
}

/// How a layer's weight initializer is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `[inputs, outputs]` (`MatMul`, `Gemm` without `transB`).
    InOut,
    /// `[outputs, inputs]` (`Gemm` with `transB=1`, as torch exports `nn.Linear`).
    OutIn,
}

/// One dense layer `y = x · W + b`, by its initializers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenseLayer {
    pub weight: String,
    pub weight_shape: Vec<u32>,
    pub layout: Layout,
    pub bias: String,
    /// `[outputs]` or `[1, outputs]` (skl2onnx).
    pub bias_shape: Vec<u32>,
    pub inputs: u32,
    pub outputs: u32,
}

/// One named tensor of weights, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedWeights {
    pub name: String,
    pub shape: Vec<u32>,
    pub data: Vec<f32>,
}

/// A named tensor of weights held elsewhere (a round message's flat weights, a model's
/// initializers): what [`to_trainer`] copies into the trainer's layout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightsRef<'a> {
    pub name: &'a str,
    pub shape: &'a [u32],
    pub data: &'a [f32],
}

impl NamedWeights {
    pub fn view(&self) -> WeightsRef<'_> {
        WeightsRef {
            name: &self.name,
            shape: &self.shape,
            data: &self.data,
        }
    }
}

/// Ops that only pass the features on before the first layer.
const LEADING: &[&str] = &["Cast", "Identity", "Flatten"];

/// The model's dense layers in order from its input.
pub fn dense_layers(model: &[u8]) -> Result<Vec<DenseLayer>, StructureError> {
    // The structure only: inline weights are passed over, not copied.
    let m = ModelHead::decode(model).map_err(|e| StructureError::Decode(e.to_string()))?;
    let g = m.graph.ok_or(StructureError::NoGraph)?;
    let inits: HashMap<&str, &onnx::TensorHead> =
        g.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    let inputs: Vec<&str> = g
        .input
        .iter()
        .map(|i| i.name.as_str())
        .filter(|n| !inits.contains_key(n))
        .collect();
    let [input] = inputs[..] else {
        return Err(StructureError::Inputs(inputs.len()));
    };
    // Consumers of each value, in graph order.
    let mut consumers: HashMap<&str, Vec<&NodeProto>> = HashMap::new();
    for n in &g.node {
        for i in &n.input {
            consumers.entry(i.as_str()).or_default().push(n);
        }
    }
    let only_consumer = |value: &str| -> Option<&NodeProto> {
        match consumers.get(value).map(Vec::as_slice) {
            Some([n]) => Some(*n),
            _ => None,
        }
    };
    let f32_matrix = |name: &str| -> Option<Vec<u32>> {
        let t = inits.get(name)?;
        (t.data_type == data_type::FLOAT)
            .then(|| t.dims.iter().map(|&d| u32::try_from(d).ok()).collect())
            .flatten()
    };
    let unsupported = |n: &NodeProto| StructureError::Unsupported {
        node: n.name.clone(),
        op: n.op_type.clone(),
        hint: if n.domain == "ai.onnx.ml" {
            " (ai.onnx.ml operators keep their weights in attributes, not initializers; of them \
             only a LinearClassifier with a softmax over three or more int64 classes, a \
             multinomial LogisticRegression, is rewritten for training: export as that, an \
             MLPClassifier or SGDClassifier, or as a torch nn.Linear stack)"
        } else {
            ""
        },
    };

    let mut value = input.to_owned();
    let mut layers: Vec<DenseLayer> = Vec::new();
    let mut used: HashSet<String> = HashSet::new();
    // Each step moves to a node not visited before; a graph that loops back (invalid ONNX,
    // but read here before ONNX Runtime has checked it) is refused, not walked for ever.
    let mut visited: HashSet<*const NodeProto> = HashSet::new();
    while let Some(n) = only_consumer(&value) {
        if !visited.insert(std::ptr::from_ref(n)) {
            return Err(StructureError::Layer {
                node: n.name.clone(),
                op: n.op_type.clone(),
                reason: "the graph loops back to this node".into(),
            });
        }
        let layer_err = |reason: String| StructureError::Layer {
            node: n.name.clone(),
            op: n.op_type.clone(),
            reason,
        };
        match n.op_type.as_str() {
            op if layers.is_empty() && LEADING.contains(&op) && n.domain.is_empty() => {
                value = n.output.first().cloned().unwrap_or_default();
            }
            "Relu" if !layers.is_empty() => {
                let out = n.output.first().cloned().unwrap_or_default();
                match only_consumer(&out) {
                    Some(next) if matches!(next.op_type.as_str(), "MatMul" | "Gemm") => {
                        value = out;
                    }
                    // A Relu at the output is not what the trainer computes.
                    _ => return Err(unsupported(n)),
                }
            }
            "MatMul" | "Gemm" => {
                if let Some(prev) = layers.last()
                    && !was_relu(&g.node, &value)
                {
                    return Err(layer_err(format!(
                        "follows the layer of {} without a Relu between them",
                        prev.weight
                    )));
                }
                let (layer, out) =
                    dense(n, &value, &f32_matrix, &only_consumer).map_err(layer_err)?;
                if let Some(prev) = layers.last()
                    && prev.outputs != layer.inputs
                {
                    return Err(StructureError::Layer {
                        node: n.name.clone(),
                        op: n.op_type.clone(),
                        reason: format!(
                            "{} takes {} inputs, the layer before has {} outputs",
                            layer.weight, layer.inputs, prev.outputs
                        ),
                    });
                }
                used.insert(layer.weight.clone());
                used.insert(layer.bias.clone());
                layers.push(layer);
                value = out;
            }
            _ if layers.is_empty() => return Err(unsupported(n)),
            _ => break,
        }
    }
    if layers.is_empty() {
        return Err(StructureError::NoLayer(input.to_owned()));
    }
    // Nothing else may hold a weight matrix the trainer would leave untouched.
    for n in &g.node {
        for i in &n.input {
            if used.contains(i) {
                continue;
            }
            if let Some(shape) = f32_matrix(i)
                && shape.len() >= 2
                && shape.iter().map(|&d| u64::from(d)).product::<u64>() > 1
                && matches!(
                    n.op_type.as_str(),
                    "MatMul" | "Gemm" | "Conv" | "ConvTranspose"
                )
            {
                return Err(StructureError::Trailing {
                    node: n.name.clone(),
                    op: n.op_type.clone(),
                    weight: i.clone(),
                });
            }
        }
    }
    Ok(layers)
}

fn was_relu(nodes: &[NodeProto], value: &str) -> bool {
    nodes
        .iter()
        .any(|n| n.op_type == "Relu" && n.output.iter().any(|o| o == value))
}

fn attr_i(n: &NodeProto, name: &str, default: i64) -> i64 {
    n.attribute
        .iter()
        .find(|a| a.name == name)
        .map_or(default, |a| a.i)
}

fn attr_f(n: &NodeProto, name: &str, default: f32) -> f32 {
    n.attribute
        .iter()
        .find(|a| a.name == name)
        .map_or(default, |a| a.f)
}

/// The layer starting at `n` (fed by `x`) and the value it produces.
fn dense<'a>(
    n: &'a NodeProto,
    x: &str,
    f32_matrix: &dyn Fn(&str) -> Option<Vec<u32>>,
    only_consumer: &dyn Fn(&str) -> Option<&'a NodeProto>,
) -> Result<(DenseLayer, String), String> {
    if n.input.first().map(String::as_str) != Some(x) {
        return Err("the features must be its first input".into());
    }
    let w = n.input.get(1).cloned().unwrap_or_default();
    let w_shape = f32_matrix(&w)
        .filter(|s| s.len() == 2 && s.iter().all(|&d| d > 0))
        .ok_or_else(|| format!("its weight {w:?} is not an f32 matrix initializer"))?;
    let out_value = |node: &NodeProto| node.output.first().cloned().unwrap_or_default();
    let (layout, bias, out) = if n.op_type == "Gemm" {
        if attr_i(n, "transA", 0) != 0 || attr_f(n, "alpha", 1.0) != 1.0 {
            return Err("transA and alpha other than the defaults are not supported".into());
        }
        if attr_f(n, "beta", 1.0) != 1.0 {
            return Err("beta other than 1 is not supported".into());
        }
        let layout = if attr_i(n, "transB", 0) == 1 {
            Layout::OutIn
        } else {
            Layout::InOut
        };
        let Some(b) = n.input.get(2).filter(|b| !b.is_empty()) else {
            return Err(format!("{w} has no bias (C input); the trainer needs one"));
        };
        (layout, b.clone(), out_value(n))
    } else {
        let mm_out = out_value(n);
        let add = only_consumer(&mm_out)
            .filter(|a| a.op_type == "Add" && a.input.len() == 2)
            .ok_or_else(|| format!("{w} is not followed by an Add of a bias"))?;
        let b = if add.input[0] == mm_out {
            add.input[1].clone()
        } else {
            add.input[0].clone()
        };
        (Layout::InOut, b, out_value(add))
    };
    let (inputs, outputs) = match layout {
        Layout::InOut => (w_shape[0], w_shape[1]),
        Layout::OutIn => (w_shape[1], w_shape[0]),
    };
    let b_shape = f32_matrix(&bias).ok_or_else(|| {
        format!("its bias {bias:?} is not an f32 initializer (a computed value cannot be trained)")
    })?;
    if b_shape != [outputs] && b_shape != [1, outputs] {
        return Err(format!(
            "bias {bias} has shape {b_shape:?}, expected [{outputs}] or [1, {outputs}] for \
             weight {w} {w_shape:?}"
        ));
    }
    Ok((
        DenseLayer {
            weight: w,
            weight_shape: w_shape,
            layout,
            bias,
            bias_shape: b_shape,
            inputs,
            outputs,
        },
        out,
    ))
}

/// The graph's outputs: name and element type (`None` for types outside [`DType`]), in order.
pub fn graph_outputs(model: &[u8]) -> Result<Vec<(String, Option<DType>)>, StructureError> {
    let m = ModelHead::decode(model).map_err(|e| StructureError::Decode(e.to_string()))?;
    let g = m.graph.ok_or(StructureError::NoGraph)?;
    Ok(g.output
        .iter()
        .map(|o| {
            let dtype = match o.r#type.as_ref().and_then(|t| t.value.as_ref()) {
                Some(onnx::type_proto::Value::TensorType(t)) => DType::from_onnx_code(t.elem_type),
                None => None,
            };
            (o.name.clone(), dtype)
        })
        .collect())
}

/// The trained initializers' names, in the order the trainer takes them (weight, bias per
/// layer).
pub fn trainable_names(layers: &[DenseLayer]) -> Vec<&str> {
    layers
        .iter()
        .flat_map(|l| [l.weight.as_str(), l.bias.as_str()])
        .collect()
}

/// Index of the first layer whose weight or bias `named` names: where the trained layers
/// start when a task trains only a model's last ones (the layers in front stay frozen).
/// `None`: it names none of them.
pub fn first_named(layers: &[DenseLayer], named: impl Fn(&str) -> bool) -> Option<usize> {
    layers
        .iter()
        .position(|l| named(&l.weight) || named(&l.bias))
}

/// The trainer's parameters from the model's: `weights` holds every layer's weight and bias
/// under their initializer names and shapes (any order); the result is `(weight [inputs,
/// outputs], bias [outputs])` pairs in layer order, names kept. Copies the weights; a caller
/// that owns them moves them with [`into_trainer`].
pub fn to_trainer(
    layers: &[DenseLayer],
    weights: &[WeightsRef<'_>],
) -> Result<Vec<NamedWeights>, String> {
    into_trainer(
        layers,
        weights
            .iter()
            .map(|w| NamedWeights {
                name: w.name.to_owned(),
                shape: w.shape.to_vec(),
                data: w.data.to_vec(),
            })
            .collect(),
    )
}

/// [`to_trainer`] for weights the caller owns: each tensor moves across (a transposed weight
/// is copied once, its source then dropped), so this holds no second copy of the weights.
pub fn into_trainer(
    layers: &[DenseLayer],
    mut weights: Vec<NamedWeights>,
) -> Result<Vec<NamedWeights>, String> {
    // For the error only: what the round carries, before any tensor moves out.
    let carried = format!(
        "{}{}",
        weights
            .iter()
            .take(8)
            .map(|w| w.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        if weights.len() > 8 { ", ..." } else { "" }
    );
    let mut take = |name: &str, shape: &[u32]| -> Result<NamedWeights, String> {
        let i = weights.iter().position(|w| w.name == name).ok_or_else(|| {
            format!(
                "the round carries no weights for {name}, a layer of this model (it carries: \
                     {carried}); is the task's model the one this device serves?"
            )
        })?;
        let w = weights.swap_remove(i);
        if w.shape != shape {
            return Err(format!(
                "{name}: the round's shape {:?} is not the model's {shape:?}",
                w.shape
            ));
        }
        Ok(w)
    };
    let mut out = Vec::with_capacity(layers.len() * 2);
    for l in layers {
        let w = take(&l.weight, &l.weight_shape)?;
        let b = take(&l.bias, &l.bias_shape)?;
        let data = match l.layout {
            Layout::InOut => w.data,
            Layout::OutIn => transpose(&w.data, l.outputs as usize, l.inputs as usize),
        };
        out.push(NamedWeights {
            name: w.name,
            shape: vec![l.inputs, l.outputs],
            data,
        });
        out.push(NamedWeights {
            name: b.name,
            shape: vec![l.outputs],
            data: b.data,
        });
    }
    Ok(out)
}

/// The inverse of [`to_trainer`]: the trainer's pairs back in the model's shapes and layouts.
/// Each tensor moves across (a transposed weight is copied once, its source then dropped), so
/// this holds no second copy of the weights.
pub fn from_trainer(
    layers: &[DenseLayer],
    trained: Vec<NamedWeights>,
) -> Result<Vec<NamedWeights>, String> {
    if trained.len() != layers.len() * 2 {
        return Err(format!(
            "the trainer returned {} tensors for {} layers",
            trained.len(),
            layers.len()
        ));
    }
    let mut out = Vec::with_capacity(trained.len());
    let mut trained = trained.into_iter();
    for l in layers {
        let (Some(w), Some(b)) = (trained.next(), trained.next()) else {
            return Err(format!("the trainer returned no pair for {}", l.weight));
        };
        if w.name != l.weight || b.name != l.bias {
            return Err(format!(
                "the trainer returned {} and {} where {} and {} were given",
                w.name, b.name, l.weight, l.bias
            ));
        }
        let n = (l.inputs as usize) * (l.outputs as usize);
        if w.data.len() != n || b.data.len() != l.outputs as usize {
            return Err(format!("the trainer changed the size of {}", l.weight));
        }
        let data = match l.layout {
            Layout::InOut => w.data,
            Layout::OutIn => transpose(&w.data, l.inputs as usize, l.outputs as usize),
        };
        out.push(NamedWeights {
            name: l.weight.clone(),
            shape: l.weight_shape.clone(),
            data,
        });
        out.push(NamedWeights {
            name: l.bias.clone(),
            shape: l.bias_shape.clone(),
            data: b.data,
        });
    }
    Ok(out)
}

/// `rows x cols` row-major to `cols x rows`.
fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}
