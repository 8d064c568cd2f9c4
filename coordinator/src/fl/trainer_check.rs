//! `fl start`'s trainer check: before a task is accepted, its trainer module (`trainer` in the
//! task file) runs once in the devices' own sandbox (`edge-sandbox`: the same host, limits and
//! checks of the weights going in and coming out) under the task's device limits (`[device]`,
//! the agent's `[sandbox]` keys and defaults), on the task's initial weights in the trainer's
//! layout (`edge_inference::dense::to_trainer`, as the agent maps them) and a synthetic batch
//! shaped from the model's trained layers. A trainer that refuses the model, traps, times out
//! or outgrows the memory limit here does the same on every device; the task is refused with
//! that reason instead of starting rounds that can only fail.
//!
//! The time limit is measured on the coordinator's CPU, usually faster than a board's: passing
//! it here does not promise a device keeps within it.
//!
//! **Invariant:** the check writes nothing outside a throwaway directory (the compiled-module
//! cache). **Boundary:** `task::load`.

use std::sync::Arc;

use edge_inference::dense::{self, WeightsRef};
use edge_sandbox::trainer::Param;
use edge_sandbox::{Sandbox, SandboxConfig};
use protocol::v1::fl::ParamSpec;

use super::task::TrainSpec;

/// Most rows of the synthetic batch (the `samples` import's largest read).
const MAX_ROWS: u32 = edge_sandbox::trainer::MAX_READ_BATCH;

/// What one check needs from the task.
#[derive(Debug)]
pub struct Trial<'a> {
    /// The trainer module's file name, as the messages name it.
    pub trainer: &'a str,
    pub trainer_bytes: &'a [u8],
    /// The device limits (`[device]`).
    pub limits: &'a SandboxConfig,
    /// The task's model (self-contained: external data inlined).
    pub model: &'a [u8],
    pub params: &'a [ParamSpec],
    /// The initial weights, the params' values concatenated.
    pub initial: &'a [f32],
    pub train: &'a TrainSpec,
}

/// A check that passed: `epochs` epochs of one step each on `rows` synthetic samples.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerRun {
    pub trainer: String,
    pub epochs: u32,
    pub rows: u32,
    /// The largest linear memory the trainer grew to, bytes.
    pub peak_memory_bytes: u64,
    pub max_memory_bytes: u64,
}

impl std::fmt::Display for TrainerRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const MIB: f64 = 1024.0 * 1024.0;
        write!(
            f,
            "trainer {}: one step on a synthetic batch of {} rows ok, {} epoch(s) (peak linear memory {:.1} MiB of {:.1})",
            self.trainer,
            self.rows,
            self.epochs,
            self.peak_memory_bytes as f64 / MIB,
            self.max_memory_bytes as f64 / MIB
        )
    }
}

/// Runs `t.trainer` once, as a device would for a round, with the task's hyperparameters
/// (a trainer refuses those it cannot use) on one batch: `batch_size` synthetic rows (at most
/// [`MAX_ROWS`], or `max_samples`), so each epoch is one step, never more work than a device
/// with at least a batch of samples does. `Err`: the sandbox's or the trainer's reason, as a
/// device would report it.
pub fn run(t: &Trial<'_>) -> Result<TrainerRun, String> {
    let layers = edge_inference::dense_layers(t.model).map_err(|e| e.to_string())?;
    // The device runs the frozen layers in front; the trainer sees the trained ones only.
    let first = dense::first_named(&layers, |n| t.params.iter().any(|p| p.name == n)).unwrap_or(0);
    let trained = &layers[first..];
    let (Some(head), Some(last)) = (trained.first(), trained.last()) else {
        return Err("the model has no trained dense layer".into());
    };
    let weights = trainer_weights(trained, t.params, t.initial)?;
    let rows = t
        .train
        .batch_size
        .min(t.train.max_samples.unwrap_or(MAX_ROWS))
        .clamp(1, MAX_ROWS);
    let samples = synthetic_batch(rows, head.inputs, last.outputs);
    let order = t.train.order(u64::MAX, 0);
    let cache = tempfile::tempdir().map_err(|e| format!("cannot make a cache directory: {e}"))?;
    let sandbox = Sandbox::new(t.limits, cache.path()).map_err(|e| e.to_string())?;
    let module = sandbox
        .load_trainer(t.trainer, t.trainer_bytes)
        .map_err(|e| e.to_string())?;
    let trained = sandbox
        .train_measured(&module, weights, &order.trainer_params(), Arc::new(samples))
        .map_err(|e| e.to_string())?;
    Ok(TrainerRun {
        trainer: t.trainer.to_owned(),
        epochs: order.epochs,
        rows,
        peak_memory_bytes: trained.peak_memory_bytes,
        max_memory_bytes: t.limits.max_memory_bytes,
    })
}

/// The initial weights in the trainer's layout: `(weight [inputs, outputs], bias [outputs])`
/// per trained layer, found from the graph as the agent does (`params` and `initial` as
/// [`super::task::initial_weights`] gives them; also the fl bench's exported models).
pub fn trainer_weights(
    trained: &[dense::DenseLayer],
    params: &[ParamSpec],
    initial: &[f32],
) -> Result<Vec<Param>, String> {
    let mut given = Vec::with_capacity(params.len());
    let mut at = 0;
    for p in params {
        let data = initial
            .get(at..at + p.len())
            .ok_or_else(|| format!("the initial weights end before {}", p.name))?;
        at += p.len();
        given.push(WeightsRef {
            name: &p.name,
            shape: &p.shape,
            data,
        });
    }
    Ok(dense::to_trainer(trained, &given)?
        .into_iter()
        .map(|w| Param {
            name: w.name,
            shape: w.shape,
            data: w.data,
        })
        .collect())
}

/// `rows` samples of `inputs` small values each (a different pattern per row), labelled
/// `0..classes` in turn: valid input for any classifier of that shape.
fn synthetic_batch(rows: u32, inputs: u32, classes: u32) -> Vec<(Vec<f32>, i64)> {
    (0..rows)
        .map(|r| {
            let x = (0..inputs)
                .map(|i| ((r * 7 + i * 3) % 11) as f32 / 11.0 - 0.5)
                .collect();
            (x, i64::from(r % classes.max(1)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_synthetic_batch_fits_the_model_and_labels_every_class() {
        let b = synthetic_batch(12, 5, 4);
        assert_eq!(b.len(), 12);
        assert!(b.iter().all(|(x, _)| x.len() == 5));
        assert!(b.iter().flat_map(|(x, _)| x).all(|v| v.abs() <= 0.5));
        let mut labels: Vec<i64> = b.iter().map(|(_, l)| *l).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels, vec![0, 1, 2, 3]);
    }
}
