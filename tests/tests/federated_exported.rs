//! Federated learning with models as the exporters write them, and failures that surface at
//! the coordinator: the real coordinator (embedded broker), three real agents serving and
//! training scikit-learn's MLP exactly as `skl2onnx` exported it (`[1, n]` biases, int64
//! `classes` and shape initializers, the int64 `label` output before the f32
//! `probabilities`), with `mlp_trainer.wasm`.
//!
//! Task A trains that model unchanged; every round closes with a held-out accuracy (the
//! evaluation found `probabilities`, not `label`). Task B starts from torch's export of
//! another network, which the agents do not serve: every agent's training step fails, each
//! reports why, every round fails, and the task stops with those reasons, in the journal and
//! in `fl status`, instead of extending for ever. Task C: three new agents serve torch's export
//! (`Gemm` with `transB=1`) and train it unchanged. Task D fine-tunes only its head
//! (`[train] trainable`), the first layer frozen on the devices and never sent; task E's initial
//! model has another first layer than the agents serve, and they refuse to train its head.
//! Task F: three more agents serve scikit-learn's `LogisticRegression` as skl2onnx exported it
//! (an `ai.onnx.ml` `LinearClassifier`) and train it unchanged.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use edge_testmodels::onnx_builder;
use edge_tests::digits::Split;
use edge_tests::{
    Agent, AgentOptions, Coordinator, Event, FlTask, SigningKey, TestEnv, closed_rounds,
    federated_agent, federated_agent_in, federated_data, fl_status, run_test, task_finished,
    wasm_dir,
};

const AGENTS: usize = 3;
const ROUNDS: u32 = 5;
const WAIT: Duration = Duration::from_secs(90);

const TRAINER: &str = "trainer = \"mlp_trainer.wasm\"\n";

fn device(i: usize) -> String {
    format!("fx-{i:02}")
}

#[test]
fn exported_models_train_unchanged_and_failures_stop_the_task_with_reasons() {
    run_test("federated_exported", scenario);
}

fn scenario(env: &TestEnv) -> Result<()> {
    let coord = Coordinator::start_embedded(&env.path("coordinator"))?;
    let mut journal = coord.journal();
    let key = SigningKey::generate(&env.path("keys/deploy.key"))?;

    let task_dir = env.path("task");
    let model = onnx_builder::exported("sklearn_mlp.onnx");
    let (d, shards) = federated_data(&task_dir, AGENTS, Split::Iid, &model)?;
    std::fs::write(
        task_dir.join("torch.onnx"),
        onnx_builder::exported("torch_gemm.onnx"),
    )?;
    for m in ["mlp_trainer", "encoder"] {
        std::fs::copy(
            wasm_dir().join(format!("{m}.wasm")),
            task_dir.join(format!("{m}.wasm")),
        )
        .with_context(|| format!("{m}.wasm (build the modules: cargo xtask modules)"))?;
    }
    trainer_checks_refuse_what_no_device_could_train(&coord, &task_dir)?;
    let mut agents = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        let mut o = AgentOptions::new(device(i), coord.url());
        let dir = env.path(&format!("pipelines/{}", device(i)));
        federated_agent(&mut o, &dir, &d, shard, &model, &key)?;
        agents.push(Agent::start(&env.path(&device(i)), o)?);
    }
    for i in 0..AGENTS {
        journal.wait_registered(&device(i), WAIT)?;
    }

    // Task A: the skl2onnx model as exported, params found from its graph; `fl start` runs
    // the trainer once before it accepts the task.
    let a = FlTask {
        extra: TRAINER.into(),
        ..FlTask::new("sk-a", ROUNDS, AGENTS)
    };
    let out = a.run_start(&coord, &task_dir)?;
    let said = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success()
            && said
                .contains("trainer mlp_trainer.wasm: one step on a synthetic batch of 16 rows ok"),
        "fl start sk-a: {said}"
    );
    journal.wait_for("task sk-a finished", WAIT * 2, |j| task_finished(j, "sk-a"))?;
    let events = journal.events();
    let closed = closed_rounds(events, "sk-a");
    ensure!(
        closed.len() == ROUNDS as usize,
        "rounds closed: {}",
        closed.len()
    );
    for e in &closed {
        ensure!(
            e.str_field("eval_note").is_none() && e.f64_field("eval_accuracy").is_some(),
            "round without evaluation: {:?}",
            e.raw
        );
        // An agent whose dataset had not filled yet when round 1 opened reports that (kind
        // data) instead of training; either way every agent answered every round.
        let failed = e
            .raw
            .get("failures")
            .and_then(|f| f.as_array())
            .map_or(0, Vec::len);
        ensure!(
            e.f64_field("on_time").unwrap_or(0.0) as usize + failed == AGENTS
                && e.str_field("close_reason") != Some("deadline"),
            "every agent trained or said why not, before the deadline: {:?}",
            e.raw
        );
    }
    let first = closed[0].f64_field("eval_accuracy").unwrap_or(0.0);
    let last = closed[closed.len() - 1]
        .f64_field("eval_accuracy")
        .unwrap_or(0.0);
    ensure!(
        last >= 0.8 && last > first,
        "accuracy {first:.3} after round 1, {last:.3} after round {ROUNDS}"
    );
    eprintln!(
        "sklearn MLP as exported: held-out accuracy {first:.4} after round 1, {last:.4} after round {ROUNDS}"
    );

    // Task B: the agents serve another model than the task's, so none can train it.
    let b = FlTask {
        initial: "torch.onnx".into(),
        extra: "max_failed_rounds = 2\n".into(),
        ..FlTask::new("tb", ROUNDS, AGENTS)
    };
    b.start(&coord, &task_dir, &key)?;
    journal.wait_for("task tb finished", WAIT, |j| task_finished(j, "tb"))?;
    let events = journal.events();
    let failures: Vec<_> = events
        .iter()
        .filter(|e| e.is("fl_train_failed") && e.str_field("task") == Some("tb"))
        .collect();
    ensure!(
        failures.len() >= 2 * AGENTS,
        "failure reports: {:?}",
        failures.iter().map(|e| &e.raw).collect::<Vec<_>>()
    );
    for f in &failures {
        let reason = f.str_field("reason").unwrap_or("");
        ensure!(
            f.str_field("kind") == Some("model") && reason.contains("coefficient"),
            "a failure names the model and the weights it lacks: {:?}",
            f.raw
        );
    }
    let failed_rounds = events
        .iter()
        .filter(|e| e.is("fl_round_failed") && e.str_field("task") == Some("tb"))
        .count();
    ensure!(failed_rounds == 2, "failed rounds: {failed_rounds}");
    let finished = events
        .iter()
        .find(|e| e.is("fl_task_finished") && e.str_field("task") == Some("tb"))
        .context("finished")?;
    let why = finished.str_field("reason").unwrap_or("");
    ensure!(
        why.starts_with("failed: 2 rounds in a row failed") && why.contains("(model)"),
        "task B's end: {why}"
    );
    let status = fl_status(&coord, "tb")?;
    ensure!(
        status.contains("round 1 failed: every selected device failed")
            && status.contains(&format!("round 2 device {} (model)", device(0))),
        "fl status tb:\n{status}"
    );
    eprintln!("{status}");
    drop(agents);

    // Task C: three new agents serve torch's export (Gemm, transB=1, weights [out, in]) and
    // train it unchanged; they join their own group, the task's.
    let torch = onnx_builder::exported("torch_gemm.onnx");
    let served = Served {
        d: &d,
        shards: &shards,
        key: &key,
    };
    let agents = served.start(env, &coord, &mut journal, AGENTS, &torch, "torch")?;
    let c = FlTask {
        initial: "torch.onnx".into(),
        group: "torch".into(),
        ..FlTask::new("tc", ROUNDS, AGENTS)
    };
    c.start(&coord, &task_dir, &key)?;
    journal.wait_for("task tc finished", WAIT * 2, |j| task_finished(j, "tc"))?;
    let closed = closed_rounds(journal.events(), "tc");
    ensure!(
        closed.len() == ROUNDS as usize,
        "rounds closed: {}",
        closed.len()
    );
    let acc = accuracy_per_round(&closed);
    ensure!(
        closed
            .iter()
            .all(|e| e.f64_field("on_time").unwrap_or(0.0) >= 1.0)
            && acc[acc.len() - 1] >= 0.8
            && acc[acc.len() - 1] > acc[0],
        "torch Gemm model, held-out accuracy per round: {acc:?}"
    );
    eprintln!("torch Gemm stack as exported: held-out accuracy per round {acc:?}");

    // Task D: the same agents fine-tune only the head (`[train] trainable`); the first layer
    // stays frozen, is never sent, and runs on the device in front of the trainer.
    let head = "trainable = [\"2.weight\", \"2.bias\"]".to_owned();
    let dt = FlTask {
        initial: "torch.onnx".into(),
        group: "torch".into(),
        train_extra: head.clone(),
        ..FlTask::new("td", ROUNDS, AGENTS)
    };
    dt.start(&coord, &task_dir, &key)?;
    journal.wait_for("task td finished", WAIT * 2, |j| task_finished(j, "td"))?;
    let closed = closed_rounds(journal.events(), "td");
    let acc = accuracy_per_round(&closed);
    // An update carries the head's 16 x 10 + 10 weights (fp32: 680 bytes and a header), not the
    // whole model's 1,210 (4,840 bytes).
    let bytes_per_update: Vec<f64> = closed
        .iter()
        .map(|e| e.f64_field("bytes_in").unwrap_or(0.0) / e.f64_field("on_time").unwrap_or(1.0))
        .collect();
    ensure!(
        closed.len() == ROUNDS as usize
            && closed
                .iter()
                .all(|e| e.f64_field("on_time").unwrap_or(0.0) >= 1.0)
            && acc[acc.len() - 1] > acc[0]
            && bytes_per_update.iter().all(|&b| b > 680.0 && b < 2_000.0),
        "head only: accuracy per round {acc:?}, bytes per update {bytes_per_update:?}"
    );
    let status = fl_status(&coord, "td")?;
    ensure!(
        status.contains("2 params") || status.contains("170 weights"),
        "{status}"
    );
    eprintln!(
        "torch head only (first layer frozen): accuracy per round {acc:?}, bytes per update {bytes_per_update:?}"
    );

    // Task E: the task's initial model has another first layer than the agents serve; they
    // refuse to train a head over features the coordinator would not evaluate, and say why.
    let other = edge_inference::patch_initializers(
        &torch,
        &[(
            "0.weight",
            edge_inference::Tensor::from_f32(vec![16, 64], &[0.01; 16 * 64])?,
        )],
    )?;
    std::fs::write(task_dir.join("torch_other.onnx"), other)?;
    let et = FlTask {
        initial: "torch_other.onnx".into(),
        group: "torch".into(),
        train_extra: head,
        extra: "max_failed_rounds = 1\n".into(),
        ..FlTask::new("te", ROUNDS, AGENTS)
    };
    // `fl start` waits for serve to take the task; the refusals may end it before that, and
    // then `fl start` fails with them.
    if let Err(e) = et.start(&coord, &task_dir, &key) {
        ensure!(
            format!("{e:#}").contains("frozen layers (0.weight)"),
            "fl start te: {e:#}"
        );
    }
    journal.wait_for("task te finished", WAIT, |j| task_finished(j, "te"))?;
    let events = journal.events();
    let refusals: Vec<_> = events
        .iter()
        .filter(|e| e.is("fl_train_failed") && e.str_field("task") == Some("te"))
        .collect();
    ensure!(
        !refusals.is_empty()
            && refusals.iter().all(|f| {
                f.str_field("kind") == Some("model")
                    && f.str_field("reason")
                        .unwrap_or("")
                        .contains("frozen layers (0.weight)")
            }),
        "agents refuse a head over other frozen layers: {:?}",
        refusals.iter().map(|e| &e.raw).collect::<Vec<_>>()
    );
    drop(agents);

    // Task F: three new agents serve scikit-learn's LogisticRegression as skl2onnx wrote it
    // (a LinearClassifier, its weights in attributes). Coordinator and devices each rewrite it
    // into a Gemm layer under the same names; `fl start` runs the trainer on that.
    let logreg = onnx_builder::exported("sklearn_logreg.onnx");
    std::fs::write(task_dir.join("logreg.onnx"), &logreg)?;
    let agents = served.start(env, &coord, &mut journal, 2 * AGENTS, &logreg, "logreg")?;
    let f = FlTask {
        initial: "logreg.onnx".into(),
        group: "logreg".into(),
        extra: TRAINER.into(),
        ..FlTask::new("tf", ROUNDS, AGENTS)
    };
    let out = f.run_start(&coord, &task_dir)?;
    let said = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && said.contains("one step on a synthetic batch"),
        "fl start tf: {said}"
    );
    journal.wait_for("task tf finished", WAIT * 2, |j| task_finished(j, "tf"))?;
    let closed = closed_rounds(journal.events(), "tf");
    let acc = accuracy_per_round(&closed);
    ensure!(
        closed.len() == ROUNDS as usize
            && closed
                .iter()
                .all(|e| e.f64_field("on_time").unwrap_or(0.0) >= 1.0)
            && acc.iter().all(|&a| a >= 0.8),
        "LogisticRegression as exported, held-out accuracy per round: {acc:?}"
    );
    eprintln!("sklearn LogisticRegression as exported: held-out accuracy per round {acc:?}");
    drop(agents);
    Ok(())
}

/// The held-out accuracy each closed round reports (0 where it has none).
fn accuracy_per_round(closed: &[&Event]) -> Vec<f64> {
    closed
        .iter()
        .map(|e| e.f64_field("eval_accuracy").unwrap_or(0.0))
        .collect()
}

/// What a new set of agents serves and trains on: the data, its shards and the signing key.
struct Served<'a> {
    d: &'a edge_tests::digits::Digits,
    shards: &'a [Vec<usize>],
    key: &'a SigningKey,
}

impl Served<'_> {
    /// Starts one agent per shard (devices `first..`) serving and training `model` in `group`,
    /// and waits until each has registered and replayed its shard (telemetry counts the
    /// source's frames), so that round 1 finds data.
    fn start(
        &self,
        env: &TestEnv,
        coord: &Coordinator,
        journal: &mut edge_tests::Journal,
        first: usize,
        model: &[u8],
        group: &str,
    ) -> Result<Vec<Agent>> {
        let mut agents = Vec::new();
        for (i, shard) in self.shards.iter().enumerate() {
            let name = device(first + i);
            let mut o = AgentOptions::new(name.clone(), coord.url());
            let dir = env.path(&format!("pipelines/{name}"));
            federated_agent_in(&mut o, &dir, self.d, shard, model, self.key, group)?;
            agents.push(Agent::start(&env.path(&name), o)?);
        }
        for i in 0..self.shards.len() {
            journal.wait_registered(&device(first + i), WAIT)?;
        }
        journal.wait_for(&format!("the {group} agents' shards replayed"), WAIT, |j| {
            self.shards.iter().enumerate().all(|(i, shard)| {
                j.iter()
                    .rev()
                    .find(|e| e.is_for("telemetry", &device(first + i)))
                    .and_then(|e| e.raw.pointer("/pipeline/sources/0/frames"))
                    .and_then(serde_json::Value::as_u64)
                    .is_some_and(|n| n >= shard.len() as u64)
            })
        })?;
        Ok(agents)
    }
}

/// `fl start` runs the task's trainer once in the devices' sandbox and refuses, with the
/// sandbox's or the trainer's reason, a module that is not a trainer, a model the device
/// limits have no memory for, and hyperparameters the trainer refuses; none is spooled.
fn trainer_checks_refuse_what_no_device_could_train(
    coord: &Coordinator,
    task_dir: &std::path::Path,
) -> Result<()> {
    // 76,810 weights: training needs more than 1.5 MiB of linear memory, the module itself
    // about 1.1 MiB.
    let big = onnx_builder::mlp(&onnx_builder::mlp_layers(&[64, 1024, 10], 1));
    std::fs::write(task_dir.join("big.onnx"), big)?;
    let cases = [
        (
            FlTask {
                extra: "trainer = \"encoder.wasm\"\n".into(),
                ..FlTask::new("not-a-trainer", ROUNDS, AGENTS)
            },
            "the trainer encoder.wasm cannot train model initial.onnx",
            "not a `trainer` component",
        ),
        (
            FlTask {
                extra: TRAINER.into(),
                initial: "big.onnx".into(),
                tail: "[device]\nmax_memory_bytes = 1572864\n".into(),
                ..FlTask::new("too-big", ROUNDS, AGENTS)
            },
            "the trainer mlp_trainer.wasm cannot train model big.onnx on a device with max_memory_bytes=1572864",
            "memory limit of 1572864 bytes",
        ),
        (
            FlTask {
                extra: TRAINER.into(),
                epochs: 20_000,
                ..FlTask::new("refused", ROUNDS, AGENTS)
            },
            "the trainer mlp_trainer.wasm cannot train model initial.onnx",
            "refused to train: epochs",
        ),
    ];
    for (task, what, reason) in cases {
        let out = task.run_start(coord, task_dir)?;
        let said = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && said.contains(what) && said.contains(reason),
            "fl start {} should be refused with {what:?}: {reason:?}: {said}",
            task.id
        );
        ensure!(
            !coord.state_dir().join("fl/spool").join(&task.id).exists(),
            "refused task {} was spooled",
            task.id
        );
    }
    Ok(())
}
