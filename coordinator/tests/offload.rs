//! The offload inference service end to end: the real coordinator binary with its embedded
//! broker and a small linear ONNX model, and a raw MQTT client playing an enrolled device
//! (requests sealed with its session's `up` key, answers checked with its `down` key, the
//! advert with the coordinator's signature).
//!
//! - requests answered with outputs equal to a reference computation, correlation ids echoed;
//! - an unknown model answered `unknown_model`, a past deadline `expired`, a wrong shape
//!   `error`; a garbage payload ignored and counted while the service keeps answering;
//! - the retained capacity advert present and parsing;
//! - `serve` refusing to start when a configured model file is missing, naming it.
//!
//! Every wait is on an event (MQTT message, log line, exit) with a deadline; no timing asserts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use edge_testmodels::onnx_builder::linear;
use protocol::v1::offload::{Capacity, Request, Response, Status};
use protocol::v1::tensor::WireTensor;
use protocol::v1::topics;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

mod common;
use common::{Coordinator, DeviceAuth, POLL, TIMEOUT};

const MODEL: &str = "models/lin.onnx";
const IN: usize = 4;
const OUT: usize = 3;

fn weights() -> (Vec<f32>, Vec<f32>) {
    let w = (0..IN * OUT).map(|i| (i as f32 - 5.0) * 0.25).collect();
    let b = (0..OUT).map(|i| i as f32 * 0.5 - 0.5).collect();
    (w, b)
}

/// `x · W + B` for one row.
fn reference(x: &[f32]) -> Vec<f32> {
    let (w, b) = weights();
    (0..OUT)
        .map(|j| b[j] + (0..IN).map(|i| x[i] * w[i * OUT + j]).sum::<f32>())
        .collect()
}

fn write_config(dir: &Path, model: &Path) -> (PathBuf, PathBuf) {
    let state = dir.join("state");
    let path = dir.join("coordinator.toml");
    std::fs::write(
        &path,
        format!(
            "state_dir = {state:?}\nwatch_unknown_topics = false\nstats_interval_s = 1\n\
             [store]\nfsync = false\n[embedded]\nlisten = \"127.0.0.1:0\"\n\
             [offload]\nenabled = true\nworkers = 2\nmax_queue = 16\nreplica = \"r1\"\n\
             advertise_interval_ms = 100\n[offload.models]\n{MODEL:?} = {model:?}\n{}",
            common::enrollment_toml()
        ),
    )
    .expect("config written");
    (path, state)
}

enum Seen {
    SubAck,
    Publish(String, Vec<u8>),
}

fn connect(port: u16, id: &str) -> (Client, mpsc::Receiver<Seen>) {
    let mut options = MqttOptions::new(
        format!("{id}-{}", protocol::v1::now_ms()),
        "127.0.0.1",
        port,
    );
    options
        .set_keep_alive(Duration::from_secs(5))
        .set_clean_session(true)
        .set_max_packet_size(512 * 1024, 512 * 1024);
    let (client, mut connection) = Client::new(options, 64);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for event in connection.iter() {
            let seen = match event {
                Ok(Event::Incoming(Packet::SubAck(_))) => Seen::SubAck,
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    Seen::Publish(p.topic.clone(), p.payload.to_vec())
                }
                Ok(_) => continue,
                Err(_) => return,
            };
            if tx.send(seen).is_err() {
                return;
            }
        }
    });
    (client, rx)
}

fn wait_suback(rx: &mpsc::Receiver<Seen>) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Seen::SubAck) => return,
            Ok(Seen::Publish(..)) => {}
            Err(e) => panic!("no suback: {e}"),
        }
    }
}

/// Collects responses until every id in `ids` has one.
fn wait_responses(
    c: &Coordinator,
    auth: &DeviceAuth,
    rx: &mpsc::Receiver<Seen>,
    ids: &[u64],
) -> BTreeMap<u64, Response> {
    let deadline = Instant::now() + TIMEOUT;
    let mut got = BTreeMap::new();
    let topic = topics::offload_response("d1");
    while !ids.iter().all(|id| got.contains_key(id)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Seen::Publish(t, payload)) if t == topic => {
                let r = Response::decode(&auth.open(&t, &payload)).expect("response decodes");
                assert!(
                    got.insert(r.correlation_id, r).is_none(),
                    "one answer per request"
                );
            }
            Ok(_) => {}
            Err(e) => panic!(
                "waiting for responses {ids:?} (have {:?}): {e}; log:\n{}",
                got.keys().collect::<Vec<_>>(),
                c.log_text()
            ),
        }
    }
    got
}

fn request(id: u64, model: &str, x: &[f32], rows: u32, deadline_ms: u64) -> Vec<u8> {
    Request {
        correlation_id: id,
        deadline_ms,
        model: model.into(),
        inputs: vec![WireTensor::from_f32(
            "x",
            vec![rows, (x.len() as u32) / rows],
            x,
        )],
    }
    .encode()
    .expect("request encodes")
}

fn wait_log(c: &Coordinator, what: &str, done: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done(&c.log_text()) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; log:\n{}",
            c.log_text()
        );
        std::thread::sleep(POLL);
    }
}

#[test]
fn offload_service_answers_refuses_and_advertises() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = dir.path().join("lin.onnx");
    let (w, b) = weights();
    std::fs::write(&model, linear(IN as u32, OUT as u32, &w, &b)).expect("model written");
    let (config, state) = write_config(dir.path(), &model);
    let c = Coordinator::start_with_config(dir.path(), &config, state);
    let port = c.wait_ready_port();

    let auth = DeviceAuth::enroll(port, "d1", &[]);
    let (client, rx) = connect(port, "dev");
    client
        .subscribe(topics::offload_response("d1"), QoS::AtMostOnce)
        .expect("subscribe queued");
    wait_suback(&rx);
    let send = |payload: Vec<u8>| {
        client
            .publish(
                topics::offload_request("d1"),
                QoS::AtMostOnce,
                false,
                auth.seal(&topics::offload_request("d1"), &payload),
            )
            .expect("publish queued");
    };

    // Good requests, one and two rows; answers match the reference and their ids.
    let inputs: Vec<(u64, Vec<f32>, u32)> = (0..6u64)
        .map(|i| {
            let rows = if i % 2 == 0 { 1 } else { 2 };
            let x = (0..IN * rows as usize)
                .map(|k| (k as f32 + i as f32) * 0.1 - 0.3)
                .collect();
            (100 + i, x, rows)
        })
        .collect();
    for (id, x, rows) in &inputs {
        send(request(*id, MODEL, x, *rows, 0));
    }
    let ids: Vec<u64> = inputs.iter().map(|(id, ..)| *id).collect();
    let got = wait_responses(&c, &auth, &rx, &ids);
    for (id, x, rows) in &inputs {
        let r = &got[id];
        assert_eq!(r.status, Status::Ok, "{id}: {}", r.error);
        assert_eq!(r.outputs.len(), 1);
        assert_eq!(r.outputs[0].shape, vec![*rows, OUT as u32]);
        let y = r.outputs[0].to_f32().expect("f32 output");
        let want: Vec<f32> = x.chunks(IN).flat_map(reference).collect();
        assert_eq!(y.len(), want.len());
        for (a, b) in y.iter().zip(&want) {
            assert!((a - b).abs() < 1e-4, "{id}: {y:?} vs {want:?}");
        }
    }

    // Refusals: unknown model, past deadline, wrong shape.
    let x = vec![0.5f32; IN];
    send(request(200, "models/nope.onnx", &x, 1, 0));
    send(request(201, MODEL, &x, 1, 1));
    send(request(202, MODEL, &[1.0; 5], 1, 0));
    let got = wait_responses(&c, &auth, &rx, &[200, 201, 202]);
    assert_eq!(got[&200].status, Status::UnknownModel);
    assert!(
        got[&200].error.contains("models/nope.onnx"),
        "{}",
        got[&200].error
    );
    assert_eq!(got[&201].status, Status::Expired);
    assert_eq!(got[&202].status, Status::Error);
    assert!(!got[&202].error.is_empty());

    // Garbage is ignored (counted) and the service keeps answering.
    send(b"not an offload request".to_vec());
    send(request(300, MODEL, &x, 1, protocol::v1::now_ms() + 600_000));
    let got = wait_responses(&c, &auth, &rx, &[300]);
    assert_eq!(got[&300].status, Status::Ok);
    wait_log(&c, "offload stats counting the garbage", |log| {
        log.lines()
            .any(|l| l.contains("offload stats") && l.contains("garbage=1") && l.contains("ok=7"))
    });

    // The retained advert, as a newly connected agent sees it.
    let (watcher, adverts) = connect(port, "watcher");
    watcher
        .subscribe(topics::OFFLOAD_CAPACITY_FILTER, QoS::AtMostOnce)
        .expect("subscribe queued");
    let deadline = Instant::now() + TIMEOUT;
    let capacity = loop {
        match adverts.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Seen::Publish(t, payload)) if t == topics::offload_capacity("r1") => {
                break Capacity::from_json(&auth.open(&t, &payload)).expect("advert parses");
            }
            Ok(_) => {}
            Err(e) => panic!("no capacity advert: {e}; log:\n{}", c.log_text()),
        }
    };
    assert_eq!(capacity.replica, "r1");
    assert_eq!(capacity.workers, 2);
    assert_eq!(capacity.max_queue, 16);
    assert_eq!(capacity.models, vec![MODEL.to_owned()]);
    assert!(capacity.ewma_compute_ms.contains_key(MODEL));

    c.stop();
}

#[test]
fn missing_model_file_stops_serve_with_its_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("absent.onnx");
    let (config, _state) = write_config(dir.path(), &missing);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-coordinator"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("EDGE_COORDINATOR_API_LISTEN", "127.0.0.1:0")
        .output()
        .expect("coordinator runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(MODEL) && stderr.contains("absent.onnx"),
        "{stderr}"
    );
}
