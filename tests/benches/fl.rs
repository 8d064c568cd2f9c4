//! Federated learning on real data: `cargo xtask bench fl` (or `cargo bench -p edge-tests
//! --bench fl`).
//!
//! The digits data set (tests/data) split over `CLIENTS` clients three ways (IID, Dirichlet(0.5),
//! two classes per client), an MLP 64-32-10, every update codec against fp32, over several
//! seeds. It runs in one process but with the product's parts: local training is the
//! `mlp_trainer.wasm` module in the agent's sandbox, updates are encoded and decoded by
//! `protocol::v1::fl::codec` with error-feedback residuals kept per client as the agent keeps
//! them, sizes are those of the `fl::Update` bodies the agent queues, and aggregation is the
//! coordinator's `fl::aggregate` (FedAvg) with its server optimizer. What it leaves out is MQTT
//! (the end-to-end test `tests/tests/federated.rs` covers that path).
//!
//! Aggregation is the coordinator's default: update norms clipped at twice the round's median
//! (`fl::privacy::clip`). A second table compares, on fp32, clipping off, the default, and
//! DP-FedAvg (`fl::privacy::noisy_mean`) at the noise multipliers in `FL_PRIVACY`, with the
//! epsilon each one states after the run's rounds.
//!
//! A third table trains the models the common exporters wrote (`inference/testmodels/exported/`:
//! skl2onnx MLP, SGD and LogisticRegression, torch's Gemm, dynamo and external-data exports) from
//! their own weights, fp32, on the first split with seed 1, each read as `fl start` reads a task's
//! initial model (layers from the graph, `trainable_form` for LogisticRegression), and reports
//! the rounds each takes to come within one point of the reference MLP's fp32 accuracy in this
//! run.
//!
//! Environment: `FL_ROUNDS` (default 100), `FL_SEEDS` (default 3), `FL_CODECS` (comma list),
//! `FL_SPLITS` (comma list of iid, dirichlet, 2-class), `FL_PRIVACY` (comma list of `off`,
//! `auto`, `dp:Z:C` (noise multiplier Z, clip norm C); default `off,auto,dp:0.5:1,dp:1:1`; empty:
//! no privacy table), `FL_FIXTURES` (comma list of exported models; empty: no fixture table),
//! `FL_FIXTURE_ROUNDS` (default 30), `FL_OUT` (directory for fl.csv and fl.svg; default
//! target/bench).
//!
//! Prints per split and codec: final accuracy (mean and spread over seeds), difference to fp32,
//! upload bytes per round and the ratio to fp32; then accuracy per round. Writes every round of
//! every run to fl.csv and a plot (accuracy per round, one panel per split) to fl.svg.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use edge_agent::sandbox::trainer::TrainerModule;
use edge_agent::sandbox::trainer::{Param, SampleSource};
use edge_agent::sandbox::{Sandbox, SandboxConfig};
use edge_coordinator::fl::aggregate::{
    ClientUpdate, Rule, ServerOptimizer, ServerState, aggregate,
};
use edge_coordinator::fl::privacy::{self, Clip};
use edge_tests::digits::{self, Digits, Split};
use protocol::v1::fl::{Codec, Update, codec};

const CLIENTS: usize = 10;
const LAYERS: [u32; 3] = [64, 32, 10];
const EPOCHS: u32 = 2;
const LR: f32 = 0.1;
const BATCH: u32 = 16;

struct Shard(Vec<(Vec<f32>, i64)>);

impl SampleSource for Shard {
    fn count(&self) -> u32 {
        self.0.len() as u32
    }

    fn read(&self, start: u32, n: u32) -> Vec<(Vec<f32>, i64)> {
        let s = (start as usize).min(self.0.len());
        let e = s.saturating_add(n as usize).min(self.0.len());
        self.0[s..e].to_vec()
    }
}

fn shard(d: &Digits, idx: &[usize]) -> Arc<Shard> {
    Arc::new(Shard(
        idx.iter()
            .map(|&i| (d.x[i].clone(), i64::from(d.y[i])))
            .collect(),
    ))
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One round's record.
#[derive(Debug, Clone)]
struct RoundRecord {
    accuracy: f32,
    loss: f32,
    /// Sum of the update bodies the clients queued this round.
    upload_bytes: usize,
}

struct Setup {
    sandbox: Sandbox,
    module: TrainerModule,
    params: Vec<(String, Vec<u32>)>,
}

fn to_params(setup: &Setup, flat: &[f32]) -> Vec<Param> {
    let mut at = 0;
    setup
        .params
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().map(|&d| d as usize).product();
            let p = Param {
                name: name.clone(),
                shape: shape.clone(),
                data: flat[at..at + n].to_vec(),
            };
            at += n;
            p
        })
        .collect()
}

fn flatten(params: &[Param]) -> Vec<f32> {
    params.iter().flat_map(|p| p.data.iter().copied()).collect()
}

/// One client's round: local training from `base`, the delta encoded as the agent does and
/// decoded as the coordinator does. Returns the update and its body's size.
#[allow(clippy::too_many_arguments)]
fn client_round(
    setup: &Setup,
    base: &[Param],
    global: &[f32],
    shard: Arc<Shard>,
    residual: &mut [f32],
    codec_choice: Codec,
    round: u32,
    client_seed: u64,
    i: usize,
) -> (ClientUpdate, usize) {
    let hp = serde_json::json!({
        "epochs": EPOCHS, "lr": LR, "batch_size": BATCH, "mu": 0.0, "seed": client_seed,
    })
    .to_string();
    let trained = setup
        .sandbox
        .train(&setup.module, base.to_vec(), &hp, shard)
        .expect("local training");
    let local = flatten(&trained.weights);
    let delta: Vec<f32> = local.iter().zip(global).map(|(l, g)| l - g).collect();
    let ef = codec_choice.uses_error_feedback();
    let payload = codec::encode(codec_choice, &delta, ef.then_some(residual), client_seed);
    let body = Update {
        task: "digits".into(),
        round,
        base_version: round - 1,
        samples: trained.samples,
        loss: trained.loss,
        accuracy: trained.accuracy,
        train_ms: 0,
        payload,
    }
    .encode();
    // What the coordinator does with it.
    let decoded = Update::decode(&body).expect("decodes");
    let delta = codec::decode(&decoded.payload, global.len()).expect("codec");
    let update = ClientUpdate {
        device: format!("c{i}"),
        samples: decoded.samples,
        staleness: 0,
        delta,
    };
    (update, body.len())
}

/// How the round's updates are combined.
#[derive(Debug, Clone, Copy)]
enum Combine {
    Clipped(Clip),
    /// DP-FedAvg: clip to `clip`, unweighted sum, Gaussian noise `z * clip`.
    Dp {
        z: f32,
        clip: f32,
    },
}

impl std::fmt::Display for Combine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Combine::Clipped(Clip::Off) => f.write_str("clip off"),
            Combine::Clipped(Clip::Auto { multiplier }) => write!(f, "clip {multiplier}x median"),
            Combine::Clipped(Clip::Norm { norm }) => write!(f, "clip {norm}"),
            Combine::Dp { z, clip } => write!(f, "dp z={z} C={clip}"),
        }
    }
}

impl std::str::FromStr for Combine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split(':').collect::<Vec<_>>()[..] {
            ["off"] => Ok(Combine::Clipped(Clip::Off)),
            ["auto"] => Ok(Combine::Clipped(Clip::default())),
            ["dp", z, c] => Ok(Combine::Dp {
                z: z.parse().map_err(|e| format!("{s}: {e}"))?,
                clip: c.parse().map_err(|e| format!("{s}: {e}"))?,
            }),
            _ => Err(format!("{s}: use off, auto or dp:Z:C")),
        }
    }
}

/// Runs one federated training; returns a record per round.
#[allow(clippy::too_many_arguments)]
fn run(
    setup: &Setup,
    initial: &[f32],
    clients: &[Arc<Shard>],
    holdout: &Arc<Shard>,
    codec_choice: Codec,
    combine: Combine,
    rounds: usize,
    seed: u64,
) -> Vec<RoundRecord> {
    use rand::SeedableRng;
    let mut noise = rand::rngs::StdRng::seed_from_u64(seed);
    let n = initial.len();
    let mut global = initial.to_vec();
    let mut server = ServerState::new(n);
    let opt = ServerOptimizer::Sgd { lr: 1.0 };
    let mut residuals = vec![vec![0.0f32; n]; clients.len()];
    let mut out = Vec::with_capacity(rounds);
    for round in 1..=rounds as u32 {
        let base = to_params(setup, &global);
        // Clients train on the two cores; each keeps its own residual.
        let mut work: Vec<(usize, Arc<Shard>, Vec<f32>)> = clients
            .iter()
            .zip(residuals.iter_mut())
            .enumerate()
            .map(|(i, (sh, r))| (i, sh.clone(), std::mem::take(r)))
            .collect();
        let second = work.split_off(work.len() / 2);
        let results: Vec<(ClientUpdate, usize)> = std::thread::scope(|s| {
            let handles: Vec<_> = [work, second]
                .into_iter()
                .map(|chunk| {
                    let (base, global) = (&base, &global);
                    s.spawn(move || {
                        chunk
                            .into_iter()
                            .map(|(i, sh, mut residual)| {
                                let (u, bytes) = client_round(
                                    setup,
                                    base,
                                    global,
                                    sh,
                                    &mut residual,
                                    codec_choice,
                                    round,
                                    seed ^ ((round as u64) << 20) ^ i as u64,
                                    i,
                                );
                                (i, residual, u, bytes)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            let mut all = Vec::new();
            for h in handles {
                for (i, residual, u, bytes) in h.join().expect("client thread") {
                    residuals[i] = residual;
                    all.push((u, bytes));
                }
            }
            all
        });
        let upload_bytes = results.iter().map(|(_, b)| b).sum();
        let mut updates: Vec<ClientUpdate> = results.into_iter().map(|(u, _)| u).collect();
        let step = match combine {
            Combine::Clipped(clip) => {
                privacy::clip(&clip, &mut updates);
                aggregate(&Rule::FedAvg, &updates)
            }
            Combine::Dp { z, clip } => {
                privacy::clip(&Clip::Norm { norm: clip }, &mut updates);
                privacy::noisy_mean(&updates, clip, z, &mut noise)
            }
        };
        server.apply(&opt, &mut global, &step);
        let eval = setup
            .sandbox
            .evaluate(&setup.module, to_params(setup, &global), holdout.clone())
            .expect("evaluation");
        out.push(RoundRecord {
            accuracy: eval.accuracy,
            loss: eval.loss,
            upload_bytes,
        });
    }
    out
}

fn mean_sd(v: &[f32]) -> (f32, f32) {
    let m = v.iter().sum::<f32>() / v.len() as f32;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f32>() / v.len().max(1) as f32;
    (m, var.sqrt())
}

fn main() {
    // `cargo bench` passes --bench; a test harness run passes nothing useful either way.
    let rounds = env_num("FL_ROUNDS", 100);
    let seeds = env_num("FL_SEEDS", 3) as u64;
    let codecs: Vec<Codec> = env_list("FL_CODECS", "fp32,fp16,int8,int4,topk:0.02,sign")
        .iter()
        .map(|c| c.parse().expect("codec"))
        .collect();
    let splits: Vec<Split> = env_list("FL_SPLITS", "iid,dirichlet,2-class")
        .iter()
        .map(|s| match s.as_str() {
            "iid" => Split::Iid,
            "dirichlet" => Split::Dirichlet(0.5),
            "2-class" => Split::TwoClasses,
            other => panic!("unknown split {other}"),
        })
        .collect();
    let out_dir = std::env::var("FL_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench"));
    std::fs::create_dir_all(&out_dir).expect("output directory");
    let wasm = edge_tests::wasm_dir().join("mlp_trainer.wasm");
    let bytes = std::fs::read(&wasm).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; build the modules first: cargo xtask modules",
            wasm.display()
        )
    });
    let state = tempfile::tempdir().expect("tempdir");
    let sandbox = Sandbox::new(&SandboxConfig::default(), state.path()).expect("sandbox");
    let module = sandbox
        .load_trainer("mlp_trainer.wasm", &bytes)
        .expect("trainer module");
    let d = digits::load().expect("digits");
    let (train_idx, test_idx) = digits::holdout(&d, 0.2, 0);
    let holdout = shard(&d, &test_idx);
    println!(
        "federated learning on digits: {} training samples over {CLIENTS} clients, {} held out; \
         MLP {LAYERS:?}; {rounds} rounds, all clients every round, {EPOCHS} local epochs, lr {LR}, \
         batch {BATCH}; FedAvg (norms clipped at 2x the round's median), server SGD lr 1; \
         {seeds} seeds",
        train_idx.len(),
        test_idx.len()
    );
    let combines: Vec<Combine> = env_list("FL_PRIVACY", "off,auto,dp:0.5:1,dp:1:1")
        .iter()
        .map(|c| c.parse().expect("FL_PRIVACY"))
        .collect();
    // (split, combine) -> final accuracy per seed
    let mut private: BTreeMap<(usize, usize), Vec<f32>> = BTreeMap::new();
    let mut csv = String::from("split,codec,seed,round,accuracy,loss,upload_bytes\n");
    // (split, codec) -> per seed, per round
    let mut results: BTreeMap<(usize, usize), Vec<Vec<RoundRecord>>> = BTreeMap::new();
    let started = Instant::now();
    for (si, split) in splits.iter().enumerate() {
        for seed in 1..=seeds {
            let parts = digits::partition(&d, &train_idx, CLIENTS, *split, seed);
            let clients: Vec<Arc<Shard>> = parts.iter().map(|p| shard(&d, p)).collect();
            let init = digits::initial_mlp(&LAYERS, seed);
            let setup = Setup {
                sandbox: sandbox.clone(),
                module: module.clone(),
                params: init
                    .iter()
                    .map(|(n, s, _)| (n.clone(), s.clone()))
                    .collect(),
            };
            let initial: Vec<f32> = init
                .iter()
                .flat_map(|(_, _, v)| v.iter().copied())
                .collect();
            for (ci, c) in codecs.iter().enumerate() {
                let recs = run(
                    &setup,
                    &initial,
                    &clients,
                    &holdout,
                    *c,
                    Combine::Clipped(Clip::default()),
                    rounds,
                    seed,
                );
                for (r, rec) in recs.iter().enumerate() {
                    csv.push_str(&format!(
                        "{split},{c},{seed},{},{:.4},{:.4},{}\n",
                        r + 1,
                        rec.accuracy,
                        rec.loss,
                        rec.upload_bytes
                    ));
                }
                eprintln!(
                    "  {split} seed {seed} {c}: final accuracy {:.2}% ({:.0} s so far)",
                    recs.last().map_or(0.0, |r| r.accuracy * 100.0),
                    started.elapsed().as_secs_f64()
                );
                results.entry((si, ci)).or_default().push(recs);
            }
            for (pi, combine) in combines.iter().enumerate() {
                let recs = run(
                    &setup,
                    &initial,
                    &clients,
                    &holdout,
                    Codec::Fp32,
                    *combine,
                    rounds,
                    seed,
                );
                eprintln!(
                    "  {split} seed {seed} fp32 {combine}: final accuracy {:.2}%",
                    recs.last().map_or(0.0, |r| r.accuracy * 100.0),
                );
                private
                    .entry((si, pi))
                    .or_default()
                    .push(recs.last().map_or(0.0, |r| r.accuracy));
            }
        }
    }
    std::fs::write(out_dir.join("fl.csv"), &csv).expect("write fl.csv");

    println!();
    println!(
        "{:<15} {:<11} {:>16} {:>10} {:>16} {:>12}",
        "split", "codec", "final acc (sd)", "vs fp32", "upload B/round", "fp32 / codec"
    );
    for (si, split) in splits.iter().enumerate() {
        let fp32 = codecs.iter().position(|c| *c == Codec::Fp32);
        let summary = |ci: usize| {
            let runs = &results[&(si, ci)];
            let finals: Vec<f32> = runs
                .iter()
                .map(|r| r.last().map_or(0.0, |x| x.accuracy))
                .collect();
            let bytes: Vec<f32> = runs
                .iter()
                .flat_map(|r| r.iter().map(|x| x.upload_bytes as f32))
                .collect();
            (mean_sd(&finals), mean_sd(&bytes).0)
        };
        let base = fp32.map(summary);
        for (ci, c) in codecs.iter().enumerate() {
            let ((acc, sd), bytes) = summary(ci);
            let (vs, ratio) = match base {
                Some(((b_acc, _), b_bytes)) => (
                    format!("{:+.2}", (acc - b_acc) * 100.0),
                    format!("{:.1}x", b_bytes / bytes),
                ),
                None => ("-".into(), "-".into()),
            };
            println!(
                "{:<15} {:<11} {:>9.2}% ({:.2}) {:>10} {:>16.0} {:>12}",
                split.to_string(),
                c.to_string(),
                acc * 100.0,
                sd * 100.0,
                vs,
                bytes,
                ratio
            );
        }
    }
    println!();
    println!("accuracy (%) per round, mean over seeds:");
    let shown: Vec<usize> = (1..=rounds)
        .filter(|r| *r == 1 || r % 5 == 0 || *r == rounds)
        .collect();
    print!("{:<15} {:<11}", "split", "codec");
    for r in &shown {
        print!(" {:>5}", format!("r{r}"));
    }
    println!();
    for (si, split) in splits.iter().enumerate() {
        for (ci, c) in codecs.iter().enumerate() {
            print!("{:<15} {:<11}", split.to_string(), c.to_string());
            for r in &shown {
                let accs: Vec<f32> = results[&(si, ci)]
                    .iter()
                    .map(|run| run[r - 1].accuracy)
                    .collect();
                print!(" {:>5.1}", mean_sd(&accs).0 * 100.0);
            }
            println!();
        }
    }
    if !combines.is_empty() {
        println!();
        println!(
            "clipping and differential privacy (fp32; epsilon after {rounds} rounds at delta 1e-5, \
             no amplification by sampling claimed; {CLIENTS} clients per round):"
        );
        println!(
            "{:<15} {:<18} {:>16} {:>10} {:>10}",
            "split", "aggregation", "final acc (sd)", "vs off", "epsilon"
        );
        let off = combines
            .iter()
            .position(|c| matches!(c, Combine::Clipped(Clip::Off)));
        for (si, split) in splits.iter().enumerate() {
            let base = off.map(|pi| mean_sd(&private[&(si, pi)]).0);
            for (pi, combine) in combines.iter().enumerate() {
                let (acc, sd) = mean_sd(&private[&(si, pi)]);
                let eps = match combine {
                    Combine::Dp { z, .. } => {
                        format!(
                            "{:.1}",
                            privacy::epsilon(rounds as u32, f64::from(*z), 1e-5)
                        )
                    }
                    Combine::Clipped(_) => "-".into(),
                };
                println!(
                    "{:<15} {:<18} {:>9.2}% ({:.2}) {:>10} {:>10}",
                    split.to_string(),
                    combine.to_string(),
                    acc * 100.0,
                    sd * 100.0,
                    base.map_or_else(|| "-".into(), |b| format!("{:+.2}", (acc - b) * 100.0)),
                    eps
                );
            }
        }
    }
    if let (Some(split), Some(ci)) = (
        splits.first(),
        codecs.iter().position(|c| *c == Codec::Fp32),
    ) {
        let finals: Vec<f32> = results[&(0, ci)]
            .iter()
            .map(|r| r.last().map_or(0.0, |x| x.accuracy))
            .collect();
        let clients: Vec<Arc<Shard>> = digits::partition(&d, &train_idx, CLIENTS, *split, 1)
            .iter()
            .map(|p| shard(&d, p))
            .collect();
        let reference = mean_sd(&finals).0;
        exported_models(
            &sandbox, &module, &clients, &holdout, *split, reference, rounds,
        );
    }
    let svg = plot(&splits, &codecs, &results, rounds);
    std::fs::write(out_dir.join("fl.svg"), svg).expect("write fl.svg");
    println!();
    println!(
        "wrote {} and {} ({:.0} s)",
        out_dir.join("fl.csv").display(),
        out_dir.join("fl.svg").display(),
        started.elapsed().as_secs_f64()
    );
}

/// An exported model's trainable weights in the trainer's layout, read as `fl start` reads a
/// task's initial model: external data inlined, LogisticRegression's LinearClassifier
/// rewritten, the weights and layers found from the graph
/// (`edge_coordinator::fl::task::initial_weights`), then moved into `[in, out]` / `[out]`
/// (`trainer_check::trainer_weights`, what `fl start` hands the trainer).
fn exported_weights(name: &str) -> Result<Vec<Param>, String> {
    let path = edge_testmodels::onnx_builder::exported_path(name);
    let files = edge_inference::ModelFiles::read(&path).map_err(|e| e.to_string())?;
    let mut model =
        edge_inference::external::inline(&files.graph, &files.data).map_err(|e| e.to_string())?;
    if let Some(rewritten) = edge_inference::trainable_form(&model).map_err(|e| e.to_string())? {
        model = rewritten;
    }
    let (params, initial) =
        edge_coordinator::fl::task::initial_weights(&model, None).map_err(|e| e.to_string())?;
    let layers = edge_inference::dense_layers(&model).map_err(|e| e.to_string())?;
    edge_coordinator::fl::trainer_check::trainer_weights(&layers, &params, &initial)
}

/// The third table: each exported model (`FL_FIXTURES`) trained from its own weights, fp32,
/// and the rounds it takes to come within one point of `reference` (the reference MLP's mean
/// fp32 accuracy after `reference_rounds` rounds on `split`).
fn exported_models(
    sandbox: &Sandbox,
    module: &TrainerModule,
    clients: &[Arc<Shard>],
    holdout: &Arc<Shard>,
    split: Split,
    reference: f32,
    reference_rounds: usize,
) {
    let fixtures = env_list(
        "FL_FIXTURES",
        "sklearn_mlp,sklearn_sgd,sklearn_logreg,torch_gemm,torch_dynamo,torch_mlp",
    );
    if fixtures.is_empty() {
        return;
    }
    let rounds = env_num("FL_FIXTURE_ROUNDS", 30);
    println!();
    println!(
        "exported models (inference/testmodels/exported), fp32, {split}, seed 1, {rounds} rounds; \
         target: within 1 point of the reference MLP's fp32 accuracy ({:.2}% after \
         {reference_rounds} rounds):",
        reference * 100.0
    );
    println!(
        "{:<16} {:>8} {:>10} {:>8} {:>8} {:>10} {:>18}",
        "model", "weights", "before r1", "r1", "r5", "final", "rounds to target"
    );
    for name in fixtures {
        let weights = match exported_weights(&format!("{name}.onnx")) {
            Ok(w) => w,
            Err(e) => {
                println!("{name:<16} not trainable: {e}");
                continue;
            }
        };
        let setup = Setup {
            sandbox: sandbox.clone(),
            module: module.clone(),
            params: weights
                .iter()
                .map(|p| (p.name.clone(), p.shape.clone()))
                .collect(),
        };
        let initial = flatten(&weights);
        let before = sandbox
            .evaluate(module, weights, holdout.clone())
            .expect("evaluation")
            .accuracy;
        let recs = run(
            &setup,
            &initial,
            clients,
            holdout,
            Codec::Fp32,
            Combine::Clipped(Clip::default()),
            rounds,
            1,
        );
        let at = |r: usize| recs.get(r - 1).map_or(0.0, |x| x.accuracy * 100.0);
        let reached = recs
            .iter()
            .position(|x| x.accuracy >= reference - 0.01)
            .map_or_else(|| format!("not in {rounds}"), |r| (r + 1).to_string());
        println!(
            "{:<16} {:>8} {:>9.2}% {:>7.2}% {:>7.2}% {:>9.2}% {:>18}",
            name,
            initial.len(),
            before * 100.0,
            at(1),
            at(5.min(rounds)),
            at(rounds),
            reached
        );
    }
}

/// Accuracy per round (mean over seeds), one panel per split, one line per codec.
fn plot(
    splits: &[Split],
    codecs: &[Codec],
    results: &BTreeMap<(usize, usize), Vec<Vec<RoundRecord>>>,
    rounds: usize,
) -> String {
    const W: f32 = 420.0;
    const H: f32 = 300.0;
    const M: f32 = 45.0;
    const COLORS: [&str; 8] = [
        "#000000", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
    ];
    let total_w = W * splits.len() as f32;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{total_w}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        H + 40.0
    );
    let y_min = 0.5f32;
    for (si, split) in splits.iter().enumerate() {
        let x0 = si as f32 * W + M;
        let (pw, ph) = (W - M - 15.0, H - M - 15.0);
        let y0 = 20.0;
        let px = |r: usize| x0 + pw * (r as f32 - 1.0) / (rounds.max(2) as f32 - 1.0);
        let py = |a: f32| y0 + ph * (1.0 - ((a - y_min) / (1.0 - y_min)).clamp(0.0, 1.0));
        s += &format!(
            "<text x=\"{}\" y=\"14\" text-anchor=\"middle\" font-weight=\"bold\">{split}</text>\n",
            x0 + pw / 2.0
        );
        s += &format!(
            "<rect x=\"{x0}\" y=\"{y0}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#888\"/>\n"
        );
        for a in [0.5f32, 0.6, 0.7, 0.8, 0.9, 1.0] {
            s += &format!(
                "<line x1=\"{x0}\" x2=\"{}\" y1=\"{y}\" y2=\"{y}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.0}%</text>\n",
                x0 + pw,
                x0 - 4.0,
                py(a) + 4.0,
                a * 100.0,
                y = py(a)
            );
        }
        for r in (0..=rounds).step_by(10).filter(|r| *r >= 1).chain([1]) {
            s += &format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{r}</text>\n",
                px(r),
                y0 + ph + 14.0
            );
        }
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">round</text>\n",
            x0 + pw / 2.0,
            y0 + ph + 28.0
        );
        for (ci, c) in codecs.iter().enumerate() {
            let runs = &results[&(si, ci)];
            let pts: Vec<String> = (1..=rounds)
                .map(|r| {
                    let accs: Vec<f32> = runs.iter().map(|run| run[r - 1].accuracy).collect();
                    format!("{:.1},{:.1}", px(r), py(mean_sd(&accs).0))
                })
                .collect();
            let color = COLORS[ci % COLORS.len()];
            s += &format!(
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
                pts.join(" ")
            );
            if si == 0 {
                let ly = y0 + ph - 12.0 * (codecs.len() - ci) as f32;
                s += &format!(
                    "<line x1=\"{}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{c}</text>\n",
                    x0 + pw - 90.0,
                    x0 + pw - 70.0,
                    x0 + pw - 66.0,
                    ly + 4.0
                );
            }
        }
    }
    s += "</svg>\n";
    s
}
