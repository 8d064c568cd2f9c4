//! The federated-learning scenario's parts, shared by `tests/tests/federated.rs` and
//! `cargo xtask demo`: an agent whose local pipeline replays its shard of the digits data into a
//! dataset sink and serves the MLP in an inference stage (trained by `mlp_trainer.wasm`), a task
//! file, `edge-coordinator fl start`, and readers for the rounds the coordinator journals.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::deploy::{SigningKey, wasm_dir};
use crate::digits::{self, Digits, Split};
use crate::{AgentOptions, Coordinator, Event, coordinator_bin};

/// Where the model sits, relative to the agent's pipeline file; also the task's model name.
pub const FL_MODEL: &str = "models/digits.onnx";
/// The group every federated agent joins and every task trains.
pub const FL_GROUP: &str = "fl";

/// The pipeline text: `shard` (a JSON-lines file) -> encoder.wasm -> the model, and the raw
/// rows into the `digits` dataset the trainer reads.
fn pipeline(shard: &str) -> String {
    let fields: Vec<String> = (0..digits::FEATURES)
        .map(|i| format!("\"features.{i}\""))
        .collect();
    format!(
        r#"
name = "digits"
[[source]]
name = "shard"
kind = "file"
path = "{shard}"
format = "jsonl"
rate_hz = 500
[[stage]]
name = "encode"
module = "encoder.wasm"
input = "shard"
config = {{ fields = [{fields}] }}
[[stage]]
name = "classify"
kind = "inference"
model = "{FL_MODEL}"
input = "encode"
[[sink]]
kind = "dataset"
input = "shard"
dataset = "digits"
require_label = true
[[sink]]
kind = "log"
input = "classify"
every = 100
[training]
model = "{FL_MODEL}"
trainer = "mlp_trainer.wasm"
dataset = "digits"
"#,
        fields = fields.join(", ")
    )
}

/// The coordinator's side of a federated run's data, in `task_dir`: a stratified 20% hold-out
/// of the digits set as `holdout.csv` and `model` as `initial.onnx`. Returns the data and the
/// rest of it dealt over `clients` by `split` (seeded, so reproducible).
pub fn federated_data(
    task_dir: &Path,
    clients: usize,
    split: Split,
    model: &[u8],
) -> Result<(Digits, Vec<Vec<usize>>)> {
    let d = digits::load()?;
    let (train, test) = digits::holdout(&d, 0.2, 0);
    let shards = digits::partition(&d, &train, clients, split, 1);
    std::fs::create_dir_all(task_dir)
        .with_context(|| format!("cannot create {}", task_dir.display()))?;
    digits::write_csv(&d, &test, &task_dir.join("holdout.csv"))?;
    std::fs::write(task_dir.join("initial.onnx"), model)
        .with_context(|| format!("cannot write {}", task_dir.display()))?;
    Ok((d, shards))
}

/// Writes a federated agent's pipeline under `dir` (its shard of `d`, the modules, `model`)
/// and sets `o` to run it, trust `key` for round messages and join [`FL_GROUP`].
pub fn federated_agent(
    o: &mut AgentOptions,
    dir: &Path,
    d: &Digits,
    shard: &[usize],
    model: &[u8],
    key: &SigningKey,
) -> Result<()> {
    federated_agent_in(o, dir, d, shard, model, key, FL_GROUP)
}

/// [`federated_agent`] in another group than [`FL_GROUP`].
pub fn federated_agent_in(
    o: &mut AgentOptions,
    dir: &Path,
    d: &Digits,
    shard: &[usize],
    model: &[u8],
    key: &SigningKey,
    group: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir.join("models"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let shard_path = dir.join("shard.jsonl");
    digits::write_jsonl(d, shard, &shard_path)?;
    for m in ["encoder", "mlp_trainer"] {
        let from = wasm_dir().join(format!("{m}.wasm"));
        std::fs::copy(&from, dir.join(format!("{m}.wasm"))).with_context(|| {
            format!(
                "cannot copy {} (build the modules: cargo xtask modules)",
                from.display()
            )
        })?;
    }
    std::fs::write(dir.join(FL_MODEL), model)?;
    let toml = dir.join("pipeline.toml");
    std::fs::write(&toml, pipeline(shard_path.to_str().context("utf-8 path")?))?;
    o.trust_deployments(key, &[group], 1000);
    let mut p = toml::Table::new();
    p.insert(
        "file".into(),
        toml::Value::String(toml.to_str().context("utf-8 path")?.into()),
    );
    o.extra.insert("pipeline".into(), toml::Value::Table(p));
    Ok(())
}

/// A federated task over [`FL_GROUP`] on the digits MLP (2 local epochs, lr 0.1, FedAvg, the
/// hold-out set `holdout.csv` beside the task file).
#[derive(Debug, Clone)]
pub struct FlTask {
    pub id: String,
    pub rounds: u32,
    /// Every round selects all of them (fraction 1.0).
    pub clients: usize,
    /// 1.0 waits for every selected agent; 0.7 closes on the first 70%.
    pub quorum: f32,
    /// Of the online members selected per round (at least `clients`).
    pub fraction: f64,
    pub round_interval_s: u32,
    pub max_staleness: u32,
    /// `fp32`, `int8`, `topk:0.01`, ... (`protocol::v1::fl::codec`).
    pub codec: String,
    /// The initial model's file in the task directory.
    pub initial: String,
    /// Top-level keys added to the task file as they are (e.g. `max_failed_rounds = 1`).
    pub extra: String,
    /// The members' group.
    pub group: String,
    /// Keys added to the task's `[train]` section as they are (e.g. `trainable = [...]`).
    pub train_extra: String,
    /// Local epochs per round (`[train] epochs`).
    pub epochs: u32,
    /// Tables added after the others as they are (e.g. `[device]`).
    pub tail: String,
}

impl FlTask {
    pub fn new(id: &str, rounds: u32, clients: usize) -> FlTask {
        FlTask {
            id: id.into(),
            rounds,
            clients,
            quorum: 1.0,
            fraction: 1.0,
            round_interval_s: 2,
            max_staleness: 1,
            codec: "fp32".into(),
            initial: "initial.onnx".into(),
            extra: String::new(),
            group: FL_GROUP.into(),
            train_extra: String::new(),
            epochs: 2,
            tail: String::new(),
        }
    }

    /// The task file's text (`initial` and `holdout.csv` relative to where it is written).
    pub fn to_toml(&self) -> String {
        format!(
            r#"
id = "{id}"
model = "{FL_MODEL}"
initial = "{initial}"
{extra}
group = "{group}"
rounds = {rounds}
fraction = {fraction}
min_clients = {clients}
quorum = {quorum}
round_timeout_s = 60
round_interval_s = {interval}
max_staleness = {staleness}
seed = 1
[train]
epochs = {epochs}
lr = 0.1
batch_size = 16
codec = "{codec}"
{train_extra}
[aggregate]
rule = "fedavg"
server_optimizer = "sgd"
[eval]
holdout = "holdout.csv"
{tail}
"#,
            id = self.id,
            rounds = self.rounds,
            clients = self.clients,
            quorum = self.quorum,
            fraction = self.fraction,
            interval = self.round_interval_s,
            staleness = self.max_staleness,
            codec = self.codec,
            initial = self.initial,
            extra = self.extra,
            group = self.group,
            train_extra = self.train_extra,
            epochs = self.epochs,
            tail = self.tail,
        )
    }

    /// Writes the task file into `dir` (which holds `initial.onnx` and `holdout.csv`) and runs
    /// `edge-coordinator fl start` against `coord`'s state dir. `_key` is no longer used: the
    /// coordinator signs rounds with its own identity (kept until the callers drop it).
    pub fn start(&self, coord: &Coordinator, dir: &Path, _key: &SigningKey) -> Result<()> {
        let out = self.run_start(coord, dir)?;
        ensure!(
            out.status.success(),
            "fl start {}: {}\n{}",
            self.id,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Writes the task file into `dir` and runs `edge-coordinator fl start`: its output,
    /// whether it succeeded or not.
    pub fn run_start(&self, coord: &Coordinator, dir: &Path) -> Result<std::process::Output> {
        let path = dir.join(format!("{}.toml", self.id));
        std::fs::write(&path, self.to_toml())
            .with_context(|| format!("cannot write {}", path.display()))?;
        fl_command(coord, &["start".as_ref(), path.as_os_str()])
    }
}

/// `edge-coordinator fl status TASK` against `coord`'s state dir: its output, or why it failed.
pub fn fl_status(coord: &Coordinator, task: &str) -> Result<String> {
    let out = fl_command(coord, &["status".as_ref(), task.as_ref()])?;
    ensure!(
        out.status.success(),
        "fl status {task}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `edge-coordinator fl ARGS --state-dir` against `coord`'s state dir.
fn fl_command(coord: &Coordinator, args: &[&std::ffi::OsStr]) -> Result<std::process::Output> {
    Command::new(coordinator_bin()?)
        .arg("fl")
        .args(args)
        .arg("--state-dir")
        .arg(coord.state_dir())
        .output()
        .with_context(|| {
            let sub = args
                .first()
                .map(|a| a.to_string_lossy())
                .unwrap_or_default();
            format!("cannot run edge-coordinator fl {sub}")
        })
}

/// `fl_round_closed` events of `task`, in order.
pub fn closed_rounds<'a>(events: &'a [Event], task: &str) -> Vec<&'a Event> {
    events
        .iter()
        .filter(|e| e.is("fl_round_closed") && e.str_field("task") == Some(task))
        .collect()
}

/// True once the coordinator journaled `fl_task_finished` for `task`.
pub fn task_finished(events: &[Event], task: &str) -> bool {
    events
        .iter()
        .any(|e| e.is("fl_task_finished") && e.str_field("task") == Some(task))
}

/// Accuracy of the last closed round of `task` on the held-out set.
pub fn final_accuracy(events: &[Event], task: &str) -> Result<f64> {
    closed_rounds(events, task)
        .last()
        .and_then(|e| e.f64_field("eval_accuracy"))
        .with_context(|| format!("task {task}: no evaluated round"))
}
