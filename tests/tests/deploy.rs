//! Signed deployments end to end: the real coordinator, real agents and real modules, driven
//! through `edge-coordinator keygen` and `deploy`.
//!
//! On the embedded broker: a group rollout installs a pipeline on two agents and its output
//! reaches the coordinator; a broken version is rolled back with the reason while the
//! installed one keeps running; forged, replayed and foreign deployments are rejected with a
//! reason; an installed pipeline survives an agent restart.
//!
//! On mosquitto: an attacker on the broker publishes forged chunks (the real chunk envelope,
//! random data) for the device during its rollout; the agent drops and reports them, and the
//! rollout still ends healthy on the same version.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use edge_tests::{
    Agent, AgentOptions, Coordinator, Event, Mosquitto, PipelineDir, RawMqtt, RawOutcome,
    SigningKey, TestEnv, deploy, run_test,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use protocol::v1::deploy::{Chunk, DeployStatus, Manifest, SignedManifest, Step, chunk_count};
use protocol::v1::{Envelope, topics};
use rand::Rng;

const WAIT: Duration = Duration::from_secs(60);
const DEVICES: [&str; 2] = ["dep-a", "dep-b"];

fn pipeline(source_stream: &str, stage_module: &str, stage_config: &str) -> String {
    format!(
        r#"
name = "vibration"
[[source]]
name = "imu"
kind = "synthetic"
stream = "{source_stream}"
rate_hz = 40
window = 64
[[stage]]
name = "features"
module = "{stage_module}"
input = "imu"
config = {stage_config}
[[sink]]
kind = "outbox"
input = "features"
stream = "features"
"#
    )
}

fn agent_options(coord: &Coordinator, device: &str, key: &SigningKey) -> AgentOptions {
    let mut o = AgentOptions::new(device, coord.url());
    o.telemetry_interval_s = 1;
    o.trust_deployments(key, &["lab"], 1000);
    o
}

/// Data events on stream `features` from `device` after journal position `from`.
fn features_after(events: &[Event], device: &str, from: usize) -> usize {
    events[from.min(events.len())..]
        .iter()
        .filter(|e| e.is_for("data", device) && e.str_field("stream") == Some("features"))
        .count()
}

fn telemetry_pipeline_version(events: &[Event], device: &str) -> Option<u64> {
    events
        .iter()
        .rev()
        .find(|e| e.is_for("telemetry", device))
        .and_then(|e| e.raw.get("pipeline"))
        .and_then(|p| p.get("version"))
        .and_then(|v| v.as_u64())
}

#[test]
fn rollout_rollback_rejections_and_restart() {
    run_test("deploy_rollout", scenario);
}

fn scenario(env: &TestEnv) -> Result<()> {
    let coord = Coordinator::start_embedded(&env.path("coordinator"))?;
    let mut journal = coord.journal();
    let key = SigningKey::generate(&env.path("keys/deploy.key"))?;
    let stranger = SigningKey::generate(&env.path("keys/stranger.key"))?;
    let mut agents = Vec::new();
    for d in DEVICES {
        agents.push(Agent::start(&env.path(d), agent_options(&coord, d, &key))?);
    }
    for d in DEVICES {
        journal.wait_registered(d, WAIT)?;
    }

    // v1 to the group: both agents download, check health in shadow, commit, and the
    // pipeline's output reaches the coordinator.
    let good = PipelineDir::create(
        &env.path("v1"),
        &pipeline(
            "imu",
            "modules/features.wasm",
            "{ sample_rate_hz = 1000.0, bands = 4 }",
        ),
        &[("feature_extractor", "modules/features.wasm")],
    )?;
    let wait_args = [
        "--health-messages",
        "20",
        "--health-seconds",
        "0",
        "--timeout-s",
        "120",
    ];
    let run = deploy(&coord, &["--group", "lab"], &good, &key, 1, &wait_args)?;
    ensure!(
        run.success,
        "v1 rollout failed:\n{}\n{}",
        run.stdout,
        run.stderr
    );
    for d in DEVICES {
        ensure!(
            run.outcome(d) == Some("healthy"),
            "{d}: {:?}\n{}",
            run.outcome(d),
            run.stdout
        );
    }
    journal.wait_for("pipeline output from both agents", WAIT, |j| {
        DEVICES.iter().all(|d| features_after(j, d, 0) >= 5)
    })?;
    journal.wait_for("telemetry naming pipeline version 1", WAIT, |j| {
        DEVICES
            .iter()
            .all(|d| telemetry_pipeline_version(j, d) == Some(1))
    })?;
    for d in DEVICES {
        ensure!(journal.count_kind("deploy") > 0);
        let steps: Vec<String> = journal
            .events()
            .iter()
            .filter(|e| e.is_for("deploy", d))
            .filter_map(|e| e.str_field("step").map(str::to_owned))
            .collect();
        for step in ["downloading", "verifying", "starting", "healthy"] {
            ensure!(
                steps.iter().any(|s| s == step),
                "{d} never reported {step}: {steps:?}"
            );
        }
    }

    // v2 traps on every 5th frame: the health check fails, both roll back with the reason,
    // and v1 keeps producing.
    let broken = PipelineDir::create(
        &env.path("v2"),
        &pipeline("imu", "modules/trap.wasm", "{ every = 5 }"),
        &[("hostile_trap", "modules/trap.wasm")],
    )?;
    let run = deploy(&coord, &["--group", "lab"], &broken, &key, 2, &wait_args)?;
    ensure!(
        !run.success,
        "a failing rollout must exit non-zero:\n{}",
        run.stdout
    );
    for d in DEVICES {
        let outcome = run.outcome(d).unwrap_or_default();
        ensure!(
            outcome.starts_with("rolled back") && outcome.contains("trap"),
            "{d}: {outcome:?}\n{}",
            run.stdout
        );
    }
    journal.refresh()?;
    let mark = journal.len();
    journal.wait_for("v1 still producing after the rollback", WAIT, |j| {
        DEVICES.iter().all(|d| features_after(j, d, mark) >= 5)
    })?;

    // Forged and replayed deployments to one device: each rejected with its reason.
    let rejected = |signer: &SigningKey, version: u64, needle: &str| -> Result<()> {
        let run = deploy(
            &coord,
            &["--device", DEVICES[0]],
            &good,
            signer,
            version,
            &["--timeout-s", "60"],
        )?;
        let outcome = run.outcome(DEVICES[0]).unwrap_or_default();
        ensure!(
            !run.success && outcome.contains(needle),
            "v{version}, expected a rejection naming {needle:?}: {outcome:?}\n{}{}",
            run.stdout,
            run.stderr
        );
        Ok(())
    };
    rejected(&stranger, 3, "unknown key")?;
    rejected(&key, 1, "not newer")?;
    // A rolled-back version is not retried.
    rejected(&key, 2, "already attempted")?;

    // The installed pipeline comes back after an agent restart (from the state db).
    agents[0].stop()?;
    journal.refresh()?;
    let mark = journal.len();
    agents[0].restart()?;
    journal.wait_for("v1 producing again after the restart", WAIT, |j| {
        features_after(j, DEVICES[0], mark) >= 5
    })?;
    Ok(())
}

/// SIGSTOP for as long as it lives, SIGCONT when dropped: a failing test never leaves the
/// process frozen.
struct Frozen(Pid);

impl Frozen {
    fn new(pid: u32) -> Result<Frozen> {
        let pid = Pid::from_raw(i32::try_from(pid).context("pid out of range")?);
        kill(pid, Signal::SIGSTOP).context("cannot SIGSTOP the coordinator")?;
        Ok(Frozen(pid))
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

/// Every chunk of every artifact `manifest` lists, with the real header (deployment, artifact
/// digest, index, total, offset, length) and random data: what anyone who can publish on the
/// broker and read the retained manifest can send.
fn forge_chunks(manifest: &Manifest) -> Result<Vec<Vec<u8>>> {
    let mut rng = rand::thread_rng();
    let cs = u64::from(manifest.chunk_size);
    let mut out = Vec::new();
    for a in &manifest.artifacts {
        let total = chunk_count(a.size, manifest.chunk_size);
        for index in 0..total {
            let offset = u64::from(index) * cs;
            let mut data = vec![0u8; usize::try_from(cs.min(a.size - offset))?];
            rng.fill(&mut data[..]);
            let chunk = Chunk {
                deployment_id: manifest.deployment_id.clone(),
                sha256: a.sha256.clone(),
                index,
                total,
                offset,
                data,
            };
            out.push(chunk.encode()?);
        }
    }
    Ok(out)
}

#[test]
fn forged_chunks_during_a_rollout_are_dropped_and_it_ends_healthy() {
    run_test("deploy_forged_chunks", forged_chunks_scenario);
}

/// Why this order makes the outcome certain rather than likely: the agent is offline while
/// the coordinator sends the chunks (a clean session: they are lost), and the coordinator is
/// frozen from before the agent comes back until every forged chunk is acknowledged by the
/// broker. So each forged chunk reaches the agent after its manifest (the attacker waits for
/// the agent's `downloading` report) and before any real chunk (those come only from the
/// coordinator once it runs again: the rest of its first pass, its answers to the agent's
/// resend requests); the broker keeps one subscriber's messages in order. Nothing here waits
/// on time.
fn forged_chunks_scenario(env: &TestEnv) -> Result<()> {
    const DEVICE: &str = "dep-forge";
    const VERSION: u64 = 1;
    let broker = Mosquitto::start(&env.path("mosquitto"))?;
    let coord = Coordinator::start_external(&env.path("coordinator"), &broker.url())?;
    let mut journal = coord.journal();
    let key = SigningKey::generate(&env.path("keys/deploy.key"))?;
    // A stall (and the download's end after 10 of them) stays far off however long the
    // coordinator is frozen; the resend requests for the dropped chunks fetch the real ones.
    let mut options = AgentOptions::new(DEVICE, broker.url());
    options.telemetry_interval_s = 1;
    options.trust_deployments(&key, &[], 30_000);
    let mut agent = Agent::start(&env.path(DEVICE), options)?;
    journal.wait_registered(DEVICE, WAIT)?;
    agent.stop()?;

    // The attacker: one connection watches the device's deployment topics, one publishes.
    let mut watch = RawMqtt::connect(broker.port(), "attacker-watch", WAIT)?;
    for topic in [
        topics::deploy_manifest(DEVICE),
        topics::deploy_status(DEVICE),
    ] {
        watch.subscribe(&topic, WAIT)?;
    }
    let mut forge = RawMqtt::connect(broker.port(), "attacker-forge", WAIT)?;

    let dir = PipelineDir::create(
        &env.path("v1"),
        &pipeline(
            "imu",
            "modules/features.wasm",
            "{ sample_rate_hz = 1000.0, bands = 4 }",
        ),
        &[("feature_extractor", "modules/features.wasm")],
    )?;
    let coord_pid = coord.pid().context("the coordinator is not running")?;
    let (run, forged) = std::thread::scope(|s| -> Result<_> {
        // 16 KiB chunks: the module travels in a dozen of them.
        let rollout = s.spawn(|| {
            deploy(
                &coord,
                &["--device", DEVICE],
                &dir,
                &key,
                VERSION,
                &[
                    "--chunk-size",
                    "16384",
                    "--health-messages",
                    "5",
                    "--health-seconds",
                    "0",
                    "--timeout-s",
                    "180",
                ],
            )
        });
        let manifest = watch.wait_publish("the retained manifest", WAIT, |p| {
            SignedManifest::from_json(&p.payload)
                .ok()
                .and_then(|m| m.peek_unverified())
        })?;
        let forged = {
            let _frozen = Frozen::new(coord_pid)?;
            agent.restart()?;
            watch.wait_publish("the agent's downloading report", WAIT, |p| {
                // The watcher holds no key: it reads the body past the agent's MAC.
                let body = protocol::v1::auth::body_unverified(&p.payload);
                let status = Envelope::<DeployStatus>::from_json(body, DEVICE).ok()?;
                (status.body.deployment_id == manifest.deployment_id
                    && matches!(status.body.step, Step::Downloading { .. }))
                .then_some(())
            })?;
            let chunks = forge_chunks(&manifest)?;
            for c in &chunks {
                let outcome = forge.publish(&topics::deploy_chunk(DEVICE), c.clone(), WAIT)?;
                ensure!(
                    outcome == RawOutcome::Acked,
                    "forged chunk not taken: {outcome:?}"
                );
            }
            chunks.len()
        };
        let run = rollout
            .join()
            .map_err(|_| anyhow::anyhow!("the deploy thread panicked"))??;
        Ok((run, forged))
    })?;

    ensure!(forged >= 10, "only {forged} chunks forged");
    ensure!(
        run.success,
        "the rollout failed under forged chunks:\n{}\n{}",
        run.stdout,
        run.stderr
    );
    let outcome = run.outcome(DEVICE).unwrap_or_default();
    ensure!(
        outcome == format!("healthy ({forged} bad chunks dropped)"),
        "{outcome:?}\n{}",
        run.stdout
    );
    // Healthy on the version that was sent, nothing failed or rejected on the way, and the
    // agent's own reports carry the count.
    journal.refresh()?;
    let reports: Vec<&Event> = journal
        .events()
        .iter()
        .filter(|e| e.is_for("deploy", DEVICE))
        .collect();
    for e in &reports {
        ensure!(
            e.raw.get("version").and_then(|v| v.as_u64()) == Some(VERSION),
            "a report for another version: {:?}",
            e.raw
        );
        let step = e.str_field("step").unwrap_or_default();
        ensure!(
            !matches!(step, "failed" | "rejected" | "rolled_back"),
            "{step}: {:?}",
            e.raw
        );
    }
    let healthy = reports
        .iter()
        .find(|e| e.str_field("step") == Some("healthy"))
        .context("no healthy report")?;
    ensure!(
        healthy.raw.get("chunks_dropped").and_then(|v| v.as_u64()) == Some(forged as u64),
        "the healthy report should count {forged} dropped chunks: {:?}",
        healthy.raw
    );
    journal.wait_for("telemetry naming pipeline version 1", WAIT, |j| {
        telemetry_pipeline_version(j, DEVICE) == Some(VERSION)
    })?;
    Ok(())
}
