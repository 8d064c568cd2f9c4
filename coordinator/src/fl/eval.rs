//! Evaluation of a global model on a task's held-out set: the [`Evaluator`] trait the
//! evaluation thread ([`super::worker`]) calls for each closed round, the held-out CSV format,
//! and [`OnnxEvaluator`], which patches the weights into the task's ONNX model and runs it
//! with ONNX Runtime.
//!
//! Held-out file: one sample per line, `feature,feature,...,label`; the label is a class index
//! (a non-negative integer). Empty lines and lines starting with `#` are skipped, and so is a
//! first line that does not parse as numbers (a header). At most [`MAX_HOLDOUT_ROWS`] rows:
//! evaluation runs once per round, on one thread, and a slow one delays the round's journal
//! line (not the service loop).
//!
//! Metrics: accuracy is argmax against the label; loss is the mean cross-entropy
//! `-ln p[label]` of the model's first output. That output is taken as probabilities when every
//! row is a distribution (values in [0, 1] summing to 1 +- 1e-3), else as logits and
//! soft-maxed first.
//!
//! Without an ONNX Runtime library (or with a model it cannot run), evaluation reports why
//! instead of failing the task.

use std::collections::BTreeMap;

use edge_inference::{
    InferenceConfig, Model, ModelError, PatchError, Provider, Runtime, RuntimeError, Tensor,
    TensorError, patch_initializers,
};
use protocol::v1::fl::ParamSpec;
use serde::{Deserialize, Serialize};

/// Most rows of a held-out set.
pub const MAX_HOLDOUT_ROWS: usize = 10_000;
/// Rows per model run.
const EVAL_BATCH: usize = 256;

/// Why a held-out set does not parse, or a global model could not be evaluated on it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EvalError {
    #[error("line {line}: {error}")]
    Number {
        line: usize,
        error: std::num::ParseFloatError,
    },
    #[error("line {line}: needs at least one feature and a label")]
    NoFeature { line: usize },
    #[error("line {line}: {columns} columns, earlier lines have {expected}")]
    Columns {
        line: usize,
        columns: usize,
        expected: usize,
    },
    #[error("line {line}: feature {feature} is not finite")]
    NotFinite { line: usize, feature: usize },
    #[error("line {line}: label {label} is not a class index")]
    Label { line: usize, label: f32 },
    #[error("held-out set has more than {MAX_HOLDOUT_ROWS} rows")]
    TooManyRows,
    #[error("held-out set has no rows")]
    NoRows,
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("{weights} weights do not cover param {param}")]
    Weights { weights: usize, param: String },
    #[error("param {param}: {error}")]
    Param { param: String, error: TensorError },
    #[error(transparent)]
    Patch(#[from] PatchError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("model {model} has {inputs} inputs; evaluation needs exactly one")]
    Inputs { model: String, inputs: usize },
    #[error(
        "model {model} input {input} has shape {shape}; the held-out set has {features} \
         features per row"
    )]
    InputShape {
        model: String,
        input: String,
        shape: String,
        features: usize,
    },
    #[error("held-out batch of model {model}: {error}")]
    Batch { model: String, error: TensorError },
    #[error("model {model} has no f32 output (its outputs: {outputs})")]
    NoF32Output { model: String, outputs: String },
    #[error("model {model} has no output {name} (its outputs: {outputs})")]
    NoOutput {
        model: String,
        name: String,
        outputs: String,
    },
    #[error("the model produced {values} values for {rows} rows")]
    OutputSize { values: usize, rows: usize },
    #[error("held-out row {row} has label {label} but the model outputs {classes} classes")]
    LabelRange {
        row: usize,
        label: usize,
        classes: usize,
    },
    #[error("the model output a non-finite value (row {row}, class {class})")]
    NonFinite { row: usize, class: usize },
}

/// Accuracy and loss of one global model version on the held-out set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub accuracy: f32,
    pub loss: f32,
    pub rows: u32,
}

/// Evaluates global weights.
pub trait Evaluator {
    /// `None` when the task has no held-out set; `Some(Err(reason))` when it cannot be
    /// evaluated (no runtime, a model that does not run).
    fn evaluate(
        &mut self,
        task: &str,
        version: u32,
        weights: &[f32],
    ) -> Option<Result<EvalMetrics, EvalError>>;
}

/// An evaluator for tasks without held-out sets.
#[derive(Debug, Default)]
pub struct NoEval;

impl Evaluator for NoEval {
    fn evaluate(&mut self, _: &str, _: u32, _: &[f32]) -> Option<Result<EvalMetrics, EvalError>> {
        None
    }
}

/// A parsed held-out set.
#[derive(Debug, Clone, PartialEq)]
pub struct Holdout {
    pub features: usize,
    /// Row-major, `rows x features`.
    pub x: Vec<f32>,
    pub labels: Vec<u32>,
}

impl Holdout {
    pub fn rows(&self) -> usize {
        self.labels.len()
    }

    /// Parses the CSV text; the error names the line.
    pub fn parse(text: &str) -> Result<Holdout, EvalError> {
        let mut features = None;
        let mut x = Vec::new();
        let mut labels = Vec::new();
        let mut first = true;
        for (i, text) in text.lines().enumerate() {
            let line = i + 1;
            let text = text.trim();
            if text.is_empty() || text.starts_with('#') {
                continue;
            }
            let fields: Result<Vec<f32>, _> =
                text.split(',').map(|f| f.trim().parse::<f32>()).collect();
            let was_first = std::mem::replace(&mut first, false);
            let fields = match fields {
                Ok(f) => f,
                Err(_) if was_first => continue,
                Err(error) => return Err(EvalError::Number { line, error }),
            };
            if fields.len() < 2 {
                return Err(EvalError::NoFeature { line });
            }
            let n = fields.len() - 1;
            if *features.get_or_insert(n) != n {
                return Err(EvalError::Columns {
                    line,
                    columns: fields.len(),
                    expected: features.unwrap_or(0) + 1,
                });
            }
            if let Some(j) = fields[..n].iter().position(|v| !v.is_finite()) {
                return Err(EvalError::NotFinite {
                    line,
                    feature: j + 1,
                });
            }
            let label = fields[n];
            if !(label >= 0.0 && label.fract() == 0.0 && label < 1e6) {
                return Err(EvalError::Label { line, label });
            }
            if labels.len() == MAX_HOLDOUT_ROWS {
                return Err(EvalError::TooManyRows);
            }
            x.extend_from_slice(&fields[..n]);
            labels.push(label as u32);
        }
        let Some(features) = features else {
            return Err(EvalError::NoRows);
        };
        Ok(Holdout {
            features,
            x,
            labels,
        })
    }
}

/// Accuracy and mean cross-entropy of `outputs` (`rows x classes`) against `labels`.
pub fn score(outputs: &[f32], labels: &[u32]) -> Result<EvalMetrics, EvalError> {
    if labels.is_empty() || outputs.is_empty() || !outputs.len().is_multiple_of(labels.len()) {
        return Err(EvalError::OutputSize {
            values: outputs.len(),
            rows: labels.len(),
        });
    }
    let classes = outputs.len() / labels.len();
    let distributions = outputs.chunks_exact(classes).all(|row| {
        row.iter().all(|p| (0.0..=1.0).contains(p)) && (row.iter().sum::<f32>() - 1.0).abs() < 1e-3
    });
    let mut correct = 0usize;
    let mut loss = 0f64;
    let mut probs = vec![0f32; classes];
    for (r, (row, &label)) in outputs.chunks_exact(classes).zip(labels).enumerate() {
        let label = label as usize;
        if label >= classes {
            return Err(EvalError::LabelRange {
                row: r + 1,
                label,
                classes,
            });
        }
        if let Some(class) = row.iter().position(|v| !v.is_finite()) {
            return Err(EvalError::NonFinite { row: r + 1, class });
        }
        if distributions {
            probs.copy_from_slice(row);
        } else {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut total = 0f32;
            for (p, &l) in probs.iter_mut().zip(row) {
                *p = (l - max).exp();
                total += *p;
            }
            for p in &mut probs {
                *p /= total;
            }
        }
        let predicted = probs
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i);
        if predicted == label {
            correct += 1;
        }
        loss -= f64::from(probs[label].max(1e-7)).ln();
    }
    Ok(EvalMetrics {
        accuracy: correct as f32 / labels.len() as f32,
        loss: (loss / labels.len() as f64) as f32,
        rows: labels.len() as u32,
    })
}

struct EvalTask {
    model: Vec<u8>,
    params: Vec<ParamSpec>,
    holdout: Holdout,
    output: Option<String>,
}

/// Evaluates with ONNX Runtime on the CPU provider. The library is looked for once, at the
/// first evaluation (`ORT_DYLIB_PATH`, next to the executable, the workspace's `target/ort`).
#[derive(Default)]
pub struct OnnxEvaluator {
    runtime: Option<Result<Runtime, RuntimeError>>,
    tasks: BTreeMap<String, EvalTask>,
}

impl std::fmt::Debug for OnnxEvaluator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxEvaluator")
            .field("tasks", &self.tasks.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl OnnxEvaluator {
    /// Registers a task's model (the file its initial weights came from) and held-out set.
    /// `output` names the class-scores output; without it, the first f32 output is taken
    /// (skl2onnx puts the int64 `label` first and the f32 `probabilities` second).
    pub fn add(
        &mut self,
        task: &str,
        model: Vec<u8>,
        params: Vec<ParamSpec>,
        holdout: Holdout,
        output: Option<String>,
    ) {
        self.tasks.insert(
            task.to_owned(),
            EvalTask {
                model,
                params,
                holdout,
                output,
            },
        );
    }

    pub fn remove(&mut self, task: &str) {
        self.tasks.remove(task);
    }

    fn runtime(&mut self) -> Result<Runtime, RuntimeError> {
        self.runtime
            .get_or_insert_with(|| {
                let config = InferenceConfig {
                    providers: vec![Provider::Cpu],
                    intra_threads: 1,
                    ..InferenceConfig::default()
                };
                Runtime::load(&config)
            })
            .clone()
    }
}

impl Evaluator for OnnxEvaluator {
    fn evaluate(
        &mut self,
        task: &str,
        version: u32,
        weights: &[f32],
    ) -> Option<Result<EvalMetrics, EvalError>> {
        if !self.tasks.contains_key(task) {
            return None;
        }
        let runtime = match self.runtime() {
            Ok(rt) => rt,
            Err(e) => return Some(Err(e.into())),
        };
        let t = self.tasks.get(task)?;
        Some(run_eval(&runtime, task, version, t, weights))
    }
}

fn run_eval(
    rt: &Runtime,
    task: &str,
    version: u32,
    t: &EvalTask,
    weights: &[f32],
) -> Result<EvalMetrics, EvalError> {
    let mut tensors = Vec::with_capacity(t.params.len());
    let mut at = 0;
    for p in &t.params {
        let values = weights
            .get(at..at + p.len())
            .ok_or_else(|| EvalError::Weights {
                weights: weights.len(),
                param: p.name.clone(),
            })?;
        at += p.len();
        let tensor =
            Tensor::from_f32(p.shape.clone(), values).map_err(|error| EvalError::Param {
                param: p.name.clone(),
                error,
            })?;
        tensors.push((p.name.as_str(), tensor));
    }
    let patched = patch_initializers(&t.model, &tensors)?;
    let model = Model::load(rt, task, &format!("v{version}"), &patched)?;
    let [input] = model.inputs() else {
        return Err(EvalError::Inputs {
            model: model.id().to_owned(),
            inputs: model.inputs().len(),
        });
    };
    // The batch dimension first; the rest must be fixed and hold one row's features.
    let rest: Option<Vec<u32>> = input.shape.iter().skip(1).copied().collect();
    let rest = rest
        .filter(|r| {
            !input.shape.is_empty()
                && r.iter().map(|&d| d as usize).product::<usize>() == t.holdout.features
        })
        .ok_or_else(|| EvalError::InputShape {
            model: model.id().to_owned(),
            input: input.name.clone(),
            shape: input.shape_string(),
            features: t.holdout.features,
        })?;
    let listed = || {
        model
            .outputs()
            .iter()
            .map(|o| {
                format!(
                    "{} {}",
                    o.name,
                    o.dtype.map_or("other".into(), |d| d.to_string())
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let at = match &t.output {
        Some(name) => model
            .outputs()
            .iter()
            .position(|o| &o.name == name)
            .ok_or_else(|| EvalError::NoOutput {
                model: model.id().to_owned(),
                name: name.clone(),
                outputs: listed(),
            })?,
        None => model
            .outputs()
            .iter()
            .position(|o| o.dtype == Some(edge_inference::DType::F32))
            .ok_or_else(|| EvalError::NoF32Output {
                model: model.id().to_owned(),
                outputs: listed(),
            })?,
    };
    let mut outputs = Vec::with_capacity(t.holdout.rows() * 10);
    let f = t.holdout.features;
    // A model exported with a fixed batch size (torch's default export fixes it to the
    // example's, usually 1) gets batches of that size.
    let batch = match input.shape.first() {
        Some(Some(fixed)) => (*fixed as usize).max(1),
        _ => EVAL_BATCH,
    };
    for rows in t.holdout.x.chunks(batch * f) {
        let n = (rows.len() / f) as u32;
        let mut shape = vec![n];
        shape.extend(&rest);
        let x = Tensor::from_f32(shape, rows).map_err(|error| EvalError::Batch {
            model: model.id().to_owned(),
            error,
        })?;
        let out = model.run(&[x])?;
        let scores =
            out.get(at)
                .and_then(Tensor::to_f32)
                .ok_or_else(|| EvalError::NoF32Output {
                    model: model.id().to_owned(),
                    outputs: listed(),
                })?;
        outputs.extend(scores);
    }
    score(&outputs, &t.holdout.labels)
}

/// A 2x2 linear model (weights `W` then bias `B`, all zero) and its trained parameters, for
/// the evaluator's and the worker's tests.
#[cfg(test)]
pub(crate) fn linear_2x2_for_test() -> (Vec<u8>, Vec<ParamSpec>) {
    let model = edge_testmodels::onnx_builder::linear(2, 2, &[0.0; 4], &[0.0; 2]);
    let params = vec![
        ParamSpec {
            name: "W".into(),
            shape: vec![2, 2],
        },
        ParamSpec {
            name: "B".into(),
            shape: vec![2],
        },
    ];
    (model, params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holdout_parses_with_header_comments_and_blank_lines() {
        let h = Holdout::parse("a,b,label\n# comment\n1,2,0\n\n3.5, 4 ,2\n").expect("parses");
        assert_eq!(h.features, 2);
        assert_eq!(h.x, vec![1.0, 2.0, 3.5, 4.0]);
        assert_eq!(h.labels, vec![0, 2]);
    }

    #[test]
    fn holdout_errors_name_the_line() {
        for (text, want) in [
            ("1,2,0\n1,2\n", "line 2"),
            ("1,2,0\n1,x,0\n", "line 2"),
            ("1,2,0.5\n", "label"),
            ("1,2,-1\n", "label"),
            ("1,inf,1\n", "not finite"),
            ("7\n", "at least one feature"),
            ("", "no rows"),
            ("h1,h2\n", "no rows"),
        ] {
            let e = Holdout::parse(text).expect_err(text).to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn score_takes_probabilities_or_logits() {
        // Two rows, three classes, as probabilities: row 1 right, row 2 wrong.
        let probs = [0.7, 0.2, 0.1, 0.6, 0.3, 0.1];
        let m = score(&probs, &[0, 1]).expect("scores");
        assert_eq!(m.accuracy, 0.5);
        assert!((m.loss - (-(0.7f32.ln()) - 0.3f32.ln()) / 2.0).abs() < 1e-5);
        // The same as logits: ln of the probabilities soft-max back to them.
        let logits: Vec<f32> = probs.iter().map(|p: &f32| p.ln() + 3.0).collect();
        let l = score(&logits, &[0, 1]).expect("scores");
        assert_eq!(l.accuracy, 0.5);
        assert!((l.loss - m.loss).abs() < 1e-4);
        assert!(
            score(&probs, &[0, 3])
                .expect_err("label out of range")
                .to_string()
                .contains("label 3")
        );
        assert!(score(&probs[..5], &[0, 1]).is_err());
    }

    /// With a library (`cargo xtask ort`), a linear model with known weights scores as
    /// computed by hand; without one, evaluation says why.
    #[test]
    fn onnx_evaluator_patches_and_scores_or_says_why_not() {
        let (model, params) = crate::fl::eval::linear_2x2_for_test();
        let holdout = Holdout::parse("1,0,0\n0,1,1\n1,0,1\n").expect("parses");
        let mut e = OnnxEvaluator::default();
        assert!(e.evaluate("t", 1, &[0.0; 6]).is_none(), "unknown task");
        e.add("t", model, params, holdout, None);
        // W = 2I: logits = 2x (not a distribution, so soft-maxed); rows 1 and 2 are right,
        // row 3 wrong.
        match e.evaluate("t", 1, &[2.0, 0.0, 0.0, 2.0, 0.0, 0.0]) {
            Some(Ok(m)) => {
                assert_eq!(m.rows, 3);
                assert!((m.accuracy - 2.0 / 3.0).abs() < 1e-6, "{m:?}");
                let p = 2f32.exp() / (2f32.exp() + 1.0);
                let expected = (-p.ln() * 2.0 - (1.0 - p).ln()) / 3.0;
                assert!((m.loss - expected).abs() < 1e-4, "{m:?}");
            }
            Some(Err(reason)) => {
                assert!(
                    !edge_inference::workspace_library().exists() && ort_env_unset(),
                    "a library is there but evaluation failed: {reason}"
                );
                assert!(reason.to_string().contains("unavailable"), "{reason}");
            }
            None => panic!("the task is registered"),
        }
    }

    /// skl2onnx's MLP puts the int64 `label` first and the f32 `probabilities` second:
    /// evaluation scores `probabilities` (its own argmax is `label`, so the accuracy must equal
    /// the fraction of rows whose `label` output is right), or the output named.
    #[test]
    fn onnx_evaluator_scores_the_f32_output_of_an_sklearn_model() {
        let model = edge_testmodels::onnx_builder::exported("sklearn_mlp.onnx");
        let (params, weights) =
            crate::fl::task::initial_weights(&model, None).expect("dense layers");
        // Rows with a one-hot pixel pattern per class; labels the model's own predictions
        // are checked against below.
        let rows: Vec<Vec<f32>> = (0..20)
            .map(|r| {
                (0..64)
                    .map(|k| ((r * 7 + k * 3) % 17) as f32 / 16.0)
                    .collect()
            })
            .collect();
        let text: String = rows
            .iter()
            .enumerate()
            .map(|(r, x)| {
                let f: Vec<String> = x.iter().map(f32::to_string).collect();
                format!("{},{}\n", f.join(","), r % 10)
            })
            .collect();
        let holdout = Holdout::parse(&text).expect("parses");
        let mut e = OnnxEvaluator::default();
        e.add("t", model.clone(), params.clone(), holdout.clone(), None);
        let Some(Ok(m)) = e.evaluate("t", 0, &weights) else {
            assert!(
                !edge_inference::workspace_library().exists() && ort_env_unset(),
                "a library is there but evaluation failed"
            );
            return;
        };
        let rt = edge_inference::Runtime::load(&Default::default()).expect("runtime");
        let direct = Model::load(&rt, "m", "v", &model).expect("loads");
        let x = Tensor::from_f32(vec![20, 64], &rows.concat()).expect("tensor");
        let out = direct.run(&[x]).expect("runs");
        let labels = out[0].to_i64().expect("label is int64");
        let right = labels
            .iter()
            .enumerate()
            .filter(|(r, l)| **l == (*r % 10) as i64)
            .count();
        assert_eq!(m.rows, 20);
        assert!(
            (m.accuracy - right as f32 / 20.0).abs() < 1e-6,
            "{m:?} vs {right}"
        );
        e.add(
            "u",
            model.clone(),
            params.clone(),
            holdout.clone(),
            Some("probabilities".into()),
        );
        assert_eq!(
            e.evaluate("u", 0, &weights).expect("task").expect("scores"),
            m
        );
        e.add("v", model, params, holdout, Some("nope".into()));
        let err = e
            .evaluate("v", 0, &weights)
            .expect("task")
            .expect_err("no such output");
        assert!(err.to_string().contains("no output nope"), "{err}");
    }

    fn ort_env_unset() -> bool {
        std::env::var_os("ORT_DYLIB_PATH").is_none_or(|p| p.is_empty())
    }
}
