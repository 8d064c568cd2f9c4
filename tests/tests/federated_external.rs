//! Federated learning on torch's default export (`torch_mlp.onnx` + `torch_mlp.onnx.data`,
//! weights in the data file): the real coordinator (embedded broker) takes the pair as the
//! task's initial model, five real agents serve and train the pair as it sits in their
//! `models/` folders (global weights patched into their data files' layout), and the
//! federated model ends within 1 point of the same model trained centrally on the union of
//! their data (same trainer module, same held-out set, as many passes over the data).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use edge_agent::sandbox::trainer::{Param, SampleSource};
use edge_agent::sandbox::{Sandbox, SandboxConfig};
use edge_inference::dense::{NamedWeights, to_trainer};
use edge_testmodels::exported;
use edge_tests::digits::{self, Digits, Split};
use edge_tests::{
    Agent, AgentOptions, Coordinator, FlTask, SigningKey, TestEnv, closed_rounds, federated_agent,
    federated_data, final_accuracy, run_test, task_finished, wasm_dir,
};

const AGENTS: usize = 5;
const ROUNDS: u32 = 30;
/// `FlTask`'s local epochs, learning rate and batch.
const EPOCHS: u32 = 2;
const WAIT: Duration = Duration::from_secs(120);

fn device(i: usize) -> String {
    format!("tx-{i:02}")
}

struct Rows(Vec<(Vec<f32>, i64)>);

impl SampleSource for Rows {
    fn count(&self) -> u32 {
        self.0.len() as u32
    }

    fn read(&self, start: u32, n: u32) -> Vec<(Vec<f32>, i64)> {
        let s = (start as usize).min(self.0.len());
        let e = s.saturating_add(n as usize).min(self.0.len());
        self.0[s..e].to_vec()
    }
}

fn rows(d: &Digits, idx: &[usize]) -> Arc<Rows> {
    Arc::new(Rows(
        idx.iter()
            .map(|&i| (d.x[i].clone(), i64::from(d.y[i])))
            .collect(),
    ))
}

/// Central training of the torch model's initial weights on `train`, `ROUNDS * EPOCHS`
/// epochs with the task's hyperparameters, by the same trainer module in the agent's
/// sandbox; accuracy on `test`.
fn central_accuracy(env: &TestEnv, d: &Digits, train: &[usize], test: &[usize]) -> Result<f32> {
    let files =
        edge_inference::ModelFiles::read(&edge_testmodels::exported_path("torch_mlp.onnx"))?;
    let inline = edge_inference::external::inline(&files.graph, &files.data)?;
    let layers = edge_inference::dense_layers(&inline)?;
    let given: Vec<NamedWeights> = edge_inference::read_initializers(&inline)?
        .into_iter()
        .filter_map(|(name, t)| {
            Some(NamedWeights {
                name,
                shape: t.shape().to_vec(),
                data: t.to_f32()?,
            })
        })
        .collect();
    let views: Vec<_> = given.iter().map(NamedWeights::view).collect();
    let weights: Vec<Param> = to_trainer(&layers, &views)
        .map_err(anyhow::Error::msg)?
        .into_iter()
        .map(|w| Param {
            name: w.name,
            shape: w.shape,
            data: w.data,
        })
        .collect();
    let sandbox = Sandbox::new(&SandboxConfig::default(), &env.path("central"))?;
    let module = sandbox.load_trainer(
        "mlp_trainer.wasm",
        &std::fs::read(wasm_dir().join("mlp_trainer.wasm"))?,
    )?;
    let hp = serde_json::json!({
        "epochs": ROUNDS * EPOCHS, "lr": 0.1, "batch_size": 16, "mu": 0.0, "seed": 1,
    })
    .to_string();
    let trained = sandbox.train(&module, weights, &hp, rows(d, train))?;
    let eval = sandbox.evaluate(&module, trained.weights, rows(d, test))?;
    Ok(eval.accuracy)
}

#[test]
fn torch_external_data_mlp_trains_federated_within_a_point_of_central() {
    run_test("federated_external", scenario);
}

fn scenario(env: &TestEnv) -> Result<()> {
    let coord = Coordinator::start_embedded(&env.path("coordinator"))?;
    let mut journal = coord.journal();
    let key = SigningKey::generate(&env.path("keys/deploy.key"))?;

    // The task directory holds the pair as torch wrote it: initial.onnx names
    // torch_mlp.onnx.data beside it.
    let task_dir = env.path("task");
    let graph = exported("torch_mlp.onnx");
    let data = exported("torch_mlp.onnx.data");
    let (d, shards) = federated_data(&task_dir, AGENTS, Split::Iid, &graph)?;
    std::fs::write(task_dir.join("torch_mlp.onnx.data"), &data)?;
    let mut agents = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        let mut o = AgentOptions::new(device(i), coord.url());
        let dir = env.path(&format!("pipelines/{}", device(i)));
        federated_agent(&mut o, &dir, &d, shard, &graph, &key)?;
        std::fs::write(dir.join("models/torch_mlp.onnx.data"), &data)?;
        agents.push(Agent::start(&env.path(&device(i)), o)?);
    }
    for i in 0..AGENTS {
        journal.wait_registered(&device(i), WAIT)?;
    }
    journal.wait_for("the shards replayed", WAIT, |j| {
        shards.iter().enumerate().all(|(i, shard)| {
            j.iter()
                .rev()
                .find(|e| e.is_for("telemetry", &device(i)))
                .and_then(|e| e.raw.pointer("/pipeline/sources/0/frames"))
                .and_then(serde_json::Value::as_u64)
                .is_some_and(|n| n >= shard.len() as u64)
        })
    })?;

    FlTask::new("torch-ext", ROUNDS, AGENTS).start(&coord, &task_dir, &key)?;
    journal.wait_for("task torch-ext finished", WAIT * 4, |j| {
        task_finished(j, "torch-ext")
    })?;
    let events = journal.events();
    let closed = closed_rounds(events, "torch-ext");
    ensure!(
        closed.len() == ROUNDS as usize,
        "rounds closed: {}",
        closed.len()
    );
    let federated = final_accuracy(events, "torch-ext")?;
    // Global weights were applied on the devices (into the data files' layout).
    journal.wait_for("global weights applied on every device", WAIT, |j| {
        (0..AGENTS).all(|i| {
            j.iter()
                .rev()
                .find(|e| e.is_for("telemetry", &device(i)))
                .and_then(|e| e.raw.pointer("/fl/applied"))
                .and_then(serde_json::Value::as_u64)
                .is_some_and(|n| n >= 1)
        })
    })?;
    // ... written to disk beside their state (`fl-weights/MODEL/torch_mlp.onnx.data`, the data
    // file's layout with the new values), for ONNX Runtime to map.
    for agent in &agents {
        let dir = agent.state_dir().join("fl-weights");
        let written: Vec<u64> = std::fs::read_dir(&dir)
            .with_context(|| format!("{}", dir.display()))?
            .filter_map(|e| std::fs::metadata(e.ok()?.path().join("torch_mlp.onnx.data")).ok())
            .map(|m| m.len())
            .collect();
        ensure!(
            written == vec![data.len() as u64],
            "{}: global weights written out once per model: {written:?}",
            dir.display()
        );
    }

    let (train, test) = digits::holdout(&d, 0.2, 0);
    let central = f64::from(central_accuracy(env, &d, &train, &test).context("central training")?);
    eprintln!(
        "torch MLP with external data: federated {federated:.4} after {ROUNDS} rounds of \
         {AGENTS} agents, central {central:.4} after {} epochs",
        ROUNDS * EPOCHS
    );
    ensure!(
        federated >= central - 0.01,
        "federated {federated:.4} is more than 1 point below central {central:.4}"
    );
    Ok(())
}
