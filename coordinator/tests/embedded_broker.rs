//! End to end through the built binary and its embedded broker: an enrolled device's valid,
//! duplicate, malformed, oversized and misplaced messages from a real MQTT client, checked in
//! the journal, and one without authentication dropped and counted; then a restart on the same
//! state directory must still recognise the duplicate.
//!
//! Synchronisation is by polling the journal with a deadline, never by sleeping for a guess.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::v1::{Class, Data, Envelope, Registration, Status, VERSION, topics};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

mod common;
use common::{Coordinator, DeviceAuth, POLL, TIMEOUT};

fn journal(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Polls the journal until `done` holds for its lines, or fails with the journal and the log.
fn wait_for(
    path: &Path,
    coordinator: &Coordinator,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let lines = journal(path);
        if done(&lines) {
            return lines;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}; journal:\n{}\nlog:\n{}",
                lines
                    .iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join("\n"),
                coordinator.log_text()
            );
        }
        std::thread::sleep(POLL);
    }
}

fn count(lines: &[Value], pred: impl Fn(&Value) -> bool) -> usize {
    lines.iter().filter(|l| pred(l)).count()
}

fn is(event: &'static str) -> impl Fn(&Value) -> bool {
    move |l| l["event"] == event
}

fn is_data(id: &str) -> impl Fn(&Value) -> bool + '_ {
    move |l| l["event"] == "data" && l["id"] == id
}

/// The port from the latest `ready` line.
fn ready_port(lines: &[Value]) -> u16 {
    let ready = lines
        .iter()
        .rev()
        .find(|l| l["event"] == "ready")
        .expect("ready line");
    assert_eq!(ready["embedded"], true);
    let url = ready["broker"].as_str().expect("broker is a string");
    url.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("url ends with a port")
}

/// A device-side MQTT client whose connection errors are recorded, not hidden.
struct Device {
    client: Client,
    errors: Arc<Mutex<Vec<String>>>,
    auth: Arc<DeviceAuth>,
}

impl Device {
    /// Enrolls `device` (again, after a restart) and connects.
    fn connect(port: u16, device: &str) -> Device {
        let auth = DeviceAuth::enroll(port, device, &[]);
        let mut options = MqttOptions::new(format!("test-{device}"), "127.0.0.1", port);
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(512 * 1024, 512 * 1024);
        let (client, mut connection) = Client::new(options, 64);
        let errors = Arc::new(Mutex::new(Vec::new()));
        let errs = errors.clone();
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(Event::Incoming(Packet::Disconnect)) => errs
                        .lock()
                        .expect("lock")
                        .push("broker disconnected us".into()),
                    Ok(_) => {}
                    Err(e) => {
                        errs.lock().expect("lock").push(e.to_string());
                        return;
                    }
                }
            }
        });
        Device {
            client,
            errors,
            auth,
        }
    }

    /// Publishes `payload` sealed as the agent's uplink does.
    fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) {
        self.publish_raw(topic, self.auth.seal(topic, &payload), retain);
    }

    fn publish_raw(&self, topic: &str, payload: Vec<u8>, retain: bool) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .expect("queued");
    }

    fn errors(&self) -> Vec<String> {
        self.errors.lock().expect("lock").clone()
    }
}

fn data(device: &str, seq: u64) -> (String, Vec<u8>) {
    let id = protocol::v1::message_id(0xabc, seq);
    let env = Envelope {
        v: VERSION,
        id: id.clone(),
        device: device.into(),
        class: Class::Results,
        seq,
        prev: None,
        created_ms: 1_000 + seq,
        body: Data {
            stream: "vib/alerts".into(),
            payload: serde_json::json!({"rms": seq}).into(),
        },
    };
    (id, env.to_json())
}

#[test]
fn embedded_broker_end_to_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal_path = dir.path().join("state/journal.jsonl");

    let coordinator = Coordinator::start(dir.path());
    let lines = wait_for(&journal_path, &coordinator, "ready", |l| {
        count(l, is("ready")) == 1
    });
    let device = Device::connect(ready_port(&lines), "d1");

    let status = Status {
        v: VERSION,
        device: "d1".into(),
        online: true,
        since_ms: 42,
        agent_version: "0.1.0".into(),
    };
    device.publish(&topics::status("d1"), status.to_json(), true);
    let registration = Envelope {
        v: VERSION,
        id: protocol::v1::message_id(0xabc, 1),
        device: "d1".into(),
        class: Class::Control,
        seq: 1,
        prev: None,
        created_ms: 1_001,
        body: Registration {
            agent_version: "0.1.0".into(),
            hostname: "pi".into(),
            os: "linux".into(),
            arch: "aarch64".into(),
            boot_id: "boot-1".into(),
            started_ms: 1_000,
            capabilities: vec!["outbox".into()],
            groups: Vec::new(),
            inference: Default::default(),
        },
    };
    device.publish(&topics::register("d1"), registration.to_json(), false);
    let (first_id, first) = data("d1", 2);
    device.publish(&topics::data("d1", "vib/alerts"), first.clone(), false);
    device.publish(&topics::data("d1", "vib/alerts"), first.clone(), false);
    device.publish(
        &topics::data("d1", "vib/alerts"),
        b"{not json".to_vec(),
        false,
    );
    device.publish(&topics::telemetry("d1"), vec![b'x'; 150 * 1024], false);
    device.publish("edge/v1/d1/bogus", b"garbage".to_vec(), false);
    // Without a trailer, or sealed by a device that never enrolled: dropped before the core.
    let (_, unsealed) = data("d1", 9);
    device.publish_raw(&topics::data("d1", "vib/alerts"), unsealed.clone(), false);
    device.publish_raw(&topics::data("d9", "vib/alerts"), unsealed, false);
    // Sent after the bad ones on the same connection: proves the connection and the
    // coordinator both carried on.
    let (last_id, last) = data("d1", 3);
    device.publish(&topics::data("d1", "vib/alerts"), last, false);

    let lines = wait_for(&journal_path, &coordinator, "the last data message", |l| {
        count(l, is_data(&last_id)) == 1
    });
    assert_eq!(
        count(&lines, is_data(&first_id)),
        1,
        "exactly one data event for the first message"
    );
    assert_eq!(
        count(&lines, |l| l["event"] == "device_enrolled"
            && l["device"] == "d1"),
        1
    );
    let lines = wait_for(&journal_path, &coordinator, "the dropped messages", |l| {
        let dropped = |reason: &str| {
            l.iter()
                .filter(|x| x["event"] == "auth_rejected")
                .filter_map(|x| x["reasons"][reason].as_u64())
                .sum::<u64>()
        };
        dropped("no_trailer") == 1 && dropped("unenrolled") == 1
    });
    assert_eq!(
        count(&lines, |l| l["event"] == "data" && l["seq"] == 9),
        0,
        "nothing unauthenticated reaches the core"
    );
    assert_eq!(
        count(&lines, |l| l["event"] == "duplicate" && l["id"] == first_id),
        1
    );
    assert_eq!(
        count(&lines, |l| l["event"] == "online"
            && l["device"] == "d1"
            && l["since_ms"] == 42),
        1
    );
    assert_eq!(
        count(&lines, |l| l["event"] == "registered"
            && l["boot_id"] == "boot-1"
            && l["agent_version"] == "0.1.0"),
        1
    );
    let rejected: Vec<&Value> = lines.iter().filter(|l| l["event"] == "rejected").collect();
    assert_eq!(rejected.len(), 3, "{rejected:?}");
    assert!(
        rejected
            .iter()
            .any(|l| l["topic"] == topics::data("d1", "vib/alerts")
                && l["reason"].as_str().is_some_and(|r| r.contains("json")))
    );
    assert!(
        rejected
            .iter()
            .any(|l| l["topic"] == topics::telemetry("d1")
                && l["reason"].as_str().is_some_and(|r| r.contains("exceeds")))
    );
    assert!(rejected.iter().any(|l| l["topic"] == "edge/v1/d1/bogus"));
    let data_line = lines
        .iter()
        .find(|l| is_data(&first_id)(l))
        .expect("data line");
    assert_eq!(data_line["class"], "results");
    assert_eq!(data_line["stream"], "vib/alerts");
    assert_eq!(data_line["seq"], 2);
    assert_eq!(data_line["created_ms"], 1_002);
    assert_eq!(data_line["payload"], serde_json::json!({"rms": 2}));
    assert!(lines.iter().all(|l| l["ts_ms"].is_u64()));
    assert_eq!(
        device.errors(),
        Vec::<String>::new(),
        "the device connection must stay up"
    );
    drop(device);
    coordinator.stop();
    let lines = journal(&journal_path);
    assert_eq!(
        lines.last().map(|l| l["event"].clone()),
        Some(Value::from("stopped"))
    );

    // Restart on the same state: the agent would resend an unacknowledged message after
    // reconnecting, and it must still be recognised as a duplicate.
    let coordinator = Coordinator::start(dir.path());
    let lines = wait_for(&journal_path, &coordinator, "second ready", |l| {
        count(l, is("ready")) == 2
    });
    assert_eq!(
        count(&lines, |l| l["event"] == "offline" && l["device"] == "d1"),
        1,
        "the device's session ended with the previous embedded broker"
    );
    let device = Device::connect(ready_port(&lines), "d1");
    device.publish(&topics::data("d1", "vib/alerts"), first, false);
    let lines = wait_for(
        &journal_path,
        &coordinator,
        "duplicate after restart",
        |l| count(l, |x| x["event"] == "duplicate" && x["id"] == first_id) == 2,
    );
    assert_eq!(count(&lines, is_data(&first_id)), 1);
    drop(device);
    coordinator.stop();

    // The registry is readable by `devices` once the coordinator has stopped.
    let out = Command::new(env!("CARGO_BIN_EXE_edge-coordinator"))
        .args(["devices", "--json", "--state-dir"])
        .arg(dir.path().join("state"))
        .output()
        .expect("devices runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records: Value = serde_json::from_slice(&out.stdout).expect("json");
    let d1 = &records[0];
    assert_eq!(d1["device"], "d1");
    assert_eq!(d1["counters"]["data"], 2);
    assert_eq!(d1["counters"]["duplicates"], 2);
    assert_eq!(
        d1["counters"]["rejected"], 2,
        "the unknown topic is not counted against d1"
    );
    assert_eq!(d1["registration"]["boot_id"], "boot-1");
    assert_eq!(d1["enrollment"]["state"], "accepted");
}
