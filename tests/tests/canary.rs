//! Staged rollouts end to end: the real coordinator, five real agents and real modules, driven
//! through `edge-coordinator deploy --strategy canary` and `rollout`.
//!
//! Five agents run v1. v2 goes out canary-first (one device, then batches of two) with no
//! failure allowed. Its stage takes 32 MiB of WASM memory at init, and one agent of the
//! second wave allows only 16 MiB: its health check fails and it rolls itself back. That
//! crosses `--max-failures 0`: the rollout halts in that wave, the devices already on v2 get
//! the rollback deployment (v1's pipeline as version 3) and run it, and the devices of later
//! waves never see v2. Then a second canary rollout (its rollback taken from the group's
//! current version, v1) is paused between waves (no wave starts while paused), survives a
//! coordinator restart still paused, is resumed through the HTTP API, and finishes with every device on the new
//! version; a device that joins the group afterwards installs it. The halt and rollback run
//! again through mosquitto (an external broker keeps the retained per-device manifests).

use std::time::Duration;

use anyhow::{Result, ensure};
use edge_tests::api::{ApiClient, token_table};
use edge_tests::{
    Agent, AgentOptions, Coordinator, Event, Journal, Mosquitto, PipelineDir, SigningKey, TestEnv,
    deploy, run_test,
};

const WAIT: Duration = Duration::from_secs(90);
const DEVICES: [&str; 5] = ["cn-0", "cn-1", "cn-2", "cn-3", "cn-4"];
/// In the second wave (members go in id order: canary cn-0, then cn-1 and cn-2).
const FAILING: &str = "cn-2";

fn features(stream: &str) -> String {
    format!(
        r#"
name = "vibration"
[[source]]
name = "imu"
kind = "synthetic"
stream = "imu"
rate_hz = 40
window = 64
[[stage]]
name = "features"
module = "modules/features.wasm"
input = "imu"
config = {{ sample_rate_hz = 1000.0, bands = 4 }}
[[sink]]
kind = "outbox"
input = "features"
stream = "{stream}"
"#
    )
}

/// A pipeline whose stage needs 32 MiB of linear memory from its first call.
const HUNGRY: &str = r#"
name = "hungry"
[[source]]
name = "imu"
kind = "synthetic"
stream = "imu"
rate_hz = 40
window = 64
[[stage]]
name = "hog"
module = "modules/hog.wasm"
input = "imu"
config = { when = "init", max_mib = 32, chunk_kib = 1024 }
[[sink]]
kind = "outbox"
input = "hog"
stream = "hog"
"#;

fn telemetry_version(events: &[Event], device: &str) -> Option<u64> {
    events
        .iter()
        .rev()
        .find(|e| e.is_for("telemetry", device))
        .and_then(|e| e.raw.get("pipeline"))
        .and_then(|p| p.get("version"))
        .and_then(|v| v.as_u64())
}

fn decisions<'a>(events: &'a [Event], deployment: &str) -> Vec<&'a Event> {
    events
        .iter()
        .filter(|e| e.is("rollout_decision") && e.str_field("deployment_id") == Some(deployment))
        .collect()
}

fn devices_of(e: &Event) -> Vec<String> {
    e.raw
        .get("devices")
        .and_then(|d| d.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn canary_halts_on_a_failing_device_and_rolls_the_updated_back() {
    run_test("canary_rollout", scenario);
}

fn rollout(coord: &Coordinator, action: &str, id: &str) -> Result<std::process::Output> {
    Ok(std::process::Command::new(edge_tests::coordinator_bin()?)
        .args(["rollout", action, id, "--state-dir"])
        .arg(coord.state_dir())
        .output()?)
}

#[test]
fn canary_halt_and_rollback_through_mosquitto() {
    run_test("canary_mosquitto", |env| {
        let broker = Mosquitto::start(&env.path("mosquitto"))?;
        let coord = Coordinator::start_external(&env.path("coordinator"), &broker.url())?;
        let (agents, _, _) = halt_and_rollback(env, &coord, &broker.url())?;
        drop(agents);
        Ok(())
    });
}

const HEALTH: [&str; 6] = [
    "--health-messages",
    "3",
    "--health-seconds",
    "0",
    "--timeout-s",
    "180",
];

/// Five agents on v1, then v2 canary-first until the failing device halts it; checks the halt,
/// the rollback and the untouched later waves. Returns the agents, the journal and the key.
fn halt_and_rollback(
    env: &TestEnv,
    coord: &Coordinator,
    broker_url: &str,
) -> Result<(Vec<Agent>, Journal, SigningKey)> {
    let mut journal = coord.journal();
    let key = SigningKey::generate(&env.path("keys/deploy.key"))?;
    let mut agents = Vec::new();
    for d in DEVICES {
        let mut o = AgentOptions::new(d, broker_url);
        o.telemetry_interval_s = 1;
        o.trust_deployments(&key, &["lab"], 1000);
        if d == FAILING {
            let mut sandbox = toml::Table::new();
            sandbox.insert("max_memory_bytes".into(), toml::Value::Integer(16 << 20));
            o.extra
                .insert("sandbox".into(), toml::Value::Table(sandbox));
        }
        agents.push(Agent::start(&env.path(d), o)?);
    }
    for d in DEVICES {
        journal.wait_registered(d, WAIT)?;
    }
    let health = HEALTH;

    // v1 to the whole group at once.
    let v1 = PipelineDir::create(
        &env.path("v1"),
        &features("features"),
        &[("feature_extractor", "modules/features.wasm")],
    )?;
    let run = deploy(coord, &["--group", "lab"], &v1, &key, 1, &health)?;
    ensure!(
        run.success,
        "v1 rollout failed:\n{}\n{}",
        run.stdout,
        run.stderr
    );

    // v2, canary first; the failing device is in the second wave.
    let v2 = PipelineDir::create(
        &env.path("v2"),
        HUNGRY,
        &[("hostile_memory_hog", "modules/hog.wasm")],
    )?;
    let mut args = vec![
        "--group",
        "lab",
        "--strategy",
        "canary",
        "--canary",
        "1",
        "--batch",
        "2",
        "--soak-secs",
        "1",
        "--max-failures",
        "0",
        "--id",
        "hungry",
    ];
    let rollback_to = v1.toml.to_string_lossy().into_owned();
    args.extend(["--rollback-to", rollback_to.as_str()]);
    args.extend(health);
    let run = deploy(coord, &args[..4], &v2, &key, 2, &args[4..])?;
    ensure!(
        !run.success,
        "a halted rollout must fail the command:\n{}",
        run.stdout
    );
    ensure!(
        run.stderr.contains("halted") && run.stderr.contains("--max-failures 0"),
        "the error names the halt and its cause:\n{}",
        run.stderr
    );
    ensure!(
        run.outcome(FAILING)
            .is_some_and(|o| o.starts_with("rolled back")),
        "{FAILING}: {:?}\n{}",
        run.outcome(FAILING),
        run.stdout
    );
    ensure!(
        run.stdout.contains("not updated: cn-3, cn-4"),
        "later waves never started:\n{}",
        run.stdout
    );
    for d in ["cn-0", "cn-1"] {
        ensure!(
            run.stdout
                .contains(&format!("rollback {d}: back on the previous pipeline")),
            "{d} was updated and must be rolled back:\n{}",
            run.stdout
        );
    }

    // The journal: canary launched and passed, wave 1 launched, then halted with the updated
    // devices named.
    journal.refresh()?;
    let d = decisions(journal.events(), "hungry");
    let summary: Vec<(Option<&str>, Vec<String>)> = d
        .iter()
        .map(|e| (e.str_field("decision"), devices_of(e)))
        .collect();
    ensure!(
        summary.len() == 4
            && summary[0] == (Some("launched"), vec!["cn-0".to_owned()])
            && summary[1].0 == Some("gate_passed")
            && summary[2] == (Some("launched"), vec!["cn-1".to_owned(), "cn-2".to_owned()])
            && summary[3] == (Some("halted"), vec!["cn-0".to_owned(), "cn-1".to_owned()]),
        "unexpected decisions: {summary:?}"
    );
    // Every updated device runs the rollback (v1's pipeline, version 3); the failing one is on
    // v1 by its own rollback; the rest never left v1.
    journal.wait_for("every device back on v1's pipeline", WAIT, |j| {
        ["cn-0", "cn-1"]
            .iter()
            .all(|d| telemetry_version(j, d) == Some(3))
            && [FAILING, "cn-3", "cn-4"]
                .iter()
                .all(|d| telemetry_version(j, d) == Some(1))
    })?;
    for d in ["cn-3", "cn-4"] {
        ensure!(
            !journal
                .events()
                .iter()
                .any(|e| e.is_for("deploy", d) && e.str_field("deployment_id") == Some("hungry")),
            "{d} is outside the launched waves and must never see v2"
        );
    }

    Ok((agents, journal, key))
}

/// An admin token for the HTTP API, which resumes the paused rollout below.
const ADMIN: &str = "canary-admin-token-0123456789abcdef";

fn scenario(env: &TestEnv) -> Result<()> {
    let coord_dir = env.path("coordinator");
    std::fs::create_dir_all(&coord_dir)?;
    let config = coord_dir.join("api-coordinator.toml");
    let mut api = toml::Table::new();
    api.insert(
        "tokens".into(),
        toml::Value::Array(vec![token_table("ops", ADMIN, "admin").into()]),
    );
    let mut root = toml::Table::new();
    root.insert("api".into(), api.into());
    std::fs::write(&config, toml::to_string(&root)?)?;
    let mut coord = Coordinator::start_embedded_with_args(
        &coord_dir,
        vec!["--config".into(), config.display().to_string()],
    )?;
    let (mut agents, mut journal, key) = halt_and_rollback(env, &coord, &coord.url())?;
    let health = HEALTH;

    // A canary rollout paused after its canary: no wave starts until it is resumed; then it
    // finishes with every device on v4.
    let v4 = PipelineDir::create(
        &env.path("v4"),
        &features("features4"),
        &[("feature_extractor", "modules/features.wasm")],
    )?;
    let mut args: Vec<&str> = vec![
        "--strategy",
        "canary",
        "--canary",
        "1",
        "--batch",
        "50%",
        "--soak-secs",
        "5",
        "--max-failures",
        "1",
        "--id",
        "calm",
        "--no-wait",
    ];
    args.extend(health);
    let run = deploy(&coord, &["--group", "lab"], &v4, &key, 4, &args)?;
    ensure!(run.success, "spooling failed:\n{}", run.stderr);
    // Without --rollback-to the rollback is the group's current version: v1, still served
    // because the halted rollout never replaced it.
    ensure!(
        run.stderr.contains("rollback: group lab's current version")
            && run.stderr.contains("version 1"),
        "{}",
        run.stderr
    );
    journal.wait_for("the calm canary launched", WAIT, |j| {
        !decisions(j, "calm").is_empty()
    })?;
    let out = rollout(&coord, "pause", "calm")?;
    ensure!(
        out.status.success(),
        "pause failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    journal.wait_for("the canary healthy on v4", WAIT, |j| {
        telemetry_version(j, "cn-0") == Some(4)
    })?;
    journal.wait_for("the canary's gate passed", WAIT, |j| {
        decisions(j, "calm")
            .iter()
            .any(|e| e.str_field("decision") == Some("gate_passed"))
    })?;
    // Paused: the soak (5 s) passes and still nothing launches. Waiting longer than the soak
    // is the only way to show that something does not happen.
    std::thread::sleep(Duration::from_secs(7));
    journal.refresh()?;
    let launched = decisions(journal.events(), "calm")
        .iter()
        .filter(|e| e.str_field("decision") == Some("launched"))
        .count();
    ensure!(launched == 1, "a wave started while paused");
    // The coordinator restarts between waves: the rollout's waves, its pause and its
    // progress come back from its files.
    coord.restart()?;
    journal.wait_for("the rollout resumed after the restart", WAIT, |j| {
        j.iter().any(|e| {
            e.is("deployment_started")
                && e.str_field("deployment_id") == Some("calm")
                && e.raw.get("resumed").and_then(|v| v.as_bool()) == Some(true)
        })
    })?;
    let again = rollout(&coord, "pause", "calm")?;
    ensure!(
        again.status.success() && String::from_utf8_lossy(&again.stderr).contains("already paused"),
        "still paused after the restart: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    let bad = rollout(&coord, "abort", "no-such-rollout")?;
    ensure!(
        !bad.status.success()
            && String::from_utf8_lossy(&bad.stderr).contains("no rollout no-such-rollout"),
        "an unknown id is refused: {}",
        String::from_utf8_lossy(&bad.stderr)
    );
    // Resumed through the HTTP API: the same checks and control spool as the CLI; the
    // coordinator's local read token may not, an unknown id is a 404.
    let client = ApiClient::new(coord.api_url()?);
    let local = std::fs::read_to_string(coord.state_dir().join("api.token"))?;
    let read_only = client.post("/api/deployments/calm/resume", Some(local.trim()), "")?;
    ensure!(read_only.status == 403, "read token resumed: {read_only:?}");
    let unknown = client.post("/api/deployments/nope/resume", Some(ADMIN), "")?;
    ensure!(unknown.status == 404, "unknown rollout: {unknown:?}");
    let resumed = client.post("/api/deployments/calm/resume", Some(ADMIN), "")?;
    ensure!(
        resumed.status == 200 && resumed.json()?["changed"] == true,
        "resume through the API: {resumed:?}"
    );
    journal.wait_for("the calm rollout finished", Duration::from_secs(180), |j| {
        j.iter()
            .any(|e| e.is("deployment_finished") && e.str_field("deployment_id") == Some("calm"))
    })?;
    let finished = journal
        .events()
        .iter()
        .find(|e| e.is("deployment_finished") && e.str_field("deployment_id") == Some("calm"))
        .cloned();
    ensure!(
        finished
            .as_ref()
            .and_then(|e| e.str_field("reason"))
            .is_some_and(|r| r.contains("every wave passed")),
        "{finished:?}"
    );
    // v4 fits the failing device's memory limit: every device ends on it.
    journal.wait_for("every device on v4", WAIT, |j| {
        DEVICES.iter().all(|d| telemetry_version(j, d) == Some(4))
    })?;
    // A device that joins the group after the rollout gets the group's current version.
    let mut o = AgentOptions::new("cn-late", coord.url());
    o.telemetry_interval_s = 1;
    o.trust_deployments(&key, &["lab"], 1000);
    agents.push(Agent::start(&env.path("cn-late"), o)?);
    journal.wait_for("the late device on v4", WAIT, |j| {
        telemetry_version(j, "cn-late") == Some(4)
    })?;
    drop(agents);
    Ok(())
}
