//! Federated learning end to end: the real coordinator binary with its embedded broker, the
//! `fl` command line, and raw MQTT clients playing enrolled devices (they register, receive and
//! verify the retained round messages, signed with the coordinator's identity, and send
//! updates: good, wrong length, NaN, replayed, for an unknown round, and from an unregistered
//! device).
//!
//! - a three-round task: rejections counted by reason in `fl status --json`, the quorum
//!   closing rounds, the global version and weights advancing, a late update applied with
//!   staleness 1, a coordinator restart mid-round that keeps the accepted update and
//!   announces the open round again, and the final `done` message;
//! - `fl start` refusing an invalid task file, and `fl stop` ending a running task.
//!
//! Every wait is on an event (journal line, MQTT message, exit) with a deadline.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use edge_inference::DType;
use edge_inference::onnx::GraphProto;
use edge_testmodels::onnx_builder::{attr_int, init_f32, model, node, value_info};
use protocol::v1::binary::BinaryEnvelope;
use protocol::v1::deploy::{SigningKey, TrustedKeys};
use protocol::v1::fl::{self, Codec, RoundMessage, Update, codec, decode_round};
use protocol::v1::{Class, Envelope, Registration, Status, VERSION, message_id, topics};
use rumqttc::{Client, Event, LastWill, MqttOptions, Packet, Publish, QoS};
use serde_json::Value;

mod common;
use common::{Coordinator, DeviceAuth, POLL, TIMEOUT};

const TASK: &str = "digits";
/// The test model: 4 features -> 3 classes, `softmax(x W + B)`.
const W_LEN: usize = 12;
const N: usize = W_LEN + 3;

fn initial_weights() -> Vec<f32> {
    (0..N).map(|i| (i as f32 - 7.0) * 0.05).collect()
}

fn softmax_model() -> Vec<u8> {
    let w = initial_weights();
    model(GraphProto {
        name: "linear_softmax".into(),
        node: vec![
            node("MatMul", &["x", "W"], &["xw"], vec![]),
            node("Add", &["xw", "B"], &["logits"], vec![]),
            node(
                "Softmax",
                &["logits"],
                &["probs"],
                vec![attr_int("axis", -1)],
            ),
        ],
        initializer: vec![
            init_f32("W", &[4, 3], &w[..W_LEN]),
            init_f32("B", &[3], &w[W_LEN..]),
        ],
        input: vec![value_info("x", DType::F32, &[-1, 4])],
        output: vec![value_info("probs", DType::F32, &[-1, 3])],
        ..Default::default()
    })
}

fn write_task(dir: &Path, name: &str, extra: &str) -> PathBuf {
    std::fs::write(dir.join("model.onnx"), softmax_model()).expect("model");
    std::fs::write(
        dir.join("holdout.csv"),
        "f1,f2,f3,f4,label\n1,0,0,0,0\n0,1,0,0,1\n0,0,1,0,2\n0,0,0,1,0\n",
    )
    .expect("holdout");
    let path = dir.join(name);
    // Clipping off: the expected global weights below are plain FedAvg of the deltas sent
    // (clipping has its own tests in `fl::privacy` and the engine).
    std::fs::write(
        &path,
        format!(
            "id = \"{TASK}\"\nmodel = \"models/digits.onnx\"\ninitial = \"model.onnx\"\nparams = [\"W\", \"B\"]\n\
             group = \"fl\"\nrounds = 3\nfraction = 1.0\nmin_clients = 3\nquorum = 0.6\nround_timeout_s = 600\n\
             max_staleness = 1\n{extra}\n[train]\nepochs = 1\nlr = 0.1\nbatch_size = 4\n\
             [aggregate]\nrule = \"fedavg\"\nserver_optimizer = \"sgd\"\nclip = \"off\"\n[eval]\nholdout = \"holdout.csv\"\n"
        ),
    )
    .expect("task file");
    path
}

fn cli(args: &[&str], state: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edge-coordinator"))
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .output()
        .expect("edge-coordinator runs")
}

fn fl_status_json(state: &Path) -> Value {
    let out = cli(&["fl", "status", TASK, "--json"], state);
    assert!(
        out.status.success(),
        "fl status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("fl status --json prints json")
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

/// Polls the journal until `done` holds, or fails with the journal and the log.
fn wait_journal(c: &Coordinator, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let lines = journal(&c.journal_path());
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
            c.log_text()
        );
        std::thread::sleep(POLL);
    }
}

/// Waits for the n-th `ready` line and returns the broker's port.
fn wait_ready(c: &Coordinator, n: usize) -> u16 {
    let lines = wait_journal(c, "ready", |l| count(l, |x| x["event"] == "ready") == n);
    lines
        .iter()
        .rev()
        .find(|l| l["event"] == "ready")
        .and_then(|l| l["broker"].as_str())
        .and_then(|u| u.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .expect("ready line names the broker's port")
}

fn closed_round(lines: &[Value], round: u64) -> Option<&Value> {
    lines
        .iter()
        .find(|l| l["event"] == "fl_round_closed" && l["task"] == TASK && l["round"] == round)
}

/// A device: subscribed to its round topic (clean session, like the agent), online by a
/// retained status with a last will, every received publish forwarded to a channel.
struct Device {
    id: String,
    client: Client,
    rx: mpsc::Receiver<Publish>,
    incarnation: u64,
    seq: u64,
    auth: std::sync::Arc<DeviceAuth>,
}

impl Device {
    /// Enrolls `id` in group `fl` and connects: online by a retained status, sealed like its
    /// will.
    fn connect(port: u16, id: &str) -> Device {
        let auth = DeviceAuth::enroll(port, id, &["fl"]);
        let since = protocol::v1::now_ms();
        let status = |online| Status {
            v: VERSION,
            device: id.into(),
            online,
            since_ms: since,
            agent_version: "0.1.0".into(),
        };
        let mut options = MqttOptions::new(format!("dev-{id}-{since}"), "127.0.0.1", port);
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_clean_session(true)
            .set_max_packet_size(512 * 1024, 512 * 1024)
            .set_last_will(LastWill::new(
                topics::status(id),
                auth.seal(&topics::status(id), &status(false).to_json()),
                QoS::AtLeastOnce,
                true,
            ));
        let (client, mut connection) = Client::new(options, 64);
        client
            .subscribe(topics::fl_round(id), QoS::AtLeastOnce)
            .expect("subscribe queued");
        client
            .publish(
                topics::status(id),
                QoS::AtLeastOnce,
                true,
                auth.seal(&topics::status(id), &status(true).to_json()),
            )
            .expect("status queued");
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
            incarnation: since ^ (u64::from(std::process::id()) << 40),
            seq: 0,
            auth,
        }
    }

    fn next_id(&mut self) -> (String, u64) {
        self.seq += 1;
        (message_id(self.incarnation, self.seq), self.seq)
    }

    fn register(&mut self, groups: &[&str]) {
        let (id, seq) = self.next_id();
        let env = Envelope {
            v: VERSION,
            id,
            device: self.id.clone(),
            class: Class::Control,
            seq,
            prev: None,
            created_ms: protocol::v1::now_ms(),
            body: Registration {
                agent_version: "0.1.0".into(),
                hostname: self.id.clone(),
                os: "linux".into(),
                arch: "aarch64".into(),
                boot_id: format!("boot-{}-{}", self.id, self.incarnation),
                started_ms: 1,
                capabilities: vec!["fl".into()],
                groups: groups.iter().map(|g| (*g).to_owned()).collect(),
                inference: Default::default(),
            },
        };
        self.publish(topics::register(&self.id), env.to_json());
    }

    /// Publishes `payload` sealed as the agent's uplink does (a resend gets a new counter).
    fn publish(&self, topic: String, payload: Vec<u8>) {
        let sealed = self.auth.seal(&topic, &payload);
        self.client
            .publish(topic, QoS::AtLeastOnce, false, sealed)
            .expect("queued");
    }

    /// The update as the agent would send it: fp32 delta, one binary envelope.
    fn update_payload(&mut self, round: u32, base: u32, samples: u32, delta: &[f32]) -> Vec<u8> {
        self.wrap(&Update {
            task: TASK.into(),
            round,
            base_version: base,
            samples,
            loss: 0.5,
            accuracy: 0.75,
            train_ms: 3,
            payload: codec::encode(Codec::Fp32, delta, None, u64::from(round)),
        })
    }

    fn wrap(&mut self, update: &Update) -> Vec<u8> {
        let (id, seq) = self.next_id();
        BinaryEnvelope {
            id,
            device: self.id.clone(),
            class: Class::Model,
            seq,
            created_ms: protocol::v1::now_ms(),
            kind: fl::UPDATE_KIND.into(),
            body: update.encode(),
        }
        .encode()
        .expect("envelope encodes")
    }

    fn send(&self, payload: Vec<u8>) {
        self.publish(topics::fl_update(&self.id), payload);
    }

    /// The next verified round message on this device's topic that satisfies `want`.
    fn round(&self, trusted: &TrustedKeys, want: impl Fn(&RoundMessage) -> bool) -> RoundMessage {
        self.round_raw(trusted, want).0
    }

    /// Like [`Device::round`], with the payload as received.
    fn round_raw(
        &self,
        trusted: &TrustedKeys,
        want: impl Fn(&RoundMessage) -> bool,
    ) -> (RoundMessage, Vec<u8>) {
        let topic = topics::fl_round(&self.id);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(p) if p.topic == topic && !p.payload.is_empty() => {
                    let m = decode_round(&p.payload, trusted).expect("round message verifies");
                    if want(&m) {
                        return (m, p.payload.to_vec());
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("{}: no wanted round message: {e}", self.id),
            }
        }
    }
}

fn connect_all(port: u16, ids: &[&str]) -> Vec<Device> {
    ids.iter()
        .map(|id| {
            let mut d = Device::connect(port, id);
            d.register(&["fl"]);
            d
        })
        .collect()
}

/// Round messages verify with the coordinator's identity (what devices pinned at enrollment).
fn coordinator_trusted(state: &Path) -> TrustedKeys {
    let public = common::coordinator_identity(state);
    TrustedKeys::new([public.verifying_key().expect("coordinator key")])
}

fn close_to(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
}

#[test]
fn rounds_with_bad_updates_a_late_update_and_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let task = write_task(dir.path(), "task.toml", "");
    let coordinator = Coordinator::start(dir.path());
    let port = wait_ready(&coordinator, 1);
    let state = coordinator.state.clone();
    let trusted = coordinator_trusted(&state);

    let out = cli(&["fl", "start", task.to_str().expect("utf-8 path")], &state);
    assert!(
        out.status.success(),
        "fl start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_journal(&coordinator, "the task waiting for members", |l| {
        count(l, |x| x["event"] == "fl_round_waiting" && x["task"] == TASK) >= 1
    });
    assert_eq!(fl_status_json(&state)["phase"]["state"], "waiting");

    let mut devices = connect_all(port, &["d1", "d2", "d3"]);
    // Connected and subscribed, but never registered.
    let mut mallory = Device::connect(port, "mallory");
    let lines = wait_journal(&coordinator, "round 1 opened", |l| {
        count(l, |x| x["event"] == "fl_round_opened" && x["round"] == 1) == 1
    });
    let opened = lines
        .iter()
        .find(|l| l["event"] == "fl_round_opened")
        .expect("opened");
    assert_eq!(opened["selected"], serde_json::json!(["d1", "d2", "d3"]));
    let other = TrustedKeys::new([SigningKey::from_bytes(&[9; 32]).verifying_key()]);
    for d in &devices {
        let (m, raw) = d.round_raw(&trusted, |m| m.header.round == 1);
        assert!(
            decode_round(&raw, &other).is_err(),
            "another key does not verify it"
        );
        assert_eq!(m.header.version, 0);
        assert_eq!(m.header.task, TASK);
        assert!(m.header.train.is_some(), "{} is selected", d.id);
        assert!(
            close_to(&m.weights, &initial_weights()),
            "round 1 carries the initial model"
        );
    }

    // Bad updates, each refused for its own reason while round 1 is current.
    let mut nan = [0.1f32; N];
    nan[4] = f32::NAN;
    let nan_payload = {
        // The agent's codec refuses NaN, so build the fp32 payload by hand.
        let mut p = vec![1u8];
        p.extend_from_slice(&(N as u32).to_le_bytes());
        p.extend(nan.iter().flat_map(|v| v.to_le_bytes()));
        p
    };
    let d1 = &mut devices[0];
    let short = d1.update_payload(1, 0, 10, &[0.1; N - 1]);
    d1.send(short);
    let nan_update = d1.wrap(&Update {
        task: TASK.into(),
        round: 1,
        base_version: 0,
        samples: 10,
        loss: 0.5,
        accuracy: 0.5,
        train_ms: 1,
        payload: nan_payload,
    });
    d1.send(nan_update);
    let future = d1.update_payload(5, 0, 10, &[0.1; N]);
    d1.send(future);
    let intruder = mallory.update_payload(1, 0, 10, &[9.0; N]);
    mallory.send(intruder);
    wait_journal(&coordinator, "four rejections", |l| {
        count(l, |x| x["event"] == "fl_update_rejected") == 4
    });
    // The good one, and the same message again.
    let good = devices[0].update_payload(1, 0, 10, &[0.1; N]);
    devices[0].send(good.clone());
    devices[0].send(good);
    wait_journal(&coordinator, "d1's update and its duplicate", |l| {
        count(l, |x| x["event"] == "fl_update") == 1
            && count(l, |x| x["reason"] == "duplicate") == 1
    });
    let d2_update = devices[1].update_payload(1, 0, 30, &[0.3; N]);
    devices[1].send(d2_update);
    let lines = wait_journal(&coordinator, "round 1 closed", |l| {
        closed_round(l, 1).is_some()
    });
    let r1 = closed_round(&lines, 1).expect("closed");
    assert_eq!(r1["close_reason"], "quorum");
    assert_eq!(
        (
            r1["selected"].as_u64(),
            r1["received"].as_u64(),
            r1["on_time"].as_u64()
        ),
        (Some(3), Some(2), Some(2))
    );
    assert_eq!(r1["new_version"], 1);
    assert_eq!(r1["duplicates"], 1);
    assert_eq!(
        r1["rejected"],
        serde_json::json!({"wrong_length": 1, "non_finite": 1, "unknown_round": 1, "unregistered": 1})
    );
    assert!(
        r1["bytes_in"].as_u64().is_some_and(|b| b > 0)
            && r1["bytes_out"].as_u64().is_some_and(|b| b > 0)
    );
    assert_eq!(r1["train_loss"], 0.5);
    let library = edge_inference::workspace_library().exists()
        || std::env::var_os("ORT_DYLIB_PATH").is_some_and(|p| !p.is_empty());
    if library {
        assert!(
            r1["eval_accuracy"].is_number() && r1["eval_loss"].is_number(),
            "evaluated: {r1}"
        );
        assert_eq!(r1["eval_rows"], 4);
    } else {
        assert!(
            r1["eval_note"]
                .as_str()
                .is_some_and(|n| n.starts_with("eval unavailable: ")),
            "{r1}"
        );
    }

    // Round 2 carries version 1: the initial model plus (10 * 0.1 + 30 * 0.3) / 40 = 0.25.
    let expected_v1: Vec<f32> = initial_weights().iter().map(|w| w + 0.25).collect();
    for d in &devices {
        let m = d.round(&trusted, |m| m.header.round == 2);
        assert_eq!(m.header.version, 1);
        assert!(
            close_to(&m.weights, &expected_v1),
            "{}: {:?}",
            d.id,
            m.weights
        );
    }

    // d3's round-1 update arrives now: one round late, accepted into round 2.
    let late = devices[2].update_payload(1, 0, 10, &[1.0; N]);
    devices[2].send(late);
    // d1's round-2 update: one of the two the quorum needs.
    let d1_r2 = devices[0].update_payload(2, 1, 10, &[0.2; N]);
    devices[0].send(d1_r2);
    let lines = wait_journal(
        &coordinator,
        "the late update and d1's round 2 update",
        |l| count(l, |x| x["event"] == "fl_update" && x["applied_round"] == 2) == 2,
    );
    assert_eq!(
        count(&lines, |x| x["event"] == "fl_update"
            && x["device"] == "d3"
            && x["staleness"] == 1),
        1
    );

    // Restart mid-round: accepted updates and the selection survive, the round is announced
    // again on the new broker.
    drop(devices);
    drop(mallory);
    coordinator.stop();
    let coordinator = Coordinator::start(dir.path());
    let port = wait_ready(&coordinator, 2);
    wait_journal(&coordinator, "the task resumed", |l| {
        count(l, |x| {
            x["event"] == "fl_task_started" && x["resumed"] == true
        }) == 1
    });
    let status = fl_status_json(&state);
    assert_eq!(
        (status["round"].as_u64(), status["version"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(
        (
            status["current"]["on_time"].as_u64(),
            status["current"]["late"].as_u64()
        ),
        (Some(1), Some(1))
    );

    let mut devices = connect_all(port, &["d1", "d2", "d3"]);
    // Online again before round 3 needs them.
    wait_journal(&coordinator, "the devices online again", |l| {
        count(l, |x| x["event"] == "online" && x["device"] != "mallory") == 6
    });
    for d in &devices {
        let m = d.round(&trusted, |m| m.header.round == 2);
        assert!(close_to(&m.weights, &expected_v1));
        assert_eq!(
            m.header.train.is_some(),
            d.id != "d1",
            "{}: d1 already delivered round 2",
            d.id
        );
    }
    // d1 resends its round-2 update (an agent after a reboot would): a duplicate.
    let again = devices[0].update_payload(2, 1, 10, &[0.2; N]);
    devices[0].send(again);
    wait_journal(&coordinator, "the resent update refused", |l| {
        count(l, |x| {
            x["event"] == "fl_update_rejected" && x["reason"] == "duplicate"
        }) == 2
    });
    let d2_r2 = devices[1].update_payload(2, 1, 10, &[0.2; N]);
    devices[1].send(d2_r2);
    let lines = wait_journal(&coordinator, "round 2 closed", |l| {
        closed_round(l, 2).is_some()
    });
    let r2 = closed_round(&lines, 2).expect("closed");
    assert_eq!(
        (
            r2["received"].as_u64(),
            r2["on_time"].as_u64(),
            r2["late"].as_u64()
        ),
        (Some(3), Some(2), Some(1))
    );
    assert_eq!(r2["duplicates"], 1);
    // (10 * 0.2 + 10 * 0.2 + 10 / 2 * 1.0) / 25 = 0.36 on top of version 1.
    let expected_v2: Vec<f32> = expected_v1.iter().map(|w| w + 0.36).collect();
    for d in &devices {
        let m = d.round(&trusted, |m| m.header.round == 3);
        assert_eq!(m.header.version, 2);
        assert!(
            close_to(&m.weights, &expected_v2),
            "{}: {:?}",
            d.id,
            m.weights
        );
    }

    // Round 3, the last: the task ends and every member gets the final weights, done.
    for d in devices.iter_mut().take(2) {
        let u = d.update_payload(3, 2, 10, &[0.1; N]);
        d.send(u);
    }
    wait_journal(&coordinator, "the task finished", |l| {
        count(l, |x| {
            x["event"] == "fl_task_finished" && x["reason"] == "completed"
        }) == 1
    });
    let expected_v3: Vec<f32> = expected_v2.iter().map(|w| w + 0.1).collect();
    for d in &devices {
        let m = d.round(&trusted, |m| m.header.done);
        assert_eq!(m.header.version, 3);
        assert!(m.header.train.is_none());
        assert!(
            close_to(&m.weights, &expected_v3),
            "{}: {:?}",
            d.id,
            m.weights
        );
    }
    let status = fl_status_json(&state);
    assert_eq!(status["phase"]["state"], "finished");
    assert_eq!(status["version"], 3);
    let history = status["history"].as_array().expect("history");
    assert_eq!(history.len(), 3);
    assert_eq!(history[0]["rejected"]["unregistered"], 1);
    assert_eq!(status["totals"]["duplicates"], 2);
    assert_eq!(status["totals"]["accepted"], 7);

    let out = cli(&["fl", "status"], &state);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("task digits: finished (completed) after 3 rounds; global version 3"),
        "{text}"
    );
    assert!(text.contains("closed (quorum)"), "{text}");
    coordinator.stop();
}

#[test]
fn start_refuses_a_bad_task_and_stop_ends_a_running_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = Coordinator::start(dir.path());
    let port = wait_ready(&coordinator, 1);
    let state = coordinator.state.clone();
    let trusted = coordinator_trusted(&state);

    let bad = write_task(dir.path(), "bad.toml", "")
        .to_string_lossy()
        .into_owned();
    std::fs::write(
        &bad,
        std::fs::read_to_string(&bad)
            .expect("reads")
            .replace("quorum = 0.6", "quorum = 1.5"),
    )
    .expect("writes");
    let out = cli(&["fl", "start", &bad], &state);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("invalid quorum"),
        "{err}"
    );

    let task = write_task(dir.path(), "task.toml", "")
        .to_string_lossy()
        .into_owned();
    let task_text = std::fs::read_to_string(&task)
        .expect("reads")
        .replace("min_clients = 3", "min_clients = 1");
    std::fs::write(&task, task_text).expect("writes");
    let out = cli(&["fl", "start", &task], &state);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The same id again is refused.
    let out = cli(&["fl", "start", &task], &state);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));

    let devices = connect_all(port, &["solo"]);
    devices[0].round(&trusted, |m| {
        m.header.round == 1 && m.header.train.is_some()
    });
    let out = cli(&["fl", "stop", TASK], &state);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = devices[0].round(&trusted, |m| m.header.done);
    assert!(close_to(&m.weights, &initial_weights()));
    let status = fl_status_json(&state);
    assert_eq!(status["phase"]["reason"], "stopped by fl stop");
    let out = cli(&["fl", "status", "nope"], &state);
    assert!(!out.status.success());
    coordinator.stop();
}
