//! The coordinator's HTTP API against a live coordinator with real agents: the device list
//! (filters, pages) and detail (telemetry history), enrollment decisions through the API,
//! `/metrics`, the journal query, `edge-coordinator devices` and `devices pending` while `serve`
//! runs, and what an outsider or a read-only operator gets: 401 without or with a wrong token,
//! 403 for an admin route with a read token, 413 for an oversized body, 400 naming the bad
//! field. Every operation in the live OpenAPI document answers (no "no such route", no 405).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use edge_tests::api::{Answer, ApiClient, start_with_tokens};
use edge_tests::{Agent, AgentOptions, TestEnv, coordinator_bin, run_test};

const WAIT: Duration = Duration::from_secs(60);
const DEVICES: [&str; 2] = ["api-a", "api-b"];
const READ: &str = "edge_read_token_for_the_api_test";
const ADMIN: &str = "edge_admin_token_for_the_api_test";

#[test]
fn the_api_serves_the_fleet_and_refuses_what_it_should() {
    run_test("api", scenario);
}

fn scenario(env: &TestEnv) -> Result<()> {
    let coord_dir = env.path("coordinator");
    let mut api = toml::Table::new();
    api.insert("max_body_bytes".into(), 2048.into());
    // One device gets per-device series, the other is counted as omitted.
    api.insert("metrics_max_devices".into(), 1.into());
    let coord = start_with_tokens(&coord_dir, "api-coordinator.toml", READ, ADMIN, api)?;
    let client = ApiClient::new(coord.api_url()?);

    let mut agents = Vec::new();
    for d in DEVICES {
        let mut opts = AgentOptions::new(d, coord.url());
        opts.telemetry_interval_s = 1;
        agents.push(Agent::start(&env.path(d), opts)?);
    }
    let mut journal = coord.journal();
    for d in DEVICES {
        journal.wait_registered(d, WAIT)?;
    }
    // Two telemetry samples from each: the history has more than one point.
    journal.wait_for("two telemetry samples per device", WAIT, |events| {
        DEVICES
            .iter()
            .all(|d| events.iter().filter(|e| e.is_for("telemetry", d)).count() >= 2)
    })?;

    auth(&client)?;
    let list = wait_json(
        &client,
        "/api/devices",
        "both devices online with telemetry",
        |v| {
            v["total"] == 2
                && v["devices"].as_array().is_some_and(|a| {
                    a.iter()
                        .all(|d| d["online"] == true && d["cpu_percent"].is_number())
                })
        },
    )?;
    ensure!(list["online"] == 2, "online count: {list}");
    let version = list["devices"][0]["agent_version"]
        .as_str()
        .context("agent_version")?
        .to_owned();
    ensure!(!version.is_empty(), "agent version empty: {list}");
    ensure!(list["versions"][&version] == 2, "versions: {list}");

    // Filters and pages, on the server.
    let page = get_ok(&client, "/api/devices?limit=1&offset=1")?;
    ensure!(
        page["total"] == 2
            && page["devices"].as_array().map(Vec::len) == Some(1)
            && page["devices"][0]["device"] == DEVICES[1],
        "second page: {page}"
    );
    let v = get_ok(
        &client,
        &format!("/api/devices?version={version}&state=accepted&online=true"),
    )?;
    ensure!(v["total"] == 2, "version/state filter: {v}");
    let v = get_ok(&client, "/api/devices?state=pending")?;
    ensure!(v["total"] == 0, "pending filter: {v}");
    let v = get_ok(&client, "/api/devices?group=no-such-group")?;
    ensure!(v["total"] == 0, "group filter: {v}");
    let v = get_ok(&client, "/api/devices?version=0.0.0-none")?;
    ensure!(v["total"] == 0, "version filter: {v}");

    // Detail: the latest telemetry as sent and a history of samples.
    let detail = wait_json(
        &client,
        &format!("/api/devices/{}", DEVICES[0]),
        "two history samples",
        |v| v["history"].as_array().is_some_and(|h| h.len() >= 2),
    )?;
    ensure!(
        detail["telemetry"]["body"]["mem_total_bytes"]
            .as_u64()
            .unwrap_or(0)
            > 0
            && detail["enrollment"]["state"] == "accepted"
            && detail["registration"].is_object(),
        "detail: {detail}"
    );
    let missing = client.get("/api/devices/nope", Some(READ))?;
    ensure!(
        missing.status == 404 && missing.body.contains("nope"),
        "unknown device: {missing:?}"
    );

    // Bad input, named.
    let bad = client.get("/api/devices?limit=abc", Some(READ))?;
    ensure!(
        bad.status == 400 && bad.body.contains("limit"),
        "bad limit: {bad:?}"
    );
    let bad = client.get("/api/devices?limit=5000", Some(READ))?;
    ensure!(
        bad.status == 400 && bad.body.contains("limit"),
        "limit too big: {bad:?}"
    );
    let bad = client.get("/api/devices?colour=red", Some(READ))?;
    ensure!(
        bad.status == 400 && bad.body.contains("colour"),
        "unknown parameter: {bad:?}"
    );
    let path = format!("/api/enrollment/{}/approve", DEVICES[0]);
    let bad = client.post(&path, Some(ADMIN), r#"{"groups": [7]}"#)?;
    ensure!(
        bad.status == 400 && bad.body.contains("groups"),
        "wrong field type: {bad:?}"
    );
    let bad = client.post(&path, Some(ADMIN), r#"{"groups": ["lab"], "force": true}"#)?;
    ensure!(
        bad.status == 400 && bad.body.contains("force"),
        "unknown field: {bad:?}"
    );
    let bad = client.post(&path, Some(ADMIN), r#"{"groups": ["lab"]"#)?;
    ensure!(bad.status == 400, "truncated JSON: {bad:?}");
    let big = format!(r#"{{"groups": ["{}"]}}"#, "g".repeat(4096));
    let bad = client.post(&path, Some(ADMIN), &big)?;
    ensure!(bad.status == 413, "oversized body: {bad:?}");
    let bad = client.post(
        "/api/fl/tasks",
        Some(ADMIN),
        r#"{"task_file": "/nonexistent/task.toml"}"#,
    )?;
    ensure!(
        bad.status == 400 && bad.body.contains("/nonexistent/task.toml"),
        "missing task file: {bad:?}"
    );
    // A file that is not a task file is named, but none of its lines comes back.
    let secret = env.path("not-a-task.txt");
    std::fs::write(&secret, "root:secret-hash:19000:0:99999:7:::\n")?;
    let body = serde_json::json!({ "task_file": secret }).to_string();
    let bad = client.post("/api/fl/tasks", Some(ADMIN), &body)?;
    ensure!(
        bad.status == 400
            && bad.body.contains("not-a-task.txt")
            && !bad.body.contains("secret-hash"),
        "a non-task file through the API: {bad:?}"
    );

    // An enrollment decision through the API, applied by serve.
    let revoke = client.post(
        &format!("/api/enrollment/{}/revoke", DEVICES[1]),
        Some(ADMIN),
        "",
    )?;
    ensure!(revoke.status == 200, "revoke: {revoke:?}");
    let v = get_ok(&client, "/api/devices?state=revoked")?;
    ensure!(
        v["total"] == 1 && v["devices"][0]["device"] == DEVICES[1],
        "revoked filter: {v}"
    );
    let revoked = get_ok(&client, "/api/enrollment?state=revoked")?;
    ensure!(
        revoked["records"][0]["device"] == DEVICES[1],
        "enrollment list: {revoked}"
    );
    let again = client.post(
        &format!("/api/enrollment/{}/reject", DEVICES[0]),
        Some(ADMIN),
        "{}",
    )?;
    ensure!(
        again.status == 409,
        "rejecting an enrolled device is refused by serve: {again:?}"
    );

    // The journal, by device and event.
    let lines = get_ok(
        &client,
        &format!("/api/journal?device={}&event=device_revoked", DEVICES[1]),
    )?;
    ensure!(
        lines["lines"].as_array().map(Vec::len) == Some(1),
        "journal query: {lines}"
    );
    let lines = get_ok(
        &client,
        &format!("/api/journal?device={}&event=telemetry&limit=1", DEVICES[0]),
    )?;
    ensure!(
        lines["lines"].as_array().map(Vec::len) == Some(1) && lines["truncated"] == true,
        "bounded journal query: {lines}"
    );
    let lines = get_ok(
        &client,
        "/api/journal?event=telemetry&since_ms=1&until_ms=2",
    )?;
    ensure!(
        lines["lines"].as_array().is_some_and(Vec::is_empty),
        "time range: {lines}"
    );

    // Deployments and federated tasks: none yet, and the lists say so.
    ensure!(
        get_ok(&client, "/api/deployments")?["rollouts"]
            .as_array()
            .is_some_and(Vec::is_empty)
    );
    ensure!(
        get_ok(&client, "/api/fl/tasks")?["tasks"]
            .as_array()
            .is_some_and(Vec::is_empty)
    );
    let offload = get_ok(&client, "/api/offload")?;
    ensure!(offload["enabled"] == false, "offload: {offload}");

    // Prometheus.
    let metrics = client.get("/metrics", Some(READ))?;
    ensure!(metrics.status == 200, "metrics: {metrics:?}");
    for needle in [
        "edge_devices{state=\"accepted\",online=\"true\"} 1",
        "edge_devices{state=\"revoked\",",
        "edge_messages_total{class=\"telemetry\",topic=\"telemetry\"}",
        &format!("edge_device_cpu_percent{{device=\"{}\"}}", DEVICES[0]),
        "edge_device_series_omitted 1",
    ] {
        ensure!(
            metrics.body.contains(needle),
            "/metrics lacks {needle}:\n{}",
            metrics.body
        );
    }
    ensure!(
        !metrics.body.contains(&format!("device=\"{}\"", DEVICES[1])),
        "per-device series beyond metrics_max_devices:\n{}",
        metrics.body
    );

    // The CLI's device table comes from the running serve's API.
    let out = Command::new(coordinator_bin()?)
        .args(["devices", "--state-dir"])
        .arg(coord.state_dir())
        .output()
        .context("cannot run edge-coordinator devices")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success()
            && DEVICES.iter().all(|d| stdout.contains(d))
            && stdout.contains("revoked"),
        "devices while serve runs: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // So does `devices pending` (nothing pending: both devices enrolled by their claims).
    let out = Command::new(coordinator_bin()?)
        .args(["devices", "pending", "--state-dir"])
        .arg(coord.state_dir())
        .output()
        .context("cannot run edge-coordinator devices pending")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success()
            && stdout.contains("no enrollment requests pending in the running coordinator"),
        "devices pending while serve runs: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    openapi_routes_answer(&client)?;
    drop(agents);
    Ok(())
}

/// 401 without a token or with a wrong one (and the Bearer challenge), 403 for admin routes
/// with a read token.
fn auth(client: &ApiClient) -> Result<()> {
    let none = client.get("/api/devices", None)?;
    ensure!(
        none.status == 401
            && none.www_authenticate.as_deref() == Some("Bearer")
            && none.body.contains("missing bearer token"),
        "no token: {none:?}"
    );
    let wrong = client.get("/api/devices", Some("edge_not_a_token"))?;
    ensure!(
        wrong.status == 401 && wrong.body.contains("unknown"),
        "wrong token: {wrong:?}"
    );
    let metrics = client.get("/metrics", None)?;
    ensure!(
        metrics.status == 401,
        "metrics without a token: {metrics:?}"
    );
    let forbidden = client.post(
        &format!("/api/enrollment/{}/revoke", DEVICES[0]),
        Some(READ),
        "",
    )?;
    ensure!(
        forbidden.status == 403
            && forbidden.body.contains("viewer")
            && forbidden.body.contains("admin"),
        "read token on an admin route: {forbidden:?}"
    );
    let forbidden = client.post("/api/fl/tasks", Some(READ), "{}")?;
    ensure!(
        forbidden.status == 403,
        "read token starting a task: {forbidden:?}"
    );
    Ok(())
}

/// Every operation in the served document reaches a handler.
fn openapi_routes_answer(client: &ApiClient) -> Result<()> {
    let doc = get_ok(client, "/api/openapi.json")?;
    ensure!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "not OpenAPI 3"
    );
    let paths = doc["paths"].as_object().context("no paths")?;
    ensure!(paths.len() >= 12, "few paths: {:?}", paths.keys());
    for (path, item) in paths {
        let concrete = path.replace("{id}", "no-such-thing");
        for method in item.as_object().context("path item")?.keys() {
            let answer: Answer = match method.as_str() {
                "get" => client.get(&concrete, Some(ADMIN))?,
                "post" => client.post(&concrete, Some(ADMIN), "{}")?,
                other => bail!("unexpected method {other} for {path}"),
            };
            ensure!(
                answer.status != 405 && !answer.body.contains("no such route"),
                "{method} {path} is documented but not served: {answer:?}"
            );
        }
    }
    let undocumented = client.get("/api/nothing-here", Some(READ))?;
    ensure!(
        undocumented.status == 404 && undocumented.body.contains("no such route"),
        "unknown route: {undocumented:?}"
    );
    Ok(())
}

fn get_ok(client: &ApiClient, path: &str) -> Result<serde_json::Value> {
    let a = client.get(path, Some(READ))?;
    ensure!(a.status == 200, "GET {path}: {a:?}");
    a.json()
}

/// Polls `path` until `pred` holds (the view follows the journal by one batch).
fn wait_json(
    client: &ApiClient,
    path: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = get_ok(client, path)?;
        if pred(&v) {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("waiting for {what} at {path}: last answer {v}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
