//! Signed deployments end to end: the real coordinator (embedded broker), real agents and
//! real modules, driven through `edge-coordinator keygen` and `deploy`.
//!
//! A group rollout installs a pipeline on two agents and its output reaches the coordinator;
//! a broken version is rolled back with the reason while the installed one keeps running;
//! forged, replayed and foreign deployments are rejected with a reason; an installed pipeline
//! survives an agent restart.

use std::time::Duration;

use anyhow::{Result, ensure};
use edge_tests::{
    Agent, AgentOptions, Coordinator, Event, PipelineDir, SigningKey, TestEnv, deploy, run_test,
};

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
