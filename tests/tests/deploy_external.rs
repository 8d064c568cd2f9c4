//! Models with external data files (torch's default export, `m.onnx` + `m.onnx.data`) deployed
//! over MQTT to a real agent through the real coordinator: the pipeline deployment carries the
//! data file as an artifact of its own and the model runs on the device; a model deployment
//! with new weights (same graph, other data file) swaps in; `deploy` refuses a model whose data
//! file is missing, and two models naming one data file name with different contents, before
//! anything is sent.

use std::time::Duration;

use anyhow::{Result, ensure};
use edge_testmodels::exported;
use edge_tests::{
    Agent, AgentOptions, Coordinator, Event, PipelineDir, SigningKey, TestEnv, deploy,
    deploy_models, run_test, served_model,
};

const WAIT: Duration = Duration::from_secs(60);
const DEVICE: &str = "ext-a";
const MODEL: &str = "models/torch_mlp.onnx";

/// A synthetic source of 64-sample windows into the torch MLP (input `[1, 64]`).
const PIPELINE: &str = r#"
name = "torch"
[[source]]
name = "px"
kind = "synthetic"
rate_hz = 40
window = 64
[[stage]]
name = "classify"
kind = "inference"
model = "models/torch_mlp.onnx"
input = "px"
[[sink]]
kind = "outbox"
input = "classify"
stream = "scores"
"#;

/// The data files the agent wrote out of its artifact store for ONNX Runtime to map
/// (`STATE/models/KEY/torch_mlp.onnx.data`).
fn unpacked(state_dir: &std::path::Path) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(state_dir.join("models"))? {
        let file = entry?.path().join("torch_mlp.onnx.data");
        if file.is_file() {
            out.push(std::fs::read(file)?);
        }
    }
    Ok(out)
}

fn scores_after(events: &[Event], from: usize) -> usize {
    events[from.min(events.len())..]
        .iter()
        .filter(|e| e.is_for("data", DEVICE) && e.str_field("stream") == Some("scores"))
        .count()
}

#[test]
fn torch_external_data_model_deploys_and_runs() {
    run_test("deploy_external", scenario);
}

fn scenario(env: &TestEnv) -> Result<()> {
    let coord = Coordinator::start_embedded(&env.path("coordinator"))?;
    let mut journal = coord.journal();
    let key = SigningKey::generate(&env.path("keys/deploy.key"))?;
    let mut o = AgentOptions::new(DEVICE, coord.url());
    o.telemetry_interval_s = 1;
    o.trust_deployments(&key, &[], 1000);
    let agent = Agent::start(&env.path(DEVICE), o)?;
    journal.wait_registered(DEVICE, WAIT)?;
    let target = ["--device", DEVICE];
    let wait_args = [
        "--health-messages",
        "10",
        "--health-seconds",
        "0",
        "--timeout-s",
        "120",
    ];

    // The pipeline with the torch pair: the data file travels as its own artifact.
    let dir = PipelineDir::create(&env.path("v1"), PIPELINE, &[])?;
    dir.write(MODEL, &exported("torch_mlp.onnx"))?;
    dir.write(
        "models/torch_mlp.onnx.data",
        &exported("torch_mlp.onnx.data"),
    )?;
    let run = deploy(&coord, &target, &dir, &key, 1, &wait_args)?;
    ensure!(
        run.success && run.outcome(DEVICE) == Some("healthy"),
        "pipeline with the torch pair: {:?}\n{}\n{}",
        run.outcome(DEVICE),
        run.stdout,
        run.stderr
    );
    journal.wait_for("scores from the torch model", WAIT, |j| {
        scores_after(j, 0) >= 5
    })?;
    let mut v1 = None;
    journal.wait_for("telemetry naming the torch model", WAIT, |j| {
        v1 = served_model(j, DEVICE).filter(|m| m.starts_with(&format!("{MODEL}@")));
        v1.is_some()
    })?;
    let v1 = v1.unwrap_or_default();
    // The model runs from its data file written out of the store, not from a copy in memory.
    let data = exported("torch_mlp.onnx.data");
    ensure!(
        unpacked(agent.state_dir())? == vec![data.clone()],
        "the data file is written out once, as deployed"
    );

    // New weights under the same graph (every weight halved): a model deployment swaps them in.
    let halved: Vec<u8> = exported("torch_mlp.onnx.data")
        .chunks_exact(4)
        .flat_map(|c| (f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * 0.5).to_le_bytes())
        .collect();
    let v2_path = dir.write("new/torch_mlp.onnx", &exported("torch_mlp.onnx"))?;
    dir.write("new/torch_mlp.onnx.data", &halved)?;
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
        "new weights: {:?}\n{}\n{}",
        run.outcome(DEVICE),
        run.stdout,
        run.stderr
    );
    journal.wait_for("telemetry naming the new weights", WAIT, |j| {
        served_model(j, DEVICE).is_some_and(|m| m.starts_with(&format!("{MODEL}@")) && m != v1)
    })?;
    journal.refresh()?;
    let mark = journal.len();
    journal.wait_for("scores after the swap", WAIT, |j| {
        scores_after(j, mark) >= 5
    })?;
    let files = unpacked(agent.state_dir())?;
    ensure!(
        files.contains(&halved) && files.len() <= 2,
        "the new weights are written out beside the old ones (kept for a rollback): {} files",
        files.len()
    );

    // A model whose data file is not beside it: refused by deploy, naming the file.
    let lone = dir.write("lone/torch_mlp.onnx", &exported("torch_mlp.onnx"))?;
    let run = deploy_models(
        &coord,
        &target,
        &[(MODEL, &lone)],
        &key,
        3,
        &["--timeout-s", "30"],
    )?;
    ensure!(
        !run.success
            && run.stderr.contains("lone/torch_mlp.onnx.data is missing")
            && run.outcome(DEVICE).is_none(),
        "missing data file not refused before sending:\n{}\n{}",
        run.stdout,
        run.stderr
    );

    // Two models naming one data file name (in the same package folder) with different
    // contents: refused, naming both.
    let other = dir.write("other/torch_mlp.onnx", &exported("torch_mlp.onnx"))?;
    dir.write("other/torch_mlp.onnx.data", &halved)?;
    let first = dir.write("first/torch_mlp.onnx", &exported("torch_mlp.onnx"))?;
    dir.write(
        "first/torch_mlp.onnx.data",
        &exported("torch_mlp.onnx.data"),
    )?;
    let run = deploy_models(
        &coord,
        &target,
        &[(MODEL, &first), ("models/second.onnx", &other)],
        &key,
        4,
        &["--timeout-s", "30"],
    )?;
    ensure!(
        !run.success
            && run.stderr.contains("data file models/torch_mlp.onnx.data")
            && run.stderr.contains("different contents")
            && run.outcome(DEVICE).is_none(),
        "conflicting data files not refused:\n{}\n{}",
        run.stdout,
        run.stderr
    );
    // Nothing above stopped the model running.
    journal.refresh()?;
    let mark = journal.len();
    journal.wait_for("scores after the refusals", WAIT, |j| {
        scores_after(j, mark) >= 5
    })?;
    Ok(())
}
