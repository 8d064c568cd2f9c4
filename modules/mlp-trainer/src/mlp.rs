//! The model and its training, as plain functions over plain values (no host calls), so
//! that all of it is unit-tested natively.
//!
//! A dense MLP: layer `i` is `z = a · W_i + b_i` with `W_i` of shape `[inputs, outputs]`
//! (row-major, as the ONNX model's `MatMul` takes it) and `b_i` of shape `[outputs]`; ReLU
//! between layers; softmax and cross-entropy at the output. Training is minibatch SGD on
//! the mean loss of each batch, plus the FedProx term mu/2 * ||w - w_start||^2 (applied on
//! every step, to weights and biases alike).

use crate::hyper::Hyper;
use crate::rng::SplitMix64;

/// One named parameter tensor (the `param` record, without the bindings' type).
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub name: String,
    pub shape: Vec<u32>,
    pub data: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    pub inputs: usize,
    pub outputs: usize,
    /// `[inputs, outputs]`, row-major.
    pub w: Vec<f32>,
    /// `[outputs]`.
    pub b: Vec<f32>,
}

impl Layer {
    #[cfg(test)]
    fn zeros_like(&self) -> Layer {
        Layer {
            inputs: self.inputs,
            outputs: self.outputs,
            w: vec![0.0; self.w.len()],
            b: vec![0.0; self.b.len()],
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Mlp {
    layers: Vec<Layer>,
}

fn shape_text(p: &Param) -> String {
    format!("{:?}", p.shape)
}

impl Mlp {
    /// [`Mlp::take_params`] from a copy of `params`.
    pub fn from_params(params: &[Param]) -> Result<Mlp, String> {
        Self::take_params(&mut params.to_vec())
    }

    /// Builds the model from `(weight, bias)` pairs in order, taking their values over (each
    /// `data` is left empty; names and shapes stay, for [`Mlp::check_finite`]). Nothing is
    /// taken when the params are refused. The names are not interpreted; every check names the
    /// parameter and shapes involved.
    pub fn take_params(params: &mut [Param]) -> Result<Mlp, String> {
        if params.is_empty() {
            return Err(
                "no params: expected (weight [inputs, outputs], bias [outputs]) pairs".into(),
            );
        }
        if !params.len().is_multiple_of(2) {
            let last = &params[params.len() - 1];
            return Err(format!(
                "expected (weight, bias) pairs, got {} params: {} {} has no bias after it",
                params.len(),
                last.name,
                shape_text(last)
            ));
        }
        for (i, p) in params.iter().enumerate() {
            if params[..i].iter().any(|q| q.name == p.name) {
                return Err(format!("{}: name given twice", p.name));
            }
            let expected = p
                .shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize));
            if expected != Some(p.data.len()) {
                return Err(format!(
                    "{}: shape {} does not match its {} values",
                    p.name,
                    shape_text(p),
                    p.data.len()
                ));
            }
            if let Some(k) = p.data.iter().position(|v| !v.is_finite()) {
                return Err(format!(
                    "{}: value {k} is not finite ({})",
                    p.name, p.data[k]
                ));
            }
        }
        let mut dims: Vec<(usize, usize)> = Vec::with_capacity(params.len() / 2);
        let mut previous: Option<&Param> = None;
        for pair in params.chunks_exact(2) {
            let (w, b) = (&pair[0], &pair[1]);
            let [inputs, outputs] = w.shape[..] else {
                return Err(format!(
                    "{}: shape {} is not a matrix [inputs, outputs]",
                    w.name,
                    shape_text(w)
                ));
            };
            if inputs == 0 || outputs == 0 {
                return Err(format!(
                    "{}: shape {} has an empty dimension",
                    w.name,
                    shape_text(w)
                ));
            }
            if b.shape != [outputs] {
                return Err(format!(
                    "{}: shape {} does not fit {} {}: expected [{outputs}]",
                    b.name,
                    shape_text(b),
                    w.name,
                    shape_text(w)
                ));
            }
            if let (Some(prev), Some(&(_, last_outputs))) = (previous, dims.last())
                && last_outputs != inputs as usize
            {
                return Err(format!(
                    "{}: shape {} does not follow {} {}: expected {} inputs",
                    w.name,
                    shape_text(w),
                    prev.name,
                    shape_text(prev),
                    last_outputs
                ));
            }
            dims.push((inputs as usize, outputs as usize));
            previous = Some(w);
        }
        let layers = params
            .chunks_exact_mut(2)
            .zip(dims)
            .map(|(pair, (inputs, outputs))| Layer {
                inputs,
                outputs,
                w: std::mem::take(&mut pair[0].data),
                b: std::mem::take(&mut pair[1].data),
            })
            .collect();
        Ok(Mlp { layers })
    }

    /// The parameters, with the names and shapes of `like` (what [`Mlp::from_params`] was
    /// built from).
    pub fn to_params(&self, like: &[Param]) -> Vec<Param> {
        like.chunks_exact(2)
            .zip(&self.layers)
            .flat_map(|(pair, layer)| {
                [
                    Param {
                        name: pair[0].name.clone(),
                        shape: pair[0].shape.clone(),
                        data: layer.w.clone(),
                    },
                    Param {
                        name: pair[1].name.clone(),
                        shape: pair[1].shape.clone(),
                        data: layer.b.clone(),
                    },
                ]
            })
            .collect()
    }

    /// The values of every parameter, in the order of the params the model was built from
    /// (each layer's weight, then its bias).
    pub fn tensors(&self) -> impl Iterator<Item = &[f32]> {
        self.layers
            .iter()
            .flat_map(|layer| [&layer.w[..], &layer.b[..]])
    }

    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Features per sample.
    pub fn inputs(&self) -> usize {
        self.layers[0].inputs
    }

    /// Output classes.
    pub fn classes(&self) -> usize {
        self.layers[self.layers.len() - 1].outputs
    }

    /// The first non-finite value after training, as an error naming the parameter.
    pub fn check_finite(&self, like: &[Param]) -> Result<(), String> {
        // Layer by layer, without copying the weights: `like` names them in (weight, bias) pairs.
        for (pair, layer) in like.chunks_exact(2).zip(&self.layers) {
            for (p, data) in [(&pair[0], &layer.w), (&pair[1], &layer.b)] {
                if let Some(k) = data.iter().position(|v| !v.is_finite()) {
                    return Err(format!(
                        "training diverged: {} value {k} became {} (lower lr)",
                        p.name, data[k]
                    ));
                }
            }
        }
        Ok(())
    }

    /// Runs `x` through the network, keeping every layer's output in `acts` (`acts[0]` is
    /// the input; the last entry holds the logits).
    fn forward(&self, x: &[f32], acts: &mut Vec<Vec<f32>>) {
        acts.resize_with(self.layers.len() + 1, Vec::new);
        acts[0].clear();
        acts[0].extend_from_slice(x);
        let last = self.layers.len() - 1;
        for (l, layer) in self.layers.iter().enumerate() {
            let (done, rest) = acts.split_at_mut(l + 1);
            let (a, z) = (&done[l], &mut rest[0]);
            z.clear();
            z.extend_from_slice(&layer.b);
            for (i, &ai) in a.iter().enumerate() {
                if ai == 0.0 {
                    continue; // ReLU zeros are common; skipping them changes nothing
                }
                let row = &layer.w[i * layer.outputs..(i + 1) * layer.outputs];
                for (zj, &wij) in z.iter_mut().zip(row) {
                    *zj += ai * wij;
                }
            }
            if l < last {
                z.iter_mut().for_each(|v| *v = v.max(0.0));
            }
        }
    }

    /// Loss (cross-entropy) of one sample and whether the arg-max is the label.
    pub fn loss(&self, x: &[f32], label: usize, ws: &mut Workspace) -> (f32, bool) {
        self.forward(x, &mut ws.acts);
        let logits = &ws.acts[self.layers.len()];
        let (loss, correct) = cross_entropy(logits, label, &mut ws.delta);
        (loss, correct)
    }

    /// One minibatch of SGD: runs every sample forward (adding its loss and correctness, before
    /// the step, to `tally`), then goes back through the layers from the last. A layer's
    /// weights are handed to `update` once the deltas for the layer below have been computed
    /// from them, with the batch's gradient sum one weight row (`Part::Row`), then the bias, at a
    /// time: no gradient buffer the size of the model is ever held.
    pub fn batch<'s>(
        &mut self,
        batch: impl Iterator<Item = (&'s [f32], usize)>,
        ws: &mut BatchWorkspace,
        tally: &mut Tally,
        mut update: impl FnMut(usize, Part, &mut [f32], &[f32]),
    ) {
        let n = self.layers.len();
        let mut count = 0;
        for (s, (x, label)) in batch.enumerate() {
            if ws.samples.len() <= s {
                ws.samples.push(Workspace::default());
                ws.next.push(Vec::new());
            }
            let sample = &mut ws.samples[s];
            self.forward(x, &mut sample.acts);
            let (loss, correct) = cross_entropy(&sample.acts[n], label, &mut sample.delta);
            tally.add(loss, correct);
            count = s + 1;
        }
        let samples = &mut ws.samples[..count];
        for l in (0..n).rev() {
            let layer = &mut self.layers[l];
            let outputs = layer.outputs;
            if l > 0 {
                // Back through W (before its update) and the ReLU of the layer below (its
                // output is this layer's input).
                for (sample, next) in samples.iter().zip(&mut ws.next) {
                    next.clear();
                    next.extend(sample.acts[l].iter().enumerate().map(|(i, &ai)| {
                        if ai <= 0.0 {
                            return 0.0;
                        }
                        let row = &layer.w[i * outputs..(i + 1) * outputs];
                        row.iter().zip(&sample.delta).map(|(w, d)| w * d).sum()
                    }));
                }
            }
            ws.row.clear();
            ws.row.resize(outputs, 0.0);
            for i in 0..layer.inputs {
                ws.row.fill(0.0);
                for sample in samples.iter() {
                    let ai = sample.acts[l][i];
                    if ai == 0.0 {
                        continue; // ReLU zeros add nothing
                    }
                    for (g, &d) in ws.row.iter_mut().zip(&sample.delta) {
                        *g += ai * d;
                    }
                }
                update(
                    l,
                    Part::Row(i),
                    &mut layer.w[i * outputs..(i + 1) * outputs],
                    &ws.row,
                );
            }
            ws.row.fill(0.0);
            for sample in samples.iter() {
                for (g, &d) in ws.row.iter_mut().zip(&sample.delta) {
                    *g += d;
                }
            }
            update(l, Part::Bias, &mut layer.b, &ws.row);
            if l > 0 {
                for (sample, next) in samples.iter_mut().zip(&mut ws.next) {
                    std::mem::swap(&mut sample.delta, next);
                }
            }
        }
    }
}

/// Which part of a layer [`Mlp::batch`] hands to its `update`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Row `i` of the weight matrix: the weights from input `i` to every output.
    Row(usize),
    Bias,
}

/// Cross-entropy of softmax(`logits`) against `label`, computed stably (log-sum-exp);
/// writes the gradient with respect to the logits (softmax - one-hot) into `grad`.
fn cross_entropy(logits: &[f32], label: usize, grad: &mut Vec<f32>) -> (f32, bool) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    grad.clear();
    grad.extend(logits.iter().map(|&z| (z - max).exp()));
    let sum: f32 = grad.iter().sum();
    grad.iter_mut().for_each(|p| *p /= sum);
    let loss = sum.ln() - (logits[label] - max);
    // The first maximum wins ties, as ONNX ArgMax does.
    let predicted = logits
        .iter()
        .enumerate()
        .fold(0, |best, (j, &z)| if z > logits[best] { j } else { best });
    grad[label] -= 1.0;
    (loss, predicted == label)
}

/// One sample's scratch buffers, reused (no allocation per sample after the first).
#[derive(Debug, Default)]
pub struct Workspace {
    /// Every layer's input, then the logits.
    acts: Vec<Vec<f32>>,
    /// dLoss/dz of the layer being gone back through.
    delta: Vec<f32>,
}

/// A minibatch's scratch buffers for [`Mlp::batch`]: each sample's, the deltas for the layer
/// below, and one gradient row.
#[derive(Debug, Default)]
pub struct BatchWorkspace {
    samples: Vec<Workspace>,
    next: Vec<Vec<f32>>,
    row: Vec<f32>,
}

/// Samples checked against the model, stored flat: `x` is `[len, inputs]`.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    inputs: usize,
    x: Vec<f32>,
    y: Vec<u32>,
}

impl Samples {
    pub fn new(inputs: usize) -> Self {
        Samples {
            inputs,
            ..Default::default()
        }
    }

    pub fn len(&self) -> usize {
        self.y.len()
    }

    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Adds sample number `index` (its index in the host's set, for the error) after
    /// checking it against `mlp`.
    pub fn push(
        &mut self,
        mlp: &Mlp,
        index: u32,
        features: &[f32],
        label: i64,
    ) -> Result<(), String> {
        let label = check_sample(mlp, index, features, label)?;
        self.x.extend_from_slice(features);
        self.y.push(label as u32);
        Ok(())
    }

    fn get(&self, i: usize) -> (&[f32], usize) {
        (
            &self.x[i * self.inputs..(i + 1) * self.inputs],
            self.y[i] as usize,
        )
    }
}

/// Checks one sample against the model; returns its label as an index.
pub fn check_sample(mlp: &Mlp, index: u32, features: &[f32], label: i64) -> Result<usize, String> {
    let first = &mlp.layers[0];
    if features.len() != mlp.inputs() {
        return Err(format!(
            "sample {index}: {} features, but the first layer [{}, {}] takes {}",
            features.len(),
            first.inputs,
            first.outputs,
            first.inputs
        ));
    }
    if let Some(k) = features.iter().position(|v| !v.is_finite()) {
        return Err(format!(
            "sample {index}: feature {k} is not finite ({})",
            features[k]
        ));
    }
    let classes = mlp.classes();
    match usize::try_from(label) {
        Ok(l) if l < classes => Ok(l),
        _ => Err(format!(
            "sample {index}: label {label} is outside 0..{classes} (the model's outputs)"
        )),
    }
}

/// Loss and accuracy sums over samples, for `evaluate` (streamed in batches).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    pub loss_sum: f64,
    pub correct: u64,
    pub samples: u64,
}

impl Tally {
    pub fn add(&mut self, loss: f32, correct: bool) {
        self.loss_sum += f64::from(loss);
        self.correct += u64::from(correct);
        self.samples += 1;
    }

    pub fn mean_loss(&self) -> f32 {
        if self.samples == 0 {
            0.0
        } else {
            (self.loss_sum / self.samples as f64) as f32
        }
    }

    pub fn accuracy(&self) -> f32 {
        if self.samples == 0 {
            0.0
        } else {
            (self.correct as f64 / self.samples as f64) as f32
        }
    }
}

/// Trains `mlp` in place on `samples` (non-empty) and returns the last epoch's tally:
/// loss and correctness of every sample as the model stood just before the step that
/// used it.
pub fn train(mlp: &mut Mlp, samples: &Samples, h: &Hyper) -> Tally {
    // FedProx's anchor, only when it pulls (a copy of the weights otherwise unused).
    let start = (h.mu > 0.0).then(|| mlp.layers.clone());
    let mut ws = BatchWorkspace::default();
    let mut order: Vec<u32> = (0..samples.len() as u32).collect();
    let mut rng = SplitMix64::new(h.seed);
    let mut tally = Tally::default();
    for _ in 0..h.epochs {
        rng.shuffle(&mut order);
        tally = Tally::default();
        for batch in order.chunks(h.batch_size as usize) {
            let scale = 1.0 / batch.len() as f32;
            let batch = batch.iter().map(|&i| samples.get(i as usize));
            mlp.batch(batch, &mut ws, &mut tally, |l, part, w, grad_sum| {
                let w0 = start.as_ref().map(|s| match part {
                    Part::Row(i) => &s[l].w[i * s[l].outputs..(i + 1) * s[l].outputs],
                    Part::Bias => &s[l].b[..],
                });
                step(w, grad_sum, w0, scale, h.lr, h.mu);
            });
        }
    }
    tally
}

/// One SGD step: `w -= lr * (grad_sum * scale + mu * (w - w0))` (no proximal term without
/// an anchor `w0`, i.e. when `mu` is 0).
fn step(w: &mut [f32], grad_sum: &[f32], w0: Option<&[f32]>, scale: f32, lr: f32, mu: f32) {
    match w0 {
        Some(w0) => {
            for ((w, &g), &w0) in w.iter_mut().zip(grad_sum).zip(w0) {
                *w -= lr * (g * scale + mu * (*w - w0));
            }
        }
        None => {
            for (w, &g) in w.iter_mut().zip(grad_sum) {
                *w -= lr * g * scale;
            }
        }
    }
}

/// Loss and accuracy of `mlp` over `samples`, added to `tally`.
pub fn evaluate(mlp: &Mlp, samples: &Samples, tally: &mut Tally) {
    let mut ws = Workspace::default();
    for i in 0..samples.len() {
        let (x, y) = samples.get(i);
        let (loss, correct) = mlp.loss(x, y, &mut ws);
        tally.add(loss, correct);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(name: &str, shape: &[u32], data: Vec<f32>) -> Param {
        Param {
            name: name.into(),
            shape: shape.to_vec(),
            data,
        }
    }

    /// Deterministic small weights, away from zero so ReLUs are not at their kink.
    fn wave(n: usize, k: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + 1.0) * k).sin() * 0.5).collect()
    }

    fn params(dims: &[u32]) -> Vec<Param> {
        dims.windows(2)
            .enumerate()
            .flat_map(|(i, d)| {
                [
                    param(
                        &format!("fc{i}.weight"),
                        &[d[0], d[1]],
                        wave((d[0] * d[1]) as usize, 0.37 + i as f32),
                    ),
                    param(
                        &format!("fc{i}.bias"),
                        &[d[1]],
                        wave(d[1] as usize, 0.91 + i as f32),
                    ),
                ]
            })
            .collect()
    }

    /// Two Gaussian-free blobs per class in `inputs` dimensions: class `c` has feature
    /// `c % inputs` high, with deterministic jitter. Linearly separable.
    fn blobs(mlp: &Mlp, n: usize, classes: usize) -> Samples {
        let inputs = mlp.inputs();
        let mut s = Samples::new(inputs);
        let mut rng = SplitMix64::new(99);
        for i in 0..n {
            let c = i % classes;
            let x: Vec<f32> = (0..inputs)
                .map(|k| {
                    let jitter = (rng.below(1000) as f32 / 1000.0 - 0.5) * 0.4;
                    if k == c % inputs {
                        1.0 + jitter
                    } else {
                        jitter
                    }
                })
                .collect();
            s.push(mlp, i as u32, &x, c as i64).unwrap();
        }
        s
    }

    fn total_loss(mlp: &Mlp, x: &[f32], y: usize) -> f32 {
        mlp.loss(x, y, &mut Workspace::default()).0
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let p = params(&[5, 7, 6, 4]);
        let mlp = Mlp::from_params(&p).unwrap();
        let x = [0.3, -0.8, 0.5, 1.1, -0.2];
        let label = 2;
        let mut grads: Vec<Layer> = mlp.layers.iter().map(Layer::zeros_like).collect();
        // A batch of one whose update only records the gradient: the weights stay.
        let mut stepped = mlp.clone();
        let mut tally = Tally::default();
        let one = std::iter::once((&x[..], label));
        stepped.batch(
            one,
            &mut BatchWorkspace::default(),
            &mut tally,
            |l, part, _, g| {
                let at = match part {
                    Part::Row(i) => &mut grads[l].w[i * g.len()..(i + 1) * g.len()],
                    Part::Bias => &mut grads[l].b[..],
                };
                at.copy_from_slice(g);
            },
        );
        assert_eq!(stepped, mlp);
        assert_eq!(tally.samples, 1);
        let eps = 1e-3f32;
        let mut checked = 0;
        for (l, g) in grads.iter().enumerate() {
            for (which, len) in [(0, g.w.len()), (1, g.b.len())] {
                for k in 0..len {
                    let mut plus = mlp.clone();
                    let mut minus = mlp.clone();
                    let (vp, vm) = if which == 0 {
                        (&mut plus.layers[l].w[k], &mut minus.layers[l].w[k])
                    } else {
                        (&mut plus.layers[l].b[k], &mut minus.layers[l].b[k])
                    };
                    *vp += eps;
                    *vm -= eps;
                    let numeric = (total_loss(&plus, &x, label) - total_loss(&minus, &x, label))
                        / (2.0 * eps);
                    let analytic = if which == 0 { g.w[k] } else { g.b[k] };
                    assert!(
                        (numeric - analytic).abs() <= 2e-3 + 1e-2 * analytic.abs(),
                        "layer {l} {} {k}: numeric {numeric}, analytic {analytic}",
                        if which == 0 { "w" } else { "b" }
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 5 * 7 + 7 + 7 * 6 + 6 + 6 * 4 + 4);
    }

    /// The gradient a batch hands to `update` is the sum of its samples' own.
    #[test]
    fn a_batch_gradient_is_the_sum_of_its_samples() {
        let p = params(&[5, 7, 4]);
        let mlp = Mlp::from_params(&p).unwrap();
        let set = blobs(&mlp, 3, 4);
        let gradient = |idx: &[usize]| {
            let mut grads: Vec<Layer> = mlp.layers.iter().map(Layer::zeros_like).collect();
            let mut m = mlp.clone();
            let batch = idx.iter().map(|&i| set.get(i));
            m.batch(
                batch,
                &mut BatchWorkspace::default(),
                &mut Tally::default(),
                |l, part, _, g| {
                    let at = match part {
                        Part::Row(i) => &mut grads[l].w[i * g.len()..(i + 1) * g.len()],
                        Part::Bias => &mut grads[l].b[..],
                    };
                    at.copy_from_slice(g);
                },
            );
            grads
        };
        let all = gradient(&[0, 1, 2]);
        let each: Vec<Vec<Layer>> = (0..3).map(|i| gradient(&[i])).collect();
        for (l, layer) in all.iter().enumerate() {
            let sum = |k: usize, bias: bool| -> f32 {
                each.iter()
                    .map(|g| if bias { g[l].b[k] } else { g[l].w[k] })
                    .sum()
            };
            for (k, &v) in layer.w.iter().enumerate() {
                assert!((v - sum(k, false)).abs() <= 1e-5, "layer {l} w {k}");
            }
            for (k, &v) in layer.b.iter().enumerate() {
                assert!((v - sum(k, true)).abs() <= 1e-5, "layer {l} b {k}");
            }
        }
        assert!(all[0].w.iter().any(|&v| v != 0.0));
    }

    #[test]
    fn softmax_cross_entropy_by_hand() {
        // One layer, identity weights: logits = x.
        let p = vec![
            param("w", &[2, 2], vec![1.0, 0.0, 0.0, 1.0]),
            param("b", &[2], vec![0.0, 0.0]),
        ];
        let mlp = Mlp::from_params(&p).unwrap();
        let (loss, correct) = mlp.loss(&[2.0, 0.0], 0, &mut Workspace::default());
        let want = -(2f32.exp() / (2f32.exp() + 1.0)).ln();
        assert!((loss - want).abs() < 1e-6, "{loss} vs {want}");
        assert!(correct);
        // Large logits stay finite (log-sum-exp).
        let (loss, correct) = mlp.loss(&[1000.0, 0.0], 1, &mut Workspace::default());
        assert!((loss - 1000.0).abs() < 1e-3, "{loss}");
        assert!(!correct);
    }

    #[test]
    fn training_lowers_loss_and_learns_a_separable_set() {
        let p = params(&[4, 8, 3]);
        let mut mlp = Mlp::from_params(&p).unwrap();
        let samples = blobs(&mlp, 90, 3);
        let mut before = Tally::default();
        evaluate(&mlp, &samples, &mut before);
        let h = Hyper {
            epochs: 30,
            lr: 0.1,
            batch_size: 8,
            mu: 0.0,
            seed: 1,
            max_samples: None,
        };
        let last_epoch = train(&mut mlp, &samples, &h);
        let mut after = Tally::default();
        evaluate(&mlp, &samples, &mut after);
        assert!(
            after.mean_loss() < before.mean_loss() * 0.5,
            "{before:?} -> {after:?}"
        );
        assert_eq!(after.accuracy(), 1.0, "{after:?}");
        assert_eq!(last_epoch.samples, 90);
        assert!(last_epoch.accuracy() > 0.9, "{last_epoch:?}");
        mlp.check_finite(&p).unwrap();
        let out = mlp.to_params(&p);
        assert!(out.iter().map(|q| &q.data[..]).eq(mlp.tensors()));
        assert_eq!(
            out.iter().map(|q| (&q.name, &q.shape)).collect::<Vec<_>>(),
            p.iter().map(|q| (&q.name, &q.shape)).collect::<Vec<_>>()
        );
        assert_ne!(out, p);
    }

    #[test]
    fn same_seed_same_weights_other_seed_other_weights() {
        let p = params(&[4, 6, 3]);
        let base = Mlp::from_params(&p).unwrap();
        let samples = blobs(&base, 30, 3);
        let run = |seed| {
            let mut m = base.clone();
            let h = Hyper {
                epochs: 2,
                lr: 0.05,
                batch_size: 4,
                mu: 0.0,
                seed,
                max_samples: None,
            };
            train(&mut m, &samples, &h);
            m
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn fedprox_keeps_weights_closer_to_the_start() {
        let p = params(&[4, 6, 3]);
        let base = Mlp::from_params(&p).unwrap();
        let samples = blobs(&base, 60, 3);
        let distance = |mu| {
            let mut m = base.clone();
            let h = Hyper {
                epochs: 10,
                lr: 0.1,
                batch_size: 8,
                mu,
                seed: 5,
                max_samples: None,
            };
            train(&mut m, &samples, &h);
            m.layers
                .iter()
                .zip(&base.layers)
                .flat_map(|(a, b)| a.w.iter().zip(&b.w).chain(a.b.iter().zip(&b.b)))
                .map(|(a, b)| f64::from(a - b).powi(2))
                .sum::<f64>()
        };
        let (plain, prox) = (distance(0.0), distance(1.0));
        assert!(prox < plain * 0.9, "plain {plain}, prox {prox}");
    }

    #[test]
    fn fedprox_step_by_hand() {
        // Zero gradient: the step only pulls towards w0.
        let mut w = [1.0f32, -2.0];
        step(&mut w, &[0.0, 0.0], Some(&[0.0, 0.0]), 1.0, 0.5, 0.2);
        assert_eq!(w, [0.9, -1.8]);
        // Plain SGD on the mean gradient, with an anchor and mu 0 or without one.
        for anchor in [Some(&[1.0f32][..]), None] {
            let mut w = [1.0f32];
            step(&mut w, &[4.0], anchor, 0.25, 0.5, 0.0);
            assert_eq!(w, [0.5]);
        }
    }

    #[test]
    fn bad_params_are_named() {
        let ok = params(&[4, 3, 2]);
        let cases: Vec<(Vec<Param>, &str)> = vec![
            (vec![], "no params"),
            (ok[..3].to_vec(), "fc1.weight [3, 2] has no bias"),
            (
                vec![ok[0].clone(), param("fc0.bias", &[4], vec![0.0; 4])],
                "fc0.bias: shape [4] does not fit fc0.weight [4, 3]: expected [3]",
            ),
            (
                vec![
                    ok[0].clone(),
                    ok[1].clone(),
                    param("fc1.weight", &[2, 2], vec![0.0; 4]),
                    param("fc1.bias", &[2], vec![0.0; 2]),
                ],
                "fc1.weight: shape [2, 2] does not follow fc0.weight [4, 3]: expected 3 inputs",
            ),
            (
                vec![
                    param("w", &[12], vec![0.0; 12]),
                    param("b", &[3], vec![0.0; 3]),
                ],
                "w: shape [12] is not a matrix",
            ),
            (
                vec![
                    param("w", &[4, 3], vec![0.0; 11]),
                    param("b", &[3], vec![0.0; 3]),
                ],
                "w: shape [4, 3] does not match its 11 values",
            ),
            (
                vec![param("w", &[0, 3], vec![]), param("b", &[3], vec![0.0; 3])],
                "w: shape [0, 3] has an empty dimension",
            ),
            (
                vec![ok[0].clone(), ok[0].clone()],
                "fc0.weight: name given twice",
            ),
            (
                vec![
                    ok[0].clone(),
                    param("fc0.bias", &[3], vec![0.0, f32::NAN, 0.0]),
                ],
                "fc0.bias: value 1 is not finite (NaN)",
            ),
            (
                vec![
                    ok[0].clone(),
                    param("fc0.bias", &[3], vec![0.0, 0.0, f32::INFINITY]),
                ],
                "fc0.bias: value 2 is not finite (inf)",
            ),
        ];
        for (p, want) in cases {
            let err = Mlp::from_params(&p).unwrap_err();
            assert!(err.contains(want), "want {want:?}, got {err:?}");
        }
        // Huge shapes do not overflow the element count.
        let huge = vec![
            param("w", &[u32::MAX, u32::MAX, u32::MAX], vec![]),
            param("b", &[1], vec![0.0]),
        ];
        assert!(
            Mlp::from_params(&huge)
                .unwrap_err()
                .contains("does not match")
        );
    }

    #[test]
    fn bad_samples_are_named_by_index() {
        let mlp = Mlp::from_params(&params(&[4, 3, 2])).unwrap();
        let mut s = Samples::new(4);
        s.push(&mlp, 0, &[0.0; 4], 1).unwrap();
        let err = s.push(&mlp, 7, &[0.0; 4], 2).unwrap_err();
        assert_eq!(
            err,
            "sample 7: label 2 is outside 0..2 (the model's outputs)"
        );
        let err = s.push(&mlp, 8, &[0.0; 4], -1).unwrap_err();
        assert!(err.starts_with("sample 8: label -1"), "{err}");
        let err = s.push(&mlp, 9, &[0.0; 3], 0).unwrap_err();
        assert_eq!(
            err,
            "sample 9: 3 features, but the first layer [4, 3] takes 4"
        );
        let err = s.push(&mlp, 10, &[0.0, f32::NAN, 0.0, 0.0], 0).unwrap_err();
        assert!(
            err.starts_with("sample 10: feature 1 is not finite"),
            "{err}"
        );
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn divergence_is_reported() {
        let p = params(&[2, 2]);
        let mut mlp = Mlp::from_params(&p).unwrap();
        mlp.layers[0].w[3] = f32::INFINITY;
        let err = mlp.check_finite(&p).unwrap_err();
        assert!(err.contains("fc0.weight value 3 became inf"), "{err}");
    }
}
