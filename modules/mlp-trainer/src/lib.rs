//! `mlp-trainer`: the federated-learning trainer for a dense MLP (world `trainer` of
//! `edge:pipeline@0.1.0`, `modules/wit/trainer.wit`).
//!
//! The parameters are `(weight [inputs, outputs], bias [outputs])` pairs in layer order, with
//! `Relu` between layers and softmax cross-entropy at the end. The agent finds the layers in
//! the model's graph and converts exported layouts to these before the call and back after it
//! (`edge_inference::dense`: torch's `Gemm` weights `[outputs, inputs]`, skl2onnx's `[1, n]`
//! biases), so this module never sees initializer names or an exporter's layout. `train` reads
//! the parameters (one tensor at a time, through the `weights` import) and the samples, runs
//! minibatch SGD (optionally FedProx) for `epochs` and writes the new parameters back;
//! `evaluate` returns loss and accuracy over all samples. The math is in [`mlp`] and
//! [`hyper`]; this file is the glue to the host's `weights` and `samples` imports.

pub mod hyper;
pub mod mlp;
pub mod rng;

// Generated lowering code passes each flattened field as an argument.
#[allow(clippy::too_many_arguments)]
mod bindings {
    wit_bindgen::generate!({
        world: "trainer",
        path: "../wit",
    });
}

use bindings::edge::pipeline::log::{Level, log};
use bindings::edge::pipeline::samples;
use bindings::edge::pipeline::training::{EvalResult, TrainResult};
use bindings::edge::pipeline::weights;

use hyper::Hyper;
use mlp::{Mlp, Samples, Tally};

/// Samples asked for per `read` call: the host's cap (see `samples.read`).
const READ_BATCH: u32 = 1024;

struct MlpTrainer;

impl bindings::Guest for MlpTrainer {
    fn train(params: String) -> Result<TrainResult, String> {
        let hyper = Hyper::parse(&params)?;
        // The model takes the values over; `weights` keeps only the names and shapes, so this
        // instance holds the model once while it trains.
        let mut weights = read_weights();
        let mut model = Mlp::take_params(&mut weights)?;
        let total = samples::count().min(hyper.max_samples.unwrap_or(u32::MAX));
        if total == 0 {
            return Err("no samples to train on".into());
        }
        let mut set = Samples::new(model.inputs());
        read_range(total, |index, s| {
            set.push(&model, index, &s.features, s.label)
        })?;
        let tally = mlp::train(&mut model, &set, &hyper);
        model.check_finite(&weights)?;
        log(
            Level::Debug,
            &format!(
                "trained {} epochs on {total} samples: loss {:.4}, accuracy {:.3}",
                hyper.epochs,
                tally.mean_loss(),
                tally.accuracy()
            ),
        );
        // In pieces: the host keeps each as it comes, and a large tensor never crosses whole
        // (which would hold it once more on the host's side while this instance still has it).
        for (index, data) in model.tensors().enumerate() {
            for (k, piece) in data.chunks(PIECE).enumerate() {
                weights::write_at(index as u32, (k * PIECE) as u32, piece);
            }
        }
        Ok(TrainResult {
            samples: total,
            loss: tally.mean_loss(),
            accuracy: tally.accuracy(),
        })
    }

    fn evaluate() -> Result<EvalResult, String> {
        let model = Mlp::take_params(&mut read_weights())?;
        let total = samples::count();
        if total == 0 {
            return Err("no samples to evaluate".into());
        }
        // Streamed batch by batch: evaluation holds no more than one batch of samples.
        let mut tally = Tally::default();
        read_batches(total, |start, got| {
            let mut batch = Samples::new(model.inputs());
            for (k, s) in got.iter().enumerate() {
                batch.push(&model, start + k as u32, &s.features, s.label)?;
            }
            mlp::evaluate(&model, &batch, &mut tally);
            Ok(())
        })?;
        Ok(EvalResult {
            loss: tally.mean_loss(),
            accuracy: tally.accuracy(),
            samples: total,
        })
    }
}

/// Values a weight tensor crosses the boundary in, either way (256 KiB).
const PIECE: usize = 64 * 1024;

/// The call's parameters: names and shapes, and each tensor's values, taken from the host
/// piece by piece from the end (the host lets go of each piece as it hands it over, so a large
/// tensor is not held on both sides at once).
fn read_weights() -> Vec<mlp::Param> {
    weights::describe()
        .into_iter()
        .enumerate()
        .map(|(index, p)| {
            let n = p.shape.iter().map(|&d| d as usize).product::<usize>();
            // Filled back to front and turned round at the end, not zeroed first: a zeroed
            // buffer (calloc clears what it hands out here) would touch all of its pages while
            // the host still holds the values, two copies at once.
            let mut data = Vec::with_capacity(n);
            let mut left = n;
            while left > 0 {
                let len = left.min(PIECE);
                let piece = weights::take(index as u32, len as u32);
                data.extend(piece.iter().rev());
                left -= len;
            }
            data.reverse();
            mlp::Param {
                name: p.name,
                shape: p.shape,
                data,
            }
        })
        .collect()
}

/// Calls `each` with every sample `0..total` and its index.
fn read_range(
    total: u32,
    mut each: impl FnMut(u32, &samples::Sample) -> Result<(), String>,
) -> Result<(), String> {
    read_batches(total, |start, batch| {
        for (k, s) in batch.iter().enumerate() {
            each(start + k as u32, s)?;
        }
        Ok(())
    })
}

/// Calls `each` with consecutive batches covering `0..total` and the index of each
/// batch's first sample.
fn read_batches(
    total: u32,
    mut each: impl FnMut(u32, &[samples::Sample]) -> Result<(), String>,
) -> Result<(), String> {
    let mut start = 0;
    while start < total {
        let batch = samples::read(start, (total - start).min(READ_BATCH));
        if batch.is_empty() {
            return Err(format!(
                "the host returned no samples from index {start} of {total}"
            ));
        }
        let n = batch.len().min((total - start) as usize);
        each(start, &batch[..n])?;
        start += n as u32;
    }
    Ok(())
}

bindings::export!(MlpTrainer with_types_in bindings);
