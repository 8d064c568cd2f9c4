//! A model too big for one MQTT message, trained end to end: the real coordinator (embedded
//! broker), three real agents and an MLP of 38,410 weights (64-512-10, 150 KiB of f32; one
//! round message holds 16,384). The global weights travel as chunks each agent fetches and
//! checks against the signed round header; the fp32 updates (150 KiB) travel as parts through
//! the outbox and are put together by the coordinator.
//!
//! Each agent reaches the broker through a proxy that delays everything by 300 ms each way, so
//! every fetch waits at least 600 ms for its chunks; meanwhile an attacker on the same broker
//! publishes forged chunks (right index and length, wrong bytes) on every agent's chunk topic
//! every 50 ms, so forged chunks arrive during every fetch of the first version. One agent is
//! killed (SIGKILL) while it fetches and started again. Every round closes with all three
//! updates, the forged chunks are dropped, and the model learns.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use edge_testmodels::onnx_builder;
use edge_tests::digits::Split;
use edge_tests::{
    Agent, AgentOptions, Coordinator, FlTask, Link, LinkProxy, RawMqtt, SigningKey, TestEnv,
    closed_rounds, federated_agent, federated_data, run_test, task_finished,
};
use protocol::v1::fl::WeightChunk;
use protocol::v1::topics;

const AGENTS: usize = 3;
const ROUNDS: u32 = 4;
const WAIT: Duration = Duration::from_secs(120);
/// The model's 38,410 weights as 64 KiB chunks of f32: two full ones and the rest.
const CHUNK_LENS: [usize; 3] = [65_536, 65_536, 38_410 * 4 - 2 * 65_536];

fn device(i: usize) -> String {
    format!("big-{i}")
}

#[test]
fn a_model_over_one_message_trains_in_chunks_and_parts() {
    run_test("federated_large", scenario);
}

fn scenario(env: &TestEnv) -> Result<()> {
    let coord = Coordinator::start_embedded(&env.path("coordinator"))?;
    let mut journal = coord.journal();
    let key = SigningKey::generate(&env.path("keys/deploy.key"))?;
    let port = coord.port().context("coordinator port")?;

    let task_dir = env.path("task");
    let model = onnx_builder::mlp(&onnx_builder::mlp_layers(&[64, 512, 10], 1));
    let (d, shards) = federated_data(&task_dir, AGENTS, Split::Iid, &model)?;
    let mut agents = Vec::new();
    let mut proxies = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        let proxy = LinkProxy::to_port(port)?;
        proxy.set(Link {
            delay: Duration::from_millis(300),
            ..Link::default()
        });
        let mut o = AgentOptions::new(device(i), proxy.url());
        proxies.push(proxy);
        o.reconnect_max_ms = 500;
        let dir = env.path(&format!("pipelines/{}", device(i)));
        federated_agent(&mut o, &dir, &d, shard, &model, &key)?;
        agents.push(Agent::start(&env.path(&device(i)), o)?);
    }
    for i in 0..AGENTS {
        journal.wait_registered(&device(i), WAIT)?;
    }

    // The attacker: well-formed chunks of version 0 with the right lengths and the wrong bytes,
    // for every index, on every agent's chunk topic, until the task is over.
    let done = Arc::new(AtomicBool::new(false));
    let forger = {
        let done = done.clone();
        std::thread::spawn(move || -> Result<u64> {
            let mut mqtt = RawMqtt::connect(port, "forger", Duration::from_secs(10))?;
            let mut sent = 0u64;
            while !done.load(Ordering::Relaxed) {
                for i in 0..AGENTS {
                    for (index, len) in CHUNK_LENS.iter().enumerate() {
                        let chunk = WeightChunk {
                            task: "big".into(),
                            version: 0,
                            index: index as u32,
                            data: vec![0x41; *len],
                        };
                        mqtt.publish(
                            &topics::fl_chunk(&device(i)),
                            chunk.encode(),
                            Duration::from_secs(5),
                        )?;
                        sent += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(sent)
        })
    };

    FlTask::new("big", ROUNDS, AGENTS).start(&coord, &task_dir, &key)?;
    // Power cut while the first fetch runs, then back.
    let fetching = |a: &Agent| a.log().contains("fetching the round's weights in chunks");
    let deadline = std::time::Instant::now() + WAIT;
    while !fetching(&agents[0]) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    ensure!(
        fetching(&agents[0]),
        "agent 0 never fetched: {}",
        agents[0].last_log()
    );
    agents[0].kill()?;
    agents[0].restart()?;

    journal.wait_for("task big finished", WAIT * 2, |j| task_finished(j, "big"))?;
    done.store(true, Ordering::Relaxed);
    let forged = forger.join().expect("forger thread")?;

    let events = journal.events();
    let closed = closed_rounds(events, "big");
    ensure!(
        closed.len() == ROUNDS as usize,
        "rounds closed: {}",
        closed.len()
    );
    for (r, e) in closed.iter().enumerate() {
        ensure!(
            e.f64_field("received").unwrap_or(0.0) >= AGENTS as f64,
            "round {} closed without every agent: {:?}",
            r + 1,
            e.raw
        );
    }
    // Each update was over one message: it came in parts.
    let updates: Vec<u64> = events
        .iter()
        .filter(|e| e.is("fl_update") && e.str_field("task") == Some("big"))
        .map(|e| e.f64_field("bytes").unwrap_or(0.0) as u64)
        .collect();
    ensure!(
        updates.len() >= AGENTS * ROUNDS as usize
            && updates
                .iter()
                .all(|&b| b > protocol::v1::MAX_PAYLOAD_BYTES as u64),
        "update sizes: {updates:?}"
    );
    let first = closed[0].f64_field("eval_accuracy").unwrap_or(0.0);
    let last = closed
        .last()
        .and_then(|e| e.f64_field("eval_accuracy"))
        .unwrap_or(0.0);
    // The model learns (a round's accuracy may dip a little after an early high one).
    ensure!(
        last > 0.8 && last >= first - 0.03,
        "accuracy {first} -> {last}"
    );
    // The forged chunks reached the agents and were dropped.
    let dropped: usize = agents
        .iter()
        .map(|a| a.log().matches("weight chunk dropped").count())
        .sum();
    ensure!(
        forged > 0 && dropped > 0,
        "forged {forged}, dropped {dropped}"
    );
    // The final weights stay kept for a restart, as files of the state directory: one version,
    // every chunk at its length.
    for a in &agents {
        let task = a.state_dir().join("fl/chunks/big");
        let versions: Vec<_> = std::fs::read_dir(&task)
            .with_context(|| format!("{}", task.display()))?
            .collect::<std::io::Result<_>>()?;
        ensure!(versions.len() == 1, "{}: {versions:?}", task.display());
        let mut lens: Vec<usize> = (0..CHUNK_LENS.len())
            .map(|i| {
                std::fs::metadata(versions[0].path().join(i.to_string())).map(|m| m.len() as usize)
            })
            .collect::<std::io::Result<_>>()?;
        lens.sort_unstable_by(|a, b| b.cmp(a));
        ensure!(
            lens == CHUNK_LENS,
            "{}: chunk lengths {lens:?}",
            task.display()
        );
    }
    println!(
        "federated_large: {ROUNDS} rounds, accuracy {first:.3} -> {last:.3}, update bytes {:?}, forged chunks sent {forged}, dropped by agents {dropped}",
        updates.first()
    );
    Ok(())
}
