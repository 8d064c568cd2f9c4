//! Training only the last layers of a model (a task's `[train] trainable`): the layers in
//! front stay frozen, so each sample goes through them once, here, and the trainer sees their
//! output as its input and trains only the head. The coordinator's task check makes sure the
//! trained layers are the last ones and whole; the round carries only their weights.

use edge_inference::dense::{self, DenseLayer, NamedWeights};

/// The weight and bias of each of `layers`, as the model stores them.
fn frozen_values(model: &[u8], layers: &[DenseLayer]) -> Result<Vec<NamedWeights>, String> {
    let inits = edge_inference::read_initializers(model).map_err(|e| e.to_string())?;
    let mut named = Vec::with_capacity(layers.len() * 2);
    for l in layers {
        for name in [&l.weight, &l.bias] {
            let (_, t) = inits
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| format!("frozen layer: the model has no initializer {name}"))?;
            named.push(NamedWeights {
                name: name.clone(),
                shape: t.shape().to_vec(),
                data: t
                    .to_f32()
                    .ok_or_else(|| format!("frozen layer: {name} is not f32"))?,
            });
        }
    }
    Ok(named)
}

/// The frozen layers, read once per round: their digest (what a round names in
/// `RoundHeader::frozen`) and their weights in the trainer's layout (`[inputs, outputs]`),
/// ReLU after each (every layer but a model's last is followed by one, and the last is never
/// frozen).
pub(crate) struct Frozen {
    names: Vec<String>,
    digest: String,
    layers: Vec<(NamedWeights, NamedWeights)>,
}

impl Frozen {
    /// The weights of `layers` (the model's layers in front of the first trained one) read
    /// from the model's initializers.
    pub(crate) fn from_model(model: &[u8], layers: &[DenseLayer]) -> Result<Frozen, String> {
        let named = frozen_values(model, layers)?;
        let digest = protocol::v1::fl::frozen_digest(named.iter().map(|w| w.data.as_slice()));
        let mut trainer = dense::into_trainer(layers, named)?.into_iter();
        let mut pairs = Vec::with_capacity(layers.len());
        while let (Some(w), Some(b)) = (trainer.next(), trainer.next()) {
            pairs.push((w, b));
        }
        Ok(Frozen {
            names: layers.iter().map(|l| l.weight.clone()).collect(),
            digest,
            layers: pairs,
        })
    }

    /// Refuses a round whose digest of the frozen layers (those of the task's initial model)
    /// is not this model's.
    pub(crate) fn check(&self, want: &str) -> Result<(), String> {
        if self.digest == want {
            return Ok(());
        }
        Err(format!(
            "its frozen layers ({}) are not the task's (sha256 {}, the task's {want}): the head \
             would learn from other features than the coordinator evaluates; serve the task's \
             initial model",
            self.names.join(", "),
            self.digest
        ))
    }

    /// Features a sample must have.
    pub(crate) fn inputs(&self) -> usize {
        self.layers
            .first()
            .map_or(0, |(w, _)| w.shape.first().copied().unwrap_or(0) as usize)
    }

    /// The sample through every frozen layer: `relu(x W + b)`, layer by layer.
    pub(crate) fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut x = x.to_vec();
        for (w, b) in &self.layers {
            let outputs = b.data.len();
            let mut y = b.data.clone();
            for (i, &xi) in x.iter().enumerate() {
                if xi == 0.0 {
                    continue;
                }
                let row = &w.data[i * outputs..(i + 1) * outputs];
                for (yj, &wij) in y.iter_mut().zip(row) {
                    *yj += xi * wij;
                }
            }
            y.iter_mut().for_each(|v| *v = v.max(0.0));
            x = y;
        }
        x
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use edge_testmodels::onnx_builder;

    #[test]
    fn frozen_prefix_matches_the_model_up_to_the_head() {
        // 3 -> 4 -> 2 with known weights; freeze the first layer.
        let layers = onnx_builder::mlp_layers(&[3, 4, 2], 9);
        let model = onnx_builder::mlp(&layers);
        let found = edge_inference::dense_layers(&model).unwrap();
        let frozen = Frozen::from_model(&model, &found[..1]).unwrap();
        assert_eq!(frozen.inputs(), 3);
        let x = [0.5, -1.0, 2.0];
        let got = frozen.forward(&x);
        let l = &layers[0];
        let want: Vec<f32> = (0..4)
            .map(|j| {
                let s: f32 = (0..3).map(|i| x[i] * l.weight[i * 4 + j]).sum::<f32>() + l.bias[j];
                s.max(0.0)
            })
            .collect();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }
}
