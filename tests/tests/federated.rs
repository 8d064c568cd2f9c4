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
use edge_testmodels::onnx_builder;
use edge_tests::digits::Split;
use edge_tests::{
    Agent, AgentOptions, Coordinator, Event, FL_MODEL, FlTask, Link, LinkProxy, SigningKey,
    TestEnv, closed_rounds, federated_agent, federated_data, final_accuracy, run_test,
    task_finished,
};
use protocol::v1::deploy::sha256_hex;

const AGENTS: usize = 10;
const DROPPED: usize = 3;
const ROUNDS: u32 = 20;
const WAIT: Duration = Duration::from_secs(90);

fn device(i: usize) -> String {
    format!("fl-{i:02}")
}

/// Task `id`; `quorum` 1.0 waits for every selected agent, 0.7 closes on the first seven.
fn task(id: &str, quorum: f32) -> FlTask {
    FlTask {
        quorum,
        ..FlTask::new(id, ROUNDS, AGENTS)
    }
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
    let task_dir = env.path("task");
    let model = onnx_builder::mlp(&onnx_builder::mlp_layers(&[64, 32, 10], 1));
    let (d, shards) = federated_data(&task_dir, AGENTS, Split::Iid, &model)?;

    let mut proxies = Vec::new();
    let mut agents = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        let proxy = LinkProxy::to_port(broker)?;
        let mut o = AgentOptions::new(device(i), proxy.url());
        o.reconnect_max_ms = 500;
        let dir = env.path(&format!("pipelines/{}", device(i)));
        federated_agent(&mut o, &dir, &d, shard, &model, &key)?;
        agents.push(Agent::start(&env.path(&device(i)), o)?);
        proxies.push(proxy);
    }
    for i in 0..AGENTS {
        journal.wait_registered(&device(i), WAIT)?;
    }

    // Task A: every link up, every agent in every round.
    task("digits-a", 1.0).start(&coord, &task_dir, &key)?;
    journal.wait_for("task digits-a finished", WAIT * 3, |j| {
        task_finished(j, "digits-a")
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
    task("digits-b", 0.7).start(&coord, &task_dir, &key)?;
    for r in 1..=ROUNDS {
        journal.wait_for(&format!("digits-b round {r} closed"), WAIT, |j| {
            closed_rounds(j, "digits-b").len() >= r as usize
        })?;
        stall(&dropped(r), false);
        if r < ROUNDS {
            stall(&dropped(r + 1), true);
        }
    }
    journal.wait_for("task digits-b finished", WAIT, |j| {
        task_finished(j, "digits-b")
    })?;
    let acc_b = final_accuracy(journal.events(), "digits-b")?;

    // Every round of B closed on the quorum of the agents whose links were up, without the
    // dropped ones' updates on time.
    let events = journal.events();
    for (r, e) in closed_rounds(events, "digits-b").iter().enumerate() {
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
    let initial_id = format!("{FL_MODEL}@{}", &sha256_hex(&model)[..12]);
    journal.wait_for("every agent serving patched weights", WAIT, |j| {
        (0..AGENTS).all(|i| {
            edge_tests::served_model(j, &device(i))
                .is_some_and(|m| m.starts_with(FL_MODEL) && m != initial_id)
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
