//! Federated learning end to end: the real coordinator (embedded broker) and ten real agents,
//! each behind its own [`LinkProxy`], each with a local pipeline that replays its shard of the
//! digits data into a dataset sink and serves the MLP in an inference stage, and the
//! `mlp_trainer.wasm` module for local training.
//!
//! Two tasks over the same agents and data: one with every link up, one where 30% of the agents
//! lose their uplink in each round (their proxy holds everything they send: the round message
//! reaches them, they train and queue the update, which waits in their outbox). Those agents'
//! links are cut and restored once the round has closed with the quorum of the others; they
//! reconnect and send the kept update, which the coordinator applies to the next round under
//! its late-update rule. The rounds close on quorum and the final accuracy of the second task on
//! the held-out set stays within one point of the first.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use edge_inference::onnx_builder;
use edge_tests::digits::{self, Split};
use edge_tests::{
    Agent, AgentOptions, Coordinator, Event, Link, LinkProxy, SigningKey, TestEnv, coordinator_bin,
    run_test, wasm_dir,
};
use protocol::v1::deploy::sha256_hex;

const AGENTS: usize = 10;
const DROPPED: usize = 3;
const ROUNDS: u32 = 20;
const MODEL: &str = "models/digits.onnx";
const WAIT: Duration = Duration::from_secs(90);

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
model = "{MODEL}"
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
model = "{MODEL}"
trainer = "mlp_trainer.wasm"
dataset = "digits"
"#,
        fields = fields.join(", ")
    )
}

/// Task `id`; `quorum` 1.0 waits for every selected agent, 0.7 closes on the first seven.
fn task(id: &str, quorum: f32) -> String {
    format!(
        r#"
id = "{id}"
model = "{MODEL}"
initial = "initial.onnx"
group = "fl"
rounds = {ROUNDS}
fraction = 1.0
min_clients = {AGENTS}
quorum = {quorum}
round_timeout_s = 60
round_interval_s = 2
max_staleness = 1
seed = 1
[train]
epochs = 2
lr = 0.1
batch_size = 16
codec = "fp32"
[aggregate]
rule = "fedavg"
server_optimizer = "sgd"
[eval]
holdout = "holdout.csv"
"#
    )
}

fn device(i: usize) -> String {
    format!("fl-{i:02}")
}

/// `fl_round_closed` events of `task`, in order.
fn closed<'a>(events: &'a [Event], task: &str) -> Vec<&'a Event> {
    events
        .iter()
        .filter(|e| e.is("fl_round_closed") && e.str_field("task") == Some(task))
        .collect()
}

fn finished(events: &[Event], task: &str) -> bool {
    events
        .iter()
        .any(|e| e.is("fl_task_finished") && e.str_field("task") == Some(task))
}

fn start_task(
    coord: &Coordinator,
    dir: &std::path::Path,
    id: &str,
    quorum: f32,
    key: &SigningKey,
) -> Result<()> {
    let path = dir.join(format!("{id}.toml"));
    std::fs::write(&path, task(id, quorum))?;
    let out = std::process::Command::new(coordinator_bin()?)
        .args(["fl", "start"])
        .arg(&path)
        .arg("--key")
        .arg(&key.path)
        .arg("--state-dir")
        .arg(coord.state_dir())
        .output()
        .context("cannot run edge-coordinator fl start")?;
    ensure!(
        out.status.success(),
        "fl start {id}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Accuracy of the last closed round of `task` on the held-out set.
fn final_accuracy(events: &[Event], task: &str) -> Result<f64> {
    closed(events, task)
        .last()
        .and_then(|e| e.f64_field("eval_accuracy"))
        .with_context(|| format!("task {task}: no evaluated round"))
}

#[test]
fn dropouts_with_kept_updates_match_the_run_without() {
    run_test("federated_dropout", scenario);
}

fn scenario(env: &TestEnv) -> Result<()> {
    let coord = Coordinator::start_embedded(&env.path("coordinator"))?;
    let mut journal = coord.journal();
    let key = SigningKey::generate(&env.path("keys/deploy.key"))?;
    let broker = coord.port().context("coordinator port")?;

    // Data: a stratified hold-out for the coordinator, the rest dealt to the agents.
    let d = digits::load()?;
    let (train, test) = digits::holdout(&d, 0.2, 0);
    let shards = digits::partition(&d, &train, AGENTS, Split::Iid, 1);
    let task_dir = env.path("task");
    std::fs::create_dir_all(&task_dir)?;
    digits::write_csv(&d, &test, &task_dir.join("holdout.csv"))?;
    let model = onnx_builder::mlp(&onnx_builder::mlp_layers(&[64, 32, 10], 1));
    std::fs::write(task_dir.join("initial.onnx"), &model)?;

    let mut proxies = Vec::new();
    let mut agents = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        let dir = env.path(&format!("pipelines/{}", device(i)));
        std::fs::create_dir_all(dir.join("models"))?;
        let shard_path = dir.join("shard.jsonl");
        digits::write_jsonl(&d, shard, &shard_path)?;
        for m in ["encoder", "mlp_trainer"] {
            std::fs::copy(
                wasm_dir().join(format!("{m}.wasm")),
                dir.join(format!("{m}.wasm")),
            )
            .with_context(|| format!("{m}.wasm (build the modules: cargo xtask modules)"))?;
        }
        std::fs::write(dir.join(MODEL), &model)?;
        let toml = dir.join("pipeline.toml");
        std::fs::write(&toml, pipeline(shard_path.to_str().context("utf-8 path")?))?;
        let proxy = LinkProxy::to_port(broker)?;
        let mut o = AgentOptions::new(device(i), proxy.url());
        o.trust_deployments(&key, &["fl"], 1000);
        o.reconnect_max_ms = 500;
        let mut p = toml::Table::new();
        p.insert(
            "file".into(),
            toml::Value::String(toml.to_str().context("utf-8")?.into()),
        );
        o.extra.insert("pipeline".into(), toml::Value::Table(p));
        agents.push(Agent::start(&env.path(&device(i)), o)?);
        proxies.push(proxy);
    }
    for i in 0..AGENTS {
        journal.wait_registered(&device(i), WAIT)?;
    }

    // Task A: every link up, every agent in every round.
    start_task(&coord, &task_dir, "digits-a", 1.0, &key)?;
    journal.wait_for("task digits-a finished", WAIT * 3, |j| {
        finished(j, "digits-a")
    })?;
    let acc_a = final_accuracy(journal.events(), "digits-a")?;

    // Task B: before each round opens, three agents lose their uplink; after it closes, their
    // links are cut and restored, and the next three lose theirs.
    let dropped = |r: u32| -> Vec<usize> {
        (0..DROPPED)
            .map(|k| (r as usize * DROPPED + k) % AGENTS)
            .collect()
    };
    let stall = |set: &[usize], on: bool| {
        for &i in set {
            if on {
                proxies[i].set(Link {
                    stall_up: true,
                    ..Link::default()
                });
            } else {
                proxies[i].cut();
                proxies[i].set(Link::default());
                proxies[i].restore();
            }
        }
    };
    stall(&dropped(1), true);
    start_task(&coord, &task_dir, "digits-b", 0.7, &key)?;
    for r in 1..=ROUNDS {
        journal.wait_for(&format!("digits-b round {r} closed"), WAIT, |j| {
            closed(j, "digits-b").len() >= r as usize
        })?;
        stall(&dropped(r), false);
        if r < ROUNDS {
            stall(&dropped(r + 1), true);
        }
    }
    journal.wait_for("task digits-b finished", WAIT, |j| finished(j, "digits-b"))?;
    let acc_b = final_accuracy(journal.events(), "digits-b")?;

    // Every round of B closed on the quorum of the agents whose links were up, without the
    // dropped ones' updates on time.
    let events = journal.events();
    for (r, e) in closed(events, "digits-b").iter().enumerate() {
        let on_time = e.f64_field("on_time").unwrap_or(0.0);
        ensure!(
            e.str_field("close_reason") == Some("quorum") && on_time <= (AGENTS - DROPPED) as f64,
            "round {}: {:?}",
            r + 1,
            e.raw
        );
    }
    // The kept updates arrived after their round and counted in a later one.
    let late: Vec<&Event> = events
        .iter()
        .filter(|e| {
            e.is("fl_update")
                && e.str_field("task") == Some("digits-b")
                && e.f64_field("staleness").is_some_and(|s| s >= 1.0)
        })
        .collect();
    let late_count = late.len();
    ensure!(
        late_count >= (ROUNDS as usize - 2) * DROPPED / 2,
        "late updates applied: {} ({:?})",
        late.len(),
        late.iter().map(|e| &e.raw).collect::<Vec<_>>()
    );
    ensure!(acc_a >= 0.85, "task A reached only {acc_a:.3}");
    // Each agent reports what it did in its telemetry.
    journal.wait_for("federated-learning counters in telemetry", WAIT, |j| {
        (0..AGENTS).all(|i| {
            j.iter()
                .rev()
                .find(|e| e.is_for("telemetry", &device(i)))
                .and_then(|e| e.raw.get("fl"))
                .is_some_and(|fl| {
                    fl.get("queued").and_then(|q| q.as_u64()).unwrap_or(0) >= 1
                        && fl.get("rejected").and_then(|q| q.as_u64()) == Some(0)
                })
        })
    })?;
    // The agents serve the final global weights: their inference stage runs a patched model.
    let initial_id = format!("{MODEL}@{}", &sha256_hex(&model)[..12]);
    journal.wait_for("every agent serving patched weights", WAIT, |j| {
        (0..AGENTS).all(|i| {
            edge_tests::served_model(j, &device(i))
                .is_some_and(|m| m.starts_with(MODEL) && m != initial_id)
        })
    })?;
    ensure!(
        (acc_a - acc_b).abs() <= 0.01,
        "with dropouts {acc_b:.4} vs {acc_a:.4} without"
    );
    eprintln!(
        "final accuracy: {acc_a:.4} without dropouts, {acc_b:.4} with 30% dropped per round; {late_count} late updates applied"
    );
    drop(agents);
    Ok(())
}
