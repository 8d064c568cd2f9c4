//! Hostile MQTT input: a raw client publishes malformed, forged and oversized payloads to the
//! agent's command topic and to every topic the coordinator listens on, and throws garbage
//! bytes at the broker port. The agent and the coordinator must stay up, the coordinator
//! must journal what it drops (none of it carries the device's MAC, so it is refused at the
//! door: `auth_rejected`), and later messages must still be delivered.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, ensure};
use edge_tests::{
    Agent, AgentOptions, Class, Coordinator, DELIVERY_TIMEOUT, DeliveryReport, Mosquitto, RawMqtt,
    START_TIMEOUT, TestEnv, run_test, test_messages,
};
use protocol::v1::topics;

const DEVICE: &str = "d1";
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// (topic, payload, what it is) of everything hostile this test sends.
fn hostile_messages() -> Vec<(String, Vec<u8>, &'static str)> {
    let envelope = |v: u8, device: &str, id: &str| {
        serde_json::json!({
            "v": v, "id": id, "device": device, "class": "results", "seq": 1, "created_ms": 1,
            "body": {"stream": "s", "payload": {"forged": true}}
        })
        .to_string()
        .into_bytes()
    };
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let cmd = topics::cmd(DEVICE, "x");
    let data = topics::data(DEVICE, "s");
    vec![
        (
            cmd.clone(),
            b"{not json".to_vec(),
            "truncated json to the agent",
        ),
        (cmd.clone(), noise.clone(), "binary noise to the agent"),
        (
            cmd.clone(),
            br#"{"v":1,"unexpected":[1,2,3]}"#.to_vec(),
            "wrong-shape json to the agent",
        ),
        (
            cmd.clone(),
            b"EB\x01\x09\x00".to_vec(),
            "truncated binary envelope to the agent",
        ),
        (cmd.clone(), Vec::new(), "empty payload to the agent"),
        // Above the agent's default max_packet_bytes (131072): must not wedge its connection.
        (cmd, vec![b'x'; 140_000], "oversized payload to the agent"),
        (data.clone(), b"{not json".to_vec(), "truncated json data"),
        (data.clone(), noise.clone(), "binary noise data"),
        (
            data.clone(),
            envelope(2, DEVICE, "v2id"),
            "data envelope of an unknown version",
        ),
        (
            data.clone(),
            envelope(1, "someone-else", "forgedid"),
            "data envelope naming another device",
        ),
        (
            data.clone(),
            envelope(1, DEVICE, "bad/id"),
            "data envelope with an invalid id",
        ),
        (
            data.clone(),
            b"EB\x01\x02\xff\xff".to_vec(),
            "truncated binary envelope as data",
        ),
        // Above protocol::v1::MAX_PAYLOAD_BYTES (96 KiB).
        (data, vec![b'{'; 120_000], "oversized data payload"),
        (
            topics::register(DEVICE),
            noise.clone(),
            "binary noise as registration",
        ),
        (
            topics::register(DEVICE),
            br#"{"v":1}"#.to_vec(),
            "incomplete registration",
        ),
        (
            topics::telemetry(DEVICE),
            br#"{"v":1,"id":"t","device":"d1"}"#.to_vec(),
            "incomplete telemetry",
        ),
        (
            topics::telemetry(DEVICE),
            b"[]".to_vec(),
            "telemetry that is a json array",
        ),
        (
            topics::status(DEVICE),
            b"{\"online\":\"maybe\"}".to_vec(),
            "malformed status",
        ),
        (
            "edge/v1/bad device/data/s".to_owned(),
            b"{}".to_vec(),
            "invalid device id in the topic",
        ),
    ]
}

/// Sends the hostile input through the broker on 127.0.0.1:`port`, then checks both processes.
fn attack(
    env: &TestEnv,
    port: u16,
    coord: &mut Coordinator,
    agent: &mut Agent,
) -> anyhow::Result<()> {
    let broker_url = format!("mqtt://127.0.0.1:{port}");
    let mut journal = coord.journal();
    journal.wait_registered(DEVICE, START_TIMEOUT)?;
    let before = journal.len();

    // One connection per message: a broker may drop a client over an oversized packet, and a
    // fresh connection keeps that one from being retried.
    let mut outcomes = Vec::new();
    for (i, (topic, payload, what)) in hostile_messages().into_iter().enumerate() {
        let mut raw =
            RawMqtt::connect(port, &format!("hostile-{i}"), ACK_TIMEOUT).with_context(|| {
                format!(
                    "before sending {what}, the broker at {broker_url} no longer takes connections"
                )
            })?;
        let outcome = raw.publish(&topic, payload, ACK_TIMEOUT)?;
        outcomes.push(format!("{what} on {topic}: {outcome:?}"));
    }
    // Raw garbage at the MQTT layer itself: not even a CONNECT packet.
    for garbage in [
        &b"\x10\xff\xff\xff\xff\x7f"[..],
        b"GET / HTTP/1.1\r\n\r\n",
        &[0u8; 64],
    ] {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.write_all(garbage);
        }
    }
    std::fs::write(env.path("hostile-outcomes.log"), outcomes.join("\n"))?;

    // The coordinator says what it dropped: nothing the raw client sent carries d1's MAC.
    journal.wait_for_event(
        "\"auth_rejected\" event for the hostile input",
        before,
        DELIVERY_TIMEOUT,
        |e| e.is("auth_rejected"),
    )?;
    ensure!(
        coord.is_running(),
        "the coordinator died on hostile input; outcomes:\n{}",
        outcomes.join("\n")
    );
    ensure!(
        agent.is_running(),
        "the agent died on hostile input; outcomes:\n{}",
        outcomes.join("\n")
    );

    // Still delivering: new messages and new telemetry arrive.
    let mark = journal.len();
    let msgs = test_messages(
        "after-attack",
        20,
        &[Class::Control, Class::Results, Class::Telemetry],
    );
    let expected = agent.api()?.publish_all(&msgs, 10)?;
    journal.wait_for_data_ids(
        DEVICE,
        expected.iter().map(|x| x.id.as_str()),
        DELIVERY_TIMEOUT,
    )?;
    journal.wait_for_event("telemetry after the attack", mark, DELIVERY_TIMEOUT, |e| {
        e.is_for("telemetry", DEVICE)
    })?;
    ensure!(
        coord.is_running() && agent.is_running(),
        "a process exited after the attack"
    );
    DeliveryReport::check(&journal, DEVICE, &expected).ensure_ok()
}

fn agent_options(url: String) -> AgentOptions {
    let mut o = AgentOptions::new(DEVICE, url);
    o.telemetry_interval_s = 1;
    o
}

#[test]
fn malformed_input_embedded_broker() {
    run_test("malformed_input_embedded", |env| {
        let mut coord = Coordinator::start_embedded(&env.path("coordinator"))?;
        let port = coord.port().context("embedded broker has a port")?;
        let mut agent = Agent::start(&env.path("agent"), agent_options(coord.url()))?;
        attack(env, port, &mut coord, &mut agent)
    });
}

#[test]
fn malformed_input_mosquitto() {
    run_test("malformed_input_mosquitto", |env| {
        let broker = Mosquitto::start(&env.path("mosquitto"))?;
        let mut coord = Coordinator::start_external(&env.path("coordinator"), &broker.url())?;
        let mut agent = Agent::start(&env.path("agent"), agent_options(broker.url()))?;
        attack(env, broker.port(), &mut coord, &mut agent)
    });
}
