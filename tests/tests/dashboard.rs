//! The web dashboard in a real headless Chromium against a live coordinator with real agents:
//! two agents train a federated task (started through the API) and then take a signed
//! deployment; each page (fleet overview, device, rollout, federated task) is loaded, its DOM
//! checked for the devices and figures the API holds after the page's script ran, and a
//! screenshot saved under `target/dashboard/`.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use edge_testmodels::onnx_builder;
use edge_tests::api::{ApiClient, start_with_tokens};
use edge_tests::browser::{Browser, screenshot_dir};
use edge_tests::digits::Split;
use edge_tests::{
    Agent, AgentOptions, FEATURES_MODULE, FL_GROUP, FlTask, PipelineDir, SigningKey, TestEnv,
    deploy, features_pipeline, federated_agent, federated_data, run_test, task_finished,
};

const WAIT: Duration = Duration::from_secs(120);
const DEVICES: [&str; 2] = ["dash-a", "dash-b"];
const READ: &str = "edge_dashboard_read_token";
const ADMIN: &str = "edge_dashboard_admin_token";
const TASK: &str = "dash-digits";
const ROUNDS: u32 = 3;

#[test]
fn the_dashboard_shows_the_fleet_in_a_browser() {
    run_test("dashboard", scenario);
}

fn scenario(env: &TestEnv) -> Result<()> {
    let coord_dir = env.path("coordinator");
    let coord = start_with_tokens(
        &coord_dir,
        "dashboard-coordinator.toml",
        READ,
        ADMIN,
        toml::Table::new(),
    )?;
    let base = coord.api_url()?;
    let client = ApiClient::new(&base);
    let mut journal = coord.journal();
    let key = SigningKey::generate(&env.path("keys/deploy.key"))?;

    let task_dir = env.path("task");
    let model = onnx_builder::mlp(&onnx_builder::mlp_layers(&[64, 32, 10], 1));
    let (d, shards) = federated_data(&task_dir, DEVICES.len(), Split::Iid, &model)?;
    let mut agents = Vec::new();
    for (device, shard) in DEVICES.iter().zip(&shards) {
        let mut o = AgentOptions::new(*device, coord.url());
        o.telemetry_interval_s = 1;
        federated_agent(
            &mut o,
            &env.path(&format!("pipelines/{device}")),
            &d,
            shard,
            &model,
            &key,
        )?;
        agents.push(Agent::start(&env.path(device), o)?);
    }
    for device in DEVICES {
        journal.wait_registered(device, WAIT)?;
    }

    // The federated task, started through the API as an operator's script would.
    let task = FlTask::new(TASK, ROUNDS, DEVICES.len());
    let task_file = task_dir.join(format!("{TASK}.toml"));
    std::fs::write(&task_file, task.to_toml())?;
    let body = serde_json::json!({ "task_file": task_file }).to_string();
    let started = client.post("/api/fl/tasks", Some(ADMIN), &body)?;
    ensure!(
        started.status == 201,
        "fl start through the API: {started:?}"
    );
    journal.wait_for("the federated task finished", WAIT * 2, |j| {
        task_finished(j, TASK)
    })?;

    // Then a signed deployment to the group, for the rollout page.
    let pipeline = PipelineDir::create(
        &env.path("deploy-v1"),
        &features_pipeline("vibration", "raw"),
        &[FEATURES_MODULE],
    )?;
    let run = deploy(
        &coord,
        &["--group", FL_GROUP],
        &pipeline,
        &key,
        1,
        &[
            "--health-messages",
            "5",
            "--health-seconds",
            "0",
            "--timeout-s",
            "120",
        ],
    )?;
    ensure!(
        run.success,
        "deployment failed:\n{}\n{}",
        run.stdout,
        run.stderr
    );
    let rollouts = client.get("/api/deployments", Some(READ))?.json()?;
    let rollout = rollouts["rollouts"][0]["deployment_id"]
        .as_str()
        .context("no rollout in the API")?
        .to_owned();
    // Two telemetry samples with the deployed pipeline's stage, for the stage rate.
    journal.wait_for("telemetry from the deployed pipeline", WAIT, |events| {
        DEVICES.iter().all(|d| {
            events
                .iter()
                .filter(|e| {
                    e.is_for("telemetry", d)
                        && e.raw
                            .get("pipeline")
                            .and_then(|p| p.get("name"))
                            .and_then(|n| n.as_str())
                            == Some("vibration")
                })
                .count()
                >= 2
        })
    })?;

    let browser = Browser::new(&env.path("chromium-profile"))?;
    let shots = screenshot_dir();
    let page = |route: &str| format!("{base}/#{route}?token={READ}");

    // Fleet overview: both devices online, the version, nobody needing attention.
    let dom = browser.dom(&page("/"))?;
    ensure!(
        dom.contains("data-ready=\"1\""),
        "the overview never finished rendering:\n{dom}"
    );
    for needle in [
        r#"id="device-count">2<"#,
        r#"id="online-count">2<"#,
        r#"id="attention-count">0<"#,
        r#"data-device="dash-a""#,
        r#"data-device="dash-b""#,
        r#"data-version="0.1.0""#,
    ] {
        ensure!(dom.contains(needle), "overview lacks {needle}:\n{dom}");
    }
    browser.screenshot(&page("/"), &shots.join("overview.png"))?;

    // Device page: charts from the telemetry history, the pipeline's stage with a rate.
    let device_page = page(&format!("/device/{}", DEVICES[0]));
    let dom = browser.dom(&device_page)?;
    ensure!(
        dom.contains(r#"id="device-name">dash-a<"#),
        "device page:\n{dom}"
    );
    for chart in ["chart-cpu", "chart-mem", "chart-outbox"] {
        let points = svg_points(&dom, chart).with_context(|| format!("no {chart} in:\n{dom}"))?;
        ensure!(points >= 2, "{chart} plots {points} points");
    }
    ensure!(
        dom.contains(r#"data-stage="features""#),
        "no stage row for features:\n{dom}"
    );
    browser.screenshot(&device_page, &shots.join("device.png"))?;

    // Rollout page: both devices healthy.
    let rollout_page = page(&format!("/rollout/{rollout}"));
    let dom = browser.dom(&rollout_page)?;
    ensure!(
        dom.contains(r#"id="rollout-healthy">2<"#),
        "rollout page:\n{dom}"
    );
    for device in DEVICES {
        ensure!(
            dom.contains(&format!(r#"data-device="{device}" data-outcome="healthy""#)),
            "rollout page lacks {device} healthy:\n{dom}"
        );
    }
    browser.screenshot(&rollout_page, &shots.join("rollout.png"))?;

    // Federated task page: one accuracy point and one upload bar per round.
    let task_page = page(&format!("/fl/{TASK}"));
    let dom = browser.dom(&task_page)?;
    ensure!(
        dom.contains(&format!(r#"id="task-rounds">{ROUNDS}/{ROUNDS}<"#)),
        "task page:\n{dom}"
    );
    let accuracy = svg_points(&dom, "chart-accuracy").context("no accuracy chart")?;
    ensure!(
        accuracy >= ROUNDS as usize,
        "accuracy chart has {accuracy} points"
    );
    let bytes = svg_points(&dom, "chart-bytes").context("no bytes chart")?;
    ensure!(bytes == ROUNDS as usize, "bytes chart has {bytes} bars");
    for r in 1..=ROUNDS {
        ensure!(
            dom.contains(&format!(r#"data-round="{r}""#)),
            "no row for round {r}"
        );
    }
    browser.screenshot(&task_page, &shots.join("fl-task.png"))?;

    // Without a token the page says what it needs instead of showing data.
    let dom = browser.dom(&format!("{base}/#/"))?;
    ensure!(
        dom.contains("missing bearer token") && !dom.contains(r#"data-device="dash-a""#),
        "the dashboard without a token:\n{dom}"
    );
    drop(agents);
    Ok(())
}

/// The `data-points` of the SVG with this id.
fn svg_points(dom: &str, id: &str) -> Option<usize> {
    let at = dom.find(&format!(r#"<svg id="{id}" data-points=""#))?;
    let rest = &dom[at..];
    let start = rest.find("data-points=\"")? + "data-points=\"".len();
    rest[start..].split('"').next()?.parse().ok()
}
