//! Deployments created through the HTTP API: `edge-coordinator deploy ... --out FILE` signs a
//! package file offline, `POST /api/deployments` uploads it to a running coordinator that holds
//! no signing key, two real agents install and run the new version, and
//! `GET /api/deployments/{id}` shows it. Refused, each with its cause named and nothing
//! spooled: garbage, a truncated file, a tampered artifact, a broken signature, an unknown
//! signer, an unknown target device, a body over `[api] max_upload_bytes` (413), a read token
//! (403), canary without a rollback package, a second upload of the same id (409). Then
//! `edge-coordinator deploy --strategy canary` with an admin token uploads through the API
//! itself and follows the rollout there (a read token is refused).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use edge_tests::api::{ApiClient, start_with_tokens};
use edge_tests::{
    Agent, AgentOptions, Coordinator, FEATURES_MODULE, PipelineDir, SigningKey, TestEnv,
    coordinator_bin, features_pipeline, run_test,
};

const WAIT: Duration = Duration::from_secs(120);
const DEVICES: [&str; 2] = ["upl-a", "upl-b"];
const READ: &str = "edge_read_token_for_the_upload_test";
const ADMIN: &str = "edge_admin_token_for_the_upload_test";
/// Above the feature extractor module (~190 KB), below what the oversized body sends.
const MAX_UPLOAD: i64 = 1024 * 1024;

#[test]
fn a_package_signed_offline_deploys_through_the_api() {
    run_test("api_deploy", scenario);
}

fn scenario(env: &TestEnv) -> Result<()> {
    let key = SigningKey::generate(&env.path("keys/deploy.key"))?;
    let stranger = SigningKey::generate(&env.path("keys/stranger.key"))?;
    let coord_dir = env.path("coordinator");
    let mut api = toml::Table::new();
    api.insert("max_upload_bytes".into(), MAX_UPLOAD.into());
    api.insert(
        "deploy_keys".into(),
        toml::Value::Array(vec![key.public_hex.clone().into()]),
    );
    let coord = start_with_tokens(&coord_dir, "upload-coordinator.toml", READ, ADMIN, api)?;
    let client = ApiClient::new(coord.api_url()?);
    let mut agents = Vec::new();
    for d in DEVICES {
        let mut o = AgentOptions::new(d, coord.url());
        o.telemetry_interval_s = 1;
        o.trust_deployments(&key, &["lab"], 1000);
        agents.push(Agent::start(&env.path(d), o)?);
    }
    let mut journal = coord.journal();
    for d in DEVICES {
        journal.wait_registered(d, WAIT)?;
    }

    let v1 = PipelineDir::create(
        &env.path("v1"),
        &features_pipeline("uploaded", "imu"),
        &[FEATURES_MODULE],
    )?;
    let good = package(&coord, env, "good", &["--group", "lab"], &v1, &key, &[])?;
    let file = std::fs::read(&good)?;

    // Refusals, each naming its cause.
    let refused = |what: &str, body: &[u8], status: u16, needle: &str| -> Result<()> {
        let a = client.post_bytes("/api/deployments", Some(ADMIN), body)?;
        ensure!(
            a.status == status && a.body.contains(needle),
            "{what}: expected {status} naming {needle:?}, got {a:?}"
        );
        Ok(())
    };
    refused("garbage", b"{\"hello\": 1}", 400, "EDGEPKG1")?;
    refused("empty", b"", 400, "EDGEPKG1")?;
    refused("truncated", &file[..file.len() - 100], 400, "truncated")?;
    let mut tampered = file.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x55;
    refused("tampered artifact", &tampered, 422, "feature")?;
    refused("tampered artifact", &tampered, 422, "sha256")?;
    refused(
        "broken signature",
        &break_signature(&file)?,
        422,
        "bad signature",
    )?;
    let foreign = package(
        &coord,
        env,
        "stranger",
        &["--group", "lab"],
        &v1,
        &stranger,
        &[],
    )?;
    refused(
        "unknown signer",
        &std::fs::read(&foreign)?,
        422,
        "unknown key",
    )?;
    let nobody = package(
        &coord,
        env,
        "nobody",
        &["--device", "no-such-device"],
        &v1,
        &key,
        &[],
    )?;
    refused(
        "unknown device",
        &std::fs::read(&nobody)?,
        422,
        "no-such-device",
    )?;
    let oversized = vec![0u8; MAX_UPLOAD as usize + 1];
    refused("oversized", &oversized, 413, "max_upload_bytes")?;
    refused("oversized", &oversized, 413, &MAX_UPLOAD.to_string())?;
    let a = client.post_bytes("/api/deployments", Some(READ), &file)?;
    ensure!(
        a.status == 403 && a.body.contains("admin"),
        "read token: {a:?}"
    );
    let a = client.post_bytes("/api/deployments?strategy=canary", Some(ADMIN), &file)?;
    ensure!(
        a.status == 400 && a.body.contains("rollback"),
        "canary without rollback: {a:?}"
    );
    let a = client.post_bytes("/api/deployments?batch=5", Some(ADMIN), &file)?;
    ensure!(
        a.status == 400 && a.body.contains("batch"),
        "wave parameter without canary: {a:?}"
    );
    let spool = coord.state_dir().join("deploy/spool");
    let rollouts = coord.state_dir().join("deploy/rollouts");
    ensure!(
        entries(&spool)?.is_empty() && entries(&rollouts)?.is_empty(),
        "a refused upload left something: spool {:?}, rollouts {:?}",
        entries(&spool)?,
        entries(&rollouts)?
    );

    // The good package: 201, then the agents run it.
    let a = client.post_bytes("/api/deployments", Some(ADMIN), &file)?;
    ensure!(a.status == 201, "upload: {a:?}");
    let created = a.json()?;
    let id = created["deployment_id"]
        .as_str()
        .context("deployment_id")?
        .to_owned();
    ensure!(
        created["version"] == 1 && created["target"] == "group lab" && created["strategy"] == "all",
        "created: {created}"
    );
    let again = client.post_bytes("/api/deployments", Some(ADMIN), &file)?;
    ensure!(
        again.status == 409 && again.body.contains(&id),
        "second upload: {again:?}"
    );
    let deadline = Instant::now() + WAIT;
    let rollout = loop {
        let a = client.get(&format!("/api/deployments/{id}"), Some(READ))?;
        if a.status == 200 {
            let v = a.json()?;
            if v["healthy"] == 2 {
                break v;
            }
            ensure!(
                v["failed"] == 0,
                "a device failed the uploaded deployment: {v}"
            );
        }
        if Instant::now() > deadline {
            bail!("deployment {id} not healthy on both devices: last answer {a:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let devices: Vec<&str> = rollout["devices"]
        .as_array()
        .context("devices")?
        .iter()
        .filter_map(|d| d["device"].as_str())
        .collect();
    ensure!(devices == DEVICES, "rollout devices: {rollout}");
    // Each agent reports version 1 of the pipeline in its telemetry.
    journal.wait_for("both agents on version 1", WAIT, |events| {
        DEVICES.iter().all(|d| {
            events
                .iter()
                .rev()
                .find(|e| e.is_for("telemetry", d))
                .and_then(|e| e.raw.get("pipeline"))
                .and_then(|p| p.get("version"))
                .and_then(|v| v.as_u64())
                == Some(1)
        })
    })?;

    // `deploy` with an admin token goes through the API, here as a canary rollout (its
    // rollback package signed into the upload), and follows it there to the end.
    let v2 = PipelineDir::create(
        &env.path("v2"),
        &features_pipeline("uploaded-v2", "imu"),
        &[FEATURES_MODULE],
    )?;
    let through_api = |token: &str| {
        Command::new(coordinator_bin()?)
            .args(["deploy", "--group", "lab"])
            .arg(&v2.toml)
            .arg("--key")
            .arg(&key.path)
            .args([
                "--version",
                "2",
                "--health-messages",
                "20",
                "--health-seconds",
                "0",
            ])
            .args(["--strategy", "canary", "--canary", "1", "--batch", "50%"])
            .args(["--soak-secs", "0", "--timeout-s", "120", "--rollback-to"])
            .arg(&v1.toml)
            .arg("--state-dir")
            .arg(coord.state_dir())
            .env("EDGE_API_TOKEN", token)
            .output()
            .context("cannot run edge-coordinator deploy")
    };
    let run = through_api(READ)?;
    let stderr = String::from_utf8_lossy(&run.stderr);
    ensure!(
        !run.status.success() && stderr.contains("admin") && stderr.contains("403"),
        "deploy with a read token: {stderr}"
    );
    let run = through_api(ADMIN)?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr),
    );
    ensure!(
        run.status.success()
            && stderr.contains("uploaded through the API")
            && DEVICES
                .iter()
                .all(|d| stdout.contains(&format!("{d}: healthy"))),
        "deploy through the API:\n{stdout}\n{stderr}"
    );
    ensure!(
        entries(&spool)?.is_empty(),
        "the API upload left the spool: {:?}",
        entries(&spool)?
    );
    drop(agents);
    Ok(())
}

/// `edge-coordinator deploy TARGET PIPELINE --key K --version 1 --out FILE`: the package file.
fn package(
    coord: &Coordinator,
    env: &TestEnv,
    name: &str,
    target: &[&str],
    pipeline: &PipelineDir,
    key: &SigningKey,
    args: &[&str],
) -> Result<PathBuf> {
    let out = env.path(&format!("{name}.edgepkg"));
    let run = Command::new(coordinator_bin()?)
        .arg("deploy")
        .args(target)
        .arg(&pipeline.toml)
        .arg("--key")
        .arg(&key.path)
        .args([
            "--version",
            "1",
            "--health-messages",
            "20",
            "--health-seconds",
            "0",
        ])
        .arg("--id")
        .arg(format!("upload-{name}"))
        .arg("--state-dir")
        .arg(coord.state_dir())
        .arg("--out")
        .arg(&out)
        .args(args)
        .output()
        .context("cannot run edge-coordinator deploy --out")?;
    ensure!(
        run.status.success(),
        "deploy --out failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    Ok(out)
}

/// The file with one hex digit of the manifest's signature changed.
fn break_signature(file: &[u8]) -> Result<Vec<u8>> {
    let marker = b"\"signature\":\"";
    let at = file
        .windows(marker.len())
        .position(|w| w == marker)
        .context("no signature in the package file")?
        + marker.len();
    let mut out = file.to_vec();
    out[at] = if out[at] == b'0' { b'1' } else { b'0' };
    Ok(out)
}

fn entries(dir: &Path) -> Result<Vec<String>> {
    match std::fs::read_dir(dir) {
        Ok(rd) => Ok(rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("cannot list {}", dir.display())),
    }
}
