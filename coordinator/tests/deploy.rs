//! Signed deployments end to end: the real coordinator binary with its embedded broker, and
//! raw MQTT clients playing enrolled devices (they decide each rollout's outcome). A group's
//! members are the devices enrolled in it; what a registration says about groups is ignored.
//!
//! - a group rollout: retained manifest (also for a device that connects later, and after a
//!   coordinator restart), chunks, an invalid and a valid resend request, duplicate statuses,
//!   the journal and the progress file;
//! - the `deploy` command against a running `serve`: exit code and final lines for a healthy
//!   and a rolled-back device, and its message when no `serve` picks the deployment up.
//!
//! Every wait is on an event (journal line, progress file, MQTT message, exit) with a deadline.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use edge_coordinator::deploy::package::{self, PackageSpec};
use edge_coordinator::deploy::{progress::ProgressFile, spool};
use protocol::v1::deploy::{
    Chunk, DeployKind, DeployStatus, HealthCheck, MissingChunks, ResendRequest, SignedManifest,
    SigningKey, Step, Target, sha256_hex,
};
use protocol::v1::topics::DeployTopic;
use protocol::v1::{Class, Envelope, Registration, VERSION, message_id, topics};
use rumqttc::{Client, Event, MqttOptions, Packet, Publish, QoS};
use serde_json::Value;

mod common;
use common::{Coordinator, DeviceAuth, POLL, TIMEOUT};
/// The test artifact: 10 chunks of 1 KiB.
const MODULE_BYTES: usize = 10 * 1024;
const CHUNK_SIZE: u32 = 1024;

impl Coordinator {
    /// Polls the journal until `done` holds, or fails with the journal and the log.
    fn wait_journal(&self, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let lines = journal(&self.journal_path());
            if done(&lines) {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; journal:\n{}\nlog:\n{}",
                lines
                    .iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join("\n"),
                self.log_text()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Waits for the n-th `ready` line and returns the broker's port.
    fn wait_ready(&self, n: usize) -> u16 {
        let lines = self.wait_journal("ready", |l| count(l, |x| x["event"] == "ready") == n);
        let url = lines
            .iter()
            .rev()
            .find(|l| l["event"] == "ready")
            .and_then(|l| l["broker"].as_str())
            .expect("ready line names the broker")
            .to_owned();
        url.rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port")
    }

    fn wait_progress(
        &self,
        id: &str,
        what: &str,
        done: impl Fn(&ProgressFile) -> bool,
    ) -> ProgressFile {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let p = spool::read_progress(&self.state, id).expect("progress readable");
            if let Some(p) = p.filter(|p| done(p)) {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(POLL);
        }
    }
}

fn journal(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn count(lines: &[Value], pred: impl Fn(&Value) -> bool) -> usize {
    lines.iter().filter(|l| pred(l)).count()
}

/// A device: subscribed to its deployment topics (clean session, like the agent), every
/// received publish forwarded to a channel.
struct Device {
    id: String,
    client: Client,
    rx: mpsc::Receiver<Publish>,
    /// Like the agent's outbox incarnation: new per connection here, so ids never repeat.
    incarnation: u64,
    seq: u64,
    auth: std::sync::Arc<DeviceAuth>,
}

impl Device {
    /// Enrolls `id` in `groups` (a device enrolled before keeps its groups) and connects,
    /// subscribed to its own and `subscribed` groups' deployment topics.
    fn connect(port: u16, id: &str, groups: &[&str], subscribed: &[&str]) -> Device {
        let auth = DeviceAuth::enroll(port, id, groups);
        let mut options = MqttOptions::new(
            format!("dev-{id}-{}", protocol::v1::now_ms()),
            "127.0.0.1",
            port,
        );
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_clean_session(true)
            .set_max_packet_size(512 * 1024, 512 * 1024);
        let (client, mut connection) = Client::new(options, 256);
        let subscribed: Vec<String> = subscribed.iter().map(|g| (*g).to_owned()).collect();
        for filter in topics::agent_deploy_filters(id, &subscribed) {
            client
                .subscribe(filter, QoS::AtLeastOnce)
                .expect("subscribe queued");
        }
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send(p).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // The coordinator stopped or the test dropped us: this device is done.
                    Err(_) => return,
                }
            }
        });
        Device {
            id: id.to_owned(),
            client,
            rx,
            incarnation: protocol::v1::now_ms() ^ u64::from(std::process::id()) << 40,
            seq: 0,
            auth,
        }
    }

    fn envelope<B: serde::Serialize>(&mut self, body: B) -> (String, Vec<u8>) {
        self.seq += 1;
        let id = message_id(self.incarnation, self.seq);
        let env = Envelope {
            v: VERSION,
            id: id.clone(),
            device: self.id.clone(),
            class: Class::Control,
            seq: self.seq,
            prev: None,
            created_ms: protocol::v1::now_ms(),
            body,
        };
        (id, env.to_json())
    }

    /// Publishes `payload` sealed as the agent's uplink does (a resend gets a new counter).
    fn publish(&self, topic: String, payload: Vec<u8>) {
        let sealed = self.auth.seal(&topic, &payload);
        self.client
            .publish(topic, QoS::AtLeastOnce, false, sealed)
            .expect("queued");
    }

    fn register(&mut self, groups: &[&str]) {
        let (_, payload) = self.envelope(Registration {
            agent_version: "0.1.0".into(),
            hostname: self.id.clone(),
            os: "linux".into(),
            arch: "aarch64".into(),
            boot_id: format!("boot-{}", self.id),
            started_ms: 1,
            capabilities: vec!["deploy".into()],
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            inference: Default::default(),
        });
        self.publish(topics::register(&self.id), payload);
    }

    /// Sends a status; returns its envelope (to send again as a duplicate).
    fn status(&mut self, deployment_id: &str, version: u64, step: Step) -> Vec<u8> {
        let (_, payload) = self.envelope(DeployStatus {
            deployment_id: deployment_id.into(),
            version,
            step,
            chunks_dropped: 0,
        });
        self.publish(topics::deploy_status(&self.id), payload.clone());
        payload
    }

    fn resend(&mut self, deployment_id: &str, sha256: &str, indexes: Vec<u32>) {
        let (_, payload) = self.envelope(ResendRequest {
            deployment_id: deployment_id.into(),
            artifacts: vec![MissingChunks {
                sha256: sha256.into(),
                indexes,
            }],
        });
        self.publish(topics::deploy_resend(&self.id), payload);
    }

    /// The next message on `topic` (others are skipped), within the deadline.
    fn next_on(&self, topic: &str) -> Publish {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(p) if p.topic == topic => return p,
                Ok(_) => {}
                Err(e) => panic!("{}: nothing on {topic}: {e}", self.id),
            }
        }
    }

    /// The next non-empty manifest on `topic`.
    fn manifest(&self, topic: &str) -> protocol::v1::deploy::Manifest {
        loop {
            let p = self.next_on(topic);
            if p.payload.is_empty() {
                continue;
            }
            let signed = SignedManifest::from_json(&p.payload).expect("signed manifest");
            return signed.peek_unverified().expect("manifest json");
        }
    }

    /// `n` chunks from `topic`, by index.
    fn chunks(&self, topic: &str, n: usize) -> BTreeMap<u32, Chunk> {
        let mut out = BTreeMap::new();
        for _ in 0..n {
            let c = Chunk::decode(&self.next_on(topic).payload).expect("chunk decodes");
            out.insert(c.index, c);
        }
        out
    }

    /// The `n` chunks of one artifact from any of `topics` (a device's own and its group's
    /// chunk topic), by index; repeats are skipped.
    fn chunks_any(&self, topics: &[String], n: usize) -> BTreeMap<u32, Chunk> {
        let deadline = Instant::now() + TIMEOUT;
        let mut out = BTreeMap::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(p) if topics.contains(&p.topic) => {
                    let c = Chunk::decode(&p.payload).expect("chunk decodes");
                    out.insert(c.index, c);
                }
                Ok(_) => {}
                Err(e) => panic!(
                    "{}: {} of {n} chunks on {topics:?}: {e}",
                    self.id,
                    out.len()
                ),
            }
        }
        out
    }

    /// Chunk messages already received and not yet read.
    fn pending_chunks(&self) -> usize {
        self.rx
            .try_iter()
            .filter(|p| p.topic.ends_with("/deploy/chunk"))
            .count()
    }
}

fn module_bytes() -> Vec<u8> {
    (0..MODULE_BYTES).map(|i| (i * 7 % 251) as u8).collect()
}

/// A pipeline description naming one module, written to `dir`.
fn write_pipeline(dir: &Path) -> PathBuf {
    std::fs::write(dir.join("stage.wasm"), module_bytes()).expect("module");
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, "[[stages]]\nname = \"f\"\nmodule = \"stage.wasm\"\n").expect("pipeline");
    path
}

fn spool_group_deployment(dir: &Path, state: &Path, id: &str, group: &str) -> package::Package {
    let pkg = package::load(
        &write_pipeline(dir),
        PackageSpec {
            deployment_id: id.into(),
            target: Target::Group(group.into()),
            version: 7,
            now_ms: protocol::v1::now_ms(),
            ttl_ms: 3_600_000,
            kind: DeployKind::Pipeline,
            pipeline_toml: None,
            chunk_size: CHUNK_SIZE,
            health: HealthCheck {
                messages: 1,
                seconds: 0,
            },
        },
        &SigningKey::from_bytes(&[42; 32]),
    )
    .expect("package builds");
    spool::write_spool(state, &pkg).expect("spooled");
    pkg
}

#[test]
fn group_rollout_with_resends_duplicates_and_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = Coordinator::start(dir.path());
    let port = coordinator.wait_ready(1);

    let mut d1 = Device::connect(port, "d1", &["lab"], &["lab"]);
    d1.register(&[]);
    // d2 is a registered member that is offline when the deployment starts.
    let mut d2 = Device::connect(port, "d2", &["lab"], &[]);
    d2.register(&[]);
    // d3 says it is in lab, but its enrollment put it in no group: not a member.
    let mut d3 = Device::connect(port, "d3", &[], &[]);
    d3.register(&["lab"]);
    coordinator.wait_journal("the registrations", |l| {
        count(l, |x| x["event"] == "registered") == 3
    });
    drop(d2);
    drop(d3);

    let id = "dep-e2e-1";
    let pkg = spool_group_deployment(dir.path(), &coordinator.state, id, "lab");
    let sha = pkg.manifest.artifacts[0].sha256.clone();

    // The retained manifest and every chunk once, on the group topics.
    let manifest = d1.manifest(&topics::group_deploy_manifest("lab"));
    assert_eq!(manifest.deployment_id, id);
    let chunks = d1.chunks(&topics::group_deploy_chunk("lab"), 10);
    assert_eq!(
        chunks.keys().copied().collect::<Vec<_>>(),
        (0..10).collect::<Vec<_>>()
    );
    let p = coordinator.wait_progress(id, "picked up", |p| p.devices.len() == 2);
    assert_eq!(p.chunk_total, 10);

    // An invalid request (unknown deployment) is ignored; the valid one that follows on the
    // same connection is answered with exactly the chunks it names, on d1's own topic.
    d1.resend("dep-unknown", &sha, vec![0, 1]);
    d1.resend(id, &sha, vec![5, 2, 999]);
    let again = d1.chunks(&topics::deploy_chunk("d1"), 2);
    assert_eq!(again.keys().copied().collect::<Vec<_>>(), vec![2, 5]);
    assert_eq!(again[&5].data, chunks[&5].data);
    let lines = coordinator.wait_journal("resend lines", |l| {
        count(l, |x| x["event"] == "deploy_resend") == 2
    });
    assert_eq!(
        count(&lines, |x| x["event"] == "deploy_resend"
            && x["deployment_id"] == "dep-unknown"
            && x["chunks"] == 0
            && x["ignored"] == 2),
        1
    );
    assert_eq!(
        count(&lines, |x| x["event"] == "deploy_resend"
            && x["deployment_id"] == id
            && x["chunks"] == 2
            && x["ignored"] == 1),
        1
    );

    // Statuses, the final one twice (the outbox is at-least-once).
    d1.status(
        id,
        7,
        Step::Downloading {
            received: 10_240,
            total: 10_240,
        },
    );
    d1.status(id, 7, Step::Verifying);
    let healthy = d1.status(id, 7, Step::Healthy);
    d1.publish(topics::deploy_status("d1"), healthy);
    coordinator.wait_journal("duplicate status", |l| {
        count(l, |x| x["event"] == "duplicate" && x["device"] == "d1") == 1
    });
    let p = coordinator.wait_progress(id, "d1 healthy", |p| {
        p.devices
            .get("d1")
            .is_some_and(|d| d.last == Some(Step::Healthy))
    });
    assert_eq!(p.finished, None, "d2 has not reported yet");
    assert_eq!(p.resends_ignored, 1);
    assert_eq!(
        d1.pending_chunks(),
        0,
        "nothing was sent for the invalid request"
    );
    drop(d1);

    // A restart mid-rollout: the rollout resumes, the manifest is retained again, and a
    // device that connects only now gets it and its chunks on request.
    coordinator.stop();
    let coordinator = Coordinator::start(dir.path());
    let port = coordinator.wait_ready(2);
    coordinator.wait_journal("resumed", |l| {
        count(l, |x| {
            x["event"] == "deployment_started" && x["resumed"] == true
        }) == 1
    });
    let mut d2 = Device::connect(port, "d2", &["lab"], &["lab"]);
    let manifest = d2.manifest(&topics::group_deploy_manifest("lab"));
    assert_eq!(manifest.deployment_id, id);
    d2.resend(id, &sha, (0..10).collect());
    let got = d2.chunks(&topics::deploy_chunk("d2"), 10);
    let joined: Vec<u8> = got.values().flat_map(|c| c.data.clone()).collect();
    assert_eq!(sha256_hex(&joined), sha);

    d2.status(
        id,
        7,
        Step::RolledBack {
            reason: "health check failed".into(),
        },
    );
    let p = coordinator.wait_progress(id, "finished", |p| p.finished.is_some());
    assert_eq!(p.devices["d1"].last, Some(Step::Healthy));
    assert_eq!(
        p.devices["d2"].last,
        Some(Step::RolledBack {
            reason: "health check failed".into()
        })
    );
    let lines = coordinator.wait_journal("finished line", |l| {
        count(l, |x| x["event"] == "deployment_finished") == 1
    });
    let deploy_lines = |device: &str, step: &str| {
        count(&lines, |x| {
            x["event"] == "deploy" && x["device"] == device && x["step"] == step
        })
    };
    assert_eq!(
        deploy_lines("d1", "healthy"),
        1,
        "the duplicate is journaled once"
    );
    assert_eq!(deploy_lines("d1", "downloading"), 1);
    assert_eq!(deploy_lines("d2", "rolled_back"), 1);
    let finished = lines
        .iter()
        .find(|x| x["event"] == "deployment_finished")
        .expect("line");
    assert_eq!(
        (finished["healthy"].as_u64(), finished["failed"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(lines.iter().any(|x| x["event"] == "deploy"
        && x["step"] == "rolled_back"
        && x["reason"] == "health check failed"
        && x["version"] == 7));
    drop(d2);
    coordinator.stop();
}

/// Plays a device through one deployment on its own thread: waits for the manifest on
/// `manifest_topic`, asks for every chunk (so the outcome does not depend on when it
/// subscribed; the answer to a chunk whose group broadcast is still queued is that
/// broadcast), then reports `outcome`.
fn fake_agent(
    mut device: Device,
    manifest_topic: String,
    outcome: Step,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let manifest = device.manifest(&manifest_topic);
        let sha = manifest.artifacts[0].sha256.clone();
        let n = manifest.chunk_count(manifest.artifacts[0].size);
        device.resend(&manifest.deployment_id, &sha, (0..n).collect());
        let mut chunk_topics = vec![topics::deploy_chunk(&device.id)];
        if let Some(DeployTopic::GroupManifest { group }) = topics::parse_deploy(&manifest_topic) {
            chunk_topics.push(topics::group_deploy_chunk(&group));
        }
        let got = device.chunks_any(&chunk_topics, n as usize);
        let total: u64 = got.values().map(|c| c.data.len() as u64).sum();
        device.status(
            &manifest.deployment_id,
            manifest.version,
            Step::Downloading {
                received: total,
                total,
            },
        );
        device.status(&manifest.deployment_id, manifest.version, Step::Starting);
        device.status(&manifest.deployment_id, manifest.version, outcome);
        // Stay connected until the test is done with us.
        let _ = device.rx.recv_timeout(TIMEOUT);
    })
}

/// Runs `edge-coordinator ARGS` to completion (with a deadline); returns (success, stdout, stderr).
fn run_cli(args: &[&str]) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_edge-coordinator"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cli starts");
    let deadline = Instant::now() + TIMEOUT * 2;
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the deploy command did not exit");
        }
        std::thread::sleep(POLL);
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn deploy_command_reports_each_device_and_fails_unless_all_healthy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = Coordinator::start(dir.path());
    let port = coordinator.wait_ready(1);
    let state = coordinator.state.to_str().expect("utf-8 path").to_owned();
    let key = dir.path().join("deploy.key");
    let (ok, _, err) = run_cli(&["keygen", "--out", key.to_str().expect("utf-8")]);
    assert!(ok, "{err}");
    let pipeline = write_pipeline(dir.path());
    let pipeline = pipeline.to_str().expect("utf-8");
    let key = key.to_str().expect("utf-8");

    let mut good = Device::connect(port, "good", &["fleet"], &["fleet"]);
    good.register(&[]);
    let mut bad = Device::connect(port, "bad", &["fleet"], &["fleet"]);
    bad.register(&[]);
    coordinator.wait_journal("registrations", |l| {
        count(l, |x| x["event"] == "registered") == 2
    });
    let agents = [
        fake_agent(good, topics::group_deploy_manifest("fleet"), Step::Healthy),
        fake_agent(
            bad,
            topics::group_deploy_manifest("fleet"),
            Step::RolledBack {
                reason: "stage f trapped".into(),
            },
        ),
    ];
    let (ok, stdout, stderr) = run_cli(&[
        "deploy",
        "--group",
        "fleet",
        pipeline,
        "--key",
        key,
        "--version",
        "1",
        "--id",
        "dep-cli-1",
        "--chunk-size",
        "1024",
        "--state-dir",
        &state,
        "--timeout-s",
        "120",
    ]);
    assert!(
        !ok,
        "a rolled-back device fails the command; stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("good: healthy"), "{stdout}");
    assert!(
        stdout.contains("bad: rolled back: stage f trapped"),
        "{stdout}"
    );
    assert!(
        stderr.contains("1 of 2 devices did not end healthy"),
        "{stderr}"
    );
    for a in agents {
        a.join().expect("fake agent");
    }

    // A device target that ends healthy: success.
    let good = Device::connect(port, "good", &[], &[]);
    let agent = fake_agent(good, topics::deploy_manifest("good"), Step::Healthy);
    let (ok, stdout, stderr) = run_cli(&[
        "deploy",
        "--device",
        "good",
        pipeline,
        "--key",
        key,
        "--version",
        "2",
        "--id",
        "dep-cli-2",
        "--state-dir",
        &state,
        "--timeout-s",
        "120",
    ]);
    assert!(
        ok,
        "stdout:\n{stdout}\nstderr:\n{stderr}\nlog:\n{}",
        coordinator.log_text()
    );
    assert_eq!(stdout.trim(), "good: healthy");
    agent.join().expect("fake agent");
    coordinator.stop();
}

#[test]
fn deploy_command_says_when_no_coordinator_picks_it_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("deploy.key");
    let (ok, _, err) = run_cli(&["keygen", "--out", key.to_str().expect("utf-8")]);
    assert!(ok, "{err}");
    let pipeline = write_pipeline(dir.path());
    let state = dir.path().join("state");
    let (ok, _, stderr) = run_cli(&[
        "deploy",
        "--device",
        "d1",
        pipeline.to_str().expect("utf-8"),
        "--key",
        key.to_str().expect("utf-8"),
        "--version",
        "1",
        "--id",
        "dep-x",
        "--state-dir",
        state.to_str().expect("utf-8"),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("no coordinator picked up deployment dep-x"),
        "{stderr}"
    );
    assert!(
        stderr.contains("It will be sent when it starts"),
        "{stderr}"
    );
    // It stays spooled for the next `serve`.
    assert_eq!(
        spool::pending(&state).expect("lists"),
        vec!["dep-x".to_owned()]
    );
}
