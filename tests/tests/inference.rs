//! ONNX inference end to end: the real coordinator (embedded broker) and a real agent with
//! the workspace's ONNX Runtime library (`cargo xtask ort`), models built in Rust.
//!
//! A deployed pipeline runs an `.onnx` model shipped with it; a model deployment swaps a new
//! version in under the running pipeline; a NaN-producing version and one with other output
//! shapes are rolled back with the reason while the old version keeps serving. An agent whose
//! `inference.library` is bogus still runs a WASM pipeline and says why inference is off.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use edge_testmodels::onnx_builder;
use edge_tests::{
    Agent, AgentOptions, Coordinator, Event, PipelineDir, SigningKey, TestEnv, deploy,
    deploy_models, run_test, served_model,
};
use protocol::v1::deploy::sha256_hex;

const WAIT: Duration = Duration::from_secs(60);
const DEVICE: &str = "infer-a";
const MODEL: &str = "models/affine.onnx";

const PIPELINE: &str = r#"
name = "scoring"
[[source]]
name = "imu"
kind = "synthetic"
rate_hz = 40
window = 4
[[stage]]
name = "score"
kind = "inference"
model = "models/affine.onnx"
input = "imu"
[[sink]]
kind = "outbox"
input = "score"
stream = "scores"
"#;

/// `y = a·x + b` on `[N, 4]`.
fn affine(a: f32, b: f32) -> Vec<u8> {
    let mut w = vec![0.0; 16];
    for i in 0..4 {
        w[i * 4 + i] = a;
    }
    onnx_builder::linear(4, 4, &w, &[b; 4])
}

fn agent_options(coord: &Coordinator, device: &str, key: &SigningKey) -> AgentOptions {
    let mut o = AgentOptions::new(device, coord.url());
    o.telemetry_interval_s = 1;
    o.trust_deployments(key, &[], 1000);
    o
}

fn scores_after(events: &[Event], device: &str, from: usize) -> usize {
    events[from.min(events.len())..]
        .iter()
        .filter(|e| e.is_for("data", device) && e.str_field("stream") == Some("scores"))
        .count()
}

#[test]
fn pipeline_with_a_model_then_hot_swap_and_rollbacks() {
    run_test("inference_deploy", scenario);
}

/// Whether the process has the ONNX Runtime library mapped.
fn maps_onnxruntime(agent: &Agent) -> Result<bool> {
    let pid = agent.pid().context("agent pid")?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    Ok(maps.contains("libonnxruntime"))
}

fn scenario(env: &TestEnv) -> Result<()> {
    let coord = Coordinator::start_embedded(&env.path("coordinator"))?;
    let mut journal = coord.journal();
    let key = SigningKey::generate(&env.path("keys/deploy.key"))?;
    let agent = Agent::start(&env.path(DEVICE), agent_options(&coord, DEVICE, &key))?;
    journal.wait_registered(DEVICE, WAIT)?;
    // Idle: registered (so start-up is over), nothing loaded yet.
    ensure!(
        !maps_onnxruntime(&agent)?,
        "an agent without inference stages mapped ONNX Runtime"
    );
    let log = agent.log();
    ensure!(
        !log.contains("wasm sandbox ready") && !log.contains("onnx runtime loaded"),
        "an agent running nothing built the sandbox or loaded ONNX Runtime:\n{log}"
    );
    let target = ["--device", DEVICE];
    let wait_args = [
        "--health-messages",
        "10",
        "--health-seconds",
        "0",
        "--timeout-s",
        "120",
    ];

    // A pipeline deployment carrying its model: installed, and scores reach the coordinator.
    let v1 = affine(2.0, 1.0);
    let dir = PipelineDir::create(&env.path("v1"), PIPELINE, &[])?;
    dir.write(MODEL, &v1)?;
    let run = deploy(&coord, &target, &dir, &key, 1, &wait_args)?;
    ensure!(
        run.success && run.outcome(DEVICE) == Some("healthy"),
        "pipeline with a model: {:?}\n{}\n{}",
        run.outcome(DEVICE),
        run.stdout,
        run.stderr
    );
    journal.wait_for("scores from the model", WAIT, |j| {
        scores_after(j, DEVICE, 0) >= 5
    })?;
    ensure!(
        maps_onnxruntime(&agent)?,
        "the first model loaded ONNX Runtime"
    );
    let v1_id = format!("{MODEL}@{}", &sha256_hex(&v1)[..12]);
    journal.wait_for("telemetry naming model v1", WAIT, |j| {
        served_model(j, DEVICE).as_deref() == Some(v1_id.as_str())
    })?;

    // A model deployment: v2 swaps in under the running pipeline, which keeps producing.
    let v2_path = dir.write("new/affine-v2.onnx", &affine(3.0, 0.0))?;
    let run = deploy_models(
        &coord,
        &target,
        &[(MODEL, &v2_path)],
        &key,
        2,
        &["--timeout-s", "120"],
    )?;
    ensure!(
        run.success && run.outcome(DEVICE) == Some("healthy"),
        "model v2: {:?}\n{}\n{}",
        run.outcome(DEVICE),
        run.stdout,
        run.stderr
    );
    let v2_id = format!("{MODEL}@{}", &sha256_hex(&affine(3.0, 0.0))[..12]);
    journal.wait_for("telemetry naming model v2", WAIT, |j| {
        served_model(j, DEVICE).as_deref() == Some(v2_id.as_str())
    })?;
    journal.refresh()?;
    let mark = journal.len();
    journal.wait_for("scores after the swap", WAIT, |j| {
        scores_after(j, DEVICE, mark) >= 5
    })?;

    // A version that gives NaN on the probe, and one with other outputs: both rolled back
    // with the reason; v2 keeps serving.
    let rolled_back = |file: &std::path::Path, version: u64, needle: &str| -> Result<()> {
        let run = deploy_models(
            &coord,
            &target,
            &[(MODEL, file)],
            &key,
            version,
            &["--timeout-s", "60"],
        )?;
        let outcome = run.outcome(DEVICE).unwrap_or_default();
        ensure!(
            !run.success && outcome.starts_with("rolled back") && outcome.contains(needle),
            "v{version}, expected a rollback naming {needle:?}: {outcome:?}\n{}{}",
            run.stdout,
            run.stderr
        );
        Ok(())
    };
    let nan = dir.write("new/nan.onnx", &onnx_builder::nan_on_probe())?;
    rolled_back(&nan, 3, "not finite")?;
    let narrow = dir.write(
        "new/narrow.onnx",
        &onnx_builder::linear(4, 2, &[1.0; 8], &[0.0; 2]),
    )?;
    rolled_back(&narrow, 4, "outputs")?;
    journal.refresh()?;
    let mark = journal.len();
    journal.wait_for("scores from v2 after the rollbacks", WAIT, |j| {
        scores_after(j, DEVICE, mark) >= 5
            && served_model(j, DEVICE).as_deref() == Some(v2_id.as_str())
    })?;
    Ok(())
}

#[test]
fn bogus_library_keeps_wasm_pipelines_running_and_says_why() {
    run_test("inference_unavailable", |env: &TestEnv| {
        let coord = Coordinator::start_embedded(&env.path("coordinator"))?;
        let mut journal = coord.journal();
        let key = SigningKey::generate(&env.path("keys/deploy.key"))?;
        let mut o = agent_options(&coord, "no-ort", &key);
        let mut inference = toml::Table::new();
        inference.insert(
            "library".into(),
            toml::Value::String("/nonexistent/libonnxruntime.so".into()),
        );
        o.extra
            .insert("inference".into(), toml::Value::Table(inference));
        let agent = Agent::start(&env.path("no-ort"), o)?;
        journal.wait_registered("no-ort", WAIT)?;
        let dir = PipelineDir::create(
            &env.path("wasm"),
            r#"
name = "vibration"
[[source]]
name = "imu"
kind = "synthetic"
rate_hz = 40
window = 64
[[stage]]
name = "features"
module = "modules/features.wasm"
input = "imu"
config = { sample_rate_hz = 1000.0, bands = 4 }
[[sink]]
kind = "outbox"
input = "features"
stream = "features"
"#,
            &[("feature_extractor", "modules/features.wasm")],
        )?;
        let run = deploy(
            &coord,
            &["--device", "no-ort"],
            &dir,
            &key,
            1,
            &[
                "--health-messages",
                "10",
                "--health-seconds",
                "0",
                "--timeout-s",
                "120",
            ],
        )?;
        ensure!(run.success, "{}\n{}", run.stdout, run.stderr);
        journal.wait_for("WASM pipeline output", WAIT, |j| {
            j.iter()
                .filter(|e| e.is_for("data", "no-ort") && e.str_field("stream") == Some("features"))
                .count()
                >= 5
        })?;
        let log = std::fs::read_to_string(agent.dir().join("agent-no-ort.log"))?;
        ensure!(
            log.contains("onnx inference unavailable")
                && log.contains("/nonexistent/libonnxruntime.so"),
            "the agent says why inference is off:\n{log}"
        );
        Ok(())
    });
}
